"""A generic trainer for `hybridize pretrain` and every distillation stage.

A stage supplies the model, an iterable of micro-batches and ``loss_fn(model, batch) → (loss, metrics)``
(a teacher, when there is one, lives inside loss_fn: frozen, requires_grad False, run under no_grad).
The trainer does the rest: AdamW (no weight decay on 1-D parameters: norms, biases, SSM scalars), LR
schedules (warm-up then cosine / WSD / constant), gradient accumulation and clipping, autocast (bf16 on
CUDA, fp32 on CPU), periodic evaluation, a JSONL metrics log with a PNG plot, a progress bar, a clear
stop on NaN/inf, and atomic checkpoints that resume *exactly* (bitwise the same losses as a run that
never stopped).

Output directory layout::

    out_dir/metrics.jsonl            one JSON object per logged step / evaluation
    out_dir/curves.png               loss, eval loss, LR and gradient norm
    out_dir/summary.json             the dict `Trainer.train` returns
    out_dir/final/                   model.save_pretrained(...) at the end (when the model has it)
    out_dir/checkpoints/latest       text file: name of the newest complete checkpoint
    out_dir/checkpoints/step-00000100/
        model.safetensors            all model weights
        optimizer.pt                 optimizer state (tensors only; loaded with weights_only=True)
        rng.pt                       torch CPU / CUDA RNG states (tensors only)
        trainer_state.json           step, tokens, config, python / numpy RNG, data-iterator position

A checkpoint is written to a temporary directory, renamed into place with os.replace, and only then
named in ``latest`` (itself replaced atomically), so a crash at any moment leaves the previous
checkpoint intact and ``latest`` always names a complete one. Nothing in a checkpoint is executable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from hybridize.config import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", "bf16", "fp32")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or gradient, unusable output directory, ...)."""


