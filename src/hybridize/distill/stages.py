"""Distillation stages built on the generic `Trainer`: the losses of MOHAWK (arXiv 2408.10189) and
Mamba-in-the-Llama (arXiv 2408.15237), which parameters each stage trains, teacher pseudo-labels for
sequence-level KD, and progressive replacement.

Stage kinds (`StageConfig.kind`):

  mohawk1      matrix orientation: per converted layer i, the student mixer and the teacher attention
               both read the teacher's normalised hidden state u_i = norm_i(h_i); loss = mean over layers
               of ‖M_student(u_i) − A_teacher(u_i)‖_F (post-softmax attention). Trains the mixers only.
  mohawk2      hidden-state alignment: ‖mixer_s(u_i) − attention_t(u_i)‖₂ per token (target="mixer"),
               or whole blocks ‖block_s(h_i) − h_{i+1}‖₂ (target="block", trains those blocks).
  mohawk3      end-to-end KD on logits, KL(teacher ‖ student); trains everything.
  kl           MIL stage 1: word-level KL(teacher ‖ student) (+ ce_weight · CE on the data); only the
               new mixers train (MLPs, norms, embeddings and kept attention frozen).
  seqkd        sequence-level KD: CE on teacher pseudo-labels (+ kl_weight · KL; MIL used 1 and 0.1).
  sft          CE on chat data; trains everything. `assistant_only_loss` (TRL's option): true = targets are
               the assistant turns only (system / user turns and role headers are context, label −100),
               false = every token; unset = auto: assistant turns of chat records, all tokens of
               plain-text records (see `hybridize.data.PackedStream`).
  dpo          DPO against a frozen reference (the student as it enters the stage, or the teacher).
  progressive  convert more layers in steps (`fractions`, e.g. [0.75, 0.5, 0.25]); each step starts
               from the previous step's final model and runs the `kl` loss.

Everything with a teacher keeps it frozen: eval(), requires_grad False, forward under torch.no_grad.
KL and CE are computed from final hidden states in chunks (`losses.kl_from_hidden`), so no full
(tokens × vocab) logits tensor is ever held.

Batches: dicts of (B, L) tensors `input_ids`, `labels` (−100 = no target), `seq_idx` (packed documents);
DPO batches are `collate_preference_batch` dicts.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from hybridize.config import ConfigError
from hybridize.distill.losses import (
    IGNORE_INDEX, chunked_kl_div, cross_entropy_from_hidden, dpo_loss, dpo_metrics,
    hidden_state_alignment_loss, kl_from_hidden, kl_mask_from_labels, matrix_orientation_loss,
    sequence_logprobs,
)
from hybridize.distill.trainer import TrainConfig, Trainer, lm_loss_fn

STAGE_KINDS = ("mohawk1", "mohawk2", "mohawk3", "kl", "seqkd", "sft", "dpo", "progressive")
TRAINABLE = ("mixers", "blocks", "all")
#: keys a stage accepts besides `kind`, `name`, `trainable` and the TrainConfig fields
STAGE_KEYS = {
    "mohawk1": set(),
    "mohawk2": {"target"},
    "mohawk3": {"temperature"},
    "kl": {"temperature", "kl_weight", "ce_weight"},
    "seqkd": {"temperature", "kl_weight", "ce_weight", "num_prompts", "prompt_tokens", "max_new_tokens",
              "gen_temperature", "gen_batch_size"},
    "sft": {"assistant_only_loss"},
    "dpo": {"beta", "label_smoothing", "reference"},
    "progressive": {"fractions", "temperature", "kl_weight", "ce_weight"},
}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


class StageError(ConfigError):
    """A stage is misconfigured or cannot run with the given models / data."""


# ---------------------------------------------------------------------------- config
@dataclass
class StageConfig:
    """One distillation stage. `train` holds its optimisation settings; the rest are loss options
    (only the ones listed in STAGE_KEYS[kind] may be set for a kind)."""
    kind: str
    name: Optional[str] = None
    trainable: Optional[str] = None            # None → per kind: see default_trainable()
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100))
    temperature: float = 1.0
    kl_weight: Optional[float] = None          # None → 1 (kl, mohawk3, progressive) / 0.1 (seqkd)
    ce_weight: Optional[float] = None          # None → 0 (kl, progressive) / 1 (seqkd)
    target: str = "mixer"                      # mohawk2: "mixer" | "block"
    beta: float = 0.1                          # dpo
    label_smoothing: float = 0.0               # dpo
    reference: str = "student"                 # dpo: "student" (frozen copy at stage start) | "teacher"
    fractions: list = field(default_factory=list)   # progressive: attention fractions, decreasing
    num_prompts: int = 64                      # seqkd pseudo-labels
    prompt_tokens: int = 32
    max_new_tokens: int = 64
    gen_temperature: float = 0.0               # 0 → greedy
    gen_batch_size: int = 8
    assistant_only_loss: Optional[bool] = None  # sft: True | False | None (auto: chat records → True)

    @property
    def weights(self) -> tuple[float, float]:
        """(kl_weight, ce_weight) with the per-kind defaults."""
        kl_d, ce_d = (0.1, 1.0) if self.kind == "seqkd" else (1.0, 0.0)
        return (kl_d if self.kl_weight is None else float(self.kl_weight),
                ce_d if self.ce_weight is None else float(self.ce_weight))

    def default_trainable(self) -> str:
        if self.kind in ("mohawk3", "sft", "dpo"):
            return "all"
        if self.kind == "mohawk2" and self.target == "block":
            return "blocks"
        return "mixers"

    @property
    def trainable_or_default(self) -> str:
        return self.trainable or self.default_trainable()

    def validate(self) -> "StageConfig":
        def need(cond, msg):
            if not cond:
                raise StageError(f"stage {self.name or self.kind!r}: {msg}")

        need(self.kind in STAGE_KINDS, f"unknown kind {self.kind!r}; choose one of {STAGE_KINDS}")
        need(self.trainable is None or self.trainable in TRAINABLE,
             f"trainable {self.trainable!r}; choose one of {TRAINABLE}")
        need(self.temperature > 0, f"temperature must be > 0 (got {self.temperature})")
        kl, ce = self.weights
        need(kl >= 0 and ce >= 0 and kl + ce > 0,
             f"kl_weight / ce_weight must be >= 0 and not both 0 (got {kl}, {ce})")
        need(self.target in ("mixer", "block"), f"target {self.target!r}; choose 'mixer' or 'block'")
        need(self.beta > 0, f"beta must be > 0 (got {self.beta})")
        need(0 <= self.label_smoothing < 0.5,
             f"label_smoothing must lie in [0, 0.5) (got {self.label_smoothing})")
        need(self.reference in ("student", "teacher"),
             f"reference {self.reference!r}; choose 'student' or 'teacher'")
        if self.kind == "progressive":
            fr = list(self.fractions)
            need(len(fr) >= 1, "progressive needs fractions = [...] (attention fractions, decreasing), "
                               "e.g. [0.75, 0.5, 0.25]")
            need(all(isinstance(f, (int, float)) and 0 <= f <= 1 for f in fr),
                 f"fractions {fr} must lie in [0, 1]")
            need(all(a > b for a, b in zip(fr, fr[1:])), f"fractions {fr} must be strictly decreasing "
                                                         "(each step converts more layers)")
        for k in ("num_prompts", "prompt_tokens", "max_new_tokens", "gen_batch_size"):
            need(getattr(self, k) >= 1, f"{k} must be >= 1 (got {getattr(self, k)})")
        need(self.gen_temperature >= 0, f"gen_temperature must be >= 0 (got {self.gen_temperature})")
        need(self.assistant_only_loss is None or isinstance(self.assistant_only_loss, bool),
             f"assistant_only_loss must be true or false (or left unset: assistant turns of chat records, all "
             f"tokens of plain text), got {self.assistant_only_loss!r}")
        self.train.validate()
        return self

    @classmethod
    def from_dict(cls, d: dict, defaults: Optional[dict] = None, where: str = "stage") -> "StageConfig":
        """From a recipe table: stage keys plus TrainConfig keys (over `defaults`, also TrainConfig keys).
        Unknown keys raise StageError naming them and the allowed ones."""
        d = dict(d)
        kind = d.pop("kind", None)
        if kind is None:
            raise StageError(f"{where}: missing kind = \"...\"; choose one of {STAGE_KINDS}")
        if kind not in STAGE_KINDS:
            raise StageError(f"{where}: unknown kind {kind!r}; choose one of {STAGE_KINDS}")
        allowed_stage = {"name", "trainable"} | STAGE_KEYS[kind]
        bad = sorted(set(d) - allowed_stage - TRAIN_KEYS)
        if bad:
            raise StageError(f"{where} (kind {kind!r}): unknown keys {bad}; a {kind} stage accepts "
                             f"{sorted(allowed_stage)} and the training keys {sorted(TRAIN_KEYS)}")
        train = dict(defaults or {})
        train.update({k: v for k, v in d.items() if k in TRAIN_KEYS})
        try:
            tcfg = TrainConfig.from_dict(train)
        except (ConfigError, TypeError) as e:
            raise StageError(f"{where} (kind {kind!r}): {e}") from None
        opts = {k: v for k, v in d.items() if k in allowed_stage}
        return cls(kind=kind, train=tcfg, **opts).validate()


# ---------------------------------------------------------------------------- parameters
def freeze(model: nn.Module) -> nn.Module:
    """eval() and requires_grad False: the teacher / reference of a stage."""
    model.eval()
    model.requires_grad_(False)
    return model


def converted_layer_indices(student) -> list[int]:
    return [i for i, k in enumerate(student.layer_pattern) if k != "attention"]


def trainable_parameters(student, which: str) -> list[nn.Parameter]:
    """mixers: the recurrent mixers (the new layers) only; blocks: those mixers plus their blocks' norms
    and MLPs; all: every parameter."""
    if which == "all":
        return list(student.parameters())
    layers = converted_layer_indices(student)
    if not layers:
        raise StageError(f"trainable={which!r} but the student has no converted (non-attention) layers; "
                         "convert it first or use trainable='all'")
    if which == "mixers":
        mods = [student.layers[i].mixer for i in layers]
    elif which == "blocks":
        mods = [student.layers[i] for i in layers]
    else:
        raise StageError(f"trainable {which!r}; choose one of {TRAINABLE}")
    return [p for m in mods for p in m.parameters()]


def check_pair(student, teacher, *, per_layer: bool = False) -> None:
    """The student can learn from this teacher: same vocabulary and width; for per-layer stages
    (MOHAWK 1/2) also the same depth, with attention at every converted layer of the teacher."""
    s, t = student.cfg, teacher.cfg
    if s.vocab_size != t.vocab_size:
        raise StageError(f"student vocabulary ({s.vocab_size}) differs from the teacher's ({t.vocab_size}): "
                         "a student must be converted from this teacher (same tokenizer)")
    if s.hidden_size != t.hidden_size:
        raise StageError(f"student hidden size ({s.hidden_size}) differs from the teacher's "
                         f"({t.hidden_size})")
    if per_layer:
        if s.num_layers != t.num_layers:
            raise StageError(f"student has {s.num_layers} layers, teacher {t.num_layers}: per-layer stages "
                             "need the student converted from this teacher")
        bad = [i for i in converted_layer_indices(student) if t.layer_pattern[i] != "attention"]
        if bad:
            raise StageError(f"teacher layers {bad} are not attention; MOHAWK stages 1-2 compare each "
                             "converted layer with the teacher's attention at the same index")


# ---------------------------------------------------------------------------- losses
def _ids(batch: dict):
    return batch["input_ids"], batch.get("labels"), batch.get("seq_idx")


def _final_hidden(model, ids: Tensor, seq_idx: Optional[Tensor]) -> Tensor:
    """Post-final-norm hidden states (B, L, D) — the LM head's input — without full logits."""
    out = model(ids, seq_idx=seq_idx, output_hidden_states=True, logits_to_keep=1)
    return model.norm(out.hidden_states[-1])


