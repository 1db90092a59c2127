"""Data pipeline: tokenizers, corpora, packing with document boundaries, streaming and resuming."""
import json
import random
import sysconfig
from pathlib import Path

import pytest
import torch

from hybridize.data import (
    IGNORE_INDEX, CorpusError, PackedStream, PreferenceStream, TokenizerError, encode_document, jsonl_corpus,
    list_corpus, load_corpus, load_preference_pairs, load_tokenizer, pack_documents, stdlib_corpus,
    stdlib_files, text_corpus, tokenize_corpus, train_bpe_tokenizer,
)



WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def random_texts(n, seed=0, lo=1, hi=40):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(random_texts(200, seed=1) + ["def f(x):\n    return x\n"], vocab_size=300)


def check_row_invariants(batch):
    """seq_idx non-decreasing from 0, labels masked exactly at piece starts, no target across a boundary."""
    ids, labels, seq = batch["input_ids"], batch["labels"], batch["seq_idx"]
    assert ids.shape == labels.shape == seq.shape
    assert (seq[:, 0] == 0).all()
    step = seq[:, 1:] - seq[:, :-1]
    assert ((step == 0) | (step == 1)).all()
    starts = torch.ones_like(seq, dtype=torch.bool)
    starts[:, 1:] = step == 1
    assert (labels[starts] == IGNORE_INDEX).all()
    real = ~starts & (labels != IGNORE_INDEX)
    assert (labels[real] == ids[real]).all()
    # shifted targets (predict t+1 from t) never cross a document boundary
    target_ok = labels[:, 1:] != IGNORE_INDEX
    assert (seq[:, 1:][target_ok] == seq[:, :-1][target_ok]).all()


# ---------------------------------------------------------------------------- tokenizer
def test_bpe_tokenizer_roundtrip_and_special_tokens(tok, tmp_path):
    text = "alpha beta gamma, unseen wørds 123"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id                       # BOS like Llama
    assert tok.decode(ids, skip_special_tokens=True) == text   # byte-level: any text round-trips
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again(text)["input_ids"] == ids
    assert again.eos_token_id == tok.eos_token_id and again.chat_template == tok.chat_template
    doc = encode_document(text, tok)
    assert doc[0] == tok.bos_token_id and doc[-1] == tok.eos_token_id and doc[1:-1] == ids[1:]
    assert encode_document("  \n ", tok) == []


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_bpe_vocab_too_small():
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


# ---------------------------------------------------------------------------- packing
def test_pack_documents_by_hand():
    rows = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], seq_len=4)
    assert rows["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert rows["seq_idx"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 1]]
    assert rows["labels"].tolist() == [[-100, 2, 3, -100], [-100, -100, 7, 8]]
    padded = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], seq_len=4, drop_last=False, pad_id=0)
    assert padded["input_ids"].tolist()[-1] == [9, 10, 0, 0]
    assert padded["seq_idx"].tolist()[-1] == [0, 0, 1, 1]
    assert padded["labels"].tolist()[-1] == [-100, 10, -100, -100]


def test_pack_documents_invariants_and_reconstruction():
    rng = random.Random(3)
    docs = [[rng.randrange(3, 50) for _ in range(rng.randint(1, 30))] for _ in range(40)]
    rows = pack_documents(docs, seq_len=16, drop_last=False, pad_id=0)
    check_row_invariants(rows)
    # the row contents laid end to end give back the documents (plus padding at the very end)
    flat = rows["input_ids"].reshape(-1).tolist()
    assert flat[: sum(map(len, docs))] == [t for d in docs for t in d]


def test_packed_boundaries_match_model_semantics(tok):
    """Loss on a packed row == sum of the per-document losses (labels/seq_idx hide nothing else)."""
    from hybridize.model import causal_lm_loss

    docs = tokenize_corpus(random_texts(6, seed=5, lo=3, hi=8), tok)
    rows = pack_documents(docs, seq_len=sum(map(len, docs)))       # one row holding every document
    logits = torch.randn(1, rows["input_ids"].shape[1], len(tok))
    packed = causal_lm_loss(logits, rows["labels"]) * (rows["labels"][:, 1:] != -100).sum()
    per_doc, off = 0.0, 0
    for d in docs:
        lab = torch.tensor([d])
        per_doc = per_doc + causal_lm_loss(logits[:, off: off + len(d)], lab) * (len(d) - 1)
        off += len(d)
    torch.testing.assert_close(packed, per_doc)


