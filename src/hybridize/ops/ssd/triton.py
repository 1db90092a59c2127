"""Triton kernels for the chunked SSD scan (Mamba-2 / discrete Mamba-2), forward and backward.

Semantics are exactly those of :func:`hybridize.ops.ssd.reference.ssd_chunked` (same signature). Per
batch row b and head h (group g = h // (H // G)), with dt after bias/softplus/clamp and a_t = dt_t·A_h
(or ``log_decay``):

    h_t = exp(a_t)·h_{t-1} + dt_t·x_t ⊗ B_t,     y_t = h_t·C_t + D·x_t,     out = y·silu(z)

Chunked algorithm (chunk of Q tokens, cs_l = a_0 + … + a_l inside the chunk, h_in = state entering it)
------------------------------------------------------------------------------------------------------
    y_l    = Σ_{s≤l} (C_l·B_s)·exp(cs_l − cs_s)·dt_s·x_s      intra-chunk: two Q×Q×{N,P} matmuls
           + exp(cs_l)·(h_in·C_l)                            state → output: one Q×N×P matmul
    h_out  = exp(cs_{Q-1})·h_in + Σ_s exp(cs_{Q-1} − cs_s)·dt_s·x_s ⊗ B_s     one P×Q×N matmul

With documents (``seq_idx``) every term is masked: s and l must be in the same document, h_in only
reaches tokens of the document that was running when the chunk started, and only tokens of the
chunk's last document reach h_out (h_in is dropped from h_out if a document starts in the chunk).

Kernels (all dots take x's dtype — bf16/fp16 on tensor cores, or fp32 with ``ieee`` precision — and
accumulate in fp32; the running state is fp32 in registers)
-----------------------------------------------------------------------------------------------------
* ``_ssd_dt_kernel`` — grid (B·nc, ⌈H/BH⌉): dt → clamp(softplus(dt + bias)), per-chunk inclusive
  cumsum of the log decay. Writes ``dtp``, ``cs``: (B, H, nc·Q) fp32 (padding tokens: dt = a = 0).
* ``_ssd_state_fwd_kernel`` — grid (B·H, ⌈P/BP⌉, ⌈N/BN⌉): steps 2+3 fused (flash-linear-attention's
  ``chunk_fwd_h`` idea). Each program walks the chunks in order keeping a (BP, BN) block of the state
  in fp32 registers, stores the state *entering* each chunk (``hs`` (B, nc, H, P, N), x's dtype —
  exactly what the output matmul consumes) and the final state (fp32). No per-chunk local states are
  written and re-read (mamba_ssm's chunk_state → state_passing round trip through HBM).
* ``_ssd_out_fwd_kernel`` — grid (nc, B·H, ⌈P/BP⌉): steps 1+4 fused. C·Bᵀ, the masked decay, ·x,
  + C·h_inᵀ, + D·x, ·silu(z); y written once.

Backward (recompute, nothing big saved: the forward saves only its inputs)
* ``_ssd_dt_kernel`` and ``_ssd_state_fwd_kernel`` again (``hs``).
* ``_ssd_dstate_kernel`` — grid (B·H, ⌈P/BP⌉, ⌈N/BN⌉): the reverse scan of the state gradient.
  dH_c = ∂L/∂(state at the end of chunk c):  dH_{nc-1} = d final_state and
      dH_{c-1} = exp(cs_{Q-1})·dH_c + Σ_l exp(cs_l)·dy_l ⊗ C_l        (dy = dout·silu(z))
  stores ``dhs`` (B, nc, H, P, N) and d initial_state (= dH_{-1}).
* ``_ssd_bwd_chunk_kernel`` — grid (nc, B, G·splits): everything else, chunk-parallel. A program
  owns one chunk of one group (B, C and C·Bᵀ loaded/computed once) and loops over a slice of the
  group's heads, accumulating dB, dC in registers (no (B, L, H, N) per-head buffers). With
  M_ls = [s≤l]·exp(cs_l − cs_s), S = M∘(C Bᵀ), Gm_ls = dy_l·x_s, w_s = exp(cs_{Q-1} − cs_s):
      dx_s  = dt_s·(Sᵀ dy)_s + w_s·dt_s·(B dHᵀ)_s + D·dy_s
      dB_s  = dt_s·((M∘Gm)ᵀ C)_s + w_s·dt_s·(x dH)_s
      dC_l  = ((M∘Gm)·dt_s B)_l + exp(cs_l)·(dy h_in)_l
      ddt_s = Σ_l (S∘Gm)_ls + w_s·x_s·(dH B_s)
      dcs_l = Σ_s T_ls − Σ_s T_sl + dy_l·y_off_l − w_l dt_l x_l·(dH B_l)
              (+ at l = Q−1: Σ_s w_s dt_s x_s·(dH B_s) + exp(cs_{Q-1})·⟨h_in, dH⟩),   T = S∘Gm·dt_s
      da    = reverse cumsum of dcs;  ddt += da·A, dA = Σ da·dt  (or d log_decay = da)
  then the dt chain (clamp mask — zero gradient where clamped —, softplus'), dD, dz (y recomputed).

HBM traffic (forward; e = element size): x twice, B/C, y, and hs twice (B·nc·H·P·N·e each way; N/Q
× the size of x) — for H=32, P=64, N=128, Q=64, 16k tokens, bf16: ≈ 0.48 GB, ≈ 0.14 ms at 3.35 TB/s.

Registered as ``torch.ops.hybridize.ssd_chunked_fwd / ssd_chunked_bwd`` (``torch.library.custom_op`` +
fake + autograd) so torch.compile(fullgraph=True) can capture them; launches do no host sync.

Limits: P, N <= 256 (whole-P / whole-N tiles in the chunk kernels; larger shapes go to the reference
through the dispatch); fp32/bf16/fp16. The kernel chunk is ``kernel_chunk(chunk_size)`` (a power of two
in [16, TUNE['chunk']]; the result depends on it only through rounding), and a launch that runs out
of shared memory is retried with half the chunk. Under TRITON_INTERPRET=1 bf16 dots are wrong (numpy
has no bf16) — CPU tests use fp32/fp16.

Tuning: the module-level dict ``TUNE`` (chunk, block sizes, warps, stages, heads per program) is
read at launch time, so a benchmark can sweep it without touching code.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

# Launch knobs (None = heuristic). Read at every launch.
TUNE = {
    "chunk": 64,            # largest kernel chunk; the user's chunk_size is clamped to [16, chunk]
    "state_bp": None,       # P block of the sequential state kernels (fwd states, bwd dstates)
    "state_bn": None,       # N block of the sequential state kernels
    "state_warps": 4,
    "state_stages": 3,
    "out_bp": None,         # P block of the forward output kernel
    "out_warps": 4,
    "out_stages": 2,
    "bwd_heads": None,      # heads per program of the backward chunk kernel (must divide H // G)
    "bwd_warps": 8,
    "bwd_stages": 1,
}

_MAX_PN = 256               # P and N up to this run in the kernels (whole-P / whole-N tiles)


# ------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _softplus(v):
    # torch.nn.functional.softplus (threshold 20: linear above). log1p(e) without a log1p builtin:
    # log(u)·e/(u − 1) with u = 1 + e cancels the rounding of u (exact to a few ulps for tiny e).
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    sp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(v > 20.0, v, sp)


@triton.jit
def _seq_at(seq_ptr, b64, pos, L, ssb, ssl):
    """Document id at positions `pos` clamped into [0, L) (padding continues the last document)."""
    p = tl.minimum(tl.maximum(pos, 0), L - 1).to(tl.int64)
    return tl.load(seq_ptr + b64 * ssb + p * ssl)


# ------------------------------------------------------------------------------------------------
# step 1: dt processing and per-chunk cumulative log decay
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ssd_dt_kernel(dt_ptr, bias_ptr, A_ptr, ld_ptr, dtp_ptr, cs_ptr,
                   L, H, nc, Lp, sdb, sdl, sdh, slb, sll, slh, dt_min, dt_max,
                   HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LOG_DECAY: tl.constexpr,
                   Q: tl.constexpr, BH: tl.constexpr):
    """dt (B, L, H) → dtp, cs (B, H, nc·Q) fp32; one (Q, BH) tile of one chunk per program."""
    pid = tl.program_id(0)
    b = pid // nc
    c = pid % nc
    b64 = b.to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    hm = h < H
    t = c * Q + tl.arange(0, Q)
    tm = t < L
    t64 = t.to(tl.int64)
    m = tm[:, None] & hm[None, :]
    v = tl.load(dt_ptr + b64 * sdb + t64[:, None] * sdl + h[None, :] * sdh, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + h, mask=hm, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        v = _softplus(v)
    v = tl.minimum(tl.maximum(v, dt_min), dt_max)   # always clamped, like the reference
    v = tl.where(m, v, 0.0)                         # padding tokens neither decay nor write
    if LOG_DECAY:
        a = tl.load(ld_ptr + b64 * slb + t64[:, None] * sll + h[None, :] * slh, mask=m, other=0.0)
        a = a.to(tl.float32)
    else:
        a = v * tl.load(A_ptr + h, mask=hm, other=0.0).to(tl.float32)[None, :]
    cs = tl.cumsum(a, axis=0)
    offs = (b64 * H + h[None, :]) * Lp + t64[:, None]
    tl.store(dtp_ptr + offs, v, mask=hm[None, :])
    tl.store(cs_ptr + offs, cs, mask=hm[None, :])


# ------------------------------------------------------------------------------------------------
# steps 2+3: chunk states and state passing, one sequential walk over the chunks
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ssd_state_fwd_kernel(x_ptr, B_ptr, dtp_ptr, cs_ptr, seq_ptr, init_ptr, hs_ptr, fin_ptr,
                          L, H, G, P, N, nc, Lp,
                          sxb, sxl, sxh, sBb, sBl, sBg, ssb, ssl,
                          Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                          HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, PREC: tl.constexpr):
    """Writes hs[b, c, h] = state entering chunk c ((P, N) block), and the final state (fp32).

    h_out = decay_c·h_in + (x·w)ᵀ B  with w_s = exp(cs_{Q-1} − cs_s)·dt_s (·[s in the chunk's last
    document]) and decay_c = exp(cs_{Q-1}) (0 if a document starts in the chunk)."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    g = h // (H // G)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    DT = x_ptr.dtype.element_ty
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    n = tl.program_id(2) * BN + tl.arange(0, BN)
    pm = p < P
    nm = n < N
    q = tl.arange(0, Q)
    st_off = p[:, None] * N + n[None, :]
    st_m = pm[:, None] & nm[None, :]
    if HAS_INIT:
        acc = tl.load(init_ptr + (b64 * H + h64) * P * N + st_off, mask=st_m, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BP, BN), dtype=tl.float32)
    x_base = x_ptr + b64 * sxb + h64 * sxh
    B_base = B_ptr + b64 * sBb + g.to(tl.int64) * sBg
    d_base = (b64 * H + h64) * Lp
    if HAS_SEQ:
        doc_prev = tl.load(seq_ptr + b64 * ssb)          # the initial state's document: token 0's
    for c in range(nc):
        t = c * Q + q
        tm = t < L
        t64 = t.to(tl.int64)
        tl.store(hs_ptr + ((b64 * nc + c) * H + h64) * P * N + st_off, acc.to(DT), mask=st_m)
        cs = tl.load(cs_ptr + d_base + t64)
        dtv = tl.load(dtp_ptr + d_base + t64)
        cs_last = tl.load(cs_ptr + d_base + c * Q + Q - 1)
        w = tl.exp(cs_last - cs) * dtv
        decay = tl.exp(cs_last)
        if HAS_SEQ:
            sid = _seq_at(seq_ptr, b64, t, L, ssb, ssl)
            doc_end = _seq_at(seq_ptr, b64, c * Q + Q - 1, L, ssb, ssl)
            w = tl.where(sid == doc_end, w, 0.0)
            decay = tl.where(doc_end == doc_prev, decay, 0.0)
            doc_prev = doc_end
        xT = tl.load(x_base + t64[None, :] * sxl + p[:, None], mask=pm[:, None] & tm[None, :], other=0.0)
        Bt = tl.load(B_base + t64[:, None] * sBl + n[None, :], mask=tm[:, None] & nm[None, :], other=0.0)
        upd = tl.dot((xT.to(tl.float32) * w[None, :]).to(DT), Bt.to(DT), input_precision=PREC)
        acc = acc * decay + upd
    tl.store(fin_ptr + (b64 * H + h64) * P * N + st_off, acc, mask=st_m)


