"""Speculative verification for SSD layers (hybridize.ops.verify; Algorithm 2 of arXiv 2408.15237).

* verify = K sequential ssd_step calls, and leaves the state untouched;
* advance by per-row accepted counts = stepping each row that many times;
* verify(advance_prev=...) = advance, then verify (the fused lazy advance);
* several rounds with random acceptance reproduce the recurrent scan over the accepted tokens;
* kernels (Triton; the interpreter on CPU) = references, for fp32 and bf16 states, odd P/N, groups,
  D (H,) / (H, P), z, dt softplus + limits, log_decay (A = None).
`gpu` tests: real shapes (B = 64, H = 80, P = 64, N = 128; discrete Mamba-2), K = 4 and 8, fp32 and
bf16 activations and states, against the fp32 reference.
"""
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hybridize.ops import verify as V  # noqa: E402
from hybridize.ops.ssd import reference as ssd_ref  # noqa: E402
from hybridize.ops.ssd import triton_step as kern  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"

if not _CUDA and type(kern._ssd_verify_kernel).__name__ != "InterpretedFunction":
    pytest.skip("verify kernels were decorated without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)


def _close(a, b, state_dtype=torch.float32, scale=1.0):
    if state_dtype == torch.float32:
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5 * scale, atol=1e-5 * scale)
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


