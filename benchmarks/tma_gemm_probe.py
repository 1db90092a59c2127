"""Does a TMA-fed skinny GEMM stream weights faster than the cp.async one? (GPU probe, H100.)

y (M, N) = x (M, K) · Wᵀ at decode shapes (M = 64 rows), one probe kernel in two flavours that differ only
in how tiles reach shared memory: pointer loads (what `hybridize.ops.gemm` does: cp.async after triton's
software pipelining) or host-built tensor descriptors (TMA bulk copies). Same tiles, same grid (whole tiles,
or split-K with fp32 atomics into a zeroed output for the deep-K down projection — the zeroing is in both),
timed in CUDA-graph replay over > 256 MB of weight copies (none left in L2), beside cuBLAS and the
production kernel's tuned configs from the cache (`--cache`), against the HBM floor.

    source benchmarks/gpu_env.sh && python3 benchmarks/tma_gemm_probe.py --json-out $OUT/tma.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SHAPES = [("o", 2048, 2048), ("in_proj", 5152, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192),
          ("lm_head", 128256, 2048)]


@triton.jit
def _probe_kernel(X, W, Y, xd, wd, M, N, K, stride_xm, stride_wn, stride_ym, k_per,
                  TMA: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """acc (BLOCK_N, BLOCK_M) = W[tile rows, K range] · x[:, K range]ᵀ; program (tile, split)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    n0 = tile * BLOCK_N
    k_lo = split * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    rn = n0 + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if TMA:
            w = wd.load([n0, k0])
            x = xd.load([0, k0])
        else:
            w = tl.load(W + rn[:, None].to(tl.int64) * stride_wn + (k0 + rk)[None, :], mask=(rn < N)[:, None],
                        other=0.0, eviction_policy="evict_first")
            x = tl.load(X + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=(rm < M)[:, None], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
    mask = (rn < N)[:, None] & (rm < M)[None, :]
    ptrs = Y + rm[None, :] * stride_ym + rn[:, None]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(Y.dtype.element_ty), mask=mask)


def probe_gemm(x, w, y, block_n, block_k, splits, warps, stages, tma):
    from triton.tools.tensor_descriptor import TensorDescriptor
    M, K = x.shape
    N = w.shape[0]
    BM = max(16, triton.next_power_of_2(M))
    k_per = math.ceil(K / splits / block_k) * block_k
    if tma:
        wd = TensorDescriptor.from_tensor(w, [block_n, block_k])
        xd = TensorDescriptor(x, list(x.shape), list(x.stride()), [BM, block_k])
    else:
        wd = xd = w
    if splits > 1:
        y.zero_()
    _probe_kernel[(triton.cdiv(N, block_n), splits)](
        x, w, y, xd, wd, M, N, K, x.stride(0), w.stride(0), y.stride(0), k_per,
        TMA=tma, ATOMIC=splits > 1, BLOCK_M=BM, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages)
    return y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--hbm-bw", type=float, default=3.35e12)
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--json-out", default="")
    args = ap.parse_args()
    from hybridize.ops.gemv import _graph_time_us

    dev = torch.device("cuda")
    dt = torch.bfloat16
    M = args.m
    rows = []
    for name, N, K in [s for s in SHAPES if s[0] in args.shapes.split(",")]:
        wbytes = N * K * 2
        copies = max(2, math.ceil(256e6 / wbytes))
        ws = [torch.randn(N, K, device=dev, dtype=dt) / 32 for _ in range(copies)]
        x = torch.randn(M, K, device=dev, dtype=dt)
        ref = F.linear(x.float(), ws[0].float())
        floor = (wbytes + M * K * 2 + M * N * 2) / args.hbm_bw * 1e6
        row = {"shape": name, "M": M, "N": N, "K": K, "floor_us": floor, "all": {}}
        row["cublas_us"] = _graph_time_us(lambda i: F.linear(x, ws[i]), copies)
        splits_set = (1,) if math.ceil(N / 64) >= 132 else (2, 4) if K <= 2048 else (4, 8)
        for bn, bk, splits, (warps, stages), tma in itertools.product(
                (64, 128), (64, 128), splits_set, ((4, 4), (4, 5), (8, 4)), (False, True)):
            if bn * bk > 128 * 128 or splits * bk > K:
                continue
            ys = [torch.empty(M, N, device=dev, dtype=torch.float32 if splits > 1 else dt) for _ in range(copies)]
            key = f"{bn}/{bk}/{splits}/{warps}/{stages}/{'tma' if tma else 'ptr'}"
            try:
                out = probe_gemm(x, ws[0], ys[0], bn, bk, splits, warps, stages, tma)
                err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
                if err > 2e-2:
                    row["all"][key] = f"wrong: rel err {err:.3g}"
                    continue
                row["all"][key] = _graph_time_us(
                    lambda i: probe_gemm(x, ws[i], ys[i], bn, bk, splits, warps, stages, tma), copies)
            except Exception as e:  # noqa: BLE001 — a config that does not compile is reported, not fatal
                row["all"][key] = f"{type(e).__name__}: {str(e)[:160]}"
            del ys
        for flavour in ("ptr", "tma"):
            timed = {k: v for k, v in row["all"].items() if k.endswith(flavour) and isinstance(v, float)}
            if timed:
                k, v = min(timed.items(), key=lambda kv: kv[1])
                row[f"best_{flavour}"], row[f"best_{flavour}_us"] = k, v
                row[f"best_{flavour}_frac"] = floor / v
        print(f"{name:8s} N={N:6d} K={K:5d} floor {floor:6.1f} µs  cuBLAS {row['cublas_us']:6.1f}  "
              f"ptr {row.get('best_ptr_us', float('nan')):6.1f} ({row.get('best_ptr')})  "
              f"tma {row.get('best_tma_us', float('nan')):6.1f} ({row.get('best_tma')})", flush=True)
        rows.append(row)
        del ws
        torch.cuda.empty_cache()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"command": "benchmarks/tma_gemm_probe.py", "device": torch.cuda.get_device_name(),
                       "triton": triton.__version__, "torch": torch.__version__, "time": time.time(),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
