"""RoPE vs transformers' own implementations (Llama default/linear/llama3/yarn, RecurrentGemma partial
rotary, GPT-J interleaved) and vs first principles (rotation angles, relative-position property)."""
import math

import pytest
import torch

from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from hybridize.config import AttentionConfig
from hybridize.layers.rotary import RotaryEmbedding


def _positions(B=2, L=37, big=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hi = 200_000 if big else 4096
    return torch.randint(0, hi, (B, L), generator=g)


def _hf_llama(rope_parameters, head_dim=64, max_pos=131072):
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=max_pos, rope_parameters=dict(rope_parameters))
    return modeling_llama.LlamaRotaryEmbedding(cfg)


LLAMA_CASES = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, {}),
    "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, {}),
    "llama3": ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, {}),
    "yarn": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
              "original_max_position_embeddings": 4096}, {}),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_matches_hf_llama_rotary(case):
    hf_params, _ = LLAMA_CASES[case]
    head_dim = 64
    hf = _hf_llama(hf_params, head_dim)
    # our config takes the HF dict as rope_scaling (rope_theta repeated consistently)
    cfg = AttentionConfig(num_heads=4, head_dim=head_dim, rope_theta=hf_params["rope_theta"],
                          rope_scaling=dict(hf_params), max_position_embeddings=131072)
    ours = RotaryEmbedding(head_dim, cfg)
    torch.testing.assert_close(ours.inv_freq, hf.inv_freq, rtol=0, atol=0)
    assert ours.attention_scaling == pytest.approx(hf.attention_scaling)

    pos = _positions(big=True)
    x = torch.randn(2, 37, head_dim)
    cos_hf, sin_hf = hf(x, pos)
    cos, sin = ours(pos)
    torch.testing.assert_close(cos, cos_hf, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_hf, rtol=0, atol=1e-6)

    q, k = torch.randn(2, 4, 37, head_dim), torch.randn(2, 2, 37, head_dim)
    q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    torch.testing.assert_close(ours.apply_rotary(q, cos, sin), q_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.apply_rotary(k, cos, sin), k_hf, rtol=1e-5, atol=1e-5)


def test_llama3_scaling_actually_changes_frequencies():
    """Guard against a vacuous comparison: llama3 must differ from the unscaled frequencies."""
    base = RotaryEmbedding(64, AttentionConfig(rope_theta=500000.0))
    p = dict(LLAMA_CASES["llama3"][0])
    scaled = RotaryEmbedding(64, AttentionConfig(rope_theta=500000.0, rope_scaling=p))
    assert torch.equal(scaled.inv_freq[:4], base.inv_freq[:4])          # high frequencies kept
    torch.testing.assert_close(scaled.inv_freq[-1], base.inv_freq[-1] / 8)  # low ones ÷ factor


def test_old_style_type_key_and_validation():
    a = RotaryEmbedding(32, AttentionConfig(rope_scaling={"type": "linear", "factor": 2.0}))
    b = RotaryEmbedding(32, AttentionConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert torch.equal(a.inv_freq, b.inv_freq)
    with pytest.raises(ValueError, match="rope_theta"):
        RotaryEmbedding(32, AttentionConfig(rope_theta=10000.0, rope_scaling={"rope_type": "default",
                                                                             "rope_theta": 500000.0}))
    with pytest.raises(ValueError, match="dynamic"):
        RotaryEmbedding(32, AttentionConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError):
        RotaryEmbedding(10, AttentionConfig(partial_rotary_factor=0.5))   # rotary width 5 is odd


def test_partial_rotary_matches_recurrent_gemma():
    from transformers import RecurrentGemmaConfig
    from transformers.models.recurrent_gemma import modeling_recurrent_gemma as rg

    head_dim = 32
    hf_cfg = RecurrentGemmaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                  num_hidden_layers=2, vocab_size=32)
    assert hf_cfg.rope_parameters["partial_rotary_factor"] == 0.5
    hf = rg.RecurrentGemmaRotaryEmbedding(hf_cfg)
    cfg = AttentionConfig(num_heads=4, head_dim=head_dim, partial_rotary_factor=0.5,
                          rope_scaling=dict(hf_cfg.rope_parameters))
    ours = RotaryEmbedding(head_dim, cfg)
    assert ours.rot_dim == 16
    torch.testing.assert_close(ours.inv_freq, hf.inv_freq, rtol=0, atol=0)

    pos = _positions()
    q, k = torch.randn(2, 4, 37, head_dim), torch.randn(2, 1, 37, head_dim)
    cos_hf, sin_hf = hf(q, pos)
    q_hf, k_hf = rg.apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    cos, sin = ours(pos)
    q_ours, k_ours = ours.apply_rotary(q, cos, sin), ours.apply_rotary(k, cos, sin)
    torch.testing.assert_close(q_ours, q_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_ours, k_hf, rtol=1e-5, atol=1e-5)
    assert torch.equal(q_ours[..., 16:], q[..., 16:])                     # second half passes through


