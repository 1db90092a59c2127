"""Synthetic recall / copy tasks that separate sequence mixers: MQAR (Zoology), selective copying and
induction heads (Mamba / Griffin §6.2).

Every generator is deterministic for a seed (a private `numpy.random.Generator`, no global RNG state)
and returns a batch dict of LongTensors of shape (N, L):

- ``input_ids``: the token sequence;
- ``labels``:    −100 everywhere except at the answer positions, **in the HybridLM / Hugging Face
                 convention** (unshifted): ``labels[:, t]`` is the token the model must predict from
                 positions ``≤ t − 1``. So ``model(input_ids, labels=labels).loss`` is exactly the loss on the
                 answers, and `answer_accuracy` compares ``argmax logits[:, t − 1]`` with ``labels[:, t]``.

(Zoology stores its labels already shifted — its label at position t is predicted *at* t; ours is that
label moved one position right. The token at an answer position is never visible to the prediction of
that answer: the model is causal.)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100

#: Zoology Fig. 2 grid: (sequence length, number of key-value pairs).
MQAR_STANDARD_GRID = ((64, 4), (128, 8), (256, 16), (512, 64))
#: Harder settings: four times as many pairs per length (the densest MQAR allows, kv = L / 4) and longer.
MQAR_HARD_GRID = ((256, 64), (512, 128), (1024, 256))


class SyntheticTaskError(ValueError):
    """A synthetic-task setting is impossible (e.g. too many kv pairs for the sequence length)."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise SyntheticTaskError(msg)


def _to_batch(inputs: np.ndarray, aligned_labels: np.ndarray) -> dict:
    """Zoology-style aligned labels (target predicted *at* t) → our unshifted labels (target at t + 1)."""
    _need(bool((aligned_labels[:, -1] == IGNORE_INDEX).all()), "internal: an answer at the last position")
    labels = np.full_like(aligned_labels, IGNORE_INDEX)
    labels[:, 1:] = aligned_labels[:, :-1]
    return {"input_ids": torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))}


def _random_subsets(rng: np.random.Generator, n: int, population: int, k: int,
                    chunk: int = 512) -> np.ndarray:
    """(n, k) rows of k distinct values in [0, population), each row a uniformly random ordered subset."""
    out = np.empty((n, k), dtype=np.int64)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        r = rng.random((hi - lo, population))
        # the k smallest of iid uniforms, ordered: = argsort(r)[:, :k] without sorting the whole row
        idx = np.argpartition(r, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(r, idx, axis=1), axis=1)
        out[lo:hi] = np.take_along_axis(idx, order, axis=1)
    return out


# ---------------------------------------------------------------------------- MQAR
def power_law_probs(space: int, power_a: float = 0.01) -> np.ndarray:
    """Zoology's gap distribution over gaps 0 … space−1: p(g) ∝ a·(g+1)^(a−1) (a = 1 is uniform;
    small a puts most of the mass on short gaps, as for repeated bigrams in real text)."""
    _need(space >= 1 and power_a > 0, f"power law needs space >= 1 and power_a > 0 (got {space}, {power_a})")
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def _weighted_sample_without_replacement(rng: np.random.Generator, p: np.ndarray, n: int,
                                         k: int) -> np.ndarray:
    """(n, k) draws from p without replacement, in draw order — the distribution of
    ``np.random.choice(len(p), k, replace=False, p=p)`` per row, vectorised (Efraimidis–Spirakis:
    the k largest log(u) / p_i are a successive weighted sample)."""
    keys = np.log(rng.random((n, p.size))) / p
    return np.argsort(-keys, axis=1)[:, :k]


