"""Causal depthwise conv1d: dispatches to the Triton kernel on CUDA, else the reference.

Same names and signatures as :mod:`hybridize.ops.conv1d.reference`. The kernel module is imported
lazily, on the first kernel call, so that importing this package never decorates Triton kernels
(TRITON_INTERPRET is read when they are decorated) and works without triton installed.
"""
from typing import Optional

from torch import Tensor

from hybridize.ops._dispatch import use_kernels
from hybridize.ops.conv1d import reference

_KERNEL_MAX_W = 4


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                  initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                  activation: Optional[str] = None, return_final_state: bool = False):
    """x: (B, L, C); weight: (C, W); bias: (C,); initial_state: (B, C, W-1); seq_idx: (B, L).

    Returns y (B, L, C) and, if requested, the final conv state (B, C, W-1).
    See :func:`hybridize.ops.conv1d.reference.causal_conv1d` for the exact semantics.
    """
    if weight.shape[-1] <= _KERNEL_MAX_W and use_kernels(x, weight, bias, initial_state, seq_idx):
        from hybridize.ops.conv1d.triton import causal_conv1d_triton
        return causal_conv1d_triton(x, weight, bias, initial_state=initial_state, seq_idx=seq_idx,
                                    activation=activation, return_final_state=return_final_state)
    return reference.causal_conv1d(x, weight, bias, initial_state=initial_state, seq_idx=seq_idx,
                                   activation=activation, return_final_state=return_final_state)


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = None) -> Tensor:
    """One step. x: (B, C); conv_state: (B, C, W-1), updated in place. Returns y (B, C)."""
    if weight.shape[-1] <= _KERNEL_MAX_W and use_kernels(x, conv_state, weight, bias):
        from hybridize.ops.conv1d.triton import causal_conv1d_update_triton
        return causal_conv1d_update_triton(x, conv_state, weight, bias, activation)
    return reference.causal_conv1d_update(x, conv_state, weight, bias, activation)


__all__ = ["causal_conv1d", "causal_conv1d_update"]
