"""GPU checks and benchmark of the Triton chunked SSD (hybridize.ops.ssd.triton) — needs CUDA.

1. Correctness at real shapes, bf16 and fp32: kernel vs the fp32 PyTorch reference on the same
   (rounded) inputs — max abs / relative error of y, final state and every gradient; and, when
   mamba_ssm is importable, parity of y with its ``mamba_chunk_scan_combined``.
2. Timings (``triton.testing.do_bench``, median ms) of forward and forward+backward at H=32, P=64,
   N=128, G=1, bf16, 16384 tokens per call (batch = 16384 / L) for each L, against
   * torch SDPA causal attention (q, k, v (B, H, L, 64) bf16),
   * mamba_ssm ``mamba_chunk_scan_combined`` (chunk 256, Mamba-2's default; ``--mamba-chunks``) if
     importable (its package __init__ needs the CUDA build; without it the Triton submodule is loaded
     through a package stub; needs einops),
   * flash-linear-attention ``chunk_simple_gla`` (q=C, k=B, v=x·dt, g=dt·A; the mapping is done
     outside the timed region) if importable — its backward may refuse on Hopper with triton < 3.7.1,
     the error string is recorded,
   * the HBM floor of the forward (x, dt, B, C read + y written, ÷ 3.35e12 B/s) and of the backward
     (x, dt, B, C, dy read + dx, ddt, dB, dC written), and the tensor-core floor of the forward.
   Plus a per-kernel breakdown (torch.profiler) of our forward+backward at each L.
3. ``--tune``: coordinate-descent sweep of ``hybridize.ops.ssd.triton.TUNE`` (block sizes, warps,
   stages, chunk, heads per backward program) at two lengths; reports the best setting.

Every peer/section runs in its own try/except; the JSON (one dict) is rewritten after each section,
so a run cut short still leaves its numbers. ``--budget-s`` stops starting new work after that time.

Usage: python -m hybridize.bench.ssd --json-out results.json [--tune] [--lengths 512 2048]
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

import torch
import torch.nn.functional as F

HBM_BW = 3.35e12          # H100 SXM HBM3, bytes/s
TC_FLOPS = 989e12         # H100 SXM dense bf16 tensor-core peak, FLOP/s
TOKENS = 16384
H, P, N, G = 32, 64, 128, 1
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
DEVICE = "cuda"
DTYPE = torch.bfloat16
SMOKE = False             # --smoke: tiny shapes on CPU under TRITON_INTERPRET=1 (tests this script only)


# ------------------------------------------------------------------------------------------------ utils
from hybridize.bench.utils import Budget, import_mamba_ssm, rerun_under_interpreter, results_saver  # noqa: E402
from hybridize.bench.utils import err as _err  # noqa: E402


def _bench(fn, grad_to_none=None):
    import triton
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none))


def _env():
    import triton
    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    for mod in ("mamba_ssm", "fla"):
        try:
            m = importlib.import_module(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception as e:
            info[mod] = f"not importable ({_err(e)})"
    return info


def _import_mamba():
    return import_mamba_ssm("ops.triton.ssd_combined", "mamba_chunk_scan_combined")


def _import_fla():
    from fla.ops.simple_gla import chunk_simple_gla
    return chunk_simple_gla


# ------------------------------------------------------------------------------------------------ inputs
def _inputs(Bsz, L, dtype=torch.bfloat16, *, h=None, extras=False, seed=0):
    """Mamba-2-like inputs: dt raw (softplus + bias applied in the op), A < 0, D per head."""
    h, p, n, g = h or H, P, N, G
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEVICE, generator=gen)
    t = dict(
        x=r(Bsz, L, h, p).to(dtype),
        dt=(r(Bsz, L, h) * 0.5 - 2.0).to(dtype),
        A=-torch.exp(torch.rand(h, device=DEVICE, generator=gen) * math.log(16.0)),   # -U(1, 16)
        Bm=(r(Bsz, L, g, n) / math.sqrt(n)).to(dtype),
        Cm=(r(Bsz, L, g, n) / math.sqrt(n)).to(dtype),
        D=torch.ones(h, device=DEVICE),
        dt_bias=r(h) * 0.5 - 3.0,
    )
    if extras:
        t["z"] = r(Bsz, L, h, p).to(dtype)
        t["initial_state"] = r(Bsz, h, p, n) * 0.1
        seq = torch.zeros(Bsz, L, dtype=torch.long, device=DEVICE)
        for cut in (L // 3, L // 3 + 5, (2 * L) // 3 + 17):
            seq[:, cut:] += 1
        t["seq_idx"] = seq
    return t


def _call(fn, t, **kw):
    extra = {k: t[k] for k in ("z", "initial_state", "seq_idx") if k in t}
    return fn(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True,
              **extra, **kw)


# -------------------------------------------------------------------------------------------- 1. correctness
def correctness(results, save):
    from hybridize.ops.ssd import reference as ref
    from hybridize.ops.ssd.triton import ssd_chunked_triton
    out = results.setdefault("correctness", {})
    cases = [("bf16_B2_L2048_H8", torch.bfloat16, 2, 2048, 8, True),
             ("fp32_B2_L2048_H8", torch.float32, 2, 2048, 8, True),
             ("bf16_B1_L4096_H32_bench_shape", torch.bfloat16, 1, 4096, 32, False),
             ("bf16_B1_L1000_H8_odd_len", torch.bfloat16, 1, 1000, 8, True)]
    if SMOKE:   # the interpreter cannot run bf16 dots: fp16 / fp32, tiny
        cases = [("fp16_smoke", torch.float16, 2, 45, 2, True),
                 ("fp32_smoke", torch.float32, 1, 33, 2, False)]
    for name, dtype, Bsz, L, h, extras in cases:
        try:
            t = _inputs(Bsz, L, dtype, h=h, extras=extras, seed=1)
            grads_of = [k for k in ("x", "dt", "A", "Bm", "Cm", "D", "dt_bias", "z", "initial_state")
                        if k in t]
            for k in grads_of:
                t[k] = t[k].detach().requires_grad_()
            gen = torch.Generator(device=DEVICE).manual_seed(2)
            gy = torch.randn(Bsz, L, h, P, device=DEVICE, generator=gen).to(dtype)
            gf = torch.randn(Bsz, h, P, N, device=DEVICE, generator=gen)

            def run(fn, tt, chunk):
                y, fin = _call(fn, tt, chunk_size=chunk, return_final_state=True)
                gr = torch.autograd.grad((y.float() * gy.float()).sum() + (fin * gf).sum(),
                                         [tt[k] for k in grads_of])
                return {"y": y, "final": fin, **{"d" + k: g for k, g in zip(grads_of, gr)}}

            got = run(ssd_chunked_triton, t, 256)
            t32 = {k: (v.detach().float().requires_grad_() if k in grads_of else v) for k, v in t.items()}
            want = run(ref.ssd_chunked, t32, 64)
            rec = {}
            for k in want:
                w, g = want[k].float(), got[k].float()
                rec[k] = {"max_abs": (g - w).abs().max().item(),
                          "rel_to_max": ((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item(),
                          "rel_fro": ((g - w).norm() / w.norm().clamp_min(1e-12)).item()}
            # fp32: relative max error <= 1e-3; 16-bit: relative Frobenius error <= 2e-2 (5e-2 for the
            # per-head parameters, whose gradients are sums over all tokens) — as tests/test_kernels_ssd.py
            reduced = {"dA", "dD", "ddt_bias"}
            if dtype == torch.float32:
                rec["pass"] = all(v["rel_to_max"] <= 1e-3 for v in rec.values())
            else:
                rec["pass"] = all(v["rel_fro"] <= (5e-2 if k in reduced else 2e-2) for k, v in rec.items())
            out[name] = rec
            print(f"[correctness] {name}: pass={rec['pass']} worst="
                  f"{max((v['rel_to_max'], k) for k, v in rec.items() if isinstance(v, dict))}", flush=True)
        except Exception as e:
            out[name] = {"error": _err(e), "trace": traceback.format_exc()[-2000:]}
            print(f"[correctness] {name}: ERROR {_err(e)}", flush=True)
        save()
    # parity with mamba_ssm (independent implementation)
    try:
        mcs = _import_mamba()
        t = _inputs(2, 2048, torch.bfloat16, h=8, seed=3)
        y_ours = _call(ssd_chunked_triton, t, chunk_size=256)
        y_mamba = mcs(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], 256, D=t["D"], dt_bias=t["dt_bias"],
                      dt_softplus=True)
        d = (y_ours.float() - y_mamba.float())
        out["parity_mamba_ssm_bf16"] = {"max_abs": d.abs().max().item(),
                                        "rel_to_max": (d.abs().max() / y_mamba.float().abs().max()).item()}
    except Exception as e:
        out["parity_mamba_ssm_bf16"] = {"error": _err(e)}
    save()


# ------------------------------------------------------------------------------------------------ 2. timings
def _floors(Bsz, L):
    e, tok = 2, Bsz * L
    fwd_bytes = tok * (H * P * e * 2 + H * e + 2 * G * N * e)           # x, y; dt; B, C
    bwd_bytes = tok * (H * P * e * 3 + H * e * 2 + 4 * G * N * e)       # x, dy, dx; dt, ddt; B, C, dB, dC
    Q = 64
    nc = math.ceil(L / Q)
    fwd_flops = 2 * Bsz * nc * H * (Q * Q * N + Q * Q * P + 2 * Q * N * P)
    return {"hbm_floor_fwd_ms": fwd_bytes / HBM_BW * 1e3, "hbm_floor_bwd_ms": bwd_bytes / HBM_BW * 1e3,
            "tc_floor_fwd_ms": fwd_flops / TC_FLOPS * 1e3, "fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes}


def _time_fwd_bwd(fwd, leaves, rec, prefix):
    """rec[prefix+'fwd_ms'] and rec[prefix+'fwd_bwd_ms'] (errors recorded instead of numbers)."""
    try:
        with torch.no_grad():
            rec[prefix + "fwd_ms"] = _bench(fwd)
    except Exception as e:
        rec[prefix + "fwd_error"] = _err(e)
        return
    try:
        for t in leaves:
            t.requires_grad_(True)
        y = fwd()
        y = y[0] if isinstance(y, tuple) else y
        dy = torch.randn_like(y)

        def fb():
            out = fwd()
            out = out[0] if isinstance(out, tuple) else out
            out.backward(dy)
        rec[prefix + "fwd_bwd_ms"] = _bench(fb, grad_to_none=leaves)
    except Exception as e:
        rec[prefix + "fwd_bwd_error"] = _err(e)
    finally:
        for t in leaves:
            t.requires_grad_(False)
            t.grad = None


def _breakdown(fwd, leaves):
    """GPU time per kernel name (ms per forward+backward) from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    for t in leaves:
        t.requires_grad_(True)
    y = fwd()
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.cuda.synchronize()
    reps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fwd().backward(dy)
        torch.cuda.synchronize()
    for t in leaves:
        t.requires_grad_(False)
        t.grad = None
    out = {}
    for ev in prof.key_averages():
        dev_t = getattr(ev, "device_time_total", None)
        if dev_t is None:
            dev_t = getattr(ev, "cuda_time_total", 0.0)
        if dev_t:
            out[ev.key[:80]] = round(dev_t / reps / 1e3, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:20])


