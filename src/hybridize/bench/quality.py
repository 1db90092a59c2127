"""Distillation quality study (issue 3 §6, issue 6 §4) in one GPU command of at most ~9 minutes.

Phases (``--phases``, run in this order; ``all`` = every one; the teacher is pretrained or loaded in
any case, every other phase needs it):

  teacher        pretrain a Llama-style teacher (8 layers, ~20 M parameters) with the library's Trainer on
                 the stdlib corpus (plus ``--data`` text files), or load one (``--teacher DIR``); held-out
                 perplexity on a fixed test split (a stable hash of each document, per source).
  throughput     tokens/s of a distillation step of the 50 % Mamba-2 student (frozen teacher forward +
                 student forward/backward + AdamW) vs a plain fine-tuning step of the teacher, same batch,
                 bf16 autocast, after warm-up, timed between torch.cuda.synchronize calls.
  fractions      convert to 50 / 25 / 12.5 / 0 % attention (Mamba-2, attention-weight init) and distil each
                 with the Mamba-in-the-Llama recipe — word-level KL with only the new mixers training, then a
                 short end-to-end KL stage — at equal training tokens; held-out ppl and ratio to the teacher
                 (targets: 50 % ≤ 1.10 ×, 25 % ≤ 1.25 ×).
  init           the 50 % student with attention-weight init (default and identity conv) vs random init, at
                 equal tokens (the Mamba-in-the-Llama ablation).
  mohawk         MOHAWK stages 1 + 2 then 3 vs stage 3 alone at equal total tokens (discrete Mamba-2).
  extrapolation  (optional) Hawk and Griffin pretrained like the teacher; perplexity at 1, 2, 4, 8 × the
                 training length for teacher, Hawk, Griffin and the distilled 50 % hybrid (Griffin Fig. 5).

Budget: ``--budget-s`` (default 520) covers the whole run. After the data are ready, one short timing of
every kind of training step (calibration) tells how many steps each phase can afford: the time left is
shared among the phases still to run by weight (`PHASE_WEIGHTS`), so time a phase leaves unused passes
on. Runs are further capped at `teacher_max_epochs` / `distill_max_epochs` passes over the training rows
(a few M tokens of stdlib source: more passes only overfit). A phase that cannot afford
`min_steps` is skipped and recorded as such; every run also carries a hard time limit (the Trainer stops
it) so the command never outlives the budget. The JSON (``--json-out``) is rewritten atomically after
every finished measurement, so a run killed midway still returns what it measured; the PNG comes at the
end (``--plot-only JSON`` redraws it from a JSON).

    source benchmarks/gpu_env.sh; python3 -m hybridize.bench.quality --json-out $OUT/quality.json \\
        --plot-out $OUT/quality.png [--data stdlib .data/valid.txt .data/tinyshakespeare.txt]
    python -m hybridize.bench.quality --quick          # every phase on CPU in well under a minute (smoke)
    hybridize bench quality --out DIR                  # the same through the bench command
    python -m hybridize.bench.quality --plot-only quality.json --plot-out quality.png

Every setting of `QualityConfig` can be changed with ``--set KEY=VALUE`` (e.g. ``--set kl_lr=2e-3``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import platform
import random
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from hybridize.bench.utils import plot_out_or_redraw, write_json

PHASES = ("teacher", "throughput", "fractions", "init", "mohawk", "extrapolation")
DEFAULT_PHASES = ("teacher", "throughput", "fractions", "init", "mohawk")
#: share of the remaining budget each phase gets (throughput is a fixed, small cost)
PHASE_WEIGHTS = {"teacher": 2.0, "throughput": 0.0, "fractions": 3.0, "init": 2.0, "mohawk": 2.0,
                 "extrapolation": 3.0}
#: held-out perplexity ratio student / teacher the issue asks for
TARGETS = {0.5: 1.10, 0.25: 1.25}
SAFETY = 1.15          # planned time per step = calibrated time × SAFETY
CONV_INITS = ("identity", "default")


@dataclass
class QualityConfig:
    """Every setting of the study (sizes for an H100; `quick()` for a CPU smoke run)."""
    phases: tuple = DEFAULT_PHASES
    data: tuple = ("stdlib",)             # "stdlib" and/or text files / directories
    doc_split: str = "blank_lines"        # documents of text files (stdlib: one file = one document)
    heldout_fraction: float = 0.05
    max_train_docs: Optional[int] = None  # per source (quick runs)
    max_heldout_docs: Optional[int] = None
    vocab_size: int = 8192
    tokenizer_chars: int = 4_000_000
    # teacher: Llama-style, 8 layers so that 50 / 25 / 12.5 / 0 % attention are 4 / 2 / 1 / 0 layers
    hidden_size: int = 384
    num_layers: int = 8
    num_heads: int = 6
    num_kv_heads: int = 2
    ffn: int = 1536
    tie_embeddings: bool = True           # keeps the bf16 checkpoint ≤ 3 shards of 15 MB
    seq_len: int = 512
    batch_size: int = 32
    teacher_lr: float = 1.5e-3
    teacher_max_epochs: float = 6.0
    # distillation (Mamba-in-the-Llama)
    mixer: str = "mamba2"
    fractions: tuple = (0.5, 0.25, 0.125, 0.0)
    conv_init: str = "identity"
    kl_lr: float = 1e-3
    e2e_fraction: float = 0.25            # share of a run's steps in the end-to-end KL stage (0: none)
    e2e_lr: float = 3e-4
    distill_max_epochs: float = 8.0
    init_variants: tuple = ("attention:identity", "attention:default", "random:default")
    # MOHAWK
    mohawk_mixer: str = "discrete_mamba2"
    mohawk_fraction: float = 0.0
    mohawk_init: str = "attention"        # both runs start from this conversion ("random" also works)
    mohawk_split: tuple = (0.1, 0.2)      # shares of the total steps in stages 1 and 2
    mohawk_lr: float = 1e-3               # stages 1 and 2
    mohawk3_lr: float = 5e-4
    # evaluation
    eval_rows: int = 128                  # held-out rows per source
    eval_batch_size: int = 32
    curve_batches: int = 2                # batches per source for the learning curves
    curve_points: int = 8
    # throughput
    throughput_steps: int = 20
    throughput_warmup: int = 5
    # extrapolation
    extrapolation_factors: tuple = (1, 2, 4, 8)
    extrapolation_tokens: int = 65_536
    griffin_window: Optional[int] = None  # None → seq_len // 2
    # budget
    budget_s: float = 520.0
    reserve_s: float = 15.0               # kept back for the final JSON and plot
    min_steps: int = 20
    max_steps: Optional[int] = None       # cap per run (quick)
    calib_steps: int = 3
    calib_warmup: int = 2
    device: str = "auto"
    dtype: str = "auto"                   # autocast: auto = bf16 on CUDA, fp32 on CPU
    seed: int = 0
    shard_size: str = "15MB"              # --save-teacher: safetensors shards below the 16 MiB transfer limit

    @classmethod
    def quick(cls, **kw) -> "QualityConfig":
        """Every phase end to end on a CPU in seconds: tiny model, a few stdlib files, 1-3 steps per run."""
        base = dict(max_train_docs=12, max_heldout_docs=3, vocab_size=300, tokenizer_chars=60_000,
                    hidden_size=32, num_heads=2, num_kv_heads=1, ffn=64, seq_len=32, batch_size=4,
                    eval_rows=4, eval_batch_size=4, curve_batches=1, curve_points=2, throughput_steps=1,
                    throughput_warmup=1, extrapolation_tokens=512, budget_s=120.0, reserve_s=0.0,
                    min_steps=1, max_steps=3, calib_steps=1, calib_warmup=0, device="cpu",
                    extrapolation_factors=(1, 2, 4),
                    init_variants=("attention:identity", "random:default"))
        base.update(kw)
        return cls(**base)

    def validate(self) -> "QualityConfig":
        bad = [p for p in self.phases if p not in PHASES]
        if bad:
            raise ValueError(f"unknown phases {bad}; choose from {PHASES} or 'all'")
        if any(f not in (0.5, 0.25, 0.125, 0.0) for f in self.fractions):
            raise ValueError(f"fractions {self.fractions}: choose from 0.5, 0.25, 0.125, 0")
        if self.num_layers % 8:
            raise ValueError("num_layers must be a multiple of 8 (12.5 % attention must be whole layers)")
        for v in self.init_variants:
            init, _, conv = v.partition(":")
            if init not in ("attention", "random") or conv not in CONV_INITS:
                raise ValueError(f"init variant {v!r}: write INIT:CONV with INIT attention|random and CONV "
                                 f"{'|'.join(CONV_INITS)}")
        if not 0 <= self.e2e_fraction < 1 or sum(self.mohawk_split) >= 1:
            raise ValueError("e2e_fraction must lie in [0, 1) and the MOHAWK stage 1 + 2 shares below 1")
        return self


# ---------------------------------------------------------------------------- results file
class Results(dict):
    """The study's JSON: written atomically (temporary file + os.replace) after every measurement."""

    def __init__(self, path: Optional[str]):
        super().__init__()
        self.path = Path(path) if path else None

    def save(self) -> None:
        if self.path is None:
            return
        write_json(_finite(self), self.path)

    def skip(self, phase: str, reason: str) -> None:
        self.setdefault("skipped", []).append({"phase": phase, "reason": reason})
        self[phase] = {"skipped": reason}
        print(f"[quality] skip {phase}: {reason}", flush=True)
        self.save()


