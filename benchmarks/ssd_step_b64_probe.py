"""SSD one-token step at batch 64 in the Mamba-in-the-Llama 1.2 B layout (H=32 heads, P=N=64, x / B per
kv head (8), C per head), a sweep of `hybridize.ops.ssd.triton_step.TUNE` (state bytes per program, warps,
eviction hint), each timed in CUDA-graph replay over > 256 MB of distinct states (what a decode step over
many layers sees), against the HBM floor (state read + write and the per-token inputs / outputs).

    source benchmarks/gpu_env.sh && python3 benchmarks/ssd_step_b64_probe.py --json-out $OUT/ssd_b64.json
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from hybridize.ops.gemv import _graph_time_us
from hybridize.ops.ssd import triton_step
from hybridize.ops.ssd.triton_step import ssd_step_triton


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--state-dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--hbm-bw", type=float, default=3.35e12)
    ap.add_argument("--json-out", required=True)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    sdt = torch.bfloat16 if args.state_dtype == "bf16" else torch.float32
    B, H, P, N, Hkv = args.batch, 32, 64, 64, 8
    es = torch.empty((), dtype=sdt).element_size()
    copies = max(2, -(-(256 << 20) // (B * H * P * N * es)))
    states = [torch.randn(B, H, P, N, device=dev, dtype=sdt) * 0.1 for _ in range(copies)]
    xbc = torch.randn(B, Hkv * P + Hkv * N + H * N, device=dev, dtype=dt)
    x, Bm, Cm = torch.split(xbc, (Hkv * P, Hkv * N, H * N), dim=-1)
    x, Bm, Cm = x.unflatten(-1, (Hkv, P)), Bm.unflatten(-1, (Hkv, N)), Cm.unflatten(-1, (H, N))
    dtv = torch.randn(B, H, device=dev, dtype=dt)
    A_log = torch.randn(H, device=dev)
    dt_bias, D = torch.randn(H, device=dev), torch.randn(H, device=dev)
    floor = (2 * B * H * P * N * es + B * (Hkv * P + Hkv * N + H * N + H + H * P) * 2) / args.hbm_bw * 1e6
    rows = []
    saved = dict(triton_step.TUNE)
    for tile, warps, evict in itertools.product((4096, 8192, 16384, 32768), (None, 2, 4, 8), (True, False)):
        triton_step.TUNE.update(step_tile_bytes=tile, step_warps=warps, evict_first=evict)
        try:
            us = _graph_time_us(lambda i: ssd_step_triton(x, dtv, None, Bm, Cm, states[i], D=D, dt_bias=dt_bias,
                                                          dt_softplus=True, A_log=A_log), copies)
        except Exception as e:  # noqa: BLE001
            us = f"{type(e).__name__}: {str(e)[:100]}"
        rows.append({"tile_bytes": tile, "warps": warps, "evict_first": evict, "us": us,
                     "frac": floor / us if isinstance(us, float) else None})
        print(rows[-1], flush=True)
    triton_step.TUNE.clear()
    triton_step.TUNE.update(saved)
    timed = [r for r in rows if isinstance(r["us"], float)]
    best = min(timed, key=lambda r: r["us"]) if timed else None
    out = {"command": "benchmarks/ssd_step_b64_probe.py", "device": torch.cuda.get_device_name(), "batch": B,
           "state_dtype": args.state_dtype, "floor_us": floor, "default": saved, "best": best, "rows": rows}
    print("floor", floor, "best", best)
    with open(args.json_out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
