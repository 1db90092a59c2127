"""Fused projections (`HybridLM.fuse_projections_`, `hybridize.layers.fused`): q/k/v, gate/up and the
RG-LRU branches as one matmul over views of one weight tensor. Every test compares a fused model with an
unfused copy made before fusing: forward / step / step_tokens / generate (plain and speculative) give the
same numbers, the fused matmul really runs (the separate Linears are never called), state_dict keys and
values, save / load, load_state_dict into the fused storage, idempotence and no extra memory, moving or
copying after fusion (re-fused, never stale), stale-storage detection, training (gradients reach the
Parameters), torch.compile(fullgraph=True)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import hybridize as hz
from hybridize.generate import generate
from hybridize.generate.cache_ops import alloc_cache
from hybridize.layers.fused import FusedProjections
from hybridize.model import HybridLM

TOL = {"atol": 1e-5, "rtol": 1e-5}



def make(family: str, seed: int = 0) -> HybridLM:
    """A tiny random model; Linear biases random (not the zero init) so that fused biases are tested;
    the head sharpened so that greedy argmaxes are rarely near-ties."""
    torch.manual_seed(seed)
    if family == "llama":                   # GQA 4 / 2
        cfg = hz.preset("llama-debug")
    elif family == "llama_bias":            # Qwen2-style q/k/v bias
        cfg = hz.preset("llama-debug")
        cfg.attention.qkv_bias = True
    elif family == "mistral":               # GQA + sliding window shorter than the prompts
        cfg = hz.preset("llama-debug")
        cfg.attention.sliding_window = 6
    elif family == "griffin":               # RG-LRU blocks + local attention (MQA) + GeGLU MLP
        cfg = hz.preset("griffin-debug")
        cfg.attention.sliding_window = 8
        cfg.rglru.bias = True
    elif family == "mil50":                 # Mamba-2 / attention hybrid
        cfg = hz.preset("mil50-debug")
    elif family == "dm2_mix":               # discrete Mamba-2 / attention hybrid
        cfg = hz.preset("llama-debug", layer_pattern=["discrete_mamba2", "attention"])
    else:
        raise ValueError(family)
    model = HybridLM(cfg.validate()).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(std=0.1)
        model.lm_head.weight.mul_(4.0)
    return model


FAMILIES = ["llama", "llama_bias", "mistral", "griffin", "mil50", "dm2_mix"]


def pair(family: str, seed: int = 0):
    """(fused model, unfused copy with the same weights)."""
    ref = make(family, seed)
    model = copy.deepcopy(ref).fuse_projections_()
    assert model.projections_fused() and not ref.projections_fused()
    return model, ref


class _LinearCalls:
    """Counts calls of the separate nn.Linear modules that fusion replaces."""

    def __init__(self, model):
        self.n = 0
        self.handles = [getattr(m, name).register_forward_hook(self._hook)
                        for m in model.modules() if isinstance(m, FusedProjections) for name in m._fused_names]

    def _hook(self, *args):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def tokens(model, B=3, L=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (B, L), generator=g)


def assert_same_params(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_step_step_tokens_match_unfused(family):
    model, ref = pair(family)
    ids = tokens(model)
    seq_idx = torch.tensor([[0] * 6 + [1] * 7, [0] * 13, [0] * 3 + [1] * 4 + [2] * 6])
    with torch.no_grad(), _LinearCalls(model) as calls:
        # stateless forward, packed documents, forward into a cache (prefill)
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, **TOL)
        torch.testing.assert_close(model(ids, seq_idx=seq_idx).logits, ref(ids, seq_idx=seq_idx).logits, **TOL)
        c1, c2 = model.init_cache(3, max_seqlen=40), ref.init_cache(3, max_seqlen=40)
        torch.testing.assert_close(model(ids[:, :7], cache=c1).logits, ref(ids[:, :7], cache=c2).logits, **TOL)
        # step, then step_tokens, on the prefilled caches
        for t in range(7, 10):
            torch.testing.assert_close(model.step(ids[:, t], c1), ref.step(ids[:, t], c2), **TOL)
        torch.testing.assert_close(model.step_tokens(ids[:, 10:13], c1), ref.step_tokens(ids[:, 10:13], c2),
                                   **TOL)
        for s1, s2 in zip(c1.states, c2.states):
            for t1, t2 in zip(s1.tensors(), s2.tensors()):
                torch.testing.assert_close(t1, t2, **TOL)
    assert calls.n == 0                     # the fused matmul served every call
    with torch.no_grad(), _LinearCalls(ref) as calls:
        ref(ids)
    assert calls.n > 0                      # (the counter works)


@pytest.mark.parametrize("family", ["llama_bias", "mistral", "griffin", "mil50"])
def test_generate_matches_unfused(family):
    model, ref = pair(family)
    prompts = [tokens(model, 1, n, seed=n)[0].tolist() for n in (1, 5, 17)]
    a = generate(ref, prompts, max_new_tokens=12, fuse=False)
    assert not ref.projections_fused() and a.stats.fused is False
    b = generate(model, prompts, max_new_tokens=12)
    assert b.stats.fused is True
    assert a.tokens == b.tokens
    # an unfused model passed to generate is fused in place, and gives the same tokens
    c = generate(ref, prompts, max_new_tokens=12)
    assert ref.projections_fused() and c.stats.fused and c.tokens == a.tokens


def test_generate_env_disables_fusion(monkeypatch):
    model = make("llama")
    monkeypatch.setenv("HYBRIDIZE_FUSE", "0")
    res = generate(model, [[1, 2, 3]], max_new_tokens=3)
    assert not model.projections_fused() and res.stats.fused is False
    monkeypatch.delenv("HYBRIDIZE_FUSE")
    res = generate(model, [[1, 2, 3]], max_new_tokens=3)
    assert model.projections_fused() and res.stats.fused is True


@pytest.mark.parametrize("family", ["llama", "griffin"])
def test_speculative_fuses_both_and_matches(family):
    from hybridize.generate.speculative import Verifier

    ref = make(family)
    draft_ref = make(family, seed=3)
    model, draft = copy.deepcopy(ref), copy.deepcopy(draft_ref)
    prompts = [tokens(ref, 1, n, seed=n)[0].tolist() for n in (2, 9)]
    plain = generate(ref, prompts, max_new_tokens=10, fuse=False)
    spec = generate(model, prompts, max_new_tokens=10, draft=draft, num_draft_tokens=3)
    assert model.projections_fused() and draft.projections_fused() and spec.stats.fused
    assert spec.tokens == plain.tokens      # greedy speculative == greedy plain decoding
    # the verifier fuses its target at setup
    fresh = make(family)
    ver = Verifier(fresh, alloc_cache(fresh, 2, 32, window_slack=4), 2, 4, use_cuda_graph=False, compile=False)
    assert ver.fused and fresh.projections_fused()


# ---------------------------------------------------------------------------- layout and memory
def test_state_dict_keys_values_and_no_extra_memory():
    model, ref = pair("llama_bias")
    assert_same_params(model, ref)
    keys = set(model.state_dict())
    assert "layers.0.mixer.q_proj.weight" in keys and "layers.0.mixer.v_proj.bias" in keys
    assert "layers.0.mlp.gate_proj.weight" in keys and not any("fused" in k for k in keys)
    assert not any("fused" in n for n, _ in model.named_buffers())
    attn, mlp = model.layers[0].mixer, model.layers[0].mlp
    w = attn._fused.weight
    H, Hkv, P, D = attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.hidden_size
    assert w.shape == ((H + 2 * Hkv) * P, D) and attn._fused.bias.shape == ((H + 2 * Hkv) * P,)
    assert mlp._fused.weight.shape == (2 * model.cfg.mlp.intermediate_size, D)
    # the Parameters are slices of the fused tensor, in q, k, v order
    for lin, (a, b) in zip((attn.q_proj, attn.k_proj, attn.v_proj),
                           ((0, H * P), (H * P, (H + Hkv) * P), ((H + Hkv) * P, (H + 2 * Hkv) * P))):
        assert lin.weight.data_ptr() == w[a:b].data_ptr() and lin.bias.data_ptr() == attn._fused.bias[a:b].data_ptr()
    # no extra memory: the distinct storages behind the Parameters hold exactly the parameter bytes
    storages = {}
    for p in model.parameters():
        s = p.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    assert sum(storages.values()) == sum(p.numel() * p.element_size() for p in model.parameters())


def test_idempotent_and_parameter_identity():
    model = make("griffin")
    ids_before = [id(p) for p in model.parameters()]
    model.fuse_projections_()
    fused = [(m, m._fused) for m in model.modules() if isinstance(m, FusedProjections)]
    ptrs = [p.data_ptr() for p in model.parameters()]
    model.fuse_projections_()
    assert all(m._fused is f for m, f in fused)              # nothing re-allocated
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert [id(p) for p in model.parameters()] == ids_before   # optimizers / hooks keep their Parameters
    ref = make("griffin")
    model.unfuse_projections_()
    assert not model.projections_fused() and all(m._fused is None for m, _ in fused)
    assert_same_params(model, ref)
    ids = tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, **TOL)


# ---------------------------------------------------------------------------- weights in sync
@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_after_fusion_updates_fused_weights(assign):
    model, _ = pair("llama_bias")
    other = make("llama_bias", seed=7)
    ids = tokens(model)
    with torch.no_grad():
        before = model(ids).logits
        model.load_state_dict(other.state_dict(), assign=assign)
        after = model(ids).logits
        expect = other(ids).logits
    assert model.projections_fused()        # copied into the views, or (assign) re-fused by the post-hook
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expect, **TOL)
    attn = model.layers[1].mixer
    o = other.layers[1].mixer
    torch.testing.assert_close(attn._fused.weight, torch.cat([o.q_proj.weight, o.k_proj.weight, o.v_proj.weight]))
    assert_same_params(model, other)


def test_save_load_round_trip(tmp_path):
    model, ref = pair("griffin")
    model.save_pretrained(tmp_path / "fused")
    ref.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "fused" / "model.safetensors")
    b = load_file(tmp_path / "plain" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = hz.load(tmp_path / "fused").eval()
    assert_same_params(loaded, ref)
    ids = tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, **TOL)
        loaded.fuse_projections_()
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, **TOL)
    # torch.save / safetensors' save_file of the state_dict, loaded into a fused model
    from safetensors.torch import save_file

    torch.save(model.state_dict(), tmp_path / "sd.pt")
    untied = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}   # (tied to the embedding)
    save_file(untied, tmp_path / "sd.safetensors")
    for sd in (torch.load(tmp_path / "sd.pt"), load_file(tmp_path / "sd.safetensors")):
        fresh = make("griffin", seed=9).fuse_projections_()
        fresh.load_state_dict(sd, strict=False)
        assert_same_params(fresh, ref)
        assert fresh.projections_fused()
    # safetensors' save_model refuses any Parameter that is a view of a bigger tensor: unfuse first
    from safetensors.torch import load_model, save_model

    save_model(copy.deepcopy(model).unfuse_projections_(), str(tmp_path / "m.safetensors"))
    fresh = make("griffin", seed=9)
    load_model(fresh, str(tmp_path / "m.safetensors"))
    assert_same_params(fresh, ref)


# ---------------------------------------------------------------------------- moves and copies
def test_move_after_fusion_refuses():
    model, ref = pair("mistral")
    old = model.layers[0].mixer._fused
    model.to(torch.float32)                 # no-op: same storage, same fused tensor
    assert model.layers[0].mixer._fused is old
    model.double()                          # new storage: every layer fuses its float64 Parameters
    ref.double()
    assert model.projections_fused() and model.layers[0].mixer._fused.weight.dtype == torch.float64
    ids = tokens(model)
    with torch.no_grad(), _LinearCalls(model) as calls:
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-10, rtol=1e-10)
    assert calls.n == 0
    # and the moved model's Parameters are still the fused storage
    other = make("mistral", seed=4).double()
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, other(ids).logits, atol=1e-10, rtol=1e-10)


def test_deepcopy_after_fusion_is_fused_and_independent():
    model, ref = pair("llama")
    cp = copy.deepcopy(model)
    assert cp.projections_fused()
    a, b = cp.layers[0].mixer, model.layers[0].mixer
    assert a._fused.weight.data_ptr() != b._fused.weight.data_ptr()
    assert a.q_proj.weight.data_ptr() == a._fused.weight.data_ptr()
    with torch.no_grad():
        a.q_proj.weight.add_(1.0)           # in place on the copy: its fused tensor follows, the original not
    assert torch.equal(a._fused.weight[: a.q_proj.weight.shape[0]], a.q_proj.weight)
    assert_same_params(model, ref)


def test_stale_storage_is_detected_and_refused():
    model, ref = pair("llama")
    lin, lin_ref = model.layers[2].mixer.k_proj, ref.layers[2].mixer.k_proj
    new = torch.randn_like(lin.weight)
    lin.weight.data = new.clone()           # new storage behind the fused tensor's back
    lin_ref.weight.data = new.clone()
    assert not model.projections_fused()
    ids = tokens(model)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="stale"):
            out = model(ids).logits         # eager: the separate Linears (current weights), never stale
        torch.testing.assert_close(out, ref(ids).logits, **TOL)
        model.fuse_projections_()           # re-fuses the stale layer (the engine does this at setup)
        assert model.projections_fused()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, **TOL)


# ---------------------------------------------------------------------------- training
def test_training_after_fusion_gradients_reach_parameters():
    model, ref = pair("griffin")
    model.train()
    ref.train()
    ids = tokens(model)
    for m in (model, ref):
        m(ids, labels=ids).loss.backward()
    gm = {n: p.grad for n, p in model.named_parameters()}
    for n, p in ref.named_parameters():
        assert gm[n] is not None, n
        torch.testing.assert_close(gm[n], p.grad, atol=1e-5, rtol=1e-4)
    # an optimizer step updates the Parameters in place: the fused tensor follows
    for m in (model, ref):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        opt.step()
    assert model.projections_fused()
    model.eval()
    ref.eval()
    with torch.no_grad(), _LinearCalls(model) as calls:
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    assert calls.n == 0


def test_frozen_parameters_use_fused_path_with_input_gradients():
    model, ref = pair("llama_bias")
    model.requires_grad_(False)
    ref.requires_grad_(False)
    ids = tokens(model)
    xs = []
    for m in (model, ref):
        x = m.embed(ids).detach().requires_grad_(True)
        m(inputs_embeds=x).logits.square().mean().backward()
        xs.append(x.grad)
    torch.testing.assert_close(xs[0], xs[1], **TOL)
    with _LinearCalls(model) as calls:
        model(ids)                          # grad mode on, nothing to train: fused
    assert calls.n == 0


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("family", ["griffin", "llama_bias"])
def test_fused_step_and_step_tokens_compile_fullgraph(family):
    """step and step_tokens of a fused model trace into one graph (fullgraph; aot_eager on CPU: no C++
    build) and match the unfused model."""
    torch._dynamo.reset()
    model, ref = pair(family)
    ids = tokens(model, B=2, L=8)
    step = torch.compile(lambda m, x, c: m.step(x, c), backend="aot_eager", fullgraph=True)
    steps = torch.compile(lambda m, x, c: m.step_tokens(x, c), backend="aot_eager", fullgraph=True)
    c1, c2 = model.init_cache(2, max_seqlen=16), ref.init_cache(2, max_seqlen=16)
    for t in range(4):
        torch.testing.assert_close(step(model, ids[:, t], c1), ref.step(ids[:, t], c2), **TOL)
    torch.testing.assert_close(steps(model, ids[:, 4:8], c1), ref.step_tokens(ids[:, 4:8], c2), **TOL)
