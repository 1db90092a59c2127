"""Element-wise gated linear recurrence (the scan inside Griffin's RG-LRU; also Hawk / HGRN-style).

h_t = a_t * h_{t-1} + x_t, with h_{t-1} := 0 where `reset[t]` (a document starts at t).
The gates (a_t, the √(1-a²) input normalisation, i_t ⊙ x_t) are computed by the layer; this op is
only the scan, so the kernel and the reference share one exact definition.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def rglru_scan(x: Tensor, a: Tensor, *, initial_state: Optional[Tensor] = None,
               reset: Optional[Tensor] = None, return_final_state: bool = True):
    """x, a: (B, L, C); initial_state: (B, C) (fp32 recommended); reset: (B, L) bool.

    Returns h (B, L, C) in x's dtype and, if requested, the final state (B, C) in fp32.
    Sequential loop in fp32: the readable ground truth.
    """
    Bsz, L, C = x.shape
    h = x.new_zeros(Bsz, C, dtype=torch.float32) if initial_state is None else initial_state.float()
    xf, af = x.float(), a.float()
    out = []
    for t in range(L):
        if reset is not None:
            h = torch.where(reset[:, t, None], torch.zeros_like(h), h)
        h = af[:, t] * h + xf[:, t]
        out.append(h)
    y = torch.stack(out, dim=1).to(x.dtype) if L else x.new_zeros(Bsz, 0, C)
    return (y, h) if return_final_state else y


def rglru_step(x: Tensor, a: Tensor, state: Tensor) -> Tensor:
    """One step: x, a: (B, C); state (B, C) updated in place. Returns the new h in x's dtype."""
    h = a.float() * state.float() + x.float()
    state.copy_(h.to(state.dtype))
    return h.to(x.dtype)
