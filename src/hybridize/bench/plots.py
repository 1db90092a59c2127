"""Plots of benchmark JSON: time vs sequence length per implementation (SSD), tokens/s vs context per
model (decode). `python -m hybridize.bench.plots [DIR]` re-plots DIR (default benchmarks/results)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import sys  # noqa: E402


def plot_ssd(path: Path, out: Path) -> None:
    d = json.loads(path.read_text())
    rows = sorted((r for r in d.get("timings", {}).values() if "L" in r), key=lambda r: r["L"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, suffix, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwd_bwd_ms", "forward + backward")):
        for impl, label in (("hybridize", "hybridize (Triton)"), ("mamba_ssm_chunk256", "mamba_ssm"),
                            ("fla_simple_gla", "fla chunk_simple_gla"), ("sdpa", "SDPA causal (FlashAttention)")):
            pts = [(r["L"], r[f"{impl}_{suffix}"]) for r in rows if f"{impl}_{suffix}" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        floor = "hbm_floor_fwd_ms" if suffix == "fwd_ms" else None
        if floor:
            ax.plot([r["L"] for r in rows], [r[floor] for r in rows], "k--", label="HBM floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (16384 tokens per call)")
        ax.set_ylabel("ms")
        device = str(d.get("env", {}).get("gpu", "cpu (smoke)")).replace("NVIDIA ", "")
        ax.set_title(f"SSD {title}, H=32 P=64 N=128 bf16, {device}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_decode(path: Path, out: Path) -> None:
    d = json.loads(path.read_text())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=False)
    models = []
    for r in d.get("decode", []):
        if r["model"] not in models:
            models.append(r["model"])
    for ax, batch in zip(axes, (1, 8, 64)):
        for m in models:
            pts = sorted((r["context"], r["tokens_per_s"]) for r in d["decode"]
                         if r["model"] == m and r["batch"] == batch)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        hf = sorted((r["context"], r["tokens_per_s"]) for r in d.get("hf_generate", []) if r["batch"] == batch)
        if hf:
            ax.plot(*zip(*hf), "k:", marker="x", label="transformers generate (llama-1b)")
        ax.set_title(f"decode, batch {batch}, bf16")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("tokens / s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_dir(results: Path) -> list:
    """Plot every known JSON in `results` next to it; returns the PNG paths written."""
    written = []
    for stem, fn in (("ssd", plot_ssd), ("decode", plot_decode)):
        for path in sorted(results.glob(f"{stem}*.json")):
            out = path.with_suffix(".png")
            fn(path, out)
            written.append(out)
    return written


if __name__ == "__main__":
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("benchmarks/results")
    print("\n".join(str(p) for p in plot_dir(d)))
