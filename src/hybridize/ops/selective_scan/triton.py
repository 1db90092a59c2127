"""Triton kernels for Mamba-1's selective scan, forward and backward.

Semantics are exactly those of :func:`hybridize.ops.selective_scan.reference.selective_scan` (same
signature). Per batch row b, channel c, state index n (g(c) = c // (C // G) for grouped B/C):

    dt_t = softplus?(delta_t[c] + delta_bias[c]),    a_t = exp(dt_t·A[c, n])   (0 where a document starts)
    h_t  = a_t·h_{t-1} + dt_t·u_t[c]·B_t[g(c), n]
    y_t  = Σ_n C_t[g(c), n]·h_t[n] + D[c]·u_t[c],    out_t = y_t·silu(z_t[c])

Kernels (grid: B · ⌈C/BC⌉ programs; each owns a (BC, N) block of the state in fp32 registers)
------------------------------------------------------------------------------------------------
* ``_ss_fwd_kernel`` walks time in tiles of BT steps. Per tile it loads (BT, BC) of u, delta, z and
  (BT, N) of B, C, forms the (BT, BC, N) decays a and inputs x = dt·u·B, scans them with
  ``tl.associative_scan`` over (a, x) — (a1, x1) ∘ (a2, x2) = (a1·a2, a2·x1 + x2) — applies the carried
  state, reduces y over N and keeps the last row as the carry. A document start is a = 0. Padded
  rows (t >= L) get dt = 0, i.e. a = 1 and x = 0: they pass the carry through. When a gradient is
  needed it stores the state entering every tile (``ck`` (B, ⌈L/BT⌉, C, N) fp32: N/BT × the size of
  u in fp32 — the only thing the backward does not recompute).
* ``_ss_bwd_kernel`` walks the tiles in reverse. It recomputes h inside the tile from ``ck``, and the
  state gradient g_t = ∂L/∂h_t by a *reverse* associative scan of
      g_t = a_{t+1}·g_{t+1} + dy_t·C_t          (a_{t+1} from the next row's dt; g_{L-1} gets d final)
  Then, with a_t·h_{t-1} = h_t − x_t (no h_{t-1} needed, no division):
      du_t   = dt_t·Σ_n g·B + D·dy_t           ddt_t = u_t·Σ_n g·B + Σ_n g·A·(h_t − x_t)
      dA    += Σ_t g·dt_t·(h_t − x_t)           dD += Σ_t dy·u,  d initial = a_0·g_0
      dB_t  = Σ_c g·dt_t·u_t,  dC_t = Σ_c dy_t·h_t   (per-program partials, summed with torch:
                                                     deterministic, no atomics)
  and the softplus / bias / z chains. Per-batch partials of dA, dD, d delta_bias are summed likewise.

HBM traffic: forward reads u, delta, z, B, C once and writes y (+ ck when training); backward reads
them again plus dy and ck, writes du, ddelta, dz and the dB/dC partials (⌈C/BC⌉·B·L·N fp32 each).

Parallelism is B·⌈C/BC⌉ programs, each sequential over L (like mamba_ssm's CUDA kernel); BC shrinks
when that is small next to the SM count. Limits: N <= 64 (the whole state row in registers), grouped
B/C need C/G channels per group (a program's block stays inside one group).

Registered as ``torch.ops.hybridize.selective_scan_fwd / selective_scan_bwd`` (``torch.library.custom_op``
+ fake + autograd) for torch.compile; eager calls use an ``autograd.Function`` around the same launches.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# bt: time tile (also the checkpoint interval); *_tile: register budget BT·BC·BN per program
TUNE = {"bt": 16, "fwd_tile": 4096, "bwd_tile": 4096, "fwd_warps": 4, "bwd_warps": 8, "max_bc": 64,
        "target_per_sm": 2}
MAX_N = 64


# ------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _lin_combine(a1, x1, a2, x2):
    # h -> a1·h + x1 followed by h -> a2·h + x2 (element 1 comes first in scan order)
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _softplus(v):
    # torch.nn.functional.softplus (threshold 20); log1p(e) as log(u)·e/(u − 1), u = 1 + e
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    sp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(v > 20.0, v, sp)


@triton.jit
def _row(v, rows, r):
    # row r of a (BT, BC, BN) register tile (a masked sum: tiles cannot be indexed)
    return tl.sum(tl.where((rows == r)[:, None, None], v, 0.0), axis=0)


@triton.jit
def _load_dt(d_ptr, bias_ptr, b, t, c, tm, cm, L, sdb, sdl,
             HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt (BT, BC) fp32 at times t; 0 on rows outside [0, L). Also returns the pre-softplus value."""
    m = tm[:, None] & cm[None, :]
    pre = tl.load(d_ptr + b * sdb + t.to(tl.int64)[:, None] * sdl + c[None, :], mask=m, other=0.0)
    pre = pre.to(tl.float32)
    if HAS_BIAS:
        pre += tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    dt = pre
    if SOFTPLUS:
        dt = _softplus(pre)
    return tl.where(m, dt, 0.0), pre


