"""Triton RG-LRU scan kernels vs the PyTorch reference (forward, final state, all gradients, step).

On a machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below
before the kernels are decorated), so shapes stay small.
"""
import os
import time

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    # read by triton when a kernel is decorated, i.e. when the kernel module is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hybridize.ops.rglru import reference as ref  # noqa: E402
from hybridize.ops.rglru import triton as kern  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"

if not _CUDA and type(kern._rglru_fwd_kernel).__name__ != "InterpretedFunction":
    pytest.skip("rglru kernels were decorated without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)


# the interpreter's tl.associative_scan is vectorised in tests/conftest.py


def _inputs(B, L, C, init, rs, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, C, generator=gen)
    a = torch.rand(B, L, C, generator=gen) * 0.5 + 0.5  # decays in (0.5, 1): long memory
    st = torch.randn(B, C, generator=gen) if init else None
    reset = None
    if rs:
        reset = torch.rand(B, L, generator=gen) < 0.15
        reset[0, 0] = True  # a reset at t = 0 drops the initial state
        if L > 1:
            reset[-1, 1] = True
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x).to(dtype), to(a).to(dtype), to(st), to(reset)


def _run(fn, x, a, st, reset, gy, gf):
    h, fin = fn(x, a, initial_state=st, reset=reset)
    ins = [t for t in (x, a, st) if t is not None]
    return (h, fin) + torch.autograd.grad((h * gy).sum() + (fin * gf).sum(), ins)


def _check(B, L, C, init, rs, seed):
    x, a, st, reset = _inputs(B, L, C, init, rs, seed=seed)
    x.requires_grad_(), a.requires_grad_()
    if st is not None:
        st.requires_grad_()
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(B, L, C, generator=gen).to(DEVICE)
    gf = torch.randn(B, C, generator=gen).to(DEVICE)
    want = _run(ref.rglru_scan, x, a, st, reset, gy, gf)
    got = _run(kern.rglru_scan_triton, x, a, st, reset, gy, gf)
    names = ["h", "final", "dx", "da"] + (["dinit"] if init else [])
    for name, w, g in zip(names, want, got):
        assert w.shape == g.shape and w.dtype == g.dtype, name
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("L", [1, 7, 63, 130])
@pytest.mark.parametrize("C", [5, 48, 200])
@pytest.mark.parametrize("init,rs", [(False, False), (True, True), (False, True)])
def test_rglru_scan(L, C, init, rs):
    _check(2, L, C, init, rs, seed=L * 1000 + C)


@pytest.mark.parametrize("L,C,init,rs", [(63, 48, True, True), (130, 5, False, True), (130, 40, True, False),
                                         (40, 200, False, False)])
def test_rglru_scan_chunked(monkeypatch, L, C, init, rs):
    """The two-pass path (time split into chunks + a carry pass), used when B·C is small on a GPU."""
    monkeypatch.setitem(kern._TUNE, "block_t", 16)
    monkeypatch.setitem(kern._TUNE, "block_t_small", 16)
    monkeypatch.setitem(kern._TUNE, "force_chunks", 3)
    assert kern._plan(2, L, C, torch.device(DEVICE))[3] >= 2
    _check(2, L, C, init, rs, seed=L + C)


def test_rglru_only_final_state_used_and_no_final():
    x, a, st, reset = _inputs(2, 20, 9, True, True, seed=3)
    for t in (x, a, st):
        t.requires_grad_()
    _, fin = kern.rglru_scan_triton(x, a, initial_state=st, reset=reset)
    _, fin0 = ref.rglru_scan(x, a, initial_state=st, reset=reset)
    g = torch.autograd.grad(fin.sum(), (x, a, st))
    g0 = torch.autograd.grad(fin0.sum(), (x, a, st))
    for u, v in zip(g, g0):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)
    h = kern.rglru_scan_triton(x, a, return_final_state=False)
    torch.testing.assert_close(h, ref.rglru_scan(x, a, return_final_state=False), atol=1e-5, rtol=1e-5)


