"""Top-level entry points: `hybridize.load(path)`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

from hybridize.config import ConfigError, HybridConfig, preset


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or of an unsupported kind."""


SUPPORTED_HF_TYPES = ("llama", "mistral", "qwen2", "mamba2", "recurrent_gemma")


def read_config_json(path: Union[str, os.PathLike]) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a file; pass the checkpoint directory that holds config.json "
                              "and the *.safetensors weights")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{str(path)!r} has no config.json — is this a Hugging Face / hybridize "
                              "checkpoint directory?")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); the checkpoint is corrupt") from None


def load(path: Union[str, os.PathLike], *, dtype=None, device=None):
    """Load a HybridLM from a hybridize checkpoint directory, or build the equivalent HybridLM from a
    local Hugging Face checkpoint (Llama, Mistral, Qwen2, Mamba2ForCausalLM, RecurrentGemmaForCausalLM).

    `path` may also be a preset name (e.g. "mil50-tiny"): a randomly initialised model.
    """
    from hybridize.model import HybridLM

    if not os.path.exists(str(path)) and not os.path.isabs(str(path)) and "-" in str(path) \
            and "/" not in str(path):
        try:
            cfg = preset(str(path))
        except ConfigError as e:
            raise CheckpointError(f"{str(path)!r} is neither an existing directory nor a preset ({e})") from None
        model = HybridLM(cfg)
        return model.to(device=device, dtype=dtype) if (device or dtype) else model
    raw = read_config_json(path)
    model_type = raw.get("model_type")
    if model_type == "hybridize":
        _check_weights_present(Path(path))
        try:
            model = HybridLM.from_pretrained(str(path), dtype=dtype)
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"could not load hybridize checkpoint {str(path)!r}: {e}") from None
        return model.to(device) if device else model
    from hybridize import importers

    if model_type not in importers.IMPORTERS:
        raise CheckpointError(
            f"unsupported model_type {model_type!r} in {str(path)}/config.json; hybridize imports "
            f"{', '.join(sorted(importers.IMPORTERS))} and its own checkpoints (model_type 'hybridize')")
    model = importers.IMPORTERS[model_type](Path(path), raw)
    return model.to(device=device, dtype=dtype) if (device or dtype) else model


def _check_weights_present(path: Path) -> None:
    if not (list(path.glob("*.safetensors")) or list(path.glob("*.bin"))):
        raise CheckpointError(f"{str(path)!r} has a config.json but no weights (*.safetensors); the checkpoint "
                              "is incomplete")


def config_of(path_or_preset: str) -> HybridConfig:
    """The HybridConfig of a preset, a hybridize checkpoint or a supported HF checkpoint (no weights read)."""
    if not os.path.exists(path_or_preset):
        return preset(path_or_preset)
    raw = read_config_json(path_or_preset)
    if raw.get("model_type") == "hybridize":
        return HybridConfig.from_dict(raw["hybrid"])
    from hybridize import importers

    if raw.get("model_type") not in importers.CONFIG_CONVERTERS:
        raise CheckpointError(f"unsupported model_type {raw.get('model_type')!r}; supported: "
                              f"{', '.join(sorted(importers.CONFIG_CONVERTERS))}, hybridize")
    return importers.CONFIG_CONVERTERS[raw["model_type"]](raw)
