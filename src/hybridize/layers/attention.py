"""Multi-head attention (MHA / GQA / MQA) with RoPE, optional sliding window and a KV cache.

Parameters are named like HF Llama/Mistral/Qwen2 (``q_proj, k_proj, v_proj, o_proj``) so weights map 1:1.
For inference, ``fuse_projections_()`` runs q/k/v as one (H + 2 Hkv)·P × D matmul over the same
Parameters (`hybridize.layers.fused`; state_dict and checkpoints unchanged).

Sliding window (HF Mistral / Gemma / RecurrentGemma semantics, ``masking_utils.sliding_window_overlay``:
``kv_idx > q_idx - window``): the token at stream index ``p`` attends keys at ``p - window + 1 … p``, i.e.
``window`` tokens including itself. Indices are counted in tokens of the sequence (cache slots), not in
RoPE ``position_ids`` — the two coincide unless custom position_ids are passed.

KV cache layout (``KVCache``): ``k, v: (B, Hkv, C, P)``, ``lengths: (B,)``. The token with *stream index*
``t`` (0-based count of tokens of the current document of that row) lives in slot ``t % C``; the cache
holds the last ``min(C, lengths[b])`` tokens of each row. So slot ``s`` of row ``b`` holds stream index
``t_s = n - 1 - ((n - 1 - s) mod C)`` with ``n = lengths[b]`` and is empty iff ``t_s < 0`` — validity is
derived from ``lengths`` alone, no per-slot bookkeeping. With a sliding window, ``C = window`` makes it a
ring buffer; a full-attention cache has ``C = max_seqlen`` and never wraps if sized correctly.

Packed documents in ``forward`` (``seq_idx``): the cached tokens are visible only to the chunk's first
document, and the returned cache holds the *last* document only (its ``lengths`` restart), consistent
with recurrent mixers whose final state is the last document's state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridize.config import AttentionConfig
from hybridize.layers.base import Mixer, MixerState, position_ids_from_seq_idx
from hybridize.layers.fused import FusedProjections
from hybridize.layers.rotary import RotaryEmbedding
from hybridize.ops.attention import (
    decode_attention,
    decode_attention_fused,
    decode_fused_ok,
    decode_kernel_ok,
    repeat_kv,
)
from hybridize.ops.attention.reference import slot_stream_index as _slot_stream_index
from hybridize.ops.attention.reference import slot_visibility as _slot_visibility
from hybridize.ops.gemv import fused_linear

# `enable_gqa` appeared in torch 2.5; older versions repeat k/v explicitly.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor], scale: float) -> Tensor:
    """q (B, H, Lq, P), k/v (B, Hkv, Lk, P), mask (B, 1, Lq, Lk) bool (True = attend) or None → causal."""
    n_rep = q.shape[1] // k.shape[1]
    kw = dict(is_causal=True) if mask is None else dict(attn_mask=mask)
    if n_rep > 1 and _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **kw)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), scale=scale, **kw)


#: the fused decode-attention op serves batches up to this size: on the H100 it saves ~1 µs a layer at
#: batch 1, but at batch 64 / 8k context it was slower than the separate kernels (6 331 vs 7 713 tokens/s
#: for the 1.2 B Transformer, benchmarks/results/decode_fused_all_h100.json)
FUSED_DECODE_MAX_BATCH = 1


@dataclass
class KVCache(MixerState):
    """Attention state. ``k, v: (B, Hkv, C, P)`` (keys already rotated); ``lengths: (B,)`` int64 — tokens
    seen per row (rows may be at different positions). Token with stream index t is in slot ``t % C``."""
    k: Tensor
    v: Tensor
    lengths: Tensor

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


class Attention(FusedProjections, Mixer):
    """Causal self-attention. ``Attention(hidden_size, cfg, layer_idx=0)``; see the module docstring."""

    kind = "attention"
    _fused_names = ("q_proj", "k_proj", "v_proj")

    def __init__(self, hidden_size: int, cfg: AttentionConfig, layer_idx: int = 0):
        super().__init__()
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        self.n_rep = self.num_heads // self.num_kv_heads
        self.head_dim = cfg.head_dim or hidden_size // cfg.num_heads
        self.window = cfg.sliding_window
        self.scale = cfg.softmax_scale if cfg.softmax_scale is not None else self.head_dim ** -0.5
        H, Hkv, P = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(hidden_size, H * P, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, Hkv * P, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, Hkv * P, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * P, hidden_size, bias=cfg.o_bias)
        self.rotary = RotaryEmbedding(P, cfg)

    # ------------------------------------------------------------------ helpers
    def _qkv_heads(self, x: Tensor, norm: Optional[Callable] = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) → q (B, L, H, P), k (B, L, Hkv, P), v (B, L, Hkv, P) before RoPE: views of the
        projection output (split views of one matmul's output when fused; no copies). norm: x is
        un-normalised and the projection is that of norm(x) (fused into it where `_project` can)."""
        q, k, v = self._project(x, norm=norm)
        return (q.unflatten(-1, (self.num_heads, self.head_dim)),
                k.unflatten(-1, (self.num_kv_heads, self.head_dim)),
                v.unflatten(-1, (self.num_kv_heads, self.head_dim)))

    def _qkv(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) → rotated q (B, H, L, P), rotated k (B, Hkv, L, P), v (B, Hkv, L, P)."""
        q, k, v = (t.transpose(1, 2) for t in self._qkv_heads(x))
        cos, sin = self.rotary(position_ids)
        return self.rotary.apply_rotary(q, cos, sin), self.rotary.apply_rotary(k, cos, sin), v

    def _local_mask(self, seq_idx: Optional[Tensor], B: int, L: int, device) -> Tensor:
        """(B, L, L) bool: causal, same document, within the window (token-index distance < window)."""
        i = torch.arange(L, device=device)
        dist = i[:, None] - i[None, :]
        mask = dist >= 0
        if self.window is not None:
            mask = mask & (dist < self.window)
        mask = mask.expand(B, L, L)
        if seq_idx is not None:
            mask = mask & (seq_idx[:, :, None] == seq_idx[:, None, :])
        return mask

    def _needs_mask(self, seq_idx: Optional[Tensor], L: int) -> bool:
        return seq_idx is not None or (self.window is not None and self.window < L)

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, max_seqlen: Optional[int] = None, device=None,
                   dtype=None) -> KVCache:
        """Empty cache. Capacity ``max_seqlen`` (``min(window, max_seqlen)`` when windowed; ``window`` when
        windowed and max_seqlen is None). dtype defaults to the parameters' dtype. Works on "meta"."""
        if max_seqlen is None:
            if self.window is None:
                raise ValueError("Attention.init_state needs max_seqlen (the KV cache capacity) "
                                 "for full attention")
            max_seqlen = self.window
        cap = max_seqlen if self.window is None else min(self.window, max_seqlen)
        w = self.q_proj.weight
        device = w.device if device is None else device
        dtype = w.dtype if dtype is None else dtype
        shape = (batch_size, self.num_kv_heads, cap, self.head_dim)
        return KVCache(k=torch.zeros(shape, device=device, dtype=dtype),
                       v=torch.zeros(shape, device=device, dtype=dtype),
                       lengths=torch.zeros(batch_size, device=device, dtype=torch.long))

    def _write_cache(self, state: KVCache, k_all: Tensor, v_all: Tensor, stream: Tensor, L: int) -> KVCache:
        """Out-of-place cache update (autograd-friendly): gather the new cache from concat(old, new).

        k_all / v_all: (B, Hkv, C + L, P) = concat(old cache, new keys/values) along the slot axis;
        stream: (B, L) stream index of each new token. The new cache holds the last document of the
        chunk; slot s of the (possibly grown) cache takes the token with stream index t_s."""
        B, C = state.k.shape[0], state.capacity
        new_len = stream[:, -1] + 1                                   # last token's document
        if self.window is not None and C >= self.window:
            new_cap = C                                                # a window-sized ring is always enough
        else:
            # host sync, forward only: grow rather than silently drop tokens that must stay visible
            needed = int(new_len.max())
            new_cap = max(C, needed if self.window is None else min(needed, self.window))
        t = _slot_stream_index(new_len, new_cap)                       # (B, C')
        i_new = t - new_len[:, None] + L                               # token index in the chunk
        # new token iff it lies in the chunk; with several documents new_len = len(last doc), so i_new
        # in [0, L - new_len) only happens for t < 0, i.e. empty slots that lengths masks anyway
        is_new = i_new >= 0
        # old tokens: slot t % C of the old cache (empty slots: any index, they are masked by lengths)
        src = torch.where(is_new, C + i_new, torch.remainder(t, C))
        idx = src[:, None, :, None].expand(B, k_all.shape[1], new_cap, k_all.shape[3])
        state.k = torch.gather(k_all, 2, idx).to(state.k.dtype)
        state.v = torch.gather(v_all, 2, idx).to(state.v.dtype)
        state.lengths = new_len
        return state

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, state: Optional[KVCache] = None, *, seq_idx: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, output_state: bool = False):
        """x: (B, L, D) → (y (B, L, D), state or None). See docs/ARCHITECTURE.md.

        With a state, the new tokens of the chunk's first document also attend to the cached tokens
        (within the window); the cache is advanced out of place and grows (one host sync) when a
        full-attention cache is too small. Positions default to ``lengths[b] + t`` for the first
        document and restart at 0 for later ones (``position_ids_from_seq_idx``)."""
        B, L, _ = x.shape
        offset = state.lengths if state is not None else None
        stream = position_ids_from_seq_idx(seq_idx, B, L, offset=offset, device=x.device)
        q, k, v = self._qkv(x, stream if position_ids is None else position_ids)

        if state is None:
            mask = None                                                # None → SDPA's is_causal fast path
            if self._needs_mask(seq_idx, L):
                mask = self._local_mask(seq_idx, B, L, x.device)[:, None]
            out = _sdpa(q, k, v, mask=mask, scale=self.scale)
            k_all, v_all = k, v
            if output_state:
                state = self.init_state(B, max_seqlen=L, device=x.device, dtype=self.q_proj.weight.dtype)
                # the fresh cache is empty: its slots are never selected, so write from the new tokens only
                k_all = torch.cat((state.k.to(k.dtype), k), dim=2)
                v_all = torch.cat((state.v.to(v.dtype), v), dim=2)
        else:
            C = state.capacity
            # cached keys: valid slot, query in the chunk's first document, within the window
            t_old = _slot_stream_index(state.lengths, C)              # (B, C)
            vis_old = (t_old >= 0)[:, None, :].expand(B, L, C)
            if seq_idx is not None:
                vis_old = vis_old & (seq_idx == seq_idx[:, :1])[:, :, None]
            if self.window is not None:
                vis_old = vis_old & ((stream[:, :, None] - t_old[:, None, :]) < self.window)
            mask = torch.cat((vis_old, self._local_mask(seq_idx, B, L, x.device)), dim=-1)[:, None]
            k_all = torch.cat((state.k.to(k.dtype), k), dim=2)       # (B, Hkv, C + L, P)
            v_all = torch.cat((state.v.to(v.dtype), v), dim=2)
            out = _sdpa(q, k_all, v_all, mask=mask, scale=self.scale)

        y = self.o_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))
        if state is None:
            return y, None
        return y, self._write_cache(state, k_all, v_all, stream, L)

    # ------------------------------------------------------------------ decoding
    step_fuses_norm = True          # step / step_tokens take the un-normalised x and its norm (see there)

    def step(self, x: Tensor, state: KVCache, *, norm: Optional[Callable] = None,
             residual: bool = False) -> Tensor:
        """One token per row at position ``lengths[b]``. x: (B, D) → y (B, D).

        Writes k/v into slot ``lengths[b] % C`` in place and increments ``lengths`` — no host syncs or
        value-dependent branches (CUDA-graph capturable, torch.compile(fullgraph=True) friendly). Inference
        only (in-place writes). A full-attention cache stepped past its capacity keeps the last C tokens
        (acts as a window of C): size it with ``init_state(max_seqlen=...)``. norm: see `step_tokens`."""
        return self.step_tokens(x[:, None], state, norm=norm, residual=residual)[:, 0]

    def step_tokens(self, x: Tensor, state: KVCache, *, norm: Optional[Callable] = None,
                    residual: bool = False) -> Tensor:
        """T tokens per row at positions ``lengths[b] + t`` (speculative verification; T = 1 is `step`).
        x: (B, T, D) → y (B, T, D). Token t attends the cached tokens and the chunk's tokens 0 … t.

        norm (e.g. the block's pre-attention RMSNorm): x is un-normalised and the q/k/v projection reads
        norm(x) (`FusedProjections._project(x, norm=norm)`, which fuses the norm into the batch-1 GEMV
        where it can); the result equals ``step_tokens(norm(x), state)``. residual: return x + y (the
        block's residual add, fused into the o_proj GEMV at batch-1 decode).

        In place like `step`: k/v go to slots ``(lengths[b] + t) % C``, ``lengths += T``. Rolling back to
        ``lengths - (T - n)`` afterwards is exact as long as the T writes overwrote nothing still visible:
        a full-attention cache that does not wrap, or a ring of ``window + T - 1`` slots or more (see
        `hybridize.generate.cache_ops.alloc_cache`'s ``window_slack``).

        Where the Triton decode kernel applies (CUDA, `decode_kernel_ok`; T <= C) at batch 1: one fused op
        (``hybridize::decode_attention_fused``, `decode_attention_fused`) takes the raw projections and
        does RoPE of q and k, the cache writes, a split-K (flash-decoding) attention that reads only the
        slots holding tokens and ``lengths += T`` in one or two launches (at batch-1 decode each separate
        small kernel costs ~1 µs of latency). Otherwise (CPU, shapes the kernels cannot serve) the same
        steps in PyTorch, with the unfused kernel (``hybridize::decode_attention``) or SDPA with a slot
        mask for the attention."""
        B, T, _ = x.shape
        H, P = self.num_heads, self.head_dim
        n0 = state.lengths
        C = state.capacity
        q, k, v = self._qkv_heads(x, norm)                                # (B, T, H|Hkv, P), before RoPE
        if B <= FUSED_DECODE_MAX_BATCH and T <= C and n0.dtype == torch.long and n0.is_contiguous() and \
                decode_fused_ok(q, state.k, self.n_rep, self.rotary.rot_dim, self.rotary.interleaved):
            rot = self.rotary
            out = decode_attention_fused(q, k, v, rot.inv_freq, state.k, state.v, n0, self.window or 0,
                                         self.scale, rot.attention_scaling, rot.interleaved)   # (B, T, H, P)
            return self._out_proj(out.reshape(B, T, H * P), x if residual else None)
        pos = n0[:, None] + torch.arange(T, device=x.device)             # (B, T) stream = RoPE positions
        cos, sin = self.rotary(pos)
        q = self.rotary.apply_rotary(q.transpose(1, 2), cos, sin)        # (B, H, T, P)
        k = self.rotary.apply_rotary(k.transpose(1, 2), cos, sin)        # (B, Hkv, T, P)
        rows = torch.arange(B, device=x.device)[:, None]
        slots = torch.remainder(pos, C)
        # index_put_ on (B, T) × (Hkv, P): torch.compile re-inplaces it (no cache copy)
        state.k[rows, :, slots] = k.transpose(1, 2).to(state.k.dtype)
        state.v[rows, :, slots] = v.to(state.v.dtype)
        if decode_kernel_ok(q, state.k, self.n_rep):
            out = decode_attention(q, state.k, state.v, n0, self.window or 0, self.scale)   # (B, T, H, P)
        else:
            out = self._attend_cache_sdpa(q, state, n0, T)
        state.lengths.add_(T)
        return self._out_proj(out.reshape(B, T, H * P), x if residual else None)

    def _out_proj(self, out: Tensor, residual: Optional[Tensor]) -> Tensor:
        """o_proj(out) (+ residual, fused into the batch-1 GEMV)."""
        if residual is None:
            return self.o_proj(out)
        return fused_linear(out, self.o_proj.weight, self.o_proj.bias, residual=residual)

    def _attend_cache_sdpa(self, q: Tensor, state: KVCache, n0: Tensor, T: int) -> Tensor:
        """q (B, H, T, P) of the tokens at n0 + t, already written → (B, T, H, P) via SDPA with a slot mask.
        GQA without repeating the cache: the n_rep query heads of a group act as n_rep × T query rows."""
        B, H, _, P = q.shape
        Hkv, C = self.num_kv_heads, state.capacity
        valid = _slot_visibility(n0, T, C, self.window)                  # (B, T, C)
        qg = q.reshape(B, Hkv, self.n_rep * T, P)                          # rows (g, t)
        mask = valid[:, None, None].expand(B, 1, self.n_rep, T, C).reshape(B, 1, self.n_rep * T, C)
        out = F.scaled_dot_product_attention(qg, state.k.to(q.dtype), state.v.to(q.dtype), attn_mask=mask,
                                             scale=self.scale)
        return out.reshape(B, H, T, P).transpose(1, 2)

    # ------------------------------------------------------------------ analysis
    def mixing_matrix(self, x: Tensor, *, seq_idx: Optional[Tensor] = None) -> Tensor:
        """Post-softmax attention weights (B, H, L, L), fp32, for a stateless forward of x.

        ``weights @ repeat_kv(v, n_rep)`` with ``v = v_proj(x)`` split into heads (B, Hkv, L, P) gives the
        pre-o_proj output (B, H, L, P) (query head h reads kv head h // n_rep)."""
        B, L, _ = x.shape
        pos = position_ids_from_seq_idx(seq_idx, B, L, device=x.device)
        q, k, _ = self._qkv(x, pos)
        scores = (q.float() @ repeat_kv(k.float(), self.n_rep).transpose(-1, -2)) * self.scale
        mask = self._local_mask(seq_idx, B, L, x.device)[:, None]
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
