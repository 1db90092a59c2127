"""Triton skinny GEMM (few rows, M ≤ MAX_M) vs its references: the plain product against
`skinny_gemm_reference`, every fusion (add / gate / RMSNorm incl. groups and offset / GLU / residual)
against `gemv_fused_reference`, with whole tiles, split-K and stream-K (tiles split unevenly over the
programs; the parts summed in a fixed order by the last program to arrive, which must be bitwise
deterministic and leave the arrival counters at zero), `out=` buffers (also strided column slices),
shape checks and odd shapes (N, K not multiples of the blocks, M = 1 and M = MAX_M).

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest), where
bf16 tl.dot is wrong (numpy has no bf16): bf16 is tested on CUDA only."""
import math
import os

import pytest
import torch

pytest.importorskip("triton")

from hybridize.ops.gemm import triton as kern  # noqa: E402
from hybridize.ops.gemm.reference import skinny_gemm_reference  # noqa: E402
from hybridize.ops.gemv.reference import gemv_fused_reference  # noqa: E402

_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if _CUDA else "cpu"
if not _CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if _CUDA else [])
Cfg = kern.GemmConfig


def _tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-4)


def _plan(cfg, N, K):
    """How the wrapper shares out the work of `cfg` (clipped) on an (N, K) weight."""
    c = kern.clip(cfg, N, K)
    return kern.plan(c, math.ceil(N / c.block_n), math.ceil(K / c.block_k), torch.device(DEVICE))


def _split(cfg, N, K) -> bool:
    return _plan(cfg, N, K).segmented


def _counters_clear():
    for buf in kern._COUNTERS.values():
        assert int(buf.abs().sum()) == 0, "an arrival counter was left non-zero"


