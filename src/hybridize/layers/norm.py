"""RMSNorm and the gated (group-wise) RMSNorm of Mamba-2."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * (offset + weight), computed in fp32.

    offset = 0 for Llama-style norms, 1 for Gemma-style norms whose weight is stored as (scale - 1).
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (self.offset + self.weight.float())).to(dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's gated RMSNorm: norm(y * silu(z)) (norm_before_gate=False, the Mamba-2 default) or
    norm(y) * silu(z), normalised over groups of `group_size` channels (group-wise so that tensor
    parallelism needs no extra all-reduce)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = False):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        if dim % self.group_size:
            raise ValueError(f"GatedRMSNorm: dim {dim} is not a multiple of group_size {self.group_size}")
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Optional[Tensor] = None) -> Tensor:
        dtype = y.dtype
        yf = y.float()
        if z is not None and not self.norm_before_gate:
            yf = yf * F.silu(z.float())
        shape = yf.shape
        g = yf.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        yf = g.reshape(shape) * self.weight.float()
        if z is not None and self.norm_before_gate:
            yf = yf * F.silu(z.float())
        return yf.to(dtype)
