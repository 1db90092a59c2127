"""Triton decode-step kernels vs the PyTorch references: the fused SSD step (Mamba-2 / discrete
Mamba-2) and Mamba-1's selective-scan step — outputs and the in-place state update.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before the kernel
modules are imported), so shapes stay small; odd P / N (not powers of two) exercise the masks.
bf16 states are compared with a bf16 tolerance (the kernel rounds once, like the reference, but the
interpreter's fp32 → bf16 conversion may differ from torch's by one ulp).
`gpu` tests: real decode shapes (batch 64, 80 heads, P = 64, N = 128; Mamba-1 d_inner 2048-4096,
d_state 16 / 64) in fp32 and bf16 against the fp32 reference.
"""
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hybridize.ops import selective_scan as ss_ops  # noqa: E402
from hybridize.ops.selective_scan import reference as ss_ref  # noqa: E402
from hybridize.ops.selective_scan import triton_step as ss_kern  # noqa: E402
from hybridize.ops.ssd import reference as ssd_ref  # noqa: E402
from hybridize.ops.ssd import triton_step as kern  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"

if not _CUDA and type(kern._ssd_step_kernel).__name__ != "InterpretedFunction":
    pytest.skip("step kernels were decorated without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)


def _close(a, b, state_dtype=torch.float32, scale=1.0):
    if state_dtype == torch.float32:
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5 * scale, atol=1e-5 * scale)
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def _ssd_inputs(B, H, G, P, N, *, D=None, z=False, bias=False, log_decay=False, seed=0,
                state_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    t = dict(x=mk(B, H, P), dt=mk(B, H) * 0.7 + (0.0 if bias else 0.3),
             A=None if log_decay else -torch.rand(H, generator=gen) * 1.5 - 0.1,
             Bm=mk(B, G, N), Cm=mk(B, G, N), state=mk(B, H, P, N).to(state_dtype))
    kw = dict(D=None if D is None else (mk(H) if D == "h" else mk(H, P)), z=mk(B, H, P) if z else None,
              dt_bias=mk(H) * 0.5 if bias else None,
              log_decay=-torch.rand(B, H, generator=gen) * 2.0 if log_decay else None)
    mv = lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {k: mv(v) for k, v in t.items()}, {k: mv(v) for k, v in kw.items()}


def _run_ssd(t, kw, **extra):
    s_ker, s_ref = t["state"].clone(), t["state"].clone()
    args = (t["x"], t["dt"], t["A"], t["Bm"], t["Cm"])
    y_ker = kern.ssd_step_triton(*args, s_ker, **kw, **extra)
    y_ref = ssd_ref.ssd_step(*args, s_ref, **kw, **extra)
    return y_ker, s_ker, y_ref, s_ref


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [
    dict(B=2, H=4, G=1, P=8, N=16),                                                # plain
    dict(B=2, H=6, G=3, P=5, N=7, D="h", z=True),                                  # odd P/N, groups, gate
    dict(B=1, H=4, G=2, P=12, N=9, D="hp", bias=True, softplus=True, limit=(0.05, 1.5)),
    dict(B=3, H=2, G=2, P=3, N=33, log_decay=True, D="h"),                         # discrete Mamba-2
])
def test_ssd_step_matches_reference(case, state_dtype):
    case = dict(case)
    softplus, limit = case.pop("softplus", False), case.pop("limit", (0.0, float("inf")))
    t, kw = _ssd_inputs(**case, state_dtype=state_dtype)
    y_ker, s_ker, y_ref, s_ref = _run_ssd(t, kw, dt_softplus=softplus, dt_limit=limit)
    assert s_ker.dtype == state_dtype and y_ker.dtype == t["x"].dtype
    _close(y_ker, y_ref, state_dtype)
    _close(s_ker, s_ref, state_dtype)


def test_ssd_step_strided_state_and_inputs():
    """A state that is a view (e.g. one layer of a stacked cache) is updated in place through its strides;
    x / B / C as slices of one projection (unit last stride only)."""
    B, H, G, P, N = 2, 4, 2, 6, 10
    gen = torch.Generator().manual_seed(3)
    big_state = torch.randn(3, B, H, P, N + 2, generator=gen).to(DEVICE)
    state = big_state[1, :, :, :, 1:N + 1]                        # non-contiguous view
    proj = torch.randn(B, H * P + 2 * G * N + 5, generator=gen).to(DEVICE)
    x = proj[:, :H * P].view(B, H, P)
    Bm = proj[:, H * P:H * P + G * N].view(B, G, N)
    Cm = proj[:, H * P + G * N:H * P + 2 * G * N].view(B, G, N)
    dt = torch.rand(B, H, generator=gen).to(DEVICE)
    A = -torch.rand(H, generator=gen).to(DEVICE)
    ref_state = state.clone()
    before = big_state.clone()
    y = kern.ssd_step_triton(x, dt, A, Bm, Cm, state, dt_softplus=True)
    y_ref = ssd_ref.ssd_step(x, dt, A, Bm, Cm, ref_state, dt_softplus=True)
    _close(y, y_ref)
    _close(state, ref_state)
    # nothing outside the view was touched
    mask = torch.ones_like(big_state, dtype=torch.bool)
    mask[1, :, :, :, 1:N + 1] = False
    assert torch.equal(big_state[mask], before[mask])


