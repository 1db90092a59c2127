"""Shared importer plumbing: reading (sharded) safetensors, renaming, strict shape-checked loading."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from hybridize.api import CheckpointError


def read_state_dict(path: Path) -> dict:
    """All tensors of a checkpoint directory: *.safetensors (sharded or not), else *.bin loaded with
    torch.load(weights_only=True) — nothing from a checkpoint is ever executed."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            wanted = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is corrupt ({e})") from None
        missing = [f for f in wanted if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path} is missing weight shards listed in its index: {missing}")
        files = [path / f for f in wanted]
    sd: dict = {}
    if files:
        for f in files:
            try:
                sd.update(load_file(str(f)))
            except Exception as e:  # noqa: BLE001 — safetensors raises its own error type for bad headers
                raise CheckpointError(f"could not read {f}: {e} — the file is corrupt or truncated") from None
        return sd
    bins = sorted(path.glob("*.bin"))
    if not bins:
        raise CheckpointError(f"{path} has no weights (*.safetensors or *.bin)")
    for f in bins:
        try:
            sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 — any unpickling failure means a bad file
            raise CheckpointError(f"could not read {f} safely ({type(e).__name__}: {e})") from None
    return sd


def load_mapped(model: torch.nn.Module, source: dict, rename: Callable[[str], Optional[str]],
                transforms: Optional[dict] = None, optional_targets=(), source_name: str = "checkpoint") -> None:
    """Copy `source` tensors into `model` under `rename(name)` (None → drop), checking that every model
    parameter is filled with the right shape. `transforms[target] = fn(tensor) → tensor` adapts layouts."""
    transforms = transforms or {}
    target_sd = model.state_dict()
    filled: dict = {}
    for name, t in source.items():
        tgt = rename(name)
        if tgt is None:
            continue
        if tgt not in target_sd:
            raise CheckpointError(f"{source_name}: tensor {name!r} maps to {tgt!r}, which this model does "
                                  "not have — the config and the weights disagree")
        if tgt in transforms:
            t = transforms[tgt](t)
        if tuple(t.shape) != tuple(target_sd[tgt].shape):
            raise CheckpointError(f"{source_name}: tensor {name!r} has shape {tuple(t.shape)} but the model "
                                  f"expects {tuple(target_sd[tgt].shape)} for {tgt!r} — config/weights mismatch")
        filled[tgt] = t
    missing = [k for k in target_sd if k not in filled and k not in optional_targets]
    if missing:
        raise CheckpointError(f"{source_name}: no weights for {missing[:6]}{' …' if len(missing) > 6 else ''} — "
                              "the checkpoint is incomplete or of another architecture")
    with torch.no_grad():
        for k, t in filled.items():
            target_sd[k].copy_(t.to(target_sd[k].dtype))


def tie_if_needed(model) -> None:
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def as_tensor_dtype(raw: dict):
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)





def rename_by_rules(rules: list, name: str, family: str, drop_suffixes: tuple = ()) -> Optional[str]:
    """Map a checkpoint tensor name through (regex, replacement) rules; None drops it."""
    if drop_suffixes and name.endswith(drop_suffixes):
        return None
    for pat, rep in rules:
        if re.match(pat, name):
            return re.sub(pat, rep, name)
    raise CheckpointError(f"unexpected tensor {name!r} in a {family} checkpoint")


def build_and_load(cfg, path: Path, rules: list, family: str, drop_suffixes: tuple = ()):
    """HybridLM(cfg) filled from the checkpoint at `path` through `rules` (tied head optional)."""
    from hybridize.model import HybridLM

    model = HybridLM(cfg)
    optional = ("lm_head.weight",) if cfg.tie_embeddings else ()
    load_mapped(model, read_state_dict(path), lambda n: rename_by_rules(rules, n, family, drop_suffixes),
                optional_targets=optional, source_name=str(path))
    if cfg.tie_embeddings:
        model.tie_weights()
    return model.eval()
