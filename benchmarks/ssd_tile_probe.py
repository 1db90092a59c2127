"""Localise the 16-bit SSD tile fault (P <= 32, 32 < N <= 64 on H100 / triton 3.6; guarded by
`hybridize.ops.ssd.known_bad_tile`): run the Triton forward (and backward) directly — bypassing the
guard — for each (P, N) and each launch-knob variant (`hybridize.ops.ssd.triton.TUNE`), every case in its
own subprocess (an illegal memory access poisons the CUDA context), and record the error vs the fp32
reference or the crash.

    python3 benchmarks/ssd_tile_probe.py --json-out $OUT/ssd_tile_probe_h100.json    # GPU, ~2 min
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

VARIANTS = {
    "default": {},                      # out_block_p: P tile padded to 64 beside a 64-wide N tile
    "unpadded": {"out_bp": "P"},
    "state_bn=32": {"state_bn": 32},
    "state_bn=16": {"state_bn": 16},
    "state_stages=1": {"state_stages": 1},
    "out_bp=64": {"out_bp": 64},
    "chunk=32": {"chunk": 32},
}
SHAPES = [(32, 64), (16, 64), (32, 128)]
#: variants also run with D, z and dt_bias (as the Mamba-2 layer calls it)
EXTRAS_VARIANTS = ("default", "unpadded", "chunk=32", "state_bn=32")

CASE = r"""
import json, sys, torch
from hybridize.ops.ssd import reference as ref
from hybridize.ops.ssd import triton as kern
P, N, knobs, extras = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4] == "1"
if knobs.get("out_bp") == "P":      # the P tile before out_block_p padded it
    knobs["out_bp"] = min(64, max(16, 1 << (P - 1).bit_length()))
kern.TUNE.update(knobs)
g = torch.Generator(device="cuda").manual_seed(0)
r = lambda *s: torch.randn(*s, device="cuda", generator=g)
B, L, H = 8, 128, 4
x, dt = r(B, L, H, P).bfloat16().requires_grad_(), r(B, L, H).bfloat16().requires_grad_()
Bm, Cm = r(B, L, 1, N).bfloat16().requires_grad_(), r(B, L, 1, N).bfloat16().requires_grad_()
A = -torch.rand(H, device="cuda", generator=g) - 0.5
kw = dict(chunk_size=64, dt_softplus=True)
if extras:   # what the Mamba-2 layer passes: D, the z gate, dt_bias
    kw.update(D=r(H), z=r(B, L, H, P).bfloat16(), dt_bias=r(H))
out = {}
def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
y = kern.ssd_chunked_triton(x, dt, A, Bm, Cm, **kw)
torch.cuda.synchronize()
leaves = [x, dt, Bm, Cm]
f32 = [t.detach().float().requires_grad_() for t in leaves]
want = ref.ssd_chunked(f32[0], f32[1], A, f32[2], f32[3], **{**kw, **({"z": kw["z"].float()} if extras else {})})
out["fwd_rel"] = rel(y, want)
out["fwd_finite"] = bool(torch.isfinite(y).all())
print("FWD " + json.dumps(out), flush=True)
gy = r(*y.shape).bfloat16()
got = torch.autograd.grad((y * gy).sum(), leaves)
torch.cuda.synchronize()
ref_g = torch.autograd.grad((want * gy.float()).sum(), f32)
out["bwd_rel"] = {n: rel(a, b) for n, a, b in zip(("dx", "ddt", "dB", "dC"), got, ref_g)}
print("RESULT " + json.dumps(out))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json-out", default="ssd_tile_probe.json")
    p.add_argument("--timeout", type=float, default=90)
    p.add_argument("--jobs", type=int, default=4, help="cases run at once (separate processes)")
    args = p.parse_args(argv)
    rows = []
    lock = threading.Lock()

    def one(case):
        (P, N), (name, knobs), extras = case
        if True:
            try:
                # launch-blocking: a fault is raised by the launch that caused it, so the traceback
                # names the kernel
                env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
                proc = subprocess.run([sys.executable, "-c", CASE, str(P), str(N), json.dumps(knobs),
                                       "1" if extras else "0"],
                                      capture_output=True, text=True, timeout=args.timeout, env=env)
                line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
                fwd = [s for s in proc.stdout.splitlines() if s.startswith("FWD ")]
                if line:
                    res = json.loads(line[-1][7:])
                else:
                    err = proc.stderr.strip().splitlines() or ["?"]
                    where = [e.strip() for e in err if "ops/ssd/triton.py" in e or "_kernel[" in e]
                    res = {"crash": err[-1][:300], "crash_at": where[-4:],
                           **({"fwd_before_crash": json.loads(fwd[-1][4:])} if fwd else {})}
            except subprocess.TimeoutExpired:
                res = {"crash": "timeout"}
            with lock:
                rows.append({"P": P, "N": N, "variant": name, "z_D_dt_bias": extras, **res})
                print(json.dumps(rows[-1]), flush=True)
                with open(args.json_out, "w") as f:
                    json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)

    cases = [(s, v, e) for e in (False, True) for s in SHAPES for v in VARIANTS.items()
             if not e or v[0] in EXTRAS_VARIANTS]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
