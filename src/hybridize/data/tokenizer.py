"""Tokenizers: the teacher's own (loaded from its checkpoint directory) or a small byte-level BPE
trained on the spot for the built-in demo; and turning a corpus document into token ids.

A document is either a plain string or a chat record ``{"messages": [{"role", "content"}, ...]}``
rendered with the tokenizer's chat template.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

#: A minimal chat template for tokenizers trained here (teachers bring their own).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or cannot do what was asked (e.g. no chat template)."""


def load_tokenizer(path: Union[str, os.PathLike]):
    """The tokenizer saved in a local directory (a teacher checkpoint, or one made by
    `train_bpe_tokenizer`). Nothing is downloaded: a missing directory is an error."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise TokenizerError(f"tokenizer directory {str(p)!r} does not exist (tokenizers are only loaded "
                             "from local directories)")
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"could not load a tokenizer from {str(p)!r}: {e}") from None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        save_dir: Optional[Union[str, os.PathLike]] = None, *, min_frequency: int = 2,
                        chat_template: Optional[str] = DEFAULT_CHAT_TEMPLATE):
    """Train a byte-level BPE tokenizer (GPT-2 style: every byte is a base symbol, so any text encodes).

    Special tokens: ``<|bos|>`` (id 0, prepended by ``add_special_tokens=True`` like Llama's tokenizer),
    ``<|eos|>`` (id 1, appended between documents by the packer) and ``<|pad|>`` (id 2).
    Returns a `transformers.PreTrainedTokenizerFast`; saved with `save_pretrained` when `save_dir` is given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 3:
        raise TokenizerError(f"vocab_size {vocab_size} is too small for byte-level BPE: need at least "
                             f"{len(alphabet) + 3} (256 bytes + 3 special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[BOS, EOS, PAD], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() <= len(alphabet) + 3 and vocab_size > len(alphabet) + 3:
        # Not fatal (bytes still encode everything), but it means the training texts were empty.
        import warnings
        warnings.warn("train_bpe_tokenizer learned no merges: were the training texts empty?", stacklevel=2)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if chat_template is not None:
        fast.chat_template = chat_template
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(save_dir))
    return fast


# ---------------------------------------------------------------------------- documents → ids
def render_document(doc, tokenizer) -> tuple[str, bool]:
    """A corpus document → (text, is_chat). Chat records are rendered with the tokenizer's chat
    template (the template supplies its own BOS, so the caller must not add special tokens again)."""
    if isinstance(doc, str):
        return doc, False
    if isinstance(doc, dict) and "messages" in doc:
        if not getattr(tokenizer, "chat_template", None):
            raise TokenizerError("a chat document ({'messages': [...]}) needs a tokenizer with a "
                                 "chat_template; this tokenizer has none")
        return tokenizer.apply_chat_template(doc["messages"], tokenize=False), True
    if isinstance(doc, dict) and "text" in doc:
        return doc["text"], False
    if isinstance(doc, dict) and {"prompt", "chosen", "rejected"} <= set(doc):
        raise TokenizerError("a preference record (prompt/chosen/rejected) is not a language-modelling "
                             "document; load it with hybridize.data.load_preference_pairs for DPO")
    raise TokenizerError(f"unsupported document of type {type(doc).__name__}: expected a string, "
                         "{'text': ...} or {'messages': [...]}")


def encode_document(doc, tokenizer, *, add_eos: bool = True) -> list[int]:
    """Token ids of one document, following the tokenizer's own convention for BOS
    (``add_special_tokens=True`` for plain text, e.g. Llama prepends BOS; Qwen2 adds nothing), then EOS
    appended when the tokenizer has one and it is not already the last token. Chat documents are taken
    exactly as the chat template renders them (its BOS and turn-end tokens, no extra EOS). Empty or
    whitespace-only documents give ``[]``."""
    text, is_chat = render_document(doc, tokenizer)
    if not text.strip():
        return []          # empty documents (e.g. empty __init__.py files) are skipped
    ids = list(tokenizer(text, add_special_tokens=not is_chat)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and not is_chat and eos is not None and ids and ids[-1] != eos:
        ids.append(eos)
    return ids


def pad_token_id(tokenizer) -> int:
    """Id used to pad rows: pad token, else EOS, else 0 (padded positions never carry a loss)."""
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0
