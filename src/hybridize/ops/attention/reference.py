"""Attention helpers shared by the layer and the decode kernel: GQA repetition, KV-cache slot
bookkeeping (see `hybridize.layers.attention` for the cache layout) and the decode-attention reference."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, L, P) → (B, Hkv * n_rep, L, P); query head h uses kv head h // n_rep (HF convention)."""
    if n_rep == 1:
        return x
    B, Hkv, L, P = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, L, P).reshape(B, Hkv * n_rep, L, P)


def slot_stream_index(lengths: Tensor, capacity: int) -> Tensor:
    """(B,) tokens seen → (B, C) stream index held by each slot (< 0: empty), for slot = t % C."""
    last = lengths[:, None] - 1
    slots = torch.arange(capacity, device=lengths.device)
    return last - torch.remainder(last - slots, capacity)


def slot_visibility(n0: Tensor, T: int, capacity: int, window: Optional[int]) -> Tensor:
    """(B, T, C) bool: slot s is visible to the token at stream index n0 + t, once the T tokens n0 … n0+T-1
    are written (slot = index % C): it holds a token (t_s >= 0) that is not in its future and, with a
    window, within it (age < window)."""
    ts = slot_stream_index(n0 + T, capacity)                            # (B, C) after the T writes
    age = (n0[:, None] + torch.arange(T, device=n0.device))[:, :, None] - ts[:, None, :]
    valid = (ts >= 0)[:, None, :] & (age >= 0)
    if window is not None:
        valid = valid & (age < window)
    return valid


def decode_attention_reference(q, k, v, n0, window, scale):
    """The decode attention math in fp32 (self-check reference): q (B, H, T, P) → (B, T, H, P)."""
    B, H, T, P = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    valid = slot_visibility(n0, T, C, window or None)                  # (B, T, C)
    kk = repeat_kv(k.float(), H // Hkv)
    vv = repeat_kv(v.float(), H // Hkv)
    s = (q.float() @ kk.transpose(-1, -2)) * scale                         # (B, H, T, C)
    s = s.masked_fill(~valid[:, None], float("-inf"))
    return (s.softmax(-1) @ vv).transpose(1, 2)
