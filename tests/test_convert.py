"""Conversion: layer selection and its errors, the attention initialisations (tensor by tensor, and as
functions: MIL Mamba-2 ≡ linear attention, discrete Mamba-2 ≡ decayed q·k, RG-LRU ≡ ALiBi-EMA of the
values), shared weights copied, save / load / generate before any training."""
import math

import pytest
import torch
import torch.nn.functional as F

import hybridize as hz
from hybridize.config import AttentionConfig, HybridConfig, MLPConfig
from hybridize.convert import (
    ConversionError, alibi_slopes, attention_layers_for_fraction, convert, resolve_attention_layers,
)
from hybridize.distill.stages import generate_ids
from hybridize.model import HybridLM

H, HKV, P, D = 4, 2, 8, 32
MIXERS = ["mamba2", "mamba1", "rglru", "discrete_mamba2"]


def teacher(n_layers=4, qkv_bias=False, seed=0):
    torch.manual_seed(seed)
    cfg = HybridConfig(vocab_size=64, hidden_size=D, layer_pattern=["attention"] * n_layers,
                       mlp=MLPConfig(48),
                       attention=AttentionConfig(num_heads=H, num_kv_heads=HKV, head_dim=P, qkv_bias=qkv_bias,
                                                 o_bias=qkv_bias),
                       initializer_range=0.2, name="t")
    model = HybridLM(cfg).eval()
    if qkv_bias:   # HF init zeroes biases: make them visible
        with torch.no_grad():
            for blk in model.layers:
                for lin in (blk.mixer.q_proj, blk.mixer.k_proj, blk.mixer.v_proj, blk.mixer.o_proj):
                    lin.bias.normal_()
    return model


# ---------------------------------------------------------------------------- layer selection
def test_fraction_layers_interleave_like_the_paper_and_nest():
    assert attention_layers_for_fraction(8, 0.5) == [1, 3, 5, 7]
    assert attention_layers_for_fraction(8, 0.25) == [3, 7]
    assert attention_layers_for_fraction(8, 0.125) == [7]
    assert attention_layers_for_fraction(8, 0.0) == []
    assert attention_layers_for_fraction(8, 1.0) == list(range(8))
    assert attention_layers_for_fraction(8, 0.75) == [1, 2, 3, 5, 6, 7]     # MIL: SSM at 0, 4
    assert attention_layers_for_fraction(32, 0.5) == list(range(1, 32, 2))   # MIL's llama3 0.5 config
    chain = [set(attention_layers_for_fraction(16, f)) for f in (1.0, 0.875, 0.75, 0.5, 0.25, 0.125, 0.0)]
    assert all(b < a for a, b in zip(chain, chain[1:]))


@pytest.mark.parametrize("n, f, match", [(4, 0.3, "not supported"), (6, 0.25, "not representable"),
                                          (4, 0.125, "not representable")])
def test_fraction_errors(n, f, match):
    with pytest.raises(ConversionError, match=match):
        attention_layers_for_fraction(n, f)


def test_explicit_layers_override_and_errors():
    assert resolve_attention_layers(4, [2, 0]) == [0, 2]
    with pytest.raises(ConversionError, match="out of range.*4 layers"):
        resolve_attention_layers(4, [1, 4])
    with pytest.raises(ConversionError, match="duplicates"):
        resolve_attention_layers(4, [1, 1])
    with pytest.raises(ConversionError, match="not both"):
        resolve_attention_layers(4, [1], 0.5)
    t = teacher()
    s = convert(t, "mamba2", attention_layers=[0])
    assert s.layer_pattern == ["attention", "mamba2", "mamba2", "mamba2"]


