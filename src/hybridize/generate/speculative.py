"""Speculative decoding with any HybridLM target (Transformer, pure recurrent or hybrid) and any smaller
HybridLM draft sharing its vocabulary (Leviathan et al. 2023, Chen et al. 2023; the state handling of
Algorithm 2 of Mamba-in-the-Llama, arXiv 2408.15237).

Invariant between rounds: both models have consumed every token of row b except the last one, ``x0[b]``.
One round, for all rows at once (K = num_draft_tokens, T = K + 1):

1. Draft: K + 1 `step`s on x0, d_1 … d_K, drawing d_{s+1} ~ q_s (the last step only consumes d_K so that
   a row that keeps all K drafts needs no catch-up). A `StepHistory` records the draft's recurrent
   states and KV lengths after every step. The draft steps are CUDA-graph replays on GPU.
2. Verify: one target ``forward`` over [x0, d_1 … d_K] with the cache → p_0 … p_K.
3. Accept (per row): d_s with probability min(1, p_{s-1}(d_s) / q_{s-1}(d_s)); j = leading accepts; the
   correction token is drawn from norm(max(0, p_j − q_j)) if j < K, else from p_K (bonus token). The
   output distribution is exactly the target's. Greedy: d_s accepted iff it is argmax p_{s-1}, the
   correction is argmax p_j — the output equals plain greedy decoding token for token.
4. Roll back each row to "consumed x0, d_1 … d_j" (n_b = j_b + 1 tokens; 0 for rows already finished,
   which stay frozen):
   * attention (target and draft): ``lengths -= T - n`` — entries past lengths are ignored and later
     overwritten. Sliding-window rings are allocated with ``window + T`` slots (``alloc_cache``'s
     ``window_slack``): a ring of exactly ``window`` slots would have overwritten, during the T writes,
     tokens that are back inside the window after the rollback. The alternative, snapshotting the ring,
     copies the whole ring every round; T extra slots cost T × (KV bytes per token) once.
   * draft recurrent layers: restore the state recorded after n_b steps (`StepHistory.rewind_`).
   * target recurrent layers, Algorithm 2's idea: keep the state at the last verified token (the state
     object before verification — forward reassigns state tensors instead of writing into them, so
     this "snapshot" is free) plus the mixer's inputs for the T verified positions (captured by a
     forward pre-hook). Rows that accepted everything (n = T) keep the verification's final state;
     the others restart from the snapshot and re-run the mixer alone (not the model) on their first n
     cached inputs: one ``mixer.forward`` per distinct n among those rows.
   Cost of this (naive, unfused) version per round: K + 1 draft steps, one target forward over T
   tokens, and for partially accepted rows a second pass of the target's recurrent mixers over ≤ K
   tokens (Algorithm 2 fuses that pass into the next round's kernel); one host sync per round to read
   the acceptance counts. The target's verification runs eagerly (its attention forward reallocates
   the KV cache, which a CUDA graph cannot replay).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hybridize.generate.cache_ops import StepHistory, alloc_cache, assign_rows, is_kv, select_rows
from hybridize.generate.engine import GenerationStats, StepRunner, _seen_mask, _sync, prefill_
from hybridize.generate.sampling import SamplingParams, draw, probs_from_logits


def check_draft(target, draft) -> None:
    """Raise a ValueError explaining why `draft` cannot draft for `target`."""
    tv, dv = target.cfg.vocab_size, draft.cfg.vocab_size
    if tv != dv:
        raise ValueError(f"draft vocab_size {dv} != target vocab_size {tv}: speculative decoding needs the "
                         "same tokenizer/vocabulary for the draft and the target")
    td, dd = next(target.parameters()).device, next(draft.parameters()).device
    if td != dd:
        raise ValueError(f"draft is on {dd} but the target on {td}; move both to the same device")


# ---------------------------------------------------------------------------- verification
@dataclass
class VerifyContext:
    """What `commit_` needs to roll the target back: T, and per recurrent layer i the state before
    verification and the mixer's inputs (B, T, D)."""
    T: int
    before: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)


