"""GPU checks and benchmark of the decode kernels (one-token steps, speculative verification) — needs CUDA.

1. Correctness at real shapes: every kernel vs the fp32 PyTorch reference on the same inputs (max abs
   error and error relative to the reference's max of y and of the updated state) — SSD step (fp32 and
   bf16 state, plus groups / z / per-channel D / log_decay), SSD verify (with and without the fused
   advance; the state must be untouched by a plain verify), Mamba-1 step, Mamba-1 scan forward +
   backward; and parity with mamba_ssm's ``selective_state_update`` when importable.
2. Timings (``triton.testing.do_bench``, median ms; L2 flushed between calls) — and, as ``*_graph``,
   ``do_bench_cudagraph`` (back-to-back CUDA-graph replays, no launch overhead, no L2 flush), and, as
   ``*_rot`` for the one-token steps, CUDA-graph replays cycling through ≥ 256 MB of distinct states (no
   launch overhead and no state left in L2: what a decode step over many layers sees — the number to
   hold against the HBM floor; ``*_graph`` can beat the floor when a small state stays in L2):
   * SSD step at batch 64, 80 heads, P=64, N=128, G=1 (bf16 activations; fp32 and bf16 state) vs
     mamba_ssm ``selective_state_update`` (Mamba-2's tied call: dt/A/D/dt_bias expanded over P and N
     with stride 0), an eager PyTorch step (the reference), and the HBM floor
     (state read + write + x, y, dt, B, C) at 3.35 TB/s;
   * a sweep of ``hybridize.ops.ssd.triton_step.TUNE`` (state elements per program, warps, L2
     eviction hint) for the step (fp32 / bf16 state) and verify (K=4); the best configs are reported;
   * SSD verify for K = 1..8: plain verify (state read once), fused advance (all Kp = K accepted) +
     verify, and the naive alternative (clone the state, K step kernels), each as a ratio to one step;
   * Mamba-1 step at batch 64, d_inner 5120, N=16 (fp32 / bf16 state) vs mamba_ssm, eager, floor;
   * RG-LRU step (``rglru_step_triton``) at batch 64, width 2560 vs eager, floor;
   * Mamba-1 selective scan forward / forward+backward (batch 8, L 2048, d_inner 1536, N 16, bf16).

Every section runs in its own try/except; the JSON (one dict) is rewritten after each section, so a
run cut short still leaves its numbers. ``--budget-s`` stops starting new work after that time.

Usage (GPU machine, repo root):
    source benchmarks/gpu_env.sh && python3 -m hybridize.bench.step --json-out $OUT/step_h100.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

HBM_BW = 3.35e12            # H100 SXM HBM3, bytes/s
SSD = dict(B=64, H=80, P=64, N=128, G=1)
MAMBA1 = dict(B=64, C=5120, N=16)
RGLRU_SHAPES = [(64, 2560), (1024, 2560)]
SCAN = dict(B=8, L=2048, C=1536, N=16)
KS = list(range(1, 9))
DEVICE = "cuda"
ACT = torch.bfloat16        # activations (x, B, C, dt, z)
SWEEPS = True               # --skip-tuning turns the TUNE sweeps off
SMOKE = False               # --smoke: tiny shapes on CPU under TRITON_INTERPRET=1 (tests this script only)


# ------------------------------------------------------------------------------------------------ utils
from hybridize.bench.utils import Budget, import_mamba_ssm, rerun_under_interpreter, results_saver  # noqa: E402
from hybridize.bench.utils import err as _err  # noqa: E402


def _bench(fn, rep=100):
    """Median ms with the L2 flushed between calls."""
    import triton
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def _bench_graph(fn):
    """Median ms of CUDA-graph replays (no launch overhead; the L2 is not flushed)."""
    import triton
    if SMOKE:
        return None
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    except Exception as e:
        return _err(e)


L2_SPAN = 256 << 20         # bytes of distinct state a rotating measurement cycles through (H100 L2: 50 MB)


def _bench_rotating(make_fn, state_bytes):
    """Median ms per call of CUDA-graph replays that cycle through n distinct state buffers (n · state
    bytes ≥ 256 MB), so no state is still in L2 when it is visited again — the decode-loop situation,
    where every layer has its own state — and no launch overhead. make_fn(i) → the call on buffer i."""
    import triton
    if SMOKE:
        return None
    n = max(2, min(512, math.ceil(L2_SPAN / max(state_bytes, 1))))
    calls = [make_fn(i) for i in range(n)]

    def all_calls():
        for c in calls:
            c()
    return float(triton.testing.do_bench_cudagraph(all_calls, rep=50, return_mode="median")) / n


def _timed_rot(rec, name, make_fn, state_bytes):
    try:
        rec[name + "_rot_ms"] = _bench_rotating(make_fn, state_bytes)
    except Exception as e:
        rec[name + "_rot_error"] = _err(e)
    return rec.get(name + "_rot_ms")


def _timed(rec, name, fn, graph=True, rep=100):
    try:
        rec[name + "_ms"] = _bench(fn, rep)
        if graph:
            rec[name + "_graph_ms"] = _bench_graph(fn)
    except Exception as e:
        rec[name + "_error"] = _err(e)
    return rec.get(name + "_ms")


def _env():
    import triton
    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    return info


def _import_mamba_ssu():
    return import_mamba_ssm("ops.triton.selective_state_update", "selective_state_update")


def _errs(got, want):
    d = (got.float() - want.float()).abs()
    return {"max_abs": d.max().item(),
            "rel_to_max": (d.max() / want.float().abs().max().clamp_min(1e-12)).item()}


# ------------------------------------------------------------------------------------------------ inputs
def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _ssd_inputs(B, H, P, N, G, *, K=None, seed=0, z=False, D_hp=False, log_decay=False):
    """Mamba-2-like decode inputs (one token, or K tokens when K is given): dt raw (bias + softplus in
    the op), A = -U(1, 16), D = 1, B/C ~ N(0, 1/N)."""
    g = _gen(seed)
    r = lambda *s: torch.randn(*s, device=DEVICE, generator=g)  # noqa: E731
    tk = () if K is None else (K,)
    t = dict(x=r(B, *tk, H, P).to(ACT), dt=(r(B, *tk, H) * 0.5 - 2.0).to(ACT),
             A=None if log_decay else -torch.exp(torch.rand(H, device=DEVICE, generator=g) * math.log(16.0)),
             Bm=(r(B, *tk, G, N) / math.sqrt(N)).to(ACT), Cm=(r(B, *tk, G, N) / math.sqrt(N)).to(ACT))
    kw = dict(D=r(H, P) if D_hp else torch.ones(H, device=DEVICE), dt_bias=r(H) * 0.5 - 3.0,
              dt_softplus=True, z=r(B, *tk, H, P).to(ACT) if z else None,
              log_decay=-torch.rand(B, *tk, H, device=DEVICE, generator=g) * 0.5 if log_decay else None)
    return t, kw


def _state(B, H, P, N, dtype, seed=1):
    return (torch.randn(B, H, P, N, device=DEVICE, generator=_gen(seed)) * 0.1).to(dtype)


def _ssd_floor_bytes(B, H, P, N, G, state_bytes, K=1, write_state=True):
    e = ACT.itemsize
    per_token = B * (H * P * e * 2 + H * e + 2 * G * N * e)      # x, y, dt, B, C
    return B * H * P * N * state_bytes * (2 if write_state else 1) + K * per_token


def _mamba_tied(fn, t, kw, state):
    """mamba_ssm's Mamba-2 decode call: per-head dt / A / D / dt_bias expanded over P (and N) with stride 0
    (its TIE_HDIM path)."""
    B, H, P = t["x"].shape
    N = t["Bm"].shape[-1]
    dt = t["dt"][:, :, None].expand(B, H, P)
    A = t["A"][:, None, None].expand(H, P, N)
    D = kw["D"][:, None].expand(H, P)
    bias = kw["dt_bias"][:, None].expand(H, P)
    return lambda: fn(state, t["x"], dt, A, t["Bm"], t["Cm"], D=D, z=kw["z"], dt_bias=bias, dt_softplus=True)


# -------------------------------------------------------------------------------------------- 1. correctness
def correctness(results, save):
    from hybridize.ops import verify as V
    from hybridize.ops.selective_scan import reference as ss_ref
    from hybridize.ops.selective_scan.triton import selective_scan_triton
    from hybridize.ops.selective_scan.triton_step import selective_scan_step_triton
    from hybridize.ops.ssd import reference as ssd_ref
    from hybridize.ops.ssd.triton_step import ssd_step_triton, ssd_verify_triton
    out = results.setdefault("correctness", {})

    def case(name, fn):
        try:
            out[name] = fn()
            print(f"[correctness] {name}: {out[name]}", flush=True)
        except Exception as e:
            out[name] = {"error": _err(e), "trace": traceback.format_exc()[-2000:]}
            print(f"[correctness] {name}: ERROR {_err(e)}", flush=True)
        save()

    def ssd_step_case(shape, sdt, **extra):
        def run():
            t, kw = _ssd_inputs(**shape, seed=3, **extra)
            s0 = _state(shape["B"], shape["H"], shape["P"], shape["N"], sdt)
            s_k, s_r = s0.clone(), s0.clone()
            y_k = ssd_step_triton(*t.values(), s_k, **kw)
            y_r = ssd_ref.ssd_step(*t.values(), s_r, **kw)
            tol = 1e-4 if sdt == torch.float32 else 2e-2
            rec = {"y": _errs(y_k, y_r), "state": _errs(s_k, s_r)}
            rec["pass"] = rec["state"]["rel_to_max"] < tol and rec["y"]["rel_to_max"] < 2e-2
            return rec
        return run

    small = dict(B=4, H=32, P=64, N=128, G=8) if not SMOKE else dict(B=2, H=4, P=6, N=10, G=2)
    case("ssd_step_fp32_state", ssd_step_case(SSD, torch.float32))
    case("ssd_step_bf16_state", ssd_step_case(SSD, torch.bfloat16))
    case("ssd_step_groups_z_Dhp", ssd_step_case(small, torch.float32, z=True, D_hp=True))
    case("ssd_step_log_decay", ssd_step_case(small, torch.float32, log_decay=True))

    def verify_case():
        K, Kp = 4, 3
        t, kw = _ssd_inputs(**small, K=K, seed=4, z=True)
        p, _ = _ssd_inputs(**small, K=Kp, seed=5)
        s0 = _state(small["B"], small["H"], small["P"], small["N"], torch.float32)
        s_k = s0.clone()
        y_k = ssd_verify_triton(*t.values(), s_k, **kw)
        rec = {"state_untouched": bool(torch.equal(s_k, s0))}
        y_r = V.ssd_verify_reference(*t.values(), s0.clone(), **kw)
        rec["verify_y"] = _errs(y_k, y_r)
        acc = torch.arange(small["B"], device=DEVICE) % (Kp + 1)
        pend = ((p["x"], p["dt"], p["Bm"]), acc)
        s_k, s_r = s0.clone(), s0.clone()
        y_k = ssd_verify_triton(*t.values(), s_k, **kw, advance_prev=pend)
        y_r = V.ssd_verify_reference(*t.values(), s_r, **kw, advance_prev=pend)
        rec["advance_verify_y"], rec["advance_state"] = _errs(y_k, y_r), _errs(s_k, s_r)
        rec["pass"] = rec["state_untouched"] and all(
            rec[k]["rel_to_max"] < 1e-3 for k in ("verify_y", "advance_verify_y", "advance_state"))
        return rec
    case("ssd_verify_fp32", verify_case)

    m1 = MAMBA1 if not SMOKE else dict(B=2, C=24, N=5)

    def ss_step_case(sdt):
        def run():
            B, C, N = m1["B"], m1["C"], m1["N"]
            g = _gen(6)
            r = lambda *s: torch.randn(*s, device=DEVICE, generator=g)  # noqa: E731
            args = (r(B, C).to(ACT), (r(B, C) * 0.5 - 1).to(ACT), -torch.exp(r(C, N) * 0.5),
                    (r(B, N) / math.sqrt(N)).to(ACT), (r(B, N) / math.sqrt(N)).to(ACT))
            kw = dict(D=torch.ones(C, device=DEVICE), z=r(B, C).to(ACT), delta_bias=r(C) * 0.3,
                      delta_softplus=True)
            s0 = (r(B, C, N) * 0.1).to(sdt)
            s_k, s_r = s0.clone(), s0.clone()
            y_k = selective_scan_step_triton(*args, s_k, **kw)
            y_r = ss_ref.selective_scan_step(*args, s_r, **kw)
            rec = {"y": _errs(y_k, y_r), "state": _errs(s_k, s_r)}
            rec["pass"] = rec["state"]["rel_to_max"] < (1e-4 if sdt == torch.float32 else 2e-2)
            return rec
        return run
    case("selective_scan_step_fp32_state", ss_step_case(torch.float32))
    case("selective_scan_step_bf16_state", ss_step_case(torch.bfloat16))

    def scan_case(dtype, grouped):
        def run():
            B, L, C, N = (2, 512, 256, 16) if not SMOKE else (1, 20, 8, 4)
            G = 4 if grouped else None
            g = _gen(7)
            r = lambda *s: torch.randn(*s, device=DEVICE, generator=g)  # noqa: E731
            bc = (B, L, N) if G is None else (B, L, G, N)
            t = dict(u=r(B, L, C).to(dtype), delta=(r(B, L, C) * 0.5 - 1).to(dtype),
                     A=-torch.exp(r(C, N) * 0.5),
                     Bm=(r(*bc) / math.sqrt(N)).to(dtype), Cm=(r(*bc) / math.sqrt(N)).to(dtype),
                     D=torch.ones(C, device=DEVICE), z=r(B, L, C).to(dtype), delta_bias=r(C) * 0.3,
                     initial_state=r(B, C, N) * 0.1)
            seq = torch.zeros(B, L, dtype=torch.long, device=DEVICE)
            seq[:, L // 3:] += 1
            gy = r(B, L, C).to(dtype)

            def grads(fn, tt):
                tt = {k: v.detach().requires_grad_() for k, v in tt.items()}
                y, fin = fn(**tt, delta_softplus=True, seq_idx=seq, return_final_state=True)
                gr = torch.autograd.grad((y.float() * gy.float()).sum() + fin.sum(), list(tt.values()))
                return {"y": y, "final": fin, **{"d" + k: v for k, v in zip(tt, gr)}}
            got = grads(selective_scan_triton, t)
            want = grads(ss_ref.selective_scan, {k: v.float() for k, v in t.items()})
            rec = {k: _errs(got[k], want[k]) for k in want}
            tol = 1e-3 if dtype == torch.float32 else 3e-2
            rec["pass"] = all(v["rel_to_max"] < tol for v in rec.values())
            return rec
        return run
    case("selective_scan_fwd_bwd_fp32", scan_case(torch.float32, False))
    case("selective_scan_fwd_bwd_bf16_grouped", scan_case(ACT, True))

    # parity with mamba_ssm (an independent implementation)
    def parity():
        ssu = _import_mamba_ssu()
        rec = {}
        for sdt in (torch.float32, torch.bfloat16):
            t, kw = _ssd_inputs(**SSD, seed=8)
            s0 = _state(SSD["B"], SSD["H"], SSD["P"], SSD["N"], sdt)
            s_k, s_m = s0.clone(), s0.clone()
            y_k = ssd_step_triton(*t.values(), s_k, **kw)
            y_m = _mamba_tied(ssu, t, kw, s_m)()
            rec[str(sdt).split(".")[-1]] = {"y": _errs(y_k, y_m), "state": _errs(s_k, s_m)}
        return rec
    if not SMOKE:
        case("parity_mamba_ssm_ssd_step", parity)


# ------------------------------------------------------------------------------------------------ 2. timings
def _sweep(rec_name, results, save, budget, make_fn, tune, keys, floor_ms):
    """Coordinate sweep of tune[keys]; restores the defaults; records every config's time."""
    default = dict(tune)
    log, best, best_ms = [], dict(default), None
    try:
        best_ms = _bench(make_fn(), rep=50)
        log.append({"config": "default", "ms": best_ms})
        for key, values in keys:
            for v in values:
                if v == best[key] or not budget.ok(25):
                    continue
                tune.update(best)
                tune[key] = v
                try:
                    ms = _bench(make_fn(), rep=50)
                except Exception as e:
                    log.append({"config": {key: v}, "error": _err(e)})
                    continue
                log.append({"config": {key: v}, "ms": ms})
                if ms < best_ms:
                    best_ms, best[key] = ms, v
    finally:
        tune.clear()
        tune.update(default)
    results.setdefault("tuning", {})[rec_name] = {
        "best_ms": best_ms, "best": {k: v for k, v in best.items() if v != default.get(k)},
        "floor_ms": floor_ms, "best_vs_floor": (best_ms / floor_ms) if best_ms else None, "log": log}
    print(f"[tune] {rec_name}: best {best_ms} ms with {results['tuning'][rec_name]['best']}", flush=True)
    save()


