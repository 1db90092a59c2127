"""Selective scan (Mamba-1): the sequential reference against an independent fp64 computation that
multiplies the decays explicitly, the chunked variant and the one-token step against the loop,
state passing, groups, document resets and gradients."""
import pytest
import torch

from hybridize.ops.selective_scan import selective_scan, selective_scan_chunked, selective_scan_step

ATOL = 1e-5


def _inputs(Bsz=2, L=12, C=6, N=4, G=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    bc = (Bsz, L, N) if G is None else (Bsz, L, G, N)
    return dict(
        u=r(Bsz, L, C), delta=r(Bsz, L, C) * 0.5, A=-torch.exp(r(C, N) * 0.5), Bm=r(*bc), Cm=r(*bc),
        D=r(C), z=r(Bsz, L, C), delta_bias=r(C) * 0.3, h0=r(Bsz, C, N),
    )


def naive(u, delta, A, Bm, Cm, *, D=None, z=None, delta_bias=None, delta_softplus=False,
          initial_state=None, seq_idx=None):
    """fp64, O(L^2): y_t = sum_{s<=t, same doc} C_t · (prod_{k=s+1..t} exp(dt_k A)) dt_s B_s u_s
    (+ the initial state decayed by prod_{k<=t} for tokens of the first document), + D u, * silu(z).
    Groups are resolved here with an explicit channel → group index."""
    Bsz, L, C = u.shape
    N = A.shape[1]
    d = lambda t: None if t is None else t.double()  # noqa: E731
    u, delta, A, Bm, Cm, D, z, delta_bias, h0 = map(d, (u, delta, A, Bm, Cm, D, z, delta_bias, initial_state))
    if delta_bias is not None:
        delta = delta + delta_bias
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))
    if Bm.dim() == 4:
        G = Bm.shape[2]
        grp = torch.tensor([c // (C // G) for c in range(C)])
        Bc, Cc = Bm[:, :, grp], Cm[:, :, grp]                          # (B, L, C, N)
    else:
        Bc, Cc = Bm[:, :, None].expand(Bsz, L, C, N), Cm[:, :, None].expand(Bsz, L, C, N)
    sid = seq_idx if seq_idx is not None else torch.zeros(Bsz, L, dtype=torch.long)
    dA = torch.exp(delta[..., None] * A)                               # (B, L, C, N)
    ys = []
    for t in range(L):
        acc = torch.zeros(Bsz, C, N, dtype=torch.float64)
        for s in range(t + 1):
            same = (sid[:, s] == sid[:, t]).double()[:, None, None]
            decay = dA[:, s + 1:t + 1].prod(dim=1)
            acc = acc + same * decay * (delta[:, s] * u[:, s])[..., None] * Bc[:, s]
        if h0 is not None:
            first = (sid[:, t] == sid[:, 0]).double()[:, None, None]
            acc = acc + first * dA[:, :t + 1].prod(dim=1) * h0
        ys.append((acc * Cc[:, t]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y


SEQ_IDX = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2],
                        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]])

CASES = [
    dict(),                                                   # plain
    dict(G=3, D=True, z=True),                                # groups, skip, gate
    dict(bias=True, softplus=True, D=True),                   # Mamba's delta parametrisation
    dict(h0=True, D=True),                                    # initial state
    dict(G=2, seq=True, h0=True, bias=True, softplus=True, D=True, z=True),  # everything + resets
]


def _kw(t, case):
    kw = dict(D=t["D"] if case.get("D") else None, z=t["z"] if case.get("z") else None,
              delta_bias=t["delta_bias"] if case.get("bias") else None,
              delta_softplus=bool(case.get("softplus")),
              initial_state=t["h0"] if case.get("h0") else None,
              seq_idx=SEQ_IDX if case.get("seq") else None)
    return kw