# ------------------------------------------------------------------------------------------------
# steps 1+4: outputs, chunk-parallel
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ssd_out_fwd_kernel(x_ptr, z_ptr, B_ptr, C_ptr, D_ptr, dtp_ptr, cs_ptr, seq_ptr, hs_ptr, y_ptr,
                        L, H, G, P, N, nc, Lp,
                        sxb, sxl, sxh, szb, szl, szh, sBb, sBl, sBg, sCb, sCl, sCg, ssb, ssl,
                        Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                        HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
                        HAS_SEQ: tl.constexpr, PREC: tl.constexpr):
    """y[chunk c, head h, P block] = ((C Bᵀ)∘decay·dt) x + exp(cs)·C h_inᵀ (+ D x) (· silu(z))."""
    c = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // H
    h = pid % H
    g = h // (H // G)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    g64 = g.to(tl.int64)
    DT = x_ptr.dtype.element_ty
    p = tl.program_id(2) * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    q = tl.arange(0, Q)
    pm = p < P
    nm = n < N
    t = c * Q + q
    tm = t < L
    t64 = t.to(tl.int64)
    d_base = (b64 * H + h64) * Lp
    cs = tl.load(cs_ptr + d_base + t64)
    dtv = tl.load(dtp_ptr + d_base + t64)
    qn = tm[:, None] & nm[None, :]
    Cv = tl.load(C_ptr + b64 * sCb + g64 * sCg + t64[:, None] * sCl + n[None, :], mask=qn, other=0.0).to(DT)
    Bv = tl.load(B_ptr + b64 * sBb + g64 * sBg + t64[:, None] * sBl + n[None, :], mask=qn, other=0.0).to(DT)
    CB = tl.dot(Cv, tl.trans(Bv), input_precision=PREC)                      # (Q, Q)
    keep = q[:, None] >= q[None, :]
    e_in = tl.exp(cs)
    if HAS_SEQ:
        sid = _seq_at(seq_ptr, b64, t, L, ssb, ssl)
        doc_in = _seq_at(seq_ptr, b64, c * Q - 1, L, ssb, ssl)               # document of h_in
        keep = keep & (sid[:, None] == sid[None, :])
        e_in = tl.where(sid == doc_in, e_in, 0.0)
    # masked exp(segsum): exp(cs_l − cs_s) for s ≤ l in the same document, 0 elsewhere
    S = CB * tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf"))) * dtv[None, :]
    qp = tm[:, None] & pm[None, :]
    xv = tl.load(x_ptr + b64 * sxb + h64 * sxh + t64[:, None] * sxl + p[None, :], mask=qp, other=0.0)
    y = tl.dot(S.to(DT), xv.to(DT), input_precision=PREC)                   # (Q, BP)
    hT = tl.load(hs_ptr + ((b64 * nc + c) * H + h64) * P * N + p[None, :] * N + n[:, None],
                 mask=nm[:, None] & pm[None, :], other=0.0)                  # h_inᵀ (BN, BP)
    y += tl.dot(Cv, hT.to(DT), input_precision=PREC) * e_in[:, None]
    if HAS_D:
        if D_PER_P:
            Dv = tl.load(D_ptr + h64 * P + p, mask=pm, other=0.0).to(tl.float32)
            y += xv.to(tl.float32) * Dv[None, :]
        else:
            y += xv.to(tl.float32) * tl.load(D_ptr + h64).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + b64 * szb + h64 * szh + t64[:, None] * szl + p[None, :], mask=qp, other=0.0)
        zv = zv.to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(y_ptr + ((b64 * L + t64[:, None]) * H + h64) * P + p[None, :], y.to(y_ptr.dtype.element_ty),
             mask=qp)


