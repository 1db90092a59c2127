"""Logit processing and sampling: repetition penalty → temperature → top-k → top-p (HF's order and
semantics, so `transformers`' logits processors are the reference in the tests), then greedy argmax or a
seeded draw.

Every function works on logits of any leading shape ``(..., V)`` — ``(B, V)`` in the decode loop,
``(B, T, V)`` when the speculative verifier scores T positions at once. Draws use the exponential race
(``argmax(p / E)``, ``E ~ Exp(1)``) instead of ``torch.multinomial``: exact, no host sync, and any
leading shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from hybridize.ops._dispatch import use_kernels
from hybridize.ops.argmax import argmax as argmax_kernel


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 → greedy. top_k None/0 → off; top_p None/1 → off; repetition_penalty 1 → off."""
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 1 (or 0/None to disable), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_history(self) -> bool:
        """Whether the processed logits depend on the tokens seen so far (repetition penalty)."""
        return self.repetition_penalty != 1.0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL / HF `RepetitionPenaltyLogitsProcessor`: for every token already seen (prompt or generated),
    logit / penalty if it is > 0 else logit * penalty. logits, seen (bool): (..., V)."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def top_k_filter(logits: Tensor, k: Optional[int]) -> Tensor:
    """Keep the k largest logits (ties with the k-th kept too, as HF), -inf elsewhere."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: Optional[float]) -> Tensor:
    """Nucleus filter as HF `TopPLogitsWarper`: in ascending order, drop tokens whose cumulative
    probability is <= 1 - p (the most likely token always survives)."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= 1 - p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: Tensor, params: SamplingParams, seen: Optional[Tensor] = None) -> Tensor:
    """Raw logits (..., V) → processed fp32 logits: penalty (needs `seen` (..., V) bool), temperature,
    top-k, top-p. Greedy stops after the penalty (temperature/top-k/top-p keep the argmax)."""
    x = logits.float()
    if seen is not None and params.uses_history:
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if params.greedy:
        return x
    if params.temperature != 1.0:
        x = x / params.temperature
    return top_p_filter(top_k_filter(x, params.top_k), params.top_p)


def probs_from_logits(logits: Tensor, params: SamplingParams, seen: Optional[Tensor] = None) -> Tensor:
    """The sampling distribution (..., V) fp32: softmax of the processed logits, or one-hot of the
    argmax when greedy (so speculative acceptance formulas hold unchanged for greedy)."""
    x = process_logits(logits, params, seen)
    if params.greedy:
        return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).float()
    return x.softmax(dim=-1)


def draw(probs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One sample per row of probs (..., V) (need not be normalised) → (...) int64, by the exponential
    race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i / sum(p)."""
    e = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(1e-30)
    return (probs / e).argmax(dim=-1)


def sample(logits: Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None,
           seen: Optional[Tensor] = None) -> Tensor:
    """Next tokens (...) int64 from raw logits (..., V)."""
    x = process_logits(logits, params, seen)
    if params.greedy:
        return x.argmax(dim=-1)
    return draw(x.softmax(dim=-1), generator)


def argmax_last(x: Tensor, chunk: int = 256) -> Tensor:
    """``x.argmax(-1)`` (the first maximum; a NaN counts as the maximum) in two reductions: the max of each
    `chunk`-wide slice of the last dim, then the argmax over those maxima. Why: at batch 1 torch's argmax of
    one 128k-logit row is a single-block reduction (27 µs on an H100, ~2.5 % of a 1.2 B model's decode
    step); V / chunk rows reduce in parallel. On CUDA the same two stages run as two Triton kernels
    (`hybridize.ops.argmax`; torch's five kernels took ~11 µs). x (..., V) → int64 (...)."""
    V = x.shape[-1]
    if V < 2 * chunk:
        return x.argmax(-1)
    if use_kernels(x):                  # one Triton reduction per 2048 logits, then one per row: 2 launches
        return argmax_kernel(x)
    pad = (-V) % chunk
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=float("-inf"))
    m, i = x.unflatten(-1, (-1, chunk)).max(-1)            # (..., V / chunk): first maximum of each slice
    c = m.argmax(-1, keepdim=True)                          # first slice holding the overall maximum
    return (c * chunk + i.gather(-1, c)).squeeze(-1)