def _inputs(B, K, H, G, P, N, *, D=None, z=False, bias=False, log_decay=False, seed=0):
    """Per-token inputs of K tokens (B, K, ...) and the per-call keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    tok = dict(x=mk(B, K, H, P), dt=mk(B, K, H) * 0.7 + 0.3, Bm=mk(B, K, G, N), Cm=mk(B, K, G, N),
               z=mk(B, K, H, P) if z else None,
               log_decay=(-torch.rand(B, K, H, generator=gen) * 2).to(DEVICE) if log_decay else None)
    A = None if log_decay else (-torch.rand(H, generator=gen) * 1.5 - 0.1).to(DEVICE)
    par = dict(D=None if D is None else (mk(H) if D == "h" else mk(H, P)),
               dt_bias=mk(H) * 0.5 if bias else None)
    return tok, A, par


def _step_seq(state, tok, A, par, ks, **kw):
    """ssd_step over tokens ks (list of indices into the K axis) on `state` in place → list of y."""
    ys = []
    for k in ks:
        ys.append(ssd_ref.ssd_step(tok["x"][:, k], tok["dt"][:, k], A, tok["Bm"][:, k], tok["Cm"][:, k],
                                   state,
                                   z=None if tok["z"] is None else tok["z"][:, k],
                                   log_decay=None if tok["log_decay"] is None else tok["log_decay"][:, k],
                                   **par, **kw))
    return ys


def _verify(fn, tok, A, state, par, **kw):
    return fn(tok["x"], tok["dt"], A, tok["Bm"], tok["Cm"], state, z=tok["z"], log_decay=tok["log_decay"],
              **par, **kw)


CASES = [
    dict(B=2, K=4, H=4, G=1, P=8, N=16),
    dict(B=3, K=3, H=6, G=3, P=5, N=7, D="h", z=True, bias=True, softplus=True, limit=(0.05, 2.0)),
    dict(B=2, K=5, H=2, G=2, P=6, N=9, D="hp", log_decay=True),
    dict(B=1, K=1, H=2, G=1, P=3, N=5, D="h"),
]


def _split(case):
    case = dict(case)
    kw = dict(dt_softplus=case.pop("softplus", False), dt_limit=case.pop("limit", (0.0, float("inf"))))
    return case, kw


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_verify_equals_sequential_steps_and_keeps_state(case, state_dtype):
    case, kw = _split(case)
    tok, A, par = _inputs(**case)
    B, K, H, G, P, N = (case[k] for k in "B K H G P N".split())
    state = torch.randn(B, H, P, N, generator=torch.Generator().manual_seed(9)).to(DEVICE).to(state_dtype)
    before = state.clone()
    y_ker = _verify(kern.ssd_verify_triton, tok, A, state, par, **kw)
    assert torch.equal(state, before), "verify must not write the state"
    y_ref = _verify(V.ssd_verify_reference, tok, A, state, par, **kw)
    assert torch.equal(state, before)
    y_steps = torch.stack(_step_seq(state.clone(), tok, A, par, range(K), **kw), 1)
    _close(y_ref, y_steps)                                 # the reference is K ssd_steps
    _close(y_ker, y_ref, state_dtype)
    assert y_ker.shape == (B, K, H, P) and y_ker.dtype == tok["x"].dtype


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:3])
def test_advance_by_accepted_counts(case, state_dtype):
    case, kw = _split(case)
    tok, A, par = _inputs(**case, seed=1)
    B, K, H, G, P, N = (case[k] for k in "B K H G P N".split())
    state = torch.randn(B, H, P, N, generator=torch.Generator().manual_seed(2)).to(DEVICE).to(state_dtype)
    accepted = torch.tensor([(K, 0, 2)[b % 3] for b in range(B)], device=DEVICE).clamp(max=K)
    s_ker, s_ref = state.clone(), state.clone()
    adv = dict(log_decay=tok["log_decay"], dt_bias=par["dt_bias"], **kw)
    kern.ssd_advance_triton(s_ker, tok["x"], tok["dt"], A, tok["Bm"], accepted, **adv)
    V.ssd_advance_reference(s_ref, tok["x"], tok["dt"], A, tok["Bm"], accepted, **adv)
    for b in range(B):                                     # ground truth: step row b accepted[b] times
        sb = state[b:b + 1].clone()
        tb = {k: (v[b:b + 1] if v is not None else None) for k, v in tok.items()}
        _step_seq(sb, tb, A, par, range(int(accepted[b])), **kw)
        _close(s_ref[b:b + 1], sb)
        if int(accepted[b]) == 0:
            assert torch.equal(s_ker[b], state[b]), "a row with nothing accepted must not be rewritten"
    _close(s_ker, s_ref, state_dtype)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_fused_advance_then_verify(state_dtype):
    B, Kp, K, H, G, P, N = 3, 4, 3, 4, 2, 6, 10
    kw = dict(dt_softplus=True, dt_limit=(0.0, 5.0))
    prev, A, par = _inputs(B, Kp, H, G, P, N, D="h", z=True, bias=True, seed=4)
    tok, _, _ = _inputs(B, K, H, G, P, N, z=True, seed=5)
    state = torch.randn(B, H, P, N, generator=torch.Generator().manual_seed(6)).to(DEVICE).to(state_dtype)
    accepted = torch.tensor([1, 4, 0], device=DEVICE)
    pending = (V.PendingSteps(prev["x"], prev["dt"], prev["Bm"]), accepted)
    s_ker, s_ref, s_two = state.clone(), state.clone(), state.clone()
    y_ker = _verify(kern.ssd_verify_triton, tok, A, s_ker, par, advance_prev=pending, **kw)
    y_ref = _verify(V.ssd_verify_reference, tok, A, s_ref, par, advance_prev=pending, **kw)
    # unfused: advance, then verify
    V.ssd_advance_reference(s_two, prev["x"], prev["dt"], A, prev["Bm"], accepted, dt_bias=par["dt_bias"],
                            **kw)
    y_two = _verify(V.ssd_verify_reference, tok, A, s_two, par, **kw)
    _close(y_ref, y_two)
    _close(s_ref, s_two)
    _close(y_ker, y_ref, state_dtype)
    _close(s_ker, s_ref, state_dtype)
    assert torch.equal(s_ker[2], state[2])


@pytest.mark.parametrize("use_kernel", [False, True])
def test_speculative_rounds_match_recurrent_scan(use_kernel):
    """Algorithm 2 end to end for one layer: rounds of T = 3 tokens, random acceptance per row, the
    lazy advance fused into the next round, a final flush. The outputs of every accepted token and the
    final state equal a plain recurrent scan over each row's accepted tokens."""
    B, T, H, G, P, N, rounds = 2, 3, 4, 2, 5, 6, 4
    gen = torch.Generator().manual_seed(11)
    verify = kern.ssd_verify_triton if use_kernel else V.ssd_verify_reference
    advance = kern.ssd_advance_triton if use_kernel else V.ssd_advance_reference
    A = (-torch.rand(H, generator=gen) - 0.1).to(DEVICE)
    par = dict(D=torch.randn(H, generator=gen).to(DEVICE), dt_bias=torch.randn(H, generator=gen).to(DEVICE),
               dt_softplus=True)
    state = torch.zeros(B, H, P, N, device=DEVICE)
    pending = None
    kept = [[] for _ in range(B)]                 # per row: (x, dt, Bm, Cm, y) of accepted tokens
    for r in range(rounds):
        tok, _, _ = _inputs(B, T, H, G, P, N, seed=100 + r)
        y = verify(tok["x"], tok["dt"], A, tok["Bm"], tok["Cm"], state, advance_prev=pending, **par)
        n = torch.randint(0, T + 1, (B,), generator=gen)
        for b in range(B):
            for k in range(int(n[b])):
                kept[b].append(tuple(tok[f][b, k] for f in ("x", "dt", "Bm", "Cm")) + (y[b, k],))
        pending = (V.PendingSteps(tok["x"], tok["dt"], tok["Bm"]), n.to(DEVICE))
    prev, n = pending
    advance(state, prev.x, prev.dt, A, prev.Bm, n, dt_bias=par["dt_bias"], dt_softplus=True)
    for b in range(B):
        if not kept[b]:
            assert torch.count_nonzero(state[b]) == 0
            continue
        x, dt, Bm, Cm, y = (torch.stack([t[i] for t in kept[b]])[None] for i in range(5))
        y_ref, final = ssd_ref.ssd_recurrent(x, dt, A, Bm, Cm, return_final_state=True, **par)
        _close(y, y_ref, scale=10)
        _close(state[b:b + 1], final, scale=10)


