"""Mamba2Mixer: chunked forward == forward in pieces with a carried state == token-by-token step; packed
batches == documents run separately (outputs and parameter gradients); mixing_matrix reproduces the
SSD output; the Mamba-in-the-Llama layout (shapes, GQA repetition order); parity with transformers'
Mamba2Mixer (torch path) on the same weights, including its cached decode."""
import math

import pytest
import torch
import torch.nn.functional as F

from hybridize.config import Mamba2Config
from hybridize.layers.mamba2 import Mamba2Mixer, Mamba2State
from hybridize.ops.ssd import ssd_recurrent

HID = 24


def _randomize(m: Mamba2Mixer, seed=0):
    """Random values for every parameter (the init has D = 1, norm = 1, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "A_log":
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 3 + 0.5))
            elif name == "dt_bias":
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 - 1.0)
            elif name in ("D", "norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))
    return m


def _mixer(seed=0, **kw):
    base = dict(d_state=8, headdim=8, expand=2, ngroups=3, chunk_size=16, d_conv=4)
    base.update(kw)
    torch.manual_seed(seed)
    return _randomize(Mamba2Mixer(HID, Mamba2Config(**base)), seed)


def _mil_mixer(seed=0, n_kv=2, heads=6, hd=4, **kw):
    cfg = Mamba2Config(d_state=hd, headdim=hd, d_inner=heads * hd, d_xb=n_kv * hd, ngroups=heads, expand=1,
                       chunk_size=8, **kw)
    torch.manual_seed(seed)
    return _randomize(Mamba2Mixer(HID, cfg), seed)


CONFIGS = {
    "standard": lambda: _mixer(),
    "dt_limit_Dhdim": lambda: _mixer(dt_limit=(0.02, 0.3), D_has_hdim=True, ngroups=1, conv_bias=False, bias=True),
    "mil": lambda: _mil_mixer(),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_pieces_and_steps_agree(name):
    m = CONFIGS[name]()
    x = torch.randn(2, 37, HID)
    y, st = m(x, output_state=True)
    assert isinstance(st, Mamba2State)
    assert st.conv.shape == (2, m.conv_dim, m.d_conv - 1) and st.ssm.shape == (2, m.nheads, m.headdim, m.d_state)
    assert st.ssm.dtype == torch.float32
    y_plain, none = m(x)
    assert none is None
    torch.testing.assert_close(y_plain, y)

    # two calls with the state carried
    s2 = m.init_state(2)
    ya, s2 = m(x[:, :20], s2)
    yb, s2 = m(x[:, 20:], s2)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s2.ssm, st.ssm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s2.conv, st.conv)

    # token by token; state buffers updated in place
    s3 = m.init_state(2)
    ptrs = (s3.conv.data_ptr(), s3.ssm.data_ptr())
    with torch.no_grad():
        ys = [m.step(x[:, t], s3) for t in range(x.shape[1])]
    assert (s3.conv.data_ptr(), s3.ssm.data_ptr()) == ptrs
    torch.testing.assert_close(torch.stack(ys, 1), y.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s3.ssm, st.ssm.detach(), rtol=1e-4, atol=1e-5)

    # prefill then decode
    s4 = m.init_state(2)
    with torch.no_grad():
        yp, s4 = m(x[:, :30], s4)
        ys = [m.step(x[:, t], s4) for t in range(30, 37)]
    torch.testing.assert_close(torch.cat([yp, torch.stack(ys, 1)], 1), y.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,fused", [("mil", True), ("standard", False), ("norm_group_2", True)])
def test_many_row_steps_with_the_norm_in_the_step(name, fused, monkeypatch):
    """Above ops.gemv.FUSED_MAX_ROWS rows `step` hands the gated norm to the SSD step (when its groups lie
    within a head: MIL's one group a head, an explicit group of 2 channels; not the standard config's
    groups of 16 channels over 8-channel heads): token-by-token steps still equal the forward pass, at
    the threshold and above it."""
    from hybridize.layers import mamba2 as mamba2_mod
    m = _mil_mixer(norm_group_size=2) if name == "norm_group_2" else CONFIGS[name]()
    rows = mamba2_mod.FUSED_MAX_ROWS + 1
    assert m._norm_in_step(rows) == fused and not m._norm_in_step(rows - 1)
    seen = []
    real = mamba2_mod.ssd_ops.ssd_step
    monkeypatch.setattr(mamba2_mod.ssd_ops, "ssd_step", lambda *a, **k: seen.append("norm_weight" in k) or real(*a, **k))
    x = torch.randn(rows, 9, HID)
    y, _ = m(x)
    s = m.init_state(rows)
    with torch.no_grad():
        ys = [m.step(x[:, t], s) for t in range(x.shape[1])]
    assert seen == [fused] * x.shape[1]
    torch.testing.assert_close(torch.stack(ys, 1), y.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["standard", "mil"])
def test_packed_batch_equals_separate_documents(name):
    m = CONFIGS[name]()
    lens = [7, 1, 20, 2, 9]
    L = sum(lens)
    x = torch.randn(1, L, HID)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    w = torch.randn(1, L, HID)
    params = [p for p in m.parameters()]

    y, _ = m(x, seq_idx=seq_idx)
    g_packed = torch.autograd.grad((y * w).sum(), params)

    outs, loss, s = [], 0.0, 0
    for n in lens:
        yd, _ = m(x[:, s:s + n])
        outs.append(yd)
        loss = loss + (yd * w[:, s:s + n]).sum()
        s += n
    g_sep = torch.autograd.grad(loss, params)
    torch.testing.assert_close(y, torch.cat(outs, 1), rtol=1e-4, atol=1e-5)
    for (pn, _), a, b in zip(m.named_parameters(), g_packed, g_sep):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=pn)


def test_packed_with_state_belongs_to_first_document():
    m = _mixer()
    ctx, x = torch.randn(1, 11, HID), torch.randn(1, 15, HID)
    _, st = m(ctx, output_state=True)
    seq_idx = torch.tensor([[3] * 6 + [4] * 9])
    y, st_packed = m(x, st.clone(), seq_idx=seq_idx)
    y0, _ = m(x[:, :6], st.clone())           # first document continues the context
    y1, st1 = m(x[:, 6:], output_state=True)  # second starts fresh
    torch.testing.assert_close(y, torch.cat([y0, y1], 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st_packed.ssm, st1.ssm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st_packed.conv, st1.conv)


@pytest.mark.parametrize("name", ["standard", "mil"])
def test_mixing_matrix_reproduces_output(name):
    m = CONFIGS[name]()
    x = torch.randn(2, 21, HID)
    seq_idx = torch.tensor([[0] * 10 + [1] * 11, [0] * 21])
    M = m.mixing_matrix(x, seq_idx=seq_idx)
    assert M.shape == (2, m.nheads, 21, 21)
    inp = m._ssm_inputs(x, seq_idx=seq_idx)
    y_pre = torch.einsum("bhts,bshp->bthp", M, inp.x.float())
    # independent: the recurrent scan on the same inputs
    ref = ssd_recurrent(inp.x, inp.dt, -torch.exp(m.A_log), inp.Bm, inp.Cm, D=m.D, dt_bias=m.dt_bias,
                        dt_softplus=True, seq_idx=seq_idx)
    torch.testing.assert_close(y_pre, ref, rtol=1e-4, atol=1e-5)
    # and the whole layer from M
    out = m.out_proj(m.norm(y_pre.reshape(2, 21, m.d_inner), inp.z))
    torch.testing.assert_close(out, m(x, seq_idx=seq_idx)[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- Mamba-in-the-Llama layout
def test_mil_layout_shapes():
    m = _mil_mixer(n_kv=2, heads=6, hd=4)
    d_inner, d_xb, H = 24, 8, 6
    assert m.in_proj.weight.shape == (2 * d_inner + 2 * d_xb + H, HID)
    assert m.conv1d.weight.shape == (2 * d_xb + d_inner, 1, 4)
    assert m.out_proj.weight.shape == (HID, d_inner)
    assert m.A_log.shape == (H,) and m.D.shape == (H,) and m.norm.weight.shape == (d_inner,)
    assert m.norm.group_size == 4     # d_inner // ngroups = headdim
    with pytest.raises(ValueError):
        Mamba2Mixer(HID, Mamba2Config(d_state=8, headdim=4, d_inner=24, d_xb=8, ngroups=6))


def test_mil_repetition_order_matches_repeat_kv():
    m = _mil_mixer(n_kv=2, heads=6, hd=4)
    rep = 3
    # rows of x / B / C in in_proj: x = [24, 32), B = [32, 40), C = [40, 64)
    xbc = torch.arange(m.conv_dim, dtype=torch.float32)[None]
    x, Bm, Cm = m._split_xbc(xbc)
    for h in range(6):
        j = h // rep                                  # kv head j serves query heads j*rep … j*rep+rep-1
        assert torch.equal(x[0, h], torch.arange(4 * j, 4 * j + 4, dtype=torch.float32))
        assert torch.equal(Bm[0, h], 8 + torch.arange(4 * j, 4 * j + 4, dtype=torch.float32))
        assert torch.equal(Cm[0, h], 16 + torch.arange(4 * h, 4 * h + 4, dtype=torch.float32))


@pytest.mark.parametrize("name", ["standard", "mil"])
def test_step_passes_unrepeated_views_and_A_log(name, monkeypatch):
    """The decode step hands the SSD step views of the conv output, not repeat_interleave copies
    (MIL: x, B per kv head, C per query head), and A_log instead of A; same result as the explicit call."""
    import hybridize.ops.ssd as ssd_ops
    m = CONFIGS[name]()
    seen, real = [], ssd_ops.ssd_step

    def spy(x, dt, A, Bm, Cm, state, **kw):
        seen.append((x, A, Bm, Cm, kw))
        return real(x, dt, A, Bm, Cm, state, **kw)

    monkeypatch.setattr(ssd_ops, "ssd_step", spy)
    st, st_ref = m.init_state(2), m.init_state(2)
    st.ssm.normal_()
    st_ref.ssm.copy_(st.ssm)
    u = torch.randn(2, HID)
    with torch.no_grad():
        y = m.step(u, st)
    x, A, Bm, Cm, kw = seen[0]
    n_x = m.n_kv if name == "mil" else m.nheads
    n_b = m.n_kv if name == "mil" else m.ngroups
    assert x.shape == (2, n_x, m.headdim) and Bm.shape == (2, n_b, m.d_state)
    assert Cm.shape == (2, m.ngroups, m.d_state)
    assert A is None and kw["A_log"] is m.A_log
    assert x._base is not None and x._base is Bm._base is Cm._base          # one buffer, no copies
    # the old explicit call: rows repeated to H heads, A = -exp(A_log)
    monkeypatch.setattr(ssd_ops, "ssd_step", real)
    with torch.no_grad():
        proj = m.in_proj(u)
        z, xbc, dt = torch.split(proj, [m.d_inner, m.conv_dim, m.nheads], dim=-1)
        xbc = F.silu(torch.cat([st_ref.conv, xbc[..., None]], -1).mul(m.conv1d.weight[:, 0]).sum(-1)
                     + m.conv1d.bias)
        xr, Br, Cr = m._split_xbc(xbc)
        yr = real(xr, dt, -torch.exp(m.A_log.float()), Br, Cr, st_ref.ssm, D=m._D(), dt_bias=m.dt_bias,
                  dt_softplus=True, dt_limit=m.dt_limit)
        ref = m.out_proj(m.norm(yr.reshape(2, m.d_inner), z))
    torch.testing.assert_close(st.ssm, st_ref.ssm, rtol=0, atol=0)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def _hf_repeat_kv(t, n_rep):
    """transformers' repeat_kv on (batch, kv_heads, seqlen, dim)."""
    b, kv, L, d = t.shape
    return t[:, :, None].expand(b, kv, n_rep, L, d).reshape(b, kv * n_rep, L, d)


