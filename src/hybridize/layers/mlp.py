"""Gated MLP (SwiGLU / GeGLU): down(act(gate(x)) * up(x)). Names match HF Llama / RecurrentGemma."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hybridize.config import MLPConfig

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, cfg: MLPConfig):
        super().__init__()
        self.act = _ACTIVATIONS[cfg.activation]
        self.gate_proj = nn.Linear(hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.up_proj = nn.Linear(hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, hidden_size, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) → (..., D)."""
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