# ------------------------------------------------------------------------------------------------
# backward: reverse scan of the state gradient
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ssd_dstate_kernel(do_ptr, z_ptr, C_ptr, cs_ptr, seq_ptr, dfin_ptr, dhs_ptr, dinit_ptr,
                       L, H, G, P, N, nc, Lp,
                       sob, sol, soh, szb, szl, szh, sCb, sCl, sCg, ssb, ssl,
                       Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_DFIN: tl.constexpr,
                       HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, PREC: tl.constexpr):
    """dhs[b, c, h] = ∂L/∂(state at the end of chunk c); dinit = ∂L/∂(initial state), fp32.

    dH_{c-1} = decay_c·dH_c + (dy·exp(cs)·[l in h_in's document])ᵀ C  (the transpose of the forward
    state walk, run from the last chunk to the first)."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    g = h // (H // G)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    DT = dhs_ptr.dtype.element_ty
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    n = tl.program_id(2) * BN + tl.arange(0, BN)
    pm = p < P
    nm = n < N
    q = tl.arange(0, Q)
    st_off = p[:, None] * N + n[None, :]
    st_m = pm[:, None] & nm[None, :]
    if HAS_DFIN:
        acc = tl.load(dfin_ptr + (b64 * H + h64) * P * N + st_off, mask=st_m, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BP, BN), dtype=tl.float32)
    o_base = do_ptr + b64 * sob + h64 * soh
    z_base = z_ptr + b64 * szb + h64 * szh
    C_base = C_ptr + b64 * sCb + g.to(tl.int64) * sCg
    d_base = (b64 * H + h64) * Lp
    for i in range(nc):
        c = nc - 1 - i
        t = c * Q + q
        tm = t < L
        t64 = t.to(tl.int64)
        tl.store(dhs_ptr + ((b64 * nc + c) * H + h64) * P * N + st_off, acc.to(DT), mask=st_m)
        cs = tl.load(cs_ptr + d_base + t64)
        cs_last = tl.load(cs_ptr + d_base + c * Q + Q - 1)
        e_in = tl.exp(cs)
        decay = tl.exp(cs_last)
        if HAS_SEQ:
            sid = _seq_at(seq_ptr, b64, t, L, ssb, ssl)
            doc_in = _seq_at(seq_ptr, b64, c * Q - 1, L, ssb, ssl)
            doc_end = _seq_at(seq_ptr, b64, c * Q + Q - 1, L, ssb, ssl)
            e_in = tl.where(sid == doc_in, e_in, 0.0)
            decay = tl.where(doc_end == doc_in, decay, 0.0)
        mT = pm[:, None] & tm[None, :]
        dyT = tl.load(o_base + t64[None, :] * sol + p[:, None], mask=mT, other=0.0).to(tl.float32)
        if HAS_Z:
            zT = tl.load(z_base + t64[None, :] * szl + p[:, None], mask=mT, other=0.0).to(tl.float32)
            dyT = dyT * zT * tl.sigmoid(zT)
        Cv = tl.load(C_base + t64[:, None] * sCl + n[None, :], mask=tm[:, None] & nm[None, :], other=0.0)
        acc = acc * decay + tl.dot((dyT * e_in[None, :]).to(DT), Cv.to(DT), input_precision=PREC)
    tl.store(dinit_ptr + (b64 * H + h64) * P * N + st_off, acc, mask=st_m)


# ------------------------------------------------------------------------------------------------
# backward: everything else, chunk-parallel (see the module docstring for the formulas)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ssd_bwd_chunk_kernel(x_ptr, z_ptr, do_ptr, B_ptr, C_ptr, D_ptr, A_ptr, dt_ptr, bias_ptr,
                          dtp_ptr, cs_ptr, seq_ptr, hs_ptr, dhs_ptr,
                          dx_ptr, dz_ptr, ddt_ptr, dB_ptr, dC_ptr, dDp_ptr, dAp_ptr, dld_ptr,
                          Bsz, L, H, G, P, N, nc, Lp, HPS, n_split,
                          sxb, sxl, sxh, szb, szl, szh, sob, sol, soh, sBb, sBl, sBg, sCb, sCl, sCg,
                          sdb, sdl, sdh, ssb, ssl, dt_min, dt_max,
                          Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                          HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
                          HAS_SEQ: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                          LOG_DECAY: tl.constexpr, PREC: tl.constexpr):
    c = tl.program_id(0)
    b = tl.program_id(1)
    pid = tl.program_id(2)
    g = pid // n_split
    split = pid % n_split
    b64 = b.to(tl.int64)
    g64 = g.to(tl.int64)
    DT = x_ptr.dtype.element_ty
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    q = tl.arange(0, Q)
    pm = p < P
    nm = n < N
    t = c * Q + q
    tm = t < L
    t64 = t.to(tl.int64)
    qn = tm[:, None] & nm[None, :]
    qp = tm[:, None] & pm[None, :]
    st_off = p[:, None] * N + n[None, :]
    st_m = pm[:, None] & nm[None, :]
    # shared by every head of the group: B, C, C·Bᵀ and the document masks
    Cv = tl.load(C_ptr + b64 * sCb + g64 * sCg + t64[:, None] * sCl + n[None, :], mask=qn, other=0.0).to(DT)
    Bv = tl.load(B_ptr + b64 * sBb + g64 * sBg + t64[:, None] * sBl + n[None, :], mask=qn, other=0.0).to(DT)
    CB = tl.dot(Cv, tl.trans(Bv), input_precision=PREC)
    keep = q[:, None] >= q[None, :]
    if HAS_SEQ:
        sid = _seq_at(seq_ptr, b64, t, L, ssb, ssl)
        doc_in = _seq_at(seq_ptr, b64, c * Q - 1, L, ssb, ssl)
        doc_end = _seq_at(seq_ptr, b64, c * Q + Q - 1, L, ssb, ssl)
        keep = keep & (sid[:, None] == sid[None, :])
    dB_acc = tl.zeros((Q, BN), dtype=tl.float32)
    dC_acc = tl.zeros((Q, BN), dtype=tl.float32)
    h_first = g * (H // G) + split * HPS
    for j in range(HPS):
        h = h_first + j
        h64 = h.to(tl.int64)
        d_base = (b64 * H + h64) * Lp + c * Q
        cs = tl.load(cs_ptr + d_base + q)
        dtv = tl.load(dtp_ptr + d_base + q)
        cs_last = tl.load(cs_ptr + d_base + Q - 1)
        Mdec = tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf")))   # M (Q, Q)
        S = CB * Mdec
        e_in = tl.exp(cs)                     # h_in → token l
        w_end = tl.exp(cs_last - cs)          # token s → h_out
        decay = tl.exp(cs_last)               # h_in → h_out
        if HAS_SEQ:
            e_in = tl.where(sid == doc_in, e_in, 0.0)
            w_end = tl.where(sid == doc_end, w_end, 0.0)
            decay = tl.where(doc_end == doc_in, decay, 0.0)
        xv = tl.load(x_ptr + b64 * sxb + h64 * sxh + t64[:, None] * sxl + p[None, :], mask=qp, other=0.0)
        dov = tl.load(do_ptr + b64 * sob + h64 * soh + t64[:, None] * sol + p[None, :], mask=qp, other=0.0)
        sb = ((b64 * nc + c) * H + h64) * P * N
        h_in = tl.load(hs_ptr + sb + st_off, mask=st_m, other=0.0).to(DT)     # (BP, BN)
        dH = tl.load(dhs_ptr + sb + st_off, mask=st_m, other=0.0).to(DT)      # (BP, BN)
        xf = xv.to(tl.float32)
        y_off = tl.dot(Cv, tl.trans(h_in), input_precision=PREC) * e_in[:, None]   # (Q, BP)
        if HAS_D:
            if D_PER_P:
                Dv = tl.load(D_ptr + h64 * P + p, mask=pm, other=0.0).to(tl.float32)[None, :]
            else:
                Dv = tl.load(D_ptr + h64).to(tl.float32)
        if HAS_Z:
            # recompute the pre-gate y for dz
            zv = tl.load(z_ptr + b64 * szb + h64 * szh + t64[:, None] * szl + p[None, :], mask=qp, other=0.0)
            zv = zv.to(tl.float32)
            y = tl.dot((S * dtv[None, :]).to(DT), xv.to(DT), input_precision=PREC) + y_off
            if HAS_D:
                y += xf * Dv
            sg = tl.sigmoid(zv)
            dof = dov.to(tl.float32)
            dy = dof * zv * sg
            dz = dof * y * sg * (1.0 + zv * (1.0 - sg))
            tl.store(dz_ptr + ((b64 * L + t64[:, None]) * H + h64) * P + p[None, :],
                     dz.to(dz_ptr.dtype.element_ty), mask=qp)
        else:
            dy = dov.to(tl.float32)
        dyc = dy.to(DT)
        if HAS_D:
            tl.store(dDp_ptr + ((b64 * nc + c) * H + h64) * P + p, tl.sum(dy * xf, axis=0), mask=pm)
        Gm = tl.dot(dyc, tl.trans(xv.to(DT)), input_precision=PREC)           # Gm_ls = dy_l · x_s
        BdH = tl.dot(Bv, tl.trans(dH), input_precision=PREC)                  # (Q, BP): dH B_s
        # dx
        dx = tl.dot(tl.trans(S.to(DT)), dyc, input_precision=PREC) + BdH * w_end[:, None]
        dx = dx * dtv[:, None]
        if HAS_D:
            dx += dy * Dv
        tl.store(dx_ptr + ((b64 * L + t64[:, None]) * H + h64) * P + p[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=qp)
        # dB, dC (accumulated over the heads of the group)
        MG = Mdec * Gm
        dB_acc += (tl.dot(tl.trans(MG.to(DT)), Cv, input_precision=PREC)
                   + tl.dot(xv.to(DT), dH, input_precision=PREC) * w_end[:, None]) * dtv[:, None]
        dC_acc += (tl.dot((MG * dtv[None, :]).to(DT), Bv, input_precision=PREC)
                   + tl.dot(dyc, h_in, input_precision=PREC) * e_in[:, None])
        # ddt (direct) and dcs
        SG = S * Gm
        U = tl.sum(xf * BdH, axis=1)                                          # x_s · (dH B_s)
        ddt = tl.sum(SG, axis=0) + w_end * U
        T = SG * dtv[None, :]
        wU = w_end * dtv * U
        dcs = tl.sum(T, axis=1) - tl.sum(T, axis=0) + tl.sum(dy * y_off, axis=1) - wU
        hdH = tl.sum(tl.sum(h_in.to(tl.float32) * dH.to(tl.float32), axis=1), axis=0)
        dcs += tl.where(q == Q - 1, tl.sum(wU, axis=0) + decay * hdH, 0.0)
        da = tl.cumsum(dcs, axis=0, reverse=True)                             # cs → per-step a
        if LOG_DECAY:
            tl.store(dld_ptr + (b64 * L + t64) * H + h64, da, mask=tm)
        else:
            ddt += da * tl.load(A_ptr + h64).to(tl.float32)
            tl.store(dAp_ptr + (b64 * nc + c) * H + h64, tl.sum(da * dtv, axis=0))
        # the dt chain: clamp (zero gradient where clamped), softplus, bias
        raw = tl.load(dt_ptr + b64 * sdb + t64 * sdl + h64 * sdh, mask=tm, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + h64).to(tl.float32)
        v = raw
        if SOFTPLUS:
            v = _softplus(raw)
        ddt = tl.where((v >= dt_min) & (v <= dt_max), ddt, 0.0)
        if SOFTPLUS:
            ddt = tl.where(raw > 20.0, ddt, ddt * tl.sigmoid(raw))
        tl.store(ddt_ptr + (b64 * L + t64) * H + h64, ddt, mask=tm)
    sp = ((split * Bsz + b64) * L + t64[:, None]) * G + g64
    tl.store(dB_ptr + sp * N + n[None, :], dB_acc, mask=qn)
    tl.store(dC_ptr + sp * N + n[None, :], dC_acc, mask=qn)


# ------------------------------------------------------------------------------------------------
# launch helpers
# ------------------------------------------------------------------------------------------------
def _unit_last(t: Optional[Tensor]) -> Optional[Tensor]:
    """Kernels need a unit stride on the last dim only (other strides are passed in)."""
    if t is None:
        return None
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def kernel_chunk(chunk_size: int) -> int:
    """The kernel's chunk: a power of two in [16, TUNE['chunk']] (the result does not depend on it
    beyond rounding, so the user's chunk_size — often 256 for Mamba-2 — is a hint)."""
    cap = int(TUNE["chunk"])
    q = 1 << max(4, int(chunk_size).bit_length() - 1)     # largest power of two <= chunk_size, >= 16
    return max(16, min(cap, q))


