"""Generation: batched prefill into per-row decode states, a CUDA-graph decode loop, sampling, and
speculative decoding with a draft model.

    from hybridize.generate import generate
    res = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0)
    res.tokens, res.stats.tokens_per_s
    res = generate(target, prompts, draft=small_model, num_draft_tokens=4)   # same distribution, faster
"""
from hybridize.generate.engine import GenerationResult, GenerationStats, StepRunner, generate, prefill_
from hybridize.generate.sampling import SamplingParams, process_logits, sample
from hybridize.generate.speculative import check_draft, commit_, verify_forward

__all__ = ["GenerationResult", "GenerationStats", "SamplingParams", "StepRunner", "check_draft", "commit_",
           "generate", "prefill_", "process_logits", "sample", "verify_forward"]
