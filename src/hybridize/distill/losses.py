"""Distillation losses.

- word-level KL(teacher ‖ student) over the vocabulary (Mamba-in-the-Llama stage 1, MOHAWK stage 3),
  from logits or — cheaper in memory — from final hidden states and the LM-head weights;
- cross-entropy (pretraining, sequence-level KD on pseudo-labels, SFT);
- DPO and the sequence log-probabilities it needs;
- MOHAWK stage 1 (matrix orientation) and stage 2 (hidden-state alignment).

Memory: with a 128k vocabulary, fp32 logits of 8k tokens are 4 GiB, and autograd would keep several
such tensors (student log-softmax, teacher probabilities, ...). The chunked losses process
`chunk_tokens` tokens at a time inside `torch.utils.checkpoint`, so only one chunk's fp32 vocabulary
tensors exist at any time, in the forward and in the backward pass (recomputed there). All softmax
math is fp32 whatever the input dtype.

Reductions: token losses are averaged over the *selected* tokens (mask true / label != −100).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------- helpers
def _flatten(x: Tensor) -> Tensor:
    """(..., X) → (N, X)."""
    return x.reshape(-1, x.shape[-1])


def _softcap(logits: Tensor, softcap: Optional[float]) -> Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _select(mask: Optional[Tensor], n: int, device) -> Tensor:
    """Indices of the tokens to use (mask (...,) bool over the flattened tokens; None = all)."""
    if mask is None:
        return torch.arange(n, device=device)
    m = mask.reshape(-1).to(device)
    if m.numel() != n:
        raise ValueError(f"mask has {m.numel()} entries but there are {n} tokens")
    return m.nonzero(as_tuple=True)[0]


def kl_mask_from_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(B, L) next-token labels (unshifted, as for `causal_lm_loss`) → (B, L) bool mask of the positions
    whose next-token distribution is trained: position t iff labels[t+1] is a real target. Using it for
    the KL keeps KL and cross-entropy on the same positions (no distribution across a document boundary
    or over padding)."""
    m = torch.zeros_like(labels, dtype=torch.bool)
    m[:, :-1] = labels[:, 1:] != ignore_index
    return m


def _kl_rows(s_logits: Tensor, t_logits: Tensor, temperature: float, softcap: Optional[float]) -> Tensor:
    """Sum over rows of KL(softmax(t/T) ‖ softmax(s/T)) for (n, V) logits, in fp32."""
    s = _softcap(s_logits.float(), softcap) / temperature
    t = _softcap(t_logits.float(), softcap) / temperature
    t_logp = F.log_softmax(t, dim=-1)
    s_logp = F.log_softmax(s, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum()


# ---------------------------------------------------------------------------- KL
def kl_div(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor] = None, *,
           temperature: float = 1.0, softcap: Optional[float] = None) -> Tensor:
    """Unchunked reference: mean over selected tokens of KL(teacher ‖ student).
    logits (..., V); mask (...) bool or None. Not scaled by T² (multiply yourself for Hinton-style KD)."""
    idx = _select(mask, student_logits[..., 0].numel(), student_logits.device)
    if idx.numel() == 0:
        return student_logits.sum() * 0.0
    s, t = _flatten(student_logits)[idx], _flatten(teacher_logits.detach())[idx]
    return _kl_rows(s, t, temperature, softcap) / idx.numel()


def chunked_kl_div(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor] = None, *,
                   temperature: float = 1.0, softcap: Optional[float] = None,
                   chunk_tokens: int = 4096) -> Tensor:
    """`kl_div` computed `chunk_tokens` tokens at a time with recomputation in the backward pass, so the
    fp32 (N, V) intermediates never exist at once. logits (..., V) any float dtype; mask (...) bool.
    `softcap` is applied to both (pass None if the logits are already capped)."""
    idx = _select(mask, student_logits[..., 0].numel(), student_logits.device)
    if idx.numel() == 0:
        return student_logits.sum() * 0.0
    s_all, t_all = _flatten(student_logits), _flatten(teacher_logits.detach())
    total = student_logits.new_zeros((), dtype=torch.float32)
    for lo in range(0, idx.numel(), chunk_tokens):
        sel = idx[lo: lo + chunk_tokens]
        total = total + checkpoint(_kl_rows, s_all[sel], t_all[sel], temperature, softcap, use_reentrant=False)
    return total / idx.numel()


def _kl_rows_from_hidden(s_h: Tensor, s_w: Tensor, t_h: Tensor, t_w: Tensor, temperature: float,
                         softcap: Optional[float]) -> Tensor:
    with torch.no_grad():
        t_logits = F.linear(t_h, t_w)
    return _kl_rows(F.linear(s_h, s_w), t_logits, temperature, softcap)


