"""Triton argmax over the last dim of (B, V) logits, torch's semantics exactly (the first maximum; a NaN
counts as the maximum and the first NaN wins), in two small launches instead of torch's reductions.

Why: a greedy decode step ends with the argmax of a 128k-logit row; at batch 1 torch's argmax is a
single-block reduction (27 µs on an H100) and the two-stage torch version (`sampling.argmax_last`) five
kernels (~11 µs). Here: (1) grid (B, chunks): each program reduces CHUNK logits to (value, first index)
— NaN if the chunk holds one, with the first NaN's index; (2) one program per row reduces the partials
the same way (chunks are in order, so the smallest index among equal values is the first overall)."""
from __future__ import annotations

import torch
from torch import Tensor

from hybridize.ops.pdl import pdl_launch

_KERNELS = None
CHUNK = 2048          # logits per program of the first stage (V = 128k → 63 programs at batch 1)


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def _first_max(v, idx, BIG):
        """(value, index) of the first NaN of v if any, else of the first maximum (fp32 v, int32 idx)."""
        isn = v != v
        first_nan = tl.min(tl.where(isn, idx, BIG), axis=0)
        vm = tl.where(isn, float("-inf"), v)
        mx = tl.max(vm, axis=0)
        first_mx = tl.min(tl.where(vm == mx, idx, BIG), axis=0)
        has_nan = first_nan < BIG
        return tl.where(has_nan, float("nan"), mx), tl.where(has_nan, first_nan, first_mx)

    @triton.jit
    def _chunk_kernel(X, Vals, Idx, V, sxb, n_chunks, CHUNK: tl.constexpr, PDL: tl.constexpr = 0):
        if PDL:    # see hybridize.ops.pdl: wait for the previous kernel before any read or write
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        m = offs < V
        v = tl.load(X + b * sxb + offs, mask=m, other=float("-inf")).to(tl.float32)
        # padding is -inf at indices >= V: a real -inf (index < V) still wins a tie with it
        val, i = _first_max(v, offs, 2147483647)
        tl.store(Vals + b * n_chunks + c, val)
        tl.store(Idx + b * n_chunks + c, i)

    @triton.jit
    def _rows_kernel(Vals, Idx, Out, n_chunks, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK)
        m = j < n_chunks
        v = tl.load(Vals + b * n_chunks + j, mask=m, other=float("-inf"))
        i = tl.load(Idx + b * n_chunks + j, mask=m, other=2147483647)
        _, first = _first_max(v, i, 2147483647)
        tl.store(Out + b, first.to(tl.int64))

    globals()["_first_max"] = _first_max     # the interpreter resolves callees in module globals
    return _chunk_kernel, _rows_kernel


def argmax_triton(x: Tensor) -> Tensor:
    """x (B, V) (unit stride along V; 16/32-bit floats) → int64 (B,): ``x.argmax(-1)``. No host sync
    (CUDA-graph capturable)."""
    global _KERNELS
    if x.dim() != 2 or x.shape[-1] == 0:
        raise ValueError(f"argmax_triton: x must be (B, V) with V > 0, got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if _KERNELS is None:
        _KERNELS = _build()
    chunk_kernel, rows_kernel = _KERNELS
    B, V = x.shape
    out = torch.empty(B, device=x.device, dtype=torch.int64)
    if B == 0:
        return out
    n_chunks = -(-V // CHUNK)
    vals = torch.empty(B, n_chunks, device=x.device, dtype=torch.float32)
    idx = torch.empty(B, n_chunks, device=x.device, dtype=torch.int32)
    pdl = pdl_launch(x.device)
    chunk_kernel[(B, n_chunks)](x, vals, idx, V, x.stride(0), n_chunks, CHUNK=CHUNK, num_warps=4, **pdl)
    rows_kernel[(B,)](vals, idx, out, n_chunks, BLOCK=max(16, 1 << (n_chunks - 1).bit_length()), num_warps=4,
                      **pdl)
    return out


__all__ = ["argmax_triton", "CHUNK"]