def timings(results, save, lengths, budget, skip_peers=False, mamba_chunks=(256,)):
    from hybridize.ops.ssd.triton import ssd_chunked_triton
    out = results.setdefault("timings", {})
    mamba = fla = None
    if not skip_peers:
        try:
            mamba = _import_mamba()
        except Exception as e:
            results["mamba_ssm_import_error"] = _err(e)
        try:
            fla = _import_fla()
        except Exception as e:
            results["fla_import_error"] = _err(e)
    for L in lengths:
        if not budget.ok(30):
            out[str(L)] = {"skipped": "time budget"}
            continue
        Bsz = max(1, TOKENS // L)
        rec = {"B": Bsz, "L": L, "H": H, "P": P, "N": N, "G": G, "dtype": "bf16", **_floors(Bsz, L)}
        out[str(L)] = rec
        t = _inputs(Bsz, L, DTYPE)
        leaves = [t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], t["D"], t["dt_bias"]]
        ours = lambda: _call(ssd_chunked_triton, t, chunk_size=64)
        _time_fwd_bwd(ours, leaves, rec, "hybridize_")
        save()
        try:
            rec["hybridize_kernels_ms"] = _breakdown(ours, leaves)
        except Exception as e:
            rec["hybridize_kernels_error"] = _err(e)
        # SDPA causal attention, head dim 64
        try:
            q, k, v = (torch.randn(Bsz, H, L, 64, device=DEVICE, dtype=DTYPE) for _ in range(3))
            _time_fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], rec,
                          "sdpa_")
        except Exception as e:
            rec["sdpa_error"] = _err(e)
        save()
        if mamba is not None and budget.ok(30):
            for chunk in mamba_chunks:
                def m_fwd(chunk=chunk):
                    return mamba(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], chunk, D=t["D"],
                                 dt_bias=t["dt_bias"], dt_softplus=True)
                _time_fwd_bwd(m_fwd, leaves, rec, f"mamba_ssm_chunk{chunk}_")
                save()
        if fla is not None and budget.ok(30):
            try:
                with torch.no_grad():
                    dtp = F.softplus(t["dt"].float() + t["dt_bias"])
                    q_ = t["Cm"].expand(Bsz, L, H, N).contiguous()
                    k_ = t["Bm"].expand(Bsz, L, H, N).contiguous()
                    v_ = (t["x"].float() * dtp[..., None]).to(DTYPE)
                    g_ = (dtp * t["A"]).float()
                kwargs = {"scale": 1.0}
                if "head_first" in inspect.signature(fla).parameters:
                    kwargs["head_first"] = False
                _time_fwd_bwd(lambda: fla(q_, k_, v_, g=g_, **kwargs), [q_, k_, v_, g_], rec,
                              "fla_simple_gla_")
            except Exception as e:
                rec["fla_simple_gla_error"] = _err(e)
            save()
        for peer in [f"mamba_ssm_chunk{c}_" for c in mamba_chunks] + ["fla_simple_gla_", "sdpa_"]:
            for what in ("fwd_ms", "fwd_bwd_ms"):
                if peer + what in rec and "hybridize_" + what in rec:
                    rec[f"speedup_vs_{peer}{what}"] = rec[peer + what] / rec["hybridize_" + what]
        print(f"[timings] L={L}: " + ", ".join(f"{k}={v:.3f}" for k, v in rec.items()
                                              if k.endswith("_ms") and isinstance(v, float)), flush=True)
        save()


