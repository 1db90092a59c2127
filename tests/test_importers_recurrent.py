"""Mamba2ForCausalLM and RecurrentGemmaForCausalLM importers: logits equal transformers' (fp32, ≤ 1e-4)
on random tiny checkpoints; RecurrentGemma's window is enforced as in the official Griffin code."""
import inspect

import pytest
import torch
import transformers

import hybridize as hz


def _randomise(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith(("D", "dt_bias")):
                p.add_(torch.randn_like(p) * 0.1)


def _hf_norms_per_group() -> bool:
    """Older transformers (< ~5.20) normalise Mamba-2's gated RMSNorm over all groups at once; mamba_ssm
    (and the checkpoints trained with it) normalise each group separately, as we do. The fixed version
    takes a `group_size` argument."""
    from transformers.models.mamba2 import modeling_mamba2
    return "group_size" in inspect.signature(modeling_mamba2.MambaRMSNormGated.__init__).parameters


@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba2_parity(tmp_path, n_groups):
    if n_groups > 1 and not _hf_norms_per_group():
        pytest.skip(f"transformers {transformers.__version__} normalises the gated RMSNorm over all groups "
                    "(fixed in later releases); mamba_ssm normalises per group")
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=97, hidden_size=64, num_heads=8, head_dim=16, state_size=16,
                                    n_groups=n_groups, num_hidden_layers=2, chunk_size=16, expand=2,
                                    tie_word_embeddings=False)
    ref = transformers.Mamba2ForCausalLM(cfg).eval()
    _randomise(ref)
    ref.save_pretrained(tmp_path)
    ours = hz.load(tmp_path).eval()
    assert ours.layer_pattern == ["mamba2", "mamba2"]
    ids = torch.randint(0, 97, (2, 37))
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4


def _recurrent_gemma(tmp_path, window=64):
    torch.manual_seed(0)
    cfg = transformers.RecurrentGemmaConfig(
        vocab_size=101, hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
        num_hidden_layers=3, lru_width=48, attention_window_size=window, block_types=["recurrent", "recurrent", "attention"])
    ref = transformers.RecurrentGemmaForCausalLM(cfg).eval()
    _randomise(ref)
    ref.save_pretrained(tmp_path)
    return ref


def test_recurrent_gemma_parity_within_window(tmp_path):
    ref = _recurrent_gemma(tmp_path)
    ours = hz.load(tmp_path).eval()
    assert ours.layer_pattern == ["rglru", "rglru", "attention"]
    assert ours.cfg.attention.partial_rotary_factor == 0.5 and ours.cfg.logit_softcap == 30.0
    ids = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_recurrent_gemma_enforces_window_beyond_it(tmp_path):
    """Past the window, our full forward equals token-by-token decoding with a ring buffer (the
    official semantics), while transformers' full forward attends beyond the window."""
    _recurrent_gemma(tmp_path, window=8)
    ours = hz.load(tmp_path).eval()
    ids = torch.randint(0, 101, (1, 30))
    with torch.no_grad():
        full = ours(ids).logits
        cache = ours.init_cache(1, max_seqlen=30)
        steps = torch.stack([ours.step(ids[:, t], cache) for t in range(30)], 1)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mamba2", "recurrent_gemma"])
def test_info_reads_hf_config(tmp_path, kind):
    from hybridize.cli import info_report

    if kind == "mamba2":
        transformers.Mamba2Config(vocab_size=97, hidden_size=64, num_heads=8, head_dim=16, state_size=16,
                                  n_groups=2, num_hidden_layers=2).save_pretrained(tmp_path)
    else:
        _recurrent_gemma(tmp_path)
    rep = info_report(str(tmp_path), context=1024)
    assert rep["parameters"] > 0 and rep["decode_memory"]["recurrent_state_bytes"] > 0
