"""The generic trainer: learning, schedules, accumulation, exact resume, atomic checkpoints, NaN stops."""
import copy
import functools
import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from hybridize.config import ConfigError
from hybridize.data import PackedStream, list_corpus, train_bpe_tokenizer
from hybridize.distill.trainer import (
    TrainConfig, Trainer, TrainingError, latest_checkpoint, lm_loss_fn, lr_at, make_eval_fn,
)
from hybridize.model import causal_lm_loss

V = 64



class TinyLM(nn.Module):
    """Embedding → mix with the previous token (respecting seq_idx) → dropout → norm → head. Fast and
    with 1-D parameters (norm, bias) and randomness (dropout) to exercise the trainer."""

    def __init__(self, vocab=V, d=16, dropout=0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.prev = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.gradient_checkpointing = False

    def forward(self, input_ids, labels=None, seq_idx=None):
        h = self.embed(input_ids)
        prev = torch.nn.functional.pad(h[:, :-1], (0, 0, 1, 0))
        if seq_idx is not None:   # no information across documents
            same = torch.zeros_like(seq_idx, dtype=torch.bool)
            same[:, 1:] = seq_idx[:, 1:] == seq_idx[:, :-1]
            prev = prev * same[..., None]
        logits = self.head(self.norm(self.drop(h + torch.tanh(self.prev(prev)))))
        return SimpleNamespace(logits=logits, loss=None if labels is None else causal_lm_loss(logits, labels))


def random_batches(n, b=4, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (b, L), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def pattern_batches(n, b=4, L=16):
    """A learnable repeated sequence."""
    row = torch.arange(L) % 7 + 3
    return [{"input_ids": row.repeat(b, 1), "labels": row.repeat(b, 1)} for _ in range(n)]


def cfg(**kw):
    base = dict(lr=1e-2, min_lr=1e-3, warmup_steps=1, max_steps=10, batch_size=4, seq_len=16, log_every=1,
                progress=False, plot=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(out_dir):
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- learning
def test_loss_decreases_on_tiny_model():
    torch.manual_seed(0)
    model = TinyLM(dropout=0.0)
    tr = Trainer(model, pattern_batches(30), config=cfg(max_steps=30, lr=3e-2, log_every=5))
    with torch.no_grad():
        first = float(lm_loss_fn(model, pattern_batches(1)[0])[0])
    out = tr.train()
    assert out["stopped"] == "max_steps" and out["steps"] == 30 and out["tokens"] == 30 * 4 * 16
    assert out["loss"] < 0.3 * first


def test_loss_decreases_on_hybridlm_packed_corpus(tmp_path):
    from hybridize.config import preset
    from hybridize.model import HybridLM

    texts = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
             "class Point:\n    x: int\n    y: int\n"] * 4
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = HybridLM(preset("llama-debug", vocab_size=len(tok)))
    stream = PackedStream(list_corpus(texts), tok, seq_len=32, batch_size=2, seed=0)
    eval_batches = [next(PackedStream(list_corpus(texts), tok, seq_len=32, batch_size=2, shuffle=False))]
    ev = make_eval_fn(eval_batches)
    before = ev(model)["loss"]
    config = cfg(max_steps=8, lr=1e-2, warmup_steps=2, batch_size=2, seq_len=32, log_every=2, eval_every=4,
                 out_dir=str(tmp_path))
    out = Trainer(model, stream, config=config, eval_fn=ev).train()
    assert out["eval"]["eval_loss"] < before - 1.0
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8]
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(train_rows[0])
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 8
    reloaded = HybridLM.from_pretrained(str(tmp_path / "final"))
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_trains_and_checkpoints_a_model_fused_for_inference(tmp_path):
    """A model fused for generation (one tensor behind q/k/v and gate/up) can be trained and checkpointed:
    the Trainer unfuses it (same Parameters), and the checkpoint resumes."""
    from hybridize.config import preset
    from hybridize.model import HybridLM

    torch.manual_seed(0)
    model = HybridLM(preset("llama-debug", vocab_size=64)).fuse_projections_()
    assert model.projections_fused()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [torch.randint(0, 64, (2, 16)) for _ in range(6)]
    data = [{"input_ids": x, "labels": x} for x in ids]
    out = Trainer(model, iter(data), config=cfg(max_steps=3, batch_size=2, seq_len=16, save_every=2,
                                                 out_dir=str(tmp_path))).train()
    assert out["steps"] == 3 and not model.projections_fused()
    assert (tmp_path / "checkpoints" / "latest").exists()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("q_proj" in k for k in changed) and any("gate_proj" in k for k in changed)


# ---------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedule_shapes(schedule):
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100, schedule=schedule, decay_fraction=0.2)
    lrs = [lr_at(s, c) for s in range(100)]
    warm = lrs[:10]
    assert all(b > a for a, b in zip(warm, warm[1:])) and lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0
    rest = lrs[10:]
    if schedule == "constant":
        assert all(x == 1.0 for x in rest)
    elif schedule == "cosine":
        assert all(b <= a for a, b in zip(rest, rest[1:]))
        assert rest[0] == pytest.approx(1.0) and rest[-1] == pytest.approx(0.1)
        mid = 10 + (99 - 10) // 2
        assert lrs[mid] == pytest.approx(0.55, abs=0.02)          # half-way down the cosine
    else:  # wsd: stable until the last 20 steps, then linear to min_lr
        assert all(x == 1.0 for x in lrs[10:80])
        dec = lrs[80:]
        diffs = [a - b for a, b in zip(dec, dec[1:])]
        assert all(d == pytest.approx(diffs[0]) for d in diffs) and dec[-1] == pytest.approx(0.1)


