"""RG-LRU linear scan kernel variants on the GPU: every variant of `hybridize.ops.rglru.triton` (the
single-pass kernels and the decoupled look-back kernels with their tile / step-at-a-time / window /
ticket knobs, set through its `_TUNE` dict) timed forward and forward+backward at the scan suite's
shapes — bf16, C = 2560, 16384 tokens per call, L = 512 2048 8192 16384 (B = 16384 / L) — as
CUDA-graph replay (median; `hybridize.bench.scan._measure`), against the HBM floor
(`hybridize.bench.scan.scan_floor_bytes`), and checked against the fp32 reference
(`hybridize.ops.rglru.reference.rglru_scan` + autograd on the same bf16 inputs; relative Frobenius
error of h, dx, da ≤ 2e-2).

    source benchmarks/gpu_env.sh
    python3 benchmarks/rglru_probe.py --json-out $OUT/rglru_probe_h100.json          # GPU, ~2-3 min
    python3 benchmarks/rglru_probe.py --json-out p.json --variants single lb lb_w1 --lengths 16384
    python3 benchmarks/rglru_probe.py --list          # the variants (the DEFAULT ones run unless --variants)
    python3 benchmarks/rglru_probe.py --smoke --json-out /tmp/p.json   # CPU interpreter: tests this script

Phases: (1) warm-up: every variant runs once per shape (forward, forward+backward) in its own
subprocess, --jobs at a time — Triton compiles in parallel into its disk cache, and a variant that
fails to compile, crashes the context or hangs (a spin-wait that never ends) is recorded as an error
there and not run again; (2) in this process, for each shape: the reference, then each variant that
warmed up: correctness, forward and forward+backward timings. The JSON (--json-out) is rewritten after
every measurement; a measurement that takes longer than --hang-s stops the run (the JSON keeps what was
measured). Output: `records` (one per variant × L: *_ms, *_vs_floor, *_timer, errors, the kernel
plan), `best` (per L and mode: the fastest passing variant), `table` (the printed table), `env`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import torch

from hybridize.bench import scan as S
from hybridize.bench.utils import Budget, err, write_json


def _lb(**kw):
    """A look-back variant: these overrides of the default lb_fwd / lb_bwd configs, for both."""
    return {"fwd_path": "lookback", "bwd_path": "lookback", "lb": kw}


def _rows(**kw):
    return _lb(rows=True, **kw)


#: name -> overrides of hybridize.ops.rglru.triton._TUNE ("lb": merged into lb_fwd and lb_bwd)
VARIANTS = {
    # the single-pass kernels (the default before the look-back kernels), and with 128-byte rows
    "single": {"fwd_path": "single", "bwd_path": "single"},
    "single_c64": {"fwd_path": "single", "bwd_path": "single", "block_c": 64},
    # look-back, one (BLOCK_T, BLOCK_C) tile a chunk kept in registers, tl.associative_scan in the tile
    "lb": _lb(),                                              # the defaults: 64 x 64, 4 warps, window 8
    "lb_w1": _lb(window=1),
    "lb_w16": _lb(window=16),
    "lb_pid": _lb(ticket=False),                              # program id order instead of a ticket
    "lb_hp_early": _lb(hp_early=True),                        # backward: h_{t-1} loaded before the look-back
    "lb_t32c128": _lb(block_t=32, block_c=128),
    "lb_t128c64w8": _lb(block_t=128, num_warps=8),
    "lb_t64c32w2": _lb(block_c=32, num_warps=2),
    "lb_t128c32": _lb(block_t=128, block_c=32),
    "lb_t32c64w2": _lb(block_t=32, num_warps=2),
    "lb_t8c256w1": _lb(block_t=8, block_c=256, num_warps=1, window=1),     # time axis within each thread
    "lb_t16c64x4": _lb(block_t=16, tiles=4, stages=2),        # 64-step chunks of 4 tiles: second walk
    # look-back, chunk walked one step at a time (BLOCK_T rows loaded at once), each thread its channels
    "rows_t16c64w1": _rows(block_t=16, block_c=64, num_warps=1, window=2),
    "rows_t16c128w2": _rows(block_t=16, block_c=128, num_warps=2, window=2),
    "rows_t32c64w1": _rows(block_t=32, block_c=64, num_warps=1, window=1),
    "rows_t8c64x8w1": _rows(block_t=8, block_c=64, num_warps=1, tiles=8, stages=2, window=2),
}
#: run when --variants is not given (the others: --variants all, or by name)
DEFAULT = ["single", "single_c64", "lb", "lb_w1", "lb_pid", "lb_hp_early", "lb_t32c128", "lb_t128c64w8",
           "lb_t64c32w2", "lb_t8c256w1", "lb_t16c64x4", "rows_t16c64w1", "rows_t16c128w2", "rows_t8c64x8w1"]
MODES = ("fwd", "fwd_bwd")
TOL = 2e-2


def _kern():
    from hybridize.ops.rglru import triton as kern
    return kern


_DEFAULT_TUNE = None


def apply_variant(name: str) -> dict:
    """Set _TUNE to its defaults plus the variant's overrides -> the resulting _TUNE (a copy)."""
    global _DEFAULT_TUNE
    kern = _kern()
    if _DEFAULT_TUNE is None:
        _DEFAULT_TUNE = copy.deepcopy(kern._TUNE)
    tune = copy.deepcopy(_DEFAULT_TUNE)
    for k, v in VARIANTS[name].items():
        if k == "lb":
            for which in ("lb_fwd", "lb_bwd"):
                tune[which] = {**tune[which], **v}
        else:
            tune[k] = v
    kern._TUNE.clear()
    kern._TUNE.update(tune)
    return copy.deepcopy(tune)


