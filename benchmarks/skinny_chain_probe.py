"""Skinny-GEMM chain probe (GPU): the matmuls of 16 Mamba-in-the-Llama layers at decode batch M (in_proj,
out_proj + residual, fused gate/up with SiLU-GLU, down + residual; each layer's output feeds the next), one
CUDA graph, µs per layer vs the HBM floor — for sets of per-matmul configs and pre-wait L2 prefetch sizes.

Why: in isolation a 2048² matmul at 64 rows takes ~6.5 µs for a 2.7 µs floor — each kernel of the chain
pays its ramp and tail. Under PDL the next kernel's programs can start (and L2-prefetch their weights)
while the current one drains, but only where they fit on an SM beside it: shared memory (stages × tile)
decides. This probe measures whether smaller-footprint configs + the prefetch win back the boundary.

    source benchmarks/gpu_env.sh && python3 benchmarks/skinny_chain_probe.py --json-out $OUT/chain.json
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from hybridize.ops.gemm import triton as kern
from hybridize.ops.gemv import _graph_time_us

G = kern.GemmConfig
#: name → (in_proj, out_proj, gate_up, down) configs; None: cuBLAS (+ the residual by addmm)
VARIANTS = {
    "tuned": (G(64, 128, 1, 4, 5), None, G(64, 128, 0, 4, 3), G(64, 256, 4, 4, 3)),
    "tuned_sk": (G(64, 128, 1, 4, 5), G(16, 256, 1, 4, 4), G(64, 128, 0, 4, 3), G(64, 256, 4, 4, 3)),
    "s3": (G(64, 128, 1, 4, 3), G(64, 128, 4, 4, 3), G(64, 128, 1, 4, 3), G(64, 128, 4, 4, 3)),
    "s3_stream": (G(64, 128, 0, 4, 3), G(64, 128, 0, 4, 3), G(64, 128, 0, 4, 3), G(64, 128, 0, 4, 3)),
    "s2": (G(64, 128, 1, 4, 2), G(64, 128, 4, 4, 2), G(64, 128, 1, 4, 2), G(64, 128, 4, 4, 2)),
    "k64s4": (G(64, 64, 1, 4, 4), G(64, 64, 4, 4, 4), G(64, 64, 1, 4, 4), G(64, 64, 4, 4, 4)),
    "n32s4": (G(32, 128, 1, 4, 4), G(32, 128, 2, 4, 4), G(32, 128, 1, 4, 4), G(32, 128, 2, 4, 4)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--prefetch", default="0,512,2048", help="pre-wait L2 prefetch, weight elements a row")
    ap.add_argument("--hbm-bw", type=float, default=3.35e12)
    ap.add_argument("--json-out", required=True)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    D, I, XZ = 2048, 8192, 5152
    M = args.rows
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt) * s[-1] ** -0.5   # noqa: E731
    layers = [dict(inp=mk(XZ, D), out=mk(D, D), gu=mk(2 * I, D), down=mk(D, I)) for _ in range(args.layers)]
    x0 = torch.randn(M, D, device=dev, dtype=dt)
    floor = sum(w.numel() for w in layers[0].values()) * 2 / args.hbm_bw * 1e6

    def mm(x, w, cfg, residual=None, glu=None):
        if cfg is None:
            return torch.addmm(residual, x, w.t()) if residual is not None else F.linear(x, w)
        return kern.skinny_gemm_triton(x, w, None, cfg, residual=residual, glu=glu)

    def chain(cfgs):
        c_in, c_out, c_gu, c_down = cfgs
        x = x0
        for L in layers:
            p = mm(x, L["inp"], c_in)
            h = mm(p[:, :D], L["out"], c_out, residual=x)
            a = mm(h, L["gu"], c_gu, glu="silu") if c_gu is not None else F.silu(F.linear(h, L["gu"][:I])) * F.linear(
                h, L["gu"][I:])
            x = mm(a, L["down"], c_down, residual=h)
        return x

    rows = []
    want = None
    for name in args.variants.split(","):
        for pf in [int(v) for v in args.prefetch.split(",")]:
            kern.PREFETCH = pf
            cfgs = VARIANTS[name]
            try:
                got = chain(cfgs).float()
                if want is None:
                    want = got
                err = (got - want).abs().max().item() / max(1e-6, want.abs().max().item())
                us = _graph_time_us(lambda i, c=cfgs: chain(c), 1, reps=30) / args.layers
            except Exception as e:  # noqa: BLE001 — report and go on
                rows.append(dict(variant=name, prefetch=pf, error=f"{type(e).__name__}: {str(e)[:200]}"))
                print(rows[-1], flush=True)
                continue
            rows.append(dict(variant=name, prefetch=pf, us_per_layer=us, floor_us=floor, frac=floor / us,
                             rel_err=err, configs=[None if c is None else list(c.__dict__.values()) for c in cfgs]))
            print(f"{name:>10} prefetch {pf:5d}: {us:7.2f} µs/layer ({100 * floor / us:5.1f} % of the floor "
                  f"{floor:.1f}), rel err {err:.1e}", flush=True)
    with open(args.json_out, "w") as f:
        json.dump(dict(command="python3 benchmarks/skinny_chain_probe.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json_out"),
            device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
