"""SSD op (Mamba-2 / discrete Mamba-2): dispatch point.

Layers call these names through this module (``from hybridize.ops import ssd; ssd.ssd_chunked(...)``)
so that a kernel can be swapped in here. For now they are the pure-PyTorch references of
``hybridize.ops.ssd.reference``; a Triton kernel (``hybridize.ops.ssd.triton``) must keep exactly
the same signatures and semantics and is chosen here with ``hybridize.ops._dispatch.use_kernels``.
"""
from hybridize.ops.ssd.reference import (
    segsum,
    ssd_chunked,
    ssd_mixing_matrix,
    ssd_quadratic,
    ssd_recurrent,
    ssd_step,
)

__all__ = ["ssd_chunked", "ssd_quadratic", "ssd_recurrent", "ssd_step", "ssd_mixing_matrix", "segsum"]