def time_ssd_step(results, save, budget):
    from hybridize.ops.ssd import reference as ssd_ref
    from hybridize.ops.ssd import triton_step as ks
    out = results.setdefault("ssd_step", {"shape": dict(SSD)})
    try:
        ssu = _import_mamba_ssu()
    except Exception as e:
        ssu = None
        out["mamba_ssm_import_error"] = _err(e)
    t, kw = _ssd_inputs(**SSD)
    for sdt in (torch.float32, torch.bfloat16):
        if not budget.ok(20):
            break
        name = str(sdt).split(".")[-1]
        rec = out.setdefault(name + "_state", {})
        floor = _ssd_floor_bytes(**SSD, state_bytes=sdt.itemsize) / HBM_BW * 1e3
        rec["hbm_floor_ms"] = floor
        state = _state(SSD["B"], SSD["H"], SSD["P"], SSD["N"], sdt)
        ours = _timed(rec, "hybridize", lambda: ks.ssd_step_triton(*t.values(), state, **kw))
        nbytes = state.numel() * state.element_size()
        states = []

        def on_copy(make):          # make(state) → call; each rotating call gets its own state copy
            def make_i(i):
                while len(states) <= i:
                    states.append(state.clone())
                return make(states[i])
            return make_i
        ours_rot = _timed_rot(rec, "hybridize", on_copy(lambda s: lambda: ks.ssd_step_triton(*t.values(), s, **kw)),
                              nbytes)
        if ssu is not None:
            m = _timed(rec, "mamba_ssm", _mamba_tied(ssu, t, kw, state))
            m_rot = _timed_rot(rec, "mamba_ssm", on_copy(lambda s: _mamba_tied(ssu, t, kw, s)), nbytes)
            if m and ours:
                rec["speedup_vs_mamba_ssm"] = m / ours
            if m_rot and ours_rot:
                rec["rot_speedup_vs_mamba_ssm"] = m_rot / ours_rot
        states.clear()
        _timed(rec, "eager", lambda: ssd_ref.ssd_step(*t.values(), state, **kw), graph=False)
        if ours:
            rec["hybridize_vs_floor"] = ours / floor
        if ours_rot:
            rec["hybridize_rot_vs_floor"] = ours_rot / floor
        print(f"[ssd_step] {name} state: {rec}", flush=True)
        save()


