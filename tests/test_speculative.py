"""Speculative decoding: greedy == plain greedy token for token (pure Transformer, pure recurrent and
hybrid targets incl. sliding-window attention, batch of prompts of different lengths, several K),
rollback of the target's states after partial acceptance, the sampled distribution equals the
target's (chi-square on a vocabulary of 8), EOS, and clear errors. Algorithm 2 (lazy SSD advance) in the
Verifier: taken for Mamba-2 / discrete Mamba-2 layers (spied), greedy == plain for K = 1 … 5, the target
cache after generation == plain decoding of the consumed tokens (the final flush), rounds == the
recording path, 1× SSM state memory, the Triton verify kernel (interpreter on CPU), fullgraph compile."""
import copy
import math
import os

import pytest
import torch
from test_generate import MODELS, assert_same_greedy, make_model, prompts_for

import hybridize as hz
from hybridize.generate import commit_, generate, verify_forward
from hybridize.generate.cache_ops import alloc_cache, copy_rows_, empty_like
from hybridize.generate.engine import prefill_
from hybridize.generate.sampling import SamplingParams, process_logits



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
@pytest.mark.parametrize("name", ["mil50", "griffin", "mamba2", "dm2_mix"])
def test_speculative_on_cuda_equals_plain_greedy(name, monkeypatch):
    """Compiled + CUDA-graphed verification (Algorithm 2 kernels for the SSD layers) == plain greedy,
    and the target cache afterwards == plain decoding of the consumed tokens."""
    made = _recording_verifier(monkeypatch)
    model = MODELS[name]().cuda()
    prompts = prompts_for(model)
    plain = generate(model, prompts, max_new_tokens=14)
    spec = generate(model, prompts, max_new_tokens=14, draft=perturbed(model, NOISE.get(name, 0.05)),
                    num_draft_tokens=3)
    for p, a, b in zip(prompts, spec.tokens, plain.tokens):
        assert_same_greedy(model, p, a, b, tol=1e-3)
    (ver,) = made
    assert ver.graphed and bool(ver.lazy_layers) == (name != "griffin")
    _assert_cache_is_plain(model, ver.cache, _consumed(ver, prompts), atol=1e-3)


# ---------------------------------------------------------------------------- Algorithm 2 in the Verifier
class _Spy:
    """Counts calls of a function (and those with a keyword set), passing them through."""

    def __init__(self, fn, key=None):
        self.fn, self.key, self.calls, self.keyed = fn, key, 0, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        self.keyed += int(self.key is not None and kw.get(self.key) is not None)
        return self.fn(*a, **kw)


def _recording_verifier(monkeypatch):
    """Make speculative_generate build a Verifier that also logs, per round, the tokens verified and the
    counts kept (→ exactly what the target consumed); returns the list of instances."""
    from hybridize.generate import speculative as S

    made = []
    base = getattr(S.Verifier, "real", S.Verifier)       # the real class, also when patched already

    class Recording(base):
        real = base

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.log = []
            made.append(self)

        def verify(self, tokens):
            self.log.append([tokens.clone(), None])
            return super().verify(tokens)

        def commit(self, n):
            self.log[-1][1] = n.clone()
            super().commit(n)

    monkeypatch.setattr(S, "Verifier", Recording)
    return made


def _ssd_spies(monkeypatch):
    from hybridize.ops import verify as V

    spies = {"verify": _Spy(V.ssd_verify, "advance_prev"), "advance": _Spy(V.ssd_advance)}
    monkeypatch.setattr(V, "ssd_verify", spies["verify"])
    monkeypatch.setattr(V, "ssd_advance", spies["advance"])
    return spies


def _consumed(ver, prompts):
    """Per row: the tokens the target consumed (prompt without its last token, then every kept prefix)."""
    out = [list(p[:-1]) for p in prompts]
    for ids, n in ver.log:
        for b in range(len(prompts)):
            out[b] += ids[b, :int(n[b])].tolist()
    return out


