"""`hybridize bench speculative`: the speculative-decoding benchmark end to end on CPU (tiny target and draft,
a few training steps): train + save the pair, time plain vs speculative decoding for several K, and the
bench phase alone on the saved pair (with --resume). The numbers only mean something on a GPU; here the
JSON's structure, the greedy equality check and the two-phase path are what is tested."""
import json
import math

from hybridize.cli import main


def _finite(*xs):
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def test_bench_speculative_quick(tmp_path):
    from hybridize.bench import speculative

    pair = tmp_path / "pair"
    assert main(["bench", "speculative", "--smoke", "--out", str(tmp_path),
                 "--suite-args", f"--phase all --save-dir {pair}"]) == 0
    r = json.loads((tmp_path / "speculative.json").read_text())
    assert r["finished"] and r["phase"] == "all" and r["suite"] == "speculative"
    assert r["command"].startswith("python -m hybridize.bench.speculative")
    assert r["env"]["torch"] and "device_name" in r["env"]
    # the pair: a distilled 50 % Mamba-2 hybrid target and a small draft, saved with the prompts
    assert r["target"]["kind"] == "hybrid" and r["target"]["layer_pattern"].count("attention") == 2
    assert "mamba2" in r["target"]["layer_pattern"]
    d = r["draft"]
    assert d["parameters"] < r["target"]["parameters"] and _finite(d["heldout"]["kl"], d["agreement"]["top1"])
    assert 0 <= d["agreement"]["min_pq_overlap"] <= 1
    assert (pair / "target" / "config.json").exists() and (pair / "draft" / "config.json").exists()
    meta = json.loads((pair / "spec_pair.json").read_text())
    assert len(meta["prompts"]) == 2 and all(len(p) == 16 for p in meta["prompts"])

    b = r["bench"]
    assert not b["errors"] and not b["skipped"]
    cfg = speculative.SpecConfig.quick()
    cells = {(x["batch"], x["temperature"], x["K"]) for x in b["speculative"]}
    assert cells == {(B, t, K) for B in cfg.batches for t in cfg.temperatures for K in cfg.ks}
    assert {(x["batch"], x["temperature"]) for x in b["plain"]} == {(B, t) for B in cfg.batches
                                                                      for t in cfg.temperatures}
    for x in b["plain"]:
        assert x["new_tokens"] == cfg.num_prompts * cfg.max_new_tokens and _finite(x["tokens_per_s"])
    for x in b["speculative"]:
        assert x["new_tokens"] == cfg.num_prompts * cfg.max_new_tokens
        assert _finite(x["tokens_per_s"], x["speedup"], x["acceptance_rate"], x["mean_tokens_per_round"],
                       x["ms_per_round"], x["other_ms_per_round"])
        assert 0 <= x["acceptance_rate"] <= 1 and 1 <= x["mean_tokens_per_round"] <= x["K"] + 1
        if x["batch"] == 1:
            assert x["drafted"] == x["K"] * x["rounds"]
        if x["temperature"] == 0:
            # greedy speculative decoding emits exactly the plain greedy tokens (fp32 on CPU)
            assert x["greedy_match"] is True and x["rows_identical"] == x["rows"] == cfg.num_prompts
            assert x["first_divergence"] == [None] * cfg.num_prompts
    assert {(x["batch"], x["K"]) for x in b["costs"]} == {(B, K) for B in cfg.batches for K in cfg.ks}
    for x in b["costs"]:
        assert x["T"] == x["K"] + 1
        assert _finite(x["step_ms"], x["verify_ms"], x["verify_commit_ms"], x["verify_over_step"],
                       x["draft_step_ms"], x["draft_over_target_step"], x["pieces_ms_per_round"])
    s = b["summary"]
    assert s["greedy_outputs_match_plain"] is True and s["goal_speedup"] == 1.8
    assert {(x["batch"], x["temperature"]) for x in s["best"]} == {(B, t) for B in cfg.batches
                                                                     for t in cfg.temperatures}
    assert (tmp_path / "speculative.png").read_bytes()[:4] == b"\x89PNG"

    # bench phase alone on the saved pair: --resume keeps the mirrored cells and times only the new K
    out = tmp_path / "bench.json"
    assert speculative.main(["--quick", "--phase", "bench", "--load-dir", str(pair), "--ks", "2,4",
                             "--batches", "1", "--resume", "--json-out", str(out), "--no-plot"]) == 0
    r2 = json.loads(out.read_text())
    assert r2["phase"] == "bench" and "teacher" not in r2 and r2["pair"]["summary"]["draft"]["parameters"]
    b2 = r2["bench"]
    assert b2["resumed"] and not b2["errors"]
    new = [x for x in b2["speculative"] if x["K"] == 4]
    assert {x["temperature"] for x in new} == set(cfg.temperatures) and all(x["batch"] == 1 for x in new)
    assert all(x["greedy_match"] for x in new if x["temperature"] == 0)
    assert len([x for x in b2["speculative"] if x["K"] == 2 and x["batch"] == 1]) == len(cfg.temperatures)
