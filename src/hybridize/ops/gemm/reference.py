"""Reference for the skinny decode GEMM: y (M, N) = x (M, K) · W (N, K)ᵀ (+ b), fp32 accumulation."""
from __future__ import annotations

from typing import Optional

from torch import Tensor


def skinny_gemm_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x (M, K), weight (N, K), bias (N,) or None → y (M, N) in x's dtype (math in fp32)."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
