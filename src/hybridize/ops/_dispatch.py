"""Decide whether the Triton kernels or the PyTorch references run."""
from __future__ import annotations

import os

import torch


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_kernels(*tensors: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors when triton is importable, unless HYBRIDIZE_KERNELS=0.
    HYBRIDIZE_KERNELS=1 forces them (e.g. on CPU under TRITON_INTERPRET=1, for tests)."""
    flag = os.environ.get("HYBRIDIZE_KERNELS", "auto").lower()
    if flag in ("0", "off", "false", "reference"):
        return False
    if not triton_available():
        return False
    if flag in ("1", "on", "true", "triton"):
        return True
    return all(t.is_cuda for t in tensors if t is not None)