class LogitDistillLoss:
    """kl_weight · T² · KL(teacher_T ‖ student_T) + ce_weight · CE(labels), from final hidden states in
    chunks. KL is taken at the positions whose next token is a target (labels, as CE), so packed
    document boundaries and prompt tokens of pseudo-labels follow the labels."""

    def __init__(self, teacher, *, kl_weight: float = 1.0, ce_weight: float = 0.0, temperature: float = 1.0,
                 chunk_tokens: int = 1024):
        self.teacher = freeze(teacher) if teacher is not None else None
        if kl_weight > 0 and teacher is None:
            raise StageError("a KL loss needs a teacher")
        self.kl_weight, self.ce_weight = kl_weight, ce_weight
        self.temperature, self.chunk_tokens = temperature, chunk_tokens

    def __call__(self, model, batch: dict):
        ids, labels, seq_idx = _ids(batch)
        h = _final_hidden(model, ids, seq_idx)
        w = model.lm_head.weight
        cap = model.cfg.logit_softcap
        loss, metrics = h.new_zeros((), dtype=torch.float32), {}
        if self.kl_weight > 0:
            with torch.no_grad():
                th = _final_hidden(self.teacher, ids, seq_idx)
            kl = kl_from_hidden(h, w, th, self.teacher.lm_head.weight, kl_mask_from_labels(labels),
                                chunk_tokens=self.chunk_tokens, temperature=self.temperature, softcap=cap)
            loss = loss + self.kl_weight * self.temperature ** 2 * kl
            metrics["kl"] = float(kl.detach())
        if self.ce_weight > 0:
            ce = cross_entropy_from_hidden(h, w, labels, chunk_tokens=self.chunk_tokens, softcap=cap)
            loss = loss + self.ce_weight * ce
            metrics["ce"] = float(ce.detach())
        return loss, metrics