def _prec(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _state_blocks(Bsz: int, H: int, P: int, N: int, device) -> Tuple[int, int]:
    """(BP, BN) of the sequential state kernels: the largest (<= 64) blocks that still give about
    two programs per SM (each program walks all chunks, so parallelism is B·H·⌈P/BP⌉·⌈N/BN⌉)."""
    bp = TUNE["state_bp"] or min(64, _pow2(P))
    bn = TUNE["state_bn"] or min(64, _pow2(N))
    if TUNE["state_bp"] is None or TUNE["state_bn"] is None:
        target = 2 * _num_sms(device)
        while Bsz * H * triton.cdiv(P, bp) * triton.cdiv(N, bn) < target:
            if TUNE["state_bn"] is None and bn > 32 and bn >= bp:
                bn //= 2
            elif TUNE["state_bp"] is None and bp > 32:
                bp //= 2
            elif TUNE["state_bn"] is None and bn > 16:
                bn //= 2
            elif TUNE["state_bp"] is None and bp > 16:
                bp //= 2
            else:
                break
    return bp, bn


def _bwd_heads(Bsz: int, nc: int, H: int, G: int, device) -> int:
    """Heads per program of the backward chunk kernel: as many as parallelism allows (B and C work
    is shared across them), a divisor of H // G."""
    hg = H // G
    if TUNE["bwd_heads"]:
        hps = int(TUNE["bwd_heads"])
        if hg % hps:
            raise ValueError(f"TUNE['bwd_heads']={hps} must divide H // G = {hg}")
        return hps
    target = 2 * _num_sms(device)
    for splits in range(1, hg + 1):
        if hg % splits == 0 and (nc * Bsz * G * splits >= target or splits == hg):
            return hg // splits
    return 1


def _dt_launch(dt, dt_bias, A, log_decay, dt_softplus, dt_min, dt_max, Q, nc):
    Bsz, L, H = dt.shape
    Lp = nc * Q
    dtp = torch.empty(Bsz, H, Lp, device=dt.device, dtype=torch.float32)
    cs = torch.empty_like(dtp)
    BH = min(32, _pow2(H, 4))
    ld = log_decay if log_decay is not None else dt
    _ssd_dt_kernel[(Bsz * nc, triton.cdiv(H, BH))](
        dt, dt_bias if dt_bias is not None else dt, A if A is not None else dt, ld, dtp, cs,
        L, H, nc, Lp, dt.stride(0), dt.stride(1), dt.stride(2), ld.stride(0), ld.stride(1), ld.stride(2),
        float(dt_min), float(dt_max),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), LOG_DECAY=log_decay is not None,
        Q=Q, BH=BH, num_warps=4)
    return dtp, cs