def _plans(Bsz, L, C):
    kern = _kern()
    out = {}
    for which in ("fwd", "bwd"):
        try:
            out[which] = kern._plan(Bsz, L, C, torch.device(S.DEVICE), which)
        except Exception as e:  # noqa: BLE001
            out[which] = {"error": err(e)}
    return out


def _callables(Bsz, L, C, seed=0):
    """(fwd, leaves, dh): fwd() -> h of the kernel on the suite's inputs (bf16, a in (0.5, 1))."""
    kern = _kern()
    a, b, dh = S._scan_inputs(Bsz, L, C, seed=seed)
    aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
    return (lambda: kern.rglru_scan_triton(bb, aa, return_final_state=False)), (bb, aa), dh


# ------------------------------------------------------------------------------------------ warm-up
def worker(name: str, lengths, C: int) -> int:
    """Run variant `name` once per shape (forward, then forward+backward); one JSON line per shape."""
    apply_variant(name)
    for L in lengths:
        Bsz = max(1, S.TOKENS // L)
        rec = {"L": L}
        t0 = time.time()
        try:
            fwd, leaves, dh = _callables(Bsz, L, C)
            with torch.no_grad():
                fwd()
            torch.autograd.grad(fwd(), leaves, dh)
            if S.DEVICE == "cuda":
                torch.cuda.synchronize()
            rec["ok"] = True
        except Exception as e:  # noqa: BLE001
            rec["ok"], rec["error"] = False, err(e)
            rec["trace"] = traceback.format_exc()[-1500:]
        rec["s"] = round(time.time() - t0, 1)
        print("WARM " + json.dumps(rec), flush=True)
        if not rec["ok"] and "CUDA" in rec.get("error", "") and S.DEVICE == "cuda":
            return 1   # the context may be poisoned: the remaining shapes would fail for no reason
    return 0


def warm_up(names, lengths, C, jobs, timeout, smoke=False):
    """{name: {L: {"ok": ..., "error": ..., "s": ...}}} from one subprocess per variant."""
    out = {}
    lock = threading.Lock()

    def one(name):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--width", str(C),
               "--lengths", *map(str, lengths), "--json-out", os.devnull, *(["--smoke"] if smoke else [])]
        res = {}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
            for line in proc.stdout.splitlines():
                if line.startswith("WARM "):
                    r = json.loads(line[5:])
                    res[r.pop("L")] = r
            missing = [L for L in lengths if L not in res]
            if missing:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
                for L in missing:
                    res[L] = {"ok": False, "error": f"worker exited {proc.returncode} before this shape: {tail}"}
        except subprocess.TimeoutExpired:
            for L in lengths:
                res.setdefault(L, {"ok": False, "error": f"warm-up timeout ({timeout:g} s): a hang?"})
        with lock:
            out[name] = res
            bad = {L: r.get("error") for L, r in res.items() if not r.get("ok")}
            print(f"[warm-up] {name}: " + ("ok" if not bad else f"errors {bad}"), flush=True)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(one, names))
    return out


