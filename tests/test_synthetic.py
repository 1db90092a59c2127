"""Synthetic tasks: MQAR exactly as Zoology, selective copying, induction heads; the training sweep."""
import argparse
import json

import numpy as np
import pytest
import torch

from hybridize.eval.synthetic import (
    IGNORE_INDEX, MQAR_STANDARD_GRID, SyntheticStream, SyntheticTaskError, answer_accuracy, induction_heads,
    make_task, mqar, power_law_probs, selective_copying,
)



def _answers(batch):
    """[(position, token)] per row."""
    lab = batch["labels"]
    return [[(int(t), int(lab[r, t])) for t in torch.nonzero(lab[r] != IGNORE_INDEX).flatten()]
            for r in range(lab.shape[0])]


# ---------------------------------------------------------------------------- MQAR
@pytest.mark.parametrize("L,kv", MQAR_STANDARD_GRID)
def test_mqar_structure(L, kv):
    V = 8192
    b = mqar(32, L, kv, V, random_non_queries=False, seed=3)
    ids, lab = b["input_ids"], b["labels"]
    assert ids.shape == lab.shape == (32, L) and ids.dtype == lab.dtype == torch.long
    for r in range(32):
        keys, values = ids[r, 0:2 * kv:2], ids[r, 1:2 * kv:2]
        assert bool(((keys >= 1) & (keys < V // 2)).all()) and len(set(keys.tolist())) == kv
        assert bool(((values >= V // 2) & (values < V)).all()) and len(set(values.tolist())) == kv
        kv_map = dict(zip(keys.tolist(), values.tolist()))
        ans = _answers(b)[r]
        assert len(ans) == kv                                      # one answer per key
        queried = []
        for t, v in ans:
            assert t >= 2 * kv + 1 and (t - 2 * kv) % 2 == 1       # right after a query at C + 2·gap
            q = int(ids[r, t - 1])
            assert kv_map[q] == v                                  # the answer is the queried key's value
            queried.append(q)
        assert sorted(queried) == sorted(keys.tolist())           # every key queried exactly once
        # outside the kv prefix and the queries the inputs are the filler 0
        qmask = torch.zeros(L, dtype=torch.bool)
        qmask[[t - 1 for t, _ in ans]] = True
        qmask[:2 * kv] = True
        assert bool((ids[r][~qmask] == 0).all())


def test_mqar_random_non_queries_and_labels_only_at_answers():
    b = mqar(64, 128, 8, 8192, seed=0)
    ids, lab = b["input_ids"], b["labels"]
    assert (ids == 0).float().mean() < 0.01                        # fillers are random tokens
    assert int((lab != IGNORE_INDEX).sum()) == 64 * 8
    assert bool((lab[:, :17] == IGNORE_INDEX).all())               # never inside the kv prefix
    # the loss of a model on this batch is over the answers only
    assert bool(((lab >= 4096) | (lab == IGNORE_INDEX)).all())


def test_mqar_power_law_gaps_seeded():
    a, b = mqar(256, 256, 16, seed=7), mqar(256, 256, 16, seed=7)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    c = mqar(256, 256, 16, seed=8)
    assert not torch.equal(a["input_ids"], c["input_ids"])
    # gaps between the end of the kv prefix and each query follow the power law: most are short
    gaps = np.array([(t - 1 - 32) // 2 for row in _answers(a) for t, _ in row])
    space = (256 - 32) // 2
    assert gaps.min() >= 0 and gaps.max() < space
    p = power_law_probs(space, 0.01)
    assert p[0] > p[1] > p[-1] and p.sum() == pytest.approx(1.0)
    # expected fraction of queries in the first eighth of the gap space vs. uniform (1/8), with 16 draws
    # without replacement per row: clearly above uniform
    assert (gaps < space // 8).mean() > 0.25
    # a = 1 is uniform: the mean gap is near the middle
    u = mqar(256, 256, 16, power_a=1.0, seed=7)
    ugaps = np.array([(t - 1 - 32) // 2 for row in _answers(u) for t, _ in row])
    assert abs(ugaps.mean() - (space - 1) / 2) < 4 and ugaps.mean() > gaps.mean() + 10


def test_mqar_rejects_impossible_settings():
    with pytest.raises(SyntheticTaskError, match="4 \\* num_kv_pairs"):
        mqar(1, 64, 17)
    with pytest.raises(SyntheticTaskError, match="vocab_size"):
        mqar(1, 512, 64, vocab_size=256)
    with pytest.raises(SyntheticTaskError, match="even"):
        mqar(1, 63, 4)


# ---------------------------------------------------------------------------- copying / induction
def test_selective_copying():
    M, V, L = 16, 16, 256
    b = selective_copying(16, L, M, V, seed=1)
    ids = b["input_ids"]
    R = L - M - 1
    for r in range(16):
        region = ids[r, :R]
        data = region[region != 0]
        assert len(data) == M and bool(((data >= 1) & (data <= V - 2)).all())
        assert bool((ids[r, R:] == V - 1).all())                   # markers
        ans = _answers(b)[r]
        assert [t for t, _ in ans] == list(range(R + 1, R + 1 + M))
        assert [v for _, v in ans] == data.tolist()                # in order of appearance
    again = selective_copying(4, 64, 8, seed=5)["input_ids"]
    assert torch.equal(selective_copying(4, 64, 8, seed=5)["input_ids"], again)
    with pytest.raises(SyntheticTaskError):
        selective_copying(1, 20, 16)


@pytest.mark.parametrize("L", [16, 256, 2048])
def test_induction_heads(L):
    V = 16
    b = induction_heads(32, L, V, seed=2)
    ids = b["input_ids"]
    for r in range(32):
        s = torch.nonzero(ids[r] == V - 1).flatten().tolist()
        assert len(s) == 2 and s[1] == L - 2                       # the special token exactly twice
        ans = _answers(b)[r]
        assert ans == [(L - 1, int(ids[r, s[0] + 1]))]             # recall the token after the first one
        assert int(ids[r, L - 1]) == ans[0][1]
    assert torch.equal(b["input_ids"], induction_heads(32, L, V, seed=2)["input_ids"])


def test_make_task_stream_and_accuracy():
    gen = make_task("mqar", 64, vocab_size=128)                    # kv defaults to the Zoology grid: 4
    assert int((gen(2, 0)["labels"] != IGNORE_INDEX).sum()) == 8
    s = SyntheticStream(gen, 4, seed=1)
    first = [next(s)["input_ids"] for _ in range(3)]
    s2 = SyntheticStream(gen, 4, seed=1)
    s2.load_state_dict({"index": 2, "seed": 1})
    assert torch.equal(next(s2)["input_ids"], first[2])            # resumable, batch i is fixed

    class Oracle(torch.nn.Module):
        """Predicts the label perfectly from a lookup of the batch (to test the accuracy bookkeeping)."""

        def __init__(self, batch, vocab):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.batch, self.vocab = batch, vocab

        def forward(self, ids):
            lab = self.batch["labels"]
            row = [int(torch.nonzero((self.batch["input_ids"] == r).all(1))[0]) for r in ids]
            logits = torch.zeros(*ids.shape, self.vocab)
            tgt = lab[row][:, 1:].clamp(min=0)
            logits[:, :-1].scatter_(-1, tgt[..., None], 1.0)
            return type("O", (), {"logits": logits})()

    b = gen(8, 3)
    r = answer_accuracy(Oracle(b, 128), b, batch_size=3)
    assert r == {"accuracy": 1.0, "sequence_accuracy": 1.0, "answers": 32}


# ---------------------------------------------------------------------------- training
def test_sweep_configs_build_for_every_mixer():
    from hybridize.eval.sweep import parse_mixer, synthetic_config
    from hybridize.model import HybridLM

    assert parse_mixer("hawk").kind == "rglru" and parse_mixer("mamba2:16").d_state == 16
    assert parse_mixer("mamba2", 256).label == "mamba2 (N=256)"
    with pytest.raises(SyntheticTaskError):
        parse_mixer("attention:16")
    with pytest.raises(SyntheticTaskError):
        parse_mixer("lstm")
    ids = torch.randint(0, 64, (2, 32))
    for m in ("attention", "mamba2:16", "mamba1", "rglru", "griffin", "discrete_mamba2"):
        cfg = synthetic_config(m, 64, 64, window=16)
        assert cfg.num_layers == 2
        assert cfg.layer_pattern == (["rglru", "attention"] if m == "griffin" else [cfg.layer_pattern[0]] * 2)
        out = HybridLM(cfg)(ids, labels=ids)
        assert torch.isfinite(out.loss)
    assert synthetic_config("mamba2:256", 64, 64).mamba2.d_state == 256
    assert synthetic_config("griffin", 64, 64, window=16).attention.sliding_window == 16


EASY = dict(num_kv_pairs=2, vocab_size=32, random_non_queries=False)


def test_attention_learns_easy_mqar():
    """Attention solves an easy MQAR setting (2 pairs, 16 tokens) in a few hundred steps, driven by the
    Trainer: a chance-level plateau (≈ 1/kv: it guesses one of the values in context) until its induction
    circuit forms, then near-perfect recall. No MLP: attention-only models form the circuit sooner."""
    from hybridize.eval.sweep import train_cell

    r = train_cell("mqar", "attention", 64, 16, 3e-3, steps=300, batch_size=64, task_kwargs=EASY, mlp_mult=0,
                   eval_examples=256, eval_every=100, weight_decay=0.0)
    assert r["accuracy"] > 0.9, r
    assert r["num_kv_pairs"] == 2 and [h["step"] for h in r["history"]] == [100, 200, 300]
    assert r["history"][0]["accuracy"] < 0.75                        # the plateau


def test_train_cell_stops_when_solved_or_out_of_time():
    """stop_at_accuracy ends a cell at the first eval that reaches it (the Trainer's request_stop); a time
    limit ends it after that many seconds; both report how many steps ran."""
    from hybridize.eval.sweep import train_cell

    kw = dict(steps=400, batch_size=64, task_kwargs=EASY, mlp_mult=0, eval_examples=256, eval_every=50,
              weight_decay=0.0, schedule="constant", warmup_fraction=0.1)
    r = train_cell("mqar", "attention", 64, 16, 3e-3, stop_at_accuracy=0.9, **kw)
    assert r["stopped"] == "solved" and r["accuracy"] >= 0.9, r
    assert r["steps_run"] < 400 and r["steps_run"] == r["history"][-1]["step"]
    assert all(h["accuracy"] < 0.9 for h in r["history"][:-1])       # stopped at the first solved eval
    r = train_cell("mqar", "attention", 64, 16, 3e-3, time_limit_s=1e-3, **kw)
    assert r["stopped"] == "time_limit" and r["steps_run"] < 400
    with pytest.raises(SyntheticTaskError, match="eval_every"):
        train_cell("mqar", "attention", 64, 16, 3e-3, stop_at_accuracy=0.9, steps=2, task_kwargs=EASY)


def _run_eval_cli(argv):
    from hybridize import cli
    from hybridize.commands_eval import add_eval_parser

    if add_eval_parser in getattr(cli, "PARSERS", []):
        return cli.main(["eval", *argv])
    parser = argparse.ArgumentParser(prog="hybridize")
    sub = parser.add_subparsers(dest="command")
    add_eval_parser(sub)
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


def test_cli_synthetic_sweep_json_and_plots(tmp_path, capsys):
    plot = tmp_path / "acc.png"
    rc = _run_eval_cli(["synthetic", "--task", "induction_heads", "--mixers", "attention", "rglru",
                        "--widths", "32", "--lrs", "1e-3", "3e-3", "--seq-lens", "16", "--steps", "3",
                        "--batch-size", "8", "--eval-examples", "16", "--eval-lengths", "32",
                        "--eval-every", "3", "--json", "--plot", str(plot),
                        "--out", str(tmp_path / "res.json")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["cells"]) == 4 and len(res["best"]) == 2
    for c in res["best"]:
        assert set(c["accuracy_by_length"]) == {"16", "32"} and 0 <= c["accuracy"] <= 1
    assert json.loads((tmp_path / "res.json").read_text())["task"] == "induction_heads"
    for name in ("acc.png", "acc-lengths.png", "acc-curves.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_cli_synthetic_stop_at_accuracy(capsys):
    """--stop-at-accuracy ends every cell at its first eval that reaches it; without --eval-every it is a
    clear error, not a stack trace."""
    rc = _run_eval_cli(["synthetic", "--task", "mqar", "--mixers", "attention", "--widths", "32", "--lrs",
                        "1e-3", "--seq-lens", "16", "--kv-pairs", "2", "--steps", "6", "--batch-size", "8",
                        "--eval-examples", "16", "--eval-every", "2", "--stop-at-accuracy", "0", "--json"])
    assert rc == 0
    (cell,) = json.loads(capsys.readouterr().out)["cells"]
    assert cell["stopped"] == "solved" and cell["steps_run"] == 2
    with pytest.raises((SystemExit, Exception), match="eval_every|eval-every") as e:
        _run_eval_cli(["synthetic", "--task", "mqar", "--mixers", "attention", "--widths", "32", "--seq-lens",
                       "16", "--kv-pairs", "2", "--steps", "2", "--stop-at-accuracy", "0.9"])
    assert not isinstance(e.value, (AttributeError, TypeError, KeyError))