def test_interleaved_matches_gptj():
    from transformers.models.gptj import modeling_gptj as gptj

    head_dim, rot = 32, 16
    cfg = AttentionConfig(partial_rotary_factor=rot / head_dim, rope_interleaved=True)
    ours = RotaryEmbedding(head_dim, cfg)
    pos = _positions()
    B, L = pos.shape
    table = gptj.create_sinusoidal_positions(8192, rot)                 # (num_pos, rot): [sin | cos]
    sincos = table[pos]
    sin, cos = sincos[..., : rot // 2], sincos[..., rot // 2:]
    x = torch.randn(B, L, 4, head_dim)                                  # GPT-J layout (B, L, H, P)
    ref = torch.cat([gptj.apply_rotary_pos_emb(x[..., :rot], sin, cos), x[..., rot:]], dim=-1)
    c, s = ours(pos)
    got = ours.apply_rotary(x.transpose(1, 2), c, s).transpose(1, 2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_first_principles_rotation(interleaved):
    """Each rotated pair is turned by angle pos * theta^(-2i/R) (float64 reference)."""
    head_dim, theta = 16, 100.0
    ours = RotaryEmbedding(head_dim, AttentionConfig(rope_theta=theta, rope_interleaved=interleaved))
    pos = torch.tensor([[0, 1, 7, 1000]])
    x = torch.randn(1, 1, 4, head_dim, dtype=torch.float64)
    c, s = ours(pos)
    got = ours.apply_rotary(x.float(), c, s).double()
    half = head_dim // 2
    pairs = [(2 * i, 2 * i + 1) if interleaved else (i, i + half) for i in range(half)]
    ref = x.clone()
    for i, (a, b) in enumerate(pairs):
        ang = pos[0].double() * theta ** (-2 * i / head_dim)
        ref[0, 0, :, a] = x[0, 0, :, a] * torch.cos(ang) - x[0, 0, :, b] * torch.sin(ang)
        ref[0, 0, :, b] = x[0, 0, :, b] * torch.cos(ang) + x[0, 0, :, a] * torch.sin(ang)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_relative_position_property():
    """<rot(q, m), rot(k, n)> depends only on m - n."""
    ours = RotaryEmbedding(32, AttentionConfig(partial_rotary_factor=0.5))
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def dot(m, n):
        cq, sq = ours(torch.tensor([[m]]))
        ck, sk = ours(torch.tensor([[n]]))
        return (ours.apply_rotary(q, cq, sq) * ours.apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(dot(10, 3), dot(107, 100), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dot(10, 3), dot(10, 4), atol=1e-3)


def test_dtype_cast_keeps_fp32_frequencies():
    cfg = AttentionConfig(rope_theta=500000.0, rope_scaling=dict(LLAMA_CASES["llama3"][0]))
    ref = RotaryEmbedding(64, cfg)
    m = RotaryEmbedding(64, cfg).to(torch.bfloat16)
    assert m.inv_freq.dtype == torch.float32
    assert torch.equal(m.inv_freq, ref.inv_freq)
    x = torch.randn(1, 2, 3, 64, dtype=torch.bfloat16)
    c, s = m(torch.tensor([[0, 5, 100_000]]))
    assert c.dtype == torch.float32 and m.apply_rotary(x, c, s).dtype == torch.bfloat16
    meta = RotaryEmbedding(64, cfg).to("meta")
    assert meta.inv_freq.is_meta and math.isfinite(ref.inv_freq.sum().item())
