"""DiscreteMamba2Mixer: matches an independent transcription of Phi-Mamba's forward (x / softplus(a),
dt = softplus(a), A = -1, conv, D skip, silu(z + z_bias) gate); forward == forward in pieces with a
carried state == token-by-token step; packed batches == documents run separately; mixing_matrix."""
import pytest
import torch
import torch.nn.functional as F

from hybridize.config import DiscreteMamba2Config
from hybridize.layers.discrete_mamba2 import DiscreteMamba2Mixer, DiscreteMamba2State
from hybridize.ops.ssd import ssd_recurrent

HID = 24


def _mixer(seed=0, activation=None, **kw):
    base = dict(d_state=4, n_qk_heads=3, n_v_heads=6, d_conv=4, expand=2, chunk_size=8)
    base.update(kw)
    cfg = DiscreteMamba2Config(**base)
    if activation is not None:
        cfg.activation = activation          # Phi-Mamba / Llamba checkpoints use "identity"
    torch.manual_seed(seed)
    m = DiscreteMamba2Mixer(HID, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if name == "D" else 0.0))
    return m


def _phi_mamba_reference(m: DiscreteMamba2Mixer, u: torch.Tensor, identity: bool) -> torch.Tensor:
    """Phi-Mamba's forward written out with a plain loop (mamba_ssm semantics: h = exp(dt A) h + dt x B)."""
    Bsz, L, _ = u.shape
    d_inner, GN, H, G, N = m.d_inner, m.n_qk_heads * m.d_state, m.n_v_heads, m.n_qk_heads, m.d_state
    P = d_inner // H
    proj = F.linear(u, m.in_proj.weight, m.in_proj.bias)
    xBC, z, A_log = proj.split([d_inner + 2 * GN, d_inner, H], -1)
    xBC = F.conv1d(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1,
                   groups=xBC.shape[-1])[..., :L].transpose(1, 2)
    if not identity:
        xBC = F.silu(xBC)
    x, B, C = xBC.split([d_inner, GN, GN], -1)
    x, B, C = x.reshape(Bsz, L, H, P), B.reshape(Bsz, L, G, N), C.reshape(Bsz, L, G, N)
    dt = F.softplus(A_log)                       # (B, L, H)
    xin = x / dt[..., None]
    state = torch.zeros(Bsz, H, P, N)
    ys = []
    for t in range(L):
        Bt = B[:, t].repeat_interleave(H // G, 1)
        Ct = C[:, t].repeat_interleave(H // G, 1)
        state = torch.exp(-dt[:, t])[..., None, None] * state + (dt[:, t, :, None] * xin[:, t])[..., None] * Bt[:, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ct))
    y = torch.stack(ys, 1) + m.D[:, None] * x
    zb = m.z_bias if m.z_bias is not None else 0.0
    return F.linear(y.reshape(Bsz, L, d_inner) * F.silu(z + zb), m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("activation", ["identity", "silu"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_phi_mamba_transcription(activation, bias):
    m = _mixer(activation=activation, bias=bias)
    assert (m.z_bias is None) == bias
    x = torch.randn(2, 21, HID)
    torch.testing.assert_close(m(x)[0], _phi_mamba_reference(m, x, activation == "identity"), rtol=1e-4, atol=1e-5)


def test_parameter_names_and_shapes_follow_phi_mamba():
    m = _mixer()
    d_inner, GN = 48, 12
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner + 2 * GN + 6, HID),
        "z_bias": (d_inner,),
        "conv1d.weight": (d_inner + 2 * GN, 1, 4),
        "conv1d.bias": (d_inner + 2 * GN,),
        "D": (6,),
        "out_proj.weight": (HID, d_inner),
    }
    assert m.activation == "identity"    # Phi-Mamba default (DiscreteMamba2Config.activation)


@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_forward_pieces_and_steps_agree(activation):
    m = _mixer(activation=activation)
    x = torch.randn(2, 29, HID)
    y, st = m(x, output_state=True)
    assert isinstance(st, DiscreteMamba2State)
    assert st.conv.shape == (2, m.conv_dim, 3) and st.ssm.shape == (2, 6, 8, 4) and st.ssm.dtype == torch.float32

    s2 = m.init_state(2)
    ya, s2 = m(x[:, :13], s2)
    yb, s2 = m(x[:, 13:], s2)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s2.ssm, st.ssm, rtol=1e-4, atol=1e-5)

    s3 = m.init_state(2)
    ptrs = (s3.conv.data_ptr(), s3.ssm.data_ptr())
    with torch.no_grad():
        ys = [m.step(x[:, t], s3) for t in range(29)]
    assert (s3.conv.data_ptr(), s3.ssm.data_ptr()) == ptrs
    torch.testing.assert_close(torch.stack(ys, 1), y.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s3.ssm, st.ssm.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s3.conv, st.conv.detach())


def test_packed_batch_equals_separate_documents():
    m = _mixer()
    lens = [5, 1, 12, 8]
    L = sum(lens)
    x = torch.randn(1, L, HID)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    w = torch.randn(1, L, HID)
    params = list(m.parameters())
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


def test_mixing_matrix_reproduces_output():
    m = _mixer()
    x = torch.randn(2, 17, HID)
    seq_idx = torch.tensor([[0] * 9 + [1] * 8, [0] * 17])
    M = m.mixing_matrix(x, seq_idx=seq_idx)
    assert M.shape == (2, 6, 17, 17)
    inp = m._ssm_inputs(x, seq_idx=seq_idx)
    y_pre = torch.einsum("bhts,bshp->bthp", M, inp.x.float())
    # independent: recurrent scan with Phi-Mamba's parametrisation (dt = softplus(a), A = -1, x / dt)
    a = -inp.log_decay
    ref = ssd_recurrent(inp.x / a[..., None], a, -torch.ones(6), inp.Bm, inp.Cm, seq_idx=seq_idx)
    ref = ref + m.D[:, None] * inp.x
    torch.testing.assert_close(y_pre, ref, rtol=1e-4, atol=1e-5)
    out = m.out_proj((y_pre * F.silu(inp.z.reshape(2, 17, 6, 8))).reshape(2, 17, 48))
    torch.testing.assert_close(out, m(x, seq_idx=seq_idx)[0], rtol=1e-4, atol=1e-5)