def _finite(x):
    """JSON without NaN / Infinity (not valid JSON): non-finite floats become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or "cpu"
        env["threads"] = torch.get_num_threads()
    return env


# ---------------------------------------------------------------------------- data
@dataclass
class StudyData:
    """Token data on the study's device.

    train:      packed training rows {input_ids, labels, seq_idx}: (N, L) each (`pack_documents`).
    evals:      {source: [batches]} of held-out rows, each batch (eval_batch_size, L).
    curve:      {source: [batches]}: the first `curve_batches` batches of each source (learning curves).
    heldout:    held-out documents as token lists (length extrapolation)."""
    tokenizer: object
    train: dict
    evals: dict
    curve: dict
    heldout: list
    info: dict = field(default_factory=dict)

    @property
    def train_rows(self) -> int:
        return int(self.train["input_ids"].shape[0])


def source_corpora(spec: str, cfg: QualityConfig):
    """(name, train corpus, held-out corpus) of one --data entry."""
    from hybridize.data import CorpusError, text_corpus
    from hybridize.demo import demo_corpus

    if spec == "stdlib":
        c = demo_corpus(cfg.heldout_fraction)          # the stdlib source without codec tables
        return "stdlib", c.with_split("train"), c.with_split("heldout")
    if not Path(spec).exists():
        raise CorpusError(f"--data {spec!r} does not exist")
    c = text_corpus(spec, doc_split=cfg.doc_split, heldout_fraction=cfg.heldout_fraction)
    return Path(spec).stem, c.with_split("train"), c.with_split("heldout")


def read_sources(cfg: QualityConfig) -> list:
    """[(name, train texts, held-out texts)] for every --data entry (optionally capped per source)."""
    import itertools

    out = []
    for spec in cfg.data:
        name, tr, ho = source_corpora(spec, cfg)
        train = [d for d in itertools.islice(tr, cfg.max_train_docs) if isinstance(d, str)]
        held = [d for d in itertools.islice(ho, cfg.max_heldout_docs) if isinstance(d, str)]
        out.append((name, train, held))
    return out


def _shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def prepare_data(cfg: QualityConfig, device, tokenizer=None) -> StudyData:
    """Read the sources, train the BPE (unless a teacher brings its tokenizer), tokenize, pack."""
    from hybridize.data import pack_documents, pad_token_id, tokenize_corpus
    from hybridize.demo import tokenizer_from_texts

    t0 = time.perf_counter()
    sources = read_sources(cfg)
    if tokenizer is None:
        mixed = _shuffled([d for _, tr, _ in sources for d in tr], cfg.seed)
        tokenizer = tokenizer_from_texts(mixed, cfg.vocab_size, cfg.tokenizer_chars)
    t_tok = time.perf_counter()
    train_docs, evals, heldout, info = [], {}, [], {"sources": {}}
    pad = pad_token_id(tokenizer)
    for name, tr, ho in sources:
        tr_ids, ho_ids = tokenize_corpus(tr, tokenizer), tokenize_corpus(ho, tokenizer)
        train_docs += tr_ids
        heldout += ho_ids
        info["sources"][name] = {"train_docs": len(tr_ids), "train_tokens": sum(map(len, tr_ids)),
                                 "heldout_docs": len(ho_ids), "heldout_tokens": sum(map(len, ho_ids))}
        if sum(map(len, ho_ids)) < cfg.seq_len:
            continue
        rows = pack_documents(_shuffled(ho_ids, cfg.seed), cfg.seq_len, pad_id=pad, drop_last=False)
        rows = {k: v[:cfg.eval_rows].to(device) for k, v in rows.items()}
        evals[name] = [{k: v[i:i + cfg.eval_batch_size] for k, v in rows.items()}
                       for i in range(0, rows["input_ids"].shape[0], cfg.eval_batch_size)]
        info["sources"][name]["eval_rows"] = int(rows["input_ids"].shape[0])
    if not evals:
        raise ValueError("no source has a held-out split of at least seq_len tokens; use more data")
    train = pack_documents(_shuffled(train_docs, cfg.seed), cfg.seq_len, pad_id=pad)
    train = {k: v.to(device) for k, v in train.items()}
    if train["input_ids"].shape[0] < cfg.batch_size:
        raise ValueError(f"{train['input_ids'].shape[0]} training rows < batch_size {cfg.batch_size}")
    info.update(vocab_size=len(tokenizer), train_rows=int(train["input_ids"].shape[0]),
                train_tokens=int(train["input_ids"].numel()), seq_len=cfg.seq_len,
                eval_tokens=sum(_targets(b) for bs in evals.values() for b in bs),
                tokenizer_s=round(t_tok - t0, 2), total_s=round(time.perf_counter() - t0, 2))
    curve = {k: v[:cfg.curve_batches] for k, v in evals.items()}
    return StudyData(tokenizer, train, evals, curve, heldout, info)


def _targets(batch: dict) -> int:
    """Scored tokens of a batch, as `evaluate_lm` counts them."""
    return int((batch["labels"][:, 1:] != -100).sum())


class RowStream:
    """Endless batches of `batch_size` packed rows, in a new seeded permutation every epoch. Every run
    builds its own stream with the same seed, so all runs of a comparison see the same batches."""

    def __init__(self, rows: dict, batch_size: int, seed: int):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.n = int(rows["input_ids"].shape[0])

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        dev = self.rows["input_ids"].device
        while True:
            perm = torch.randperm(self.n, generator=g)
            for lo in range(0, self.n - self.batch_size + 1, self.batch_size):
                idx = perm[lo:lo + self.batch_size].to(dev)
                yield {k: v.index_select(0, idx) for k, v in self.rows.items()}


# ---------------------------------------------------------------------------- models
def teacher_config(cfg: QualityConfig, tokenizer):
    from hybridize.demo import llama_teacher_config

    return llama_teacher_config(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                                num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, ffn=cfg.ffn,
                                max_position_embeddings=max(cfg.extrapolation_factors) * cfg.seq_len,
                                name="quality-teacher", tie_embeddings=cfg.tie_embeddings)


def recurrent_config(family: str, teacher_cfg, cfg: QualityConfig):
    """Hawk or Griffin (the library's preset families) at the teacher's width, depth and MLP size, so
    the models differ in their mixers only. Griffin's local attention window: `griffin_window`."""
    from hybridize.config import preset

    c = preset(f"{family}-tiny")
    c.vocab_size, c.hidden_size = teacher_cfg.vocab_size, teacher_cfg.hidden_size
    c.bos_token_id, c.eos_token_id, c.pad_token_id = (teacher_cfg.bos_token_id, teacher_cfg.eos_token_id,
                                                      teacher_cfg.pad_token_id)
    n, a = teacher_cfg.num_layers, teacher_cfg.attention
    c.layer_pattern = ["rglru"] * n if family == "hawk" else \
        ["attention" if i % 3 == 2 else "rglru" for i in range(n)]
    c.mlp.intermediate_size = teacher_cfg.mlp.intermediate_size
    c.rglru.lru_width, c.rglru.num_heads = teacher_cfg.hidden_size, a.num_heads
    c.attention = dataclasses.replace(c.attention, num_heads=a.num_heads, num_kv_heads=1,
                                      head_dim=teacher_cfg.hidden_size // a.num_heads,
                                      sliding_window=cfg.griffin_window or cfg.seq_len // 2,
                                      max_position_embeddings=a.max_position_embeddings)
    c.embedding_scale = math.sqrt(teacher_cfg.hidden_size)
    c.name = f"quality-{family}"
    return c.validate()


def save_teacher(teacher, tokenizer, path, meta: dict, shard_size: str) -> dict:
    """A bf16 copy of the teacher as a hybridize checkpoint in safetensors shards of at most `shard_size`
    (they must travel back from the GPU machine as files ≤ 16 MiB), its tokenizer, and `meta` (how it was
    trained) under "quality_teacher" in config.json. Files hybridize does not need are left out."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    copy.deepcopy(teacher).to(torch.bfloat16).save_pretrained(str(path), max_shard_size=shard_size)
    tokenizer.save_pretrained(str(path))
    for extra in ("generation_config.json", "chat_template.jinja"):
        (path / extra).unlink(missing_ok=True)
    cfg_path = path / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["quality_teacher"] = meta
    cfg_path.write_text(json.dumps(raw, indent=1) + "\n")
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    return {"dir": str(path), "dtype": "bfloat16", "files": files, "num_files": len(files),
            "largest_file_bytes": max(files.values())}


def load_teacher(path, device):
    """(teacher in fp32 on `device`, tokenizer, meta) from a `save_teacher` directory (or any hybridize
    checkpoint with a tokenizer)."""
    import hybridize as hz
    from hybridize.api import read_config_json
    from hybridize.data import load_tokenizer

    meta = read_config_json(path).get("quality_teacher", {})
    teacher = hz.load(str(path)).float().to(device)
    tok = load_tokenizer(path)
    if len(tok) > teacher.cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer of {len(tok)} tokens for a vocabulary of "
                         f"{teacher.cfg.vocab_size}")
    return teacher, tok, meta


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- timing
def amp_dtype(device: torch.device, dtype: str) -> Optional[torch.dtype]:
    """The Trainer's autocast rule: bf16 on CUDA (or when asked), none (fp32) otherwise."""
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def amp(device: torch.device, dtype: str):
    d = amp_dtype(device, dtype)
    return contextlib.nullcontext() if d is None else torch.autocast(device_type=device.type, dtype=d)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_call(fn: Callable, *, steps: int, warmup: int, device: torch.device) -> float:
    """Mean wall seconds of fn() over `steps` calls after `warmup`, synchronising the device around."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def time_steps(model, loss_fn: Callable, batch: dict, *, trainable: str, steps: int, warmup: int,
               dtype: str) -> dict:
    """Seconds per training step of `model` (changed in place: pass a copy) on one fixed batch: autocast
    forward + loss, backward, gradient clipping and an AdamW update of the `trainable` parameters, each step
    ending with a host sync on the loss (as the Trainer's loss.item()). batch: (B, L) tensors."""
    from hybridize.distill.stages import trainable_parameters
    from hybridize.distill.trainer import TrainConfig, build_optimizer

    params = trainable_parameters(model, trainable)
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    opt = build_optimizer([(n, p) for n, p in model.named_parameters() if id(p) in chosen],
                          TrainConfig(lr=1e-6, min_lr=0.0, max_steps=1))
    dev = params[0].device
    model.train()

    def one() -> float:
        with amp(dev, dtype):
            loss, _ = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    s = _seconds_per_call(one, steps=steps, warmup=warmup, device=dev)
    tokens = int(batch["input_ids"].numel())
    return {"s_per_step": s, "ms_per_step": 1e3 * s, "tokens_per_s": tokens / s, "steps": steps,
            "warmup": warmup, "tokens_per_step": tokens,
            "trainable_parameters": sum(p.numel() for p in params)}


@torch.no_grad()
def time_forward(model, batch: dict, *, steps: int, warmup: int, dtype: str) -> dict:
    """Seconds per no-grad forward (final hidden states, as the KL loss runs the teacher)."""
    dev = next(model.parameters()).device

    def one():
        with amp(dev, dtype):
            model(batch["input_ids"], seq_idx=batch["seq_idx"], output_hidden_states=True, logits_to_keep=1)

    s = _seconds_per_call(one, steps=steps, warmup=warmup, device=dev)
    return {"ms_per_step": 1e3 * s, "tokens_per_s": batch["input_ids"].numel() / s}


# ---------------------------------------------------------------------------- evaluation
def evaluate(model, sets: dict, dtype: str, teacher=None) -> dict:
    """Held-out CE / perplexity (and KL(teacher ‖ model)) over every source's batches, token-weighted:
    {"ppl", "loss"[, "kl"], "tokens", "by_source": {name: {...}}}."""
    from hybridize.distill.stages import evaluate_lm

    dev = next(model.parameters()).device
    by, tot, n = {}, {"loss": 0.0, "kl": 0.0}, 0
    for name, batches in sets.items():
        with amp(dev, dtype):
            r = evaluate_lm(model, batches, teacher)
        k = sum(_targets(b) for b in batches)
        by[name] = {**r, "tokens": k}
        tot["loss"] += r["loss"] * k
        tot["kl"] += r.get("kl", 0.0) * k
        n += k
    out = {"loss": tot["loss"] / n, "ppl": math.exp(min(tot["loss"] / n, 50.0)), "tokens": n}
    if teacher is not None:
        out["kl"] = tot["kl"] / n
    out["by_source"] = by
    return out


# ---------------------------------------------------------------------------- the study
class Study:
    """Settings, data, teacher, budget and results of one run; the phases are its methods."""

    def __init__(self, cfg: QualityConfig, results: Results, log=print):
        self.cfg, self.results, self.log = cfg, results, log
        self.t0 = time.perf_counter()
        self.device = torch.device(cfg.device if cfg.device != "auto" else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.calib: dict = {}
        self.done: list = []
        self.students: dict = {}          # kept models: the 50 % student for extrapolation
        self.teacher = None
        self.data: Optional[StudyData] = None

    # ------------------------------------------------------------------ budget
    def left(self) -> float:
        return self.cfg.budget_s - (time.perf_counter() - self.t0)

    def allowance(self, phase: str) -> float:
        """Seconds for `phase`: the time left (less the reserve and the fixed throughput cost) shared by
        weight among the phases not yet run."""
        todo = [p for p in self.cfg.phases if p not in self.done]
        fixed = self.calib.get("throughput_s", 0.0) if "throughput" in todo and phase != "throughput" else 0.0
        avail = max(0.0, self.left() - self.cfg.reserve_s - fixed)
        total = sum(PHASE_WEIGHTS[p] for p in todo if PHASE_WEIGHTS[p] > 0) or 1.0
        return avail * PHASE_WEIGHTS[phase] / total

    def fit_steps(self, seconds: float, per_step: float, fixed: float, max_epochs: float) -> int:
        """Steps affordable in `seconds` after `fixed` seconds of evaluation, capped by epochs / max_steps."""
        c = self.cfg
        n = int((seconds - fixed) / max(per_step * SAFETY, 1e-9))
        n = min(n, int(max_epochs * self.data.train_rows / c.batch_size))
        return min(n, c.max_steps) if c.max_steps else n

    @staticmethod
    def plan(allowance: float, steps: int, per_step: float, fixed: float) -> dict:
        """What the budget planner decided (compare estimated_s with the phase's wall time)."""
        return {"allowance_s": round(allowance, 1),
                "estimated_s": round(steps * per_step * SAFETY + fixed, 1)}

    def time_limit(self) -> float:
        return max(1.0, self.left() - self.cfg.reserve_s)

    # ------------------------------------------------------------------ training helpers
    def train_config(self, steps: int, lr: float, *, weight_decay: float = 0.0, eval_every: int = 0):
        from hybridize.distill.trainer import TrainConfig

        c = self.cfg
        return TrainConfig(lr=lr, min_lr=lr / 10, warmup_steps=min(100, steps // 10), max_steps=steps,
                           batch_size=c.batch_size, seq_len=c.seq_len, weight_decay=weight_decay,
                           eval_every=eval_every, log_every=max(1, min(50, steps)), seed=c.seed,
                           dtype=c.dtype, progress=False, plot=False).validate()

    def stream(self) -> RowStream:
        return RowStream(self.data.train, self.cfg.batch_size, self.cfg.seed)

    def curve_eval(self, teacher=None) -> Callable:
        """eval_fn on the curve batches → {"loss", "ppl"[, "kl"]}."""
        def fn(model):
            r = evaluate(model, self.data.curve, self.cfg.dtype, teacher)
            return {k: v for k, v in r.items() if k in ("loss", "ppl", "kl")}
        return fn

    def run_trainer(self, model, loss_fn, params, tcfg, curve: list, eval_fn, offset=(0, 0)) -> dict:
        """One Trainer run (hard-stopped at the budget); eval points appended to `curve` with the tokens and
        steps counted from `offset` (tokens, steps of earlier stages of the same run)."""
        from hybridize.distill.trainer import Trainer

        holder = {}

        def ev(m):
            r = eval_fn(m)
            t = holder["t"]
            curve.append({"tokens": offset[0] + t.tokens, "step": offset[1] + t.step, **r})
            return r

        tcfg = dataclasses.replace(tcfg, time_limit_s=self.time_limit())
        trainer = Trainer(model, self.stream(), loss_fn, tcfg, eval_fn=ev, trainable_params=params)
        holder["t"] = trainer
        s = trainer.train()
        return {"steps": s["steps"], "tokens": s["tokens"], "lr": tcfg.lr, "wall_s": round(s["elapsed_s"], 2),
                "tokens_per_s": round(s["tokens_per_s"]), "stopped": s["stopped"],
                "trainable_parameters": s["trainable_parameters"], "final_train_loss": s["loss"]}

    def pretrain(self, model, name: str, steps: int) -> dict:
        """Next-token pretraining of `model` for `steps` steps → record (held-out ppl, curve, tokens ...)."""
        from hybridize.distill.trainer import lm_loss_fn

        c = self.cfg
        t0 = time.perf_counter()
        curve = [{"tokens": 0, "step": 0, **self.curve_eval()(model)}]
        tcfg = self.train_config(steps, c.teacher_lr, weight_decay=0.1,
                                 eval_every=max(1, steps // c.curve_points))
        run = self.run_trainer(model, lm_loss_fn, list(model.parameters()), tcfg, curve, self.curve_eval())
        model.eval()
        rec = {"name": name, "parameters": n_params(model), "layer_pattern": model.layer_pattern, **run,
               "epochs": round(run["steps"] * c.batch_size / self.data.train_rows, 3),
               "heldout": evaluate(model, self.data.evals, c.dtype), "curve": curve}
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        return rec

    def distill(self, name: str, stages: list, *, fraction: float, mixer: str, init: str,
                conv_init: str) -> tuple:
        """Convert the teacher and run `stages` (StageConfigs) in order → (student, record). The record holds
        the converted and distilled held-out ppl / KL, the ratio to the teacher and the KL curve."""
        from hybridize.convert import convert
        from hybridize.distill.stages import stage_loss, trainable_parameters

        c, teacher = self.cfg, self.teacher
        t0 = time.perf_counter()
        student = convert(teacher, mixer=mixer, attention_fraction=fraction, init=init, seed=c.seed,
                          conv_init=conv_init)
        ev = self.curve_eval(teacher)
        rec = {"name": name, "mixer": mixer, "attention_fraction": fraction, "init": init,
               "conv_init": conv_init, "layer_pattern": student.layer_pattern,
               "parameters": n_params(student),
               "converted": evaluate(student, self.data.evals, c.dtype, teacher), "stages": [],
               "curve": [{"tokens": 0, "step": 0, **ev(student)}], "complete": True}
        off = (0, 0)
        for st in stages:
            params = trainable_parameters(student, st.trainable_or_default)
            run = self.run_trainer(student, stage_loss(st, student, teacher), params, st.train, rec["curve"],
                                   ev, off)
            rec["stages"].append({"stage": st.name or st.kind, "kind": st.kind,
                                  "trainable": st.trainable_or_default, **run})
            off = (off[0] + run["tokens"], off[1] + run["steps"])
            if run["stopped"] != "max_steps":
                rec["complete"] = False
                break
        student.eval()
        rec["steps"], rec["tokens"] = off[1], off[0]
        rec["distilled"] = evaluate(student, self.data.evals, c.dtype, teacher)
        rec["ppl_ratio"] = rec["distilled"]["ppl"] / self.results["teacher"]["heldout"]["ppl"]
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        return student, rec

    def mil_stages(self, steps: int) -> list:
        """Mamba-in-the-Llama: KL with only the new mixers training, then (e2e_fraction of the steps) KL
        end to end — MIL's second stage is SFT on chat data, which a plain-text study does not have."""
        from hybridize.distill.stages import StageConfig

        c = self.cfg
        e2e = round(steps * c.e2e_fraction) if steps >= 2 else 0
        every = max(1, steps // c.curve_points)
        out = [StageConfig(kind="kl", name="kl-mixers",
                           train=self.train_config(steps - e2e, c.kl_lr, eval_every=every)).validate()]
        if e2e:
            out.append(StageConfig(kind="kl", name="kl-e2e", trainable="all",
                                   train=self.train_config(e2e, c.e2e_lr, eval_every=every)).validate())
        return out

    def mohawk_stages(self, steps: int, with_12: bool) -> list:
        """MOHAWK 1 (matrix orientation) → 2 (hidden-state alignment) → 3 (end-to-end KL), or 3 alone, with
        the same total steps."""
        from hybridize.distill.stages import StageConfig

        c = self.cfg
        every = max(1, steps // c.curve_points)
        s1, s2 = (max(1, round(steps * f)) for f in c.mohawk_split) if with_12 else (0, 0)
        out = []
        for kind, n, lr in (("mohawk1", s1, c.mohawk_lr), ("mohawk2", s2, c.mohawk_lr),
                            ("mohawk3", steps - s1 - s2, c.mohawk3_lr)):
            if n > 0:
                tcfg = self.train_config(n, lr, eval_every=every)
                out.append(StageConfig(kind=kind, train=tcfg).validate())
        return out

    # ------------------------------------------------------------------ calibration
    def calibrate(self, teacher) -> dict:
        """Seconds per step of every kind of run the selected phases need (on copies of a teacher of the
        study's shapes, weights irrelevant) and of the evaluations."""
        from hybridize.convert import convert
        from hybridize.distill.stages import StageConfig, freeze, stage_loss
        from hybridize.distill.trainer import lm_loss_fn
        from hybridize.model import HybridLM

        c, ph = self.cfg, self.cfg.phases
        t0 = time.perf_counter()
        batch = next(iter(self.stream()))
        frozen = freeze(copy.deepcopy(teacher))
        kw = dict(steps=c.calib_steps, warmup=c.calib_warmup, dtype=c.dtype)
        out = {}

        def step_s(model, loss_fn, trainable):
            return time_steps(model, loss_fn, batch, trainable=trainable, **kw)["s_per_step"]

        def student(mixer, fraction):
            return convert(frozen, mixer=mixer, attention_fraction=fraction, seed=c.seed,
                           conv_init="identity")

        def fraction(f):
            s = student(c.mixer, f)
            loss = stage_loss(StageConfig(kind="kl"), s, frozen)
            out[f"kl@{f}"] = step_s(s, loss, "mixers")
            out[f"e2e@{f}"] = step_s(s, loss, "all")

        def mohawk():
            s = student(c.mohawk_mixer, c.mohawk_fraction)
            for kind in ("mohawk1", "mohawk2", "mohawk3"):
                out[kind] = step_s(s, stage_loss(StageConfig(kind=kind), s, frozen),
                                   StageConfig(kind=kind).trainable_or_default)

        def recurrent(fam):
            m = HybridLM(recurrent_config(fam, teacher.cfg, c)).to(self.device)
            out[fam] = step_s(m, lm_loss_fn, "all")

        out["teacher"] = step_s(copy.deepcopy(teacher), lm_loss_fn, "all")
        fracs = set(c.fractions) if "fractions" in ph else set()
        if ph_any(ph, "init", "extrapolation", "throughput"):
            fracs.add(0.5)
        todo = [(f"kl@{f}", lambda f=f: fraction(f)) for f in sorted(fracs)]
        todo += [("mohawk", mohawk)] if "mohawk" in ph else []
        if "extrapolation" in ph:
            todo += [(fam, lambda fam=fam: recurrent(fam)) for fam in ("hawk", "griffin")]
        for name, fn in todo:
            self.guarded(out, name, fn)
        e0 = time.perf_counter()
        evaluate(frozen, self.data.evals, c.dtype, frozen)   # two forwards, as a student + teacher evaluation
        out["eval_full"] = time.perf_counter() - e0
        ncurve = sum(len(v) for v in self.data.curve.values())
        out["eval_curve"] = out["eval_full"] * ncurve / sum(len(v) for v in self.data.evals.values())
        # throughput: (warm-up + timed) steps of teacher fine-tuning, student KL and e2e at two shapes
        per = out["teacher"] + out.get("kl@0.5", out["teacher"]) + out.get("e2e@0.5", out["teacher"])
        out["throughput_s"] = 2 * (c.throughput_steps + c.throughput_warmup) * per * 1.5 + \
            5.0 * (self.device.type == "cuda")
        out["calibration_s"] = round(time.perf_counter() - t0, 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return out

    def guarded(self, out: dict, name: str, fn: Callable) -> None:
        """Run one calibration; a failure (e.g. out of memory) is recorded under out["errors"] and only the
        phase that needs this timing fails later, not the whole study."""
        from hybridize.bench.utils import err

        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            out.setdefault("errors", {})[name] = err(e)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def need(self, *keys: str) -> None:
        """Stop a phase whose step timings are missing, naming the calibration error."""
        missing = [k for k in keys if k not in self.calib]
        if missing:
            raise RuntimeError(f"no calibration for {missing}: {self.calib.get('errors', {})}")

    def run_cost(self) -> float:
        """Fixed evaluation seconds of one run (two full evaluations + the learning-curve points)."""
        return 2 * self.calib["eval_full"] + (self.cfg.curve_points + 2) * self.calib["eval_curve"]

    # ------------------------------------------------------------------ phases
    def phase_teacher(self, teacher_dir: Optional[str], save_dir: Optional[str]) -> None:
        from hybridize.model import HybridLM

        c = self.cfg
        if teacher_dir:
            self.teacher, tok, meta = load_teacher(teacher_dir, self.device)
            self.data = prepare_data(c, self.device, tokenizer=tok)
            self.results["data"] = self.data.info
            self.calib = self.calibrate(self.teacher)
            self.results["calibration"] = self.calib
            warn = None
            if meta.get("data") and list(meta["data"]) != list(c.data):
                warn = f"teacher trained on {meta['data']}, this run's data is {list(c.data)}"
            self.results["teacher"] = {"source": str(teacher_dir), "meta": meta, "warning": warn,
                                       "parameters": n_params(self.teacher),
                                       "layer_pattern": self.teacher.layer_pattern,
                                       "heldout": evaluate(self.teacher, self.data.evals, c.dtype)}
        else:
            self.data = prepare_data(c, self.device)
            self.results["data"] = self.data.info
            self.results.save()
            torch.manual_seed(c.seed)
            self.teacher = HybridLM(teacher_config(c, self.data.tokenizer)).to(self.device)
            self.calib = self.calibrate(self.teacher)
            self.results["calibration"] = self.calib
            allow = self.allowance("teacher")
            steps = self.fit_steps(allow, self.calib["teacher"], self.run_cost(), c.teacher_max_epochs)
            steps = max(steps, c.min_steps)          # everything else needs a teacher
            self.log(f"[quality] teacher: {n_params(self.teacher) / 1e6:.1f} M parameters, {steps} steps")
            rec = self.pretrain(self.teacher, "teacher", steps)
            rec["source"] = "pretrained"
            rec["plan"] = self.plan(allow, steps, self.calib["teacher"], self.run_cost())
            self.results["teacher"] = rec
        self.teacher.eval()
        if save_dir:
            t = self.results["teacher"]
            meta = {"data": list(c.data), "steps": t.get("steps"), "tokens": t.get("tokens"),
                    "seq_len": c.seq_len, "batch_size": c.batch_size, "lr": c.teacher_lr,
                    "heldout_ppl": t["heldout"]["ppl"], "seed": c.seed}
            self.results["teacher"]["saved"] = save_teacher(self.teacher, self.data.tokenizer, save_dir, meta,
                                                            c.shard_size)
        self.log(f"[quality] teacher held-out ppl {self.results['teacher']['heldout']['ppl']:.2f}")

    def phase_throughput(self) -> None:
        """Distillation step of the 50 % student vs fine-tuning step of the teacher, same batch."""
        from hybridize.convert import convert
        from hybridize.distill.stages import StageConfig, freeze, stage_loss
        from hybridize.distill.trainer import lm_loss_fn

        c = self.cfg
        if self.left() - c.reserve_s < self.calib["throughput_s"]:
            return self.results.skip("throughput", f"needs ~{self.calib['throughput_s']:.0f} s, "
                                                   f"{self.left() - c.reserve_s:.0f} s left")
        kw = dict(steps=c.throughput_steps, warmup=c.throughput_warmup, dtype=c.dtype)
        frozen = freeze(copy.deepcopy(self.teacher))
        shapes = [(c.batch_size, c.seq_len), (max(1, c.batch_size // 4), 4 * c.seq_len)]
        rows = []
        for B, L in shapes:
            g = torch.Generator().manual_seed(c.seed)
            ids = torch.randint(3, self.teacher.cfg.vocab_size, (B, L), generator=g).to(self.device)
            batch = {"input_ids": ids, "labels": ids.clone(), "seq_idx": torch.zeros_like(ids)}
            ft = copy.deepcopy(self.teacher)
            row = {"batch": B, "seq_len": L,
                   "teacher_finetune": time_steps(ft, lm_loss_fn, batch, trainable="all", **kw)}
            del ft
            s = convert(frozen, mixer=c.mixer, attention_fraction=0.5, seed=c.seed, conv_init=c.conv_init)
            loss = stage_loss(StageConfig(kind="kl"), s, frozen)
            row["student_kl_mixers"] = time_steps(s, loss, batch, trainable="mixers", **kw)
            row["student_kl_all"] = time_steps(s, loss, batch, trainable="all", **kw)
            row["teacher_forward"] = time_forward(frozen, batch, **kw)
            for k in ("student_kl_mixers", "student_kl_all"):
                row[f"{k}_vs_finetune"] = row[k]["tokens_per_s"] / row["teacher_finetune"]["tokens_per_s"]
            rows.append(row)
            del s
        self.results["throughput"] = {"dtype": "bf16 autocast" if self.device.type == "cuda" else "fp32",
                                      "note": "random token ids, one document per row; each step = forward, "
                                              "backward, clip, AdamW, loss.item()", "shapes": rows}

    def phase_fractions(self) -> None:
        c = self.cfg
        self.need(*(f"{k}@{f}" for f in c.fractions for k in ("kl", "e2e")))
        per = sum((1 - c.e2e_fraction) * self.calib[f"kl@{f}"] + c.e2e_fraction * self.calib[f"e2e@{f}"]
                  for f in c.fractions)
        fixed = len(c.fractions) * self.run_cost()
        allow = self.allowance("fractions")
        steps = self.fit_steps(allow, per, fixed, c.distill_max_epochs)
        if steps < c.min_steps:
            return self.results.skip("fractions", f"{steps} steps fit the budget, < min_steps {c.min_steps}")
        out = {"steps_per_run": steps, "tokens_per_run": steps * c.batch_size * c.seq_len,
               "plan": self.plan(allow, steps, per, fixed), "runs": {}}
        self.results["fractions"] = out
        for f in c.fractions:
            self.log(f"[quality] fractions: {f:g} attention, {steps} steps")
            s, rec = self.distill(f"attn{f:g}", self.mil_stages(steps), fraction=f, mixer=c.mixer,
                                  init="attention", conv_init=c.conv_init)
            if f in TARGETS:
                rec["target_ratio"] = TARGETS[f]
                rec["meets_target"] = rec["ppl_ratio"] <= TARGETS[f]
            out["runs"][f"{f:g}"] = rec
            if f == 0.5:
                self.students["0.5"] = (s, rec)
            self.results.save()
            self.log(f"[quality]   ppl {rec['distilled']['ppl']:.2f} = {rec['ppl_ratio']:.3f} × teacher")

    def phase_init(self) -> None:
        """Random vs attention initialisation of the 50 % student, equal tokens; the fractions run with the
        same settings is reused when its step count fits."""
        c = self.cfg
        variants = [tuple(v.split(":")) for v in c.init_variants]
        self.need("kl@0.5", "e2e@0.5")
        per = (1 - c.e2e_fraction) * self.calib["kl@0.5"] + c.e2e_fraction * self.calib["e2e@0.5"]
        allow = self.allowance("init")
        reuse = self.students.get("0.5")
        todo = variants
        if reuse is not None and ("attention", c.conv_init) in variants and reuse[1]["complete"]:
            steps = reuse[1]["steps"]
            todo = [v for v in variants if v != ("attention", c.conv_init)]
            if len(todo) * (steps * per * SAFETY + self.run_cost()) > allow:
                reuse, todo = None, variants
        else:
            reuse = None
        if reuse is None:
            steps = self.fit_steps(allow, per * len(variants), len(variants) * self.run_cost(),
                                   c.distill_max_epochs)
        if steps < c.min_steps:
            return self.results.skip("init", f"{steps} steps fit the budget, < min_steps {c.min_steps}")
        out = {"steps_per_run": steps, "tokens_per_run": steps * c.batch_size * c.seq_len,
               "plan": self.plan(allow, steps, per * len(todo), len(todo) * self.run_cost()), "variants": {}}
        self.results["init"] = out
        if reuse is not None:
            out["variants"][f"attention:{c.conv_init}"] = {**reuse[1], "reused_from": "fractions"}
        for init, conv in todo:
            self.log(f"[quality] init: {init} init, {conv} conv, {steps} steps")
            _, rec = self.distill(f"init-{init}-{conv}", self.mil_stages(steps), fraction=0.5, mixer=c.mixer,
                                  init=init, conv_init=conv)
            out["variants"][f"{init}:{conv}"] = rec
            self.results.save()
            self.log(f"[quality]   ppl {rec['distilled']['ppl']:.2f} = {rec['ppl_ratio']:.3f} × teacher")

    def phase_mohawk(self) -> None:
        c = self.cfg
        s1, s2 = c.mohawk_split
        cal = self.calib
        self.need("mohawk1", "mohawk2", "mohawk3")
        per = (s1 * cal["mohawk1"] + s2 * cal["mohawk2"] + (1 - s1 - s2) * cal["mohawk3"]) + cal["mohawk3"]
        allow = self.allowance("mohawk")
        steps = self.fit_steps(allow, per, 2 * self.run_cost(), c.distill_max_epochs)
        if steps < max(c.min_steps, 3):
            return self.results.skip("mohawk", f"{steps} steps fit the budget, < min_steps {c.min_steps}")
        out = {"mixer": c.mohawk_mixer, "attention_fraction": c.mohawk_fraction, "init": c.mohawk_init,
               "total_steps": steps, "total_tokens": steps * c.batch_size * c.seq_len,
               "plan": self.plan(allow, steps, per, 2 * self.run_cost()), "runs": {}}
        self.results["mohawk"] = out
        for name, with_12 in (("stages_1_2_3", True), ("stage_3_only", False)):
            self.log(f"[quality] mohawk: {name}, {steps} steps in total")
            _, rec = self.distill(name, self.mohawk_stages(steps, with_12), fraction=c.mohawk_fraction,
                                  mixer=c.mohawk_mixer, init=c.mohawk_init, conv_init="default")
            out["runs"][name] = rec
            self.results.save()
            self.log(f"[quality]   ppl {rec['distilled']['ppl']:.2f}, KL {rec['distilled']['kl']:.4f}")

    def phase_extrapolation(self) -> None:
        """Hawk and Griffin pretrained with the teacher's steps (when they fit), then perplexity at every
        factor × seq_len on held-out documents long enough for the longest window."""
        from hybridize.eval.perplexity import extrapolation
        from hybridize.model import HybridLM

        c, t = self.cfg, self.results["teacher"]
        want = t.get("steps") or (t.get("meta", {}).get("tokens", 0) // (c.batch_size * c.seq_len))
        hybrid = self.students.get("0.5")
        self.need("hawk", "griffin", *(() if hybrid else ("kl@0.5",)))
        per = self.calib["hawk"] + self.calib["griffin"]
        # evaluation: 4 models × every length over the same tokens, at the calibrated forward speed (×2 for
        # the longer windows); plus the pretraining runs' own evaluations
        per_token = self.calib["eval_full"] / (2 * self.data.info["eval_tokens"])
        fixed = 2 * self.run_cost() + 8 * len(c.extrapolation_factors) * c.extrapolation_tokens * per_token
        if hybrid is None:
            per += self.calib["kl@0.5"]
        allow = self.allowance("extrapolation")
        fit = self.fit_steps(allow, per, fixed, c.teacher_max_epochs)
        steps = min(want, fit) if want else fit
        if steps < c.min_steps:
            return self.results.skip("extrapolation",
                                     f"{steps} steps fit the budget, < min_steps {c.min_steps}")
        out = {"train_len": c.seq_len, "factors": list(c.extrapolation_factors),
               "plan": self.plan(allow, steps, per, fixed),
               "equal_tokens_to_teacher": steps == want, "pretrain": {}, "models": {}}
        self.results["extrapolation"] = out
        models = {"teacher": self.teacher}
        for fam in ("hawk", "griffin"):
            torch.manual_seed(c.seed)
            m = HybridLM(recurrent_config(fam, self.teacher.cfg, c)).to(self.device)
            self.log(f"[quality] extrapolation: pretraining {fam} ({n_params(m) / 1e6:.1f} M), {steps} steps")
            out["pretrain"][fam] = self.pretrain(m, fam, steps)
            models[fam] = m
            self.results.save()
        if hybrid is None:
            hybrid = self.distill("hybrid50", self.mil_stages(steps), fraction=0.5, mixer=c.mixer,
                                  init="attention", conv_init=c.conv_init)
            out["pretrain"]["hybrid50"] = hybrid[1]
        models["hybrid50"] = hybrid[0]
        docs, how = long_documents(self.data.heldout, c.seq_len * max(c.extrapolation_factors),
                                   c.extrapolation_tokens)
        out["documents"] = {"how": how, "count": len(docs), "tokens": sum(len(d) for d in docs)}
        bs = max(1, c.eval_batch_size // max(c.extrapolation_factors))
        for name, m in models.items():
            r = extrapolation(m.eval(), docs, c.seq_len, c.extrapolation_factors, batch_size=bs,
                              autocast_dtype=amp_dtype(self.device, c.dtype))
            r["per_position_loss"] = [round(v, 4) for v in r["per_position_loss"]]
            out["models"][name] = r
            self.results.save()
            self.log(f"[quality]   {name}: " +
                     "  ".join(f"{x['seq_len']}: {x['ppl']:.2f}" for x in r["lengths"]))

    # ------------------------------------------------------------------ driver
    def run_phase(self, phase: str) -> None:
        """One phase; an error is recorded (and printed) instead of losing the phases after it."""
        from hybridize.bench.utils import err

        try:
            getattr(self, f"phase_{phase}")()
        except Exception as e:
            traceback.print_exc()
            self.results.setdefault("errors", []).append({"phase": phase, "error": err(e)})
            rec = self.results.get(phase)
            self.results[phase] = {**rec, "error": err(e)} if isinstance(rec, dict) else {"error": err(e)}
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def run(self, teacher_dir=None, save_dir=None) -> Results:
        r, c = self.results, self.cfg
        r["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
        r["env"] = environment(self.device)
        r["settings"] = dataclasses.asdict(c)
        r["phases"] = list(c.phases)
        r.save()
        t0 = time.perf_counter()
        self.phase_teacher(teacher_dir, save_dir)
        r["timings_s"] = {"teacher": round(time.perf_counter() - t0, 2)}
        self.done.append("teacher")
        r.save()
        for phase in c.phases:
            if phase == "teacher":
                continue
            t0 = time.perf_counter()
            if self.left() <= c.reserve_s:
                r.skip(phase, "time budget spent")
            else:
                self.run_phase(phase)
            self.done.append(phase)
            r["timings_s"][phase] = round(time.perf_counter() - t0, 2)
            r.save()
        r["checks"] = checks(r)
        r["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        r["finished"] = True
        r.save()
        return r


def ph_any(phases, *names) -> bool:
    return any(n in phases for n in names)


def long_documents(docs: list, length: int, max_tokens: int) -> tuple:
    """Held-out documents of at least `length` tokens, each cut to a whole number of `length` windows, up to
    `max_tokens` in total; when there are none, the documents concatenated and cut into `length` pieces."""
    out, n = [], 0
    for d in sorted(docs, key=len, reverse=True):
        k = min(len(d) // length, max(1, (max_tokens - n) // length))
        if k < 1 or n >= max_tokens:
            break
        out.append(list(d[:k * length]))
        n += k * length
    if out:
        return out, "long held-out documents"
    flat = [t for d in docs for t in d][:max(length, max_tokens)]
    return [flat[i:i + length] for i in range(0, len(flat) - length + 1, length)] or [flat], \
        "held-out documents concatenated (none is long enough)"


def checks(r: dict) -> dict:
    """The issue's claims, evaluated on this run (None where a phase did not run)."""
    out = {}
    runs = r.get("fractions", {}).get("runs", {})
    for f, target in TARGETS.items():
        rec = runs.get(f"{f:g}")
        out[f"attn{f:g}_ppl_ratio_le_{target}"] = None if rec is None else rec["ppl_ratio"] <= target
    ratios = [runs[k]["ppl_ratio"] for k in sorted(runs, key=float, reverse=True)]
    out["more_attention_closer_to_teacher"] = None if len(ratios) < 2 else \
        all(a <= b for a, b in zip(ratios, ratios[1:]))
    var = r.get("init", {}).get("variants", {})
    att = [v["distilled"]["ppl"] for k, v in var.items() if k.startswith("attention")]
    rnd = [v["distilled"]["ppl"] for k, v in var.items() if k.startswith("random")]
    out["attention_init_beats_random"] = None if not (att and rnd) else min(att) < min(rnd)
    out["init_ppl"] = {k: v["distilled"]["ppl"] for k, v in var.items()} or None
    mh = r.get("mohawk", {}).get("runs", {})
    if {"stages_1_2_3", "stage_3_only"} <= set(mh):
        a, b = mh["stages_1_2_3"]["distilled"], mh["stage_3_only"]["distilled"]
        out["mohawk_stages_1_2_then_3_beat_3_alone"] = a["kl"] < b["kl"]
    else:
        out["mohawk_stages_1_2_then_3_beat_3_alone"] = None
    shapes = r.get("throughput", {}).get("shapes", [])
    out["distill_vs_finetune_tokens_per_s"] = \
        [round(s["student_kl_mixers_vs_finetune"], 3) for s in shapes] or None
    return out


def plot(r: dict, path) -> Optional[str]:
    """The study's PNG (`hybridize.bench.plots.plot_quality`); None when matplotlib is missing."""
    try:
        from hybridize.bench.plots import plot_quality
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return None
    return plot_quality(r, path)


# ---------------------------------------------------------------------------- command line
def _parse_value(text: str, default):
    """A --set value typed like the field's default (tuples: comma-separated)."""
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, tuple):
        items = [x for x in text.split(",") if x]
        kind = type(default[0]) if default else str
        return tuple(kind(x) if kind is not str else x for x in items)
    if default is None:
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return None if text.lower() == "none" else text
    return type(default)(text)


def config_from_args(args) -> QualityConfig:
    base = QualityConfig.quick() if args.quick else QualityConfig()
    kw = {}
    if args.phases:
        kw["phases"] = PHASES if args.phases == "all" else tuple(p for p in args.phases.split(",") if p)
    if args.data:
        kw["data"] = tuple(args.data)
    for name in ("budget_s", "seed", "dtype", "device"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    return apply_settings(base, kw, args.set)


def apply_settings(base, kw: dict, sets) -> "QualityConfig":
    """`base` (a QualityConfig or subclass) with the fields in `kw` and the ``--set KEY=VALUE`` items
    (parsed like the field's current value) replaced, validated; an unknown key exits with the list."""
    fields = {f.name for f in dataclasses.fields(base)}
    for item in sets or []:
        k, _, v = item.partition("=")
        if k not in fields:
            raise SystemExit(f"--set {item!r}: unknown setting; known: {sorted(fields)}")
        kw[k] = _parse_value(v, getattr(base, k))
    return dataclasses.replace(base, **kw).validate()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json-out", default="quality.json")
    p.add_argument("--plot-out", default=None, help="PNG (default: the JSON path with .png)")
    p.add_argument("--phases", default=None,
                   help=f"comma-separated from {','.join(PHASES)}, or 'all' "
                        f"(default: {','.join(DEFAULT_PHASES)})")
    p.add_argument("--data", nargs="+", default=None,
                   help="corpora: 'stdlib' and/or text files or directories (default: stdlib), e.g. "
                        "stdlib data/wikitext-2/valid.txt data/tinyshakespeare.txt")
    p.add_argument("--teacher", default=None,
                   help="reuse a teacher saved with --save-teacher (no pretraining)")
    p.add_argument("--save-teacher", default=None,
                   help="save the teacher (bf16, safetensors shards ≤ 15 MB, tokenizer) to this directory")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole run (default 520)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings: every phase on CPU in seconds (smoke)")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --quick)")
    p.add_argument("--dtype", default=None, choices=["auto", "bf16", "fp32"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any QualityConfig field, e.g. --set kl_lr=2e-3 --set fractions=0.5,0.25")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    p.add_argument("--plot-only", default=None, metavar="JSON",
                   help="redraw the PNG of a finished JSON and exit")
    args = p.parse_args(argv)
    plot_out = plot_out_or_redraw(args, plot)
    if plot_out is None:
        return 0
    cfg = config_from_args(args)
    from hybridize.demo import choose_threads, quiet_transformers

    quiet_transformers()
    if cfg.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(choose_threads(None))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    results = Results(args.json_out)
    suite_argv = sys.argv[1:] if argv is None else list(argv)
    results["command"] = shlex.join(["python", "-m", "hybridize.bench.quality", *suite_argv])
    results["process_argv"] = list(sys.argv)
    Study(cfg, results).run(args.teacher, args.save_teacher)
    print(f"wrote {args.json_out}")
    png = None if args.no_plot else plot(results, plot_out)
    if png:
        print(f"wrote {png}")
    print(json.dumps(_finite(results["checks"]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