def time_verify(results, save, budget):
    from hybridize.ops.ssd import triton_step as ks
    out = results.setdefault("ssd_verify", {"shape": dict(SSD), "state": "float32"})
    B, H, P, N, G = (SSD[k] for k in "BHPNG")
    state = _state(B, H, P, N, torch.float32)
    t1, kw = _ssd_inputs(**SSD)
    step = _timed(out, "step", lambda: ks.ssd_step_triton(*t1.values(), state, **kw))
    save()
    for K in KS:
        if not budget.ok(15):
            out[f"K{K}"] = {"skipped": "time budget"}
            continue
        rec = out.setdefault(f"K{K}", {})
        t, kwK = _ssd_inputs(**SSD, K=K, seed=K)
        fixed = state.clone()
        v = _timed(rec, "verify", lambda: ks.ssd_verify_triton(*t.values(), fixed, **kwK))
        pend = ((t["x"], t["dt"], t["Bm"]), torch.full((B,), K, device=DEVICE, dtype=torch.int32))
        av = _timed(rec, "advance_verify",
                    lambda: ks.ssd_verify_triton(*t.values(), state, **kwK, advance_prev=pend))

        def naive():   # what verification costs without the multi-step kernel: K states written
            s = fixed.clone()
            for k in range(K):
                ks.ssd_step_triton(t["x"][:, k], t["dt"][:, k], t["A"], t["Bm"][:, k], t["Cm"][:, k], s,
                                   D=kwK["D"], dt_bias=kwK["dt_bias"], dt_softplus=True)
        nv = _timed(rec, "naive_clone_plus_k_steps", naive)
        rec["verify_floor_ms"] = _ssd_floor_bytes(B, H, P, N, G, 4, K=K, write_state=False) / HBM_BW * 1e3
        rec["advance_verify_floor_ms"] = _ssd_floor_bytes(B, H, P, N, G, 4, K=2 * K) / HBM_BW * 1e3
        if step:
            for name, val in (("verify", v), ("advance_verify", av), ("naive", nv)):
                if val:
                    rec[f"{name}_over_step"] = val / step
        print(f"[verify] K={K}: {rec}", flush=True)
        save()