def test_stream_equals_pack_documents(tok):
    corpus = list_corpus(random_texts(30, seed=2))
    expected = pack_documents(tokenize_corpus(corpus, tok), seq_len=32, drop_last=False,
                              pad_id=tok.pad_token_id)
    stream = PackedStream(corpus, tok, seq_len=32, batch_size=3, shuffle=False, epochs=1, drop_last=False)
    batches = list(stream)
    for b in batches:
        check_row_invariants(b)
    got = {k: torch.cat([b[k] for b in batches]) for k in expected}
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # drop_last: only full batches, and they are a prefix of the same rows
    full = list(PackedStream(corpus, tok, seq_len=32, batch_size=3, shuffle=False, epochs=1))
    assert all(b["input_ids"].shape == (3, 32) for b in full)
    n = 3 * len(full)
    assert torch.equal(torch.cat([b["input_ids"] for b in full]), expected["input_ids"][:n])


def test_stream_deterministic_per_seed_and_shuffles_per_epoch(tok):
    corpus = list_corpus(random_texts(12, seed=4))

    def take(seed, n=8):
        s = PackedStream(corpus, tok, seq_len=16, batch_size=2, seed=seed)
        return torch.stack([next(s)["input_ids"] for _ in range(n)])

    assert torch.equal(take(0), take(0))
    assert not torch.equal(take(0), take(1))
    # an epoch holds every document exactly once, whatever the order
    s = PackedStream(corpus, tok, seq_len=8, batch_size=1, seed=7, epochs=1, drop_last=False)
    pad = tok.pad_token_id
    got = sorted(t for b in s for t in b["input_ids"].reshape(-1).tolist() if t != pad)
    assert got == sorted(t for d in tokenize_corpus(corpus, tok) for t in d)


@pytest.mark.parametrize("shuffle", [True, False])
def test_stream_resume_is_exact(tok, shuffle):
    corpus = list_corpus(random_texts(10, seed=6, lo=5, hi=60))   # long documents span rows; several epochs
    ref = PackedStream(corpus, tok, seq_len=24, batch_size=2, seed=3, shuffle=shuffle)
    ref_batches = [next(ref) for _ in range(40)]
    for cut in (1, 7, 23):
        s = PackedStream(corpus, tok, seq_len=24, batch_size=2, seed=3, shuffle=shuffle)
        for _ in range(cut):
            next(s)
        state = json.loads(json.dumps(s.state_dict()))           # survives JSON
        resumed = PackedStream(corpus, tok, seq_len=24, batch_size=2, seed=3, shuffle=shuffle)
        resumed.load_state_dict(state)
        for i in range(cut, 40):
            b = next(resumed)
            for k in b:
                assert torch.equal(b[k], ref_batches[i][k]), (cut, i, k)
    assert ref.epoch >= 2        # the test did cross epoch boundaries


def test_stream_resume_rejects_other_settings(tok):
    corpus = list_corpus(random_texts(5))
    state = PackedStream(corpus, tok, seq_len=16, batch_size=2).state_dict()
    other = PackedStream(corpus, tok, seq_len=32, batch_size=2)
    with pytest.raises(CorpusError, match="seq_len"):
        other.load_state_dict(state)


# ---------------------------------------------------------------------------- errors
def test_empty_and_too_short_corpora(tok):
    with pytest.raises(CorpusError, match="yields 0 tokens"):
        next(PackedStream(list_corpus(["", "  "], name="empties"), tok, seq_len=8, batch_size=1))
    short = list_corpus(["alpha beta"], name="short")
    with pytest.raises(CorpusError, match=r"corpus short yields \d+ tokens, need at least 512"):
        next(PackedStream(short, tok, seq_len=64, batch_size=8, epochs=1))
    with pytest.raises(CorpusError, match="need at least seq_len=64"):
        next(PackedStream(short, tok, seq_len=64, batch_size=1))     # looping would repeat it inside a row


def test_missing_paths(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    with pytest.raises(CorpusError, match="does not exist"):
        jsonl_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        load_corpus(tmp_path / "empty_dir")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:4: malformed JSON"):
        list(jsonl_corpus(p))
    q = tmp_path / "keys.jsonl"
    q.write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match=r"keys\.jsonl:1: expected a 'text'"):
        list(jsonl_corpus(q))


