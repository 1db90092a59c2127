"""Perplexity with sliding-window (strided) evaluation, per-position loss curves and length extrapolation.

Windowing follows the Hugging Face perplexity recipe: windows of `seq_len` tokens start every `stride`
tokens; each window scores only the tokens no earlier window scored, so every token gets as much context
as the window allows and is counted once. For a document of n tokens (positions 0 … n−1)::

    window k = [b, e),  b = k·stride,  e = min(b + seq_len, n)
    scored   = targets t with max(prev_e, b + 1) <= t < e     (t = 0 has no context and is never scored)

With stride < seq_len every token t >= 1 is scored exactly once. With stride = seq_len the windows are
disjoint chunks and the first token of each chunk (no context inside its window) is not scored — the
usual "exp(mean CE over chunks)" number.

The per-position curve uses every prediction of every window (not only the scored ones):
``per_position_loss[i]`` = mean loss of predicting the token at window position i + 1 from the i + 1
tokens before it. It shows how the loss falls with context — and, evaluated past the training length,
whether a model extrapolates (Griffin Fig. 5).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

TokenIds = Union[Tensor, Sequence[int], Sequence[Sequence[int]], Sequence[Tensor]]


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens [begin, end) of document `doc`; targets t in [score_from, end) count
    towards the perplexity."""
    doc: int
    begin: int
    end: int
    score_from: int