@torch.no_grad()
def _assert_cache_is_plain(model, cache, consumed, *, atol=1e-5):
    """Row b of `cache` equals a batch-1 cache into which plain decoding (`step` per token, after a
    prefill of the first token) fed consumed[b]: recurrent states close, KV lengths equal, KV close."""
    from hybridize.generate.cache_ops import _fields, is_kv

    dev = model.lm_head.weight.device
    for b, toks in enumerate(consumed):
        ref = alloc_cache(model, 1, 64, device=dev)
        if toks:
            model(torch.tensor([toks[:1]], device=dev), cache=ref)
            for t in toks[1:]:
                model.step(torch.tensor([t], device=dev), ref)
        for i, (st, rs) in enumerate(zip(cache.states, ref.states)):
            if is_kv(st):
                L = int(rs.lengths[0])
                assert int(st.lengths[b]) == L, (b, i)
                for f in ("k", "v"):
                    got, want = getattr(st, f)[b], getattr(rs, f)[0]           # (heads, slots, dim)
                    # sliding-window rings: position p lives in slot p % slots, and the two caches
                    # have different slot counts (speculation adds T slack slots): compare the last
                    # positions both still hold
                    keep = min(L, got.shape[1], want.shape[1])
                    pos = torch.arange(L - keep, L, device=got.device)
                    torch.testing.assert_close(got[:, pos % got.shape[1]], want[:, pos % want.shape[1]],
                                               atol=atol, rtol=atol)
            else:
                for f in _fields(st):
                    torch.testing.assert_close(getattr(st, f)[b], getattr(rs, f)[0], atol=atol, rtol=atol,
                                               msg=lambda m, b=b, i=i, f=f: f"row {b} layer {i} {f}: {m}")


ALG2 = [("mamba2", K) for K in (1, 2, 3, 4, 5)] + [("mil50", K) for K in (1, 2, 3, 4, 5)] + \
    [("dm2_mix", 2), ("dm2_mix", 4)]


@pytest.mark.parametrize("target,K", ALG2)
def test_algorithm2_greedy_equals_plain_and_leaves_the_plain_cache(target, K, monkeypatch):
    """Mamba-2 (pure and hybrid) and discrete Mamba-2 targets verify with Algorithm 2 (no recorded SSD
    states; the spy sees a fused advance per layer and round, and one flush per layer at the end):
    greedy output == plain greedy, and the target cache afterwards == plain decoding of the tokens it
    consumed (so the final flush happened)."""
    made, spies = _recording_verifier(monkeypatch), _ssd_spies(monkeypatch)
    model = MODELS[target]()
    draft = perturbed(model, 0.05)
    prompts = prompts_for(model, lens=(1, 5, 17, 9))
    plain = generate(model, prompts, max_new_tokens=12)
    spec = generate(model, prompts, max_new_tokens=12, draft=draft, num_draft_tokens=K)
    for p, a, b in zip(prompts, spec.tokens, plain.tokens):
        assert_same_greedy(model, p, a, b)
    assert 0 < spec.stats.acceptance_rate < 1
    (ver,) = made
    ssd = [i for i, blk in enumerate(model.layers) if blk.kind in ("mamba2", "discrete_mamba2")]
    assert ssd and ver.lazy_layers == ssd
    assert all(ver.hist[i] is None for i in ssd) and ver.buffer_bytes()["recorded_states"] == 0
    assert ver.rounds == spec.stats.steps == len(ver.log)
    assert spies["verify"].keyed == spies["verify"].calls == ver.rounds * len(ssd)
    assert spies["advance"].calls == len(ssd)
    _assert_cache_is_plain(model, ver.cache, _consumed(ver, prompts))