def test_convert_errors():
    t = teacher()
    with pytest.raises(ConversionError, match="choose one of"):
        convert(t, "transformer")
    with pytest.raises(ConversionError, match="init"):
        convert(t, "mamba2", init="zeros")
    with pytest.raises(ConversionError, match="HybridLM"):
        convert(torch.nn.Linear(2, 2))
    hybrid = convert(t, "mamba2", attention_fraction=0.5)            # attention at 1, 3
    with pytest.raises(ConversionError, match=r"layers \[0\] are to keep attention"):
        convert(hybrid, "mamba2", attention_layers=[0, 1])
    with pytest.raises(ConversionError, match="cannot become rglru"):
        convert(hybrid, "rglru", attention_fraction=0.25)


# ---------------------------------------------------------------------------- copies
def _shared_equal(t, s):
    torch.testing.assert_close(s.embed_tokens.weight, t.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(s.lm_head.weight, t.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(s.norm.weight, t.norm.weight, rtol=0, atol=0)
    for tb, sb in zip(t.layers, s.layers):
        for name, p in tb.mlp.state_dict().items():
            torch.testing.assert_close(sb.mlp.state_dict()[name], p, rtol=0, atol=0)
        torch.testing.assert_close(sb.mixer_norm.weight, tb.mixer_norm.weight, rtol=0, atol=0)
        torch.testing.assert_close(sb.mlp_norm.weight, tb.mlp_norm.weight, rtol=0, atol=0)
        if sb.kind == "attention":
            for name, p in tb.mixer.state_dict().items():
                torch.testing.assert_close(sb.mixer.state_dict()[name], p, rtol=0, atol=0)


def rep_rows(w, rep=H // HKV):
    """kv-head rows (HKV*P, …) → query-head rows (H*P, …), head h ← kv head h // rep."""
    return w.reshape(HKV, P, *w.shape[1:]).repeat_interleave(rep, 0).reshape(H * P, *w.shape[1:])


@pytest.mark.parametrize("bias", [False, True])
def test_mamba2_mil_copies(bias):
    t = teacher(qkv_bias=bias)
    s = convert(t, "mamba2", attention_fraction=0.5)
    _shared_equal(t, s)
    for i in (0, 2):
        a, m = t.layers[i].mixer, s.layers[i].mixer
        assert (m.d_inner, m.d_xb, m.nheads, m.headdim, m.d_state, m.ngroups) == (H * P, HKV * P, H, P, P, H)
        W = m.in_proj.weight
        d_in, d_xb = H * P, HKV * P
        assert torch.equal(W[d_in: d_in + d_xb], a.v_proj.weight)
        assert torch.equal(W[d_in + d_xb: d_in + 2 * d_xb], a.k_proj.weight)
        assert torch.equal(W[d_in + 2 * d_xb: 2 * d_in + 2 * d_xb], a.q_proj.weight)
        assert torch.equal(m.out_proj.weight, a.o_proj.weight)
        if bias:
            b = m.in_proj.bias
            assert torch.equal(b[d_in: d_in + d_xb], a.v_proj.bias)
            assert torch.equal(b[d_in + 2 * d_xb: 2 * d_in + 2 * d_xb], a.q_proj.bias)
            assert torch.equal(b[:d_in], torch.zeros(d_in))                     # z rows
            assert torch.equal(m.out_proj.bias, a.o_proj.bias)
        else:
            assert m.in_proj.bias is None
        A = torch.exp(m.A_log)
        assert ((A >= 1) & (A <= 16)).all() and torch.equal(m.D, torch.ones(H))
        dt = F.softplus(m.dt_bias)
        assert ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()


def test_mamba2_mil_is_linear_attention_with_teacher_qkv():
    """identity conv, A → 0, dt = 1, D = 0: the SSD is causal linear attention with silu features of the
    teacher's own Q, K, V (GQA: kv head j serves query heads j*rep …)."""
    t = teacher()
    s = convert(t, "mamba2", attention_fraction=0.5, conv_init="identity")
    m, a = s.layers[0].mixer, t.layers[0].mixer
    with torch.no_grad():
        m.A_log.fill_(-40.0)                                         # A = -exp(-40) ≈ 0: no decay
        m.dt_bias.fill_(math.log(math.e - 1))                        # softplus⁻¹(1)
        m.in_proj.weight[-H:] = 0.0                                   # dt rows → dt = 1 exactly
        m.D.zero_()
    x = torch.randn(2, 11, D)
    M = m.mixing_matrix(x)                                            # (B, H, L, L)
    q = F.silu(a.q_proj(x)).view(2, 11, H, P).transpose(1, 2)
    k = F.silu(a.k_proj(x)).view(2, 11, HKV, P).transpose(1, 2).repeat_interleave(H // HKV, 1)
    ref = (q @ k.transpose(-1, -2)).tril()
    torch.testing.assert_close(M, ref, atol=1e-5, rtol=1e-5)
    v = m._ssm_inputs(x).x                                            # (B, L, H, P) post-conv values
    v_ref = F.silu(a.v_proj(x)).view(2, 11, HKV, P).repeat_interleave(H // HKV, 2)
    torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=1e-6)


def test_mamba2_default_conv_is_not_identity_but_random_init_differs():
    t = teacher()
    s = convert(t, "mamba2", conv_init="default")
    assert not torch.equal(s.layers[0].mixer.conv1d.weight[:, 0, -1], torch.ones(s.layers[0].mixer.conv_dim))
    r = convert(t, "mamba2", init="random")
    d_in = H * P
    x_rows = r.layers[0].mixer.in_proj.weight[d_in: d_in + HKV * P]
    assert not torch.equal(x_rows, t.layers[0].mixer.v_proj.weight)
    _shared_equal(t, r)                        # shared weights are copied whatever the mixer init


def test_mamba1_mil_copies():
    t = teacher(qkv_bias=True)
    s = convert(t, "mamba1", attention_fraction=0.5)
    _shared_equal(t, s)
    m, a = s.layers[0].mixer, t.layers[0].mixer
    R, Nb = m.dt_rank, HKV * P
    assert torch.equal(m.in_proj.weight[:HKV * P], a.v_proj.weight)
    assert torch.equal(m.in_proj.bias[:HKV * P], a.v_proj.bias)
    assert torch.equal(m.x_proj.weight[R: R + Nb], a.k_proj.weight)
    assert torch.equal(m.x_proj.weight[R + Nb:], a.q_proj.weight)
    assert torch.equal(m.x_proj.bias[R + Nb:], a.q_proj.bias)
    assert torch.equal(m.x_proj.bias[:R], torch.zeros(R))
    assert torch.equal(m.out_proj.weight, a.o_proj.weight)
    assert torch.equal(m.A_log, torch.log(torch.arange(1, P + 1.0)).expand(H * P, P))   # S4D-real, as MIL


def test_discrete_mamba2_is_decayed_qk_attention():
    """Copies (B and x repeated to per-query-head rows) and the function: with identity conv and the
    decay logits a = 0 (decay ½ per step), M[t, s] = (q_t·k_s) 2^-(t-s) + D on the diagonal."""
    t = teacher()
    s = convert(t, "discrete_mamba2", attention_fraction=0.0, conv_init="identity")
    assert s.layer_pattern == ["discrete_mamba2"] * 4
    m, a = s.layers[1].mixer, t.layers[1].mixer
    GN = H * P
    W = m.in_proj.weight
    assert torch.equal(W[:H * P], rep_rows(a.v_proj.weight))
    assert torch.equal(W[H * P: H * P + GN], rep_rows(a.k_proj.weight))
    assert torch.equal(W[H * P + GN: H * P + 2 * GN], a.q_proj.weight)
    assert torch.equal(m.out_proj.weight, a.o_proj.weight)
    with torch.no_grad():
        W[-H:] = 0.0                                                  # a rows → decay exp(-softplus 0) = ½
    x = torch.randn(1, 9, D)
    q = a.q_proj(x).view(1, 9, H, P).transpose(1, 2)
    k = rep_rows(a.k_proj.weight) @ x[0].T                            # (H*P, L)
    k = k.view(H, P, 9).permute(0, 2, 1)[None]
    dist = (torch.arange(9)[:, None] - torch.arange(9)[None]).clamp(min=0).float()
    ref = (q @ k.transpose(-1, -2)) * 0.5 ** dist
    ref = ref.tril() + torch.diag_embed(m.D.view(1, H, 1).expand(1, H, 9))
    torch.testing.assert_close(m.mixing_matrix(x), ref, atol=1e-5, rtol=1e-5)


def test_rglru_init_is_alibi_ema_of_values():
    """The converted Griffin block computes O · EMA_h(V x) per head with decay a_h = exp(-m_h) (ALiBi
    slopes) and convex weights (1 - a_h); the first token enters scaled by the input gate."""
    t = teacher()
    s = convert(t, "rglru", attention_fraction=0.5)
    blk, a = s.layers[0].mixer, t.layers[0].mixer
    x = torch.randn(2, 12, D)
    y, _ = blk(x)
    v = F.linear(x, rep_rows(a.v_proj.weight))                        # (B, L, H*P)
    decay = torch.exp(-alibi_slopes(H)).float().repeat_interleave(P)
    i0 = torch.sqrt((1 - decay) / (1 + decay))
    h = i0 * v[:, 0]
    hs = [h]
    for step in range(1, 12):
        h = decay * h + (1 - decay) * v[:, step]
        hs.append(h)
    ref = a.o_proj(torch.stack(hs, 1))
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    assert math.isclose(float(decay.min()), math.exp(-2 ** (-8 / H)), rel_tol=1e-6)   # ALiBi m_1 = 2^(-8/H)
    assert math.isclose(float(decay.max()), math.exp(-2 ** -8), rel_tol=1e-6)


# ---------------------------------------------------------------------------- model-level
@pytest.mark.parametrize("mixer", MIXERS)
def test_converted_model_saves_loads_generates(mixer, tmp_path):
    t = teacher()
    s = convert(t, mixer, attention_fraction=0.5)
    s.save_pretrained(str(tmp_path))
    back = hz.load(str(tmp_path)).eval()
    assert back.layer_pattern == s.layer_pattern
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, s(ids).logits, rtol=0, atol=0)
        # cached decode of the converted model matches its full forward
        new = generate_ids(back, [ids[0].tolist(), ids[1, :7].tolist()], 5)
        full = back(torch.tensor([ids[0].tolist() + new[0]])).logits[0, 12:-1].argmax(-1)
    assert new[0] == full.tolist() and len(new[1]) == 5


def test_conversion_is_deterministic_and_leaves_teacher_and_rng_alone():
    t = teacher()
    before = {k: v.clone() for k, v in t.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    s1 = convert(t, "mamba2", seed=7)
    assert torch.equal(torch.rand(3), expected_next)                  # global RNG untouched
    s2 = convert(t, "mamba2", seed=7)
    s3 = convert(t, "mamba2", seed=8)
    for k, v in s1.state_dict().items():
        assert torch.equal(v, s2.state_dict()[k]), k
    assert not torch.equal(s1.layers[0].mixer.A_log, s3.layers[0].mixer.A_log)
    for k, v in t.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_progressive_conversion_keeps_converted_layers():
    t = teacher(n_layers=8)
    s50 = convert(t, "mamba2", attention_fraction=0.5)
    with torch.no_grad():
        s50.layers[0].mixer.A_log.add_(1.0)                          # "trained"
    s25 = convert(s50, "mamba2", attention_fraction=0.25)
    assert s25.layer_pattern == ["mamba2", "mamba2", "mamba2", "attention"] * 2
    assert torch.equal(s25.layers[0].mixer.A_log, s50.layers[0].mixer.A_log)   # kept as trained
    d_in = H * P
    x_rows = s25.layers[1].mixer.in_proj.weight[d_in: d_in + HKV * P]
    assert torch.equal(x_rows, t.layers[1].mixer.v_proj.weight)
    assert s25.cfg.mamba2 == s50.cfg.mamba2
