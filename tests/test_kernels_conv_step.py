"""The fused conv + SSD decode step (`hybridize.ops.ssd.ssd_conv_step`, kernel `triton_conv_step`) vs its
reference (the conv reference then the SSD step reference) and vs the two kernels it replaces (bit for bit):
outputs, the conv state and the SSD state, over layouts (Mamba-in-the-Llama: x / B per kv head, C per
head; standard Mamba-2: B / C per group), awkward P / N / conv widths, dtypes, the gated norm and several
consecutive steps; the dispatcher's fallback where the kernel does not apply, the custom op, clear errors.

Without CUDA the kernel runs under the Triton interpreter (small shapes). `gpu`: the 1.2 B hybrid's shape
(batch 64, 32 heads, P = N = 64, bf16) against the reference and the separate kernels.
"""
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hybridize.ops import ssd as ssd_ops  # noqa: E402
from hybridize.ops.conv1d.triton import causal_conv1d_update_triton  # noqa: E402
from hybridize.ops.ssd import reference as ssd_ref  # noqa: E402
from hybridize.ops.ssd import triton_conv_step as kern  # noqa: E402
from hybridize.ops.ssd.triton_step import ssd_step_triton  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"

if not _CUDA and type(kern._ssd_conv_step_kernel).__name__ != "InterpretedFunction":
    pytest.skip("kernels were decorated without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)

#: (B, H, P, N, n_x, n_b, n_c, W)
CASES = {
    "mil": (3, 8, 8, 8, 2, 2, 8, 4),                  # x / B per kv head (4 heads each), C per head
    "standard_one_group": (2, 4, 8, 16, 4, 1, 1, 4),  # B / C shared by all heads: R = H
    "standard_two_groups": (2, 8, 8, 8, 8, 2, 2, 4),
    "awkward": (3, 6, 12, 5, 3, 2, 6, 3),             # P, N not powers of two, W = 3, R = lcm(2, 3, 1)
    "batch_one_w2": (1, 4, 16, 8, 1, 4, 2, 2),
}


def _inputs(case, dtype=torch.float32, state_dtype=torch.float32, *, z=True, D="h", norm=False, seed=0,
            strided=True):
    B, H, P, N, n_x, n_b, n_c, W = case
    C = n_x * P + n_b * N + n_c * N
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    proj = mk(B, C + 7).to(dtype)                     # xbc and dt as column views of one projection
    t = dict(xbc=proj[:, 3:3 + C] if strided else proj[:, :C].contiguous(),
             conv_state=mk(B, C, W - 1).to(state_dtype), conv_weight=(mk(C, 1, W) / W).to(dtype)[:, 0, :],
             conv_bias=mk(C).to(dtype), dt=(mk(B, H + 2) * 0.7).to(dtype)[:, 1:1 + H],
             state=mk(B, H, P, N).to(state_dtype))
    kw = dict(n_x=n_x, n_b=n_b, A_log=torch.log(torch.rand(H, generator=gen) * 3 + 0.5),
              D=None if D is None else (mk(H) if D == "h" else mk(H, P)), z=mk(B, H, P).to(dtype) if z else None,
              dt_bias=mk(H) * 0.5 - 1.0, dt_softplus=True, dt_limit=(0.0, 50.0),
              norm_weight=mk(H * P) if norm else None, norm_group=(P // 2 if norm == "groups" else 0))
    mv = lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {k: mv(v) for k, v in t.items()}, {k: mv(v) for k, v in kw.items()}


def _run(fn, t, kw, steps=1, seed=1):
    """`steps` consecutive calls (fresh xbc / dt each) on clones of the states → (ys, conv_state, state)."""
    cs, st = t["conv_state"].clone(), t["state"].clone()
    gen = torch.Generator().manual_seed(seed)
    ys, xbc, dt = [], t["xbc"], t["dt"]
    for i in range(steps):
        if i:
            xbc = torch.randn(xbc.shape, generator=gen).to(xbc.dtype).to(DEVICE)
            dt = (torch.randn(dt.shape, generator=gen) * 0.7).to(dt.dtype).to(DEVICE)
        ys.append(fn(xbc, cs, t["conv_weight"], t["conv_bias"], dt, st, **kw))
    return torch.stack(ys), cs, st


def _separate_kernels(xbc, cs, cw, cb, dt, st, *, n_x, n_b, **kw):
    """The path the fused kernel replaces: the conv update kernel, then the SSD step kernel."""
    return ssd_ref.conv_then_step(causal_conv1d_update_triton, ssd_step_triton, xbc, cs, cw, cb, dt, st, n_x, n_b,
                                  "silu", None, **kw)


def _close(got, want, low_precision):
    for g, w in zip(got, want, strict=True):
        if low_precision:
            torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
        else:
            torch.testing.assert_close(g.float(), w.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16_fp32state"])
@pytest.mark.parametrize("case", list(CASES))
def test_conv_step_matches_reference(case, dtypes):
    t, kw = _inputs(CASES[case], *dtypes, norm=case == "mil", D="hp" if case == "awkward" else "h")
    got = _run(kern.ssd_conv_step_triton, t, kw, steps=3)
    want = _run(ssd_ref.ssd_conv_step, t, kw, steps=3)
    _close(got, want, dtypes != (torch.float32, torch.float32))


@pytest.mark.parametrize("variant", ["plain", "gated", "norm", "norm_groups", "no_D"])
@pytest.mark.parametrize("case", ["mil", "awkward"])
def test_conv_step_bitwise_equals_the_separate_kernels(case, variant):
    """Same formulas in the same order as `_conv_update_kernel` + `_ssd_step_kernel`: identical bits (bf16)."""
    t, kw = _inputs(CASES[case], torch.bfloat16, torch.bfloat16, z=variant != "plain",
                    norm={"norm": True, "norm_groups": "groups"}.get(variant, False),
                    D=None if variant == "no_D" else "h")
    if variant == "norm_groups" and CASES[case][2] % 2:
        pytest.skip("odd P")
    y1, cs1, st1 = _run(kern.ssd_conv_step_triton, t, kw, steps=2)
    y2, cs2, st2 = _run(_separate_kernels, t, kw, steps=2)
    assert torch.equal(y1, y2) and torch.equal(cs1, cs2) and torch.equal(st1, st2)


def test_reference_equals_the_two_reference_ops():
    """The reference is literally the conv update then ssd_step on the split (also with contiguous inputs)."""
    from hybridize.ops.conv1d import reference as conv_ref
    t, kw = _inputs(CASES["mil"], strided=False)
    want = _run(lambda *a, **k: ssd_ref.conv_then_step(conv_ref.causal_conv1d_update, ssd_ref.ssd_step, *a[:6],
                                                       k.pop("n_x"), k.pop("n_b"), "silu", None, **k), t, kw)
    _close(_run(ssd_ref.ssd_conv_step, t, kw), want, False)


def test_dispatch_uses_the_kernel_where_it_applies(monkeypatch):
    """ssd_ops.ssd_conv_step: the fused kernel when each program owns ≤ MAX_HEADS_PER_PROGRAM heads, else the
    conv op + ssd_step — the same numbers either way."""
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    calls = []
    real = kern.ssd_conv_step_triton
    monkeypatch.setattr(kern, "ssd_conv_step_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    t, kw = _inputs(CASES["mil"])
    _close(_run(ssd_ops.ssd_conv_step, t, kw), _run(ssd_ref.ssd_conv_step, t, kw), False)
    assert calls
    calls.clear()
    big = (2, 16, 4, 4, 16, 1, 1, 4)                  # one B / C group for 16 heads: R = 16 > 8
    assert not kern.kernel_supports(*(lambda t: (t["xbc"], t["conv_weight"], t["state"]))(_inputs(big)[0]), 16, 1)
    t, kw = _inputs(big)
    _close(_run(ssd_ops.ssd_conv_step, t, kw), _run(ssd_ref.ssd_conv_step, t, kw), False)
    assert not calls


def test_custom_op_and_compile():
    """The torch.library op (what torch.compile / CUDA graphs capture) declares both mutations; a compiled
    call equals eager."""
    t, kw = _inputs(CASES["awkward"], z=True)
    args = (t["xbc"], t["conv_state"].clone(), t["conv_weight"], t["conv_bias"], t["dt"], t["state"].clone(),
            kw["n_x"], kw["n_b"], None, kw["A_log"], kw["D"], kw["z"], kw["dt_bias"], True, 0.0, 50.0, None, 1e-5, 0,
            True)
    torch.library.opcheck(torch.ops.hybridize.ssd_conv_step, args)

    def f(xbc, cs, st):
        return kern.ssd_conv_step_triton(xbc, cs, t["conv_weight"], t["conv_bias"], t["dt"], st, **kw)
    cs1, st1, cs2, st2 = t["conv_state"].clone(), t["state"].clone(), t["conv_state"].clone(), t["state"].clone()
    y1 = torch.compile(f, backend="aot_eager", fullgraph=True)(t["xbc"], cs1, st1)
    y2 = f(t["xbc"], cs2, st2)
    assert torch.equal(y1, y2) and torch.equal(cs1, cs2) and torch.equal(st1, st2)


@pytest.mark.parametrize("fn", ["reference", "kernel"])
def test_bad_layouts_raise_clearly(fn):
    f = ssd_ref.ssd_conv_step if fn == "reference" else kern.ssd_conv_step_triton
    t, kw = _inputs(CASES["mil"])
    with pytest.raises(ValueError, match=r"xbc \(B, C\) = \[x"):
        f(t["xbc"][:, :-3], t["conv_state"], t["conv_weight"], t["conv_bias"], t["dt"], t["state"], **kw)
    with pytest.raises(ValueError, match="dividing H"):
        f(t["xbc"], t["conv_state"], t["conv_weight"], t["conv_bias"], t["dt"], t["state"], **dict(kw, n_x=3))
    if fn == "kernel":
        with pytest.raises(ValueError, match="conv_state must be"):
            f(t["xbc"], t["conv_state"][:, :, :1], t["conv_weight"], t["conv_bias"], t["dt"], t["state"], **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32])
def test_gpu_hybrid_1b_shape(state_dtype):
    """Batch 64, 32 heads, P = N = 64, MIL layout (8 kv heads), bf16 activations, the gated norm in the step."""
    case = (64, 32, 64, 64, 8, 8, 32, 4)
    t, kw = _inputs(case, torch.bfloat16, state_dtype, norm=True)
    got = _run(kern.ssd_conv_step_triton, t, kw, steps=3)
    _close(got, _run(ssd_ref.ssd_conv_step, t, kw, steps=3), True)
    sep = _run(_separate_kernels, t, kw, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(got, sep, strict=True))
