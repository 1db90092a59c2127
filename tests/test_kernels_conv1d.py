"""Triton causal conv1d kernels vs the PyTorch reference (forward, final state, all gradients, update).

On a machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below
before the kernels are decorated), so shapes stay small; CPU tensors launch with the ``*_interp``
geometries of ``kern._TUNE`` (wide tiles, few programs), which some tests change to cover other
launch geometries of the backward.
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

from hybridize.ops.conv1d import reference as ref  # noqa: E402
from hybridize.ops.conv1d import triton as kern  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"

if not _CUDA and type(kern._conv_fwd_kernel).__name__ != "InterpretedFunction":
    pytest.skip("conv1d kernels were decorated without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)


def _seq_idx(B, L, W, gen):
    """Random packed documents, always including a boundary closer than W-1 to the start and two
    boundaries closer than W-1 to each other (when L allows), so masking is exercised."""
    s = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        cuts = set(torch.randint(1, max(L, 2), (3,), generator=gen).tolist())
        cuts |= {1, 2} if b == 0 else {L - 1}
        for c in sorted(cuts):
            if 0 < c < L:
                s[b, c:] += 1
    return s.to(DEVICE)


def _run(fn, x, w, bias, st, si, act, gy, gf):
    y, fin = fn(x, w, bias, initial_state=st, seq_idx=si, activation=act, return_final_state=True)
    ins = [t for t in (x, w, bias, st) if t is not None]
    grads = torch.autograd.grad((y * gy).sum() + (fin * gf).sum(), ins)
    return (y, fin) + grads


def _check(B, L, C, W, init, seq, bias_on, act, seed=0, si=None, dtype=torch.float32):
    """Kernel vs reference: y, final state and the gradients of x, weight, bias, initial_state.
    fp32: to 1e-4. bf16 inputs: the reference runs in fp32 on the same (bf16) values; the kernel's
    outputs (rounded to bf16 once) must match to a relative Frobenius error of 1e-2."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, dtype)  # noqa: E731
    x = mk(B, L, C).requires_grad_()
    w = mk(C, W).requires_grad_()
    bias = mk(C).requires_grad_() if bias_on else None
    st = mk(B, C, W - 1).requires_grad_() if init else None
    if seq and si is None:
        si = _seq_idx(B, L, W, gen)
    gy, gf = mk(B, L, C), mk(B, C, W - 1)
    names = ["y", "final", "dx", "dweight"] + (["dbias"] if bias_on else []) + (["dinit"] if init else [])
    got = _run(kern.causal_conv1d_triton, x, w, bias, st, si, act, gy, gf)
    if dtype == torch.float32:
        want = _run(ref.causal_conv1d, x, w, bias, st, si, act, gy, gf)
        for name, a, b in zip(names, want, got):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        return
    up = [t.detach().float().requires_grad_() if t is not None else None for t in (x, w, bias, st)]
    want = _run(ref.causal_conv1d, *up, si, act, gy.float(), gf.float())
    for name, a, b in zip(names, want, got):
        assert a.shape == b.shape and b.dtype == dtype, name
        err = ((b.float() - a).norm() / a.norm().clamp_min(1e-12)).item()
        assert err < 1e-2, f"{name}: relative Frobenius error {err:.3g}"


# (L, C, W): every L, C and W of the brief at least once, multi-block shapes included; the flags
# cycle so that each (W, flag) combination appears.
_SHAPES = [(L, C, W) for W in (2, 3, 4) for L, C in ((1, 48), (7, 200), (63, 5), (130, 5), (130, 48))]