def test_ssd_step_many_steps_equal_recurrent():
    """L kernel steps reproduce the recurrent scan (outputs and final state)."""
    B, L, H, G, P, N = 2, 5, 4, 2, 6, 8
    gen = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    x, dt, Bm, Cm, z = mk(B, L, H, P), mk(B, L, H), mk(B, L, G, N), mk(B, L, G, N), mk(B, L, H, P)
    A, D, bias, h0 = -torch.rand(H, generator=gen).to(DEVICE), mk(H), mk(H), mk(B, H, P, N)
    kw = dict(D=D, dt_bias=bias, dt_softplus=True, dt_limit=(0.01, 3.0))
    y_ref, final = ssd_ref.ssd_recurrent(x, dt, A, Bm, Cm, z=z, initial_state=h0, return_final_state=True,
                                         **kw)
    state = h0.clone()
    ys = [kern.ssd_step_triton(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], state, z=z[:, t], **kw)
          for t in range(L)]
    _close(torch.stack(ys, 1), y_ref, scale=4)
    _close(state, final, scale=4)


def test_ssd_step_half_inputs_fp32_state():
    """fp16 activations with an fp32 state (the usual decode setup); y comes back in fp16."""
    t, kw = _ssd_inputs(2, 4, 1, 8, 16, D="h", z=True)
    t16 = {k: (v.half() if k in ("x", "Bm", "Cm") else v) for k, v in t.items()}
    kw16 = {k: (v.half() if k == "z" else v) for k, v in kw.items()}
    y_ker, s_ker, y_ref, s_ref = _run_ssd(t16, kw16)
    assert y_ker.dtype == torch.float16 and s_ker.dtype == torch.float32
    torch.testing.assert_close(y_ker.float(), y_ref.float(), rtol=2e-3, atol=2e-3)
    _close(s_ker, s_ref)


def test_ssd_step_dispatch():
    """Layers call hybridize.ops.ssd.ssd_step (reference or, once dispatched, this kernel): both agree."""
    t, kw = _ssd_inputs(1, 2, 1, 4, 4)
    from hybridize.ops import ssd as ssd_ops
    s1, s2 = t["state"].clone(), t["state"].clone()
    y1 = ssd_ops.ssd_step(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], s1, **kw)
    y2 = kern.ssd_step_triton(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], s2, **kw)
    _close(y1, y2)
    _close(s1, s2)


def test_ssd_step_custom_op_registration():
    """The torch.library op (what torch.compile / CUDA graphs capture) and its fake agree with eager."""
    t, kw = _ssd_inputs(2, 4, 2, 5, 6, D="h", z=True, bias=True)
    s1, s2 = t["state"].clone(), t["state"].clone()
    args = (t["x"], t["dt"], t["A"], t["Bm"], t["Cm"])
    y1 = torch.ops.hybridize.ssd_step(*args, s1, kw["D"], kw["z"], kw["dt_bias"], None, True, 0.0,
                                      float("inf"))
    y2 = ssd_ref.ssd_step(*args, s2, dt_softplus=True, **kw)
    _close(y1, y2)
    _close(s1, s2)
    # schema (declared mutation), fake tensor, autograd registration, AOT dispatch
    torch.library.opcheck(torch.ops.hybridize.ssd_step,
                          (*args, t["state"].clone(), kw["D"], kw["z"], kw["dt_bias"], None, True, 0.0, 2.0))


# ----------------------------------------------------------------------------- shared rows, A_log
# The decode step of a Mamba-in-the-Llama layer reads x (B, Hx, P) and B (B, Gb, N) per kv head and
# C (B, Gc, N) per query head straight from the conv output, and A_log instead of A = -exp(A_log).
def _shared_inputs(B, H, Hx, Gb, Gc, P, N, *, seed=0, state_dtype=torch.float32, z=False):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    t = dict(x=mk(B, Hx, P), dt=mk(B, H) * 0.7, Bm=mk(B, Gb, N), Cm=mk(B, Gc, N),
             state=mk(B, H, P, N).to(state_dtype), A_log=torch.log(torch.rand(H, generator=gen) * 3 + 0.5))
    kw = dict(D=mk(H), z=mk(B, H, P) if z else None, dt_bias=mk(H) * 0.5 - 1.0, dt_softplus=True)
    mv = lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {k: mv(v) for k, v in t.items()}, {k: mv(v) for k, v in kw.items()}