def time_mamba1_step(results, save, budget):
    from hybridize.ops.selective_scan import reference as ss_ref
    from hybridize.ops.selective_scan.triton_step import selective_scan_step_triton
    out = results.setdefault("selective_scan_step", {"shape": dict(MAMBA1)})
    try:
        ssu = _import_mamba_ssu()
    except Exception as e:
        ssu = None
        out["mamba_ssm_import_error"] = _err(e)
    B, C, N = MAMBA1["B"], MAMBA1["C"], MAMBA1["N"]
    g = _gen(9)
    r = lambda *s: torch.randn(*s, device=DEVICE, generator=g)  # noqa: E731
    u, delta = r(B, C).to(ACT), (r(B, C) * 0.5 - 1).to(ACT)
    A = -torch.exp(r(C, N) * 0.5)
    Bm, Cm = (r(B, N) / 4).to(ACT), (r(B, N) / 4).to(ACT)
    D, z, bias = torch.ones(C, device=DEVICE), r(B, C).to(ACT), r(C) * 0.3
    for sdt in (torch.float32, torch.bfloat16):
        if not budget.ok(15):
            break
        name = str(sdt).split(".")[-1]
        rec = out.setdefault(name + "_state", {})
        e = ACT.itemsize
        nbytes = 2 * B * C * N * sdt.itemsize + C * N * 4 + B * C * e * 4 + 2 * B * N * e
        rec["hbm_floor_ms"] = nbytes / HBM_BW * 1e3
        state = (r(B, C, N) * 0.1).to(sdt)
        ours = _timed(rec, "hybridize", lambda: selective_scan_step_triton(
            u, delta, A, Bm, Cm, state, D=D, z=z, delta_bias=bias, delta_softplus=True))
        copies = []

        def copy_i(i):
            while len(copies) <= i:
                copies.append(state.clone())
            return copies[i]
        nb = state.numel() * state.element_size()
        ours_rot = _timed_rot(rec, "hybridize", lambda i: (lambda s: lambda: selective_scan_step_triton(
            u, delta, A, Bm, Cm, s, D=D, z=z, delta_bias=bias, delta_softplus=True))(copy_i(i)), nb)
        if ssu is not None:
            m = _timed(rec, "mamba_ssm", lambda: ssu(state, u, delta, A, Bm, Cm, D=D, z=z, dt_bias=bias,
                                                     dt_softplus=True))
            m_rot = _timed_rot(rec, "mamba_ssm", lambda i: (lambda s: lambda: ssu(
                s, u, delta, A, Bm, Cm, D=D, z=z, dt_bias=bias, dt_softplus=True))(copy_i(i)), nb)
            if m and ours:
                rec["speedup_vs_mamba_ssm"] = m / ours
            if m_rot and ours_rot:
                rec["rot_speedup_vs_mamba_ssm"] = m_rot / ours_rot
        copies.clear()
        if ours_rot:
            rec["hybridize_rot_vs_floor"] = ours_rot / rec["hbm_floor_ms"]
        _timed(rec, "eager", lambda: ss_ref.selective_scan_step(
            u, delta, A, Bm, Cm, state, D=D, z=z, delta_bias=bias, delta_softplus=True), graph=False)
        if ours:
            rec["hybridize_vs_floor"] = ours / rec["hbm_floor_ms"]
        print(f"[selective_scan_step] {name} state: {rec}", flush=True)
        save()


