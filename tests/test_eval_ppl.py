"""Perplexity: strided windows, exactness against hand-computed cross-entropy, per-position curves,
two-model comparison and length extrapolation through the CLI."""
import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridize import HybridLM, preset
from hybridize.eval.perplexity import bin_curve, extrapolation, perplexity, sliding_windows


def _run_eval_cli(argv):
    """`hybridize eval ...` through the real CLI when cli.py registers it, else a parser of our own."""
    from hybridize import cli
    from hybridize.commands_eval import add_eval_parser

    if add_eval_parser in getattr(cli, "PARSERS", []):
        return cli.main(["eval", *argv])
    parser = argparse.ArgumentParser(prog="hybridize")
    sub = parser.add_subparsers(dest="command")
    add_eval_parser(sub)
    args = parser.parse_args(["eval", *argv])
    try:
        return args.func(args)
    except cli.UserError as e:
        print(f"error: {e}")
        return 2



@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return HybridLM(preset("llama-debug")).eval()


class ContextFree(nn.Module):
    """logits depend on the current token only, so every window gives the same loss for a token."""

    def __init__(self, vocab=50):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table(input_ids)})()


def _manual_losses(model, ids):
    with torch.no_grad():
        logits = model(ids[None]).logits[0].float()
    return F.cross_entropy(logits[:-1], ids[1:], reduction="none")


def test_disjoint_windows_equal_exp_mean_ce(llama):
    ids = torch.randint(0, 256, (100,))
    r = perplexity(llama, ids, seq_len=16, stride=16, batch_size=3)
    losses = torch.cat([_manual_losses(llama, ids[b:b + 16]) for b in range(0, 100, 16)])
    assert r["tokens"] == losses.numel() == 100 - 7           # the first token of each of the 7 chunks
    assert r["nll"] == pytest.approx(float(losses.mean()), rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(float(losses.mean())), rel=1e-5)
    # the default stride is seq_len
    assert perplexity(llama, ids, seq_len=16)["ppl"] == pytest.approx(r["ppl"], rel=1e-6)


@pytest.mark.parametrize("n,L,s", [(100, 16, 8), (100, 16, 15), (97, 10, 3), (17, 16, 1), (5, 16, 4),
                                   (64, 16, 16)])
def test_windows_score_each_token_once(n, L, s):
    ws = sliding_windows(n, L, s)
    hits = torch.zeros(n, dtype=torch.long)
    for w in ws:
        assert 0 <= w.begin < w.end <= n and w.end - w.begin <= L
        assert w.begin + 1 <= w.score_from <= w.end
        hits[w.score_from:w.end] += 1
    assert hits[0] == 0
    if s < L:
        assert bool((hits[1:] == 1).all())
    else:                                                     # disjoint chunks: chunk starts have no context
        assert bool((hits <= 1).all()) and int(hits.sum()) == n - len(ws)


def test_strided_matches_hand_computation(llama):
    ids = torch.randint(0, 256, (70,))
    r = perplexity(llama, ids, seq_len=16, stride=6, batch_size=4)
    total, count = 0.0, 0
    for w in sliding_windows(70, 16, 6):
        loss = _manual_losses(llama, ids[w.begin:w.end])
        total += float(loss[w.score_from - w.begin - 1:].sum())
        count += w.end - w.score_from
    assert r["tokens"] == count == 69
    assert r["nll"] == pytest.approx(total / count, rel=1e-5)


def test_strided_context_free_model_scores_every_token_once():
    torch.manual_seed(1)
    m = ContextFree()
    ids = torch.randint(0, 50, (123,))
    full = float(_manual_losses(m, ids).mean())
    for stride in (1, 5, 19):
        r = perplexity(m, ids, seq_len=20, stride=stride, batch_size=7)
        assert r["tokens"] == 122
        assert r["nll"] == pytest.approx(full, rel=1e-6)


def test_per_position_curve_shape_and_values(llama):
    ids = torch.randint(0, 256, (40,))
    r = perplexity(llama, ids, seq_len=16, stride=16)
    curve, counts = r["per_position_loss"], r["per_position_count"]
    assert len(curve) == len(counts) == 15
    # windows [0,16) [16,32) [32,40): positions 1..7 seen 3 times, 8..15 twice
    assert counts == [3] * 7 + [2] * 8
    chunks = [_manual_losses(llama, ids[b:b + 16]) for b in (0, 16, 32)]
    assert curve[0] == pytest.approx(float(sum(c[0] for c in chunks) / 3), rel=1e-5)
    assert curve[10] == pytest.approx(float((chunks[0][10] + chunks[1][10]) / 2), rel=1e-5)
    xs, ys = bin_curve(curve, counts, num_bins=4)
    assert len(xs) == len(ys) <= 4 and xs == sorted(xs)


