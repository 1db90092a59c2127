"""HF interoperability: save_pretrained → AutoModelForCausalLM / hz.load round trips bit-exact,
generate() works, labels give the loss."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hybridize as hz
from hybridize.config import preset
from hybridize.model import HybridLM, causal_lm_loss


@pytest.mark.parametrize("family", ["llama", "griffin", "mil50", "mamba2"])
def test_save_load_roundtrip_bit_exact(tmp_path, family):
    torch.manual_seed(0)
    model = HybridLM(preset(f"{family}-debug")).eval()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "hybridize"
    assert list((tmp_path).glob("*.safetensors"))
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(auto, HybridLM)
    loaded = hz.load(tmp_path).eval()
    sd, sd2, sd3 = model.state_dict(), auto.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() == sd3.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]) and torch.equal(sd[k], sd3[k]), k
    ids = torch.randint(0, model.cfg.vocab_size, (2, 21))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, auto(ids).logits)
    assert AutoConfig.from_pretrained(tmp_path).typed == model.cfg


def test_tied_embeddings_stay_tied(tmp_path):
    model = HybridLM(preset("hawk-debug"))
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = hz.load(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()


def test_labels_give_loss():
    model = HybridLM(preset("mil50-debug"))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                            labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    assert causal_lm_loss(out.logits, torch.full_like(ids, -100)) == 0


@pytest.mark.parametrize("family", ["llama", "mil50", "hawk"])
def test_hf_generate_greedy_matches_manual(family):
    torch.manual_seed(0)
    model = HybridLM(preset(f"{family}-debug")).eval()
    ids = torch.randint(1, model.cfg.vocab_size, (1, 7))   # 0 is the pad id: HF would mask it
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out[:, :seq.shape[1]], seq)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(hz.CheckpointError, match="does not exist"):
        hz.load(tmp_path / "nope")
    with pytest.raises(hz.CheckpointError, match="no config.json"):
        hz.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(hz.CheckpointError, match="not valid JSON"):
        hz.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(hz.CheckpointError, match="unsupported model_type 'bert'"):
        hz.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "hybridize", "hybrid": preset("llama-debug").to_dict()}))
    with pytest.raises(hz.CheckpointError, match="no weights"):
        hz.load(tmp_path)
