"""Llama / Mistral / Qwen2 (HF `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`) → HybridLM
with every layer an attention layer: the teacher for conversion."""
from __future__ import annotations

from pathlib import Path
from hybridize.api import CheckpointError
from hybridize.config import AttentionConfig, HybridConfig, MLPConfig
from hybridize.importers.common import build_and_load

_ACT = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
        "gelu": "gelu"}


def rope_settings(raw: dict) -> tuple:
    """(theta, scaling dict or None) from a v5 `rope_parameters` or a v4 `rope_theta`/`rope_scaling`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
        return theta, scaling
    scaling = raw.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(raw.get("rope_theta", 10000.0)), scaling


def llama_config(raw: dict) -> HybridConfig:
    mt = raw.get("model_type")
    act = raw.get("hidden_act", "silu")
    if act not in _ACT:
        raise CheckpointError(f"{mt}: hidden_act {act!r} is not supported (supported: {sorted(_ACT)})")
    window = raw.get("sliding_window")
    if mt == "qwen2":
        layer_types = raw.get("layer_types")
        uses_window = raw.get("use_sliding_window", False) or (
            layer_types is not None and any(t == "sliding_attention" for t in layer_types))
        if uses_window:
            raise CheckpointError("qwen2: per-layer sliding windows (use_sliding_window=True) are not supported "
                                  "yet; set use_sliding_window=false if the model was trained without them")
        window = None
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(raw.get("attention_bias", False))
    n_heads = raw["num_attention_heads"]
    theta, scaling = rope_settings(raw)
    attn = AttentionConfig(
        num_heads=n_heads,
        num_kv_heads=raw.get("num_key_value_heads") or n_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // n_heads,
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=float(raw.get("partial_rotary_factor", 1.0)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 8192)),
        sliding_window=window,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
    )
    n = raw["num_hidden_layers"]
    return HybridConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        layer_pattern=["attention"] * n,
        mlp=MLPConfig(raw["intermediate_size"], activation=_ACT[act], bias=bool(raw.get("mlp_bias", False))),
        attention=attn,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        name=f"{mt}-import",
    ).validate()


_RENAMES = [
    (r"^model\.embed_tokens\.weight$", "embed_tokens.weight"),
    (r"^model\.norm\.weight$", "norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$", r"layers.\1.mixer.\2.\3"),
    (r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)$", r"layers.\1.mlp.\2.\3"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.weight$", r"layers.\1.mixer_norm.weight"),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$", r"layers.\1.mlp_norm.weight"),
]


def import_llama(path: Path, raw: dict):
    return build_and_load(llama_config(raw), path, _RENAMES, "Llama-family",
                          drop_suffixes=("rotary_emb.inv_freq",))