@torch.no_grad()
def verify_forward(model, tokens: Tensor, cache) -> tuple:
    """Score tokens (B, T) with the cache (advanced by T; every row at its own position) → (logits
    (B, T, V), VerifyContext)."""
    ctx = VerifyContext(tokens.shape[1])
    hooks = []
    for i, (blk, st) in enumerate(zip(model.layers, cache.states)):
        if is_kv(st):
            continue

        def keep(mod, args, kwargs, i=i):
            state = args[1] if len(args) > 1 else kwargs["state"]
            ctx.inputs[i] = args[0]
            ctx.before[i] = dataclasses.replace(state)   # shallow: forward reassigns, never writes in place
        hooks.append(blk.mixer.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        logits = model(tokens, cache=cache).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, ctx


@torch.no_grad()
def commit_(model, cache, ctx: VerifyContext, n: Tensor, n_host: list) -> None:
    """Keep the first n[b] ∈ [0, T] verified tokens of row b, drop the rest (see the module docstring).
    n_host: the same counts on the host."""
    T = ctx.T
    for st in cache.states:
        if is_kv(st):
            st.lengths = st.lengths - (T - n)
    groups: dict = {}
    for b, v in enumerate(n_host):
        if v < T:
            groups.setdefault(v, []).append(b)
    if not groups:
        return
    dev = n.device
    groups = {v: torch.tensor(rows, device=dev) for v, rows in groups.items()}
    for i, before in ctx.before.items():
        st, mixer = cache.states[i], model.layers[i].mixer
        for v, rows in groups.items():
            sub = select_rows(before, rows)
            if v > 0:
                _, sub = mixer(ctx.inputs[i].index_select(0, rows)[:, :v], sub, output_state=True)
            assign_rows(st, rows, sub)


def _cumulative_seen(seen: Tensor, drafts: Tensor) -> Tensor:
    """seen (B, V), drafts (B, K) → (B, K + 1, V): position s has also seen d_1 … d_s."""
    K = drafts.shape[1]
    out = seen[:, None].repeat(1, K + 1, 1)
    for s in range(1, K + 1):
        out[:, s] = out[:, s - 1]
        out[:, s].scatter_(1, drafts[:, s - 1:s], True)
    return out


# ---------------------------------------------------------------------------- the loop
@torch.no_grad()
def speculative_generate(target, draft, ids: list, out, params: SamplingParams, gen: torch.Generator, *,
                         num_draft_tokens: int, prefill_chunk: int, state_dtype, use_cuda_graph
                         ) -> GenerationStats:
    """The speculative decode loop behind `hybridize.generate(..., draft=...)`; fills `out` (the
    engine's `_Outputs`) and returns the stats."""
    check_draft(target, draft)
    K = int(num_draft_tokens)
    if K < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    T = K + 1
    device = next(target.parameters()).device
    B, N = len(ids), out.max_new
    # a row may overshoot max_new by K, and frozen rows still receive T verification writes
    max_seqlen = max(len(p) for p in ids) + N + 2 * T
    tcache = alloc_cache(target, B, max_seqlen, window_slack=T, state_dtype=state_dtype, device=device)
    dcache = alloc_cache(draft, B, max_seqlen, window_slack=T, state_dtype=state_dtype, device=device)
    drunner = StepRunner(draft, dcache, B, use_cuda_graph)
    hist = StepHistory(dcache, T)

    _sync(device)
    t0 = time.perf_counter()
    heads = [p[:-1] for p in ids]
    prefill_(target, tcache, heads, prefill_chunk=prefill_chunk)
    prefill_(draft, dcache, heads, prefill_chunk=prefill_chunk)
    seen = _seen_mask(ids, target.cfg.vocab_size, device) if params.uses_history else None
    x0 = torch.tensor([p[-1] for p in ids], device=device)
    rows = torch.arange(B, device=device)
    _sync(device)
    t1 = time.perf_counter()

    rounds = drafted = accepted = row_rounds = 0
    while not out.all_done:
        active = [not d for d in out.done]
        # 1. draft K tokens (K + 1 steps), recording the draft's state after each step
        hist.record(0)
        tok, dseen, drafts, qs = x0, (seen.clone() if seen is not None else None), [], []
        for s in range(T):
            logits = drunner(tok)
            hist.record(s + 1)
            if s == K:
                break
            q = probs_from_logits(logits, params, dseen)
            tok = q.argmax(-1) if params.greedy else draw(q, gen)
            drafts.append(tok)
            qs.append(q)
            if dseen is not None:
                dseen.scatter_(1, tok[:, None], True)
        D, Q = torch.stack(drafts, 1), torch.stack(qs, 1)                  # (B, K), (B, K, V)

        # 2. verify x0, d_1 … d_K with the target
        logits, ctx = verify_forward(target, torch.cat([x0[:, None], D], 1), tcache)
        P = probs_from_logits(logits, params, _cumulative_seen(seen, D) if seen is not None else None)

        # 3. accept a prefix, then the correction / bonus token at position j
        if params.greedy:
            acc = D == P[:, :K].argmax(-1)
        else:
            pd = P[:, :K].gather(-1, D[..., None])[..., 0]
            qd = Q.gather(-1, D[..., None])[..., 0]
            u = torch.rand(B, K, device=device, generator=gen)
            acc = u * qd < pd                                                # u < p / q, q(d) > 0
        j = acc.long().cumprod(1).sum(1)                                     # (B,) in [0, K]
        pj = P[rows, j]
        if params.greedy:
            new = pj.argmax(-1)
        else:
            resid = (pj - Q[rows, j.clamp(max=K - 1)]).clamp_min(0)
            resid = torch.where((j < K)[:, None], resid, pj)
            # p == q up to rounding makes the residual vanish, but then rejection had probability ~0
            resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, pj)
            new = draw(resid, gen)
        em = torch.cat([D, D[:, :1]], 1).scatter(1, j[:, None], new[:, None])  # row b emits em[b, :j+1]

        # 4. host: emitted tokens (the one sync per round), then roll both models back
        em_h, j_h = em.tolist(), j.tolist()
        n_h = []
        for b in range(B):
            if active[b]:
                out.extend(b, em_h[b][:j_h[b] + 1])
                drafted, accepted, row_rounds = drafted + K, accepted + j_h[b], row_rounds + 1
            n_h.append(j_h[b] + 1 if active[b] else 0)
        n = torch.tensor(n_h, device=device)
        commit_(target, tcache, ctx, n, n_h)
        hist.rewind_(n)
        x0 = torch.where(n > 0, new, x0)
        if seen is not None:
            keep = torch.arange(T, device=device)[None] < n[:, None]
            seen.scatter_(1, torch.where(keep, em, em[:, :1]), True)   # frozen rows' seen no longer matters
        rounds += 1
    _sync(device)
    t2 = time.perf_counter()
    new_tokens = sum(len(t) for t in out.tokens)
    dec = t2 - t1
    return GenerationStats(
        batch_size=B, prompt_tokens=sum(len(p) for p in ids), new_tokens=new_tokens, prefill_s=t1 - t0,
        decode_s=dec, steps=rounds, tokens_per_s=new_tokens / dec if dec > 0 else 0.0,
        ms_per_step=1e3 * dec / max(rounds, 1), cuda_graph=drunner.graph is not None,
        num_draft_tokens=K, drafted=drafted, accepted=accepted,
        acceptance_rate=accepted / drafted if drafted else 0.0,
        mean_tokens_per_round=(accepted + row_rounds) / row_rounds if row_rounds else 0.0)
