"""Generation engine: cached batched decoding equals naive full-forward greedy for every family (batch
of prompts of lengths 1, 5, 17), chunked prefill == one-shot, seeded sampling is reproducible, the logit
processors match transformers', EOS / stop strings / streaming, the CLI."""
import json

import pytest
import torch

import hybridize as hz
from hybridize.generate import GenerationResult, generate
from hybridize.generate.cache_ops import StepHistory, alloc_cache, copy_rows_, empty_like
from hybridize.generate.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    draw,
    process_logits,
    top_k_filter,
    top_p_filter,
)
from hybridize.model import HybridLM

PROMPT_LENS = (1, 5, 17)



def make_model(family, seed=0, sharpen=4.0, window=None, **kw):
    """A tiny random model; `sharpen` scales the head so greedy argmaxes are rarely near-ties."""
    torch.manual_seed(seed)
    cfg = hz.preset(f"{family}-debug", **kw)
    if window is not None:
        cfg.attention.sliding_window = window
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


MODELS = {
    "llama": lambda: make_model("llama"),
    "hawk": lambda: make_model("hawk"),
    "griffin": lambda: make_model("griffin", window=8),     # window < prompt + new tokens
    "mamba2": lambda: make_model("mamba2"),
    "mil50": lambda: make_model("mil50"),
    "mamba1_mix": lambda: make_model("llama", layer_pattern=["mamba1", "attention", "mamba1"]),
    "dm2_mix": lambda: make_model("llama", layer_pattern=["discrete_mamba2", "attention"]),
}


def prompts_for(model, lens=PROMPT_LENS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in lens]


@torch.no_grad()
def naive_greedy(model, prompt, n):
    """Greedy by recomputing the full forward over the whole sequence for every token."""
    ids, dev = list(prompt), model.lm_head.weight.device
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids], device=dev)).logits[0, -1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def assert_same_greedy(model, prompt, got, want, tol=1e-4):
    """got == want, except that they may part at an exact near-tie of the full-forward logits (then
    the rest legitimately differs)."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            ids = torch.tensor([list(prompt) + want[:i]], device=model.lm_head.weight.device)
            logits = model(ids).logits[0, -1]
            assert abs(float(logits[a] - logits[b])) < tol, (i, got, want)
            return
    assert len(got) == len(want), (got, want)


# ---------------------------------------------------------------------------- engine == naive
@pytest.mark.parametrize("name", list(MODELS))
def test_engine_greedy_matches_naive_full_forward(name):
    model = MODELS[name]()
    prompts = prompts_for(model)
    res = generate(model, prompts, max_new_tokens=10)
    assert isinstance(res, GenerationResult) and len(res) == 3
    assert res.finish_reasons == ["length"] * 3
    for p, got in zip(prompts, res.tokens):
        assert len(got) == 10
        assert_same_greedy(model, p, got, naive_greedy(model, p, 10))
    s = res.stats
    assert s.new_tokens == 30 and s.steps == 10 and s.tokens_per_s > 0 and s.prompt_tokens == 23


@pytest.mark.parametrize("name", ["griffin", "mil50"])
def test_chunked_prefill_equals_one_shot(name):
    model = MODELS[name]()
    prompts = prompts_for(model, lens=(17, 5, 17, 23))      # two rows of equal length share a prefill
    a = generate(model, prompts, max_new_tokens=6, prefill_chunk=4)
    b = generate(model, prompts, max_new_tokens=6, prefill_chunk=4096)
    assert a.tokens == b.tokens


def test_prefill_rows_are_independent():
    """A row's output does not depend on the other rows of the batch (no padding leaks)."""
    model = MODELS["mil50"]()
    prompts = prompts_for(model)
    batched = generate(model, prompts, max_new_tokens=6).tokens
    alone = [generate(model, [p], max_new_tokens=6).tokens[0] for p in prompts]
    assert batched == alone


# ---------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_seed():
    model = make_model("mil50", sharpen=1.0)
    prompts = prompts_for(model)
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.95)
    a = generate(model, prompts, seed=123, **kw).tokens
    b = generate(model, prompts, seed=123, **kw).tokens
    c = generate(model, prompts, seed=124, **kw).tokens
    assert a == b and a != c


def test_draw_matches_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    g = torch.Generator().manual_seed(0)
    x = draw(probs.expand(20000, 4), g)
    freq = torch.bincount(x, minlength=4).float() / 20000
    assert freq[3] == 0 and torch.allclose(freq, probs, atol=0.015)


