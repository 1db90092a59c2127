"""Reference for the last-dim argmax: torch's own (the first maximum; a NaN counts as the maximum)."""
from torch import Tensor


def argmax_reference(x: Tensor) -> Tensor:
    """x (..., V) → int64 (...)."""
    return x.argmax(-1)


__all__ = ["argmax_reference"]