class _Spy:
    """Wraps a @triton.jit kernel: records the keyword arguments (constexprs) of every launch."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def call(*a, **k):
            self.calls.append(k)
            return launch(*a, **k)
        return call


@pytest.fixture
def kernel_spy(monkeypatch):
    spy = _Spy(kern._skinny_kernel)
    monkeypatch.setattr(kern, "_skinny_kernel", spy)
    yield spy
    _counters_clear()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mk(g, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


# ---------------------------------------------------------------------------- plain product
PLAIN_CONFIGS = (kern.CANDIDATES[0], Cfg(16, 16, 1, 4, 1), Cfg(32, 64, 2, 4, 2), Cfg(16, 32, 3, 4, 1),
                 Cfg(64, 128, 3, 4, 3), Cfg(32, 16, 2, 2, 1), Cfg(16, 16, 0, 4, 1), Cfg(16, 16, -7, 4, 1),
                 Cfg(16, 16, -5, 4, 1), Cfg(32, 32, -40, 4, 2))


@pytest.mark.parametrize("M,N,K", [(1, 16, 16), (5, 70, 257), (17, 33, 100), (64, 48, 64)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_matches_reference(M, N, K, bias, dtype, kernel_spy):
    g = _gen(M * 10000 + N * 100 + K)
    x = _mk(g, dtype, M, K)
    w = _mk(g, dtype, N, K, scale=K ** -0.5)
    b = _mk(g, dtype, N) if bias else None
    want = skinny_gemm_reference(x, w, b)
    for cfg in PLAIN_CONFIGS:
        got = kern.skinny_gemm_triton(x, w, b, cfg)
        assert got.shape == (M, N) and got.dtype == dtype and got.device == x.device
        torch.testing.assert_close(got.float(), want.float(), **_tol(dtype), msg=lambda m, c=cfg: f"{c}: {m}")
        p = _plan(cfg, N, K)
        assert kernel_spy.calls[-1]["SEGMENTED"] == p.segmented       # split tiles go through the combine
        assert kernel_spy.calls[-1]["TILES_PER_PROG"] == p.tiles_per_prog
    if K >= 64:     # the configs above did split tiles unevenly (a program holding parts of two tiles)
        assert any(_plan(c, N, K).segmented and _plan(c, N, K).tiles_per_prog > 1 for c in PLAIN_CONFIGS)


def test_clip_fits_the_shape():
    assert kern.clip(Cfg(64, 128, 8, 4, 3), 40, 100) == Cfg(64, 128, 1, 4, 3)     # one K tile: one split
    assert kern.clip(Cfg(128, 64, 8, 4, 4), 20, 300) == Cfg(32, 64, 5, 4, 4)      # 5 K tiles
    assert kern.clip(Cfg(64, 256, 4, 8, 3), 3, 5) == Cfg(16, 16, 1, 8, 3)         # the smallest tile
    assert kern.clip(Cfg(128, 128, 0, 8, 3), 5152, 2048).split_k == 0              # 41 tiles: stream-K
    assert kern.clip(Cfg(128, 128, 0, 8, 3), 128256, 2048).split_k == 1            # 1002 tiles: whole ones
    for cfg in kern.CANDIDATES:
        for N, K in [(1, 1), (24, 200), (70, 257), (4096, 4096), (128256, 2048)]:
            c = kern.clip(cfg, N, K)
            assert c.block_n <= cfg.block_n and c.block_k <= cfg.block_k
            assert c.block_n >= 16 and c.block_k >= 16
            assert c.block_n & (c.block_n - 1) == 0 and c.block_k & (c.block_k - 1) == 0
            if cfg.split_k > 0:
                assert 1 <= c.split_k <= min(cfg.split_k, math.ceil(K / c.block_k))
            elif cfg.split_k == 0 and math.ceil(N / c.block_n) >= kern.STREAM_K_MAX_TILES:
                assert c.split_k == 1                   # many tiles: whole tiles
            else:                                       # stream-K settings stay
                assert c.split_k == cfg.split_k
            assert (c.num_warps, c.num_stages) == (cfg.num_warps, cfg.num_stages)


def test_every_candidate_and_strided_operands():
    """Every tuning candidate (clipped) computes the same product; a weight that is a row slice of a bigger
    tensor (fused projections) and an x that is a column slice are read in place."""
    g = _gen(7)
    big_w = _mk(g, torch.float32, 300, 200, scale=200 ** -0.5)
    w = big_w[100:124]                                   # rows 100..123: stride (200, 1)
    big_x = _mk(g, torch.float32, 3, 230)
    x = big_x[:, 13:213]                                 # stride (230, 1)
    b = _mk(g, torch.float32, 24)
    want = skinny_gemm_reference(x, w, b)
    for cfg in kern.CANDIDATES:
        got = kern.skinny_gemm_triton(x, w, b, cfg)
        torch.testing.assert_close(got, want, **_tol(torch.float32), msg=lambda m, c=cfg: f"{c}: {m}")
    # the default config (config=None) too
    torch.testing.assert_close(kern.skinny_gemm_triton(x, w, b), want, **_tol(torch.float32))


# ---------------------------------------------------------------------------- fusions
FUSED_CONFIGS = (Cfg(32, 32, 1, 4, 1), Cfg(16, 32, 3, 4, 1), Cfg(64, 64, 2, 4, 1), Cfg(16, 32, -5, 4, 1))
FUSIONS = ["add", "gate_norm_group", "norm_offset", "glu_silu", "glu_gelu_tanh", "glu_gelu", "residual", "all"]


def _fused_case(case, M, N, K, dtype, seed):
    """(x, weight, bias, kwargs) of one fusion case."""
    g = _gen(seed)
    glu = {"glu_silu": "silu", "glu_gelu_tanh": "gelu_tanh", "glu_gelu": "gelu", "all": "silu"}.get(case)
    rows = 2 * N if glu else N
    x = _mk(g, dtype, M, K)
    w = _mk(g, dtype, rows, K, scale=K ** -0.5)
    b = _mk(g, dtype, rows)
    kw = dict(glu=glu)
    if case in ("add", "all"):
        kw["add"] = _mk(g, dtype, M, K)
    if case == "gate_norm_group":                 # Mamba-2's gated norm over groups of channels
        kw.update(gate=_mk(g, dtype, M, K), norm_weight=_mk(g, dtype, K), norm_group=32, eps=1e-5)
    if case == "norm_offset":                     # Gemma's RMSNorm: (1 + w)
        kw.update(norm_weight=_mk(g, dtype, K, scale=0.3), norm_offset=1.0, eps=1e-6)
    if case == "all":
        kw.update(norm_weight=_mk(g, dtype, K), eps=1e-5, norm_offset=0.5)
    if case in ("residual", "all"):
        kw["residual"] = _mk(g, dtype, M, N)
    return x, w, b, kw


@pytest.mark.parametrize("case", FUSIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fusions_match_reference(case, dtype, kernel_spy):
    M, N = 5, 40
    K = 96 if case == "gate_norm_group" else 100       # groups need K % 32 == 0; 96 % 64 != 0 all the same
    x, w, b, kw = _fused_case(case, M, N, K, dtype, seed=FUSIONS.index(case))
    want = gemv_fused_reference(x, w, b, **kw)
    norm_scalar = kw.get("norm_weight") is not None and not kw.get("norm_group")
    for cfg in FUSED_CONFIGS:
        got = kern.skinny_gemm_triton(x, w, b, cfg, **kw)
        if "add" in kw:
            (got, h), (want_y, want_h) = got, want
            assert h.shape == (M, K) and h.dtype == dtype
            assert torch.equal(h, want_h), f"{cfg}: h = round(x + add) differs"
        else:
            assert isinstance(got, torch.Tensor)
            want_y = want
        assert got.shape == (M, N) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want_y.float(), **_tol(dtype), msg=lambda m, c=cfg: f"{c}: {m}")
        call = kernel_spy.calls[-1]
        assert call["SEGMENTED"] == _split(cfg, N, K)
        assert call["NORM"] == (kw.get("norm_weight") is not None) and call["NORM_GROUP"] == (0 if norm_scalar else
                                                                                            kw.get("norm_group", 0))
        assert call["GLU"] == kern.GLU_CODES.get(kw["glu"], 0)
    assert sum(_split(c, N, K) for c in FUSED_CONFIGS) >= 2
    assert any(_plan(c, N, K).tiles_per_prog > 1 for c in FUSED_CONFIGS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("glu", [None, "gelu_tanh"])
def test_norm_with_split_k_sums_the_partial_squares(dtype, glu, kernel_spy):
    """RMSNorm over all of K with split-K: each split holds the sum of squares of its own K range only;
    the reduce must add all of them (per row) before the rstd. The input's scale differs by split and by
    row, so using one split's part, or another row's, is far off."""
    M, N, K = 3, 40, 96
    g = _gen(11)
    x = torch.randn(M, K, generator=g)
    x[:, :32] *= 8.0                                  # split 0 (block_k 32) holds most of the energy
    x[:, 64:] *= 0.125
    x *= torch.tensor([[1.0], [0.01], [30.0]])          # rows of very different norms
    x = x.to(DEVICE, dtype)
    rows = 2 * N if glu else N
    w = _mk(g, dtype, rows, K, scale=K ** -0.5)
    b = _mk(g, dtype, rows)
    nw = _mk(g, dtype, K)
    kw = dict(norm_weight=nw, eps=1e-6, glu=glu)
    want = gemv_fused_reference(x, w, b, **kw).float()
    one = kern.skinny_gemm_triton(x, w, b, Cfg(16, 32, 1, 4, 1), **kw)
    assert kernel_spy.calls[-1]["SEGMENTED"] is False
    three = kern.skinny_gemm_triton(x, w, b, Cfg(16, 32, 3, 4, 1), **kw)   # 3 n-blocks x 3 splits
    assert kernel_spy.calls[-1]["SEGMENTED"] is True and _plan(Cfg(16, 32, 3, 4, 1), N, K).max_seg == 3
    uneven = kern.skinny_gemm_triton(x, w, b, Cfg(16, 32, -5, 4, 1), **kw)  # 9 tile-steps over 5 programs
    assert kernel_spy.calls[-1]["TILES_PER_PROG"] == 2
    torch.testing.assert_close(one.float(), want, **_tol(dtype))
    torch.testing.assert_close(three.float(), want, **_tol(dtype))
    torch.testing.assert_close(uneven.float(), want, **_tol(dtype))


def test_grouped_norm_eps0_with_a_partial_k_tile():
    """K = 96, block_k = 64: the second tile's last 32 lanes are padding, a whole zero group whose rstd is
    1/sqrt(0 + eps); with eps = 0 that is inf, and 0 * inf = NaN must not enter the dot (it did once)."""
    g = _gen(3)
    M, N, K = 3, 16, 96
    x, w, nw = _mk(g, torch.float32, M, K), _mk(g, torch.float32, N, K, scale=0.1), _mk(g, torch.float32, K)
    want = gemv_fused_reference(x, w, None, norm_weight=nw, norm_group=32)
    assert torch.isfinite(want).all()
    got = kern.skinny_gemm_triton(x, w, None, Cfg(16, 64, 1, 4, 1), norm_weight=nw, norm_group=32)
    torch.testing.assert_close(got, want, **_tol(torch.float32))


# ---------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_is_deterministic(dtype, kernel_spy):
    M, N, K = 7, 50, 200
    x, w, b, kw = _fused_case("all", M, N, K, dtype, seed=5)
    plain_w = w[:N]
    for cfg in (Cfg(16, 16, 4, 4, 1), Cfg(32, 64, 3, 4, 1), Cfg(16, 16, -11, 4, 1)):
        assert _split(cfg, N, K)
        a = kern.skinny_gemm_triton(x, plain_w, None, cfg)
        c = kern.skinny_gemm_triton(x, plain_w, None, cfg)
        assert torch.equal(a, c)
        torch.testing.assert_close(a.float(), skinny_gemm_reference(x, plain_w).float(), **_tol(dtype))
        (ya, ha), (yc, hc) = (kern.skinny_gemm_triton(x, w, b, cfg, **kw) for _ in range(2))
        assert torch.equal(ya, yc) and torch.equal(ha, hc)
        want_y, want_h = gemv_fused_reference(x, w, b, **kw)
        torch.testing.assert_close(ya.float(), want_y.float(), **_tol(dtype))
        assert torch.equal(ha, want_h)
        # into a buffer full of NaN: every element written, the same bits again
        buf = torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)
        yb, _ = kern.skinny_gemm_triton(x, w, b, cfg, out=buf, **kw)
        assert yb is buf and torch.equal(buf, ya)
    assert len(kernel_spy.calls) == 3 * 5 and all(c["SEGMENTED"] for c in kernel_spy.calls)


# ---------------------------------------------------------------------------- out=
@pytest.mark.parametrize("cfg", [Cfg(16, 32, 1, 4, 1), Cfg(16, 32, 3, 4, 1), Cfg(16, 32, -4, 4, 1)],
                         ids=["split1", "split3", "stream4"])
def test_out_buffer_and_column_slice(cfg):
    M, N, K = 6, 37, 90
    dtype = torch.float32
    g = _gen(13)
    x, w, b = _mk(g, dtype, M, K), _mk(g, dtype, N, K, scale=K ** -0.5), _mk(g, dtype, N)
    want = skinny_gemm_reference(x, w, b)
    out = torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)
    got = kern.skinny_gemm_triton(x, w, b, cfg, out=out)
    assert got is out
    torch.testing.assert_close(out, want, **_tol(dtype))
    # a column slice of a wider buffer (e.g. one projection's part of a fused output): stride(0) > N
    big = torch.full((M, N + 12), float("nan"), device=DEVICE, dtype=dtype)
    view = big[:, 5:5 + N]
    assert view.stride() == (N + 12, 1)
    got = kern.skinny_gemm_triton(x, w, b, cfg, out=view)
    assert got is view
    torch.testing.assert_close(view, want, **_tol(dtype))
    assert torch.isnan(big[:, :5]).all() and torch.isnan(big[:, 5 + N:]).all()    # nothing else touched
    # with fusions (returns (out, h)); a strided residual too
    xx, ww, bb, kw = _fused_case("all", M, N, K, dtype, seed=17)
    res_big = _mk(g, dtype, M, N + 3)
    kw["residual"] = res_big[:, 3:]
    want_y, want_h = gemv_fused_reference(xx, ww, bb, **kw)
    big.fill_(float("nan"))
    y, h = kern.skinny_gemm_triton(xx, ww, bb, cfg, out=view, **kw)
    assert y is view and torch.equal(h, want_h)
    torch.testing.assert_close(view, want_y, **_tol(dtype))
    assert torch.isnan(big[:, :5]).all() and torch.isnan(big[:, 5 + N:]).all()


# ---------------------------------------------------------------------------- errors
def test_rejects_bad_inputs():
    x, w = torch.randn(2, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"M = 129 rows exceed MAX_M = 128"):
        kern.skinny_gemm_triton(torch.randn(kern.MAX_M + 1, 16, device=DEVICE), w)
    with pytest.raises(ValueError, match=r"x \(2, 12\) must be \(M, K\) for weight \(N, K\) = \(8, 16\)"):
        kern.skinny_gemm_triton(torch.randn(2, 12, device=DEVICE), w)
    with pytest.raises(ValueError, match=r"must be \(M, K\)"):
        kern.skinny_gemm_triton(torch.randn(16, device=DEVICE), w)          # 1-D x
    with pytest.raises(ValueError, match="even number of weight rows"):
        kern.skinny_gemm_triton(x, torch.randn(7, 16, device=DEVICE), glu="silu")
    with pytest.raises(ValueError, match="glu must be one of"):
        kern.skinny_gemm_triton(x, w, glu="relu")
    with pytest.raises(ValueError, match=r"bias must have 8 elements, got \(9,\)"):
        kern.skinny_gemm_triton(x, w, torch.randn(9, device=DEVICE))
    with pytest.raises(ValueError, match="bias must have 8 elements"):     # GLU: bias of gate and up rows
        kern.skinny_gemm_triton(x, w, torch.randn(4, device=DEVICE), glu="silu")
    with pytest.raises(ValueError, match=r"residual must have 2 x 8 elements, got \(2, 9\)"):
        kern.skinny_gemm_triton(x, w, residual=torch.randn(2, 9, device=DEVICE))
    with pytest.raises(ValueError, match="residual must have 2 x 4 elements"):     # GLU halves N
        kern.skinny_gemm_triton(x, w, glu="gelu", residual=torch.randn(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="add must have 2 x 16 elements"):
        kern.skinny_gemm_triton(x, w, add=torch.randn(2, 15, device=DEVICE))
    with pytest.raises(ValueError, match="norm_weight must have 16 elements"):
        kern.skinny_gemm_triton(x, w, norm_weight=torch.randn(15, device=DEVICE))
    x48, w48 = torch.randn(2, 48, device=DEVICE), torch.randn(8, 48, device=DEVICE)
    with pytest.raises(ValueError, match=r"groups of 32 needs K \(48\)"):       # K % 32 != 0
        kern.skinny_gemm_triton(x48, w48, norm_weight=torch.ones(48, device=DEVICE), norm_group=32)
    x64, w64 = torch.randn(2, 64, device=DEVICE), torch.randn(8, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"groups of 32 .*block_k \(16\)"):    # block_k % 32 != 0
        kern.skinny_gemm_triton(x64, w64, None, Cfg(16, 16, 1, 4, 1), norm_weight=torch.ones(64, device=DEVICE),
                                norm_group=32)


# ---------------------------------------------------------------------------- edge shapes
@pytest.mark.parametrize("M", [1, 16, 17, kern.MAX_M])
def test_edge_rows(M, kernel_spy):
    """M = 1, the block_m boundary (16 / 17) and MAX_M; N not a multiple of block_n, K not one of block_k;
    plain, and add + norm + GLU + residual with split-K (padded rows of the sum of squares)."""
    N, K = 20, 40
    dtype = torch.float32
    g = _gen(M)
    x, w = _mk(g, dtype, M, K), _mk(g, dtype, N, K, scale=K ** -0.5)
    want = skinny_gemm_reference(x, w)
    for cfg in (Cfg(16, 16, 1, 4, 1), Cfg(16, 32, 2, 4, 1)):           # K = 40: 3 (or 2) tiles, the last partial
        got = kern.skinny_gemm_triton(x, w, None, cfg)
        assert got.shape == (M, N)
        torch.testing.assert_close(got, want, **_tol(dtype))
    xx, ww, bb, kw = _fused_case("all", M, N, K, dtype, seed=M + 1)
    want_y, want_h = gemv_fused_reference(xx, ww, bb, **kw)
    for cfg in (Cfg(16, 16, 1, 4, 1), Cfg(16, 16, 3, 4, 1), Cfg(16, 16, -4, 4, 1)):
        y, h = kern.skinny_gemm_triton(xx, ww, bb, cfg, **kw)
        assert y.shape == (M, N) and torch.equal(h, want_h)
        torch.testing.assert_close(y, want_y, **_tol(dtype))
    assert [c["SEGMENTED"] for c in kernel_spy.calls] == [False, True, False, True, True]


def test_out_and_norm_group_are_validated():
    x, w = torch.randn(3, 32).to(DEVICE), torch.randn(16, 32).to(DEVICE)
    for bad in (torch.empty(16, 3, device=DEVICE).t(), torch.empty(2, 16, device=DEVICE),
                torch.empty(3, 16, device=DEVICE, dtype=torch.float16)):
        with pytest.raises(ValueError, match="out must be"):
            kern.skinny_gemm_triton(x, w, out=bad)
    with pytest.raises(ValueError, match="norm_group must be >= 0"):
        kern.skinny_gemm_triton(x, w, norm_weight=torch.ones(32, device=DEVICE), norm_group=-1)


# ---------------------------------------------------------------------------- CUDA graphs (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [Cfg(64, 128, 0, 4, 4), Cfg(64, 128, 4, 4, 4), Cfg(32, 64, -97, 4, 3)],
                         ids=["stream_sms", "split4", "stream97"])
def test_gpu_split_tiles_in_a_replayed_graph(cfg):
    """Split tiles inside a CUDA graph (what the decode step does): replayed many times, back to back with
    two different GEMMs sharing the per-device arrival counters, every replay gives the eager bits and the
    counters end at zero (a count left behind would make the next launch's last arrival skip the epilogue)."""
    if not _CUDA:
        pytest.skip("needs a CUDA device")
    g = _gen(21)
    M, K = 64, 2048
    x = _mk(g, torch.bfloat16, M, K)
    w1, w2 = _mk(g, torch.bfloat16, 2048, K, scale=K ** -0.5), _mk(g, torch.bfloat16, 5152, K, scale=K ** -0.5)
    res = _mk(g, torch.bfloat16, M, 2048)
    assert _split(cfg, 2048, K) and _split(cfg, 5152, K)
    want1 = kern.skinny_gemm_triton(x, w1, None, cfg, residual=res)
    want2 = kern.skinny_gemm_triton(want1, w2, None, cfg)
    torch.cuda.synchronize()
    _counters_clear()
    out1, out2 = torch.empty_like(want1), torch.empty_like(want2)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kern.skinny_gemm_triton(x, w1, None, cfg, residual=res, out=out1)
        kern.skinny_gemm_triton(out1, w2, None, cfg, out=out2)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kern.skinny_gemm_triton(x, w1, None, cfg, residual=res, out=out1)
        kern.skinny_gemm_triton(out1, w2, None, cfg, out=out2)
    for _ in range(50):
        out1.fill_(float("nan"))
        out2.fill_(float("nan"))
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out1, want1) and torch.equal(out2, want2)
    _counters_clear()
    torch.testing.assert_close(want1.float(), (x.float() @ w1.float().T + res.float()), atol=3e-2, rtol=2e-2)
