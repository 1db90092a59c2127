"""`hybridize demo --quick` end to end, and the convert / distill / pretrain commands."""
import argparse
import json
import math
import random
import time

import pytest

import hybridize as hz



def run_cli(argv):
    """The commands as `hybridize` runs them (parser built from commands_train's add_*_parser)."""
    from hybridize import commands_train

    parser = argparse.ArgumentParser(prog="hybridize")
    sub = parser.add_subparsers(dest="command")
    for add in commands_train.COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = run_cli(["demo", "--quick", "--out", str(out), "--json", "--no-progress", "--threads", "1"])
    elapsed = time.perf_counter() - t0
    return {"out": out, "rc": rc, "stdout": buf.getvalue(), "elapsed": elapsed}


def test_quick_demo_end_to_end(demo):
    assert demo["rc"] == 0
    assert demo["elapsed"] < 60, f"demo --quick took {demo['elapsed']:.0f} s"
    out = demo["out"]
    m = json.loads((out / "metrics.json").read_text())
    assert json.loads(demo["stdout"]) == m                              # --json prints exactly the report
    for key in ("teacher", "student_converted", "student_distilled"):
        assert math.isfinite(m[key]["heldout_ppl"]) and m[key]["heldout_ppl"] > 1
    assert m["teacher"]["layer_pattern"] == ["attention", "attention"]
    assert m["student_distilled"]["layer_pattern"] == ["mamba2", "attention"]
    assert m["student_converted"]["kl_to_teacher"] > 0 and m["student_distilled"]["kl_to_teacher"] > 0
    assert 0 < m["student_distilled"]["trainable_parameters"] < m["student_distilled"]["parameters"]
    # decode memory: the hybrid keeps half the KV cache plus a fixed recurrent state
    for ctx in ("32", "4096"):
        t, s = m["teacher"]["decode_memory"][ctx], m["student_distilled"]["decode_memory"][ctx]
        assert s["kv_cache_bytes"] * 2 == t["kv_cache_bytes"] and s["recurrent_state_bytes"] > 0
    assert m["student_distilled"]["decode_memory"]["4096"]["recurrent_state_bytes"] == \
        m["student_distilled"]["decode_memory"]["32"]["recurrent_state_bytes"]
    assert set(m["samples"]) >= {"teacher", "student_converted", "student_distilled"}
    png = out / "curves.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    for sub in ("teacher-run/metrics.jsonl", "distill/01-kl/metrics.jsonl", "tokenizer/tokenizer.json"):
        assert (out / sub).exists(), sub


def test_demo_student_checkpoint_loads_and_generates(demo):
    from hybridize.data import load_tokenizer
    from hybridize.distill.stages import generate_text

    student = hz.load(str(demo["out"] / "student")).eval()
    tok = load_tokenizer(demo["out"] / "student")
    assert student.layer_pattern == ["mamba2", "attention"]
    text = generate_text(student, tok, "import ", 6)
    assert isinstance(text, str)
    m = json.loads((demo["out"] / "metrics.json").read_text())
    assert sum(p.numel() for p in student.parameters()) == m["student_distilled"]["parameters"]


def test_convert_command(demo, tmp_path, capsys):
    teacher = demo["out"] / "teacher"
    assert run_cli(["convert", str(teacher), str(tmp_path / "s"), "--mixer", "rglru",
                    "--attention-layers", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["layer_pattern"] == ["rglru", "attention"] and rep["tokenizer_saved"]
    s = hz.load(str(tmp_path / "s"))
    assert s.layer_pattern == ["rglru", "attention"]
    assert (tmp_path / "s" / "tokenizer.json").exists()
    from hybridize.cli import UserError
    with pytest.raises(UserError, match="not supported"):
        run_cli(["convert", str(teacher), str(tmp_path / "x"), "--attention-fraction", "0.3"])
    with pytest.raises(UserError, match="does not exist"):
        run_cli(["convert", str(tmp_path / "missing"), str(tmp_path / "x")])


def test_distill_command_dry_run_and_short_run(demo, tmp_path, capsys):
    teacher = demo["out"] / "teacher"
    assert run_cli(["distill", "--recipe", "demo", "--teacher", str(teacher), "--out", str(tmp_path / "d"),
                    "--dry-run", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["valid"] and rep["plan"][0]["kind"] == "kl" and rep["plan"][0]["attention_layers"] == [1]
    assert not (tmp_path / "d").exists()                                  # dry run trains nothing
    from hybridize.cli import UserError
    with pytest.raises(UserError, match="needs chat data"):
        run_cli(["distill", "--recipe", "mil", "--teacher", str(teacher), "--out", str(tmp_path / "m"),
                 "--dry-run"])
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = random.Random(0)
    for i in range(30):
        words = [rng.choice(["def", "return", "x", "=", "1"]) for _ in range(300)]
        (docs / f"{i}.txt").write_text(" ".join(words))
    assert run_cli(["distill", "--recipe", "demo", "--teacher", str(teacher), "--out", str(tmp_path / "d"),
                    "--train-data", str(docs), "--max-steps", "2", "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["stages"][0]["steps"] == 2 and res["layer_pattern"] == ["mamba2", "attention"]
    assert hz.load(res["final_model"]).layer_pattern == ["mamba2", "attention"]
    # SFT on assistant turns only: the CLI flag overrides the recipe (dry run of an sft-only recipe)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "def f(x):"},
                                                     {"role": "assistant", "content": f"return x + {i}"}]}) + "\n"
                            for i in range(20)))
    toml = tmp_path / "sft.toml"
    toml.write_text('[recipe]\nname = "sft"\n[student]\nattention_fraction = 0.5\n'
                    '[[stage]]\nkind = "sft"\nmax_steps = 2\nwarmup_steps = 0\nbatch_size = 2\nseq_len = 16\n'
                    'assistant_only_loss = true\n')
    base = ["distill", "--recipe", str(toml), "--teacher", str(teacher), "--out", str(tmp_path / "s"),
            "--chat-data", str(chat), "--dry-run", "--json"]
    for extra, want in (([], "assistant turns"), (["--no-assistant-only-loss"], "all tokens")):
        assert run_cli(base + extra) == 0
        assert json.loads(capsys.readouterr().out)["plan"][0]["loss_on"] == want
    with pytest.raises(UserError, match="--assistant-only-loss applies to sft stages; recipe demo has none"):
        run_cli(["distill", "--recipe", "demo", "--out", str(tmp_path / "x"), "--assistant-only-loss"])


def test_pretrain_command(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = random.Random(1)
    for i in range(40):
        (docs / f"{i}.txt").write_text(" ".join(rng.choice(["class", "self", "pass", "if", "else"])
                                                for _ in range(200)))
    assert run_cli(["pretrain", "--out", str(tmp_path / "p"), "--preset", "llama-debug", "--data", str(docs),
                    "--vocab-size", "300", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                    "--eval-batches", "1", "--no-progress", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["steps"] == 3 and math.isfinite(rep["eval"]["eval_loss"])
    model = hz.load(rep["final_model"])
    assert model.cfg.vocab_size <= 300 and (tmp_path / "p" / "final" / "tokenizer.json").exists()
