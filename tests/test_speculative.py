"""Speculative decoding: greedy == plain greedy token for token (pure Transformer, pure recurrent and
hybrid targets incl. sliding-window attention, batch of prompts of different lengths, several K),
rollback of the target's states after partial acceptance, the sampled distribution equals the
target's (chi-square on a vocabulary of 8), EOS, and clear errors."""
import copy
import math

import pytest
import torch
from test_generate import MODELS, assert_same_greedy, make_model, prompts_for

from hybridize.generate import commit_, generate, verify_forward
from hybridize.generate.cache_ops import alloc_cache, copy_rows_, empty_like
from hybridize.generate.sampling import SamplingParams, process_logits


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


#: weight noise that makes a draft agree with its target often, but not always (RG-LRU models with the
#: sharpened tied head have large logit gaps)
NOISE = {"hawk": 1.5, "griffin": 1.0}


def perturbed(model, scale=0.05, seed=5):
    """A draft that agrees with the target often, but not always: the target plus weight noise."""
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * scale * p.std().clamp_min(1e-3))
    return d


# ---------------------------------------------------------------------------- greedy equality
CASES = [  # (target, draft kind, K)
    ("llama", "perturbed", 3),
    ("hawk", "perturbed", 2),
    ("griffin", "perturbed", 4),       # sliding window 8 < prompt + new tokens: ring rollback
    ("griffin", "self", 6),
    ("mamba2", "perturbed", 3),
    ("mil50", "perturbed", 1),
    ("mil50", "perturbed", 5),
    ("mil50", "other", 3),             # a draft of another family (Hawk)
    ("mamba1_mix", "perturbed", 3),
    ("dm2_mix", "perturbed", 2),
]


@pytest.mark.parametrize("target,kind,K", CASES)
def test_speculative_greedy_equals_plain_greedy(target, kind, K):
    model = MODELS[target]()
    draft = {"perturbed": lambda: perturbed(model, NOISE.get(target, 0.05)), "self": lambda: model,
             "other": lambda: make_model("hawk", seed=3)}[kind]()
    prompts = prompts_for(model)
    plain = generate(model, prompts, max_new_tokens=14)
    spec = generate(model, prompts, max_new_tokens=14, draft=draft, num_draft_tokens=K)
    for p, a, b in zip(prompts, spec.tokens, plain.tokens):
        assert_same_greedy(model, p, a, b)
    s = spec.stats
    assert s.num_draft_tokens == K and s.drafted > 0 and 1 <= s.mean_tokens_per_round <= K + 1
    if kind == "self":
        assert s.acceptance_rate > 0.9 and s.steps < 14
    if kind == "perturbed":
        assert 0 < s.acceptance_rate < 1      # both the accept and the rollback paths ran


def test_speculative_eos_and_lengths():
    model = MODELS["mil50"]()
    prompts = prompts_for(model)
    free = generate(model, prompts, max_new_tokens=12).tokens
    eos = free[1][4]
    plain = generate(model, prompts, max_new_tokens=12, eos_token_id=eos)
    spec = generate(model, prompts, max_new_tokens=12, eos_token_id=eos, draft=perturbed(model),
                    num_draft_tokens=4)
    assert spec.tokens == plain.tokens and spec.finish_reasons == plain.finish_reasons
    assert spec.finish_reasons[1] == "eos" and all(len(t) <= 12 for t in spec.tokens)