def test_dispatch_and_tuple_inputs(monkeypatch):
    tok, A, par = _inputs(2, 3, 2, 1, 4, 4, D="h")
    prev, _, _ = _inputs(2, 2, 2, 1, 4, 4, seed=3)
    state = torch.randn(2, 2, 4, 4, device=DEVICE)
    pending = ((prev["x"], prev["dt"], prev["Bm"]), torch.tensor([2, 1], device=DEVICE))   # a plain tuple
    s1, s2 = state.clone(), state.clone()
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    y1 = _verify(V.ssd_verify, tok, A, s1, par, advance_prev=pending)
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "0")
    y2 = _verify(V.ssd_verify, tok, A, s2, par, advance_prev=pending)
    _close(y1, y2)
    _close(s1, s2)


def test_custom_op_registration():
    tok, A, par = _inputs(2, 3, 4, 2, 5, 6, D="h", z=True)
    state = torch.randn(2, 4, 5, 6, device=DEVICE)
    args = (tok["x"], tok["dt"], A, tok["Bm"], tok["Cm"], state, par["D"], tok["z"], None, None)
    torch.library.opcheck(torch.ops.hybridize.ssd_verify, args + (True, 0.0, float("inf")))
    acc = torch.tensor([0, 3], device=DEVICE)
    torch.library.opcheck(torch.ops.hybridize.ssd_advance_verify,
                          args + (tok["x"], tok["dt"], tok["Bm"], None, acc, True, 0.0, float("inf")))


# ------------------------------------------------------------------------------------------------ GPU only
# Real shapes (Mamba-2 decode: B=64, H=80, P=64, N=128; discrete Mamba-2 with per-token log decay), K = 4
# and 8 drafted tokens, fp32 and bf16 activations x fp32 and bf16 states. Ground truth: the reference
# (K sequential ssd_steps, after the accepted-prefix advance) on fp32 copies of the same rounded inputs
# and of the same state, so the truth never rounds the state. The kernel keeps the running state in fp32
# registers too: fp32 differs by summation order only (relative max error <= 1e-4, ~100x the expected
# ~1e-6); bf16 outputs / stored states are rounded once (<= 2^-9 per element): relative Frobenius <= 1e-2
# (measured under the interpreter: ~5e-4 for outputs after a bf16 state's advance).
from _tolerances import assert_real as _assert_real  # noqa: E402
from _tolerances import rel_errors as _rel  # noqa: E402


_REAL = {
    "mamba2": dict(B=64, H=80, G=1, P=64, N=128, D="h", bias=True, softplus=True),
    "discrete_mamba2": dict(B=32, H=32, G=8, P=64, N=64, D="h", z=True, log_decay=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [4, 8])
@pytest.mark.parametrize("case", list(_REAL))
def test_gpu_verify_real_shape(case, K, dtype, state_dtype):
    c = dict(_REAL[case])
    kw = dict(dt_softplus=c.pop("softplus", False))
    B, H, G, P, N = (c[k] for k in "B H G P N".split())
    shape = {k: c.pop(k) for k in "B H G P N".split()}
    prev, A, par = _inputs(**shape, K=K, **c, seed=1)           # the previous round (accepted prefixes)
    tok, _, _ = _inputs(**shape, K=K, **c, seed=2)              # this round's K tokens
    lo = lambda d: {k: (v.to(dtype) if v is not None and k in ("x", "Bm", "Cm", "z") else v)  # noqa: E731
                    for k, v in d.items()}
    prev, tok = lo(prev), lo(tok)
    state0 = torch.randn(B, H, P, N, generator=torch.Generator().manual_seed(3)).to(DEVICE).to(state_dtype)
    accepted = (torch.arange(B, device=DEVICE) % (K + 1))       # every count 0 … K
    f32 = lambda d: {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}  # noqa: E731

    # plain verification: K outputs, state untouched
    state = state0.clone()
    y = _verify(kern.ssd_verify_triton, tok, A, state, par, **kw)
    assert torch.equal(state, state0), "verify must not write the state"
    y_ref = _verify(V.ssd_verify_reference, f32(tok), A, state0.float(), par, **kw)
    assert y.dtype == dtype
    _assert_real("y (verify)", y, y_ref, dtype != torch.float32)

    # the fused lazy advance by each row's accepted prefix of the previous round, then verification
    pending = (V.PendingSteps(prev["x"], prev["dt"], prev["Bm"], prev["log_decay"]), accepted)
    pending_ref = (V.PendingSteps(*(v.float() if v is not None else None for v in pending[0])), accepted)
    state = state0.clone()
    y = _verify(kern.ssd_verify_triton, tok, A, state, par, advance_prev=pending, **kw)
    s_ref = state0.float()
    y_ref = _verify(V.ssd_verify_reference, f32(tok), A, s_ref, par, advance_prev=pending_ref, **kw)
    # a bf16 state is rounded when the advanced state is stored: the outputs that follow it may see
    # the rounded state (one rounding of the state, as a separate advance would give), hence bf16 tolerance
    _assert_real("y (advance + verify)", y, y_ref, dtype != torch.float32 or state_dtype != torch.float32)
    _assert_real("state (advance)", state, s_ref, state_dtype != torch.float32)
    idle = accepted == 0
    assert torch.equal(state[idle], state0[idle]), "rows with nothing accepted are untouched"
