"""Packing token documents into fixed-length rows that keep document boundaries.

Every batch is a dict of LongTensors of shape (B, L):

- ``input_ids``: documents laid end to end (each ends with EOS when the tokenizer has one); a document
  that does not fit continues at the start of the next row.
- ``seq_idx``: the document index of every token within its row (0, 1, 2, ... non-decreasing), so the
  model resets recurrent states, masks attention and restarts RoPE positions at each document start
  (see docs/ARCHITECTURE.md).
- ``labels``: ``input_ids`` with −100 at the first token of every piece (every position where seq_idx
  changes, and position 0). `causal_lm_loss` predicts ``labels[t+1]`` from position t, so this masks
  exactly the targets that would cross a document boundary (predicting the next document's first
  token from the previous document's EOS). ``labels[:, 0]`` is never a target anyway.
- padded positions (only in a final, partial row when ``drop_last=False``) have their own seq_idx and
  label −100.
- with a loss mask (SFT on assistant turns only, ``assistant_only_loss``): labels are also −100 at every
  token of a chat document outside its assistant turns (system / user turns, role headers), so only the
  assistant tokens are targets. Documents are still packed whole and keep their boundaries; the
  non-assistant tokens stay in ``input_ids`` as context.

`PackedStream` does this lazily (one document in memory at a time), deterministically for a seed, and
resumably: `state_dict()` is a small JSON-able dict (epoch, shard position, document index, token
offset) from which `load_state_dict()` continues with exactly the same batches. Shuffling permutes the
corpus' shards once per epoch with a permutation derived from (seed, epoch), so no RNG state needs to
be saved. `pack_documents` is the in-memory equivalent for small corpora and tests.
"""
from __future__ import annotations

import itertools
import random
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from hybridize.data.corpus import Corpus, CorpusError
from hybridize.data.tokenizer import encode_document, encode_document_with_mask, pad_token_id

IGNORE_INDEX = -100
_END = object()


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, *, pad_id: int = 0,
                   drop_last: bool = True, masks: Optional[Sequence] = None) -> dict[str, Tensor]:
    """Pack token lists (in order, no shuffling) into rows of `seq_len` → dict of (N, L) tensors.

    drop_last: drop the final partial row (True) or pad it (False). Empty documents are skipped.
    masks: optional loss masks, one per document (a bool list as long as the document, or None = every
    token is a target): labels are −100 where the mask is false (see `encode_document_with_mask`).
    """
    if masks is None:
        masks = [None] * len(docs)
    if len(masks) != len(docs):
        raise CorpusError(f"pack_documents: {len(masks)} masks for {len(docs)} documents")
    pairs = [(list(d), m) for d, m in zip(docs, masks) if len(d)]
    for d, m in pairs:
        if m is not None and len(m) != len(d):
            raise CorpusError(f"pack_documents: a mask of length {len(m)} for a document of {len(d)} tokens")
    docs = [d for d, _ in pairs]
    if not docs:
        raise CorpusError("pack_documents: no tokens to pack")
    flat = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    target = torch.tensor([bool(x) for d, m in pairs for x in (m if m is not None else [True] * len(d))],
                          dtype=torch.bool)
    doc_id = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor([len(d) for d in docs]))
    n_full, rest = divmod(flat.numel(), seq_len)
    if n_full == 0 and drop_last:
        raise CorpusError(f"pack_documents: {flat.numel()} tokens, need at least seq_len={seq_len} for one row")
    if rest and not drop_last:
        pad = seq_len - rest
        flat = torch.cat([flat, torch.full((pad,), pad_id)])
        target = torch.cat([target, torch.zeros(pad, dtype=torch.bool)])
        doc_id = torch.cat([doc_id, torch.full((pad,), len(docs))])   # padding = its own "document"
        n_full += 1
    ids = flat[: n_full * seq_len].view(n_full, seq_len)
    did = doc_id[: n_full * seq_len].view(n_full, seq_len)
    change = torch.ones_like(did, dtype=torch.bool)
    change[:, 1:] = did[:, 1:] != did[:, :-1]
    seq_idx = change.long().cumsum(1) - 1
    labels = ids.masked_fill(change, IGNORE_INDEX)
    labels = labels.masked_fill(did == len(docs), IGNORE_INDEX)
    labels = labels.masked_fill(~target[: n_full * seq_len].view(n_full, seq_len), IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "seq_idx": seq_idx}


def tokenize_corpus(corpus, tokenizer, *, add_eos: bool = True) -> list[list[int]]:
    """All documents of a (small) corpus as token lists, in corpus order."""
    return [ids for ids in (encode_document(d, tokenizer, add_eos=add_eos) for d in corpus) if ids]


def _check_assistant_only_loss(value) -> None:
    if not (value is None or isinstance(value, bool)):
        raise CorpusError(f"assistant_only_loss must be true, false or None (auto), got {value!r}")


