"""Figures for the evaluation commands (matplotlib, headless). Each function writes one PNG and returns
its path; matplotlib is an optional dependency (``pip install matplotlib`` / the ``plot`` extra)."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence


class PlotError(RuntimeError):
    """matplotlib is missing or a figure cannot be written."""


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib (or hybridize[plot])") from None
    return plt


def _save(fig, path) -> str:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    _plt().close(fig)
    return str(path)


def plot_loss_vs_position(curves: dict, path: os.PathLike, *, train_len: Optional[int] = None,
                          title: str = "Loss vs token position", num_bins: int = 64,
                          log_x: bool = True) -> str:
    """One line per model: mean next-token loss against the token position in the window.

    curves: {label: {"per_position_loss": [...], "per_position_count": [...]}} (a `perplexity` result).
    train_len: draws a dashed vertical line at the training length (extrapolation plots)."""
    from hybridize.eval.perplexity import bin_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, r in curves.items():
        xs, ys = bin_curve(r["per_position_loss"], r.get("per_position_count"), num_bins=num_bins, log=log_x)
        ax.plot(xs, ys, label=label, lw=1.6)
    if train_len:
        ax.axvline(train_len, ls="--", color="grey", lw=1, label=f"training length {train_len}")
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("token position")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_extrapolation(results: dict, path: os.PathLike, *, title: str = "Length extrapolation") -> str:
    """Griffin Fig. 5 style: left, loss vs token position over the longest evaluation length (log x, the
    training length dashed); right, perplexity at each evaluation length.

    results: {label: `extrapolation(...)` result}."""
    from hybridize.eval.perplexity import bin_curve

    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    train_lens = set()
    for label, r in results.items():
        xs, ys = bin_curve(r["per_position_loss"], r.get("per_position_count"), num_bins=64, log=True)
        a1.plot(xs, ys, label=label, lw=1.6)
        lens = [row["seq_len"] for row in r["lengths"]]
        a2.plot(lens, [row["ppl"] for row in r["lengths"]], marker="o", label=label)
        train_lens.add(r["train_len"])
    for tl in sorted(train_lens):
        for ax in (a1, a2):
            ax.axvline(tl, ls="--", color="grey", lw=1)
    a1.set_xscale("log", base=2)
    a1.set_xlabel("token position")
    a1.set_ylabel("mean loss (nats)")
    a1.set_title("loss vs position (dashed: training length)")
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.set_xlabel("evaluation length (tokens)")
    a2.set_ylabel("perplexity")
    a2.set_title("perplexity vs evaluation length")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def plot_accuracy_vs_width(cells: Sequence[dict], path: os.PathLike, *, title: str = "") -> str:
    """The Zoology / Based figure: one panel per sequence length, accuracy against model width (log x),
    one line per mixer. cells: `run_sweep` best cells, each with "mixer", "width", "seq_len", "accuracy"."""
    plt = _plt()
    by_len = defaultdict(lambda: defaultdict(list))
    for c in cells:
        by_len[c["seq_len"]][c["label"] if "label" in c else c["mixer"]].append((c["width"], c["accuracy"]))
    lens = sorted(by_len)
    fig, axes = plt.subplots(1, len(lens), figsize=(4.0 * len(lens), 3.6), squeeze=False, sharey=True)
    for ax, L in zip(axes[0], lens):
        for label, pts in sorted(by_len[L].items()):
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        kv = next((c.get("num_kv_pairs") for c in cells if c["seq_len"] == L and c.get("num_kv_pairs")), None)
        ax.set_title(f"L = {L}" + (f", {kv} kv pairs" if kv else ""))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("model width")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_learning_curves(histories: dict, path: os.PathLike, *,
                         title: str = "Accuracy during training") -> str:
    """Griffin Fig. 6a style: eval accuracy against training steps, one line per model.
    histories: {label: [{"step", "accuracy"}, ...]}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, hist in histories.items():
        ax.plot([h["step"] for h in hist], [h["accuracy"] for h in hist], marker=".", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_length_generalization(results: dict, path: os.PathLike, *, train_len: Optional[int] = None,
                               title: str = "Accuracy vs evaluation length") -> str:
    """Griffin Fig. 6b/c style: accuracy at evaluation lengths (log x), one line per model.
    results: {label: {seq_len: accuracy}}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, accs in results.items():
        lens = sorted(int(k) for k in accs)
        ax.plot(lens, [accs[k] if k in accs else accs[str(k)] for k in lens], marker="o", label=label)
    if train_len:
        ax.axvline(train_len, ls="--", color="grey", lw=1, label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
