"""GPU probe of the causal depthwise conv1d backward: the streamed "rows" backward (the default) vs the
previous "tiles" backward, and launch configurations of the rows kernel (``hybridize.ops.conv1d.triton
._TUNE``).

    source benchmarks/gpu_env.sh
    python3 benchmarks/conv_probe.py --json-out $OUT/conv_probe_h100.json          # H100, ~1-2 min
    python3 benchmarks/conv_probe.py --json-out c.json --variants tiles rows --lengths 2048
    python3 benchmarks/conv_probe.py --smoke --json-out /tmp/c.json                # CPU: runs the script

What is measured, at each L in ``--lengths`` (512 2048 8192 16384), batch = 16384 / L, C = 2560, bf16,
width 4, SiLU, bias (the shape of ``hybridize bench scan``'s conv section):
* ``forward``: the forward alone (the same kernel for every variant; timed once per L);
* per variant: ``bwd`` = the backward launches alone (``_bwd_impl`` on x, dy: kernel(s) + the dweight
  reduction; no d final_state, as autograd passes when the final state is unused), and ``fwd_bwd`` =
  forward + ``torch.autograd.grad(y, (x, weight, bias), dy)`` (what the scan bench reports);
each as CUDA-graph replay, median (``hybridize.bench.scan._measure``: GPU time without launch overhead;
``*_events_ms``: triton do_bench, L2 flushed), with the HBM floor (÷ ``--hbm-bw`` 3.35e12 B/s):
forward read x + write y = 2·N·C·e, backward read x, dy + write dx = 3·N·C·e, fwd_bwd = 5·N·C·e
(``hybridize.bench.scan.conv_floor_bytes``), and ``*_vs_floor`` = time / floor.
Correctness, per variant, before its timings: vs the fp32 reference on the same bf16 values,
relative Frobenius error < 2e-2 for y, dx, dweight, dbias at the timing size (B=4, L=4096), and an
``edge`` case (B=2, L=777, C=2000: channel tail, initial state, packed documents, the final state in
the loss: also d initial_state). A variant that fails to compile or run is recorded with its error
(and the run goes on; an illegal memory access poisons the CUDA context, so later variants then fail
too — run them alone with ``--variants``).

Output: a table per L on stdout and JSON (rewritten after every measurement): ``variants`` (the _TUNE
overrides), ``geometry`` (grid / chunk of the rows kernel per variant and L), ``correctness``,
``records`` (one per L x variant), ``summary`` (per L: the fastest passing variant, its ratios, and
rows default / tiles speedups), ``env``.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
import traceback

import torch

from hybridize.bench import scan as S
from hybridize.bench.utils import Budget, err, write_json

# _TUNE overrides: "bwd_impl" and keys of the rows kernel's config (merged into its defaults). Each rows
# variant's warps_per_sm is what its registers allow on an H100 (65536 / 32 / registers rounded up to 8;
# static sm_90 SASS, triton 3.6 and 3.9: default 128 registers -> 16 warps), so that all programs run
# in one wave; the JSON records the registers the GPU's triton produced (n_regs).
VARIANTS = {
    "tiles": {"bwd_impl": "tiles"},                       # the previous backward
    "rows": {},                                           # the defaults: 128 regs, 16 warps / SM
    "rows_nopf": {"prefetch": False, "warps_per_sm": 20},              # 96 regs
    "rows_r2": {"rows": 2},                                            # 128 regs
    "rows_r8": {"rows": 8, "warps_per_sm": 8},                         # 184-244 regs
    "rows_r8_nopf": {"rows": 8, "prefetch": False, "warps_per_sm": 14},  # 137 regs
    "rows_sm12": {"warps_per_sm": 12},                                 # fewer, longer programs
    "rows_sm32": {"warps_per_sm": 32},                                 # two waves, halved chunks
    "rows_c256_w2": {"block_c": 256, "num_warps": 2},                  # 2-warp programs, 128 regs
    "rows_c64": {"block_c": 64, "warps_per_sm": 28},                   # 2 channels / thread, 64-68 regs
    "rows_exact_sigmoid": {"fast_sigmoid": False, "warps_per_sm": 15},  # tl.sigmoid: 128-130 regs
}
TOKENS, WIDTH, CONV_W = 16384, 2560, 4
LENGTHS = [512, 2048, 8192, 16384]
CHECK = (4, 4096)                 # (B, L) of the main correctness check (C = --width)
EDGE = (2, 777, 2000)             # (B, L, C) of the edge-case check
TOL = 2e-2


def _kern():
    from hybridize.ops.conv1d import triton as kern
    return kern


def _apply(kern, base, over):
    """Restore _TUNE to `base`, then apply a variant's overrides (to the CPU config too under --smoke)."""
    kern._TUNE.clear()
    kern._TUNE.update(copy.deepcopy(base))
    rows = {k: v for k, v in over.items() if k != "bwd_impl"}
    if "bwd_impl" in over:
        kern._TUNE["bwd_impl"] = over["bwd_impl"]
    kern._TUNE["bwd_rows"].update(rows)
    if S.SMOKE:
        kern._TUNE["bwd_rows_interp"].update({k: v for k, v in rows.items() if k != "fast_sigmoid"})


