"""Multi-head attention (MHA / GQA / MQA) with RoPE, optional sliding window and a KV cache.

Parameters are named like HF Llama/Mistral/Qwen2 (``q_proj, k_proj, v_proj, o_proj``) so weights map 1:1.

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

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridize.config import AttentionConfig
from hybridize.layers.base import Mixer, MixerState, position_ids_from_seq_idx
from hybridize.layers.rotary import RotaryEmbedding
from hybridize.ops._dispatch import use_kernels

# `enable_gqa` appeared in torch 2.5; older versions repeat k/v explicitly.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, L, P) → (B, Hkv * n_rep, L, P); query head h uses kv head h // n_rep (HF convention)."""
    if n_rep == 1:
        return x
    B, Hkv, L, P = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, L, P).reshape(B, Hkv * n_rep, L, P)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor], scale: float) -> Tensor:
    """q (B, H, Lq, P), k/v (B, Hkv, Lk, P), mask (B, 1, Lq, Lk) bool (True = attend) or None → causal."""
    n_rep = q.shape[1] // k.shape[1]
    kw = dict(is_causal=True) if mask is None else dict(attn_mask=mask)
    if n_rep > 1 and _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **kw)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), scale=scale, **kw)


def _slot_stream_index(lengths: Tensor, capacity: int) -> Tensor:
    """(B,) tokens seen → (B, C) stream index held by each slot (< 0: empty), for slot = t % C."""
    last = lengths[:, None] - 1
    slots = torch.arange(capacity, device=lengths.device)
    return last - torch.remainder(last - slots, capacity)


def _slot_visibility(n0: Tensor, T: int, capacity: int, window: Optional[int]) -> Tensor:
    """(B, T, C) bool: slot s is visible to the token at stream index n0 + t, once the T tokens n0 … n0+T-1
    are written (slot = index % C): it holds a token (t_s >= 0) that is not in its future and, with a
    window, within it (age < window)."""
    ts = _slot_stream_index(n0 + T, capacity)                            # (B, C) after the T writes
    age = (n0[:, None] + torch.arange(T, device=n0.device))[:, :, None] - ts[:, None, :]
    valid = (ts >= 0)[:, None, :] & (age >= 0)
    if window is not None:
        valid = valid & (age < window)
    return valid


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


class Attention(Mixer):
    """Causal self-attention. ``Attention(hidden_size, cfg, layer_idx=0)``; see the module docstring."""

    kind = "attention"

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
    def _qkv(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) → rotated q (B, H, L, P), rotated k (B, Hkv, L, P), v (B, Hkv, L, P)."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
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
    def step(self, x: Tensor, state: KVCache) -> Tensor:
        """One token per row at position ``lengths[b]``. x: (B, D) → y (B, D).

        Writes k/v into slot ``lengths[b] % C`` in place and increments ``lengths`` — no host syncs or
        value-dependent branches (CUDA-graph capturable, torch.compile(fullgraph=True) friendly). Inference
        only (in-place writes). A full-attention cache stepped past its capacity keeps the last C tokens
        (acts as a window of C): size it with ``init_state(max_seqlen=...)``."""
        return self.step_tokens(x[:, None], state)[:, 0]

    def step_tokens(self, x: Tensor, state: KVCache) -> Tensor:
        """T tokens per row at positions ``lengths[b] + t`` (speculative verification; T = 1 is `step`).
        x: (B, T, D) → y (B, T, D). Token t attends the cached tokens and the chunk's tokens 0 … t.

        In place like `step`: k/v go to slots ``(lengths[b] + t) % C``, ``lengths += T``. Rolling back to
        ``lengths - (T - n)`` afterwards is exact as long as the T writes overwrote nothing still visible:
        a full-attention cache that does not wrap, or a ring of ``window + T - 1`` slots or more (see
        `hybridize.generate.cache_ops.alloc_cache`'s ``window_slack``).

        On CUDA the attention is a split-K (flash-decoding) Triton kernel that reads only the slots that
        hold tokens (``hybridize::decode_attention``, a custom op under torch.compile); elsewhere, or when
        the kernel cannot serve the shapes, SDPA with a slot mask."""
        B, T, _ = x.shape
        H, P = self.num_heads, self.head_dim
        n0 = state.lengths
        C = state.capacity
        pos = n0[:, None] + torch.arange(T, device=x.device)             # (B, T) stream = RoPE positions
        q, k, v = self._qkv(x, pos)                                       # (B, H|Hkv, T, P)
        rows = torch.arange(B, device=x.device)[:, None]
        slots = torch.remainder(pos, C)
        # index_put_ on (B, T) × (Hkv, P): torch.compile re-inplaces it (no cache copy)
        state.k[rows, :, slots] = k.transpose(1, 2).to(state.k.dtype)
        state.v[rows, :, slots] = v.transpose(1, 2).to(state.v.dtype)
        if _decode_kernel_ok(q, state.k, self.n_rep):
            out = decode_attention(q, state.k, state.v, n0, self.window or 0, self.scale)   # (B, T, H, P)
        else:
            out = self._attend_cache_sdpa(q, state, n0, T)
        state.lengths.add_(T)
        return self.o_proj(out.reshape(B, T, H * P))

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