def _states_launch(x, Bm, dtp, cs, seq_idx, initial_state, Q, nc):
    Bsz, L, H, P = x.shape
    G, N = Bm.shape[2], Bm.shape[3]
    hs = torch.empty(Bsz, nc, H, P, N, device=x.device, dtype=x.dtype)
    final = torch.empty(Bsz, H, P, N, device=x.device, dtype=torch.float32)
    BP, BN = _state_blocks(Bsz, H, P, N, x.device)
    si = seq_idx if seq_idx is not None else dtp
    _ssd_state_fwd_kernel[(Bsz * H, triton.cdiv(P, BP), triton.cdiv(N, BN))](
        x, Bm, dtp, cs, si, initial_state if initial_state is not None else x, hs, final,
        L, H, G, P, N, nc, nc * Q,
        x.stride(0), x.stride(1), x.stride(2), Bm.stride(0), Bm.stride(1), Bm.stride(2),
        si.stride(0), si.stride(1) if seq_idx is not None else 0,
        Q=Q, BP=BP, BN=BN, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None,
        PREC=_prec(x), num_warps=TUNE["state_warps"], num_stages=TUNE["state_stages"])
    return hs, final


def _strides3(t: Optional[Tensor]):
    return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)


class _Inputs:
    """Normalised inputs of one call (unit last strides, shapes, kernel chunk)."""

    def __init__(self, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, chunk_size):
        self.x, self.Bm, self.Cm, self.z = _unit_last(x), _unit_last(Bm), _unit_last(Cm), _unit_last(z)
        self.dt, self.log_decay = dt, log_decay
        self.A = A.contiguous() if A is not None else None
        self.D = D.contiguous() if D is not None else None
        self.dt_bias = dt_bias.contiguous() if dt_bias is not None else None
        self.init = initial_state.contiguous() if initial_state is not None else None
        self.seq_idx = seq_idx
        self.Bsz, self.L, self.H, self.P = x.shape
        self.G, self.N = Bm.shape[2], Bm.shape[3]
        self.Q = int(chunk_size)
        self.nc = triton.cdiv(self.L, self.Q)


