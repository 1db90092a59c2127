"""RGLRUBlock (Griffin's recurrent block): parity with HF `RecurrentGemmaRecurrentBlock` (forward and cached
decode), state passing, packed documents, mixing matrix, the decay initialisation and the bounded
gradient of sqrt(1 - a^2)."""

import pytest
import torch
import torch.nn.functional as F

from hybridize.config import RGLRUConfig
from hybridize.layers.rglru import RGLRUBlock, RGLRUState, SqrtBoundDerivative

D_MODEL = 32
CFG = RGLRUConfig(num_heads=4)
TOL = dict(atol=1e-5, rtol=1e-4)


def _block(cfg=CFG, seed=0, hidden=D_MODEL):
    torch.manual_seed(seed)
    b = RGLRUBlock(hidden, cfg)
    with torch.no_grad():  # non-zero biases so that they are tested
        for n, p in b.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.3)
    return b


# ---------------------------------------------------------------- HF parity
def _hf_pair(hidden=D_MODEL, lru_width=D_MODEL, heads=4):
    transformers = pytest.importorskip("transformers")
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRecurrentBlock
    hcfg = transformers.RecurrentGemmaConfig(hidden_size=hidden, lru_width=lru_width, num_attention_heads=heads,
                                             conv1d_width=4, num_hidden_layers=2, vocab_size=64,
                                             intermediate_size=64)
    assert hcfg.hidden_activation == "gelu_pytorch_tanh"
    torch.manual_seed(1)
    hf = RecurrentGemmaRecurrentBlock(hcfg, 0)
    with torch.no_grad():
        for n, p in hf.named_parameters():   # HF allocates with torch.empty: fill every tensor
            p.copy_(torch.randn_like(p) * (0.3 if "weight" in n else 0.5))
    ours = RGLRUBlock(hidden, RGLRUConfig(lru_width=lru_width, num_heads=heads))
    ours.load_state_dict(hf.state_dict(), strict=True)   # same names and shapes
    return hf, ours


@pytest.mark.parametrize("lru_width", [32, 48])
def test_hf_forward_parity(lru_width):
    hf, ours = _hf_pair(lru_width=lru_width)
    L = 37
    x = torch.randn(2, L, D_MODEL)
    pos = torch.arange(L)[None].expand(2, L)
    with torch.no_grad():
        y_hf, _ = hf(x, pos, None, use_cache=False)
        y, _ = ours(x)
    torch.testing.assert_close(y, y_hf, atol=1e-4, rtol=1e-4)


