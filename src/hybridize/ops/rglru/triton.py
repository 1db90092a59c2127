"""Triton kernels for the RG-LRU linear scan (forward, backward, one-token step).

Semantics are exactly those of :mod:`hybridize.ops.rglru.reference` (same signature):

    h_t = a_t * h_{t-1} + x_t,   h_{t-1} := 0 where reset[b, t],   h_{-1} = initial_state (or 0)

A reset at t is the same as a_t := 0, which is how the kernels implement it. Accumulation in fp32;
h is returned in x's dtype, the final state in fp32.

Kernels
-------
Two paths, chosen by ``_TUNE["fwd_path"] / ["bwd_path"]`` (``_plan``): "lookback" (the default) and
"single" (the previous default, kept for comparison: benchmarks/rglru_probe.py times both).

* ``_rglru_fwd_lb_kernel`` (look-back path): one pass over time chunks, x and a read from HBM once at
  any B and L. The (B, L, C) problem is cut into n_cols = B·ceil(C/BLOCK_C) columns × n_chunks time
  chunks of TILES·BLOCK_T steps, one program per (chunk, column) in chunk-major order. A program
  (1) computes its chunk's affine map h_end = P·h_in + S (P = prod a', S = the end state from 0)
  from the chunk alone, (2) publishes it, (3) looks back at its predecessors' published maps
  (decoupled look-back, Merrill & Garland 2016 / CUB): it composes them, WINDOW at a time, back to the
  newest one with P = 0 — an inclusive state, published as (0, state) once a program knows it, or an
  aggregate the scan resets in; chunk 0 starts from initial_state and publishes only its inclusive
  state — (4) publishes its own inclusive state and (5) writes h from the carry-in: from registers
  when the chunk is one tile (TILES = 1), else by a second walk over the chunk (x, a again, from
  L1/L2). In-chunk scan: ``tl.associative_scan`` over (BLOCK_T, BLOCK_C) tiles with
  (a1, x1) ∘ (a2, x2) = (a1·a2, a2·x1 + x2), or (ROWS) BLOCK_T rows loaded at once and walked one
  step at a time, each thread carrying its own channels (no cross-thread scan).
  Workspace: one int64 per (column, chunk, channel) holding S's bits (high) and P's bits with bit 0
  forced to 1 (low; P loses <= 1 ulp): a published word is never 0, so value and "published" travel
  in one 64-bit atomic (no ordering between separate flag and data words is needed) and the
  workspace is zeroed by a memset per call (no host sync: CUDA-graph capturable), B·L·C/BLOCK_T·8/TILES
  bytes (~1/48 of the forward's traffic at BLOCK_T = 64, bf16). Look-back loads are volatile and
  re-read until every word needed is published (a spin). Programs take their chunk from an atomic
  ticket counter (TICKET, after the workspace), so every predecessor is a program already running:
  waiting on it cannot deadlock whatever order blocks start in (TICKET=False uses the program id, as
  CUB does, relying on blocks starting in id order). Under TRITON_INTERPRET=1 programs run one after
  another, so every look-back finds its predecessor's inclusive state. One chunk (L <= chunk): no
  look-back, no workspace.
* ``_rglru_bwd_lb_kernel``: the same for the backward recurrence, scanning time chunks from the last
  (carry-in d final_state) to the first. With g_t = dL/dh_t (total):
      g_t = dh_t + a'_{t+1}·g_{t+1}     (a'_{t+1} = 0 if reset[t+1]; g_L := d final_state),
      dx_t = g_t,  da_t = g_t·h_{t-1} (0 where reset[t]),  d initial_state = a'_0·g_0.
  Tiles are loaded time-reversed so the recurrence is again a forward scan. h_{t-1} is read from the
  saved forward output h (x's dtype: with bf16 x, da uses a bf16-rounded h_{t-1}, a per-element
  relative error of ~2^-9, not accumulated); HP_EARLY loads it before the look-back.
* ``_rglru_fwd_kernel`` / ``_rglru_bwd_kernel`` (single path): grid (B, n_chunks, ceil(C/BLOCK_C)).
  Each program walks its time chunk (all of L when n_chunks = 1, the usual case) in tiles of
  BLOCK_T steps: it loads a (BLOCK_T, BLOCK_C) tile (the loop is software-pipelined), scans it with
  ``tl.associative_scan``, applies the carried state and keeps the last row as the carry (the
  backward walks in reverse). Only when B·ceil(C/BLOCK_C) is tiny (< SMs/2 programs) is time split
  into chunks: a SUMMARY pass computes each chunk's map, ``_rglru_carry_kernel`` chains the maps
  sequentially (B·n_chunks·C floats), and the main pass rescans each chunk from its carry-in, which
  reads x, a (resp. a, h, dh) twice.
* ``_rglru_step_kernel``: one decode token, state updated in place.

HBM floor (bytes that must move; e_x, e_a element sizes, B·L·C elements)
------------------------------------------------------------------------
* forward:  read x, a + write h           = B·L·C·(2·e_x + e_a)   (+ B·L reset bytes, + states)
* backward: read a, h, dh + write dx, da  = B·L·C·(3·e_x + 2·e_a) (+ resets, states)
* step:     read x, a, state + write h, state = B·C·(2·e_x + e_a + 8)   (fp32 state)
Measured, single path (H100, bf16, GPU time via CUDA-graph replay, triton 3.6): B·L·C = 4·4096·2560:
forward 166 us = 1.5 TB/s, backward 202 us = 2.1 TB/s (a device copy: 2.9 TB/s); 1·2048·2560:
34 / 46 us; at 16384 tokens × 2560 (benchmarks/results/scan_h100.json) forward 2.06× / 2.14× /
2.80× / 3.68× the floor at L = 512 / 2048 / 8192 / 16384 (B = 32 / 8 / 2 / 1): at long L there are
too few programs. The look-back path is not measured yet (benchmarks/rglru_probe.py).

Registered as ``torch.ops.hybridize.rglru_scan_fwd / rglru_scan_bwd / rglru_step``
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


@triton.jit
def _lin_combine(a1, x1, a2, x2):
    # composition of h -> a1·h + x1 followed by h -> a2·h + x2 (element 1 is earlier in the scan)
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _last_row(v, rows, BLOCK_T: tl.constexpr):
    # row BLOCK_T-1 of a (BLOCK_T, BLOCK_C) tile (a masked sum: register tiles cannot be indexed)
    return tl.sum(tl.where((rows == BLOCK_T - 1)[:, None], v, 0.0), axis=0)


@triton.jit
def _last_rows(u, v, rows, BLOCK_T: tl.constexpr):
    # row BLOCK_T-1 of two tiles (two tl.sum: a two-operand tl.reduce saves ~3 of ~40 barriers of
    # the look-back forward kernel but runs element by element in the interpreter)
    sel = (rows == BLOCK_T - 1)[:, None]
    return tl.sum(tl.where(sel, u, 0.0), axis=0), tl.sum(tl.where(sel, v, 0.0), axis=0)


@triton.jit
def _rglru_fwd_kernel(x_ptr, a_ptr, carry_ptr, reset_ptr, h_ptr, fin_ptr, sum_ptr,
                      L, C, chunk_len, n_chunks,
                      sxb, sxl, sab, sal, scb, scn, srb, srl, shb, shl,
                      HAS_CARRY: tl.constexpr, HAS_RESET: tl.constexpr, SUMMARY: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Scan of one (batch, time chunk, channel block).

    SUMMARY=False: h over the chunk from the carried-in state (initial_state for a single chunk,
    else the per-chunk carries of _rglru_carry_kernel); the last chunk writes the final state.
    SUMMARY=True: scan from h = 0 and write only the chunk's affine map h_end = P·h_in + S
    (P = prod a', S = h_end from 0) into sum[b, chunk, 0/1, c]."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rows = tl.arange(0, BLOCK_T)
    if HAS_CARRY:
        carry = tl.load(carry_ptr + b * scb + chunk * scn + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_C,), dtype=tl.float32)
    prod = tl.full((BLOCK_C,), 1.0, dtype=tl.float32)
    t_start = chunk * chunk_len
    t_end = tl.minimum(t_start + chunk_len, L)
    for t0 in tl.range(t_start, t_end, BLOCK_T, num_stages=NUM_STAGES):
        t = t0 + rows
        tmask = t < L  # chunk_len is a multiple of BLOCK_T: tiles never cross a chunk end
        m = tmask[:, None] & cmask[None, :]
        t64 = t.to(tl.int64)[:, None]
        # padded rows (t >= L) get a = 1, x = 0: they pass the carry through unchanged
        xv = tl.load(x_ptr + b * sxb + t64 * sxl + c[None, :], mask=m, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + b * sab + t64 * sal + c[None, :], mask=m, other=1.0).to(tl.float32)
        if HAS_RESET:
            r = tl.load(reset_ptr + b * srb + t.to(tl.int64) * srl, mask=tmask, other=0)
            av = tl.where((r != 0)[:, None], 0.0, av)
        acum, xcum = tl.associative_scan((av, xv), 0, _lin_combine)
        h = acum * carry[None, :] + xcum
        if SUMMARY:
            prod = prod * _last_row(acum, rows, BLOCK_T)
        else:
            tl.store(h_ptr + b * shb + t64 * shl + c[None, :], h.to(h_ptr.dtype.element_ty), mask=m)
        carry = _last_row(h, rows, BLOCK_T)
    if SUMMARY:
        offs = ((b * n_chunks + chunk) * 2) * C + c
        tl.store(sum_ptr + offs, prod, mask=cmask)
        tl.store(sum_ptr + offs + C, carry, mask=cmask)
    else:
        if chunk == n_chunks - 1:
            # final state: fp32, allocated contiguous (B, C)
            tl.store(fin_ptr + b * C + c, carry, mask=cmask)


@triton.jit
def _rglru_carry_kernel(sum_ptr, carry0_ptr, cin_ptr, n_chunks, C, s0b,
                        HAS_CARRY0: tl.constexpr, REVERSE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sequential pass over the chunk maps: cin[b, k] = state entering chunk k (in scan order),
    starting from carry0 (initial_state forward, d final_state backward). B·n_chunks·C floats."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if HAS_CARRY0:
        carry = tl.load(carry0_ptr + b * s0b + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(0, n_chunks):
        if REVERSE:
            k = n_chunks - 1 - i
        else:
            k = i
        row = b * n_chunks + k
        tl.store(cin_ptr + row * C + c, carry, mask=cmask)
        p = tl.load(sum_ptr + (row * 2) * C + c, mask=cmask, other=0.0)
        s = tl.load(sum_ptr + (row * 2 + 1) * C + c, mask=cmask, other=0.0)
        carry = p * carry + s


@triton.jit
def _rglru_bwd_kernel(a_ptr, h_ptr, init_ptr, reset_ptr, dh_ptr, carry_ptr, dx_ptr, da_ptr, dinit_ptr,
                      sum_ptr,
                      L, C, chunk_len, n_chunks,
                      sab, sal, shb, shl, sib, srb, srl, sdb, sdl, scb, scn,
                      HAS_INIT: tl.constexpr, HAS_RESET: tl.constexpr, HAS_CARRY: tl.constexpr,
                      SUMMARY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                      NUM_STAGES: tl.constexpr):
    """Reverse scan of g over one (batch, time chunk, channel block); see the module docstring.
    The carry is g at the first step after the chunk (d final_state after the last one).
    SUMMARY=True writes only the chunk's map g_start = P·g_in + S into sum[b, chunk, 0/1, c]."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rows = tl.arange(0, BLOCK_T)
    if HAS_CARRY:
        carry = tl.load(carry_ptr + b * scb + chunk * scn + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_C,), dtype=tl.float32)
    prod = tl.full((BLOCK_C,), 1.0, dtype=tl.float32)
    t_start = chunk * chunk_len
    t_end = tl.minimum(t_start + chunk_len, L)
    n_tiles = tl.cdiv(t_end - t_start, BLOCK_T)
    for i in tl.range(0, n_tiles, num_stages=NUM_STAGES):
        t0 = t_start + (n_tiles - 1 - i) * BLOCK_T
        t = t0 + (BLOCK_T - 1) - rows          # row 0 is the latest time step of the tile
        tmask = t < L
        m = tmask[:, None] & cmask[None, :]
        t64 = t.to(tl.int64)[:, None]
        dy = tl.load(dh_ptr + b * sdb + t64 * sdl + c[None, :], mask=m, other=0.0).to(tl.float32)
        # coefficient carrying g_{t+1} into g_t: a'_{t+1}; 1 at t = L-1 (carry = d final) and on
        # padded rows t >= L (they pass the carry through)
        tn = t + 1
        nmask = tn < L
        an = tl.load(a_ptr + b * sab + t64 * sal + sal + c[None, :],
                     mask=nmask[:, None] & cmask[None, :], other=1.0).to(tl.float32)
        if HAS_RESET:
            rn = tl.load(reset_ptr + b * srb + tn.to(tl.int64) * srl, mask=nmask, other=0)
            an = tl.where((rn != 0)[:, None], 0.0, an)
        gcum_a, gcum = tl.associative_scan((an, dy), 0, _lin_combine)
        g = gcum_a * carry[None, :] + gcum
        if SUMMARY:
            prod = prod * _last_row(gcum_a, rows, BLOCK_T)
        else:
            # dx, da are allocated contiguous (B, L, C)
            offs = b * L * C + t64 * C + c[None, :]
            tl.store(dx_ptr + offs, g.to(dx_ptr.dtype.element_ty), mask=m)
            # h_{t-1}: the saved output, or the initial state at t = 0; zero where a reset drops it
            hp = tl.load(h_ptr + b * shb + t64 * shl - shl + c[None, :],
                         mask=(tmask & (t >= 1))[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            if HAS_INIT:
                h0 = tl.load(init_ptr + b * sib + c, mask=cmask, other=0.0).to(tl.float32)
                hp = tl.where((t == 0)[:, None], h0[None, :], hp)
            if HAS_RESET:
                r = tl.load(reset_ptr + b * srb + t.to(tl.int64) * srl, mask=tmask, other=0)
                hp = tl.where((r != 0)[:, None], 0.0, hp)
            tl.store(da_ptr + offs, (g * hp).to(da_ptr.dtype.element_ty), mask=m)
        # the last row of the reversed tile is t = t0 (always valid): g_{t0} carries on
        carry = _last_row(g, rows, BLOCK_T)
    if SUMMARY:
        offs = ((b * n_chunks + chunk) * 2) * C + c
        tl.store(sum_ptr + offs, prod, mask=cmask)
        tl.store(sum_ptr + offs + C, carry, mask=cmask)
    else:
        if HAS_INIT:
            if chunk == 0:
                # d h_{-1} = a'_0 · g_0 (carry is g_0; L >= 1 is guaranteed by the launcher)
                a0 = tl.load(a_ptr + b * sab + c, mask=cmask, other=0.0).to(tl.float32)
                if HAS_RESET:
                    r0 = tl.load(reset_ptr + b * srb)
                    a0 = tl.where(r0 != 0, 0.0, a0)
                tl.store(dinit_ptr + b * C + c, (a0 * carry).to(dinit_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _rglru_step_kernel(x_ptr, a_ptr, s_ptr, h_ptr, C, sxb, sab, ssb, ssc, shb, BLOCK_C: tl.constexpr,
                       PDL: tl.constexpr = 0):
    if PDL:    # see hybridize.ops.pdl: wait for the previous kernel before any read or write
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    xv = tl.load(x_ptr + b * sxb + c, mask=cmask, other=0.0).to(tl.float32)
    av = tl.load(a_ptr + b * sab + c, mask=cmask, other=0.0).to(tl.float32)
    sp = s_ptr + b * ssb + c.to(tl.int64) * ssc
    h = av * tl.load(sp, mask=cmask, other=0.0).to(tl.float32) + xv
    tl.store(sp, h.to(s_ptr.dtype.element_ty), mask=cmask)
    tl.store(h_ptr + b * shb + c, h.to(h_ptr.dtype.element_ty), mask=cmask)


# ------------------------------------------------------------------------------------------------
# single-pass time-chunked scan with decoupled look-back
# ------------------------------------------------------------------------------------------------
@triton.jit
def _pack(p, s):
    """A chunk's map h -> P·h + S as one int64: S's bits high, P's low with bit 0 forced to 1, so a
    published word is never 0 (= "not yet published", the zeroed workspace). Costs P <= 1 ulp."""
    pb = (p.to(tl.int32, bitcast=True) | 1).to(tl.uint32, bitcast=True).to(tl.int64)
    return (s.to(tl.int32, bitcast=True).to(tl.int64) << 32) | pb


@triton.jit
def _unpack(v):
    p = (v.to(tl.int32) & -2).to(tl.float32, bitcast=True)
    s = (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return p, s


@triton.jit
def _publish(ws_ptr, row, cc, cmask, p, s, BLOCK_C: tl.constexpr):
    # one 64-bit atomic per channel: value and "ready" travel together, no ordering needed
    tl.atomic_xchg(ws_ptr + row.to(tl.int64) * BLOCK_C + cc, _pack(p, s), mask=cmask, sem="relaxed")


@triton.jit
def _lookback(ws_ptr, row0, k, cmask, BLOCK_C: tl.constexpr, WINDOW: tl.constexpr):
    """State entering chunk k >= 1 (scan order) of one column whose chunk maps sit in ws rows
    row0 + 0 .. row0 + k-1: the published maps of chunks k-1, k-2, ... composed back to the newest
    one with P = 0 (an inclusive prefix, or an aggregate the scan resets in; chunk 0 always
    publishes an inclusive one). WINDOW predecessors are read at once; a window is used only when
    every row it needs (those after its newest P = 0 row) is published, else it is read again
    (volatile loads: a spin on programs that already run)."""
    cc = tl.arange(0, BLOCK_C)
    pacc = tl.full((BLOCK_C,), 1.0, tl.float32)     # map of the chunks already composed (newest)
    sacc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    todo = cmask.to(tl.int32)                        # 1 while a channel needs older chunks
    hi = k - 1                                       # newest chunk of the next window
    if WINDOW == 1:  # one predecessor at a time: no window scan
        while tl.max(todo, axis=0) > 0:
            m = todo != 0
            v = tl.load(ws_ptr + (row0 + hi).to(tl.int64) * BLOCK_C + cc, mask=m, other=0, volatile=True)
            if tl.max((m & (v == 0)).to(tl.int32)) == 0:
                p, s = _unpack(v)
                sacc = tl.where(m, pacc * s + sacc, sacc)
                pacc = tl.where(m, pacc * p, pacc)
                todo = tl.where((p == 0.0) | (hi == 0), 0, todo)
                hi -= 1
    else:
        r = tl.arange(0, WINDOW)
        while tl.max(todo, axis=0) > 0:
            j = hi - (WINDOW - 1) + r                    # window rows, oldest first
            m = (j >= 0)[:, None] & (todo != 0)[None, :]
            v = tl.load(ws_ptr + (row0 + j).to(tl.int64)[:, None] * BLOCK_C + cc[None, :], mask=m, other=0,
                        volatile=True)
            p, s = _unpack(v)
            last = tl.max(tl.where((v != 0) & (p == 0.0), r[:, None], -1), axis=0)
            need = m & (r[:, None] >= last[None, :])
            if tl.max((need & (v == 0)).to(tl.int32)) == 0:      # every needed row published
                pw, sw = tl.associative_scan((tl.where(need, p, 1.0), tl.where(need, s, 0.0)), 0, _lin_combine)
                pw, sw = _last_rows(pw, sw, r, WINDOW)
                sacc = pacc * sw + sacc
                pacc = pacc * pw
                todo = tl.where((last >= 0) | (hi < WINDOW), 0, todo)
                hi -= WINDOW
    return sacc


@triton.jit
def _chain_chunk(ws_ptr, row0, k, n_chunks, cc, cmask, p, s, carry, BLOCK_C: tl.constexpr,
                 WINDOW: tl.constexpr, LOOKBACK: tl.constexpr, INCL_EVERY: tl.constexpr):
    """Chunk k of a look-back row (slots row0 …): publish its map (p, s), take the carry-in from the
    predecessors (k > 0; chunk 0 keeps `carry`), publish its inclusive end value p · carry + s for the
    successors. Returns (carry-in, end value). Shared by the forward and backward kernels."""
    if LOOKBACK:
        if k > 0:
            if k < n_chunks - 1:
                _publish(ws_ptr, row0 + k, cc, cmask, p, s, BLOCK_C)
            carry = _lookback(ws_ptr, row0, k, cmask, BLOCK_C, WINDOW)
    end = p * carry + s
    if LOOKBACK:
        if k < n_chunks - 1:
            if k % INCL_EVERY == 0:  # INCL_EVERY > 1 (tests): successors must walk aggregates
                _publish(ws_ptr, row0 + k, cc, cmask, tl.zeros_like(p), end, BLOCK_C)
    return carry, end


@triton.jit
def _steps(t, cmask):
    # t (a scalar step) as a (BLOCK_C,) vector: masks built from it are full vectors (the interpreter
    # cannot splat a scalar bool)
    return tl.zeros_like(cmask.to(tl.int32)) + t


# --- forward pieces -------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(xb, ab, rb, t0, rows, cmask, L, sxl, sal, srl, HAS_RESET: tl.constexpr):
    """(BLOCK_T, BLOCK_C) tile from step t0 scanned from h = 0: (prod a', h) per row. Rows t >= L
    get a = 1, x = 0 (they pass the state through)."""
    t = t0 + rows
    tmask = t < L
    m = tmask[:, None] & cmask[None, :]
    t64 = t.to(tl.int64)[:, None]
    xv = tl.load(xb[None, :] + t64 * sxl, mask=m, other=0.0).to(tl.float32)
    av = tl.load(ab[None, :] + t64 * sal, mask=m, other=1.0).to(tl.float32)
    if HAS_RESET:
        r = tl.load(rb + t.to(tl.int64) * srl, mask=tmask, other=0)
        av = tl.where((r != 0)[:, None], 0.0, av)
    return tl.associative_scan((av, xv), 0, _lin_combine)


@triton.jit
def _store_tile(hb, t0, rows, cmask, L, shl, h):
    t = t0 + rows
    m = (t < L)[:, None] & cmask[None, :]
    tl.store(hb[None, :] + t.to(tl.int64)[:, None] * shl, h.to(hb.dtype.element_ty), mask=m)


@triton.jit
def _fwd_rows_load(xb, ab, rb, t0, cmask, L, sxl, sal, srl, HAS_RESET: tl.constexpr, BLOCK_T: tl.constexpr):
    """Steps t0 .. t0+BLOCK_T-1 as tuples of (BLOCK_C,) rows (a' = a with resets, x), all loads
    issued before any use; rows t >= L get a = 1, x = 0."""
    avs = ()
    xs = ()
    for j in tl.static_range(BLOCK_T):
        t = t0 + j
        m = cmask & (_steps(t, cmask) < L)
        t64 = t.to(tl.int64)
        xv = tl.load(xb + t64 * sxl, mask=m, other=0.0)
        av = tl.load(ab + t64 * sal, mask=m, other=1.0)
        if HAS_RESET:
            rr = tl.load(rb + t64 * srl, mask=t < L, other=0)
            av = tl.where(rr != 0, 0.0, av)
        avs = avs + (av,)
        xs = xs + (xv,)
    return avs, xs


@triton.jit
def _rows_map(avs, xs, p, s, BLOCK_T: tl.constexpr):
    """(p, s) followed by the rows' steps s -> a'·s + x: one thread's channels through time."""
    for j in tl.static_range(BLOCK_T):
        av = avs[j].to(tl.float32)
        s = av * s + xs[j].to(tl.float32)
        p = p * av
    return p, s


@triton.jit
def _fwd_rows_store(hb, t0, cmask, L, shl, avs, xs, h, BLOCK_T: tl.constexpr):
    for j in tl.static_range(BLOCK_T):
        h = avs[j].to(tl.float32) * h + xs[j].to(tl.float32)
        t = t0 + j
        tl.store(hb + t.to(tl.int64) * shl, h.to(hb.dtype.element_ty), mask=cmask & (_steps(t, cmask) < L))
    return h


@triton.jit
def _rglru_fwd_lb_kernel(x_ptr, a_ptr, init_ptr, reset_ptr, h_ptr, fin_ptr, ws_ptr, ctr_ptr,
                         L, C, n_cols, n_cb, n_chunks,
                         sxb, sxl, sab, sal, sib, srb, srl, shb, shl,
                         HAS_INIT: tl.constexpr, HAS_RESET: tl.constexpr, LOOKBACK: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                         TILES: tl.constexpr, WINDOW: tl.constexpr, NUM_STAGES: tl.constexpr,
                         TICKET: tl.constexpr, INCL_EVERY: tl.constexpr):
    """One (time chunk of TILES·BLOCK_T steps, batch, channel block) per program; x, a read once.

    The chunk's map h_end = P·h_in + S is computed from the chunk alone and published (ws), the
    state entering the chunk is obtained by looking back at the predecessors' published maps
    (_lookback), the inclusive state P·h_in + S is published (as P = 0, S = state), then h is
    written: from registers when the chunk is one tile (TILES=1), else by a second walk over the
    chunk (its x, a come again, from L1/L2). In-chunk scan: ROWS=False tl.associative_scan over
    (BLOCK_T, BLOCK_C) tiles; ROWS=True BLOCK_T rows of (BLOCK_C,) loaded at once and walked one
    step at a time (each thread carries its channels; no cross-thread exchange).
    Chunks are handed out in chunk-major order (a chunk's predecessor is n_cols programs earlier).
    TICKET=True takes the order from an atomic counter, so every predecessor is a program that
    already runs and waiting on it cannot deadlock whatever order the hardware starts blocks in;
    TICKET=False uses the program id (CUB's choice: relies on blocks starting in id order).
    LOOKBACK=False (one chunk) uses program ids and no workspace."""
    tid = tl.program_id(0)
    if LOOKBACK:
        if TICKET:
            tid = tl.atomic_add(ctr_ptr, 1)
    k = tid // n_cols
    col = tid - k * n_cols
    b = (col // n_cb).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    c = (col % n_cb) * BLOCK_C + cc
    cmask = c < C
    rows = tl.arange(0, BLOCK_T)
    t_start = k * (BLOCK_T * TILES)
    xb = x_ptr + b * sxb + c
    ab = a_ptr + b * sab + c
    hb = h_ptr + b * shb + c
    rb = reset_ptr + b * srb
    # 1) the chunk's map h_end = p·h_in + s
    p = tl.full((BLOCK_C,), 1.0, tl.float32)
    s = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if TILES == 1:
        if ROWS:
            avs, xs = _fwd_rows_load(xb, ab, rb, t_start, cmask, L, sxl, sal, srl, HAS_RESET, BLOCK_T)
            p, s = _rows_map(avs, xs, p, s, BLOCK_T)
        else:
            acum, xcum = _fwd_tile(xb, ab, rb, t_start, rows, cmask, L, sxl, sal, srl, HAS_RESET)
            p, s = _last_rows(acum, xcum, rows, BLOCK_T)
    else:
        for i in tl.range(0, TILES, num_stages=NUM_STAGES):
            if ROWS:
                avs, xs = _fwd_rows_load(xb, ab, rb, t_start + i * BLOCK_T, cmask, L, sxl, sal, srl, HAS_RESET,
                                         BLOCK_T)
                p, s = _rows_map(avs, xs, p, s, BLOCK_T)
            else:
                acum, xcum = _fwd_tile(xb, ab, rb, t_start + i * BLOCK_T, rows, cmask, L, sxl, sal, srl, HAS_RESET)
                pa, sx = _last_rows(acum, xcum, rows, BLOCK_T)
                s = pa * s + sx
                p = p * pa
    # 2) the state entering the chunk
    if HAS_INIT:
        carry = tl.load(init_ptr + b * sib + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_C,), dtype=tl.float32)
    carry, h_end = _chain_chunk(ws_ptr, col * n_chunks, k, n_chunks, cc, cmask, p, s, carry, BLOCK_C, WINDOW,
                                LOOKBACK, INCL_EVERY)
    if k == n_chunks - 1:
        tl.store(fin_ptr + b * C + c, h_end, mask=cmask)  # fp32, allocated contiguous (B, C)
    # 3) h
    if TILES == 1:
        if ROWS:
            _fwd_rows_store(hb, t_start, cmask, L, shl, avs, xs, carry, BLOCK_T)
        else:
            _store_tile(hb, t_start, rows, cmask, L, shl, acum * carry[None, :] + xcum)
    else:
        for i in tl.range(0, TILES, num_stages=NUM_STAGES):
            t0 = t_start + i * BLOCK_T
            if ROWS:
                avs, xs = _fwd_rows_load(xb, ab, rb, t0, cmask, L, sxl, sal, srl, HAS_RESET, BLOCK_T)
                carry = _fwd_rows_store(hb, t0, cmask, L, shl, avs, xs, carry, BLOCK_T)
            else:
                acum, xcum = _fwd_tile(xb, ab, rb, t0, rows, cmask, L, sxl, sal, srl, HAS_RESET)
                h = acum * carry[None, :] + xcum
                _store_tile(hb, t0, rows, cmask, L, shl, h)
                carry = _last_row(h, rows, BLOCK_T)


# --- backward pieces ------------------------------------------------------------------------------
@triton.jit
def _bwd_tile(ab, rb, db, t0, rows, cmask, L, sal, srl, sdl, HAS_RESET: tl.constexpr, BLOCK_T: tl.constexpr):
    """Time-reversed (BLOCK_T, BLOCK_C) tile whose row 0 is step t0 + BLOCK_T - 1, scanned from g = 0:
    (prod a'_{t+1}, g) per row. Rows t >= L get dh = 0 and coefficient 1."""
    t = t0 + (BLOCK_T - 1) - rows
    tmask = t < L
    m = tmask[:, None] & cmask[None, :]
    t64 = t.to(tl.int64)[:, None]
    dy = tl.load(db[None, :] + t64 * sdl, mask=m, other=0.0).to(tl.float32)
    # coefficient carrying g_{t+1} into g_t: a'_{t+1}; 1 at t = L-1 and on padded rows
    nmask = (t + 1) < L
    an = tl.load(ab[None, :] + (t64 + 1) * sal, mask=nmask[:, None] & cmask[None, :], other=1.0).to(tl.float32)
    if HAS_RESET:
        rn = tl.load(rb + (t.to(tl.int64) + 1) * srl, mask=nmask, other=0)
        an = tl.where((rn != 0)[:, None], 0.0, an)
    return tl.associative_scan((an, dy), 0, _lin_combine)


@triton.jit
def _hprev(hb, i0, rb, t, tmask, m1, shl, srl, HAS_INIT: tl.constexpr, HAS_RESET: tl.constexpr):
    """h_{t-1} for steps t (a tile's (BLOCK_T, 1) column or a (BLOCK_C,) vector of one step): the
    saved output, the initial state i0 at t = 0, 0 where reset[t]. m1: t < L, t >= 1 and channel
    mask (full shape); tmask: t < L (shape of t)."""
    t64 = t.to(tl.int64)
    hp = tl.load(hb + (t64 - 1) * shl, mask=m1, other=0.0).to(tl.float32)
    if HAS_INIT:
        hp = tl.where(t == 0, i0, hp)
    if HAS_RESET:
        r = tl.load(rb + t64 * srl, mask=tmask, other=0)
        hp = tl.where(r != 0, 0.0, hp)
    return hp


@triton.jit
def _bwd_store(dxb, dab, t, m, C, g, hp):
    # dx_t = g_t, da_t = g_t·h_{t-1}; dx, da allocated contiguous (B, L, C)
    t64 = t.to(tl.int64)
    tl.store(dxb + t64 * C, g.to(dxb.dtype.element_ty), mask=m)
    tl.store(dab + t64 * C, (g * hp).to(dab.dtype.element_ty), mask=m)


@triton.jit
def _bwd_tile_hprev(hb, i0, rb, t0, rows, cmask, L, shl, srl, HAS_INIT: tl.constexpr, HAS_RESET: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    t = t0 + (BLOCK_T - 1) - rows
    m1 = ((t < L) & (t >= 1))[:, None] & cmask[None, :]
    return _hprev(hb[None, :], i0[None, :], rb, t[:, None], (t < L)[:, None], m1, shl, srl, HAS_INIT, HAS_RESET)


@triton.jit
def _bwd_tile_store(dxb, dab, t0, rows, cmask, L, C, g, hp, BLOCK_T: tl.constexpr):
    t = t0 + (BLOCK_T - 1) - rows
    _bwd_store(dxb[None, :], dab[None, :], t[:, None], (t < L)[:, None] & cmask[None, :], C, g, hp)


@triton.jit
def _bwd_rows_load(ab, rb, db, t_hi, cmask, L, sal, srl, sdl, HAS_RESET: tl.constexpr, BLOCK_T: tl.constexpr):
    """Steps t_hi, t_hi-1, .. t_hi-BLOCK_T+1 as tuples of (BLOCK_C,) rows (a'_{t+1}, dh_t), all
    loads issued before any use; a'_{t+1} = 1 at t = L-1, dh = 0 on padded rows t >= L."""
    ans = ()
    dys = ()
    for j in tl.static_range(BLOCK_T):
        t = t_hi - j
        tv = _steps(t, cmask)
        t64 = t.to(tl.int64)
        dy = tl.load(db + t64 * sdl, mask=cmask & (tv < L), other=0.0)
        an = tl.load(ab + (t64 + 1) * sal, mask=cmask & (tv + 1 < L), other=1.0)
        if HAS_RESET:
            rn = tl.load(rb + (t64 + 1) * srl, mask=t + 1 < L, other=0)
            an = tl.where(rn != 0, 0.0, an)
        ans = ans + (an,)
        dys = dys + (dy,)
    return ans, dys


@triton.jit
def _bwd_rows_hprev(hb, i0, rb, t_hi, cmask, L, shl, srl, HAS_INIT: tl.constexpr, HAS_RESET: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    hps = ()
    for j in tl.static_range(BLOCK_T):
        t = t_hi - j
        tv = _steps(t, cmask)
        hps = hps + (_hprev(hb, i0, rb, tv, tv < L, cmask & (tv < L) & (tv >= 1), shl, srl, HAS_INIT, HAS_RESET),)
    return hps


@triton.jit
def _bwd_rows_store(dxb, dab, t_hi, cmask, L, C, ans, dys, hps, g, BLOCK_T: tl.constexpr):
    for j in tl.static_range(BLOCK_T):
        g = ans[j].to(tl.float32) * g + dys[j].to(tl.float32)
        t = t_hi - j
        _bwd_store(dxb, dab, t, cmask & (_steps(t, cmask) < L), C, g, hps[j])
    return g


@triton.jit
def _rglru_bwd_lb_kernel(a_ptr, h_ptr, init_ptr, reset_ptr, dh_ptr, dfin_ptr, dx_ptr, da_ptr, dinit_ptr,
                         ws_ptr, ctr_ptr, L, C, n_cols, n_cb, n_chunks,
                         sab, sal, shb, shl, sib, srb, srl, sdb, sdl, sfb,
                         HAS_INIT: tl.constexpr, HAS_DFIN: tl.constexpr, HAS_RESET: tl.constexpr,
                         LOOKBACK: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_C: tl.constexpr, TILES: tl.constexpr, WINDOW: tl.constexpr,
                         NUM_STAGES: tl.constexpr, TICKET: tl.constexpr, INCL_EVERY: tl.constexpr, HP_EARLY: tl.constexpr):
    """The backward recurrence g_t = dh_t + a'_{t+1}·g_{t+1} as _rglru_fwd_lb_kernel does the forward:
    scan order runs from the last time chunk (k = 0, carry-in d final_state) to the first.
    HP_EARLY (one tile a chunk): h_{t-1} (for da) is loaded before the look-back, so its latency
    overlaps the wait, at the price of registers held across it."""
    tid = tl.program_id(0)
    if LOOKBACK:
        if TICKET:
            tid = tl.atomic_add(ctr_ptr, 1)
    k = tid // n_cols
    col = tid - k * n_cols
    b = (col // n_cb).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    c = (col % n_cb) * BLOCK_C + cc
    cmask = c < C
    rows = tl.arange(0, BLOCK_T)
    CHUNK: tl.constexpr = BLOCK_T * TILES
    t_start = (n_chunks - 1 - k) * CHUNK
    ab = a_ptr + b * sab + c
    hb = h_ptr + b * shb + c
    db = dh_ptr + b * sdb + c
    rb = reset_ptr + b * srb
    dxb = dx_ptr + b * L * C + c     # dx, da: allocated contiguous (B, L, C)
    dab = da_ptr + b * L * C + c
    if HAS_INIT:
        i0 = tl.load(init_ptr + b * sib + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        i0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    # 1) the chunk's map g_start = p·g_in + s
    p = tl.full((BLOCK_C,), 1.0, tl.float32)
    s = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if TILES == 1:
        if ROWS:
            ans, dys = _bwd_rows_load(ab, rb, db, t_start + CHUNK - 1, cmask, L, sal, srl, sdl, HAS_RESET, BLOCK_T)
            if HP_EARLY:
                hps = _bwd_rows_hprev(hb, i0, rb, t_start + CHUNK - 1, cmask, L, shl, srl, HAS_INIT, HAS_RESET,
                                      BLOCK_T)
            p, s = _rows_map(ans, dys, p, s, BLOCK_T)
        else:
            gcum_a, gcum = _bwd_tile(ab, rb, db, t_start, rows, cmask, L, sal, srl, sdl, HAS_RESET, BLOCK_T)
            if HP_EARLY:
                hp = _bwd_tile_hprev(hb, i0, rb, t_start, rows, cmask, L, shl, srl, HAS_INIT, HAS_RESET, BLOCK_T)
            p, s = _last_rows(gcum_a, gcum, rows, BLOCK_T)
    else:
        for i in tl.range(0, TILES, num_stages=NUM_STAGES):
            t0 = t_start + (TILES - 1 - i) * BLOCK_T
            if ROWS:
                ans, dys = _bwd_rows_load(ab, rb, db, t0 + BLOCK_T - 1, cmask, L, sal, srl, sdl, HAS_RESET, BLOCK_T)
                p, s = _rows_map(ans, dys, p, s, BLOCK_T)
            else:
                gcum_a, gcum = _bwd_tile(ab, rb, db, t0, rows, cmask, L, sal, srl, sdl, HAS_RESET, BLOCK_T)
                pa, sg = _last_rows(gcum_a, gcum, rows, BLOCK_T)
                s = pa * s + sg
                p = p * pa
    # 2) g entering the chunk from later time (d final_state for the last chunk)
    if HAS_DFIN:
        carry = tl.load(dfin_ptr + b * sfb + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_C,), dtype=tl.float32)
    carry, g_start = _chain_chunk(ws_ptr, col * n_chunks, k, n_chunks, cc, cmask, p, s, carry, BLOCK_C, WINDOW,
                                  LOOKBACK, INCL_EVERY)
    if HAS_INIT:
        if k == n_chunks - 1:
            # d h_{-1} = a'_0 · g_0 (L >= 1 is guaranteed by the launcher)
            a0 = tl.load(ab, mask=cmask, other=0.0).to(tl.float32)
            if HAS_RESET:
                a0 = tl.where(tl.load(rb) != 0, 0.0, a0)
            tl.store(dinit_ptr + b * C + c, (a0 * g_start).to(dinit_ptr.dtype.element_ty), mask=cmask)
    # 3) dx, da
    if TILES == 1:
        if ROWS:
            if not HP_EARLY:
                hps = _bwd_rows_hprev(hb, i0, rb, t_start + CHUNK - 1, cmask, L, shl, srl, HAS_INIT, HAS_RESET,
                                      BLOCK_T)
            _bwd_rows_store(dxb, dab, t_start + CHUNK - 1, cmask, L, C, ans, dys, hps, carry, BLOCK_T)
        else:
            if not HP_EARLY:
                hp = _bwd_tile_hprev(hb, i0, rb, t_start, rows, cmask, L, shl, srl, HAS_INIT, HAS_RESET, BLOCK_T)
            _bwd_tile_store(dxb, dab, t_start, rows, cmask, L, C, gcum_a * carry[None, :] + gcum, hp, BLOCK_T)
    else:
        for i in tl.range(0, TILES, num_stages=NUM_STAGES):
            t0 = t_start + (TILES - 1 - i) * BLOCK_T
            if ROWS:
                ans, dys = _bwd_rows_load(ab, rb, db, t0 + BLOCK_T - 1, cmask, L, sal, srl, sdl, HAS_RESET, BLOCK_T)
                hps = _bwd_rows_hprev(hb, i0, rb, t0 + BLOCK_T - 1, cmask, L, shl, srl, HAS_INIT, HAS_RESET, BLOCK_T)
                carry = _bwd_rows_store(dxb, dab, t0 + BLOCK_T - 1, cmask, L, C, ans, dys, hps, carry, BLOCK_T)
            else:
                gcum_a, gcum = _bwd_tile(ab, rb, db, t0, rows, cmask, L, sal, srl, sdl, HAS_RESET, BLOCK_T)
                g = gcum_a * carry[None, :] + gcum
                hp = _bwd_tile_hprev(hb, i0, rb, t0, rows, cmask, L, shl, srl, HAS_INIT, HAS_RESET, BLOCK_T)
                _bwd_tile_store(dxb, dab, t0, rows, cmask, L, C, g, hp, BLOCK_T)
                # the last row of the reversed tile is t = t0 (always valid): g_{t0} carries on
                carry = _last_row(g, rows, BLOCK_T)


# ------------------------------------------------------------------------------------------------
# launch helpers
# ------------------------------------------------------------------------------------------------
# Tunables (module-level so a benchmark can sweep them; benchmarks/rglru_probe.py times the choices).
# * "fwd_path" / "bwd_path": "lookback" (_rglru_fwd_lb_kernel / _rglru_bwd_lb_kernel: one pass over
#   time chunks, x, a read once at any B, L) or "single" (_rglru_fwd_kernel / _rglru_bwd_kernel).
# * "lb_fwd" / "lb_bwd" (look-back kernels): tiles of block_t steps × block_c channels, `tiles` tiles a
#   chunk (1: the chunk stays in registers; more: h is computed by a second walk over the chunk),
#   rows=True walks the chunk one step at a time (block_t steps unrolled; each thread carries its own
#   channels, no tl.associative_scan), window = predecessors read at once by the look-back, stages =
#   tl.range pipelining of the chunk loops (tiles > 1 or rows), ticket = chunk order from an atomic
#   counter (safe) instead of the program id; bwd only: hp_early = load h_{t-1} before the look-back.
#   Optional "inclusive_every" (tests only, default 1): only chunks k ≡ 0 mod it publish their
#   inclusive state, so look-backs walk through aggregates even when programs run one by one.
#   Defaults: a guess until the probe has run — 64 × 64 tiles (128-byte rows: whole cache lines,
#   where the single path's 16-channel tiles fetch 32-byte pieces; 4 warps; 128 registers with
#   triton 3.9: 4 programs an SM), window 8 (a look-back at L = 16384, B = 1 has ~13 chunk
#   generations in flight before it), ticket.
# * single-pass path, chosen on an H100 (bf16, triton 3.6): (BLOCK_T, BLOCK_C) = (128, 16) with a
#   2-stage pipelined time loop reached 1.5 TB/s forward and 2.1 TB/s backward at B·L·C = 4·4096·2560
#   (a copy: 2.9 TB/s); at 1·2048·2560 (160 programs) BLOCK_T = 256 gave 0.93 / 1.14 TB/s. Its
#   two-pass chunking (x, a read twice) was slower at both sizes, so it is only used when there are
#   fewer than chunk_below_per_sm · SMs programs (tiny B·C), aiming at ~2 programs per SM.
# Defaults from the H100 probe of 2026-11-22 (benchmarks/results/rglru_probe_h100.json; bf16, C = 2560,
# 16384 tokens a call): forward = "rows_t8c64x8w1" (best worst-case over L = 512 … 16k: 2.25 × floor),
# backward = "lb_t64c32w2" (fwd+bwd ≤ 1.88 × floor at every L).
_TUNE = {"fwd_path": "lookback", "bwd_path": "lookback",
         "lb_fwd": {"block_t": 8, "block_c": 64, "tiles": 8, "rows": True, "window": 2, "num_warps": 1,
                    "stages": 2, "ticket": True},
         "lb_bwd": {"block_t": 64, "block_c": 32, "tiles": 1, "rows": False, "window": 8, "num_warps": 2,
                    "stages": 1, "ticket": True, "hp_early": False},
         "block_t": 128, "block_t_small": 256, "block_c": 16, "num_warps": 4, "stages": 2,
         "chunk_below_per_sm": 0.5, "min_chunk": 256, "force_chunks": None}


def _rows_unit_stride(t: Tensor) -> Tensor:
    """Kernels need a unit channel stride only (batch/time strides are passed in)."""
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _num_sms_cached(device_type: str, index: Optional[int]) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else 0).multi_processor_count
    return 1  # interpreter: few programs


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    return _num_sms_cached(device.type, index)


def _plan_single(Bsz: int, L: int, C: int, device: torch.device):
    """Single-pass path -> BLOCK_T, BLOCK_C, chunk_len, n_chunks."""
    sms = _num_sms(device)
    BLOCK_C = min(_TUNE["block_c"], max(16, triton.next_power_of_2(max(C, 1))))
    progs = Bsz * triton.cdiv(C, BLOCK_C)
    # fewer programs -> longer tiles: more bytes in flight per program
    block_t = _TUNE["block_t"] if progs >= 2 * sms else _TUNE["block_t_small"]
    BLOCK_T = min(block_t, max(16, triton.next_power_of_2(max(L, 1))))
    n_chunks = _TUNE["force_chunks"]
    if n_chunks is None:
        n_chunks = 1
        if progs < _TUNE["chunk_below_per_sm"] * sms:
            n_chunks = min(triton.cdiv(2 * sms, progs), triton.cdiv(L, _TUNE["min_chunk"]))
    n_chunks = max(1, min(n_chunks, triton.cdiv(L, BLOCK_T)))
    chunk_len = triton.cdiv(triton.cdiv(max(L, 1), n_chunks), BLOCK_T) * BLOCK_T
    n_chunks = max(1, triton.cdiv(L, chunk_len))
    return BLOCK_T, BLOCK_C, chunk_len, n_chunks


def _plan_lookback(Bsz: int, L: int, C: int, which: str) -> dict:
    """Look-back path: launch parameters of _rglru_{fwd,bwd}_lb_kernel (grid: n_cols · n_chunks)."""
    cfg = _TUNE[f"lb_{which}"]
    rows = bool(cfg["rows"])
    BLOCK_C = min(cfg["block_c"], max(16, triton.next_power_of_2(max(C, 1))))
    # rows: block_t is an unroll count; tiles: at least 16 rows (tiny L only)
    BLOCK_T = min(cfg["block_t"], triton.next_power_of_2(max(L, 1)) if rows else
                  max(16, triton.next_power_of_2(max(L, 1))))
    tiles = max(1, min(cfg["tiles"], triton.cdiv(max(L, 1), BLOCK_T)))
    n_chunks = triton.cdiv(max(L, 1), BLOCK_T * tiles)
    n_cb = triton.cdiv(C, BLOCK_C)
    return {"path": "lookback", "BLOCK_T": BLOCK_T, "BLOCK_C": BLOCK_C, "TILES": tiles, "ROWS": rows,
            "WINDOW": cfg["window"], "NUM_STAGES": cfg["stages"], "num_warps": cfg["num_warps"],
            "TICKET": bool(cfg.get("ticket", True)), "HP_EARLY": bool(cfg.get("hp_early", False)),
            "INCL_EVERY": int(cfg.get("inclusive_every", 1)),
            "n_chunks": n_chunks, "n_cb": n_cb, "n_cols": Bsz * n_cb}


def _plan(Bsz: int, L: int, C: int, device: torch.device, which: str = "fwd") -> dict:
    """Which kernel and how (which: "fwd" | "bwd"): {"path": "lookback", ...} or {"path": "single",
    "BLOCK_T", "BLOCK_C", "chunk_len", "n_chunks"}."""
    if _TUNE[f"{which}_path"] == "lookback":
        return _plan_lookback(Bsz, L, C, which)
    if _TUNE[f"{which}_path"] != "single":
        raise ValueError(f"_TUNE['{which}_path'] must be 'lookback' or 'single', got {_TUNE[f'{which}_path']!r}")
    BLOCK_T, BLOCK_C, chunk_len, n_chunks = _plan_single(Bsz, L, C, device)
    return {"path": "single", "BLOCK_T": BLOCK_T, "BLOCK_C": BLOCK_C, "chunk_len": chunk_len, "n_chunks": n_chunks}


def _launch_opts():
    return {"NUM_STAGES": _TUNE["stages"], "num_warps": _TUNE["num_warps"]}


def _reset_args(reset: Optional[Tensor], x: Tensor):
    if reset is None:
        return x, 0, 0
    if reset.dtype == torch.bool:
        reset = reset.view(torch.uint8)  # zero-copy reinterpretation: byte loads
    return reset, reset.stride(0), reset.stride(1)


def _chunk_carries(sums: Tensor, carry0: Optional[Tensor], reverse: bool, BLOCK_C: int) -> Tensor:
    """(B, n_chunks, 2, C) chunk maps -> (B, n_chunks, C) states entering each chunk."""
    Bsz, n_chunks, _, C = sums.shape
    cin = torch.empty(Bsz, n_chunks, C, device=sums.device, dtype=torch.float32)
    _rglru_carry_kernel[(Bsz, triton.cdiv(C, BLOCK_C))](
        sums, carry0 if carry0 is not None else sums, cin, n_chunks, C,
        carry0.stride(0) if carry0 is not None else 0,
        HAS_CARRY0=carry0 is not None, REVERSE=reverse, BLOCK_C=BLOCK_C, num_warps=1)
    return cin


def _lb_workspace(plan: dict, device: torch.device):
    """-> (ws, ctr, lookback, grid, kernel kwargs). ws: one int64 word per (column, chunk, channel),
    zeroed (= nothing published) by the allocation, a device-side memset (capturable); ctr: the
    ticket counter (int32) after it. One chunk: no look-back, no workspace."""
    lookback = plan["n_chunks"] > 1
    n = plan["n_cols"] * plan["n_chunks"] * plan["BLOCK_C"] if lookback else 0
    ws = (torch.zeros if lookback else torch.empty)(n + 2, device=device, dtype=torch.int64)
    ctr = ws[n:].view(torch.int32)
    kw = {k: plan[k] for k in ("ROWS", "BLOCK_T", "BLOCK_C", "TILES", "WINDOW", "NUM_STAGES", "TICKET",
                               "INCL_EVERY", "num_warps")}
    return ws, ctr, lookback, (plan["n_cols"] * plan["n_chunks"],), kw


def _fwd_impl(x: Tensor, a: Tensor, initial_state: Optional[Tensor], reset: Optional[Tensor]):
    if x.dim() != 3 or a.shape != x.shape:
        raise ValueError(f"x and a must both be (B, L, C), got {tuple(x.shape)} and {tuple(a.shape)}")
    Bsz, L, C = x.shape
    x, a = _rows_unit_stride(x), _rows_unit_stride(a)
    h = torch.empty(Bsz, L, C, device=x.device, dtype=x.dtype)
    final = torch.empty(Bsz, C, device=x.device, dtype=torch.float32)
    if Bsz * C == 0:
        return h, final
    if L == 0:
        if initial_state is None:
            final.zero_()
        else:
            final.copy_(initial_state)
        return h, final
    init = _rows_unit_stride(initial_state) if initial_state is not None else None
    rs, srb, srl = _reset_args(reset, x)
    plan = _plan(Bsz, L, C, x.device, "fwd")
    if plan["path"] == "lookback":
        ws, ctr, lookback, grid, kw = _lb_workspace(plan, x.device)
        _rglru_fwd_lb_kernel[grid](
            x, a, init if init is not None else x, rs, h, final, ws, ctr,
            L, C, plan["n_cols"], plan["n_cb"], plan["n_chunks"],
            x.stride(0), x.stride(1), a.stride(0), a.stride(1), init.stride(0) if init is not None else 0,
            srb, srl, h.stride(0), h.stride(1),
            HAS_INIT=init is not None, HAS_RESET=reset is not None, LOOKBACK=lookback, **kw)
        return h, final
    BLOCK_T, BLOCK_C, chunk_len, n_chunks = (plan[k] for k in ("BLOCK_T", "BLOCK_C", "chunk_len", "n_chunks"))
    grid = (Bsz, n_chunks, triton.cdiv(C, BLOCK_C))
    common = (L, C, chunk_len, n_chunks, x.stride(0), x.stride(1), a.stride(0), a.stride(1))
    if n_chunks == 1:
        carry, scb, scn = init, (init.stride(0) if init is not None else 0), 0
    else:
        sums = torch.empty(Bsz, n_chunks, 2, C, device=x.device, dtype=torch.float32)
        _rglru_fwd_kernel[grid](x, a, x, rs, h, final, sums, *common, 0, 0, srb, srl, 0, 0,
                                HAS_CARRY=False, HAS_RESET=reset is not None, SUMMARY=True,
                                BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, **_launch_opts())
        carry = _chunk_carries(sums, init, False, BLOCK_C)
        scb, scn = carry.stride(0), carry.stride(1)
    _rglru_fwd_kernel[grid](x, a, carry if carry is not None else x, rs, h, final, final, *common,
                            scb, scn, srb, srl, h.stride(0), h.stride(1),
                            HAS_CARRY=carry is not None, HAS_RESET=reset is not None, SUMMARY=False,
                            BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, **_launch_opts())
    return h, final


def _bwd_impl(a, h, initial_state, reset, dh, dfinal):
    Bsz, L, C = a.shape
    dx = torch.empty(Bsz, L, C, device=a.device, dtype=h.dtype)
    da = torch.empty(Bsz, L, C, device=a.device, dtype=a.dtype)
    idtype = initial_state.dtype if initial_state is not None else torch.float32
    # only returned to autograd when initial_state exists, and then fully written: no memset
    dinit = torch.empty(Bsz, C, device=a.device, dtype=idtype)
    if Bsz * C == 0:
        return dx, da, dinit
    if L == 0:
        if dfinal is not None:
            dinit.copy_(dfinal)
        else:
            dinit.zero_()
        return dx, da, dinit
    a, h, dh = _rows_unit_stride(a), _rows_unit_stride(h), _rows_unit_stride(dh)
    init = _rows_unit_stride(initial_state) if initial_state is not None else None
    dfin = _rows_unit_stride(dfinal) if dfinal is not None else None
    rs, srb, srl = _reset_args(reset, a)
    plan = _plan(Bsz, L, C, a.device, "bwd")
    if plan["path"] == "lookback":
        ws, ctr, lookback, grid, kw = _lb_workspace(plan, a.device)
        _rglru_bwd_lb_kernel[grid](
            a, h, init if init is not None else a, rs, dh, dfin if dfin is not None else a, dx, da, dinit, ws, ctr,
            L, C, plan["n_cols"], plan["n_cb"], plan["n_chunks"],
            a.stride(0), a.stride(1), h.stride(0), h.stride(1), init.stride(0) if init is not None else 0,
            srb, srl, dh.stride(0), dh.stride(1), dfin.stride(0) if dfin is not None else 0,
            HAS_INIT=init is not None, HAS_DFIN=dfin is not None, HAS_RESET=reset is not None,
            LOOKBACK=lookback, HP_EARLY=plan["HP_EARLY"], **kw)
        return dx, da, dinit
    BLOCK_T, BLOCK_C, chunk_len, n_chunks = (plan[k] for k in ("BLOCK_T", "BLOCK_C", "chunk_len", "n_chunks"))
    grid = (Bsz, n_chunks, triton.cdiv(C, BLOCK_C))
    common = (L, C, chunk_len, n_chunks, a.stride(0), a.stride(1), h.stride(0), h.stride(1),
              init.stride(0) if init is not None else 0, srb, srl, dh.stride(0), dh.stride(1))
    init_arg = init if init is not None else a
    if n_chunks == 1:
        carry, scb, scn = dfin, (dfin.stride(0) if dfin is not None else 0), 0
    else:
        sums = torch.empty(Bsz, n_chunks, 2, C, device=a.device, dtype=torch.float32)
        _rglru_bwd_kernel[grid](a, h, init_arg, rs, dh, a, dx, da, dinit, sums, *common, 0, 0,
                                HAS_INIT=init is not None, HAS_RESET=reset is not None, HAS_CARRY=False,
                                SUMMARY=True, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, **_launch_opts())
        carry = _chunk_carries(sums, dfin, True, BLOCK_C)
        scb, scn = carry.stride(0), carry.stride(1)
    _rglru_bwd_kernel[grid](a, h, init_arg, rs, dh, carry if carry is not None else a, dx, da, dinit, dinit,
                            *common, scb, scn,
                            HAS_INIT=init is not None, HAS_RESET=reset is not None,
                            HAS_CARRY=carry is not None, SUMMARY=False, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
                            **_launch_opts())
    return dx, da, dinit


def _step_impl(x: Tensor, a: Tensor, state: Tensor) -> Tensor:
    Bsz, C = x.shape
    x, a = _rows_unit_stride(x), _rows_unit_stride(a)
    h = torch.empty_like(x)
    BLOCK_C = min(1024, triton.next_power_of_2(max(C, 1)))
    _rglru_step_kernel[(Bsz, triton.cdiv(C, BLOCK_C))](
        x, a, state, h, C, x.stride(0), a.stride(0), state.stride(0), state.stride(1), h.stride(0),
        BLOCK_C=BLOCK_C, num_warps=4, **pdl_launch(x.device))
    return h


# ------------------------------------------------------------------------------------------------
# torch.library registration (torch.compile) and the eager autograd.Function
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("hybridize::rglru_scan_fwd", mutates_args=())
def _rglru_scan_fwd_op(x: Tensor, a: Tensor, initial_state: Optional[Tensor],
                       reset: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return _fwd_impl(x, a, initial_state, reset)


@_rglru_scan_fwd_op.register_fake
def _(x, a, initial_state, reset):
    Bsz, L, C = x.shape
    return x.new_empty(Bsz, L, C), x.new_empty(Bsz, C, dtype=torch.float32)


@torch.library.custom_op("hybridize::rglru_scan_bwd", mutates_args=())
def _rglru_scan_bwd_op(a: Tensor, h: Tensor, initial_state: Optional[Tensor], reset: Optional[Tensor],
                       dh: Tensor, dfinal: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(a, h, initial_state, reset, dh, dfinal)


@_rglru_scan_bwd_op.register_fake
def _(a, h, initial_state, reset, dh, dfinal):
    Bsz, L, C = a.shape
    idtype = initial_state.dtype if initial_state is not None else torch.float32
    return h.new_empty(Bsz, L, C), a.new_empty(Bsz, L, C), a.new_empty(Bsz, C, dtype=idtype)


def _setup_context(ctx, inputs, output):
    x, a, initial_state, reset = inputs
    ctx.save_for_backward(a, output[0], initial_state, reset)


def _backward(ctx, dh, dfinal, bwd):
    a, h, initial_state, reset = ctx.saved_tensors
    if dh is None:  # only the final state was used
        dh = torch.zeros_like(h)
    dx, da, dinit = bwd(a, h, initial_state, reset, dh, dfinal)
    return dx, da, (dinit if initial_state is not None else None), None


_rglru_scan_fwd_op.register_autograd(
    lambda ctx, dh, dfinal: _backward(ctx, dh, dfinal, torch.ops.hybridize.rglru_scan_bwd),
    setup_context=_setup_context)


class _RGLRUScanFn(torch.autograd.Function):
    """Eager path: the same kernels without custom_op's Python dispatch (~100-200 us a call)."""

    @staticmethod
    def forward(ctx, x, a, initial_state, reset):
        out = _fwd_impl(x, a, initial_state, reset)
        _setup_context(ctx, (x, a, initial_state, reset), out)
        return out

    @staticmethod
    def backward(ctx, dh, dfinal):
        return _backward(ctx, dh, dfinal, _bwd_impl)


@torch.library.custom_op("hybridize::rglru_step", mutates_args=("state",))
def _rglru_step_op(x: Tensor, a: Tensor, state: Tensor) -> Tensor:
    return _step_impl(x, a, state)


@_rglru_step_op.register_fake
def _(x, a, state):
    return torch.empty_like(x)


# ------------------------------------------------------------------------------------------------
# public API (same signatures as the reference)
# ------------------------------------------------------------------------------------------------
def rglru_scan_triton(x: Tensor, a: Tensor, *, initial_state: Optional[Tensor] = None,
                      reset: Optional[Tensor] = None, return_final_state: bool = True):
    """x, a: (B, L, C); initial_state: (B, C) (fp32 recommended); reset: (B, L) bool.

    Returns h (B, L, C) in x's dtype and, if requested, the final state (B, C) in fp32.
    Differentiable in x, a and initial_state. Under torch.compile this is the custom op
    torch.ops.hybridize.rglru_scan_fwd; in eager mode an autograd.Function around the same launches.
    """
    if torch.compiler.is_compiling():
        h, final = torch.ops.hybridize.rglru_scan_fwd(x, a, initial_state, reset)
    else:
        h, final = _RGLRUScanFn.apply(x, a, initial_state, reset)
    return (h, final) if return_final_state else h


def rglru_step_triton(x: Tensor, a: Tensor, state: Tensor) -> Tensor:
    """One step: x, a: (B, C); state (B, C) (any strides) updated in place. Returns h in x's dtype.
    No host synchronisation: capturable in a CUDA graph."""
    if x.dim() != 2 or a.shape != x.shape or state.shape != x.shape:
        raise ValueError("x, a and state must all be (B, C)")
    if torch.compiler.is_compiling():
        return torch.ops.hybridize.rglru_step(x, a, state)
    return _step_impl(x, a, state)


__all__ = ["rglru_scan_triton", "rglru_step_triton"]
