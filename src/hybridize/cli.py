"""`hybridize <command>`: the command-line interface.

Each command is a function `cmd_<name>(args)` plus an `add_<name>_parser(subparsers)`; commands that
belong to a subsystem import it lazily so `hybridize --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from hybridize import __version__


class UserError(Exception):
    """An error caused by the user's input: printed as one clear line, no traceback."""


# ---------------------------------------------------------------------------- info
def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _compress_pattern(pattern: list) -> str:
    """['mamba2', 'attention', 'mamba2', 'attention'] → '(mamba2, attention) × 2' when periodic."""
    n = len(pattern)
    for period in range(1, n // 2 + 1):
        if n % period == 0 and pattern == pattern[:period] * (n // period):
            return f"({', '.join(pattern[:period])}) × {n // period}"
    return ", ".join(pattern)


def info_report(target: str, context: int = 4096, dtype: str = "bfloat16") -> dict:
    """Layer pattern, parameter counts and decode memory of a preset or checkpoint (built on the meta
    device: nothing is allocated or read beyond config.json)."""
    import torch

    from hybridize.api import config_of
    from hybridize.model import HybridLM

    cfg = config_of(target)
    tdtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
              "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[dtype]
    with torch.device("meta"):
        model = HybridLM(cfg)
    by_kind = model.num_parameters_by_kind()
    total = sum(p.numel() for p in model.parameters())
    mem = model.decode_memory(context, dtype=tdtype)
    mem0 = model.decode_memory(1, dtype=tdtype)
    n_attn = len(cfg.attention_layers())
    kv_per_token = 0
    if n_attn:
        a = cfg.attention
        hd = a.head_dim or cfg.hidden_size // a.num_heads
        kv_per_token = n_attn * 2 * (a.num_kv_heads or a.num_heads) * hd * tdtype.itemsize
    return {
        "target": target,
        "name": cfg.name,
        "layers": cfg.num_layers,
        "layer_pattern": list(cfg.layer_pattern),
        "attention_fraction": n_attn / cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "parameters": total,
        "parameters_by_kind": by_kind,
        "decode_memory": {
            "context": context,
            "kv_dtype": str(tdtype).replace("torch.", ""),
            "recurrent_state_bytes": mem["recurrent_state_bytes"],
            "kv_cache_bytes_per_token": kv_per_token,
            "kv_cache_bytes": mem["kv_cache_bytes"],
            "total_bytes": mem["total_bytes"],
            "total_bytes_at_1_token": mem0["total_bytes"],
        },
    }


def cmd_info(args) -> int:
    from hybridize.api import CheckpointError
    from hybridize.config import PRESET_FAMILIES, PRESET_SIZES, ConfigError

    if args.list:
        names = [f"{f}-{s}" for f in PRESET_FAMILIES for s in PRESET_SIZES]
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0
    if not args.target:
        raise UserError("hybridize info: give a checkpoint directory or a preset name (see --list)")
    try:
        rep = info_report(args.target, context=args.context, dtype=args.dtype)
    except (ConfigError, CheckpointError) as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    m = rep["decode_memory"]
    print(f"{rep['target']}  ({rep['layers']} layers, hidden {rep['hidden_size']}, vocab {rep['vocab_size']})")
    print(f"  layer pattern     : {_compress_pattern(rep['layer_pattern'])}")
    print(f"  attention layers  : {rep['attention_fraction'] * 100:.1f} %")
    print(f"  parameters        : {rep['parameters'] / 1e6:.2f} M  "
          + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in rep["parameters_by_kind"].items()))
    print(f"  decode memory / sequence at context {m['context']} ({m['kv_dtype']} KV, fp32 states):")
    print(f"    recurrent state : {_human_bytes(m['recurrent_state_bytes'])} (fixed)")
    print(f"    KV cache        : {_human_bytes(m['kv_cache_bytes'])} "
          f"({_human_bytes(m['kv_cache_bytes_per_token'])} per token)")
    print(f"    total           : {_human_bytes(m['total_bytes'])}")
    return 0


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="layer pattern, parameter count and decode memory of a model",
                       description="Show the layer pattern, parameter count and decode memory per sequence "
                                   "(recurrent state vs KV cache) of a preset or a checkpoint directory.")
    p.add_argument("target", nargs="?", help="checkpoint directory (hybridize or HF) or preset, e.g. mil50-1b")
    p.add_argument("--context", type=int, default=4096, help="context length for the KV-cache size (default 4096)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "bf16", "float16", "fp16", "float32", "fp32"],
                   help="KV-cache dtype (recurrent states are fp32)")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)


# ---------------------------------------------------------------------------- main
def _lazy(module: str, name: str):
    def add(sub):
        import importlib
        getattr(importlib.import_module(module), name)(sub)
    return add


def _train_commands(sub):
    from hybridize.commands_train import COMMANDS
    for add in COMMANDS:
        add(sub)


PARSERS = [
    add_info_parser,
    _train_commands,
    _lazy("hybridize.commands_generate", "add_generate_parser"),
    _lazy("hybridize.commands_eval", "add_eval_parser"),
    _lazy("hybridize.commands_bench", "add_bench_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridize",
        description="Turn a pretrained Transformer into a fast attention / linear-RNN hybrid, and run it fast.")
    parser.add_argument("--version", action="version", version=f"hybridize {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"hybridize {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