def kl_from_hidden(student_h: Tensor, student_head_weight: Tensor, teacher_h: Tensor,
                   teacher_head_weight: Tensor, mask: Optional[Tensor] = None, *, chunk_tokens: int = 1024,
                   temperature: float = 1.0, softcap: Optional[float] = None) -> Tensor:
    """Mean KL(teacher ‖ student) over selected tokens, from final hidden states: logits are made chunk by
    chunk (h @ Wᵀ in the hidden states' dtype, then fp32 softmax math) and recomputed in the backward pass,
    so no full (N, V) logits tensor is ever held.

    student_h (..., D), student_head_weight (V, D); teacher_h (..., Dt), teacher_head_weight (V, Dt).
    The hidden states must be the inputs of the LM head, i.e. *after* the final norm
    (``model.norm(h)`` for HybridLM). `softcap`: the models' logit soft-cap, applied to both.
    Gradients flow to student_h and student_head_weight; the teacher side is detached.
    """
    if student_head_weight.shape[0] != teacher_head_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {student_head_weight.shape[0]} vs "
                         f"{teacher_head_weight.shape[0]}")
    n = student_h[..., 0].numel()
    idx = _select(mask, n, student_h.device)
    if idx.numel() == 0:
        return student_h.sum() * 0.0 + student_head_weight.sum() * 0.0
    s_all, t_all = _flatten(student_h), _flatten(teacher_h.detach())
    t_w = teacher_head_weight.detach()
    total = student_h.new_zeros((), dtype=torch.float32)
    for lo in range(0, idx.numel(), chunk_tokens):
        sel = idx[lo: lo + chunk_tokens]
        total = total + checkpoint(_kl_rows_from_hidden, s_all[sel], student_head_weight, t_all[sel], t_w,
                                   temperature, softcap, use_reentrant=False)
    return total / idx.numel()


