"""Data: tokenizers, corpora (text, JSONL, HF datasets, the built-in stdlib corpus), packing into
(B, L) rows with document boundaries (`seq_idx`), and preference pairs for DPO."""
from hybridize.data.corpus import (  # noqa: F401
    Corpus, CorpusError, Shard, hf_dataset_corpus, jsonl_corpus, list_corpus, load_corpus, stdlib_corpus,
    stdlib_files, text_corpus,
)
from hybridize.data.packing import (  # noqa: F401
    IGNORE_INDEX, PackedStream, fixed_batches, pack_documents, tokenize_corpus,
)
from hybridize.data.preference import (  # noqa: F401
    PreferencePair, PreferenceStream, collate_preference_batch, encode_preference_pair, encode_prompt,
    load_preference_pairs,
)
from hybridize.data.tokenizer import (  # noqa: F401
    DEFAULT_CHAT_TEMPLATE, TokenizerError, assistant_char_spans, encode_chat_with_mask, encode_document,
    encode_document_with_mask, load_tokenizer, pad_token_id, render_document, train_bpe_tokenizer,
)
