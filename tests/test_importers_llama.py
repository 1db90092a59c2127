"""Llama / Mistral / Qwen2 importers: logits equal transformers' own implementation (fp32, ≤ 1e-4)
on random tiny checkpoints created here; bad checkpoints give clear errors."""
import json

import pytest
import torch
import transformers

import hybridize as hz

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def _save(tmp_path, model_cls, config_cls, **kw):
    torch.manual_seed(0)
    cfg = config_cls(**{**TINY, **kw})
    m = model_cls(cfg).eval()
    with torch.no_grad():   # HF inits biases to zero: randomise so they are tested
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    m.save_pretrained(tmp_path)
    return m


def _compare(tmp_path, ref, L=40, atol=1e-4):
    ours = hz.load(tmp_path).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, L))
    with torch.no_grad():
        a = ours(ids).logits
        b = ref(ids).logits
    assert (a - b).abs().max().item() <= atol
    return ours


@pytest.mark.parametrize("tied", [False, True])
def test_llama_gqa_parity(tmp_path, tied):
    ref = _save(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig, tie_word_embeddings=tied)
    ours = _compare(tmp_path, ref)
    assert ours.cfg.tie_embeddings == tied
    assert ours.cfg.attention.num_kv_heads == 2


def test_llama3_rope_scaling_parity(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    ref = _save(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig, rope_parameters=rope)
    ours = _compare(tmp_path, ref, L=150)
    assert ours.cfg.attention.rope_scaling["rope_type"] == "llama3"


def test_mistral_sliding_window_parity(tmp_path):
    ref = _save(tmp_path, transformers.MistralForCausalLM, transformers.MistralConfig, sliding_window=16)
    ours = _compare(tmp_path, ref, L=45)
    assert ours.cfg.attention.sliding_window == 16


def test_qwen2_qkv_bias_parity(tmp_path):
    ref = _save(tmp_path, transformers.Qwen2ForCausalLM, transformers.Qwen2Config)
    ours = _compare(tmp_path, ref)
    assert ours.cfg.attention.qkv_bias and not ours.cfg.attention.o_bias


def test_imported_cached_decode_matches(tmp_path):
    ref = _save(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig)
    ours = hz.load(tmp_path).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():
        full = ref(ids).logits
        cache = ours.init_cache(1, max_seqlen=16)
        ours(ids[:, :8], cache=cache)
        steps = torch.stack([ours.step(ids[:, t], cache) for t in range(8, 12)], 1)
    assert (steps - full[:, 8:]).abs().max() <= 1e-4


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    _save(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig)
    st = next(tmp_path.glob("*.safetensors"))
    good = st.read_bytes()
    st.write_bytes(good[: len(good) // 3])
    with pytest.raises(hz.CheckpointError, match="corrupt or truncated"):
        hz.load(tmp_path)
    st.write_bytes(good)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hz.CheckpointError, match="config/weights mismatch"):
        hz.load(tmp_path)
    cfg["intermediate_size"] = 96
    cfg["num_hidden_layers"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hz.CheckpointError, match="incomplete"):
        hz.load(tmp_path)