def sliding_windows(n_tokens: int, seq_len: int, stride: Optional[int] = None, doc: int = 0) -> list[Window]:
    """The windows of the HF recipe for one document of `n_tokens` tokens (see the module docstring)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (got {seq_len})")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must lie in [1, seq_len={seq_len}] (got {stride})")
    out, prev_end = [], 0
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + seq_len, n_tokens)
        score_from = max(prev_end, begin + 1)
        if end - begin >= 2:
            out.append(Window(doc, begin, end, score_from))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _as_documents(token_ids: TokenIds) -> list[Tensor]:
    """A 1-D tensor / list of ints (one document) or a list of them → list of 1-D LongTensors."""
    if isinstance(token_ids, Tensor):
        if token_ids.dim() == 1:
            return [token_ids.long()]
        if token_ids.dim() == 2:
            return [row.long() for row in token_ids]
        raise ValueError(f"token_ids must be 1-D or 2-D, got shape {tuple(token_ids.shape)}")
    seq = list(token_ids)
    if not seq:
        return []
    if isinstance(seq[0], int):
        return [torch.tensor(seq, dtype=torch.long)]
    return [d.long() if isinstance(d, Tensor) else torch.tensor(list(d), dtype=torch.long) for d in seq]


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def token_losses(model, input_ids: Tensor, *, autocast_dtype: Optional[torch.dtype] = None,
                 row_chunk: int = 1) -> Tensor:
    """Next-token losses −log p(x_{t+1} | x_{≤t}) in fp32. input_ids (B, L) → (B, L − 1).

    The cross-entropy runs `row_chunk` rows at a time so a large vocabulary never needs a (B, L, V) fp32
    copy of the logits."""
    dev = _model_device(model)
    ids = input_ids.to(dev)
    ctx = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        logits = model(ids).logits
    out = []
    for lo in range(0, ids.shape[0], row_chunk):
        lg = logits[lo:lo + row_chunk, :-1].float()
        out.append(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[lo:lo + row_chunk, 1:].reshape(-1),
                                   reduction="none").view(lg.shape[0], -1))
    return torch.cat(out)


@torch.no_grad()
def perplexity(model, token_ids: TokenIds, seq_len: int = 1024, stride: Optional[int] = None,
               batch_size: int = 8, *, max_tokens: Optional[int] = None, pad_id: int = 0,
               autocast_dtype: Optional[torch.dtype] = None, progress: bool = False) -> dict:
    """Perplexity of a causal LM (anything whose ``model(input_ids).logits`` is (B, L, V)).

    token_ids:  one document (1-D tensor / list of ints) or several (list of them, or a 2-D tensor whose
                rows are documents). Documents are evaluated separately: no context crosses them.
    seq_len:    window length; stride: step between windows (default seq_len = disjoint chunks).
    batch_size: windows per forward (shorter windows are right-padded: exact for causal models).
    max_tokens: evaluate only the first `max_tokens` tokens (over all documents, in order).

    Returns {"ppl", "nll" (mean over scored tokens, nats), "tokens" (scored), "windows",
    "per_position_loss" (list, length seq_len − 1), "per_position_count", "seq_len", "stride"}.
    """
    stride = seq_len if stride is None else stride
    docs = _as_documents(token_ids)
    if max_tokens is not None:
        docs, left = [], max_tokens
        for d in _as_documents(token_ids):
            if left <= 0:
                break
            docs.append(d[:left])
            left -= len(docs[-1])
    windows = [w for i, d in enumerate(docs) for w in sliding_windows(len(d), seq_len, stride, doc=i)]
    if not windows:
        raise ValueError("nothing to evaluate: every document is shorter than 2 tokens")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    nll_sum, n_scored = 0.0, 0
    pos_sum = torch.zeros(seq_len - 1, dtype=torch.float64)
    pos_cnt = torch.zeros(seq_len - 1, dtype=torch.long)
    it: Iterable = range(0, len(windows), batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, total=math.ceil(len(windows) / batch_size), desc="perplexity", unit="batch")
    try:
        for lo in it:
            group = windows[lo:lo + batch_size]
            width = max(w.end - w.begin for w in group)
            ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            valid = torch.zeros(len(group), width - 1, dtype=torch.bool)
            scored = torch.zeros(len(group), width - 1, dtype=torch.bool)
            for r, w in enumerate(group):
                n = w.end - w.begin
                ids[r, :n] = docs[w.doc][w.begin:w.end]
                valid[r, :n - 1] = True
                # loss column j predicts the token at position begin + j + 1
                scored[r, w.score_from - w.begin - 1:n - 1] = True
            losses = token_losses(model, ids, autocast_dtype=autocast_dtype).double().cpu()
            nll_sum += float(losses[scored].sum())
            n_scored += int(scored.sum())
            pos_sum[:width - 1] += (losses * valid).sum(0)
            pos_cnt[:width - 1] += valid.sum(0)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    nll = nll_sum / max(n_scored, 1)
    per_pos = torch.where(pos_cnt > 0, pos_sum / pos_cnt.clamp(min=1), torch.full_like(pos_sum, float("nan")))
    return {"ppl": math.exp(min(nll, 700.0)), "nll": nll, "tokens": n_scored, "windows": len(windows),
            "seq_len": seq_len, "stride": stride,
            "per_position_loss": per_pos.tolist(), "per_position_count": pos_cnt.tolist()}


def extrapolation(model, token_ids: TokenIds, train_len: int, factors: Sequence[float] = (1, 2, 4, 8), *,
                  batch_size: int = 1, max_tokens: Optional[int] = None, autocast_dtype=None,
                  progress: bool = False) -> dict:
    """Perplexity at evaluation lengths factor × train_len (disjoint windows of that length, on the same
    tokens) → {"train_len", "lengths": [{"factor", "seq_len", "ppl", "nll", "tokens"}, ...],
    "per_position_loss" / "per_position_count" (from the longest length: the Griffin Fig. 5 curve)}."""
    rows, longest = [], None
    for f in sorted(factors):
        L = int(round(f * train_len))
        r = perplexity(model, token_ids, seq_len=L, stride=L, batch_size=batch_size, max_tokens=max_tokens,
                       autocast_dtype=autocast_dtype, progress=progress)
        rows.append({"factor": f, "seq_len": L, "ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"],
                     "windows": r["windows"]})
        longest = r
    return {"train_len": train_len, "lengths": rows,
            "per_position_loss": longest["per_position_loss"],
            "per_position_count": longest["per_position_count"]}


def bin_curve(values: Sequence[float], counts: Optional[Sequence[int]] = None, *, num_bins: int = 64,
              log: bool = True, first_position: int = 1) -> tuple[list, list]:
    """Average a per-position curve into bins (log-spaced by default) for plotting →
    (bin centre positions, mean values). Positions are `first_position + index`; NaNs are skipped;
    bins are weighted by `counts` when given."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    c = np.ones_like(v) if counts is None else np.asarray(counts, dtype=np.float64)
    ok = np.isfinite(v) & (c > 0)
    pos = np.arange(first_position, first_position + v.size, dtype=np.float64)
    if v.size <= num_bins:
        return pos[ok].tolist(), v[ok].tolist()
    edges = np.unique(np.geomspace(pos[0], pos[-1] + 1, num_bins + 1).astype(np.int64)) if log else \
        np.unique(np.linspace(pos[0], pos[-1] + 1, num_bins + 1).astype(np.int64))
    xs, ys = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = ok & (pos >= a) & (pos < b)
        if sel.any():
            w = c[sel]
            xs.append(float((pos[sel] * w).sum() / w.sum()))
            ys.append(float((v[sel] * w).sum() / w.sum()))
    return xs, ys
