"""lm-evaluation-harness adapter: registers the model name ``hybridize`` with lm-eval.

lm-eval (EleutherAI, ``pip install lm-eval`` or ``pip install hybridize[eval]``; no torch of its own) finds
models only in its own registry and has no plugin discovery, so this module must be imported before
lm-eval looks the name up. Three ways to run it:

1. Command line — this module is a drop-in for the ``lm_eval`` command::

       python -m hybridize.eval.lm_eval_adapter --model hybridize \\
           --model_args pretrained=out/student,tokenizer=teacher_dir --tasks hellaswag,arc_easy --batch_size 8

   (every ``lm_eval`` option works; local task YAMLs with ``--include_path DIR`` as usual).

2. Python::

       import lm_eval, hybridize.eval.lm_eval_adapter  # registers "hybridize"
       lm_eval.simple_evaluate(model="hybridize", model_args="pretrained=out/student", tasks=["hellaswag"])

3. An already loaded model: ``HybridizeLM(pretrained=model, tokenizer=tok)`` passed as ``model=`` to
   ``simple_evaluate``.

model_args: ``pretrained`` (hybridize / supported HF checkpoint dir, or a preset name), ``tokenizer`` (dir;
default: the checkpoint dir), ``device`` (default cuda when available), ``dtype`` (auto: bf16 on CUDA, fp32
on CPU), ``batch_size`` (default 8), ``max_length`` (context limit; default the attention
max_position_embeddings, or 8192 for attention-free models), ``max_gen_toks`` (256), ``add_bos_token``.

Scoring matches Hugging Face's ``hf`` model in lm-eval: continuations are scored from the full-sequence
logits (right-padded batches: exact for causal models, recurrent ones included); rolling log-likelihoods
use lm-eval's own disjoint windows; generation is greedy with the model's decode cache (`init_cache` +
`step`: O(1) work per token for recurrent layers; batched through `hybridize.generate.generate`) and
stops at any ``until`` string or EOS.
"""
from __future__ import annotations

import sys
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import get_model, register_model
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError("hybridize.eval.lm_eval_adapter needs lm-eval-harness: pip install lm-eval "
                      "(or pip install 'hybridize[eval]')") from e

from tqdm.auto import tqdm

MODEL_NAME = "hybridize"


def _to_int(v, default: int) -> int:
    if v is None or v == "" or (isinstance(v, str) and v.startswith("auto")):
        return default
    return int(v)


def _to_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "y")


@torch.no_grad()
def greedy_generate(model, prompt_ids: list, max_new_tokens: int, *, stop=None, eos_token_id=None) -> list:
    """Greedy decoding with the model's cache: one prefill forward, then `model.step` per token.

    stop: optional callable(new_ids: list) → bool checked after every token. Returns the new token ids
    (including a final EOS when it was produced)."""
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=dev)
    cache = model.init_cache(1, max_seqlen=len(prompt_ids) + max_new_tokens + 1)
    logits = model(ids, cache=cache, logits_to_keep=1).logits[:, -1]
    new: list = []
    for _ in range(max_new_tokens):
        tok = logits.argmax(-1)
        new.append(int(tok))
        if (eos_token_id is not None and new[-1] == eos_token_id) or (stop is not None and stop(new)):
            break
        if len(new) < max_new_tokens:
            logits = model.step(tok, cache)
    return new


def _register_once(cls):
    """register_model, tolerating a second import of this module (e.g. under `python -m`): lm-eval refuses
    to register a name twice."""
    try:
        existing = get_model(MODEL_NAME)
    except (ValueError, KeyError):
        return register_model(MODEL_NAME)(cls)
    if getattr(existing, "__qualname__", None) != cls.__qualname__:
        raise RuntimeError(f"lm-eval already has a model named {MODEL_NAME!r}: {existing}")
    return cls