@pytest.mark.parametrize("case", CASES)
def test_loop_matches_naive(case):
    t = _inputs(G=case.get("G"))
    kw = _kw(t, case)
    y = selective_scan(t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], **kw)
    ref = naive(t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], **kw)
    torch.testing.assert_close(y.double(), ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_matches_loop(case, chunk):
    t = _inputs(L=12, G=case.get("G"))
    kw = _kw(t, case)
    y, h = selective_scan(t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], return_final_state=True, **kw)
    y2, h2 = selective_scan_chunked(t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], return_final_state=True,
                                    chunk_size=chunk, **kw)
    torch.testing.assert_close(y2, y, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(h2, h, atol=ATOL, rtol=1e-5)


def test_chunked_long_sequence_no_overflow():
    # strong decays over a long chunk: exp of a positive exponent would overflow if computed
    t = _inputs(L=200, C=4, N=3)
    A = t["A"] * 20
    y = selective_scan(t["u"], t["delta"].abs() + 1, A, t["Bm"], t["Cm"])
    y2 = selective_scan_chunked(t["u"], t["delta"].abs() + 1, A, t["Bm"], t["Cm"], chunk_size=64)
    assert torch.isfinite(y2).all()
    torch.testing.assert_close(y2, y, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("G", [None, 2])
def test_step_matches_scan(G):
    t = _inputs(G=G)
    kw = dict(D=t["D"], delta_bias=t["delta_bias"], delta_softplus=True)
    y, h = selective_scan(t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], z=t["z"], initial_state=t["h0"],
                          return_final_state=True, **kw)
    state = t["h0"].clone()
    ys = [selective_scan_step(t["u"][:, i], t["delta"][:, i], t["A"], t["Bm"][:, i], t["Cm"][:, i], state,
                              z=t["z"][:, i], **kw)
          for i in range(t["u"].shape[1])]
    torch.testing.assert_close(torch.stack(ys, 1), y, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(state, h, atol=ATOL, rtol=1e-5)


def test_state_passing_splits():
    t = _inputs(L=12, G=3)
    kw = dict(D=t["D"], delta_bias=t["delta_bias"], delta_softplus=True)
    args = lambda a, b: (t["u"][:, a:b], t["delta"][:, a:b], t["A"], t["Bm"][:, a:b], t["Cm"][:, a:b])  # noqa
    y, h = selective_scan(*args(0, 12), z=t["z"], initial_state=t["h0"], return_final_state=True, **kw)
    y1, h1 = selective_scan(*args(0, 5), z=t["z"][:, :5], initial_state=t["h0"], return_final_state=True, **kw)
    y2, h2 = selective_scan(*args(5, 12), z=t["z"][:, 5:], initial_state=h1, return_final_state=True, **kw)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(h2, h, atol=ATOL, rtol=1e-5)
    assert h.dtype == torch.float32 and h.shape == (2, 6, 4)


@pytest.mark.parametrize("fn", [selective_scan, selective_scan_chunked])
def test_packed_equals_separate_documents(fn):
    t = _inputs(L=12, G=2)
    kw = dict(D=t["D"], delta_bias=t["delta_bias"], delta_softplus=True)
    y, h = fn(t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], seq_idx=SEQ_IDX, initial_state=t["h0"],
              return_final_state=True, z=t["z"], **kw)
    for b in range(2):
        bounds = torch.nonzero(torch.diff(SEQ_IDX[b]) != 0).flatten().add(1).tolist()
        for a, e in zip([0] + bounds, bounds + [12]):
            sl = lambda k: t[k][b:b + 1, a:e]  # noqa: E731
            h0 = t["h0"][b:b + 1] if a == 0 else None   # the passed state belongs to document 0
            yd, hd = fn(sl("u"), sl("delta"), t["A"], sl("Bm"), sl("Cm"), z=sl("z"), initial_state=h0,
                        return_final_state=True, **kw)
            torch.testing.assert_close(y[b:b + 1, a:e], yd, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(h[b:b + 1], hd, atol=ATOL, rtol=1e-5)  # final = last document's


def test_groups_identical_equal_shared():
    t = _inputs(G=None)
    Bg, Cg = t["Bm"][:, :, None].expand(-1, -1, 3, -1), t["Cm"][:, :, None].expand(-1, -1, 3, -1)
    y = selective_scan(t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], D=t["D"])
    y2 = selective_scan(t["u"], t["delta"], t["A"], Bg, Cg, D=t["D"])
    torch.testing.assert_close(y2, y)
    with pytest.raises(ValueError):
        selective_scan(t["u"], t["delta"], t["A"], t["Bm"][:, :, None].expand(-1, -1, 4, -1), Cg)


@pytest.mark.parametrize("fn", [selective_scan, selective_scan_chunked])
def test_gradients_match_naive(fn):
    t = _inputs(L=9, G=3, seed=3)
    names = ["u", "delta", "A", "Bm", "Cm", "D", "z", "delta_bias", "h0"]
    leaves = {k: t[k].clone().requires_grad_(True) for k in names}
    seq = SEQ_IDX[:, :9]

    def run(f, v):
        return f(v["u"], v["delta"], v["A"], v["Bm"], v["Cm"], D=v["D"], z=v["z"], delta_bias=v["delta_bias"],
                 delta_softplus=True, initial_state=v["h0"], seq_idx=seq)
    w = torch.randn(2, 9, 6, dtype=torch.float64)
    (run(fn, leaves).double() * w).sum().backward()
    got = {k: leaves[k].grad.clone() for k in names}
    ref_leaves = {k: t[k].double().requires_grad_(True) for k in names}
    (run(naive, ref_leaves) * w).sum().backward()
    for k in names:
        torch.testing.assert_close(got[k].double(), ref_leaves[k].grad, atol=1e-4, rtol=1e-4, msg=k)


def test_dtypes():
    t = _inputs()
    y, h = selective_scan(t["u"].bfloat16(), t["delta"].bfloat16(), t["A"], t["Bm"].bfloat16(),
                          t["Cm"].bfloat16(), D=t["D"], return_final_state=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    ref = selective_scan(t["u"].bfloat16().float(), t["delta"].bfloat16().float(), t["A"],
                         t["Bm"].bfloat16().float(), t["Cm"].bfloat16().float(), D=t["D"])
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
