"""Split-K decode-attention Triton kernel (`hybridize.ops.attention.triton_decode`) vs the fp32 reference
`decode_attention_reference`: GQA (query heads sharing a kv head as extra query rows), T = 1 and T > 1
query tokens per row, per-row lengths (an empty row, a full one, rows at different positions), a
wrapped ring buffer with a sliding window, head dims that are not powers of two, several splits and
several query-row blocks; the dispatch (`decode_kernel_ok`) and `Attention.step_tokens` with the kernel
vs its SDPA path.

Without CUDA the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported) on small shapes; `gpu` tests use real shapes (GQA 32/8 heads, head_dim 128, context 4k-8k).

The fused decode op (`decode_attention_fused`: RoPE of q and k, cache writes, attention, lengths += T)
vs `decode_attention_fused_reference` (the unfused step in PyTorch): outputs, both caches and lengths,
for one split (no merge kernel, lengths advanced by the row's last program) and split + merge grids;
and `Attention.step_tokens` through it vs the unfused kernel and SDPA paths for every RoPE variant.
"""
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hybridize.config import AttentionConfig  # noqa: E402
from hybridize.layers.attention import Attention  # noqa: E402
from hybridize.ops.attention import triton_decode as kern  # noqa: E402
from hybridize.ops.attention.reference import decode_attention_reference  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"

if not _CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and triton was imported without TRITON_INTERPRET=1", allow_module_level=True)