def test_mil_forward_matches_independent_computation():
    m = _mil_mixer(n_kv=2, heads=6, hd=4, dt_limit=(0.0, 0.5))
    x = torch.randn(2, 19, HID)
    zxbcdt = F.linear(x, m.in_proj.weight, m.in_proj.bias)
    z, xbc, dt = zxbcdt.split([24, 40, 6], -1)
    xbc = F.silu(F.conv1d(xbc.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=3, groups=40)[..., :19])
    xs, Bs, Cs = xbc.transpose(1, 2).split([8, 8, 24], -1)
    xs = _hf_repeat_kv(xs.reshape(2, 19, 2, 4).transpose(1, 2), 3).transpose(1, 2)   # (B, L, 6, 4)
    Bs = _hf_repeat_kv(Bs.reshape(2, 19, 2, 4).transpose(1, 2), 3).transpose(1, 2)
    Cs = Cs.reshape(2, 19, 6, 4)
    dtp = F.softplus(dt + m.dt_bias).clamp(0.0, 0.5)
    y = ssd_recurrent(xs, dtp, -torch.exp(m.A_log), Bs, Cs, D=m.D).reshape(2, 19, 24)
    y = y * F.silu(z)
    y = (y.reshape(2, 19, 6, 4) * torch.rsqrt(y.reshape(2, 19, 6, 4).pow(2).mean(-1, keepdim=True) + 1e-5))
    ref = F.linear(y.reshape(2, 19, 24) * m.norm.weight, m.out_proj.weight, m.out_proj.bias)
    torch.testing.assert_close(m(x)[0], ref, rtol=1e-4, atol=1e-5)


