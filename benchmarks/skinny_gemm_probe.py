"""Skinny-M GEMM probe (GPU): y (M, N) = x (M, K) · Wᵀ for a 1.2 B Llama / Mamba-in-the-Llama model's weight
shapes at decode batch sizes, cuBLAS (F.linear) vs `hybridize.ops.gemm` configs, each timed in CUDA-graph
replay over > 256 MB of distinct weight copies (no weight left in L2, no launch gaps: what a decode step
sees), against the HBM floor (weight + x + y bytes at --hbm-bw).

    source benchmarks/gpu_env.sh && python3 benchmarks/skinny_gemm_probe.py --json-out $OUT/skinny.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F

from hybridize.ops.gemm.reference import skinny_gemm_reference
from hybridize.ops.gemm.triton import CANDIDATES, GemmConfig, clip, skinny_gemm_triton
from hybridize.ops.gemv import _graph_time_us

#: (name, N, K): fused q/k/v, o / Mamba out_proj, fused gate/up, down, Mamba in_proj (MIL layout), LM head
SHAPES = [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192),
          ("in_proj", 5152, 2048), ("lm_head", 128256, 2048)]


def grid() -> list:
    out = []
    for bn, bk, split, (w, s) in itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4, 8),
                                                  ((4, 3), (4, 5), (8, 4))):
        if bn * bk > 128 * 128:
            continue
        out.append(GemmConfig(bn, bk, split, w, s))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="64,32,16,8")
    ap.add_argument("--full-grid-ms", default="64", help="M values that sweep the whole grid, not CANDIDATES")
    ap.add_argument("--hbm-bw", type=float, default=3.35e12)
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--json-out", required=True)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    t0 = time.time()
    rows = []
    full = {int(m) for m in args.full_grid_ms.split(",") if m}
    for M in [int(m) for m in args.ms.split(",")]:
        for name, N, K in SHAPES:
            if time.time() - t0 > args.budget_s:
                break
            copies = max(2, min(64, -(-(256 << 20) // (N * K * 2))))
            ws = [torch.randn(N, K, device=dev, dtype=dt) * K ** -0.5 for _ in range(copies)]
            x = torch.randn(M, K, device=dev, dtype=dt)
            ys = [torch.empty(M, N, device=dev, dtype=dt) for _ in range(copies)]
            floor = (N * K + M * K + M * N) * 2 / args.hbm_bw * 1e6
            cub = _graph_time_us(lambda i: ys.__setitem__(i, F.linear(x, ws[i])), copies)
            want = skinny_gemm_reference(x, ws[0]).float()
            res = {}
            cands = grid() if M in full else list(CANDIDATES)
            for cfg in dict.fromkeys(clip(c, N, K) for c in cands):
                key = f"{cfg.block_n}/{cfg.block_k}/{cfg.split_k}/{cfg.num_warps}/{cfg.num_stages}"
                try:
                    got = skinny_gemm_triton(x, ws[0], None, cfg).float()
                    if not torch.allclose(got, want, atol=2e-2, rtol=2e-2):
                        res[key] = "mismatch"
                        continue
                    res[key] = _graph_time_us(lambda i, c=cfg: skinny_gemm_triton(x, ws[i], None, c, out=ys[i]),
                                              copies)
                except Exception as e:  # noqa: BLE001
                    res[key] = f"{type(e).__name__}: {str(e)[:100]}"
            timed = {k: v for k, v in res.items() if isinstance(v, float)}
            best = min(timed, key=timed.get) if timed else None
            row = {"M": M, "shape": name, "N": N, "K": K, "floor_us": floor, "cublas_us": cub,
                   "cublas_frac": floor / cub, "best": best, "best_us": timed.get(best),
                   "best_frac": floor / timed[best] if best else None, "all": res}
            rows.append(row)
            print(f"[{time.time() - t0:6.1f}s] M={M:3d} {name:8s} floor {floor:7.2f} µs  cuBLAS {cub:7.2f} "
                  f"({floor / cub:.0%})  best {best} {timed.get(best, float('nan')):7.2f} "
                  f"({floor / timed[best] if best else 0:.0%})", flush=True)
            del ws
            with open(args.json_out, "w") as f:
                json.dump({"command": "benchmarks/skinny_gemm_probe.py", "device": torch.cuda.get_device_name(),
                           "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
