"""Sequence ops: a readable pure-PyTorch reference per op, and Triton kernels that must match it."""