def test_rglru_strided_and_bf16():
    gen = torch.Generator().manual_seed(5)
    big = torch.randn(2, 40, 64, generator=gen).to(DEVICE)
    x = big[:, :, 3:35]  # channel stride 1, row stride 64
    a = (torch.rand(2, 40, 32, generator=gen) * 0.5 + 0.5).to(DEVICE)
    h, f = kern.rglru_scan_triton(x, a)
    h0, f0 = ref.rglru_scan(x, a)
    torch.testing.assert_close(h, h0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f, f0, atol=1e-5, rtol=1e-5)
    # bf16 inputs: fp32 accumulation in both; outputs differ by at most a rounding of the output
    xb, ab = x.to(torch.bfloat16), a.to(torch.bfloat16)
    st = torch.randn(2, 32, generator=gen).to(DEVICE)
    h, f = kern.rglru_scan_triton(xb, ab, initial_state=st)
    h0, f0 = ref.rglru_scan(xb, ab, initial_state=st)
    assert h.dtype == torch.bfloat16 and f.dtype == torch.float32
    torch.testing.assert_close(h, h0, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(f, f0, atol=1e-4, rtol=1e-4)


def test_rglru_step():
    gen = torch.Generator().manual_seed(6)
    B, C = 3, 70
    buf = torch.randn(2, B, C, generator=gen).to(DEVICE)
    state, state_ref = buf[1], buf[1].clone()  # strided slice of a bigger cache, updated in place
    for _ in range(3):
        x = torch.randn(B, C, generator=gen).to(DEVICE)
        a = torch.rand(B, C, generator=gen).to(DEVICE)
        h = kern.rglru_step_triton(x, a, state)
        h0 = ref.rglru_step(x, a, state_ref)
        torch.testing.assert_close(h, h0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(buf[1], state_ref, atol=1e-6, rtol=1e-6)
    # bf16 x with an fp32 state; the steps continue the scan
    xs = torch.randn(B, 5, C, generator=gen).to(DEVICE).to(torch.bfloat16)
    as_ = torch.rand(B, 5, C, generator=gen).to(DEVICE).to(torch.bfloat16)
    st = torch.zeros(B, C, device=DEVICE)
    hs = torch.stack([kern.rglru_step_triton(xs[:, t], as_[:, t], st) for t in range(5)], 1)
    h_full, fin = ref.rglru_scan(xs, as_)
    torch.testing.assert_close(hs, h_full, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(st, fin, atol=1e-5, rtol=1e-5)


def test_rglru_opcheck():
    x, a, st, reset = _inputs(2, 9, 6, True, True, seed=8)
    for t in (x, a, st):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.hybridize.rglru_scan_fwd.default, (x, a, st, reset),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    state = torch.randn(2, 6, device=DEVICE)
    torch.library.opcheck(torch.ops.hybridize.rglru_step.default, (x[:, 0].detach(), a[:, 0].detach(), state),
                          test_utils=("test_schema", "test_faketensor"))


def test_rglru_torch_compile_fullgraph():
    """The custom ops trace with fullgraph=True (aot_eager on CPU: no C++ compile needed)."""
    backend = "inductor" if _CUDA else "aot_eager"
    x, a, st, reset = _inputs(2, 9, 6, True, True, seed=9)
    for t in (x, a, st):
        t.requires_grad_()

    def f(x, a, st, reset):
        h, fin = kern.rglru_scan_triton(x, a, initial_state=st, reset=reset)
        return (h * 2).sum() + fin.sum()

    t0 = time.time()
    out = torch.compile(f, fullgraph=True, backend=backend)(x, a, st, reset)
    g = torch.autograd.grad(out, (x, a, st))
    out0 = f(x, a, st, reset)
    g0 = torch.autograd.grad(out0, (x, a, st))
    torch.testing.assert_close(out, out0)
    for u, v in zip(g, g0):
        torch.testing.assert_close(u, v)
    assert time.time() - t0 < 60


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
def test_rglru_cuda_graph():
    B, C = 4, 96
    state = torch.zeros(B, C, device="cuda")
    x_in, a_in = torch.zeros(B, C, device="cuda"), torch.zeros(B, C, device="cuda")
    kern.rglru_step_triton(x_in, a_in, state.clone())  # compile outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        h_out = kern.rglru_step_triton(x_in, a_in, state)
    xs, as_ = torch.randn(B, 5, C, device="cuda"), torch.rand(B, 5, C, device="cuda")
    hs = []
    for t in range(5):
        x_in.copy_(xs[:, t])
        a_in.copy_(as_[:, t])
        g.replay()
        hs.append(h_out.clone())
    h_full, fin = ref.rglru_scan(xs, as_)
    torch.testing.assert_close(torch.stack(hs, 1), h_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, fin, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not (_CUDA and os.environ.get("HYBRIDIZE_SLOW") == "1"), reason="CUDA + HYBRIDIZE_SLOW=1")
def test_rglru_int64_offsets():
    """B·L·C > 2^31 elements: pointer offsets must not wrap."""
    C = 64
    L = (1 << 31) // C + 200
    x = torch.randn(1, L, C, device="cuda", dtype=torch.bfloat16)
    a = torch.full((1, L, C), 0.9, device="cuda", dtype=torch.bfloat16)
    h, fin = kern.rglru_scan_triton(x, a)
    h0, fin0 = ref.rglru_scan(x[:, -300:], a[:, -300:], initial_state=h[:, -301].float())
    torch.testing.assert_close(h[:, -300:], h0, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(fin, fin0, atol=3e-2, rtol=3e-2)