def _fwd_impl_q(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
                chunk_size, dt_softplus, dt_min, dt_max):
    inp = _Inputs(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, chunk_size)
    Q, nc = inp.Q, inp.nc
    dtp, cs = _dt_launch(inp.dt, inp.dt_bias, inp.A, inp.log_decay, dt_softplus, dt_min, dt_max, Q, nc)
    hs, final = _states_launch(inp.x, inp.Bm, dtp, cs, inp.seq_idx, inp.init, Q, nc)
    y = torch.empty(inp.Bsz, inp.L, inp.H, inp.P, device=x.device, dtype=x.dtype)
    BP = TUNE["out_bp"] or min(64, _pow2(inp.P))
    si = inp.seq_idx if inp.seq_idx is not None else dtp
    zz = inp.z if inp.z is not None else inp.x
    _ssd_out_fwd_kernel[(nc, inp.Bsz * inp.H, triton.cdiv(inp.P, BP))](
        inp.x, zz, inp.Bm, inp.Cm, inp.D if inp.D is not None else dtp, dtp, cs, si, hs, y,
        inp.L, inp.H, inp.G, inp.P, inp.N, nc, nc * Q,
        *_strides3(inp.x), *_strides3(zz), *_strides3(inp.Bm), *_strides3(inp.Cm),
        si.stride(0), si.stride(1) if inp.seq_idx is not None else 0,
        Q=Q, BP=BP, BN=_pow2(inp.N), HAS_D=inp.D is not None, D_PER_P=inp.D is not None and inp.D.dim() == 2,
        HAS_Z=inp.z is not None, HAS_SEQ=inp.seq_idx is not None, PREC=_prec(x),
        num_warps=TUNE["out_warps"], num_stages=TUNE["out_stages"])
    return y, final