def time_rglru_step(results, save, budget):
    """At decode batch 64 (a few µs: launch-bound even in a graph) and at batch 1024 (bandwidth-bound)."""
    from hybridize.ops.rglru.triton import rglru_step_triton
    out = results.setdefault("rglru_step", {"dtype": "float32"})
    for B, C in RGLRU_SHAPES:
        if not budget.ok(10):
            break
        rec = out.setdefault(f"B{B}_C{C}", {"shape": {"B": B, "C": C}})
        g = _gen(10)
        x, a = torch.randn(B, C, device=DEVICE, generator=g), torch.rand(B, C, device=DEVICE, generator=g)
        state = torch.randn(B, C, device=DEVICE, generator=g)
        rec["hbm_floor_ms"] = B * C * 4 * 5 / HBM_BW * 1e3          # read x, a, state; write h, state
        ours = _timed(rec, "hybridize", lambda: rglru_step_triton(x, a, state))
        # every rotating call gets its own x, a and state (all three are per-layer in a decode step)
        n = 1 if SMOKE else max(2, min(512, math.ceil(L2_SPAN / (3 * x.nbytes))))
        trip = [(x.clone(), a.clone(), state.clone()) for _ in range(n)]
        ours_rot = _timed_rot(rec, "hybridize", lambda i: (lambda xi, ai, si: lambda: rglru_step_triton(
            xi, ai, si))(*trip[i % n]), 3 * x.nbytes)
        trip.clear()

        def eager():
            h = a * state + x
            state.copy_(h)
            return h
        _timed(rec, "eager", eager, graph=False)
        if ours:
            rec["hybridize_vs_floor"] = ours / rec["hbm_floor_ms"]
        if ours_rot:
            rec["hybridize_rot_vs_floor"] = ours_rot / rec["hbm_floor_ms"]
        print(f"[rglru_step] {rec}", flush=True)
        save()