def test_config_validation_explains():
    with pytest.raises(ConfigError, match="max_steps or max_tokens"):
        TrainConfig().validate()
    with pytest.raises(ConfigError, match="schedule must be one of"):
        TrainConfig(max_steps=10, schedule="linear").validate()
    with pytest.raises(ConfigError, match=r"warmup_steps \(10\) must be smaller"):
        TrainConfig(max_steps=10, warmup_steps=10).validate()
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(max_steps=10, lr=1e-4, min_lr=1e-3).validate()
    with pytest.raises(ConfigError, match="fp16 is not supported"):
        TrainConfig(max_steps=10, dtype="fp16").validate()
    c = TrainConfig(max_tokens=1000, batch_size=2, seq_len=100, grad_accum=2, warmup_steps=0)
    assert c.validate().total_steps() == 3                           # ceil(1000 / 400)
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_no_weight_decay_on_1d_params_and_trainable_subset():
    model = TinyLM()
    tr = Trainer(model, random_batches(1), config=cfg(weight_decay=0.1))
    by_wd = {g["weight_decay"]: g["params"] for g in tr.optimizer.param_groups}
    assert all(p.ndim >= 2 for p in by_wd[0.1]) and all(p.ndim == 1 for p in by_wd[0.0])
    assert len(by_wd[0.1]) + len(by_wd[0.0]) == len(list(model.parameters()))
    model2 = TinyLM()
    head_before, embed_before = model2.head.weight.clone(), model2.embed.weight.clone()
    Trainer(model2, random_batches(3), config=cfg(max_steps=3), trainable_params=[model2.head.weight]).train()
    assert not model2.embed.weight.requires_grad and torch.equal(model2.embed.weight, embed_before)
    assert not torch.equal(model2.head.weight, head_before)


# ---------------------------------------------------------------------------- accumulation
def test_grad_accumulation_matches_big_batch():
    torch.manual_seed(1)
    base = TinyLM(dropout=0.0)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    big = random_batches(3, b=8, seed=5)
    small = [{k: v[i: i + 4] for k, v in batch.items()} for batch in big for i in (0, 4)]
    Trainer(a, big, config=cfg(max_steps=3, grad_accum=1, batch_size=8)).train()
    Trainer(b, small, config=cfg(max_steps=3, grad_accum=2, batch_size=4)).train()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert not torch.equal(a.head.weight, base.head.weight)


# ---------------------------------------------------------------------------- exact resume
def noisy_loss_fn(model, batch):
    """Uses python / numpy / torch RNGs (plus dropout), so a resume that forgot any of them diverges."""
    loss, _ = lm_loss_fn(model, batch)
    scale = 1 + 0.05 * random.random() + 0.05 * float(np.random.rand()) + 0.05 * float(torch.rand(()))
    return loss * scale, {"scale": scale}


@functools.lru_cache(maxsize=None)
def stream_tokenizer():
    texts = tuple(" ".join(str((i * 7 + j) % 13) for j in range(5 + i % 9)) for i in range(40))
    return texts, train_bpe_tokenizer(texts, vocab_size=V * 5)


def make_stream():
    texts, tok = stream_tokenizer()
    return PackedStream(list_corpus(texts), tok, seq_len=16, batch_size=2, seed=3), len(tok)


@pytest.mark.parametrize("data_kind", ["stream", "list"])
def test_resume_gives_bitwise_identical_losses(tmp_path, data_kind):
    def run(out_dir, stop_after=None, resume=False):
        if resume:   # as in a new process: the RNGs hold anything but the interrupted run's states
            random.seed(999)
            np.random.seed(999)
        torch.manual_seed(123 if not resume else 999)
        if data_kind == "stream":
            data, vocab = make_stream()
        else:
            data, vocab = random_batches(20, b=2, seed=9), V
        model = TinyLM(vocab=vocab)
        config = cfg(max_steps=10, grad_accum=2, warmup_steps=2, save_every=5, out_dir=str(out_dir))
        return Trainer(model, data, loss_fn=noisy_loss_fn, config=config).train(resume=resume,
                                                                               stop_after=stop_after), model

    full, m_full = run(tmp_path / "full")
    part, _ = run(tmp_path / "resumed", stop_after=5)
    assert part["stopped"] == "stop_after" and part["steps"] == 5
    rest, m_rest = run(tmp_path / "resumed", resume=True)
    assert rest["steps"] == 10
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]            # bitwise equal floats
    assert [r["scale"] for r in a] == [r["scale"] for r in b]
    for p, q in zip(m_full.parameters(), m_rest.parameters()):
        assert torch.equal(p, q)


