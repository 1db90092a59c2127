"""Programmatic dependent launch (hybridize.ops.pdl): when it is on, and — compiled offline for sm_90, no
GPU needed — that every decode-step kernel waits (griddepcontrol.wait) before its first global write and
before its first global load (the GEMV may only prefetch its weights before it, the fused decode attention
read lengths and inv_freq), and lets the next kernel start only after its own wait; the skinny GEMM's K
loops are software-pipelined in every work split. GPU: a graph-replayed hybrid decode gives the same tokens with PDL on / off."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hybridize as hz
from hybridize.ops import pdl

_CHECK = Path(__file__).with_name("_sm90_pdl_check.py")


def test_pdl_only_on_capable_cuda_devices(monkeypatch):
    assert pdl.pdl_launch(torch.device("cpu")) == {"PDL": 0}
    monkeypatch.setattr(pdl, "_device_supports", lambda index: True)
    assert pdl.pdl_launch(torch.device("cuda", 0)) == {"PDL": 1, "launch_pdl": True}
    monkeypatch.setenv("HYBRIDIZE_PDL", "0")
    assert pdl.pdl_launch(torch.device("cuda", 0)) == {"PDL": 0}
    monkeypatch.setattr(pdl, "_device_supports", lambda index: False)
    monkeypatch.setenv("HYBRIDIZE_PDL", "1")
    assert pdl.pdl_launch(torch.device("cuda", 0)) == {"PDL": 0}


def test_compiled_step_asks_inductor_for_pdl(monkeypatch):
    """The decode step's torch.compile passes inductor `triton.enable_pdl` = HYBRIDIZE_PDL (where the torch
    has the option; not with HYBRIDIZE_COMPILE_MODE, which takes a mode instead), memoised per setting."""
    import torch._inductor.config as icfg

    from hybridize.generate import engine
    if not hasattr(icfg.triton, "enable_pdl"):
        assert engine._inductor_options() == {"comprehensive_padding": False}
        pytest.skip("this torch has no inductor PDL option")
    seen = []
    monkeypatch.setattr(engine.torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    monkeypatch.setattr(engine, "_COMPILED", {})

    def f(x):
        return x
    for flag in ("1", "0", "1"):
        monkeypatch.setenv("HYBRIDIZE_PDL", flag)
        assert engine.compiled(f) is f
    assert [kw["options"] for kw in seen] == [{"comprehensive_padding": False, "triton.enable_pdl": True},
                                              {"comprehensive_padding": False, "triton.enable_pdl": False}]
    monkeypatch.setenv("HYBRIDIZE_COMPILE_MODE", "max-autotune-no-cudagraphs")
    assert engine._inductor_options() is None
    engine.compiled(f)
    assert seen[-1] == dict(fullgraph=True, dynamic=None, mode="max-autotune-no-cudagraphs")


def _compiled_kernels():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(hz.__file__).parents[1])] + sys.path)
    run = subprocess.run([sys.executable, str(_CHECK)], capture_output=True, text=True, env=env, timeout=600)
    if run.returncode != 0 and ("ptxas" in run.stderr or "GPUTarget" in run.stderr):
        pytest.skip(f"triton cannot compile for sm_90 here: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_decode_kernels_wait_before_touching_dependent_memory():
    rows = _compiled_kernels()
    names = {r["kernel"] for r in rows}
    assert {"_gemv_kernel", "_fused_split_kernel", "_merge_kernel", "_split_kernel", "_conv_update_kernel",
            "_rglru_step_kernel", "_ssd_step_kernel", "_chunk_kernel", "_rows_kernel", "_skinny_kernel"} <= names, names
    assert names & {"_ss_step_kernel", "_ss_tile_kernel"}, names
    for r in rows:
        assert r["launch_pdl"] and r["wait"] is not None and r["launch"] is not None, r
        assert r["wait"] < r["launch"], r                     # at most two kernels in flight
        assert r["store"] is None or r["wait"] < r["store"], r
        if r["kernel"] == "_fused_split_kernel":
            # lengths and the RoPE inv_freq table are read before the wait (FUSED_TUNE["early"]): written
            # only by this layer's attention kernels, never by the kernel just before (the q/k/v projection)
            assert r["loads_before_wait"] >= 1 and set(r["pre_wait_load_tensors"]) == {"N0", "IF"}, r
        else:
            assert r["load"] is None or r["wait"] < r["load"], r
            assert r["pre_wait_load_tensors"] == [], r
        if r["kernel"] == "_skinny_kernel":     # its K loops are software-pipelined (cp.async), split or not
            assert r["cp_async"] > 0, r
        if r["kernel"] == "_gemv_kernel":                      # the weight prefetch goes before the wait
            assert r["prefetch"] is not None and r["prefetch"] < r["wait"], r
        else:
            assert r["prefetch"] is None, r


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_graph_decode_same_tokens_with_and_without_pdl(batch, monkeypatch):
    if not pdl._device_supports(torch.cuda.current_device()):
        pytest.skip("PDL needs sm_90+ and a triton with griddepcontrol")
    cfg = hz.preset("mil50-debug", layer_pattern=["attention", "mamba2", "rglru", "discrete_mamba2"])
    torch.manual_seed(0)
    model = hz.HybridLM(cfg).to("cuda", torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (7, 3, 5)[:batch]]
    outs = []
    for flag in ("1", "0", "1"):
        monkeypatch.setenv("HYBRIDIZE_PDL", flag)
        res = hz.generate(model, prompts, max_new_tokens=24, use_cuda_graph=True)
        outs.append([list(t) for t in res.tokens])
    assert outs[0] == outs[1] == outs[2]
