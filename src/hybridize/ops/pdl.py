"""Programmatic dependent launch (PDL, Hopper and newer) for the decode-step kernels.

Why: a batch-1 decode step is a chain of ~90 short kernels (2-25 µs) in one CUDA graph; each one's
ramp-up and tail leave HBM idle between kernels. With PDL the next kernel of the chain is launched while
the current one drains: its programs start, do what does not depend on the previous kernel (the GEMV
prefetches its first weight lines into L2), then wait in `griddepcontrol.wait` until the previous grid
has completed and its writes are visible. Every kernel launched with PDL therefore waits before its
first read of anything an earlier kernel of the step may write; a kernel launched without PDL simply
starts after its predecessor, so chains with other kernels in them stay correct.

Kernels take a constexpr ``PDL`` (0: off) and run, before their first write and their first read of
anything an earlier kernel of the step may write::

    if PDL:
        tl.extra.cuda.gdc_wait()                 # the previous kernel has completed, its writes visible
        tl.extra.cuda.gdc_launch_dependents()    # the next kernel may start once all programs got here

Launching dependents only after the wait keeps at most two kernels in flight: while kernel n runs, kernel
n + 1 may prefetch, but kernel n - 1 has completed — so whatever a pre-wait read touches must not be
written by the kernel just before (weights, and state written one decode step earlier, qualify: the GEMV
prefetches its weights, the fused decode attention reads its cache's lengths and RoPE frequencies).

and are launched with ``**pdl_launch(device)``. HYBRIDIZE_PDL=0 turns it off (A/B benchmarks). Off on the
CPU interpreter, before sm_90, and with a triton that lacks the instructions.
"""
from __future__ import annotations

import functools
import os

import torch


def pdl_wanted() -> bool:
    return os.environ.get("HYBRIDIZE_PDL", "").lower() not in ("0", "off", "false", "no")


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        import triton.language as tl
        return hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")
    except Exception:
        return False


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with PDL (read on the host at launch time)."""
    return device.type == "cuda" and pdl_wanted() and _device_supports(
        device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch(device: torch.device) -> dict:
    """Launch keywords of a PDL-aware kernel: ``PDL`` (its constexpr) and triton's ``launch_pdl``."""
    return dict(PDL=1, launch_pdl=True) if pdl_enabled(device) else dict(PDL=0)