def time_scan(results, save, budget):
    from hybridize.ops.selective_scan.triton import selective_scan_triton
    out = results.setdefault("selective_scan", {"shape": dict(SCAN), "dtype": "bfloat16"})
    B, L, C, N = (SCAN[k] for k in ("B", "L", "C", "N"))
    g = _gen(11)
    r = lambda *s: torch.randn(*s, device=DEVICE, generator=g)  # noqa: E731
    t = dict(u=r(B, L, C).to(ACT), delta=(r(B, L, C) * 0.5 - 1).to(ACT), A=-torch.exp(r(C, N) * 0.5),
             Bm=(r(B, L, N) / 4).to(ACT), Cm=(r(B, L, N) / 4).to(ACT), D=torch.ones(C, device=DEVICE),
             z=r(B, L, C).to(ACT), delta_bias=r(C) * 0.3)
    e = ACT.itemsize
    out["hbm_floor_fwd_ms"] = B * L * (4 * C * e + 2 * N * e) / HBM_BW * 1e3     # u, delta, z, y; B, C
    with torch.no_grad():
        _timed(out, "hybridize_fwd", lambda: selective_scan_triton(**t, delta_softplus=True), graph=False)
    leaves = {k: v.detach().requires_grad_() for k, v in t.items()}
    dy = torch.randn(B, L, C, device=DEVICE, generator=g).to(ACT)

    def fb():
        selective_scan_triton(**leaves, delta_softplus=True).backward(dy)
        for v in leaves.values():
            v.grad = None
    _timed(out, "hybridize_fwd_bwd", fb, graph=False)
    try:
        # needs mamba_ssm's CUDA build (absent when installed with MAMBA_SKIP_CUDA_BUILD)
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        with torch.no_grad():
            _timed(out, "mamba_ssm_cuda_fwd", lambda: selective_scan_fn(
                t["u"].transpose(1, 2), t["delta"].transpose(1, 2), t["A"], t["Bm"].transpose(1, 2),
                t["Cm"].transpose(1, 2), t["D"], t["z"].transpose(1, 2), t["delta_bias"], True), graph=False)
    except Exception as e:
        out["mamba_ssm_cuda_error"] = _err(e)
    print(f"[selective_scan] {out}", flush=True)
    save()


