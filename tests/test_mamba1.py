"""Mamba1Mixer: parity with HF `MambaMixer`, state passing (whole == split == token by token), packed
documents, the mixing matrix, and the Mamba-in-the-Llama layout (shapes, head repetition, and its
linear-attention limit computed independently with HF's `repeat_kv`)."""
import math

import pytest
import torch
import torch.nn.functional as F

from hybridize.config import Mamba1Config
from hybridize.layers.mamba1 import Mamba1Mixer, Mamba1State
from hybridize.ops.conv1d import causal_conv1d

D_MODEL = 32
STD = Mamba1Config(d_state=8, d_inner=48, dt_rank=4)
# MIL: 4 query heads of 8, 2 kv heads (d_xb = 16), d_state = head size
MIL = Mamba1Config(d_state=8, d_inner=32, d_xb=16, num_heads=4, dt_rank=4)
CFGS = {"standard": STD, "mil": MIL}
TOL = dict(atol=1e-5, rtol=1e-4)


def _mixer(cfg, seed=0, bias=False):
    torch.manual_seed(seed)
    cfg = Mamba1Config(**{**cfg.__dict__, "bias": bias})
    m = Mamba1Mixer(D_MODEL, cfg)
    with torch.no_grad():  # non-trivial conv bias / D so that they are tested
        m.conv1d.bias.normal_(0, 0.3)
        m.D.normal_(1, 0.5)
    return m


