"""lm-eval-harness adapter: log-likelihoods equal the model's own log-probs, rolling log-likelihoods,
greedy generation with stop strings, and a full `simple_evaluate` run on local YAML tasks (offline)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from hybridize import HybridLM, preset  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    # offline, and HF datasets' cache inside the test's temporary directory
    old = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                      HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("hf_datasets_cache")))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from hybridize.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("lmeval")
    text = " ".join(f"the cat sat on mat number {i} and the dog ran to the park {i % 5}." for i in range(300))
    tok = train_bpe_tokenizer([text], vocab_size=320)
    torch.manual_seed(0)
    model = HybridLM(preset("mil50-debug", vocab_size=320))   # attention + Mamba-2: cache and padding paths
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def lm(ckpt):
    from hybridize.eval.lm_eval_adapter import HybridizeLM

    return HybridizeLM(pretrained=str(ckpt), device="cpu", batch_size="3")


def _req(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def _manual_logprob(model, ids, n_cont):
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
    cont = torch.tensor(ids[-n_cont:])
    rows = logp[len(ids) - 1 - n_cont:]
    return float(rows.gather(-1, cont[:, None]).sum()), bool((rows.argmax(-1) == cont).all())


def test_registered_under_hybridize():
    import hybridize.eval.lm_eval_adapter as adapter
    from lm_eval.api.registry import get_model

    assert get_model("hybridize") is adapter.HybridizeLM
    import importlib
    importlib.reload(adapter)                      # a second import (python -m …) must not fail


def test_loglikelihood_equals_model_logprobs(lm):
    pairs = [("the cat sat on", " mat"), ("the dog ran to the", " park number 3."), ("", "the cat"),
             ("a much longer context about the cat and the dog and the park", " and the mat"), ("x", " y z")]
    got = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)])
    assert len(got) == len(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        if ctx:
            c_ids, k_ids = lm._encode_pair(ctx, cont)
        else:
            c_ids, k_ids = [lm.prefix_token_id], lm.tok_encode(cont)
        want, want_greedy = _manual_logprob(lm.model, c_ids + k_ids, len(k_ids))
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
        assert ll < 0


def test_loglikelihood_rolling(lm, ckpt):
    from hybridize.eval.lm_eval_adapter import HybridizeLM

    s = "the cat sat on the mat and the dog ran to the park."
    (total,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (s,))])
    ids = [lm.prefix_token_id] + lm.tok_encode(s)
    want, _ = _manual_logprob(lm.model, ids, len(ids) - 1)
    assert total == pytest.approx(want, abs=1e-4)
    # a short context limit splits the text into windows: every token still scored once (finite, lower)
    short = HybridizeLM(pretrained=lm.model, tokenizer=lm.tokenizer, max_length=6)
    (t2,) = short.loglikelihood_rolling([_req("loglikelihood_rolling", (s,))])
    assert t2 < 0 and t2 != pytest.approx(total)


def _reference_greedy(lm, ctx, n):
    """Greedy decoding by full forward passes (no cache), cut at EOS, decoded without special tokens."""
    ids, ref = lm.tok_encode(ctx), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(lm.model(torch.tensor([ids + ref])).logits[0, -1].argmax())
            if nxt == lm.eot_token_id:
                break
            ref.append(nxt)
    return lm.tokenizer.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("use_engine", [True, False])
def test_generate_until_greedy_and_stops(lm, monkeypatch, use_engine):
    if not use_engine:                  # the fallback loop (init_cache + step), one request at a time
        import sys

        import hybridize.generate  # noqa: F401  (hybridize.generate is also the function's name)
        monkeypatch.delattr(sys.modules["hybridize.generate"], "generate")
    ctxs = ["the cat sat on", "the dog ran to the park and", "a"]
    refs = [_reference_greedy(lm, c, 12) for c in ctxs]
    outs = lm.generate_until([_req("generate_until", (c, {"until": [], "max_gen_toks": 12}), i)
                              for i, c in enumerate(ctxs)])
    assert outs == refs
    assert len(refs[0]) >= 3, refs      # a random model rarely emits EOS first; the fixture is seeded
    stop = refs[0][1:3]
    (cut,) = lm.generate_until([_req("generate_until", (ctxs[0], {"until": [stop], "max_gen_toks": 12}))])
    assert cut == refs[0].split(stop)[0]


def test_simple_evaluate_on_local_tasks(ckpt, tmp_path):
    from hybridize.eval.lm_eval_adapter import HybridizeLM  # importing registers "hybridize"
    from lm_eval.tasks import TaskManager

    data = tmp_path / "data.jsonl"
    rows = [{"question": f"the cat sat on the {w}", "choices": [" mat", " park", " dog"], "answer": i % 3,
             "text": f"the dog ran to the park {i}.", "target": "mat"} for i, w in enumerate("abcd")]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "mc.yaml").write_text(
        "task: hz_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "ppl.yaml").write_text(
        "task: hz_ppl\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    (tmp_path / "gen.yaml").write_text(
        "task: hz_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{target}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n")
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    res = lm_eval.simple_evaluate(model="hybridize", model_args=f"pretrained={ckpt},batch_size=2",
                                  tasks=["hz_mc", "hz_ppl", "hz_gen"], task_manager=tm, device="cpu",
                                  bootstrap_iters=0, log_samples=True)
    r = res["results"]
    assert 0.0 <= r["hz_mc"]["acc,none"] <= 1.0
    assert r["hz_ppl"]["word_perplexity,none"] > 1.0
    assert 0.0 <= r["hz_gen"]["exact_match,none"] <= 1.0
    # the harness' per-choice log-likelihoods are the adapter's (= the model's own, tested above)
    sample = res["samples"]["hz_mc"][0]
    lls = [float(x[0][0] if isinstance(x[0], (list, tuple)) else x[0]) for x in sample["resps"]]
    args = [tuple(a) for a in sample["arguments"]]
    assert len(lls) == 3 and args[0][0] == "the cat sat on the a"
    direct = HybridizeLM(pretrained=str(ckpt), device="cpu").loglikelihood(
        [_req("loglikelihood", a, i) for i, a in enumerate(args)])
    assert lls == pytest.approx([d[0] for d in direct], abs=1e-5)
