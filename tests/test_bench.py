"""`hybridize bench`: the suites run end to end on tiny shapes (CPU, interpreter) and write JSON + plots.
(The numbers they measure only mean something on a GPU.)"""
import json

from hybridize.cli import main


def test_bench_kernels_smoke(tmp_path, capsys):
    assert main(["bench", "kernels", "--smoke", "--out", str(tmp_path)]) == 0
    ssd = json.loads((tmp_path / "ssd.json").read_text())
    step = json.loads((tmp_path / "step.json").read_text())
    scan = json.loads((tmp_path / "scan.json").read_text())
    assert ssd["env"] and step["env"] and scan["env"]
    assert (tmp_path / "ssd.png").exists() and (tmp_path / "scan.png").exists()
    assert scan["correctness"]["pass"] and scan["summary"]["rglru_scan"]


def test_bench_scan_smoke(tmp_path, capsys):
    """`hybridize bench scan --smoke` (CPU, interpreter, tiny shapes): a record per op × implementation × L
    with a time or the reason there is none, floors counted as documented, ratios, summary, correctness of
    our kernels vs the fp32 references (outputs and gradients), and the PNG."""
    import math

    assert main(["bench", "scan", "--smoke", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "scan.json").read_text())
    assert r["config"]["smoke"] and not r["config"]["torch_loop_extrapolated"]
    lengths, C, bw = r["config"]["lengths"], r["config"]["width"], r["config"]["hbm_bw_bytes_per_s"]
    tokens, e = r["config"]["tokens_per_call"], 2
    assert len(lengths) >= 2 and not any(k.endswith("_error") for k in r)
    recs = {(x["op"], x["impl"], x["L"]): x for x in r["records"]}
    for L in lengths:
        for op, n_fwd, n_fb in (("rglru_scan", 3, 8), ("conv1d", 2, 5)):
            floor, ours = recs[(op, "hbm_floor", L)], recs[(op, "hybridize", L)]
            assert floor["B"] * L == tokens and ours["C"] == C
            assert math.isclose(floor["fwd_ms"], n_fwd * tokens * C * e / bw * 1e3)
            assert math.isclose(floor["fwd_bwd_ms"], n_fb * tokens * C * e / bw * 1e3)
            for mode in ("fwd", "fwd_bwd"):
                ms = ours[f"{mode}_ms"]
                assert isinstance(ms, float) and ms > 0 and f"{mode}_error" not in ours
                assert math.isclose(ours[f"{mode}_vs_floor"], ms / floor[f"{mode}_ms"])
                s = r["summary"][op][str(L)][mode]
                assert s["ours_ms"] == ms and math.isclose(s["ours_over_floor"], ms / floor[f"{mode}_ms"])
        for impl in ("torch_conv1d", "torch_reference"):
            rec = recs[("conv1d", impl, L)]
            assert rec["fwd_ms"] > 0 and rec["fwd_bwd_ms"] > 0
            peer = recs[("conv1d", "torch_conv1d", L)]["fwd_ms"]
            assert math.isclose(rec["fwd_speedup_vs_torch_conv1d"], peer / rec["fwd_ms"])
    loop = [recs[("rglru_scan", "torch_loop", L)] for L in lengths]          # timed at the smallest L only
    assert loop[0]["fwd_ms"] > 0 and loop[0]["fwd_bwd_ms"] > 0
    assert all("skipped" in x and "fwd_ms" not in x for x in loop[1:])
    # peers that are not installed are recorded, not fatal
    assert {"fla_chunk_hgrn", "fla_fused_recurrent_hgrn", "causal_conv1d"} <= set(r["env"]["imports"])
    c = r["correctness"]
    assert set(c["rglru_scan"]["hybridize"]) >= {"h", "db", "da"}
    assert set(c["conv1d"]["hybridize"]) >= {"y", "dx", "dweight", "dbias"}
    for sec, impl in (("rglru_scan", "hybridize"), ("conv1d", "hybridize"), ("conv1d", "torch_conv1d")):
        rec = c[sec][impl]
        errs = [v for v in rec.values() if isinstance(v, dict)]
        assert rec["pass"] and errs and all(v["pass"] and v["rel_fro"] < 1e-2 for v in errs)
    assert c["pass"]
    assert (tmp_path / "scan.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_scan_correctness_fails_on_a_wrong_kernel(tmp_path, monkeypatch):
    """The suite's correctness flags are real: a scan with the wrong decay and a conv with flipped taps
    fail (in-process, so the stand-ins are what runs)."""
    from hybridize.bench import scan
    from hybridize.ops.conv1d import reference as conv_ref
    from hybridize.ops.rglru import reference as rglru_ref

    monkeypatch.setenv("TRITON_INTERPRET", "1")                # run here, not in a fresh process
    for name in ("SMOKE", "DEVICE", "DTYPE", "TOKENS", "CHECK_SHAPE"):
        monkeypatch.setattr(scan, name, getattr(scan, name))  # restored after the test
    monkeypatch.setattr(scan, "_ours_scan",
                        lambda b, a: rglru_ref.rglru_scan(b, a * 0.9, return_final_state=False))
    monkeypatch.setattr(scan, "_ours_conv",
                        lambda x, w, bias, act: conv_ref.causal_conv1d(x, w.flip(-1), bias, activation=act))
    out = tmp_path / "bad.json"
    assert scan.main(["--smoke", "--skip-timings", "--no-plot", "--json-out", str(out)]) == 0
    c = json.loads(out.read_text())["correctness"]
    assert not c["rglru_scan"]["hybridize"]["pass"] and not c["rglru_scan"]["hybridize"]["h"]["pass"]
    assert not c["conv1d"]["hybridize"]["pass"] and not c["conv1d"]["hybridize"]["y"]["pass"]
    assert c["conv1d"]["torch_conv1d"]["pass"] and not c["pass"]


def test_bench_plot_rejects_nothing_and_lists(tmp_path, capsys):
    (tmp_path / "decode_x.json").write_text(json.dumps({"decode": [
        {"model": "m", "batch": 1, "context": c, "tokens_per_s": 10.0 + c} for c in (0, 4096)]}))
    assert main(["bench", "plot", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "decode_x.png").exists()
    assert "decode_x.png" in capsys.readouterr().out


def test_bench_quality_quick(tmp_path, capsys):
    """Every phase of the distillation quality study on CPU (tiny sizes): the JSON holds each phase's
    measurements as finite numbers, the saved teacher (bf16 shards) can be reused by a second run."""
    import math

    from hybridize.bench import quality

    teacher_dir = tmp_path / "teacher"
    assert main(["bench", "quality", "--smoke", "--out", str(tmp_path),
                 "--suite-args", f"--phases all --save-teacher {teacher_dir}"]) == 0
    r = json.loads((tmp_path / "quality.json").read_text())
    assert r["finished"] and not r.get("skipped") and not r.get("errors")
    assert r["command"].startswith("python -m hybridize.bench.quality")
    assert r["env"]["torch"] and "triton" in r["env"] and r["phases"] == list(quality.PHASES)

    def finite(*xs):
        return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)

    t = r["teacher"]
    assert finite(t["heldout"]["ppl"], t["tokens"], t["steps"], t["lr"], t["wall_s"]) and t["tokens"] > 0
    for shape in r["throughput"]["shapes"]:
        assert finite(shape["teacher_finetune"]["tokens_per_s"], shape["student_kl_mixers"]["tokens_per_s"],
                      shape["student_kl_mixers_vs_finetune"])
    runs = r["fractions"]["runs"]
    assert set(runs) == {"0.5", "0.25", "0.125", "0"}
    for rec in runs.values():
        assert finite(rec["ppl_ratio"], rec["distilled"]["kl"], rec["converted"]["ppl"], rec["tokens"])
        assert rec["tokens"] == r["fractions"]["tokens_per_run"] and rec["curve"][0]["tokens"] == 0
    assert runs["0.5"]["layer_pattern"].count("attention") == 4
    assert runs["0"]["layer_pattern"].count("attention") == 0
    var = r["init"]["variants"]
    assert {"attention:identity", "random:default"} <= set(var)
    assert len({v["tokens"] for v in var.values()}) == 1 and all(finite(v["ppl_ratio"]) for v in var.values())
    mh = r["mohawk"]["runs"]
    assert [s["kind"] for s in mh["stages_1_2_3"]["stages"]] == ["mohawk1", "mohawk2", "mohawk3"]
    assert mh["stages_1_2_3"]["tokens"] == mh["stage_3_only"]["tokens"] == r["mohawk"]["total_tokens"]
    ex = r["extrapolation"]["models"]
    assert set(ex) == {"teacher", "hawk", "griffin", "hybrid50"}
    assert all(finite(*(x["ppl"] for x in m["lengths"])) for m in ex.values())
    assert set(r["checks"]) >= {"attn0.5_ppl_ratio_le_1.1", "attention_init_beats_random",
                                "mohawk_stages_1_2_then_3_beat_3_alone"}
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"
    saved = t["saved"]
    assert saved["num_files"] <= 6 and saved["largest_file_bytes"] < 15_000_000

    out = tmp_path / "reuse.json"
    assert quality.main(["--quick", "--teacher", str(teacher_dir), "--phases", "throughput",
                         "--json-out", str(out), "--no-plot"]) == 0
    r2 = json.loads(out.read_text())
    assert r2["teacher"]["source"] == str(teacher_dir) and r2["teacher"]["meta"]["tokens"] == t["tokens"]
    assert finite(r2["teacher"]["heldout"]["ppl"]) and "fractions" not in r2


def test_synthetic_suite_survives_a_failing_cell(tmp_path, monkeypatch):
    """A cell that dies with a CUDA error is recorded, the cells after it are skipped (the context is
    gone), and the JSON written so far holds the cells that ran; --tasks limits the experiments."""
    import hybridize.bench.synthetic as syn

    calls = []

    def fake_cell(**kw):
        calls.append(kw["mixer"])
        if len(calls) == 2:
            raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
        return {"task": kw["task"], "mixer": kw["mixer"], "label": kw["mixer"], "width": kw["width"],
                "seq_len": kw["seq_len"],
                "lr": kw["lr"], "accuracy": 0.5, "loss": 1.0}

    monkeypatch.setattr(syn, "train_cell", fake_cell)
    monkeypatch.setattr(syn, "plot", lambda out, path: path)
    out_json = tmp_path / "s.json"
    assert syn.main(["--quick", "--device", "cpu", "--tasks", "mqar", "--json-out", str(out_json),
                     "--plot-out", str(tmp_path / "s.png")]) == 0
    out = json.loads(out_json.read_text())
    assert len(calls) == 2                                     # nothing ran after the CUDA error
    assert out["errors"][0]["cell"].startswith("mqar") and "illegal memory access" in out["errors"][0]["error"]
    assert len(out["mqar_all"]) == 1 and out["skipped"]        # the first cell kept, the rest skipped
    assert out["copy"] == {} and out["induction"] == {}        # --tasks mqar


def test_synthetic_checks_read_claims_across_widths():
    """The MQAR claims hold when Mamba-2 is clearly better where the task is not saturated and never worse
    elsewhere; they fail on a width where it is worse. Results read back from JSON (string keys) work."""
    import json

    from hybridize.bench.synthetic import checks

    def out(m2, m1, ind_att=0.1):
        mqar = [{"label": "attention", "width": w, "accuracy": 1.0} for w in (64, 128)]
        for w, (a16, a64, a256) in m2.items():
            mqar += [{"label": f"mamba2 (N={n})", "width": w, "accuracy": a}
                     for n, a in ((16, a16), (64, a64), (256, a256))]
        mqar += [{"label": "mamba1", "width": w, "accuracy": a} for w, a in m1.items()]
        ind = {k: {"accuracy_by_length": {128: 1.0, 2048: a}} for k, a in
               (("attention", ind_att), ("rglru", 1.0), ("griffin", 0.95))}
        return json.loads(json.dumps({"mqar": mqar, "induction": ind}))       # int keys become strings

    c = checks(out({64: (0.84, 0.88, 0.99), 128: (0.98, 0.99, 1.0)}, {64: 0.04, 128: 0.99}))
    assert c["mqar_attention_solves_every_width"] and c["mqar_mamba2_beats_mamba1"]
    assert c["mqar_mamba2_improves_with_state"] and c["induction_recurrent_extrapolates_transformer_does_not"]
    c = checks(out({64: (0.84, 0.70, 0.99), 128: (0.98, 0.99, 1.0)}, {64: 0.04, 128: 0.99}, ind_att=0.9))
    assert not c["mqar_mamba2_improves_with_state"]                  # N=64 clearly worse than N=16
    assert not c["induction_recurrent_extrapolates_transformer_does_not"]
    c = checks(out({64: (0.5, 0.5, 0.5), 128: (1.0, 1.0, 1.0)}, {64: 0.6, 128: 0.99}))
    assert not c["mqar_mamba2_beats_mamba1"] and not c["mqar_mamba2_improves_with_state"]
