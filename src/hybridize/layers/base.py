"""The interface every sequence mixer implements, and helpers for packed batches.

See docs/ARCHITECTURE.md for the full contract (state semantics, ``seq_idx``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn


def doc_starts(seq_idx: Optional[Tensor]) -> Optional[Tensor]:
    """(B, L) document ids → (B, L) bool, true where a new document starts (position 0 is never true:
    the document at position 0 continues from the state passed in)."""
    if seq_idx is None:
        return None
    starts = torch.zeros_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def position_ids_from_seq_idx(seq_idx: Optional[Tensor], batch_size: int, seqlen: int,
                              offset: Optional[Tensor] = None, device=None) -> Tensor:
    """Positions that restart at 0 at every document start.

    offset: (B,) tokens already seen (e.g. a KV cache's lengths); it shifts the first document only,
    since later documents of the chunk do not see the cached context.
    """
    ar = torch.arange(seqlen, device=device if seq_idx is None else seq_idx.device)
    if seq_idx is None:
        pos = ar.expand(batch_size, seqlen)
        return pos + offset[:, None] if offset is not None else pos.clone()
    starts = doc_starts(seq_idx)
    starts[:, 0] = True
    # index of the most recent document start at or before t
    last_start = torch.where(starts, ar, torch.zeros_like(ar)).cummax(dim=1).values
    pos = ar - last_start
    if offset is not None:
        first_doc = seq_idx == seq_idx[:, :1]
        pos = pos + torch.where(first_doc, offset[:, None], torch.zeros_like(pos))
    return pos


class MixerState:
    """Base class of mixer states: a dataclass whose fields are tensors (or None)."""

    def tensors(self):
        return [getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), Tensor)]

    def state_bytes(self) -> int:
        """Bytes held by this state for the whole batch."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def copy_(self, other: "MixerState") -> "MixerState":
        """In-place copy of another state of the same shapes (CUDA-graph friendly)."""
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, Tensor):
                a.copy_(b)
        return self

    def clone(self) -> "MixerState":
        kw = {f.name: (getattr(self, f.name).clone() if isinstance(getattr(self, f.name), Tensor)
                       else getattr(self, f.name)) for f in dataclasses.fields(self)}
        return type(self)(**kw)

    def detach(self) -> "MixerState":
        kw = {f.name: (getattr(self, f.name).detach() if isinstance(getattr(self, f.name), Tensor)
                       else getattr(self, f.name)) for f in dataclasses.fields(self)}
        return type(self)(**kw)


class Mixer(nn.Module):
    """Abstract sequence mixer. Subclasses implement forward / step / init_state / mixing_matrix."""

    #: name used in configs' layer patterns
    kind: str = "abstract"
    #: ``step(x, state, norm=..., residual=True)`` takes the un-normalised input and its pre-norm (fused
    #: into the input projection at batch-1 decode) and returns x + y (the add fused into the output one)
    step_fuses_norm: bool = False

    def forward(self, x: Tensor, state: Optional[MixerState] = None, *, seq_idx: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, output_state: bool = False):
        raise NotImplementedError

    def step(self, x: Tensor, state: MixerState) -> Tensor:
        raise NotImplementedError

    def init_state(self, batch_size: int, *, max_seqlen: Optional[int] = None, device=None,
                   dtype=None) -> MixerState:
        raise NotImplementedError

    def mixing_matrix(self, x: Tensor, *, seq_idx: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no materialisable mixing matrix")

    def state_bytes_per_sequence(self, context: int = 0, dtype=None) -> int:
        """Decode memory per sequence at `context` tokens (state + caches)."""
        st = self.init_state(1, max_seqlen=max(context, 1), device="meta", dtype=dtype)
        return st.state_bytes()
