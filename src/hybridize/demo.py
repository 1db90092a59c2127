"""`hybridize demo`: the whole pipeline in a few minutes on a CPU, with nothing downloaded.

1. train a byte-level BPE tokenizer on part of the Python standard library's source (the built-in
   corpus, present on every machine; the demo leaves out the codec tables and generated pydoc topics);
2. pretrain a tiny Llama-style teacher (GQA attention, SwiGLU MLP, RoPE) on that corpus;
3. convert it to a 50 % Mamba-2 hybrid with the Mamba-in-the-Llama attention initialisation (with an
   identity conv, see `distill/recipes/demo.toml` for the measured reason);
4. distil the new Mamba-2 layers with word-level KL (the `demo` recipe: only the new mixers train);
5. report held-out perplexity of the teacher, the converted-but-untrained student and the distilled
   student, their KL to the teacher, parameter counts, decode memory per sequence (KV cache vs
   recurrent state) and a generated sample of each.

Writes `out/metrics.json`, `out/curves.png`, `out/student/` (the distilled student with its
tokenizer; loads with `hybridize.load` or `AutoModelForCausalLM`), `out/teacher/`, `out/tokenizer/`
and the training runs (`out/teacher-run/`, `out/distill/`).

Sizes were chosen by measurement to fit a 2-core CPU in well under 10 minutes (see `DemoConfig`);
`--quick` is a seconds-long smoke version for tests.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch


@dataclass
class DemoConfig:
    out: str = "hybridize-demo"
    vocab_size: int = 2048
    tokenizer_chars: int = 3_000_000      # characters of stdlib source the BPE is trained on
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn: int = 384
    seq_len: int = 128
    batch_size: int = 8
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    distill_steps: int = 200
    distill_lr: float = 5e-3
    eval_batches: int = 8
    sample_tokens: int = 48
    sample_temperature: float = 0.7
    prompt: str = "def "
    contexts: tuple = (128, 4096, 32768)  # decode-memory report
    seed: int = 0
    threads: Optional[int] = None         # None → chosen from the free cores
    progress: bool = True

    @classmethod
    def quick(cls, **kw) -> "DemoConfig":
        """Seconds, for tests: a 2-layer toy on a few hundred kB of source."""
        base = dict(vocab_size=300, tokenizer_chars=150_000, hidden_size=32, num_layers=2, num_heads=2,
                    num_kv_heads=1, ffn=64, seq_len=32, batch_size=4, pretrain_steps=6, distill_steps=4,
                    eval_batches=1, sample_tokens=8, contexts=(32, 4096))
        base.update(kw)
        return cls(**base)


#: stdlib parts that are data rather than code (codec tables, generated pydoc topics)
DEMO_EXCLUDED = ("encodings/", "pydoc_data/")


def demo_corpus(heldout_fraction: float = 0.05):
    """The stdlib corpus without DEMO_EXCLUDED (`heldout_fraction` of the files held out, split by file)."""
    from hybridize.data import Corpus, stdlib_corpus

    c = stdlib_corpus()
    return Corpus("stdlib-code", [s for s in c.shards if not s.name.startswith(DEMO_EXCLUDED)],
                  heldout_fraction=heldout_fraction)


def choose_threads(requested: Optional[int] = None) -> int:
    """Intra-op threads: `requested`, else torch's default capped by the cores not already busy. On a
    shared 2-core machine, oversubscribed OpenMP threads spin and run several times slower than one."""
    if requested:
        return max(1, int(requested))
    n = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return n
    free = int((os.cpu_count() or n) - busy + 0.5)
    return max(1, min(n, free))


def llama_teacher_config(tokenizer, *, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                         ffn: int, max_position_embeddings: int, name: str = "demo-teacher",
                         tie_embeddings: bool = False):
    """A Llama-style teacher (GQA attention with RoPE, SwiGLU MLP) over `tokenizer`'s vocabulary and
    special tokens; head_dim = hidden_size / num_heads."""
    from hybridize.config import AttentionConfig, HybridConfig, MLPConfig

    return HybridConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, layer_pattern=["attention"] * num_layers,
        mlp=MLPConfig(ffn), attention=AttentionConfig(num_heads=num_heads, num_kv_heads=num_kv_heads,
                                                     head_dim=hidden_size // num_heads,
                                                     max_position_embeddings=max_position_embeddings),
        tie_embeddings=tie_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, name=name).validate()


def _teacher_config(c: DemoConfig, tokenizer):
    return llama_teacher_config(tokenizer, hidden_size=c.hidden_size, num_layers=c.num_layers,
                                num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, ffn=c.ffn,
                                max_position_embeddings=4 * c.seq_len)


def tokenizer_from_texts(texts, vocab_size: int, max_chars: int, save_dir=None):
    """A byte-level BPE trained on the first documents of `texts` (strings) up to `max_chars` characters."""
    from hybridize.data import train_bpe_tokenizer

    picked, n = [], 0
    for doc in texts:
        picked.append(doc)
        n += len(doc)
        if n >= max_chars:
            break
    return train_bpe_tokenizer(picked, vocab_size, save_dir=save_dir)


def _tokenizer(c: DemoConfig, out: Path):
    return tokenizer_from_texts(demo_corpus().with_split("train"), c.vocab_size, c.tokenizer_chars,
                                save_dir=out / "tokenizer")


def _memory(model, contexts) -> dict:
    dt = next(model.parameters()).dtype
    return {str(n): model.decode_memory(n, dtype=dt, state_dtype=torch.float32) for n in contexts}


def _demo_recipe(c: DemoConfig):
    """The shipped demo recipe, sized by the DemoConfig."""
    from hybridize.distill.recipes import load_recipe

    r = load_recipe("demo")
    r.data.train = demo_corpus()
    r.data.eval_batches = c.eval_batches
    r.student.seed = c.seed
    for s in r.stages:
        s.train = dataclasses.replace(s.train, seq_len=c.seq_len, batch_size=c.batch_size, lr=c.distill_lr,
                                      min_lr=c.distill_lr / 10, max_steps=c.distill_steps, max_tokens=None,
                                      warmup_steps=min(s.train.warmup_steps, c.distill_steps // 10),
                                      seed=c.seed, save_every=0).validate()
    return r


def run_demo(c: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Run the demo → the metrics dict (also written to c.out/metrics.json)."""
    from hybridize.distill.recipes import InterleavedRows, build_student, heldout_batches, run_recipe
    from hybridize.distill.stages import evaluate_lm, freeze, generate_text
    from hybridize.distill.trainer import TrainConfig, Trainer, lm_loss_fn
    from hybridize.model import HybridLM

    t_start = time.perf_counter()
    quiet_transformers()
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = choose_threads(c.threads)
    torch.set_num_threads(threads)
    torch.manual_seed(c.seed)
    timings = {}

    def tick(name, t0):
        timings[name] = round(time.perf_counter() - t0, 2)

    log(f"hybridize demo → {out}/  ({threads} CPU thread{'s' if threads > 1 else ''})")
    t0 = time.perf_counter()
    tok = _tokenizer(c, out)
    tick("tokenizer", t0)
    log(f"[1/5] byte-level BPE tokenizer: {len(tok)} tokens, trained on {c.tokenizer_chars / 1e6:.2g} M "
        f"characters of stdlib source ({timings['tokenizer']:.0f} s)")

    eval_set = heldout_batches(demo_corpus().with_split("heldout"), tok, seq_len=c.seq_len,
                               batch_size=c.batch_size, n=c.eval_batches)

    # ---- 2. teacher
    t0 = time.perf_counter()
    teacher = HybridLM(_teacher_config(c, tok))
    tcfg = TrainConfig(lr=c.pretrain_lr, min_lr=c.pretrain_lr / 10, warmup_steps=c.pretrain_steps // 15,
                       max_steps=c.pretrain_steps, batch_size=c.batch_size, seq_len=c.seq_len,
                       weight_decay=0.1,
                       log_every=max(1, min(10, c.pretrain_steps // 5)), out_dir=str(out / "teacher-run"),
                       seed=c.seed, progress=c.progress)
    train = InterleavedRows(demo_corpus().with_split("train"), tok, seq_len=c.seq_len,
                            batch_size=c.batch_size, seed=c.seed)
    pre = Trainer(teacher, train, lm_loss_fn, tcfg).train(overwrite=True)
    teacher.save_pretrained(str(out / "teacher"))
    tok.save_pretrained(str(out / "teacher"))
    freeze(teacher)
    tick("pretrain", t0)
    log(f"[2/5] teacher: {_count(teacher) / 1e6:.2f} M parameters, {c.pretrain_steps} steps "
        f"({pre['tokens'] / 1e3:.0f} k tokens, {pre['tokens_per_s']:.0f} tok/s, {timings['pretrain']:.0f} s)")

    # ---- 3. conversion (the same deterministic conversion the recipe runs)
    t0 = time.perf_counter()
    recipe = _demo_recipe(c)
    converted = build_student(recipe, teacher).eval()
    tick("convert", t0)
    log(f"[3/5] converted to {_pattern(converted.layer_pattern)} with attention init "
        f"({_count(converted) / 1e6:.2f} M parameters)")

    # ---- 4. distillation
    t0 = time.perf_counter()
    res = run_recipe(recipe, out / "distill", teacher=teacher, tokenizer=tok, overwrite=True,
                     progress=c.progress, log=lambda m: log("      " + m))
    student = res["student"].eval()
    tick("distill", t0)
    st = res["stages"][-1]
    log(f"[4/5] KL distillation of the Mamba-2 layers: {st['steps']} steps, {st['tokens'] / 1e3:.0f} k "
        f"tokens, {st['trainable_parameters'] / 1e6:.2f} M trainable parameters ({timings['distill']:.0f} s)")

    # ---- 5. report
    t0 = time.perf_counter()
    ev = {"teacher": evaluate_lm(teacher, eval_set),
          "student_converted": evaluate_lm(converted, eval_set, teacher),
          "student_distilled": evaluate_lm(student, eval_set, teacher)}
    models = {"teacher": teacher, "student_converted": converted, "student_distilled": student}
    samples = {k: generate_text(m, tok, c.prompt, c.sample_tokens, temperature=c.sample_temperature,
                                seed=c.seed) for k, m in models.items()}
    student.save_pretrained(str(out / "student"))
    tok.save_pretrained(str(out / "student"))
    tick("report", t0)
    timings["total"] = round(time.perf_counter() - t_start, 2)

    metrics = {
        "config": {**dataclasses.asdict(c), "contexts": list(c.contexts)},
        "threads": threads,
        "timings_s": timings,
        "tokenizer": {"vocab_size": len(tok)},
        "heldout_tokens": int(sum(int((b["labels"][:, 1:] != -100).sum()) for b in eval_set)),
        "teacher": {"parameters": _count(teacher), "layer_pattern": teacher.layer_pattern,
                    "pretrain_tokens": pre["tokens"], **_rename(ev["teacher"]),
                    "decode_memory": _memory(teacher, c.contexts)},
        "student_converted": {"parameters": _count(converted), "layer_pattern": converted.layer_pattern,
                              **_rename(ev["student_converted"])},
        "student_distilled": {"parameters": _count(student), "layer_pattern": student.layer_pattern,
                              "distill_tokens": st["tokens"],
                              "trainable_parameters": st["trainable_parameters"],
                              **_rename(ev["student_distilled"]),
                              "decode_memory": _memory(student, c.contexts)},
        "samples": {"prompt": c.prompt, "temperature": c.sample_temperature, **samples},
        "paths": {"student": str(out / "student"), "teacher": str(out / "teacher"),
                  "tokenizer": str(out / "tokenizer"), "curves": str(out / "curves.png"),
                  "teacher_run": str(out / "teacher-run"), "distill_run": str(out / "distill")},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    plot_demo(out / "teacher-run" / "metrics.jsonl", out / "distill" / "01-kl" / "metrics.jsonl", metrics,
              out / "curves.png")
    for line in report_lines(metrics):
        log(line)
    return metrics


def quiet_transformers() -> None:
    """No 'Writing model shards' bars from save_pretrained between our own progress lines."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _rename(ev: dict) -> dict:
    out = {"heldout_loss": ev["loss"], "heldout_ppl": ev["ppl"]}
    if "kl" in ev:
        out["kl_to_teacher"] = ev["kl"]
    return out


def _pattern(p: list) -> str:
    short = {"attention": "A", "mamba2": "M2", "mamba1": "M1", "rglru": "R", "discrete_mamba2": "D"}
    return "[" + " ".join(short.get(k, k) for k in p) + "]"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def report_lines(m: dict) -> list[str]:
    t, sc, sd = m["teacher"], m["student_converted"], m["student_distilled"]
    lines = [
        "[5/5] results on held-out stdlib files "
        f"({m['heldout_tokens']} tokens):",
        f"      {'model':<28}{'params':>10}{'ppl':>10}{'KL→teacher':>12}",
        f"      {'teacher ' + _pattern(t['layer_pattern']):<28}{t['parameters'] / 1e6:>9.2f}M"
        f"{t['heldout_ppl']:>10.2f}{'—':>12}",
        f"      {'converted, untrained':<28}{sc['parameters'] / 1e6:>9.2f}M{sc['heldout_ppl']:>10.2f}"
        f"{sc['kl_to_teacher']:>12.4f}",
        f"      {'distilled ' + _pattern(sd['layer_pattern']):<28}{sd['parameters'] / 1e6:>9.2f}M"
        f"{sd['heldout_ppl']:>10.2f}{sd['kl_to_teacher']:>12.4f}",
        "      decode memory per sequence (fp32): context   teacher KV      student KV + state",
    ]
    for ctx, tm in t["decode_memory"].items():
        smm = sd["decode_memory"][ctx]
        lines.append(f"      {'':>36}{int(ctx):>7}   {_human(tm['total_bytes']):>10}      "
                     f"{_human(smm['kv_cache_bytes'])} + {_human(smm['recurrent_state_bytes'])}")
    s = m["samples"]
    lines.append(f"      samples (prompt {s['prompt']!r}, temperature {s['temperature']}):")
    for k in ("teacher", "student_converted", "student_distilled"):
        lines.append(f"        {k:<18} {(s['prompt'] + s[k])!r}"[:160])
    lines.append(f"      total {m['timings_s']['total']:.0f} s; report in "
                 f"{Path(m['paths']['curves']).parent}/ (metrics.json, curves.png, student/)")
    return lines


def _read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_demo(teacher_log, distill_log, metrics: dict, png) -> Optional[str]:
    """curves.png: teacher pretraining loss, distillation KL, held-out perplexity, decode memory."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(14, 3.6), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 4)
    rows = [r for r in _read_jsonl(teacher_log) if "loss" in r]
    ax[0].plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax[0].set(title="teacher pretraining", xlabel="step", ylabel="cross-entropy")
    rows = [r for r in _read_jsonl(distill_log) if "loss" in r]
    ax[1].plot([r["step"] for r in rows], [r.get("kl", r["loss"]) for r in rows], color="tab:orange")
    ax[1].set(title="distillation (new Mamba-2 layers)", xlabel="step", ylabel="KL(teacher ‖ student)")
    names = ["teacher", "converted", "distilled"]
    ppl = [metrics[k]["heldout_ppl"] for k in ("teacher", "student_converted", "student_distilled")]
    bars = ax[2].bar(names, ppl, color=["tab:blue", "tab:gray", "tab:orange"])
    ax[2].bar_label(bars, fmt="%.1f")
    ax[2].set(title="held-out perplexity", yscale="log", ylim=(1, max(ppl) * 3))
    ctx = sorted(int(k) for k in metrics["teacher"]["decode_memory"])
    tm = [metrics["teacher"]["decode_memory"][str(k)]["total_bytes"] / 2**20 for k in ctx]
    sm = [metrics["student_distilled"]["decode_memory"][str(k)]["total_bytes"] / 2**20 for k in ctx]
    ax[3].plot(ctx, tm, "o-", label="teacher (KV cache)")
    ax[3].plot(ctx, sm, "o-", label="student (KV + state)")
    ax[3].set(title="decode memory / sequence", xlabel="context", ylabel="MiB", xscale="log", yscale="log")
    ax[3].legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.savefig(str(png), dpi=100)
    return str(png)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


__all__ = ["DemoConfig", "run_demo", "choose_threads", "report_lines", "plot_demo", "demo_corpus",
           "llama_teacher_config", "tokenizer_from_texts", "quiet_transformers"]