def test_refuses_to_overwrite_checkpoints(tmp_path):
    Trainer(TinyLM(), random_batches(2), config=cfg(max_steps=2, out_dir=str(tmp_path))).train()
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        Trainer(TinyLM(), random_batches(2), config=cfg(max_steps=2, out_dir=str(tmp_path))).train()
    out = Trainer(TinyLM(), random_batches(2), config=cfg(max_steps=2, out_dir=str(tmp_path))).train(
        overwrite=True)
    assert out["steps"] == 2


# ---------------------------------------------------------------------------- atomic checkpoints
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    config = cfg(max_steps=6, save_every=2, keep_checkpoints=1, out_dir=str(tmp_path))
    tr = Trainer(TinyLM(), random_batches(20), config=config)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        calls["n"] += 1
        if tr.step == 4:                      # the second checkpoint dies half-written
            real_save(obj, f, *a, **k)
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        tr.train()
    monkeypatch.setattr(torch, "save", real_save)
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) == root / "step-00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]     # no half checkpoint
    # the surviving checkpoint is complete: resuming from it finishes the run
    out = Trainer(TinyLM(), random_batches(20), config=config).train(resume=True)
    assert out["steps"] == 6 and latest_checkpoint(tmp_path).name == "step-00000006"


def test_killed_mid_save_debris_is_ignored(tmp_path):
    config = cfg(max_steps=2, out_dir=str(tmp_path))
    Trainer(TinyLM(), random_batches(20), config=config).train()
    root = tmp_path / "checkpoints"
    # what a SIGKILL during the next save could leave: a temp dir and an unreferenced step dir
    (root / ".tmp-step-00000004-x").mkdir()
    (root / ".tmp-step-00000004-x" / "model.safetensors").write_bytes(b"\0" * 10)
    (root / "step-00000004").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    config = cfg(max_steps=4, out_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"changed settings \['max_steps'\]"):
        out = Trainer(TinyLM(), random_batches(20), config=config).train(resume=True)
    assert out["steps"] == 4
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004"]
    assert (root / "step-00000004" / "trainer_state.json").exists()


# ---------------------------------------------------------------------------- NaN / inf
def test_nan_loss_stops_with_step(tmp_path):
    def loss_fn(model, batch):
        loss, m = lm_loss_fn(model, batch)
        return (loss * float("nan") if tr.step == 2 else loss), m

    tr = Trainer(TinyLM(), random_batches(20), loss_fn=loss_fn,
                 config=cfg(max_steps=6, save_every=2, out_dir=str(tmp_path)))
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 3 .*step-00000002"):
        tr.train()
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    state = json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())
    assert state["step"] == 2


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_nan_gradient_names_parameter():
    model = TinyLM()

    def loss_fn(m, batch):
        w = _NanGrad.apply(m.prev.weight) if tr.step == 1 else m.prev.weight
        h = m.embed(batch["input_ids"])
        logits = m.head(m.norm(h + torch.tanh(h @ w.T)))
        return causal_lm_loss(logits, batch["labels"]), {}

    tr = Trainer(model, random_batches(5), loss_fn=loss_fn, config=cfg(max_steps=4))
    before = model.prev.weight.detach().clone()
    msg = r"non-finite gradient .* at step 2, first in parameter 'prev.weight'"
    with pytest.raises(TrainingError, match=msg):
        tr.train()
    assert torch.isfinite(model.prev.weight).all()
    assert not torch.equal(model.prev.weight, before)     # step 1 was applied, step 2 was not


def test_time_limit_and_data_exhaustion(tmp_path):
    with pytest.warns(UserWarning, match="ran out after 3 steps"):
        out = Trainer(TinyLM(), random_batches(3), config=cfg(max_steps=10)).train()
    assert out["stopped"] == "data_exhausted" and out["steps"] == 3
    out = Trainer(TinyLM(), random_batches(50), config=cfg(max_steps=10, time_limit_s=1e-9,
                                                            out_dir=str(tmp_path))).train()
    assert out["stopped"] == "time_limit" and out["steps"] == 0


def test_activation_checkpointing_flag():
    model = TinyLM()
    Trainer(model, random_batches(1), config=cfg(activation_checkpointing=True))
    assert model.gradient_checkpointing is True
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        Trainer(nn.Linear(2, 2), [], config=cfg(activation_checkpointing=True))


def test_plot_written_from_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    out = Trainer(TinyLM(), random_batches(4), config=cfg(max_steps=4, plot=True, out_dir=str(tmp_path)),
                  eval_fn=lambda m: {"loss": 1.0}).train()
    assert out["plot_path"] and (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert out["eval"] == {"eval_loss": 1.0}
    assert math.isfinite(out["loss"])