def _bwd_impl_q(dout, dfinal, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
                chunk_size, dt_softplus, dt_min, dt_max):
    inp = _Inputs(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, chunk_size)
    Bsz, L, H, P, G, N, Q, nc = inp.Bsz, inp.L, inp.H, inp.P, inp.G, inp.N, inp.Q, inp.nc
    dev = x.device
    dout = _unit_last(dout).to(x.dtype)
    dfin = dfinal.float().contiguous() if dfinal is not None else None
    # recompute dt, cumsums and the entering states
    dtp, cs = _dt_launch(inp.dt, inp.dt_bias, inp.A, inp.log_decay, dt_softplus, dt_min, dt_max, Q, nc)
    hs, _ = _states_launch(inp.x, inp.Bm, dtp, cs, inp.seq_idx, inp.init, Q, nc)
    si = inp.seq_idx if inp.seq_idx is not None else dtp
    ssb, ssl = si.stride(0), (si.stride(1) if inp.seq_idx is not None else 0)
    zz = inp.z if inp.z is not None else inp.x
    prec = _prec(x)

    # reverse scan of the state gradient
    dhs = torch.empty(Bsz, nc, H, P, N, device=dev, dtype=x.dtype)
    dinit = torch.empty(Bsz, H, P, N, device=dev, dtype=torch.float32)
    BP, BN = _state_blocks(Bsz, H, P, N, dev)
    _ssd_dstate_kernel[(Bsz * H, triton.cdiv(P, BP), triton.cdiv(N, BN))](
        dout, zz, inp.Cm, cs, si, dfin if dfin is not None else dtp, dhs, dinit,
        L, H, G, P, N, nc, nc * Q, *_strides3(dout), *_strides3(zz), *_strides3(inp.Cm), ssb, ssl,
        Q=Q, BP=BP, BN=BN, HAS_DFIN=dfin is not None, HAS_Z=inp.z is not None,
        HAS_SEQ=inp.seq_idx is not None, PREC=prec,
        num_warps=TUNE["state_warps"], num_stages=TUNE["state_stages"])

    # chunk-parallel gradients
    hps = _bwd_heads(Bsz, nc, H, G, dev)
    n_split = (H // G) // hps
    dx = torch.empty(Bsz, L, H, P, device=dev, dtype=x.dtype)
    dz = torch.empty(Bsz, L, H, P, device=dev, dtype=z.dtype) if z is not None else None
    ddt = torch.empty(Bsz, L, H, device=dev, dtype=torch.float32)
    dB = torch.empty(n_split, Bsz, L, G, N, device=dev, dtype=torch.float32)
    dC = torch.empty_like(dB)
    dDp = torch.empty(Bsz, nc, H, P, device=dev, dtype=torch.float32) if D is not None else None
    dAp = torch.empty(Bsz, nc, H, device=dev, dtype=torch.float32) if log_decay is None else None
    dld = torch.empty(Bsz, L, H, device=dev, dtype=torch.float32) if log_decay is not None else None
    def ptr(t):     # absent tensors: any valid pointer (never dereferenced: constexpr-guarded)
        return t if t is not None else dtp

    _ssd_bwd_chunk_kernel[(nc, Bsz, G * n_split)](
        inp.x, zz, dout, inp.Bm, inp.Cm, ptr(inp.D), ptr(inp.A), inp.dt, ptr(inp.dt_bias),
        dtp, cs, si, hs, dhs,
        dx, ptr(dz), ddt, dB, dC, ptr(dDp), ptr(dAp), ptr(dld),
        Bsz, L, H, G, P, N, nc, nc * Q, hps, n_split,
        *_strides3(inp.x), *_strides3(zz), *_strides3(dout), *_strides3(inp.Bm), *_strides3(inp.Cm),
        *_strides3(inp.dt), ssb, ssl, float(dt_min), float(dt_max),
        Q=Q, BP=_pow2(P), BN=_pow2(N), HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2,
        HAS_Z=z is not None, HAS_SEQ=inp.seq_idx is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), LOG_DECAY=log_decay is not None, PREC=prec,
        num_warps=TUNE["bwd_warps"], num_stages=TUNE["bwd_stages"])

    def empty():   # returns must not alias each other (custom_op rule): a fresh one each time
        return x.new_empty(0)

    dB = dB[0] if n_split == 1 else dB.sum(0)
    dC = dC[0] if n_split == 1 else dC.sum(0)
    dA = dAp.sum((0, 1)).to(A.dtype) if (dAp is not None and A is not None) else empty()
    dD = empty()
    if D is not None:
        dD = dDp.sum((0, 1))
        dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
    ddt_bias = ddt.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else empty()
    return (dx, ddt.to(dt.dtype), dA, dB.to(Bm.dtype), dC.to(Cm.dtype), dD,
            dz if dz is not None else empty(), ddt_bias,
            dinit.to(initial_state.dtype) if initial_state is not None else empty(),
            dld.to(log_decay.dtype) if log_decay is not None else empty())


# The chunked algorithm is exact for any chunk, so forward and backward may each pick their own: a
# launch that does not fit in shared memory (large P·N) is retried with half the chunk, and the cap is
# remembered per (pass, P, N, dtype, device).
_CHUNK_CAP = {}


def _with_chunk_fallback(kind, x, Bm, chunk_size, run):
    key = (kind, x.shape[-1], Bm.shape[-1], x.dtype, x.device)
    q = min(int(chunk_size), _CHUNK_CAP.get(key, int(chunk_size)))
    while True:
        try:
            return run(q)
        except OutOfResources:
            if q <= 16:
                raise
            q //= 2
            _CHUNK_CAP[key] = q


def _fwd_impl(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
              chunk_size, dt_softplus, dt_min, dt_max):
    return _with_chunk_fallback("fwd", x, Bm, chunk_size, lambda q: _fwd_impl_q(
        x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, q, dt_softplus, dt_min, dt_max))