class PackedStream:
    """Packed batches from a corpus, streamed: an iterator of dicts (input_ids, labels, seq_idx), each (B, L).

    corpus:    a `Corpus` (shards are shuffled per epoch when `shuffle`).
    tokenizer: turns documents into ids (via `encode_document`: BOS per the tokenizer's convention, EOS
               appended); or pass `encode=callable(doc) -> list[int] | (ids, mask)` instead (mask: bool
               per token, False = no target; None = all targets).
    assistant_only_loss: targets of chat documents (SFT, like TRL's option of the same name):
               False (default): every token; True: only the assistant turns' tokens (`encode_chat_with_mask`;
               a plain-text document is an error, it has no roles); None (auto): assistant tokens for chat
               documents, every token for plain text. Chat documents without an assistant token are skipped.
    epochs:    None = repeat forever (training); an int = stop after that many passes (evaluation).
    drop_last: at the end of a finite stream, drop the partial batch (True) or return it with the last
               row padded (False; the batch may then have fewer than `batch_size` rows).
    """

    def __init__(self, corpus: Corpus, tokenizer=None, *, seq_len: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True, epochs: Optional[int] = None, drop_last: bool = True,
                 add_eos: bool = True, encode: Optional[Callable[[object], list]] = None,
                 assistant_only_loss: Optional[bool] = False):
        if seq_len < 2:
            raise CorpusError(f"seq_len must be at least 2, got {seq_len}")
        if batch_size < 1:
            raise CorpusError(f"batch_size must be at least 1, got {batch_size}")
        if epochs is not None and epochs < 1:
            raise CorpusError(f"epochs must be None (forever) or >= 1, got {epochs}")
        _check_assistant_only_loss(assistant_only_loss)
        self.assistant_only_loss = assistant_only_loss
        self.skipped_no_assistant = 0   # chat documents without assistant tokens (skipped; for messages)
        if encode is None:
            if tokenizer is None:
                raise CorpusError("PackedStream needs a tokenizer (or an encode function)")
            if assistant_only_loss is False:
                encode = lambda doc: encode_document(doc, tokenizer, add_eos=add_eos)  # noqa: E731
            else:
                encode = lambda doc: self._encode_masked(doc, tokenizer, add_eos)  # noqa: E731
        if corpus.num_shards() == 0:
            raise CorpusError(f"corpus {corpus.name} has no shards (no files / documents)")
        self.corpus = corpus
        self.encode = encode
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.shuffle, self.epochs, self.drop_last = seed, shuffle, epochs, drop_last
        self.pad_id = pad_token_id(tokenizer) if tokenizer is not None else 0
        self._reset_position()

    # ------------------------------------------------------------------ position
    def _reset_position(self) -> None:
        self.epoch = 0          # current pass over the corpus
        self.shard_pos = 0      # index into this epoch's shard order
        self.doc_pos = 0        # index of the current document within the shard (split-filtered)
        self.tok_pos = 0        # tokens of the current document already emitted
        self.epoch_tokens = 0   # tokens emitted in this epoch (for the "too small" check)
        self.batches = 0        # batches emitted since the start
        self._perm_cache: Optional[tuple] = None
        self._docs: Optional[Iterator] = None
        self._tokens: Optional[list] = None
        self._mask: Optional[list] = None
        self._finished = False
        self._total_tokens = 0  # tokens emitted by this object (for error messages only)

    def state_dict(self) -> dict:
        """JSON-able position after the last batch returned."""
        return {"version": 1, "corpus": self.corpus.fingerprint, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "shard_pos": self.shard_pos, "doc_pos": self.doc_pos,
                "tok_pos": self.tok_pos, "epoch_tokens": self.epoch_tokens, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (same corpus, seq_len, batch_size, seed, shuffle)."""
        mine = self.state_dict()
        bad = [f"{k}: saved {state.get(k)!r} vs now {mine[k]!r}"
               for k in ("corpus", "seq_len", "batch_size", "seed", "shuffle") if state.get(k) != mine[k]]
        if bad:
            raise CorpusError("cannot resume the data stream, it was saved with different settings: "
                              + "; ".join(bad))
        self._reset_position()
        for k in ("epoch", "shard_pos", "doc_pos", "tok_pos", "epoch_tokens", "batches"):
            setattr(self, k, int(state[k]))

    # ------------------------------------------------------------------ documents
    def _encode_masked(self, doc, tokenizer, add_eos: bool):
        ids, mask = encode_document_with_mask(doc, tokenizer, add_eos=add_eos)
        if mask is None:
            if ids and self.assistant_only_loss is True:
                raise CorpusError(
                    f"corpus {self.corpus.name}: assistant_only_loss = true needs chat documents "
                    "({'messages': [...]}), but this document is plain text, which has no roles; train on all "
                    "its tokens (assistant_only_loss = false, or leave it unset: auto)")
            return ids
        if not any(mask):
            self.skipped_no_assistant += 1
            return []
        return ids, mask

    def _perm(self) -> list:
        if self._perm_cache is None or self._perm_cache[0] != self.epoch:
            order = list(range(self.corpus.num_shards()))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._perm_cache = (self.epoch, order)
        return self._perm_cache[1]

    def _end_epoch(self) -> None:
        n = self.epoch_tokens
        if n == 0:
            why = (f" ({self.skipped_no_assistant} chat documents were skipped: no assistant tokens to train on "
                   "with assistant_only_loss)") if self.skipped_no_assistant else ""
            raise CorpusError(f"corpus {self.corpus.name} yields 0 tokens, "
                              f"need at least seq_len={self.seq_len}{why}")
        if self.epochs is None and n < self.seq_len:
            raise CorpusError(f"corpus {self.corpus.name} yields {n} tokens, "
                              f"need at least seq_len={self.seq_len} (one row) to stream it")
        self.epoch += 1
        self.shard_pos = self.doc_pos = self.tok_pos = self.epoch_tokens = 0
        self._docs = None

    def _current(self) -> Optional[list]:
        """Tokens of the document at the cursor (empty documents skipped), or None at the end."""
        while self._tokens is None:
            if self.epochs is not None and self.epoch >= self.epochs:
                return None
            perm = self._perm()
            if self.shard_pos >= len(perm):
                self._end_epoch()
                continue
            if self._docs is None:
                self._docs = self.corpus.shard_documents(perm[self.shard_pos])
                # resuming: skip the documents already consumed (read, not tokenized)
                for _ in itertools.islice(self._docs, self.doc_pos):
                    pass
            doc = next(self._docs, _END)
            if doc is _END:
                self.shard_pos += 1
                self.doc_pos = self.tok_pos = 0
                self._docs = None
                continue
            out = self.encode(doc)
            mask = None
            if isinstance(out, tuple) and len(out) == 2 and not isinstance(out[0], int):
                out, mask = out
            toks = list(out)
            if not toks:
                self.doc_pos += 1
                continue
            if mask is not None:
                mask = [bool(m) for m in mask]
                if len(mask) != len(toks):
                    raise CorpusError(f"corpus {self.corpus.name}: the encoder gave a loss mask of {len(mask)} "
                                      f"entries for {len(toks)} tokens")
            self._tokens, self._mask = toks, mask
        return self._tokens

    # ------------------------------------------------------------------ rows and batches
    def _next_row(self):
        """(ids, labels, seq_idx) lists of length <= L; shorter only at the end of the stream."""
        ids, labels, seq = [], [], []
        seg = -1
        while len(ids) < self.seq_len:
            toks = self._current()
            if toks is None:
                break
            lo, hi = self.tok_pos, self.tok_pos + self.seq_len - len(ids)
            take = toks[lo:hi]
            seg += 1
            ids += take
            seq += [seg] * len(take)
            if self._mask is None:
                labels += [IGNORE_INDEX] + take[1:]      # no target across the boundary into this piece
            else:                                        # ... nor outside the assistant turns
                labels += [IGNORE_INDEX] + [t if m else IGNORE_INDEX
                                            for t, m in zip(take[1:], self._mask[lo + 1: hi])]
            self.tok_pos += len(take)
            self.epoch_tokens += len(take)
            self._total_tokens += len(take)
            if self.tok_pos >= len(toks):
                self._tokens = self._mask = None
                self.doc_pos += 1
                self.tok_pos = 0
        return ids, labels, seq

    def __iter__(self) -> "PackedStream":
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self._finished:
            raise StopIteration
        rows = []
        while len(rows) < self.batch_size:
            ids, labels, seq = self._next_row()
            if not ids:
                break
            if len(ids) < self.seq_len:       # end of a finite stream: a partial row
                if self.drop_last:
                    break
                pad = self.seq_len - len(ids)
                ids += [self.pad_id] * pad
                labels += [IGNORE_INDEX] * pad
                seq += [seq[-1] + 1] * pad
                rows.append((ids, labels, seq))
                break
            rows.append((ids, labels, seq))
        if len(rows) < self.batch_size and (self.drop_last or not rows):
            self._finished = True
            if self.batches == 0:
                need = self.batch_size * self.seq_len if self.drop_last else 1
                raise CorpusError(
                    f"corpus {self.corpus.name} yields {self._total_tokens} tokens, need at least {need} "
                    f"(batch_size={self.batch_size} × seq_len={self.seq_len}) for one batch in {self.epochs} "
                    "epoch(s); use more data, a smaller batch or drop_last=False")
            raise StopIteration
        self.batches += 1
        return {k: torch.tensor([r[i] for r in rows], dtype=torch.long)
                for i, k in enumerate(("input_ids", "labels", "seq_idx"))}


def fixed_batches(stream, n: int) -> list:
    """The first `n` batches of a stream (e.g. a held-out set evaluated every time); fewer if it ends."""
    out = list(itertools.islice(iter(stream), n))
    if not out:
        raise CorpusError("fixed_batches: the stream yielded no batch")
    return out
