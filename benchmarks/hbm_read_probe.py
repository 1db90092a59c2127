"""How fast can one kernel read N bytes from HBM on this GPU? (GPU probe.)

The decode "HBM floor" divides bytes by the nominal bandwidth (3.35 TB/s on an H100 SXM). A single kernel
that only reads — no math, no dependency on a previous kernel — shows what is reachable at the sizes of a
decode step's matmuls (8-67 MB at 1.2 B parameters, 525 MB for the LM head): a streaming Triton kernel
(each program sums a contiguous run of 16-byte vectors, evict-first) over a few grid sizes, and torch's
`sum`, each timed in CUDA-graph replay over > 256 MB of distinct buffers (nothing left in L2).

    source benchmarks/gpu_env.sh && python3 benchmarks/hbm_read_probe.py --json-out $OUT/hbm_read.json
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import triton
import triton.language as tl

#: bytes: the 1.2 B models' 2048² / in_proj / q,k,v / down / gate-up weights, the LM head
SIZES_MB = (8.4, 12.6, 21.1, 33.6, 67.1, 525.3)


@triton.jit
def _read_kernel(X, Out, n, per, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid * per
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, tl.minimum(start + per, n), BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(X + idx, mask=idx < n, other=0.0, eviction_policy="evict_first").to(tl.float32)
    tl.store(Out + pid, tl.sum(acc))


def read(x, out, programs, block):
    n = x.numel()
    per = math.ceil(n / programs / block) * block
    _read_kernel[(math.ceil(n / per),)](x, out, n, per, BLOCK=block, num_warps=8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hbm-bw", type=float, default=3.35e12)
    ap.add_argument("--json-out", default="")
    args = ap.parse_args()
    from hybridize.ops.gemv import _graph_time_us

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = []
    for mb in SIZES_MB:
        n = int(mb * 1e6 / 2)
        copies = max(2, math.ceil(256e6 / (n * 2)))
        xs = [torch.randn(n, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        out = torch.empty(16 * sms, device=dev, dtype=torch.float32)
        row = {"MB": mb, "floor_us": n * 2 / args.hbm_bw * 1e6, "triton": {}}
        for mult in (1, 2, 4, 8, 16):
            for block in (2048, 4096):
                key = f"{mult}x{sms}/{block}"
                row["triton"][key] = _graph_time_us(
                    lambda i, xs=xs, out=out, g=mult * sms, b=block: read(xs[i], out, g, b), copies)
        row["torch_sum_us"] = _graph_time_us(lambda i, xs=xs: xs[i].sum(), copies)
        k, v = min(row["triton"].items(), key=lambda kv: kv[1])
        row["best"], row["best_us"], row["best_frac_of_floor"] = k, v, row["floor_us"] / v
        row["best_TBps"] = n * 2 / v / 1e6
        print(f"{mb:6.1f} MB  floor {row['floor_us']:6.1f} µs  best read {v:6.1f} µs ({k}, "
              f"{row['best_TBps']:.2f} TB/s, {100 * row['best_frac_of_floor']:.0f} % of the floor)  "
              f"torch.sum {row['torch_sum_us']:6.1f}", flush=True)
        rows.append(row)
        xs = None
        torch.cuda.empty_cache()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"command": "benchmarks/hbm_read_probe.py", "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
