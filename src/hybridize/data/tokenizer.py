"""Tokenizers: the teacher's own (loaded from its checkpoint directory) or a small byte-level BPE
trained on the spot for the built-in demo; and turning a corpus document into token ids.

A document is either a plain string or a chat record ``{"messages": [{"role", "content"}, ...]}``
rendered with the tokenizer's chat template. For chat records `encode_document_with_mask` also gives the
per-token mask of the assistant turns (SFT on assistant tokens only, like TRL's ``assistant_only_loss``).
"""
from __future__ import annotations

import os
import re
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


# ---------------------------------------------------------------------------- assistant-token masks
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_FIX = ("add {% generation %}...{% endgeneration %} markers around the assistant content in the chat "
        "template, or train on all tokens (assistant_only_loss = false)")


def _template_text(tokenizer) -> str:
    try:
        return tokenizer.get_chat_template()
    except Exception:     # noqa: BLE001 - old transformers / a dict of named templates
        t = getattr(tokenizer, "chat_template", None)
        return t if isinstance(t, str) else str(t or "")


def _render(tokenizer, messages, *, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:   # noqa: BLE001 - jinja raises anything (TemplateError, IndexError, ...)
        raise TokenizerError(
            f"the chat template cannot render the first {len(messages)} message(s) of a conversation "
            f"({type(e).__name__}: {e}), which locating the assistant tokens turn by turn needs; {_FIX}") from None


def assistant_char_spans(messages, tokenizer, full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `full` (the rendering of all `messages`), found by
    rendering the conversation prefix by prefix: the text added by assistant message i is
    render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True) — its content and
    end-of-turn token(s), without the role header. Trailing whitespace after the turn is left out.

    Needs a prefix-stable template (the rendering of every prefix is a prefix of the full rendering);
    raises TokenizerError naming the first prefix that is not."""
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        end_text = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])
        prev = _render(tokenizer, messages[:i]) if i else ""
        for k, t in ((i + 1, end_text), (i, prev)):
            if not full.startswith(t):
                raise TokenizerError(
                    f"the chat template is not prefix-stable: rendering the first {k} of {len(messages)} "
                    "messages does not give a prefix of the rendering of the whole conversation (the template "
                    "renders earlier turns differently depending on later ones, e.g. it drops the reasoning "
                    f"of earlier assistant turns), so the assistant tokens cannot be located; {_FIX}. "
                    f"Prefix ends with {t[-60:]!r}; the full rendering there reads "
                    f"{full[max(0, len(t) - 60): len(t)]!r}")
        start = len(prev)
        gp = _render(tokenizer, messages[:i], generation_prompt=True) if i else None
        content = m.get("content")
        if gp is not None and len(prev) <= len(gp) <= len(end_text) and end_text.startswith(gp):
            start = len(gp)                       # skip the assistant header the generation prompt adds
        elif isinstance(content, str) and content.strip():
            # the template's generation prompt is not its assistant header: find the content (templates
            # may trim it) after the header
            k = end_text.find(content, len(prev))
            k = k if k >= 0 else end_text.find(content.strip(), len(prev))
            if k >= 0:
                start = k
        end = len(end_text)
        while end > start + 1 and end_text[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))
    return spans


def _mask_from_spans(tokenizer, text: str, spans) -> tuple[list[int], list[bool]]:
    """Tokenize `text` (no special tokens added, as encode_document) → (ids, True on tokens overlapping a span)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [any(s < b and max(e, s + 1) > a for a, b in spans) for s, e in enc["offset_mapping"]]
        return ids, mask
    # slow tokenizers have no offsets: the token count of every span boundary's prefix
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    mask = [False] * len(ids)

    def n_tokens(c: int) -> int:
        pre = list(tokenizer(text[:c], add_special_tokens=False)["input_ids"]) if c else []
        if ids[: len(pre)] != pre:
            raise TokenizerError(f"the tokenization of the chat is not prefix-stable at character {c} (a turn "
                                 f"boundary: {text[max(0, c - 30): c + 30]!r}), so the assistant tokens cannot "
                                 f"be located with this (slow) tokenizer; use its fast version, or {_FIX}")
        return len(pre)

    for a, b in spans:
        lo, hi = n_tokens(a), n_tokens(b)
        mask[lo:hi] = [True] * (hi - lo)
    return ids, mask


def encode_chat_with_mask(messages, tokenizer, *, rendered: Optional[str] = None) -> tuple[list[int], list[bool]]:
    """Token ids of a chat (exactly as `encode_document` gives them) and a per-token mask, True on the
    tokens of the assistant turns (content and end-of-turn token; not the role headers, system or user
    turns). Uses the template's ``{% generation %}`` markers when it has them (transformers'
    ``return_assistant_tokens_mask``), otherwise renders the conversation prefix by prefix
    (`assistant_char_spans`). `rendered`: the template's rendering of `messages`, when already at hand."""
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError("a chat document ({'messages': [...]}) needs a tokenizer with a "
                             "chat_template; this tokenizer has none")
    messages = list(messages)
    if _GENERATION_TAG.search(_template_text(tokenizer)) and getattr(tokenizer, "is_fast", False):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]
    full = rendered if rendered is not None else tokenizer.apply_chat_template(messages, tokenize=False)
    return _mask_from_spans(tokenizer, full, assistant_char_spans(messages, tokenizer, full))


def encode_document_with_mask(doc, tokenizer, *, add_eos: bool = True) -> tuple[list[int], Optional[list]]:
    """`encode_document` plus the loss mask: (ids, mask) with mask True on assistant tokens for a chat
    record (`encode_chat_with_mask`), None for plain text (no roles: every token is a target)."""
    text, is_chat = render_document(doc, tokenizer)
    if not text.strip():
        return [], None
    if not is_chat:
        return encode_document(text, tokenizer, add_eos=add_eos), None
    return encode_chat_with_mask(doc["messages"], tokenizer, rendered=text)


def pad_token_id(tokenizer) -> int:
    """Id used to pad rows: pad token, else EOS, else 0 (padded positions never carry a loss)."""
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0
