"""Probe of the batched decode attention (``hybridize.ops.attention.triton_decode.decode_attention``, the
split + merge kernels a batch > 1 decode step runs): a chain of --layers layers (own caches, B rows of
--length cached tokens each) replayed from one CUDA graph, per variant of `UNFUSED_TUNE` (warps, pipeline
stages, GPU fills, tile length), against the HBM floor (every cached k / v byte read once).

    python3 benchmarks/attn_decode_batch_probe.py --batch 64 --length 8192 --json-out out.json
"""
import argparse
import json

import torch
from attn_decode_probe import _graph_us  # this folder: the CUDA-graph replay timer

from hybridize.ops.attention import triton_decode as td

# "few" / "many": the settings below / above the programs-fill-the-SMs threshold, forced for every batch
_FEW = dict(warps_many=4, stages_many=2)
VARIANTS = [("default", {}), ("few", _FEW), ("many", dict(warps=8, stages=3)),
            ("stages 3", dict(stages=3, **_FEW)), ("stages 4", dict(stages=4, stages_many=4, warps_many=4)),
            ("fill 2", dict(fill=2)), ("fill 8", dict(fill=8)), ("block 128", dict(block_n=128, **_FEW)),
            ("block 32", dict(block_n=32, **_FEW))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variants", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    dev, bf = torch.device("cuda"), torch.bfloat16
    B, H, Hkv, P, n, Lx = args.batch, 32, 8, 64, args.length, args.layers
    C = n + 64
    kc = [torch.randn(B, Hkv, C, P, device=dev, dtype=bf) for _ in range(Lx)]
    vc = [torch.randn_like(k) for k in kc]
    q = torch.randn(B, H, 1, P, device=dev, dtype=bf)
    n0 = torch.full((B,), n, device=dev, dtype=torch.long)
    floor_us = 2 * B * Hkv * (n + 1) * P * 2 / 3.35e12 * 1e6
    out = dict(command="python3 benchmarks/attn_decode_batch_probe.py " + " ".join(argv or []),
               device=torch.cuda.get_device_name(), batch=B, length=n, layers=Lx, floor_us_per_layer=floor_us, rows=[])
    keep = set(args.variants.split(",")) if args.variants else None
    for name, tune in VARIANTS:
        if keep and name not in keep:
            continue
        saved = dict(td.UNFUSED_TUNE)
        td.UNFUSED_TUNE.update(tune)
        try:
            us = _graph_us(lambda: [td.decode_attention(q, kc[i], vc[i], n0, 0, P ** -0.5) for i in range(Lx)],
                           args.reps) / Lx
            rec = dict(variant=name, tune=dict(td.UNFUSED_TUNE), us_per_layer=us, of_floor=floor_us / us)
        except Exception as e:  # noqa: BLE001 — a variant that fails to compile is reported, not fatal
            rec = dict(variant=name, error=f"{type(e).__name__}: {e}"[:500])
        finally:
            td.UNFUSED_TUNE.clear()
            td.UNFUSED_TUNE.update(saved)
        out["rows"].append(rec)
        print(rec, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
