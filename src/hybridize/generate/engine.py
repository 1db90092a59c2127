"""The generation engine: batched prefill into per-row decode states, then a decode loop on
`HybridLM.step` (torch.compile'd and replayed from a CUDA graph on GPU).

Layout of one call (B prompts of different lengths, no padding anywhere):

1. ``alloc_cache``: one preallocated batched cache (KV caches sized to the longest prompt plus the new
   tokens; recurrent states are fixed size). The model's projections that read the same input (q/k/v,
   gate/up, RG-LRU branches) are fused into one matmul each, for prefill and decode
   (`HybridLM.fuse_projections_`: views of one weight tensor, no extra memory; ``fuse=False`` or
   HYBRIDIZE_FUSE=0 leaves the model as it is). On CUDA, ``model.step`` is compiled (`torch.compile`,
   fullgraph: norms, rotary, cache writes and state updates fuse into a few kernels per layer; attention
   is a split-K decode kernel that reads only the filled slots) and captured into a graph on this cache
   now (all states update in place), then the cache is zeroed. One compiled graph serves every KV
   capacity and every batch size > 1 (`mark_dynamic_cache`); the first compile of a model costs tens of
   seconds (HYBRIDIZE_COMPILE=0 or ``compile=False`` skips it).
2. Prefill: prompts are grouped by length; each group runs ``model.forward`` in chunks of
   ``prefill_chunk`` tokens on a scratch cache of the same capacities, whose rows are then copied into
   their batch rows (``copy_rows_``). Each row's recurrent state therefore only ever sees its own
   tokens. The *last* prompt token is not prefilled: decoding starts by stepping it for every row, so
   a 1-token prompt needs no prefill and all rows enter the loop the same way.
3. Decode: ``logits = step(tok)`` → sample → next ``tok`` (greedy: the argmax is part of the graph). Tokens stay on the device in a (B, N)
   buffer; the host looks at them only every ``check_every`` tokens when there is something to check
   (EOS, stop strings; every token when streaming), else once at the end. Rows that finished keep
   stepping (their output is ignored) until every row is done.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from hybridize.generate.cache_ops import alloc_cache, copy_rows_, empty_like, zero_
from hybridize.generate.sampling import SamplingParams, argmax_last, sample
from hybridize.ops.gemv import prepare_decode_gemv

#: stream(row, new_token_ids, new_text_or_None), called as tokens of a row become final
StreamFn = Callable[[int, list, Optional[str]], None]


# ---------------------------------------------------------------------------- results
@dataclass
class GenerationStats:
    batch_size: int
    prompt_tokens: int
    new_tokens: int            # tokens returned (after EOS / stop / max_new_tokens truncation)
    prefill_s: float           # prefill of all prompts (CUDA graph capture excluded)
    decode_s: float
    steps: int                 # decode steps (plain) or rounds (speculative)
    tokens_per_s: float        # new_tokens / decode_s, summed over the batch
    ms_per_step: float         # decode latency per step / round
    cuda_graph: bool = False
    compiled: bool = False     # the decode step (and the verifier) ran torch.compile'd code
    fused: bool = False        # the model (and the draft) ran fused projections (fuse_projections_)
    gemv_shapes: int = 0       # matmuls served by the tuned Triton GEMV / skinny GEMM (hybridize.ops.gemv)
    # speculative decoding only
    num_draft_tokens: Optional[int] = None
    drafted: Optional[int] = None
    accepted: Optional[int] = None
    acceptance_rate: Optional[float] = None       # accepted / drafted
    mean_tokens_per_round: Optional[float] = None  # (accepted + 1) per row and round

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class GenerationResult:
    """tokens[i]: the new token ids of prompt i (EOS included when it ended the row); texts[i] when a
    tokenizer was given; finish_reasons[i] in {"eos", "stop", "length"}."""
    tokens: list
    texts: Optional[list] = None
    finish_reasons: list = field(default_factory=list)
    prompt_tokens: list = field(default_factory=list)
    stats: Optional[GenerationStats] = None

    def __len__(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "texts": self.texts, "finish_reasons": self.finish_reasons,
                "stats": self.stats.to_dict() if self.stats else None}


class _Outputs:
    """Host-side bookkeeping: per-row tokens, EOS / stop-string / length ends, streaming."""

    def __init__(self, batch_size: int, max_new_tokens: int, eos_ids: set, stop: Sequence[str],
                 tokenizer, stream: Optional[StreamFn]):
        self.max_new, self.eos, self.stop, self.tok, self.stream = max_new_tokens, eos_ids, list(stop), \
            tokenizer, stream
        self.tokens = [[] for _ in range(batch_size)]
        self.done = [max_new_tokens == 0] * batch_size
        self.reason = ["length"] * batch_size
        self._sent_tokens = [0] * batch_size
        self._sent_text = [""] * batch_size

    def extend(self, b: int, new: list) -> None:
        """Append tokens to row b until it ends (EOS, max_new_tokens)."""
        if self.done[b]:
            return
        toks = self.tokens[b]
        for t in new:
            toks.append(int(t))
            if t in self.eos:
                self.done[b], self.reason[b] = True, "eos"
                break
            if len(toks) >= self.max_new:
                self.done[b] = True
                break
        if self.stop:
            self._check_stop(b)
        if self.stream is not None:
            self._emit(b)

    def _check_stop(self, b: int) -> None:
        text = self.tok.decode(self.tokens[b], skip_special_tokens=True)
        if not any(s in text for s in self.stop):
            return
        # keep the shortest token prefix whose text contains a stop string
        toks = self.tokens[b]
        lo = max(self._sent_tokens[b], 1)
        for n in range(lo, len(toks) + 1):
            if any(s in self.tok.decode(toks[:n], skip_special_tokens=True) for s in self.stop):
                del toks[n:]
                break
        self.done[b], self.reason[b] = True, "stop"

    def _emit(self, b: int) -> None:
        new = self.tokens[b][self._sent_tokens[b]:]
        if not new and not self.done[b]:
            return
        text = None
        if self.tok is not None:
            full = self.text(b)
            # hold back an incomplete multi-byte character until its next token arrives
            if full.endswith("\ufffd") and not self.done[b]:
                return
            text, self._sent_text[b] = full[len(self._sent_text[b]):], full
        self._sent_tokens[b] = len(self.tokens[b])
        if new or text:
            self.stream(b, new, text)

    def text(self, b: int) -> str:
        text = self.tok.decode(self.tokens[b], skip_special_tokens=True)
        if self.reason[b] == "stop":
            cut = min((text.find(s) for s in self.stop if s in text), default=-1)
            text = text[:cut] if cut >= 0 else text
        return text

    @property
    def all_done(self) -> bool:
        return all(self.done)


# ---------------------------------------------------------------------------- inputs
def normalize_prompts(prompts, tokenizer, vocab_size: int) -> list:
    """A prompt or a list of prompts (strings with a tokenizer, token-id lists, or a (B, L) tensor) → list
    of id lists."""
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    elif isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                      and isinstance(prompts[0], int)):
        prompts = [prompts]
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer (pass tokenizer=..., or token-id lists)")
            p = tokenizer(p)["input_ids"]
        ids = [int(t) for t in (p.tolist() if isinstance(p, Tensor) else p)]
        if not ids:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}) (e.g. {bad[0]}): "
                             "tokenizer/model vocab mismatch?")
        out.append(ids)
    if not out:
        raise ValueError("no prompts given")
    return out


def resolve_eos(eos_token_id, tokenizer) -> set:
    """None → the tokenizer's EOS (none without a tokenizer); int or iterable of ints otherwise."""
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- prefill
@torch.no_grad()
def prefill_(model, cache, token_lists: list, *, prefill_chunk: int = 2048,
             max_tokens_per_call: int = 16384) -> None:
    """Run each row's tokens (list of id lists, may be empty) through `model` into row b of `cache`.

    Rows of equal length are batched (at most ``max_tokens_per_call`` tokens per forward); each chunk
    of ``prefill_chunk`` tokens carries the scratch cache forward (chunked prefill bounds activation
    memory for long prompts). Only the last position's logits are computed."""
    device = next(model.parameters()).device
    by_len: dict = {}
    for b, ids in enumerate(token_lists):
        if ids:
            by_len.setdefault(len(ids), []).append(b)
    for n, rows in sorted(by_len.items()):
        per_call = max(1, max_tokens_per_call // min(n, prefill_chunk))
        for i in range(0, len(rows), per_call):
            sub_rows = rows[i:i + per_call]
            scratch = empty_like(cache, len(sub_rows))      # same capacities → rows copy 1:1
            ids = torch.tensor([token_lists[b] for b in sub_rows], device=device)
            for s in range(0, n, prefill_chunk):
                model(ids[:, s:s + prefill_chunk], cache=scratch, logits_to_keep=1)
            copy_rows_(cache, torch.tensor(sub_rows, device=device), scratch)
            del scratch


# ---------------------------------------------------------------------------- fused projections
def fuse_wanted(fuse: bool = True) -> bool:
    """`fuse`, unless HYBRIDIZE_FUSE=0 (A/B benchmarks of the unfused projections)."""
    if os.environ.get("HYBRIDIZE_FUSE", "").lower() in ("0", "off", "false", "no"):
        return False
    return bool(fuse)


def fuse_for_inference(model, fuse: bool = True) -> bool:
    """`model.fuse_projections_()` when wanted (`fuse_wanted`) and the model has it; must run before
    compiling / capturing its step (idempotent: cheap when already fused). Returns whether its
    projections are fused now (``fuse=False`` leaves a model fused earlier as it is)."""
    if not hasattr(model, "fuse_projections_"):
        return False
    if fuse_wanted(fuse):
        model.fuse_projections_()
    return model.projections_fused()


# ---------------------------------------------------------------------------- compiled steps
_WARNED: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, stacklevel=3)


