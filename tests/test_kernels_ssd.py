"""Triton chunked SSD (forward + backward) vs the PyTorch reference.

Outputs, final states and every gradient (x, dt, A or log_decay, B, C, D, z, dt_bias, initial_state)
in fp32 on small shapes; fp16 forward with a loose tolerance. Without CUDA the kernels run under the
Triton interpreter (TRITON_INTERPRET=1, set below before the kernel module is imported), which is slow:
the CPU cases are few and small, each covering several features at once. `gpu` tests use real shapes.

The interpreter cannot run bf16 tl.dot (numpy has no bf16; results are garbage), so bf16 is only
tested on the GPU.
"""
import os

import pytest
import torch
import torch.nn.functional as F

_CUDA = torch.cuda.is_available()
if not _CUDA:
    # read by triton when a kernel is decorated, i.e. when the kernel module is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from _tolerances import compare_grads  # noqa: E402
from hybridize.ops import ssd as ssd_ops
from hybridize.ops.ssd import reference as ref
from hybridize.ops.ssd import triton as kern

DEVICE = "cuda" if _CUDA else "cpu"

if not _CUDA and type(kern._ssd_state_fwd_kernel).__name__ != "InterpretedFunction":
    pytest.skip("ssd kernels were decorated without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)


def _seq_idx(B, L, cuts_per_row, gen):
    """(B, L) non-decreasing document ids with the given cut positions (row 0) plus random ones."""
    s = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        cuts = set(cuts_per_row) if b == 0 else set(torch.randint(1, max(L, 2), (2,), generator=gen).tolist())
        for c in sorted(cuts):
            if 0 < c < L:
                s[b, c:] += 1
    return s.to(DEVICE)


def _make(B, L, H, G, P, N, *, init=False, seq=None, D=None, z=False, bias=False, log_decay=False,
          strided=False, dtype=torch.float32, seed=0):
    """Random inputs on DEVICE; `D` is None, "h" (H,) or "hp" (H, P); `seq` a list of cut positions."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen)
    if strided:
        # x and z as slices of one projection, like Mamba-2's split of zxbcdt (non-contiguous rows)
        big = mk(B, L, H, 2 * P + 3)
        x, zz = big[..., 1:P + 1], big[..., P + 2:2 * P + 2]
    else:
        x, zz = mk(B, L, H, P), mk(B, L, H, P)
    t = dict(
        x=x,
        dt=(torch.ones(B, L, H) if log_decay else mk(B, L, H) * 0.7 + 0.3),
        A=None if log_decay else -torch.rand(H, generator=gen) * 1.5 - 0.1,
        Bm=mk(B, L, G, N), Cm=mk(B, L, G, N),
        D=None if D is None else (mk(H) if D == "h" else mk(H, P)),
        z=zz if z else None,
        dt_bias=mk(H) * 0.5 if bias else None,
        initial_state=mk(B, H, P, N) if init else None,
        log_decay=-F.softplus(mk(B, L, H)) if log_decay else None,
    )
    out = {}
    for k, v in t.items():
        if v is None:
            out[k] = None
            continue
        v = v.to(DEVICE)
        if k in ("x", "z", "Bm", "Cm"):
            v = v.to(dtype)
        out[k] = v.detach().requires_grad_()
    out["seq_idx"] = _seq_idx(B, L, seq, gen) if seq is not None else None
    return out


_GRAD_NAMES = ["x", "dt", "A", "Bm", "Cm", "D", "z", "dt_bias", "initial_state", "log_decay"]


def _run(fn, t, kw, gy, gf):
    args = {k: t[k] for k in ("D", "z", "dt_bias", "initial_state", "seq_idx", "log_decay")}
    y, fin = fn(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], **args, **kw, return_final_state=True)
    names = [k for k in _GRAD_NAMES if t[k] is not None and t[k].requires_grad]
    loss = (y * gy).sum() + ((fin * gf).sum() if gf is not None else 0.0)
    grads = torch.autograd.grad(loss, [t[k] for k in names])
    return {"y": y, "final": fin, **{"d" + k: g for k, g in zip(names, grads)}}


def _check(B, L, H, G, P, N, *, chunk_size=16, final_grad=True, atol=2e-4, rtol=2e-4, **opts):
    kw = dict(chunk_size=chunk_size)
    for k in ("dt_softplus", "dt_limit"):
        if k in opts:
            kw[k] = opts.pop(k)
    t = _make(B, L, H, G, P, N, **opts)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(B, L, H, P, generator=gen).to(DEVICE)
    gf = torch.randn(B, H, P, N, generator=gen).to(DEVICE) if final_grad else None
    want = _run(ref.ssd_chunked, t, kw, gy, gf)
    got = _run(kern.ssd_chunked_triton, t, kw, gy, gf)
    assert got.keys() == want.keys()
    for k in want:
        w, g = want[k], got[k]
        assert g.shape == w.shape and g.dtype == w.dtype, (k, g.shape, w.shape, g.dtype, w.dtype)
        scale = w.abs().max().item() + 1e-6
        err = (g - w).abs().max().item()
        assert err <= atol * scale + rtol * scale, f"{k}: max abs err {err:.3g} (max |ref| {scale:.3g})"


# ------------------------------------------------------------------------------------------------ CPU/GPU
def test_everything_at_once():
    """Packed documents (one starting exactly at a chunk boundary, one inside a chunk), initial state,
    per-channel D, z gate, dt_bias + softplus + a limit that clamps, G=2 groups, P/N not powers of
    two, L not a multiple of the chunk, non-contiguous x/z."""
    _check(2, 70, 4, 2, 12, 16, init=True, seq=[16, 21, 40], D="hp", z=True, bias=True, strided=True,
           dt_softplus=True, dt_limit=(0.3, 1.5))


def test_log_decay_mode(monkeypatch):
    """Discrete Mamba-2: dt = 1, A = None, per-step log decay; per-head D, z, documents, initial state;
    all three heads in one program of both backward chunk kernels."""
    monkeypatch.setitem(kern.TUNE, "dx_heads", 3)
    monkeypatch.setitem(kern.TUNE, "bwd_heads", 3)
    _check(2, 17, 3, 1, 8, 8, init=True, seq=[1, 16], D="h", z=True, log_decay=True)


def test_plain_and_default_limit():
    """No optional inputs; dt has negative entries so the default clamp (0, inf) zeroes some (their
    gradient must be zero, as in the reference); no final-state gradient."""
    _check(1, 70, 3, 1, 8, 16, final_grad=False)


def test_single_token_with_state():
    _check(2, 1, 4, 2, 8, 8, init=True, D="h", bias=True, dt_softplus=True)


def test_blocked_state_and_split_heads(monkeypatch):
    """Several P/N blocks in the state kernels (masked tails), one head per backward program (for dB/dC:
    the partial sums over head splits) and several N blocks in the dB/dC kernel."""
    monkeypatch.setitem(kern.TUNE, "state_bp", 16)
    monkeypatch.setitem(kern.TUNE, "state_bn", 16)
    monkeypatch.setitem(kern.TUNE, "state_segments", 1)
    monkeypatch.setitem(kern.TUNE, "out_bp", 16)
    monkeypatch.setitem(kern.TUNE, "dx_heads", 1)
    monkeypatch.setitem(kern.TUNE, "bwd_heads", 1)
    monkeypatch.setitem(kern.TUNE, "bwd_bn", 16)
    _check(1, 33, 4, 1, 24, 20, init=True, seq=[7], z=True, dt_softplus=True)


@pytest.mark.parametrize("segments", [2, 3])
def test_segmented_state_walks(monkeypatch, segments):
    """State walks cut into segments (end states in parallel, then the walks with folded-in entering
    states), forward and reverse: documents starting inside a segment, at a segment boundary (token
    48 = chunk 3) and inside the last chunk, initial and final states; a segment count that does not
    divide the chunk count."""
    monkeypatch.setitem(kern.TUNE, "state_segments", segments)
    monkeypatch.setitem(kern.TUNE, "dx_heads", 2)
    monkeypatch.setitem(kern.TUNE, "bwd_heads", 2)
    _check(2, 100, 4, 2, 8, 16, init=True, seq=[20, 48, 99], D="h", z=True, bias=True, dt_softplus=True)


def test_large_chunk_hint_is_clamped():
    """chunk_size=256 (Mamba-2's default) runs with the kernel's own chunk (64 by default)."""
    assert kern.kernel_chunk(256) == 64 and kern.kernel_chunk(16) == 16 and kern.kernel_chunk(100) == 64
    assert kern.kernel_chunk(8) == 16 and kern.kernel_chunk(48) == 32
    _check(1, 70, 3, 1, 8, 8, chunk_size=256, init=True, seq=[65], D="h")


def test_shared_memory_fallback(monkeypatch):
    """A launch that runs out of shared memory is retried with a smaller chunk (exact either way)."""
    from triton.runtime.errors import OutOfResources
    real_fwd, real_bwd = kern._fwd_impl_q, kern._bwd_impl_q
    seen = []

    def fake(real, name):
        def run(*args):
            q = args[11 if name == "fwd" else 13]
            seen.append((name, q))
            if q > 16:
                raise OutOfResources(300000, 232448, "shared memory")
            return real(*args)
        return run
    monkeypatch.setattr(kern, "_CHUNK_CAP", {})
    monkeypatch.setattr(kern, "_fwd_impl_q", fake(real_fwd, "fwd"))
    monkeypatch.setattr(kern, "_bwd_impl_q", fake(real_bwd, "bwd"))
    _check(1, 40, 2, 1, 8, 8, chunk_size=64, init=True, z=True)
    assert seen == [("fwd", 64), ("fwd", 32), ("fwd", 16), ("bwd", 64), ("bwd", 32), ("bwd", 16)]


def test_fp16_forward():
    t = _make(1, 40, 4, 2, 16, 16, init=True, seq=[9], D="h", z=True, dtype=torch.float16)
    args = {k: t[k] for k in ("D", "z", "dt_bias", "initial_state", "seq_idx", "log_decay")}
    y, fin = kern.ssd_chunked_triton(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], chunk_size=16, **args,
                                     return_final_state=True)
    y_ref, fin_ref = ref.ssd_chunked(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], chunk_size=16, **args,
                                     return_final_state=True)
    assert y.dtype == torch.float16 and fin.dtype == torch.float32
    assert (y.float() - y_ref.float()).abs().max() <= 2e-2 * y_ref.float().abs().max()
    assert (fin - fin_ref).abs().max() <= 2e-2 * fin_ref.abs().max()


def test_dispatch(monkeypatch):
    """ssd.ssd_chunked picks the kernel when use_kernels says so, the reference otherwise."""
    t = _make(1, 5, 2, 1, 8, 8)
    calls = []
    real = kern.ssd_chunked_triton
    monkeypatch.setattr(kern, "ssd_chunked_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    y1 = ssd_ops.ssd_chunked(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], chunk_size=16)
    assert calls == [1]
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "0")
    y2 = ssd_ops.ssd_chunked(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], chunk_size=16)
    assert calls == [1]
    torch.testing.assert_close(y1, y2, atol=1e-4, rtol=1e-4)
    assert ssd_ops.ssd_chunked_reference is ref.ssd_chunked


def test_custom_op_path_matches_eager():
    """The custom ops (what torch.compile captures) and the eager autograd.Function that
    ssd_chunked_triton uses outside compilation give the same outputs and gradients — also when only
    the final state is in the loss (no output gradient)."""
    t = _make(1, 20, 2, 1, 8, 8, init=True, D="h", z=True, bias=True)
    names = ["x", "dt", "A", "Bm", "Cm", "D", "z", "dt_bias", "initial_state"]
    args = tuple(t[k] for k in names) + (None, None, 16, True, 0.0, float("inf"))
    for use_y in (True, False):
        outs = []
        for fn in (torch.ops.hybridize.ssd_chunked_fwd, kern._SSDEager.apply):
            y, fin = fn(*args)
            loss = (fin * 0.5).sum() + ((y ** 2).sum() if use_y else 0.0)
            outs.append([y, fin, *torch.autograd.grad(loss, [t[k] for k in names])])
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b)


def test_opcheck():
    """Schema, fake (meta) implementation and autograd registration, for torch.compile."""
    t = _make(1, 17, 2, 1, 8, 8, init=True, D="h", z=True, bias=True)
    args = (t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], t["D"], t["z"], t["dt_bias"], t["initial_state"],
            None, None, 16, True, 0.0, float("inf"))
    torch.library.opcheck(torch.ops.hybridize.ssd_chunked_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize(("G", "H", "P", "N"), [(1, 5, 48, 40), (2, 8, 64, 128)])
def test_gpu_fp32_grads_medium(G, H, P, N):
    _check(2, 300, H, G, P, N, chunk_size=64, init=True, seq=[64, 100, 250], D="hp", z=True, bias=True,
           dt_softplus=True, dt_limit=(0.0, 2.0), atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_fp32_log_decay_medium():
    _check(2, 257, 4, 2, 64, 64, chunk_size=64, init=True, seq=[128], D="h", z=True, log_decay=True,
           atol=1e-3, rtol=1e-3)


# parameters whose gradient is a sum over all tokens (cancellation makes bf16 relative errors larger)
_REDUCED = {"dA", "dD", "ddt_bias", "dlog_decay"}


def _compare_real(got, want, dtype):
    compare_grads(got, want, dtype, _REDUCED)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_shape(dtype):
    """L=2048, H=8, P=64, N=128 (Mamba-2 sizes): outputs, final states and gradients vs the fp32
    reference run on the same (rounded) inputs."""
    B, L, H, G, P, N = 2, 2048, 8, 1, 64, 128
    t = _make(B, L, H, G, P, N, init=True, seq=[700], D="h", z=True, bias=True, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(B, L, H, P, generator=gen).to(DEVICE, dtype)
    gf = torch.randn(B, H, P, N, generator=gen).to(DEVICE)
    got = _run(kern.ssd_chunked_triton, t, {"chunk_size": 256, "dt_softplus": True}, gy, gf)
    t32 = {k: (v.detach().float().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v)
           for k, v in t.items()}
    want = _run(ref.ssd_chunked, t32, {"chunk_size": 64, "dt_softplus": True}, gy.float(), gf)
    _compare_real(got, want, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("entry", ["kernel", "dispatch"])
def test_gpu_torch_compile_fullgraph(entry):
    """The custom ops are captured by torch.compile(fullgraph=True), forward and backward — called
    directly, and through the dispatch in hybridize.ops.ssd (what the layers call)."""
    t = _make(2, 300, 4, 2, 64, 32, init=True, seq=[100], D="h", z=True, bias=True, dtype=torch.bfloat16)
    fn = kern.ssd_chunked_triton if entry == "kernel" else ssd_ops.ssd_chunked

    def f(x, dt, A, Bm, Cm, D, z, dt_bias, h0, seq_idx):
        y, fin = fn(x, dt, A, Bm, Cm, chunk_size=64, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                    initial_state=h0, seq_idx=seq_idx, return_final_state=True)
        return (y.float() ** 2).sum() + fin.sum()

    args = [t[k] for k in ("x", "dt", "A", "Bm", "Cm", "D", "z", "dt_bias", "initial_state", "seq_idx")]
    eager = f(*args)
    g_eager = torch.autograd.grad(eager, args[:9])
    compiled = torch.compile(f, fullgraph=True)(*args)
    g_comp = torch.autograd.grad(compiled, args[:9])
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_small_head_tiles_are_padded_in_16_bit():
    """The forward output kernel's P tile (kern.out_block_p): 64 for 16-bit inputs whose N tile is 64 —
    BP 16 / 32 beside BN 64 computed wrong outputs on an H100 (benchmarks/results/ssd_tile_probe_h100.json)
    — and the whole P (up to 64) otherwise."""
    bp = kern.out_block_p
    assert bp(32, 64, torch.bfloat16) == 64 and bp(16, 48, torch.float16) == 64 and bp(8, 33, torch.bfloat16) == 64
    assert bp(32, 64, torch.float32) == 32 and bp(32, 128, torch.bfloat16) == 32 and bp(32, 16, torch.bfloat16) == 32
    assert bp(128, 64, torch.bfloat16) == 64 and bp(16, 32, torch.bfloat16) == 16


def test_small_head_tiles_take_a_32_row_chunk_in_16_bit():
    """kern.small_tile_chunk_cap: 16-bit, P <= 32, 32 < N <= 64 run with a 32-row chunk (a 64-row chunk
    gave wrong dx / an illegal memory access on an H100); nothing else is capped, and the shapes run in
    the kernels (no reference fallback)."""
    cap = kern.small_tile_chunk_cap
    assert cap(32, 64, torch.bfloat16) == 32 and cap(16, 48, torch.float16) == 32 and cap(8, 33, torch.bfloat16) == 32
    assert cap(32, 64, torch.float32) > 64 and cap(64, 64, torch.bfloat16) > 64 and cap(32, 128, torch.bfloat16) > 64
    assert cap(32, 16, torch.bfloat16) > 64 and cap(32, 32, torch.bfloat16) > 64
    x = torch.zeros(1, 4, 2, 32, dtype=torch.bfloat16)
    assert ssd_ops._kernel_ok(x, torch.zeros(1, 4, 1, 64, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize(("P", "N"), [(32, 64), (16, 64), (8, 48), (32, 16), (32, 128), (64, 64)])
def test_gpu_small_head_tiles(P, N):
    """bf16, B=8, L=128, H=4, with D, z and dt_bias, through the dispatch (what the layers call), all in the
    kernels: right on both sides of the small-tile line (`small_tile_chunk_cap`, `out_block_p`), forward
    and gradients."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=DEVICE, generator=gen)  # noqa: E731
    B, L, H = 8, 128, 4
    x, z, dt = r(B, L, H, P).bfloat16(), r(B, L, H, P).bfloat16(), r(B, L, H).bfloat16()
    Bm, Cm = r(B, L, 1, N).bfloat16(), r(B, L, 1, N).bfloat16()
    A, D, bias = -torch.rand(H, device=DEVICE, generator=gen) - 0.5, r(H), r(H)
    leaves = [t.requires_grad_() for t in (x, dt, Bm, Cm)]
    kw = dict(chunk_size=64, D=D, z=z, dt_bias=bias, dt_softplus=True)
    y = ssd_ops.ssd_chunked(x, dt, A, Bm, Cm, **kw)
    f32 = [t.detach().float().requires_grad_() for t in leaves]
    want = ref.ssd_chunked(*f32[:2], A, *f32[2:], **{**kw, "z": z.float()})
    assert torch.isfinite(y).all()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(y, want) < 2e-2, rel(y, want)
    gy = r(*y.shape)
    got = torch.autograd.grad((y.float() * gy).sum(), leaves)
    exp = torch.autograd.grad((want * gy).sum(), f32)
    for name, a, b in zip(("dx", "ddt", "dB", "dC"), got, exp):
        assert rel(a, b) < 3e-2, (name, rel(a, b))


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """B·L·H·P > 2^31 (x alone 4.3 GB in bf16): the last document (after a seq_idx boundary) must
    match the reference run on that document alone — forward and dx/dB/dC there."""
    H, G, P, N = 32, 1, 64, 16
    L = (1 << 31) // (H * P) + 300
    tail = 200                                   # the last document: its tokens are all past 2^31
    assert (L - tail) * H * P > (1 << 31)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.zeros(1, L, H, P, device=DEVICE, dtype=torch.bfloat16)
    x[:, -tail - 64:] = torch.randn(1, tail + 64, H, P, device=DEVICE, generator=gen).bfloat16()
    dt = torch.rand(1, L, H, device=DEVICE, generator=gen) * 0.1
    A = -torch.rand(H, device=DEVICE, generator=gen) - 0.5
    Bm = torch.randn(1, L, G, N, device=DEVICE, generator=gen).bfloat16()
    Cm = torch.randn(1, L, G, N, device=DEVICE, generator=gen).bfloat16()
    seq = torch.zeros(1, L, dtype=torch.long, device=DEVICE)
    seq[:, L - tail:] = 1
    x.requires_grad_(True)
    Bm.requires_grad_(True)
    Cm.requires_grad_(True)
    y = kern.ssd_chunked_triton(x, dt, A, Bm, Cm, chunk_size=64, seq_idx=seq)
    gy = torch.randn(1, tail, H, P, device=DEVICE, generator=gen).bfloat16()
    dx, dB, dC = torch.autograd.grad(y[:, -tail:], (x, Bm, Cm), gy)
    xs, Bs, Cs = (v.detach()[:, -tail:].float().requires_grad_() for v in (x, Bm, Cm))
    y_ref = ref.ssd_chunked(xs, dt[:, -tail:], A, Bs, Cs, chunk_size=64)
    dx_ref, dB_ref, dC_ref = torch.autograd.grad(y_ref, (xs, Bs, Cs), gy.float())
    got = {"y": y[:, -tail:], "dx": dx[:, -tail:], "dB": dB[:, -tail:], "dC": dC[:, -tail:]}
    want = {"y": y_ref, "dx": dx_ref, "dB": dB_ref, "dC": dC_ref}
    _compare_real(got, want, torch.bfloat16)