# ---------------------------------------------------------------------------- decode attention kernel
# Split-K ("flash-decoding") attention of a few query tokens per row against a KV cache. Grid: (batch ×
# kv head × query-row block, split); split s reads slots [s·S, (s+1)·S) ∩ [0, min(C, lengths + T)), so
# an unfilled cache costs nothing and a long one is read by many SMs at once; a second kernel merges the
# splits' (max, sum, acc). The query rows of a program are the n_rep query heads of its kv head times
# the T tokens (GQA without repeating the cache). Visibility is `_slot_visibility`, computed in-kernel
# from lengths: no mask tensor, no host sync, fixed grid (CUDA-graph capturable).
_KERNELS = None
_KERNEL_OK: dict = {}            # (device, dtype, head_dim, n_rep) → bool, from a one-time self-check
_KERNEL_MAX_P = 256
_KERNEL_MAX_ROWS = 64            # query rows (T · n_rep) per program; more → several row blocks


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _build_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _split_kernel(Q, K, V, N0, Mo, Lo, Ao,
                      sqb, sqh, sqt, sqp, skb, skh, skc, skp, svb, svh, svc, svp,
                      Hkv, C, T, G, R, P, S, RB, slots_per_split, window, qk_scale,
                      HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)       # ((b · Hkv) + j) · RB + rb; int64 offsets throughout
        sid = tl.program_id(1).to(tl.int64)
        rb = pid % RB
        bj = pid // RB
        b = bj // Hkv
        j = bj % Hkv
        n0 = tl.load(N0 + b).to(tl.int64)
        last = n0 + T - 1                         # stream index of the newest token (all T written)
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        p = tl.arange(0, BLOCK_P)
        rmask = r < R
        pmask = p < P
        t = r // G
        h = j * G + r % G
        q = tl.load(Q + b * sqb + h[:, None] * sqh + t[:, None] * sqt + p[None, :] * sqp,
                    mask=rmask[:, None] & pmask[None, :], other=0.0)
        qpos = n0 + t
        lo = sid * slots_per_split
        hi = tl.minimum(tl.minimum(lo + slots_per_split, C), last + 1)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_P], tl.float32)
        kb = K + b * skb + j * skh
        vb = V + b * svb + j * svh
        for start in range(lo, hi, BLOCK_N):
            s = start + tl.arange(0, BLOCK_N)
            smask = s < hi
            kv_mask = smask[:, None] & pmask[None, :]
            k = tl.load(kb + s[:, None] * skc + p[None, :] * skp, mask=kv_mask, other=0.0)
            if IEEE:
                qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            d = tl.where(smask, last - s, 0)              # >= 0 where it matters
            ts = last - d % C                             # stream index held by slot s
            age = qpos[:, None] - ts[None, :]
            valid = smask[None, :] & (ts[None, :] >= 0) & (age >= 0)
            if HAS_WINDOW:
                valid = valid & (age < window)
            qk = tl.where(valid, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            pr = tl.exp2(qk - m_use[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            v = tl.load(vb + s[:, None] * svc + p[None, :] * svp, mask=kv_mask, other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(pr, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
            m_i = m_new
        base = (pid * S + sid) * BLOCK_R + tl.arange(0, BLOCK_R)
        tl.store(Mo + base, m_i)
        tl.store(Lo + base, l_i)
        tl.store(Ao + base[:, None] * BLOCK_P + p[None, :], acc)

    @triton.jit
    def _merge_kernel(Mo, Lo, Ao, Out, sob, sot, soh, sop, Hkv, G, R, P, S, RB,
                      BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rb = pid % RB
        bj = pid // RB
        b = bj // Hkv
        j = bj % Hkv
        rr = tl.arange(0, BLOCK_R)
        r = rb * BLOCK_R + rr
        p = tl.arange(0, BLOCK_P)
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_P], tl.float32)
        for sid in range(0, S):
            base = (pid * S + sid) * BLOCK_R + rr
            ms = tl.load(Mo + base)
            ls = tl.load(Lo + base)
            a_s = tl.load(Ao + base[:, None] * BLOCK_P + p[None, :])
            m_new = tl.maximum(m, ms)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            w_old = tl.exp2(m - m_use)
            w_new = tl.exp2(ms - m_use)
            l = l * w_old + ls * w_new
            acc = acc * w_old[:, None] + a_s * w_new[:, None]
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        t = r // G
        h = j * G + r % G
        tl.store(Out + b * sob + t[:, None] * sot + h[:, None] * soh + p[None, :] * sop,
                 out.to(Out.dtype.element_ty), mask=(r < R)[:, None] & (p < P)[None, :])

    return triton, _split_kernel, _merge_kernel


_SM_COUNT: dict = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 16
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def _decode_attention_impl(q: Tensor, k: Tensor, v: Tensor, n0: Tensor, window: int, scale: float) -> Tensor:
    """q (B, H, T, P) (any strides) at stream indices n0 + t, already written to k, v (B, Hkv, C, P);
    n0 (B,) int64; window 0 = none → out (B, T, H, P) in q's dtype."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build_kernels()
    triton, split_kernel, merge_kernel = _KERNELS
    B, H, T, P = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = H // Hkv
    R = T * G
    out = torch.empty(B, T, H, P, device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    BLOCK_R = max(16, min(_next_pow2(R), _KERNEL_MAX_ROWS))
    RB = triton.cdiv(R, BLOCK_R)
    BLOCK_P = max(16, _next_pow2(P))
    BLOCK_N = 64 if BLOCK_P <= 64 else (32 if BLOCK_P <= 128 else 16)
    n_blocks = triton.cdiv(C, BLOCK_N)
    programs = B * Hkv * RB
    want = triton.cdiv(4 * _num_sms(q.device), programs)            # splits to fill the GPU ~4 times
    S = max(1, min(n_blocks, want))
    blocks_per_split = triton.cdiv(n_blocks, S)
    S = triton.cdiv(n_blocks, blocks_per_split)
    f32 = dict(device=q.device, dtype=torch.float32)
    Mo = torch.empty(programs * S * BLOCK_R, **f32)
    Lo = torch.empty(programs * S * BLOCK_R, **f32)
    Ao = torch.empty(programs * S * BLOCK_R * BLOCK_P, **f32)
    n0 = n0.contiguous()
    # fp32 models: exact fp32 dots (no TF32); the interpreter (CPU tests) has no 16-bit tl.dot
    ieee = q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    split_kernel[(programs, S)](
        q, k, v, n0, Mo, Lo, Ao, *q.stride(), *k.stride(), *v.stride(),
        Hkv, C, T, G, R, P, S, RB, blocks_per_split * BLOCK_N, int(window), float(scale) * 1.4426950408889634,
        HAS_WINDOW=window > 0, IEEE=ieee, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P,
        num_warps=4, num_stages=2)
    merge_kernel[(programs,)](Mo, Lo, Ao, out, out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                              Hkv, G, R, P, S, RB, BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P, num_warps=4)
    return out


@torch.library.custom_op("hybridize::decode_attention", mutates_args=())
def _decode_attention_op(q: Tensor, k: Tensor, v: Tensor, n0: Tensor, window: int, scale: float) -> Tensor:
    return _decode_attention_impl(q, k, v, n0, window, scale)


@_decode_attention_op.register_fake
def _(q, k, v, n0, window, scale):
    B, H, T, P = q.shape
    return q.new_empty(B, T, H, P)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, n0: Tensor, window: int, scale: float) -> Tensor:
    """The decode kernel (see above): q (B, H, T, P) → (B, T, H, P). A custom op under torch.compile,
    a direct launch otherwise (custom_op's Python dispatch costs ~50-100 us)."""
    if torch.compiler.is_compiling():
        return torch.ops.hybridize.decode_attention(q, k, v, n0, window, scale)
    return _decode_attention_impl(q, k, v, n0, window, scale)


def _reference_attention(q, k, v, n0, window, scale):
    """`_attend_cache_sdpa`'s math in fp32 (self-check reference): q (B, H, T, P) → (B, T, H, P)."""
    B, H, T, P = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    valid = _slot_visibility(n0, T, C, window or None)                  # (B, T, C)
    kk = repeat_kv(k.float(), H // Hkv)
    vv = repeat_kv(v.float(), H // Hkv)
    s = (q.float() @ kk.transpose(-1, -2)) * scale                         # (B, H, T, C)
    s = s.masked_fill(~valid[:, None], float("-inf"))
    return (s.softmax(-1) @ vv).transpose(1, 2)


def _self_check(device, dtype, P: int, G: int) -> bool:
    """Run the kernel once on random caches (wrapped ring, window, partial fill, T = 1 and 3) against
    `_reference_attention`; False (and a warning) on an exception or a mismatch."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
        for T, C, window, lens in ((1, 70, 0, [0, 69, 5]), (3, 40, 0, [0, 11, 37]), (3, 24, 20, [50, 3, 21]),
                                   (1, 300, 0, [299, 150, 0])):
            Hkv = 2
            B = len(lens)
            q = torch.randn(B, T, Hkv * G, P, generator=g).to(device, dtype).transpose(1, 2)
            k = torch.randn(B, Hkv, C, P, generator=g).to(device, dtype)
            v = torch.randn(B, Hkv, C, P, generator=g).to(device, dtype)
            n0 = torch.tensor(lens, device=device)
            got = _decode_attention_impl(q, k, v, n0, window, P ** -0.5).float()
            want = _reference_attention(q, k, v, n0, window, P ** -0.5)
            if not torch.allclose(got, want, atol=tol, rtol=tol):
                err = (got - want).abs().max().item()
                raise RuntimeError(f"mismatch vs reference (max abs err {err:.3g}, T={T}, C={C}, window={window})")
        return True
    except Exception as e:  # noqa: BLE001 — any failure → SDPA path
        warnings.warn(f"decode-attention kernel disabled for {dtype}, head_dim {P}, n_rep {G} on {device} "
                      f"({type(e).__name__}: {str(e)[:300]}); using SDPA")
        return False


def _decode_kernel_ok(q: Tensor, k_cache: Tensor, n_rep: int) -> bool:
    """Whether `step_tokens` uses the kernel: on CUDA (or HYBRIDIZE_KERNELS=1), supported dtype / head
    dim, and the one-time self-check passed. Under torch.compile or CUDA-graph capture the self-check
    cannot run: an unchecked configuration takes the SDPA path (`StepRunner` steps eagerly first)."""
    P = q.shape[-1]
    if P > _KERNEL_MAX_P or q.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or k_cache.dtype != q.dtype:
        return False
    key = (str(q.device), q.dtype, P, n_rep)
    ok = _KERNEL_OK.get(key)
    if ok is not None:
        return ok
    if torch.compiler.is_compiling() or not use_kernels(q, k_cache):
        return False
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    ok = _KERNEL_OK[key] = _self_check(q.device, q.dtype, P, n_rep)
    return ok
