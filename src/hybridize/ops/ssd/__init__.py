"""SSD op (Mamba-2 / discrete Mamba-2): dispatch point.

Layers call these names through this module (``from hybridize.ops import ssd; ssd.ssd_chunked(...)``).
``ssd_chunked`` runs the Triton kernel (:mod:`hybridize.ops.ssd.triton`, same signature and semantics)
when :func:`hybridize.ops._dispatch.use_kernels` says so and the kernel supports the shapes/dtypes
(fp32/bf16/fp16, P, N <= 256, L >= 1); otherwise the pure-PyTorch reference of
:mod:`hybridize.ops.ssd.reference`. The kernel module is imported lazily, on the first kernel call, so
importing this package never decorates Triton kernels (TRITON_INTERPRET is read at decoration) and
works without triton installed.

The references stay available as ``*_reference`` (``ssd_chunked_reference`` etc.).
"""
from typing import Optional

import torch
from torch import Tensor

from hybridize.ops._dispatch import use_kernels
from hybridize.ops.ssd.reference import (
    segsum,
    ssd_mixing_matrix,
    ssd_quadratic,
    ssd_recurrent,
)
from hybridize.ops.ssd.reference import ssd_chunked as ssd_chunked_reference
from hybridize.ops.ssd.reference import ssd_step as ssd_step_reference

ssd_quadratic_reference = ssd_quadratic
ssd_recurrent_reference = ssd_recurrent

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_MAX_PN = 256


def _kernel_ok(x: Tensor, Bm: Tensor) -> bool:
    return (x.dim() == 4 and Bm.dim() == 4 and x.dtype in _KERNEL_DTYPES and x.shape[1] > 0
            and 1 <= x.shape[-1] <= _KERNEL_MAX_PN and 1 <= Bm.shape[-1] <= _KERNEL_MAX_PN)


def ssd_chunked(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, *, chunk_size: int = 64,
                D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                dt_softplus: bool = False, dt_limit=(0.0, float("inf")),
                initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                return_final_state: bool = False,
                log_decay: Optional[Tensor] = None):
    """Chunked SSD. x (B,L,H,P), dt (B,L,H), A (H,), Bm/Cm (B,L,G,N); returns y (B,L,H,P)
    [, final_state (B,H,P,N) fp32]. See :func:`hybridize.ops.ssd.reference.ssd_chunked` for the
    exact semantics (the kernel matches them; its internal chunk is min(chunk_size, 64), which changes
    only rounding)."""
    kw = dict(chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
              initial_state=initial_state, seq_idx=seq_idx, return_final_state=return_final_state,
              log_decay=log_decay)
    if _kernel_ok(x, Bm) and use_kernels(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay):
        from hybridize.ops.ssd.triton import ssd_chunked_triton
        return ssd_chunked_triton(x, dt, A, Bm, Cm, **kw)
    return ssd_chunked_reference(x, dt, A, Bm, Cm, **kw)


def ssd_step(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, state: Tensor, *,
             D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
             dt_softplus: bool = False, dt_limit=(0.0, float("inf")), log_decay: Optional[Tensor] = None,
             A_log: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None, norm_eps: float = 1e-5,
             norm_group: int = 0):
    """One token, state (B,H,P,N) updated in place; x (B,Hx,P), Bm (B,Gb,N), Cm (B,Gc,N) with Hx, Gb,
    Gc dividing H (shared rows, read in place by the kernel); A (H,) or A_log (H,) (A = -exp(A_log))
    or log_decay (B,H); norm_weight (H·P,): Mamba-2's gated RMSNorm on the output, over groups of
    norm_group channels of a head. See reference.ssd_step; the fused Triton kernel (one read and one
    write of the state) on CUDA."""
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, log_decay=log_decay,
              A_log=A_log, norm_weight=norm_weight, norm_eps=norm_eps, norm_group=norm_group)
    if (x.dtype in _KERNEL_DTYPES and state.dtype in _KERNEL_DTYPES and Bm.shape[-1] <= _KERNEL_MAX_PN
            and use_kernels(x, dt, A, Bm, Cm, state, D, z, dt_bias, log_decay, A_log, norm_weight)):
        from hybridize.ops.ssd.triton_step import ssd_step_triton
        return ssd_step_triton(x, dt, A, Bm, Cm, state, **kw)
    return ssd_step_reference(x, dt, A, Bm, Cm, state, **kw)


__all__ = [
    "segsum",
    "ssd_chunked",
    "ssd_chunked_reference",
    "ssd_mixing_matrix",
    "ssd_quadratic",
    "ssd_quadratic_reference",
    "ssd_recurrent",
    "ssd_recurrent_reference",
    "ssd_step",
    "ssd_step_reference",
]
