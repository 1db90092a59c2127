"""Training driver for the synthetic tasks: tiny models (2 layers by default), one per (mixer, width,
sequence length, learning rate) cell, trained with `hybridize.distill.trainer.Trainer` on fresh batches;
the best learning rate per cell is kept — the protocol behind Zoology's accuracy-vs-width figures.

Mixers (`parse_mixer`): ``attention`` (the Transformer baseline, [attention, attention]), ``mamba2``,
``mamba1``, ``rglru`` (alias ``hawk``), ``griffin`` (RG-LRU + local MQA: [rglru, attention]) and
``discrete_mamba2``. A state size can be attached: ``mamba2:16``, ``mamba2:256``, ``mamba1:16``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from hybridize.config import (
    AttentionConfig, DiscreteMamba2Config, HybridConfig, Mamba1Config, Mamba2Config, MLPConfig, RGLRUConfig,
)
from hybridize.eval.synthetic import (
    SyntheticStream, SyntheticTaskError, answer_accuracy, default_kv_pairs, make_task, task_vocab_size,
)

MIXERS = ("attention", "mamba2", "mamba1", "rglru", "hawk", "griffin", "discrete_mamba2")
_STATEFUL = ("mamba2", "mamba1", "discrete_mamba2")


@dataclass(frozen=True)
class MixerSpec:
    """A sequence-mixer choice for a synthetic model: kind plus an optional state size N."""
    kind: str
    d_state: Optional[int] = None

    @property
    def label(self) -> str:
        return self.kind if self.d_state is None else f"{self.kind} (N={self.d_state})"


def parse_mixer(spec: str, d_state: Optional[int] = None) -> MixerSpec:
    """"mamba2" / "mamba2:64" / "hawk" … → MixerSpec. `d_state` is the default N for stateful mixers."""
    kind, _, n = spec.partition(":")
    kind = {"hawk": "rglru", "transformer": "attention", "mqa": "attention"}.get(kind.strip().lower(),
                                                                             kind.strip().lower())
    if kind not in MIXERS:
        raise SyntheticTaskError(f"unknown mixer {spec!r}; choose from {', '.join(MIXERS)} "
                                 "(add ':N' for a state size, e.g. mamba2:64)")
    if n:
        if kind not in _STATEFUL:
            raise SyntheticTaskError(f"mixer {kind!r} has no state size to set (got {spec!r})")
        try:
            return MixerSpec(kind, int(n))
        except ValueError:
            raise SyntheticTaskError(f"state size in {spec!r} must be an integer") from None
    return MixerSpec(kind, d_state if kind in _STATEFUL else None)


def synthetic_config(mixer, width: int, vocab_size: int, *, num_layers: int = 2, window: Optional[int] = None,
                     mlp_mult: int = 2, max_len: int = 8192) -> HybridConfig:
    """A tiny HybridConfig for a synthetic task: `num_layers` blocks of the chosen mixer (Griffin: RG-LRU
    with a local-MQA layer every third block, the second of two), gated MLP of mlp_mult × width (0 = none).

    Head sizes: attention head_dim 64 (fewer heads at small widths); Mamba-2 headdim 32/64, expand 2,
    d_state N (default 64); Mamba-1 expand 2, N default 16; RG-LRU width = model width, 4 gate blocks."""
    spec = parse_mixer(mixer) if isinstance(mixer, str) else mixer
    d = width
    if d < 16 or d % 16:
        raise SyntheticTaskError(f"width must be a positive multiple of 16 (got {d})")
    kind = spec.kind
    if kind == "griffin":
        every = min(3, num_layers)
        pattern = ["attention" if (i + 1) % every == 0 else "rglru" for i in range(num_layers)]
    else:
        pattern = [kind] * num_layers
    heads = max(1, d // 64)
    attn = AttentionConfig(num_heads=heads, num_kv_heads=1 if kind == "griffin" else heads,
                           head_dim=d // heads, max_position_embeddings=max(8192, max_len),
                           sliding_window=window if kind == "griffin" else None)
    hd = 64 if d >= 128 else 32
    cfg = HybridConfig(
        vocab_size=vocab_size, hidden_size=d, layer_pattern=pattern,
        mlp=MLPConfig(mlp_mult * d, activation="gelu_tanh" if kind in ("griffin", "rglru") else "silu"),
        attention=attn,
        mamba2=Mamba2Config(d_state=spec.d_state or 64, headdim=hd, expand=2, chunk_size=64),
        mamba1=Mamba1Config(d_state=spec.d_state or 16, expand=2),
        rglru=RGLRUConfig(lru_width=d, num_heads=4),
        discrete_mamba2=DiscreteMamba2Config(d_state=spec.d_state or 64, n_qk_heads=max(1, d // 32),
                                             n_v_heads=max(1, d // 32), expand=2),
        bos_token_id=None, eos_token_id=None, name=f"synthetic-{spec.label}-{d}",
    )
    return cfg.validate()


def _amp_dtype(device: torch.device, dtype: str) -> Optional[torch.dtype]:
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def train_cell(task: str, mixer, width: int, seq_len: int, lr: float, *, steps: int = 200,
               batch_size: int = 64, task_kwargs: Optional[dict] = None, eval_examples: int = 256,
               eval_lengths: Sequence[int] = (), eval_every: int = 0, num_layers: int = 2,
               window: Optional[int] = None, mlp_mult: int = 2, weight_decay: float = 0.1,
               warmup_fraction: float = 0.1, seed: int = 0, device=None, dtype: str = "auto",
               stop_at_accuracy: Optional[float] = None, time_limit_s: Optional[float] = None,
               schedule: str = "cosine") -> dict:
    """Train one tiny model on fresh batches of a synthetic task and measure answer accuracy.

    eval_lengths: extra evaluation lengths (length extrapolation, e.g. induction heads at 2× … 8×).
    eval_every:   also record eval accuracy every k steps (learning curves) → "history".
    stop_at_accuracy: end training early once an eval (every `eval_every` steps) reaches this accuracy —
                  a solved cell leaves its time to the others ("stopped": "solved").
    time_limit_s: end training after this many seconds ("stopped": "time_limit"); accuracy is measured
                  on the model as it is then. With a time limit the step count is not known in advance:
                  use schedule="constant" (after the warm-up) rather than a cosine sized for `steps`.
    Returns a dict: task, mixer, label, width, seq_len, lr, steps, accuracy, sequence_accuracy, loss,
    parameters, train_time_s, accuracy_by_length {L: acc}, history [{"step", "accuracy"}], and
    num_kv_pairs for MQAR."""
    from hybridize.distill.trainer import Trainer, TrainConfig, TrainingError
    from hybridize.model import HybridLM

    spec = parse_mixer(mixer) if isinstance(mixer, str) else mixer
    if stop_at_accuracy is not None and not eval_every:
        raise SyntheticTaskError("stop_at_accuracy needs eval_every > 0 (the accuracy is checked at evals)")
    kw = dict(task_kwargs or {})
    is_mqar = task.replace("-", "_") == "mqar"
    if is_mqar:
        kw["num_kv_pairs"] = kw.get("num_kv_pairs") or default_kv_pairs(seq_len)
    gen = make_task(task, seq_len, **dict(kw))
    vocab = task_vocab_size(task, **kw)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    max_len = max([seq_len, *eval_lengths])
    torch.manual_seed(seed)
    model = HybridLM(synthetic_config(spec, width, vocab, num_layers=num_layers, window=window,
                                      mlp_mult=mlp_mult, max_len=max_len)).to(device)
    amp = _amp_dtype(device, dtype)
    eval_sets = {seq_len: gen(eval_examples, 10_000_019 + seed)}       # seeds disjoint from training
    for L in eval_lengths:              # same task options (MQAR: same kv pairs) at other lengths
        if L != seq_len:
            eval_sets[L] = make_task(task, L, **dict(kw))(eval_examples, 10_000_019 + seed + L)

    history: list = []
    holder: dict = {}

    def eval_fn(m) -> dict:
        r = answer_accuracy(m, eval_sets[seq_len], autocast_dtype=amp)
        history.append({"step": holder["trainer"].step, "accuracy": r["accuracy"]})
        if stop_at_accuracy is not None and r["accuracy"] >= stop_at_accuracy:
            holder["trainer"].request_stop("solved")
        return {"accuracy": r["accuracy"]}

    warmup = max(0, min(int(warmup_fraction * steps), steps - 1))
    cfg = TrainConfig(lr=lr, min_lr=lr * 0.1, warmup_steps=warmup, schedule=schedule,
                      weight_decay=weight_decay, max_steps=steps, batch_size=batch_size, seq_len=seq_len,
                      eval_every=eval_every, time_limit_s=time_limit_s, log_every=eval_every or max(1, steps), seed=seed,
                      dtype=dtype, progress=False,
                      plot=False)
    trainer = Trainer(model, SyntheticStream(gen, batch_size, seed=seed), config=cfg,
                      eval_fn=eval_fn if eval_every else None)
    holder["trainer"] = trainer
    t0 = time.perf_counter()
    error, stopped, steps_run = None, "max_steps", 0
    try:
        summary = trainer.train()
        loss, stopped = summary.get("loss"), summary.get("stopped", "max_steps")
    except TrainingError as e:          # a diverging cell (NaN loss) must not end the whole sweep
        error, loss = str(e), None
    steps_run = trainer.step
    train_time = time.perf_counter() - t0
    by_len = {}
    for L, data in eval_sets.items():
        r = answer_accuracy(model, data, autocast_dtype=amp) if error is None else \
            {"accuracy": 0.0, "sequence_accuracy": 0.0}
        by_len[L] = r
    main = by_len[seq_len]
    out = {
        "task": task, "mixer": spec.kind, "label": spec.label, "d_state": spec.d_state, "width": width,
        "seq_len": seq_len, "lr": lr, "steps": steps, "steps_run": steps_run, "stopped": stopped,
        "batch_size": batch_size,
        "accuracy": main["accuracy"], "sequence_accuracy": main["sequence_accuracy"],
        "loss": loss, "parameters": sum(p.numel() for p in model.parameters()),
        "train_time_s": train_time,
        "accuracy_by_length": {L: r["accuracy"] for L, r in sorted(by_len.items())},
        "history": history,
    }
    if is_mqar:
        out["num_kv_pairs"] = kw["num_kv_pairs"]
    if error:
        out["error"] = error
    return out


def best_cells(cells: Sequence[dict]) -> list:
    """The best learning rate per (label, width, seq_len): highest accuracy, then lowest loss."""
    best: dict = {}
    for c in cells:
        key = (c["label"], c["width"], c["seq_len"])
        loss = c["loss"] if c["loss"] is not None and math.isfinite(c["loss"]) else float("inf")
        score = (c["accuracy"], -loss)
        if key not in best or score > best[key][0]:
            best[key] = (score, c)
    return [v[1] for _, v in sorted(best.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1]))]


def run_sweep(task: str = "mqar", mixers: Sequence = ("attention", "mamba2"),
              widths: Sequence[int] = (64, 128), lrs: Sequence[float] = (1e-3, 3e-4),
              seq_lens: Sequence[int] = (64,), *, kv_pairs: Optional[Sequence[int]] = None,
              d_state: Optional[int] = None, progress: bool = False, **cell_kw) -> dict:
    """Train every (mixer, width, seq_len, lr) cell → {"task", "settings", "cells" (all runs), "best"
    (best LR per mixer × width × seq_len)}. kv_pairs: MQAR pairs per seq_len (default: the Zoology grid).
    Other keyword arguments go to `train_cell` (steps, batch_size, eval_lengths, window, device, ...)."""
    specs = [parse_mixer(m, d_state) if isinstance(m, str) else m for m in mixers]
    if kv_pairs is not None and len(kv_pairs) != len(seq_lens):
        raise SyntheticTaskError(f"give one kv-pairs value per sequence length ({len(seq_lens)}), "
                                 f"got {len(kv_pairs)}")
    base_kw = dict(cell_kw.pop("task_kwargs", None) or {})
    runs = [(s, w, L, i, lr) for i, L in enumerate(seq_lens) for s in specs for w in widths for lr in lrs]
    it = runs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(runs, desc=f"{task} sweep", unit="model")
    cells = []
    for spec, w, L, i, lr in it:
        kw = dict(base_kw)
        if kv_pairs is not None:
            kw["num_kv_pairs"] = kv_pairs[i]
        cells.append(train_cell(task, spec, w, L, lr, task_kwargs=kw, **cell_kw))
        if progress:
            c = cells[-1]
            it.set_postfix_str(f"{c['label']} d={w} L={L} lr={lr:g}: acc {c['accuracy']:.3f}")
    settings = {"task": task, "mixers": [s.label for s in specs], "widths": list(widths), "lrs": list(lrs),
                "seq_lens": list(seq_lens), "kv_pairs": list(kv_pairs) if kv_pairs is not None else None,
                **{k: v for k, v in cell_kw.items()
                   if isinstance(v, (int, float, str, list, tuple, type(None)))}}
    return {"task": task, "settings": settings, "cells": cells, "best": best_cells(cells)}


def format_table(best: Sequence[dict]) -> str:
    """A plain-text table of the best cells: one row per (seq_len, mixer), one column per width."""
    widths = sorted({c["width"] for c in best})
    rows = sorted({(c["seq_len"], c["label"]) for c in best}, key=lambda r: (r[0], r[1]))
    acc = {(c["seq_len"], c["label"], c["width"]): c for c in best}
    lines = [f"{'L':>6}  {'mixer':<22}" + "".join(f"{'d=' + str(w):>14}" for w in widths)]
    for L, label in rows:
        cells = []
        for w in widths:
            c = acc.get((L, label, w))
            cells.append(f"{c['accuracy']:>7.3f} @{c['lr']:<5.0e}" if c else f"{'-':>14}")
        lines.append(f"{L:>6}  {label:<22}" + "".join(f"{s:>14}" for s in cells))
    return "\n".join(lines)