@_register_once
class HybridizeLM(TemplateLM):
    """lm-eval model ``hybridize`` (see the module docstring for its model_args)."""

    backend = "causal"

    def __init__(self, pretrained: Union[str, torch.nn.Module] = None, tokenizer=None,
                 device: Optional[str] = None, dtype: str = "auto", batch_size: Union[int, str] = 8,
                 max_length: Optional[int] = None, max_gen_toks: Union[int, str] = 256,
                 add_bos_token: Union[bool, str] = False, **kwargs):
        super().__init__()
        kwargs.pop("max_batch_size", None)          # passed by lm-eval's CLI; batches here are fixed-size
        if kwargs:
            warnings.warn(f"hybridize lm-eval model: ignoring unknown model_args {sorted(kwargs)}",
                          stacklevel=2)
        if pretrained is None:
            raise ValueError("the hybridize lm-eval model needs pretrained=<checkpoint dir or preset>")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(pretrained, torch.nn.Module):
            self.model = pretrained
            dev = next(pretrained.parameters()).device
        else:
            import hybridize
            tdtype = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32,
                      "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                      "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[str(dtype)]
            self.model = hybridize.load(pretrained, dtype=tdtype, device=dev)
        self.model.eval()
        self._device = dev
        if tokenizer is None or isinstance(tokenizer, str):
            from hybridize.data.tokenizer import load_tokenizer
            src = tokenizer or (pretrained if isinstance(pretrained, str) else None)
            if src is None:
                raise ValueError("pass tokenizer=<dir> (or a tokenizer object) with an in-memory model")
            tokenizer = load_tokenizer(src)
        self.tokenizer = tokenizer
        self.batch_size = _to_int(batch_size, 8)
        self.max_gen_toks = _to_int(max_gen_toks, 256)
        self.add_bos_token = _to_bool(add_bos_token)
        self._max_length = _to_int(max_length, 0) or self._default_max_length()

    # ------------------------------------------------------------------ properties lm-eval uses
    def _default_max_length(self) -> int:
        cfg = getattr(self.model, "cfg", None)
        if cfg is not None and "attention" in cfg.layer_pattern:
            return int(cfg.attention.max_position_embeddings)
        return 8192

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "hybridize").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list:
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_special_tokens=add)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: Optional[int] = None):
        """requests: [(cache_key, context_ids, continuation_ids)] → [(sum log p(continuation), is_greedy)].

        The last max_length + 1 tokens of context + continuation are kept; the model reads all but the last
        and the continuation's log-probs come from the final len(continuation) positions."""
        bs = override_bs or self.batch_size
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or len(requests) < bs,
                    desc="hybridize loglikelihood")
        for lo in range(0, len(order), bs):
            idx = order[lo:lo + bs]
            rows, cont_lens = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                if not cont:
                    raise ValueError("empty continuation in a loglikelihood request")
                whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
                rows.append(whole[:-1])
                cont_lens.append(len(cont))
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
            logits = self.model(ids.to(self.device)).logits
            for r, i in enumerate(idx):
                n, c = len(rows[r]), cont_lens[r]
                logp = F.log_softmax(logits[r, n - c:n].float(), dim=-1)
                target = torch.tensor(requests[i][2][-c:], dtype=torch.long, device=logp.device)
                ll = float(logp.gather(-1, target[:, None]).sum())
                greedy = bool((logp.argmax(-1) == target).all())
                results[i] = (ll, greedy)
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, (ll, greedy))
            pbar.update(len(idx))
        pbar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """Total log-likelihood of each string, in lm-eval's disjoint windows of max_length tokens
        (the first token conditioned on the prefix token, BOS or EOS)."""
        windows, owner = [], []
        for j, (string,) in enumerate(req.args for req in requests):
            for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *w))
                owner.append(j)
        lls = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for j, (ll, _) in zip(owner, lls):
            totals[j] += ll
        for req, tot in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), tot)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        """Greedy generation until a stop string, EOS or max_gen_toks. Requests with the same stop strings
        and length limit are batched through `hybridize.generate.generate` (per-row decode states, CUDA
        graphs on GPU); without it (older installs) each request runs `greedy_generate`."""
        try:
            from hybridize.generate import generate as engine
        except ImportError:
            engine = None
        jobs = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None)
            until = [until] if isinstance(until, str) else [u for u in (until or []) if u]
            max_new = _to_int(kw.pop("max_gen_toks", None), self.max_gen_toks)
            if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0:
                warnings.warn("hybridize lm-eval model: sampling is not supported, decoding greedily",
                              stacklevel=2)
            ctx = self.tok_encode(context) if context else [self.prefix_token_id]
            jobs.append((i, ctx[-max(1, self.max_length - max_new):], tuple(until), max_new))
        out: list = [None] * len(requests)
        groups: dict = {}
        for job in jobs:
            groups.setdefault((job[2], job[3]), []).append(job)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="hybridize generate_until")
        for (until, max_new), group in groups.items():
            step = self.batch_size if engine is not None else 1
            for lo in range(0, len(group), step):
                chunk = group[lo:lo + step]
                if engine is not None:
                    res = engine(self.model, [c[1] for c in chunk], max_new_tokens=max_new, temperature=0.0,
                                 eos_token_id=self.eot_token_id, stop=list(until) or None,
                                 tokenizer=self.tokenizer)
                    texts = res.texts
                else:
                    texts = [self._greedy_text(c[1], until, max_new) for c in chunk]
                for (i, _, _, _), text in zip(chunk, texts):
                    for s in until:                     # lm-eval's contract: cut at the first stop string
                        text = text.split(s)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                pbar.update(len(chunk))
        pbar.close()
        return out

    def _greedy_text(self, ctx: list, until: tuple, max_new: int) -> str:
        def stop(new):
            text = self.tok_decode(new)
            return any(s in text for s in until)

        new = greedy_generate(self.model, ctx, max_new, stop=stop if until else None,
                              eos_token_id=self.eot_token_id)
        if new and new[-1] == self.eot_token_id:
            new = new[:-1]
        return self.tok_decode(new)


def main(argv: Optional[list] = None) -> None:
    """`python -m hybridize.eval.lm_eval_adapter ...`: the ``lm_eval`` command, with ``hybridize``
    registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