def _step_program(model, ids: Tensor, cache) -> Tensor:
    """What `torch.compile` sees for one decode step (a module-level function: one code object, so the
    compiled graphs of every model / batch size share dynamo's cache)."""
    return model.step(ids, cache)


_COMPILED: dict = {}


def _compile_wanted(compile, device) -> bool:
    if os.environ.get("HYBRIDIZE_COMPILE", "").lower() in ("0", "off", "false", "no"):
        return False
    if compile == "auto":
        return device.type == "cuda"
    return bool(compile)


def _inductor_options() -> Optional[dict]:
    """Inductor options of the decode step (None with HYBRIDIZE_COMPILE_MODE, which takes a mode instead):

    - ``comprehensive_padding`` off: inductor pads the row stride of matmul outputs whose width is not a
      multiple of 128 bytes (Mamba-2's in_proj, 5152 columns at 1B: rows of 5184), and our custom ops take
      their inputs with the eager strides — so each of the in_proj's column slices (xBC, z, dt) was first
      copied into an unpadded buffer: 3 extra kernels per Mamba layer (batch 64 / 8k, H100: ~50 µs of copies
      and their launch gaps per step of the 12.5 % hybrid).
    - its own Triton kernels (norms, rotary, adds) launched with PDL like ours (`hybridize.ops.pdl`;
      inductor decides per kernel which loads must wait) where the torch has the option and PDL is wanted
      (HYBRIDIZE_PDL). Batch 64 / 8k, H100: +1.2 / +0.7 / +0.8 % tokens/s for the 1.2 B Transformer / 25 %
      / 12.5 % hybrids, batch 1 unchanged (benchmarks/results/decode_inductor_pdl_s9_h100.json)."""
    import torch._inductor.config as icfg

    if os.environ.get("HYBRIDIZE_COMPILE_MODE"):
        return None
    options = {"comprehensive_padding": False}
    if hasattr(icfg.triton, "enable_pdl"):
        from hybridize.ops.pdl import pdl_wanted
        options["triton.enable_pdl"] = pdl_wanted()
    return options


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, fullgraph=True)`` (inductor, default mode: no CUDA graphs of its own, the
    callers capture theirs; `_inductor_options`), memoised per function and options. Recompiles happen per
    batch size class (1 / > 1, see `mark_dynamic_cache`) and per model architecture, so dynamo's recompile
    limit is raised."""
    options = _inductor_options()
    key = (fn, tuple(sorted((options or {}).items())))
    if key not in _COMPILED:
        import torch._dynamo.config as dcfg

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(int(getattr(dcfg, name)), 64))
        for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(int(getattr(dcfg, name)), 512))
        mode = {"options": options} if options else {"mode": os.environ.get("HYBRIDIZE_COMPILE_MODE") or None}
        _COMPILED[key] = torch.compile(fn, fullgraph=True, dynamic=None, **mode)
    return _COMPILED[key]


def mark_dynamic_cache(cache, *tensors: Tensor) -> None:
    """Tell dynamo which sizes vary between calls so that one compiled graph serves them all: the KV
    capacity (dim 2 of k / v) and, for batches > 1, the batch dim of every state tensor and of
    `tensors` (a batch of 1 is always specialised)."""
    from torch._dynamo import maybe_mark_dynamic

    from hybridize.generate.cache_ops import _fields, is_kv

    for st in cache.states:
        for name in _fields(st):
            t = getattr(st, name)
            if t.shape[0] > 1:
                maybe_mark_dynamic(t, 0)
            if is_kv(st) and name in ("k", "v") and t.shape[2] > 1:
                maybe_mark_dynamic(t, 2)
    for t in tensors:
        if t.shape[0] > 1:
            maybe_mark_dynamic(t, 0)


def try_compiled(fn: Callable, args: tuple, what: str) -> Optional[Callable]:
    """The compiled `fn` after one successful warm-up call ``fn(*args)`` (which compiles it), or None with
    a warning (once per `what`) when compilation fails — the caller then runs `fn` eagerly."""
    try:
        cfn = compiled(fn)
        cfn(*args)
        return cfn
    except Exception as e:  # noqa: BLE001 — any compiler failure → eager
        _warn_once(f"compile:{what}:{type(e).__name__}",
                   f"torch.compile of {what} failed ({type(e).__name__}: {str(e)[:400]}); running it eagerly "
                   "(set HYBRIDIZE_COMPILE=0 to skip compiling)")
        return None


# ---------------------------------------------------------------------------- graphed programs
class GraphedProgram:
    """``prog()`` runs ``fn(*args)`` on static `args` — compiled with `torch.compile` and/or replayed from
    a CUDA graph captured on them. Callers write their inputs into the static tensors of `args` first; the
    outputs of a replay are static buffers overwritten by the next call. ``post(outputs)``, when given,
    runs after `fn` (inside the graph) and its result is what ``prog()`` returns.

    Compilation and capture run `fn` (warm-up), so the states in `args` must be reset afterwards by the
    caller (`touched` says whether anything ran). ``eager_first`` runs `fn` once uncompiled before
    compiling (kernel self-checks, memoised constants); `dynamic_cache` / `dynamic_tensors` are marked
    for `mark_dynamic_cache`. use_cuda_graph, compile: True / False / "auto" (= on CUDA). A failing
    compile falls back to eager `fn`, a failing capture of the compiled `fn` to a capture of the eager one,
    a failing "auto" capture to no graph, each with a warning (use_cuda_graph=True re-raises)."""

    def __init__(self, fn: Callable, args: tuple, *, device, use_cuda_graph: Union[bool, str] = "auto",
                 compile: Union[bool, str] = "auto", what: str = "step", post: Optional[Callable] = None,
                 eager_first: bool = True, dynamic_cache=None, dynamic_tensors: tuple = ()):
        self.args, self.post, self.what = args, post, what
        self.graph, self.compiled, self.touched = None, False, False
        self.fn = fn
        self.outputs = None
        want = device.type == "cuda" if use_cuda_graph == "auto" else bool(use_cuda_graph)
        if want and device.type != "cuda":
            raise ValueError("use_cuda_graph=True needs the model on a CUDA device")
        if _compile_wanted(compile, device):
            self.touched = True
            with torch.no_grad():
                if eager_first:
                    fn(*args)
                if dynamic_cache is not None:
                    mark_dynamic_cache(dynamic_cache, *dynamic_tensors)
                cfn = try_compiled(fn, args, what)
            if cfn is not None:
                self.fn, self.compiled = cfn, True
        if want:
            self.touched = True
            try:
                self._capture(device)
            except Exception as e:  # noqa: BLE001 — any capture failure → eager (or the eager fn's graph)
                if self.compiled:
                    _warn_once(f"capture-compiled:{what}:{type(e).__name__}",
                               f"CUDA graph capture of the compiled {what} failed ({type(e).__name__}: "
                               f"{str(e)[:300]}); capturing the eager {what}")
                    self.fn, self.compiled = fn, False
                    try:
                        self._capture(device)
                    except Exception as e2:  # noqa: BLE001
                        e = e2
                if self.graph is None:
                    if use_cuda_graph is True:
                        raise e
                    warnings.warn(f"CUDA graph capture of {what} failed ({type(e).__name__}: {e}); "
                                  "running it eagerly")

    def _run(self):
        out = self.fn(*self.args)
        return self.post(out) if self.post is not None else out

    @torch.no_grad()
    def _capture(self, device) -> None:
        self.graph = None
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):           # warm-up: lazy init, Triton compilation, allocator
            for _ in range(2):
                self._run()
        torch.cuda.current_stream(device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.outputs = self._run()
        self.graph = g

    @torch.no_grad()
    def __call__(self):
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.outputs


# ---------------------------------------------------------------------------- step runner
def _with_argmax(logits: Tensor):
    return logits, argmax_last(logits)          # exact in the logits' dtype: no fp32 copy of the row


class StepRunner:
    """``runner(ids (B,)) → logits (B, V)`` advancing `cache` in place: `model.step` — compiled with
    `torch.compile` (fused norms / rotary / state updates: a few kernels per layer instead of dozens) and
    replayed from a CUDA graph captured on this cache (static input/output buffers; the returned logits
    are overwritten by the next call). ``greedy_step(ids)`` → the argmax tokens (B,), computed inside
    the graph.

    Capture runs warm-up steps, so it must happen before the cache is filled: the cache is zeroed
    afterwards. use_cuda_graph, compile: True, False or "auto" (= on CUDA); a failing compile falls back
    to the eager step, a failing "auto" capture to eager steps, each with a warning. fuse: fuse the
    model's projections first (`fuse_for_inference`; ``fused`` says whether they are). On CUDA the model's
    matmuls go through the tuned Triton GEMV (batch 1) / skinny GEMM (batch 2-128) where it beats cuBLAS
    (`hybridize.ops.gemv.prepare_decode_gemv`; ``gemv`` holds its report; HYBRIDIZE_GEMV=0: off,
    HYBRIDIZE_GEMM=0: batch 1 only)."""

    def __init__(self, model, cache, batch_size: int, use_cuda_graph: Union[bool, str] = "auto",
                 compile: Union[bool, str] = "auto", fuse: bool = True):
        self.model, self.cache = model, cache
        self.fused = fuse_for_inference(model, fuse)             # before compiling / capturing the step
        self.gemv = prepare_decode_gemv(model, batch=batch_size)
        device = next(model.parameters()).device
        self.ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.prog = GraphedProgram(_step_program, (model, self.ids, cache), device=device,
                                   use_cuda_graph=use_cuda_graph, compile=compile, what="model.step",
                                   post=_with_argmax, dynamic_cache=cache, dynamic_tensors=(self.ids,))
        if self.prog.touched:
            zero_(cache)

    @property
    def graph(self):
        return self.prog.graph

    @property
    def compiled(self) -> bool:
        return self.prog.compiled

    @torch.no_grad()
    def __call__(self, ids: Tensor) -> Tensor:
        if self.prog.graph is None:
            return self.prog.fn(self.model, ids, self.cache)
        self.ids.copy_(ids)
        return self.prog()[0]

    @torch.no_grad()
    def greedy_step(self, ids: Tensor) -> Tensor:
        """Step `ids` and return the argmax tokens (B,) (a static buffer when replaying a graph)."""
        if self.prog.graph is None:
            return self(ids).float().argmax(-1)
        self.ids.copy_(ids)
        return self.prog()[1]


# ---------------------------------------------------------------------------- generate
@torch.no_grad()
def generate(model, prompts, max_new_tokens: int = 64, *, draft=None, num_draft_tokens: int = 4,
             temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             repetition_penalty: float = 1.0, eos_token_id=None, stop: Optional[Sequence[str]] = None,
             seed: Optional[int] = None, tokenizer=None, stream: Optional[StreamFn] = None,
             use_cuda_graph: Union[bool, str] = "auto", compile: Union[bool, str] = "auto",
             prefill_chunk: int = 2048, check_every: int = 16, state_dtype=torch.float32,
             fuse: bool = True) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens for each prompt with a `HybridLM` (any mixer mix).

    prompts: a list of token-id lists (different lengths welcome) or of strings (with `tokenizer`), or
    one prompt. draft: a smaller `HybridLM` with the same vocabulary → speculative decoding with
    `num_draft_tokens` (K) draft tokens per round (see `hybridize.generate.speculative`); the output
    distribution is exactly the target's. temperature 0 → greedy; else top_k / top_p /
    repetition_penalty as in HF. eos_token_id: int or ints (default: the tokenizer's EOS); stop: strings
    that end a row (needs a tokenizer; the text is cut before them). seed: seeds the sampler's
    `torch.Generator` (reproducible). stream(row, new_ids, new_text) is called as tokens become final
    (forces a host sync per token). use_cuda_graph / compile: "auto" = on CUDA — the decode step (and the
    speculative verifier) are `torch.compile`d and replayed from CUDA graphs (see `StepRunner`); compile
    falls back to eager with a warning, and HYBRIDIZE_COMPILE=0 turns it off. fuse: fuse the projections
    of the model (and the draft) that read the same input into one matmul each, for all of prefill and
    decode (`HybridLM.fuse_projections_`: in place, no extra memory, state_dict unchanged; the model
    stays fused afterwards); HYBRIDIZE_FUSE=0 turns it off.

    Returns a `GenerationResult` (tokens, texts, finish_reasons, stats)."""
    params = SamplingParams(temperature, top_k or None, top_p, repetition_penalty)
    V = model.cfg.vocab_size
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prefill_chunk < 1 or check_every < 1:
        raise ValueError("prefill_chunk and check_every must be >= 1")
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    if isinstance(stop, str):
        stop = [stop]
    ids = normalize_prompts(prompts, tokenizer, V)
    eos = resolve_eos(eos_token_id, tokenizer)
    device = next(model.parameters()).device
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, ()).item())
    gen = torch.Generator(device=device).manual_seed(seed)
    out = _Outputs(len(ids), max_new_tokens, eos, stop or [], tokenizer, stream)

    if draft is not None:
        from hybridize.generate.speculative import speculative_generate

        stats = speculative_generate(model, draft, ids, out, params, gen, num_draft_tokens=num_draft_tokens,
                                     prefill_chunk=prefill_chunk, state_dtype=state_dtype,
                                     use_cuda_graph=use_cuda_graph, compile=compile, fuse=fuse)
    else:
        stats = _decode(model, ids, out, params, gen, prefill_chunk=prefill_chunk, check_every=check_every,
                        state_dtype=state_dtype, use_cuda_graph=use_cuda_graph, compile=compile, fuse=fuse)
    texts = [out.text(b) for b in range(len(ids))] if tokenizer is not None else None
    return GenerationResult(tokens=out.tokens, texts=texts, finish_reasons=out.reason, prompt_tokens=ids,
                            stats=stats)


