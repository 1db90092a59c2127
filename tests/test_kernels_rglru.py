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

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

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


def _single_path(monkeypatch):
    monkeypatch.setitem(kern._TUNE, "fwd_path", "single")
    monkeypatch.setitem(kern._TUNE, "bwd_path", "single")


@pytest.mark.parametrize("L,C,init,rs", [(63, 48, True, True), (130, 5, False, True), (130, 40, True, False),
                                         (40, 200, False, False)])
def test_rglru_scan_chunked(monkeypatch, L, C, init, rs):
    """The single-pass kernels' two-pass chunking (time split into chunks + a carry pass)."""
    _single_path(monkeypatch)
    monkeypatch.setitem(kern._TUNE, "block_t", 16)
    monkeypatch.setitem(kern._TUNE, "block_t_small", 16)
    monkeypatch.setitem(kern._TUNE, "force_chunks", 3)
    for which in ("fwd", "bwd"):
        plan = kern._plan(2, L, C, torch.device(DEVICE), which)
        assert plan["path"] == "single" and plan["n_chunks"] >= 2
    _check(2, L, C, init, rs, seed=L + C)


@pytest.mark.parametrize("L,C,init,rs", [(1, 5, True, True), (63, 48, True, True), (130, 40, False, True)])
def test_rglru_scan_single(monkeypatch, L, C, init, rs):
    """The single-pass kernels walking all of L in one program (the path before the look-back one)."""
    _single_path(monkeypatch)
    assert kern._plan(2, L, C, torch.device(DEVICE))["n_chunks"] == 1
    _check(2, L, C, init, rs, seed=L + 2 * C)


# ---------------------------------------------------------------- look-back kernels, every variant
_LB = {"block_t": 16, "block_c": 16, "tiles": 1, "rows": False, "window": 4, "num_warps": 4, "stages": 1,
       "ticket": True, "hp_early": False, "inclusive_every": 1}
# (name, overrides of _LB, L, C, init, reset): tile scan / one step at a time, one tile a chunk (kept in
# registers) / several (second walk), window 1 / several, ticket / program id, h_{t-1} loaded before /
# after the look-back; L = 1 is one chunk (no look-back), the others 2 to 17 chunks (several windows
# back), C = 20, 33 two or three channel blocks. The rows variants are slow in the interpreter (a
# Python step per row): short L.
_LB_CASES = [
    ("tile_L1", {}, 1, 5, True, True),
    ("tile", {}, 257, 9, True, True),
    ("tile_window1", {"window": 1}, 70, 33, False, True),
    ("tile_pid_hp_early", {"ticket": False, "hp_early": True, "window": 2}, 63, 20, True, True),
    ("tiles3", {"tiles": 3, "stages": 2}, 100, 20, False, False),
    ("rows", {"rows": True, "block_t": 4}, 23, 9, True, True),
    ("rows_L1", {"rows": True, "block_t": 4}, 1, 5, True, False),
    ("rows_tiles3_hp_early", {"rows": True, "block_t": 2, "tiles": 3, "window": 1, "hp_early": True}, 29, 9,
     True, True),
]


def _lookback_cfg(monkeypatch, **over):
    cfg = {**_LB, **over}
    monkeypatch.setitem(kern._TUNE, "fwd_path", "lookback")
    monkeypatch.setitem(kern._TUNE, "bwd_path", "lookback")
    monkeypatch.setitem(kern._TUNE, "lb_fwd", cfg)
    monkeypatch.setitem(kern._TUNE, "lb_bwd", cfg)
    return cfg


