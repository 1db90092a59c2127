"""Triton "skinny" GEMM for batched decode: y (M, N) = x (M, K) · W (N, K)ᵀ (+ b) with few rows (M ≤ 128).

Why: a decode step at batch 8-64 multiplies a handful of rows by every weight matrix, so it is bound by
reading W once (arithmetic intensity M FLOP / byte, far below an H100's ~300). cuBLAS' kernels for these
shapes pick tiles made for large M: for a 2048-row W only a few dozen CTAs stream the weight and most SMs
idle. Here the weight is the MMA's left operand (swap-AB: acc (BLOCK_N, BLOCK_M) = W_tile · x_tileᵀ, so the
tiny M is the MMA's N dimension), each program streams BLOCK_N rows of W (evict-first: read once per step),
and the (tile, K tile) iterations are shared out stream-K style: whole tiles, split-K, or the same number
of iterations for every SM whatever the shape (a 5 152-row weight has 81 tiles of 64 rows for 132 SMs).
A split tile's fp32 parts are summed in a fixed order by whichever of its programs arrives last (one
kernel, the same bits on every run: no atomics on the data), which then runs the epilogue. Configs are
tuned per shape against cuBLAS (`hybridize.ops.gemv.tune_shape` with rows > 1) and used only where they
win.

Tried and dropped: Mamba's conv step as an epilogue (its state read / shifted / written in the MMA tile's
layout): 21.9 vs 10.5 µs for the 1.2 B hybrid's in_proj at 64 rows (+ the separate ~2-3.5 µs conv kernel),
20.2 vs 9.2 µs with the norm at 8 rows (commit 60f0512, benchmarks/results/decode_b64_s9b_h100.json).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridize.ops._jit_helpers import glu_act, prefetch_l2
from hybridize.ops.pdl import pdl_launch


@triton.jit
def _dot(w, xt, acc, IEEE: tl.constexpr):
    if IEEE:        # fp32 weights: exact fp32 products (no TF32)
        return tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(w, xt.to(w.dtype), acc)


@triton.jit
def _epilogue(acc, acc2, rstd, rn, rm, N, M, Bias, Res, stride_rm, Y, stride_ym,
              HAS_BIAS: tl.constexpr, NORM_SCALAR: tl.constexpr, GLU: tl.constexpr, HAS_RES: tl.constexpr):
    """acc (BLOCK_N, BLOCK_M) fp32 dot products (acc2: the GLU's up rows) → y rows rm, columns rn."""
    nmask = rn < N
    mmask = rm < M
    if NORM_SCALAR:
        acc = acc * rstd[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    if GLU != 0:
        if NORM_SCALAR:
            acc2 = acc2 * rstd[None, :]
        if HAS_BIAS:
            acc2 += tl.load(Bias + N + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
        acc = glu_act(acc, GLU) * acc2
    mask = nmask[:, None] & mmask[None, :]
    if HAS_RES:
        acc += tl.load(Res + rm[None, :] * stride_rm + rn[:, None], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rm[None, :] * stride_ym + rn[:, None], acc.to(Y.dtype.element_ty), mask=mask)

@triton.jit
def _k_step(acc, acc2, ss, X, W, M, N, K, stride_xm, stride_wn, tile, k0,
            Add, stride_am, Hout, stride_hm, Gate, stride_gm, NormW, eps, norm_offset,
            EVEN_K: tl.constexpr, IEEE: tl.constexpr, HAS_ADD: tl.constexpr, HAS_GATE: tl.constexpr,
            NORM: tl.constexpr, NORM_GROUP: tl.constexpr, GLU: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K tile [k0, k0 + BLOCK_K) of `tile`: acc (BLOCK_N, BLOCK_M) += W[tile's rows, K tile] · u[:, K tile]ᵀ,
    where u is the prologue's input rows: h = round(x + add) (written by tile 0: the residual stream),
    h·silu(gate), RMSNorm weight (·(offset + w)), per group of NORM_GROUP channels inside the K tile, or —
    one rstd per row over all of K — scaled at the end from ss += the sum of squares of u. acc2: the GLU's
    up rows (rows [N, 2N) of W)."""
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    mmask = rm < M
    rn_safe = tl.where(nmask, rn, 0).to(tl.int64)                 # int64: the head's N·K exceeds 2³¹
    kk = k0 + rk
    kmask = kk < K
    xmask = mmask[:, None] & kmask[None, :]
    x = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=xmask, other=0.0)
    if HAS_ADD or HAS_GATE or NORM:
        x = x.to(tl.float32)
        if HAS_ADD:
            x = (x + tl.load(Add + rm[:, None] * stride_am + kk[None, :], mask=xmask, other=0.0).to(
                tl.float32)).to(X.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(Hout + rm[:, None] * stride_hm + kk[None, :], x, mask=xmask & ((rk * 0 + tile) == 0)[None, :])
            x = x.to(tl.float32)
        if HAS_GATE:
            z = tl.load(Gate + rm[:, None] * stride_gm + kk[None, :], mask=xmask, other=0.0).to(tl.float32)
            x = x * z * tl.sigmoid(z)
        if NORM:
            if NORM_GROUP == 0:
                ss += tl.sum(x * x, axis=1)
            else:       # whole groups in every tile (BLOCK_K % NORM_GROUP == 0, K % NORM_GROUP == 0)
                xg = tl.reshape(x, (BLOCK_M, BLOCK_K // NORM_GROUP, NORM_GROUP))
                rg = 1.0 / tl.sqrt(tl.sum(xg * xg, axis=2) / NORM_GROUP + eps)
                # padding lanes (K % BLOCK_K) form whole zero groups: 0 · rsqrt(0 + eps) is NaN at eps = 0
                x = tl.where(xmask, tl.reshape(xg * rg[:, :, None], (BLOCK_M, BLOCK_K)), 0.0)
            x = x * (tl.load(NormW + kk, mask=kmask, other=0.0).to(tl.float32) + norm_offset)[None, :]
    xt = tl.trans(x)
    w_ptrs = W + rn_safe[:, None] * stride_wn + kk[None, :]
    if EVEN_K:
        w = tl.load(w_ptrs, eviction_policy="evict_first")
    else:
        w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0, eviction_policy="evict_first")
    acc = _dot(w, xt, acc, IEEE)
    if GLU != 0:
        w2_ptrs = w_ptrs + N * stride_wn
        if EVEN_K:
            w2 = tl.load(w2_ptrs, eviction_policy="evict_first")
        else:
            w2 = tl.load(w2_ptrs, mask=kmask[None, :], other=0.0, eviction_policy="evict_first")
        acc2 = _dot(w2, xt, acc2, IEEE)
    return acc, acc2, ss


@triton.jit
def _part_slot(prog, tile, per, k_tiles):
    # a program holds parts of at most two tiles, its first (slot 2·prog) and its last (2·prog + 1); the tiles
    # in between are whole
    return 2 * prog + (tile != (prog * per) // k_tiles).to(tl.int32)


@triton.jit
def _finish_tile(acc, acc2, ss, tile, prog, first, n_seg, per, k_tiles, Part, SSq, Count, M, N, K, Bias, Res,
                 stride_rm, Y, stride_ym, eps, SEGMENTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 NORM_SCALAR: tl.constexpr, GLU: tl.constexpr, HAS_RES: tl.constexpr, MAXSEG: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program `prog`'s share of `tile` is done (acc, acc2, ss as `_k_step` sums them); programs first …
    first + n_seg - 1 share the tile. A whole tile goes straight to the epilogue; a part is stored (fp32),
    and the last of the tile's programs to arrive (a per-tile arrival counter) sums all parts in program
    order — the same bits whoever arrives last, no atomics on the data — then runs the epilogue and resets
    the counter for the next launch."""
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    done = n_seg == 1
    if SEGMENTED:
        if n_seg > 1:
            NP: tl.constexpr = 2 if GLU != 0 else 1
            TILE: tl.constexpr = BLOCK_N * BLOCK_M
            loc = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + rm[None, :]
            slot = _part_slot(prog, tile, per, k_tiles).to(tl.int64)
            tl.store(Part + slot * (NP * TILE) + loc, acc)
            if GLU != 0:
                tl.store(Part + slot * (NP * TILE) + TILE + loc, acc2)
            if NORM_SCALAR:
                tl.store(SSq + slot * BLOCK_M + rm, ss)
            tl.debug_barrier()          # every thread's part is written before the (release) arrival
            arrived = tl.atomic_add(Count + tile, 1, sem="acq_rel", scope="gpu")
            done = arrived == n_seg - 1
            if done:
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                acc2 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                ss = tl.zeros([BLOCK_M], dtype=tl.float32)
                # unrolled, masked rather than branched: all parts' loads are issued back to back (under an
                # `if` each waited for the one before: ~2.8 µs more at 8 parts); .cg: from L2, where the
                # other SMs' parts are; absent parts add 0
                for jj in tl.static_range(MAXSEG):
                    here = (loc * 0 + jj) < n_seg
                    sj = _part_slot(first + tl.minimum(jj, n_seg - 1), tile, per, k_tiles).to(tl.int64)
                    acc += tl.load(Part + sj * (NP * TILE) + loc, mask=here, other=0.0, cache_modifier=".cg")
                    if GLU != 0:
                        acc2 += tl.load(Part + sj * (NP * TILE) + TILE + loc, mask=here, other=0.0,
                                        cache_modifier=".cg")
                    if NORM_SCALAR:
                        ss += tl.load(SSq + sj * BLOCK_M + rm, mask=(rm * 0 + jj) < n_seg, other=0.0,
                                      cache_modifier=".cg")
                tl.atomic_xchg(Count + tile, 0, sem="relaxed", scope="gpu")
    if done:
        rstd = ss
        if NORM_SCALAR:
            rstd = 1.0 / tl.sqrt(ss / K + eps)
        _epilogue(acc, acc2, rstd, rn, rm, N, M, Bias, Res, stride_rm, Y, stride_ym,
                  HAS_BIAS, NORM_SCALAR, GLU, HAS_RES)


@triton.jit
def _skinny_kernel(X, W, Bias, Y, Part, SSq, Count, M, N, K, stride_xm, stride_wn, stride_ym, k_tiles, per,
                   total, Add, stride_am, Hout, stride_hm, Gate, stride_gm, NormW, Res, stride_rm, eps,
                   norm_offset, HAS_BIAS: tl.constexpr, SEGMENTED: tl.constexpr, TILES_PER_PROG: tl.constexpr,
                   MAXSEG: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                   HAS_ADD: tl.constexpr, HAS_GATE: tl.constexpr, NORM: tl.constexpr,
                   NORM_GROUP: tl.constexpr, GLU: tl.constexpr, HAS_RES: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PDL: tl.constexpr = 0, PREFETCH: tl.constexpr = 0, LINE: tl.constexpr = 64):
    # The work is (tile of BLOCK_N outputs) × (K tile) iterations, `total` of them in tile-major order; each
    # program takes `per` consecutive ones (stream-K): whole tiles when per is a multiple of k_tiles (up to
    # TILES_PER_PROG each), else parts of up to TILES_PER_PROG tiles that `_finish_tile` combines.
    # Split-K is the case per = k_tiles / splits; "one program per SM" balances any shape over the SMs.
    # Epilogue: rstd, bias, GLU, + residual.
    pid = tl.program_id(0)
    start = pid * per
    end = tl.minimum(start + per, total)
    t0 = start // k_tiles
    if PDL:     # hybridize.ops.pdl: x / add / gate / residual may be written by the previous kernel
        if PREFETCH > 0:    # W is not: L2-prefetch the first PREFETCH elements of the first tile's rows
            rn0 = tl.minimum(t0 * BLOCK_N + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)
            pk = tl.minimum((start - t0 * k_tiles) * BLOCK_K + tl.arange(0, PREFETCH // LINE) * LINE, K - 1)
            prefetch_l2(W + rn0[:, None] * stride_wn + pk[None, :])
            if GLU != 0:
                prefetch_l2(W + (rn0 + N)[:, None] * stride_wn + pk[None, :])
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if SEGMENTED:
        # the parts of tiles the program's iterations cover, each a K loop (loop bounds, not an `if`, skip
        # an empty one: a loop under an `if` is not software-pipelined) handed to `_finish_tile`
        for s in tl.static_range(TILES_PER_PROG):
            tile = t0 + s
            lo = tl.maximum(start, tile * k_tiles) - tile * k_tiles
            hi = tl.minimum(end, tile * k_tiles + k_tiles) - tile * k_tiles
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            ss = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(lo * BLOCK_K, hi * BLOCK_K, BLOCK_K):
                acc, acc2, ss = _k_step(acc, acc2, ss, X, W, M, N, K, stride_xm, stride_wn, tile, k0,
                                        Add, stride_am, Hout, stride_hm, Gate, stride_gm, NormW, eps,
                                        norm_offset, EVEN_K, IEEE, HAS_ADD, HAS_GATE, NORM, NORM_GROUP, GLU,
                                        BLOCK_M, BLOCK_N, BLOCK_K)
            if lo < hi:
                first = (tile * k_tiles) // per             # the programs holding parts of this tile
                n_seg = (tile * k_tiles + k_tiles - 1) // per - first + 1
                _finish_tile(acc, acc2, ss, tile, pid, first, n_seg, per, k_tiles, Part, SSq, Count, M, N, K,
                             Bias, Res, stride_rm, Y, stride_ym, eps, SEGMENTED, HAS_BIAS,
                             NORM and NORM_GROUP == 0, GLU, HAS_RES, MAXSEG, BLOCK_M, BLOCK_N)
    else:
        for s in tl.static_range(TILES_PER_PROG):       # whole tiles (every program has a first one)
            tile = t0 + s
            k_end = K
            if s > 0:
                k_end = tl.where(tile * k_tiles < end, K, 0)
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            ss = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, k_end, BLOCK_K):
                acc, acc2, ss = _k_step(acc, acc2, ss, X, W, M, N, K, stride_xm, stride_wn, tile, k0,
                                        Add, stride_am, Hout, stride_hm, Gate, stride_gm, NormW, eps,
                                        norm_offset, EVEN_K, IEEE, HAS_ADD, HAS_GATE, NORM, NORM_GROUP, GLU,
                                        BLOCK_M, BLOCK_N, BLOCK_K)
            if k_end > 0:
                _finish_tile(acc, acc2, ss, tile, pid, tile, 1, per, k_tiles, Part, SSq, Count, M, N, K,
                             Bias, Res, stride_rm, Y, stride_ym, eps, SEGMENTED, HAS_BIAS,
                             NORM and NORM_GROUP == 0, GLU, HAS_RES, MAXSEG, BLOCK_M, BLOCK_N)


@dataclass(frozen=True)
class GemmConfig:
    """A launch of `_skinny_kernel`: BLOCK_N weight rows × BLOCK_K a K step, and how the work is shared
    (`plan`): split_k ≥ 1 split-K over that many programs a tile (1: whole tiles), 0 stream-K with one
    program per SM, < 0 stream-K over -split_k programs; then triton's num_warps / num_stages."""
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


#: the candidates `tune_shape` times (each clipped to the shape); the first is the untuned default. Tile
#: configs from the H100 sweep of benchmarks/skinny_gemm_probe.py (benchmarks/results/skinny_gemm_probe_h100.json: 108
#: configs at 64 rows on a 1.2 B model's six shapes) and its neighbours.
CANDIDATES = (
    GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 5), GemmConfig(32, 128, 1, 4, 4),
    GemmConfig(32, 256, 1, 4, 3), GemmConfig(128, 128, 1, 8, 3), GemmConfig(128, 128, 1, 8, 4),
    GemmConfig(128, 64, 1, 4, 5), GemmConfig(16, 256, 1, 4, 4), GemmConfig(64, 128, 2, 4, 4),
    GemmConfig(32, 256, 2, 4, 3), GemmConfig(64, 128, 4, 4, 4), GemmConfig(64, 128, 4, 4, 5),
    GemmConfig(64, 64, 4, 4, 5), GemmConfig(64, 256, 4, 4, 3), GemmConfig(128, 128, 4, 8, 3),
    GemmConfig(64, 128, 8, 4, 3),
    # stream-K, one program per SM
    GemmConfig(64, 128, 0, 4, 4), GemmConfig(64, 128, 0, 4, 3), GemmConfig(32, 128, 0, 4, 4),
    GemmConfig(128, 128, 0, 8, 3), GemmConfig(128, 64, 0, 4, 4), GemmConfig(64, 64, 0, 4, 5),
)

#: weight elements a row each program L2-prefetches before its PDL wait, while the previous kernel drains
#: (0: none). Only overlaps when a program of this kernel fits on an SM beside the previous kernel's
#: (shared memory: see benchmarks/skinny_chain_probe.py).
PREFETCH = int(os.environ.get("HYBRIDIZE_GEMM_PREFETCH", "0"))

#: largest M the kernel takes (its accumulator holds all rows)
MAX_M = 128


def block_m(M: int) -> int:
    return max(16, 1 << (max(M, 1) - 1).bit_length())


#: from this many tiles on, stream-K over the SMs becomes whole tiles (split_k 1): the waves are already
#: balanced to a few %, and a program's parts of ~8 tiles unroll into a slow compile; on the 128k-row LM head
#: it lost everywhere: 197.6-306 vs 189.6 µs at 64 rows, 184-249 vs 176.3 at 8
#: (benchmarks/results/decode_b64_s10_h100.json, decode_b8_s10_h100.json)
STREAM_K_MAX_TILES = 512


def clip(cfg: GemmConfig, N: int, K: int) -> GemmConfig:
    """`cfg` fitted to the shape: blocks no larger than the padded N / K, at most as many splits as K tiles;
    the stream-K settings (split_k ≤ 0) stay, except over the SMs (0) on STREAM_K_MAX_TILES or more tiles."""
    bk = min(cfg.block_k, max(16, 1 << (K - 1).bit_length()))
    bn = min(cfg.block_n, max(16, 1 << (N - 1).bit_length()))
    split = cfg.split_k if cfg.split_k <= 0 else max(1, min(cfg.split_k, math.ceil(K / bk)))
    if split == 0 and math.ceil(N / bn) >= STREAM_K_MAX_TILES:
        split = 1
    return GemmConfig(bn, bk, split, cfg.num_warps, cfg.num_stages)


class Plan(NamedTuple):
    """How `_skinny_kernel` shares the n_tiles × k_tiles iterations: `programs` programs of `per`
    consecutive ones; a program touches at most `tiles_per_prog` tiles, a tile at most `max_seg` programs;
    `segmented`: some tile is split (its parts are combined in the kernel)."""
    programs: int
    per: int
    tiles_per_prog: int
    max_seg: int
    segmented: bool


def plan(cfg: GemmConfig, n_tiles: int, k_tiles: int, device) -> Plan:
    """split_k ≥ 1: split-K (n_tiles · split_k programs); 0: stream-K over the device's SMs (one program
    each: every SM streams the same number of weight bytes, whatever the number of tiles); < 0: stream-K
    over -split_k programs (tests)."""
    total = n_tiles * k_tiles
    if cfg.split_k > 0:
        want = n_tiles * cfg.split_k
    elif cfg.split_k == 0:
        want = _num_sms(device)
    else:
        want = -cfg.split_k
    per = math.ceil(total / max(1, min(want, total)))
    programs = math.ceil(total / per)
    if per % k_tiles == 0:                  # whole tiles, always starting at a tile's first iteration
        return Plan(programs, per, per // k_tiles, 1, False)
    if k_tiles % per == 0:                  # aligned parts of tiles
        return Plan(programs, per, 1, k_tiles // per, True)
    # a window of `per` consecutive iterations touches at most ⌈(per - 1) / k_tiles⌉ + 1 tiles, and the
    # other way round
    return Plan(programs, per, (per + k_tiles - 2) // k_tiles + 1, (k_tiles + per - 2) // per + 1, True)


@functools.lru_cache(maxsize=None)
def _sms(device_type: str, index: Optional[int]) -> int:
    if device_type != "cuda":
        return 3        # the interpreter: an odd count, so that stream-K splits tiles unevenly
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                            ).multi_processor_count


def _num_sms(device) -> int:
    device = torch.device(device)
    return _sms(device.type, device.index)


_COUNTERS: dict = {}


def _arrival_counters(device, n: int) -> Tensor:
    """int32 zeros (≥ n) for `_finish_tile`'s per-tile arrival counts, one buffer per device: every launch
    leaves them at zero again (the last arrival of a tile resets its count), so CUDA-graph replays and
    later launches reuse them. Kernels on one stream run one after another (PDL: a launch touches them only
    after its wait); concurrent skinny GEMMs on two streams of one device would share them — not done here."""
    device = torch.device(device)
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


#: GLU activations of the fused gate/up epilogue (kernel constexpr codes; as `hybridize.ops.gemv`)
GLU_CODES = {"silu": 1, "gelu_tanh": 2, "gelu": 3}


def _rows(t: Optional[Tensor], M: int, n: int, what: str) -> Optional[Tensor]:
    """An (M, n) operand with unit stride along n (a view when possible)."""
    if t is None:
        return None
    if t.numel() != M * n:
        raise ValueError(f"skinny_gemm: {what} must have {M} x {n} elements, got {tuple(t.shape)}")
    t = t.reshape(M, n)
    return t if t.stride(1) == 1 else t.contiguous()


def skinny_gemm_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                       config: Optional[GemmConfig] = None, out: Optional[Tensor] = None, *,
                       add: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                       norm_weight: Optional[Tensor] = None, eps: float = 0.0, norm_offset: float = 0.0,
                       norm_group: int = 0, glu: Optional[str] = None, residual: Optional[Tensor] = None):
    """x (M, K) with M ≤ MAX_M, weight (N, K) (unit stride along K), bias (N,) or None → y (M, N) in x's
    dtype (or into `out`, (M, N) with unit stride along N).

    Fused extras, as `hybridize.ops.gemv.gemv_triton` for one row (definition:
    `hybridize.ops.gemv.reference.gemv_fused_reference`): add (M, K) → the input is round(x + add),
    returned as h; gate (M, K); norm_weight (K,) (RMSNorm over K, or over groups of `norm_group` channels:
    then K and the config's block_k must be multiples of it); glu: weight = [gate rows; up rows] → y (M, N/2);
    residual (M, N) added last. Returns y, or (y, h) with `add`."""
    kernel = _skinny_kernel
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"skinny_gemm: x {tuple(x.shape)} must be (M, K) for weight (N, K) = {tuple(weight.shape)}")
    M, K = x.shape
    if M > MAX_M:
        raise ValueError(f"skinny_gemm: M = {M} rows exceed MAX_M = {MAX_M}; use F.linear")
    if glu is not None and (glu not in GLU_CODES or weight.shape[0] % 2):
        raise ValueError(f"skinny_gemm: glu must be one of {sorted(GLU_CODES)} with an even number of weight "
                         f"rows, got {glu!r} and {tuple(weight.shape)}")
    N = weight.shape[0] // 2 if glu is not None else weight.shape[0]
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError(f"skinny_gemm: bias must have {weight.shape[0]} elements, got {tuple(bias.shape)}")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    add, gate, residual = _rows(add, M, K, "add"), _rows(gate, M, K, "gate"), _rows(residual, M, N, "residual")
    if norm_weight is not None and norm_weight.numel() != K:
        raise ValueError(f"skinny_gemm: norm_weight must have {K} elements, got {tuple(norm_weight.shape)}")
    cfg = clip(config or CANDIDATES[0], N, K)
    norm_group = 0 if norm_weight is None or norm_group in (0, K) else int(norm_group)
    if norm_group and (K % norm_group or cfg.block_k % norm_group):
        raise ValueError(f"skinny_gemm: a norm over groups of {norm_group} needs K ({K}) and block_k "
                         f"({cfg.block_k}) to be multiples of it")
    if out is not None and (tuple(out.shape) != (M, N) or out.stride(-1) != 1 or out.dtype != x.dtype
                            or out.device != x.device):
        raise ValueError(f"skinny_gemm: out must be ({M}, {N}) {x.dtype} on {x.device} with unit stride along N, "
                         f"got {tuple(out.shape)} {out.dtype} strides {tuple(out.stride())}")
    if norm_group < 0:
        raise ValueError(f"skinny_gemm: norm_group must be >= 0 (0: one group over K), got {norm_group}")
    y = out if out is not None else torch.empty(M, N, device=x.device, dtype=x.dtype)
    h = torch.empty(M, K, device=x.device, dtype=x.dtype) if add is not None else None
    if M == 0 or K == 0 or (N == 0 and add is None):
        if K == 0 and y.numel():
            from hybridize.ops.gemv.reference import gemv_fused_reference
            y.copy_(gemv_fused_reference(x, weight, bias, glu=glu, residual=residual))
        return (y, h) if add is not None else y
    n_tiles = max(1, math.ceil(N / cfg.block_n))
    k_tiles = max(1, math.ceil(K / cfg.block_k))
    g = plan(cfg, n_tiles, k_tiles, x.device)
    norm_scalar = norm_weight is not None and norm_group == 0
    f32 = dict(device=x.device, dtype=torch.float32)
    BM = block_m(M)
    if g.segmented:         # ≤ 2 parts a program (whole (BLOCK_N, BLOCK_M) blocks) + per-tile arrival counters
        part = torch.empty(g.programs * 2 * (2 if glu else 1), cfg.block_n * BM, **f32)
        ssq = torch.empty(g.programs * 2, BM, **f32) if norm_scalar else part
        count = _arrival_counters(x.device, n_tiles)
    else:
        part = ssq = count = y
    pdl = pdl_launch(x.device)
    if pdl.get("PDL") and PREFETCH > 0:
        line = max(1, 128 // weight.element_size())
        pdl = dict(pdl, PREFETCH=max(line, 1 << (min(PREFETCH, K).bit_length() - 1)), LINE=line)
    b = bias.contiguous() if bias is not None else x
    kernel[(g.programs,)](
        x, weight, b, y, part, ssq, count, M, N, K, x.stride(0), weight.stride(0), y.stride(0), k_tiles, g.per,
        n_tiles * k_tiles, add if add is not None else x, add.stride(0) if add is not None else 0,
        h if h is not None else x, K, gate if gate is not None else x, gate.stride(0) if gate is not None else 0,
        norm_weight.contiguous() if norm_weight is not None else x,
        residual if residual is not None else x, residual.stride(0) if residual is not None else 0,
        float(eps), float(norm_offset),
        HAS_BIAS=bias is not None, SEGMENTED=g.segmented, TILES_PER_PROG=g.tiles_per_prog, MAXSEG=g.max_seg,
        EVEN_K=K % cfg.block_k == 0, IEEE=x.dtype == torch.float32,
        HAS_ADD=add is not None, HAS_GATE=gate is not None, NORM=norm_weight is not None, NORM_GROUP=norm_group,
        GLU=GLU_CODES[glu] if glu else 0, HAS_RES=residual is not None,
        BLOCK_M=BM, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl)
    return (y, h) if add is not None else y
