"""HybridLM: every preset family builds, trains (finite loss), and its modes agree:
full forward == split forward with cache == token-by-token step; packed == per document;
padding masks do not leak."""
import pytest
import torch

import hybridize as hz
from hybridize.config import ConfigError, HybridConfig, preset
from hybridize.model import HybridLM

FAMILIES = ["llama", "hawk", "griffin", "mamba2", "mil50", "mil25", "mil0"]


def _model(family, **kw):
    torch.manual_seed(0)
    cfg = preset(f"{family}-debug", **kw)
    return HybridLM(cfg).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_loss_backward(family):
    model = _model(family).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 37))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 37, model.cfg.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", FAMILIES + ["mamba1_mix", "dm2_mix"])
def test_cached_decode_matches_full_forward(family):
    if family == "mamba1_mix":
        model = _model("llama", layer_pattern=["mamba1", "attention", "mamba1"])
    elif family == "dm2_mix":
        model = _model("llama", layer_pattern=["discrete_mamba2", "attention", "discrete_mamba2"])
    else:
        model = _model(family)
    L, split = 41, 23   # longer than the debug sliding window (16)
    ids = torch.randint(0, model.cfg.vocab_size, (2, L))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.init_cache(2, max_seqlen=L)
        a = model(ids[:, :split], cache=cache).logits
        b = model(ids[:, split:split + 5], cache=cache).logits
        steps = [model.step(ids[:, t], cache) for t in range(split + 5, L)]
    torch.testing.assert_close(a, full[:, :split], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, full[:, split:split + 5], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, split + 5:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "griffin", "mil50", "mamba2"])
def test_packed_batch_equals_separate_documents(family):
    model = _model(family)
    lens = [13, 1, 30]
    docs = [torch.randint(0, model.cfg.vocab_size, (1, n)) for n in lens]
    packed = torch.cat(docs, 1)
    seq_idx = torch.cat([torch.full((1, n), i) for i, n in enumerate(lens)], 1)
    with torch.no_grad():
        out = model(packed, seq_idx=seq_idx).logits
        ref = torch.cat([model(d).logits for d in docs], 1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "hawk", "mil50"])
def test_padding_mask_does_not_leak(family):
    model = _model(family)
    ids = torch.randint(1, model.cfg.vocab_size, (1, 19))
    pad = torch.zeros(1, 6, dtype=torch.long)
    with torch.no_grad():
        ref = model(ids).logits
        left = model(torch.cat([pad, ids], 1), attention_mask=torch.cat([pad, torch.ones_like(ids)], 1)).logits
        right = model(torch.cat([ids, pad], 1), attention_mask=torch.cat([torch.ones_like(ids), pad], 1)).logits
    torch.testing.assert_close(left[:, 6:], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(right[:, :19], ref, atol=1e-4, rtol=1e-4)


def test_logit_softcap_and_embedding_scale():
    model = _model("griffin", logit_softcap=5.0)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 9))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.abs().max() <= 5.0
    h = model.embed(ids)
    torch.testing.assert_close(h, model.embed_tokens(ids) * model.cfg.embedding_scale)


def test_config_validation_explains():
    with pytest.raises(ConfigError, match="layer_pattern\\[1\\]"):
        HybridConfig(layer_pattern=["attention", "lstm"]).validate()
    with pytest.raises(ConfigError, match="num_kv_heads"):
        cfg = preset("llama-debug")
        cfg.attention.num_heads, cfg.attention.num_kv_heads = 6, 4
        cfg.validate()
    with pytest.raises(ConfigError, match="unknown preset family"):
        preset("gpt-debug")
    with pytest.raises(ConfigError, match="unknown preset size"):
        preset("llama-huge")


def test_config_roundtrip():
    for fam in FAMILIES:
        cfg = preset(f"{fam}-debug")
        assert HybridConfig.from_dict(cfg.to_dict()) == cfg


def test_token_ids_out_of_range_is_clear():
    model = _model("llama")
    with pytest.raises(ValueError, match="vocab mismatch"):
        model(torch.tensor([[0, model.cfg.vocab_size]]))


def test_decode_memory_recurrent_is_constant():
    model = _model("mil0")
    a, b = model.decode_memory(16), model.decode_memory(4096)
    assert a["kv_cache_bytes"] == b["kv_cache_bytes"] == 0
    assert a["recurrent_state_bytes"] == b["recurrent_state_bytes"] > 0
    t = _model("llama")
    a = t.cfg.attention
    per_token = t.cfg.num_layers * 2 * a.num_kv_heads * a.head_dim * 2   # K and V, bf16
    grown = t.decode_memory(4096)["kv_cache_bytes"] - t.decode_memory(16)["kv_cache_bytes"]
    assert grown == (4096 - 16) * per_token
    assert hz.HybridLM is HybridLM
