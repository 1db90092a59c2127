"""Mamba-2 (HF `Mamba2ForCausalLM`) → HybridLM with mamba2 layers and no MLPs."""
from __future__ import annotations

from pathlib import Path
from hybridize.api import CheckpointError
from hybridize.config import HybridConfig, Mamba2Config, MLPConfig
from hybridize.importers.common import build_and_load


def _json_float(v) -> float:
    """transformers 5 writes inf as {"__float__": "Infinity"}; older versions as null or Infinity."""
    if v is None:
        return float("inf")
    if isinstance(v, dict):
        return float(v.get("__float__", "inf"))
    return float(v)


def mamba2_config(raw: dict) -> HybridConfig:
    d = raw["hidden_size"]
    heads, headdim = raw.get("num_heads", 128), raw.get("head_dim", 64)
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"mamba2: hidden_act {raw.get('hidden_act')!r} is not supported (only silu)")
    lim = raw.get("time_step_limit", (0.0, float("inf")))
    eps = float(raw.get("layer_norm_epsilon", 1e-5))
    return HybridConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=d,
        layer_pattern=["mamba2"] * raw["num_hidden_layers"],
        mlp=MLPConfig(0),
        mamba2=Mamba2Config(
            d_state=raw.get("state_size", 128), d_conv=raw.get("conv_kernel", 4), d_inner=heads * headdim,
            headdim=headdim, ngroups=raw.get("n_groups", 8), chunk_size=raw.get("chunk_size", 256),
            dt_min=raw.get("time_step_min", 0.001), dt_max=raw.get("time_step_max", 0.1),
            dt_init_floor=raw.get("time_step_floor", 1e-4),
            dt_limit=(_json_float(lim[0]), _json_float(lim[1])),
            conv_bias=bool(raw.get("use_conv_bias", True)), bias=bool(raw.get("use_bias", False)),
            norm_eps=eps),
        norm_eps=eps,
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        name="mamba2-import",
    ).validate()


_RENAMES = [
    (r"^backbone\.embeddings\.weight$", "embed_tokens.weight"),
    (r"^backbone\.norm_f\.weight$", "norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^backbone\.layers\.(\d+)\.norm\.weight$", r"layers.\1.mixer_norm.weight"),
    (r"^backbone\.layers\.(\d+)\.mixer\.(.+)$", r"layers.\1.mixer.\2"),
]


def import_mamba2(path: Path, raw: dict):
    return build_and_load(mamba2_config(raw), path, _RENAMES, "Mamba2")
