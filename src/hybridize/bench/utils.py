"""Helpers shared by the GPU benchmark scripts (run as `python benchmarks/<script>.py`, so this
module is importable from the script's folder)."""
from __future__ import annotations

import time


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
