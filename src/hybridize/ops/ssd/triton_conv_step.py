"""Triton kernel: Mamba-2's decode step from the in_proj's raw conv channels — the causal conv1d step and
the SSD state update in one launch (batched decode; batch 1 runs the conv in the in_proj GEMV's epilogue).

Semantics: :func:`hybridize.ops.ssd.reference.ssd_conv_step` = ``causal_conv1d_update`` (output rounded to
xbc's dtype) then ``ssd_step``, bit-for-bit the two kernels it replaces (`_conv_update_kernel`,
`_ssd_step_kernel`) up to the order of nothing: every value is computed by the same formula in the same
order.

Why one program per (row b, block of R heads): a conv channel must have exactly one owner — its state is
shifted in place — and x / B / C rows are shared by heads (Mamba-in-the-Llama: x and B per kv head, read by
4 query heads; standard Mamba-2: B and C per group). R = lcm(H/n_x, H/n_b, H/n_c) heads share no row with
any other block, so the block's program convolves those rows once (keeping them in registers for its
heads) and is the only writer of their conv state. The heads' state tiles are then updated one after
another (the loop is unrolled: their loads can be in flight together).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridize.ops.pdl import pdl_launch
from hybridize.ops.ssd.reference import conv_step_split
from hybridize.ops.ssd.triton_step import MAX_N, TUNE, _D_args, _dt_and_decay, _skip_gate, _vec

#: most heads one program updates (R above this: the separate conv and step kernels)
MAX_HEADS_PER_PROGRAM = 8
#: widest conv the kernel unrolls (as the conv op's kernels)
MAX_W = 4


@triton.jit
def _conv_rows(xbc_ptr, cs_ptr, cw_ptr, cb_ptr, ch, cm, scs_c, scs_k, scw_c, scw_k,
               W: tl.constexpr, HAS_CB: tl.constexpr, SILU: tl.constexpr):
    """Conv step of channels ch (this program owns them): window [state[0..W-2], x] · weight (+ bias), silu,
    rounded to xbc's dtype (the conv op's output) and back to fp32; the state shifted in place. The order
    of the sum is `_conv_update_kernel`'s."""
    xv = tl.load(xbc_ptr + ch, mask=cm, other=0.0)
    acc = xv.to(tl.float32) * tl.load(cw_ptr + ch * scw_c + (W - 1) * scw_k, mask=cm, other=0.0).to(tl.float32)
    st = cs_ptr + ch.to(tl.int64) * scs_c
    for k in tl.static_range(W - 1):
        sk = tl.load(st + k * scs_k, mask=cm, other=0.0)
        acc += sk.to(tl.float32) * tl.load(cw_ptr + ch * scw_c + k * scw_k, mask=cm, other=0.0).to(tl.float32)
        if k > 0:       # slot k-1 was read (by this thread) in the previous iteration
            tl.store(st + (k - 1) * scs_k, sk, mask=cm)
    if W > 1:
        tl.store(st + (W - 2) * scs_k, xv.to(cs_ptr.dtype.element_ty), mask=cm)
    if HAS_CB:
        acc += tl.load(cb_ptr + ch, mask=cm, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    return acc.to(xbc_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _ssd_conv_step_kernel(xbc_ptr, cs_ptr, cw_ptr, cb_ptr, dt_ptr, A_ptr, s_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                          H, P, N, b_off, c_off, n_blk,
                          sxb, scsb, scsc, scsk, scwc, scwk, sdb, ssb, ssh, ssp, ssn, szb, szh, syb, syh, sDh,
                          dt_min, dt_max,
                          R: tl.constexpr, X_REP: tl.constexpr, B_REP: tl.constexpr, C_REP: tl.constexpr,
                          W: tl.constexpr, HAS_CB: tl.constexpr, SILU: tl.constexpr,
                          HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
                          HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, A_LOG: tl.constexpr,
                          EVICT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                          PDL: tl.constexpr = 0, NORM: tl.constexpr = 0, GS: tl.constexpr = 1,
                          NGP: tl.constexpr = 1, nw_ptr=None, eps=0.0):
    """Program (b, block j): heads j·R … j·R + R - 1, their x rows (h // X_REP), B groups (h // B_REP) and
    C groups (h // C_REP) — convolved once each, in registers — then each head's (P, N) state update as
    `_ssd_step_kernel` with the whole head in one tile (BP ≥ P)."""
    if PDL:    # see hybridize.ops.pdl: wait for the previous kernel before any read or write
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    j = pid % n_blk
    b = (pid // n_blk).to(tl.int64)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    m = pm[:, None] & nm[None, :]
    xrow = xbc_ptr + b * sxb
    cs = cs_ptr + b * scsb
    xv = tl.zeros([BP], dtype=tl.float32)
    Bv = tl.zeros([BN], dtype=tl.float32)
    Cv = tl.zeros([BN], dtype=tl.float32)
    for r in tl.static_range(R):
        h = j * R + r
        if r % X_REP == 0:
            xv = _conv_rows(xrow, cs, cw_ptr, cb_ptr, (h // X_REP) * P + p, pm, scsc, scsk, scwc, scwk,
                            W, HAS_CB, SILU)
        if r % B_REP == 0:
            Bv = _conv_rows(xrow, cs, cw_ptr, cb_ptr, b_off + (h // B_REP) * N + n, nm, scsc, scsk, scwc, scwk,
                            W, HAS_CB, SILU)
        if r % C_REP == 0:
            Cv = _conv_rows(xrow, cs, cw_ptr, cb_ptr, c_off + (h // C_REP) * N + n, nm, scsc, scsk, scwc, scwk,
                            W, HAS_CB, SILU)
        sp = s_ptr + b * ssb + h.to(tl.int64) * ssh + p[:, None].to(tl.int64) * ssp + n[None, :] * ssn
        if EVICT:
            s = tl.load(sp, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
        else:
            s = tl.load(sp, mask=m, other=0.0).to(tl.float32)
        dt, a = _dt_and_decay(dt_ptr + b * sdb + h, dt_ptr, A_ptr, bias_ptr, h, dt_min, dt_max,
                              HAS_BIAS, SOFTPLUS, False, A_LOG)
        s = s * tl.exp(a) + (dt * xv)[:, None] * Bv[None, :]
        if EVICT:
            tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=m, eviction_policy="evict_first")
        else:
            tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=m)
        y = tl.sum(s * Cv[None, :], axis=1)
        y = _skip_gate(y, xv, D_ptr, z_ptr + b * szb + h * szh, h, p, pm, sDh, HAS_D, D_PER_P, HAS_Z)
        if NORM:    # group sums through a (BP, groups) one-hot: P need not be a power of two
            member = ((p // GS)[:, None] == tl.arange(0, NGP)[None, :]) & pm[:, None]
            rg = 1.0 / tl.sqrt(tl.sum(tl.where(member, (y * y)[:, None], 0.0), axis=0) / GS + eps)
            y = y * tl.sum(tl.where(member, rg[None, :], 0.0), axis=1)
            y = y * tl.load(nw_ptr + h * P + p, mask=pm, other=0.0).to(tl.float32)
        tl.store(y_ptr + b * syb + h * syh + p, y.to(y_ptr.dtype.element_ty), mask=pm)


def heads_per_program(H: int, n_x: int, n_b: int, n_c: int) -> int:
    """R = lcm(H / n_x, H / n_b, H / n_c): the fewest consecutive heads that share no x / B / C row with others."""
    return math.lcm(H // n_x, H // n_b, H // n_c)


def kernel_supports(xbc: Tensor, conv_weight: Tensor, state: Tensor, n_x: int, n_b: int) -> bool:
    """Shapes the fused kernel takes (else the dispatcher runs the conv op and ssd_step): float dtypes, W ≤
    MAX_W, N ≤ MAX_N and at most MAX_HEADS_PER_PROGRAM heads per program."""
    fl = (torch.float32, torch.bfloat16, torch.float16)
    if xbc.dtype not in fl or state.dtype not in fl or state.dim() != 4 or conv_weight.dim() != 2:
        return False
    H, P, N = state.shape[1:]
    rest = xbc.shape[-1] - n_x * P - n_b * N
    if not (1 <= conv_weight.shape[1] <= MAX_W and 1 <= N <= MAX_N and P <= 256 and n_x > 0 and n_b > 0
            and rest > 0 and rest % N == 0 and H % n_x == 0 and H % n_b == 0 and H % (rest // N) == 0):
        return False
    return heads_per_program(H, n_x, n_b, rest // N) <= MAX_HEADS_PER_PROGRAM


def _conv_step_impl(xbc, conv_state, conv_weight, conv_bias, dt, state, n_x, n_b, A, A_log, D, z, dt_bias,
                    dt_softplus, dt_min, dt_max, norm_weight, norm_eps, norm_group, silu):
    n_x, n_b, n_c = conv_step_split(xbc, state, n_x, n_b)
    Bsz, H, P, N = state.shape
    C, W = conv_weight.shape
    if tuple(conv_state.shape) != (Bsz, C, W - 1) or tuple(dt.shape) != (Bsz, H):
        raise ValueError(f"ssd_conv_step: conv_state must be (B, C, W-1) = {(Bsz, C, W - 1)} and dt (B, H) = "
                         f"{(Bsz, H)}; got {tuple(conv_state.shape)} and {tuple(dt.shape)}")
    if (A is None) == (A_log is None):
        raise ValueError("ssd_conv_step: pass exactly one of A (H,) or A_log (H,)")
    xbc = xbc if xbc.stride(-1) == 1 else xbc.contiguous()
    dt = dt if dt.stride(-1) == 1 else dt.contiguous()
    z = z if z is None or z.stride(-1) == 1 else z.contiguous()
    D, d_per_p, sDh = _D_args(D)
    A = _vec(A_log if A is None else A)
    dt_bias = _vec(dt_bias)
    y = torch.empty(Bsz, H, P, device=xbc.device, dtype=xbc.dtype)
    if y.numel() == 0:
        return y
    R = heads_per_program(H, n_x, n_b, n_c)
    BP, BN = triton.next_power_of_2(P), max(2, triton.next_power_of_2(N))
    norm = {}
    if norm_weight is not None:
        gs = int(norm_group) or P
        if P % gs or norm_weight.numel() != H * P:
            raise ValueError(f"ssd_conv_step: norm_weight must have H·P = {H * P} elements and norm_group ({gs}) "
                             f"divide P = {P}; got {norm_weight.numel()} elements")
        norm = dict(NORM=1, GS=gs, NGP=triton.next_power_of_2(P // gs), nw_ptr=norm_weight.contiguous(),
                    eps=float(norm_eps))
    n_blk = H // R
    zs = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
    warps = max(1, min(16, BP * BN // 1024)) if not TUNE["step_warps"] else int(TUNE["step_warps"])
    _ssd_conv_step_kernel[(Bsz * n_blk,)](
        xbc, conv_state, conv_weight, conv_bias if conv_bias is not None else xbc, dt, A, state,
        D if D is not None else xbc, z if z is not None else xbc, dt_bias if dt_bias is not None else dt, y,
        H, P, N, n_x * P, n_x * P + n_b * N, n_blk,
        xbc.stride(0), *conv_state.stride(), *conv_weight.stride(), dt.stride(0), *state.stride(), *zs,
        y.stride(0), y.stride(1), sDh, float(dt_min), float(dt_max),
        R=R, X_REP=H // n_x, B_REP=H // n_b, C_REP=H // n_c, W=W, HAS_CB=conv_bias is not None, SILU=bool(silu),
        HAS_D=D is not None, D_PER_P=d_per_p, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), A_LOG=A_log is not None, EVICT=bool(TUNE["evict_first"]), BP=BP, BN=BN,
        num_warps=warps, **pdl_launch(xbc.device), **norm)
    return y


@torch.library.custom_op("hybridize::ssd_conv_step", mutates_args=("conv_state", "state"))
def _ssd_conv_step_op(xbc: Tensor, conv_state: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                      dt: Tensor, state: Tensor, n_x: int, n_b: int, A: Optional[Tensor], A_log: Optional[Tensor],
                      D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool,
                      dt_min: float, dt_max: float, norm_weight: Optional[Tensor], norm_eps: float,
                      norm_group: int, silu: bool) -> Tensor:
    return _conv_step_impl(xbc, conv_state, conv_weight, conv_bias, dt, state, n_x, n_b, A, A_log, D, z, dt_bias,
                           dt_softplus, dt_min, dt_max, norm_weight, norm_eps, norm_group, silu)


@_ssd_conv_step_op.register_fake
def _(xbc, conv_state, conv_weight, conv_bias, dt, state, n_x, n_b, A, A_log, D, z, dt_bias, dt_softplus, dt_min,
      dt_max, norm_weight, norm_eps, norm_group, silu):
    conv_step_split(xbc, state, n_x, n_b)            # the same errors while tracing
    return xbc.new_empty(state.shape[:3])


def ssd_conv_step_triton(xbc: Tensor, conv_state: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                         dt: Tensor, state: Tensor, *, n_x: int, n_b: int, A: Optional[Tensor] = None,
                         A_log: Optional[Tensor] = None, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                         dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                         dt_limit=(0.0, float("inf")), norm_weight: Optional[Tensor] = None, norm_eps: float = 1e-5,
                         norm_group: int = 0, activation: Optional[str] = "silu") -> Tensor:
    """The fused kernel (see the module docstring and reference.ssd_conv_step); conv_state (B, C, W-1) and
    state (B, H, P, N) are updated in place (any strides); xbc / dt / z rows may be strided views (of the
    in_proj output). No host synchronisation (CUDA-graph capturable)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"ssd_conv_step: activation must be None or 'silu', got {activation!r}")
    args = (xbc, conv_state, conv_weight, conv_bias, dt, state, int(n_x), int(n_b), A, A_log, D, z, dt_bias,
            bool(dt_softplus), float(dt_limit[0]), float(dt_limit[1]), norm_weight, float(norm_eps),
            int(norm_group), activation is not None)
    if torch.compiler.is_compiling():
        return torch.ops.hybridize.ssd_conv_step(*args)
    return _conv_step_impl(*args)