# ------------------------------------------------------------------------------------------ measurement
def reference(Bsz, L, C):
    """fp32 reference h, dx, da of the suite's bf16 inputs (the sequential loop + autograd)."""
    from hybridize.ops.rglru.reference import rglru_scan
    a, b, dh = S._scan_inputs(Bsz, L, C, seed=0)
    a32, b32 = a.float().requires_grad_(), b.float().requires_grad_()
    h = rglru_scan(b32, a32, return_final_state=False)
    db, da = torch.autograd.grad(h, (b32, a32), dh.float())
    return {"h": h.detach(), "dx": db, "da": da}


def check(fwd, leaves, dh, ref):
    h = fwd()
    dx, da = torch.autograd.grad(h, leaves, dh)
    out = {k: S._errs(v, ref[k], TOL) for k, v in (("h", h), ("dx", dx), ("da", da))}
    out["pass"] = all(v["pass"] for v in out.values())
    return out


class Watchdog:
    """os._exit(3) (after a last save) when one measurement runs longer than `seconds`: a look-back
    kernel whose spin-wait never ends would otherwise hang the run."""

    def __init__(self, seconds, save, results):
        self.seconds, self.save, self.results = seconds, save, results
        self.what, self.t0 = None, None
        threading.Thread(target=self._run, daemon=True).start()

    def start(self, what):
        self.what, self.t0 = what, time.time()

    def stop(self):
        self.what = None

    def _run(self):
        while True:
            time.sleep(1.0)
            if self.what is not None and time.time() - self.t0 > self.seconds:
                self.results["hang"] = f"{self.what}: no result after {self.seconds:g} s; run stopped"
                print("[probe] " + self.results["hang"], flush=True)
                try:
                    self.save()
                finally:
                    os._exit(3)


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else format("-", ">" + spec.split(".")[0])


def table(results, lengths):
    recs = results["records"]
    lines = []
    for L in lengths:
        rs = [r for r in recs if r["L"] == L]
        if not rs:
            continue
        r0 = rs[0]
        lines.append(f"L={L} B={r0['B']} C={r0['C']}: floor fwd {r0['fwd_floor_ms']:.4f} ms, "
                     f"fwd+bwd {r0['fwd_bwd_floor_ms']:.4f} ms")
        lines.append(f"  {'variant':<16} {'fwd ms':>8} {'x floor':>7} {'f+b ms':>8} {'x floor':>7} "
                     f"{'max rel err':>11} ok")
        for r in rs:
            c = r.get("correctness", {})
            worst = max((v["rel_fro"] for k, v in c.items() if isinstance(v, dict)), default=None)
            ok = "yes" if c.get("pass") else ("ERR" if "error" in r or "correctness_error" in r else "no")
            lines.append(f"  {r['variant']:<16} {_fmt(r.get('fwd_ms'), '8.4f')} {_fmt(r.get('fwd_vs_floor'), '7.2f')} "
                         f"{_fmt(r.get('fwd_bwd_ms'), '8.4f')} {_fmt(r.get('fwd_bwd_vs_floor'), '7.2f')} "
                         f"{_fmt(worst, '11.2e')} {ok}"
                         + (f"  [{(r.get('error') or r.get('correctness_error') or '')[:90]}]"
                            if ok == "ERR" else ""))
    for mode in MODES:
        row = ", ".join(f"L={L}: {b['variant']} {b['vs_floor']:.2f}x" for L, b in
                        ((L, results["best"].get(str(L), {}).get(mode)) for L in lengths) if b)
        lines.append(f"best {mode}: {row}")
    return "\n".join(lines)