def _geometry(kern, B, L, C):
    if kern._TUNE["bwd_impl"] == "tiles":
        return {"impl": "tiles"}
    g = kern._rows_config(B, L, C, CONV_W, torch.device(S.DEVICE))
    g["programs"] = B * g["n_split"] * g["n_cblk"]
    g["partial_bytes"] = B * g["n_split"] * (kern._BLOCK_W + 1) * C * 4
    return g


def _grads(kern, x, w, bias, st, si, dy, dfin):
    """Kernel: y, dx, dweight, dbias (+ d initial_state) through autograd, as training calls it."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, bias)]
    stl = st.detach().clone().requires_grad_() if st is not None else None
    y, fin = kern.causal_conv1d_triton(*leaves, initial_state=stl, seq_idx=si, activation="silu",
                                       return_final_state=True)
    loss = (y.float() * dy.float()).sum() + ((fin.float() * dfin.float()).sum() if dfin is not None else 0)
    ins = leaves + ([stl] if stl is not None else [])
    out = dict(zip(("dx", "dweight", "dbias", "dinit"), torch.autograd.grad(loss, ins)))
    out["y"] = y
    return out


def _reference(x, w, bias, st, si, dy, dfin):
    from hybridize.ops.conv1d.reference import causal_conv1d
    leaves = [t.detach().float().requires_grad_() for t in (x, w, bias)]
    stl = st.detach().float().requires_grad_() if st is not None else None
    y, fin = causal_conv1d(*leaves, initial_state=stl, seq_idx=si, activation="silu", return_final_state=True)
    loss = (y * dy.float()).sum() + ((fin * dfin.float()).sum() if dfin is not None else 0)
    ins = leaves + ([stl] if stl is not None else [])
    out = dict(zip(("dx", "dweight", "dbias", "dinit"), torch.autograd.grad(loss, ins)))
    out["y"] = y.detach()
    return out


def _cases(C):
    """[(name, inputs, fp32 reference)] of the correctness checks."""
    B, L = CHECK
    if S.SMOKE:
        B, L = 2, 40
    x, w, bias, dy = S._conv_inputs(B, L, C, CONV_W, seed=2)
    main = (x, w, bias, None, None, dy, None)
    Be, Le, Ce = EDGE if not S.SMOKE else (2, 29, C)
    xe, we, be, dye = S._conv_inputs(Be, Le, Ce, CONV_W, seed=3)
    g = torch.Generator(device=S.DEVICE).manual_seed(4)
    st = torch.randn(Be, Ce, CONV_W - 1, device=S.DEVICE, generator=g).to(S.DTYPE)
    dfin = torch.randn(Be, Ce, CONV_W - 1, device=S.DEVICE, generator=g).to(S.DTYPE)
    si = torch.zeros(Be, Le, dtype=torch.long, device=S.DEVICE)
    for t in (1, Le // 3, Le // 3 + 1, Le - 2):        # documents: short ones, one in the last W-1
        si[0, t:] += 1
    si[1, Le // 2:] += 1
    edge = (xe, we, be, st, si, dye, dfin)
    return [(name, args, _reference(*args)) for name, args in (("main", main), ("edge", edge))]


def check_variant(kern, cases):
    out = {}
    for name, args, want in cases:
        try:
            got = _grads(kern, *args)
            if S.DEVICE == "cuda":
                torch.cuda.synchronize()
            out[name] = {k: S._errs(got[k], want[k], TOL) for k in want}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": err(e), "trace": traceback.format_exc()[-1500:]}
            if S.DEVICE == "cuda":
                torch.cuda.synchronize()
    out["pass"] = all(isinstance(v, dict) and "error" not in v and all(r["pass"] for r in v.values())
                      for k, v in out.items() if k != "pass")
    return out


def _time(rec, key, fn):
    try:
        m = S._measure(fn)
    except Exception as e:  # noqa: BLE001
        m = {"error": err(e)}
    for k, v in m.items():
        rec[f"{key}_{k}"] = v


def time_length(kern, base, results, save, budget, L, C, variants, hbm_bw):
    B = max(1, TOKENS // L)
    e = S.DTYPE.itemsize
    fwd_b, fb_b = S.conv_floor_bytes(B * L, C, e)
    floors = {"fwd": fwd_b / hbm_bw * 1e3, "bwd": (fb_b - fwd_b) / hbm_bw * 1e3,
              "fwd_bwd": fb_b / hbm_bw * 1e3}
    x, w, bias, dy = S._conv_inputs(B, L, C, CONV_W)
    _apply(kern, base, {})
    fwd = {"variant": "forward", "L": L, "B": B, "C": C, **{f"{m}_floor_ms": v for m, v in floors.items()}}
    results["records"].append(fwd)

    def f():
        with torch.no_grad():
            return kern.causal_conv1d_triton(x, w, bias, activation="silu")
    _time(fwd, "fwd", f)
    recs = {}
    for name in variants:
        rec = {"variant": name, "L": L, "B": B, "C": C, **{f"{m}_floor_ms": v for m, v in floors.items()}}
        results["records"].append(rec)
        recs[name] = rec
        chk = results["correctness"].get(name, {})
        if any(isinstance(v, dict) and "error" in v for v in chk.values()):
            rec["skipped"] = "raised in the correctness check"
            continue
        if not chk.get("pass"):
            rec["correctness_failed"] = True    # timed anyway; the summary ignores it
        if not budget.ok(10):
            rec["skipped"] = "time budget"
            continue
        _apply(kern, base, VARIANTS[name])
        results["geometry"].setdefault(name, {})[str(L)] = _geometry(kern, B, L, C)
        leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
        _time(rec, "bwd", lambda: kern._bwd_impl(x, w, bias, None, None, dy, None, True))
        _time(rec, "fwd_bwd", lambda leaves=leaves: torch.autograd.grad(
            kern.causal_conv1d_triton(*leaves, activation="silu"), leaves, dy))
        k = kern._LAUNCHED.get("bwd_rows") if name != "tiles" else None
        if k is not None:      # registers decide how many 1-warp programs fit on an SM (65536 / 32 / regs)
            rec["n_regs"], rec["n_spills"] = getattr(k, "n_regs", None), getattr(k, "n_spills", None)
        for m in ("bwd", "fwd_bwd"):
            ms = rec.get(f"{m}_ms")
            if isinstance(ms, float):
                rec[f"{m}_vs_floor"] = ms / floors[m]
        save()
    _apply(kern, base, {})
    fwd_ms = fwd.get("fwd_ms")
    if isinstance(fwd_ms, float):
        fwd["fwd_vs_floor"] = fwd_ms / floors["fwd"]
    _table(L, B, fwd, recs, floors)
    return recs


def _fmt(v, spec=".4f"):
    return format(v, spec) if isinstance(v, float) else "-"


def _table(L, B, fwd, recs, floors):
    tiles = recs.get("tiles", {})
    print(f"\nL={L} B={B}: forward {_fmt(fwd.get('fwd_ms'))} ms = "
          f"{_fmt(fwd.get('fwd_vs_floor'), '.2f')}x floor ({floors['fwd']:.4f}); "
          f"floors: bwd {floors['bwd']:.4f}, fwd+bwd {floors['fwd_bwd']:.4f} ms")
    print(f"  {'variant':<20} {'bwd ms':>9} {'/floor':>7} {'fwd+bwd ms':>11} {'/floor':>7} "
          f"{'vs tiles':>9}  note")
    for name, r in recs.items():
        a, b = tiles.get("fwd_bwd_ms"), r.get("fwd_bwd_ms")
        sp = a / b if isinstance(a, float) and isinstance(b, float) else None
        if r.get("n_regs"):
            sp_note = f"{r['n_regs']} regs" + (f", {r['n_spills']} spills" if r.get("n_spills") else "")
        else:
            sp_note = ""
        note = sp_note + " " + (r.get("skipped") or r.get("bwd_error") or r.get("fwd_bwd_error")
                or ("FAILED the correctness check" if r.get("correctness_failed") else ""))
        print(f"  {name:<20} {_fmt(r.get('bwd_ms')):>9} {_fmt(r.get('bwd_vs_floor'), '.2f'):>7} "
              f"{_fmt(r.get('fwd_bwd_ms')):>11} {_fmt(r.get('fwd_bwd_vs_floor'), '.2f'):>7} "
              f"{_fmt(sp, '.2f'):>9}  {note}", flush=True)


def summarize(results):
    summary = {}
    for L in sorted({r["L"] for r in results["records"]}):
        recs = {r["variant"]: r for r in results["records"] if r["L"] == L}
        ok = {n: r for n, r in recs.items() if n != "forward" and isinstance(r.get("fwd_bwd_ms"), float)
              and not r.get("correctness_failed")}
        row = summary[str(L)] = {"forward_ms": recs.get("forward", {}).get("fwd_ms"),
                                 "forward_vs_floor": recs.get("forward", {}).get("fwd_vs_floor")}
        if ok:
            best = min(ok, key=lambda n: ok[n]["fwd_bwd_ms"])
            row.update(best_fwd_bwd=best, best_fwd_bwd_ms=ok[best]["fwd_bwd_ms"],
                       best_fwd_bwd_vs_floor=ok[best]["fwd_bwd_vs_floor"])
            bb = min((n for n in ok if isinstance(ok[n].get("bwd_ms"), float)), key=lambda n: ok[n]["bwd_ms"],
                     default=None)
            if bb:
                row.update(best_bwd=bb, best_bwd_ms=ok[bb]["bwd_ms"],
                           best_bwd_vs_floor=ok[bb]["bwd_vs_floor"])
            for n in ("rows", "tiles"):
                if n in ok:
                    row[f"{n}_fwd_bwd_vs_floor"] = ok[n]["fwd_bwd_vs_floor"]
                    row[f"{n}_bwd_vs_floor"] = ok[n].get("bwd_vs_floor")
            if "rows" in ok and "tiles" in ok:
                row["rows_speedup_vs_tiles_fwd_bwd"] = ok["tiles"]["fwd_bwd_ms"] / ok["rows"]["fwd_bwd_ms"]
                a, b = ok["tiles"].get("bwd_ms"), ok["rows"].get("bwd_ms")
                if isinstance(a, float) and isinstance(b, float):
                    row["rows_speedup_vs_tiles_bwd"] = a / b
    return summary


def _env():
    import triton
    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "device": S.DEVICE, "smoke": S.SMOKE}
    if torch.cuda.is_available() and S.DEVICE == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    return info


def main(argv=None):
    global TOKENS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json-out", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--hbm-bw", type=float, default=S.HBM_BW)
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no new measurement after this")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, Triton interpreter, tiny shapes: checks the script")
    args = ap.parse_args(argv)
    if args.smoke:
        rc = rerun_under_interpreter_script(argv)
        if rc is not None:
            return rc
        S.SMOKE, S.DEVICE, S.DTYPE = True, "cpu", torch.float16   # the interpreter has no bf16 (as scan)
        TOKENS, args.width = 64, min(args.width, 24)
        args.lengths = [n for n in args.lengths if n <= 64] or [16, 64]
    cmd = [os.path.basename(sys.argv[0])] + list(sys.argv[1:] if argv is None else argv)
    results = {"command": " ".join(cmd),
               "variants": {n: VARIANTS[n] for n in args.variants}, "geometry": {}, "correctness": {},
               "records": [], "shape": {"tokens": TOKENS, "C": args.width, "W": CONV_W,
                                        "dtype": str(S.DTYPE).replace("torch.", ""), "activation": "silu",
                                        "bias": True, "check": CHECK, "edge": EDGE}}
    if not args.smoke and not torch.cuda.is_available():
        results["error"] = "CUDA is not available"
        write_json(results, args.json_out)
        print("CUDA is not available", file=sys.stderr)
        return 1
    results["env"] = _env()

    def save():
        write_json(results, args.json_out)

    kern = _kern()
    base = copy.deepcopy(kern._TUNE)
    results["defaults"] = base
    budget = Budget(args.budget_s)
    t0 = time.time()
    cases = _cases(args.width)
    for name in args.variants:
        _apply(kern, base, VARIANTS[name])
        rec = results["correctness"][name] = check_variant(kern, cases)
        worst = max(((r["rel_fro"], f"{c}.{k}") for c, v in rec.items()
                     if isinstance(v, dict) and "error" not in v for k, r in v.items()), default=None)
        errs = {c: v["error"] for c, v in rec.items() if isinstance(v, dict) and "error" in v}
        print(f"[check] {name}: pass={rec['pass']} worst rel_fro={worst} {errs or ''}", flush=True)
        save()
    _apply(kern, base, {})
    for L in args.lengths:
        time_length(kern, base, results, save, budget, L, args.width, args.variants, args.hbm_bw)
        results["summary"] = summarize(results)
        save()
    results["wall_s"] = time.time() - t0
    results["summary"] = summarize(results)
    save()
    print(f"\nsummary: {results['summary']}\nwrote {args.json_out} ({results['wall_s']:.0f} s)")
    return 0


def rerun_under_interpreter_script(argv):
    """--smoke needs TRITON_INTERPRET=1 before the kernels are decorated: rerun this script with it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    import subprocess
    args = list(sys.argv[1:] if argv is None else argv)
    return subprocess.call([sys.executable, os.path.abspath(__file__), *args],
                           env=dict(os.environ, TRITON_INTERPRET="1"))


if __name__ == "__main__":
    sys.exit(main())