@pytest.mark.parametrize("L,C,W", _SHAPES)
@pytest.mark.parametrize("flags", [0, 1])
def test_conv1d_shapes(L, C, W, flags):
    i = _SHAPES.index((L, C, W)) + flags
    init, seq, bias_on, act = (i % 2 == 0), (i % 3 != 2), (i % 2 == 1), ("silu" if (i // 2) % 2 else None)
    if flags:
        init, seq, bias_on, act = not init, not seq, not bias_on, (None if act else "silu")
    _check(2, L, C, W, init, seq, bias_on, act, seed=i)


@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("seq", [False, True])
@pytest.mark.parametrize("bias_on", [False, True])
@pytest.mark.parametrize("act", [None, "silu"])
def test_conv1d_flags(init, seq, bias_on, act):
    # several time blocks, channel tail; W = 4 (the widest halo)
    _check(2, 40, 40, 4, init, seq, bias_on, act, seed=3)


def test_conv1d_width1_and_short_sequences():
    # W = 1 (no state), and L < W-1: the final state reaches into the initial state
    _check(2, 5, 12, 1, False, True, True, "silu", seed=4)
    _check(2, 2, 12, 4, True, True, True, None, seed=5)
    _check(1, 1, 3, 4, True, False, False, "silu", seed=6)


def test_conv1d_long_and_bf16_gradients():
    # L = 257 (several chunks of the backward, a partial last one), channel tail, every flag;
    # then bf16 (the kernel rounds each output once; the reference is fp32 on the same values)
    _check(1, 257, 40, 4, True, True, True, "silu", seed=8)
    _check(1, 257, 40, 4, True, True, True, "silu", seed=9, dtype=torch.bfloat16)
    _check(2, 63, 24, 3, False, False, True, None, seed=10, dtype=torch.bfloat16)


# Launch geometries of the rows backward (CPU: kern._TUNE["bwd_rows_interp"]): several programs per
# sequence (split > 0 programs must not write d initial_state), chunks shorter than W-1 (rows=1,
# many programs), several chunks per program (sub), loads issued 1..4 steps at a time with and
# without prefetch; the partial-sum kernel with several row blocks and channel blocks.
_ROWS_CFGS = [
    dict(block_c=64, num_warps=1, rows=1, prefetch=False, sub=1, warps_per_sm=16, fast_sigmoid=False),
    dict(block_c=32, num_warps=1, rows=4, prefetch=True, sub=4, warps_per_sm=2, fast_sigmoid=False),
    dict(block_c=64, num_warps=1, rows=2, prefetch=False, sub=2, warps_per_sm=4, fast_sigmoid=False),
]


@pytest.mark.parametrize("cfg", range(len(_ROWS_CFGS)))
def test_conv1d_bwd_rows_geometries(monkeypatch, cfg):
    monkeypatch.setitem(kern._TUNE, "bwd_rows_interp", _ROWS_CFGS[cfg])
    monkeypatch.setitem(kern._TUNE, "bwd_rows", {**_ROWS_CFGS[cfg], "fast_sigmoid": True})   # (GPU)
    monkeypatch.setitem(kern._TUNE, "bwd_reduce_interp", (4, 32, 4))
    monkeypatch.setitem(kern._TUNE, "bwd_reduce", (4, 32, 4))
    B, L, C, W = 2, (13 if cfg == 0 else 30), 40, 4
    if _CUDA and _ROWS_CFGS[cfg]["rows"] not in kern._GPU_VERIFIED_ROWS:
        with pytest.raises(ValueError, match="not verified on the GPU"):     # wrong dx on an H100: refused
            kern._rows_config(B, L, C, W, torch.device(DEVICE))
        return
    g = kern._rows_config(B, L, C, W, torch.device(DEVICE))
    assert (g["chunk_len"] + W - 1) % g["ROWS"] == 0, g
    if not _CUDA:
        assert g["n_split"] > 1 and (cfg > 0 or g["chunk_len"] < W - 1), g
    # documents starting right at / next to chunk boundaries, and in the last W-1 tokens
    q = g["chunk_len"]
    si = torch.zeros(B, L, dtype=torch.long)
    for t in sorted({q, q + 1, 2 * q - 1, 3 * q, L - 2}):
        if 0 < t < L:
            si[0, t:] += 1
    si[1, 1:] += 1
    si[1, L - 1:] += 1
    _check(B, L, C, W, True, True, True, "silu", seed=30 + cfg, si=si.to(DEVICE))
    _check(1, 23, 9, 2 + cfg % 2, cfg != 1, False, cfg != 2, None if cfg else "silu", seed=40 + cfg)


def test_conv1d_unused_outputs():
    """Only y used (d final_state arrives as None: no d final_state pass) / only the final state."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 21, 12, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(12, 4, generator=gen).to(DEVICE).requires_grad_()
    st = torch.randn(2, 12, 3, generator=gen).to(DEVICE).requires_grad_()
    for use_y in (True, False):
        outs = []
        for fn in (ref.causal_conv1d, kern.causal_conv1d_triton):
            y, fin = fn(x, w, initial_state=st, activation="silu", return_final_state=True)
            loss = (y * y).sum() if use_y else (fin * fin).sum()
            outs.append(torch.autograd.grad(loss, (x, w, st) if use_y else (x, st)))  # fin: no w
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_conv1d_bwd_tiles_still_selectable(monkeypatch):
    # the previous backward, kept for A/B on the GPU (benchmarks/conv_probe.py)
    monkeypatch.setitem(kern._TUNE, "bwd_impl", "tiles")
    _check(2, 21, 12, 4, True, True, True, "silu", seed=14)


def test_conv1d_strided_input_and_bf16():
    gen = torch.Generator().manual_seed(7)
    big = torch.randn(2, 33, 100, generator=gen).to(DEVICE)
    x = big[:, :, 10:60]  # channel stride 1, row stride 100: read in place
    w = torch.randn(50, 4, generator=gen).to(DEVICE)
    b = torch.randn(50, generator=gen).to(DEVICE)
    st = torch.randn(2, 50, 3, generator=gen).to(DEVICE)
    y, f = kern.causal_conv1d_triton(x, w, b, initial_state=st, activation="silu", return_final_state=True)
    y0, f0 = ref.causal_conv1d(x, w, b, initial_state=st, activation="silu", return_final_state=True)
    torch.testing.assert_close(y, y0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(f, f0)
    # bf16: both compute in fp32 and round once, so they agree to a couple of bf16 ulps
    xb, wb, bb, sb = (t.to(torch.bfloat16) for t in (x, w, b, st))
    y, f = kern.causal_conv1d_triton(xb, wb, bb, initial_state=sb, activation="silu", return_final_state=True)
    y0, f0 = ref.causal_conv1d(xb, wb, bb, initial_state=sb, activation="silu", return_final_state=True)
    assert y.dtype == torch.bfloat16 and f.dtype == torch.bfloat16
    torch.testing.assert_close(y, y0, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(f, f0)


@pytest.mark.parametrize("W", [2, 3, 4])
def test_conv1d_update(W):
    gen = torch.Generator().manual_seed(W)
    B, C = 3, 70
    w = torch.randn(C, W, generator=gen).to(DEVICE)
    b = torch.randn(C, generator=gen).to(DEVICE)
    # a strided state buffer (a slice of a bigger cache), updated in place over several steps
    buf = torch.randn(2, B, C, W - 1, generator=gen).to(DEVICE)
    state, state_ref = buf[1], buf[1].clone()
    for step in range(3):
        x = torch.randn(B, C, generator=gen).to(DEVICE)
        act = "silu" if step % 2 else None
        bias = b if step != 1 else None
        y = kern.causal_conv1d_update_triton(x, state, w, bias, act)
        y0 = ref.causal_conv1d_update(x, state_ref, w, bias, act)
        torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(buf[1], state_ref, atol=0, rtol=0)
    # the update continues the full-sequence conv exactly
    xs = torch.randn(B, 6, C, generator=gen).to(DEVICE)
    y_full, fin = ref.causal_conv1d(xs, w, b, activation="silu", return_final_state=True)
    st = torch.zeros(B, C, W - 1, device=DEVICE)
    ys = torch.stack([kern.causal_conv1d_update_triton(xs[:, t], st, w, b, "silu") for t in range(6)], 1)
    torch.testing.assert_close(ys, y_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st, fin, atol=1e-6, rtol=1e-6)


def test_conv1d_dispatch(monkeypatch):
    from hybridize.ops import conv1d

    calls = []
    real = kern.causal_conv1d_triton
    monkeypatch.setattr(kern, "causal_conv1d_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w = torch.randn(1, 5, 8, device=DEVICE), torch.randn(8, 3, device=DEVICE)
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    y = conv1d.causal_conv1d(x, w, activation="silu")
    assert calls == [1]
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "0")
    torch.testing.assert_close(conv1d.causal_conv1d(x, w, activation="silu"), y, atol=1e-5, rtol=1e-5)
    assert calls == [1]


def test_conv1d_opcheck():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 9, 6, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(6, 3, generator=gen).to(DEVICE).requires_grad_()
    b = torch.randn(6, generator=gen).to(DEVICE).requires_grad_()
    st = torch.randn(2, 6, 2, generator=gen).to(DEVICE).requires_grad_()
    si = torch.tensor([[0] * 4 + [1] * 5, [0] * 9], device=DEVICE)
    torch.library.opcheck(torch.ops.hybridize.causal_conv1d_fwd.default, (x, w, b, st, si, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    state = torch.randn(2, 6, 2, device=DEVICE)
    torch.library.opcheck(torch.ops.hybridize.causal_conv1d_update.default,
                          (x[:, 0].detach(), state, w.detach(), b.detach(), True),
                          test_utils=("test_schema", "test_faketensor"))


def test_conv1d_torch_compile_fullgraph():
    """The custom ops trace with fullgraph=True (aot_eager on CPU: no C++ compile needed)."""
    backend = "inductor" if _CUDA else "aot_eager"
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 9, 6, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(6, 4, generator=gen).to(DEVICE).requires_grad_()
    st = torch.randn(2, 6, 3, generator=gen).to(DEVICE).requires_grad_()

    def f(x, w, st):
        y, fin = kern.causal_conv1d_triton(x, w, None, initial_state=st, activation="silu",
                                           return_final_state=True)
        return (y * 2).sum() + fin.sum()

    t0 = time.time()
    cf = torch.compile(f, fullgraph=True, backend=backend)
    out = cf(x, w, st)
    g = torch.autograd.grad(out, (x, w, st))
    out0 = f(x, w, st)
    g0 = torch.autograd.grad(out0, (x, w, st))
    torch.testing.assert_close(out, out0)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b)
    assert time.time() - t0 < 60


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
def test_conv1d_cuda_graph():
    B, C, W = 4, 96, 4
    w = torch.randn(C, W, device="cuda")
    b = torch.randn(C, device="cuda")
    state = torch.zeros(B, C, W - 1, device="cuda")
    x_in = torch.zeros(B, C, device="cuda")
    kern.causal_conv1d_update_triton(x_in, state.clone(), w, b, "silu")  # compile outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_out = kern.causal_conv1d_update_triton(x_in, state, w, b, "silu")
    xs = torch.randn(B, 5, C, device="cuda")
    state.zero_()
    ys = []
    for t in range(5):
        x_in.copy_(xs[:, t])
        g.replay()
        ys.append(y_out.clone())
    y_full = ref.causal_conv1d(xs, w, b, activation="silu")
    torch.testing.assert_close(torch.stack(ys, 1), y_full, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not (_CUDA and os.environ.get("HYBRIDIZE_SLOW") == "1"), reason="CUDA + HYBRIDIZE_SLOW=1")
def test_conv1d_int64_offsets():
    """B·L·C > 2^31 elements: pointer offsets must not wrap."""
    C, W = 64, 4
    L = (1 << 31) // C + 200
    x = torch.randn(1, L, C, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(C, W, device="cuda", dtype=torch.bfloat16)
    y, fin = kern.causal_conv1d_triton(x, w, activation="silu", return_final_state=True)
    tail = x[:, -300:]
    y0, fin0 = ref.causal_conv1d(tail[:, W - 1:], w, initial_state=tail[:, :W - 1].transpose(1, 2),
                                 activation="silu", return_final_state=True)
    torch.testing.assert_close(y[:, -(300 - W + 1):], y0, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fin, fin0)