# ------------------------------------------------------------------------------------------------ 3. tuning
def tune(results, save, budget, lengths=(2048, 16384)):
    from hybridize.ops.ssd import triton as kern
    out = results.setdefault("tuning", {})
    default = dict(kern.TUNE)
    space = [
        ("chunk", [32, 64, 128]),
        ("state_bp", [None, 16, 32, 64]),
        ("state_bn", [None, 16, 32, 64, 128]),
        ("state_warps", [2, 4, 8]),
        ("state_stages", [1, 2, 3, 4]),
        ("out_bp", [None, 32, 64]),
        ("out_warps", [4, 8]),
        ("out_stages", [1, 2, 3]),
        ("bwd_heads", [None, 1, 2, 4, 8, 16, 32]),
        ("bwd_warps", [4, 8]),
        ("bwd_stages", [1, 2]),
    ]
    for L in lengths:
        Bsz = max(1, TOKENS // L)
        t = _inputs(Bsz, L, DTYPE)
        leaves = [t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], t["D"], t["dt_bias"]]
        fwd = lambda: _call(kern.ssd_chunked_triton, t, chunk_size=128)

        def score():
            rec = {}
            _time_fwd_bwd(fwd, leaves, rec, "")
            return rec.get("fwd_ms", float("inf")), rec.get("fwd_bwd_ms", float("inf")), rec

        best = dict(default)
        kern.TUNE.update(best)
        base_f, base_fb, _ = score()
        log = [{"config": "default", "fwd_ms": base_f, "fwd_bwd_ms": base_fb}]
        best_f, best_fb = base_f, base_fb
        for key, values in space:
            fwd_only = key.startswith("out_")     # judged by forward time; the rest by forward+backward
            for v in values:
                if v == best[key] or not budget.ok(20):
                    continue
                kern.TUNE.update(best)
                kern.TUNE[key] = v
                try:
                    f, fb, rec = score()
                except Exception as e:
                    f, fb, rec = float("inf"), float("inf"), {"error": _err(e)}
                log.append({"config": {key: v}, "fwd_ms": f, "fwd_bwd_ms": fb,
                            **{k: r for k, r in rec.items() if "error" in k}})
                if (f < best_f) if fwd_only else (fb < best_fb):
                    best_f, best_fb, best[key] = f, fb, v
            print(f"[tune] L={L} after {key}: fwd {best_f:.3f} / fwd+bwd {best_fb:.3f} ms with {best}",
                  flush=True)
            out[str(L)] = {"default_fwd_ms": base_f, "default_fwd_bwd_ms": base_fb, "best_fwd_ms": best_f,
                           "best_fwd_bwd_ms": best_fb, "log": log,
                           "best": {k: v for k, v in best.items() if v != default[k]}}
            save()
        kern.TUNE.update(default)


