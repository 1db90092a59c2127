"""Mamba-1 selective scan: dispatch point.

``selective_scan`` and ``selective_scan_step`` run the Triton kernels (:mod:`.triton`,
:mod:`.triton_step`; same signatures and semantics) when :func:`hybridize.ops._dispatch.use_kernels`
says so and the kernel supports the shapes (16/32-bit floats; d_state <= 64 for the scan,
<= 256 for the step); otherwise the pure-PyTorch references of :mod:`.reference`. Kernel modules
are imported lazily, on the first kernel call, so importing this package never decorates Triton
kernels (TRITON_INTERPRET is read at decoration) and works without triton installed.

The references stay available as ``selective_scan_reference`` / ``selective_scan_step_reference``
(and ``selective_scan_chunked``, a second reference form).
"""
from typing import Optional

import torch
from torch import Tensor

from hybridize.ops._dispatch import use_kernels
from hybridize.ops.selective_scan.reference import selective_scan as selective_scan_reference
from hybridize.ops.selective_scan.reference import selective_scan_chunked
from hybridize.ops.selective_scan.reference import selective_scan_step as selective_scan_step_reference

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_SCAN_MAX_N = 64
_STEP_MAX_N = 256


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, *,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                   return_final_state: bool = False):
    """u, delta (B, L, C); A (C, N); Bm, Cm (B, L, N) | (B, L, G, N); D (C,); z (B, L, C); delta_bias (C,);
    initial_state (B, C, N); seq_idx (B, L). Returns y (B, L, C) [, final state (B, C, N) fp32]. See
    :func:`hybridize.ops.selective_scan.reference.selective_scan` for the semantics."""
    kw = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, initial_state=initial_state,
              seq_idx=seq_idx, return_final_state=return_final_state)
    if (u.dim() == 3 and u.dtype in _FLOATS and A.dim() == 2 and 1 <= A.shape[1] <= _SCAN_MAX_N
            and Bm.dim() == Cm.dim()
            and use_kernels(u, delta, A, Bm, Cm, D, z, delta_bias, initial_state, seq_idx)):
        from hybridize.ops.selective_scan.triton import selective_scan_triton
        return selective_scan_triton(u, delta, A, Bm, Cm, **kw)
    return selective_scan_reference(u, delta, A, Bm, Cm, **kw)


def selective_scan_step(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor, *,
                        D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                        delta_bias: Optional[Tensor] = None, delta_softplus: bool = False) -> Tensor:
    """One token. u, delta (B, C); Bm, Cm (B, N) | (B, G, N); state (B, C, N) updated in place.
    Returns y (B, C) in u's dtype."""
    kw = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    if (u.dtype in _FLOATS and state.dtype in _FLOATS and A.dim() == 2 and 1 <= A.shape[1] <= _STEP_MAX_N
            and use_kernels(u, delta, A, Bm, Cm, state, D, z, delta_bias)):
        from hybridize.ops.selective_scan.triton_step import selective_scan_step_triton
        return selective_scan_step_triton(u, delta, A, Bm, Cm, state, **kw)
    return selective_scan_step_reference(u, delta, A, Bm, Cm, state, **kw)


__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_reference", "selective_scan_step",
           "selective_scan_step_reference"]
