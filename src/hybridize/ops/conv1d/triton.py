"""Triton kernels for the causal depthwise conv1d (forward, backward, one-token update).

Semantics are exactly those of :mod:`hybridize.ops.conv1d.reference` (same signatures):

    y[b, t, c] = act(bias[c] + sum_k weight[c, k] * xp[b, t - (W-1) + k, c])

where ``xp`` is x preceded by ``initial_state`` (positions -(W-1)..-1, zeros if None), a tap reading a
position of another document (``seq_idx``; state positions belong to the document at t = 0) reads
zero, and the final state is the last W-1 positions of ``xp`` with entries of earlier documents zeroed.

Layout: x, y, dy are channels-last ``(B, L, C)``; only the channel stride must be 1 (a slice of a
bigger projection, e.g. ``zxbcdt[..., i:j]``, is read in place through its row strides).
W <= 4, any C. All arithmetic in fp32; outputs cast to the input dtypes.

Kernels
-------
* ``_conv_fwd_kernel``: grid (B * ceil(L/BLOCK_L), ceil(C/BLOCK_C)). Each program computes a
  (BLOCK_L, BLOCK_C) tile of y from W shifted loads of the x tile (the halo re-reads hit L1/L2);
  the program holding the last time block also writes the final state.
* ``_conv_bwd_rows_kernel`` (the backward; ``_TUNE["bwd_impl"] = "rows"``): grid
  (B * n_split, ceil(C/BLOCK_C)), ~``warps_per_sm`` warps per SM (one wave). A program owns BLOCK_C
  channels and SUB time chunks of one sequence and streams through them one time step (row) at a
  time: x_t and dy_t are each loaded once (plus W-1 rows of halo per chunk, L2 hits), the
  pre-activation and silu' are computed once per element (one sigmoid), and everything that needs
  neighbouring rows — xp at t-1..t-3 for the pre-activation and the dweight products, dz at
  t-1..t-3 for dx — lives in registers carried from step to step, so no tile is re-read and no
  value is recomputed. dweight / dbias accumulate per channel in registers; each program writes
  one fp32 partial (W+1 values per channel), which ``_conv_bwd_reduce_kernel`` sums in a fixed
  order (deterministic, no atomics) and casts in one small launch. The first chunk also emits
  d(initial_state); d(final_state) is added to the last W-1 rows' dx.
* ``_conv_bwd_kernel`` (the previous backward, ``"tiles"``, kept for A/B): each program loops over
  (BLOCK_L, BLOCK_C) tiles of a time chunk, loading xp at s-3..s+3 and dy at s..s+3 as shifted
  tiles and recomputing the pre-activation of every tap's token (4 sigmoids per element; static
  SASS for sm_90: ~140 instructions per element, 240 registers), dweight partials summed with torch.
* ``_conv_update_kernel``: grid (B, ceil(C/BLOCK_C)); one decode step, conv_state shifted in place.

HBM floor (bytes that must move; e = element size of x, W taps, fp32 weight/bias negligible)
--------------------------------------------------------------------------------------------------
* forward:  read x + write y = 2·B·L·C·e   (+ B·L·8 seq_idx, + 2·B·C·(W-1)·e_state for the states)
* backward: read x, dy + write dx = 3·B·L·C·e (+ partials: written and read once,
  2·B·n_split·C·(W+1)·4 ≈ 2 % at the H100 default; + halo rows, mostly L2 hits; + states)
  (without silu x is still read, for dweight.)
* update:   read x, state + write y, state = B·C·(2e + 2(W-1)·e_state)
Measured (H100, bf16, W=4, silu, GPU time via CUDA-graph replay, triton 3.6), B·L·C =
4·4096·2560: forward 76 us = 2.2 TB/s; the tiles backward ~280 us = 0.9 TB/s (a device copy:
2.9 TB/s). The rows backward: see benchmarks/conv_probe.py (its static SASS, sm_90, bf16, W=4,
silu, defaults: ~34 instructions per element, 128 registers, vs ~140 and 240 for the tiles kernel).

Registered as ``torch.ops.hybridize.causal_conv1d_fwd / causal_conv1d_bwd / causal_conv1d_update``
(``torch.library.custom_op`` + fake + autograd) for torch.compile(fullgraph=True); eager calls go
through an equivalent ``torch.autograd.Function`` (custom_op's Python dispatch costs ~100 us a
call). No launch synchronises with the host, so all of them can be captured in CUDA graphs.
"""
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridize.ops.pdl import pdl_launch

_MAX_W = 4          # widths 1..4 (BLOCK_W below pads the tap axis to 4)
_BLOCK_W = 4


