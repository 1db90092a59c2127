"""Triton "skinny" GEMM for batched decode: y (M, N) = x (M, K) · W (N, K)ᵀ (+ b) with few rows (M ≤ 128).

Why: a decode step at batch 8-64 multiplies a handful of rows by every weight matrix, so it is bound by
reading W once (arithmetic intensity M FLOP / byte, far below an H100's ~300). cuBLAS' kernels for these
shapes pick tiles made for large M: for a 2048-row W only a few dozen CTAs stream the weight and most SMs
idle. Here the weight is the MMA's left operand (swap-AB: acc (BLOCK_N, BLOCK_M) = W_tile · x_tileᵀ, so the
tiny M is the MMA's N dimension), each program streams BLOCK_N rows of W (evict-first: read once per step),
and for short N the K axis is split over SPLIT_K programs whose fp32 partials a second kernel sums in a
fixed order (deterministic: no atomics), adding the bias and casting. Configs are tuned per shape against
cuBLAS (`hybridize.ops.gemm.tune_shape`) and used only where they win.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from hybridize.ops.pdl import pdl_launch

_KERNELS = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def _skinny_kernel(X, W, Bias, Y, Part, M, N, K, stride_xm, stride_wn, stride_ym, k_per_split,
                       HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PDL: tl.constexpr = 0):
        # program (n-block, k-split): acc (BLOCK_N, BLOCK_M) over K range [k0, k0 + k_per_split)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        nmask = rn < N
        mmask = rm < M
        w_rows = W + tl.where(nmask, rn, 0).to(tl.int64)[:, None] * stride_wn    # int64: the head's N·K > 2³¹
        x_rows = X + rm[:, None] * stride_xm
        k_lo = pid_k * k_per_split
        if PDL:     # hybridize.ops.pdl: x may be written by the previous kernel
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
            kk = k0 + rk
            if EVEN_K:
                w = tl.load(w_rows + kk[None, :], eviction_policy="evict_first")
                x = tl.load(x_rows + kk[None, :], mask=mmask[:, None], other=0.0)
            else:
                kmask = kk < K
                w = tl.load(w_rows + kk[None, :], mask=kmask[None, :], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(w, tl.trans(x.to(w.dtype)), acc)
        out_mask = nmask[:, None] & mmask[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(Bias + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
            tl.store(Y + rm[None, :] * stride_ym + rn[:, None], acc.to(Y.dtype.element_ty), mask=out_mask)
        else:       # fp32 partial of this split: Part (SPLIT, M, N)
            tl.store(Part + (pid_k * M + rm[None, :]) * N + rn[:, None], acc, mask=out_mask)

    @triton.jit
    def _split_reduce_kernel(Part, Bias, Y, M, N, stride_ym, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                             BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
        # y = sum_s Part[s] (+ bias), in split order: the same bits on every run
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M * N
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.load(Part + offs, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT):
            acc += tl.load(Part + s * M * N + offs, mask=mask, other=0.0)
        m, n = offs // N, offs % N
        if HAS_BIAS:
            acc += tl.load(Bias + n, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + m * stride_ym + n, acc.to(Y.dtype.element_ty), mask=mask)

    return _skinny_kernel, _split_reduce_kernel


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


#: the candidates `tune_shape` times (each clipped to the shape); the first is the untuned default
CANDIDATES = (
    GemmConfig(64, 128, 1, 4, 4), GemmConfig(32, 128, 1, 4, 4), GemmConfig(32, 256, 1, 4, 3),
    GemmConfig(16, 256, 1, 4, 4), GemmConfig(64, 64, 1, 4, 6), GemmConfig(64, 128, 1, 8, 4),
    GemmConfig(128, 64, 1, 4, 5), GemmConfig(128, 128, 1, 8, 3), GemmConfig(64, 128, 2, 4, 4),
    GemmConfig(64, 128, 4, 4, 4), GemmConfig(128, 128, 4, 8, 3), GemmConfig(64, 256, 4, 4, 3),
    GemmConfig(128, 64, 8, 4, 4), GemmConfig(64, 128, 8, 4, 3), GemmConfig(32, 256, 2, 4, 3),
)

#: largest M the kernel takes (its accumulator holds all rows)
MAX_M = 128
REDUCE_BLOCK = 1024


def block_m(M: int) -> int:
    return max(16, 1 << (max(M, 1) - 1).bit_length())


def clip(cfg: GemmConfig, N: int, K: int) -> GemmConfig:
    """`cfg` fitted to the shape: blocks no larger than the padded N / K, at most as many splits as K tiles."""
    bk = min(cfg.block_k, max(16, 1 << (K - 1).bit_length()))
    bn = min(cfg.block_n, max(16, 1 << (N - 1).bit_length()))
    split = max(1, min(cfg.split_k, math.ceil(K / bk)))
    return GemmConfig(bn, bk, split, cfg.num_warps, cfg.num_stages)


def skinny_gemm_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                       config: Optional[GemmConfig] = None, out: Optional[Tensor] = None) -> Tensor:
    """x (M, K) with M ≤ MAX_M, weight (N, K) (unit stride along K), bias (N,) or None → y (M, N) in x's
    dtype (or into `out`, (M, N) with unit stride along N)."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build()
    kernel, reduce_kernel = _KERNELS
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"skinny_gemm: x {tuple(x.shape)} must be (M, K) for weight (N, K) = {tuple(weight.shape)}")
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_M:
        raise ValueError(f"skinny_gemm: M = {M} rows exceed MAX_M = {MAX_M}; use F.linear")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"skinny_gemm: bias must have {N} elements, got {tuple(bias.shape)}")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    y = out if out is not None else torch.empty(M, N, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    if K == 0:
        return y.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(y))
    cfg = clip(config or CANDIDATES[0], N, K)
    k_tiles = math.ceil(K / cfg.block_k)
    k_per_split = math.ceil(k_tiles / cfg.split_k) * cfg.block_k
    split = math.ceil(K / k_per_split)                 # no empty splits
    even_k = K % k_per_split == 0 and k_per_split % cfg.block_k == 0
    part = torch.empty(split, M, N, device=x.device, dtype=torch.float32) if split > 1 else y
    pdl = pdl_launch(x.device)
    b = bias.contiguous() if bias is not None else x
    kernel[(math.ceil(N / cfg.block_n), split)](
        x, weight, b, y, part, M, N, K, x.stride(0), weight.stride(0), y.stride(0), k_per_split,
        HAS_BIAS=bias is not None, SPLIT=split, EVEN_K=even_k, BLOCK_M=block_m(M), BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl)
    if split > 1:
        reduce_kernel[(math.ceil(M * N / REDUCE_BLOCK),)](
            part, b, y, M, N, y.stride(0), HAS_BIAS=bias is not None, SPLIT=split, BLOCK=REDUCE_BLOCK,
            num_warps=4, **pdl)
    return y