def _teacher_states(teacher, ids, seq_idx) -> tuple:
    with torch.no_grad():
        return teacher(ids, seq_idx=seq_idx, output_hidden_states=True, logits_to_keep=1).hidden_states


def _match_heads(A: Tensor, heads: int) -> Tensor:
    """Teacher attention (B, H, L, L) → (B, heads, L, L): per-channel students (Mamba-1, RG-LRU: one
    matrix per channel, channel c in head c // (heads / H)) compare each channel with its head."""
    H = A.shape[1]
    if heads == H:
        return A
    if heads % H:
        raise StageError(f"the student mixer has {heads} mixing matrices, not a multiple of the teacher's "
                         f"{H} heads")
    return A.repeat_interleave(heads // H, dim=1)


class MatrixOrientationLoss:
    """MOHAWK stage 1 (see the module docstring). Metrics: the loss of every layer (`layer<i>`)."""

    def __init__(self, teacher, layers: Sequence[int]):
        self.teacher, self.layers = freeze(teacher), list(layers)
        if not self.layers:
            raise StageError("mohawk1: the student has no converted layers")

    def __call__(self, model, batch: dict):
        ids, _, seq_idx = _ids(batch)
        hs = _teacher_states(self.teacher, ids, seq_idx)
        total, metrics = 0.0, {}
        for i in self.layers:
            with torch.no_grad():
                u = self.teacher.layers[i].mixer_norm(hs[i])
                A = self.teacher.layers[i].mixer.mixing_matrix(u, seq_idx=seq_idx)
            M = model.layers[i].mixer.mixing_matrix(u, seq_idx=seq_idx)
            loss = matrix_orientation_loss(M, _match_heads(A, M.shape[1]))
            metrics[f"layer{i}"] = float(loss.detach())
            total = total + loss
        return total / len(self.layers), metrics


class HiddenStateAlignmentLoss:
    """MOHAWK stage 2: mixer outputs (target="mixer") or block outputs (target="block") of the student on
    the teacher's hidden states, against the teacher's. Metrics per layer."""

    def __init__(self, teacher, layers: Sequence[int], target: str = "mixer"):
        self.teacher, self.layers, self.target = freeze(teacher), list(layers), target
        if not self.layers:
            raise StageError("mohawk2: the student has no converted layers")

    def __call__(self, model, batch: dict):
        ids, _, seq_idx = _ids(batch)
        hs = _teacher_states(self.teacher, ids, seq_idx)
        total, metrics = 0.0, {}
        for i in self.layers:
            tb, sb = self.teacher.layers[i], model.layers[i]
            if self.target == "mixer":
                with torch.no_grad():
                    u = tb.mixer_norm(hs[i])
                    y_t, _ = tb.mixer(u, seq_idx=seq_idx)
                y_s, _ = sb.mixer(sb.mixer_norm(hs[i]), seq_idx=seq_idx)
            else:
                y_t = hs[i + 1]
                y_s, _ = sb(hs[i], seq_idx=seq_idx)
            loss = hidden_state_alignment_loss(y_s, y_t)
            metrics[f"layer{i}"] = float(loss.detach())
            total = total + loss
        return total / len(self.layers), metrics


class DPOLoss:
    """DPO on `collate_preference_batch` batches against a frozen reference model."""

    def __init__(self, reference, *, beta: float = 0.1, label_smoothing: float = 0.0):
        self.reference, self.beta, self.label_smoothing = freeze(reference), beta, label_smoothing

    @staticmethod
    def _logps(model, batch: dict, key: str) -> Tensor:
        ids = batch[f"{key}_input_ids"]
        logits = model(ids, attention_mask=batch[f"{key}_attention_mask"]).logits
        return sequence_logprobs(logits, ids, batch[f"{key}_mask"])

    def __call__(self, model, batch: dict):
        pc, pr = self._logps(model, batch, "chosen"), self._logps(model, batch, "rejected")
        with torch.no_grad():
            rc = self._logps(self.reference, batch, "chosen")
            rr = self._logps(self.reference, batch, "rejected")
        loss = dpo_loss(pc, pr, rc, rr, self.beta, label_smoothing=self.label_smoothing)
        return loss, dpo_metrics(pc, pr, rc, rr, self.beta)


def stage_loss(stage: StageConfig, student, teacher=None) -> Callable:
    """The loss_fn of a stage (for kinds that train on a loss; progressive uses the kl loss)."""
    kind = stage.kind
    kl_w, ce_w = stage.weights
    if kind in ("mohawk1", "mohawk2", "mohawk3", "kl", "progressive") or (kind == "seqkd" and kl_w > 0):
        if teacher is None:
            raise StageError(f"stage {kind!r} needs a teacher")
        check_pair(student, teacher, per_layer=kind in ("mohawk1", "mohawk2"))
    if kind == "mohawk1":
        return MatrixOrientationLoss(teacher, converted_layer_indices(student))
    if kind == "mohawk2":
        return HiddenStateAlignmentLoss(teacher, converted_layer_indices(student), stage.target)
    if kind == "mohawk3":
        return LogitDistillLoss(teacher, kl_weight=1.0, ce_weight=0.0, temperature=stage.temperature)
    if kind in ("kl", "progressive", "seqkd"):
        return LogitDistillLoss(teacher if kl_w > 0 else None, kl_weight=kl_w, ce_weight=ce_w,
                                temperature=stage.temperature)
    if kind == "sft":
        return lm_loss_fn
    if kind == "dpo":
        ref = teacher if stage.reference == "teacher" else copy.deepcopy(student)
        if ref is None:
            raise StageError("dpo with reference='teacher' needs a teacher")
        return DPOLoss(ref, beta=stage.beta, label_smoothing=stage.label_smoothing)
    raise StageError(f"stage kind {kind!r} has no single loss")


# ---------------------------------------------------------------------------- evaluation
def make_distill_eval_fn(batches: Sequence[dict], teacher=None) -> Callable:
    """eval_fn for the Trainer: the student's held-out CE loss and perplexity, plus KL(teacher ‖ student)
    when a teacher is given (same positions as the CE)."""
    batches = list(batches)
    if not batches:
        raise StageError("evaluation needs at least one batch")

    def eval_fn(model) -> dict:
        return evaluate_lm(model, batches, teacher)
    return eval_fn


@torch.no_grad()
def evaluate_lm(model, batches: Sequence[dict], teacher=None) -> dict:
    """{"loss", "ppl"[, "kl"]}: token-weighted mean CE over the batches (and KL to the teacher)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    ce_sum, kl_sum, n = 0.0, 0.0, 0
    try:
        for b in batches:
            ids, labels = b["input_ids"].to(dev), b["labels"].to(dev)
            seq_idx = b.get("seq_idx")
            seq_idx = seq_idx.to(dev) if seq_idx is not None else None
            out = model(ids, labels=labels, seq_idx=seq_idx)
            k = int((labels[:, 1:] != IGNORE_INDEX).sum())
            ce_sum += float(out.loss) * k
            if teacher is not None:
                t = teacher(ids, seq_idx=seq_idx).logits
                kl_sum += float(chunked_kl_div(out.logits, t, kl_mask_from_labels(labels))) * k
            n += k
    finally:
        model.train(was)
    res = {"loss": ce_sum / max(n, 1), "ppl": math.exp(min(ce_sum / max(n, 1), 50.0))}
    if teacher is not None:
        res["kl"] = kl_sum / max(n, 1)
    return res


# ---------------------------------------------------------------------------- running a stage
def model_fingerprint(model) -> dict:
    """What must match to resume a checkpoint into `model`."""
    cfg = model.cfg.to_dict()
    return {"layer_pattern": list(model.layer_pattern), "vocab_size": cfg["vocab_size"],
            "hidden_size": cfg["hidden_size"],
            "config_sha1": hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()}


def check_resumable(out_dir, model) -> None:
    """Refuse to resume a stage directory written for another model (clear error naming both)."""
    path = Path(out_dir) / "model.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    mine = model_fingerprint(model)
    if saved.get("config_sha1") != mine["config_sha1"]:
        diff = [k for k in ("layer_pattern", "vocab_size", "hidden_size") if saved.get(k) != mine[k]]
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)} vs now {mine[k]}" for k in diff) \
            or "configs differ"
        raise StageError(f"{out_dir} holds checkpoints of a different model ({detail}). Use another output "
                         "directory, or --overwrite to start this stage again")


def stage_done(out_dir) -> bool:
    """True when the stage in out_dir finished (summary says max_steps and final/ exists)."""
    p = Path(out_dir)
    try:
        s = json.loads((p / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return s.get("stopped") == "max_steps" and (p / "final" / "config.json").exists()


def run_stage(stage: StageConfig, student, teacher, train_data: Iterable, *,
              eval_fn: Optional[Callable] = None, resume: bool = False, overwrite: bool = False) -> dict:
    """Train `student` in place for one (non-progressive) stage → the Trainer's summary dict.

    stage.train.out_dir (if set) receives metrics, curves, checkpoints and final/. `resume` continues from
    its latest checkpoint (refused when it belongs to another model)."""
    if stage.kind == "progressive":
        raise StageError("run_stage: use run_progressive for a progressive stage")
    loss_fn = stage_loss(stage, student, teacher)
    params = trainable_parameters(student, stage.trainable_or_default)
    out_dir = stage.train.out_dir
    if out_dir is not None:
        if resume and not overwrite:
            check_resumable(out_dir, student)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "model.json").write_text(json.dumps(model_fingerprint(student), indent=1) + "\n")
    trainer = Trainer(student, train_data, loss_fn, stage.train, eval_fn=eval_fn, trainable_params=params)
    summary = trainer.train(resume=resume, overwrite=overwrite)
    summary["stage"] = stage.name or stage.kind
    summary["kind"] = stage.kind
    summary["trainable"] = stage.trainable_or_default
    return summary


def run_progressive(stage: StageConfig, student, teacher, data_factory: Callable[[], Iterable], *, mixer: str,
                    out_dir, eval_fn: Optional[Callable] = None, init: str = "attention", seed: int = 0,
                    resume: bool = False, overwrite: bool = False, conv_init: Optional[str] = None):
    """Progressive replacement: for each attention fraction in stage.fractions, convert more of the
    current student's attention layers (from their current weights) and distil with the kl loss; each
    step starts from the previous step's final model. Steps already finished in `out_dir` are loaded
    instead of rerun, an interrupted step resumes from its latest checkpoint (when `resume`).

    data_factory: () → a fresh iterable of training batches for one step.
    Returns (final student, [per-step summaries])."""
    from hybridize.api import load
    from hybridize.convert import convert

    out_dir = Path(out_dir)
    summaries = []
    for f in stage.fractions:
        step_dir = out_dir / f"attn-{f:g}"
        if resume and not overwrite and stage_done(step_dir):
            nxt = load(step_dir / "final")
            if nxt.cfg.vocab_size != student.cfg.vocab_size:
                raise StageError(f"{step_dir} holds a model of another vocabulary; use another output "
                                 "directory")
            student = nxt.to(next(student.parameters()).device)
            summaries.append(json.loads((step_dir / "summary.json").read_text()))
            continue
        student = convert(student, mixer=mixer, attention_fraction=f, init=init, seed=seed,
                          conv_init=conv_init)
        step = dataclasses.replace(stage, kind="kl", name=f"{stage.name or 'progressive'}@{f:g}",
                                   train=dataclasses.replace(stage.train, out_dir=str(step_dir)))
        summaries.append(run_stage(step, student, teacher, data_factory(), eval_fn=eval_fn, resume=resume,
                                   overwrite=overwrite))
    return student, summaries


# ---------------------------------------------------------------------------- generation
def _eos_ids(model, eos_token_id) -> list[int]:
    e = model.cfg.eos_token_id if eos_token_id is None else eos_token_id
    if e is None:
        return []
    return [int(x) for x in (e if isinstance(e, (list, tuple)) else [e])]


def _pick(logits: Tensor, temperature: float, top_k: int, generator: Optional[torch.Generator]) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)                  # a CPU generator drives sampling on any device
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int = 0, eos_token_id=None, pad_id: int = 0,
                 generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """Batched generation with the model's decode caches → new token ids per prompt (EOS included, if
    produced). Prompts of different lengths are left-padded and the padding is a separate document
    (`seq_idx`), so it never enters a prompt's state; then one `model.step` per token.
    temperature 0 → greedy; else sampling (optionally top-k) with `generator`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise StageError("generate_ids: every prompt needs at least one token")
    was = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        B, Lmax = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, Lmax), pad_id, dtype=torch.long)
        seq_idx = torch.zeros((B, Lmax), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, Lmax - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            seq_idx[b, Lmax - len(p):] = 1 if len(p) < Lmax else 0
        ids, seq_idx = ids.to(dev), seq_idx.to(dev)
        cache = model.init_cache(B, max_seqlen=Lmax + max_new_tokens)
        logits = model(ids, seq_idx=seq_idx, cache=cache, logits_to_keep=1).logits[:, -1]
        eos = torch.tensor(_eos_ids(model, eos_token_id), device=dev, dtype=torch.long)
        out = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for _ in range(max_new_tokens):
            tok = _pick(logits, temperature, top_k, generator).to(dev)
            for b in (~done).nonzero().flatten().tolist():
                out[b].append(int(tok[b]))
            if eos.numel():
                done |= torch.isin(tok, eos)
            if bool(done.all()):
                break
            logits = model.step(torch.where(done, torch.full_like(tok, pad_id), tok), cache)
        return out
    finally:
        model.train(was)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 48, *, temperature: float = 0.0,
                  seed: int = 0) -> str:
    """Convenience: the continuation of one text prompt (decoded, without special tokens)."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    new = generate_ids(model, [ids], max_new_tokens, temperature=temperature, generator=g,
                       eos_token_id=getattr(tokenizer, "eos_token_id", None))[0]
    return tokenizer.decode(new, skip_special_tokens=True)


# ---------------------------------------------------------------------------- pseudo-labels (seq-KD)
def prompts_from_corpus(corpus, tokenizer, num_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """The first `prompt_tokens` tokens of the first `num_prompts` documents long enough to continue."""
    from hybridize.data import encode_document

    out = []
    for doc in corpus:
        ids = encode_document(doc, tokenizer, add_eos=False)
        if len(ids) > prompt_tokens:
            out.append(ids[:prompt_tokens])
            if len(out) == num_prompts:
                break
    if not out:
        raise StageError(f"corpus {getattr(corpus, 'name', '?')} has no document longer than "
                         f"prompt_tokens={prompt_tokens} to take prompts from")
    return out


def prompts_from_file(path, tokenizer, num_prompts: Optional[int] = None) -> list[list[int]]:
    """Prompts from a JSONL file ({"prompt": str | messages} or {"text"} or {"messages"}) or a text file
    (one prompt per line). Chat prompts get the generation prompt of the chat template."""
    from hybridize.data.preference import _prompt_ids

    p = Path(path)
    if not p.exists():
        raise StageError(f"prompt file {str(p)!r} does not exist")
    out = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if p.suffix == ".jsonl":
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise StageError(f"{p}:{lineno}: malformed JSON ({e.msg})") from None
                prompt = None
                if isinstance(rec, dict):
                    prompt = rec.get("prompt", rec.get("messages", rec.get("text")))
                if prompt is None:
                    raise StageError(f"{p}:{lineno}: expected a 'prompt', 'messages' or 'text' field")
            else:
                prompt = line.rstrip("\n")
            out.append(_prompt_ids(prompt, tokenizer))
            if num_prompts is not None and len(out) == num_prompts:
                break
    if not out:
        raise StageError(f"prompt file {p} holds no prompts")
    return out


def _pseudo_label_meta(teacher, prompts, max_new_tokens: int, temperature: float, seed: int) -> dict:
    h = hashlib.sha1(json.dumps([list(map(int, p)) for p in prompts]).encode()).hexdigest()
    return {"teacher": model_fingerprint(teacher)["config_sha1"], "prompts_sha1": h,
            "num_prompts": len(prompts), "max_new_tokens": max_new_tokens, "temperature": temperature,
            "seed": seed}


def _complete_lines(path: Path) -> int:
    """Number of complete JSON lines; a torn last line (crash mid-write) is cut off."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return data[:end].count(b"\n")