def _seen_mask(ids: list, V: int, device) -> Tensor:
    """(B, V) bool: tokens of each prompt (for the repetition penalty)."""
    seen = torch.zeros(len(ids), V, dtype=torch.bool, device=device)
    for b, p in enumerate(ids):
        seen[b, torch.tensor(p, device=device)] = True
    return seen


def _decode(model, ids: list, out: _Outputs, params: SamplingParams, gen, *, prefill_chunk: int,
            check_every: int, state_dtype, use_cuda_graph, compile="auto", fuse: bool = True) -> GenerationStats:
    device = next(model.parameters()).device
    B, N = len(ids), out.max_new
    max_seqlen = max(len(p) for p in ids) + N
    cache = alloc_cache(model, B, max_seqlen, state_dtype=state_dtype, device=device)
    # fuses the projections (prefill below uses them too), then compiles + captures on the empty cache
    runner = StepRunner(model, cache, B, use_cuda_graph, compile, fuse=fuse)

    _sync(device)
    t0 = time.perf_counter()
    prefill_(model, cache, [p[:-1] for p in ids], prefill_chunk=prefill_chunk)
    seen = _seen_mask(ids, model.cfg.vocab_size, device) if params.uses_history else None
    tok = torch.tensor([p[-1] for p in ids], device=device)
    _sync(device)
    t1 = time.perf_counter()

    # host looks at the tokens every `every` steps: per token when streaming, never when nothing to check
    every = 1 if out.stream is not None else (check_every if (out.eos or out.stop) else max(N, 1))
    buf = torch.empty(B, N, dtype=torch.long, device=device)
    steps, flushed = 0, 0
    greedy = params.greedy and seen is None           # argmax inside the graph
    while steps < N and not out.all_done:
        if greedy:
            tok = runner.greedy_step(tok)
        else:
            tok = sample(runner(tok), params, gen, seen)
        buf[:, steps] = tok
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        steps += 1
        if steps - flushed >= every or steps == N:
            block = buf[:, flushed:steps].tolist()          # the host sync
            for b in range(B):
                out.extend(b, block[b])
            flushed = steps
    _sync(device)
    t2 = time.perf_counter()
    new = sum(len(t) for t in out.tokens)
    dec = t2 - t1
    return GenerationStats(batch_size=B, prompt_tokens=sum(len(p) for p in ids), new_tokens=new,
                           prefill_s=t1 - t0, decode_s=dec, steps=steps,
                           tokens_per_s=new / dec if dec > 0 else 0.0,
                           ms_per_step=1e3 * dec / max(steps, 1), cuda_graph=runner.graph is not None,
                           compiled=runner.compiled, fused=runner.fused,
                           gemv_shapes=sum(c is not None for c in runner.gemv["shapes"].values()))
