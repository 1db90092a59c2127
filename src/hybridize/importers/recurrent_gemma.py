"""RecurrentGemma (HF `RecurrentGemmaForCausalLM`, Griffin) → HybridLM.

Follows the official Griffin semantics where transformers departs from them: our local attention
always enforces the window, also on a full forward longer than the window (transformers' full forward
attends to everything). Parity is therefore tested on sequences within the window.
"""
from __future__ import annotations

import math
from pathlib import Path
import torch

from hybridize.api import CheckpointError
from hybridize.config import AttentionConfig, HybridConfig, MLPConfig, RGLRUConfig
from hybridize.importers.common import build_and_load
from hybridize.importers.llama import rope_settings


def recurrent_gemma_config(raw: dict) -> HybridConfig:
    d = raw["hidden_size"]
    heads = raw["num_attention_heads"]
    n = raw["num_hidden_layers"]
    block_types = list(raw.get("block_types") or ["recurrent", "recurrent", "attention"])
    pattern = [("rglru" if t == "recurrent" else "attention") for t in (block_types * n)[:n]]
    act = raw.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise CheckpointError(f"recurrent_gemma: hidden_activation {act!r} is not supported")
    theta, _ = rope_settings(raw)
    params = raw.get("rope_parameters") or {}
    partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5)))
    # transformers multiplies by sqrt(d) rounded to bfloat16, in every dtype
    scale = float(torch.tensor(math.sqrt(d), dtype=torch.bfloat16))
    return HybridConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=d,
        layer_pattern=pattern,
        mlp=MLPConfig(raw["intermediate_size"] // 2, activation="gelu_tanh", bias=True),
        attention=AttentionConfig(
            num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads, head_dim=d // heads,
            rope_theta=theta, partial_rotary_factor=partial,
            sliding_window=raw.get("attention_window_size", 2048),
            qkv_bias=bool(raw.get("attention_bias", False)), o_bias=True),
        rglru=RGLRUConfig(lru_width=raw.get("lru_width") or d, num_heads=heads,
                          d_conv=raw.get("conv1d_width", 4), bias=True),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        norm_offset=1.0,
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
        embedding_scale=scale,
        logit_softcap=raw.get("logits_soft_cap", 30.0),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        name="recurrent_gemma-import",
    ).validate()


_RENAMES = [
    (r"^model\.embed_tokens\.weight$", "embed_tokens.weight"),
    (r"^model\.final_norm\.weight$", "norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^model\.layers\.(\d+)\.temporal_pre_norm\.weight$", r"layers.\1.mixer_norm.weight"),
    (r"^model\.layers\.(\d+)\.channel_pre_norm\.weight$", r"layers.\1.mlp_norm.weight"),
    (r"^model\.layers\.(\d+)\.temporal_block\.(.+)$", r"layers.\1.mixer.\2"),
    (r"^model\.layers\.(\d+)\.mlp_block\.(.+)$", r"layers.\1.mlp.\2"),
]


def import_recurrent_gemma(path: Path, raw: dict):
    return build_and_load(recurrent_gemma_config(raw), path, _RENAMES, "RecurrentGemma",
                          drop_suffixes=("inv_freq", "normalizer"))
