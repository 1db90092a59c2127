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
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from hybridize.ops.pdl import pdl_launch

_KERNEL = None


def _build():
    import triton
    import triton.language as tl

    from hybridize.ops._jit_helpers import glu_act as _glu_act
    from hybridize.ops._jit_helpers import prefetch_l2 as _prefetch_l2
    # the interpreter (TRITON_INTERPRET=1) resolves a kernel's callees in its module's globals
    globals()["_glu_act"] = _glu_act

    @triton.jit
    def _gemv_kernel(X, W, Bias, Y, N, K, stride_wn,
                     Add, Hout, Gate, NormW, Res, eps, norm_offset,
                     CS, CW, CB, conv_lo, conv_dim, scs_c, scs_w, scw_c, scw_w,
                     HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                     HAS_ADD: tl.constexpr, HAS_GATE: tl.constexpr, NORM: tl.constexpr,
                     NORM_GROUP: tl.constexpr, GLU: tl.constexpr,
                     HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr = 0, PREFETCH: tl.constexpr = 0, LINE: tl.constexpr = 64,
                     CONV: tl.constexpr = 0, CONV_BIAS: tl.constexpr = 0, CONV_W: tl.constexpr = 4,
                     CONV_WP: tl.constexpr = 4):
        # Optional prologue on the input row (every program sees all of K, so each can do it alone):
        #   h = round(x + add) (program 0 writes h: the residual stream), h *= silu(gate),
        #   rmsnorm: h *= (norm_offset + normw) and rstd = rsqrt(mean(h²) + eps), a scalar applied to the
        #   dot products at the end (so the mean needs no second pass over K).
        # Optional epilogue: GLU (rows [0, N) are the gate, rows [N, 2N) the up projection of the same
        # weight tensor: y = act(gate) * up) and + residual; or a causal depthwise conv update of rows
        # [conv_lo, conv_lo + conv_dim) (CONV = 1: no activation, 2: silu): each program owns its rows'
        # conv channels, so it reads and shifts their state (CS (C, W-1)) with no race.
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        w_rows = W + rn.to(tl.int64)[:, None] * stride_wn          # int64: the head's N·K exceeds 2³¹
        w2_rows = W + (rn + N).to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        if PDL:     # see hybridize.ops.pdl; W is not written by earlier kernels of the step: prefetch it
            if PREFETCH > 0:   # first PREFETCH elements of each row, one L2 prefetch per LINE elements
                pk = tl.minimum(tl.arange(0, PREFETCH // LINE) * LINE, K - 1)
                prow = tl.minimum(rn, N - 1).to(tl.int64)
                _prefetch_l2(W + prow[:, None] * stride_wn + pk[None, :])
                if GLU != 0:
                    _prefetch_l2(W + (prow + N)[:, None] * stride_wn + pk[None, :])
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if CONV != 0:   # the conv's loads are issued before the K loop: their latency hides behind it
            cc = rn - conv_lo
            cmask = (cc >= 0) & (cc < conv_dim) & (rn < N)
            cc = tl.where(cmask, cc, 0).to(tl.int64)
            tap = tl.arange(0, CONV_WP)
            old = tl.load(CS + cc[:, None] * scs_c + tap[None, :] * scs_w,
                          mask=cmask[:, None] & (tap[None, :] < CONV_W - 1), other=0.0)
            nxt = tl.load(CS + cc[:, None] * scs_c + (tap[None, :] + 1) * scs_w,      # old shifted one tap
                          mask=cmask[:, None] & (tap[None, :] + 1 < CONV_W - 1), other=0.0)
            cwt = tl.load(CW + cc[:, None] * scw_c + tap[None, :] * scw_w,
                          mask=cmask[:, None] & (tap[None, :] < CONV_W), other=0.0).to(tl.float32)
            if CONV_BIAS:
                cb = tl.load(CB + cc, mask=cmask, other=0.0).to(tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            kmask = kk < K
            if EVEN_K:
                x = tl.load(X + kk).to(tl.float32)
            else:
                x = tl.load(X + kk, mask=kmask, other=0.0).to(tl.float32)
            if HAS_ADD:
                x = (x + tl.load(Add + kk, mask=kmask, other=0.0).to(tl.float32)).to(
                    X.dtype.element_ty, fp_downcast_rounding="rtne")
                tl.store(Hout + kk, x, mask=kmask & ((rk * 0 + pid) == 0))
                x = x.to(tl.float32)
            if HAS_GATE:
                z = tl.load(Gate + kk, mask=kmask, other=0.0).to(tl.float32)
                x = x * z * tl.sigmoid(z)
            if NORM:
                if NORM_GROUP == 0:      # one group: rstd is a scalar applied to the dot products at the end
                    ss += x * x
                else:                    # groups of NORM_GROUP channels, whole groups in every tile
                    xg = tl.reshape(x, (BLOCK_K // NORM_GROUP, NORM_GROUP))
                    rg = 1.0 / tl.sqrt(tl.sum(xg * xg, axis=1) / NORM_GROUP + eps)
                    # padding lanes (K % BLOCK_K) form whole zero groups: 0 · rsqrt(0 + eps) is NaN at eps = 0
                    x = tl.where(kmask, tl.reshape(xg * rg[:, None], (BLOCK_K,)), 0.0)
                x = x * (tl.load(NormW + kk, mask=kmask, other=0.0).to(tl.float32) + norm_offset)
            wmask = (rn < N)[:, None] & kmask[None, :]
            if EVEN_K and EVEN_N:
                w = tl.load(w_rows + kk[None, :], eviction_policy="evict_first")
            else:
                w = tl.load(w_rows + kk[None, :], mask=wmask, other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
            if GLU != 0:
                if EVEN_K and EVEN_N:
                    w2 = tl.load(w2_rows + kk[None, :], eviction_policy="evict_first")
                else:
                    w2 = tl.load(w2_rows + kk[None, :], mask=wmask, other=0.0, eviction_policy="evict_first")
                acc2 += w2.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        rstd = 1.0
        if NORM and NORM_GROUP == 0:
            rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
            y = y * rstd
        if HAS_BIAS:
            y += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)
        if GLU != 0:
            up = tl.sum(acc2, axis=1) * rstd
            if HAS_BIAS:
                up += tl.load(Bias + N + rn, mask=rn < N, other=0.0).to(tl.float32)
            y = _glu_act(y, GLU) * up
        if HAS_RES:
            y += tl.load(Res + rn, mask=rn < N, other=0.0).to(tl.float32)
        if CONV != 0:
            # the conv input is the projection rounded to the output dtype (what the unfused ops see);
            # window = [state taps, input], state ← window[1:]
            pre = y.to(Y.dtype.element_ty)
            win = tl.where(tap[None, :] == CONV_W - 1, pre.to(tl.float32)[:, None], old.to(tl.float32))
            yc = tl.sum(win * cwt, axis=1)
            if CONV_BIAS:
                yc += cb
            if CONV == 2:
                yc = yc * tl.sigmoid(yc)
            new = tl.where(tap[None, :] == CONV_W - 2, pre.to(CS.dtype.element_ty)[:, None], nxt)
            tl.store(CS + cc[:, None] * scs_c + tap[None, :] * scs_w, new,
                     mask=cmask[:, None] & (tap[None, :] < CONV_W - 1))
            y = tl.where(cmask, yc, y)
        tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=rn < N)

    return _gemv_kernel


#: GLU activations of the fused gate/up epilogue (kernel constexpr codes)
GLU_CODES = {"silu": 1, "gelu_tanh": 2, "gelu": 3}
#: activations of the conv epilogue (kernel constexpr codes)
CONV_ACTS = {None: 1, "silu": 2}


class ConvUpdate(NamedTuple):
    """A causal depthwise conv step on output rows [start, start + C) of a decode GEMV (Mamba's in_proj →
    conv1d): state (C, W-1) or (1, C, W-1), updated in place (any strides); weight (C, W); bias (C,) or
    None; activation None or "silu". Same semantics as `hybridize.ops.conv1d.causal_conv1d_update`."""
    state: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    start: int
    activation: Optional[str] = "silu"


def _conv_args(conv: Optional[ConvUpdate], N: int, x: Tensor, other_epilogue: bool):
    """(positional args, constexpr keywords) of the conv epilogue; placeholders without one."""
    if conv is None:
        return (x, x, x, 0, 0, 0, 0, 0, 0), {}
    state = conv.state[0] if conv.state.dim() == 3 else conv.state
    C, W = conv.weight.shape[0], conv.weight.shape[-1]
    if conv.weight.dim() != 2 or tuple(state.shape) != (C, W - 1) or conv.state.dim() == 3 and conv.state.shape[0] != 1:
        raise ValueError(f"gemv: conv state {tuple(conv.state.shape)} must be (1, C, W-1) or (C, W-1) for a conv "
                         f"weight (C, W) = {tuple(conv.weight.shape)}")
    if not 0 <= conv.start <= N - C:
        raise ValueError(f"gemv: conv rows [{conv.start}, {conv.start + C}) are not inside the {N} output rows")
    if conv.activation not in CONV_ACTS:
        raise ValueError(f"gemv: conv activation must be None or 'silu', got {conv.activation!r}")
    if conv.bias is not None and conv.bias.numel() != C:
        raise ValueError(f"gemv: conv bias must have {C} elements, got {tuple(conv.bias.shape)}")
    if other_epilogue:
        raise ValueError("gemv: the conv epilogue does not combine with glu or residual")
    args = (state, conv.weight, conv.bias if conv.bias is not None else x, int(conv.start), C,
            state.stride(0), state.stride(1) if W > 1 else 0, *conv.weight.stride())
    return args, dict(CONV=CONV_ACTS[conv.activation], CONV_BIAS=conv.bias is not None, CONV_W=W,
                      CONV_WP=max(2, 1 << (W - 1).bit_length()))


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


def _pdl_args(device, N: int, K: int, block_k: int, elem_bytes: int) -> dict:
    """PDL launch keywords (hybridize.ops.pdl) plus the L2 prefetch of each row's first elements before the
    wait (HYBRIDIZE_PDL_PREFETCH elements, default 256: 512 bytes a bf16 row; 0: none). On the H100
    (benchmarks/results/pdl_probe_h100.json, a 16-layer GEMV chain) PDL alone gained 2.3 %, with a
    256-element prefetch 3.1 %; 1024 / 2048 / 8192 elements lost 3-6 % (prefetch instructions and L2 traffic).
    Prefetching the whole weight of the out-projections that follow a latency-bound kernel (attention, the
    SSD step: idle HBM while they run) did not help either: 931 vs 943 tokens/s for the 1.2 B Transformer
    (benchmarks/results/decode_b1_prefetch_h100.json / decode_b1_noprefetch_h100.json)."""
    args = pdl_launch(device)
    if args["PDL"] and N > 0:
        want = int(os.environ.get("HYBRIDIZE_PDL_PREFETCH", 256))
        line = max(1, 128 // elem_bytes)
        k_pow2 = 1 << max(0, (K - 1).bit_length())
        n = min(1 << max(0, (max(want, 1) - 1).bit_length()), k_pow2)
        if want > 0 and n >= line:
            args.update(PREFETCH=n, LINE=line)
    return args


def gemv_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                config: Optional[GemvConfig] = None, *, add: Optional[Tensor] = None,
                gate: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None, eps: float = 0.0,
                norm_offset: float = 0.0, norm_group: int = 0, glu: Optional[str] = None,
                residual: Optional[Tensor] = None, conv: Optional[ConvUpdate] = None):
    """x (1, K) (or (K,)), weight (N, K) with unit stride along K, bias (N,) or None → y (1, N) in x's dtype.

    Fused extras (see `reference.gemv_fused_reference` for the exact definition):
    add (K,): the input row is round(x + add) (returned as h: the caller's residual stream);
    gate (K,): times silu(gate); norm_weight (K,): RMS-normalised (eps, norm_offset + norm_weight) over all
    of K, or over groups of `norm_group` channels (the config's block_k must be a multiple of it);
    glu ("silu" / "gelu_tanh" / "gelu"): weight holds gate rows then up rows (2·N', K) → y (1, N') =
    act(gate) · up; residual (N,): added at the end; conv (`ConvUpdate`): output rows [start, start + C)
    are the input of a causal depthwise conv step (state updated in place; no glu / residual with it).
    Returns y, or (y, h) when `add` is given."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build()
    K = x.shape[-1]
    if weight.shape[1] != K or x.numel() != K:
        raise ValueError(f"gemv: x {tuple(x.shape)} must be one row of {weight.shape[1]} features for weight "
                         f"{tuple(weight.shape)}")
    if glu is not None and (glu not in GLU_CODES or weight.shape[0] % 2):
        raise ValueError(f"gemv: glu must be one of {sorted(GLU_CODES)} with an even number of weight rows, got "
                         f"{glu!r} and {tuple(weight.shape)}")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    N = weight.shape[0] // 2 if glu is not None else weight.shape[0]
    x = x.reshape(K).contiguous()

    def vec(t, n, what):
        if t is None:
            return x
        if t.numel() != n:
            raise ValueError(f"gemv: {what} must have {n} elements, got {tuple(t.shape)}")
        return t.reshape(n).contiguous()

    cargs, ckw = _conv_args(conv, N, x, glu is not None or residual is not None)
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    h = torch.empty(1, K, device=x.device, dtype=x.dtype) if add is not None else None
    cfg = _clip(config or CANDIDATES[0], max(N, 1), K)
    norm_group = 0 if norm_weight is None or norm_group in (0, K) else int(norm_group)   # 0: one group
    if norm_group and (K % norm_group or cfg.block_k % norm_group):
        raise ValueError(f"gemv: a norm over groups of {norm_group} needs K ({K}) and block_k ({cfg.block_k}) to be "
                         "multiples of it")
    if N or add is not None:
        _KERNEL[(max(1, math.ceil(N / cfg.block_n)),)](
            x, weight, bias if bias is not None else x, y, N, K, weight.stride(0),
            vec(add, K, "add"), h if h is not None else x, vec(gate, K, "gate"), vec(norm_weight, K, "norm_weight"),
            vec(residual, N, "residual"), float(eps), float(norm_offset), *cargs,
            HAS_BIAS=bias is not None, EVEN_N=N > 0 and N % cfg.block_n == 0, EVEN_K=K % cfg.block_k == 0,
            HAS_ADD=add is not None, HAS_GATE=gate is not None, NORM=norm_weight is not None,
            NORM_GROUP=norm_group,
            GLU=GLU_CODES[glu] if glu is not None else 0, HAS_RES=residual is not None,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **ckw, **_pdl_args(x.device, N, K, cfg.block_k, weight.element_size()))
    return (y, h) if add is not None else y