def test_batching_and_documents_are_exact():
    torch.manual_seed(0)
    m = HybridLM(preset("mil50-debug")).eval()              # Mamba-2 + attention: right padding must be exact
    docs = [torch.randint(0, 256, (n,)) for n in (37, 5, 60)]
    a = perplexity(m, docs, seq_len=16, stride=8, batch_size=1)
    b = perplexity(m, docs, seq_len=16, stride=8, batch_size=5)
    assert a["tokens"] == b["tokens"] == 36 + 4 + 59
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
    # documents are independent: the token-weighted mean of per-document results
    per = [perplexity(m, d, seq_len=16, stride=8) for d in docs]
    mean = sum(p["nll"] * p["tokens"] for p in per) / sum(p["tokens"] for p in per)
    assert a["nll"] == pytest.approx(mean, rel=1e-5)
    # max_tokens truncates in document order
    c = perplexity(m, docs, seq_len=16, stride=8, max_tokens=40)
    assert c["tokens"] == 36 + 2


def test_extrapolation_api(llama):
    ids = torch.randint(0, 256, (128,))
    r = extrapolation(llama, ids, train_len=8, factors=[1, 2, 4])
    assert [row["seq_len"] for row in r["lengths"]] == [8, 16, 32]
    assert len(r["per_position_loss"]) == 31
    assert r["lengths"][2]["ppl"] == pytest.approx(perplexity(llama, ids, seq_len=32)["ppl"], rel=1e-6)


# ---------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from hybridize.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("ppl")
    text = "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}" for i in range(200))
    (root / "data.txt").write_text(text)
    docs = [json.dumps({"text": text[i:i + 300]}) for i in range(0, 3000, 300)]
    (root / "docs.jsonl").write_text("\n".join(docs))
    tok = train_bpe_tokenizer([text], vocab_size=300)
    out = {}
    for name, family in (("teacher", "llama-debug"), ("student", "mil50-debug")):
        torch.manual_seed(0)
        m = HybridLM(preset(family, vocab_size=300))
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    out["root"] = root
    return out


def test_cli_ppl_two_models_json_and_plot(ckpts, capsys):
    root = ckpts["root"]
    rc = _run_eval_cli(["ppl", ckpts["teacher"], ckpts["student"], "--data", str(root / "data.txt"),
                        "--seq-len", "32", "--stride", "16", "--max-tokens", "400", "--json",
                        "--plot", str(root / "loss.png")])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert [m["label"] for m in rep["models"]] == ["teacher", "student"]
    for m in rep["models"]:
        assert m["tokens"] == 399 and math.isfinite(m["ppl"]) and m["ppl"] > 1
        assert len(m["per_position_loss"]) == 31
    assert rep["models"][0]["ppl"] != rep["models"][1]["ppl"]
    assert (root / "loss.png").stat().st_size > 1000


def test_cli_ppl_text_output_jsonl_and_errors(ckpts, capsys):
    root = ckpts["root"]
    docs = str(root / "docs.jsonl")
    assert _run_eval_cli(["ppl", ckpts["teacher"], "--data", docs, "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "10 document(s)" in out and "ppl" in out
    rc = _run_eval_cli(["ppl", "llama-debug", "--data", docs])                     # preset: no tokenizer
    assert rc == 2 and "--tokenizer" in capsys.readouterr().out
    rc = _run_eval_cli(["ppl", "llama-debug", "--tokenizer", ckpts["teacher"], "--data", docs])
    assert rc == 2 and "vocabulary" in capsys.readouterr().out      # ids up to 299 vs a 256-token model


def test_cli_extrapolate(ckpts, capsys):
    root = ckpts["root"]
    rc = _run_eval_cli(["extrapolate", ckpts["teacher"], ckpts["student"], "--data", str(root / "data.txt"),
                        "--train-len", "16", "--factors", "1", "2", "4", "--json",
                        "--plot", str(root / "ext.png")])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["models"]) == {"teacher", "student"}
    assert [r["seq_len"] for r in rep["models"]["teacher"]["lengths"]] == [16, 32, 64]
    assert (root / "ext.png").stat().st_size > 1000
