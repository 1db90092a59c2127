"""`hybridize bench kernels|ssd|step|scan|decode|synthetic|quality|speculative|plot`: run a benchmark suite,
write JSON (+ PNG)."""
from __future__ import annotations

import importlib
import shlex
from pathlib import Path

SUITES = {"ssd": "hybridize.bench.ssd", "step": "hybridize.bench.step", "scan": "hybridize.bench.scan",
          "decode": "hybridize.bench.decode",
          "synthetic": "hybridize.bench.synthetic", "quality": "hybridize.bench.quality",
          "speculative": "hybridize.bench.speculative"}


def _run_suite(name: str, argv: list) -> int:
    return int(importlib.import_module(SUITES[name]).main(argv) or 0)


def cmd_bench(args) -> int:
    from hybridize.bench.plots import plot_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(args.suite_args or "")
    smoke = ["--smoke"] if args.smoke else []
    if args.suite == "plot":
        for p in plot_dir(out):
            print(p)
        return 0
    if args.suite == "kernels":
        rc = _run_suite("ssd", ["--json-out", str(out / "ssd.json"), *smoke, *extra])
        rc |= _run_suite("step", ["--json-out", str(out / "step.json"), *smoke, *extra])
        rc |= _run_suite("scan", ["--json-out", str(out / "scan.json"), "--no-plot", *smoke, *extra])
    else:
        if args.smoke and args.suite in ("decode", "quality", "speculative"):
            smoke = ["--quick"]
        plot = ["--no-plot"] if args.suite in ("quality", "scan") else []      # plot_dir below draws it
        rc = _run_suite(args.suite, ["--json-out", str(out / f"{args.suite}.json"), *plot, *smoke, *extra])
    for p in plot_dir(out):
        print("plot:", p)
    return rc


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: kernels vs peers and the HBM floor, decode throughput, "
                                     "distillation quality",
                       description="Run a benchmark suite on the GPU and write JSON (and PNG plots) to --out. "
                                   "kernels = ssd + step + scan (ssd.json, step.json, scan.json + PNGs); "
                                   "scan = the RG-LRU linear scan and the causal conv1d, forward and "
                                   "forward+backward vs fla, PyTorch and the HBM floor (see "
                                   "`python -m hybridize.bench.scan --help`); each suite takes its own flags "
                                   "through --suite-args (e.g. `hybridize bench ssd --suite-args '--lengths 2048 16384'`; see "
                                   "`python -m hybridize.bench.ssd --help`). Peers (mamba_ssm, fla) are optional "
                                   "imports. quality = the distillation quality study (teacher pretraining, "
                                   "attention fractions, init and MOHAWK ablations, throughput; see "
                                   "`python -m hybridize.bench.quality --help`). speculative = speculative vs "
                                   "plain decoding on a trained target / draft pair (train, then time; see "
                                   "`python -m hybridize.bench.speculative --help`).")
    p.add_argument("suite", choices=["kernels", "ssd", "step", "scan", "decode", "synthetic", "quality",
                                     "speculative", "plot"])
    p.add_argument("--out", default="benchmarks/results", help="output directory (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU (TRITON_INTERPRET=1): checks the suite runs, measures nothing")
    p.add_argument("--suite-args", default="", help="flags passed to the suite, as one quoted string")
    p.set_defaults(func=cmd_bench)