def _step_both(t, kw, decay):
    """Kernel and reference on clones of the state; decay "A_log" passes A_log, "A" passes -exp(A_log)."""
    dec = dict(A=None, A_log=t["A_log"]) if decay == "A_log" else dict(A=-torch.exp(t["A_log"]), A_log=None)
    out = []
    for fn in (kern.ssd_step_triton, ssd_ref.ssd_step):
        s = t["state"].clone()
        y = fn(t["x"], t["dt"], dec["A"], t["Bm"], t["Cm"], s, A_log=dec["A_log"], **kw)
        out += [y, s]
    return out


_SHARED_CASES = {   # (B, H, Hx, Gb, Gc, P, N)
    "x_one_row": (3, 8, 1, 2, 8, 8, 16),
    "x_quarter_mil": (1, 8, 2, 2, 8, 8, 16),        # Hx = H / 4 = Gb, Gc = H (the MIL layout)
    "x_per_head_Gb_ne_Gc": (3, 8, 8, 1, 4, 8, 16),
    "awkward": (3, 6, 2, 3, 6, 24, 17),             # P, N not powers of two; Gb != Gc != Hx
    "awkward_b1_gate": (1, 6, 2, 3, 6, 24, 17),
}


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", ["A_log", "A"])
@pytest.mark.parametrize("case", list(_SHARED_CASES))
def test_ssd_step_shared_rows_match_reference(case, decay, state_dtype):
    B, H, Hx, Gb, Gc, P, N = _SHARED_CASES[case]
    t, kw = _shared_inputs(B, H, Hx, Gb, Gc, P, N, state_dtype=state_dtype, z=case.endswith("gate"))
    y_ker, s_ker, y_ref, s_ref = _step_both(t, kw, decay)
    assert y_ker.shape == (B, H, P) and s_ker.dtype == state_dtype
    _close(y_ker, y_ref, state_dtype)
    _close(s_ker, s_ref, state_dtype)


