"""Last-dim argmax (greedy decoding): the Triton kernels (`triton.py`) on CUDA for rows of >= 2 · CHUNK
logits, torch's argmax otherwise; both give torch's index (first maximum, NaN as the maximum)."""
from torch import Tensor

from hybridize.ops._dispatch import use_kernels
from hybridize.ops.argmax import triton as kernels  # triton itself is imported on first launch
from hybridize.ops.argmax.reference import argmax_reference


def argmax(x: Tensor) -> Tensor:
    """x (..., V) → int64 (...)."""
    if x.dtype.is_floating_point and x.shape[-1] >= 2 * kernels.CHUNK and x.numel() and use_kernels(x):
        lead = x.shape[:-1]
        return kernels.argmax_triton(x.reshape(-1, x.shape[-1])).view(lead)
    return argmax_reference(x)


__all__ = ["argmax", "argmax_reference"]