def test_logit_processors_match_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    hist = torch.randint(0, 50, (4, 7))
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, hist, True)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(hist, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), ref)
    for k in (1, 5, 49):
        ref = TopKLogitsWarper(k)(hist, logits.clone())
        assert torch.equal(torch.isinf(top_k_filter(logits, k)), torch.isinf(ref))
    for p in (0.1, 0.5, 0.9, 0.99):
        ref = TopPLogitsWarper(p)(hist, logits.clone())
        assert torch.equal(torch.isinf(top_p_filter(logits, p)), torch.isinf(ref))
    # the whole chain, HF order: penalty → temperature → top-k → top-p
    ref = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(10),
                 TopPLogitsWarper(0.8)):
        ref = proc(hist, ref)
    got = process_logits(logits, SamplingParams(0.7, 10, 0.8, 1.2), seen)
    torch.testing.assert_close(got.softmax(-1), ref.softmax(-1))


def test_top_k_top_p_restrict_samples():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(4000, 5)
    g = torch.Generator().manual_seed(0)
    x = draw(process_logits(logits, SamplingParams(1.0, top_k=2)).softmax(-1), g)
    assert set(x.tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)                         # [0.64, 0.24, 0.09, ...]
    x = draw(process_logits(logits, SamplingParams(1.0, top_p=0.8)).softmax(-1), g)
    assert set(x.tolist()) == {0, 1} and abs((x == 0).float().mean() - p[0] / p[:2].sum()) < 0.03


def test_repetition_penalty_changes_greedy_output():
    model = make_model("mil50")
    prompts = prompts_for(model)
    plain = generate(model, prompts, max_new_tokens=12).tokens
    pen = generate(model, prompts, max_new_tokens=12, repetition_penalty=1e3).tokens
    assert plain != pen
    for p, toks in zip(prompts, pen):      # a huge penalty forbids repeats while unseen tokens remain
        assert len(set(toks)) == len(toks) and not set(toks) & set(p)


def test_bad_sampling_options_are_clear():
    model = make_model("llama")
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], temperature=1, top_p=1.5)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 10 ** 6]])
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ["hello"])


# ---------------------------------------------------------------------------- ends, streaming, text
def test_eos_stops_a_row_and_others_continue():
    model = make_model("mil50")
    prompts = prompts_for(model)
    free = generate(model, prompts, max_new_tokens=10).tokens
    eos = free[0][2]
    res = generate(model, prompts, max_new_tokens=10, eos_token_id=eos, check_every=3)
    for b in range(3):
        cut = free[b].index(eos) + 1 if eos in free[b] else 10
        assert res.tokens[b] == free[b][:cut]
        assert res.finish_reasons[b] == ("eos" if eos in free[b] else "length")
    assert res.finish_reasons[0] == "eos"


def test_all_rows_eos_ends_early():
    model = make_model("llama")
    prompts = [[3, 4], [5]]
    free = generate(model, prompts, max_new_tokens=4).tokens
    res = generate(model, prompts, max_new_tokens=40, eos_token_id=[free[0][0], free[1][0]], check_every=1)
    assert res.tokens == [free[0][:1], free[1][:1]] and res.stats.steps == 1


class CharTokenizer:
    """Characters 'a'… as ids 0…; id 25 ('z') is EOS."""
    eos_token_id = 25

    def __call__(self, text):
        return {"input_ids": [ord(c) - 97 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i) if i < 26 and not (skip_special_tokens and i == 25) else "?" for i in ids)


def test_text_prompts_stop_strings_and_streaming():
    model = make_model("mil50", vocab_size=26)
    tok = CharTokenizer()
    free = generate(model, ["hello", "abc"], max_new_tokens=12, tokenizer=tok, eos_token_id=[])
    assert free.texts == [tok.decode(t, skip_special_tokens=True) for t in free.tokens]
    stop = free.texts[0][3:5]
    got = {0: [], 1: []}
    texts = {0: "", 1: ""}

    def on_tokens(b, ids, text):
        got[b] += ids
        texts[b] += text

    res = generate(model, ["hello", "abc"], max_new_tokens=12, tokenizer=tok, eos_token_id=[], stop=[stop],
                   stream=on_tokens)
    first = free.texts[0].find(stop)
    assert res.texts[0] == free.texts[0][:first] and res.finish_reasons[0] == "stop"
    assert res.tokens[0] == free.tokens[0][:first + len(stop)]
    assert got == {0: res.tokens[0], 1: res.tokens[1]}
    assert texts[1] == res.texts[1]