@pytest.mark.parametrize("case", ["x_one_row", "awkward"])
def test_ssd_step_shared_rows_reference_equals_explicit_repeat(case):
    """The generalised reference == the old call (x / B / C repeated to H heads, A = -exp(A_log)),
    bit for bit in fp32, and matches the recurrent scan on that explicit layout."""
    B, H, Hx, Gb, Gc, P, N = _SHARED_CASES[case]
    t, kw = _shared_inputs(B, H, Hx, Gb, Gc, P, N, z=True)
    s_new, s_old = t["state"].clone(), t["state"].clone()
    y_new = ssd_ref.ssd_step(t["x"], t["dt"], None, t["Bm"], t["Cm"], s_new, A_log=t["A_log"], **kw)
    y_old = ssd_ref.ssd_step(t["x"].repeat_interleave(H // Hx, 1), t["dt"], -torch.exp(t["A_log"].float()),
                             t["Bm"].repeat_interleave(H // Gb, 1), t["Cm"].repeat_interleave(H // Gc, 1),
                             s_old, **kw)
    assert torch.equal(y_new, y_old) and torch.equal(s_new, s_old)
    # the recurrent scan (an independent implementation) on the explicit layout, one token
    y_rec, s_rec = ssd_ref.ssd_recurrent(
        t["x"].repeat_interleave(H // Hx, 1)[:, None], t["dt"][:, None], -torch.exp(t["A_log"]),
        t["Bm"].repeat_interleave(H // Gb, 1)[:, None], t["Cm"].repeat_interleave(H // Gc, 1)[:, None],
        initial_state=t["state"], return_final_state=True, **{**kw, "z": kw["z"][:, None]})
    _close(y_new, y_rec[:, 0])
    _close(s_new, s_rec)


def test_ssd_step_mil_views_of_one_conv_output():
    """x / B / C as strided views of one (B, conv_dim) row (what Mamba2Mixer.step passes), a strided
    state; kernel == reference, and the input buffer is left alone."""
    B, H, Hx, P, N = 2, 6, 2, 5, 7
    gen = torch.Generator().manual_seed(7)
    conv = torch.randn(B, Hx * P + Hx * N + H * N + 3, generator=gen).to(DEVICE)
    x, Bm, Cm, _ = torch.split(conv, [Hx * P, Hx * N, H * N, 3], dim=-1)
    x, Bm, Cm = x.unflatten(-1, (Hx, P)), Bm.unflatten(-1, (Hx, N)), Cm.unflatten(-1, (H, N))
    big = torch.randn(B, H, P, N + 2, generator=gen).to(DEVICE)
    state = big[..., 1:N + 1]
    dt, A_log = torch.randn(B, H, generator=gen).to(DEVICE), torch.randn(H, generator=gen).to(DEVICE)
    before, ref_state = conv.clone(), state.clone()
    y = kern.ssd_step_triton(x, dt, None, Bm, Cm, state, A_log=A_log, dt_softplus=True)
    y_ref = ssd_ref.ssd_step(x, dt, None, Bm, Cm, ref_state, A_log=A_log, dt_softplus=True)
    _close(y, y_ref)
    _close(state, ref_state)
    assert torch.equal(conv, before)


def test_ssd_step_shared_rows_dispatch_and_custom_op(monkeypatch):
    """The dispatching name (kernel forced on / off) and the torch.library op with A_log and shared rows
    (its fake gives y (B, H, P), not x's shape)."""
    from hybridize.ops import ssd as ssd_ops
    t, kw = _shared_inputs(2, 6, 2, 3, 6, 5, 6, z=True)
    args = (t["x"], t["dt"], None, t["Bm"], t["Cm"])
    ys, states = [], []
    for flag in ("1", "0"):
        monkeypatch.setenv("HYBRIDIZE_KERNELS", flag)
        states.append(t["state"].clone())
        ys.append(ssd_ops.ssd_step(*args, states[-1], A_log=t["A_log"], **kw))
    s_op = t["state"].clone()
    op_args = (*args, s_op, kw["D"], kw["z"], kw["dt_bias"], None, True, 0.0, float("inf"), t["A_log"])
    ys.append(torch.ops.hybridize.ssd_step(*op_args))
    states.append(s_op)
    for y, s in zip(ys[1:], states[1:], strict=True):
        _close(ys[0], y)
        _close(states[0], s)
    torch.library.opcheck(torch.ops.hybridize.ssd_step, (*op_args[:5], t["state"].clone(), *op_args[6:]))
    torch.library.opcheck(torch.ops.hybridize.ssd_step, (*op_args[:5], t["state"].clone(), *op_args[6:-1]),
                          dict(A_log=t["A_log"]))


@pytest.mark.parametrize("fn", ["reference", "kernel", "dispatch"])
def test_ssd_step_bad_arguments_raise_clearly(fn):
    from hybridize.ops import ssd as ssd_ops
    step = dict(reference=ssd_ref.ssd_step, kernel=kern.ssd_step_triton, dispatch=ssd_ops.ssd_step)[fn]
    t, _ = _shared_inputs(1, 6, 2, 3, 6, 4, 5)
    A = -torch.exp(t["A_log"])

    def call(x=t["x"], Bm=t["Bm"], Cm=t["Cm"], A=None, A_log=t["A_log"], log_decay=None):
        return step(x, t["dt"], A, Bm, Cm, t["state"].clone(), A_log=A_log, log_decay=log_decay)

    rule = r"x \(B, Hx, P\).*dividing H"
    with pytest.raises(ValueError, match=rule + r".*x \(1, 4, 4\)"):
        call(x=torch.randn(1, 4, 4, device=DEVICE))             # 4 does not divide H = 6
    with pytest.raises(ValueError, match=rule + r".*Bm \(1, 4, 5\)"):
        call(Bm=torch.randn(1, 4, 5, device=DEVICE))
    with pytest.raises(ValueError, match=rule + r".*Cm \(1, 5, 5\)"):
        call(Cm=torch.randn(1, 5, 5, device=DEVICE))
    with pytest.raises(ValueError, match=rule):
        call(x=torch.randn(1, 2, 3, device=DEVICE))             # P differs from the state's
    with pytest.raises(ValueError, match="not both"):
        call(A=A)
    with pytest.raises(ValueError, match="required"):
        call(A_log=None)
    # log_decay replaces dt·A: it needs neither (the discrete Mamba-2 call)
    call(A_log=None, log_decay=-torch.rand(1, 6, device=DEVICE))


# ----------------------------------------------------------------------------- Mamba-1 step
def _ss_inputs(B, C, N, G, *, D=True, z=True, bias=True, seed=0, state_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    bc = (B, N) if G is None else (B, G, N)
    t = dict(u=mk(B, C), delta=mk(B, C) * 0.5, A=-torch.exp(mk(C, N) * 0.5), Bm=mk(*bc), Cm=mk(*bc),
             state=mk(B, C, N).to(state_dtype))
    kw = dict(D=mk(C) if D else None, z=mk(B, C) if z else None, delta_bias=mk(C) * 0.3 if bias else None)
    return ({k: v.to(DEVICE) for k, v in t.items()},
            {k: (v.to(DEVICE) if v is not None else None) for k, v in kw.items()})


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [
    dict(B=2, C=12, N=5, G=None),                                   # shared B/C, odd N
    dict(B=3, C=12, N=16, G=3, softplus=False),                     # grouped
    dict(B=1, C=7, N=3, G=None, D=False, z=False, bias=False),      # bare
    dict(B=2, C=40, N=17, G=4),                                     # several channel blocks
])
def test_selective_scan_step_matches_reference(case, state_dtype):
    case = dict(case)
    softplus = case.pop("softplus", True)
    t, kw = _ss_inputs(**case, state_dtype=state_dtype)
    s_ker, s_ref = t["state"].clone(), t["state"].clone()
    args = (t["u"], t["delta"], t["A"], t["Bm"], t["Cm"])
    y_ker = ss_kern.selective_scan_step_triton(*args, s_ker, delta_softplus=softplus, **kw)
    y_ref = ss_ref.selective_scan_step(*args, s_ref, delta_softplus=softplus, **kw)
    assert s_ker.dtype == state_dtype
    _close(y_ker, y_ref, state_dtype)
    _close(s_ker, s_ref, state_dtype)


def test_selective_scan_step_dispatch(monkeypatch):
    t, kw = _ss_inputs(2, 8, 4, None)
    args = (t["u"], t["delta"], t["A"], t["Bm"], t["Cm"])
    s1, s2 = t["state"].clone(), t["state"].clone()
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    y1 = ss_ops.selective_scan_step(*args, s1, delta_softplus=True, **kw)
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "0")
    y2 = ss_ops.selective_scan_step(*args, s2, delta_softplus=True, **kw)
    _close(y1, y2)
    _close(s1, s2)
    assert ss_ops.selective_scan_step_reference is ss_ref.selective_scan_step


def test_selective_scan_step_custom_op_registration():
    t, kw = _ss_inputs(2, 8, 4, 2)
    torch.library.opcheck(torch.ops.hybridize.selective_scan_step,
                          (t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], t["state"].clone(), kw["D"], kw["z"],
                           kw["delta_bias"], True))


# Launch variants of the Mamba-1 step (hybridize.ops.selective_scan.triton_step.TUNE): the first kernel
# ("legacy"), the (rows, channels, states) tile kernel with 1, 2, 4 batch rows per program (small tiles, so
# there are many channel blocks and partial ones), without the load fence / with other cache hints, and the
# persistent loop with a grid smaller than the number of tiles (2 programs under the interpreter) so it
# walks several tiles each.
_SS_VARIANTS = {
    "legacy": dict(ss_kern.LEGACY_TUNE),
    "default": {},
    "tile_r1": dict(variant="tile", rows=1, tile=64, warps=4),
    "tile_r2": dict(variant="tile", rows=2, tile=128, warps=4),
    "tile_r4_hints": dict(variant="tile", rows=4, tile=256, warps=2, fence=False, evict_first=False,
                          load_cache=".cg", store_cache=".cs"),
    "persistent": dict(variant="persistent", rows=2, tile=64, warps=4, programs_per_sm=1),
}

_SS_CASES = [
    dict(B=1, C=7, N=1, G=None),                                    # N = 1, odd C, one row
    dict(B=3, C=13, N=16, G=None, z=False),                         # odd C, three rows, no gate
    dict(B=3, C=20, N=64, G=4, D=False),                            # N = 64, groups straddle blocks
    dict(B=2, C=24, N=5, G=6, softplus=False, bias=False),          # odd N, groups, raw delta
    dict(B=4, C=32, N=16, G=None),                                  # whole blocks (unmasked tile path)
    dict(B=4, C=32, N=16, G=4, z=False, D=False, bias=False),       # groups of whole blocks
]


@pytest.fixture
def ss_tune():
    """Set hybridize.ops.selective_scan.triton_step.TUNE for one test; restored afterwards."""
    saved = dict(ss_kern.TUNE)

    def set_(**kw):
        ss_kern.TUNE.clear()
        ss_kern.TUNE.update(saved)
        ss_kern.TUNE.update(kw)
    yield set_
    ss_kern.TUNE.clear()
    ss_kern.TUNE.update(saved)


def _ss_check(case, state_dtype, state=None):
    case = dict(case)
    softplus = case.pop("softplus", True)
    t, kw = _ss_inputs(**case, state_dtype=state_dtype)
    s_ker = t["state"].clone() if state is None else state
    s_ref = s_ker.clone()
    args = (t["u"], t["delta"], t["A"], t["Bm"], t["Cm"])
    y_ker = ss_kern.selective_scan_step_triton(*args, s_ker, delta_softplus=softplus, **kw)
    y_ref = ss_ref.selective_scan_step(*args, s_ref, delta_softplus=softplus, **kw)
    assert s_ker.dtype == state_dtype and y_ker.dtype == t["u"].dtype
    _close(y_ker, y_ref, state_dtype)
    _close(s_ker, s_ref, state_dtype)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(_SS_CASES)))