def mqar(num_examples: int, seq_len: int = 64, num_kv_pairs: int = 4, vocab_size: int = 8192, *,
         power_a: float = 0.01, random_non_queries: bool = True, seed: int = 0) -> dict:
    """Multi-query associative recall exactly as Zoology (Arora et al. 2023, ``multiquery_ar``).

    Layout of one example (kv = num_kv_pairs, C = 2·kv)::

        k1 v1 k2 v2 … k_kv v_kv | query region of L − C tokens

    - keys are distinct tokens from the first half of the vocabulary [1, V/2) (0 is the filler),
      values distinct tokens from the second half [V/2, V);
    - every key is queried exactly once: key i is placed at position C + 2·g_i of the query region, where
      the gaps g_i ∈ [0, (L − C)/2) are distinct and drawn from the power law `power_law_probs(·, power_a)`;
    - the answer (key i's value) is the token to predict right after the query; labels are −100 elsewhere;
    - the other positions are 0, or uniformly random tokens in [0, V) when `random_non_queries` (Zoology's
      default; they may happen to equal a key — that is part of the task).

    Returns {"input_ids", "labels"} (N, L) — labels in the unshifted convention of the module docstring.
    """
    L, kv, V = seq_len, num_kv_pairs, vocab_size
    _need(num_examples >= 1, "num_examples must be >= 1")
    _need(L % 2 == 0, f"MQAR: seq_len must be even (got {L})")
    _need(V >= L, f"MQAR: vocab_size ({V}) must be >= seq_len ({L}), as in Zoology")
    _need(kv >= 1 and 4 * kv <= L, f"MQAR: need 1 <= num_kv_pairs and 4 * num_kv_pairs <= seq_len "
                                   f"(got {kv} pairs for length {L})")
    _need(kv <= V // 2 - 1, f"MQAR: {kv} distinct keys do not fit in the key vocabulary [1, {V // 2})")
    rng = np.random.default_rng(seed)
    n, C = num_examples, 2 * kv
    keys = _random_subsets(rng, n, V // 2 - 1, kv) + 1
    values = _random_subsets(rng, n, V - V // 2, kv) + V // 2
    space = (L - C) // 2
    gaps = _weighted_sample_without_replacement(rng, power_law_probs(space, power_a), n, kv)

    inputs = np.zeros((n, L), dtype=np.int64)
    inputs[:, 0:C:2] = keys
    inputs[:, 1:C:2] = values
    qpos = C + 2 * gaps                                        # query positions (n, kv), all < L − 1
    np.put_along_axis(inputs, qpos, keys, axis=1)
    aligned = np.full((n, L), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(aligned, qpos, values, axis=1)            # Zoology: the value is predicted at the query
    if random_non_queries:
        filler = rng.integers(0, V, size=(n, L))
        inputs = np.where(inputs == 0, filler, inputs)
    return _to_batch(inputs, aligned)


# ---------------------------------------------------------------------------- selective copying
def selective_copying(num_examples: int, seq_len: int = 256, num_data_tokens: int = 16,
                      vocab_size: int = 16, *, seed: int = 0) -> dict:
    """Selective copying (Gu & Dao 2023, used in Griffin §6.2): remember the data tokens scattered among
    noise tokens and reproduce them, in order, after the input.

    Tokens: 0 = noise, data tokens in [1, V − 2], V − 1 = marker. With M = num_data_tokens and
    R = seq_len − M − 1::

        [ R tokens: M data tokens at random sorted positions, noise elsewhere ] [ marker × (M + 1) ]

    At the i-th marker the model must output the i-th data token (it is not fed back: the markers carry no
    information, so the model must count). The final marker only pads the row: its prediction is not scored.
    """
    M, V = num_data_tokens, vocab_size
    R = seq_len - M - 1
    _need(num_examples >= 1, "num_examples must be >= 1")
    _need(V >= 3, f"selective copying needs vocab_size >= 3 (noise, marker, data); got {V}")
    _need(M >= 1 and R >= M, f"selective copying: seq_len {seq_len} too short for {M} data tokens "
                             f"(need seq_len >= {2 * M + 1})")
    rng = np.random.default_rng(seed)
    n = num_examples
    data = rng.integers(1, V - 1, size=(n, M))
    pos = np.sort(_random_subsets(rng, n, R, M), axis=1)
    inputs = np.zeros((n, seq_len), dtype=np.int64)
    np.put_along_axis(inputs, pos, data, axis=1)
    inputs[:, R:] = V - 1
    aligned = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    aligned[:, R:R + M] = data
    return _to_batch(inputs, aligned)


# ---------------------------------------------------------------------------- induction heads
def induction_heads(num_examples: int, seq_len: int = 256, vocab_size: int = 16, *, seed: int = 0) -> dict:
    """Induction heads (Olsson et al.; the Mamba / Griffin §6.2 version): recall the token that followed a
    special token, when the special token appears again at the end.

    Tokens: ordinary tokens in [0, V − 2], the special token V − 1 (appears exactly twice)::

        random tokens … S x … random tokens … S x
                       p                      L−2 L−1

    The only answer is x at position L − 1 (predicted from the final S). Evaluating a model at lengths
    longer than it was trained on measures length extrapolation.
    """
    V, L = vocab_size, seq_len
    _need(num_examples >= 1, "num_examples must be >= 1")
    _need(V >= 3, f"induction heads needs vocab_size >= 3; got {V}")
    _need(L >= 5, f"induction heads needs seq_len >= 5; got {L}")
    rng = np.random.default_rng(seed)
    n, special = num_examples, V - 1
    inputs = rng.integers(0, special, size=(n, L))
    p = rng.integers(0, L - 3, size=n)                          # trigger position; p + 1 <= L − 3
    rows = np.arange(n)
    x = inputs[rows, p + 1]
    inputs[rows, p] = special
    inputs[:, L - 2] = special
    inputs[:, L - 1] = x
    aligned = np.full((n, L), IGNORE_INDEX, dtype=np.int64)
    aligned[:, L - 2] = x
    return _to_batch(inputs, aligned)


# ---------------------------------------------------------------------------- tasks
TASKS = ("mqar", "selective_copying", "induction_heads")


def make_task(task: str, seq_len: int, **kw) -> Callable[[int, int], dict]:
    """A generator `(num_examples, seed) → batch` for a task name and sequence length; `kw` are the
    task's own options (num_kv_pairs, vocab_size, power_a, num_data_tokens, ...)."""
    name = task.replace("-", "_")
    if name == "mqar":
        kv = kw.pop("num_kv_pairs", None) or default_kv_pairs(seq_len)
        return lambda n, seed: mqar(n, seq_len, kv, seed=seed, **kw)
    if name in ("selective_copying", "copying", "selective_copy"):
        return lambda n, seed: selective_copying(n, seq_len, seed=seed, **kw)
    if name in ("induction_heads", "induction"):
        return lambda n, seed: induction_heads(n, seq_len, seed=seed, **kw)
    raise SyntheticTaskError(f"unknown synthetic task {task!r}; choose one of {TASKS}")


def default_kv_pairs(seq_len: int) -> int:
    """kv pairs of the Zoology grid for this length (64→4, 128→8, 256→16, 512→64), else L / 16."""
    return dict(MQAR_STANDARD_GRID).get(seq_len, max(1, seq_len // 16))


def task_vocab_size(task: str, **kw) -> int:
    """Vocabulary the model needs for a task (its `vocab_size` option or the task default)."""
    name = task.replace("-", "_")
    default = 8192 if name == "mqar" else 16
    return int(kw.get("vocab_size") or default)


# ---------------------------------------------------------------------------- scoring
def answer_mask(labels: Tensor) -> Tensor:
    """(N, L) bool: the answer positions."""
    return labels != IGNORE_INDEX


@torch.no_grad()
def answer_accuracy(model, batch: dict, *, batch_size: int = 64, autocast_dtype: Optional[torch.dtype] = None
                    ) -> dict:
    """Accuracy of greedy predictions at the answer positions → {"accuracy", "sequence_accuracy",
    "answers"}: accuracy over all answers; sequence_accuracy = fraction of examples with every answer right.

    Teacher-forced (one forward per row block): argmax of logits[:, t − 1] vs labels[:, t].
    """
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct = total = seq_ok = 0
    try:
        ids_all, lab_all = batch["input_ids"], batch["labels"]
        for lo in range(0, ids_all.shape[0], batch_size):
            ids = ids_all[lo:lo + batch_size].to(dev)
            lab = lab_all[lo:lo + batch_size].to(dev)
            with (torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype
                  else contextlib.nullcontext()):
                logits = model(ids).logits
            pred = logits[:, :-1].argmax(-1)
            tgt = lab[:, 1:]
            m = tgt != IGNORE_INDEX
            hit = (pred == tgt) & m
            correct += int(hit.sum())
            total += int(m.sum())
            seq_ok += int(((hit | ~m).all(dim=1)).sum())
    finally:
        model.train(was_training)
    n = ids_all.shape[0]
    return {"accuracy": correct / max(total, 1), "sequence_accuracy": seq_ok / max(n, 1), "answers": total}


class SyntheticStream:
    """Iterator of fresh batches; batch i is `generator(batch_size, seed=hash(seed, i))`, so any batch can
    be regenerated and a stream resumes exactly from `state_dict()`."""

    def __init__(self, generator: Callable[[int, int], dict], batch_size: int, *, seed: int = 0,
                 start: int = 0):
        self.generator, self.batch_size, self.seed, self.index = generator, batch_size, seed, start

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        s = int(np.random.SeedSequence([self.seed, self.index]).generate_state(1)[0])
        self.index += 1
        return self.generator(self.batch_size, s)

    def state_dict(self) -> dict:
        return {"index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.index, self.seed = int(state["index"]), int(state["seed"])


def describe(batch: dict, row: int = 0, width: int = 24) -> str:
    """A short human-readable view of one example (first `width` tokens and every answer)."""
    ids = batch["input_ids"][row].tolist()
    lab = batch["labels"][row].tolist()
    answers = [(t, lab[t]) for t in range(len(lab)) if lab[t] != IGNORE_INDEX]
    head = " ".join(map(str, ids[:width])) + (" …" if len(ids) > width else "")
    return f"input: {head}\nanswers (position → token): {answers[:16]}{' …' if len(answers) > 16 else ''}"


__all__: Sequence[str] = (
    "IGNORE_INDEX", "MQAR_STANDARD_GRID", "MQAR_HARD_GRID", "SyntheticTaskError", "power_law_probs", "mqar",
    "selective_copying", "induction_heads", "TASKS", "make_task", "default_kv_pairs", "task_vocab_size",
    "answer_mask", "answer_accuracy", "SyntheticStream", "describe",
)
