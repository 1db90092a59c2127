"""Reference for the decode GEMV: y = x · Wᵀ + b for one input row, fp32 accumulation, and its fused
variant (residual add / gate / RMSNorm prologue, GLU / residual epilogue) used by the decode step."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridize.ops.conv1d.reference import causal_conv1d_update

#: the GLU activations the fused epilogue supports
GLU_ACTS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def gemv_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x (1, K), weight (N, K), bias (N,) or None → (1, N) in x's dtype, accumulated in fp32."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gemv_fused_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                         add: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                         norm_weight: Optional[Tensor] = None, eps: float = 0.0, norm_offset: float = 0.0,
                         norm_group: int = 0, glu: Optional[str] = None, residual: Optional[Tensor] = None,
                         conv=None):
    """The fused decode GEMV / skinny GEMM, input rows x (M, K) (M = 1: the GEMV), in fp32 with one rounding
    per output:

        h = round(x + add)                       (the residual stream, in x's dtype; h = x without add)
        u = h · silu(gate)                       (gate (M, K), optional)
        u = u · rsqrt(mean(u²) + eps) · (norm_offset + norm_weight)   (RMSNorm, optional; the mean over
                                                                 groups of `norm_group` channels if > 0)
        z = u · Wᵀ + b
        y = act(z[:, :N']) · z[:, N':]           (glu: W holds the gate rows, then the up rows; N' = N / 2)
        y = y + residual                         (optional)
        y[s:s+C] = conv_step(round(y[s:s+C]))    (conv: a `triton.ConvUpdate`; its state updated in place)

    Returns y (M, N or N') in x's dtype, and h (M, K) too when `add` is given."""
    M = x.numel() // x.shape[-1] if x.shape[-1] else 1
    h = x if add is None else (x.float() + add.float().reshape(x.shape)).to(x.dtype)
    u = h.float().reshape(M, -1)
    if gate is not None:
        u = u * F.silu(gate.float().reshape(M, -1))
    if norm_weight is not None:
        g = u.reshape(M, -1, norm_group or u.shape[-1])
        u = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).reshape(u.shape)
        u = u * (norm_offset + norm_weight.float())
    z = u @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    if glu is not None:
        g, up = z.chunk(2, dim=-1)
        z = GLU_ACTS[glu](g) * up
    if residual is not None:
        z = z + residual.float().reshape(M, -1)
    y = z.to(x.dtype)
    if conv is not None:
        lo, C = conv.start, conv.weight.shape[0]
        state = conv.state if conv.state.dim() == 3 else conv.state[None]
        y[:, lo:lo + C] = causal_conv1d_update(y[:, lo:lo + C], state, conv.weight, conv.bias, conv.activation)
    return (y, h.reshape(M, -1)) if add is not None else y


__all__ = ["gemv_reference", "gemv_fused_reference", "GLU_ACTS"]