@pytest.mark.parametrize("name,over,L,C,init,rs", _LB_CASES, ids=[c[0] for c in _LB_CASES])
def test_rglru_lookback_variants(monkeypatch, name, over, L, C, init, rs):
    """Forward, final state and all gradients of every look-back variant (see _LB_CASES)."""
    _lookback_cfg(monkeypatch, **over)
    for which in ("fwd", "bwd"):
        plan = kern._plan(2, L, C, torch.device(DEVICE), which)
        assert plan["path"] == "lookback" and plan["n_chunks"] == -(-L // (plan["BLOCK_T"] * plan["TILES"]))
        assert plan["n_chunks"] >= (2 if L > 1 else 1)
    _check(2, L, C, init, rs, seed=L + 3 * C)


@pytest.mark.parametrize("name,over,L,rs", [("tile", {}, 150, False), ("tile_resets", {}, 150, True),
                                            ("rows", {"rows": True, "block_t": 2, "window": 1}, 15, False)])
def test_rglru_lookback_through_aggregates(monkeypatch, name, over, L, rs):
    """Only chunk 0 publishes an inclusive state: every look-back composes all earlier chunks'
    aggregates (10 chunks: 3 windows of 4; 8 chunks one at a time), as on a GPU when the predecessors
    are still running. With resets most chunks' aggregates have P = 0 and end the look-back early."""
    _lookback_cfg(monkeypatch, inclusive_every=1 << 20, **over)
    _check(2, L, 9, True, rs, seed=11)


@pytest.mark.parametrize("L,name,over", [(70, "tile", {}), (13, "rows", {"rows": True, "block_t": 4, "window": 2})])
def test_rglru_lookback_bf16(monkeypatch, L, name, over):
    """bf16 x, a (the benchmark's dtype), fp32 initial state: h, final state and gradients vs the fp32
    reference on the same inputs."""
    _lookback_cfg(monkeypatch, **over)
    x, a, st, reset = _inputs(2, L, 24, True, True, seed=L, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    gy = torch.randn(2, L, 24, generator=gen).to(DEVICE).to(torch.bfloat16)
    gf = torch.randn(2, 24, generator=gen).to(DEVICE)
    leaves = [x.requires_grad_(), a.requires_grad_(), st.requires_grad_()]
    got = _run(kern.rglru_scan_triton, x, a, st, reset, gy, gf)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    want = _run(ref.rglru_scan, *ref_leaves, reset, gy.float(), gf)
    for name_, g, w in zip(["h", "final", "dx", "da", "dinit"], got, want):
        assert g.dtype == (torch.float32 if name_ in ("final", "dinit") else torch.bfloat16), name_
        rel = ((g.float() - w).norm() / w.norm()).item()
        assert rel < 1e-2, (name_, rel)


@triton.jit
def _pack_rows_kernel(p_ptr, s_ptr, ready_ptr, ws_ptr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    cc = tl.arange(0, BLOCK_C)
    ready = tl.load(ready_ptr + row * BLOCK_C + cc) != 0
    v = kern._pack(tl.load(p_ptr + row * BLOCK_C + cc), tl.load(s_ptr + row * BLOCK_C + cc))
    tl.store(ws_ptr + row * BLOCK_C + cc, tl.where(ready, v, 0))


@triton.jit
def _lookback_kernel(ws_ptr, out_ptr, k, C, BLOCK_C: tl.constexpr, WINDOW: tl.constexpr):
    cc = tl.arange(0, BLOCK_C)
    tl.store(out_ptr + cc, kern._lookback(ws_ptr, 0, k, cc < C, BLOCK_C, WINDOW))


@pytest.mark.skipif(torch.cuda.is_available(), reason="drives the look-back helpers on hand-made CPU scratch (interpreter); on the GPU the whole kernels and their CUDA-graph replay test cover them")
@pytest.mark.parametrize("window", [1, 2, 4, 8])
def test_rglru_lookback_unit(window):
    """_lookback on a hand-made workspace: published aggregates composed back to the newest P = 0 map
    per channel; rows older than it may be unpublished (never waited on); channels >= C are never
    published (ignored). Expected: the sequential composition."""
    BLOCK_C, C, k = 8, 6, 11
    gen = torch.Generator().manual_seed(window)
    p = torch.rand(k, BLOCK_C, generator=gen) + 0.5
    s = torch.randn(k, BLOCK_C, generator=gen)
    ready = torch.ones(k, BLOCK_C, dtype=torch.int32)
    p[0] = 0.0                       # chunk 0: inclusive
    p[7, 1] = 0.0                    # channel 1: inclusive at chunk 7 ...
    ready[2:7, 1] = 0                # ... so chunks 2..6 of it may be unpublished
    p[9, 2] = 0.0                    # channel 2: a reset in chunk 9 (an aggregate with P = 0) ...
    ready[:9, 2] = 0                 # ... nothing older is needed
    p[10, 3] = 0.0                   # channel 3: the immediate predecessor is inclusive
    ready[:10, 3] = 0
    ready[:, C:] = 0                 # masked channels: never published
    ws = torch.zeros(k, BLOCK_C, dtype=torch.int64)
    _pack_rows_kernel[(k,)](p, s, ready, ws, BLOCK_C=BLOCK_C)
    out = torch.empty(BLOCK_C)
    _lookback_kernel[(1,)](ws, out, k, C, BLOCK_C=BLOCK_C, WINDOW=window)
    want = torch.zeros(BLOCK_C)
    for j in range(k):               # h -> P·h + S, chunk by chunk
        want = p[j] * want + s[j]
    torch.testing.assert_close(out[:C], want[:C], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="drives the look-back helpers on hand-made CPU scratch (interpreter); on the GPU the whole kernels and their CUDA-graph replay test cover them")
def test_rglru_lookback_pack_roundtrip():
    """_pack / _unpack: S exact, P within one ulp (bit 0 is the "published" flag), 0 stays 0 and a
    published word is never 0 (the zeroed workspace's "not yet")."""
    vals = torch.tensor([0.0, -0.0, 1.0, -1.5, 3e-38, 1e-45, 0.7, 1e30, float("inf"), -2.0 ** -20])
    ws = torch.empty(1, 16, dtype=torch.int64)
    pp = torch.zeros(1, 16)
    ss = torch.zeros(1, 16)
    pp[0, :10], ss[0, :10] = vals, vals.flip(0)
    _pack_rows_kernel[(1,)](pp, ss, torch.ones(1, 16, dtype=torch.int32), ws, BLOCK_C=16)
    assert (ws != 0).all()
    back = torch.empty(2, 16)
    _unpack_kernel[(1,)](ws, back, BLOCK_C=16)
    torch.testing.assert_close(back[1], ss[0], atol=0, rtol=0)
    assert torch.equal(back[0].view(torch.int32), pp[0].view(torch.int32) & -2)    # bit 0 cleared
    assert (back[0, :2] == 0).all() and back[0, 5] == 0 and back[0, 8] == float("inf")


@triton.jit
def _unpack_kernel(ws_ptr, out_ptr, BLOCK_C: tl.constexpr):
    cc = tl.arange(0, BLOCK_C)
    p, s = kern._unpack(tl.load(ws_ptr + cc))
    tl.store(out_ptr + cc, p)
    tl.store(out_ptr + BLOCK_C + cc, s)


def test_rglru_default_plan():
    """The default is the look-back path for both directions; the single-pass path stays selectable."""
    for which in ("fwd", "bwd"):
        plan = kern._plan(8, 2048, 2560, torch.device(DEVICE), which)
        assert plan["path"] == "lookback" and plan["n_chunks"] * plan["BLOCK_T"] * plan["TILES"] >= 2048
        assert plan["n_cols"] == 8 * -(-2560 // plan["BLOCK_C"])


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
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name,over", [("default", None), ("tile_w1_pid", {"window": 1, "ticket": False}),
                                       ("rows", {"rows": True, "block_t": 16, "num_warps": 1, "window": 2}),
                                       ("aggregates_only", {"inclusive_every": 1 << 20})])
def test_rglru_lookback_cuda_graph(monkeypatch, name, over):
    """Look-back kernels on a GPU (programs really run concurrently and spin on each other), fwd + bwd
    captured in one CUDA graph and replayed on new inputs: the workspace is zeroed per call inside the
    graph. Long L, one batch row: hundreds of chunks per column."""
    if over is not None:
        _lookback_cfg(monkeypatch, **{**kern._TUNE["lb_fwd"], **over})
    B, L, C = 1, 8192, 320
    x_in = torch.zeros(B, L, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a_in = torch.zeros(B, L, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.zeros(B, L, C, device="cuda", dtype=torch.bfloat16)

    def step():
        h = kern.rglru_scan_triton(x_in, a_in, return_final_state=False)
        return (h,) + torch.autograd.grad(h, (x_in, a_in), dy)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    for seed in (0, 1):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            x_in.copy_(torch.randn(B, L, C, device="cuda", generator=gen))
            a_in.copy_(torch.rand(B, L, C, device="cuda", generator=gen) * 0.5 + 0.5)
            dy.copy_(torch.randn(B, L, C, device="cuda", generator=gen))
        g.replay()
        torch.cuda.synchronize()
        xr, ar = x_in.detach().float().requires_grad_(), a_in.detach().float().requires_grad_()
        hr = ref.rglru_scan(xr, ar, return_final_state=False)
        want = (hr,) + torch.autograd.grad(hr, (xr, ar), dy.float())
        for n, u, w in zip(("h", "dx", "da"), outs, want):
            rel = ((u.float() - w).norm() / w.norm()).item()
            assert rel < 1e-2, (name, seed, n, rel)


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
