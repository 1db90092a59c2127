"""Probe of Mamba-1's one-token selective-state update (``hybridize.ops.selective_scan.triton_step``):
every launch variant / config of its ``TUNE`` dict at the bench's decode shape (``hybridize.bench.step``'s
MAMBA1: batch 64, d_inner 5120, N 16; bf16 activations), fp32 and bf16 states, timed exactly like the
bench's ``*_rot`` numbers (``_bench_rotating``: CUDA-graph replays cycling through >= 256 MB of distinct
states — no launch overhead, no state left in L2) against the bench's HBM floor and mamba_ssm's
``selective_state_update`` (when importable). Before it is timed, every config's output and updated state
are checked against ``ops/selective_scan/reference.py``'s step on the same inputs; a config that fails to
compile or run is recorded (error + traceback tail), not fatal. After the sweep the fastest configs are
timed again beside the legacy kernel and mamba_ssm (``confirm``: run-to-run noise).

    source benchmarks/gpu_env.sh && python3 benchmarks/mamba1_step_probe.py \
        --json-out $OUT/mamba1_step_probe.json

(~40-60 s on an H100; ``--budget-s`` stops starting new configs after that many seconds, ``--only
fp32|bf16`` runs one state dtype.) ``--smoke`` runs the script on a CPU under the Triton interpreter (tiny
shape, no timings) to test it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

from hybridize.bench import step as bench      # the bench's shape, inputs and timing helpers
from hybridize.bench.utils import Budget, err, results_saver

#: name → TUNE overrides (on top of the module's shipped TUNE), in priority order (the budget may cut the
#: tail). "legacy" is the first kernel; "default" is TUNE as shipped.
CONFIGS = [
    ("legacy", None),                                    # LEGACY_TUNE
    ("default", {}),
    ("tile r2 t2048 w4 no-fence", dict(variant="tile", rows=2, tile=2048, warps=4, fence=False)),
    ("tile r1 t2048 w4", dict(variant="tile", rows=1, tile=2048, warps=4)),
    ("tile r1 t512 w4", dict(variant="tile", rows=1, tile=512, warps=4)),      # mamba_ssm's block (32 x 16)
    ("tile r1 t1024 w4", dict(variant="tile", rows=1, tile=1024, warps=4)),
    ("tile r2 t1024 w4", dict(variant="tile", rows=2, tile=1024, warps=4)),
    ("tile r4 t2048 w8", dict(variant="tile", rows=4, tile=2048, warps=8)),
    ("tile r2 t2048 w8", dict(variant="tile", rows=2, tile=2048, warps=8)),
    ("tile r4 t2048 w4", dict(variant="tile", rows=4, tile=2048, warps=4)),
    ("tile r4 t4096 w8", dict(variant="tile", rows=4, tile=4096, warps=8)),
    ("tile r8 t1024 w8", dict(variant="tile", rows=8, tile=1024, warps=8)),
    ("tile r2 t2048 w4 no-evict", dict(variant="tile", rows=2, tile=2048, warps=4, evict_first=False)),
    ("tile r2 t2048 w4 st.cs", dict(variant="tile", rows=2, tile=2048, warps=4, store_cache=".cs")),
    ("tile r2 t2048 w4 ld.cg", dict(variant="tile", rows=2, tile=2048, warps=4, load_cache=".cg")),
    ("tile r1 t512 w4 no-evict", dict(variant="tile", rows=1, tile=512, warps=4, evict_first=False)),
    ("tile r1 t512 w4 no-fence", dict(variant="tile", rows=1, tile=512, warps=4, fence=False)),
    # persistent grids sized to the occupancy the sm_90 build allows (registers: see "kernels" in the JSON)
    ("persistent r2 t2048 w4 p4", dict(variant="persistent", rows=2, tile=2048, warps=4, programs_per_sm=4)),
    ("persistent r1 t1024 w4 p6", dict(variant="persistent", rows=1, tile=1024, warps=4, programs_per_sm=6)),
    ("persistent r1 t512 w4 p8", dict(variant="persistent", rows=1, tile=512, warps=4, programs_per_sm=8)),
]


def _floor_bytes(B, C, N, sdt, act):
    """The bench's Mamba-1 floor (hybridize.bench.step.time_mamba1_step): state read + write, A once,
    u / delta / z / y, B and C."""
    e = act.itemsize
    return 2 * B * C * N * sdt.itemsize + C * N * 4 + B * C * e * 4 + 2 * B * N * e


def _inputs():
    """The bench's Mamba-1 inputs (same generator seed and recipe as time_mamba1_step)."""
    B, C, N = bench.MAMBA1["B"], bench.MAMBA1["C"], bench.MAMBA1["N"]
    g = bench._gen(9)
    r = lambda *s: torch.randn(*s, device=bench.DEVICE, generator=g)  # noqa: E731
    u, delta = r(B, C).to(bench.ACT), (r(B, C) * 0.5 - 1).to(bench.ACT)
    A = -torch.exp(r(C, N) * 0.5)
    Bm, Cm = (r(B, N) / 4).to(bench.ACT), (r(B, N) / 4).to(bench.ACT)
    D, z, bias = torch.ones(C, device=bench.DEVICE), r(B, C).to(bench.ACT), r(C) * 0.3
    return (u, delta, A, Bm, Cm), dict(D=D, z=z, delta_bias=bias, delta_softplus=True), r