def tune(results, save, budget):
    """Coordinate sweeps of the SSD step / verify launch knobs (run last: the other numbers come first)."""
    from hybridize.ops.ssd import triton_step as ks
    if SMOKE or not SWEEPS:
        return
    B, H, P, N, G = (SSD[k] for k in "BHPNG")
    t, kw = _ssd_inputs(**SSD)
    for sdt in (torch.float32, torch.bfloat16):
        if not budget.ok(30):
            return
        state = _state(B, H, P, N, sdt)
        floor = _ssd_floor_bytes(**SSD, state_bytes=sdt.itemsize) / HBM_BW * 1e3
        _sweep(f"ssd_step_{str(sdt).split('.')[-1]}_state", results, save, budget,
               lambda: (lambda: ks.ssd_step_triton(*t.values(), state, **kw)), ks.TUNE,
               [("step_tile_bytes", [4096, 8192, 32768, 65536]), ("step_warps", [2, 4, 8, 16]),
                ("evict_first", [False])], floor)
    if budget.ok(40):
        _tune_mamba1_step(results, save, budget)
    if budget.ok(30):
        state = _state(B, H, P, N, torch.float32)
        tk, kwK = _ssd_inputs(**SSD, K=4, seed=4)
        pend = ((tk["x"], tk["dt"], tk["Bm"]), torch.full((B,), 4, device=DEVICE, dtype=torch.int32))
        _sweep("ssd_advance_verify_K4_fp32_state", results, save, budget,
               lambda: (lambda: ks.ssd_verify_triton(*tk.values(), state, **kwK, advance_prev=pend)), ks.TUNE,
               [("verify_tile_bytes", [4096, 8192, 32768]), ("verify_warps", [2, 4, 8]),
                ("evict_first", [False])],
               _ssd_floor_bytes(B, H, P, N, G, 4, K=8) / HBM_BW * 1e3)


