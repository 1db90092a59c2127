"""Probe of programmatic dependent launch (``hybridize.ops.pdl``) on the batch-1 decode GEMV chain.

A 1.2 B Llama-style model's batch-1 step is, per layer: [qkv GEMV + RMSNorm] → attention → [o GEMV +
residual] → [gate/up GEMV + RMSNorm + SwiGLU] → [down GEMV + residual]. This probe replays the GEMV part
of 16 such layers (distinct weights: 1.9 GB, no L2 reuse) from one CUDA graph, with PDL off, on without a
prefetch, and on with an L2 prefetch of each program's first PREFETCH weight elements before the wait,
and reports µs per chain and the share of the HBM floor (weight bytes ÷ 3.35 TB/s).

    source benchmarks/gpu_env.sh && python3 benchmarks/pdl_probe.py --json-out $OUT/pdl_probe.json

(~20 s on an H100.) Every variant's outputs are compared with PDL off (they must be bit-identical).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from hybridize.bench.utils import write_json
from hybridize.ops.gemv.triton import GemvConfig, gemv_triton

#: (name, N, K, fused parts) of one layer's GEMVs (Llama 3.2 1B-like: d 2048, ffn 8192, 8 kv heads of 64)
LAYER = [("qkv", 3072, 2048, "norm"), ("o", 2048, 2048, "res"), ("gate_up", 16384, 2048, "norm+glu"),
         ("down", 2048, 8192, "res")]
VARIANTS = [("off", "0", None), ("pdl", "1", "0"), ("pdl+pf1024", "1", "1024"), ("pdl+pf2048", "1", "2048"),
            ("pdl+pf8192", "1", "8192"), ("pdl+pf256", "1", "256")]


def build(layers, device):
    g = torch.Generator(device=device).manual_seed(0)
    ws = [[(torch.randn(N, K, device=device, dtype=torch.bfloat16, generator=g) * K ** -0.5) for _, N, K, _ in
           LAYER] for _ in range(layers)]
    nw = torch.ones(2048, device=device, dtype=torch.bfloat16)
    return ws, nw


def chain(ws, nw, x, cfgs):
    h = x
    for qkv, o, gu, down in ws:
        a = gemv_triton(h, qkv, None, cfgs["qkv"], norm_weight=nw, eps=1e-5)
        h = gemv_triton(a[:, :2048], o, None, cfgs["o"], residual=h)
        m = gemv_triton(h, gu, None, cfgs["gate_up"], norm_weight=nw, eps=1e-5, glu="silu")
        h = gemv_triton(m, down, None, cfgs["down"], residual=h)
    return h


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--hbm-bw", type=float, default=3.35e12)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    ws, nw = build(args.layers, dev)
    cfgs = {"qkv": GemvConfig(2, 1024, 4, 3), "o": GemvConfig(2, 1024, 4, 3), "gate_up": GemvConfig(2, 1024, 4, 3),
            "down": GemvConfig(1, 2048, 4, 3)}
    wbytes = sum(w.numel() * w.element_size() for layer in ws for w in layer)
    x = torch.randn(1, 2048, device=dev, dtype=torch.bfloat16)
    out = dict(command="python3 benchmarks/pdl_probe.py " + " ".join(argv or []), device=torch.cuda.get_device_name(),
               layers=args.layers, weight_bytes=wbytes, floor_us=wbytes / args.hbm_bw * 1e6, variants=[])
    ref = None
    for name, pdl, pf in VARIANTS:
        os.environ["HYBRIDIZE_PDL"] = pdl
        if pf is None:
            os.environ.pop("HYBRIDIZE_PDL_PREFETCH", None)
        else:
            os.environ["HYBRIDIZE_PDL_PREFETCH"] = pf
        try:
            for _ in range(2):
                y = chain(ws, nw, x, cfgs)                        # compile + warm
            torch.cuda.synchronize()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                y = chain(ws, nw, x, cfgs)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = chain(ws, nw, x, cfgs)
            graph.replay()
            torch.cuda.synchronize()
            same = None if ref is None else bool(torch.equal(y, ref))
            ref = y.clone() if ref is None else ref
            times = []
            for _ in range(5):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(args.reps // 5):
                    graph.replay()
                e1.record()
                torch.cuda.synchronize()
                times.append(e0.elapsed_time(e1) * 1e3 / (args.reps // 5))
            us = sorted(times)[len(times) // 2]
            rec = dict(name=name, us=us, fraction_of_floor=out["floor_us"] / us, same_as_off=same, all_us=times)
        except Exception as e:   # noqa: BLE001 - a variant that fails is recorded, not fatal
            rec = dict(name=name, error=f"{type(e).__name__}: {e}"[:2000])
        print(rec, flush=True)
        out["variants"].append(rec)
    os.environ.pop("HYBRIDIZE_PDL_PREFETCH", None)
    os.environ.pop("HYBRIDIZE_PDL", None)
    out["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.json_out:
        write_json(out, args.json_out)


if __name__ == "__main__":
    main()
