"""Triton kernels for SSD decoding: the one-token step and speculative verification (Algorithm 2 of
Mamba-in-the-Llama, arXiv 2408.15237).

Semantics are exactly those of :func:`hybridize.ops.ssd.reference.ssd_step` (per batch row b, head h,
group g = h // (H // G); dt after bias / softplus / clamp to dt_limit; a = dt·A_h or ``log_decay``):

    h  = exp(a)·h + dt·x ⊗ B_g          h: (P, N), fp32 math whatever the state dtype
    y  = h·C_g + D·x,   y *= silu(z)

The step kernel also reads shared rows directly (no repeat_interleave before it): x (B, Hx, P),
B (B, Gb, N), C (B, Gc, N) with head h on rows h // (H // Hx), h // (H // Gb), h // (H // Gc) (the
Mamba-in-the-Llama layout: x and B per kv head, C per query head), and takes A_log with
A = -exp(A_log) computed in the kernel.

Kernels (grid: one program per (b, h, P-block), flattened on axis 0; the whole N axis in one tile)
---------------------------------------------------------------------------------------------------
* ``_ssd_step_kernel`` — load the (BP, N) state tile once, update it in registers, store it once
  (in place, in the state's dtype), reduce y = h·C. Nothing else of size P·N moves.
* ``_ssd_verify_kernel`` — speculative verification. Load the state tile once; optionally advance
  it by the previous round's first ``accepted[b]`` inputs and store it (Algorithm 2's lazy advance,
  fused into the next call); then run the K new inputs through the running state *in registers*,
  writing the K outputs and no state. ``ssd_advance`` is the same kernel with K = 0.

HBM floor (bytes that must move; S = B·H·P·N state elements of e_s bytes, e_x the activation size)
-----------------------------------------------------------------------------------------------
* step:           2·S·e_s (read + write the state) + B·H·P·e_x·(2 + [z]) (x, y, z) + B·G·N·2·e_x (B, C)
                  + B·H·e_x (dt). The state dominates: batch 64, 80 heads, P=64, N=128 →
                  S = 41.9M → 335 MB fp32 = 0.100 ms, 168 MB bf16 = 0.050 ms at 3.35 TB/s (H100 SXM).
* verify (K):     S·e_s (read only) + K × the per-token inputs/outputs above → ≈ half a step.
* advance+verify: 2·S·e_s + (Kp + K) × the per-token inputs → ≈ one step, whatever K.
FLOPs are ~4 per state element per token (fma update, fma into y): far below the memory time for
K ≲ 16.

Registered as ``torch.ops.hybridize.ssd_step / ssd_verify / ssd_advance_verify``
(``torch.library.custom_op`` with fakes; the mutated state is declared) so torch.compile and CUDA
graphs can capture them; launches do no host synchronisation.

Limits: N <= 256 (one tile per row; larger N goes to the reference through the dispatch); any P;
x/B/C/z in fp32/bf16/fp16; state fp32/bf16/fp16 with any strides.

Tuning: ``TUNE`` (state bytes per program → BP, warps, eviction hint) is read at every launch, so a
benchmark can sweep it without touching code.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridize.ops.pdl import pdl_launch
from hybridize.ops.ssd.reference import step_head_reps

TUNE = {
    "step_tile_bytes": 16384,     # state bytes per program: BP = tile / (next_pow2(N) · element size)
    "step_warps": None,           # None: one warp per 1024 state elements of the tile (32 per thread)
    "verify_tile_bytes": 16384,
    "verify_warps": None,
    "evict_first": True,    # stream the state past L2 (each element is touched once per call)
}

MAX_N = 256


# ------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _softplus(v):
    # torch.nn.functional.softplus (threshold 20: linear above); log1p(e) written as
    # log(u)·e/(u − 1), u = 1 + e, which cancels the rounding of u for tiny e.
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    sp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(v > 20.0, v, sp)


@triton.jit
def _dt_and_decay(dt_ptr, ld_ptr, A_ptr, bias_ptr, h, dt_min, dt_max,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LOG_DECAY: tl.constexpr,
                  A_LOG: tl.constexpr):
    """Scalar dt (processed as the reference's _process_dt) and the log decay a of one (b, h, token).
    A_LOG: A_ptr holds A_log, A = -exp(A_log) (the op order of the reference)."""
    dt = tl.load(dt_ptr).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)   # always clamped, like the reference
    if LOG_DECAY:
        a = tl.load(ld_ptr).to(tl.float32)
    else:
        A = tl.load(A_ptr + h).to(tl.float32)
        if A_LOG:
            A = -tl.exp(A)
        a = dt * A
    return dt, a


@triton.jit
def _skip_gate(y, xv, D_ptr, z_ptr, h, p, pm, sDh,
               HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr):
    """y + D·x, then · silu(z) (fp32)."""
    if HAS_D:
        if D_PER_P:
            Dv = tl.load(D_ptr + h * sDh + p, mask=pm, other=0.0).to(tl.float32)
        else:
            Dv = tl.load(D_ptr + h).to(tl.float32)
        y += Dv * xv
    if HAS_Z:
        zv = tl.load(z_ptr + p, mask=pm, other=0.0).to(tl.float32)
        y *= zv * tl.sigmoid(zv)
    return y


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ssd_step_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, s_ptr, D_ptr, z_ptr, bias_ptr, ld_ptr, y_ptr,
                     H, P, N, n_pblk, x_rep, b_rep, c_rep,
                     sxb, sxh, sdb, sdh, sBb, sBg, sCb, sCg, ssb, ssh, ssp, ssn,
                     szb, szh, slb, slh, syb, syh, sDh, dt_min, dt_max,
                     HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LOG_DECAY: tl.constexpr,
                     A_LOG: tl.constexpr, EVICT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                     PDL: tl.constexpr = 0, NORM: tl.constexpr = 0, GS: tl.constexpr = 1, NGP: tl.constexpr = 1,
                     nw_ptr=None, eps=0.0):
    """One token for the (BP, N) state block (b, h, P-block); state updated in place. Head h reads
    x row h // x_rep, B group h // b_rep, C group h // c_rep (shared rows, read in place). NORM (the
    whole head in one block): the gated output normalised over groups of GS channels (NGP: the padded
    group count) · nw (H·P,) — Mamba-2's gated RMSNorm, which then needs no kernels of its own."""
    if PDL:    # see hybridize.ops.pdl: wait for the previous kernel before any read or write
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    pb = pid % n_pblk
    bh = pid // n_pblk
    h = bh % H
    b = (bh // H).to(tl.int64)
    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    m = pm[:, None] & nm[None, :]

    sp = s_ptr + b * ssb + h.to(tl.int64) * ssh + p[:, None].to(tl.int64) * ssp + n[None, :] * ssn
    if EVICT:
        s = tl.load(sp, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
    else:
        s = tl.load(sp, mask=m, other=0.0).to(tl.float32)

    dt, a = _dt_and_decay(dt_ptr + b * sdb + h * sdh, ld_ptr + b * slb + h * slh, A_ptr, bias_ptr,
                          h, dt_min, dt_max, HAS_BIAS, SOFTPLUS, LOG_DECAY, A_LOG)
    xv = tl.load(x_ptr + b * sxb + (h // x_rep) * sxh + p, mask=pm, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * sBb + (h // b_rep) * sBg + n, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * sCb + (h // c_rep) * sCg + n, mask=nm, other=0.0).to(tl.float32)

    s = s * tl.exp(a) + (dt * xv)[:, None] * Bv[None, :]
    if EVICT:
        tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=m, eviction_policy="evict_first")
    else:
        tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=m)

    y = tl.sum(s * Cv[None, :], axis=1)          # from the fp32 state, as the reference
    y = _skip_gate(y, xv, D_ptr, z_ptr + b * szb + h * szh, h, p, pm, sDh, HAS_D, D_PER_P, HAS_Z)
    if NORM:    # group sums through a (BP, groups) one-hot: P need not be a power of two
        member = ((p // GS)[:, None] == tl.arange(0, NGP)[None, :]) & pm[:, None]
        rg = 1.0 / tl.sqrt(tl.sum(tl.where(member, (y * y)[:, None], 0.0), axis=0) / GS + eps)
        y = y * tl.sum(tl.where(member, rg[None, :], 0.0), axis=1)
        y = y * tl.load(nw_ptr + h * P + p, mask=pm, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * syb + h * syh + p, y.to(y_ptr.dtype.element_ty), mask=pm)


@triton.jit
def _token(x_ptr, dt_ptr, ld_ptr, B_ptr, A_ptr, bias_ptr, idx, limit, h, g, p, n, pm, nm, dt_min, dt_max,
           HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LOG_DECAY: tl.constexpr):
    """Inputs of token idx (pointers already at (b, idx, h / g)); all-zero unless idx < limit.
    → decay exp(a) (scalar), x (BP,), dt·x (BP,), B (BN,), all fp32."""
    valid = (h * 0 + idx) < limit     # an int1 tensor even when idx and limit are compile-time ints
    dt = tl.load(dt_ptr, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    if LOG_DECAY:
        a = tl.load(ld_ptr, mask=valid, other=0.0).to(tl.float32)
    else:
        a = dt * tl.load(A_ptr + h).to(tl.float32)
    # vector masks built from the vectors themselves (the interpreter mis-broadcasts scalar int1 masks)
    xv = tl.load(x_ptr + p, mask=pm & ((p * 0 + idx) < limit), other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + n, mask=nm & ((n * 0 + idx) < limit), other=0.0).to(tl.float32)
    return tl.exp(a), xv, dt * xv, Bv


@triton.jit
def _ssd_verify_kernel(x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, ld_ptr, y_ptr,
                       px_ptr, pdt_ptr, pB_ptr, pld_ptr, acc_ptr,
                       A_ptr, D_ptr, bias_ptr, s_ptr,
                       K, Kp, H, P, N, n_pblk, heads_per_group,
                       sxb, sxk, sxh, sdb, sdk, sdh, sBb, sBk, sBg, sCb, sCk, sCg,
                       szb, szk, szh, slb, slk, slh, syb, syk, syh,
                       spxb, spxk, spxh, spdb, spdk, spdh, spBb, spBk, spBg, splb, splk, splh, sacc,
                       ssb, ssh, ssp, ssn, sDh, dt_min, dt_max,
                       HAS_PREV: tl.constexpr,
                       HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LOG_DECAY: tl.constexpr,
                       EVICT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """(Optionally) advance the (BP, N) state block by the previous round's first accepted[b] inputs
    and store it; then produce the K outputs of this round from the running state in registers.
    Both token loops load token j+1's inputs before updating with token j, so the small per-token
    loads overlap the state math instead of stalling every iteration."""
    pid = tl.program_id(0)
    pb = pid % n_pblk
    bh = pid // n_pblk
    h = bh % H
    b = (bh // H).to(tl.int64)
    g = h // heads_per_group
    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    m = pm[:, None] & nm[None, :]

    sp = s_ptr + b * ssb + h.to(tl.int64) * ssh + p[:, None].to(tl.int64) * ssp + n[None, :] * ssn
    if EVICT:
        s = tl.load(sp, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
    else:
        s = tl.load(sp, mask=m, other=0.0).to(tl.float32)

    if HAS_PREV:
        # Algorithm 2's lazy advance: only the accepted prefix of the previous round's inputs
        n_acc = tl.load(acc_ptr + b * sacc).to(tl.int32)
        n_acc = tl.minimum(tl.maximum(n_acc, 0), Kp)
        pxb = px_ptr + b * spxb + h * spxh
        pdb = pdt_ptr + b * spdb + h * spdh
        plb = pld_ptr + b * splb + h * splh
        pBb = pB_ptr + b * spBb + g * spBg
        dec, xv, dtx, Bv = _token(pxb, pdb, plb, pBb, A_ptr, bias_ptr, 0, n_acc, h, g, p, n, pm, nm,
                                  dt_min, dt_max, HAS_BIAS, SOFTPLUS, LOG_DECAY)
        for j in range(0, n_acc):
            jn = j + 1
            dec_n, xv_n, dtx_n, Bv_n = _token(pxb + jn * spxk, pdb + jn * spdk, plb + jn * splk,
                                              pBb + jn * spBk, A_ptr, bias_ptr, jn, n_acc, h, g, p, n, pm, nm,
                                              dt_min, dt_max, HAS_BIAS, SOFTPLUS, LOG_DECAY)
            s = s * dec + dtx[:, None] * Bv[None, :]
            dec, dtx, Bv = dec_n, dtx_n, Bv_n
        if n_acc > 0:   # rows that accepted nothing keep their state: no write
            if EVICT:
                tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=m, eviction_policy="evict_first")
            else:
                tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=m)
            # the stored state is what a later call reads: verify from the same rounding
            s = s.to(s_ptr.dtype.element_ty).to(tl.float32)

    xb = x_ptr + b * sxb + h * sxh
    db = dt_ptr + b * sdb + h * sdh
    lb = ld_ptr + b * slb + h * slh
    Bb = B_ptr + b * sBb + g * sBg
    Cb = C_ptr + b * sCb + g * sCg
    dec, xv, dtx, Bv = _token(xb, db, lb, Bb, A_ptr, bias_ptr, 0, K, h, g, p, n, pm, nm,
                              dt_min, dt_max, HAS_BIAS, SOFTPLUS, LOG_DECAY)
    Cv = tl.load(Cb + n, mask=nm & ((n * 0) < K), other=0.0).to(tl.float32)
    for k in range(0, K):
        kn = k + 1
        dec_n, xv_n, dtx_n, Bv_n = _token(xb + kn * sxk, db + kn * sdk, lb + kn * slk, Bb + kn * sBk,
                                          A_ptr, bias_ptr, kn, K, h, g, p, n, pm, nm,
                                          dt_min, dt_max, HAS_BIAS, SOFTPLUS, LOG_DECAY)
        Cv_n = tl.load(Cb + kn * sCk + n, mask=nm & ((n * 0 + kn) < K), other=0.0).to(tl.float32)
        s = s * dec + dtx[:, None] * Bv[None, :]
        y = tl.sum(s * Cv[None, :], axis=1)
        y = _skip_gate(y, xv, D_ptr, z_ptr + b * szb + k * szk + h * szh, h, p, pm, sDh,
                       HAS_D, D_PER_P, HAS_Z)
        tl.store(y_ptr + b * syb + k * syk + h * syh + p, y.to(y_ptr.dtype.element_ty), mask=pm)
        dec, xv, dtx, Bv, Cv = dec_n, xv_n, dtx_n, Bv_n, Cv_n


# ------------------------------------------------------------------------------------------------
# launch helpers
# ------------------------------------------------------------------------------------------------
def _unit_last(t: Optional[Tensor]) -> Optional[Tensor]:
    """Activations need a unit stride on the last dim only (other strides are passed in)."""
    if t is None:
        return None
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _blocks(P: int, N: int, tile_bytes: int, state: Tensor) -> Tuple[int, int]:
    """(BP, BN): the whole (padded) N, and as many rows of P as fit in tile_bytes of state."""
    BN = max(2, triton.next_power_of_2(N))
    BP = max(1, min(triton.next_power_of_2(P), int(tile_bytes) // (BN * state.element_size())))
    BP = 1 << (BP.bit_length() - 1)     # a power of two
    return BP, BN


def _st(t: Optional[Tensor], n: int):
    """The first n strides of t, or zeros for an absent tensor (the kernel never reads it)."""
    return tuple(t.stride()[:n]) if t is not None else (0,) * n


def _vec(t: Optional[Tensor]) -> Optional[Tensor]:
    """Per-head parameters (A, dt_bias) are indexed as ptr + h."""
    return t.contiguous() if t is not None else None


def _warps(BP: int, BN: int, setting) -> int:
    if setting:
        return int(setting)
    return max(1, min(16, (BP * BN) // 1024))


def _D_args(D: Optional[Tensor]):
    if D is None:
        return None, False, 0
    D = D.contiguous()
    return D, D.dim() == 2, (D.stride(0) if D.dim() == 2 else 0)


def _check_state(state: Tensor, Bsz: int, H: int, P: int, N: int):
    if tuple(state.shape) != (Bsz, H, P, N):
        raise ValueError(f"ssd: state must be (B, H, P, N) = {(Bsz, H, P, N)}, got {tuple(state.shape)}")
    if N > MAX_N:
        raise ValueError(f"ssd step/verify kernels need N <= {MAX_N}, got {N}")


def _step_impl(x, dt, A, Bm, Cm, state, D, z, dt_bias, log_decay, dt_softplus, dt_min, dt_max, A_log=None,
               norm_weight=None, norm_eps=1e-5, norm_group=0):
    """x (B,Hx,P), Bm (B,Gb,N), Cm (B,Gc,N), state (B,H,P,N): see ssd_step_triton."""
    x_rep, b_rep, c_rep = step_head_reps(x, dt, Bm, Cm, state, A, A_log, log_decay)
    Bsz, H, P, N = state.shape
    if N > MAX_N:
        raise ValueError(f"ssd step/verify kernels need N <= {MAX_N}, got {N}")
    x, Bm, Cm, z = _unit_last(x), _unit_last(Bm), _unit_last(Cm), _unit_last(z)
    D, d_per_p, sDh = _D_args(D)
    a_log = A_log is not None and log_decay is None    # the kernel computes A = -exp(A_log)
    A, dt_bias = _vec(A_log if a_log else A), _vec(dt_bias)
    y = torch.empty(Bsz, H, P, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    BP, BN = _blocks(P, N, TUNE["step_tile_bytes"], state)
    norm = {}
    if norm_weight is not None:             # the norm needs the whole head in one program
        gs = int(norm_group) or P
        if P % gs or norm_weight.numel() != H * P:
            raise ValueError(f"ssd_step: norm_weight must have H·P = {H * P} elements and norm_group ({gs}) "
                             f"divide P = {P}; got {norm_weight.numel()} elements")
        BP = triton.next_power_of_2(P)
        norm = dict(NORM=1, GS=gs, NGP=triton.next_power_of_2(P // gs), nw_ptr=norm_weight.contiguous(),
                    eps=float(norm_eps))
    n_pblk = triton.cdiv(P, BP)
    _ssd_step_kernel[(Bsz * H * n_pblk,)](
        x, dt, A if A is not None else dt, Bm, Cm, state, D if D is not None else x,
        z if z is not None else x,
        dt_bias if dt_bias is not None else dt, log_decay if log_decay is not None else dt, y,
        H, P, N, n_pblk, x_rep, b_rep, c_rep,
        *_st(x, 2), *_st(dt, 2), *_st(Bm, 2), *_st(Cm, 2), *state.stride(),
        *_st(z, 2), *_st(log_decay, 2), *_st(y, 2), sDh, float(dt_min), float(dt_max),
        HAS_D=D is not None, D_PER_P=d_per_p, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), LOG_DECAY=log_decay is not None, A_LOG=a_log,
        EVICT=bool(TUNE["evict_first"]), BP=BP, BN=BN, num_warps=_warps(BP, BN, TUNE["step_warps"]),
        **pdl_launch(x.device), **norm)
    return y


def _verify_impl(x, dt, A, Bm, Cm, state, D, z, dt_bias, log_decay,
                 px, pdt, pB, pld, accepted, dt_softplus, dt_min, dt_max):
    """x (B,K,H,P) (K may be 0: advance only). px/pdt/pB/pld/accepted: the previous round (or None)."""
    Bsz, K, H, P = x.shape
    G, N = Bm.shape[2], Bm.shape[3]
    _check_state(state, Bsz, H, P, N)
    has_prev = accepted is not None
    x, Bm, Cm, z = _unit_last(x), _unit_last(Bm), _unit_last(Cm), _unit_last(z)
    if has_prev:
        px, pB = _unit_last(px), _unit_last(pB)
        Kp = px.shape[1]
        if (px.shape[0], px.shape[2:]) != (Bsz, (H, P)) or pdt.shape != px.shape[:3] \
                or tuple(pB.shape) != (Bsz, Kp, G, N) or tuple(accepted.shape) != (Bsz,) \
                or (log_decay is None) != (pld is None):
            raise ValueError("ssd_verify: previous-round inputs must be x (B,Kp,H,P), dt (B,Kp,H), "
                             "Bm (B,Kp,G,N), accepted (B,) (and log_decay (B,Kp,H) iff this call has one)")
    else:
        Kp = 0
    D, d_per_p, sDh = _D_args(D)
    A, dt_bias = _vec(A), _vec(dt_bias)
    y = torch.empty(Bsz, K, H, P, device=x.device, dtype=x.dtype)
    if Bsz * H * P == 0 or (K == 0 and not has_prev):
        return y
    BP, BN = _blocks(P, N, TUNE["verify_tile_bytes"], state)
    n_pblk = triton.cdiv(P, BP)
    _ssd_verify_kernel[(Bsz * H * n_pblk,)](
        x, dt, Bm, Cm, z if z is not None else x, log_decay if log_decay is not None else dt, y,
        px if has_prev else x, pdt if has_prev else dt, pB if has_prev else Bm,
        pld if pld is not None else dt, accepted if has_prev else dt,
        A if A is not None else dt, D if D is not None else x, dt_bias if dt_bias is not None else dt, state,
        K, Kp, H, P, N, n_pblk, H // G,
        *_st(x, 3), *_st(dt, 3), *_st(Bm, 3), *_st(Cm, 3), *_st(z, 3), *_st(log_decay, 3), *_st(y, 3),
        *_st(px, 3), *_st(pdt, 3), *_st(pB, 3), *_st(pld, 3), *_st(accepted, 1),
        *state.stride(), sDh, float(dt_min), float(dt_max),
        HAS_PREV=has_prev, HAS_D=D is not None, D_PER_P=d_per_p, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), LOG_DECAY=log_decay is not None,
        EVICT=bool(TUNE["evict_first"]), BP=BP, BN=BN, num_warps=_warps(BP, BN, TUNE["verify_warps"]))
    return y


# ------------------------------------------------------------------------------------------------
# torch.library registration (torch.compile / CUDA graphs)
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("hybridize::ssd_step", mutates_args=("state",))
def _ssd_step_op(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, state: Tensor,
                 D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                 log_decay: Optional[Tensor], dt_softplus: bool, dt_min: float, dt_max: float,
                 A_log: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None, norm_eps: float = 1e-5,
                 norm_group: int = 0) -> Tensor:
    return _step_impl(x, dt, A, Bm, Cm, state, D, z, dt_bias, log_decay, dt_softplus, dt_min, dt_max, A_log,
                      norm_weight, norm_eps, norm_group)


@_ssd_step_op.register_fake
def _(x, dt, A, Bm, Cm, state, D, z, dt_bias, log_decay, dt_softplus, dt_min, dt_max, A_log=None,
      norm_weight=None, norm_eps=1e-5, norm_group=0):
    step_head_reps(x, dt, Bm, Cm, state, A, A_log, log_decay)    # the same errors while tracing
    return x.new_empty(state.shape[:3])                            # y (B, H, P), x may have Hx < H rows


@torch.library.custom_op("hybridize::ssd_verify", mutates_args=())
def _ssd_verify_op(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, state: Tensor,
                   D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                   log_decay: Optional[Tensor], dt_softplus: bool, dt_min: float, dt_max: float) -> Tensor:
    return _verify_impl(x, dt, A, Bm, Cm, state, D, z, dt_bias, log_decay, None, None, None, None, None,
                        dt_softplus, dt_min, dt_max)


@_ssd_verify_op.register_fake
def _(x, dt, A, Bm, Cm, state, D, z, dt_bias, log_decay, dt_softplus, dt_min, dt_max):
    return torch.empty_like(x)


@torch.library.custom_op("hybridize::ssd_advance_verify", mutates_args=("state",))
def _ssd_advance_verify_op(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, state: Tensor,
                           D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                           log_decay: Optional[Tensor], prev_x: Tensor, prev_dt: Tensor, prev_Bm: Tensor,
                           prev_log_decay: Optional[Tensor], accepted: Tensor,
                           dt_softplus: bool, dt_min: float, dt_max: float) -> Tensor:
    return _verify_impl(x, dt, A, Bm, Cm, state, D, z, dt_bias, log_decay, prev_x, prev_dt, prev_Bm,
                        prev_log_decay, accepted, dt_softplus, dt_min, dt_max)


@_ssd_advance_verify_op.register_fake
def _(x, dt, A, Bm, Cm, state, D, z, dt_bias, log_decay, prev_x, prev_dt, prev_Bm, prev_log_decay,
      accepted, dt_softplus, dt_min, dt_max):
    return torch.empty_like(x)


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
class PendingSteps(NamedTuple):
    """The previous verification round's per-step inputs (Algorithm 2 caches these instead of K states).
    x (B,Kp,H,P), dt (B,Kp,H) raw (the call's dt_bias / softplus / limit apply), Bm (B,Kp,G,N),
    log_decay (B,Kp,H) or None (must be given iff the call uses log_decay)."""
    x: Tensor
    dt: Tensor
    Bm: Tensor
    log_decay: Optional[Tensor] = None


def kernel_supports(x: Tensor, Bm: Tensor, state: Tensor) -> bool:
    """Shapes/dtypes the step/verify kernels handle: 16/32-bit floats, N <= MAX_N."""
    fl = (torch.float32, torch.bfloat16, torch.float16)
    return x.dtype in fl and state.dtype in fl and 1 <= Bm.shape[-1] <= MAX_N


def _in_graph() -> bool:
    return torch.compiler.is_compiling()


def ssd_step_triton(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, state: Tensor, *,
                    D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                    dt_softplus: bool = False, dt_limit=(0.0, float("inf")),
                    log_decay: Optional[Tensor] = None, A_log: Optional[Tensor] = None,
                    norm_weight: Optional[Tensor] = None, norm_eps: float = 1e-5, norm_group: int = 0) -> Tensor:
    """One token, fused. state (B,H,P,N) fp32/bf16/fp16 (any strides) — updated IN PLACE;
    x (B,Hx,P), Bm (B,Gb,N), Cm (B,Gc,N) with Hx, Gb, Gc dividing H (head h reads rows
    h // (H // Hx), h // (H // Gb), h // (H // Gc); strided views are read in place); dt (B,H);
    A (H,), or A_log (H,) with A = -exp(A_log) computed in the kernel (A=None), or log_decay (B,H);
    D (H,)|(H,P), z (B,H,P), dt_bias (H,); norm_weight (H·P,) / norm_eps / norm_group: the gated
    RMSNorm on the output. Returns y (B,H,P) in x's dtype. Same semantics as
    :func:`hybridize.ops.ssd.reference.ssd_step`; no host synchronisation (CUDA-graph capturable)."""
    args = (x, dt, A, Bm, Cm, state, D, z, dt_bias, log_decay, bool(dt_softplus),
            float(dt_limit[0]), float(dt_limit[1]), A_log, norm_weight, float(norm_eps), int(norm_group))
    if _in_graph():
        return torch.ops.hybridize.ssd_step(*args)
    return _step_impl(*args)


def _pending(advance_prev):
    prev, accepted = advance_prev
    prev = PendingSteps(*prev)
    return prev, accepted


def ssd_verify_triton(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, state: Tensor, *,
                      D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                      dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                      dt_limit=(0.0, float("inf")), log_decay: Optional[Tensor] = None,
                      advance_prev=None) -> Tensor:
    """Outputs of K consecutive tokens from the cached state, without writing K states.

    x (B,K,H,P), dt (B,K,H), Bm/Cm (B,K,G,N), z (B,K,H,P), log_decay (B,K,H); the rest as
    :func:`ssd_step_triton`. Returns y (B,K,H,P) = what K calls of ssd_step would return.

    advance_prev = (PendingSteps (or a tuple (x, dt, Bm[, log_decay])) of the previous round,
    accepted (B,) int in [0, Kp]): first advance ``state`` IN PLACE by each row's accepted prefix of
    those inputs, then verify from the advanced state (one state read + one write in all). Without
    it the state is only read."""
    if log_decay is None and A is None:
        raise ValueError("ssd: A is required unless log_decay is given")
    tail = (bool(dt_softplus), float(dt_limit[0]), float(dt_limit[1]))
    if advance_prev is None:
        args = (x, dt, A, Bm, Cm, state, D, z, dt_bias, log_decay) + tail
        return torch.ops.hybridize.ssd_verify(*args) if _in_graph() else \
            _verify_impl(*args[:10], None, None, None, None, None, *tail)
    prev, accepted = _pending(advance_prev)
    args = (x, dt, A, Bm, Cm, state, D, z, dt_bias, log_decay, prev.x, prev.dt, prev.Bm, prev.log_decay,
            accepted) + tail
    return torch.ops.hybridize.ssd_advance_verify(*args) if _in_graph() else _verify_impl(*args)


def ssd_advance_triton(state: Tensor, x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor,
                       accepted: Tensor, *, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                       dt_limit=(0.0, float("inf")), log_decay: Optional[Tensor] = None) -> None:
    """Advance ``state`` (B,H,P,N) IN PLACE by the first accepted[b] ∈ [0, K] of the inputs
    x (B,K,H,P), dt (B,K,H), Bm (B,K,G,N) (log_decay (B,K,H)) — the verify kernel with no new tokens."""
    Bsz, _, H, P = x.shape
    G = Bm.shape[2]
    x0 = x.new_empty(Bsz, 0, H, P)
    b0 = Bm.new_empty(Bsz, 0, G, Bm.shape[3])
    ld0 = log_decay.new_empty(Bsz, 0, H) if log_decay is not None else None
    ssd_verify_triton(x0, dt.new_empty(Bsz, 0, H), A, b0, b0, state, dt_bias=dt_bias, dt_softplus=dt_softplus,
                      dt_limit=dt_limit, log_decay=ld0, advance_prev=((x, dt, Bm, log_decay), accepted))


__all__ = ["MAX_N", "PendingSteps", "TUNE", "kernel_supports", "ssd_advance_triton", "ssd_step_triton",
           "ssd_verify_triton"]