# ---------------------------------------------------------------------------- sources
def test_text_files_doc_split(tmp_path, tok):
    (tmp_path / "b.txt").write_text("para one\nstill one\n\n\npara two\n")
    (tmp_path / "a.md").write_text("only doc")
    by_file = list(load_corpus(tmp_path))
    assert by_file == ["only doc", "para one\nstill one\n\n\npara two\n"]          # sorted by path
    by_block = list(load_corpus(tmp_path, doc_split="blank_lines"))
    assert by_block == ["only doc", "para one\nstill one", "para two"]
    assert list(text_corpus([tmp_path / "b.txt", tmp_path / "a.md"])) == by_file[::-1]   # given order kept


def test_jsonl_chat_rendering(tmp_path, tok):
    p = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "alpha?"}, {"role": "assistant", "content": "beta."}]
    p.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"text": "gamma"}) + "\n")
    docs = list(load_corpus(p))
    assert docs[0] == {"messages": msgs} and docs[1] == "gamma"
    ids = encode_document(docs[0], tok)
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert "<|user|>\nalpha?<|eos|>" in rendered and "<|assistant|>\nbeta.<|eos|>" in rendered
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]   # as rendered: no BOS / EOS added
    assert ids.count(tok.bos_token_id) == 0
    no_template = train_bpe_tokenizer(["abc"] * 3, vocab_size=270, chat_template=None)
    with pytest.raises(TokenizerError, match="chat_template"):
        encode_document(docs[0], no_template)


def test_preference_pairs(tmp_path, tok):
    p = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "alpha beta", "chosen": "gamma", "rejected": "delta delta"},
            {"prompt": [{"role": "user", "content": "mu?"}], "chosen": [{"role": "assistant", "content": "nu"}],
             "rejected": "xi"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_preference_pairs(p)
    stream = PreferenceStream(pairs, tok, batch_size=2, max_len=64, shuffle=False, epochs=1)
    b = next(stream)
    for key, texts in (("chosen", ["gamma", "nu"]), ("rejected", ["delta delta", "xi"])):
        ids, mask, att = b[f"{key}_input_ids"], b[f"{key}_mask"], b[f"{key}_attention_mask"]
        for r, text in enumerate(texts):
            completion = ids[r][mask[r]].tolist()
            assert completion == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert not mask[r][att[r] == 0].any()                     # padding never scored
    prompt_part = ~b["chosen_mask"][1] & b["chosen_attention_mask"][1].bool()
    chat_prompt = tok.decode(b["chosen_input_ids"][1][prompt_part])
    assert chat_prompt.endswith("<|assistant|>\n")                    # generation prompt added
    with pytest.raises(StopIteration):
        next(stream)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "not a pair"}\n')
    with pytest.raises(CorpusError, match="prompt"):
        load_preference_pairs(bad)


def test_hf_dataset_dir(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["alpha beta", "gamma"]}).save_to_disk(str(tmp_path / "ds"))
    assert list(load_corpus(tmp_path / "ds")) == ["alpha beta", "gamma"]


def test_stdlib_corpus_loads_and_splits_deterministically(tok):
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert "os.py" in rel
    bad = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    assert not any(bad & set(r.split("/")[:-1]) for r in rel)
    assert not any(r.split("/")[-1].startswith("_sysconfigdata") for r in rel)

    train, held = stdlib_corpus(split="train"), stdlib_corpus(split="heldout")
    assert train.num_shards() == len(files)

    def names(corpus):
        return [corpus.shards[i].name for i in range(corpus.num_shards())
                if next(iter(corpus.shard_documents(i)), None) is not None]

    tr, he = names(train), names(held)
    assert set(tr).isdisjoint(he) and sorted(tr + he) == sorted(rel)
    assert 0.01 < len(he) / len(rel) < 0.15
    assert he == names(stdlib_corpus(split="heldout"))                  # same split every time
    assert names(stdlib_corpus(split="heldout", heldout_fraction=0.2)) != he
    first = next(iter(held))
    assert isinstance(first, str) and first == (root / he[0]).read_text(encoding="utf-8", errors="replace")
    b = next(PackedStream(held, tok, seq_len=64, batch_size=2, seed=0))
    check_row_invariants(b)


# ---------------------------------------------------------------------------- assistant-only loss (SFT)
BODY = "{{ m['content'] }}<|eos|>"
GEN_BODY = ("{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|eos|>{% endgeneration %}"
            "{% else %}{{ m['content'] }}<|eos|>{% endif %}")
# DEFAULT_CHAT_TEMPLATE with {% generation %} markers around the assistant content
GEN_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n" + GEN_BODY + "\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# not prefix-stable: the last message is rendered differently from the earlier ones
LAST_MARKED = "{% for m in messages %}{% if loop.last %}<|last|>{% endif %}<|{{ m['role'] }}|>\n" + BODY + \
    "\n{% endfor %}"
