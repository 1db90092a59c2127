"""Gated MLP (SwiGLU / GeGLU): down(act(gate(x)) * up(x)). Names match HF Llama / RecurrentGemma.
For inference, ``fuse_projections_()`` runs gate/up as one 2I × D matmul (`hybridize.layers.fused`)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hybridize.config import MLPConfig
from hybridize.layers.fused import FusedProjections
from hybridize.ops.gemv import fused_linear

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class GatedMLP(FusedProjections, nn.Module):
    _fused_names = ("gate_proj", "up_proj")

    def __init__(self, hidden_size: int, cfg: MLPConfig):
        super().__init__()
        self.activation = cfg.activation
        self.act = _ACTIVATIONS[cfg.activation]
        self.gate_proj = nn.Linear(hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.up_proj = nn.Linear(hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, hidden_size, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) → (..., D)."""
        gate, up = self._project(x)                 # one matmul when fused
        return self.down_proj(self.act(gate) * up)

    def residual_step(self, x: Tensor, norm: nn.Module) -> Tensor:
        """The MLP half of a pre-norm block at decode: x + mlp(norm(x)). x: (..., D).

        At batch 1 on CUDA (fused gate/up, tuned GEMV variants) that is two kernels: [RMSNorm, gate/up
        GEMV, act(gate) · up] and [down GEMV + x] (`hybridize.ops.gemv.fused_linear`); else the same ops
        one by one."""
        f = self._inference_fused()
        if f is None:
            return x + self(norm(x))
        gu = fused_linear(x, f.weight, f.bias, norm=norm, glu=self.activation)
        return fused_linear(gu, self.down_proj.weight, self.down_proj.bias, residual=x)