def test_hf_mamba_parity():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba.modeling_mamba import MambaMixer
    hcfg = transformers.MambaConfig(hidden_size=D_MODEL, state_size=8, intermediate_size=48, conv_kernel=4,
                                    time_step_rank=4, num_hidden_layers=1, vocab_size=10)
    torch.manual_seed(0)
    hf = MambaMixer(hcfg, 0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = Mamba1Mixer(D_MODEL, STD)
    ours.load_state_dict(hf.state_dict(), strict=True)  # same names and shapes
    x = torch.randn(2, 23, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["standard", "mil"])
@pytest.mark.parametrize("L", [1, 63, 257])
def test_whole_split_step(layout, L):
    m = _mixer(CFGS[layout], bias=True)
    x = torch.randn(2, L, D_MODEL)
    with torch.no_grad():
        y, _ = m(x)
        y_full, st_full = m(x, output_state=True)
        torch.testing.assert_close(y_full, y)
        cut = max(L // 3, 1) if L > 1 else 1   # (L = 1: the second call is skipped)
        st = m.init_state(2)
        y1, st = m(x[:, :cut], st)
        if cut < L:
            y2, st = m(x[:, cut:], st)
            y1 = torch.cat([y1, y2], 1)
        torch.testing.assert_close(y1, y, **TOL)
        torch.testing.assert_close(st.ssm, st_full.ssm, **TOL)
        torch.testing.assert_close(st.conv, st_full.conv, **TOL)
        st2 = m.init_state(2)
        ys = torch.stack([m.step(x[:, t], st2) for t in range(L)], 1)
        torch.testing.assert_close(ys, y, **TOL)
        torch.testing.assert_close(st2.ssm, st_full.ssm, **TOL)
        torch.testing.assert_close(st2.conv, st_full.conv, **TOL)


@pytest.mark.parametrize("layout", ["standard", "mil"])
def test_state_layout(layout):
    m = _mixer(CFGS[layout])
    st = m.init_state(3)
    assert isinstance(st, Mamba1State)
    conv_w = 48 if layout == "standard" else 16
    E = 48 if layout == "standard" else 32
    assert st.conv.shape == (3, conv_w, 3) and st.ssm.shape == (3, E, 8)
    assert st.ssm.dtype == torch.float32
    assert st.state_bytes() == 3 * (conv_w * 3 + E * 8) * 4
    assert m.init_state(1, dtype=torch.bfloat16).ssm.dtype == torch.bfloat16
    # the state is advanced by reassignment (autograd-friendly), not in place
    ssm0 = st.ssm
    _, st2 = m(torch.randn(3, 5, D_MODEL), st)
    assert st2 is st and st.ssm is not ssm0 and float(ssm0.abs().sum()) == 0


def _docs():
    # row 0: documents of lengths 5, 9, 3; row 1: 11 then 6
    return torch.tensor([[0] * 5 + [1] * 9 + [2] * 3, [4] * 11 + [5] * 6])


@pytest.mark.parametrize("layout", ["standard", "mil"])
def test_packed_equals_separate(layout):
    m = _mixer(CFGS[layout], bias=True)
    seq_idx = _docs()
    x = torch.randn(2, 17, D_MODEL)
    w = torch.randn(2, 17, D_MODEL)
    y, _ = m(x, seq_idx=seq_idx)
    (y * w).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    loss, outs = 0.0, torch.zeros_like(y)
    for b in range(2):
        bounds = torch.nonzero(torch.diff(seq_idx[b]) != 0).flatten().add(1).tolist()
        for a, e in zip([0] + bounds, bounds + [17]):
            yd, _ = m(x[b:b + 1, a:e])
            outs[b:b + 1, a:e] = yd.detach()
            loss = loss + (yd * w[b:b + 1, a:e]).sum()
    loss.backward()
    torch.testing.assert_close(y.detach(), outs, **TOL)
    for n, p in m.named_parameters():
        torch.testing.assert_close(g_packed[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("layout", ["standard", "mil"])
def test_packed_with_state(layout):
    """A state passed in belongs to the first document only; the final state is the last document's."""
    m = _mixer(CFGS[layout])
    seq_idx = torch.tensor([[0] * 6 + [1] * 7])
    x = torch.randn(1, 13, D_MODEL)
    ctx = torch.randn(1, 4, D_MODEL)
    with torch.no_grad():
        _, st = m(ctx, output_state=True)
        y, st = m(x, st.clone(), seq_idx=seq_idx)
        y_a, _ = m(torch.cat([ctx, x[:, :6]], 1))
        y_b, st_b = m(x[:, 6:], output_state=True)
    torch.testing.assert_close(y[:, :6], y_a[:, 4:], **TOL)
    torch.testing.assert_close(y[:, 6:], y_b, **TOL)
    torch.testing.assert_close(st.ssm, st_b.ssm, **TOL)
    torch.testing.assert_close(st.conv, st_b.conv, **TOL)


@pytest.mark.parametrize("layout", ["standard", "mil"])
@pytest.mark.parametrize("packed", [False, True])
def test_mixing_matrix_reproduces_output(layout, packed):
    m = _mixer(CFGS[layout], bias=True)
    x = torch.randn(2, 17, D_MODEL)
    seq_idx = _docs() if packed else None
    with torch.no_grad():
        y, _ = m(x, seq_idx=seq_idx)
        M = m.mixing_matrix(x, seq_idx=seq_idx)
        u = m.mixing_input(x, seq_idx=seq_idx)
        assert M.shape == (2, m.d_inner, 17, 17)
        assert torch.equal(M.triu(1), torch.zeros_like(M))          # causal
        z = m.in_proj(x)[..., -m.d_inner:]
        pre_gate = torch.einsum("bcts,bsc->btc", M, u.float())
        torch.testing.assert_close(m.out_proj(pre_gate * F.silu(z)), y, **TOL)
        M0 = m.mixing_matrix(x, seq_idx=seq_idx, include_D=False)
        torch.testing.assert_close(M - M0, torch.diag_embed(m.D.expand(2, 17, -1).transpose(1, 2)))
        if packed:  # nothing crosses a document boundary
            assert float(M0[0, :, 5:, :5].abs().max()) == 0.0


def test_init():
    cfg = Mamba1Config(d_state=16, d_inner=512, dt_rank=8, dt_min=0.001, dt_max=0.1)
    torch.manual_seed(0)
    m = Mamba1Mixer(64, cfg)
    A = -torch.exp(m.A_log)
    torch.testing.assert_close(A, -torch.arange(1, 17, dtype=torch.float32).expand(512, -1))
    assert torch.equal(m.D.detach(), torch.ones(512))
    dt = F.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    # log-uniform: about half of the samples below the geometric mean
    frac = (dt < math.sqrt(0.001 * 0.1)).float().mean()
    assert 0.4 < frac < 0.6
    assert m.dt_proj.weight.abs().max() <= 8 ** -0.5
    assert m.dt_proj.bias._no_reinit and m.A_log._no_weight_decay
    # default widths
    m2 = Mamba1Mixer(40, Mamba1Config())
    assert m2.d_inner == 80 and m2.dt_rank == 3 and m2.x_proj.weight.shape == (3 + 32, 80)


def test_mil_shapes_and_repetition():
    m = _mixer(MIL)
    R, N, E, dxb, H, Hkv = 4, 8, 32, 16, 4, 2
    assert m.in_proj.weight.shape == (dxb + E, D_MODEL)
    assert m.x_proj.weight.shape == (R + Hkv * N + H * N, D_MODEL)
    assert m.conv1d.weight.shape == (dxb, 1, 4)
    assert m.dt_proj.weight.shape == (E, R) and m.A_log.shape == (E, N) and m.D.shape == (E,)
    assert m.out_proj.weight.shape == (D_MODEL, E)
    # repetition order: query head h reads kv head h // rep (HF repeat_kv), for x and for B
    hs = torch.randn(2, 5, D_MODEL)
    xc = torch.randn(2, 5, dxb)
    u, delta, Bm, Cm = m._ssm_inputs(hs, xc)
    dbc = m.x_proj(hs)
    Bk = dbc[..., R:R + Hkv * N].unflatten(-1, (Hkv, N))
    Cq = dbc[..., R + Hkv * N:].unflatten(-1, (H, N))
    for h in range(H):
        j = h // (H // Hkv)
        torch.testing.assert_close(u[..., h * 8:(h + 1) * 8], xc[..., j * 8:(j + 1) * 8])
        torch.testing.assert_close(Bm[..., h, :], Bk[..., j, :])
        torch.testing.assert_close(Cm[..., h, :], Cq[..., h, :])
    with pytest.raises(ValueError):
        Mamba1Mixer(D_MODEL, Mamba1Config(d_state=8, d_inner=32, d_xb=16))          # num_heads missing
    with pytest.raises(ValueError):
        Mamba1Mixer(D_MODEL, Mamba1Config(d_state=8, d_inner=32, d_xb=12, num_heads=4))


def test_mil_linear_attention_limit():
    """With A = 0, delta = 1, D = 0 and an identity conv, the MIL mixer is causal linear attention
    o_t = sum_{s<=t} (q_t · k_s) silu(v_s) per query head, with k/v heads repeated like HF GQA:
    V → in_proj x rows, K → x_proj B rows, Q → x_proj C rows, O → out_proj."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import repeat_kv
    m = _mixer(MIL)
    H, Hkv, P, L = 4, 2, 8, 11
    Wq, Wk, Wv = torch.randn(H * P, D_MODEL) * 0.2, torch.randn(Hkv * P, D_MODEL) * 0.2, torch.randn(Hkv * P, D_MODEL)
    with torch.no_grad():
        m.in_proj.weight[:Hkv * P] = Wv
        m.x_proj.weight[4:4 + Hkv * P] = Wk
        m.x_proj.weight[4 + Hkv * P:] = Wq
        m.A_log.fill_(-60.0)                       # A = -exp(-60) ≈ 0: no decay
        m.dt_proj.weight.zero_()
        m.dt_proj.bias.fill_(math.log(math.e - 1))  # softplus → delta = 1
        m.D.zero_()
        m.conv1d.weight.zero_()
        m.conv1d.weight[:, 0, -1] = 1.0             # identity conv
        m.conv1d.bias.zero_()
        x = torch.randn(2, L, D_MODEL)
        y, _ = m(x)
        q = (x @ Wq.T).view(2, L, H, P).transpose(1, 2)
        k = repeat_kv((x @ Wk.T).view(2, L, Hkv, P).transpose(1, 2), H // Hkv)
        v = repeat_kv(F.silu(x @ Wv.T).view(2, L, Hkv, P).transpose(1, 2), H // Hkv)
        scores = (q @ k.transpose(-1, -2)).tril()
        o = (scores @ v).transpose(1, 2).reshape(2, L, H * P)
        z = m.in_proj(x)[..., Hkv * P:]
        torch.testing.assert_close(y, m.out_proj(o * F.silu(z)), atol=1e-4, rtol=1e-4)


def test_gradients_finite_and_conv_reference():
    """Sanity: the mixer trains (finite grads everywhere) and its conv is the causal depthwise conv."""
    m = _mixer(STD, bias=True)
    x = torch.randn(2, 9, D_MODEL, requires_grad=True)
    y, _ = m(x)
    y.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    xs = m.in_proj(x)[..., :48].detach()
    ref = F.conv1d(xs.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=3, groups=48)[..., :9]
    torch.testing.assert_close(causal_conv1d(xs, m.conv1d.weight.squeeze(1), m.conv1d.bias),
                               ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