# ---------------------------------------------------------------------------- cross-entropy
def _shifted(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Predict labels[t+1] from position t: (B, L, X), (B, L) → (B·(L-1), X), (B·(L-1),)."""
    return _flatten(x[:, :-1]), labels[:, 1:].reshape(-1)


def _ce_rows(logits: Tensor, targets: Tensor, softcap: Optional[float]) -> Tensor:
    return F.cross_entropy(_softcap(logits.float(), softcap), targets, reduction="sum")


def _ce_rows_from_hidden(h: Tensor, w: Tensor, targets: Tensor, softcap: Optional[float]) -> Tensor:
    return _ce_rows(F.linear(h, w), targets, softcap)


def chunked_cross_entropy(logits: Tensor, labels: Tensor, *, chunk_tokens: int = 4096, shift: bool = True,
                          softcap: Optional[float] = None, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean next-token cross-entropy, chunked like `chunked_kl_div`. logits (B, L, V), labels (B, L)
    unshifted (shift=True, as `causal_lm_loss`) or already aligned with logits (shift=False)."""
    x, y = _shifted(logits, labels) if shift else (_flatten(logits), labels.reshape(-1))
    return _chunked_ce(_ce_rows, x, y.to(x.device), (), chunk_tokens, softcap, ignore_index)


def cross_entropy_from_hidden(h: Tensor, head_weight: Tensor, labels: Tensor, *, chunk_tokens: int = 1024,
                              shift: bool = True, softcap: Optional[float] = None,
                              ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean next-token cross-entropy from final (post-norm) hidden states h (B, L, D) and head weight (V, D),
    without materialising the full logits."""
    x, y = _shifted(h, labels) if shift else (_flatten(h), labels.reshape(-1))
    return _chunked_ce(_ce_rows_from_hidden, x, y.to(x.device), (head_weight,), chunk_tokens, softcap,
                       ignore_index)


def _chunked_ce(fn, x: Tensor, y: Tensor, extra: tuple, chunk: int, softcap, ignore_index: int) -> Tensor:
    idx = (y != ignore_index).nonzero(as_tuple=True)[0]
    if idx.numel() == 0:
        return x.sum() * 0.0 + sum(e.sum() * 0.0 for e in extra)
    total = x.new_zeros((), dtype=torch.float32)
    for lo in range(0, idx.numel(), chunk):
        sel = idx[lo: lo + chunk]
        total = total + checkpoint(fn, x[sel], *extra, y[sel], softcap, use_reentrant=False)
    return total / idx.numel()


# ---------------------------------------------------------------------------- DPO
def token_logprobs(logits: Tensor, input_ids: Tensor, *, chunk_tokens: int = 4096) -> Tensor:
    """log p(input_ids[t] | < t) for t ≥ 1 → (B, L) fp32 with position 0 set to 0.
    logits (B, L, V) (position t-1 predicts token t). Chunked over rows of the flattened tokens."""
    B, L, V = logits.shape
    x, y = _flatten(logits[:, :-1]), input_ids[:, 1:].reshape(-1).to(logits.device)
    parts = []
    for lo in range(0, x.shape[0], chunk_tokens):
        parts.append(checkpoint(lambda a, b: -F.cross_entropy(a.float(), b, reduction="none"),
                                x[lo: lo + chunk_tokens], y[lo: lo + chunk_tokens], use_reentrant=False))
    lp = torch.cat(parts) if parts else x.new_zeros(0, dtype=torch.float32)
    return F.pad(lp.view(B, L - 1), (1, 0))


def sequence_logprobs(logits: Tensor, input_ids: Tensor, completion_mask: Tensor, *,
                      chunk_tokens: int = 4096) -> Tensor:
    """Sum of log-probabilities of the completion tokens → (B,) fp32.

    logits (B, L, V) of the model on input_ids (B, L); completion_mask (B, L) bool, true on the tokens
    to score (the completion, never the prompt or padding; position 0 cannot be scored).
    """
    lp = token_logprobs(logits, input_ids, chunk_tokens=chunk_tokens)
    return (lp * completion_mask.to(lp.device, lp.dtype)).sum(-1)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, *, label_smoothing: float = 0.0,
             reduction: str = "mean") -> Tensor:
    """Direct Preference Optimisation (Rafailov et al. 2023):

        margin = β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]
        loss   = −(1 − ε) · log σ(margin) − ε · log σ(−margin)      (ε = label_smoothing, cDPO)

    Inputs (B,) sequence log-probs (see `sequence_logprobs`); reduction "mean" | "sum" | "none".
    """
    margin = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    margin = margin.float()
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def dpo_metrics(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor, beta: float = 0.1) -> dict:
    """Implicit rewards β·(log π − log π_ref) of chosen / rejected, their margin and the accuracy."""
    rc = beta * (policy_chosen_logps - ref_chosen_logps).detach().float()
    rr = beta * (policy_rejected_logps - ref_rejected_logps).detach().float()
    return {"reward_chosen": rc.mean().item(), "reward_rejected": rr.mean().item(),
            "reward_margin": (rc - rr).mean().item(), "reward_accuracy": (rc > rr).float().mean().item()}


# ---------------------------------------------------------------------------- MOHAWK
def matrix_orientation_loss(student_M: Tensor, teacher_A: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """MOHAWK stage 1: ‖M_student − A_teacher‖_F per (batch, head), averaged over batch and heads.

    student_M, teacher_A: (B, H, L, L) materialised mixing matrices (teacher: post-softmax attention).
    mask: None, (B, L) bool valid tokens (rows and columns of invalid tokens are ignored), or a boolean
    mask broadcastable to (B, H, L, L). Computed in fp32. The per-matrix Frobenius norm (not squared,
    not divided by L) follows the MOHAWK reference code, so the loss grows with sequence length.
    """
    if student_M.shape != teacher_A.shape:
        raise ValueError(f"mixing matrices differ in shape: student {tuple(student_M.shape)} vs teacher "
                         f"{tuple(teacher_A.shape)} (B, H, L, L) — heads must match")
    diff = student_M.float() - teacher_A.detach().float()
    if mask is not None:
        if mask.dim() == 2:
            m = mask.bool()
            mask = (m[:, None, :, None] & m[:, None, None, :])
        diff = diff * mask.to(diff.device, diff.dtype)
    return torch.linalg.matrix_norm(diff, ord="fro").mean()


def hidden_state_alignment_loss(student_out: Tensor, teacher_out: Tensor,
                                mask: Optional[Tensor] = None) -> Tensor:
    """MOHAWK stage 2: L2 distance ‖y_student − y_teacher‖₂ per token (over the feature dim), averaged
    over tokens (selected by `mask` (B, L) bool when given). student_out, teacher_out: (B, L, D); fp32 math."""
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"outputs differ in shape: {tuple(student_out.shape)} vs {tuple(teacher_out.shape)}")
    d = torch.linalg.vector_norm(student_out.float() - teacher_out.detach().float(), dim=-1)
    if mask is None:
        return d.mean()
    m = mask.to(d.device, d.dtype)
    return (d * m).sum() / m.sum().clamp_min(1.0)
