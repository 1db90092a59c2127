"""HybridLM: one decoder-only LM class for Transformer, Hawk, Griffin, Mamba-2 and every hybrid.

embed → [block_i: x + mixer_i(norm(x)); x + mlp(norm(x))] → norm → lm_head (→ optional soft-cap)

The mixer kind of each layer comes from `HybridConfig.layer_pattern`; conversion swaps mixers in
place, so no second model class is ever needed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hybridize.config import HybridConfig
from hybridize.hf import HybridLMConfig
from hybridize.layers.base import Mixer, MixerState
from hybridize.layers.fused import FusedProjections
from hybridize.layers.mlp import GatedMLP
from hybridize.layers.norm import RMSNorm
from hybridize.ops.gemv import fused_linear


def build_mixer(kind: str, cfg: HybridConfig, layer_idx: int) -> Mixer:
    """The mixer module for one layer (imports lazily: each mixer lives in its own module)."""
    d = cfg.hidden_size
    if kind == "attention":
        from hybridize.layers.attention import Attention
        return Attention(d, cfg.attention, layer_idx)
    if kind == "mamba2":
        from hybridize.layers.mamba2 import Mamba2Mixer
        return Mamba2Mixer(d, cfg.mamba2, layer_idx)
    if kind == "mamba1":
        from hybridize.layers.mamba1 import Mamba1Mixer
        return Mamba1Mixer(d, cfg.mamba1, layer_idx)
    if kind == "rglru":
        from hybridize.layers.rglru import RGLRUBlock
        return RGLRUBlock(d, cfg.rglru, layer_idx)
    if kind == "discrete_mamba2":
        from hybridize.layers.discrete_mamba2 import DiscreteMamba2Mixer
        return DiscreteMamba2Mixer(d, cfg.discrete_mamba2, layer_idx)
    raise ValueError(f"unknown mixer kind {kind!r}")


class HybridBlock(nn.Module):
    """Pre-norm residual block: x + mixer(mixer_norm(x)), then x + mlp(mlp_norm(x)) (MLP optional)."""

    def __init__(self, cfg: HybridConfig, layer_idx: int):
        super().__init__()
        self.kind = cfg.layer_pattern[layer_idx]
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset)
        self.mixer = build_mixer(self.kind, cfg, layer_idx)
        if cfg.mlp.intermediate_size > 0:
            self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset)
            self.mlp = GatedMLP(cfg.hidden_size, cfg.mlp)
        else:
            self.mlp_norm = None
            self.mlp = None

    def forward(self, x: Tensor, state: Optional[MixerState] = None, *, seq_idx=None, position_ids=None,
                output_state: bool = False):
        """x: (B, L, D) → (x, state)."""
        y, state = self.mixer(self.mixer_norm(x), state, seq_idx=seq_idx, position_ids=position_ids,
                              output_state=output_state)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, state

    def step(self, x: Tensor, state: MixerState) -> Tensor:
        """x: (B, D) → (B, D); state updated in place. Mixers that take the norm (`step_fuses_norm`) and the
        MLP fuse it, the residual adds and their activations into their matmuls at batch-1 decode."""
        if self.mixer.step_fuses_norm:         # norm inside the input GEMV, residual inside the output GEMV
            x = self.mixer.step(x, state, norm=self.mixer_norm, residual=True)
        else:
            x = x + self.mixer.step(self.mixer_norm(x), state)
        if self.mlp is not None:
            x = self.mlp.residual_step(x, self.mlp_norm)
        return x

    def step_tokens(self, x: Tensor, state: MixerState, mixer_tokens=None) -> Tensor:
        """T tokens per row at once, in place (speculative verification). x: (B, T, D) → (B, T, D).

        The mixer runs as ``mixer_tokens(mixer, u, state) → y (B, T, D)`` when given, else its own
        ``step_tokens`` (attention: one pass over the T tokens), else T sequential ``step`` calls. The
        norms and the MLP see all T tokens at once (weights read once)."""
        u = self.mixer_norm(x)
        if mixer_tokens is not None:
            y = mixer_tokens(self.mixer, u, state)
        elif hasattr(self.mixer, "step_tokens"):
            y = self.mixer.step_tokens(u, state)
        else:
            y = torch.stack([self.mixer.step(u[:, t], state) for t in range(u.shape[1])], 1)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


@dataclass
class HybridCache:
    """Per-layer decode states (KVCache for attention layers, recurrent states for the others)."""
    states: list

    def __getitem__(self, i: int) -> MixerState:
        return self.states[i]

    def __len__(self) -> int:
        return len(self.states)

    def state_bytes(self) -> int:
        return sum(s.state_bytes() for s in self.states)

    def clone(self) -> "HybridCache":
        return HybridCache([s.clone() for s in self.states])

    def copy_(self, other: "HybridCache") -> "HybridCache":
        for a, b in zip(self.states, other.states):
            a.copy_(b)
        return self


def seq_idx_from_attention_mask(attention_mask: Tensor) -> Tensor:
    """HF-style padding masks → document ids: every run of equal mask values is its own document,
    so left or right padding never leaks into the real tokens' states or positions."""
    m = attention_mask.long()
    change = torch.zeros_like(m)
    change[:, 1:] = (m[:, 1:] != m[:, :-1]).long()
    return change.cumsum(1)