@pytest.mark.parametrize("variant", list(_SS_VARIANTS))
def test_selective_scan_step_variants(variant, case, state_dtype, ss_tune):
    ss_tune(**_SS_VARIANTS[variant])
    _ss_check(_SS_CASES[case], state_dtype)


def test_selective_scan_step_tile_shape():
    """(BB, BC, BN): rows capped by the batch, channels by C, BN = next_pow2(N) ≥ 2; the even case above
    really runs unmasked with tile_r2 (B, C, N multiples of BB, BC, BN)."""
    assert ss_kern.tile_shape(64, 5120, 16, dict(rows=2, tile=2048)) == (2, 64, 16)
    assert ss_kern.tile_shape(1, 7, 1, dict(rows=4, tile=2048)) == (1, 8, 2)
    assert ss_kern.tile_shape(3, 40, 64, dict(rows=2, tile=64)) == (2, 1, 64)
    assert ss_kern.tile_shape(64, 5120, 17, dict(rows=3, tile=4096)) == (4, 32, 32)
    BB, BC, BN = ss_kern.tile_shape(4, 32, 16, _SS_VARIANTS["tile_r2"])
    assert 4 % BB == 0 and 32 % BC == 0 and BN == 16


@pytest.mark.parametrize("variant", ["legacy", "tile_r2", "persistent"])
def test_selective_scan_step_strided_state(variant, ss_tune):
    """A state that is a view of a bigger cache (padded N, one layer of three) is updated in place through
    its strides and nothing around it changes."""
    ss_tune(**_SS_VARIANTS[variant])
    B, C, N = 3, 12, 6
    big = torch.randn(3, B, C, N + 3, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    before = big.clone()
    state = big[1, :, :, 1:N + 1]
    _ss_check(dict(B=B, C=C, N=N, G=None), torch.float32, state=state)
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[1, :, :, 1:N + 1] = False
    assert torch.equal(big[mask], before[mask])


@pytest.mark.parametrize("variant", ["tile_r2", "persistent"])
def test_selective_scan_step_int64_offsets(variant, ss_tune, monkeypatch):
    """The int64 in-tile offset path (taken for strides past int32) gives the same result."""
    ss_tune(**_SS_VARIANTS[variant])
    monkeypatch.setattr(ss_kern, "_I32_MAX", 0)
    _ss_check(dict(B=3, C=13, N=5, G=None), torch.float32)


@pytest.mark.parametrize("variant", ["default", "tile_r4_hints", "persistent"])
def test_selective_scan_step_fp16_state(variant, ss_tune):
    ss_tune(**_SS_VARIANTS[variant])
    t, kw = _ss_inputs(3, 24, 16, 2, state_dtype=torch.float16)
    s_ker, s_ref = t["state"].clone(), t["state"].clone()
    args = (t["u"], t["delta"], t["A"], t["Bm"], t["Cm"])
    y_ker = ss_kern.selective_scan_step_triton(*args, s_ker, delta_softplus=True, **kw)
    y_ref = ss_ref.selective_scan_step(*args, s_ref, delta_softplus=True, **kw)
    assert s_ker.dtype == torch.float16
    torch.testing.assert_close(y_ker.float(), y_ref.float(), rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(s_ker.float(), s_ref.float(), rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("variant", ["default", "persistent"])
def test_selective_scan_step_many_steps_equal_scan(variant, ss_tune):
    """L kernel steps reproduce the sequential selective scan (outputs and final state)."""
    ss_tune(**_SS_VARIANTS[variant])
    B, L, C, N, G = 2, 5, 12, 8, 3
    gen = torch.Generator().manual_seed(2)
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    u, delta, Bm, Cm, z = mk(B, L, C), mk(B, L, C) * 0.5, mk(B, L, G, N), mk(B, L, G, N), mk(B, L, C)
    A, D, bias, h0 = -torch.exp(mk(C, N) * 0.5), mk(C), mk(C) * 0.3, mk(B, C, N)
    kw = dict(D=D, delta_bias=bias, delta_softplus=True)
    y_ref, final = ss_ref.selective_scan(u, delta, A, Bm, Cm, z=z, initial_state=h0, return_final_state=True,
                                         **kw)
    state = h0.clone()
    ys = [ss_kern.selective_scan_step_triton(u[:, t], delta[:, t], A, Bm[:, t], Cm[:, t], state, z=z[:, t],
                                             **kw) for t in range(L)]
    _close(torch.stack(ys, 1), y_ref, scale=4)
    _close(state, final, scale=4)


def test_selective_scan_step_unknown_variant(ss_tune):
    ss_tune(variant="nope")
    t, kw = _ss_inputs(1, 4, 2, None)
    with pytest.raises(ValueError, match="variant"):
        ss_kern.selective_scan_step_triton(t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], t["state"], **kw)


# ------------------------------------------------------------------------------------------------ GPU only
# Real decode shapes: the kernel on its native dtypes against the fp32 reference run on the same (rounded)
# inputs and an fp32 copy of the same state. Expected differences:
# * fp32: only the summation order over N (y) and the exp implementation — ~1e-6 relative, so a relative
#   max error (normalised by the largest |value|) of 1e-4 leaves a 100x margin and still catches any
#   wrong index, mask or stride (those give O(1) errors);
# * bf16 outputs / states: one rounding at the store, <= 2^-9 relative per element (RMS ~1e-3); the
#   relative Frobenius error must stay <= 1e-2.
from _tolerances import assert_real as _assert_real  # noqa: E402
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [
    dict(B=2, H=4, G=1, P=8, N=16, group=0, D="h"),                  # one group a head
    dict(B=3, H=6, G=3, P=12, N=7, group=4, D="hp", bias=True),       # P not a power of two, 3 groups a head
    dict(B=1, H=2, G=2, P=6, N=33, group=3, log_decay=True),          # 2 groups, discrete decay
    dict(B=2, H=2, G=1, P=64, N=128, group=64, D="h"),                # MIL shape: whole head over tile bytes
])
def test_ssd_step_gated_norm_epilogue(case, state_dtype, monkeypatch):
    """norm_weight: the gated RMSNorm inside the step = `GatedRMSNorm` (norm_before_gate=False, groups within a
    head) on the un-normalised step output; the kernel against the reference, the reference against the
    module. The last case's fp32 state would take two P blocks a head without the norm."""
    from hybridize.layers.norm import GatedRMSNorm
    case = dict(case)
    group = case.pop("group")
    t, kw = _ssd_inputs(**case, z=True, state_dtype=state_dtype)
    H, P = t["x"].shape[1:]
    norm = GatedRMSNorm(H * P, eps=1e-5, group_size=group or P).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(H * P, generator=torch.Generator().manual_seed(9)))
    nkw = dict(norm_weight=norm.weight.detach(), norm_eps=1e-5, norm_group=group)
    y_ker, s_ker, y_ref, s_ref = _run_ssd(t, kw, **nkw)
    _close(s_ker, s_ref, state_dtype)
    _close(y_ker, y_ref, state_dtype, scale=10)
    # the definition: the module on the plain step's pre-gate output
    plain_kw = dict(kw, z=None)
    y_plain = ssd_ref.ssd_step(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], t["state"].clone(), **plain_kw)
    B = t["x"].shape[0]
    want = norm(y_plain.reshape(B, H * P), kw["z"].reshape(B, H * P)).reshape(B, H, P)
    torch.testing.assert_close(y_ref, want.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divide"):
        ssd_ref.ssd_step(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], t["state"].clone(), **kw,
                         norm_weight=norm.weight.detach(), norm_group=P + 1)


