"""Speculative decoding vs plain decoding on a *trained* target / draft pair (issue 5 §3/§4): end-to-end
tokens/s of both, the speed-up, acceptance rate, mean tokens per round and the verification cost, for
K = 1 … 8 draft tokens, greedy and sampled (temperature 1), on held-out prompts.

Why trained models and these sizes: speculative decoding pays only when a target step costs much more
than a draft step and the draft agrees with the target often. On an H100 at batch 1 a small model's step
is bound by kernel launches (a 20 M model costs about what a 2-layer one does), so the default target is a
~373 M-parameter Llama-style model (d 1024, 24 layers, vocabulary 8192 of the quality study's BPE),
pretrained for a few minutes on the study's data, converted to the 50 % attention Mamba-2 hybrid (the
Mamba-in-the-Llama paper's speculative target) and distilled (word-level KL, `Study.mil_stages`); the
draft is a 2-layer d-512 Llama-style model trained by word-level KL against the target. ``--target-kind
teacher`` skips the conversion (a pure Transformer target). Every size is a ``--set`` away.

Phases (one GPU call may run at most ~10 minutes, so training and timing are separate calls; the pair
lives in a git-ignored directory that a warm GPU machine keeps between calls):

  train   data (`quality.prepare_data`), step-time calibration (`Study.calibrate` + the draft's KL step),
          teacher pretraining (`Study.phase_teacher`; or ``--teacher DIR`` loads one), conversion +
          distillation (`Study.distill`), draft KL training — the time left after the fixed costs shared
          by weight (`weight_teacher`, `weight_distill`, `weight_draft`), each run hard-stopped at the
          budget — then target and draft saved in bf16 (``save_pretrained``) with the tokenizer and the
          held-out prompts (``spec_pair.json``) under ``--save-dir``.
  bench   loads the pair (``--load-dir``), casts it to bf16 (CUDA) and, per batch size: plain decoding
          (greedy and temperature 1) of every prompt, then per K: one warm-up generation (compiles the
          verifier for T = K + 1: tens of seconds, outside every timed region), speculative decoding of
          every prompt at each temperature (tokens/s, acceptance, tokens per round, whether greedy
          speculative output equals greedy plain output token for token), and the costs of one round's
          pieces: target step, draft step and verification of T tokens (+ rollback), CUDA events on
          graph replays at the mean decode context (as `bench.decode.bench_verify` times them).
  all     both in one process (CPU smoke, or a GPU with time for both).

Timings are the engine's own (`GenerationStats.decode_s`: decode loop only, prefill and graph capture
excluded); tokens/s = new tokens / decode seconds summed over the prompts; speed-up = speculative ÷ plain
tokens/s at the same batch and temperature. No EOS: every row decodes exactly ``max_new_tokens`` tokens.
The JSON (``--json-out``) is rewritten atomically after every measurement and mirrored to
``<pair dir>/bench_results.json``; a bench call cut short by ``--budget-s`` records what it skipped, and
``--resume`` continues from the mirror (same machine, same pair). The PNG (speed-up, acceptance, tokens per
round, verification cost vs K) comes at the end (``--plot-only JSON`` redraws it).

    source benchmarks/gpu_env.sh; python3 -m hybridize.bench.speculative --phase train \\
        --data stdlib .data/valid.txt .data/tinyshakespeare.txt --save-dir .cache/spec_pair --budget-s 500 \\
        --json-out $OUT/speculative_train.json
    source benchmarks/gpu_env.sh; python3 -m hybridize.bench.speculative --phase bench \\
        --load-dir .cache/spec_pair --budget-s 480 --json-out $OUT/speculative.json \\
        --plot-out $OUT/speculative.png
    python -m hybridize.bench.speculative --quick --phase all --device cpu   # CPU smoke, well under a minute
    hybridize bench speculative --out DIR [--smoke]                          # the same through the bench command
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import shlex
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from hybridize.bench.quality import (
    QualityConfig,
    Results,
    Study,
    _finite,
    apply_settings,
    amp,
    environment,
    evaluate,
    load_teacher,
    n_params,
    save_teacher,
    time_steps,
)
from hybridize.bench.utils import err, median_ms, plot_out_or_redraw, write_json

PHASES = ("train", "bench", "all")
TARGET_KINDS = ("hybrid", "teacher")
GOAL_SPEEDUP = 1.8          # the Mamba-in-the-Llama paper's figure
PAIR_META = "spec_pair.json"
MIRROR = "bench_results.json"


@dataclass
class SpecConfig(QualityConfig):
    """Every setting of the speculative benchmark. The fields inherited from `QualityConfig` configure the
    data, the target (teacher sizes, pretraining, distillation) and the budget; the ones below the draft
    and the timing. Defaults: an H100, bf16, each phase in ~9 minutes; `quick()`: a CPU smoke run."""
    # target: a ~373 M Llama-style teacher (15.2 M per layer + the tied 8192 × 1024 embedding)
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 4
    ffn: int = 4096
    teacher_lr: float = 6e-4
    e2e_lr: float = 2e-4
    target_kind: str = "hybrid"           # "hybrid": converted + distilled; "teacher": the Transformer itself
    target_fraction: float = 0.5          # attention share of the hybrid target
    # draft: a small Llama-style model (or draft_mixer layers) on the target's vocabulary, KL to the target
    draft_hidden_size: int = 512
    draft_layers: int = 2
    draft_heads: int = 8
    draft_kv_heads: int = 2
    draft_ffn: int = 1536
    draft_mixer: str = "attention"        # "attention" or "mamba2"
    draft_lr: float = 2e-3
    draft_ce_weight: float = 0.0          # + CE on the data next to the word-level KL
    draft_max_epochs: float = 8.0
    # shares of the training time (after data, calibration and fixed evaluation costs)
    weight_teacher: float = 2.0
    weight_distill: float = 1.5
    weight_draft: float = 1.0
    # bench
    ks: tuple = (1, 2, 3, 4, 5, 6, 7, 8)
    temperatures: tuple = (0.0, 1.0)
    batches: tuple = (1,)
    num_prompts: int = 8
    prompt_len: int = 128
    max_new_tokens: int = 256
    verify_reps: int = 20
    compile: str = "auto"                 # "auto" (= on CUDA), "on", "off": torch.compile of step / verifier
    bench_dtype: str = "auto"             # weights while timing: auto = bf16 on CUDA, fp32 on CPU
    first_compile_guess_s: float = 60.0   # planning guess for the first verifier compile (CUDA)
    # budget (per phase: train and bench each get budget_s)
    budget_s: float = 500.0
    reserve_s: float = 25.0               # kept back for saving the pair and the final JSON
    shard_size: str = "2GB"               # the pair stays on the GPU machine: no transfer limit

    @classmethod
    def quick(cls, **kw) -> "SpecConfig":
        """Both phases end to end on a CPU in seconds: tiny target and draft, 1-3 training steps each,
        2 prompts of 16 tokens, 12 new tokens, K 1-3, batches 1 and 2."""
        base = dict(max_train_docs=12, max_heldout_docs=3, vocab_size=300, tokenizer_chars=60_000,
                    hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=1, ffn=64, seq_len=32,
                    batch_size=4, eval_rows=4, eval_batch_size=4, curve_batches=1, curve_points=2,
                    extrapolation_factors=(1, 2, 4), budget_s=120.0, reserve_s=0.0, min_steps=1,
                    max_steps=3, calib_steps=1, calib_warmup=0, device="cpu", teacher_lr=1.5e-3,
                    draft_hidden_size=16, draft_layers=1, draft_heads=2, draft_kv_heads=1, draft_ffn=32,
                    ks=(1, 2, 3), batches=(1, 2), num_prompts=2, prompt_len=16, max_new_tokens=12,
                    verify_reps=3, first_compile_guess_s=0.0)
        base.update(kw)
        return cls(**base)

    def validate(self) -> "SpecConfig":
        if self.target_kind not in TARGET_KINDS:
            raise ValueError(f"target_kind {self.target_kind!r}: choose from {TARGET_KINDS}")
        if self.target_fraction not in (1, 0.875, 0.75, 0.5, 0.25, 0.125, 0):
            raise ValueError(f"target_fraction {self.target_fraction}: choose 0.875, 0.75, 0.5, 0.25, 0.125 "
                             "or 0")
        if self.num_layers * self.target_fraction != int(self.num_layers * self.target_fraction):
            raise ValueError(f"{self.target_fraction} of {self.num_layers} layers is not a whole number")
        if self.draft_mixer not in ("attention", "mamba2"):
            raise ValueError(f"draft_mixer {self.draft_mixer!r}: choose attention or mamba2")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks {self.ks}: draft token counts must be >= 1")
        if any(t < 0 for t in self.temperatures) or not self.temperatures:
            raise ValueError(f"temperatures {self.temperatures} must be >= 0")
        if not self.batches or min(self.batches) < 1 or max(self.batches) > self.num_prompts:
            raise ValueError(f"batches {self.batches} must lie in [1, num_prompts={self.num_prompts}]")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile {self.compile!r}: choose auto, on or off")
        if self.prompt_len < 2 or self.max_new_tokens < 1:
            raise ValueError("prompt_len must be >= 2 and max_new_tokens >= 1")
        if not 0 <= self.e2e_fraction < 1:
            raise ValueError("e2e_fraction must lie in [0, 1)")
        return self

    @property
    def compile_arg(self):
        return {"auto": "auto", "on": True, "off": False}[self.compile]

    def study_config(self) -> "SpecConfig":
        """The same settings with `phases` / `fractions` set so that `Study.calibrate` times exactly the
        training runs this benchmark makes (teacher; + KL / end-to-end steps of the hybrid target)."""
        hybrid = self.target_kind == "hybrid"
        return dataclasses.replace(self, phases=("teacher", "fractions") if hybrid else ("teacher",),
                                   fractions=(self.target_fraction,) if hybrid else ())


def draft_config(cfg: SpecConfig, tokenizer, target_cfg):
    """The draft: Llama-style (or `draft_mixer` layers), the target's vocabulary and special tokens."""
    from hybridize.demo import llama_teacher_config

    c = llama_teacher_config(tokenizer, hidden_size=cfg.draft_hidden_size, num_layers=cfg.draft_layers,
                             num_heads=cfg.draft_heads, num_kv_heads=cfg.draft_kv_heads, ffn=cfg.draft_ffn,
                             max_position_embeddings=target_cfg.attention.max_position_embeddings,
                             name="spec-draft", tie_embeddings=True)
    c.vocab_size = target_cfg.vocab_size
    c.bos_token_id, c.eos_token_id, c.pad_token_id = (target_cfg.bos_token_id, target_cfg.eos_token_id,
                                                      target_cfg.pad_token_id)
    if cfg.draft_mixer == "mamba2":
        c.layer_pattern = ["mamba2"] * cfg.draft_layers
        d_inner = c.mamba2.expand * c.hidden_size
        hd = min(c.mamba2.headdim, max(d_inner // 4, 1))        # at least 4 heads on small drafts
        c.mamba2 = dataclasses.replace(c.mamba2, headdim=hd, d_state=min(c.mamba2.d_state, c.hidden_size))
    return c.validate()


def pick_prompts(docs: list, n: int, length: int, seed: int, names: Optional[list] = None) -> tuple:
    """n prompts of `length` tokens from held-out documents (token lists; names[i]: the source of docs[i])
    → (prompts, how, source of each prompt): the first window of each of n documents in a seeded order
    (further windows of the long ones when too few are long enough)."""
    import random

    names = names or ["?"] * len(docs)
    long = [(d, s) for d, s in zip(docs, names) if len(d) >= length]
    random.Random(seed).shuffle(long)
    out = [(list(d[:length]), s) for d, s in long[:n]]
    how = "first window of distinct held-out documents"
    off = 1
    while len(out) < n and long:
        extra = [(list(d[off * length:(off + 1) * length]), s) for d, s in long if len(d) >= (off + 1) * length]
        if not extra:
            break
        out += extra[:n - len(out)]
        off += 1
        how = "windows of held-out documents"
    if len(out) < n:
        flat = [t for d in docs for t in d]
        out += [(flat[i:i + length], "concatenated") for i in range(0, len(flat) - length + 1, length)][:n - len(out)]
        how = "windows of the held-out documents concatenated"
    if len(out) < n:
        raise ValueError(f"the held-out split has too few tokens for {n} prompts of {length} tokens")
    return [p for p, _ in out], how, [s for _, s in out]


def heldout_names(info: dict) -> list:
    """The source name of every document of `StudyData.heldout` (sources in order, as `prepare_data` reads
    them)."""
    return [name for name, rec in info["sources"].items() for _ in range(rec["heldout_docs"])]


@torch.no_grad()
def agreement(draft, target, sets: dict, dtype: str) -> dict:
    """Teacher-forced agreement of draft and target on held-out rows: top-1 agreement (≈ the greedy
    acceptance rate) and E[Σ min(p, q)] = 1 − TV (the expected acceptance of one draft token at
    temperature 1), over the positions whose next token is scored."""
    dev = next(target.parameters()).device
    top1 = overlap = n = 0.0
    for batches in sets.values():
        for b in batches:
            with amp(dev, dtype):
                q = draft(b["input_ids"], seq_idx=b["seq_idx"]).logits[:, :-1].float()
                p = target(b["input_ids"], seq_idx=b["seq_idx"]).logits[:, :-1].float()
            m = b["labels"][:, 1:] != -100
            top1 += float(((q.argmax(-1) == p.argmax(-1)) & m).sum())
            overlap += float((torch.minimum(p.softmax(-1), q.softmax(-1)).sum(-1) * m).sum())
            n += float(m.sum())
            del p, q
    return {"top1": top1 / max(n, 1), "min_pq_overlap": overlap / max(n, 1), "positions": int(n)}


# ---------------------------------------------------------------------------- training
class PairStudy(Study):
    """`Study` (data, calibration, teacher, distillation, budget) plus the draft; the budget is shared by
    weight among the parts still to train ("teacher", "distill", "draft")."""

    def __init__(self, cfg: SpecConfig, results: Results, log=print):
        super().__init__(cfg.study_config(), results, log)
        self.parts = ("teacher", "distill", "draft") if cfg.target_kind == "hybrid" else ("teacher", "draft")
        self.target = self.draft = None

    def allowance(self, part: str) -> float:
        c = self.cfg
        w = {"teacher": c.weight_teacher, "distill": c.weight_distill, "draft": c.weight_draft}
        todo = [p for p in self.parts if p not in self.done]
        avail = max(0.0, self.left() - c.reserve_s)
        return avail * w[part] / (sum(w[p] for p in todo) or 1.0)

    def forced_steps(self, steps: int) -> tuple:
        """At least min_steps (every part is needed); says whether that overran the plan."""
        return max(steps, self.cfg.min_steps), steps < self.cfg.min_steps

    def calibrate_draft(self) -> None:
        """Seconds per draft KL step (the frozen target's forward dominates: a converted copy of the
        teacher stands in for the hybrid target)."""
        from hybridize.convert import convert
        from hybridize.distill.stages import LogitDistillLoss, freeze
        from hybridize.model import HybridLM

        c = self.cfg
        t0 = time.perf_counter()
        frozen = freeze(copy.deepcopy(self.teacher))
        if c.target_kind == "hybrid":
            frozen = freeze(convert(frozen, mixer=c.mixer, attention_fraction=c.target_fraction, seed=c.seed,
                                    conv_init=c.conv_init))
        torch.manual_seed(c.seed)
        d = HybridLM(draft_config(c, self.data.tokenizer, self.teacher.cfg)).to(self.device)
        batch = next(iter(self.stream()))
        loss = LogitDistillLoss(frozen, kl_weight=1.0, ce_weight=c.draft_ce_weight)
        self.calib["draft"] = time_steps(d, loss, batch, trainable="all", steps=c.calib_steps,
                                         warmup=c.calib_warmup, dtype=c.dtype)["s_per_step"]
        self.calib["draft_calibration_s"] = round(time.perf_counter() - t0, 2)
        del frozen, d
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def train_target(self) -> None:
        c = self.cfg
        if c.target_kind == "teacher":
            self.target = self.teacher
            t = self.results["teacher"]
            self.results["target"] = {"kind": "teacher", "parameters": t["parameters"],
                                      "layer_pattern": t["layer_pattern"], "heldout": t["heldout"]}
            return
        f = c.target_fraction
        self.need(f"kl@{f}", f"e2e@{f}")
        per = (1 - c.e2e_fraction) * self.calib[f"kl@{f}"] + c.e2e_fraction * self.calib[f"e2e@{f}"]
        allow = self.allowance("distill")
        steps, over = self.forced_steps(self.fit_steps(allow, per, self.run_cost(), c.distill_max_epochs))
        self.log(f"[speculative] target: {f:g} attention {c.mixer} hybrid, distilling {steps} steps")
        self.target, rec = self.distill("target", self.mil_stages(steps), fraction=f, mixer=c.mixer,
                                        init="attention", conv_init=c.conv_init)
        rec.update(kind="hybrid", plan=self.plan(allow, steps, per, self.run_cost()), over_budget=over)
        self.results["target"] = rec
        self.log(f"[speculative]   target ppl {rec['distilled']['ppl']:.2f} = {rec['ppl_ratio']:.3f} × teacher")

    def train_draft(self) -> None:
        from hybridize.distill.stages import LogitDistillLoss
        from hybridize.model import HybridLM

        c = self.cfg
        allow = self.allowance("draft")
        steps, over = self.forced_steps(self.fit_steps(allow, self.calib["draft"], self.run_cost(),
                                                       c.draft_max_epochs))
        torch.manual_seed(c.seed)
        draft = HybridLM(draft_config(c, self.data.tokenizer, self.target.cfg)).to(self.device)
        self.log(f"[speculative] draft: {n_params(draft) / 1e6:.2f} M parameters, KL to the target, {steps} steps")
        t0 = time.perf_counter()
        ev = self.curve_eval(self.target)
        curve = [{"tokens": 0, "step": 0, **ev(draft)}]
        tcfg = self.train_config(steps, c.draft_lr, weight_decay=0.1, eval_every=max(1, steps // c.curve_points))
        loss = LogitDistillLoss(self.target, kl_weight=1.0, ce_weight=c.draft_ce_weight)
        run = self.run_trainer(draft, loss, list(draft.parameters()), tcfg, curve, ev)
        draft.eval()
        rec = {"parameters": n_params(draft), "layer_pattern": draft.layer_pattern,
               "hidden_size": draft.cfg.hidden_size, **run,
               "epochs": round(run["steps"] * c.batch_size / self.data.train_rows, 3),
               "plan": self.plan(allow, steps, self.calib["draft"], self.run_cost()), "over_budget": over,
               "heldout": evaluate(draft, self.data.evals, c.dtype, self.target),
               "agreement": agreement(draft, self.target, self.data.evals, c.dtype), "curve": curve}
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        self.draft = draft
        self.results["draft"] = rec
        a = rec["agreement"]
        self.log(f"[speculative]   draft ppl {rec['heldout']['ppl']:.2f}, KL {rec['heldout']['kl']:.3f}, "
                 f"top-1 agreement {a['top1']:.3f}, Σmin(p,q) {a['min_pq_overlap']:.3f}")

    def train(self, teacher_dir=None, save_teacher_dir=None) -> None:
        r = self.results
        t0 = time.perf_counter()
        self.phase_teacher(teacher_dir, save_teacher_dir)
        self.done.append("teacher")
        r["timings_s"] = {"teacher": round(time.perf_counter() - t0, 2)}
        r.save()
        self.calibrate_draft()
        r["calibration"] = self.calib
        for part, fn in (("distill", self.train_target), ("draft", self.train_draft)):
            t0 = time.perf_counter()
            fn()
            if part in self.parts:
                self.done.append(part)
            r["timings_s"][part] = round(time.perf_counter() - t0, 2)
            r.save()
        if self.target is not self.teacher:
            self.teacher = None                     # free it: the bench needs target and draft only
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def save_pair(self, path, prompts: list, prompts_how: dict) -> dict:
        c = self.cfg
        path = Path(path)
        tok = self.data.tokenizer
        meta = {"data": list(c.data), "seed": c.seed, "seq_len": c.seq_len}
        saved = {"target": save_teacher(self.target, tok, path / "target",
                                        {**meta, "role": "target", "kind": c.target_kind,
                                         "heldout": _ppl(self.results["target"])}, c.shard_size),
                 "draft": save_teacher(self.draft, tok, path / "draft",
                                       {**meta, "role": "draft", "heldout_ppl": self.results["draft"]["heldout"]["ppl"]},
                                       c.shard_size)}
        pair = {"prompts": prompts, "prompts_how": prompts_how, "settings": settings(c),
                "summary": pair_summary(self.results), "command": self.results.get("command"),
                "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json(_finite(pair), path / PAIR_META)
        return saved


def _ppl(rec: dict) -> Optional[float]:
    return (rec.get("distilled") or rec.get("heldout") or {}).get("ppl")


def pair_summary(r: dict) -> dict:
    """What the bench JSON says about the pair it timed (without the curves)."""
    out = {}
    t = r.get("teacher", {})
    if t:
        out["teacher"] = {"parameters": t.get("parameters"), "steps": t.get("steps"), "tokens": t.get("tokens"),
                          "heldout_ppl": t.get("heldout", {}).get("ppl")}
    g = r.get("target", {})
    if g:
        out["target"] = {"kind": g.get("kind"), "parameters": g.get("parameters"),
                         "layer_pattern": g.get("layer_pattern"), "heldout_ppl": _ppl(g),
                         "ppl_ratio_to_teacher": g.get("ppl_ratio"), "distill_steps": g.get("steps"),
                         "distill_tokens": g.get("tokens")}
    d = r.get("draft", {})
    if d:
        out["draft"] = {"parameters": d.get("parameters"), "layer_pattern": d.get("layer_pattern"),
                        "hidden_size": d.get("hidden_size"), "steps": d.get("steps"), "tokens": d.get("tokens"),
                        "heldout_ppl": d.get("heldout", {}).get("ppl"), "kl_to_target": d.get("heldout", {}).get("kl"),
                        "agreement": d.get("agreement")}
    return out


# ---------------------------------------------------------------------------- timing pieces
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, undo, reps: int, device) -> float:
    """Median ms of fn() over `reps` calls (`bench.utils.median_ms`, as `bench.decode.bench_verify` times)."""
    return median_ms(fn, undo, reps, device)


@torch.no_grad()
def time_step(model, batch: int, context: int, *, reps: int, compile, extra: int = 16) -> float:
    """ms of one decode step (`StepRunner`: compiled + graph replay on CUDA) at `context` tokens."""
    from hybridize.generate.cache_ops import alloc_cache, restore_positions_, save_positions
    from hybridize.generate.engine import StepRunner, prefill_

    device = next(model.parameters()).device
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(7)
    cache = alloc_cache(model, batch, context + extra, window_slack=extra, device=device)
    runner = StepRunner(model, cache, batch, "auto", compile)
    prefill_(model, cache, torch.randint(0, V, (batch, context), generator=g).tolist())
    saved = save_positions(cache)
    tok = torch.randint(0, V, (batch,), generator=g).to(device)
    return _median_ms(lambda: runner(tok), functools.partial(restore_positions_, cache, saved), reps, device)


@torch.no_grad()
def time_verify(model, batch: int, context: int, T: int, *, reps: int, compile) -> dict:
    """ms to verify T tokens (`Verifier.verify`) and to verify + keep all T (`commit`), and of one decode
    step, on one cache at `context` tokens (mirrors `bench.decode.bench_verify`)."""
    from hybridize.generate.cache_ops import alloc_cache, restore_positions_, save_positions
    from hybridize.generate.engine import StepRunner, prefill_
    from hybridize.generate.speculative import Verifier

    device = next(model.parameters()).device
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(7)
    cache = alloc_cache(model, batch, context + T + 16, window_slack=T, device=device)
    runner = StepRunner(model, cache, batch, "auto", compile)
    ver = Verifier(model, cache, batch, T, "auto", compile)
    prefill_(model, cache, torch.randint(0, V, (batch, context), generator=g).tolist())
    saved = save_positions(cache)
    restore = functools.partial(restore_positions_, cache, saved)
    tok = torch.randint(0, V, (batch,), generator=g).to(device)
    step_ms = _median_ms(lambda: runner(tok), restore, reps, device)
    ids = torch.randint(0, V, (batch, T), generator=g).to(device)
    zero = torch.zeros(batch, dtype=torch.long, device=device)
    full = torch.full((batch,), T, dtype=torch.long, device=device)
    v = _median_ms(lambda: ver.verify(ids), lambda: ver.commit(zero), reps, device)
    # keeping all T leaves T pending tokens, which the next verify first advances the SSD states by: the
    # steady state of a round that accepted everything
    vc = _median_ms(lambda: (ver.verify(ids), ver.commit(full)), restore, reps, device)
    return {"T": T, "step_ms": step_ms, "verify_ms": v, "verify_commit_ms": vc, "verify_over_step": v / step_ms,
            "verify_commit_over_step": vc / step_ms, "compiled": ver.compiled, "graphed": ver.graphed}


# ---------------------------------------------------------------------------- the bench
NOTES = {
    "plain / speculative": "every prompt once per row (groups of `batch`); tokens_per_s = new tokens ÷ decode "
                           "seconds (GenerationStats.decode_s: decode loop only, no prefill, no compile or graph "
                           "capture), summed over the calls; speedup = speculative ÷ plain at the same batch and "
                           "temperature; no EOS (every row decodes max_new_tokens)",
    "acceptance_rate": "accepted ÷ drafted draft tokens; mean_tokens_per_round = (accepted + 1) per row and round",
    "greedy_match": "temperature 0: the speculative tokens equal plain greedy decoding's (same batch) row for row; "
                    "first_divergence: index of the first different token per row (null: identical)",
    "costs": "median CUDA-event ms of graph replays at `context` tokens: step_ms = one target decode step, "
             "verify_ms = the target verifying T = K + 1 tokens (one round's verification), verify_commit_ms = "
             "verify + keeping all T (the next verify then advances the SSD states by T first); draft_step_ms = "
             "one draft decode step; pieces_ms_per_round = (K + 1) draft steps + verify_commit; "
             "other_ms_per_round (speculative rows) = measured ms_per_round − pieces: acceptance math, state "
             "rollback and the round's host sync",
    "warmup_s": "wall seconds of the untimed warm-up generation (includes compiling the verifier for this K)",
}


class Bench:
    """Timing of one target / draft pair; rows go to results["bench"] (see the module docstring)."""

    def __init__(self, cfg: SpecConfig, results: Results, target, draft, prompts: list, *, mirror=None,
                 resume: Optional[dict] = None, log=print):
        self.cfg, self.results, self.log = cfg, results, log
        self.t0 = time.perf_counter()
        self.device = next(target.parameters()).device
        self.target, self.draft, self.prompts = target, draft, prompts
        self.mirror = Path(mirror) if mirror else None
        key = self.key()
        b = None
        if resume and resume.get("key") == key:
            b = resume
            b.setdefault("resumed", []).append(time.strftime("%Y-%m-%d %H:%M:%S"))
            b["skipped"] = []
            log(f"[speculative] resuming: {len(b['plain'])} plain, {len(b['speculative'])} speculative rows kept")
        elif resume:
            log("[speculative] --resume: the saved bench has other settings; starting afresh")
        self.b = b or {"key": key, "plain": [], "speculative": [], "costs": [], "draft_step": [],
                       "reference_tokens": {}, "skipped": [], "errors": [], "warnings": []}
        self.b["settings"] = key
        self.b["notes"] = NOTES
        self.results["bench"] = self.b
        self.compile_s: list = []         # seconds of each new-K warm-up (compilation), for planning

    def key(self) -> dict:
        c = self.cfg
        return {"num_prompts": len(self.prompts), "prompt_len": c.prompt_len, "max_new_tokens": c.max_new_tokens,
                "dtype": str(next(self.target.parameters()).dtype), "compile": c.compile,
                "device": str(self.device), "seed": c.seed}

    def left(self) -> float:
        return self.cfg.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.results.save()
        if self.mirror is not None:
            write_json(_finite(self.b), self.mirror)

    def skip(self, what: dict, why: str) -> None:
        self.b["skipped"].append({**what, "why": why})
        self.log(f"[speculative] skip {what}: {why}")
        self.save()

    def _warn(self, caught) -> None:
        for w in caught:
            msg = f"{w.category.__name__}: {str(w.message)[:300]}"
            if msg not in self.b["warnings"]:
                self.b["warnings"].append(msg)
                self.log(f"[speculative] warning: {msg}")

    def generate(self, prompts: list, temperature: float, seed: int, max_new: int, K: Optional[int] = None):
        from hybridize.generate import generate

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = generate(self.target, prompts, max_new, draft=self.draft if K else None,
                           num_draft_tokens=K or 1, temperature=temperature, seed=seed,
                           compile=self.cfg.compile_arg, eos_token_id=None)
        self._warn(caught)
        return res

    def run_set(self, B: int, temperature: float, K: Optional[int] = None) -> tuple:
        """Every prompt once, in groups of B → (aggregate row, token lists)."""
        c = self.cfg
        agg = {"new_tokens": 0, "decode_s": 0.0, "prefill_s": 0.0, "steps": 0, "drafted": 0, "accepted": 0}
        per_call, tokens, compiled, graphed = [], [], True, True
        t0 = time.perf_counter()
        for i in range(0, len(self.prompts) - B + 1, B):
            res = self.generate(self.prompts[i:i + B], temperature, c.seed + i, c.max_new_tokens, K)
            s = res.stats
            for k in ("new_tokens", "decode_s", "prefill_s", "steps"):
                agg[k] += getattr(s, k)
            if K:
                agg["drafted"] += s.drafted
                agg["accepted"] += s.accepted
            per_call.append(s.tokens_per_s)
            tokens += res.tokens
            compiled, graphed = compiled and s.compiled, graphed and s.cuda_graph
        _sync(self.device)
        row = {"batch": B, "temperature": temperature, "calls": len(per_call), "new_tokens": agg["new_tokens"],
               "decode_s": agg["decode_s"], "tokens_per_s": agg["new_tokens"] / agg["decode_s"],
               "ms_per_step": 1e3 * agg["decode_s"] / max(agg["steps"], 1), "steps": agg["steps"],
               "prefill_s": agg["prefill_s"], "per_call_tokens_per_s": per_call,
               "compiled": compiled, "cuda_graph": graphed, "wall_s": time.perf_counter() - t0}
        if K:
            row_rounds = agg["drafted"] / K
            row.update(K=K, rounds=agg["steps"], drafted=agg["drafted"], accepted=agg["accepted"],
                       acceptance_rate=agg["accepted"] / max(agg["drafted"], 1),
                       mean_tokens_per_round=(agg["accepted"] + row_rounds) / max(row_rounds, 1),
                       ms_per_round=row["ms_per_step"])
        return row, tokens

    def find(self, table: str, **kw) -> Optional[dict]:
        for r in self.b[table]:
            if all(r.get(k) == v for k, v in kw.items()):
                return r
        return None

    def attempt(self, what: dict, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 — record and go on: a partial report beats none
            traceback.print_exc()
            self.b["errors"].append({**what, "error": err(e)})
            self.save()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def plain(self, B: int) -> None:
        c = self.cfg
        todo = [t for t in c.temperatures if not self.find("plain", batch=B, temperature=t)]
        if not todo:
            return
        t0 = time.perf_counter()
        self.generate(self.prompts[:B], 0.0, c.seed, min(8, c.max_new_tokens))        # compile + capture
        warm = time.perf_counter() - t0
        for t in todo:
            row, tokens = self.run_set(B, t)
            row["warmup_s"] = warm
            self.b["plain"].append(row)
            if t == 0:
                self.b["reference_tokens"][str(B)] = tokens
            self.log(f"[speculative] B={B} T={t:g} plain: {row['tokens_per_s']:8.1f} tok/s, "
                     f"{row['ms_per_step']:.3f} ms/step (warm-up {warm:.1f} s)")
            self.save()

    def speculative(self, B: int, K: int) -> None:
        c = self.cfg
        todo = [t for t in c.temperatures if not self.find("speculative", batch=B, temperature=t, K=K)]
        if todo:
            t0 = time.perf_counter()
            self.generate(self.prompts[:B], 0.0, c.seed, min(c.max_new_tokens, 3 * (K + 1)), K)  # compiles T = K+1
            warm = time.perf_counter() - t0
            self.compile_s.append(warm)
        for t in todo:
            row, tokens = self.run_set(B, t, K)
            row["warmup_s"] = warm
            base = self.find("plain", batch=B, temperature=t)
            if base:
                row["plain_tokens_per_s"] = base["tokens_per_s"]
                row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
            ref = self.b["reference_tokens"].get(str(B))
            if t == 0 and ref is not None:
                row.update(greedy_check(tokens, ref))
            self.b["speculative"].append(row)
            self.log(f"[speculative] B={B} T={t:g} K={K}: {row['tokens_per_s']:8.1f} tok/s = "
                     f"{row.get('speedup', float('nan')):.2f} × plain, acceptance {row['acceptance_rate']:.3f}, "
                     f"{row['mean_tokens_per_round']:.2f} tokens/round, {row['ms_per_round']:.3f} ms/round"
                     + (f", greedy == plain: {row['greedy_match']}" if "greedy_match" in row else "")
                     + f" (warm-up {warm:.1f} s)")
            self.save()
        if not self.find("costs", batch=B, K=K):
            self.costs(B, K)

    def context(self) -> int:
        return self.cfg.prompt_len + self.cfg.max_new_tokens // 2

    def costs(self, B: int, K: int) -> None:
        c = self.cfg
        d = self.find("draft_step", batch=B)
        if d is None:
            d = {"batch": B, "context": self.context(),
                 "step_ms": time_step(self.draft, B, self.context(), reps=c.verify_reps, compile=c.compile_arg)}
            self.b["draft_step"].append(d)
        row = {"batch": B, "K": K, "context": self.context(),
               **time_verify(self.target, B, self.context(), K + 1, reps=c.verify_reps, compile=c.compile_arg)}
        row["draft_step_ms"] = d["step_ms"]
        row["draft_over_target_step"] = d["step_ms"] / row["step_ms"]
        # what one round costs by its pieces, vs the measured round (the rest: acceptance math, host sync)
        row["pieces_ms_per_round"] = (K + 1) * d["step_ms"] + row["verify_commit_ms"]
        self.b["costs"].append(row)
        for s in self.b["speculative"]:
            if s["batch"] == B and s["K"] == K:
                s["other_ms_per_round"] = s["ms_per_round"] - row["pieces_ms_per_round"]
        self.log(f"[speculative] B={B} K={K}: verify {K + 1} tokens {row['verify_ms']:.3f} ms = "
                 f"{row['verify_over_step']:.2f} target steps of {row['step_ms']:.3f} ms (+ commit "
                 f"{row['verify_commit_over_step']:.2f}); draft step {d['step_ms']:.3f} ms = "
                 f"{row['draft_over_target_step']:.3f} target steps")
        self.save()

    def need_s(self, B: int) -> float:
        """Planned seconds for one more K: its compilation (the slower of the last two warm-ups — later Ks
        may reuse a compilation made dynamic in T —, or a guess before the first) + the timed runs (as long
        as plain decoding took, × 1.5) + the cost timings."""
        c = self.cfg
        comp = max(self.compile_s[-2:]) if self.compile_s else \
            (c.first_compile_guess_s if self.device.type == "cuda" and c.compile != "off" else 0.0)
        plain = sum(r["wall_s"] for r in self.b["plain"] if r["batch"] == B) or 0.0
        return comp + 1.5 * plain + 2.0

    def run(self) -> dict:
        c = self.cfg
        first = True                              # the first cell always runs: the budget is for the rest
        for bi, B in enumerate(c.batches):
            if B > len(self.prompts):
                self.skip({"batch": B}, f"batch {B} > {len(self.prompts)} prompts")
                continue
            if bi > 0 and not self.find("plain", batch=B):
                # a new batch size compiles its own step and verifiers: plain + one K, as the last batch took
                prev = c.batches[bi - 1]
                need = 2 * self.need_s(prev)
                if self.left() < need:
                    self.skip({"batch": B}, f"time budget: needs ~{need:.0f} s, {self.left():.0f} s left")
                    continue
            self.attempt({"batch": B, "stage": "plain"}, functools.partial(self.plain, B))
            for K in c.ks:
                what = {"batch": B, "K": K}
                done = all(self.find("speculative", batch=B, temperature=t, K=K) for t in c.temperatures) \
                    and self.find("costs", batch=B, K=K)
                if done:
                    continue
                need = self.need_s(B)
                if not first and self.left() < need:
                    self.skip(what, f"time budget: needs ~{need:.0f} s, {self.left():.0f} s left")
                    continue
                first = False
                self.attempt(what, functools.partial(self.speculative, B, K))
        self.b["summary"] = summarize(self.b, c)
        self.b["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        self.save()
        return self.b


def greedy_check(spec: list, ref: list) -> dict:
    """Greedy speculative vs greedy plain tokens, row by row: identical rows and where the others part."""
    first = []
    for a, b in zip(spec, ref):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if n is None and len(a) != len(b):
            n = min(len(a), len(b))
        first.append(n)
    same = sum(n is None for n in first)
    return {"greedy_match": same == len(ref) and len(spec) == len(ref), "rows_identical": same,
            "rows": len(ref), "first_divergence": first}


def summarize(b: dict, cfg: SpecConfig) -> dict:
    """The issue's questions on this run: best speed-up per batch and temperature (and the K that gave
    it), whether it reaches the paper's 1.8×, whether greedy output always equalled plain greedy."""
    out = {"goal_speedup": GOAL_SPEEDUP, "best": []}
    rows = [r for r in b["speculative"] if "speedup" in r]
    for B in sorted({r["batch"] for r in rows}):
        for t in sorted({r["temperature"] for r in rows if r["batch"] == B}):
            sel = [r for r in rows if r["batch"] == B and r["temperature"] == t]
            best = max(sel, key=lambda r: r["speedup"])
            out["best"].append({"batch": B, "temperature": t, "K": best["K"], "speedup": best["speedup"],
                                "tokens_per_s": best["tokens_per_s"], "plain_tokens_per_s": best["plain_tokens_per_s"],
                                "acceptance_rate": best["acceptance_rate"],
                                "mean_tokens_per_round": best["mean_tokens_per_round"],
                                "meets_goal": best["speedup"] >= GOAL_SPEEDUP})
    b1 = [x for x in out["best"] if x["batch"] == 1]
    out["batch1_greedy_meets_goal"] = next((x["meets_goal"] for x in b1 if x["temperature"] == 0), None)
    checks = [r["greedy_match"] for r in b["speculative"] if "greedy_match" in r]
    out["greedy_outputs_match_plain"] = all(checks) if checks else None
    out["greedy_rows_identical"] = [f"{r['rows_identical']}/{r['rows']}" for r in b["speculative"]
                                    if "greedy_match" in r]
    ks_done = sorted({(r["batch"], r["K"]) for r in b["speculative"]})
    out["measured"] = [{"batch": B, "K": K} for B, K in ks_done]
    out["skipped"] = len(b.get("skipped", []))
    out["errors"] = len(b.get("errors", []))
    return out


# ---------------------------------------------------------------------------- plot
def plot(r: dict, path) -> Optional[str]:
    """Speed-up, acceptance, tokens per round and the cost of a round's pieces vs K (a PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return None
    b = r.get("bench") or {}
    rows = b.get("speculative", [])
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    series = sorted({(x["batch"], x["temperature"]) for x in rows})
    for B, t in series:
        sel = sorted((x for x in rows if x["batch"] == B and x["temperature"] == t), key=lambda x: x["K"])
        lab = f"B={B}, {'greedy' if t == 0 else f'T={t:g}'}"
        ks = [x["K"] for x in sel]
        pts = [(x["K"], x["speedup"]) for x in sel if "speedup" in x]
        if pts:
            ax[0, 0].plot(*zip(*pts), marker="o", label=lab)
        ax[0, 1].plot(ks, [x["acceptance_rate"] for x in sel], marker="o", label=lab)
        ax[1, 0].plot(ks, [x["mean_tokens_per_round"] for x in sel], marker="o", label=lab)
    a = ax[0, 0]
    a.axhline(GOAL_SPEEDUP, color="tab:red", ls="--", lw=1, label=f"goal {GOAL_SPEEDUP}×")
    a.axhline(1.0, color="k", lw=0.8)
    dev = (r.get("env") or {}).get("device_name", "")
    a.set_title(f"speculative ÷ plain tokens/s ({dev})")
    a.set_xlabel("K (draft tokens per round)")
    a.set_ylabel("speed-up")
    ax[0, 1].set_title("acceptance rate (accepted ÷ drafted)")
    ax[0, 1].set_xlabel("K")
    ax[0, 1].set_ylim(0, 1.02)
    ax[1, 0].set_title("mean tokens per round (accepted + 1)")
    ax[1, 0].set_xlabel("K")
    ks = sorted({x["K"] for x in rows}) or [1]
    ax[1, 0].plot(ks, [k + 1 for k in ks], "k:", lw=1, label="K + 1 (all accepted)")
    costs = b.get("costs", [])
    a = ax[1, 1]
    for i, B in enumerate(sorted({x["batch"] for x in costs})):
        sel = sorted((x for x in costs if x["batch"] == B), key=lambda x: x["K"])
        kw = {"color": f"C{i}"}
        a.plot([x["K"] for x in sel], [x["verify_over_step"] for x in sel], marker="o",
               label=f"B={B}: verify K+1 tokens ÷ target step", **kw)
        a.plot([x["K"] for x in sel], [x["verify_commit_over_step"] for x in sel], marker="x", ls="--",
               label=f"B={B}: verify + commit ÷ target step", **kw)
        a.plot([x["K"] for x in sel], [(x["K"] + 1) * x["draft_over_target_step"] for x in sel], marker=".",
               ls=":", label=f"B={B}: K+1 draft steps ÷ target step", **kw)
    a.set_title("cost of a round's pieces, in target decode steps")
    a.set_xlabel("K")
    for x in ax.flat:
        x.grid(alpha=0.3)
        x.xaxis.get_major_locator().set_params(integer=True)
        if x.get_legend_handles_labels()[0]:
            x.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------- phases
#: QualityConfig fields this benchmark never uses (left out of the JSON's settings)
UNUSED = ("phases", "fractions", "init_variants", "mohawk_mixer", "mohawk_fraction", "mohawk_init", "mohawk_split",
          "mohawk_lr", "mohawk3_lr", "throughput_steps", "throughput_warmup", "extrapolation_tokens",
          "griffin_window")


def settings(cfg: SpecConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in UNUSED}


def bench_dtype(cfg: SpecConfig, device) -> torch.dtype:
    if cfg.bench_dtype == "fp32" or (cfg.bench_dtype == "auto" and device.type != "cuda"):
        return torch.float32
    return torch.bfloat16


def load_pair(path, device, dtype) -> tuple:
    """(target, draft, pair meta) from a `--phase train` directory, cast to `dtype`, eval mode."""
    path = Path(path)
    meta_path = path / PAIR_META
    if not meta_path.exists():
        raise SystemExit(f"{meta_path} not found: train a pair first (--phase train --save-dir {path})")
    pair = json.loads(meta_path.read_text())
    target, _, _ = load_teacher(path / "target", device)
    draft, _, _ = load_teacher(path / "draft", device)
    return target.to(dtype).eval(), draft.to(dtype).eval(), pair


def phase_train(cfg: SpecConfig, results: Results, save_dir, teacher_dir=None, save_teacher_dir=None):
    study = PairStudy(cfg, results)
    study.train(teacher_dir, save_teacher_dir)
    prompts, how, names = pick_prompts(study.data.heldout, cfg.num_prompts, cfg.prompt_len, cfg.seed,
                                       heldout_names(study.data.info))
    how = {"how": how, "sources": names, "tokens": cfg.prompt_len}
    results["pair"] = {"summary": pair_summary(results), "prompts_how": how}
    if save_dir:
        t0 = time.perf_counter()
        results["saved"] = study.save_pair(save_dir, prompts, how)
        results["saved"]["save_s"] = round(time.perf_counter() - t0, 2)
        results["pair"]["dir"] = str(save_dir)
        study.log(f"[speculative] saved the pair to {save_dir} ({results['saved']['save_s']:.1f} s)")
    results["train_elapsed_s"] = round(time.perf_counter() - study.t0, 2)
    results.save()
    return study, prompts


def run(cfg: SpecConfig, results: Results, *, phase: str, save_dir=None, load_dir=None, teacher_dir=None,
        save_teacher_dir=None, resume: bool = False) -> Results:
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    results["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["env"] = environment(device)
    results["settings"] = settings(cfg)
    results["phase"] = phase
    results.save()
    target = draft = None
    if phase in ("train", "all"):
        study, prompts = phase_train(cfg, results, save_dir, teacher_dir, save_teacher_dir)
        target, draft = study.target, study.draft
        pair_dir = save_dir
    if phase in ("bench", "all"):
        dtype = bench_dtype(cfg, device)
        if target is None:
            target, draft, pair = load_pair(load_dir, device, dtype)
            prompts = pair["prompts"]
            results["pair"] = {"dir": str(load_dir), "summary": pair.get("summary"),
                               "prompts_how": pair.get("prompts_how"), "trained_by": pair.get("command"),
                               "saved_at": pair.get("saved_at")}
            pair_dir = load_dir
            for k in ("prompt_len", "num_prompts"):
                if pair.get("settings", {}).get(k) not in (None, getattr(cfg, k)):
                    print(f"[speculative] note: the pair's prompts were made with {k}="
                          f"{pair['settings'][k]}; using them", flush=True)
        else:
            target, draft = target.to(dtype).eval(), draft.to(dtype).eval()
        prompts = [p[:cfg.prompt_len] for p in prompts][:cfg.num_prompts]
        cfg = dataclasses.replace(cfg, prompt_len=len(prompts[0]), num_prompts=len(prompts))
        results["pair"]["target_parameters"] = n_params(target)
        results["pair"]["draft_parameters"] = n_params(draft)
        results["pair"]["bench_dtype"] = str(dtype)
        mirror = Path(pair_dir) / MIRROR if pair_dir else None
        old = None
        if resume and mirror is not None and mirror.exists():
            old = json.loads(mirror.read_text())
        Bench(cfg, results, target, draft, prompts, mirror=mirror, resume=old).run()
    results["elapsed_s"] = round(time.perf_counter() - t0, 2)
    results["finished"] = True
    results.save()
    return results


# ---------------------------------------------------------------------------- command line
def _tuple(text: str, kind):
    return tuple(kind(x) for x in text.split(",") if x)


def config_from_args(args) -> SpecConfig:
    base = SpecConfig.quick() if args.quick else SpecConfig()
    kw = {}
    if args.data:
        kw["data"] = tuple(args.data)
    for name in ("budget_s", "seed", "dtype", "device", "target_kind", "num_prompts", "prompt_len",
                 "max_new_tokens", "compile"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    for name, kind in (("ks", int), ("temperatures", float), ("batches", int)):
        v = getattr(args, name)
        if v is not None:
            kw[name] = _tuple(v, kind)
    return apply_settings(base, kw, args.set)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=PHASES, default="all")
    p.add_argument("--save-dir", default=None,
                   help="train/all: where the pair goes (default .cache/spec_pair; --quick: next to the JSON)")
    p.add_argument("--load-dir", default=None, help="bench: the pair to time (default: the --save-dir default)")
    p.add_argument("--teacher", default=None, help="reuse a saved teacher (e.g. quality --save-teacher) instead "
                                                   "of pretraining one")
    p.add_argument("--save-teacher", default=None, help="also save the pretrained teacher (bf16) here")
    p.add_argument("--target-kind", choices=TARGET_KINDS, default=None,
                   help="hybrid (default): the 50 %% Mamba-2 hybrid distilled from the teacher; teacher: the "
                        "pretrained Transformer itself (cheaper)")
    p.add_argument("--json-out", default="speculative.json")
    p.add_argument("--plot-out", default=None, help="PNG (default: the JSON path with .png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-only", default=None, metavar="JSON", help="redraw the PNG of a JSON and exit")
    p.add_argument("--budget-s", type=float, default=None, help="seconds per phase (default 500)")
    p.add_argument("--resume", action="store_true",
                   help="bench: keep the cells of <pair dir>/bench_results.json (a previous call on this machine) "
                        "and time only the missing ones")
    p.add_argument("--ks", default=None, help="draft tokens per round, comma-separated (default 1,...,8)")
    p.add_argument("--temperatures", default=None, help="default 0,1 (0 = greedy)")
    p.add_argument("--batches", default=None, help="default 1")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--compile", choices=("auto", "on", "off"), default=None,
                   help="torch.compile the decode step and verifier (auto: on CUDA); CUDA graphs either way")
    p.add_argument("--data", nargs="+", default=None, help="corpora (default: stdlib), as the quality study")
    p.add_argument("--quick", action="store_true", help="tiny sizes on CPU (smoke)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["auto", "bf16", "fp32"], help="training autocast")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any SpecConfig field, e.g. --set hidden_size=1536 --set draft_layers=1")
    args = p.parse_args(argv)
    plot_out = plot_out_or_redraw(args, plot)
    if plot_out is None:
        return 0
    cfg = config_from_args(args)
    default_dir = str(Path(args.json_out).resolve().parent / "spec_pair_quick") if args.quick else ".cache/spec_pair"
    save_dir = args.save_dir or default_dir
    load_dir = args.load_dir or args.save_dir or default_dir
    from hybridize.demo import choose_threads, quiet_transformers

    quiet_transformers()
    if cfg.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(choose_threads(None))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        # compiled kernels survive between calls on a warm machine (the pair directory's sibling)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(".cache/inductor").resolve()))
    results = Results(args.json_out)
    suite_argv = sys.argv[1:] if argv is None else list(argv)
    results["suite"] = "speculative"
    results["command"] = shlex.join(["python", "-m", "hybridize.bench.speculative", *suite_argv])
    results["process_argv"] = list(sys.argv)
    try:
        run(cfg, results, phase=args.phase, save_dir=save_dir, load_dir=load_dir, teacher_dir=args.teacher,
            save_teacher_dir=args.save_teacher, resume=args.resume)
    except BaseException as e:
        results["error"] = err(e)           # the JSON says why the run stopped (then the traceback)
        results.save()
        raise
    print(f"wrote {args.json_out}")
    if "bench" in results and not args.no_plot:
        png = plot(results, plot_out)
        if png:
            print(f"wrote {png}")
    if "bench" in results:
        print(json.dumps(_finite(results["bench"].get("summary")), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
