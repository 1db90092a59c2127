"""Gated MLP (SwiGLU / GeGLU): down(act(gate(x)) * up(x)). Names match HF Llama / RecurrentGemma.
For inference, ``fuse_projections_()`` runs gate/up as one 2I × D matmul (`hybridize.layers.fused`)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hybridize.config import MLPConfig
from hybridize.layers.fused import FusedProjections

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class GatedMLP(FusedProjections, nn.Module):
    _fused_names = ("gate_proj", "up_proj")

    def __init__(self, hidden_size: int, cfg: MLPConfig):
        super().__init__()
        self.act = _ACTIVATIONS[cfg.activation]
        self.gate_proj = nn.Linear(hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.up_proj = nn.Linear(hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, hidden_size, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) → (..., D)."""
        gate, up = self._project(x)                 # one matmul when fused
        return self.down_proj(self.act(gate) * up)