def _tune_mamba1_step(results, save, budget):
    """Grid over the Mamba-1 step's launch knobs, timed with rotating states (the kernel is ~10 µs: a
    flushed-L2 do_bench would mostly measure the launch)."""
    from hybridize.ops.selective_scan import triton_step as ms
    B, C, N = MAMBA1["B"], MAMBA1["C"], MAMBA1["N"]
    g = _gen(12)
    r = lambda *s: torch.randn(*s, device=DEVICE, generator=g)  # noqa: E731
    u, delta, A = r(B, C).to(ACT), (r(B, C) * 0.5 - 1).to(ACT), -torch.exp(r(C, N) * 0.5)
    Bm, Cm, z, bias = (r(B, N) / 4).to(ACT), (r(B, N) / 4).to(ACT), r(B, C).to(ACT), r(C) * 0.3
    D = torch.ones(C, device=DEVICE)
    default = dict(ms.TUNE)
    for sdt in (torch.float32, torch.bfloat16):
        states = [(r(B, C, N) * 0.1).to(sdt)]
        nb = states[0].numel() * states[0].element_size()
        n = max(2, min(512, math.ceil(L2_SPAN / nb)))
        states += [states[0].clone() for _ in range(n - 1)]
        log = []
        try:
            for tile in (1024, 2048, 4096, 8192):
                for warps in (2, 4, 8):
                    if not budget.ok(15):
                        break
                    ms.TUNE.update(tile=tile, warps=warps)
                    t = _bench_rotating(lambda i: (lambda s: lambda: ms.selective_scan_step_triton(
                        u, delta, A, Bm, Cm, s, D=D, z=z, delta_bias=bias, delta_softplus=True))(states[i]), nb)
                    log.append({"tile": tile, "warps": warps, "rot_ms": t})
        finally:
            ms.TUNE.clear()
            ms.TUNE.update(default)
        best = min((x for x in log if x["rot_ms"]), key=lambda x: x["rot_ms"], default=None)
        e = ACT.itemsize
        floor = (2 * nb + C * N * 4 + B * C * e * 4 + 2 * B * N * e) / HBM_BW * 1e3
        name = f"selective_scan_step_{str(sdt).split('.')[-1]}_state"
        results.setdefault("tuning", {})[name] = {"best": best, "floor_ms": floor, "default": default, "log": log,
                                                  "best_vs_floor": best["rot_ms"] / floor if best else None}
        print(f"[tune] {name}: best {best} (floor {floor:.4f} ms)", flush=True)
        save()


# ------------------------------------------------------------------------------------------------ main
def _enter_smoke_mode():
    """Exercise this script on a CPU: Triton interpreter, tiny shapes, one timed call instead of
    do_bench. The numbers mean nothing."""
    global SMOKE, DEVICE, SSD, MAMBA1, RGLRU_SHAPES, SCAN, KS, ACT
    os.environ.setdefault("TRITON_INTERPRET", "1")
    SMOKE, DEVICE, ACT = True, "cpu", torch.float16
    SSD = dict(B=2, H=3, P=8, N=16, G=1)
    MAMBA1 = dict(B=2, C=16, N=4)
    RGLRU_SHAPES = [(2, 16)]
    SCAN = dict(B=1, L=20, C=8, N=4)
    KS = [1, 3]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json-out", required=True, help="where to write the JSON results")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-tuning", action="store_true", help="no TUNE sweeps")
    ap.add_argument("--budget-s", type=float, default=170.0, help="start no new work after this many seconds")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global SWEEPS
    SWEEPS = not args.skip_tuning
    if args.smoke:
        rc = rerun_under_interpreter("hybridize.bench.step", argv)
        if rc is not None:
            return rc
        _enter_smoke_mode()

    results = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
               "hbm_bw_bytes_per_s": HBM_BW}

    save = results_saver(results, args.json_out, smoke=SMOKE)
    if save is None:
        return 1
    budget = Budget(args.budget_s)
    results["env"] = _env()
    save()
    sections = [] if args.skip_correctness else [("correctness", correctness)]
    sections += [("ssd_step", time_ssd_step), ("ssd_verify", time_verify),
                 ("selective_scan_step", time_mamba1_step), ("rglru_step", time_rglru_step),
                 ("selective_scan", time_scan), ("tuning", tune)]
    for name, fn in sections:
        if not budget.ok(10):
            results.setdefault("skipped", []).append(name)
            continue
        try:
            if name == "correctness":
                fn(results, save)
            else:
                fn(results, save, budget)
        except Exception as e:
            results[name + "_error"] = _err(e) + "\n" + traceback.format_exc()[-2000:]
        save()
    results["wall_s"] = round(time.time() - budget.t0, 1)
    save()
    print(json.dumps({k: results[k] for k in ("env", "wall_s") if k in results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
