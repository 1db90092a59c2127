"""Probe of the fused batch-1 decode attention op (``hybridize.ops.attention.triton_decode``): where its
~8 µs per layer go. 16 layers' calls (distinct caches: a 1.2 B Llama's H = 32, Hkv = 8, head_dim 64, bf16)
are replayed from one CUDA graph (lengths reset by one copy at the graph's start), per variant of the
launch (`FUSED_TUNE`: warps, stages, precise cos/sin, split threshold), PDL on / off, RoPE off, and
against a chain of 16 trivial Triton kernels (the per-launch floor) and the same copy alone.

    source benchmarks/gpu_env.sh && python3 benchmarks/attn_decode_probe.py --json-out $OUT/attn_probe.json
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import triton
import triton.language as tl

from hybridize.bench.utils import write_json
from hybridize.ops.attention import triton_decode as td


@triton.jit
def _touch(X, n):
    i = tl.arange(0, 64)
    tl.store(X + i, tl.load(X + i, mask=i < n, other=0.0) + 1.0, mask=i < n)


def _graph_us(fn, reps):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / reps)
    return sorted(times)[2]


def step_default(q, k, v, inv_freq, kc, vc, lens, reset, Lx, P):
    def step():
        reset()
        for i in range(Lx):
            td._decode_attention_fused_impl(q[i], k[i], v[i], inv_freq, kc[i], vc[i], lens[i:i + 1], 0, P ** -0.5,
                                            1.0, False)
    return step


def _profile(step, reps=20):
    """µs per call of each CUDA kernel of `step` (eager launches, after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0):
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if t:
                rows[e.key[:80]] = dict(us_per_step=t / reps, calls_per_step=e.count / reps)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--lengths", default="64,1000,4096,8192")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--variants", default=None, help="comma-separated names of the variants to run (default: all)")
    ap.add_argument("--profile", default="8192", help="lengths at which the default (PDL off) is profiled "
                    "per kernel")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    dev, bf = torch.device("cuda"), torch.bfloat16
    Lx, H, Hkv, P = args.layers, 32, 8, 64
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, P, 2, device=dev).float() / P))
    out = dict(command="python3 benchmarks/attn_decode_probe.py " + " ".join(argv or []),
               device=torch.cuda.get_device_name(), layers=Lx, rows=[])
    scratch = torch.zeros(Lx, 64, device=dev)
    floor = _graph_us(lambda: [_touch[(1,)](scratch[i], 64) for i in range(Lx)], args.reps)
    out["trivial_chain_us"] = floor
    print("16 trivial kernels:", floor, flush=True)
    # earlier sweeps (attn_decode_probe*_h100.json): fill / warps / merge_bs / RoPE / block 128 / block 32 /
    # stages 3; merge in the last split program instead of a merge kernel (commit 08de3f1,
    # attn_decode_probe3_h100.json: slower, dropped). Session 8: the merge loads all splits of a row at once.
    # Session 9: "early" (lengths + RoPE tables before the PDL wait) on / off; with the first k / v tile
    # (registers, or the split L2-prefetched) too it was slower (commit 7c81b62, attn_decode_probe_s9_h100.json)
    variants = [("default", {}, "1"), ("pdl off", {}, "0"), ("fill 1", dict(fill=1), "1"),
                ("fill 3", dict(fill=3), "1"), ("fill 4", dict(fill=4), "1"),
                ("merge warps 2", dict(merge_warps=2), "1"), ("merge warps 1", dict(merge_warps=1), "1"),
                ("merge bs 16", dict(merge_bs=16), "1"), ("no rope", {}, "1"),
                ("stages 3", dict(stages=3), "1"), ("stages 4", dict(stages=4), "1"),
                ("block 128", dict(block_n=128), "1"), ("block 128 stages 3", dict(block_n=128, stages=3), "1"),
                ("warps 4", dict(warps=4), "1"), ("fill 2 block 32", dict(block_n=32), "1"),
                ("early off", dict(early=0), "1")]
    if args.variants:
        keep = set(args.variants.split(","))
        variants = [v for v in variants if v[0] in keep]
    for n in [int(v) for v in args.lengths.split(",")]:
        C = max(128, n + 64)
        q = torch.randn(Lx, 1, 1, H, P, device=dev, dtype=bf)
        k = torch.randn(Lx, 1, 1, Hkv, P, device=dev, dtype=bf)
        v = torch.randn_like(k)
        kc = torch.randn(Lx, 1, Hkv, C, P, device=dev, dtype=bf)
        vc = torch.randn_like(kc)
        lens = torch.full((Lx,), n, device=dev, dtype=torch.int64)
        init = lens.clone()
        reset = lambda: lens.copy_(init)  # noqa: E731
        copy_us = _graph_us(reset, args.reps)
        for name, tune, pdl in variants:
            saved = dict(td.FUSED_TUNE)
            td.FUSED_TUNE.update(tune)
            os.environ["HYBRIDIZE_PDL"] = pdl
            f = inv_freq if name != "no rope" else inv_freq[:0]
            step = step_default(q, k, v, f, kc, vc, lens, reset, Lx, P)
            try:
                us = _graph_us(step, args.reps)
                rec = dict(length=n, capacity=C, variant=name, us_per_layer=(us - copy_us) / Lx, chain_us=us,
                           copy_us=copy_us, floor_us=2 * Hkv * n * P * 2 / 3.35e12 * 1e6)
            except Exception as e:  # noqa: BLE001 - recorded, not fatal
                rec = dict(length=n, variant=name, error=f"{type(e).__name__}: {e}"[:1500])
            finally:
                td.FUSED_TUNE.clear()
                td.FUSED_TUNE.update(saved)
                os.environ.pop("HYBRIDIZE_PDL", None)
            print(rec, flush=True)
            out["rows"].append(rec)
        if str(n) in args.profile.split(","):
            os.environ["HYBRIDIZE_PDL"] = "0"
            prof = _profile(step_default(q, k, v, inv_freq, kc, vc, lens, reset, Lx, P))
            out.setdefault("profiles", {})[str(n)] = prof
            print("profile", n, prof, flush=True)
            os.environ.pop("HYBRIDIZE_PDL", None)
    out["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.json_out:
        write_json(out, args.json_out)


if __name__ == "__main__":
    main()