def _inputs(B, H, Hkv, T, C, P, lens, dtype=torch.float32, seed=0):
    """q (B, H, T, P) as a transposed view (the layer's layout), caches (B, Hkv, C, P), n0 (B,)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, P, generator=g).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, C, P, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, C, P, generator=g).to(DEVICE, dtype)
    return q, k, v, torch.tensor(lens, device=DEVICE, dtype=torch.long)


def _rel(got, want):
    g, w = got.float(), want.float()
    fro = ((g - w).norm() / w.norm().clamp_min(1e-12)).item()
    mx = ((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()
    return fro, mx


CASES = [
    # B, H, Hkv, T, C, P, window, n0 per row (tokens already in the cache before the T new ones)
    dict(B=3, H=4, Hkv=2, T=1, C=40, P=16, window=0, lens=[0, 39, 7]),           # empty / full / partial
    dict(B=2, H=6, Hkv=2, T=3, C=24, P=12, window=0, lens=[5, 21]),              # T > 1, P not a pow2
    dict(B=3, H=4, Hkv=1, T=2, C=10, P=8, window=9, lens=[3, 25, 40]),           # MQA, wrapped ring + window
    dict(B=2, H=2, Hkv=2, T=1, C=200, P=16, window=0, lens=[199, 64]),           # several splits (MHA)
    dict(B=1, H=24, Hkv=2, T=7, C=30, P=8, window=16, lens=[20]),                # 84 query rows: 2 row blocks
]


@pytest.mark.parametrize("case", CASES)
def test_decode_kernel_matches_reference(case):
    c = dict(case)
    window = c.pop("window")
    q, k, v, n0 = _inputs(**c)
    scale = c["P"] ** -0.5
    got = kern._decode_attention_impl(q, k, v, n0, window, scale)
    want = decode_attention_reference(q, k, v, n0, window, scale)
    assert got.shape == (c["B"], c["T"], c["H"], c["P"]) and got.dtype == q.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _layer(window=None, heads=4, kv=2, hidden=32, seed=0):
    torch.manual_seed(seed)
    cfg = AttentionConfig(num_heads=heads, num_kv_heads=kv, sliding_window=window)
    return Attention(hidden, cfg).to(DEVICE)


@pytest.mark.parametrize("window", [None, 6])
def test_step_tokens_kernel_equals_sdpa_path(window, monkeypatch):
    """The layer's decode step with the kernel (HYBRIDIZE_KERNELS=1) and with its SDPA path (=0): rows
    at different lengths, one and three tokens per call, a ring buffer that wraps (window 6, 8 slots)."""
    m = _layer(window).eval()
    B, prefix = 3, [0, 5, 11]
    x = torch.randn(B, 16, 32, device=DEVICE)
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("HYBRIDIZE_KERNELS", flag)
        st = m.init_state(B, max_seqlen=8 if window else 24)
        st.lengths.copy_(torch.tensor(prefix, device=DEVICE))      # rows at different positions
        st.k.normal_(generator=torch.Generator(DEVICE).manual_seed(1))
        st.v.normal_(generator=torch.Generator(DEVICE).manual_seed(2))
        with torch.no_grad():
            ys = [m.step_tokens(x[:, :3], st), m.step(x[:, 3], st), m.step_tokens(x[:, 4:7], st)]
        outs[flag] = (torch.cat([ys[0], ys[1][:, None], ys[2]], 1), st)
    torch.testing.assert_close(outs["1"][0], outs["0"][0], rtol=1e-5, atol=1e-5)
    for f in ("k", "v", "lengths"):
        torch.testing.assert_close(getattr(outs["1"][1], f), getattr(outs["0"][1], f))


def test_dispatch_honours_hybridize_kernels(monkeypatch):
    """A configuration whose self-check passed is still switched off by HYBRIDIZE_KERNELS=0 (the check's
    result is cached per device/dtype/head dim; the dispatch rule must come first)."""
    q, k, _, _ = _inputs(1, 4, 2, 1, 8, 16, [0])
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    assert kern.decode_kernel_ok(q, k, 2)
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "0")
    assert not kern.decode_kernel_ok(q, k, 2)
    if not _CUDA:
        monkeypatch.delenv("HYBRIDIZE_KERNELS")
        assert not kern.decode_kernel_ok(q, k, 2), "CPU tensors take the SDPA path unless forced"


def test_custom_op_registration():
    q, k, v, n0 = _inputs(2, 4, 2, 2, 12, 8, [3, 10])
    torch.library.opcheck(torch.ops.hybridize.decode_attention.default, (q, k, v, n0, 0, 8 ** -0.5),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------- fused op
def _fused_inputs(B, H, Hkv, T, C, P, lens, rot, dtype, seed=0):
    """Raw q (B, T, H, P), k, v (B, T, Hkv, P) as strided views of one fused projection output (the
    layer's layout), inv_freq (rot/2,), random caches (B, Hkv, C, P) and lengths (B,)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * P, generator=g).to(DEVICE, dtype)
    q, k, v = (t.unflatten(-1, (-1, P)) for t in qkv.split([H * P, Hkv * P, Hkv * P], -1))
    inv_freq = (1.0 / (10000.0 ** (torch.arange(0, rot, 2).float() / max(rot, 1)))).to(DEVICE)
    kc = torch.randn(B, Hkv, C, P, generator=g).to(DEVICE, dtype)
    vc = torch.randn(B, Hkv, C, P, generator=g).to(DEVICE, dtype)
    return q, k, v, inv_freq, kc, vc, torch.tensor(lens, device=DEVICE, dtype=torch.long)


FUSED_CASES = {
    # B, H, Hkv, T, C, P, window, lens (tokens cached before the T new ones), rotary width, interleaved,
    # rope attention factor (YaRN), single-split threshold (0: split + merge wherever C has > 1 block)
    "mqa_T1_b1_p64": dict(B=1, H=4, Hkv=1, T=1, C=40, P=64, window=0, lens=[17], rot=64),
    "mha_T3_b3_fill": dict(B=3, H=4, Hkv=4, T=3, C=24, P=16, window=0, lens=[0, 5, 21], rot=16),
    "gqa4_T3_ring_wrap_partial_interleaved": dict(B=3, H=8, Hkv=2, T=3, C=11, P=12, window=9,
                                                  lens=[3, 25, 40], rot=6, interleaved=True),
    "gqa4_T1_odd_p9_yarn_scale": dict(B=3, H=8, Hkv=2, T=1, C=20, P=9, window=0, lens=[0, 7, 19], rot=4,
                                     rope_scale=1.3),
    "no_rope_T3": dict(B=2, H=4, Hkv=2, T=3, C=16, P=16, window=0, lens=[2, 13], rot=0),
    "window_lt_T": dict(B=2, H=2, Hkv=1, T=3, C=8, P=8, window=2, lens=[0, 30], rot=8),
    "rows_2_blocks": dict(B=1, H=24, Hkv=2, T=7, C=30, P=8, window=16, lens=[20], rot=8),   # R = 84
    "multi_T1_mqa_p64": dict(B=3, H=4, Hkv=1, T=1, C=300, P=64, window=0, lens=[299, 150, 0], rot=32,
                             single_max=0),
    "multi_T3_ring_wrap": dict(B=2, H=4, Hkv=2, T=3, C=132, P=16, window=130, lens=[1000, 60], rot=16,
                               single_max=0),
    "single_T3_4_blocks": dict(B=2, H=8, Hkv=2, T=3, C=250, P=32, window=0, lens=[246, 100], rot=32,
                               single_max=4),
}


def _run_fused(case, dtype, monkeypatch):
    c = dict(case)
    window, rot = c.pop("window"), c.pop("rot")
    interleaved, rope_scale = c.pop("interleaved", False), c.pop("rope_scale", 1.0)
    if "single_max" in c:
        monkeypatch.setattr(kern, "_SINGLE_SPLIT_MAX_BLOCKS", c.pop("single_max"))
    q, k, v, inv_freq, kc, vc, n = _fused_inputs(**c, rot=rot, dtype=dtype)
    scale = c["P"] ** -0.5
    ref_kc, ref_vc, ref_n = kc.clone(), vc.clone(), n.clone()
    got = kern.decode_attention_fused(q, k, v, inv_freq, kc, vc, n, window, scale, rope_scale, interleaved)
    want = kern.decode_attention_fused_reference(q, k, v, inv_freq, ref_kc, ref_vc, ref_n, window, scale,
                                                 rope_scale, interleaved)
    return c, (got, kc, vc, n), (want, ref_kc, ref_vc, ref_n)


@pytest.mark.parametrize("early", [1, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_decode_matches_unfused_reference(name, dtype, early, monkeypatch):
    """early = 1 (default): lengths / RoPE tables before the PDL wait (on the GPU); 0: after it."""
    monkeypatch.setitem(kern.FUSED_TUNE, "early", early)
    c, got, want = _run_fused(FUSED_CASES[name], dtype, monkeypatch)
    S = kern._tiles(c["B"], c["Hkv"], c["T"] * c["H"] // c["Hkv"], c["C"], c["P"], torch.device(DEVICE),
                    kern._SINGLE_SPLIT_MAX_BLOCKS, kern.FUSED_TUNE["fill"])[4]
    if name.startswith("multi"):
        assert S > 1, "the case should exercise split + merge"
    else:
        assert S == 1, "the case should exercise the single-split kernel"
    assert got[0].shape == (c["B"], c["T"], c["H"], c["P"]) and got[0].dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[0], want[0], **tol)
    # caches: the rotated new keys differ from PyTorch's by cos/sin rounding at most (fp32: ~1 ulp; bf16:
    # one rounding step where the two land on either side of a bf16 boundary); untouched slots exactly
    torch.testing.assert_close(got[1], want[1], **tol)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
    assert torch.equal(got[3], want[3])
    assert torch.equal(got[3], torch.tensor(c["lens"], device=DEVICE) + c["T"])
    if str(torch.device(DEVICE)) in kern._COUNTERS:
        assert not kern._COUNTERS[str(torch.device(DEVICE))].any(), "row counters must be reset to 0"


@pytest.mark.parametrize("merge_bs", [1, 2, 16])
@pytest.mark.parametrize("name", ["multi_T1_mqa_p64", "multi_T3_ring_wrap"])
def test_fused_decode_merge_chunks(name, merge_bs, monkeypatch):
    """The merge combines BLOCK_S splits per iteration (a partial last chunk, one chunk, one at a time)."""
    monkeypatch.setitem(kern.FUSED_TUNE, "merge_bs", merge_bs)
    c, got, want = _run_fused(FUSED_CASES[name], torch.float32, monkeypatch)
    S = kern._tiles(c["B"], c["Hkv"], c["T"] * c["H"] // c["Hkv"], c["C"], c["P"], torch.device(DEVICE), 0,
                    kern.FUSED_TUNE["fill"])[4]
    assert S > 2 and S % 2, S                 # several splits, and chunks of 2 leave a partial one
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[3], want[3])


@pytest.mark.parametrize("name", ["multi_T1_mqa_p64", "multi_T3_ring_wrap"])
def test_fused_decode_block_n(name, monkeypatch):
    """The tile length override (FUSED_TUNE block_n) changes the split geometry, not the result."""
    monkeypatch.setitem(kern.FUSED_TUNE, "block_n", 16)
    c, got, want = _run_fused(FUSED_CASES[name], torch.float32, monkeypatch)
    tiles = kern._tiles(c["B"], c["Hkv"], c["T"] * c["H"] // c["Hkv"], c["C"], c["P"], torch.device(DEVICE), 0,
                        kern.FUSED_TUNE["fill"], 16)
    assert tiles[3] == 16 and tiles[4] > 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_decode_single_split_without_counters(monkeypatch):
    """One split but no counter buffer (what a CUDA-graph capture that would need a bigger one gets): the
    merge kernel normalises and advances lengths."""
    monkeypatch.setattr(kern, "_row_counters", lambda device, B: None)
    case = FUSED_CASES["gqa4_T3_ring_wrap_partial_interleaved"]
    _, got, want = _run_fused(case, torch.float32, monkeypatch)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_decode_consecutive_steps_and_rollback():
    """Three steps on the same state, a speculative rollback (lengths lowered) in between: the counters
    reset by each launch, the slots past lengths overwritten again, everything as the reference."""
    q, k, v, inv_freq, kc, vc, n = _fused_inputs(2, 4, 2, 3, 12, 8, [4, 9], 8, torch.float32)
    ref = [kc.clone(), vc.clone(), n.clone()]
    for step in range(3):
        a = kern.decode_attention_fused(q + step, k - step, v * (step + 1), inv_freq, kc, vc, n, 10, 0.3)
        b = kern.decode_attention_fused_reference(q + step, k - step, v * (step + 1), inv_freq, *ref, 10, 0.3)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if step == 0:
            n -= 2
            ref[2] -= 2
    torch.testing.assert_close(kc, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vc, ref[1], rtol=0, atol=0)
    assert torch.equal(n, ref[2]) and n.tolist() == [4 + 7, 9 + 7]


def test_fused_custom_op_registration():
    q, k, v, inv_freq, kc, vc, n = _fused_inputs(2, 4, 2, 2, 12, 8, [3, 10], 8, torch.float32)
    torch.library.opcheck(torch.ops.hybridize.decode_attention_fused.default,
                          (q, k, v, inv_freq, kc, vc, n, 0, 8 ** -0.5, 1.0, False),
                          test_utils=("test_schema", "test_faketensor"))


_ROPES = {
    "llama3_gqa4": dict(heads=8, kv=2, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "yarn_mqa": dict(heads=4, kv=1, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 16}),
    "linear_partial_interleaved_window": dict(heads=4, kv=2,
                                              rope_scaling={"rope_type": "linear", "factor": 2.0},
                                              partial_rotary_factor=0.5, rope_interleaved=True,
                                              sliding_window=5),
}


@pytest.mark.parametrize(("rope", "dtype"), [("llama3_gqa4", torch.float32), ("llama3_gqa4", torch.bfloat16),
                                           ("yarn_mqa", torch.float32),
                                           ("linear_partial_interleaved_window", torch.bfloat16)])
def test_step_tokens_fused_equals_unfused_paths(rope, dtype, monkeypatch):
    """Attention.step_tokens / step through the fused op (fused q/k/v projection: strided views; the
    norm= argument) vs the unfused kernel (`decode_fused_ok` off) and SDPA (HYBRIDIZE_KERNELS=0) on the
    same cache: rows at different lengths, T = 3 and 1, a rollback of 2 tokens, a ring that wraps."""
    import hybridize.layers.attention as attn_mod
    from hybridize.layers.norm import RMSNorm

    cfg = dict(_ROPES[rope])
    heads, kv = cfg.pop("heads"), cfg.pop("kv")
    torch.manual_seed(0)
    m = Attention(32, AttentionConfig(num_heads=heads, num_kv_heads=kv, max_position_embeddings=64, **cfg))
    m = m.to(DEVICE, dtype).eval()
    m.fuse_projections_()
    norm = RMSNorm(32).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    window = cfg.get("sliding_window")
    B, prefix = 3, [0, 5, 11]
    x = torch.randn(B, 8, 32, device=DEVICE, dtype=dtype)
    # the self-checks (seconds each under the interpreter) are covered by the kernel tests and by
    # test_step_tokens_kernel_equals_sdpa_path: pass them here, on throw-away caches of their results
    for name in ("_KERNEL_OK", "_FUSED_OK"):
        monkeypatch.setattr(kern, name, {})
    for name in ("_self_check", "_fused_self_check"):
        monkeypatch.setattr(kern, name, lambda *a: True)
    calls = []
    real = kern._decode_attention_fused_impl
    monkeypatch.setattr(kern, "_decode_attention_fused_impl", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(attn_mod, "FUSED_DECODE_MAX_BATCH", B)   # the layer path at batch > 1 too
    outs = {}
    for path in ("fused", "unfused_kernel", "sdpa"):
        monkeypatch.setenv("HYBRIDIZE_KERNELS", "0" if path == "sdpa" else "1")
        if path == "unfused_kernel":
            monkeypatch.setattr(attn_mod, "decode_fused_ok", lambda *a: False)
        st = m.init_state(B, max_seqlen=window + 2 if window else 24)
        st.lengths.copy_(torch.tensor(prefix, device=DEVICE))
        g = torch.Generator().manual_seed(1)
        st.k.copy_(torch.randn(st.k.shape, generator=g).to(DEVICE, dtype))
        st.v.copy_(torch.randn(st.v.shape, generator=g).to(DEVICE, dtype))
        n_calls = len(calls)
        with torch.no_grad():
            ys = [m.step_tokens(x[:, :3], st, norm=norm)]
            st.lengths.sub_(2)                                   # speculative rollback: 1 of 3 accepted
            ys.append(m.step(x[:, 3], st, norm=norm)[:, None])
            ys.append(m.step_tokens(norm(x[:, 4:7]), st))
            ys.append(m.step(norm(x[:, 7]), st)[:, None])
        assert (len(calls) > n_calls) == (path == "fused"), "the fused op ran iff expected"
        outs[path] = (torch.cat(ys, 1), st)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for other in ("unfused_kernel", "sdpa"):
        torch.testing.assert_close(outs["fused"][0], outs[other][0], **tol)
        for f in ("k", "v"):
            torch.testing.assert_close(getattr(outs["fused"][1], f), getattr(outs[other][1], f), **tol)
        assert torch.equal(outs["fused"][1].lengths, outs[other][1].lengths)
    assert outs["fused"][1].lengths.tolist() == [p + 6 for p in prefix]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kernels", ["0", "1"])
def test_step_norm_argument(kernels, fused, monkeypatch):
    """step / step_tokens(x, state, norm=n) == the same on n(x) (the projection reads n(x); fused into the
    batch-1 GEMV where `_project` can), on the reference path and the fused kernel path, with the
    projections fused (one matmul) or separate."""
    from hybridize.layers.norm import RMSNorm

    monkeypatch.setenv("HYBRIDIZE_KERNELS", kernels)
    m = _layer(window=6).eval()
    if fused:
        m.fuse_projections_()
    assert m.step_fuses_norm
    norm = RMSNorm(32).to(DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 32, device=DEVICE)
    outs = []
    for with_norm in (True, False):
        st = m.init_state(2, max_seqlen=8)
        with torch.no_grad():
            if with_norm:
                ys = [m.step_tokens(x[:, :3], st, norm=norm), m.step(x[:, 3], st, norm=norm)[:, None]]
            else:
                ys = [m.step_tokens(norm(x[:, :3]), st), m.step(norm(x[:, 3]), st)[:, None]]
        outs.append((torch.cat(ys, 1), st))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for f in ("k", "v", "lengths"):
        torch.testing.assert_close(getattr(outs[0][1], f), getattr(outs[1][1], f), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ GPU only
# Real shapes: Llama-3-8B-like GQA (32 query / 8 kv heads, head_dim 128) and a 64-dim variant with
# 4 query heads per kv head, contexts of 4k-8k tokens with every row at its own length (one empty),
# T = 1 (decode) and T = 4 (speculative verification), full attention and a 4096-token sliding window on
# a wrapped ring buffer. Ground truth: the fp32 reference on the same (rounded) q, k, v.
# * fp32: exact-fp32 dots (input_precision="ieee"); only the order of the softmax sums over up to 8k keys
#   differs (~1e-6 relative): relative max error <= 1e-4.
# * bf16: q·k on tensor cores is exact for bf16 inputs (fp32 accumulation), the probabilities are rounded
#   to bf16 for the p·v dot (2^-9 relative per term, averaging out) and the output is rounded once
#   (2^-9): relative Frobenius error ~2e-3 expected, <= 1e-2 required.
_REAL = {
    "gqa32_8_p128_ctx8k": dict(B=8, H=32, Hkv=8, C=8192, P=128, window=0,
                               lens=[0, 1, 777, 4095, 4096, 6000, 8000, 8188]),
    "gqa16_4_p64_ctx4k": dict(B=16, H=16, Hkv=4, C=4096, P=64, window=0,
                              lens=[(i * 263) % 4092 for i in range(16)]),
    # ring buffer of window + T - 1 slots (what the speculative engine allocates), wrapped several times
    "window4096_ring": dict(B=8, H=32, Hkv=8, C=4099, P=128, window=4096,
                            lens=[0, 100, 4095, 4099, 5000, 8191, 12000, 20000]),
    # (row, kv head) programs >= SMs: the kernel's "many" launch (UNFUSED_TUNE warps_many / stages_many)
    "llama1b_b40_many": dict(B=40, H=32, Hkv=8, C=2112, P=64, window=0,
                             lens=[(i * 677) % 2100 for i in range(40)]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("case", list(_REAL))
def test_gpu_decode_real_shape(case, T, dtype):
    c = dict(_REAL[case])
    window, lens = c.pop("window"), c.pop("lens")
    q, k, v, n0 = _inputs(**c, T=T, lens=lens, dtype=dtype)
    scale = c["P"] ** -0.5
    got = kern.decode_attention(q, k, v, n0, window, scale)
    want = decode_attention_reference(q, k, v, n0, window, scale)
    fro, mx = _rel(got, want)
    if dtype == torch.float32:
        assert mx <= 1e-4, f"relative max error {mx:.3g} > 1e-4 (Frobenius {fro:.3g})"
    else:
        assert fro <= 1e-2, f"relative Frobenius error {fro:.3g} > 1e-2 (max {mx:.3g})"


_LAYER_REAL = (4096, 32, 8, 8192, [0, 1000, 4097, 6000])     # hidden, heads, kv heads, cache slots, lengths


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_step_tokens_kernel_equals_sdpa_real_shape(dtype, monkeypatch):
    """Attention.step_tokens at hidden 4096 (32/8 heads of 128), rows at 0 … ~6k cached tokens, kernel vs
    the SDPA path on the same cache; tolerances as above (SDPA's own bf16 error counts on both sides)."""
    hidden, heads, kv, C, lens = _LAYER_REAL
    torch.manual_seed(0)
    m = Attention(hidden, AttentionConfig(num_heads=heads, num_kv_heads=kv)).to(DEVICE, dtype).eval()
    B = len(lens)
    x = torch.randn(B, 4, hidden, device=DEVICE, dtype=dtype)
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("HYBRIDIZE_KERNELS", flag)
        st = m.init_state(B, max_seqlen=C)
        st.lengths.copy_(torch.tensor(lens, device=DEVICE))
        g = torch.Generator(DEVICE).manual_seed(1)
        st.k.copy_(torch.randn(st.k.shape, device=DEVICE, generator=g).to(dtype))
        st.v.copy_(torch.randn(st.v.shape, device=DEVICE, generator=g).to(dtype))
        with torch.no_grad():
            outs.append(torch.cat([m.step(x[:, 0], st)[:, None], m.step_tokens(x[:, 1:], st)], 1))
    fro, mx = _rel(*outs)
    if dtype == torch.float32:
        assert mx <= 1e-4, f"relative max error {mx:.3g} (Frobenius {fro:.3g})"
    else:
        assert fro <= 2e-2, f"relative Frobenius error {fro:.3g} (max {mx:.3g})"


# Fused op at real shapes: the 1.2B Llama decode (32 / 8 heads of 64, batch 1) at a short capacity (one
# split, no merge kernel) and a 4k one (split + merge), and the 8B-like batched shapes above; T = 1 and 4.
# Same tolerances as above on the output; the caches' new slots differ from PyTorch's RoPE by cos/sin
# rounding (fp32: ulps; bf16: at most one bf16 step), every other slot is untouched.
_FUSED_REAL = {
    "llama1b_b1_cap68": dict(B=1, H=32, Hkv=8, C=68, P=64, window=0, lens=[37]),
    "llama1b_b1_ctx4k": dict(B=1, H=32, Hkv=8, C=4164, P=64, window=0, lens=[4100]),
    "gqa32_8_p128_ctx8k": dict(B=8, H=32, Hkv=8, C=8192, P=128, window=0,
                               lens=[0, 1, 777, 4095, 4096, 6000, 8000, 8188]),
    "window4096_ring": dict(B=8, H=32, Hkv=8, C=4099, P=128, window=4096,
                            lens=[0, 100, 4095, 4099, 5000, 8191, 12000, 20000]),
    # (row, kv head) programs >= SMs: the kernel's "many" launch (UNFUSED_TUNE warps_many / stages_many)
    "llama1b_b40_many": dict(B=40, H=32, Hkv=8, C=2112, P=64, window=0,
                             lens=[(i * 677) % 2100 for i in range(40)]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("early", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("case", list(_FUSED_REAL))
def test_gpu_fused_decode_real_shape(case, T, dtype, early, monkeypatch):
    """early: lengths / RoPE tables before the PDL wait (`FUSED_TUNE["early"]`) or after."""
    monkeypatch.setitem(kern.FUSED_TUNE, "early", early)
    c = dict(_FUSED_REAL[case])
    window, lens = c.pop("window"), c.pop("lens")
    q, k, v, inv_freq, kc, vc, n = _fused_inputs(**c, T=T, lens=lens, rot=c["P"], dtype=dtype)
    inv_freq = (1.0 / (500000.0 ** (torch.arange(0, c["P"], 2).float() / c["P"]))).to(DEVICE)   # Llama 3
    scale = c["P"] ** -0.5
    ref = [kc.clone(), vc.clone(), n.clone()]
    got = kern.decode_attention_fused(q, k, v, inv_freq, kc, vc, n, window, scale)
    want = kern.decode_attention_fused_reference(q, k, v, inv_freq, *ref, window, scale)
    fro, mx = _rel(got, want)
    if dtype == torch.float32:
        assert mx <= 1e-4, f"relative max error {mx:.3g} > 1e-4 (Frobenius {fro:.3g})"
    else:
        assert fro <= 1e-2, f"relative Frobenius error {fro:.3g} > 1e-2 (max {mx:.3g})"
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(kc, ref[0], **tol)
    torch.testing.assert_close(vc, ref[1], rtol=0, atol=0)
    assert torch.equal(n, ref[2])
    assert not kern._COUNTERS.get(str(q.device), torch.zeros(1)).any()


@pytest.mark.gpu
@pytest.mark.parametrize("C", [68, 4164])
def test_gpu_fused_decode_cuda_graph_replays(C):
    """The fused op captured in a CUDA graph (as the engine runs it) and replayed 40 times, new q/k/v
    each time: outputs, caches and lengths as the reference stepped 40 times (the in-kernel lengths update
    and the per-row counters across replays; C = 68: one split, 4164: split + merge)."""
    B, H, Hkv, T, P = 2, 32, 8, 1, 64
    dtype = torch.bfloat16
    q, k, v, inv_freq, kc, vc, n = _fused_inputs(B, H, Hkv, T, C, P, [3, 20], P, dtype)
    ref = [kc.clone(), vc.clone(), n.clone()]
    kern.decode_attention_fused(q, k, v, inv_freq, kc.clone(), vc.clone(), n.clone(), 0, P ** -0.5)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kern.decode_attention_fused(q, k, v, inv_freq, kc, vc, n, 0, P ** -0.5)
    g = torch.Generator(device=DEVICE).manual_seed(3)
    for _ in range(40):
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device=DEVICE, generator=g).to(dtype))
        graph.replay()
        want = kern.decode_attention_fused_reference(q, k, v, inv_freq, *ref, 0, P ** -0.5)
        fro, mx = _rel(out, want)
        assert fro <= 1e-2, f"relative Frobenius error {fro:.3g} (max {mx:.3g})"
    assert n.tolist() == [3 + 40 * T, 20 + 40 * T] and torch.equal(n, ref[2])
    torch.testing.assert_close(kc, ref[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(vc, ref[1], rtol=0, atol=0)
    assert not kern._COUNTERS[str(q.device)].any()