def _bwd_impl(dout, dfinal, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
              chunk_size, dt_softplus, dt_min, dt_max):
    return _with_chunk_fallback("bwd", x, Bm, chunk_size, lambda q: _bwd_impl_q(
        dout, dfinal, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, q, dt_softplus,
        dt_min, dt_max))


# ------------------------------------------------------------------------------------------------
# torch.library registration (torch.compile)
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("hybridize::ssd_chunked_fwd", mutates_args=())
def _ssd_fwd_op(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, D: Optional[Tensor],
                z: Optional[Tensor], dt_bias: Optional[Tensor], initial_state: Optional[Tensor],
                seq_idx: Optional[Tensor], log_decay: Optional[Tensor], chunk_size: int,
                dt_softplus: bool, dt_min: float, dt_max: float) -> Tuple[Tensor, Tensor]:
    return _fwd_impl(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
                     chunk_size, dt_softplus, dt_min, dt_max)


@_ssd_fwd_op.register_fake
def _(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, chunk_size, dt_softplus,
      dt_min, dt_max):
    Bsz, L, H, P = x.shape
    return x.new_empty(Bsz, L, H, P), x.new_empty(Bsz, H, P, Bm.shape[-1], dtype=torch.float32)


@torch.library.custom_op("hybridize::ssd_chunked_bwd", mutates_args=())
def _ssd_bwd_op(dout: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Optional[Tensor],
                Bm: Tensor, Cm: Tensor, D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                initial_state: Optional[Tensor], seq_idx: Optional[Tensor], log_decay: Optional[Tensor],
                chunk_size: int, dt_softplus: bool, dt_min: float, dt_max: float) -> Tuple[
                    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state, dlog_decay); the gradient of
    an absent (None) input is an empty tensor."""
    return _bwd_impl(dout, dfinal, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
                     chunk_size, dt_softplus, dt_min, dt_max)


@_ssd_bwd_op.register_fake
def _(dout, dfinal, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, chunk_size,
      dt_softplus, dt_min, dt_max):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(0)

    dA = like(A) if log_decay is None else x.new_empty(0)
    return (torch.empty_like(x), torch.empty_like(dt), dA, torch.empty_like(Bm), torch.empty_like(Cm),
            like(D), like(z), like(dt_bias), like(initial_state), like(log_decay))


def _setup_context(ctx, inputs, output):
    (x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
     chunk_size, dt_softplus, dt_min, dt_max) = inputs
    ctx.save_for_backward(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay)
    ctx.args = (chunk_size, dt_softplus, dt_min, dt_max)


def _backward(ctx, dout, dfinal):
    x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x)
    grads = torch.ops.hybridize.ssd_chunked_bwd(dout, dfinal, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state,
                                                seq_idx, log_decay, *ctx.args)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit, dld = grads
    def keep(g, t):
        return g if t is not None else None

    return (dx, ddt, keep(dA, A) if log_decay is None else None, dB, dC, keep(dD, D), keep(dz, z),
            keep(ddt_bias, dt_bias), keep(dinit, initial_state), None, keep(dld, log_decay),
            None, None, None, None)


_ssd_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# public API (same signature as the reference)
# ------------------------------------------------------------------------------------------------
def kernel_supports(x: Tensor, Bm: Tensor) -> bool:
    """Shapes/dtypes the kernels handle (others go to the reference): 16/32-bit floats, P, N <= 256."""
    return (x.dim() == 4 and Bm.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and 1 <= x.shape[-1] <= _MAX_PN and 1 <= Bm.shape[-1] <= _MAX_PN and x.shape[1] > 0)


def ssd_chunked_triton(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, *,
                       chunk_size: int = 64, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                       dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                       dt_limit=(0.0, float("inf")), initial_state: Optional[Tensor] = None,
                       seq_idx: Optional[Tensor] = None, return_final_state: bool = False,
                       log_decay: Optional[Tensor] = None):
    """Triton chunked SSD; exactly :func:`hybridize.ops.ssd.reference.ssd_chunked`'s semantics.

    x (B,L,H,P), dt (B,L,H), A (H,) (None with log_decay), Bm/Cm (B,L,G,N), D (H,)|(H,P), z (B,L,H,P),
    dt_bias (H,), initial_state (B,H,P,N), seq_idx (B,L) (non-decreasing), log_decay (B,L,H).
    Returns y (B,L,H,P) in x's dtype [, final_state (B,H,P,N) fp32]. Differentiable in every tensor
    but seq_idx. ``chunk_size`` is clamped to a power of two in [16, TUNE['chunk']] (see
    :func:`kernel_chunk`).
    """
    if x.dim() != 4 or dt.shape != x.shape[:3] or Bm.dim() != 4 or Cm.shape != Bm.shape \
            or Bm.shape[:2] != x.shape[:2]:
        raise ValueError(f"ssd: expected x (B,L,H,P), dt (B,L,H), Bm/Cm (B,L,G,N); got x {tuple(x.shape)}, "
                         f"dt {tuple(dt.shape)}, Bm {tuple(Bm.shape)}, Cm {tuple(Cm.shape)}")
    H, G = x.shape[2], Bm.shape[2]
    if H % G:
        raise ValueError(f"ssd: number of heads {H} is not a multiple of the number of groups {G}")
    if log_decay is None and A is None:
        raise ValueError("ssd: A is required unless log_decay is given")
    if not kernel_supports(x, Bm):
        raise ValueError("ssd_chunked_triton: unsupported shape/dtype (see kernel_supports)")
    y, final = torch.ops.hybridize.ssd_chunked_fwd(
        x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, kernel_chunk(chunk_size),
        bool(dt_softplus), float(dt_limit[0]), float(dt_limit[1]))
    return (y, final) if return_final_state else y


__all__ = ["TUNE", "kernel_chunk", "kernel_supports", "ssd_chunked_triton"]