from _tolerances import rel_errors as _rel  # noqa: E402


_SSD_REAL = {
    # Mamba-2 decode (the target shape): tied per-head decay A (H,), one group, D (H,), dt bias
    "mamba2": dict(B=64, H=80, G=1, P=64, N=128, D="h", bias=True, softplus=True),
    # ngroups > 1, per-channel D, z gate, dt limits
    "mamba2_groups_gate": dict(B=32, H=64, G=8, P=64, N=128, D="hp", z=True, bias=True, softplus=True,
                               limit=(0.001, 0.5)),
    # discrete Mamba-2 (Phi-Mamba / Llamba): input-dependent log decay, no A, z gate
    "discrete_mamba2": dict(B=64, H=32, G=8, P=64, N=64, log_decay=True, D="h", z=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(_SSD_REAL))
def test_gpu_ssd_step_real_shape(case, dtype, state_dtype):
    c = dict(_SSD_REAL[case])
    softplus, limit = c.pop("softplus", False), c.pop("limit", (0.0, float("inf")))
    t, kw = _ssd_inputs(**c, state_dtype=state_dtype)
    t = {k: (v.to(dtype) if k in ("x", "Bm", "Cm") else v) for k, v in t.items()}
    kw = {k: (v.to(dtype) if k == "z" and v is not None else v) for k, v in kw.items()}
    args = (t["x"], t["dt"], t["A"], t["Bm"], t["Cm"])
    state = t["state"].clone()
    y = kern.ssd_step_triton(*args, state, **kw, dt_softplus=softplus, dt_limit=limit)
    f32 = lambda v: v.float() if isinstance(v, torch.Tensor) else v  # noqa: E731
    s_ref = t["state"].float()
    y_ref = ssd_ref.ssd_step(*map(f32, args), s_ref, **{k: f32(v) for k, v in kw.items()},
                             dt_softplus=softplus, dt_limit=limit)
    assert y.dtype == dtype and state.dtype == state_dtype
    _assert_real("y", y, y_ref, dtype != torch.float32)
    _assert_real("state", state, s_ref, state_dtype != torch.float32)


_SS_REAL = {
    # Mamba-1 (d_inner 4096, d_state 16, B/C shared by all channels)
    "mamba1_4096": dict(B=64, C=4096, N=16, G=None),
    # Mamba-1 in the Llama layout: B/C per head (32 heads of 64 channels), d_state 64
    "mil_2048_n64": dict(B=64, C=2048, N=64, G=32),
}


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(_SS_REAL))
def test_gpu_selective_scan_step_real_shape(case, dtype, state_dtype):
    t, kw = _ss_inputs(**_SS_REAL[case], state_dtype=state_dtype)
    t = {k: (v.to(dtype) if k in ("u", "delta", "Bm", "Cm") else v) for k, v in t.items()}
    kw = {k: (v.to(dtype) if k == "z" else v) for k, v in kw.items()}
    args = (t["u"], t["delta"], t["A"], t["Bm"], t["Cm"])
    state = t["state"].clone()
    y = ss_kern.selective_scan_step_triton(*args, state, delta_softplus=True, **kw)
    s_ref = t["state"].float()
    y_ref = ss_ref.selective_scan_step(*(a.float() for a in args), s_ref, delta_softplus=True,
                                       **{k: (v.float() if v is not None else None) for k, v in kw.items()})
    assert y.dtype == dtype and state.dtype == state_dtype
    _assert_real("y", y, y_ref, dtype != torch.float32)
    _assert_real("state", state, s_ref, state_dtype != torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(_SS_VARIANTS))
