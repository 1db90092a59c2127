"""Triton kernel for Mamba-1's one-token selective-scan step (decoding).

Semantics are exactly those of :func:`hybridize.ops.selective_scan.reference.selective_scan_step`
(per batch row b, channel c, state index n; g(c) = c // (C // G) for grouped B/C, else shared):

    dt    = softplus?(delta[c] + delta_bias[c])
    h[n]  = exp(dt·A[c, n])·h[n] + dt·u[c]·B[g(c), n]          fp32 math whatever the state dtype
    y     = Σ_n C[g(c), n]·h[n] + D[c]·u[c],   y *= silu(z[c])

Kernel: ``_ss_step_kernel`` — grid (B · ⌈C/BC⌉) flattened; each program loads a (BC, N) block of the
state once, updates it in registers, stores it once (in place, in the state's dtype) and reduces y.
A (C, N) is read by every batch row but stays in L2 (it is B times smaller than the state).

HBM floor (bytes that must move; S = B·C·N state elements of e_s bytes, e_x the activation size)
----------------------------------------------------------------------------------------------
    2·S·e_s (state read + write) + C·N·4 (A, once) + B·C·e_x·(3 + [z]) (u, delta, y, z) + 2·B·G·N·e_x.
Mamba-1 2.8B (d_inner 5120, N = 16), batch 64, fp32 state: 2·5.24M·4 = 42 MB → 12.5 µs at 3.35 TB/s.

Registered as ``torch.ops.hybridize.selective_scan_step`` (``torch.library.custom_op`` with a fake;
state declared mutated) for torch.compile / CUDA graphs; no host synchronisation.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

TUNE = {"tile": 2048, "warps": 4}   # state elements per program; BC = tile // next_pow2(N)


@triton.jit
def _softplus(v):
    # torch.nn.functional.softplus (threshold 20); log1p(e) as log(u)·e/(u − 1), u = 1 + e
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    sp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(v > 20.0, v, sp)


@triton.jit
def _ss_step_kernel(u_ptr, d_ptr, A_ptr, B_ptr, C_ptr, s_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                    C, N, n_cblk, ch_per_group,
                    sub, sdb, sAc, sAn, sBb, sBg, sCb, sCg, ssb, ssc, ssn, szb, syb,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_cblk).to(tl.int64)
    c = (pid % n_cblk) * BC + tl.arange(0, BC)
    n = tl.arange(0, BN)
    cm = c < C
    nm = n < N
    m = cm[:, None] & nm[None, :]
    c64 = c.to(tl.int64)

    sp = s_ptr + b * ssb + c64[:, None] * ssc + n[None, :] * ssn
    s = tl.load(sp, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)

    uv = tl.load(u_ptr + b * sub + c, mask=cm, other=0.0).to(tl.float32)
    dt = tl.load(d_ptr + b * sdb + c, mask=cm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    Av = tl.load(A_ptr + c64[:, None] * sAc + n[None, :] * sAn, mask=m, other=0.0).to(tl.float32)
    g = (c // ch_per_group)[:, None]          # sBg = 0 for B/C shared by all channels
    Bv = tl.load(B_ptr + b * sBb + g * sBg + n[None, :], mask=m, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * sCb + g * sCg + n[None, :], mask=m, other=0.0).to(tl.float32)

    s = tl.exp(dt[:, None] * Av) * s + (dt * uv)[:, None] * Bv
    tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=m, eviction_policy="evict_first")

    y = tl.sum(s * Cv, axis=1)
    if HAS_D:
        y += tl.load(D_ptr + c, mask=cm, other=0.0).to(tl.float32) * uv
    if HAS_Z:
        zv = tl.load(z_ptr + b * szb + c, mask=cm, other=0.0).to(tl.float32)
        y *= zv * tl.sigmoid(zv)
    tl.store(y_ptr + b * syb + c, y.to(y_ptr.dtype.element_ty), mask=cm)


def _unit_last(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _step_impl(u, delta, A, Bm, Cm, state, D, z, delta_bias, delta_softplus):
    Bsz, C = u.shape
    N = A.shape[1]
    if tuple(state.shape) != (Bsz, C, N) or delta.shape != u.shape or A.shape[0] != C:
        raise ValueError(f"selective_scan_step: expected u, delta (B, C), A (C, N), state (B, C, N); got u "
                         f"{tuple(u.shape)}, delta {tuple(delta.shape)}, A {tuple(A.shape)}, "
                         f"state {tuple(state.shape)}")
    grouped = Bm.dim() == 3
    G = Bm.shape[1] if grouped else 1
    if C % G:
        raise ValueError(f"selective_scan_step: {C} channels are not a multiple of {G} B/C groups")
    u, delta, z, Bm, Cm = _unit_last(u), _unit_last(delta), _unit_last(z), _unit_last(Bm), _unit_last(Cm)
    D = D.contiguous() if D is not None else None
    bias = delta_bias.contiguous() if delta_bias is not None else None
    y = torch.empty(Bsz, C, device=u.device, dtype=u.dtype)
    if y.numel() == 0:
        return y
    BN = max(2, triton.next_power_of_2(N))
    BC = max(1, min(triton.next_power_of_2(C), int(TUNE["tile"]) // BN))
    n_cblk = triton.cdiv(C, BC)
    sBg = Bm.stride(1) if grouped else 0
    sCg = Cm.stride(1) if grouped else 0
    _ss_step_kernel[(Bsz * n_cblk,)](
        u, delta, A, Bm, Cm, state, D if D is not None else u, z if z is not None else u,
        bias if bias is not None else u, y,
        C, N, n_cblk, C // G,
        u.stride(0), delta.stride(0), A.stride(0), A.stride(1), Bm.stride(0), sBg, Cm.stride(0), sCg,
        *state.stride(), z.stride(0) if z is not None else 0, y.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=bool(delta_softplus),
        BC=BC, BN=BN, num_warps=int(TUNE["warps"]))
    return y


@torch.library.custom_op("hybridize::selective_scan_step", mutates_args=("state",))
def _ss_step_op(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor,
                D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                delta_softplus: bool) -> Tensor:
    return _step_impl(u, delta, A, Bm, Cm, state, D, z, delta_bias, delta_softplus)


@_ss_step_op.register_fake
def _(u, delta, A, Bm, Cm, state, D, z, delta_bias, delta_softplus):
    return torch.empty_like(u)


def selective_scan_step_triton(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor, *,
                               D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                               delta_bias: Optional[Tensor] = None, delta_softplus: bool = False) -> Tensor:
    """One token. u, delta (B, C); A (C, N); Bm, Cm (B, N) or (B, G, N); state (B, C, N) (fp32/bf16/fp16,
    any strides) updated IN PLACE; D (C,); z (B, C); delta_bias (C,). Returns y (B, C) in u's dtype.
    Same semantics as :func:`hybridize.ops.selective_scan.reference.selective_scan_step`."""
    args = (u, delta, A, Bm, Cm, state, D, z, delta_bias, bool(delta_softplus))
    if torch.compiler.is_compiling():
        return torch.ops.hybridize.selective_scan_step(*args)
    return _step_impl(*args)


__all__ = ["TUNE", "selective_scan_step_triton"]
