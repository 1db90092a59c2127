"""Triton GEMV for batch-1 decode: y (1, N) = x (1, K) · W (N, K)ᵀ (+ b), W row-major, 16-bit or fp32.

Why: at batch 1 every projection is a matrix-vector product bound by reading W once. cuBLAS' kernels for
M = 1 reach 47-84 % of HBM bandwidth on an H100 on a 1.2 B model's shapes (profile in
benchmarks/results/decode_h100.json), the small ones worst. Here each program streams BLOCK_N whole rows of
W (coalesced along K, evict-first: W is read once per step), keeps a (BLOCK_N, BLOCK_K) fp32 accumulator
(one reduction at the end, not one per tile) and writes BLOCK_N outputs; no split-K partials, no
reduction kernel. The block shape is picked per (N, K, dtype) by timing candidates against cuBLAS on the
device (`tune`), and the kernel is used only for the shapes where it won.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

_KERNEL = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(X, W, Bias, Y, N, K, stride_wn,
                     HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        w_rows = W + rn.to(tl.int64)[:, None] * stride_wn          # int64: the head's N·K exceeds 2³¹
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            if EVEN_K:
                x = tl.load(X + kk)
                if EVEN_N:
                    w = tl.load(w_rows + kk[None, :], eviction_policy="evict_first")
                else:
                    w = tl.load(w_rows + kk[None, :], mask=(rn < N)[:, None], other=0.0,
                                eviction_policy="evict_first")
            else:
                x = tl.load(X + kk, mask=kk < K, other=0.0)
                w = tl.load(w_rows + kk[None, :], mask=(rn < N)[:, None] & (kk < K)[None, :], other=0.0,
                            eviction_policy="evict_first")
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=rn < N)

    return _gemv_kernel


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


#: the candidates `tune` times (each clipped to the shape); the first one is the untuned default
#: (H100 / triton 3.6, a 1.2 B model's shapes: (2, 1024, 4, 3) won all of the first round's ten; its
#: neighbours were added)
CANDIDATES = (
    GemvConfig(2, 1024, 4, 3), GemvConfig(1, 1024, 4, 3), GemvConfig(1, 2048, 4, 3), GemvConfig(1, 2048, 8, 2),
    GemvConfig(2, 2048, 8, 3), GemvConfig(2, 1024, 8, 3), GemvConfig(2, 512, 4, 4), GemvConfig(4, 1024, 4, 2),
    GemvConfig(4, 1024, 8, 3), GemvConfig(4, 512, 4, 3), GemvConfig(8, 512, 4, 3), GemvConfig(8, 256, 4, 4),
    GemvConfig(16, 256, 4, 3),
)


def _clip(cfg: GemvConfig, N: int, K: int) -> GemvConfig:
    bk = min(cfg.block_k, max(16, 1 << (K - 1).bit_length()))
    bn = min(cfg.block_n, max(1, 1 << (N - 1).bit_length()))
    return GemvConfig(bn, bk, cfg.num_warps, cfg.num_stages)


def gemv_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                config: Optional[GemvConfig] = None) -> Tensor:
    """x (1, K) (or (K,)), weight (N, K) with unit stride along K, bias (N,) or None → (1, N) in x's dtype."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build()
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K or x.numel() != K:
        raise ValueError(f"gemv: x {tuple(x.shape)} must be one row of {weight.shape[1]} features for weight "
                         f"{tuple(weight.shape)}")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    x = x.reshape(K).contiguous()
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    if N == 0:
        return y
    cfg = _clip(config or CANDIDATES[0], N, K)
    _KERNEL[(math.ceil(N / cfg.block_n),)](
        x, weight, bias if bias is not None else x, y, N, K, weight.stride(0),
        HAS_BIAS=bias is not None, EVEN_N=N % cfg.block_n == 0, EVEN_K=K % cfg.block_k == 0,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y
