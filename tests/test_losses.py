"""Distillation losses vs unchunked / hand-written references (values and gradients)."""
import math

import pytest
import torch
import torch.nn.functional as F

from hybridize.distill.losses import (
    chunked_cross_entropy, chunked_kl_div, cross_entropy_from_hidden, dpo_loss, dpo_metrics,
    hidden_state_alignment_loss, kl_div, kl_from_hidden, kl_mask_from_labels, matrix_orientation_loss,
    sequence_logprobs, token_logprobs,
)
from hybridize.model import causal_lm_loss



def ref_kl(s_logits, t_logits, mask, T=1.0, cap=None):
    """Independent reference: torch's F.kl_div per token, averaged over masked tokens."""
    if cap is not None:
        s_logits, t_logits = cap * torch.tanh(s_logits / cap), cap * torch.tanh(t_logits / cap)
    s = F.log_softmax(s_logits.double() / T, -1)
    t = F.log_softmax(t_logits.double() / T, -1)
    per_tok = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    return (per_tok * mask).sum() / mask.sum()


@pytest.mark.parametrize("T,cap,chunk", [(1.0, None, 7), (2.0, None, 64), (1.0, 5.0, 5)])
def test_chunked_kl_matches_reference(T, cap, chunk):
    B, L, V = 3, 11, 37
    s = torch.randn(B, L, V, requires_grad=True)
    t = torch.randn(B, L, V) * 2
    mask = torch.rand(B, L) > 0.3
    ref = ref_kl(s, t, mask.double(), T, cap)
    (g_ref,) = torch.autograd.grad(ref, s)
    for fn in (kl_div, lambda *a, **k: chunked_kl_div(*a, chunk_tokens=chunk, **k)):
        val = fn(s, t, mask, temperature=T, softcap=cap)
        (g,) = torch.autograd.grad(val, s)
        torch.testing.assert_close(val.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-4, atol=1e-7)
    assert ref > 0


def test_kl_zero_for_identical_and_empty_mask():
    x = torch.randn(2, 5, 9)
    assert chunked_kl_div(x, x).abs() < 1e-6
    s = torch.randn(2, 5, 9, requires_grad=True)
    z = chunked_kl_div(s, x, torch.zeros(2, 5, dtype=torch.bool))
    z.backward()
    assert z == 0 and (s.grad == 0).all()


def test_kl_bf16_inputs_use_fp32_math():
    s = torch.randn(2, 6, 50)
    t = torch.randn(2, 6, 50)
    val = chunked_kl_div(s.bfloat16(), t.bfloat16(), chunk_tokens=4)
    assert val.dtype == torch.float32
    ref = ref_kl(s.bfloat16().float(), t.bfloat16().float(), torch.ones(2, 6))
    torch.testing.assert_close(val.double(), ref, rtol=1e-5, atol=1e-6)


def test_kl_from_hidden_matches_logits_version():
    B, L, D, Dt, V = 2, 9, 8, 12, 41
    hs = torch.randn(B, L, D, requires_grad=True)
    Ws = (torch.randn(V, D) * 0.3).requires_grad_()
    ht, Wt = torch.randn(B, L, Dt), torch.randn(V, Dt) * 0.3
    mask = torch.rand(B, L) > 0.2
    ref = ref_kl(hs @ Ws.T, ht @ Wt.T, mask.double(), T=1.5, cap=4.0)
    g_ref = torch.autograd.grad(ref, (hs, Ws))
    val = kl_from_hidden(hs, Ws, ht, Wt, mask, chunk_tokens=4, temperature=1.5, softcap=4.0)
    g = torch.autograd.grad(val, (hs, Ws))
    torch.testing.assert_close(val.double(), ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="vocabularies differ"):
        kl_from_hidden(hs, Ws, ht, torch.randn(V + 1, Dt))


def _saved_bytes(fn, inputs):
    """Bytes of new storage autograd keeps for backward while fn runs (tensors sharing storage with the
    inputs cost nothing extra and are not counted)."""
    known = {t.untyped_storage().data_ptr() for t in inputs}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_chunking_keeps_vocab_sized_tensors_out_of_the_graph():
    N, D, V = 64, 16, 2000
    hs = torch.randn(N, D, requires_grad=True)
    W = torch.randn(V, D, requires_grad=True)
    ht, Wt = torch.randn(N, D), torch.randn(V, D)
    full = N * V * 4                                  # one fp32 (N, V) tensor
    unchunked = _saved_bytes(lambda: kl_div(hs @ W.T, ht @ Wt.T), (hs, W, ht, Wt))
    chunked = _saved_bytes(lambda: kl_from_hidden(hs, W, ht, Wt, chunk_tokens=8), (hs, W, ht, Wt))
    assert unchunked >= full                          # the naive graph holds full logits
    assert chunked < full / 20                        # the chunked one: inputs' chunks and indices only


