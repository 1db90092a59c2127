"""Benchmark of the RG-LRU linear scan and the causal depthwise conv1d kernels vs peers and the HBM floor.

Needs CUDA (``--smoke`` runs tiny shapes on CPU under TRITON_INTERPRET=1 to check that the suite runs; its
numbers mean nothing).

Command lines (GPU machine, repo root):
    source benchmarks/gpu_env.sh
    python3 -m hybridize.bench.scan --json-out $OUT/scan_h100.json --plot-out $OUT/scan_h100.png
    python3 -m hybridize.bench.scan --json-out scan.json --lengths 2048 16384 --width 2560
    hybridize bench scan --out $OUT          # → $OUT/scan.json + scan.png
    hybridize bench kernels --out $OUT       # ssd + step + scan, each its own JSON / PNG

What is measured — bf16 inputs, forward and forward+backward, ``--tokens`` (16384) tokens per call, so
batch = tokens / L for each L in ``--lengths`` (512 2048 8192 16384):

1. RG-LRU scan h_t = a_t · h_{t-1} + b_t (element-wise, width ``--width`` C = 2560; a, b (B, L, C)):
   * ``hybridize``: ``hybridize.ops.rglru.triton.rglru_scan_triton`` (what ``hybridize.ops.rglru.rglru_scan``
     dispatches to on CUDA; the layer also passes a reset mask, which adds B·L bytes — not timed here);
   * ``fla_chunk_hgrn`` / ``fla_fused_recurrent_hgrn``: flash-linear-attention's ``fla.ops.hgrn`` (optional
     import; its recurrence is h_t = exp(g_t) · h_{t-1} + x_t, so g = log(a) (bf16) and x = b, mapped
     outside the timed region; its gradient is dg = da · a, not mapped back). An import or call error is
     recorded as the error string;
   * ``torch_loop``: the plain PyTorch loop over time (``hybridize.ops.rglru.reference.rglru_scan``, fp32
     accumulation) — timed only at the lengths in ``--loop-lengths`` (default: the smallest L), exactly,
     never extrapolated; its records at other lengths say ``skipped``;
   * ``hbm_floor``.
2. Causal depthwise conv1d, width ``--conv-width`` 4, with SiLU (``--conv-activation``; Mamba-1/2 use silu,
   the RG-LRU layer none), weight (C, 4) and bias in bf16, same token counts and C:
   * ``hybridize``: ``hybridize.ops.conv1d.triton.causal_conv1d_triton``;
   * ``torch_reference``: ``hybridize.ops.conv1d.reference.causal_conv1d`` (unfold, fp32);
   * ``torch_conv1d``: ``F.conv1d(x.transpose(1, 2), groups=C, padding=W-1)[..., :L]`` + SiLU (cuDNN; the
     usual PyTorch path, transposes included);
   * ``causal_conv1d``: Dao's CUDA extension ``causal_conv1d_fn`` (optional; its import error is recorded);
   * ``hbm_floor``.
3. Correctness at one moderate shape (B=2, L=2048, C=--width): our scan kernel vs the fp32 reference on the
   same bf16 inputs (h; and db, da for forward+backward), fla vs the same reference (h; db, and dg vs da·a),
   our conv1d (and the torch / causal_conv1d paths) vs the fp32 reference (y, dx, dweight, dbias):
   max abs error, max error relative to the reference's max, relative Frobenius error, and ``pass``
   (relative Frobenius ≤ 2e-2; 5e-2 for dweight / dbias, sums over all tokens — as tests/_tolerances.py).

HBM floor (bytes that must move at minimum, N = B·L tokens, e = 2 bytes (bf16), ÷ ``--hbm-bw`` 3.35e12 B/s):
   * scan forward:           read a, b + write h                              = 3·N·C·e
   * scan forward+backward:  forward 3·N·C·e + backward: read dh, a (the reverse recurrence
     g_t = dh_t + a_{t+1}·g_{t+1}) and h (for da_t = g_t·h_{t-1}; recomputing h instead needs b: the same
     bytes) + write db = g and da                                            = (3 + 5)·N·C·e
   * conv forward:           read x + write y                                 = 2·N·C·e
   * conv forward+backward:  forward 2·N·C·e + backward: read x (for dweight, and the pre-activation
     of SiLU, recomputed), dy + write dx                                      = (2 + 3)·N·C·e
   (the final state (B·C fp32), weight / bias and their gradients (C·W) are negligible and not counted).

Timing: each call is timed as CUDA-graph replay (``triton.testing.do_bench_cudagraph``, median: GPU time
without launch overhead) — the ``*_ms`` numbers — and as ``triton.testing.do_bench`` (median, L2 flushed,
host launch overhead included where the host is slower than the GPU) — ``*_events_ms``. When a graph cannot
be captured, ``*_ms`` is the do_bench number and ``*_timer`` says so. Forward runs under no_grad; forward
+backward is forward + ``torch.autograd.grad(out, (a, b) | (x, weight, bias), dy)``.

Output: JSON (rewritten atomically after every measurement, so a run cut short keeps its numbers; every
measurement's error is recorded in it instead of stopping the run) with
* ``records``: one per op × implementation × L — fwd_ms, fwd_bwd_ms (+ ``*_timer``, ``*_graph_ms``,
  ``*_events_ms``, ``*_error``), the floors, ``*_vs_floor`` (time / floor), ``*_speedup_vs_fla``
  (fla chunk_hgrn time / this time; scan) or ``*_speedup_vs_torch_conv1d`` (conv);
* ``summary``: at each L, ours / floor and fla / ours (scan); ours / floor, torch_conv1d / ours and
  causal_conv1d / ours (conv), forward and forward+backward;
* ``correctness``, ``env`` (versions, GPU, which peers imported and their signatures);
and a PNG (time vs L per implementation, forward and forward+backward panels for each op, the floor
dashed). ``--budget-s`` starts no new measurement after that many seconds.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridize.bench.utils import Budget, rerun_under_interpreter, results_saver
from hybridize.bench.utils import err as _err

HBM_BW = 3.35e12          # H100 SXM HBM3, bytes/s
TOKENS = 16384
WIDTH = 2560
CONV_W = 4
LENGTHS = [512, 2048, 8192, 16384]
CHECK_SHAPE = (2, 2048)   # (B, L) of the correctness check; C = --width
DEVICE = "cuda"
DTYPE = torch.bfloat16
SMOKE = False             # --smoke: tiny shapes on CPU under TRITON_INTERPRET=1 (tests this script only)

MODES = ("fwd", "fwd_bwd")


# ------------------------------------------------------------------------------------------------ timing
def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _measure(fn) -> dict:
    """{'ms', 'timer', 'graph_ms', 'events_ms'} of fn() (errors recorded instead of numbers)."""
    if SMOKE:   # one call (the interpreter is slow): checks that it runs
        return {"ms": _once(fn), "timer": "host clock, one call (smoke: meaningless)"}
    import triton.testing as tt
    rec = {}
    try:   # first: also runs the autotuners (fla) and JIT compiles outside any graph capture
        rec["events_ms"] = float(tt.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except Exception as e:  # noqa: BLE001
        rec["error"] = _err(e)
        return rec
    try:
        rec["graph_ms"] = float(tt.do_bench_cudagraph(fn, rep=50, return_mode="median"))
        rec["ms"], rec["timer"] = rec["graph_ms"], "cuda_graph"
    except Exception as e:  # noqa: BLE001
        rec["graph_error"] = _err(e)
        rec["ms"], rec["timer"] = rec["events_ms"], "do_bench"
        torch.cuda.synchronize()
    return rec


def _time_modes(rec, fwd, leaves, dy, modes=MODES):
    """rec['fwd_ms'], rec['fwd_bwd_ms'] (+ timers / errors) of fwd() and fwd() + autograd.grad."""
    def f():
        with torch.no_grad():
            return fwd()

    def fb():
        return torch.autograd.grad(fwd(), leaves, dy)

    for mode, fn in (("fwd", f), ("fwd_bwd", fb)):
        if mode not in modes:
            continue
        try:
            m = _measure(fn)
        except Exception as e:  # noqa: BLE001
            m = {"error": _err(e)}
        for k, v in m.items():
            rec[f"{mode}_{k}"] = v


# ------------------------------------------------------------------------------------------------ peers
def _output_only(fn, kw):
    def call(x, g):
        return fn(x, g, **kw)[0]       # (o, final_state) -> o
    call.signature = str(inspect.signature(fn))
    return call


def _import_fla():
    """{name: fn(x, g) -> o} for the fla HGRN ops that import; the errors of those that do not."""
    fns, errors = {}, {}
    for name in ("fla_chunk_hgrn", "fla_fused_recurrent_hgrn"):
        attr = name[len("fla_"):]
        try:
            fn = getattr(importlib.import_module("fla.ops.hgrn"), attr)
        except Exception as e:  # noqa: BLE001
            errors[name] = _err(e)
            continue
        params = inspect.signature(fn).parameters
        kw = {}
        if "head_first" in params:      # older fla: (B, H, T, D) unless told otherwise; ours is (B, T, D)
            kw["head_first"] = False
        fns[name] = _output_only(fn, kw)
    return fns, errors


def _import_causal_conv1d():
    from causal_conv1d import causal_conv1d_fn
    return causal_conv1d_fn


def _env(imports):
    import triton
    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "device": DEVICE}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    for mod in ("fla", "causal_conv1d"):
        try:
            info[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as e:  # noqa: BLE001
            info[mod] = f"not importable ({_err(e)})"
    info["imports"] = imports
    return info


# ------------------------------------------------------------------------------------------------ ops
def _ours_scan(b, a):
    from hybridize.ops.rglru.triton import rglru_scan_triton
    return rglru_scan_triton(b, a, return_final_state=False)


def _loop_scan(b, a):
    from hybridize.ops.rglru.reference import rglru_scan
    return rglru_scan(b, a, return_final_state=False)


def _ours_conv(x, w, bias, act):
    from hybridize.ops.conv1d.triton import causal_conv1d_triton
    return causal_conv1d_triton(x, w, bias, activation=act)


def _ref_conv(x, w, bias, act):
    from hybridize.ops.conv1d.reference import causal_conv1d
    return causal_conv1d(x, w, bias, activation=act)


def _torch_conv(x, w, bias, act):
    L, C, W = x.shape[1], x.shape[2], w.shape[1]
    y = F.conv1d(x.transpose(1, 2), w[:, None, :], bias, padding=W - 1, groups=C)[..., :L]
    return (F.silu(y) if act else y).transpose(1, 2)


def _dao_conv(fn):
    return lambda x, w, bias, act: fn(x.transpose(1, 2), w, bias, activation=act).transpose(1, 2)


# ------------------------------------------------------------------------------------------------ inputs
def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _scan_inputs(Bsz, L, C, seed=0):
    """RG-LRU-like, bf16: a ∈ (0.5, 1) (long memory), b = √(1-a²)·x (the layer's normalisation)."""
    g = _gen(seed)
    a = torch.rand(Bsz, L, C, device=DEVICE, generator=g) * 0.5 + 0.5
    b = torch.randn(Bsz, L, C, device=DEVICE, generator=g) * torch.sqrt(1 - a * a)
    dh = torch.randn(Bsz, L, C, device=DEVICE, generator=g)
    return a.to(DTYPE), b.to(DTYPE), dh.to(DTYPE)


def _conv_inputs(Bsz, L, C, W, seed=0):
    g = _gen(seed)
    x = torch.randn(Bsz, L, C, device=DEVICE, generator=g).to(DTYPE)
    w = (torch.randn(C, W, device=DEVICE, generator=g) / math.sqrt(W)).to(DTYPE)
    bias = (torch.randn(C, device=DEVICE, generator=g) * 0.1).to(DTYPE)
    dy = torch.randn(Bsz, L, C, device=DEVICE, generator=g).to(DTYPE)
    return x, w, bias, dy


# ------------------------------------------------------------------------------------------------ floors
# Minimum HBM traffic (see the module docstring): every input read once, every output written once, nothing
# else — the saved activation the backward needs (h for the scan; x for the conv) is read once more.
def scan_floor_bytes(tokens, C, e=2):
    """(forward, forward+backward) bytes: read a, b + write h; + read dh, a, h + write db, da."""
    return 3 * tokens * C * e, (3 + 5) * tokens * C * e


def conv_floor_bytes(tokens, C, e=2):
    """(forward, forward+backward) bytes: read x + write y; + read x, dy + write dx."""
    return 2 * tokens * C * e, (2 + 3) * tokens * C * e


# -------------------------------------------------------------------------------------------- correctness
def _errs(got, want, tol):
    g, w = got.float(), want.float()
    d = g - w
    rec = {"max_abs": d.abs().max().item(),
           "rel_to_max": (d.abs().max() / w.abs().max().clamp_min(1e-12)).item(),
           "rel_fro": (d.norm() / w.norm().clamp_min(1e-12)).item(), "tol_rel_fro": tol}
    rec["pass"] = bool(rec["rel_fro"] <= tol)     # NaN fails
    return rec


def _check(out, name, fn, save, op):
    try:
        rec = fn()
        rec["pass"] = all(v["pass"] for v in rec.values() if isinstance(v, dict))
    except Exception as e:  # noqa: BLE001
        rec = {"pass": False, "error": _err(e), "trace": traceback.format_exc()[-2000:]}
    out[name] = rec
    worst = max(((v["rel_fro"], k) for k, v in rec.items() if isinstance(v, dict)), default=None)
    print(f"[correctness] {op} {name}: pass={rec['pass']} worst rel_fro={worst} {rec.get('error', '')}",
          flush=True)
    save()


def correctness(results, save, width, conv_w, act, fla_fns, dao_conv):
    out = results.setdefault("correctness", {})
    Bsz, L = CHECK_SHAPE
    C = width
    out["shape"] = {"B": Bsz, "L": L, "C": C, "dtype": str(DTYPE).replace("torch.", ""), "conv_width": conv_w,
                    "conv_activation": act}
    scan = out.setdefault("rglru_scan", {})
    a, b, dh = _scan_inputs(Bsz, L, C, seed=1)
    a32, b32 = a.float().requires_grad_(), b.float().requires_grad_()
    h_ref = _loop_scan(b32, a32)
    db_ref, da_ref = torch.autograd.grad(h_ref, (b32, a32), dh.float())
    h_ref = h_ref.detach()

    def ours():
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        h = _ours_scan(bb, aa)
        db, da = torch.autograd.grad(h, (bb, aa), dh)
        return {"h": _errs(h, h_ref, 2e-2), "db": _errs(db, db_ref, 2e-2), "da": _errs(da, da_ref, 2e-2)}
    _check(scan, "hybridize", ours, save, "rglru_scan")
    for name, fn in fla_fns.items():
        def fla(fn=fn):
            g = torch.log(a.float()).to(DTYPE).requires_grad_()
            x = b.clone().requires_grad_()
            h = fn(x, g)
            dx, dg = torch.autograd.grad(h, (x, g), dh)
            return {"h": _errs(h, h_ref, 2e-2), "db": _errs(dx, db_ref, 2e-2),
                    "dg_vs_da_times_a": _errs(dg, da_ref * a.float(), 2e-2)}
        _check(scan, name, fla, save, "rglru_scan")

    conv = out.setdefault("conv1d", {})
    x, w, bias, dy = _conv_inputs(Bsz, L, C, conv_w, seed=2)
    leaves32 = [t.float().requires_grad_() for t in (x, w, bias)]
    y_ref = _ref_conv(*leaves32, act)
    want = dict(zip(("dx", "dweight", "dbias"), torch.autograd.grad(y_ref, leaves32, dy.float())))
    want["y"] = y_ref.detach()
    impls = {"hybridize": _ours_conv, "torch_conv1d": _torch_conv}
    if dao_conv is not None:
        impls["causal_conv1d"] = _dao_conv(dao_conv)
    for name, fn in impls.items():
        def run(fn=fn):
            leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
            y = fn(*leaves, act)
            got = dict(zip(("dx", "dweight", "dbias"), torch.autograd.grad(y, leaves, dy)))
            got["y"] = y
            return {k: _errs(got[k], want[k], 5e-2 if k in ("dweight", "dbias") else 2e-2)
                    for k in ("y", "dx", "dweight", "dbias")}
        _check(conv, name, run, save, "conv1d")
    # pass: our kernels (both ops); peers_pass: every peer that ran (a peer's failure is its own)
    out["pass"] = bool(scan.get("hybridize", {}).get("pass") and conv.get("hybridize", {}).get("pass"))
    out["peers_pass"] = all(v["pass"] for sec in (scan, conv) for k, v in sec.items() if k != "hybridize")
    save()


# ------------------------------------------------------------------------------------------------ timings
def _record(results, op, impl, L, Bsz, C, floors):
    rec = {"op": op, "impl": impl, "L": L, "B": Bsz, "C": C, "dtype": str(DTYPE).replace("torch.", ""),
           "fwd_floor_ms": floors[0], "fwd_bwd_floor_ms": floors[1]}
    results["records"].append(rec)
    return rec


def _finish(rec, peer_ms, peer_name):
    for mode in MODES:
        ms = rec.get(f"{mode}_ms")
        if not isinstance(ms, float):
            continue
        rec[f"{mode}_vs_floor"] = ms / rec[f"{mode}_floor_ms"]
        p = peer_ms.get(mode)
        if p and ms > 0:
            rec[f"{mode}_speedup_vs_{peer_name}"] = p / ms


def _progress(op, L, Bsz, recs, floors):
    def one(r, mode):
        v = r.get(f"{mode}_ms")
        return f"{v:.4f}" if isinstance(v, float) else ("skipped" if "skipped" in r else "error")
    print(f"[{op}] L={L} B={Bsz} fwd / fwd+bwd ms: " + ", ".join(
        f"{n} {one(r, 'fwd')} / {one(r, 'fwd_bwd')}" for n, r in recs.items())
        + f"; HBM floor {floors[0]:.4f} / {floors[1]:.4f}", flush=True)


def time_scan(results, save, budget, lengths, C, hbm_bw, fla_fns, loop_lengths, skip_peers):
    impls = {"hybridize": _ours_scan}
    if not skip_peers:
        impls.update(fla_fns)
        impls["torch_loop"] = _loop_scan
    for L in lengths:
        Bsz = max(1, TOKENS // L)
        floors = tuple(n / hbm_bw * 1e3 for n in scan_floor_bytes(Bsz * L, C, DTYPE.itemsize))
        floor = _record(results, "rglru_scan", "hbm_floor", L, Bsz, C, floors)
        floor.update(fwd_ms=floors[0], fwd_bwd_ms=floors[1], timer="bytes / hbm_bw")
        a, b, dh = _scan_inputs(Bsz, L, C)
        g = torch.log(a.float()).to(DTYPE)        # fla's gate, mapped outside the timed region
        recs = {}
        for name, fn in impls.items():
            rec = recs[name] = _record(results, "rglru_scan", name, L, Bsz, C, floors)
            if name == "torch_loop" and L not in loop_lengths:
                rec["skipped"] = (f"the PyTorch loop is timed only at L in {sorted(loop_lengths)} "
                                  "(--loop-lengths); not extrapolated")
                continue
            if not budget.ok(15):
                rec["skipped"] = "time budget"
                continue
            if name.startswith("fla_"):
                xx, gg = b.clone().requires_grad_(), g.clone().requires_grad_()
                _time_modes(rec, lambda fn=fn, xx=xx, gg=gg: fn(xx, gg), (xx, gg), dh)
            else:
                aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
                _time_modes(rec, lambda fn=fn, aa=aa, bb=bb: fn(bb, aa), (bb, aa), dh)
            save()
        fla_ms = {m: recs.get("fla_chunk_hgrn", {}).get(f"{m}_ms") for m in MODES}
        for rec in recs.values():
            _finish(rec, fla_ms, "fla")
        _progress("scan", L, Bsz, recs, floors)
        save()


def time_conv(results, save, budget, lengths, C, W, act, hbm_bw, dao_conv, skip_peers):
    impls = {"hybridize": _ours_conv}
    if not skip_peers:
        impls.update(torch_conv1d=_torch_conv, torch_reference=_ref_conv)
        if dao_conv is not None:
            impls["causal_conv1d"] = _dao_conv(dao_conv)
    for L in lengths:
        Bsz = max(1, TOKENS // L)
        floors = tuple(n / hbm_bw * 1e3 for n in conv_floor_bytes(Bsz * L, C, DTYPE.itemsize))
        floor = _record(results, "conv1d", "hbm_floor", L, Bsz, C, floors)
        floor.update(fwd_ms=floors[0], fwd_bwd_ms=floors[1], timer="bytes / hbm_bw")
        x, w, bias, dy = _conv_inputs(Bsz, L, C, W)
        recs = {}
        for name, fn in impls.items():
            rec = recs[name] = _record(results, "conv1d", name, L, Bsz, C, floors)
            if not budget.ok(15):
                rec["skipped"] = "time budget"
                continue
            leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
            _time_modes(rec, lambda fn=fn, leaves=leaves: fn(*leaves, act), leaves, dy)
            save()
        torch_ms = {m: recs.get("torch_conv1d", {}).get(f"{m}_ms") for m in MODES}
        for rec in recs.values():
            _finish(rec, torch_ms, "torch_conv1d")
        _progress("conv1d", L, Bsz, recs, floors)
        save()


def summarize(results) -> dict:
    """At each L: ours / floor and peer / ours (fla chunk_hgrn for the scan; torch_conv1d and causal_conv1d
    for the conv), forward and forward+backward."""
    by = {(r["op"], r["impl"], r["L"]): r for r in results.get("records", [])}
    peers = {"rglru_scan": {"fla_over_ours": "fla_chunk_hgrn", "fla_fused_recurrent_over_ours":
                            "fla_fused_recurrent_hgrn", "torch_loop_over_ours": "torch_loop"},
             "conv1d": {"torch_conv1d_over_ours": "torch_conv1d", "causal_conv1d_over_ours": "causal_conv1d",
                        "torch_reference_over_ours": "torch_reference"}}
    summary = {}
    for op, peer in peers.items():
        for L in sorted({r["L"] for r in results.get("records", []) if r["op"] == op}):
            ours = by.get((op, "hybridize", L), {})
            row = summary.setdefault(op, {}).setdefault(str(L), {})
            for mode in MODES:
                ms = ours.get(f"{mode}_ms")
                s = row[mode] = {"ours_ms": ms, "floor_ms": ours.get(f"{mode}_floor_ms"),
                                 "ours_over_floor": ours.get(f"{mode}_vs_floor")}
                for key, impl in peer.items():
                    p = by.get((op, impl, L), {}).get(f"{mode}_ms")
                    s[key] = p / ms if isinstance(p, float) and isinstance(ms, float) and ms > 0 else None
    return summary


# ------------------------------------------------------------------------------------------------ main
def _enter_smoke_mode(args):
    """Exercise this script on a CPU: Triton interpreter, fp16 (as the other suites' smoke runs), tiny
    shapes, host-clock timings. The numbers mean nothing."""
    global SMOKE, DEVICE, DTYPE, TOKENS, CHECK_SHAPE
    os.environ.setdefault("TRITON_INTERPRET", "1")
    SMOKE, DEVICE, DTYPE = True, "cpu", torch.float16
    TOKENS, CHECK_SHAPE = 64, (2, 40)
    args.lengths = [n for n in args.lengths if n <= 64] or [16, 64]
    args.width = min(args.width, 24)       # not a multiple of the kernels' channel blocks: masking runs


def main(argv=None):
    global TOKENS
    ap = argparse.ArgumentParser(prog="python -m hybridize.bench.scan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json-out", required=True, help="where to write the JSON results")
    ap.add_argument("--plot-out", default=None, help="PNG path (default: --json-out with .png)")
    ap.add_argument("--no-plot", action="store_true", help="write no PNG")
    ap.add_argument("--lengths", type=int, nargs="*", default=LENGTHS,
                    help="sequence lengths L (default %(default)s)")
    ap.add_argument("--width", type=int, default=WIDTH, help="channels C (default %(default)s)")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="tokens per call; batch = tokens / L")
    ap.add_argument("--conv-width", type=int, default=CONV_W, help="conv taps (≤ 4; default %(default)s)")
    ap.add_argument("--conv-activation", choices=["silu", "none"], default="silu")
    ap.add_argument("--loop-lengths", type=int, nargs="*", default=None,
                    help="lengths at which to time the PyTorch loop (default: the smallest of --lengths)")
    ap.add_argument("--hbm-bw", type=float, default=HBM_BW,
                    help="bytes/s for the floor (default %(default)g: H100 SXM)")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-timings", action="store_true")
    ap.add_argument("--skip-peers", action="store_true", help="time only hybridize (and the floor)")
    ap.add_argument("--ops", nargs="*", choices=["scan", "conv"], default=["scan", "conv"])
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no new measurement after this many seconds (default %(default)g)")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    TOKENS = args.tokens
    if args.smoke:
        rc = rerun_under_interpreter("hybridize.bench.scan", argv)
        if rc is not None:
            return rc
        _enter_smoke_mode(args)
    act = None if args.conv_activation == "none" else args.conv_activation
    loop_lengths = set(args.loop_lengths) if args.loop_lengths is not None else {min(args.lengths, default=0)}

    cmd = ["python -m hybridize.bench.scan", *(sys.argv[1:] if argv is None else argv)]
    results = {"command": " ".join(cmd),
               "config": {"tokens_per_call": TOKENS, "width": args.width, "lengths": args.lengths,
                          "conv_width": args.conv_width, "conv_activation": args.conv_activation,
                          "dtype": str(DTYPE).replace("torch.", ""), "hbm_bw_bytes_per_s": args.hbm_bw,
                          "torch_loop_lengths": sorted(loop_lengths), "torch_loop_extrapolated": False,
                          "smoke": SMOKE},
               "floor_bytes": {"rglru_scan_fwd": "3·N·C·e (read a, b; write h)",
                               "rglru_scan_fwd_bwd": "8·N·C·e (fwd + read dh, a, h; write db, da)",
                               "conv1d_fwd": "2·N·C·e (read x; write y)",
                               "conv1d_fwd_bwd": "5·N·C·e (fwd + read x, dy; write dx)"},
               "records": []}
    save = results_saver(results, args.json_out, smoke=SMOKE)
    if save is None:
        return 1
    budget = Budget(args.budget_s)

    imports = {}
    fla_fns, dao_conv = {}, None
    if not args.skip_peers:
        fla_fns, fla_errors = _import_fla()
        imports.update({k: f"error: {v}" for k, v in fla_errors.items()})
        imports.update({k: f"ok {fn.signature}" for k, fn in fla_fns.items()})
        try:
            dao_conv = _import_causal_conv1d()
            imports["causal_conv1d"] = "ok"
        except Exception as e:  # noqa: BLE001
            imports["causal_conv1d"] = f"error: {_err(e)}"
    results["env"] = _env(imports)
    save()

    if not args.skip_correctness:
        try:
            correctness(results, save, args.width, args.conv_width, act, fla_fns, dao_conv)
        except Exception as e:  # noqa: BLE001
            results["correctness_error"] = _err(e) + "\n" + traceback.format_exc()[-2000:]
        save()
    if not args.skip_timings:
        sections = []
        if "scan" in args.ops:
            sections.append(("scan", lambda: time_scan(results, save, budget, args.lengths, args.width,
                                                       args.hbm_bw, fla_fns, loop_lengths, args.skip_peers)))
        if "conv" in args.ops:
            sections.append(("conv", lambda: time_conv(results, save, budget, args.lengths, args.width,
                                                       args.conv_width, act, args.hbm_bw, dao_conv,
                                                       args.skip_peers)))
        for name, fn in sections:
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                results[f"{name}_timings_error"] = _err(e) + "\n" + traceback.format_exc()[-2000:]
            results["summary"] = summarize(results)
            save()
    results["wall_s"] = round(time.time() - budget.t0, 1)
    save()
    if not args.no_plot:
        out = args.plot_out or str(Path(args.json_out).with_suffix(".png"))
        try:
            from hybridize.bench.plots import plot_scan
            plot_scan(Path(args.json_out), Path(out))
            print("plot:", out)
        except Exception as e:  # noqa: BLE001
            results["plot_error"] = _err(e)
            save()
    print(json.dumps({k: results.get(k) for k in ("summary", "wall_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