def _kernel_stats(ks, seen):
    """Registers / spills of the step kernels compiled since the last call (Triton's per-device cache)."""
    out = []
    try:
        for fn in (ks._ss_tile_kernel, ks._ss_step_kernel):
            for dev_cache in getattr(fn, "device_caches", {}).values():     # none under the interpreter
                for key, k in dev_cache[0].items():
                    if (fn.__name__, key) in seen:
                        continue
                    seen.add((fn.__name__, key))
                    out.append({"kernel": fn.__name__, "n_regs": getattr(k, "n_regs", None),
                                "n_spills": getattr(k, "n_spills", None),
                                "num_warps": getattr(k.metadata, "num_warps", None)})
    except Exception as e:      # Triton internals moved: not worth failing the probe
        out.append({"error": err(e)})
    return out


def run_dtype(sdt, results, save, budget, ssu):
    from hybridize.ops.selective_scan import reference as ss_ref
    from hybridize.ops.selective_scan import triton_step as ks

    name = str(sdt).split(".")[-1] + "_state"
    out = results.setdefault(name, {})
    B, C, N = bench.MAMBA1["B"], bench.MAMBA1["C"], bench.MAMBA1["N"]
    args, kw, r = _inputs()
    floor = _floor_bytes(B, C, N, sdt, bench.ACT) / bench.HBM_BW * 1e3
    out["hbm_floor_ms"] = floor
    s0 = (r(B, C, N) * 0.1).to(sdt)
    s_ref = s0.clone()
    y_ref = ss_ref.selective_scan_step(*args, s_ref, **kw)
    tol = 1e-4 if sdt == torch.float32 else 2e-2

    def check(fn):
        s = s0.clone()
        y = fn(s)
        rec = {"y": bench._errs(y, y_ref), "state": bench._errs(s, s_ref)}
        rec["pass"] = rec["state"]["rel_to_max"] < tol and rec["y"]["rel_to_max"] < 2e-2
        return rec

    nb = s0.numel() * s0.element_size()
    n_states = 1 if bench.SMOKE else max(2, min(512, -(-bench.L2_SPAN // nb)))
    states = [s0.clone() for _ in range(n_states)]
    u, delta, A, Bm, Cm = args

    def ours(s):
        return ks.selective_scan_step_triton(u, delta, A, Bm, Cm, s, **kw)

    def rot(call):            # call(state) → y; timed over the rotating states
        return bench._bench_rotating(lambda i: (lambda s: lambda: call(s))(states[i % n_states]), nb)

    shipped = dict(ks.TUNE)
    seen = set()
    _kernel_stats(ks, seen)
    configs = out.setdefault("configs", [])
    tunes = {}
    # mamba_ssm first (the number to beat)
    if ssu is not None and not bench.SMOKE:
        rec = out.setdefault("mamba_ssm", {})
        mcall = lambda s: ssu(s, u, delta, A, Bm, Cm, D=kw["D"], z=kw["z"], dt_bias=kw["delta_bias"],  # noqa: E731
                              dt_softplus=True)
        try:
            rec["check"] = check(mcall)
            rec["rot_ms"] = rot(mcall)
            rec["vs_floor"] = rec["rot_ms"] / floor
        except Exception as e:
            rec["error"] = err(e)
        save()
    m_ms = out.get("mamba_ssm", {}).get("rot_ms")
    try:
        for cname, over in CONFIGS:
            if not budget.ok(3):
                configs.append({"name": cname, "skipped": "time budget"})
                continue
            tune = dict(shipped, **(ks.LEGACY_TUNE if over is None else over))
            if any(t == tune for t in tunes.values()):          # e.g. a config equal to the shipped default
                configs.append({"name": cname, "same_as": next(k for k, t in tunes.items() if t == tune)})
                continue
            tunes[cname] = tune
            rec = {"name": cname, "tune": tune}
            if tune.get("variant") != "legacy":
                rec["block"] = dict(zip(("rows", "channels", "states"), ks.tile_shape(B, C, N, tune)))
            configs.append(rec)
            ks.TUNE.clear()
            ks.TUNE.update(tune)
            try:
                t0 = time.time()
                rec["check"] = check(ours)
                rec["compile_and_check_s"] = round(time.time() - t0, 2)
                rec["kernels"] = _kernel_stats(ks, seen)
                if not rec["check"]["pass"]:
                    rec["error"] = "wrong result (see check)"
                else:
                    rec["rot_ms"] = rot(ours)
                    if rec["rot_ms"]:
                        rec["vs_floor"] = rec["rot_ms"] / floor
                        if m_ms:
                            rec["speedup_vs_mamba_ssm"] = m_ms / rec["rot_ms"]
            except Exception as e:
                rec["error"] = err(e)
                rec["trace"] = traceback.format_exc()[-1500:]
            line = (f"{rec['rot_ms']:.4f} ms ({rec['vs_floor']:.3f}x floor)" if rec.get("rot_ms")
                    else rec.get("error", "untimed"))
            print(f"[{name}] {cname}: {line}", flush=True)
            save()
        timed = sorted((c for c in configs if c.get("rot_ms")), key=lambda c: c["rot_ms"])
        if timed:
            out["best"] = {k: timed[0][k] for k in ("name", "tune", "rot_ms", "vs_floor") if k in timed[0]}
        # confirm: the three fastest again, beside legacy and mamba_ssm (run-to-run noise)
        if timed and budget.ok(3) and not bench.SMOKE:
            conf = out.setdefault("confirm", {})
            names = [c["name"] for c in timed[:3]]
            if "legacy" in tunes and "legacy" not in names:
                names.append("legacy")
            for cname in names:
                if not budget.ok(1):
                    break
                ks.TUNE.clear()
                ks.TUNE.update(tunes[cname])
                try:
                    conf[cname] = rot(ours)
                except Exception as e:
                    conf[cname] = err(e)
            if ssu is not None and "rot_ms" in out.get("mamba_ssm", {}):
                try:
                    conf["mamba_ssm"] = rot(lambda s: ssu(s, u, delta, A, Bm, Cm, D=kw["D"], z=kw["z"],
                                                          dt_bias=kw["delta_bias"], dt_softplus=True))
                except Exception as e:
                    conf["mamba_ssm"] = err(e)
            save()
    finally:
        ks.TUNE.clear()
        ks.TUNE.update(shipped)
        states.clear()
    _print_table(name, out)


def _print_table(name, out):
    floor = out["hbm_floor_ms"]
    m = out.get("mamba_ssm", {})
    ms = f"; mamba_ssm {m['rot_ms'] * 1e3:.2f} us ({m['rot_ms'] / floor:.3f}x)" if m.get("rot_ms") else ""
    print(f"\n{name}: HBM floor {floor * 1e3:.2f} us{ms}")
    print(f"  {'config':32s} {'us':>8s} {'x floor':>8s} {'vs mamba':>9s} {'check':>6s} {'regs':>5s}")
    for c in out.get("configs", []):
        if not c.get("rot_ms"):
            why = c.get("error") or c.get("skipped") or (f"= {c['same_as']}" if "same_as" in c else "untimed")
            print(f"  {c['name']:32s} {why}")
            continue
        regs = ",".join(str(k.get("n_regs")) for k in c.get("kernels", []) if "n_regs" in k) or "-"
        vs_m = f"{c['speedup_vs_mamba_ssm']:.3f}" if "speedup_vs_mamba_ssm" in c else "-"
        print(f"  {c['name']:32s} {c['rot_ms'] * 1e3:8.2f} {c['vs_floor']:8.3f} {vs_m:>9s} "
              f"{str(c['check']['pass']):>6s} {regs:>5s}")
    if out.get("confirm"):
        print("  confirm: " + ", ".join(f"{k} {v * 1e3:.2f} us" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in out["confirm"].items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json-out", required=True)
    ap.add_argument("--budget-s", type=float, default=55.0,
                    help="start no new config after this many seconds")
    ap.add_argument("--only", choices=("fp32", "bf16"), help="one state dtype")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shape, no timings")
    args = ap.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":      # kernels must be decorated under the interpreter
            import subprocess
            return subprocess.call([sys.executable, os.path.abspath(__file__),
                                    *(sys.argv[1:] if argv is None else argv)],
                                   env=dict(os.environ, TRITON_INTERPRET="1"))
        bench._enter_smoke_mode()
    results = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
               "shape": dict(bench.MAMBA1), "activations": str(bench.ACT), "hbm_bw_bytes_per_s": bench.HBM_BW,
               "method": "hybridize.bench.step._bench_rotating (CUDA-graph replays over >= 256 MB of states)"}
    save = results_saver(results, args.json_out, smoke=bench.SMOKE)
    if save is None:
        return 1
    budget = Budget(args.budget_s)
    results["env"] = bench._env()
    try:
        ssu = None if bench.SMOKE else bench._import_mamba_ssu()
    except Exception as e:
        ssu = None
        results["mamba_ssm_import_error"] = err(e)
    save()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    keys = [args.only] if args.only else ["fp32", "bf16"]
    for i, key in enumerate(keys):
        try:                    # each state dtype gets an equal share of what is left
            run_dtype(dtypes[key], results, save, Budget(budget.left() / (len(keys) - i)), ssu)
        except Exception as e:
            results[key + "_error"] = err(e) + "\n" + traceback.format_exc()[-2000:]
        save()
    results["wall_s"] = round(time.time() - budget.t0, 1)
    save()
    print(f"\nwrote {args.json_out} ({results['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