def best(results):
    out = {}
    for r in results["records"]:
        if not r.get("correctness", {}).get("pass"):
            continue
        for mode in MODES:
            ms = r.get(f"{mode}_ms")
            cur = out.setdefault(str(r["L"]), {}).get(mode)
            if isinstance(ms, float) and (cur is None or ms < cur["ms"]):
                out[str(r["L"])][mode] = {"variant": r["variant"], "ms": ms, "vs_floor": r[f"{mode}_vs_floor"]}
    # one variant for all L: the smallest worst-case ratio to the floor
    names = sorted({r["variant"] for r in results["records"]})
    for mode in MODES:
        worst = {}
        for n in names:
            rs = [r for r in results["records"] if r["variant"] == n]
            vals = [r.get(f"{mode}_vs_floor") for r in rs]
            if rs and all(isinstance(v, float) for v in vals) and all(r.get("correctness", {}).get("pass") for r in rs):
                worst[n] = max(vals)
        if worst:
            n = min(worst, key=worst.get)
            out.setdefault("all_lengths", {})[mode] = {"variant": n, "worst_vs_floor": worst[n]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json-out", default="rglru_probe.json")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="names, or 'all' (default: the DEFAULT list; --list shows them all)")
    ap.add_argument("--lengths", type=int, nargs="*", default=S.LENGTHS)
    ap.add_argument("--width", type=int, default=S.WIDTH)
    ap.add_argument("--tokens", type=int, default=S.TOKENS)
    ap.add_argument("--hbm-bw", type=float, default=S.HBM_BW)
    ap.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    ap.add_argument("--jobs", type=int, default=None,
                    help="warm-up subprocesses at once (default: min(16, CPUs); --smoke: 0 = no warm-up)")
    ap.add_argument("--warm-timeout", type=float, default=240.0, help="per variant (all shapes), seconds")
    ap.add_argument("--hang-s", type=float, default=90.0, help="one measurement longer than this stops the run")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no new variant after this many seconds")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes (tests this script)")
    args = ap.parse_args(argv)
    if args.list:
        for n, v in VARIANTS.items():
            print(f"{n:<16} {'default' if n in DEFAULT else 'extra  '} {json.dumps(v)}")
        return 0
    S.TOKENS = args.tokens
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":   # triton reads it when the kernels are decorated
            return subprocess.call([sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)],
                                   env=dict(os.environ, TRITON_INTERPRET="1"))
        S.SMOKE, S.DEVICE, S.DTYPE = True, "cpu", torch.float16
        S.TOKENS = args.tokens = 64
        args.lengths = [n for n in args.lengths if n <= 64] or [16, 64]
        args.width = min(args.width, 24)
        args.jobs = 0 if args.jobs is None else args.jobs
        if args.variants is None:
            args.variants = ["single", "lb", "lb_w1", "lb_t16c64x4", "rows_t16c64w1"]
    if args.worker:
        return worker(args.worker, args.lengths, args.width)
    args.jobs = min(16, os.cpu_count() or 1) if args.jobs is None else args.jobs

    names = list(VARIANTS) if args.variants == ["all"] else (args.variants or DEFAULT)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; --list shows them", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and not args.smoke:
        write_json({"error": "CUDA is not available"}, args.json_out)
        print("CUDA is not available", file=sys.stderr)
        return 1
    import triton
    C = args.width
    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "device": S.DEVICE, "smoke": bool(args.smoke)}
    if S.DEVICE == "cuda":
        env.update(gpu=torch.cuda.get_device_name(0), sms=torch.cuda.get_device_properties(0).multi_processor_count,
                   cuda=torch.version.cuda)
    results = {"command": " ".join(["python3 benchmarks/rglru_probe.py", *(sys.argv[1:] if argv is None else argv)]),
               "config": {"tokens_per_call": S.TOKENS, "width": C, "lengths": args.lengths,
                          "dtype": str(S.DTYPE).replace("torch.", ""), "hbm_bw_bytes_per_s": args.hbm_bw,
                          "tol_rel_fro": TOL, "modes": args.modes},
               "env": env, "variants": {n: VARIANTS[n] for n in names}, "records": []}

    def save():
        results["best"] = best(results)
        write_json(results, args.json_out)

    budget = Budget(args.budget_s)
    t0 = time.time()
    warm = {}
    if args.jobs > 0:
        print(f"[probe] warm-up: {len(names)} variants, {args.jobs} at a time", flush=True)
        warm = warm_up(names, args.lengths, C, args.jobs, args.warm_timeout, args.smoke)
        results["warm_up"] = {n: {str(L): r for L, r in w.items()} for n, w in warm.items()}
        results["warm_up_s"] = round(time.time() - t0, 1)
        save()
    dog = Watchdog(args.hang_s if not args.smoke else 1e9, save, results)
    for L in args.lengths:
        Bsz = max(1, S.TOKENS // L)
        floors = tuple(n / args.hbm_bw * 1e3 for n in S.scan_floor_bytes(Bsz * L, C, S.DTYPE.itemsize))
        dog.start(f"reference L={L}")
        ref = reference(Bsz, L, C)
        dog.stop()
        for name in names:
            rec = {"variant": name, "L": L, "B": Bsz, "C": C, "dtype": str(S.DTYPE).replace("torch.", ""),
                   "fwd_floor_ms": floors[0], "fwd_bwd_floor_ms": floors[1]}
            results["records"].append(rec)
            w = warm.get(name, {}).get(L)
            if w is not None and not w.get("ok"):
                rec["error"] = f"warm-up: {w.get('error')}"
                continue
            if not budget.ok():
                rec["skipped"] = "time budget"
                continue
            rec["tune"] = apply_variant(name)
            rec["plan"] = _plans(Bsz, L, C)
            try:
                fwd, leaves, dh = _callables(Bsz, L, C)
                dog.start(f"{name} L={L} check")
                rec["correctness"] = check(fwd, leaves, dh, ref)
                dog.start(f"{name} L={L} timing")
                S._time_modes(rec, fwd, leaves, dh, modes=tuple(args.modes))
                dog.stop()
            except Exception as e:  # noqa: BLE001
                dog.stop()
                rec["error"] = err(e)
                rec["trace"] = traceback.format_exc()[-1500:]
            for mode in MODES:
                if isinstance(rec.get(f"{mode}_ms"), float):
                    rec[f"{mode}_vs_floor"] = rec[f"{mode}_ms"] / rec[f"{mode}_floor_ms"]
            print(f"[probe] L={L} {name}: fwd {_fmt(rec.get('fwd_ms'), '.4f')} ms "
                  f"({_fmt(rec.get('fwd_vs_floor'), '.2f')}x), fwd+bwd {_fmt(rec.get('fwd_bwd_ms'), '.4f')} ms "
                  f"({_fmt(rec.get('fwd_bwd_vs_floor'), '.2f')}x), pass={rec.get('correctness', {}).get('pass')}"
                  + (f" error={rec['error']}" if "error" in rec else ""), flush=True)
            save()
        del ref
        if S.DEVICE == "cuda":
            torch.cuda.empty_cache()
    results["wall_s"] = round(time.time() - t0, 1)
    save()
    results["table"] = table(results, args.lengths)
    save()
    print(results["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
