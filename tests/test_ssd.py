"""SSD op: the three forms (recurrent = ground truth, quadratic, chunked) agree on outputs, final states
and gradients; the recurrence itself matches a naive float64 transcription of the definition; document
resets equal running documents separately; ssd_step and ssd_mixing_matrix agree with the scan."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hybridize.ops.ssd import segsum, ssd_chunked, ssd_mixing_matrix, ssd_quadratic, ssd_recurrent, ssd_step

H, P, G, N = 6, 5, 3, 4   # H not a power of two, 3 groups (2 heads per group)


def _seq_idx(L, starts_per_row):
    rows = []
    for starts in starts_per_row:
        s = torch.zeros(L, dtype=torch.long)
        for t in starts:
            if t < L:
                s[t:] += 1
        rows.append(s)
    return torch.stack(rows)


# document starts: next to each other (one-token documents), on chunk boundaries (16, 48, 50, 100,
# 200), in the middle of chunks; row 1 has a single document so the state crosses every chunk.
_STARTS = {1: [[], []], 63: [[1, 16, 17, 40, 62], []], 257: [[5, 48, 49, 50, 100, 200, 256], []]}


def _inputs(L, variant, Bsz=2, seed=0, init=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    inp = dict(x=r(Bsz, L, H, P), Bm=r(Bsz, L, G, N, scale=0.5), Cm=r(Bsz, L, G, N, scale=0.5))
    kw = dict(D=r(H), z=r(Bsz, L, H, P))
    if variant == "raw":            # dt used as given (positive), A < 0
        inp["dt"] = torch.rand(Bsz, L, H, generator=g) * 0.5
        inp["A"] = -torch.exp(r(H, scale=0.5))
    elif variant == "softplus_limit":   # dt + dt_bias → softplus → clamp
        inp["dt"] = r(Bsz, L, H)
        inp["A"] = -torch.exp(r(H, scale=0.5))
        kw.update(dt_bias=r(H, scale=0.5), dt_softplus=True, dt_limit=(0.05, 0.9))
        kw["D"] = r(H, P)           # per-channel D
    elif variant == "log_decay":    # discrete Mamba-2 style: explicit per-step log decay, A unused
        inp["dt"] = torch.rand(Bsz, L, H, generator=g) + 0.5
        inp["A"] = None
        kw["log_decay"] = -F.softplus(r(Bsz, L, H))
    else:
        raise ValueError(variant)
    if init:
        kw["initial_state"] = r(Bsz, H, P, N)
    return inp, kw


def _run(fn, inp, kw, **extra):
    return fn(inp["x"], inp["dt"], inp["A"], inp["Bm"], inp["Cm"], **kw, **extra)


def _leaves(inp, kw):
    """Make every floating input a leaf requiring grad; return the dict name → tensor."""
    leaves = {}
    for d in (inp, kw):
        for k, v in list(d.items()):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                d[k] = v.detach().clone().requires_grad_(True)
                leaves[k] = d[k]
    return leaves


@pytest.mark.parametrize("L", [1, 63, 257])
@pytest.mark.parametrize("variant", ["raw", "softplus_limit", "log_decay"])
@pytest.mark.parametrize("docs", [False, True])
def test_forms_agree_outputs_states_grads(L, variant, docs):
    # one combination runs without an initial state (the zero-state path)
    inp, kw = _inputs(L, variant, init=not (variant == "raw" and docs))
    if docs:
        kw["seq_idx"] = _seq_idx(L, _STARTS[L])
    leaves = _leaves(inp, kw)
    g = torch.Generator().manual_seed(1)
    wy = torch.randn(2, L, H, P, generator=g)
    wf = torch.randn(2, H, P, N, generator=g)

    results = {}
    for name, fn, cs in [("recurrent", ssd_recurrent, 64), ("quadratic", ssd_quadratic, 64),
                         ("chunked16", ssd_chunked, 16), ("chunked50", ssd_chunked, 50),
                         ("chunked_big", ssd_chunked, 300)]:
        y, final = _run(fn, inp, kw, chunk_size=cs, return_final_state=True)
        assert y.shape == (2, L, H, P) and final.shape == (2, H, P, N) and final.dtype == torch.float32
        loss = (y * wy).sum() + (final * wf).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        results[name] = (y.detach(), final.detach(), dict(zip(leaves, grads)))

    y0, f0, g0 = results["recurrent"]
    assert y0.abs().max() > 0.1 and f0.abs().max() > 0.1   # non-trivial
    for name in ("quadratic", "chunked16", "chunked50", "chunked_big"):
        y, f, gr = results[name]
        torch.testing.assert_close(y, y0, rtol=1e-4, atol=1e-4, msg=f"{name}: y")
        torch.testing.assert_close(f, f0, rtol=1e-4, atol=1e-4, msg=f"{name}: final state")
        for k in g0:
            torch.testing.assert_close(gr[k], g0[k], rtol=1e-4, atol=2e-4, msg=f"{name}: grad {k}")


def _naive(x, dt, A, Bm, Cm, D, z, h0, starts, log_decay=None):
    """Float64 scalar-ish transcription of the definition, independent of the implementation."""
    Bsz, L, Hh, Pp = x.shape
    Gg, Nn = Bm.shape[2], Bm.shape[3]
    y = torch.zeros(Bsz, L, Hh, Pp, dtype=torch.float64)
    finals = torch.zeros(Bsz, Hh, Pp, Nn, dtype=torch.float64)
    for b in range(Bsz):
        for h in range(Hh):
            grp = h // (Hh // Gg)
            S = h0[b, h].double().clone()
            for t in range(L):
                if t in starts[b]:
                    S = torch.zeros_like(S)
                ld = float(log_decay[b, t, h]) if log_decay is not None else float(dt[b, t, h]) * float(A[h])
                S = math.exp(ld) * S + float(dt[b, t, h]) * torch.outer(x[b, t, h].double(), Bm[b, t, grp].double())
                out = S @ Cm[b, t, grp].double() + D[h].double() * x[b, t, h].double()
                y[b, t, h] = out * F.silu(z[b, t, h].double())
            finals[b, h] = S
    return y, finals


@pytest.mark.parametrize("variant", ["raw", "log_decay"])
def test_recurrent_matches_naive_definition(variant):
    L = 11
    inp, kw = _inputs(L, variant, seed=3)
    starts = [[3, 4, 9], []]
    kw["seq_idx"] = _seq_idx(L, starts)
    y, final = _run(ssd_recurrent, inp, kw, return_final_state=True)
    yn, fn = _naive(inp["x"], inp["dt"], inp["A"], inp["Bm"], inp["Cm"], kw["D"], kw["z"], kw["initial_state"],
                    starts, kw.get("log_decay"))
    torch.testing.assert_close(y.double(), yn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), fn, rtol=1e-5, atol=1e-5)


def test_dt_preprocessing_is_bias_softplus_clamp():
    L = 40
    inp, kw = _inputs(L, "softplus_limit", seed=4)
    y, f = _run(ssd_chunked, inp, kw, chunk_size=16, return_final_state=True)
    # same computation with dt processed by hand (and no bias / softplus / limit in the op)
    dt = (inp["dt"] + kw["dt_bias"]).double()
    dt = torch.clamp(torch.log1p(torch.exp(dt)), 0.05, 0.9).float()
    kw2 = {k: v for k, v in kw.items() if k not in ("dt_bias", "dt_softplus", "dt_limit")}
    y2, f2 = ssd_recurrent(inp["x"], dt, inp["A"], inp["Bm"], inp["Cm"], **kw2, return_final_state=True)
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f, f2, rtol=1e-4, atol=1e-4)
    # the limit actually bites for these inputs (otherwise the test would not test it)
    raw = F.softplus(inp["dt"] + kw["dt_bias"])
    assert (raw < 0.05).any() and (raw > 0.9).any()
    # the default limit (0, inf) still clamps: a negative raw dt acts as dt = 0 (mamba_ssm / transformers)
    dt_neg = inp["dt"]                                   # raw randn: about half negative
    y3 = ssd_chunked(inp["x"], dt_neg, inp["A"], inp["Bm"], inp["Cm"], chunk_size=16)
    y4 = ssd_recurrent(inp["x"], dt_neg.clamp(min=0), inp["A"], inp["Bm"], inp["Cm"])
    torch.testing.assert_close(y3, y4, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fn,cs", [(ssd_chunked, 16), (ssd_chunked, 7), (ssd_quadratic, 64), (ssd_recurrent, 64)])
def test_packed_documents_equal_separate_runs(fn, cs):
    L = 50
    inp, kw = _inputs(L, "softplus_limit", Bsz=1, seed=5)
    starts = [0, 9, 10, 16, 33]  # includes a one-token document and a start on a chunk boundary
    kw["seq_idx"] = _seq_idx(L, [starts[1:]])
    y, final = _run(fn, inp, kw, chunk_size=cs, return_final_state=True)
    bounds = starts + [L]
    for i, (s, e) in enumerate(itertools.pairwise(bounds)):
        sub = {k: (v[:, s:e] if v is not None and k != "A" else v) for k, v in inp.items()}
        kws = {k: v for k, v in kw.items() if k not in ("seq_idx", "initial_state")}
        kws["z"] = kw["z"][:, s:e]
        if i == 0:   # only the first document sees the initial state
            kws["initial_state"] = kw["initial_state"]
        yd, fd = _run(ssd_recurrent, sub, kws, return_final_state=True)
        torch.testing.assert_close(y[:, s:e], yd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, fd, rtol=1e-4, atol=1e-4)   # final state = last document's


def test_two_calls_with_state_equal_one_call():
    L, cut = 70, 29
    inp, kw = _inputs(L, "softplus_limit", seed=6)
    y, f = _run(ssd_chunked, inp, kw, chunk_size=16, return_final_state=True)
    a = {k: (v[:, :cut] if v is not None and k != "A" else v) for k, v in inp.items()}
    b = {k: (v[:, cut:] if v is not None and k != "A" else v) for k, v in inp.items()}
    kwa = dict(kw, z=kw["z"][:, :cut])
    ya, fa = _run(ssd_chunked, a, kwa, chunk_size=16, return_final_state=True)
    kwb = dict(kw, z=kw["z"][:, cut:], initial_state=fa)
    yb, fb = _run(ssd_chunked, b, kwb, chunk_size=16, return_final_state=True)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fb, f, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["softplus_limit", "log_decay"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_step_loop_equals_recurrent(variant, state_dtype):
    L = 20
    inp, kw = _inputs(L, variant, seed=7)
    y, final = _run(ssd_recurrent, inp, kw, return_final_state=True)
    state = kw["initial_state"].clone().to(state_dtype)
    ptr = state.data_ptr()
    ys = []
    for t in range(L):
        ys.append(ssd_step(inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["Bm"][:, t], inp["Cm"][:, t], state,
                           D=kw["D"], z=kw["z"][:, t], dt_bias=kw.get("dt_bias"),
                           dt_softplus=kw.get("dt_softplus", False), dt_limit=kw.get("dt_limit", (0.0, math.inf)),
                           log_decay=kw["log_decay"][:, t] if "log_decay" in kw else None))
    assert state.data_ptr() == ptr and state.dtype == state_dtype    # updated in place
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.float(), final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["raw", "log_decay"])
def test_mixing_matrix_reproduces_scan(variant):
    L = 37
    inp, kw = _inputs(L, variant, seed=8, init=False)
    seq_idx = _seq_idx(L, [[4, 20], [30]])
    y = ssd_recurrent(inp["x"], inp["dt"], inp["A"], inp["Bm"], inp["Cm"], D=kw["D"], seq_idx=seq_idx,
                      log_decay=kw.get("log_decay"))
    M = ssd_mixing_matrix(inp["dt"], inp["A"], inp["Bm"], inp["Cm"], D=kw["D"], seq_idx=seq_idx,
                          log_decay=kw.get("log_decay"))
    assert M.shape == (2, H, L, L) and M.dtype == torch.float32
    torch.testing.assert_close(torch.einsum("bhts,bshp->bthp", M, inp["x"]), y, rtol=1e-5, atol=1e-5)
    # causal and block-diagonal over documents
    assert torch.all(M.triu(1) == 0)
    assert torch.all(M[0, :, 4:, :4] == 0) and torch.all(M[0, :, 20:, :20] == 0)
    with pytest.raises(ValueError):
        ssd_mixing_matrix(inp["dt"], inp["A"], inp["Bm"], inp["Cm"], D=torch.ones(H, P))


def test_segsum_matches_differences():
    a = torch.randn(3, 9, dtype=torch.float64)
    s = segsum(a)
    c = torch.cumsum(a, -1)
    for t in range(9):
        for u in range(9):
            if u <= t:
                assert abs(float(s[1, t, u]) - float(c[1, t] - c[1, u])) < 1e-12
            else:
                assert s[1, t, u] == -math.inf


def test_low_precision_inputs_return_input_dtype():
    inp, kw = _inputs(33, "softplus_limit", seed=9, dtype=torch.bfloat16)
    for fn in (ssd_recurrent, ssd_quadratic, ssd_chunked):
        y, f = _run(fn, inp, kw, chunk_size=16, return_final_state=True)
        assert y.dtype == torch.bfloat16 and f.dtype == torch.float32
    ref, _ = _run(ssd_recurrent, {k: (v.float() if v is not None else v) for k, v in inp.items()},
                  {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()},
                  return_final_state=True)
    y = _run(ssd_chunked, inp, kw, chunk_size=16)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