# renders only conversations that end with the assistant
ENDS_WITH_ASSISTANT = ("{% if messages[-1]['role'] != 'assistant' %}{{ raise_exception('end with the "
                       "assistant') }}{% endif %}{% for m in messages %}<|{{ m['role'] }}|>\n" + BODY +
                       "\n{% endfor %}")
CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "alpha beta?"},
        {"role": "assistant", "content": "gamma delta."},
        {"role": "user", "content": "and epsilon zeta?"},
        {"role": "assistant", "content": " eta\ntheta iota "}]


def _with_template(tok, template):
    t = train_bpe_tokenizer(random_texts(200, seed=1) + ["def f(x):\n    return x\n"], vocab_size=300,
                            chat_template=template)
    assert t.get_vocab() == tok.get_vocab()          # same training data → same vocabulary
    return t


class _SlowView:
    """The tokenizer seen as a slow one (no offsets): the token-prefix fallback."""
    is_fast = False

    def __init__(self, t):
        self._t = t

    def __call__(self, *a, **k):
        assert not k.get("return_offsets_mapping")
        return self._t(*a, **k)

    def __getattr__(self, name):
        return getattr(self._t, name)


def _masked_runs(tok, ids, mask):
    """Decoded runs of consecutive masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.mark.parametrize("how", ["prefix", "generation", "no-offsets"])
def test_assistant_mask_covers_exactly_the_assistant_turns(tok, how):
    from hybridize.data import encode_chat_with_mask, encode_document_with_mask

    t = _with_template(tok, GEN_TEMPLATE) if how == "generation" else tok
    if how == "no-offsets":
        t = _SlowView(t)
    ids, mask = encode_chat_with_mask(CHAT, t)
    assert ids == encode_document({"messages": CHAT}, t)      # the same tokens as without the mask
    assert len(mask) == len(ids)
    # content and end-of-turn token of each assistant turn; no system / user turn, no role header
    assert _masked_runs(tok, ids, mask) == [m["content"] + "<|eos|>" for m in CHAT if m["role"] == "assistant"]
    assert encode_document_with_mask({"messages": CHAT}, t) == (ids, mask)
    assert encode_document_with_mask("alpha beta", t) == (encode_document("alpha beta", t), None)
    # a template whose generation prompt is not the assistant header: the content is still found
    odd = _with_template(tok, DEFAULT_GEN_PROMPT_ODD)
    ids, mask = encode_chat_with_mask(CHAT, odd)
    assert _masked_runs(tok, ids, mask) == [m["content"] + "<|eos|>" for m in CHAT if m["role"] == "assistant"]


DEFAULT_GEN_PROMPT_ODD = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n<|pad|>{% endif %}")


@pytest.mark.parametrize("template, match", [
    (LAST_MARKED, "not prefix-stable: rendering the first 3 of 5 messages"),
    (ENDS_WITH_ASSISTANT, "cannot render the first 2 message.*end with the assistant"),
], ids=["last-turn-marked", "ends-with-assistant-only"])
def test_assistant_mask_errors_on_templates_it_cannot_split(tok, template, match):
    from hybridize.data import encode_chat_with_mask

    t = _with_template(tok, template)
    encode_document({"messages": CHAT}, t)                     # the template itself renders the chat
    with pytest.raises(TokenizerError, match=match) as e:
        encode_chat_with_mask(CHAT, t)
    assert "{% generation %}" in str(e.value) and "assistant_only_loss = false" in str(e.value)
    # the advice works: with generation markers the same template needs no prefix stability
    marked = _with_template(tok, template.replace(BODY, GEN_BODY))
    ids, mask = encode_chat_with_mask(CHAT, marked)
    assert _masked_runs(tok, ids, mask) == [m["content"] + "<|eos|>" for m in CHAT if m["role"] == "assistant"]


def _chat_docs():
    rng = random.Random(5)
    docs = []
    for i in range(9):
        msgs = [{"role": "system", "content": "sys " + random_texts(1, seed=i, hi=4)[0]}] if i % 3 == 0 else []
        for j in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": random_texts(1, seed=100 * i + j, hi=12)[0]})
            msgs.append({"role": "assistant", "content": random_texts(1, seed=100 * i + j + 50, hi=12)[0]})
        docs.append({"messages": msgs})
    docs.insert(4, "plain text: " + random_texts(1, seed=77)[0])
    docs.insert(7, {"messages": [{"role": "user", "content": "no answer"}]})    # no assistant token
    return docs


def test_assistant_mask_survives_packing_across_boundaries(tok):
    from hybridize.data import encode_document_with_mask

    docs = _chat_docs()
    enc = [encode_document_with_mask(d, tok) for d in docs]
    kept = [(ids, m) for ids, m in enc if m is None or any(m)]       # the answerless chat is skipped
    assert len(kept) == len(docs) - 1
    flat_ids = [t for ids, _ in kept for t in ids]
    flat_tgt = [bool(x) for ids, m in kept for x in (m if m is not None else [True] * len(ids))]
    for L in (7, 24, 61):
        stream = PackedStream(list_corpus(docs), tok, seq_len=L, batch_size=2, shuffle=False, epochs=1,
                              drop_last=False, assistant_only_loss=None)
        batches = list(stream)
        assert stream.skipped_no_assistant >= 1
        ids = torch.cat([b["input_ids"] for b in batches]).flatten()
        labels = torch.cat([b["labels"] for b in batches]).flatten()
        seq = torch.cat([b["seq_idx"] for b in batches])
        for b in batches:
            check_row_invariants(b)
        n = len(flat_ids)
        assert ids[:n].tolist() == flat_ids                       # packing unchanged: same tokens, same order
        starts = torch.ones_like(seq, dtype=torch.bool)
        starts[:, 1:] = seq[:, 1:] != seq[:, :-1]
        starts = starts.flatten()
        expect = [t if (tg and not s) else IGNORE_INDEX for t, tg, s in zip(flat_ids, flat_tgt, starts[:n])]
        assert labels[:n].tolist() == expect
        assert (labels[n:] == IGNORE_INDEX).all()                 # padding
        # pack_documents with the same masks gives the same rows
        packed = pack_documents([k[0] for k in kept], L, drop_last=False, masks=[k[1] for k in kept])
        assert torch.equal(packed["labels"].flatten(), labels[: packed["labels"].numel()])
    # one row per document: the targets decode to the assistant turns, the plain text keeps all its tokens
    stream = PackedStream(list_corpus(docs), tok, seq_len=4096, batch_size=1, shuffle=False, epochs=1,
                          drop_last=False, assistant_only_loss=None)
    row = next(stream)
    for d in range(len(kept)):
        sel = (row["seq_idx"][0] == d) & (row["labels"][0] != IGNORE_INDEX)
        text = tok.decode(row["labels"][0][sel].tolist())
        src = [x for x in docs if not (isinstance(x, dict) and len(x["messages"]) == 1)][d]
        if isinstance(src, str):
            assert text == tok.decode(encode_document(src, tok)[1:])
        else:
            assert text == "".join(m["content"] + "<|eos|>" for m in src["messages"] if m["role"] == "assistant")


def test_assistant_only_loss_modes(tok):
    docs = _chat_docs()

    def first(flag, d=docs):
        return next(PackedStream(list_corpus(d), tok, seq_len=4096, batch_size=1, shuffle=False, epochs=1,
                                 drop_last=False, assistant_only_loss=flag))

    plain = next(PackedStream(list_corpus(docs), tok, seq_len=4096, batch_size=1, shuffle=False, epochs=1,
                              drop_last=False))
    off = first(False)
    assert torch.equal(off["labels"], plain["labels"])          # False = every token (the default)
    auto = first(None)
    n_off = int((off["labels"] != IGNORE_INDEX).sum())
    assert 0 < int((auto["labels"] != IGNORE_INDEX).sum()) < n_off
    with pytest.raises(CorpusError, match="assistant_only_loss = true needs chat documents.*plain text"):
        first(True)
    chats = [d for d in docs if not isinstance(d, str)]
    on = first(True, chats)
    assert torch.equal(on["labels"], first(None, chats)["labels"])
    with pytest.raises(CorpusError, match="no assistant tokens"):
        first(True, [{"messages": [{"role": "user", "content": "alpha"}]}] * 3)
    with pytest.raises(CorpusError, match="assistant_only_loss must be"):
        PackedStream(list_corpus(docs), tok, seq_len=8, batch_size=1, assistant_only_loss="yes")


def test_assistant_mask_stream_resumes_exactly(tok):
    docs = _chat_docs()

    def make():
        return PackedStream(list_corpus(docs), tok, seq_len=20, batch_size=2, seed=4, assistant_only_loss=None)

    ref = make()
    want = [next(ref) for _ in range(8)]
    s = make()
    for _ in range(3):
        next(s)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(s.state_dict())))
    for b in want[3:]:
        got = next(resumed)
        assert all(torch.equal(got[k], b[k]) for k in b)