@triton.jit
def _starts(seq_ptr, b, t, L, ssb, ssl):
    """(BT,) bool: a document starts at t (0 < t < L and seq[t] != seq[t-1])."""
    valid = (t > 0) & (t < L)
    s_now = tl.load(seq_ptr + b * ssb + t.to(tl.int64) * ssl, mask=valid, other=0)
    s_prev = tl.load(seq_ptr + b * ssb + (t - 1).to(tl.int64) * ssl, mask=valid, other=0)
    return valid & (s_now != s_prev)


@triton.jit
def _tile_inputs(u_ptr, d_ptr, A, B_ptr, C_ptr, bias_ptr, seq_ptr, b, g, t, c, n, cm, nm, L,
                 sub, sul, sdb, sdl, sBb, sBl, sBg, sCb, sCl, sCg, ssb, ssl,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Loads of one time tile → u, dt, pre (BT, BC), Bv, Cv (BT, BN), decay a and input x (BT, BC, BN)."""
    tm = t < L
    t64 = t.to(tl.int64)
    m = tm[:, None] & cm[None, :]
    uv = tl.load(u_ptr + b * sub + t64[:, None] * sul + c[None, :], mask=m, other=0.0).to(tl.float32)
    dt, pre = _load_dt(d_ptr, bias_ptr, b, t, c, tm, cm, L, sdb, sdl, HAS_BIAS, SOFTPLUS)
    mn = tm[:, None] & nm[None, :]
    Bv = tl.load(B_ptr + b * sBb + t64[:, None] * sBl + g * sBg + n[None, :], mask=mn, other=0.0)
    Cv = tl.load(C_ptr + b * sCb + t64[:, None] * sCl + g * sCg + n[None, :], mask=mn, other=0.0)
    Bv, Cv = Bv.to(tl.float32), Cv.to(tl.float32)
    a = tl.exp(dt[:, :, None] * A[None, :, :])
    if HAS_SEQ:
        a = tl.where(_starts(seq_ptr, b, t, L, ssb, ssl)[:, None, None], 0.0, a)
    x = (dt * uv)[:, :, None] * Bv[:, None, :]
    return uv, dt, pre, Bv, Cv, a, x


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ss_fwd_kernel(u_ptr, d_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, seq_ptr,
                   y_ptr, fin_ptr, ck_ptr,
                   L, C, N, n_cblk, ch_per_group, n_tiles,
                   sub, sul, sdb, sdl, sAc, sAn, sBb, sBl, sBg, sCb, sCl, sCg, szb, szl,
                   sib, sic, sin, ssb, ssl, syb, syl,
                   HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                   HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SAVE: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_cblk).to(tl.int64)
    c0 = (pid % n_cblk) * BC
    c = c0 + tl.arange(0, BC)
    g = c0 // ch_per_group                      # the block lies inside one group (launcher's choice)
    n = tl.arange(0, BN)
    rows = tl.arange(0, BT)
    cm = c < C
    nm = n < N
    cn = cm[:, None] & nm[None, :]
    c64 = c.to(tl.int64)
    A = tl.load(A_ptr + c64[:, None] * sAc + n[None, :] * sAn, mask=cn, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + c, mask=cm, other=0.0).to(tl.float32)
    if HAS_INIT:
        carry = tl.load(init_ptr + b * sib + c64[:, None] * sic + n[None, :] * sin, mask=cn, other=0.0)
        carry = carry.to(tl.float32)
    else:
        carry = tl.zeros((BC, BN), dtype=tl.float32)
    for it in range(0, n_tiles):
        t = it * BT + rows
        if SAVE:   # state entering the tile, for the backward (ck is contiguous (B, n_tiles, C, N))
            tl.store(ck_ptr + ((b * n_tiles + it) * C + c64[:, None]) * N + n[None, :], carry, mask=cn)
        uv, dt, pre, Bv, Cv, a, x = _tile_inputs(
            u_ptr, d_ptr, A, B_ptr, C_ptr, bias_ptr, seq_ptr, b, g, t, c, n, cm, nm, L,
            sub, sul, sdb, sdl, sBb, sBl, sBg, sCb, sCl, sCg, ssb, ssl, HAS_BIAS, SOFTPLUS, HAS_SEQ)
        acum, xcum = tl.associative_scan((a, x), 0, _lin_combine)
        h = acum * carry[None, :, :] + xcum
        y = tl.sum(h * Cv[:, None, :], axis=2)
        if HAS_D:
            y += Dv[None, :] * uv
        m = (t < L)[:, None] & cm[None, :]
        t64 = t.to(tl.int64)[:, None]
        if HAS_Z:
            zv = tl.load(z_ptr + b * szb + t64 * szl + c[None, :], mask=m, other=0.0).to(tl.float32)
            y *= zv * tl.sigmoid(zv)
        tl.store(y_ptr + b * syb + t64 * syl + c[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
        carry = _row(h, rows, BT - 1)
    # final state: fp32, contiguous (B, C, N)
    tl.store(fin_ptr + (b * C + c64[:, None]) * N + n[None, :], carry, mask=cn)


@triton.jit
def _ss_bwd_kernel(u_ptr, d_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, ck_ptr, do_ptr,
                   dfin_ptr,
                   du_ptr, ddl_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dinit_ptr,
                   L, C, N, n_cblk, ch_per_group, n_tiles,
                   sub, sul, sdb, sdl, sAc, sAn, sBb, sBl, sBg, sCb, sCl, sCg, szb, szl,
                   ssb, ssl, sob, sol, sfb, sfc, sfn,
                   HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                   HAS_SEQ: tl.constexpr, HAS_DFIN: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
    """Outputs: du, ddelta, dz (B, L, C) contiguous; dB/dC partials (B, n_cblk, L, N); dA partials
    (B, C, N); dD, d delta_bias partials (B, C); d initial (B, C, N) — all fp32 but du/ddelta/dz."""
    pid = tl.program_id(0)
    b = (pid // n_cblk).to(tl.int64)
    cb = pid % n_cblk
    c0 = cb * BC
    c = c0 + tl.arange(0, BC)
    g = c0 // ch_per_group
    n = tl.arange(0, BN)
    rows = tl.arange(0, BT)
    cm = c < C
    nm = n < N
    cn = cm[:, None] & nm[None, :]
    c64 = c.to(tl.int64)
    A = tl.load(A_ptr + c64[:, None] * sAc + n[None, :] * sAn, mask=cn, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + c, mask=cm, other=0.0).to(tl.float32)
    if HAS_DFIN:
        gcarry = tl.load(dfin_ptr + b * sfb + c64[:, None] * sfc + n[None, :] * sfn, mask=cn, other=0.0)
        gcarry = gcarry.to(tl.float32)
    else:
        gcarry = tl.zeros((BC, BN), dtype=tl.float32)
    dA_acc = tl.zeros((BC, BN), dtype=tl.float32)
    dD_acc = tl.zeros((BC,), dtype=tl.float32)
    db_acc = tl.zeros((BC,), dtype=tl.float32)
    a0 = tl.zeros((BC, BN), dtype=tl.float32)
    for i in range(0, n_tiles):
        it = n_tiles - 1 - i
        t = it * BT + rows
        tm = t < L
        t64 = t.to(tl.int64)[:, None]
        m = tm[:, None] & cm[None, :]
        uv, dt, pre, Bv, Cv, a, x = _tile_inputs(
            u_ptr, d_ptr, A, B_ptr, C_ptr, bias_ptr, seq_ptr, b, g, t, c, n, cm, nm, L,
            sub, sul, sdb, sdl, sBb, sBl, sBg, sCb, sCl, sCg, ssb, ssl, HAS_BIAS, SOFTPLUS, HAS_SEQ)
        # recompute h inside the tile from the saved entering state
        h_in = tl.load(ck_ptr + ((b * n_tiles + it) * C + c64[:, None]) * N + n[None, :], mask=cn, other=0.0)
        acum, xcum = tl.associative_scan((a, x), 0, _lin_combine)
        h = acum * h_in[None, :, :] + xcum

        dout = tl.load(do_ptr + b * sob + t64 * sol + c[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + b * szb + t64 * szl + c[None, :], mask=m, other=0.0).to(tl.float32)
            y = tl.sum(h * Cv[:, None, :], axis=2)
            if HAS_D:
                y += Dv[None, :] * uv
            sz = tl.sigmoid(zv)
            dz = dout * y * sz * (1.0 + zv * (1.0 - sz))
            tl.store(dz_ptr + (b * L + t64) * C + c[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)
            dy = dout * zv * sz
        else:
            dy = dout

        # g_t = a_{t+1}·g_{t+1} + dy_t·C_t: reverse scan; a_{t+1} from the next row (1 past the end)
        tn = t + 1
        dt_n, pre_n = _load_dt(d_ptr, bias_ptr, b, tn, c, tn < L, cm, L, sdb, sdl, HAS_BIAS, SOFTPLUS)
        a_n = tl.exp(dt_n[:, :, None] * A[None, :, :])
        if HAS_SEQ:
            a_n = tl.where(_starts(seq_ptr, b, tn, L, ssb, ssl)[:, None, None], 0.0, a_n)
        v = dy[:, :, None] * Cv[:, None, :]
        gc, gv = tl.associative_scan((a_n, v), 0, _lin_combine, reverse=True)
        gs = gc * gcarry[None, :, :] + gv
        gcarry = _row(gs, rows, 0)
        a0 = _row(a, rows, 0)

        hx = h - x                                  # a_t·h_{t-1}
        gB = tl.sum(gs * Bv[:, None, :], axis=2)    # (BT, BC)
        du = gB * dt
        if HAS_D:
            du += Dv[None, :] * dy
            dD_acc += tl.sum(dy * uv, axis=0)
        ddt = gB * uv + tl.sum(gs * A[None, :, :] * hx, axis=2)
        dA_acc += tl.sum(gs * hx * dt[:, :, None], axis=0)
        if SOFTPLUS:
            ddt = tl.where(pre > 20.0, ddt, ddt * tl.sigmoid(pre))
        ddt = tl.where(m, ddt, 0.0)
        db_acc += tl.sum(ddt, axis=0)
        offs = (b * L + t64) * C + c[None, :]
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(ddl_ptr + offs, ddt.to(ddl_ptr.dtype.element_ty), mask=m)
        # B/C partials of this channel block: (B, n_cblk, L, N) fp32
        dBp = tl.sum(gs * (dt * uv)[:, :, None], axis=1)
        dCp = tl.sum(dy[:, :, None] * h, axis=1)
        po = ((b * n_cblk + cb) * L + t64) * N + n[None, :]
        pm = tm[:, None] & nm[None, :]
        tl.store(dB_ptr + po, dBp, mask=pm)
        tl.store(dC_ptr + po, dCp, mask=pm)

    co = (b * C + c64[:, None]) * N + n[None, :]
    tl.store(dA_ptr + co, dA_acc, mask=cn)
    tl.store(dinit_ptr + co, a0 * gcarry, mask=cn)   # d h_{-1} = a_0·g_0
    tl.store(dD_ptr + b * C + c, dD_acc, mask=cm)
    tl.store(dbias_ptr + b * C + c, db_acc, mask=cm)


# ------------------------------------------------------------------------------------------------
# launch helpers
# ------------------------------------------------------------------------------------------------
def _unit_last(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _num_sms_cached(device_type: str, index: Optional[int]) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else 0).multi_processor_count
    return 1


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    return _num_sms_cached(device.type, index)


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def _plan(Bsz: int, C: int, N: int, G: Optional[int], tile: int, device) -> Tuple[int, int, int]:
    """→ BT, BC, BN. BC: a power of two within the register budget `tile` (BT·BC·BN elements), shrunk
    while there are fewer than TUNE['target_per_sm'] programs per SM; with G > 1 groups it divides C/G."""
    BT = int(TUNE["bt"])
    BN = max(2, triton.next_power_of_2(N))
    BC = max(1, min(int(TUNE["max_bc"]), triton.next_power_of_2(C), tile // (BT * BN)))
    BC = 1 << (BC.bit_length() - 1)
    if G is not None and G > 1:
        BC = min(BC, _largest_pow2_divisor(C // G))
    target = int(TUNE["target_per_sm"]) * _num_sms(device)
    while BC > 8 and Bsz * triton.cdiv(C, BC) < target:
        BC //= 2
    return BT, BC, BN


def _check(u, delta, A, Bm, Cm):
    Bsz, L, C = u.shape
    if delta.shape != u.shape or A.dim() != 2 or A.shape[0] != C:
        raise ValueError(f"selective_scan: expected u, delta (B, L, C), A (C, N); got u {tuple(u.shape)}, "
                         f"delta {tuple(delta.shape)}, A {tuple(A.shape)}")
    N = A.shape[1]
    for name, M in (("Bm", Bm), ("Cm", Cm)):
        if M.shape[:2] != (Bsz, L) or M.shape[-1] != N or M.dim() not in (3, 4):
            raise ValueError(f"selective_scan: {name} must be (B, L, N) or (B, L, G, N) with N={N}, "
                             f"got {tuple(M.shape)}")
    if Bm.dim() != Cm.dim() or (Bm.dim() == 4 and Bm.shape[2] != Cm.shape[2]):
        raise ValueError("selective_scan_triton: Bm and Cm must have the same grouping")
    if Bm.dim() == 4 and C % Bm.shape[2]:
        raise ValueError(f"selective_scan: {C} channels are not a multiple of {Bm.shape[2]} B/C groups")
    if N > MAX_N:
        raise ValueError(f"selective_scan_triton: d_state {N} > {MAX_N}")


def _bc_args(M: Tensor):
    """(tensor, batch stride, time stride, group stride); shared B/C get group stride 0."""
    M = _unit_last(M)
    return M, M.stride(0), M.stride(1), (M.stride(2) if M.dim() == 4 else 0)


def _fwd_impl(u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, softplus: bool, save: bool):
    """→ y (B, L, C) u.dtype, final (B, C, N) fp32, ck (B, n_tiles, C, N) fp32 (empty unless save)."""
    _check(u, delta, A, Bm, Cm)
    Bsz, L, C = u.shape
    N = A.shape[1]
    G = Bm.shape[2] if Bm.dim() == 4 else None
    u, delta, z = _unit_last(u), _unit_last(delta), _unit_last(z)
    D = D.contiguous() if D is not None else None
    bias = delta_bias.contiguous() if delta_bias is not None else None
    y = torch.empty(Bsz, L, C, device=u.device, dtype=u.dtype)
    final = torch.empty(Bsz, C, N, device=u.device, dtype=torch.float32)
    BT, BC, BN = _plan(Bsz, C, N, G, int(TUNE["fwd_tile"]), u.device)
    n_tiles = triton.cdiv(L, BT)
    ck = torch.empty(Bsz, n_tiles if save else 0, C, N, device=u.device, dtype=torch.float32)
    if Bsz * C * N == 0 or L == 0:
        if initial_state is not None:
            final.copy_(initial_state)
        else:
            final.zero_()
        return y, final, ck
    Bm, sBb, sBl, sBg = _bc_args(Bm)
    Cm, sCb, sCl, sCg = _bc_args(Cm)
    n_cblk = triton.cdiv(C, BC)
    init, seq = initial_state, seq_idx
    _ss_fwd_kernel[(Bsz * n_cblk,)](
        u, delta, A, Bm, Cm, D if D is not None else u, z if z is not None else u,
        bias if bias is not None else u,
        init if init is not None else u, seq if seq is not None else u, y, final, ck,
        L, C, N, n_cblk, C // (G or 1), n_tiles,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), A.stride(0), A.stride(1),
        sBb, sBl, sBg, sCb, sCl, sCg,
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
        *(init.stride() if init is not None else (0, 0, 0)),
        *(seq.stride() if seq is not None else (0, 0)), y.stride(0), y.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=bool(softplus),
        HAS_INIT=init is not None, HAS_SEQ=seq is not None, SAVE=bool(save),
        BT=BT, BC=BC, BN=BN, num_warps=int(TUNE["fwd_warps"]))
    return y, final, ck


def _bwd_impl(dout, dfinal, u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, ck,
              softplus: bool):
    """→ du, ddelta, dA, dB, dC, dD, dz, d delta_bias, d initial_state (None for absent inputs)."""
    Bsz, L, C = u.shape
    N = A.shape[1]
    G = Bm.shape[2] if Bm.dim() == 4 else None
    dev = u.device
    u, delta, z = _unit_last(u), _unit_last(delta), _unit_last(z)
    D = D.contiguous() if D is not None else None
    bias = delta_bias.contiguous() if delta_bias is not None else None
    du = torch.zeros(Bsz, L, C, device=dev, dtype=u.dtype)
    ddelta = torch.zeros(Bsz, L, C, device=dev, dtype=delta.dtype)
    dz = torch.zeros(Bsz, L, C, device=dev, dtype=z.dtype) if z is not None else None
    BT, BC, BN = _plan(Bsz, C, N, G, int(TUNE["bwd_tile"]), dev)
    BT_f = int(TUNE["bt"])
    n_tiles = triton.cdiv(L, BT)
    n_cblk = triton.cdiv(C, BC)
    f32 = dict(device=dev, dtype=torch.float32)
    dB_p = torch.zeros(Bsz, n_cblk, L, N, **f32)
    dC_p = torch.zeros(Bsz, n_cblk, L, N, **f32)
    dA_p = torch.zeros(Bsz, C, N, **f32)
    dD_p = torch.zeros(Bsz, C, **f32)
    db_p = torch.zeros(Bsz, C, **f32)
    dinit = torch.zeros(Bsz, C, N, **f32)
    if Bsz * C * N > 0 and L > 0:
        assert BT == BT_f and ck.shape[1] == n_tiles, "selective_scan: checkpoints from another tiling"
        dout = _unit_last(dout)
        Bm_, sBb, sBl, sBg = _bc_args(Bm)
        Cm_, sCb, sCl, sCg = _bc_args(Cm)
        seq = seq_idx
        _ss_bwd_kernel[(Bsz * n_cblk,)](
            u, delta, A, Bm_, Cm_, D if D is not None else u, z if z is not None else u,
            bias if bias is not None else u, seq if seq is not None else u, ck, dout,
            dfinal if dfinal is not None else u,
            du, ddelta, dz if dz is not None else du, dA_p, dB_p, dC_p, dD_p, db_p, dinit,
            L, C, N, n_cblk, C // (G or 1), n_tiles,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), A.stride(0), A.stride(1),
            sBb, sBl, sBg, sCb, sCl, sCg,
            z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
            *(seq.stride() if seq is not None else (0, 0)), dout.stride(0), dout.stride(1),
            *(dfinal.stride() if dfinal is not None else (0, 0, 0)),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=bool(softplus),
            HAS_SEQ=seq is not None, HAS_DFIN=dfinal is not None,
            BT=BT, BC=BC, BN=BN, num_warps=int(TUNE["bwd_warps"]))
    elif L == 0 and dfinal is not None:
        dinit.copy_(dfinal)
    if G is not None:
        # blocks never straddle groups: sum each group's blocks
        dB = dB_p.view(Bsz, G, n_cblk // G, L, N).sum(2).transpose(1, 2)
        dC = dC_p.view(Bsz, G, n_cblk // G, L, N).sum(2).transpose(1, 2)
    else:
        dB, dC = dB_p.sum(1), dC_p.sum(1)
    return (du, ddelta, dA_p.sum(0).to(A.dtype), dB.to(Bm.dtype), dC.to(Cm.dtype),
            dD_p.sum(0).to(D.dtype) if D is not None else None, dz,
            db_p.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
            dinit.to(initial_state.dtype) if initial_state is not None else None)


# ------------------------------------------------------------------------------------------------
# torch.library registration (torch.compile) and the eager autograd.Function
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("hybridize::selective_scan_fwd", mutates_args=())
def _ss_fwd_op(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Optional[Tensor],
               z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
               seq_idx: Optional[Tensor], softplus: bool, save: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _fwd_impl(u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, softplus, save)


@_ss_fwd_op.register_fake
def _(u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, softplus, save):
    Bsz, L, C = u.shape
    N = A.shape[1]
    n_tiles = -(-L // int(TUNE["bt"])) if save else 0
    return (u.new_empty(Bsz, L, C), u.new_empty(Bsz, C, N, dtype=torch.float32),
            u.new_empty(Bsz, n_tiles, C, N, dtype=torch.float32))


_GRAD_SLOTS = 9   # du, ddelta, dA, dB, dC, dD, dz, d delta_bias, d initial_state


@torch.library.custom_op("hybridize::selective_scan_bwd", mutates_args=())
def _ss_bwd_op(dout: Tensor, dfinal: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor,
               Cm: Tensor, D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
               initial_state: Optional[Tensor], seq_idx: Optional[Tensor], ck: Tensor,
               softplus: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                        Tensor]:
    g = _bwd_impl(dout, dfinal, u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, ck, softplus)
    # absent inputs get a fresh empty placeholder (custom ops return tensors, never None)
    return tuple(t if t is not None else u.new_empty(0) for t in g)


@_ss_bwd_op.register_fake
def _(dout, dfinal, u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, ck, softplus):
    like = lambda t: torch.empty_like(t) if t is not None else u.new_empty(0)  # noqa: E731
    return tuple(like(t) for t in (u, delta, A, Bm, Cm, D, z, delta_bias, initial_state))


def _setup_context(ctx, inputs, output):
    u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, softplus, save = inputs
    ctx.save_for_backward(u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, output[2])
    ctx.softplus = softplus


def _backward(ctx, dy, dfinal, dck, bwd):
    u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, ck = ctx.saved_tensors
    if dy is None:   # only the final state was used
        dy = torch.zeros_like(u)
    g = bwd(dy, dfinal, u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, ck, ctx.softplus)
    present = (u, delta, A, Bm, Cm, D, z, delta_bias, initial_state)
    grads = tuple(gi if p is not None else None for gi, p in zip(g, present))
    return grads + (None, None, None)


_ss_fwd_op.register_autograd(
    lambda ctx, dy, dfinal, dck: _backward(ctx, dy, dfinal, dck, torch.ops.hybridize.selective_scan_bwd),
    setup_context=_setup_context)


class _SelectiveScanFn(torch.autograd.Function):
    """Eager path: the same kernels without custom_op's Python dispatch."""

    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, softplus, save):
        out = _fwd_impl(u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, softplus, save)
        inputs = (u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, softplus, save)
        _setup_context(ctx, inputs, out)
        ctx.mark_non_differentiable(out[2])
        return out

    @staticmethod
    def backward(ctx, dy, dfinal, dck):
        return _backward(ctx, dy, dfinal, dck, _bwd_impl)