def test_mil_without_repetition_equals_standard_layout():
    mil = _mil_mixer(n_kv=6, heads=6, hd=4)    # d_xb == d_inner: rep = 1
    std = Mamba2Mixer(HID, Mamba2Config(d_state=4, headdim=4, d_inner=24, ngroups=6, expand=1, chunk_size=8))
    std.load_state_dict(mil.state_dict())
    x = torch.randn(2, 13, HID)
    torch.testing.assert_close(mil(x)[0], std(x)[0])


# ----------------------------------------------------------------------------- init, loading, state
def test_init_ranges():
    cfg = Mamba2Config(d_state=8, headdim=4, expand=2, ngroups=1, A_init_range=(1.0, 16.0), dt_min=0.001,
                       dt_max=0.1, dt_init_floor=1e-4)
    m = Mamba2Mixer(64, cfg)
    A = torch.exp(m.A_log)
    assert m.A_log.shape == (32,) and A.min() >= 1.0 and A.max() <= 16.0 and A.std() > 0
    assert torch.all(m.D == 1)
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)


def test_gated_mlp_checkpoint_raises_clearly():
    m = _mixer()
    sd = m.state_dict()
    sd["in_proj.weight"] = torch.randn(m.in_proj.out_features + 2 * 16, HID)
    with pytest.raises(ValueError, match="d_mlp"):
        m.load_state_dict(sd)