# ------------------------------------------------------------------------------------------------ main
def _enter_smoke_mode(args):
    """Exercise this script on a CPU: Triton interpreter, fp16 (the interpreter has no bf16 dots),
    tiny shapes, one timed call instead of do_bench. The numbers mean nothing."""
    global SMOKE, DEVICE, DTYPE, TOKENS, H, P, N
    os.environ.setdefault("TRITON_INTERPRET", "1")
    SMOKE, DEVICE, DTYPE = True, "cpu", torch.float16
    TOKENS, H, P, N = 64, 2, 16, 16
    args.lengths = [l for l in args.lengths if l <= 64] or [32, 64]
    args.tune_lengths = [32]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json-out", required=True, help="where to write the JSON results")
    ap.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-timings", action="store_true")
    ap.add_argument("--skip-peers", action="store_true", help="time only hybridize and SDPA")
    ap.add_argument("--mamba-chunks", type=int, nargs="*", default=[256],
                    help="chunk sizes to time mamba_ssm with (256 is Mamba-2's default)")
    ap.add_argument("--tune", action="store_true", help="also sweep hybridize.ops.ssd.triton.TUNE")
    ap.add_argument("--tune-lengths", type=int, nargs="*", default=[2048, 16384])
    ap.add_argument("--budget-s", type=float, default=560.0, help="start no new work after this many seconds")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        rc = rerun_under_interpreter("hybridize.bench.ssd", argv)
        if rc is not None:
            return rc
        _enter_smoke_mode(args)

    results = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "shape": {
        "tokens_per_call": TOKENS, "H": H, "P": P, "N": N, "G": G}}

    save = results_saver(results, args.json_out, smoke=SMOKE)
    if save is None:
        return 1
    budget = Budget(args.budget_s)
    results["env"] = _env()
    save()
    if not args.skip_correctness:
        try:
            correctness(results, save)
        except Exception as e:
            results["correctness_error"] = _err(e)
    if not args.skip_timings:
        try:
            timings(results, save, args.lengths, budget, args.skip_peers, tuple(args.mamba_chunks))
        except Exception as e:
            results["timings_error"] = _err(e) + "\n" + traceback.format_exc()[-2000:]
    if args.tune:
        try:
            tune(results, save, budget, args.tune_lengths)
        except Exception as e:
            results["tuning_error"] = _err(e)
    results["wall_s"] = round(time.time() - budget.t0, 1)
    save()
    print(json.dumps({k: v for k, v in results.items() if k in ("env", "wall_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
