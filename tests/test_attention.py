"""Attention mixer: float64 first-principles reference (explicit loops over the mask), HF LlamaAttention
parity, KV cache (split forwards == token-by-token step, ring buffer), packed documents, per-row
lengths, gradients, mixing matrix, state memory accounting."""
import pytest
import torch

from hybridize.config import AttentionConfig
from hybridize.layers.attention import Attention, KVCache, repeat_kv

D = 32


def make(num_heads=4, num_kv_heads=2, window=None, partial=1.0, bias=False, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = AttentionConfig(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=8, rope_theta=100.0,
                          partial_rotary_factor=partial, sliding_window=window, qkv_bias=bias, o_bias=bias,
                          **kw)
    attn = Attention(D, cfg)
    if bias:  # nn.Linear biases start random already; make o_proj's clearly non-zero too
        torch.nn.init.normal_(attn.o_proj.bias)
    return attn


def ref_attention(attn: Attention, x: torch.Tensor, window=None) -> torch.Tensor:
    """One sequence x (L, D), positions 0..L-1 → y (L, D); float64, explicit rotations and mask."""
    dd = torch.float64

    def lin(m, t):
        return t @ m.weight.to(dd).T + (m.bias.to(dd) if m.bias is not None else 0)

    L = x.shape[0]
    H, Hkv, P = attn.num_heads, attn.num_kv_heads, attn.head_dim
    x = x.to(dd)
    q = lin(attn.q_proj, x).view(L, H, P)
    k, v = lin(attn.k_proj, x).view(L, Hkv, P), lin(attn.v_proj, x).view(L, Hkv, P)
    R, theta = attn.rotary.rot_dim, attn.rotary.params["rope_theta"]

    def rope(t):
        out = t.clone()
        for i in range(R // 2):
            ang = torch.arange(L, dtype=dd) * theta ** (-2 * i / R)
            a, b = t[:, :, i], t[:, :, i + R // 2]
            out[:, :, i] = a * ang.cos()[:, None] - b * ang.sin()[:, None]
            out[:, :, i + R // 2] = b * ang.cos()[:, None] + a * ang.sin()[:, None]
        return out

    q, k = rope(q), rope(k)
    out = torch.zeros(L, H, P, dtype=dd)
    for h in range(H):
        g = h // (H // Hkv)
        for i in range(L):
            js = [j for j in range(i + 1) if window is None or i - j < window]
            s = torch.stack([q[i, h] @ k[j, g] for j in js]) * attn.scale
            out[i, h] = torch.softmax(s, 0) @ v[js, g]
    return lin(attn.o_proj, out.reshape(L, H * P))


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------- correctness of forward
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("window", [None, 5])
def test_forward_matches_reference(heads, window):
    attn = make(*heads, window=window, partial=0.5 if heads[1] == 2 else 1.0, bias=heads[1] == 1)
    x = torch.randn(2, 19, D)
    y, st = attn(x)
    assert st is None
    for b in range(2):
        close(y[b], ref_attention(attn, x[b], window))


def test_window_mask_vs_explicit_reference_mask():
    """Window semantics = HF `sliding_window_overlay`: kv_idx > q_idx - window (window incl. self)."""
    from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

    w, L = 4, 11
    attn = make(window=w)
    fn = and_masks(sliding_window_overlay(w), causal_mask_function)
    t = torch.tensor
    hf_mask = torch.tensor([[bool(fn(t(0), t(0), t(i), t(j))) for j in range(L)] for i in range(L)])
    weights = attn.mixing_matrix(torch.randn(1, L, D))[0, 0]
    assert torch.equal(weights > 0, hf_mask)


def test_matches_hf_llama_attention():
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as ml

    hf_cfg = LlamaConfig(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         rope_parameters={"rope_type": "default", "rope_theta": 100.0}, attention_bias=True)
    hf_cfg._attn_implementation = "eager"
    hf = ml.LlamaAttention(hf_cfg, layer_idx=0)
    ours = make(bias=True)
    ours.load_state_dict(hf.state_dict())                               # names map 1:1
    L = 13
    x = torch.randn(2, L, D)
    pos = torch.arange(L)[None].expand(2, L)
    cos, sin = ml.LlamaRotaryEmbedding(hf_cfg)(x, pos)
    causal = torch.full((L, L), float("-inf")).triu(1)[None, None]
    y_hf, _ = hf(x, position_embeddings=(cos, sin), attention_mask=causal)
    close(ours(x)[0], y_hf)


# ---------------------------------------------------------------------------- KV cache
def _run_split(attn, x, cuts, state):
    ys, prev = [], 0
    for c in list(cuts) + [x.shape[1]]:
        y, state = attn(x[:, prev:c], state, output_state=True)
        ys.append(y)
        prev = c
    return torch.cat(ys, 1), state


def _run_steps(attn, x, state):
    return torch.stack([attn.step(x[:, t], state) for t in range(x.shape[1])], 1)


@pytest.mark.parametrize("L,cuts", [(1, []), (63, [17]), (257, [100, 101, 190])])
def test_cache_split_and_step_match_full(L, cuts):
    attn = make()
    x = torch.randn(2, L, D)
    with torch.no_grad():
        y_full, _ = attn(x)
        y_split, st = _run_split(attn, x, cuts, attn.init_state(2, max_seqlen=L))
        assert torch.equal(st.lengths, torch.full((2,), L))
        y_step = _run_steps(attn, x, attn.init_state(2, max_seqlen=L))
    close(y_split, y_full)
    close(y_step, y_full)


@pytest.mark.parametrize("cuts", [[5], [9, 40], [16, 32]])
def test_ring_buffer_split_and_step_match_full(cuts):
    """window 16, L = 57: chunks both shorter and longer than the ring, unaligned with it."""
    w, L = 16, 57
    attn = make(window=w)
    x = torch.randn(2, L, D)
    with torch.no_grad():
        y_full, _ = attn(x)
        st = attn.init_state(2, max_seqlen=1000)
        assert st.capacity == w
        y_split, st = _run_split(attn, x, cuts, st)
        assert st.capacity == w
        y_step = _run_steps(attn, x, attn.init_state(2, max_seqlen=1000))
        y_ref = ref_attention(attn, x[0], w)
    close(y_full[0], y_ref)
    close(y_split, y_full)
    close(y_step, y_full)


@pytest.mark.parametrize("window", [None, 16])
def test_fresh_state_grows(window):
    """state=None + output_state creates a cache sized to the chunk; later forwards (chunks, then one
    token at a time, HF-style decoding) grow a full-attention cache as needed and stay exact."""
    L = 40
    attn = make(window=window)
    x = torch.randn(2, L, D)
    with torch.no_grad():
        y_full, _ = attn(x)
        y1, st = attn(x[:, :7], output_state=True)
        assert st.capacity == 7
        y2, st = attn(x[:, 7:30], st)
        assert st.capacity == (30 if window is None else window)
        y3 = []
        for t in range(30, L):
            yt, st = attn(x[:, t:t + 1], st)
            y3.append(yt)
        assert st.capacity == (L if window is None else window)
    close(torch.cat([y1, y2] + y3, 1), y_full)


def test_batched_step_with_different_lengths():
    """Rows at different positions (from a packed prefill) step exactly like each row alone."""
    for window in (None, 6):
        attn = make(window=window)
        prompts = [torch.randn(1, 5, D), torch.randn(1, 12, D)]
        new = torch.randn(2, 9, D)
        with torch.no_grad():
            # batched: rows prefilled separately, caches stacked (capacity 30 each)
            sts = [attn(p, attn.init_state(1, max_seqlen=30))[1] for p in prompts]
            st = KVCache(k=torch.cat([s.k for s in sts]), v=torch.cat([s.v for s in sts]),
                         lengths=torch.cat([s.lengths for s in sts]))
            assert st.lengths.tolist() == [5, 12]
            y_b = _run_steps(attn, new, st)
            for b in range(2):
                y_alone, _ = attn(torch.cat([prompts[b], new[b:b + 1]], 1))
                close(y_b[b], y_alone[0, prompts[b].shape[1]:])


# ---------------------------------------------------------------------------- packed documents
def _packed(doc_lens_per_row, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = sum(doc_lens_per_row[0])
    x = torch.randn(len(doc_lens_per_row), L, D, generator=g)
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))
                           for r in doc_lens_per_row])
    return x, seq_idx


@pytest.mark.parametrize("window", [None, 4])
def test_packed_equals_separate_docs_with_grads(window):
    rows = [[5, 11, 7], [1, 22], [23]]
    attn = make(window=window)
    x, seq_idx = _packed(rows)
    w = torch.randn_like(x)
    xp = x.clone().requires_grad_()
    y, _ = attn(xp, seq_idx=seq_idx)
    (y * w).sum().backward()
    g_packed = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()

    xs = x.clone().requires_grad_()
    total = 0
    for b, r in enumerate(rows):
        s = 0
        for n in r:
            yd, _ = attn(xs[b:b + 1, s:s + n])
            close(y[b, s:s + n], yd[0])
            total = total + (yd * w[b:b + 1, s:s + n]).sum()
            s += n
    total.backward()
    close(xp.grad, xs.grad, 1e-4)
    for gp, p in zip(g_packed, attn.parameters(), strict=True):
        close(gp, p.grad, 1e-4)


@pytest.mark.parametrize("window", [None, 4])
def test_packed_with_cache(window):
    """Cached context is visible to the first document only; the returned cache is the last document's
    (rows end at different lengths), and stepping from it continues that document exactly."""
    attn = make(window=window)
    rows = [[6, 10], [16]]
    x, seq_idx = _packed(rows, seed=1)
    ctx = torch.randn(2, 5, D)
    nxt = torch.randn(2, 3, D)
    with torch.no_grad():
        _, st = attn(ctx, attn.init_state(2, max_seqlen=32))
        y, st = attn(x, st, seq_idx=seq_idx)
        assert st.lengths.tolist() == [10, 21]
        y_next = _run_steps(attn, nxt, st)
        # row 0: first doc continues ctx, second doc is fresh; row 1 continues ctx
        ya, _ = attn(torch.cat([ctx[:1], x[:1, :6]], 1))
        yb, _ = attn(torch.cat([x[:1, 6:], nxt[:1]], 1))
        yc, _ = attn(torch.cat([ctx[1:], x[1:], nxt[1:]], 1))
    close(y[0, :6], ya[0, 5:])
    close(y[0, 6:], yb[0, :10])
    close(y_next[0], yb[0, 10:])
    close(y[1], yc[0, 5:21])
    close(y_next[1], yc[0, 21:])


def test_grad_through_cache_matches_full():
    """Out-of-place cache updates: a split forward backpropagates like the full forward."""
    attn = make(window=8)
    x = torch.randn(2, 30, D)
    wts = torch.randn(2, 30, D)
    x1 = x.clone().requires_grad_()
    (attn(x1)[0] * wts).sum().backward()
    g_full = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    x2 = x.clone().requires_grad_()
    y, _ = _run_split(attn, x2, [11, 20], attn.init_state(2, max_seqlen=30))
    (y * wts).sum().backward()
    close(x1.grad, x2.grad, 1e-4)
    for a, p in zip(g_full, attn.parameters(), strict=True):
        close(a, p.grad, 1e-4)


# ---------------------------------------------------------------------------- analysis / memory
@pytest.mark.parametrize("window", [None, 5])
def test_mixing_matrix_reproduces_output(window):
    attn = make(window=window)
    x, seq_idx = _packed([[4, 9], [13]])
    with torch.no_grad():
        M = attn.mixing_matrix(x, seq_idx=seq_idx)
        B, L, _ = x.shape
        v = attn.v_proj(x).view(B, L, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        inner = M @ repeat_kv(v, attn.n_rep)
        y = attn.o_proj(inner.transpose(1, 2).reshape(B, L, -1))
        y_ref, _ = attn(x, seq_idx=seq_idx)
    assert M.shape == (2, 4, 13, 13) and M.dtype == torch.float32
    close(M.sum(-1), torch.ones(2, 4, 13))
    assert (M[0, :, 4:, :4] == 0).all()                                  # no cross-document weight
    close(y, y_ref)


def test_state_memory_accounting():
    attn = make(window=None)
    st = attn.init_state(3, max_seqlen=100, device="meta")
    assert st.k.is_meta and st.k.shape == (3, 2, 100, 8)
    per_tok = 2 * 2 * 8 * 4                                              # k+v, Hkv, P, fp32
    assert attn.state_bytes_per_sequence(100) == 100 * per_tok + 8
    assert attn.state_bytes_per_sequence(100, dtype=torch.bfloat16) == 100 * per_tok // 2 + 8
    win = make(window=16)
    assert win.state_bytes_per_sequence(100) == 16 * per_tok + 8
    assert win.state_bytes_per_sequence(10) == 10 * per_tok + 8