class HybridLM(PreTrainedModel, GenerationMixin):
    """Decoder-only LM whose layers mix attention and recurrent mixers.

    Construct from a typed `HybridConfig` (or the HF `HybridLMConfig`)::

        model = HybridLM(hybridize.preset("mil50-debug"))
        out = model(input_ids, labels=input_ids)       # out.logits (B, L, V), out.loss
    """

    config_class = HybridLMConfig
    base_model_prefix = "hybrid"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridBlock"]
    _supports_sdpa = True

    def __init__(self, config: Union[HybridConfig, HybridLMConfig]):
        if isinstance(config, HybridConfig):
            config = HybridLMConfig(config)
        cfg = config.typed
        if cfg.tie_embeddings:
            self._tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}
        super().__init__(config)
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([HybridBlock(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    # ------------------------------------------------------------------ HF plumbing
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, σ) for embeddings, head, MLP and attention projections. Recurrent mixers keep the
        initialisation their constructors chose (A_log, dt bias, decay ranges …)."""
        std = self.config.hybrid.get("initializer_range", 0.02)
        from hybridize.layers.attention import Attention

        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (GatedMLP, Attention)):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=std)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)
        elif module is getattr(self, "lm_head", None):
            nn.init.normal_(module.weight, std=std)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # Slow path for HF's generate(): recompute the whole prefix every step (the fast engine is
        # hybridize.generate).
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.refresh_buffers()
        return model

    def refresh_buffers(self) -> None:
        """Recompute derived non-persistent buffers (RoPE inverse frequencies). transformers builds the
        model on the meta device and only fills what the checkpoint holds, so these must be rebuilt."""
        from hybridize.layers.rotary import RotaryEmbedding, compute_inv_freq

        for m in self.modules():
            if isinstance(m, RotaryEmbedding):
                inv_freq, _ = compute_inv_freq(m.rot_dim, m.params, m.max_position_embeddings)
                m.inv_freq = inv_freq.to(m.inv_freq.device)

    # ------------------------------------------------------------------ fused projections
    def _fusable(self) -> list:
        return [m for m in self.modules() if isinstance(m, FusedProjections)]

    def fuse_projections_(self) -> HybridLM:
        """Inference layout: every layer's projections that read the same input (attention q/k/v, MLP
        gate/up, RG-LRU branches) become one matmul over one weight tensor whose slices the existing
        Parameters now are (`hybridize.layers.fused`): no extra memory, state_dict / checkpoints and
        training unchanged. Idempotent (re-fuses layers whose Parameters got new storage); fuse, then
        torch.compile / capture. The generation engine calls it at setup. Returns self."""
        for m in self._fusable():
            m.fuse_projections_()
        return self

    def unfuse_projections_(self) -> HybridLM:
        """Undo `fuse_projections_` (every Parameter its own storage again). Returns self."""
        for m in self._fusable():
            m.unfuse_projections_()
        return self

    def projections_fused(self) -> bool:
        """Whether every fusable layer runs its fused matmul (fused and not stale; False when the model
        has none)."""
        mods = self._fusable()
        return bool(mods) and all(m.projections_fused() for m in mods)

    # ------------------------------------------------------------------ model
    @property
    def layer_pattern(self) -> list:
        return list(self.cfg.layer_pattern)

    def embed(self, input_ids: Tensor) -> Tensor:
        h = self.embed_tokens(input_ids)
        if self.cfg.embedding_scale is not None:
            scale = self.cfg.embedding_scale
            if self.cfg.embedding_scale_in_dtype:   # round the scale to the activation dtype (as Gemma does)
                scale = float(torch.tensor(scale, dtype=h.dtype))
            h = h * scale                              # a Python scalar: no host→device copy (CUDA graphs)
        return h

    def head(self, h: Tensor) -> Tensor:
        logits = self.lm_head(self.norm(h))
        cap = self.cfg.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def init_cache(self, batch_size: int, *, max_seqlen: int, device=None, dtype=None,
                   state_dtype=torch.float32) -> HybridCache:
        """Empty decode caches: KV caches of `max_seqlen` (ring buffers when windowed) in `dtype`
        (default: the parameters' dtype), recurrent states in `state_dtype` (fp32 by default)."""
        p = next(self.parameters())
        device = device or p.device
        dtype = dtype or p.dtype
        states = []
        for blk in self.layers:
            dt = dtype if blk.kind == "attention" else state_dtype
            states.append(blk.mixer.init_state(batch_size, max_seqlen=max_seqlen, device=device, dtype=dt))
        return HybridCache(states)

    def forward(self, input_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None, *,
                attention_mask: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cache: Optional[HybridCache] = None,
                use_cache: bool = False, output_hidden_states: bool = False,
                inputs_embeds: Optional[Tensor] = None, return_dict: bool = True,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """input_ids: (B, L). labels: (B, L) with -100 for ignored positions (shifted inside).
        seq_idx: (B, L) document ids for packed batches. cache: advanced in place (reassigned tensors)
        and returned as `past_key_values`. logits_to_keep: only the last k positions' logits (0 = all).
        """
        unknown = {k for k, v in kwargs.items() if v is not None} - {"past_key_values", "cache_position",
                                                                     "output_attentions", "num_items_in_batch"}
        if unknown:
            raise TypeError(f"HybridLM.forward got unexpected arguments {sorted(unknown)}")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("HybridLM.forward needs input_ids or inputs_embeds")
            if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.cfg.vocab_size):
                raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}); got range "
                                 f"[{int(input_ids.min())}, {int(input_ids.max())}] — tokenizer/vocab mismatch?")
            inputs_embeds = self.embed(input_ids)
        h = inputs_embeds
        if seq_idx is None and attention_mask is not None and not bool(attention_mask.all()):
            seq_idx = seq_idx_from_attention_mask(attention_mask)
        if use_cache and cache is None:
            cache = self.init_cache(h.shape[0], max_seqlen=h.shape[1] + 256, dtype=h.dtype)
        hidden_states = [h] if output_hidden_states else None
        for i, blk in enumerate(self.layers):
            st = cache[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and st is None:
                h, _ = torch.utils.checkpoint.checkpoint(
                    lambda x, b=blk: b(x, None, seq_idx=seq_idx, position_ids=position_ids),
                    h, use_reentrant=False)
            else:
                h, st = blk(h, st, seq_idx=seq_idx, position_ids=position_ids, output_state=cache is not None)
                if cache is not None:
                    cache.states[i] = st
            if output_hidden_states:
                hidden_states.append(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache,
                                      hidden_states=tuple(hidden_states) if hidden_states else None)

    def _embed_step(self, input_ids: Tensor) -> Tensor:
        """`embed` for the decode paths: the same numbers, with the rounded embedding scale memoised as a
        Python float (no tensor → float conversion inside torch.compile / CUDA-graph capture)."""
        h = self.embed_tokens(input_ids)
        scale = self.cfg.embedding_scale
        if scale is not None:
            if self.cfg.embedding_scale_in_dtype:
                scale = _rounded_scale(scale, h.dtype)
            h = h * scale
        return h

    @torch.no_grad()
    def step(self, input_ids: Tensor, cache: HybridCache) -> Tensor:
        """One decode step. input_ids: (B,) → logits (B, V); every layer's state updated in place.

        No host syncs, no value-dependent branches: CUDA-graph capturable and torch.compile(fullgraph=True)
        friendly (see `hybridize.generate.engine.StepRunner`)."""
        h = self._embed_step(input_ids)
        for blk, st in zip(self.layers, cache.states):
            h = blk.step(h, st)
        return self._head_step(h)

    def _head_step(self, h: Tensor) -> Tensor:
        """`head` for decode steps: the final norm runs inside the head GEMV at batch 1 (same numbers
        elsewhere)."""
        logits = fused_linear(h, self.lm_head.weight, self.lm_head.bias, norm=self.norm)
        cap = self.cfg.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    @torch.no_grad()
    def step_tokens(self, input_ids: Tensor, cache: HybridCache, mixer_tokens=None) -> Tensor:
        """T decode steps at once (speculative verification): input_ids (B, T) → logits (B, T, V); row b's
        tokens take positions ``lengths[b] + t``. States advance in place by T tokens (roll back with
        `hybridize.generate.speculative.Verifier`); ``mixer_tokens(i, mixer, u, state)``, when given, runs
        layer i's mixer (see `HybridBlock.step_tokens`). Same properties as `step` (fixed shapes, no host
        syncs)."""
        h = self._embed_step(input_ids)
        for i, (blk, st) in enumerate(zip(self.layers, cache.states)):
            h = blk.step_tokens(h, st, None if mixer_tokens is None else functools.partial(mixer_tokens, i))
        return self.head(h)

    # ------------------------------------------------------------------ reporting
    def num_parameters_by_kind(self) -> dict:
        out = {"embedding": self.embed_tokens.weight.numel()}
        if not self.cfg.tie_embeddings:
            out["lm_head"] = self.lm_head.weight.numel()
        for blk in self.layers:
            out[blk.kind] = out.get(blk.kind, 0) + sum(p.numel() for p in blk.mixer.parameters())
            if blk.mlp is not None:
                out["mlp"] = out.get("mlp", 0) + sum(p.numel() for p in blk.mlp.parameters())
        return out

    def decode_memory(self, context: int, dtype=torch.bfloat16, state_dtype=torch.float32) -> dict:
        """Bytes of decode state per sequence at `context` tokens: recurrent vs KV cache."""
        rec, kv = 0, 0
        for blk in self.layers:
            if blk.kind == "attention":
                kv += blk.mixer.state_bytes_per_sequence(context, dtype=dtype)
            else:
                rec += blk.mixer.state_bytes_per_sequence(context, dtype=state_dtype)
        return {"context": context, "recurrent_state_bytes": rec, "kv_cache_bytes": kv, "total_bytes": rec + kv}


_ROUNDED_SCALES: dict = {}


def _rounded_scale(scale: float, dtype) -> float:
    """float(tensor(scale, dtype)), memoised (computed eagerly on the first call)."""
    key = (float(scale), dtype)
    v = _ROUNDED_SCALES.get(key)
    if v is None:
        v = _ROUNDED_SCALES[key] = float(torch.tensor(scale, dtype=dtype))
    return v


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy in fp32. logits (B, L, V), labels (B, L) (unshifted)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    if shift_labels.numel() == 0 or bool((shift_labels == ignore_index).all()):
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