def generate_pseudo_labels(teacher, prompts: Sequence[Sequence[int]], out_path, *, tokenizer=None,
                           max_new_tokens: int = 64, batch_size: int = 8, temperature: float = 0.0,
                           seed: int = 0, progress: bool = True) -> Path:
    """Teacher completions for `prompts` → JSONL, one record per prompt:
    {"prompt_ids", "completion_ids"[, "prompt", "completion"]}.

    Resumable: records already in out_path are kept and generation continues after them (a settings file
    `<out_path>.meta.json` guards against continuing with another teacher, prompts or settings). Each
    batch is seeded by (seed, index of its first prompt)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = out_path.with_name(out_path.name + ".meta.json")
    meta = _pseudo_label_meta(freeze(teacher), prompts, max_new_tokens, temperature, seed)
    if meta_path.exists() and out_path.exists():
        old = json.loads(meta_path.read_text())
        if old != meta:
            diff = sorted(k for k in meta if old.get(k) != meta[k])
            raise StageError(f"{out_path} was generated with other settings ({', '.join(diff)} differ); "
                             "delete it (and its .meta.json) to regenerate")
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    done = _complete_lines(out_path)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pbar = None
    if progress:
        from tqdm.auto import tqdm
        pbar = tqdm(total=len(prompts), initial=done, unit="prompt", desc="pseudo-labels", dynamic_ncols=True)
    try:
        with open(out_path, "a", encoding="utf-8") as f:
            for lo in range(done, len(prompts), batch_size):
                batch = [list(map(int, p)) for p in prompts[lo: lo + batch_size]]
                g = torch.Generator().manual_seed(seed * 1_000_003 + lo)
                new = generate_ids(teacher, batch, max_new_tokens, temperature=temperature, generator=g,
                                   pad_id=pad if pad is not None else 0)
                lines = []
                for p, c in zip(batch, new):
                    rec = {"prompt_ids": p, "completion_ids": c}
                    if tokenizer is not None:
                        rec["prompt"] = tokenizer.decode(p, skip_special_tokens=True)
                        rec["completion"] = tokenizer.decode(c, skip_special_tokens=True)
                    lines.append(json.dumps(rec) + "\n")
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
                if pbar is not None:
                    pbar.update(len(batch))
    finally:
        if pbar is not None:
            pbar.close()
    return out_path


class PseudoLabelStream:
    """Training batches from a pseudo-label JSONL: one sequence (prompt + completion) per row, right-padded
    to seq_len (padding is its own document), labels −100 on the prompt and the padding, so the CE is the
    teacher's completion only. Shuffled per epoch by (seed, epoch); resumable (state_dict)."""

    def __init__(self, path, *, seq_len: int, batch_size: int, seed: int = 0, pad_id: int = 0,
                 shuffle: bool = True, epochs: Optional[int] = None):
        self.records = []
        p = Path(path)
        if not p.exists():
            raise StageError(f"pseudo-label file {str(p)!r} does not exist")
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                    self.records.append((list(rec["prompt_ids"]), list(rec["completion_ids"])))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise StageError(f"{p}:{lineno}: not a pseudo-label record (prompt_ids, "
                                     "completion_ids)") from None
        self.records = [r for r in self.records if r[1]]
        if not self.records:
            raise StageError(f"{p} holds no pseudo-labels with a non-empty completion")
        self.seq_len, self.batch_size, self.seed, self.pad_id = seq_len, batch_size, seed, pad_id
        self.shuffle, self.epochs = shuffle, epochs
        self.epoch, self.index = 0, 0

    def _order(self) -> list:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def state_dict(self) -> dict:
        return {"num_records": len(self.records), "seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_records") != len(self.records) or state.get("seed") != self.seed:
            raise StageError("cannot resume the pseudo-label stream: the file or seed changed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = []
        while len(rows) < self.batch_size:
            if self.epochs is not None and self.epoch >= self.epochs:
                break
            order = self._order()
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                continue
            rows.append(self.records[order[self.index]])
            self.index += 1
        if not rows:
            raise StopIteration
        L = self.seq_len
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
        seq_idx = torch.zeros((len(rows), L), dtype=torch.long)
        for b, (p, c) in enumerate(rows):
            seq = (p + c)[:L]
            n, start = len(seq), min(len(p), L)
            ids[b, :n] = torch.tensor(seq)
            labels[b, start:n] = ids[b, start:n]
            seq_idx[b, n:] = 1
        return {"input_ids": ids, "labels": labels, "seq_idx": seq_idx}


__all__ = [
    "STAGE_KINDS", "StageConfig", "StageError", "LogitDistillLoss", "MatrixOrientationLoss",
    "HiddenStateAlignmentLoss", "DPOLoss", "stage_loss", "trainable_parameters", "freeze", "check_pair",
    "run_stage", "run_progressive", "make_distill_eval_fn", "evaluate_lm", "generate_ids", "generate_text",
    "generate_pseudo_labels", "prompts_from_corpus", "prompts_from_file", "PseudoLabelStream", "stage_done",
]
