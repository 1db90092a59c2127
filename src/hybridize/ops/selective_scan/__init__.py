"""Mamba-1 selective scan. Dispatch point: a Triton kernel (when added) replaces `selective_scan` on
CUDA; for now every name is the PyTorch reference (see `reference.py` for the semantics)."""
from hybridize.ops.selective_scan.reference import selective_scan, selective_scan_chunked, selective_scan_step

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_step"]
