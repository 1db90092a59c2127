"""Reference for the decode GEMV: y = x · Wᵀ + b for one input row, fp32 accumulation."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def gemv_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x (1, K), weight (N, K), bias (N,) or None → (1, N) in x's dtype, accumulated in fp32."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