@pytest.mark.parametrize("name", ["mamba2", "mil50", "dm2_mix", "mamba1_mix"])
def test_verifier_rounds_algorithm2_equals_recording(name):
    """Rounds of verify / commit with kept counts covering 0 … T per row: the Algorithm 2 verifier gives
    the same logits as the recording one every round, and after `flush` the same cache — which is the
    cache of plain decoding of the kept tokens."""
    from hybridize.generate.speculative import Verifier

    model = MODELS[name]()
    B, T, V = 3, 4, model.cfg.vocab_size
    prompts = prompts_for(model, lens=(6, 1, 11))
    g = torch.Generator().manual_seed(3)
    vers = []
    for lazy in (True, False):
        cache = alloc_cache(model, B, 64, window_slack=T)
        ver = Verifier(model, cache, B, T, use_cuda_graph=False, compile=False, lazy_ssd=lazy)
        prefill_(model, cache, [p[:-1] for p in prompts])
        vers.append(ver)
    lazy, rec = vers
    assert bool(lazy.lazy_layers) == (name != "mamba1_mix") and not rec.lazy_layers
    consumed = [list(p[:-1]) for p in prompts]
    keeps = [[0, T, 2], [T, 1, 0], [3, 0, T], [1, 2, 1]]
    for keep in keeps:
        ids = torch.randint(0, V, (B, T), generator=g)
        la, ra = lazy.verify(ids).clone(), rec.verify(ids).clone()
        torch.testing.assert_close(la, ra, atol=1e-5, rtol=1e-5)
        n = torch.tensor(keep)
        lazy.commit(n)
        rec.commit(n)
        for b in range(B):
            consumed[b] += ids[b, :keep[b]].tolist()
    lazy.flush()
    lazy.flush()                      # idempotent
    _assert_cache_is_plain(model, lazy.cache, consumed)
    _assert_cache_is_plain(model, rec.cache, consumed)


def test_verifier_ssd_state_memory_is_1x():
    """The Verifier keeps no copy of a Mamba-2 layer's SSM state (the recording path kept T + 1): only
    the round's inputs (T × (x, dt, B) per row) and the [conv state, T conv inputs] windows."""
    from hybridize.generate.speculative import Verifier
    from hybridize.model import HybridLM

    B, T = 2, 5
    model = MODELS["mamba2"]()
    nb = lambda t: t.numel() * t.element_size()
    cache = alloc_cache(model, B, 32)
    ssm = sum(nb(st.ssm) for st in cache.states)
    conv = sum(nb(st.conv) for st in cache.states)
    new = Verifier(model, cache, B, T, use_cuda_graph=False, compile=False).buffer_bytes()
    old = Verifier(model, cache, B, T, use_cuda_graph=False, compile=False, lazy_ssd=False).buffer_bytes()
    assert old == {"pending_inputs": 0, "conv_inputs": 0, "recorded_states": (T + 1) * (ssm + conv)}
    m = model.layers[0].mixer
    per_token = m.d_inner + m.nheads + m.ngroups * m.d_state               # x, dt, B (fp32 model)
    assert new == {"pending_inputs": len(model.layers) * B * T * per_token * 4,
                   "conv_inputs": len(model.layers) * B * T * m.conv_dim * 4,
                   "recorded_states": 0}
    assert sum(new.values()) < ssm                # less than one more copy of the SSM states
    # at 1B scale (meta tensors: nothing allocated; bf16 weights, fp32 states) the buffers are 4 %
    # (Mamba-2, N = 128) and 20 % (Mamba-in-the-Llama, N = P = 64) of one copy of the SSM states
    for preset in ("mamba2-1b", "mil50-1b"):
        with torch.device("meta"):
            big = HybridLM(hz.preset(preset)).to(torch.bfloat16)
            bc = big.init_cache(8, max_seqlen=64, device="meta")
        ssm = sum(nb(st.ssm) for st in bc.states if hasattr(st, "ssm"))
        got = Verifier(big, bc, 8, T, use_cuda_graph=False, compile=False).buffer_bytes()
        assert got["recorded_states"] == 0 and sum(got.values()) < 0.25 * ssm, (preset, got, ssm)


