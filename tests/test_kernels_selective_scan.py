"""Triton Mamba-1 selective scan (forward + backward) vs the PyTorch reference: outputs, final states
and every gradient (u, delta, A, B, C, D, z, delta_bias, initial_state), shared and grouped B/C,
document resets (seq_idx), lengths that are not multiples of the time tile, several channel blocks.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before the kernel
module is imported); shapes stay small.
`gpu` tests: real Mamba-1 shapes (d_inner 2048-4096, d_state 16 and 64, L up to 2048, document
boundaries, grouped B/C) in fp32 and bf16, forward and every gradient, against the fp32 reference.
"""
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from _tolerances import compare_grads  # noqa: E402
from hybridize.ops import selective_scan as ss_ops  # noqa: E402
from hybridize.ops.selective_scan import reference as ref  # noqa: E402
from hybridize.ops.selective_scan import triton as kern  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"

if not _CUDA and type(kern._ss_fwd_kernel).__name__ != "InterpretedFunction":
    pytest.skip("selective scan kernels were decorated without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)


# the interpreter's tl.associative_scan is vectorised in tests/conftest.py


def _inputs(B, L, C, N, G=None, *, init=True, D=True, z=True, bias=True, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    bc = (B, L, N) if G is None else (B, L, G, N)
    t = dict(u=r(B, L, C), delta=r(B, L, C) * 0.5, A=-torch.exp(r(C, N) * 0.5), Bm=r(*bc), Cm=r(*bc),
             D=r(C) if D else None, z=r(B, L, C) if z else None, delta_bias=r(C) * 0.3 if bias else None,
             initial_state=r(B, C, N) if init else None)
    return {k: (v.to(DEVICE, dtype if k in ("u", "delta", "Bm", "Cm", "z") else torch.float32)
                if v is not None else None) for k, v in t.items()}


def _seq_idx(B, L, cuts):
    s = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        for c in cuts[b % len(cuts)]:
            if 0 < c < L:
                s[b, c:] += 1
    return s.to(DEVICE)


def _compare(t, seq_idx=None, softplus=True, tol=1e-4, grad_final=True):
    leaves_k = {k: v.clone().requires_grad_(True) for k, v in t.items() if v is not None}
    leaves_r = {k: v.clone().requires_grad_(True) for k, v in t.items() if v is not None}
    kw = dict(delta_softplus=softplus, seq_idx=seq_idx, return_final_state=True)
    y_k, f_k = kern.selective_scan_triton(**leaves_k, **kw)
    y_r, f_r = ref.selective_scan(**leaves_r, **kw)
    torch.testing.assert_close(y_k, y_r, rtol=tol, atol=tol)
    torch.testing.assert_close(f_k, f_r, rtol=tol, atol=tol)
    gen = torch.Generator().manual_seed(123)
    gy = torch.randn(y_r.shape, generator=gen).to(DEVICE)
    gf = torch.randn(f_r.shape, generator=gen).to(DEVICE) if grad_final else torch.zeros_like(f_r)
    ((y_k * gy).sum() + (f_k * gf).sum()).backward()
    ((y_r * gy).sum() + (f_r * gf).sum()).backward()
    for k in leaves_r:
        g_r, g_k = leaves_r[k].grad, leaves_k[k].grad
        scale = max(1.0, g_r.abs().max().item())
        torch.testing.assert_close(g_k, g_r, rtol=tol, atol=tol * scale, msg=lambda m: f"d{k}: {m}")


def test_shared_bc_all_features():
    """L = 21: a partial second time tile; initial state, D, z, delta bias + softplus."""
    _compare(_inputs(2, 21, 6, 5))


def test_grouped_with_document_resets():
    t = _inputs(2, 19, 8, 4, G=2, init=True)
    _compare(t, seq_idx=_seq_idx(2, 19, [(3, 16, 17), (1,)]))


def test_bare_and_single_token():
    _compare(_inputs(1, 1, 3, 2, init=False, D=False, z=False, bias=False), softplus=False)
    _compare(_inputs(2, 7, 5, 3, init=False, D=False, z=True, bias=False), softplus=False, grad_final=False)


def test_several_channel_blocks_and_tiles(monkeypatch):
    """Small tiles force several time tiles and channel blocks per group (block partials of dB/dC
    summed per group) and a document start exactly at a tile boundary."""
    monkeypatch.setitem(kern.TUNE, "bt", 8)
    monkeypatch.setitem(kern.TUNE, "max_bc", 4)
    t = _inputs(2, 26, 16, 3, G=2)
    _compare(t, seq_idx=_seq_idx(2, 26, [(8, 9), (16,)]))


def test_bf16_inputs_forward():
    t = _inputs(2, 12, 6, 4, dtype=torch.bfloat16)
    y_k, f_k = kern.selective_scan_triton(**t, delta_softplus=True, return_final_state=True)
    y_r, f_r = ref.selective_scan(**t, delta_softplus=True, return_final_state=True)
    assert y_k.dtype == torch.bfloat16 and f_k.dtype == torch.float32
    torch.testing.assert_close(y_k.float(), y_r.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(f_k, f_r, rtol=1e-4, atol=1e-4)


def test_dispatch(monkeypatch):
    t = _inputs(1, 5, 4, 3)
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    y1 = ss_ops.selective_scan(**t, delta_softplus=True)
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "0")
    y2 = ss_ops.selective_scan(**t, delta_softplus=True)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    assert ss_ops.selective_scan_reference is ref.selective_scan


def test_custom_op_registration():
    """Schema, fake tensors, autograd registration and AOT dispatch (runs the backward op)."""
    t = _inputs(2, 5, 4, 3, G=2)
    args = tuple(t[k].clone().requires_grad_(True) if t[k] is not None else None
                 for k in ("u", "delta", "A", "Bm", "Cm", "D", "z", "delta_bias", "initial_state"))
    torch.library.opcheck(torch.ops.hybridize.selective_scan_fwd, args + (None, True, True))


# ------------------------------------------------------------------------------------------------ GPU only
# Real Mamba-1 shapes (d_inner 2048-4096, d_state 16 and 64, L up to 2048), forward and backward, fp32
# and bf16 inputs (u, delta, B, C, z in the input dtype; A, D, delta_bias, initial state fp32, as in the
# layer). Ground truth: the sequential fp32 reference on fp32 copies of the same rounded inputs, with the
# same (rounded) output gradient. The kernel computes in fp32 registers throughout (no tensor-core dots):
# * fp32: only the scan / reduction order differs — relative max error (normalised by the largest |value|
#   of each tensor) <= 1e-3, as the SSD real-shape test;
# * bf16: y and the per-token gradients (du, ddelta, dB, dC, dz) are rounded once to bf16 (<= 2^-9 per
#   element); relative Frobenius error <= 2e-2, and 5e-2 for the parameter gradients that are sums over
#   all B·L tokens (dA, dD, ddelta_bias: cancellation in the sum raises their relative error).
_REDUCED = {"dA", "dD", "ddelta_bias"}


def _compare_real(got, want, dtype):
    compare_grads(got, want, dtype, _REDUCED)


def _run_real(fn, t, seq_idx, gy, gf):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items() if v is not None}
    y, fin = fn(**leaves, delta_softplus=True, seq_idx=seq_idx, return_final_state=True)
    grads = torch.autograd.grad((y.float() * gy).sum() + (fin * gf).sum(), list(leaves.values()))
    return {"y": y, "final": fin, **{"d" + k: g for k, g in zip(leaves, grads)}}


_REAL = {
    # Mamba-1 (B/C shared by all channels), with document boundaries in a packed row
    "d2048_n16": dict(B=2, L=2048, C=2048, N=16, G=None, cuts=[(700, 1500), (1,)]),
    "d4096_n16": dict(B=1, L=2048, C=4096, N=16, G=None, cuts=[(1024,)]),
    # d_state 64 (the kernel's limit): shared, and grouped per head as in the Mamba-in-the-Llama layout
    "d4096_n64": dict(B=1, L=2048, C=4096, N=64, G=None, cuts=[()]),
    "d2048_n64_mil": dict(B=2, L=1024, C=2048, N=64, G=32, cuts=[(333,), ()]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(_REAL))
def test_gpu_real_shape(case, dtype):
    c = dict(_REAL[case])
    cuts = c.pop("cuts")
    t = _inputs(**c, dtype=dtype)
    t["delta"] = t["delta"] - 2.0        # softplus(delta + bias) ~ 0.1: Mamba-1's dt range
    seq_idx = _seq_idx(c["B"], c["L"], cuts)
    gen = torch.Generator().manual_seed(7)
    gy = torch.randn(c["B"], c["L"], c["C"], generator=gen).to(DEVICE, dtype).float()
    gf = torch.randn(c["B"], c["C"], c["N"], generator=gen).to(DEVICE)
    got = _run_real(kern.selective_scan_triton, t, seq_idx, gy, gf)
    t32 = {k: (v.float() if v is not None else None) for k, v in t.items()}
    want = _run_real(ref.selective_scan, t32, seq_idx, gy, gf)
    assert got["y"].dtype == dtype and got["final"].dtype == torch.float32
    _compare_real(got, want, dtype)
