"""Gated linear recurrence scan of the RG-LRU. Dispatch point: a Triton kernel (when added) replaces
`rglru_scan` on CUDA; for now both names are the PyTorch reference (see `reference.py`)."""
from hybridize.ops.rglru.reference import rglru_scan, rglru_step

__all__ = ["rglru_scan", "rglru_step"]
