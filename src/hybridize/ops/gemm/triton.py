"""Triton "skinny" GEMM for batched decode: y (M, N) = x (M, K) · W (N, K)ᵀ (+ b) with few rows (M ≤ 128).

Why: a decode step at batch 8-64 multiplies a handful of rows by every weight matrix, so it is bound by
reading W once (arithmetic intensity M FLOP / byte, far below an H100's ~300). cuBLAS' kernels for these
shapes pick tiles made for large M: for a 2048-row W only a few dozen CTAs stream the weight and most SMs
idle. Here the weight is the MMA's left operand (swap-AB: acc (BLOCK_N, BLOCK_M) = W_tile · x_tileᵀ, so the
tiny M is the MMA's N dimension), each program streams BLOCK_N rows of W (evict-first: read once per step),
and for short N the K axis is split over SPLIT_K programs whose fp32 partials a second kernel sums in a
fixed order (deterministic: no atomics), adding the bias and casting. Configs are tuned per shape against
cuBLAS (`hybridize.ops.gemv.tune_shape` with rows > 1) and used only where they win.

Tried and dropped: Mamba's conv step as an epilogue (its state read / shifted / written in the MMA tile's
layout): 21.9 vs 10.5 µs for the 1.2 B hybrid's in_proj at 64 rows (+ the separate ~2-3.5 µs conv kernel),
20.2 vs 9.2 µs with the norm at 8 rows (commit 60f0512, benchmarks/results/decode_b64_s9b_h100.json).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridize.ops._jit_helpers import glu_act
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
def _skinny_kernel(X, W, Bias, Y, Part, SSq, M, N, K, stride_xm, stride_wn, stride_ym, k_per_split,
                   Add, stride_am, Hout, stride_hm, Gate, stride_gm, NormW, Res, stride_rm, eps, norm_offset,
                   HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                   HAS_ADD: tl.constexpr, HAS_GATE: tl.constexpr, NORM: tl.constexpr,
                   NORM_GROUP: tl.constexpr, GLU: tl.constexpr, HAS_RES: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PDL: tl.constexpr = 0):
    # program (n-block, k-split): acc (BLOCK_N, BLOCK_M) = W[rn, k-range] · u[:, k-range]ᵀ, where u is the
    # prologue's input rows: h = round(x + add) (written by the n-block-0 programs: the residual stream),
    # h·silu(gate), RMSNorm weight (·(offset + w)); one rstd per row is applied to the dot products at the
    # end (sum of squares accumulated in the same pass over K; with SPLIT > 1 each split writes its part
    # and the reduce kernel finishes it), or per group of NORM_GROUP channels inside each tile.
    # Epilogue (SPLIT = 1 here, else in the reduce kernel): bias, GLU (rows [N, 2N) of W are the up
    # projection), + residual.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    mmask = rm < M
    rn_safe = tl.where(nmask, rn, 0).to(tl.int64)                 # int64: the head's N·K exceeds 2³¹
    w_rows = W + rn_safe[:, None] * stride_wn
    w2_rows = W + (rn_safe + N)[:, None] * stride_wn
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if PDL:     # hybridize.ops.pdl: x / add / gate / residual may be written by the previous kernel (an L2
        # prefetch of W's first 256 / 1024 elements a row before the wait, as the GEMV does, did not help at
        # 64 rows: 19 292 / 18 985 vs 19 309 tokens/s, benchmarks/results/decode_b64_gemm_prefetch_s9_h100.json)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
        xmask = mmask[:, None] & kmask[None, :]
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=xmask, other=0.0)
        if HAS_ADD or HAS_GATE or NORM:
            x = x.to(tl.float32)
            if HAS_ADD:
                x = (x + tl.load(Add + rm[:, None] * stride_am + kk[None, :], mask=xmask, other=0.0).to(
                    tl.float32)).to(X.dtype.element_ty, fp_downcast_rounding="rtne")
                tl.store(Hout + rm[:, None] * stride_hm + kk[None, :], x, mask=xmask & ((rk * 0 + pid_n) == 0)[None, :])
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
        if EVEN_K:
            w = tl.load(w_rows + kk[None, :], eviction_policy="evict_first")
        else:
            w = tl.load(w_rows + kk[None, :], mask=kmask[None, :], other=0.0, eviction_policy="evict_first")
        acc = _dot(w, xt, acc, IEEE)
        if GLU != 0:
            if EVEN_K:
                w2 = tl.load(w2_rows + kk[None, :], eviction_policy="evict_first")
            else:
                w2 = tl.load(w2_rows + kk[None, :], mask=kmask[None, :], other=0.0,
                             eviction_policy="evict_first")
            acc2 = _dot(w2, xt, acc2, IEEE)
    if SPLIT == 1:
        rstd = ss
        if NORM and NORM_GROUP == 0:
            rstd = 1.0 / tl.sqrt(ss / K + eps)
        _epilogue(acc, acc2, rstd, rn, rm, N, M, Bias, Res, stride_rm, Y, stride_ym,
                  HAS_BIAS, NORM and NORM_GROUP == 0, GLU, HAS_RES)
    else:       # fp32 partials of this split: Part (SPLIT, 1 + [GLU], M, N), SSq (SPLIT, M)
        omask = nmask[:, None] & mmask[None, :]
        base = Part + (pid_k * (1 + (GLU != 0)) * M + rm[None, :]) * N + rn[:, None]
        tl.store(base, acc, mask=omask)
        if GLU != 0:
            tl.store(base + M * N, acc2, mask=omask)
        if NORM and NORM_GROUP == 0:
            tl.store(SSq + pid_k * M + rm, ss, mask=mmask & ((rm * 0 + pid_n) == 0))

@triton.jit
def _split_reduce_kernel(Part, SSq, Bias, Res, stride_rm, Y, M, N, K, stride_ym, eps,
                         HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, NORM_SCALAR: tl.constexpr,
                         GLU: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, PDL: tl.constexpr = 0):
    # y[:, n-block] = epilogue(sum_s Part[s]) in split order: the same bits on every run (no atomics)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    mask = (rn < N)[:, None] & (rm < M)[None, :]
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    stride_s = (1 + (GLU != 0)) * M * N
    offs = rm[None, :] * N + rn[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(Part + s * stride_s + offs, mask=mask, other=0.0)
        if GLU != 0:
            acc2 += tl.load(Part + s * stride_s + M * N + offs, mask=mask, other=0.0)
        if NORM_SCALAR:
            ss += tl.load(SSq + s * M + rm, mask=rm < M, other=0.0)
    rstd = ss
    if NORM_SCALAR:
        rstd = 1.0 / tl.sqrt(ss / K + eps)
    _epilogue(acc, acc2, rstd, rn, rm, N, M, Bias, Res, stride_rm, Y, stride_ym,
              HAS_BIAS, NORM_SCALAR, GLU, HAS_RES)


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


#: the candidates `tune_shape` times (each clipped to the shape); the first is the untuned default. From the
#: H100 sweep of benchmarks/skinny_gemm_probe.py (benchmarks/results/skinny_gemm_probe_h100.json: 108
#: configs at 64 rows on a 1.2 B model's six shapes) and its neighbours.
CANDIDATES = (
    GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 5), GemmConfig(32, 128, 1, 4, 4),
    GemmConfig(32, 256, 1, 4, 3), GemmConfig(128, 128, 1, 8, 3), GemmConfig(128, 128, 1, 8, 4),
    GemmConfig(128, 64, 1, 4, 5), GemmConfig(16, 256, 1, 4, 4), GemmConfig(64, 128, 2, 4, 4),
    GemmConfig(32, 256, 2, 4, 3), GemmConfig(64, 128, 4, 4, 4), GemmConfig(64, 128, 4, 4, 5),
    GemmConfig(64, 64, 4, 4, 5), GemmConfig(64, 256, 4, 4, 3), GemmConfig(128, 128, 4, 8, 3),
    GemmConfig(64, 128, 8, 4, 3),
)

#: largest M the kernel takes (its accumulator holds all rows)
MAX_M = 128


def block_m(M: int) -> int:
    return max(16, 1 << (max(M, 1) - 1).bit_length())


def clip(cfg: GemmConfig, N: int, K: int) -> GemmConfig:
    """`cfg` fitted to the shape: blocks no larger than the padded N / K, at most as many splits as K tiles."""
    bk = min(cfg.block_k, max(16, 1 << (K - 1).bit_length()))
    bn = min(cfg.block_n, max(16, 1 << (N - 1).bit_length()))
    split = max(1, min(cfg.split_k, math.ceil(K / bk)))
    return GemmConfig(bn, bk, split, cfg.num_warps, cfg.num_stages)


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
    kernel, reduce_kernel = _skinny_kernel, _split_reduce_kernel
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
    k_tiles = math.ceil(K / cfg.block_k)
    k_per_split = math.ceil(k_tiles / cfg.split_k) * cfg.block_k
    split = math.ceil(K / k_per_split)                 # no empty splits
    even_k = K % cfg.block_k == 0
    norm_scalar = norm_weight is not None and norm_group == 0
    f32 = dict(device=x.device, dtype=torch.float32)
    part = torch.empty(split, 2 if glu else 1, M, N, **f32) if split > 1 else y
    ssq = torch.empty(split, M, **f32) if split > 1 and norm_scalar else y
    pdl = pdl_launch(x.device)
    b = bias.contiguous() if bias is not None else x
    BM = block_m(M)
    kernel[(max(1, math.ceil(N / cfg.block_n)), split)](
        x, weight, b, y, part, ssq, M, N, K, x.stride(0), weight.stride(0), y.stride(0), k_per_split,
        add if add is not None else x, add.stride(0) if add is not None else 0, h if h is not None else x,
        K, gate if gate is not None else x, gate.stride(0) if gate is not None else 0,
        norm_weight.contiguous() if norm_weight is not None else x,
        residual if residual is not None else x, residual.stride(0) if residual is not None else 0,
        float(eps), float(norm_offset),
        HAS_BIAS=bias is not None, SPLIT=split, EVEN_K=even_k, IEEE=x.dtype == torch.float32,
        HAS_ADD=add is not None, HAS_GATE=gate is not None, NORM=norm_weight is not None, NORM_GROUP=norm_group,
        GLU=GLU_CODES[glu] if glu else 0, HAS_RES=residual is not None,
        BLOCK_M=BM, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl)
    if split > 1:
        bn = max(16, min(128, 4096 // BM))
        reduce_kernel[(math.ceil(N / bn),)](
            part, ssq, b, residual if residual is not None else x, residual.stride(0) if residual is not None else 0,
            y, M, N, K, y.stride(0), float(eps), HAS_BIAS=bias is not None, SPLIT=split, NORM_SCALAR=norm_scalar,
            GLU=GLU_CODES[glu] if glu else 0, HAS_RES=residual is not None, BLOCK_M=BM, BLOCK_N=bn,
            num_warps=4, **pdl)
    return (y, h) if add is not None else y