# ---------------------------------------------------------------------------- rollback
@pytest.mark.parametrize("name", ["griffin", "mil50", "mamba1_mix"])
def test_verify_then_commit_equals_consuming_only_the_kept_tokens(name):
    """After verifying T tokens and keeping n[b] per row, every row continues exactly like a cache that
    consumed only its n[b] tokens."""
    model = MODELS[name]()
    B, T = 4, 5
    prompts = prompts_for(model, lens=(9, 3, 12, 6))
    chunk = torch.randint(0, model.cfg.vocab_size, (B, T))
    nxt = torch.randint(0, model.cfg.vocab_size, (B,))
    keep = [0, 2, 5, 3]

    def prefilled():
        cache = alloc_cache(model, B, 40, window_slack=T)
        for b, p in enumerate(prompts):
            s = empty_like(cache, 1)
            model(torch.tensor([p]), cache=s)
            copy_rows_(cache, torch.tensor([b]), s)
        return cache

    cache = prefilled()
    _, ctx = verify_forward(model, chunk, cache)
    commit_(model, cache, ctx, torch.tensor(keep), keep)
    got = model.step(nxt, cache)
    for b, n in enumerate(keep):
        ref = alloc_cache(model, 1, 40, window_slack=T)
        model(torch.tensor([prompts[b] + chunk[b, :n].tolist()]), cache=ref)
        torch.testing.assert_close(got[b], model.step(nxt[b:b + 1], ref)[0], atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------------------- the distribution
def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square(df) at p ≈ 1e-4 (Wilson–Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@torch.no_grad()
def _target_pair_probs(model, prompt, params):
    """Exact P(t1, t2 | prompt) of the target under `params` (V × V)."""
    V = model.cfg.vocab_size
    seen = torch.zeros(V, dtype=torch.bool)
    seen[prompt] = True
    p1 = process_logits(model(torch.tensor([prompt])).logits[0, -1], params, seen).softmax(-1)
    ext = torch.tensor([prompt + [a] for a in range(V)])
    seen2 = seen.expand(V, V).clone()
    seen2[torch.arange(V), torch.arange(V)] = True
    p2 = process_logits(model(ext).logits[:, -1], params, seen2).softmax(-1)
    return p1[:, None] * p2


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_k=6, top_p=0.9,
                                                                          repetition_penalty=1.5)])
def test_speculative_sampling_matches_target_distribution(params):
    V, n, prompt = 8, 3000, [1, 2, 3]
    target = make_model("mil50", vocab_size=V, sharpen=5.0, seed=0)     # peaked but not deterministic
    draft = perturbed(target, 0.6)                                       # TV(p, q) ≈ 0.3 at the 1st token
    want = _target_pair_probs(target, prompt, params)
    kw = dict(max_new_tokens=2, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
              repetition_penalty=params.repetition_penalty, seed=0)
    res = generate(target, [prompt] * n, draft=draft, num_draft_tokens=2, **kw)
    pairs = torch.tensor(res.tokens)
    counts = torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V).float().view(V, V)
    assert 0.1 < res.stats.acceptance_rate < 0.9          # rejections (residual draws) happen
    # chi-square over cells with enough expected mass (the rest pooled)
    exp = want.flatten() * n
    big = exp >= 5
    obs = counts.flatten()
    stat = (((obs[big] - exp[big]) ** 2) / exp[big]).sum() + (obs[~big].sum() - exp[~big].sum()) ** 2 / max(
        exp[~big].sum(), 1e-9)
    df = int(big.sum())
    assert stat < _chi2_critical(df), (float(stat), df)
    # power check: the draft's own distribution would fail the same test
    draft_pairs = torch.tensor(generate(draft, [prompt] * n, **kw).tokens)
    dcounts = torch.bincount(draft_pairs[:, 0] * V + draft_pairs[:, 1], minlength=V * V).float()
    dstat = (((dcounts[big] - exp[big]) ** 2) / exp[big]).sum()
    assert dstat > 3 * _chi2_critical(df)


# ---------------------------------------------------------------------------- errors
def test_draft_vocab_mismatch_is_clear():
    target = make_model("mil50")
    draft = make_model("llama", vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size 300 != target vocab_size 256"):
        generate(target, [[1, 2]], draft=draft)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        generate(target, [[1, 2]], draft=target, num_draft_tokens=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mil50", "griffin"])
def test_speculative_on_cuda_equals_plain_greedy(name):
    model = MODELS[name]().cuda()
    prompts = prompts_for(model)
    plain = generate(model, prompts, max_new_tokens=14)
    spec = generate(model, prompts, max_new_tokens=14, draft=perturbed(model, NOISE.get(name, 0.05)),
                    num_draft_tokens=3)
    for p, a, b in zip(prompts, spec.tokens, plain.tokens):
        assert_same_greedy(model, p, a, b, tol=1e-3)
