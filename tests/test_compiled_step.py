"""What inductor makes of the decode step: the engine's compile options (`engine._inductor_options`) keep
Mamba-2's in_proj column slices as views into the conv / SSD step ops — no copy kernels between them."""
import re

import pytest
import torch

from hybridize.config import AttentionConfig, HybridConfig, Mamba2Config, MLPConfig
from hybridize.generate import engine
from hybridize.generate.cache_ops import alloc_cache
from hybridize.model import HybridLM


def _mil_model() -> HybridLM:
    """A MIL-layout Mamba-2 model whose in_proj is 1552 columns wide: rows of 6208 bytes in fp32, not a
    multiple of 128, above inductor's padding threshold (1024 elements) — the shape class of the 1B
    hybrids' in_proj (5152 columns)."""
    d, h, kv, hd = 512, 16, 8, 32
    cfg = HybridConfig(vocab_size=256, hidden_size=d, layer_pattern=["mamba2"] * 2, mlp=MLPConfig(256),
                       attention=AttentionConfig(num_heads=h, num_kv_heads=kv, head_dim=hd),
                       mamba2=Mamba2Config(d_state=hd, headdim=hd, d_inner=d, d_xb=kv * hd, ngroups=h,
                                           expand=1))
    model = HybridLM(cfg).eval()
    engine.fuse_for_inference(model)
    assert model.layers[0].mixer.in_proj.out_features == 1552
    return model


def _step_kernels(model, ids, cache, options):
    """(logits, names of the kernels inductor generated) for one compiled step on a copy of `cache`.
    Inductor pads strides on GPUs only unless disable_padding_cpu is off: off here, as on a GPU."""
    import torch._inductor.config as icfg
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    fn = torch.compile(engine._step_program, fullgraph=True, dynamic=False, options=options)
    with icfg.patch(disable_padding_cpu=False), torch.no_grad():
        logits, codes = run_and_get_code(fn, model, ids, cache)
    return logits, re.findall(r"\n\s+(cpp_fused\w*|triton_\w*)\(", "\n".join(codes))


def test_compiled_step_hands_projection_slices_to_the_ops_without_copies(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")        # the custom ops of a GPU step, through the interpreter
    monkeypatch.setenv("HYBRIDIZE_COMPILE_MODE", "")
    torch.manual_seed(0)
    model = _mil_model()
    ids = torch.randint(0, 256, (4,))
    state = alloc_cache(model, 4, 16)
    for st in state.states:                              # a non-zero state, the same for both compiles
        for t in (st.conv, st.ssm):
            t.copy_(torch.randn_like(t))
    copies = [alloc_cache(model, 4, 16) for _ in range(2)]
    for c in copies:
        for a, b in zip(c.states, state.states):
            a.conv.copy_(b.conv)
            a.ssm.copy_(b.ssm)

    def glue(names):
        return [n for n in names if "ssd_step" in n or "causal_conv1d_update" in n]

    ref, padded = _step_kernels(model, ids, copies[0], {"comprehensive_padding": True})
    assert glue(padded), f"inductor's default padding should copy the in_proj slices (the test's premise): {padded}"
    out, ours = _step_kernels(model, ids, copies[1], engine._inductor_options())
    assert not glue(ours), f"copy kernels feed the conv / SSD step ops: {glue(ours)}"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(copies[0].states, copies[1].states):
        torch.testing.assert_close(a.ssm, b.ssm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.conv, b.conv, rtol=1e-5, atol=1e-5)