def test_chunked_cross_entropy_matches_causal_lm_loss():
    B, L, D, V = 2, 13, 6, 29
    h = torch.randn(B, L, D, requires_grad=True)
    W = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (B, L))
    labels[0, 3:6] = -100
    ref = causal_lm_loss(h @ W.T, labels)
    g_ref = torch.autograd.grad(ref, (h, W))
    logits = (h @ W.T)
    val = chunked_cross_entropy(logits, labels, chunk_tokens=5)
    torch.testing.assert_close(val, ref)
    torch.testing.assert_close(torch.autograd.grad(val, (h, W))[0], g_ref[0])
    val2 = cross_entropy_from_hidden(h, W, labels, chunk_tokens=3)
    torch.testing.assert_close(val2, ref)
    for a, b in zip(torch.autograd.grad(val2, (h, W)), g_ref):
        torch.testing.assert_close(a, b)
    capped = cross_entropy_from_hidden(h, W, labels, softcap=2.0)
    torch.testing.assert_close(capped, causal_lm_loss(2.0 * torch.tanh((h @ W.T) / 2.0), labels))


def test_kl_mask_from_labels():
    labels = torch.tensor([[-100, 5, 6, -100, 7, -100]])
    assert kl_mask_from_labels(labels).tolist() == [[True, True, False, True, False, False]]


def test_token_and_sequence_logprobs():
    B, L, V = 2, 7, 11
    logits = torch.randn(B, L, V, requires_grad=True)
    ids = torch.randint(0, V, (B, L))
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 3:] = True
    mask[1, 5:6] = True
    expected = torch.zeros(B)
    for b in range(B):
        for t in range(1, L):
            if mask[b, t]:
                expected[b] += torch.log_softmax(logits[b, t - 1].detach(), -1)[ids[b, t]]
    got = sequence_logprobs(logits, ids, mask, chunk_tokens=3)
    torch.testing.assert_close(got, expected)
    assert token_logprobs(logits, ids)[:, 0].eq(0).all()
    got.sum().backward()
    assert logits.grad[:, -1].abs().sum() == 0        # the last position predicts nothing scored


def test_dpo_loss_by_hand():
    # policy prefers chosen by 1 nat more than the reference does, and rejected by 1 nat less:
    # margin = β · ((−1 − (−2)) − (−3 − (−2))) = 0.5 · (1 + 1) = 1 → loss = −log σ(1) = log(1 + e^−1)
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    rc, rr = torch.tensor([-2.0]), torch.tensor([-2.0])
    loss = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    loss.backward()
    # d/dpc −log σ(m) = −β σ(−m): raising the chosen log-prob lowers the loss
    assert pc.grad.item() == pytest.approx(-0.5 / (1 + math.e), rel=1e-6)
    assert pr.grad.item() == pytest.approx(+0.5 / (1 + math.e), rel=1e-6)
    # no preference change → log 2; reversed preference → larger than log 2
    assert dpo_loss(rc, rr, rc, rr).item() == pytest.approx(math.log(2))
    assert dpo_loss(pr.detach(), pc.detach(), rc, rr, beta=0.5).item() == pytest.approx(math.log(1 + math.e))
    # label smoothing ε: (1−ε)·(−log σ(m)) + ε·(−log σ(−m))
    ls = dpo_loss(pc.detach(), pr.detach(), rc, rr, beta=0.5, label_smoothing=0.1)
    assert ls.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.e), rel=1e-6)
    m = dpo_metrics(pc, pr, rc, rr, beta=0.5)
    assert m["reward_chosen"] == pytest.approx(0.5) and m["reward_rejected"] == pytest.approx(-0.5)
    assert m["reward_accuracy"] == 1.0


def test_matrix_orientation_loss():
    B, H, L = 2, 3, 5
    S = torch.randn(B, H, L, L, requires_grad=True)
    A = torch.softmax(torch.randn(B, H, L, L), -1)
    expected = sum(((S[b, h] - A[b, h]) ** 2).sum().sqrt() for b in range(B) for h in range(H)) / (B * H)
    torch.testing.assert_close(matrix_orientation_loss(S, A), expected)
    assert matrix_orientation_loss(A, A) == 0
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[:, -2:] = False
    masked = matrix_orientation_loss(S, A, valid)
    expected_m = sum(((S[b, h, :3, :3] - A[b, h, :3, :3]) ** 2).sum().sqrt()
                     for b in range(B) for h in range(H)) / (B * H)
    torch.testing.assert_close(masked, expected_m)
    with pytest.raises(ValueError, match="heads must match"):
        matrix_orientation_loss(S[:, :2], A)


def test_hidden_state_alignment_loss():
    x, y = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    expected = torch.stack([(x[b, t] - y[b, t]).norm() for b in range(2) for t in range(4)]).mean()
    torch.testing.assert_close(hidden_state_alignment_loss(x, y), expected)
    mask = torch.tensor([[True, False, True, False], [False] * 4])
    expected_m = ((x[0, 0] - y[0, 0]).norm() + (x[0, 2] - y[0, 2]).norm()) / 2
    torch.testing.assert_close(hidden_state_alignment_loss(x, y, mask), expected_m)