def test_gpu_selective_scan_step_variants_real_shape(variant, state_dtype, ss_tune):
    """Every launch variant at the Mamba-1 2.8B decode shape (batch 64, d_inner 5120, N 16; bf16
    activations) and the grouped N = 64 layout, against the fp32 reference."""
    ss_tune(**{**_SS_VARIANTS[variant], **({"tile": 2048} if variant != "default" else {}),
               **({"programs_per_sm": 4} if variant == "persistent" else {})})
    for shape in (dict(B=64, C=5120, N=16, G=None), _SS_REAL["mil_2048_n64"]):
        t, kw = _ss_inputs(**shape, state_dtype=state_dtype)
        t = {k: (v.to(torch.bfloat16) if k in ("u", "delta", "Bm", "Cm") else v) for k, v in t.items()}
        kw = {k: (v.to(torch.bfloat16) if k == "z" else v) for k, v in kw.items()}
        args = (t["u"], t["delta"], t["A"], t["Bm"], t["Cm"])
        state = t["state"].clone()
        y = ss_kern.selective_scan_step_triton(*args, state, delta_softplus=True, **kw)
        s_ref = t["state"].float()
        kw32 = {k: (v.float() if v is not None else None) for k, v in kw.items()}
        y_ref = ss_ref.selective_scan_step(*(a.float() for a in args), s_ref, delta_softplus=True, **kw32)
        _assert_real("y", y, y_ref, True)
        _assert_real("state", state, s_ref, state_dtype != torch.float32)


