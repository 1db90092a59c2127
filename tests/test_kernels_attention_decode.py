"""Split-K decode-attention Triton kernel (`hybridize.ops.attention.triton_decode`) vs the fp32 reference
`decode_attention_reference`: GQA (query heads sharing a kv head as extra query rows), T = 1 and T > 1
query tokens per row, per-row lengths (an empty row, a full one, rows at different positions), a
wrapped ring buffer with a sliding window, head dims that are not powers of two, several splits and
several query-row blocks; the dispatch (`decode_kernel_ok`) and `Attention.step_tokens` with the kernel
vs its SDPA path.

Without CUDA the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported) on small shapes; `gpu` tests use real shapes (GQA 32/8 heads, head_dim 128, context 4k-8k).
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