# ---------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Everything a training run needs besides model, data and loss.

    Steps are optimizer updates; one step consumes `grad_accum` micro-batches of
    `batch_size` × `seq_len` tokens. Give `max_steps` or `max_tokens` (→ steps, rounded up).
    """
    lr: float = 3e-4
    min_lr: float = 3e-5                  # floor of cosine / end of the WSD decay
    warmup_steps: int = 100               # linear warm-up from 0
    schedule: str = "cosine"              # "cosine" | "wsd" (warmup-stable-decay) | "constant"
    decay_fraction: float = 0.2           # WSD: last fraction of the steps decays linearly to min_lr
    weight_decay: float = 0.1             # on ≥2-D parameters only
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0  # None or 0 → no clipping (the norm is still logged)
    max_steps: Optional[int] = None
    max_tokens: Optional[int] = None
    batch_size: int = 8                   # micro-batch rows (used by data builders and token accounting)
    seq_len: int = 512
    eval_every: int = 0                   # steps; 0 → only at the end (when an eval_fn is given)
    eval_batches: int = 8                 # for eval-set builders (see make_eval_fn)
    save_every: int = 0                   # steps; 0 → only at the end / when stopped early
    log_every: int = 10                   # steps between metrics lines (loss averaged over the window)
    seed: int = 0
    dtype: str = "auto"                   # "auto": bf16 autocast on CUDA, fp32 on CPU; "bf16"; "fp32"
    activation_checkpointing: bool = False
    out_dir: Optional[str] = None         # None → no checkpoints, logs or plots on disk
    keep_checkpoints: int = 1             # newest checkpoints kept on disk
    time_limit_s: Optional[float] = None  # stop (after saving a checkpoint) once exceeded
    progress: bool = True                 # tqdm progress bar
    plot: bool = True                     # curves.png (skipped with a warning without matplotlib)

    def validate(self) -> "TrainConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"TrainConfig: {msg}")

        need(self.lr > 0, f"lr must be > 0 (got {self.lr})")
        need(0 <= self.min_lr <= self.lr, f"min_lr must lie in [0, lr={self.lr}] (got {self.min_lr})")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES} (got {self.schedule!r})")
        need(0 < self.decay_fraction <= 1, f"decay_fraction must lie in (0, 1] (got {self.decay_fraction})")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay})")
        need(len(tuple(self.betas)) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1) (got {self.betas})")
        need(self.eps > 0, f"eps must be > 0 (got {self.eps})")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1 (got {self.grad_accum})")
        need(self.max_grad_norm is None or self.max_grad_norm >= 0,
             f"max_grad_norm must be None or >= 0 (got {self.max_grad_norm})")
        need(self.max_steps is not None or self.max_tokens is not None,
             "give max_steps or max_tokens (how long to train)")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 (got {self.max_steps})")
        need(self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens must be >= 1 (got {self.max_tokens})")
        need(self.batch_size >= 1 and self.seq_len >= 2,
             f"batch_size must be >= 1 and seq_len >= 2 (got {self.batch_size}, {self.seq_len})")
        for k in ("eval_every", "save_every"):
            need(getattr(self, k) >= 0, f"{k} must be >= 0 (got {getattr(self, k)})")
        need(self.log_every >= 1, f"log_every must be >= 1 (got {self.log_every})")
        need(self.eval_batches >= 1, f"eval_batches must be >= 1 (got {self.eval_batches})")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1 (got {self.keep_checkpoints})")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES} (got {self.dtype!r}); fp16 is not supported "
                                   "(it needs loss scaling) — use bf16")
        need(self.time_limit_s is None or self.time_limit_s > 0, "time_limit_s must be None or > 0")
        total = self.total_steps()
        need(self.warmup_steps == 0 or self.warmup_steps < total,
             f"warmup_steps ({self.warmup_steps}) must be smaller than the number of steps ({total})")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def total_steps(self) -> int:
        if self.max_steps is not None:
            return int(self.max_steps)
        return max(1, math.ceil(self.max_tokens / self.tokens_per_step))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d).validate()


def lr_at(step: int, cfg: TrainConfig, total_steps: Optional[int] = None) -> float:
    """Learning rate of update `step` (0-based): linear warm-up over `warmup_steps` (reaching `lr` at the
    last warm-up step), then
      cosine:   from lr down to min_lr at the last step;
      wsd:      constant lr, then a linear decay to min_lr over the last `decay_fraction` of the steps;
      constant: lr.
    """
    total = total_steps or cfg.total_steps()
    w = cfg.warmup_steps
    if step < w:
        return cfg.lr * (step + 1) / w
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        p = min(1.0, (step - w) / max(1, total - w - 1))
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * p))
    decay = max(1, round(cfg.decay_fraction * total))
    start = max(w, total - decay)
    if step < start:
        return cfg.lr
    p = min(1.0, (step - start + 1) / max(1, total - start))
    return cfg.lr + (cfg.min_lr - cfg.lr) * p


# ---------------------------------------------------------------------------- helpers
def lm_loss_fn(model: nn.Module, batch: dict):
    """Default loss_fn: next-token cross-entropy of a causal LM on a packed batch."""
    out = model(batch["input_ids"], labels=batch["labels"], seq_idx=batch.get("seq_idx"))
    return out.loss, {}


def make_eval_fn(batches: list, loss_fn: Callable = lm_loss_fn) -> Callable:
    """eval_fn averaging `loss_fn` over fixed batches → {"loss", "ppl"} (the trainer prefixes "eval_")."""
    batches = list(batches)

    @torch.no_grad()
    def eval_fn(model: nn.Module) -> dict:
        dev = next(model.parameters()).device
        losses = [float(loss_fn(model, to_device(b, dev))[0]) for b in batches]
        mean = sum(losses) / len(losses)
        return {"loss": mean, "ppl": math.exp(min(mean, 50.0))}
    return eval_fn


def to_device(batch, device):
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def count_tokens(batch) -> int:
    """Tokens in a micro-batch: numel of ``input_ids`` (or of every ``*input_ids`` tensor, e.g. DPO pairs)."""
    if isinstance(batch, dict):
        if "input_ids" in batch:
            return int(batch["input_ids"].numel())
        return sum(int(v.numel()) for k, v in batch.items()
                   if k.endswith("input_ids") and isinstance(v, Tensor))
    if isinstance(batch, Tensor):
        return int(batch.numel())
    return 0


def build_optimizer(named_params: list, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on ≥2-D parameters (matrices, embeddings) and none on 1-D ones
    (norm scales, biases, A_log, D, dt_bias): decaying those only fights their purpose."""
    decay = [p for _, p in named_params if p.ndim >= 2]
    no_decay = [p for _, p in named_params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def _python_rng_state() -> list:
    v, state, gauss = random.getstate()
    return [v, list(state), gauss]


def _numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def latest_checkpoint(out_dir) -> Optional[Path]:
    """The newest complete checkpoint under out_dir/checkpoints, or None."""
    root = Path(out_dir) / "checkpoints"
    ptr = root / "latest"
    if not ptr.exists():
        return None
    path = root / ptr.read_text().strip()
    if not (path / "trainer_state.json").exists():
        raise TrainingError(f"{ptr} names {path.name}, which is missing or incomplete")
    return path


# ---------------------------------------------------------------------------- trainer
@dataclass
class _Window:
    """Running sums between two log lines."""
    steps: int = 0
    loss: float = 0.0
    metrics: dict = field(default_factory=dict)

    def add(self, loss: float, metrics: dict) -> None:
        self.steps += 1
        self.loss += loss
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v

    def means(self) -> dict:
        out = {"loss": self.loss / self.steps}
        out.update({k: v / self.steps for k, v in self.metrics.items()})
        return out


class Trainer:
    """Trainer(model, train_data, loss_fn, config, eval_fn=None, trainable_params=None).

    model:            an nn.Module on its device (the trainer does not move it).
    train_data:       an iterable of micro-batches (dicts of tensors). If it has `state_dict()` /
                      `load_state_dict()` (e.g. `PackedStream`) its position is checkpointed; otherwise
                      resuming skips the micro-batches already consumed (exact for deterministic data).
    loss_fn:          (model, batch) → (scalar loss, {name: float}); default `lm_loss_fn`.
    eval_fn:          (model) → {name: float}, called under no_grad in eval mode; logged as eval_<name>.
    trainable_params: the parameters to optimise (default: every parameter with requires_grad); the
                      model's other parameters get requires_grad=False.
    """

    def __init__(self, model: nn.Module, train_data: Iterable, loss_fn: Optional[Callable] = None,
                 config: Optional[TrainConfig] = None, eval_fn: Optional[Callable] = None,
                 trainable_params: Optional[Iterable[nn.Parameter]] = None):
        self.cfg = (config or TrainConfig(max_steps=100)).validate()
        # a model fused for inference (`HybridLM.fuse_projections_`) trains through its separate Linears
        # anyway, and safetensors' save_model refuses Parameters that are views of one bigger tensor:
        # give them their own storage again (same Parameter objects, same values)
        if hasattr(model, "unfuse_projections_"):
            model.unfuse_projections_()
        self.model = model
        self.train_data = train_data
        self.loss_fn = loss_fn or lm_loss_fn
        self.eval_fn = eval_fn
        self._stop_reason: Optional[str] = None
        self.total_steps = self.cfg.total_steps()
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        if trainable_params is not None:
            chosen = {id(p) for p in trainable_params}
            unknown = chosen - set(self.param_names)
            if unknown:
                raise ConfigError(f"{len(unknown)} trainable_params are not parameters of the model")
            for p in model.parameters():
                p.requires_grad_(id(p) in chosen)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise ConfigError("no trainable parameters (all have requires_grad=False)")
        self.params = [p for _, p in self.named_params]
        self.optimizer = build_optimizer(self.named_params, self.cfg)
        self.device = self.params[0].device
        self.amp_dtype = self._amp_dtype()
        if self.cfg.activation_checkpointing:
            if not hasattr(model, "gradient_checkpointing"):
                raise ConfigError(f"activation_checkpointing: {type(model).__name__} has no "
                                  "`gradient_checkpointing` attribute")
            model.gradient_checkpointing = True
        self.out_dir = Path(self.cfg.out_dir) if self.cfg.out_dir else None
        self.step = 0                 # optimizer updates done
        self.tokens = 0               # tokens consumed (all positions of input_ids)
        self.micro_batches = 0        # micro-batches consumed (for data without state_dict)
        self.elapsed_before = 0.0     # seconds spent in earlier (resumed) runs
        self.last_checkpoint: Optional[Path] = None
        self.last_eval: dict = {}
        self.last_log: dict = {}

    # ------------------------------------------------------------------ setup
    def _amp_dtype(self) -> Optional[torch.dtype]:
        if self.cfg.dtype == "fp32":
            return None
        if self.cfg.dtype == "bf16":
            return torch.bfloat16
        return torch.bfloat16 if self.device.type == "cuda" else None

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _seed_everything(self) -> None:
        seed = self.cfg.seed
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step atomically; returns its directory."""
        if self.out_dir is None:
            raise TrainingError("save_checkpoint needs TrainConfig.out_dir")
        from safetensors.torch import save_model

        root = self.out_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.step:08d}"
        final = root / name
        if final.exists() and (root / "latest").exists() and (root / "latest").read_text().strip() == name:
            return final                                  # this exact state is already on disk
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            save_model(self.model, str(tmp / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            state = {
                "step": self.step, "tokens": self.tokens, "micro_batches": self.micro_batches,
                "elapsed_s": self.elapsed_before + self._run_elapsed(),
                "total_steps": self.total_steps, "config": self.cfg.to_dict(),
                "python_rng": _python_rng_state(), "numpy_rng": _numpy_rng_state(),
                "data_state": self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else None,
                "last_eval": self.last_eval,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            for f in tmp.iterdir():
                _fsync_file(f)
            if final.exists():
                shutil.rmtree(final)                      # a stale, unreferenced copy of this step
            os.replace(tmp, final)
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _atomic_write_text(root / "latest", name + "\n")
        self.last_checkpoint = final
        self._prune_checkpoints(root, keep=final)
        return final

    def _prune_checkpoints(self, root: Path, keep: Path) -> None:
        for debris in root.glob(".tmp-*"):               # left by a crash during an earlier save
            shutil.rmtree(debris, ignore_errors=True)
        ckpts = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in ckpts[: max(0, len(ckpts) - self.cfg.keep_checkpoints)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path) -> None:
        """Restore model, optimizer, RNGs, counters and the data position from a checkpoint directory."""
        from safetensors.torch import load_model

        path = Path(path)
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrainingError(f"cannot read checkpoint {path}: {e}") from None
        saved_cfg = state.get("config", {})
        changed = [k for k, v in self.cfg.to_dict().items()
                   if k not in ("out_dir", "progress", "plot", "time_limit_s") and saved_cfg.get(k, v) != v]
        if changed:
            warnings.warn(f"resuming {path} with changed settings {changed}: the run will not match an "
                          "uninterrupted one", stacklevel=2)
        missing, unexpected = load_model(self.model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise TrainingError(f"checkpoint {path} does not fit the model: missing {sorted(missing)[:5]}, "
                                f"unexpected {sorted(unexpected)[:5]}")
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device,
                                                  weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        v, st, gauss = state["python_rng"]
        random.setstate((v, tuple(st), gauss))
        name, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.micro_batches = int(state["micro_batches"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.last_eval = state.get("last_eval") or {}
        self._skip_micro_batches = 0
        if state.get("data_state") is not None and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(state["data_state"])
        else:
            self._skip_micro_batches = self.micro_batches
        self.last_checkpoint = path

    # ------------------------------------------------------------------ logging
    def _run_elapsed(self) -> float:
        return time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0

    def _open_log(self, resumed: bool):
        if self.out_dir is None:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.jsonl"
        if resumed and path.exists():
            # drop lines written after the checkpoint by the interrupted run
            keep = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            _atomic_write_text(path, "".join(ln + "\n" for ln in keep))
            return open(path, "a")
        return open(path, "w")

    def _write(self, row: dict) -> None:
        if self._log is not None:
            self._log.write(json.dumps(row) + "\n")
            self._log.flush()

    # ------------------------------------------------------------------ steps
    def _next_batch(self):
        batch = next(self._it)
        self.micro_batches += 1
        return batch

    def _check_loss(self, loss: Tensor, micro: int) -> None:
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TrainingError(f"loss_fn must return a scalar tensor as its first value, got {loss!r}")
        if not torch.isfinite(loss.detach()):
            raise TrainingError(
                f"non-finite loss ({float(loss.detach())}) at step {self.step + 1} (micro-batch {micro + 1}/"
                f"{self.cfg.grad_accum}); stopped before the update. {self._last_ckpt_note()} "
                "Try a lower lr, more warm-up or bf16 instead of fp16.")

    def _check_grads(self, grad_norm: Tensor) -> None:
        if torch.isfinite(grad_norm):
            return
        bad = next((n for n, p in self.named_params if p.grad is not None and not torch.isfinite(p.grad).all()),
                   "<unknown>")
        raise TrainingError(
            f"non-finite gradient (norm {float(grad_norm)}) at step {self.step + 1}, first in parameter "
            f"{bad!r}; stopped before the update. {self._last_ckpt_note()}")

    def _last_ckpt_note(self) -> str:
        if self.last_checkpoint is None:
            return "No checkpoint was written."
        return f"Nothing was saved after the problem; the last good checkpoint is {self.last_checkpoint}."

    def train_step(self) -> tuple[float, float, dict, int]:
        """One optimizer update over grad_accum micro-batches → (mean loss, grad norm, metrics, tokens)."""
        lr = lr_at(self.step, self.cfg, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        accum = self.cfg.grad_accum
        total_loss, metrics, ntok = 0.0, {}, 0
        for i in range(accum):
            batch = to_device(self._next_batch(), self.device)
            ntok += count_tokens(batch)
            with self._autocast():
                loss, m = self.loss_fn(self.model, batch)
            self._check_loss(loss, i)
            (loss / accum).backward()
            total_loss += float(loss.detach()) / accum
            for k, v in (m or {}).items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / accum
        max_norm = self.cfg.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self._check_grads(grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += ntok
        return total_loss, float(grad_norm), metrics, ntok

    @torch.no_grad()
    def request_stop(self, reason: str = "requested") -> None:
        """Ask the loop to stop after the current step (e.g. from eval_fn once a target is reached);
        the run then ends like a time limit (checkpoint saved, summary["stopped"] = reason)."""
        self._stop_reason = reason

    def evaluate(self) -> dict:
        """Run eval_fn in eval mode → {"eval_<name>": value}; also written to the metrics log."""
        if self.eval_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                res = self.eval_fn(self.model) or {}
        finally:
            self.model.train(was_training)
        out = {(k if k.startswith("eval") else f"eval_{k}"): float(v) for k, v in res.items()}
        self.last_eval = out
        self._write({"step": self.step, "tokens": self.tokens, **out})
        return out

    # ------------------------------------------------------------------ the loop
    def train(self, resume=False, *, stop_after: Optional[int] = None, overwrite: bool = False) -> dict:
        """Train until max_steps / max_tokens (or the data, time limit or `stop_after` steps of this call
        end it) → summary dict.

        resume: False (fresh start; refuses an out_dir holding checkpoints unless overwrite=True),
                True (continue from out_dir's latest checkpoint, or start fresh if there is none), or a
                checkpoint directory.
        """
        cfg = self.cfg
        self._skip_micro_batches = 0
        ckpt = None
        if resume is True:
            if self.out_dir is None:
                raise TrainingError("resume=True needs TrainConfig.out_dir")
            ckpt = latest_checkpoint(self.out_dir)
        elif resume:
            ckpt = Path(resume)
        elif self.out_dir is not None and (self.out_dir / "checkpoints" / "latest").exists() and not overwrite:
            raise TrainingError(f"{self.out_dir} already holds checkpoints: resume them "
                                "(resume=True / --resume) or pass overwrite=True / choose another out_dir")
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        else:
            self._seed_everything()
            if self.out_dir is not None and overwrite:
                shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)

        self._it = iter(self.train_data)
        for _ in itertools.islice(self._it, self._skip_micro_batches):
            pass
        self._log = self._open_log(resumed=ckpt is not None)
        self._t0 = time.perf_counter()
        run_tokens, run_start_step = 0, self.step
        window = _Window()
        stopped = "max_steps"
        self._stop_reason = None
        pbar = _progress(cfg.progress, self.total_steps, self.step)
        self.model.train()
        try:
            while self.step < self.total_steps:
                if stop_after is not None and self.step - run_start_step >= stop_after:
                    stopped = "stop_after"
                    break
                if cfg.time_limit_s is not None and self._run_elapsed() >= cfg.time_limit_s:
                    stopped = "time_limit"
                    break
                try:
                    loss, gnorm, metrics, ntok = self.train_step()
                except StopIteration:
                    self.optimizer.zero_grad(set_to_none=True)   # drop a partial accumulation
                    stopped = "data_exhausted"
                    warnings.warn(f"training data ran out after {self.step} steps (of {self.total_steps})",
                                  stacklevel=2)
                    break
                run_tokens += ntok
                window.add(loss, metrics)
                tps = run_tokens / max(self._run_elapsed(), 1e-9)
                if pbar is not None:
                    pbar.update(1)
                    pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                     tok_s=f"{tps:,.0f}", refresh=False)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self.last_log = {"step": self.step, "tokens": self.tokens, **window.means(),
                                     "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": gnorm,
                                     "tokens_per_s": tps,
                                     "elapsed_s": self.elapsed_before + self._run_elapsed()}
                    self._write(self.last_log)
                    window = _Window()
                if self.eval_fn is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate()
                if self.out_dir is not None and cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                if self._stop_reason is not None:
                    stopped = self._stop_reason
                    break
            if stopped == "max_steps" and self.eval_fn is not None and \
                    not (cfg.eval_every and self.step % cfg.eval_every == 0):
                self.evaluate()
            if self.out_dir is not None and self.step > 0:
                self.save_checkpoint()
        finally:
            if pbar is not None:
                pbar.close()
            if self._log is not None:
                self._log.close()
                self._log = None
        return self._finish(stopped, run_tokens)

    def _finish(self, stopped: str, run_tokens: int) -> dict:
        elapsed = self._run_elapsed()
        summary = {
            "stopped": stopped, "steps": self.step, "total_steps": self.total_steps, "tokens": self.tokens,
            "loss": self.last_log.get("loss"), "eval": self.last_eval,
            "elapsed_s": self.elapsed_before + elapsed, "tokens_per_s": run_tokens / max(elapsed, 1e-9),
            "trainable_parameters": sum(p.numel() for p in self.params),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "final_model": None, "metrics_path": None, "plot_path": None,
        }
        if self.out_dir is not None:
            summary["metrics_path"] = str(self.out_dir / "metrics.jsonl")
            if stopped == "max_steps" and hasattr(self.model, "save_pretrained"):
                summary["final_model"] = str(self._save_final())
            if self.cfg.plot:
                summary["plot_path"] = plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
            _atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def _save_final(self) -> Path:
        final = self.out_dir / "final"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-final-", dir=self.out_dir))
        try:
            self.model.save_pretrained(str(tmp))
            old = self.out_dir / ".old-final"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")


# ---------------------------------------------------------------------------- command-line flags
_FLAG_HELP = {
    "lr": "peak learning rate", "min_lr": "final / floor learning rate", "warmup_steps": "linear warm-up steps",
    "schedule": "LR schedule after warm-up", "decay_fraction": "WSD: fraction of steps spent decaying",
    "weight_decay": "AdamW weight decay (≥2-D parameters only)", "grad_accum": "micro-batches per update",
    "max_grad_norm": "gradient clipping norm (0 = off)", "max_steps": "optimizer updates to run",
    "max_tokens": "tokens to train on (alternative to --max-steps)", "batch_size": "rows per micro-batch",
    "seq_len": "tokens per row", "eval_every": "evaluate every N steps (0 = at the end)",
    "eval_batches": "held-out batches per evaluation",
    "save_every": "checkpoint every N steps (0 = at the end)",
    "log_every": "metrics line every N steps", "seed": "random seed (init, data order)",
    "dtype": "autocast: auto = bf16 on CUDA, fp32 on CPU",
    "time_limit_s": "stop and checkpoint after this many seconds",
    "keep_checkpoints": "checkpoints kept on disk",
}


def add_train_arguments(parser, **defaults) -> None:
    """Add --lr, --max-steps, --batch-size, ... (one flag per TrainConfig field in _FLAG_HELP, plus
    --activation-checkpointing and --no-progress) to an argparse parser; `defaults` override the
    TrainConfig defaults for this command."""
    base = TrainConfig(max_steps=1)
    g = parser.add_argument_group("training")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in _FLAG_HELP:
            continue
        default = defaults.get(f.name, getattr(base, f.name) if f.name not in ("max_steps",) else None)
        kw = {"default": default, "help": f"{_FLAG_HELP[f.name]} (default: {default})"}
        if f.name == "schedule":
            kw["choices"] = SCHEDULES
        elif f.name == "dtype":
            kw["choices"] = DTYPES
        elif f.name in ("lr", "min_lr", "decay_fraction", "weight_decay", "max_grad_norm", "time_limit_s"):
            kw["type"] = float
        else:
            kw["type"] = int
        g.add_argument("--" + f.name.replace("_", "-"), **kw)
    g.add_argument("--activation-checkpointing", action="store_true",
                   default=defaults.get("activation_checkpointing", False),
                   help="recompute activations in the backward pass (less memory, ~30%% slower)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config_from_args(args, **overrides) -> TrainConfig:
    """TrainConfig from flags added by `add_train_arguments` (raises ConfigError explaining bad values)."""
    kw = {k: getattr(args, k) for k in _FLAG_HELP if hasattr(args, k)}
    kw["activation_checkpointing"] = bool(getattr(args, "activation_checkpointing", False))
    kw["progress"] = not getattr(args, "no_progress", False)
    kw.update(overrides)
    return TrainConfig(**kw).validate()


# ---------------------------------------------------------------------------- plot
def plot_metrics(metrics_path, png_path) -> Optional[str]:
    """curves.png from a metrics.jsonl: train / eval loss, LR and gradient norm against tokens.
    Returns the path, or None (with a warning) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping the training-curve plot "
                      "(pip install 'hybridize[plot]')", stacklevel=2)
        return None
    rows = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    fig = Figure(figsize=(12, 3.6), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 3)
    ax[0].plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax[0].plot([r["tokens"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax[0].set(title="loss", xlabel="tokens")
    ax[0].legend()
    ax[1].plot([r["tokens"] for r in train], [r.get("lr", float("nan")) for r in train])
    ax[1].set(title="learning rate", xlabel="tokens")
    ax[2].plot([r["tokens"] for r in train], [r.get("grad_norm", float("nan")) for r in train])
    ax[2].set(title="gradient norm (before clipping)", xlabel="tokens", yscale="log")
    for a in ax:
        a.grid(alpha=0.3)
    fig.savefig(str(png_path), dpi=110)
    return str(png_path)