# ------------------------------------------------------------------------------------------------
# public API (same signature as the reference)
# ------------------------------------------------------------------------------------------------
def kernel_supports(u: Tensor, A: Tensor, Bm: Tensor) -> bool:
    """Shapes/dtypes the kernels handle (others go to the reference): 16/32-bit floats, N <= MAX_N,
    B/C shared or grouped."""
    return (u.dim() == 3 and u.dtype in (torch.float32, torch.bfloat16, torch.float16) and A.dim() == 2
            and 1 <= A.shape[1] <= MAX_N and Bm.dim() in (3, 4))


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, *,
                          D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                          delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                          initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                          return_final_state: bool = False):
    """Triton selective scan; exactly :func:`hybridize.ops.selective_scan.reference.selective_scan`.

    u, delta (B, L, C); A (C, N), N <= 64; Bm, Cm (B, L, N) or (B, L, G, N); D (C,); z (B, L, C);
    delta_bias (C,); initial_state (B, C, N); seq_idx (B, L). Returns y (B, L, C) in u's dtype
    [, final state (B, C, N) fp32]. Differentiable in every tensor but seq_idx.
    """
    tensors = (u, delta, A, Bm, Cm, D, z, delta_bias, initial_state)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    args = (u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx, bool(delta_softplus), save)
    if torch.compiler.is_compiling():
        y, final, _ = torch.ops.hybridize.selective_scan_fwd(*args)
    else:
        y, final, _ = _SelectiveScanFn.apply(*args)
    return (y, final) if return_final_state else y


__all__ = ["MAX_N", "TUNE", "kernel_supports", "selective_scan_triton"]