def test_hf_packed_parity():
    """Our packed forward (seq_idx) equals HF run on each document separately (HF resets at
    position 0; its conv is not document-masked, so it cannot take packed rows itself)."""
    hf, ours = _hf_pair()
    seq_idx = torch.tensor([[0] * 7 + [1] * 10 + [2] * 3])
    x = torch.randn(1, 20, D_MODEL)
    with torch.no_grad():
        y, _ = ours(x, seq_idx=seq_idx)
        for a, e in ((0, 7), (7, 17), (17, 20)):
            y_hf, _ = hf(x[:, a:e], torch.arange(e - a)[None], None, use_cache=False)
            torch.testing.assert_close(y[:, a:e], y_hf, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prefill", [0, 1, 9])
def test_hf_cached_decode_parity(prefill):
    hf, ours = _hf_pair()
    L = 16
    x = torch.randn(2, L, D_MODEL)
    with torch.no_grad():
        st = ours.init_state(2)
        hf._setup_cache(2, x.device, x.dtype)
        if prefill:
            y_hf, _ = hf(x[:, :prefill], torch.arange(prefill)[None].expand(2, -1), None, use_cache=True)
            y, st = ours(x[:, :prefill], st)
            torch.testing.assert_close(y, y_hf, atol=1e-4, rtol=1e-4)
        for t in range(prefill, L):
            y_hf, _ = hf(x[:, t:t + 1], torch.full((2, 1), t), None, use_cache=True)
            y = ours.step(x[:, t], st)
            torch.testing.assert_close(y, y_hf[:, 0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(st.rnn, hf.rg_lru.recurrent_states, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- state passing
@pytest.mark.parametrize("L", [1, 63, 257])
def test_whole_split_step(L):
    b = _block()
    x = torch.randn(2, L, D_MODEL)
    with torch.no_grad():
        y, _ = b(x)
        y_full, st_full = b(x, output_state=True)
        torch.testing.assert_close(y_full, y)
        assert st_full.lengths.tolist() == [L, L]
        cut = max(L // 3, 1)
        st = b.init_state(2)
        y1, st = b(x[:, :cut], st)
        if cut < L:
            y2, st = b(x[:, cut:], st)
            y1 = torch.cat([y1, y2], 1)
        torch.testing.assert_close(y1, y, **TOL)
        torch.testing.assert_close(st.rnn, st_full.rnn, **TOL)
        torch.testing.assert_close(st.conv, st_full.conv, **TOL)
        st2 = b.init_state(2)
        ys = torch.stack([b.step(x[:, t], st2) for t in range(L)], 1)
        torch.testing.assert_close(ys, y, **TOL)
        torch.testing.assert_close(st2.rnn, st_full.rnn, **TOL)
        assert st2.lengths.tolist() == [L, L]


def test_fresh_start_uses_multiplier_one():
    """t = 0 of a fresh sequence is a document start (input multiplier 1, as HF's position 0); t = 0 of a
    continued sequence is not."""
    b = _block()
    x = torch.randn(1, 1, D_MODEL)
    with torch.no_grad():
        xc = b.linear_x(x)
        xc = xc * b.conv_1d.weight[:, 0, -1] + b.conv_1d.bias
        i = torch.sigmoid(torch.einsum("blhi,hij->blhj", xc.view(1, 1, 4, 8), b.rg_lru.input_gate_weight)
                          + b.rg_lru.input_gate_bias).flatten(-2)
        y_expected = b.linear_out((i * xc) * F.gelu(b.linear_y(x), approximate="tanh"))
        torch.testing.assert_close(b(x)[0], y_expected, **TOL)
        st = b.init_state(1)
        st.lengths.fill_(5)   # a continued (zero) state: multiplier sqrt(1 - a^2) < 1
        y_cont, _ = b(x, st)
        assert not torch.allclose(y_cont, y_expected, atol=1e-4)


def test_state_layout():
    b = _block(RGLRUConfig(num_heads=4, lru_width=48))
    st = b.init_state(3)
    assert isinstance(st, RGLRUState)
    assert st.conv.shape == (3, 48, 3) and st.rnn.shape == (3, 48) and st.lengths.shape == (3,)
    assert st.rnn.dtype == torch.float32
    assert b.init_state(1, dtype=torch.bfloat16).rnn.dtype == torch.bfloat16
    rnn0 = st.rnn
    _, st2 = b(torch.randn(3, 5, D_MODEL), st)
    assert st2 is st and st.rnn is not rnn0 and float(rnn0.abs().sum()) == 0


def _docs():
    return torch.tensor([[0] * 5 + [1] * 9 + [2] * 3, [4] * 11 + [5] * 6])


def test_packed_equals_separate():
    b = _block()
    seq_idx = _docs()
    x = torch.randn(2, 17, D_MODEL)
    w = torch.randn(2, 17, D_MODEL)
    y, _ = b(x, seq_idx=seq_idx)
    (y * w).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in b.named_parameters()}
    b.zero_grad()
    loss, outs = 0.0, torch.zeros_like(y)
    for r in range(2):
        bounds = torch.nonzero(torch.diff(seq_idx[r]) != 0).flatten().add(1).tolist()
        for a, e in zip([0] + bounds, bounds + [17]):
            yd, _ = b(x[r:r + 1, a:e])
            outs[r:r + 1, a:e] = yd.detach()
            loss = loss + (yd * w[r:r + 1, a:e]).sum()
    loss.backward()
    torch.testing.assert_close(y.detach(), outs, **TOL)
    for n, p in b.named_parameters():
        torch.testing.assert_close(g_packed[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_packed_with_state():
    b = _block()
    seq_idx = torch.tensor([[0] * 6 + [1] * 7])
    x, ctx = torch.randn(1, 13, D_MODEL), torch.randn(1, 4, D_MODEL)
    with torch.no_grad():
        _, st = b(ctx, output_state=True)
        y, st = b(x, st.clone(), seq_idx=seq_idx)
        y_a, _ = b(torch.cat([ctx, x[:, :6]], 1))
        y_b, st_b = b(x[:, 6:], output_state=True)
    torch.testing.assert_close(y[:, :6], y_a[:, 4:], **TOL)
    torch.testing.assert_close(y[:, 6:], y_b, **TOL)
    torch.testing.assert_close(st.rnn, st_b.rnn, **TOL)
    torch.testing.assert_close(st.conv, st_b.conv, **TOL)
    assert st.lengths.tolist() == [7]
    # decoding continues the last document exactly like a separate run
    x_next = torch.randn(1, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(b.step(x_next, st), b.step(x_next, st_b), **TOL)


# ---------------------------------------------------------------- mixing matrix
@pytest.mark.parametrize("packed", [False, True])
def test_mixing_matrix_reproduces_output(packed):
    b = _block()
    x = torch.randn(2, 17, D_MODEL)
    seq_idx = _docs() if packed else None
    with torch.no_grad():
        y, _ = b(x, seq_idx=seq_idx)
        M = b.mixing_matrix(x, seq_idx=seq_idx)
        v = b.mixing_input(x, seq_idx=seq_idx)
        assert M.shape == (2, 32, 17, 17)
        assert torch.equal(M.triu(1), torch.zeros_like(M))
        h = torch.einsum("bcts,bsc->btc", M, v)
        y_m = b.linear_out(h * F.gelu(b.linear_y(x), approximate="tanh"))
        torch.testing.assert_close(y_m, y, **TOL)
        # diagonal = input multiplier: 1 at document starts
        starts = [0] if not packed else [0, 5, 14]
        for s in starts:
            torch.testing.assert_close(M[0, :, s, s], torch.ones(32))
        if packed:
            assert float(M[0, :, 5:, :5].abs().max()) == 0.0


# ---------------------------------------------------------------- init and gradients
def test_decay_init_range():
    cfg = RGLRUConfig(num_heads=4, lru_width=4096)
    torch.manual_seed(0)
    b = RGLRUBlock(64, cfg)
    a = b.rg_lru.base_decay().detach()
    assert a.min() >= 0.9 - 1e-6 and a.max() <= 0.999 + 1e-6
    assert a.min() < 0.905 and a.max() > 0.995          # spans the range
    # uniform in a^2 (area of the ring): median of a^2 at the midpoint
    assert abs(float((a ** 2).median()) - (0.81 + 0.998001) / 2) < 0.02
    # decay at r = 1 (recurrent gate saturated) is a^c, checked through the layer's own gates
    with torch.no_grad():
        b.rg_lru.recurrent_gate_weight.zero_()
        b.rg_lru.recurrent_gate_bias.fill_(50.0)
        log_a, _, _ = b.rg_lru.gates(torch.randn(1, 3, 4096), torch.zeros(1, 3, dtype=torch.bool))
    torch.testing.assert_close(torch.exp(log_a[0, 0]), a ** 8, atol=1e-6, rtol=1e-5)
    assert torch.exp(log_a).min() >= 0.9 ** 8 - 1e-6 and torch.exp(log_a).max() <= 0.999 ** 8 + 1e-6
    # the config's range is honoured
    b2 = RGLRUBlock(16, RGLRUConfig(num_heads=2, min_decay=0.5, max_decay=0.6))
    a2 = b2.rg_lru.base_decay().detach()
    assert a2.min() >= 0.5 - 1e-6 and a2.max() <= 0.6 + 1e-6


def test_sqrt_bound_derivative():
    x = torch.tensor([0.25, 1e-2, 0.0, 1e-9], requires_grad=True)
    y = SqrtBoundDerivative.apply(x)
    torch.testing.assert_close(y, torch.sqrt(x.detach()))
    y.sum().backward()
    xr = torch.tensor([0.25, 1e-2], requires_grad=True)
    torch.sqrt(xr).sum().backward()
    torch.testing.assert_close(x.grad[:2], xr.grad)               # exact away from 0
    torch.testing.assert_close(x.grad[2:], torch.full((2,), 1000.0))  # clipped at 1000 near 0


def test_bounded_gradient_as_decay_goes_to_one():
    b = _block()
    with torch.no_grad():
        b.rg_lru.recurrent_param.fill_(-40.0)   # softplus ≈ 4e-18: a = 1 exactly in fp32, 1 - a² = 0
    x = torch.randn(2, 8, D_MODEL)
    y, _ = b(x, output_state=True)
    y.square().mean().backward()
    for n, p in b.named_parameters():
        assert torch.isfinite(p.grad).all(), n
    assert b.rg_lru.recurrent_param.grad.abs().sum() > 0
    # the plain sqrt has an infinite derivative at the same point
    u = torch.zeros(1, requires_grad=True)
    torch.sqrt(u).sum().backward()
    assert not torch.isfinite(u.grad).all()
