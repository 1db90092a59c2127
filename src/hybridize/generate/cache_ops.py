"""Row- and step-level operations on decode caches (`HybridCache`: one state per layer).

The mixers' states are dataclasses of tensors whose dim 0 is the batch row (see
`hybridize.layers.base.MixerState`), so everything here is generic over mixer kinds: a state is
"attention" iff it is a `KVCache` (``k, v: (B, Hkv, C, P)``, ``lengths: (B,)``), every other state is
"recurrent" (fixed size, e.g. Mamba-2 ``conv (B, C, W-1)`` + ``ssm (B, H, P, N)``, RG-LRU ``conv, rnn,
lengths``).

Rolling back a KV cache only needs its ``lengths``: slots past ``lengths[b]`` are ignored by ``step``
and ``forward`` and overwritten later. A recurrent state cannot be rolled back, so callers keep copies
(`save_positions` / `StepHistory`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from hybridize.layers.attention import KVCache
from hybridize.model import HybridCache


def is_kv(state) -> bool:
    return isinstance(state, KVCache)


def _fields(state) -> list[str]:
    return [f.name for f in dataclasses.fields(state) if isinstance(getattr(state, f.name), Tensor)]


def _position_fields(state) -> list[str]:
    """The fields that change when a state advances, short of the KV buffers themselves: everything of a
    recurrent state, only ``lengths`` of a KVCache."""
    return ["lengths"] if is_kv(state) else _fields(state)


def alloc_cache(model, batch_size: int, max_seqlen: int, *, window_slack: int = 0, dtype=None,
                state_dtype=torch.float32, device=None) -> HybridCache:
    """`model.init_cache`, except that sliding-window KV rings get ``window_slack`` extra slots
    (capacity ``min(window + window_slack, max_seqlen)``).

    Why: speculative decoding writes T tokens, then rolls back up to T of them by lowering ``lengths``.
    In a ring of exactly ``window`` slots those T writes overwrote the oldest tokens that are still
    inside the window after the rollback; with ``window + T`` slots they are untouched (attention masks
    by ``age < window`` so extra slots are never attended)."""
    cache = model.init_cache(batch_size, max_seqlen=max_seqlen, device=device, dtype=dtype,
                             state_dtype=state_dtype)
    if window_slack:
        for blk, st in zip(model.layers, cache.states):
            window = getattr(blk.mixer, "window", None)
            if is_kv(st) and window is not None:
                cap = min(window + window_slack, max_seqlen)
                if cap > st.capacity:
                    B, H, _, P = st.k.shape
                    st.k = st.k.new_zeros(B, H, cap, P)
                    st.v = st.v.new_zeros(B, H, cap, P)
    return cache


def empty_like(cache: HybridCache, batch_size: int) -> HybridCache:
    """A zero cache with `cache`'s shapes, dtypes and devices but `batch_size` rows."""
    states = []
    for st in cache.states:
        kw = {f.name: getattr(st, f.name) for f in dataclasses.fields(st)}
        for name in _fields(st):
            t = kw[name]
            kw[name] = t.new_zeros((batch_size, *t.shape[1:]))
        states.append(type(st)(**kw))
    return HybridCache(states)


def zero_(cache: HybridCache) -> HybridCache:
    """Reset every state to empty in place (what `init_state` returns: zeros, lengths 0)."""
    for st in cache.states:
        for name in _fields(st):
            getattr(st, name).zero_()
    return cache


def select_rows(state, rows: Tensor):
    """A new state holding rows `rows` (n,) of `state` (copies)."""
    kw = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    for name in _fields(state):
        kw[name] = kw[name].index_select(0, rows)
    return type(state)(**kw)


def copy_rows_(dst: HybridCache, rows: Tensor, src: HybridCache) -> HybridCache:
    """dst row rows[i] ← src row i for every state, in place (dst tensors keep their identity, so a
    CUDA graph captured on dst stays valid). Shapes must agree beyond the batch dim."""
    for d, s in zip(dst.states, src.states):
        for name in _fields(d):
            a, b = getattr(d, name), getattr(s, name)
            if a.shape[1:] != b.shape[1:]:
                raise RuntimeError(f"copy_rows_: {type(d).__name__}.{name} shapes differ beyond the batch "
                                   f"dim ({tuple(a.shape)} vs {tuple(b.shape)}); was a KV cache grown?")
            a.index_copy_(0, rows, b.to(a.dtype))
    return dst


def save_positions(cache: HybridCache) -> list:
    """Copies of what `step`/`forward` change besides the KV buffers: recurrent states and KV lengths."""
    return [{name: getattr(st, name).clone() for name in _position_fields(st)} for st in cache.states]


def restore_positions_(cache: HybridCache, saved: list) -> HybridCache:
    """In-place inverse of `save_positions` (KV entries written since are beyond lengths: ignored)."""
    for st, sv in zip(cache.states, saved):
        for name, t in sv.items():
            getattr(st, name).copy_(t)
    return cache


class StepHistory:
    """Per-step copies of a cache's positions for rolling back a batch of `step` calls row by row.

    ``record(s)`` after s steps (s = 0 … T) copies the recurrent states and KV lengths into preallocated
    buffers ``(T + 1, B, ...)``; ``rewind_(n)`` puts row b back at its state after ``n[b]`` steps, in
    place. Memory: (T + 1) × the recurrent state size (small for a draft model)."""

    def __init__(self, cache: HybridCache, num_steps: int):
        self.cache = cache
        self.bufs = [{name: getattr(st, name).new_empty((num_steps + 1, *getattr(st, name).shape))
                      for name in _position_fields(st)} for st in cache.states]

    def record(self, s: int) -> None:
        for st, bufs in zip(self.cache.states, self.bufs):
            for name, buf in bufs.items():
                buf[s].copy_(getattr(st, name))

    def rewind_(self, n: Tensor) -> None:
        """n: (B,) int64 in [0, T]: steps of this round that row b keeps."""
        rows = torch.arange(n.shape[0], device=n.device)
        for st, bufs in zip(self.cache.states, self.bufs):
            for name, buf in bufs.items():
                getattr(st, name).copy_(buf[n, rows])


def assign_rows(state, rows: Tensor, sub, fields: Optional[list] = None) -> None:
    """state rows `rows` ← sub (out of place: the fields are reassigned, like a mixer's forward)."""
    for name in fields or _fields(state):
        t = getattr(state, name)
        setattr(state, name, t.index_copy(0, rows, getattr(sub, name).to(t.dtype)))