_MANY_STEPS = (8, 64, 80, 1, 64, 128)          # B, L, H, G, P, N


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_gpu_ssd_step_many_steps_real_shape(state_dtype):
    """64 kernel steps at B=8, H=80, P=64, N=128 reproduce the fp32 recurrent scan. A bf16 state is
    rounded after every step (as the reference ssd_step does), so its error grows like sqrt(steps) · 2^-9:
    relative Frobenius <= 3e-2 there; fp32 <= 1e-4 (relative max)."""
    B, L, H, G, P, N = _MANY_STEPS
    gen = torch.Generator().manual_seed(5)
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    x, dt, Bm, Cm = mk(B, L, H, P), mk(B, L, H), mk(B, L, G, N), mk(B, L, G, N)
    A, D, bias = (-torch.rand(H, generator=gen) * 2 - 0.1).to(DEVICE), mk(H), mk(H) * 0.5 - 1.0
    kw = dict(D=D, dt_bias=bias, dt_softplus=True)
    y_ref, final = ssd_ref.ssd_recurrent(x, dt, A, Bm, Cm, return_final_state=True, **kw)
    state = torch.zeros(B, H, P, N, device=DEVICE, dtype=state_dtype)
    ys = torch.stack([kern.ssd_step_triton(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], state, **kw)
                      for t in range(L)], 1)
    if state_dtype == torch.float32:
        for name, g, w in (("y", ys, y_ref), ("state", state, final)):
            mx = _rel(g, w)[1]
            assert mx <= 1e-4, f"{name}: relative max error {mx:.3g}"
    else:
        for name, g, w in (("y", ys, y_ref), ("state", state, final)):
            fro = _rel(g, w)[0]
            assert fro <= 3e-2, f"{name}: relative Frobenius error {fro:.3g}"