def test_algorithm2_triton_verify_kernel_in_speculative_decoding(monkeypatch):
    """HYBRIDIZE_KERNELS=1 (on CPU: the Triton interpreter): speculative decoding of a tiny target with
    a Mamba-2 and a discrete Mamba-2 layer runs the fused advance + verify kernel every round and the
    advance kernel at the end, and still equals plain greedy (which steps with the one-token kernel),
    leaving the plain cache behind. (The causal conv runs its reference here: its interpreted kernel
    alone would take a minute; tests/test_kernels_conv1d.py covers it.)"""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from hybridize.config import DiscreteMamba2Config, Mamba2Config
    from hybridize.ops import conv1d as conv_ops
    from hybridize.ops.ssd import triton_step as kern

    if not torch.cuda.is_available() and type(kern._ssd_verify_kernel).__name__ != "InterpretedFunction":
        pytest.skip("verify kernels were decorated without TRITON_INTERPRET=1 and there is no GPU")
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "1")
    if not torch.cuda.is_available():
        monkeypatch.setattr(conv_ops, "use_kernels", lambda *a: False)
    spy = _Spy(kern.ssd_verify_triton, "advance_prev")
    adv = _Spy(kern.ssd_advance_triton)
    monkeypatch.setattr(kern, "ssd_verify_triton", spy)
    monkeypatch.setattr(kern, "ssd_advance_triton", adv)
    made = _recording_verifier(monkeypatch)
    model = make_model("mamba2", seed=2, hidden_size=16, vocab_size=32,
                       layer_pattern=["mamba2", "discrete_mamba2"],
                       mamba2=Mamba2Config(d_state=8, headdim=8, expand=1, chunk_size=8),
                       discrete_mamba2=DiscreteMamba2Config(d_state=8, n_qk_heads=1, n_v_heads=2,
                                                            chunk_size=8))
    if torch.cuda.is_available():       # forced kernels need CUDA tensors when there is no interpreter
        model = model.cuda()
    prompts = prompts_for(model, lens=(3, 5))
    plain = generate(model, prompts, max_new_tokens=5)
    spy.calls = spy.keyed = adv.calls = 0
    spec = generate(model, prompts, max_new_tokens=5, draft=perturbed(model, 0.3), num_draft_tokens=2)
    for p, a, b in zip(prompts, spec.tokens, plain.tokens):
        assert_same_greedy(model, p, a, b)
    (ver,) = made
    assert ver.lazy_layers == [0, 1] and ver.rounds > 0
    # (the advance kernel is the verify kernel with no new tokens: one call each)
    assert spy.keyed == spy.calls == 2 * ver.rounds + adv.calls and adv.calls == 2
    _assert_cache_is_plain(model, ver.cache, _consumed(ver, prompts), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mil50", "dm2_mix"])
def test_verifier_programs_compile_fullgraph(name, monkeypatch):
    """The verify / commit programs with Algorithm 2 layers trace into one graph each (torch.compile
    fullgraph; aot_eager on CPU, no C++ build) and compute what the eager programs compute."""
    from hybridize.generate import engine
    from hybridize.generate.speculative import Verifier

    model = MODELS[name]()
    B, T = 3, 4
    prompts = prompts_for(model, lens=(6, 1, 11))
    runs = []
    for comp in (False, True):
        if comp:
            monkeypatch.setattr(engine, "compiled",
                                lambda fn: torch.compile(fn, backend="aot_eager", fullgraph=True))
        cache = alloc_cache(model, B, 64, window_slack=T)
        ver = Verifier(model, cache, B, T, use_cuda_graph=False, compile=comp)
        assert ver.compiled == comp and ver._commit.compiled == comp and ver.lazy_layers
        prefill_(model, cache, [p[:-1] for p in prompts])
        g = torch.Generator().manual_seed(0)
        logits = []
        for keep in ([0, 4, 2], [4, 1, 0], [3, 0, 4]):
            logits.append(ver.verify(torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)).clone())
            ver.commit(torch.tensor(keep))
        ver.flush()
        runs.append((logits, [(st.ssm if hasattr(st, "ssm") else st.lengths).clone() for st in cache.states]))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