def test_state_bytes_and_meta_state():
    m = _mixer()
    st = m.init_state(3)
    assert st.state_bytes() == 3 * 4 * (m.conv_dim * 3 + m.nheads * m.headdim * m.d_state)
    assert m.state_bytes_per_sequence() == st.state_bytes() // 3


# ----------------------------------------------------------------------------- parity with transformers
def _torch_path(hf_mod, monkeypatch):
    """Where mamba_ssm is importable (the GPU machine), transformers binds its CUDA kernels even for CPU
    tensors: point the module's kernel entry points back at their PyTorch fallbacks (the functions their
    `functools.wraps` decorators wrap; older versions gate on `is_fast_path_available`)."""
    for name, fn in list(vars(hf_mod).items()):
        inner = getattr(fn, "__wrapped__", None)
        if inner is not None and callable(fn) and getattr(fn, "__module__", None) == hf_mod.__name__:
            monkeypatch.setattr(hf_mod, name, inner)
    if hasattr(hf_mod, "is_fast_path_available"):
        monkeypatch.setattr(hf_mod, "is_fast_path_available", False)


def _hf_pair(monkeypatch, n_groups=3, limit=(0.0, math.inf), chunk=16):
    hf_mod = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    _torch_path(hf_mod, monkeypatch)
    from transformers import Mamba2Config as HFConfig
    c = HFConfig(hidden_size=HID, num_heads=6, head_dim=8, expand=2, n_groups=n_groups, state_size=8,
                 conv_kernel=4, chunk_size=chunk, num_hidden_layers=1, vocab_size=16, layer_norm_epsilon=1e-5,
                 time_step_limit=limit)
    torch.manual_seed(0)
    hf = hf_mod.Mamba2Mixer(c, 0).eval()
    ours = Mamba2Mixer(HID, Mamba2Config(d_state=8, headdim=8, expand=2, ngroups=n_groups, chunk_size=chunk,
                                         dt_limit=limit, norm_eps=1e-5))
    _randomize(ours, seed=3)
    hf.load_state_dict(ours.state_dict(), strict=True)   # 1:1 names and shapes
    if n_groups > 1 and getattr(hf.norm, "group_size", None) != ours.norm.group_size:
        import transformers
        pytest.skip(f"transformers {transformers.__version__}'s Mamba2 normalises the gated output over all "
                    "channels, not per group as mamba_ssm (and hybridize) do: parity needs a newer transformers")
    return hf, ours, c


@pytest.mark.parametrize("n_groups,limit,L", [(3, (0.0, math.inf), 37), (1, (0.0, math.inf), 16),
                                               (2, (0.05, 0.5), 50)])
def test_parity_with_transformers(n_groups, limit, L, monkeypatch):
    hf, ours, _ = _hf_pair(monkeypatch, n_groups, limit)
    x = torch.randn(2, L, HID)
    with torch.no_grad():
        ref = hf(x)
        y, _ = ours(x)
    assert ref.abs().max() > 1e-2
    assert (y - ref).abs().max() <= 1e-4


def test_parity_with_transformers_cached_decode(monkeypatch):
    hf, ours, c = _hf_pair(monkeypatch, 3)
    from transformers import DynamicCache
    try:
        cache = DynamicCache(config=c)
    except Exception as e:   # cache API differs across transformers versions
        pytest.skip(f"transformers cache API: {e}")
    x = torch.randn(2, 24, HID)
    st = ours.init_state(2)
    with torch.no_grad():
        ref = [hf(x[:, :17], cache_params=cache)] + [hf(x[:, t:t + 1], cache_params=cache) for t in range(17, 24)]
        y = [ours(x[:, :17], st)[0]] + [ours.step(x[:, t], st)[:, None] for t in range(17, 24)]
    assert (torch.cat(y, 1) - torch.cat(ref, 1)).abs().max() <= 1e-4
