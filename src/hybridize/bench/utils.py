"""Helpers shared by the GPU benchmark scripts (run as `python benchmarks/<script>.py`, so this
module is importable from the script's folder)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional


def write_json(obj, path, *, indent: int = 1) -> None:
    """Write `obj` as JSON atomically (temporary file + os.replace): suites rewrite their results after
    every measurement, and a run killed mid-write must leave the previous complete file, not half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent, default=str) + "\n")
    os.replace(tmp, path)


class Budget:
    """Wall-clock budget: scripts start no new section once it is spent, so a run cut short still
    leaves its JSON."""

    def __init__(self, seconds):
        self.t0, self.seconds = time.time(), seconds

    def left(self):
        return self.seconds - (time.time() - self.t0)

    def ok(self, need=0.0):
        return self.left() > need


def err(e: BaseException) -> str:
    """One-line description of an exception for the JSON."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def import_mamba_ssm(module: str, name: str):
    """`from mamba_ssm.<module> import <name>` for mamba_ssm's pure-Triton ops. Its package __init__
    imports the CUDA extensions; when those are not built, load the submodule through a bare package stub."""
    import importlib
    import importlib.util
    import sys
    import types

    try:
        return getattr(importlib.import_module(f"mamba_ssm.{module}"), name)
    except Exception as first:
        for k in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
            del sys.modules[k]
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise first
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = pkg
        return getattr(importlib.import_module(f"mamba_ssm.{module}"), name)


def rerun_under_interpreter(module: str, argv) -> Optional[int]:
    """--smoke runs kernels under the Triton interpreter, which triton picks when a kernel is *decorated*
    (import time): setting TRITON_INTERPRET=1 later mixes interpreted and compiled functions ("Cannot call
    @triton.jit'd outside of the scope of a kernel"). So, unless it was set from the start, run the suite
    again in a fresh process that has it → that process's exit code; None when already interpreting."""
    import subprocess
    import sys

    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    args = list(sys.argv[1:] if argv is None else argv)
    return subprocess.call([sys.executable, "-m", module, *args], env=dict(os.environ, TRITON_INTERPRET="1"))


def median_ms(fn, undo, reps: int, device) -> float:
    """Median milliseconds of fn() over `reps` calls after 2 warm-ups — CUDA events on a GPU, the host
    clock elsewhere — with undo() (untimed) after every call, e.g. to roll a cache back."""
    import statistics

    import torch

    ts = []
    for i in range(reps + 2):
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t = time.perf_counter()
            fn()
            ms = 1e3 * (time.perf_counter() - t)
        undo()
        if i >= 2:
            ts.append(ms)
    return statistics.median(ts)


def results_saver(results: dict, path, *, smoke: bool):
    """save() for a suite's `results` (atomic JSON at `path`); None — with the reason recorded, written and
    printed — when there is no CUDA device and this is not a --smoke run."""
    import sys

    import torch

    def save():
        write_json(results, path)

    if not torch.cuda.is_available() and not smoke:
        results["error"] = "CUDA is not available"
        save()
        print("CUDA is not available", file=sys.stderr)
        return None
    return save


def plot_out_or_redraw(args, plot) -> Optional[str]:
    """The PNG path of a suite with --plot-out / --plot-only / --json-out: --plot-out, else the JSON's name
    with .png. With --plot-only JSON, redraw that finished run's plot (`plot(results, path)`) and return
    None: the caller exits."""
    plot_out = args.plot_out or str(Path(args.plot_only or args.json_out).with_suffix(".png"))
    if args.plot_only:
        print(f"wrote {plot(json.loads(Path(args.plot_only).read_text()), plot_out)}")
        return None
    return plot_out