# ------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _load_xp(x_ptr, init_ptr, b, pos, c, cmask, L, sxb, sxl, sib, sic, sik,
             W: tl.constexpr, HAS_INIT: tl.constexpr):
    """xp at positions `pos` (int32 (N,), may be negative) and channels `c` -> fp32 (N, BLOCK_C).
    pos in [0, L) reads x, pos in [-(W-1), 0) reads initial_state, anything else reads 0."""
    in_x = (pos >= 0) & (pos < L)
    # int64 offsets: B·L·C may exceed 2^31
    offs = b * sxb + pos.to(tl.int64)[:, None] * sxl + c[None, :]
    v = tl.load(x_ptr + offs, mask=in_x[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    if HAS_INIT:
        j = pos + (W - 1)
        in_s = (pos < 0) & (j >= 0)
        offs_s = b * sib + c[None, :].to(tl.int64) * sic + j[:, None] * sik
        v += tl.load(init_ptr + offs_s, mask=in_s[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _seq_at(seq_ptr, b, pos, L, ssb, ssl):
    """Document id at positions `pos`; positions < 0 (state) take the id of t = 0. Clamped, so always
    in bounds (callers mask out positions >= L themselves)."""
    p = tl.minimum(tl.maximum(pos, 0), L - 1)
    return tl.load(seq_ptr + b * ssb + p.to(tl.int64) * ssl)


@triton.jit
def _conv_pre(x_ptr, init_ptr, w_ptr, bias_ptr, seq_ptr, b, t, c, cmask, L,
              sxb, sxl, sib, sic, sik, swc, swk, ssb, ssl,
              W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
              BLOCK_C: tl.constexpr):
    """Pre-activation conv output at times `t` (N,) -> fp32 (N, BLOCK_C)."""
    acc = tl.zeros((t.shape[0], BLOCK_C), dtype=tl.float32)
    if HAS_SEQ:
        seq_t = _seq_at(seq_ptr, b, t, L, ssb, ssl)
    for k in tl.static_range(W):
        pos = t - (W - 1) + k
        xv = _load_xp(x_ptr, init_ptr, b, pos, c, cmask, L, sxb, sxl, sib, sic, sik, W, HAS_INIT)
        if HAS_SEQ:
            same = _seq_at(seq_ptr, b, pos, L, ssb, ssl) == seq_t
            xv = tl.where(same[:, None], xv, 0.0)
        wk = tl.load(w_ptr + c * swc + k * swk, mask=cmask, other=0.0).to(tl.float32)
        acc += xv * wk[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _sel(i: tl.constexpr, v_m3, v_m2, v_m1, v_0, v_p1, v_p2, v_p3):
    """Compile-time pick of the tile at offset i in -3..3 (no lists in Triton)."""
    if i == -3:
        r = v_m3
    elif i == -2:
        r = v_m2
    elif i == -1:
        r = v_m1
    elif i == 0:
        r = v_0
    elif i == 1:
        r = v_p1
    elif i == 2:
        r = v_p2
    else:
        r = v_p3
    return r


@triton.jit
def _dz_tile(e: tl.constexpr, Xm3, Xm2, Xm1, X0, Xp1, Xp2, Xp3,
             w_ptr, bias_ptr, seq_ptr, dy_ptr, b, s, c, cmask, L, swc, swk, ssb, ssl, sdb, sdl,
             W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr):
    """dL/d(pre-activation) at times t = s + e -> fp32 (N, BLOCK_C); 0 outside [0, L).
    X* are xp at s-3..s+3 (already in registers); with silu the pre-activation is recomputed
    from them, so no tile is loaded twice."""
    t = s + e
    valid = (t >= 0) & (t < L)
    offs = b * sdb + t.to(tl.int64)[:, None] * sdl + c[None, :]
    dz = tl.load(dy_ptr + offs, mask=valid[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    if SILU:
        if HAS_SEQ:
            seq_t = _seq_at(seq_ptr, b, t, L, ssb, ssl)
        z = tl.zeros(dz.shape, dtype=tl.float32)
        for k in tl.static_range(W):
            xv = _sel(e - (W - 1) + k, Xm3, Xm2, Xm1, X0, Xp1, Xp2, Xp3)
            if HAS_SEQ:
                same = _seq_at(seq_ptr, b, t - (W - 1) + k, L, ssb, ssl) == seq_t
                xv = tl.where(same[:, None], xv, 0.0)
            wk = tl.load(w_ptr + c * swc + k * swk, mask=cmask, other=0.0).to(tl.float32)
            z += xv * wk[None, :]
        if HAS_BIAS:
            z += tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        sg = tl.sigmoid(z)
        dz = dz * sg * (1.0 + z * (1.0 - sg))
    return dz


@triton.jit
def _conv_bwd_tile(x_ptr, init_ptr, w_ptr, bias_ptr, seq_ptr, dy_ptr, dfin_ptr, b, s, c, cmask, L,
                   sxb, sxl, sib, sic, sik, swc, swk, ssb, ssl, sdb, sdl, sfb, sfc, sfk,
                   W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                   SILU: tl.constexpr, HAS_DFINAL: tl.constexpr, BLOCK_W: tl.constexpr):
    """Backward of one tile of positions `s` (N,) (s < 0: initial-state slots).

    Returns dxp (N, BLOCK_C), dz at s, and P_k = dz(s)·xp(s-(W-1)+k) (same document), k < 4.
    xp[s] feeds tap k of token t = s + (W-1) - k (same document only) and the final-state slot
    j = s - (L - (W-1)). Loads: xp at s-(W-1)..s (+ s+1..s+W-1 with silu, to recompute the
    pre-activation of the tokens s feeds) and dy at s..s+W-1 — each tile once."""
    X0 = _load_xp(x_ptr, init_ptr, b, s, c, cmask, L, sxb, sxl, sib, sic, sik, W, HAS_INIT)
    Xm1 = X0
    Xm2 = X0
    Xm3 = X0
    Xp1 = X0
    Xp2 = X0
    Xp3 = X0
    if W > 1:
        Xm1 = _load_xp(x_ptr, init_ptr, b, s - 1, c, cmask, L, sxb, sxl, sib, sic, sik, W, HAS_INIT)
        if SILU:
            Xp1 = _load_xp(x_ptr, init_ptr, b, s + 1, c, cmask, L, sxb, sxl, sib, sic, sik, W, HAS_INIT)
    if W > 2:
        Xm2 = _load_xp(x_ptr, init_ptr, b, s - 2, c, cmask, L, sxb, sxl, sib, sic, sik, W, HAS_INIT)
        if SILU:
            Xp2 = _load_xp(x_ptr, init_ptr, b, s + 2, c, cmask, L, sxb, sxl, sib, sic, sik, W, HAS_INIT)
    if W > 3:
        Xm3 = _load_xp(x_ptr, init_ptr, b, s - 3, c, cmask, L, sxb, sxl, sib, sic, sik, W, HAS_INIT)
        if SILU:
            Xp3 = _load_xp(x_ptr, init_ptr, b, s + 3, c, cmask, L, sxb, sxl, sib, sic, sik, W, HAS_INIT)

    # dz at t = s + e for e = 0..W-1
    DZ0 = _dz_tile(0, Xm3, Xm2, Xm1, X0, Xp1, Xp2, Xp3, w_ptr, bias_ptr, seq_ptr, dy_ptr, b, s, c, cmask, L,
                   swc, swk, ssb, ssl, sdb, sdl, W, HAS_BIAS, HAS_SEQ, SILU)
    DZ1 = DZ0
    DZ2 = DZ0
    DZ3 = DZ0
    if W > 1:
        DZ1 = _dz_tile(1, Xm3, Xm2, Xm1, X0, Xp1, Xp2, Xp3, w_ptr, bias_ptr, seq_ptr, dy_ptr, b, s, c, cmask,
                       L, swc, swk, ssb, ssl, sdb, sdl, W, HAS_BIAS, HAS_SEQ, SILU)
    if W > 2:
        DZ2 = _dz_tile(2, Xm3, Xm2, Xm1, X0, Xp1, Xp2, Xp3, w_ptr, bias_ptr, seq_ptr, dy_ptr, b, s, c, cmask,
                       L, swc, swk, ssb, ssl, sdb, sdl, W, HAS_BIAS, HAS_SEQ, SILU)
    if W > 3:
        DZ3 = _dz_tile(3, Xm3, Xm2, Xm1, X0, Xp1, Xp2, Xp3, w_ptr, bias_ptr, seq_ptr, dy_ptr, b, s, c, cmask,
                       L, swc, swk, ssb, ssl, sdb, sdl, W, HAS_BIAS, HAS_SEQ, SILU)

    if HAS_SEQ:
        seq_s = _seq_at(seq_ptr, b, s, L, ssb, ssl)
    dx = tl.zeros(X0.shape, dtype=tl.float32)
    # P_k = dz · xp[s - (W-1) + k]: the caller accumulates these tiles and reduces over time once
    # at the end (a cross-warp reduction per tile and tap would stall the loop)
    P0 = tl.zeros(X0.shape, dtype=tl.float32)
    P1 = P0
    P2 = P0
    P3 = P0
    for k in tl.static_range(W):
        wk = tl.load(w_ptr + c * swc + k * swk, mask=cmask, other=0.0).to(tl.float32)
        # dx: token t = s + (W-1-k) reads xp[s] through tap k
        dz = _sel(W - 1 - k, DZ0, DZ0, DZ0, DZ0, DZ1, DZ2, DZ3)
        if HAS_SEQ:
            if k < W - 1:
                same = _seq_at(seq_ptr, b, s + (W - 1 - k), L, ssb, ssl) == seq_s
                dz = tl.where(same[:, None], dz, 0.0)
        dx += dz * wk[None, :]
        # dweight[:, k]: token s reads xp[s - (W-1) + k] through tap k
        xv = _sel(k - (W - 1), Xm3, Xm2, Xm1, X0, X0, X0, X0)
        if HAS_SEQ:
            if k < W - 1:
                same = _seq_at(seq_ptr, b, s - (W - 1) + k, L, ssb, ssl) == seq_s
                xv = tl.where(same[:, None], xv, 0.0)
        if k == 0:
            P0 = DZ0 * xv
        elif k == 1:
            P1 = DZ0 * xv
        elif k == 2:
            P2 = DZ0 * xv
        else:
            P3 = DZ0 * xv

    if HAS_DFINAL:
        j = s - (L - (W - 1))
        in_f = (j >= 0) & (j < W - 1)
        offs = b * sfb + c[None, :].to(tl.int64) * sfc + j[:, None] * sfk
        df = tl.load(dfin_ptr + offs, mask=in_f[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_SEQ:
            seq_last = tl.load(seq_ptr + b * ssb + (L - 1) * ssl)
            df = tl.where((seq_s == seq_last)[:, None], df, 0.0)
        dx += df
    return dx, DZ0, P0, P1, P2, P3


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, y_ptr, fin_ptr,
                     L, C, n_lblk,
                     sxb, sxl, swc, swk, sib, sic, sik, ssb, ssl, syb, syl, sfb, sfc, sfk,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                     HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_lblk).to(tl.int64)
    lb = pid % n_lblk
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    t = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    z = _conv_pre(x_ptr, init_ptr, w_ptr, bias_ptr, seq_ptr, b, t, c, cmask, L,
                  sxb, sxl, sib, sic, sik, swc, swk, ssb, ssl,
                  W, HAS_BIAS, HAS_INIT, HAS_SEQ, BLOCK_C)
    if SILU:
        z = z * tl.sigmoid(z)
    offs = b * syb + t.to(tl.int64)[:, None] * syl + c[None, :]
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=(t < L)[:, None] & cmask[None, :])

    if W > 1:
        if lb == n_lblk - 1:
            # final state: xp at the last W-1 positions (may reach into initial_state when L < W-1),
            # zeroed where it belongs to an earlier document than the last token.
            j = tl.arange(0, BLOCK_W)
            pos = L - (W - 1) + j
            v = _load_xp(x_ptr, init_ptr, b, pos, c, cmask, L, sxb, sxl, sib, sic, sik, W, HAS_INIT)
            if HAS_SEQ:
                seq_last = tl.load(seq_ptr + b * ssb + (L - 1) * ssl)
                same = _seq_at(seq_ptr, b, pos, L, ssb, ssl) == seq_last
                v = tl.where(same[:, None], v, 0.0)
            offs_f = b * sfb + c[None, :].to(tl.int64) * sfc + j[:, None] * sfk
            tl.store(fin_ptr + offs_f, v.to(fin_ptr.dtype.element_ty),
                     mask=(j < W - 1)[:, None] & cmask[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, dy_ptr, dfin_ptr,
                     dx_ptr, dw_part_ptr, db_part_ptr, dinit_ptr,
                     L, C, n_split, chunk_len,
                     sxb, sxl, swc, swk, sib, sic, sik, ssb, ssl, sdb, sdl, sfb, sfc, sfk,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                     HAS_SEQ: tl.constexpr, SILU: tl.constexpr, HAS_DFINAL: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
                     NUM_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_split).to(tl.int64)
    split = pid % n_split
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    kk = tl.arange(0, BLOCK_W)
    A0 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    A1 = A0
    A2 = A0
    A3 = A0
    AB = A0

    l_start = split * chunk_len
    l_end = tl.minimum(l_start + chunk_len, L)
    for l0 in tl.range(l_start, l_end, BLOCK_L, num_stages=NUM_STAGES):
        s = l0 + tl.arange(0, BLOCK_L)
        dx, dz, p0, p1, p2, p3 = _conv_bwd_tile(
            x_ptr, init_ptr, w_ptr, bias_ptr, seq_ptr, dy_ptr, dfin_ptr, b, s, c, cmask,
            L, sxb, sxl, sib, sic, sik, swc, swk, ssb, ssl, sdb, sdl, sfb, sfc, sfk,
            W, HAS_BIAS, HAS_INIT, HAS_SEQ, SILU, HAS_DFINAL, BLOCK_W)
        # dx is allocated contiguous (B, L, C)
        offs = b * L * C + s.to(tl.int64)[:, None] * C + c[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=(s < L)[:, None] & cmask[None, :])
        A0 += p0
        if W > 1:
            A1 += p1
        if W > 2:
            A2 += p2
        if W > 3:
            A3 += p3
        if HAS_BIAS:
            AB += dz

    dw_acc = tl.where(kk[None, :] == 0, tl.sum(A0, axis=0)[:, None], 0.0)
    if W > 1:
        dw_acc += tl.where(kk[None, :] == 1, tl.sum(A1, axis=0)[:, None], 0.0)
    if W > 2:
        dw_acc += tl.where(kk[None, :] == 2, tl.sum(A2, axis=0)[:, None], 0.0)
    if W > 3:
        dw_acc += tl.where(kk[None, :] == 3, tl.sum(A3, axis=0)[:, None], 0.0)
    db_acc = tl.sum(AB, axis=0)
    row = pid.to(tl.int64)  # partial index = b * n_split + split
    offs_w = row * C * BLOCK_W + c[:, None].to(tl.int64) * BLOCK_W + kk[None, :]
    tl.store(dw_part_ptr + offs_w, dw_acc, mask=cmask[:, None] & (kk[None, :] < W))
    if HAS_BIAS:
        tl.store(db_part_ptr + row * C + c, db_acc, mask=cmask)

    if HAS_INIT:
        if W > 1:
            if split == 0:
                # d(initial_state)[j] = d xp at position j - (W-1) < 0 (no token there: its dz is 0,
                # dy loads are masked); its dweight/dbias terms are zero and dropped.
                j = tl.arange(0, BLOCK_W)
                s0 = j - (W - 1)
                di, _dz, _p0, _p1, _p2, _p3 = _conv_bwd_tile(
                    x_ptr, init_ptr, w_ptr, bias_ptr, seq_ptr, dy_ptr, dfin_ptr, b, s0, c, cmask,
                    L, sxb, sxl, sib, sic, sik, swc, swk, ssb, ssl, sdb, sdl, sfb, sfc, sfk,
                    W, HAS_BIAS, HAS_INIT, HAS_SEQ, SILU, HAS_DFINAL, BLOCK_W)
                # dinit is allocated contiguous (B, C, W-1)
                offs_i = b * C * (W - 1) + c[None, :].to(tl.int64) * (W - 1) + j[:, None]
                tl.store(dinit_ptr + offs_i, di.to(dinit_ptr.dtype.element_ty),
                         mask=(j < W - 1)[:, None] & cmask[None, :])


@triton.jit
def _sigmoid_approx(z):
    """1 / (1 + 2^(-z·log2 e)) with ex2.approx.ftz + rcp.approx.ftz: 4 instructions instead of ~11
    (tl.sigmoid's exp adds a denormal fix-up and its division div.full a range fix-up); a few ulp,
    like tl.sigmoid (results below 2^-126 flush to 0). PTX: not for the interpreter."""
    return tl.inline_asm_elementwise(
        "{ .reg .f32 t; mul.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; add.f32 t, t, 0f3F800000; "
        "rcp.approx.ftz.f32 $0, t; }",
        "=r,r", [z], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _rows_load(x_cur, dy_cur, seq_ptr, b, t, c, C, L, t_lim, sxl, sdl, ssb, ssl,
               ROWS: tl.constexpr, HAS_SEQ: tl.constexpr):
    """x, dy (raw dtype, (SUB, BLOCK_C)) and doc ids (SUB,) of the ROWS steps from t (SUB,) on, as
    tuples; x_cur / dy_cur point at the rows t."""
    xs = ()
    ds = ()
    ss = ()
    for i in tl.static_range(ROWS):
        m = c[None, :] < tl.where(t + i < t_lim, C, 0)[:, None]
        xs = xs + (tl.load(x_cur + i * sxl, mask=m, other=0.0),)
        ds = ds + (tl.load(dy_cur + i * sdl, mask=m, other=0.0),)
        if HAS_SEQ:
            ss = ss + (tl.load(seq_ptr + b * ssb + tl.minimum(t + i, L - 1).to(tl.int64) * ssl),)
    return xs, ds, ss


@triton.jit
def _conv_bwd_rows_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, dy_ptr, dfin_ptr,
                          dx_ptr, part_ptr, dinit_ptr,
                          L, C, n_split, chunk_len,
                          sxb, sxl, swc, swk, sib, sic, sik, ssb, ssl, sdb, sdl, sfb, sfc, sfk,
                          W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                          HAS_SEQ: tl.constexpr, SILU: tl.constexpr, HAS_DFINAL: tl.constexpr,
                          BLOCK_C: tl.constexpr, ROWS: tl.constexpr, SUB: tl.constexpr,
                          PREFETCH: tl.constexpr, FAST_SIGMOID: tl.constexpr, BLOCK_W: tl.constexpr):
    """Backward, streamed over time. Program (b · n_split + split, cb) owns channels
    cb·BLOCK_C + [0, BLOCK_C) and SUB consecutive time chunks q = split·SUB + s of chunk_len tokens,
    [t0_q, t1_q), stepped through together as rows of a (SUB, BLOCK_C) tile.

    Step t (= t0 + k, k = 0 .. chunk_len+W-2) reads x_t and dy_t once and computes dz_t =
    dL/d(pre-activation_t) once (one sigmoid), from x_t and xp_{t-1..t-3} held in registers; adds
    dz_t · xp_{t-l} (same document) to per-lag accumulators (t < t1 only); and emits
    d xp_p, p = t-(W-1), = sum_m weight[:, W-1-m] · dz_{t-m} (same document) from dz_t and the W-1
    previous dz (registers), + d final_state. The last W-1 steps are the halo (the next chunk's
    first tokens: their dz, not their dweight terms). Loads are issued ROWS steps at a time.
    The accumulators are summed over SUB and stored once as the program's partial."""
    pid = tl.program_id(0)
    b = (pid // n_split).to(tl.int64)
    split = pid % n_split
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    t0 = (split * SUB + tl.arange(0, SUB)) * chunk_len     # (SUB,) chunk starts
    t1 = tl.minimum(t0 + chunk_len, L)                      # chunk ends (t1 <= t0: empty chunk)
    t_lim = tl.minimum(t1 + (W - 1), L)                     # rows read in the loop: [t0, t_lim)

    zero = tl.zeros([SUB, BLOCK_C], dtype=tl.float32)
    # v_l = weight[:, W-1-l]: the tap through which token t reads xp_{t-l}
    v0 = tl.load(w_ptr + c * swc + (W - 1) * swk, mask=cmask, other=0.0).to(tl.float32)[None, :]
    v1 = v0
    v2 = v0
    v3 = v0
    xm1 = zero   # xp at t-1, t-2, t-3 (raw; document masks are applied per token)
    xm2 = zero
    xm3 = zero
    sm1 = 0      # their document ids (SUB,)
    sm2 = 0
    sm3 = 0
    if HAS_SEQ:
        sm1 = _seq_at(seq_ptr, b, t0 - 1, L, ssb, ssl)
        sm2 = _seq_at(seq_ptr, b, t0 - 2, L, ssb, ssl)
        sm3 = _seq_at(seq_ptr, b, t0 - 3, L, ssb, ssl)
    if W > 1:
        v1 = tl.load(w_ptr + c * swc + (W - 2) * swk, mask=cmask, other=0.0).to(tl.float32)[None, :]
        xm1 = _load_xp(x_ptr, init_ptr, b, t0 - 1, c, cmask, L, sxb, sxl, sib, sic, sik, W, HAS_INIT)
    if W > 2:
        v2 = tl.load(w_ptr + c * swc + (W - 3) * swk, mask=cmask, other=0.0).to(tl.float32)[None, :]
        xm2 = _load_xp(x_ptr, init_ptr, b, t0 - 2, c, cmask, L, sxb, sxl, sib, sic, sik, W, HAS_INIT)
    if W > 3:
        v3 = tl.load(w_ptr + c * swc + (W - 4) * swk, mask=cmask, other=0.0).to(tl.float32)[None, :]
        xm3 = _load_xp(x_ptr, init_ptr, b, t0 - 3, c, cmask, L, sxb, sxl, sib, sic, sik, W, HAS_INIT)
    bv = 0.0
    if HAS_BIAS:
        if SILU:
            bv = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s_last = 0
    if HAS_SEQ:
        if HAS_DFINAL:
            s_last = tl.load(seq_ptr + b * ssb + (L - 1) * ssl)
    V = (v0, v1, v2, v3)
    dzm1 = zero  # dz at t-1, t-2, t-3 (zero before t0: they only reach d xp_p for p < t0, emitted
    dzm2 = zero  # for the first chunk only (d initial_state), where no token precedes t = 0)
    dzm3 = zero
    A0 = zero    # sum_t dz_t · xp_{t-l} (same document), lag l = 0..3; AB = sum_t dz_t
    A1 = zero
    A2 = zero
    A3 = zero
    AB = zero

    # (the jit helpers other than _rows_load are inlined by hand in this loop: the interpreter
    # re-patches triton.language on every helper call, ~1 ms each, and the tests run it)
    # row pointers of step k0, advanced by ROWS rows per iteration (64-bit adds, no multiplies)
    x_cur = x_ptr + b * sxb + t0.to(tl.int64)[:, None] * sxl + c[None, :]
    dy_cur = dy_ptr + b * sdb + t0.to(tl.int64)[:, None] * sdl + c[None, :]
    # d xp of step k0 is stored at row p = t0 + k0 - (W-1); dx is allocated contiguous (B, L, C)
    dx_cur = dx_ptr + b * L * C + (t0 - (W - 1)).to(tl.int64)[:, None] * C + c[None, :]
    q_hi = split * SUB + (SUB - 1)               # last chunk of this program
    if PREFETCH:
        xs, ds, ss = _rows_load(x_cur, dy_cur, seq_ptr, b, t0, c, C, L, t_lim, sxl, sdl, ssb, ssl,
                                ROWS, HAS_SEQ)
    for k0 in tl.range(0, chunk_len + (W - 1), ROWS):
        if PREFETCH:   # the next ROWS steps' loads are in flight while these are computed
            nxs, nds, nss = _rows_load(x_cur + ROWS * sxl, dy_cur + ROWS * sdl, seq_ptr, b,
                                       t0 + (k0 + ROWS), c, C, L, t_lim, sxl, sdl, ssb, ssl, ROWS, HAS_SEQ)
        else:          # the ROWS steps' loads first: they overlap each other
            xs, ds, ss = _rows_load(x_cur, dy_cur, seq_ptr, b, t0 + k0, c, C, L, t_lim,
                                    sxl, sdl, ssb, ssl, ROWS, HAS_SEQ)
        for i in tl.static_range(ROWS):
            t = t0 + (k0 + i)
            xt = xs[i].to(tl.float32)
            # the lag-l inputs of token t, zeroed where they belong to an earlier document
            x1 = xm1
            x2 = xm2
            x3 = xm3
            st = 0
            if HAS_SEQ:
                st = ss[i]
                x1 = tl.where((sm1 == st)[:, None], xm1, 0.0)
                x2 = tl.where((sm2 == st)[:, None], xm2, 0.0)
                x3 = tl.where((sm3 == st)[:, None], xm3, 0.0)
            dz = ds[i].to(tl.float32)
            if SILU:
                z = bv + v0 * xt
                if W > 1:
                    z += v1 * x1
                if W > 2:
                    z += v2 * x2
                if W > 3:
                    z += v3 * x3
                if FAST_SIGMOID:
                    sg = _sigmoid_approx(z)
                else:
                    sg = 1 / (1 + tl.exp(-z))  # = tl.sigmoid
                dz = dz * sg * (1.0 + z * (1.0 - sg))
            # dweight / dbias: the tokens of the chunk only (the halo steps belong to the next)
            dza = tl.where((t < t1)[:, None], dz, 0.0)
            A0 += dza * xt
            if W > 1:
                A1 += dza * x1
            if W > 2:
                A2 += dza * x2
            if W > 3:
                A3 += dza * x3
            if HAS_BIAS:
                AB += dza
            # d xp_p, p = t-(W-1): token p+l reads it through lag l (same document only)
            p = t - (W - 1)
            DZ = (dz, dzm1, dzm2, dzm3)
            SQ = (st, sm1, sm2, sm3)
            dxp = DZ[W - 1] * v0
            for m_ in tl.static_range(W - 1):
                term = DZ[m_]
                if HAS_SEQ:
                    term = tl.where((SQ[m_] == SQ[W - 1])[:, None], term, 0.0)
                dxp += term * V[W - 1 - m_]
            if HAS_DFINAL:
                # the final state holds xp at L-(W-1) .. L-1 (slot j), of the last document only
                if q_hi * chunk_len + (k0 + i) >= L:    # (scalar: some row of the tile has j >= 0)
                    j = p - (L - (W - 1))
                    df = tl.load(dfin_ptr + b * sfb + c[None, :].to(tl.int64) * sfc + j[:, None] * sfk,
                                 mask=c[None, :] < tl.where((j >= 0) & (j < W - 1), C, 0)[:, None],
                                 other=0.0).to(tl.float32)
                    if HAS_SEQ:
                        df = tl.where((SQ[W - 1] == s_last)[:, None], df, 0.0)
                    dxp += df
            tl.store(dx_cur + i * C, dxp.to(dx_ptr.dtype.element_ty),
                     mask=c[None, :] < tl.where((p >= t0) & (p < t1), C, 0)[:, None])
            if HAS_INIT:
                if W > 1:
                    if (split == 0) & (k0 + i < W - 1):
                        # d initial_state[:, :, p + W-1] (p < 0: chunk 0 only); dinit is allocated
                        # contiguous (B, C, W-1)
                        tl.store(dinit_ptr + b * C * (W - 1) + c[None, :].to(tl.int64) * (W - 1)
                                 + (p + (W - 1))[:, None], dxp.to(dinit_ptr.dtype.element_ty),
                                 mask=c[None, :] < tl.where(t0 == 0, C, 0)[:, None])
            xm3 = xm2
            xm2 = xm1
            xm1 = xt
            dzm3 = dzm2
            dzm2 = dzm1
            dzm1 = dz
            if HAS_SEQ:
                sm3 = sm2
                sm2 = sm1
                sm1 = st
        x_cur += ROWS * sxl
        dy_cur += ROWS * sdl
        dx_cur += ROWS * C
        if PREFETCH:
            xs = nxs
            ds = nds
            ss = nss

    # the program's partial sums (summed over programs by _conv_bwd_reduce_kernel: deterministic)
    # part is allocated contiguous (B · n_split, BLOCK_W + 1, C): taps k < W, then the bias
    base = part_ptr + pid.to(tl.int64) * ((BLOCK_W + 1) * C) + c
    tl.store(base + (W - 1) * C, tl.sum(A0, axis=0), mask=cmask)
    if W > 1:
        tl.store(base + (W - 2) * C, tl.sum(A1, axis=0), mask=cmask)
    if W > 2:
        tl.store(base + (W - 3) * C, tl.sum(A2, axis=0), mask=cmask)
    if W > 3:
        tl.store(base + (W - 4) * C, tl.sum(A3, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.store(base + BLOCK_W * C, tl.sum(AB, axis=0), mask=cmask)


@triton.jit
def _conv_bwd_reduce_kernel(part_ptr, dw_ptr, db_ptr, n_rows, C, sdwc, sdwk,
                            W: tl.constexpr, BLOCK_W: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dweight[c, k] = sum_r part[r, k, c] (k < W), dbias[c] = sum_r part[r, BLOCK_W, c], in a fixed
    order (deterministic), cast to the parameters' dtypes. Grid (ceil(C / BLOCK_C), W + has_bias):
    program (cb, k) sums one tap (k = W: the bias) over all rows."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    k = tl.program_id(1)
    kk = tl.where(k < W, k, BLOCK_W)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in tl.range(0, n_rows, BLOCK_R):
        rr = r0 + r
        offs = rr.to(tl.int64)[:, None] * ((BLOCK_W + 1) * C) + kk * C + c[None, :]
        acc += tl.load(part_ptr + offs, mask=(rr < n_rows)[:, None] & cmask[None, :], other=0.0)
    s = tl.sum(acc, axis=0)
    if k < W:
        tl.store(dw_ptr + c * sdwc + k * sdwk, s.to(dw_ptr.dtype.element_ty), mask=cmask)
    else:
        tl.store(db_ptr + c, s.to(db_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _conv_update_kernel(x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr, C,
                        sxb, ssb, ssc, ssk, swc, swk, syb,
                        W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                        BLOCK_C: tl.constexpr, PDL: tl.constexpr = 0):
    if PDL:    # see hybridize.ops.pdl: wait for the previous kernel before any read or write
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    st = state_ptr + b * ssb + c.to(tl.int64) * ssc
    xv = tl.load(x_ptr + b * sxb + c, mask=cmask, other=0.0)
    acc = xv.to(tl.float32) * tl.load(w_ptr + c * swc + (W - 1) * swk, mask=cmask, other=0.0).to(tl.float32)
    # window = [state[0], ..., state[W-2], x]; new state = window[1:]. Every load of slot k+1 happens
    # before the store into slot k within this program, and programs own disjoint (b, c): race-free.
    for k in tl.static_range(W - 1):
        sk = tl.load(st + k * ssk, mask=cmask, other=0.0)
        wk = tl.load(w_ptr + c * swc + k * swk, mask=cmask, other=0.0).to(tl.float32)
        acc += sk.to(tl.float32) * wk
        if k > 0:
            tl.store(st + (k - 1) * ssk, sk, mask=cmask)
    if W > 1:
        tl.store(st + (W - 2) * ssk, xv.to(state_ptr.dtype.element_ty), mask=cmask)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * syb + c, acc.to(y_ptr.dtype.element_ty), mask=cmask)


# ------------------------------------------------------------------------------------------------
# launch helpers
# ------------------------------------------------------------------------------------------------
def _rows_unit_stride(t: Tensor) -> Tensor:
    """Kernels need a unit channel stride only (row strides are passed in)."""
    return t if t.stride(-1) == 1 else t.contiguous()


# Tunables (module-level so a benchmark can sweep them, e.g. benchmarks/conv_probe.py).
# fwd: (BLOCK_L, BLOCK_C, num_warps) caps of the forward (H100, bf16, W=4, silu, B·L·C =
#   4·4096·2560: 76 us = 2.2 TB/s; a copy reaches 2.9).
# bwd_impl: "rows" (default: _conv_bwd_rows_kernel + _conv_bwd_reduce_kernel) or "tiles" (the
#   previous backward, _conv_bwd_kernel: ~280 us = 0.9 TB/s at that shape, kept for A/B).
# bwd_rows: the rows kernel on a GPU: block_c channels and num_warps per program; rows: steps whose
#   loads are issued together; prefetch: issue the next `rows` steps' loads before computing these;
#   sub: time chunks per program; warps_per_sm: the time axis is split for ~that many warps per SM
#   (one wave if they fit: 16 at <= 128 registers; each program streams its chunks); fast_sigmoid:
#   ex2/rcp.approx.ftz PTX (not in the interpreter).
#   bwd_reduce: (BLOCK_R, BLOCK_C, num_warps) of the partial sums.
# bwd / bwd_per_sm / bwd_stages: (BLOCK_L, BLOCK_C, num_warps), programs per SM and pipelining depth
#   of the "tiles" backward. *_interp: the geometry used for CPU tensors (the interpreter).
_TUNE = {"fwd": (16, 64, 2),
         "bwd_impl": "rows",
         "bwd_rows": dict(block_c=128, num_warps=1, rows=4, prefetch=True, sub=1, warps_per_sm=16,
                          fast_sigmoid=True),
         "bwd_reduce": (64, 32, 4),
         "bwd": (16, 64, 4), "bwd_per_sm": 4, "bwd_stages": 1,
         # CPU tensors (the interpreter, ~ms per op and program): wide tiles, few programs
         "fwd_interp": (64, 256, 2),
         "bwd_rows_interp": dict(block_c=256, num_warps=1, rows=2, prefetch=True, sub=16, warps_per_sm=0.25,
                                 fast_sigmoid=False),
         "bwd_reduce_interp": (64, 256, 4),
         "bwd_interp": (16, 64, 4)}


def _blocks(L: int, C: int, which: str, device):
    bl, bc, nw = _TUNE[which if device.type == "cuda" else which + "_interp"]
    BLOCK_C = min(bc, triton.next_power_of_2(max(C, 1)))
    BLOCK_L = min(bl, max(16, triton.next_power_of_2(max(L, 1))))
    return BLOCK_L, BLOCK_C, nw


@functools.lru_cache(maxsize=None)
def _num_sms_cached(device_type: str, index: Optional[int]) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else 0).multi_processor_count
    return 4  # interpreter: few programs


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    return _num_sms_cached(device.type, index)


def _seq_args(seq_idx: Optional[Tensor], x: Tensor):
    if seq_idx is None:
        return x, 0, 0  # dummy pointer, never read
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def _state_args(state: Optional[Tensor], x: Tensor):
    if state is None:
        return x, 0, 0, 0
    return state, state.stride(0), state.stride(1), state.stride(2)


def _check(x: Tensor, weight: Tensor):
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, C), got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be (C, W) with C={x.shape[-1]}, got {tuple(weight.shape)}")
    if not 1 <= weight.shape[1] <= _MAX_W:
        raise ValueError(f"conv width {weight.shape[1]} not supported by the kernel (1..{_MAX_W})")


def _fwd_impl(x, weight, bias, initial_state, seq_idx, silu):
    _check(x, weight)
    Bsz, L, C = x.shape
    W = weight.shape[1]
    x = _rows_unit_stride(x)
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty(Bsz, L, C, device=x.device, dtype=x.dtype)
    fdtype = initial_state.dtype if initial_state is not None else x.dtype
    final = torch.empty(Bsz, C, W - 1, device=x.device, dtype=fdtype)  # fully written by the kernel
    if L == 0:
        if initial_state is not None:
            final.copy_(initial_state)
        else:
            final.zero_()
        return y, final
    BLOCK_L, BLOCK_C, num_warps = _blocks(L, C, "fwd", x.device)
    n_lblk = triton.cdiv(L, BLOCK_L)
    seq, ssb, ssl = _seq_args(seq_idx, x)
    init, sib, sic, sik = _state_args(initial_state, x)
    grid = (Bsz * n_lblk, triton.cdiv(C, BLOCK_C))
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, init, seq, y, final,
        L, C, n_lblk,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), sib, sic, sik, ssb, ssl,
        y.stride(0), y.stride(1), final.stride(0), final.stride(1), final.stride(2),
        W=W, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None,
        SILU=silu, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, BLOCK_W=_BLOCK_W, num_warps=num_warps)
    return y, final


def _bwd_impl(x, weight, bias, initial_state, seq_idx, dy, dfinal, silu):
    if _TUNE["bwd_impl"] == "tiles":
        return _bwd_tiles_impl(x, weight, bias, initial_state, seq_idx, dy, dfinal, silu)
    return _bwd_rows_impl(x, weight, bias, initial_state, seq_idx, dy, dfinal, silu)


def _bwd_alloc(x, weight, bias, initial_state, dfinal):
    """dx, dbias, dinit buffers; (dx, dweight, dbias, dinit) already final when L == 0, else None."""
    Bsz, L, C = x.shape
    W = weight.shape[1]
    dx = torch.empty(Bsz, L, C, device=x.device, dtype=x.dtype)
    # dbias / dinit are only returned to autograd when bias / initial_state exist, and then they are
    # fully written: no memset launches
    dbias = torch.empty(C, device=x.device, dtype=bias.dtype if bias is not None else weight.dtype)
    idtype = initial_state.dtype if initial_state is not None else x.dtype
    dinit = torch.empty(Bsz, C, W - 1, device=x.device, dtype=idtype)
    done = None
    if L == 0:
        dbias.zero_()
        if dfinal is not None:
            dinit.copy_(dfinal)
        else:
            dinit.zero_()
        done = (dx, torch.zeros_like(weight), dbias, dinit)
    return dx, dbias, dinit, done


# the last compiled rows kernel launched (GPU: .n_regs, .n_spills; read by benchmarks/conv_probe.py)
_LAUNCHED = {}


_GPU_VERIFIED_ROWS = (4,)


def _rows_config(Bsz: int, L: int, C: int, W: int, device) -> dict:
    """Launch geometry of _conv_bwd_rows_kernel: B · n_split · n_cblk programs of num_warps warps,
    ~warps_per_sm warps per SM, each owning `sub` chunks of chunk_len tokens; chunk_len + W-1 (the
    steps of a chunk) is a multiple of `rows` (no idle steps)."""
    cfg = _TUNE["bwd_rows" if device.type == "cuda" else "bwd_rows_interp"]
    num_warps, rows, sub = cfg["num_warps"], cfg["rows"], cfg["sub"]
    if device.type == "cuda" and rows not in _GPU_VERIFIED_ROWS:
        # the H100 run of 2026-11-22 (tests + benchmarks/conv_probe.py) computed wrong dx with rows = 1, 2
        # (right under the interpreter; not localised yet): refuse rather than return wrong gradients
        raise ValueError(f"conv1d backward: rows={rows} is not verified on the GPU (only {_GPU_VERIFIED_ROWS}); "
                         "set hybridize.ops.conv1d.triton._TUNE['bwd_rows']['rows'] = 4")
    BLOCK_C = min(cfg["block_c"], max(32 * num_warps, triton.next_power_of_2(max(C, 1))))
    n_cblk = triton.cdiv(C, BLOCK_C)
    want = max(1, round(cfg["warps_per_sm"] * _num_sms(device) / (num_warps * Bsz * n_cblk)))  # per sequence
    chunk = triton.cdiv(L, want * sub)
    chunk = max(1, triton.cdiv(chunk + W - 1, rows) * rows - (W - 1))
    return dict(BLOCK_C=BLOCK_C, n_cblk=n_cblk, num_warps=num_warps, ROWS=rows, SUB=sub,
                PREFETCH=bool(cfg["prefetch"]),
                FAST_SIGMOID=bool(cfg["fast_sigmoid"]) and device.type == "cuda",   # PTX: GPU only
                chunk_len=chunk, n_split=triton.cdiv(L, sub * chunk))


def _bwd_prepare(x, weight, bias, initial_state, dy, dfinal):
    """Both backward paths' common start: unit channel strides, a contiguous bias, and `_bwd_alloc`'s
    gradient buffers (or its early result for empty shapes)."""
    x, dy = _rows_unit_stride(x), _rows_unit_stride(dy)
    bias = bias.contiguous() if bias is not None else None
    return x, dy, bias, _bwd_alloc(x, weight, bias, initial_state, dfinal)


def _bwd_rows_impl(x, weight, bias, initial_state, seq_idx, dy, dfinal, silu):
    Bsz, L, C = x.shape
    W = weight.shape[1]
    x, dy, bias, (dx, dbias, dinit, done) = _bwd_prepare(x, weight, bias, initial_state, dy, dfinal)
    if done is not None:
        return done
    g = _rows_config(Bsz, L, C, W, x.device)
    n_split = g["n_split"]
    part = torch.empty(Bsz * n_split, _BLOCK_W + 1, C, device=x.device, dtype=torch.float32)
    seq, ssb, ssl = _seq_args(seq_idx, x)
    init, sib, sic, sik = _state_args(initial_state, x)
    has_dfinal = dfinal is not None and W > 1
    if has_dfinal:
        dfin, sfb, sfc, sfk = dfinal, dfinal.stride(0), dfinal.stride(1), dfinal.stride(2)
    else:
        dfin, sfb, sfc, sfk = x, 0, 0, 0
    _LAUNCHED["bwd_rows"] = _conv_bwd_rows_kernel[(Bsz * n_split, g["n_cblk"])](
        x, weight, bias if bias is not None else x, init, seq, dy, dfin,
        dx, part, dinit,
        L, C, n_split, g["chunk_len"],
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), sib, sic, sik, ssb, ssl,
        dy.stride(0), dy.stride(1), sfb, sfc, sfk,
        W=W, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None,
        SILU=silu, HAS_DFINAL=has_dfinal, BLOCK_C=g["BLOCK_C"], ROWS=g["ROWS"], SUB=g["SUB"],
        PREFETCH=g["PREFETCH"], FAST_SIGMOID=g["FAST_SIGMOID"], BLOCK_W=_BLOCK_W, num_warps=g["num_warps"])
    dweight = torch.empty(C, W, device=x.device, dtype=weight.dtype)
    br, bcr, nwr = _TUNE["bwd_reduce" if x.device.type == "cuda" else "bwd_reduce_interp"]
    BLOCK_CR = min(bcr, triton.next_power_of_2(max(C, 1)))
    _conv_bwd_reduce_kernel[(triton.cdiv(C, BLOCK_CR), W + (bias is not None))](
        part, dweight, dbias, Bsz * n_split, C, dweight.stride(0), dweight.stride(1),
        W=W, BLOCK_W=_BLOCK_W, BLOCK_R=br, BLOCK_C=BLOCK_CR, num_warps=nwr)
    return dx, dweight, dbias, dinit


def _bwd_tiles_impl(x, weight, bias, initial_state, seq_idx, dy, dfinal, silu):
    Bsz, L, C = x.shape
    W = weight.shape[1]
    x, dy, bias, (dx, dbias, dinit, done) = _bwd_prepare(x, weight, bias, initial_state, dy, dfinal)
    if done is not None:
        return done
    BLOCK_L, BLOCK_C, num_warps = _blocks(L, C, "bwd", x.device)
    n_cblk = triton.cdiv(C, BLOCK_C)
    # split time so that there are ~bwd_per_sm programs per SM; each program loops over its chunk,
    # so the dweight partials are n_split·B·C·W floats (small next to x) instead of one per tile.
    n_tiles = triton.cdiv(L, BLOCK_L)
    want = max(1, triton.cdiv(_TUNE["bwd_per_sm"] * _num_sms(x.device), Bsz * n_cblk))
    tiles_per_split = triton.cdiv(n_tiles, min(n_tiles, want))
    chunk_len = tiles_per_split * BLOCK_L
    n_split = triton.cdiv(L, chunk_len)
    dw_part = torch.empty(Bsz * n_split, C, _BLOCK_W, device=x.device, dtype=torch.float32)
    db_part = (torch.empty(Bsz * n_split, C, device=x.device, dtype=torch.float32)
               if bias is not None else dw_part)
    seq, ssb, ssl = _seq_args(seq_idx, x)
    init, sib, sic, sik = _state_args(initial_state, x)
    if dfinal is not None and W > 1:
        dfin, sfb, sfc, sfk = dfinal, dfinal.stride(0), dfinal.stride(1), dfinal.stride(2)
    else:
        dfin, sfb, sfc, sfk = x, 0, 0, 0
    grid = (Bsz * n_split, n_cblk)
    _conv_bwd_kernel[grid](
        x, weight, bias if bias is not None else x, init, seq, dy, dfin,
        dx, dw_part, db_part, dinit,
        L, C, n_split, chunk_len,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), sib, sic, sik, ssb, ssl,
        dy.stride(0), dy.stride(1), sfb, sfc, sfk,
        W=W, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None,
        SILU=silu, HAS_DFINAL=dfinal is not None and W > 1,
        BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, BLOCK_W=_BLOCK_W, NUM_STAGES=_TUNE["bwd_stages"],
        num_warps=num_warps)
    dweight = dw_part[:, :, :W].sum(0).to(weight.dtype)
    if bias is not None:
        dbias = db_part.sum(0).to(dbias.dtype)
    return dx, dweight, dbias, dinit


def _update_impl(x, conv_state, weight, bias, silu):
    Bsz, C = x.shape
    W = weight.shape[1]
    x = _rows_unit_stride(x)
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty_like(x)
    BLOCK_C = min(256, triton.next_power_of_2(max(C, 1)))
    _conv_update_kernel[(Bsz, triton.cdiv(C, BLOCK_C))](
        x, conv_state, weight, bias if bias is not None else x, y, C,
        x.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        weight.stride(0), weight.stride(1), y.stride(0),
        W=W, HAS_BIAS=bias is not None, SILU=silu, BLOCK_C=BLOCK_C, num_warps=4, **pdl_launch(x.device))
    return y


# ------------------------------------------------------------------------------------------------
# torch.library registration (torch.compile) and the eager autograd.Function
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("hybridize::causal_conv1d_fwd", mutates_args=())
def _causal_conv1d_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                          seq_idx: Optional[Tensor], silu: bool) -> Tuple[Tensor, Tensor]:
    return _fwd_impl(x, weight, bias, initial_state, seq_idx, silu)


@_causal_conv1d_fwd_op.register_fake
def _(x, weight, bias, initial_state, seq_idx, silu):
    Bsz, L, C = x.shape
    fdtype = initial_state.dtype if initial_state is not None else x.dtype
    return (x.new_empty(Bsz, L, C),
            x.new_empty(Bsz, C, weight.shape[-1] - 1, dtype=fdtype))


@torch.library.custom_op("hybridize::causal_conv1d_bwd", mutates_args=())
def _causal_conv1d_bwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                          seq_idx: Optional[Tensor], dy: Tensor, dfinal: Optional[Tensor],
                          silu: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _bwd_impl(x, weight, bias, initial_state, seq_idx, dy, dfinal, silu)


@_causal_conv1d_bwd_op.register_fake
def _(x, weight, bias, initial_state, seq_idx, dy, dfinal, silu):
    Bsz, L, C = x.shape
    idtype = initial_state.dtype if initial_state is not None else x.dtype
    return (x.new_empty(Bsz, L, C), torch.empty_like(weight),
            x.new_empty(C, dtype=bias.dtype if bias is not None else weight.dtype),
            x.new_empty(Bsz, C, weight.shape[-1] - 1, dtype=idtype))


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, seq_idx, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_state, seq_idx)
    ctx.silu = silu


def _backward(ctx, dy, dfinal, bwd):
    x, weight, bias, initial_state, seq_idx = ctx.saved_tensors
    if dy is None:  # only the final state was used
        dy = torch.zeros_like(x)
    dx, dw, db, dinit = bwd(x, weight, bias, initial_state, seq_idx, dy, dfinal, ctx.silu)
    return (dx, dw, db if bias is not None else None,
            dinit if initial_state is not None else None, None, None)


_causal_conv1d_fwd_op.register_autograd(
    lambda ctx, dy, dfinal: _backward(ctx, dy, dfinal, torch.ops.hybridize.causal_conv1d_bwd),
    setup_context=_fwd_setup_context)


class _CausalConv1dFn(torch.autograd.Function):
    """Eager path: the same kernels without custom_op's Python dispatch (~100-200 us a call)."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, seq_idx, silu):
        out = _fwd_impl(x, weight, bias, initial_state, seq_idx, silu)
        _fwd_setup_context(ctx, (x, weight, bias, initial_state, seq_idx, silu), out)
        # an unused final state arrives as None, not as a zeros tensor (no memset, no d final_state
        # pass in the backward); an unused y still works (_backward substitutes zeros)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, dy, dfinal):
        return _backward(ctx, dy, dfinal, _bwd_impl)


@torch.library.custom_op("hybridize::causal_conv1d_update", mutates_args=("conv_state",))
def _causal_conv1d_update_op(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                             silu: bool) -> Tensor:
    return _update_impl(x, conv_state, weight, bias, silu)


@_causal_conv1d_update_op.register_fake
def _(x, conv_state, weight, bias, silu):
    return torch.empty_like(x)


# ------------------------------------------------------------------------------------------------
# public API (same signatures as the reference)
# ------------------------------------------------------------------------------------------------
def _silu_flag(activation: Optional[str]) -> bool:
    if activation is None:
        return False
    if activation in ("silu", "swish"):
        return True
    raise ValueError(f"unknown conv activation {activation!r}; expected None or 'silu'")


def causal_conv1d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                         initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                         activation: Optional[str] = None, return_final_state: bool = False):
    """x: (B, L, C); weight: (C, W), W <= 4; bias: (C,); initial_state: (B, C, W-1); seq_idx: (B, L).

    Returns y (B, L, C) in x's dtype and, if requested, the final state (B, C, W-1) in
    initial_state's dtype (x's dtype when None). Differentiable in x, weight, bias, initial_state.
    Under torch.compile this is the custom op torch.ops.hybridize.causal_conv1d_fwd; in eager mode
    an autograd.Function around the same launches (less Python overhead).
    """
    silu = _silu_flag(activation)
    if torch.compiler.is_compiling():
        y, final = torch.ops.hybridize.causal_conv1d_fwd(x, weight, bias, initial_state, seq_idx, silu)
    else:
        y, final = _CausalConv1dFn.apply(x, weight, bias, initial_state, seq_idx, silu)
    return (y, final) if return_final_state else y


def causal_conv1d_update_triton(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                                activation: Optional[str] = None) -> Tensor:
    """One decode step. x: (B, C); conv_state: (B, C, W-1) (any strides), updated in place.
    Returns y (B, C) in x's dtype. No host synchronisation: capturable in a CUDA graph."""
    if x.dim() != 2 or conv_state.dim() != 3:
        raise ValueError("x must be (B, C) and conv_state (B, C, W-1)")
    _check(x[:, None, :], weight)
    silu = _silu_flag(activation)
    if torch.compiler.is_compiling():
        return torch.ops.hybridize.causal_conv1d_update(x, conv_state, weight, bias, silu)
    return _update_impl(x, conv_state, weight, bias, silu)


__all__ = ["causal_conv1d_triton", "causal_conv1d_update_triton"]
