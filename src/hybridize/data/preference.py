"""Preference pairs for DPO: JSONL records ``{"prompt", "chosen", "rejected"}``.

`prompt` is a string or a list of chat messages (rendered with the chat template and a generation
prompt); `chosen` / `rejected` are strings or message lists (the last message's content is the
completion). Each pair becomes two sequences ``prompt + completion + EOS`` and a completion mask
marking the tokens whose log-probabilities DPO sums (see `hybridize.distill.losses.sequence_logprobs`).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from hybridize.data.corpus import Corpus, CorpusError, jsonl_corpus
from hybridize.data.tokenizer import TokenizerError, pad_token_id


@dataclass
class PreferencePair:
    prompt: Union[str, list]
    chosen: Union[str, list]
    rejected: Union[str, list]


def load_preference_pairs(source: Union[str, os.PathLike, Corpus]) -> list[PreferencePair]:
    """All pairs of a JSONL file (or corpus); every record must have prompt, chosen and rejected."""
    corpus = source if isinstance(source, Corpus) else jsonl_corpus(source)
    pairs = []
    for i in range(corpus.num_shards()):
        for j, rec in enumerate(corpus.shard_documents(i)):
            if not (isinstance(rec, dict) and {"prompt", "chosen", "rejected"} <= set(rec)):
                raise CorpusError(f"{corpus.name} (shard {corpus.shards[i].name}, record {j + 1}): "
                                  "a preference record needs 'prompt', 'chosen' and 'rejected' fields")
            pairs.append(PreferencePair(rec["prompt"], rec["chosen"], rec["rejected"]))
    if not pairs:
        raise CorpusError(f"{corpus.name}: no preference pairs")
    return pairs


def _completion_text(c) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict) and "content" in c[-1]:
        return c[-1]["content"]
    raise CorpusError(f"a completion must be a string or a list of messages, got {type(c).__name__}")


def encode_prompt(prompt, tokenizer) -> list[int]:
    """Token ids of a prompt: a string (with the tokenizer's BOS convention) or chat messages (rendered
    with the chat template and a generation prompt)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError("a chat prompt (list of messages) needs a tokenizer with a chat_template")
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_prompt_ids = encode_prompt   # old private name, still used by distill.stages


def _join(prompt: list, completion: list, max_len: int) -> tuple[list, int]:
    """prompt + completion cut to max_len: the prompt loses its oldest tokens (down to half of max_len)
    before the completion loses its last ones. → (ids, prompt length)."""
    if len(prompt) + len(completion) > max_len:
        prompt = prompt[-max(max_len - len(completion), max_len // 2):]
        completion = completion[: max_len - len(prompt)]
    return prompt + completion, len(prompt)


def encode_preference_pair(pair: PreferencePair, tokenizer, *, max_len: int) -> dict:
    """→ {"chosen": (ids, prompt_len), "rejected": (ids, prompt_len)}; completions end with EOS."""
    p = encode_prompt(pair.prompt, tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    out = {}
    for key in ("chosen", "rejected"):
        c = list(tokenizer(_completion_text(getattr(pair, key)), add_special_tokens=False)["input_ids"])
        if eos is not None:
            c.append(eos)
        out[key] = _join(p, c, max_len)
    return out


def collate_preference_batch(encoded: Sequence[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-padded tensors: ``{chosen,rejected}_input_ids`` (B, L), ``{chosen,rejected}_mask`` (B, L)
    bool, true on completion tokens (the positions whose log-prob DPO uses), and
    ``{chosen,rejected}_attention_mask`` (B, L)."""
    out = {}
    for key in ("chosen", "rejected"):
        L = max(len(e[key][0]) for e in encoded)
        ids = torch.full((len(encoded), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), L), dtype=torch.bool)
        att = torch.zeros((len(encoded), L), dtype=torch.long)
        for b, e in enumerate(encoded):
            seq, plen = e[key]
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, plen: len(seq)] = True
            att[b, : len(seq)] = 1
        out[f"{key}_input_ids"], out[f"{key}_mask"], out[f"{key}_attention_mask"] = ids, mask, att
    return out


class PreferenceStream:
    """Batches of preference pairs, shuffled per epoch by (seed, epoch); resumable via state_dict()."""

    def __init__(self, pairs: Sequence[PreferencePair], tokenizer, *, batch_size: int, max_len: int,
                 seed: int = 0, shuffle: bool = True, epochs: Optional[int] = None):
        if not pairs:
            raise CorpusError("PreferenceStream: no preference pairs")
        self.pairs, self.tokenizer = list(pairs), tokenizer
        self.batch_size, self.max_len, self.seed = batch_size, max_len, seed
        self.shuffle, self.epochs = shuffle, epochs
        self.pad_id = pad_token_id(tokenizer)
        self.epoch, self.index = 0, 0

    def _order(self) -> list:
        if getattr(self, "_cache", (None,))[0] != self.epoch:
            order = list(range(len(self.pairs)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._cache = (self.epoch, order)
        return self._cache[1]

    def state_dict(self) -> dict:
        return {"version": 1, "num_pairs": len(self.pairs), "seed": self.seed, "batch_size": self.batch_size,
                "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        for k in ("num_pairs", "seed", "batch_size"):
            if state.get(k) != self.state_dict()[k]:
                raise CorpusError(f"cannot resume the preference stream: {k} was {state.get(k)!r}, "
                                  f"now {self.state_dict()[k]!r}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Tensor]:
        chosen = []
        while len(chosen) < self.batch_size:
            if self.epochs is not None and self.epoch >= self.epochs:
                break
            order = self._order()
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                continue
            chosen.append(order[self.index])
            self.index += 1
        if not chosen:
            raise StopIteration
        enc = [encode_preference_pair(self.pairs[i], self.tokenizer, max_len=self.max_len) for i in chosen]
        return collate_preference_batch(enc, self.pad_id)
