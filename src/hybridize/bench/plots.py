"""Plots of benchmark JSON: time vs sequence length per implementation (SSD; RG-LRU scan and conv1d),
tokens/s vs context per model (decode), the distillation quality study (quality).
`python -m hybridize.bench.plots [DIR]` re-plots DIR (default benchmarks/results)."""
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


def plot_scan(path: Path, out: Path) -> None:
    """`hybridize.bench.scan`: time vs L per implementation, forward / forward+backward, RG-LRU scan (top)
    and causal conv1d (bottom); the HBM floor dashed."""
    d = json.loads(path.read_text())
    recs = [r for r in d.get("records", []) if "L" in r]
    cfg = d.get("config", {})
    device = str(d.get("env", {}).get("gpu", "cpu (smoke)")).replace("NVIDIA ", "")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for row, (op, title) in enumerate((("rglru_scan", "RG-LRU scan"), ("conv1d", "causal conv1d"))):
        impls = list(dict.fromkeys(r["impl"] for r in recs if r["op"] == op))
        for ax, mode, what in ((axes[row, 0], "fwd", "forward"), (axes[row, 1], "fwd_bwd", "forward + backward")):
            for impl in impls:
                pts = sorted((r["L"], r[f"{mode}_ms"]) for r in recs if r["op"] == op and r["impl"] == impl
                             and isinstance(r.get(f"{mode}_ms"), (int, float)))
                if not pts:
                    continue
                if impl == "hbm_floor":
                    ax.plot(*zip(*pts), "k--", label="HBM floor")
                else:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"sequence length L ({cfg.get('tokens_per_call', '?')} tokens per call)")
            ax.set_ylabel("ms")
            extra = f", W={cfg.get('conv_width')} {cfg.get('conv_activation')}" if op == "conv1d" else ""
            ax.set_title(f"{title} {what}, C={cfg.get('width')}{extra} {cfg.get('dtype', '')}, {device}",
                         fontsize=9)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


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
        hf_rows = [r for r in d.get("hf_generate", []) if r["batch"] == batch]
        hf = sorted((r["context"], r["tokens_per_s"]) for r in hf_rows if r["model"] == "transformers.LlamaForCausalLM")
        if hf:
            ax.plot(*zip(*hf), "k:", marker="x", label="transformers generate (llama-1b)")
        for r in hf_rows:       # transformers' generate on a HybridLM itself (bench decode --hf-hybrid)
            if r["model"].startswith("transformers.generate:"):
                ax.plot([r["context"]], [r["tokens_per_s"]], "r", marker="+", ls="none", markersize=10,
                        label=f"transformers generate ({r['model'].split(':', 1)[1]})")
        ax.set_title(f"decode, batch {batch}, bf16")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("tokens / s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


# ---------------------------------------------------------------------------- quality study
def plot_quality(r: dict, out) -> str:
    """One PNG of a `hybridize.bench.quality` result: ppl ratio per attention fraction, distillation curves,
    init ablation, MOHAWK curves, throughput, perplexity vs evaluation length (phases not run say so);
    plus `<out stem>_extrapolation.png` (Griffin Fig. 5 style) when the extrapolation phase ran."""
    fig, ax = plt.subplots(2, 3, figsize=(17, 9))
    _quality_fractions(ax[0, 0], ax[0, 1], r.get("fractions", {}))
    _quality_init(ax[0, 2], r.get("init", {}))
    _quality_mohawk(ax[1, 0], r.get("mohawk", {}))
    _quality_throughput(ax[1, 1], r.get("throughput", {}))
    _quality_extrapolation(ax[1, 2], r.get("extrapolation", {}))
    for a in ax.flat:
        a.grid(alpha=0.3)
    t = r.get("teacher", {})
    ppl = t.get("heldout", {}).get("ppl")
    fig.suptitle(f"hybridize distillation quality — {r.get('env', {}).get('device_name', '?')}; teacher "
                 f"{t.get('parameters', 0) / 1e6:.1f} M parameters, held-out ppl "
                 f"{'?' if ppl is None else f'{ppl:.2f}'}")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    ex = r.get("extrapolation", {}).get("models")
    if ex:
        from hybridize.eval.plots import plot_extrapolation
        plot_extrapolation(ex, Path(out).with_name(Path(out).stem + "_extrapolation.png"),
                           title=f"Length extrapolation (trained at {r['extrapolation']['train_len']} "
                                 "tokens)")
    return str(out)


def _not_run(a, title: str, d: dict, key: str) -> bool:
    """Title the panel; True (and say why) when the phase has no `key` results to show (not run, skipped,
    or cut short before its first run finished)."""
    a.set_title(title)
    if d.get(key):
        return False
    a.text(0.5, 0.5, d.get("skipped", "not run"), ha="center", va="center", transform=a.transAxes, wrap=True)
    a.set_xticks([])
    a.set_yticks([])
    return True


def _quality_fractions(a1, a2, d: dict) -> None:
    if _not_run(a1, "held-out ppl / teacher", d, "runs") | _not_run(a2, "distillation curves", d, "runs"):
        return
    runs = d["runs"]
    keys = sorted(runs, key=float, reverse=True)
    ratios = [runs[k]["ppl_ratio"] for k in keys]
    bars = a1.bar([f"{float(k) * 100:g} %" for k in keys], ratios, color="tab:orange")
    a1.bar_label(bars, fmt="%.3f")
    targets = [(i, runs[k]["target_ratio"]) for i, k in enumerate(keys) if "target_ratio" in runs[k]]
    for i, tgt in targets:
        a1.plot([i - 0.4, i + 0.4], [tgt, tgt], "k--", lw=1)
    a1.axhline(1.0, color="grey", lw=1)
    top = max(ratios + [t for _, t in targets])
    a1.set(title=f"held-out ppl / teacher ({d['tokens_per_run'] / 1e6:.1f} M tokens each; dashed: target)",
           xlabel="attention kept", ylim=(min(0.9, min(ratios) * 0.95), top * 1.05))
    for k in keys:
        cv = runs[k]["curve"]
        a2.plot([p["tokens"] / 1e6 for p in cv], [p["kl"] for p in cv], marker=".",
                label=f"{float(k) * 100:g} %")
    a2.set(title="distillation: held-out KL(teacher ‖ student)", xlabel="M tokens", yscale="log")
    a2.legend(fontsize=8)


def _quality_init(a, d: dict) -> None:
    if _not_run(a, "initialisation (50 %)", d, "variants"):
        return
    var = d["variants"]
    names = list(var)
    bars = a.bar(names, [var[k]["ppl_ratio"] for k in names],
                 color=["tab:green" if k.startswith("attention") else "tab:gray" for k in names])
    a.bar_label(bars, fmt="%.3f")
    a.set(title=f"init ablation, 50 % ({d['tokens_per_run'] / 1e6:.1f} M tokens each)",
          ylabel="ppl / teacher")
    a.tick_params(axis="x", labelsize=8)


def _quality_mohawk(a, d: dict) -> None:
    if _not_run(a, "MOHAWK", d, "runs"):
        return
    for name, rec in d["runs"].items():
        cv = rec["curve"]
        line, = a.plot([p["tokens"] / 1e6 for p in cv], [p["kl"] for p in cv], marker=".",
                       label=name.replace("_", " "))
        off = 0
        for st in rec["stages"][:-1]:                 # stage boundaries
            off += st["tokens"]
            a.axvline(off / 1e6, ls=":", color=line.get_color(), lw=1)
    a.set(title=f"MOHAWK ({d['mixer']}, {d['attention_fraction'] * 100:g} % attention)", xlabel="M tokens",
          ylabel="held-out KL(teacher ‖ student)", yscale="log")
    a.legend(fontsize=8)


def _quality_throughput(a, d: dict) -> None:
    if _not_run(a, "throughput", d, "shapes"):
        return
    kinds = [("teacher_finetune", "teacher fine-tune"), ("student_kl_mixers", "distill (mixers)"),
             ("student_kl_all", "distill (all)")]
    shapes = d["shapes"]
    w = 0.8 / len(kinds)
    for i, (k, label) in enumerate(kinds):
        bars = a.bar([j + i * w for j in range(len(shapes))], [s[k]["tokens_per_s"] / 1e3 for s in shapes],
                     width=w, label=label)
        a.bar_label(bars, fmt="%.0f", fontsize=7)
    a.set_xticks([j + w for j in range(len(shapes))], [f"{s['batch']}×{s['seq_len']}" for s in shapes])
    a.set(title=f"training throughput ({d['dtype']})", ylabel="k tokens / s")
    a.legend(fontsize=8)


def _quality_extrapolation(a, d: dict) -> None:
    if _not_run(a, "length extrapolation", d, "models"):
        return
    for name, r in d["models"].items():
        a.plot([x["seq_len"] for x in r["lengths"]], [x["ppl"] for x in r["lengths"]], marker="o", label=name)
    a.axvline(d["train_len"], ls="--", color="grey", lw=1)
    a.set(title="perplexity vs evaluation length", xlabel="tokens per window", ylabel="ppl", xscale="log",
          yscale="log")
    a.legend(fontsize=8)


def plot_quality_file(path: Path, out: Path) -> None:
    plot_quality(json.loads(path.read_text()), out)


def plot_dir(results: Path) -> list:
    """Plot every known JSON in `results` next to it; returns the PNG paths written."""
    written = []
    for stem, fn in (("ssd", plot_ssd), ("decode", plot_decode), ("quality", plot_quality_file),
                     ("scan", plot_scan)):
        for path in sorted(results.glob(f"{stem}*.json")):
            out = path.with_suffix(".png")
            fn(path, out)
            written.append(out)
    return written


if __name__ == "__main__":
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("benchmarks/results")
    print("\n".join(str(p) for p in plot_dir(d)))