def test_max_new_tokens_zero():
    model = make_model("hawk")
    res = generate(model, [[1, 2], [3]], max_new_tokens=0)
    assert res.tokens == [[], []]


# ---------------------------------------------------------------------------- cache ops
def test_copy_rows_and_history_rewind():
    """Prefill into one row of a batch cache, step all rows, rewind rows by different counts: each row
    then continues exactly like a cache that took only its kept steps."""
    model = MODELS["griffin"]()
    ids, nxt, keep = torch.tensor([7, 8, 9]), torch.tensor([3, 4, 5]), [0, 1, 3]

    def fresh():
        cache = alloc_cache(model, 3, 40, window_slack=4)
        scratch = empty_like(cache, 1)
        model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]), cache=scratch)
        return copy_rows_(cache, torch.tensor([1]), scratch)

    cache = fresh()
    assert [st.capacity for st in cache.states if hasattr(st, "capacity")] == [12]   # window 8 + 4
    hist = StepHistory(cache, 3)
    hist.record(0)
    for s in range(3):
        model.step(ids, cache)
        hist.record(s + 1)
    hist.rewind_(torch.tensor(keep))
    got = model.step(nxt, cache)
    for b, n in enumerate(keep):
        ref = fresh()
        for _ in range(n):
            model.step(ids, ref)
        torch.testing.assert_close(got[b], model.step(nxt, ref)[b], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- CLI
def _cli(argv):
    import argparse

    from hybridize.commands_generate import add_generate_parser

    parser = argparse.ArgumentParser(prog="hybridize")
    sub = parser.add_subparsers(dest="command")
    add_generate_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_generate_json(capsys):
    rc = _cli(["generate", "mil50-debug", "--prompt", "1,2,3", "--prompt", "4", "--max-new-tokens", "5",
               "--json", "--seed", "0"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert [len(r["tokens"]) for r in rep["results"]] == [5, 5]
    assert rep["stats"]["new_tokens"] == 10


def test_cli_speculative_and_vocab_mismatch(tmp_path, capsys):
    from hybridize.cli import UserError

    rc = _cli(["generate", "mil50-debug", "--prompt", "1,2,3", "--max-new-tokens", "4", "--draft",
               "mil0-debug", "--num-draft-tokens", "2", "--json"])
    assert rc == 0
    assert "acceptance_rate" in json.loads(capsys.readouterr().out)["stats"]
    d = tmp_path / "draft"
    make_model("llama", vocab_size=100).save_pretrained(d)
    with pytest.raises(UserError, match="vocab"):
        _cli(["generate", "mil50-debug", "--prompt", "1,2", "--draft", str(d)])
    with pytest.raises(UserError, match="token ids"):
        _cli(["generate", "mil50-debug", "--prompt", "hello"])
    with pytest.raises(UserError, match="temperature"):
        _cli(["generate", "mil50-debug", "--prompt", "1", "--temperature", "-2"])


# ---------------------------------------------------------------------------- CUDA graphs (GPU only)
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "mil50", "griffin", "mamba2"])
def test_cuda_graph_decode_equals_eager(name):
    model = MODELS[name]().cuda()
    prompts = prompts_for(model)
    eager = generate(model, prompts, max_new_tokens=12, use_cuda_graph=False)
    graph = generate(model, prompts, max_new_tokens=12, use_cuda_graph="auto")
    if name != "griffin":          # griffin's embedding scale is a host tensor: capture may fall back
        assert graph.stats.cuda_graph
    for p, a, b in zip(prompts, graph.tokens, eager.tokens):
        assert_same_greedy(model, p, a, b, tol=1e-3)


@pytest.mark.parametrize("V", [1, 300, 511, 512, 1000, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_stage_argmax_equals_torch_argmax(V, dtype):
    """`argmax_last` (the greedy step's argmax inside the graph) picks exactly torch's index: first maximum
    on ties (within and across slices), NaN as the maximum, -inf rows, non-multiples of the slice width."""
    from hybridize.generate.sampling import argmax_last
    g = torch.Generator().manual_seed(V)
    x = torch.randn(5, V, generator=g).to(dtype)
    x[1] = x[1].round()                                   # many ties (bf16 / integer values)
    x[2] = float("-inf")
    if V > 3:
        x[3, V // 3] = x[3, -1] = float("nan")
        x[4, -1] = x[4, V // 2] = x[4].max() + 1          # the same maximum in two slices
    for rows in (x, x[0], x[:2].reshape(2, 1, V)):
        assert torch.equal(argmax_last(rows), rows.argmax(-1)), V
