"""Speculative decoding with any HybridLM target (Transformer, pure recurrent or hybrid) and any smaller
HybridLM draft sharing its vocabulary (Leviathan et al. 2023, Chen et al. 2023; the state handling of
Algorithm 2 of Mamba-in-the-Llama, arXiv 2408.15237).

Invariant between rounds: both models have consumed every token of row b except the last one, ``x0[b]``.
One round, for all rows at once (K = num_draft_tokens, T = K + 1):

1. Draft: K + 1 `step`s on x0, d_1 … d_K, drawing d_{s+1} ~ q_s (the last step only consumes d_K so that
   a row that keeps all K drafts needs no catch-up). A `StepHistory` records the draft's recurrent
   states and KV lengths after every step. The draft steps are CUDA-graph replays on GPU.
2. Verify: the target consumes [x0, d_1 … d_K] in place (`Verifier.verify`: a fixed-T pass compiled and
   replayed from a CUDA graph on GPU, no host sync) → p_0 … p_K. Per layer kind:
   * attention: one pass over the KV cache writing T entries;
   * Mamba-2 / discrete Mamba-2 (Algorithm 2 of arXiv 2408.15237, `ops.verify.ssd_verify`): one kernel
     first advances the cached SSM state in place by the n_b tokens kept from the *previous* round (the
     lazy advance: their inputs x, dt, B [, log_decay] were kept, not their states), then computes the
     T outputs from the running state in registers, writing no state. The round's inputs (and its T conv
     inputs) replace the pending ones. The conv state is left as it was;
   * other recurrent mixers (Mamba-1, RG-LRU; or ``Verifier(lazy_ssd=False)``): T token steps, recording
     the state after each one ((T + 1) × the state).
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
   * target (`Verifier.commit`, in place, fixed shapes, graph replay): attention ``lengths -= T - n``;
     Mamba-2 / discrete Mamba-2: the conv state (width W ≤ 4) ← the last W-1 columns of [its pre-round
     value, the round's first n_b conv inputs] (a gather; no per-token copies of the conv state), and n
     becomes the pending count that the next verification advances the SSM state by — the SSM state
     is read once and written once per round and never copied: 1× memory, plus T × the per-token
     inputs; other recurrent layers take the state recorded after n_b tokens.
5. When the loop ends, `Verifier.flush` advances the SSD states by the last round's pending counts
   (`ops.verify.ssd_advance`), so the target cache is exactly "consumed every kept token" for whoever
   reads it next. Anything that reads the target cache between rounds must flush first.

Cost per round: K + 1 draft steps (graph replays), one target pass over T tokens in which every
weight matrix is read once (attention / MLP / Mamba-2 projections on all T tokens; each SSD state read and
written once; Mamba-1 / RG-LRU step T times), the acceptance math, and one host sync to read the emitted
tokens.

`verify_forward` / `commit_` are the earlier, forward-based verification (reassigning the states; kept for
callers that want the model's ``forward`` numerics): one ``forward`` over T tokens, and a rollback that
re-runs the recurrent mixers of partially accepted rows (one host sync, one pass per distinct n).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridize.generate.cache_ops import (
    StepHistory,
    _fields,
    alloc_cache,
    assign_rows,
    is_kv,
    select_rows,
    zero_,
)
from hybridize.generate.engine import (
    GenerationStats,
    GraphedProgram,
    StepRunner,
    _seen_mask,
    _sync,
    fuse_for_inference,
    prefill_,
)
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


# ---------------------------------------------------------------------------- fixed-T verification
def _mamba2_fast_ok(mixer, state) -> bool:
    """Whether `_mamba2_tokens` can run this mixer (a `Mamba2Mixer` with the attributes it uses)."""
    if type(mixer).__name__ != "Mamba2Mixer" or set(_fields(state)) != {"conv", "ssm"} \
            or getattr(mixer, "d_conv", 0) < 2:
        return False
    need = ("in_proj", "d_inner", "conv_dim", "nheads", "ngroups", "d_conv", "_conv_weight", "conv1d",
            "_split_xbc", "_A", "_D", "dt_bias", "dt_limit", "norm", "out_proj")
    return all(hasattr(mixer, a) for a in need)


def _ssd_kind(mixer, state):
    """``"mamba2"`` / ``"discrete_mamba2"`` when layer `mixer` (with decode state `state`) can verify with
    Algorithm 2 (`_ssd_lazy_tokens`), else None (→ the recording path)."""
    if set(_fields(state)) != {"conv", "ssm"} or getattr(mixer, "d_conv", 0) < 2 or state.ssm.dim() != 4:
        return None
    name = type(mixer).__name__
    if name == "Mamba2Mixer" and _mamba2_fast_ok(mixer, state):
        return "mamba2"
    need = ("in_proj", "_split_proj", "_split_xbc", "_conv_weight", "conv1d", "_conv_act", "D", "d_inner",
            "n_v_heads", "headdim", "n_qk_heads", "d_state", "out_proj")
    if name == "DiscreteMamba2Mixer" and all(hasattr(mixer, a) for a in need):
        return "discrete_mamba2"
    return None


def _lazy_buffers(mixer, kind: str, state, T: int) -> dict:
    """Algorithm 2's per-layer buffers (batch dim first): the T pending SSD inputs of the last round,
    post-conv x (B, T, H, P), raw dt (B, T, H) (discrete Mamba-2: constant ones), B (B, T, G, N)
    [, log_decay (B, T, H)], and the round's T conv inputs ``xbc`` (B, T, C), in the dtypes the layer
    produces them. `_commit_program` gathers the conv state after n tokens from [the conv state, which
    verification leaves as it was, xbc]: for a width-W conv that is T·C activations per row instead of
    (T + 1) copies of the (C, W-1) conv state, and exact (the conv state holds the same inputs,
    upcast)."""
    Bsz, H, P, N = state.ssm.shape
    act = mixer.in_proj.weight.dtype
    dev = state.ssm.device
    G = mixer.ngroups if kind == "mamba2" else mixer.n_qk_heads   # (Mamba-in-the-Llama: B repeated, = H)
    bufs = {"x": torch.zeros(Bsz, T, H, P, device=dev, dtype=act),
            "B": torch.zeros(Bsz, T, G, N, device=dev, dtype=act),
            "xbc": torch.zeros(Bsz, T, state.conv.shape[1], device=dev, dtype=act)}
    if kind == "mamba2":
        bufs["dt"] = torch.zeros(Bsz, T, H, device=dev, dtype=act)
    else:   # dt = 1 (the decay is log_decay = -softplus(a), fp32 like DiscreteMamba2Mixer.step)
        bufs["dt"] = torch.ones(Bsz, T, H, device=dev, dtype=torch.float32)
        bufs["log_decay"] = torch.zeros(Bsz, T, H, device=dev, dtype=torch.float32)
    return bufs


def _ssd_lazy_tokens(mixer, u: Tensor, st, lz: dict, pending: Tensor) -> Tensor:
    """A Mamba-2 / discrete Mamba-2 layer consumes T tokens with Algorithm 2 (arXiv 2408.15237): one
    `ssd_verify` call first advances ``st.ssm`` in place by the ``pending[b]`` accepted tokens of the
    previous round (whose inputs are in lz; the lazy advance, fused), then computes the T outputs from
    the running state without writing any of the T states. The round's inputs replace lz's pending ones
    (advanced by the next call, or by `Verifier.flush`). The projections run on all T tokens at once
    (weights read once); the conv runs as one causal conv from the cached conv state, which stays as it
    was (``lz["xbc"]`` keeps the conv inputs for `_commit_program`'s gather)."""
    from hybridize.ops import conv1d as conv_ops
    from hybridize.ops import verify as verify_ops

    Bsz, T, _ = u.shape
    discrete = "log_decay" in lz
    if discrete:
        xbc, z, a = mixer._split_proj(mixer.in_proj(u))
        act = mixer._conv_act
    else:
        z, xbc, dt = torch.split(mixer.in_proj(u), [mixer.d_inner, mixer.conv_dim, mixer.nheads], dim=-1)
        act = "silu"
    lz["xbc"].copy_(xbc)
    xc = conv_ops.causal_conv1d(xbc, mixer._conv_weight(), mixer.conv1d.bias, initial_state=st.conv,
                                activation=act)
    xh, Bm, Cm = mixer._split_xbc(xc)
    if discrete:
        log_decay = -F.softplus(a.float())
        prev = verify_ops.PendingSteps(lz["x"], lz["dt"], lz["B"], lz["log_decay"])
        y = verify_ops.ssd_verify(xh, lz["dt"], None, Bm, Cm, st.ssm, D=mixer.D,
                                  z=z.reshape(Bsz, T, mixer.n_v_heads, mixer.headdim), log_decay=log_decay,
                                  advance_prev=(prev, pending))
        lz["log_decay"].copy_(log_decay)
        out = mixer.out_proj(y.reshape(Bsz, T, mixer.d_inner))
    else:
        prev = verify_ops.PendingSteps(lz["x"], lz["dt"], lz["B"])
        y = verify_ops.ssd_verify(xh, dt, mixer._A(), Bm, Cm, st.ssm, D=mixer._D(), dt_bias=mixer.dt_bias,
                                  dt_softplus=True, dt_limit=mixer.dt_limit, advance_prev=(prev, pending))
        lz["dt"].copy_(dt)
        out = mixer.out_proj(mixer.norm(y.reshape(Bsz, T, mixer.d_inner), z))
    # after the call above has read the previous round's inputs
    lz["x"].copy_(xh)
    lz["B"].copy_(Bm)
    return out


def _ssd_flush(mixer, st, lz: dict, pending: Tensor) -> None:
    """Advance ``st.ssm`` in place by the pending accepted tokens of the last round (`ssd_advance`)."""
    from hybridize.ops import verify as verify_ops

    if "log_decay" in lz:
        verify_ops.ssd_advance(st.ssm, lz["x"], lz["dt"], None, lz["B"], pending, log_decay=lz["log_decay"])
    else:
        verify_ops.ssd_advance(st.ssm, lz["x"], lz["dt"], mixer._A(), lz["B"], pending, dt_bias=mixer.dt_bias,
                               dt_softplus=True, dt_limit=mixer.dt_limit)


def _mamba2_tokens(mixer, u: Tensor, st, bufs: dict) -> Tensor:
    """The recording path for a Mamba-2 layer (``Verifier(..., lazy_ssd=False)``): `Mamba2Mixer.step`
    over T tokens with the projections batched (in_proj / out_proj weights read once, not T times) and
    the conv run as one causal conv from the cached conv state; the SSD recurrence steps token by
    token, recording the state after each token in bufs["ssm"][t] (bufs["conv"][t]: the conv state
    after t tokens, a window of [conv state, inputs])."""
    from hybridize.ops import conv1d as conv_ops
    from hybridize.ops import ssd as ssd_ops

    B, T, _ = u.shape
    z, xbc, dt = torch.split(mixer.in_proj(u), [mixer.d_inner, mixer.conv_dim, mixer.nheads], dim=-1)
    W1 = mixer.d_conv - 1
    conv_in = torch.cat([st.conv, xbc.transpose(1, 2).to(st.conv.dtype)], dim=-1)     # (B, C, W-1+T)
    bufs["conv"].copy_(conv_in.unfold(-1, W1, 1).permute(2, 0, 1, 3))              # (T+1, B, C, W-1)
    xc = conv_ops.causal_conv1d(xbc, mixer._conv_weight(), mixer.conv1d.bias, initial_state=st.conv,
                                activation="silu")
    st.conv.copy_(conv_in[..., T:])
    xh, Bm, Cm = mixer._split_xbc(xc)
    A, Dp = mixer._A(), mixer._D()
    bufs["ssm"][0].copy_(st.ssm)
    ys = []
    for t in range(T):
        ys.append(ssd_ops.ssd_step(xh[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], st.ssm, D=Dp,
                                   dt_bias=mixer.dt_bias, dt_softplus=True, dt_limit=mixer.dt_limit))
        bufs["ssm"][t + 1].copy_(st.ssm)
    y = torch.stack(ys, 1)
    return mixer.out_proj(mixer.norm(y.reshape(B, T, mixer.d_inner), z))


def _recurrent_tokens(mixer, u: Tensor, st, bufs: dict) -> Tensor:
    """Any recurrent mixer: T sequential `step`s, recording every state field after each token."""
    for name, buf in bufs.items():
        buf[0].copy_(getattr(st, name))
    ys = []
    for t in range(u.shape[1]):
        ys.append(mixer.step(u[:, t], st))
        for name, buf in bufs.items():
            buf[t + 1].copy_(getattr(st, name))
    return torch.stack(ys, 1)


def _verify_program(model, ids: Tensor, cache, hist: list, lazy: list, pending: Tensor) -> Tensor:
    """ids (B, T) → logits (B, T, V): the target consumes the T tokens of every row in place
    (`HybridLM.step_tokens`). Attention: one pass, rolled back via lengths; SSD layers with lazy[i]:
    Algorithm 2 (`_ssd_lazy_tokens`, advancing by ``pending`` first); other recurrent layers record their
    states after each token into hist[i]. ``pending`` is zeroed at the end: a verify that is not
    followed by a commit keeps no token of the SSD layers' round."""
    def mixer_tokens(i, mixer, u, st):
        if lazy[i] is not None:
            return _ssd_lazy_tokens(mixer, u, st, lazy[i], pending)
        if hist[i] is None:                         # attention: one pass, rolled back via lengths
            return mixer.step_tokens(u, st)
        if _mamba2_fast_ok(mixer, st):
            return _mamba2_tokens(mixer, u, st, hist[i])
        return _recurrent_tokens(mixer, u, st, hist[i])
    logits = model.step_tokens(ids, cache, mixer_tokens=mixer_tokens)
    pending.zero_()
    return logits


def _commit_program(cache, hist: list, lazy: list, pending: Tensor, n: Tensor, T: int) -> None:
    """Keep n[b] ∈ [0, T] of the T verified tokens of row b: KV lengths -= T - n; recorded layers ← the
    recorded state after n[b] tokens; SSD layers on Algorithm 2: conv state ← the last W-1 columns of
    [pre-round conv state, round inputs] after n[b] tokens (a gather), and ``pending`` ← n (the SSM
    state advances in the next verify / `Verifier.flush`). In place, fixed shapes, no host sync."""
    rows = torch.arange(n.shape[0], device=n.device)
    for st, bufs, lz in zip(cache.states, hist, lazy):
        if lz is not None:
            cin = torch.cat([st.conv, lz["xbc"].transpose(1, 2).to(st.conv.dtype)], dim=-1)  # (B, C, W-1+T)
            idx = torch.arange(st.conv.shape[-1], device=n.device) + n[:, None, None]    # (B, 1, W-1)
            st.conv.copy_(cin.gather(-1, idx.expand(-1, cin.shape[1], -1)))
        elif bufs is None:
            st.lengths.sub_(T - n)
        else:
            for name, buf in bufs.items():
                getattr(st, name).copy_(buf[n, rows])
    pending.copy_(n)


class Verifier:
    """Fixed-T speculative verification on the target's cache, without host syncs:

    * ``verify(tokens (B, T)) → logits (B, T, V)``: every row consumes its T tokens in place — attention
      layers in one pass over the KV cache (`Attention.step_tokens`), MLPs and projections on all T
      tokens at once (weights read once); Mamba-2 and discrete Mamba-2 layers by Algorithm 2 of
      arXiv 2408.15237 (`ops.verify.ssd_verify`: the T outputs from the cached SSM state, which is first
      advanced by the previous round's accepted tokens in the same kernel — no T states written or
      kept); other recurrent layers (Mamba-1, RG-LRU, or ``lazy_ssd=False``) step token by token and
      record their state after each token (Mamba-2: projections batched, see `_mamba2_tokens`);
    * ``commit(n (B,))``: keep n[b] ∈ [0, T] tokens of row b (KV lengths, recorded states, SSD conv
      states gathered; SSD states: n becomes the pending count);
    * ``flush()``: advance the SSD states by the pending counts (`ops.verify.ssd_advance`) — after it the
      whole cache is exactly "consumed the kept tokens". Call it before anything else reads the cache
      (`speculative_generate` does, when its loop ends); verify / commit never need it.

    verify and commit are `torch.compile`d and replayed from CUDA graphs on CUDA (`GraphedProgram`;
    static buffers: the returned logits are overwritten by the next call). Built on the empty cache
    (warm-up runs are undone by zeroing it). fuse: fuse the target's projections first
    (`engine.fuse_for_inference`; ``fused`` says whether they are).

    Memory beyond the cache: per SSD layer on Algorithm 2, the round's inputs (T × (x, dt, B) and T conv
    inputs per row) — the SSM state stays 1× (`buffer_bytes`); per recorded layer,
    (T + 1) × its state. ``lazy_layers``: the layers on Algorithm 2; ``rounds``: verify calls."""

    def __init__(self, model, cache, batch_size: int, T: int, use_cuda_graph: Union[bool, str] = "auto",
                 compile: Union[bool, str] = "auto", lazy_ssd: bool = True, fuse: bool = True):
        self.model, self.cache, self.T = model, cache, T
        self.fused = fuse_for_inference(model, fuse)             # before compiling / capturing
        device = next(model.parameters()).device
        self.lazy, self.hist = [], []
        for blk, st in zip(model.layers, cache.states):
            kind = None if is_kv(st) or not lazy_ssd else _ssd_kind(blk.mixer, st)
            self.lazy.append(_lazy_buffers(blk.mixer, kind, st, T) if kind else None)
            self.hist.append(None if is_kv(st) or kind else
                             {name: getattr(st, name).new_zeros((T + 1, *getattr(st, name).shape))
                              for name in _fields(st)})
        self.lazy_layers = [i for i, lz in enumerate(self.lazy) if lz is not None]
        self.pending = torch.zeros(batch_size, dtype=torch.long, device=device)   # accepted, not yet advanced
        self.ids = torch.zeros(batch_size, T, dtype=torch.long, device=device)
        self.n = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.rounds = 0
        kw = dict(device=device, use_cuda_graph=use_cuda_graph, compile=compile)
        lazy_bufs = tuple(t for lz in self.lazy if lz is not None for t in lz.values())
        self._verify = GraphedProgram(_verify_program,
                                      (model, self.ids, cache, self.hist, self.lazy, self.pending),
                                      what="verification", dynamic_cache=cache,
                                      dynamic_tensors=(self.ids, self.n, self.pending) + lazy_bufs, **kw)
        self._commit = GraphedProgram(_commit_program, (cache, self.hist, self.lazy, self.pending, self.n, T),
                                      what="commit", eager_first=False, **kw)
        if self._verify.touched or self._commit.touched:
            self.reset()

    @property
    def graphed(self) -> bool:
        return self._verify.graph is not None

    @property
    def compiled(self) -> bool:
        return self._verify.compiled

    def buffer_bytes(self) -> dict:
        """Bytes the verifier holds beyond the cache: ``pending_inputs`` (SSD layers on Algorithm 2: the
        round's x, dt, B [, log_decay]), ``conv_inputs`` (their round's T conv inputs) and
        ``recorded_states`` ((T + 1) × the state of every recorded layer)."""
        nb = lambda t: t.numel() * t.element_size()
        out = {"pending_inputs": 0, "conv_inputs": 0, "recorded_states": 0}
        for lz, h in zip(self.lazy, self.hist):
            for name, t in (lz or {}).items():
                out["conv_inputs" if name == "xbc" else "pending_inputs"] += nb(t)
            for t in (h or {}).values():
                out["recorded_states"] += nb(t)
        return out

    @torch.no_grad()
    def verify(self, tokens: Tensor) -> Tensor:
        self.ids.copy_(tokens)
        self.rounds += 1
        return self._verify()

    @torch.no_grad()
    def commit(self, n: Tensor) -> None:
        self.n.copy_(n)
        self._commit()

    @torch.no_grad()
    def flush(self) -> None:
        """Bring the SSD layers' states to "consumed every kept token" (eager, in place; a no-op when
        nothing is pending). Later verify calls advance by nothing more, so flushing mid-stream is safe."""
        for i in self.lazy_layers:
            _ssd_flush(self.model.layers[i].mixer, self.cache.states[i], self.lazy[i], self.pending)
        self.pending.zero_()

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the cache and drop any pending round (e.g. after the warm-up runs)."""
        zero_(self.cache)
        self.pending.zero_()
        for lz in self.lazy:
            for name, t in (lz or {}).items():
                if name == "dt" and "log_decay" in lz:
                    t.fill_(1.0)                    # discrete Mamba-2: dt is the constant 1
                else:
                    t.zero_()


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
                         num_draft_tokens: int, prefill_chunk: int, state_dtype, use_cuda_graph,
                         compile: Union[bool, str] = "auto", fuse: bool = True) -> GenerationStats:
    """The speculative decode loop behind `hybridize.generate(..., draft=...)`; fills `out` (the
    engine's `_Outputs`) and returns the stats. fuse: fuse the projections of both models first."""
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
    drunner = StepRunner(draft, dcache, B, use_cuda_graph, compile, fuse=fuse)    # both fuse first
    verifier = Verifier(target, tcache, B, T, use_cuda_graph, compile, fuse=fuse)
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
    active, active_dev = None, None
    while not out.all_done:
        if active != [not d for d in out.done]:
            active = [not d for d in out.done]
            active_dev = torch.tensor(active, device=device)
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

        # 2. verify x0, d_1 … d_K with the target (fixed T, in place, graph replay on CUDA)
        logits = verifier.verify(torch.cat([x0[:, None], D], 1))
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

        # 4. roll both models back on the device (rows finished before this round keep n = 0: frozen),
        #    then the one host sync of the round: the emitted tokens
        n = torch.where(active_dev, j + 1, 0)
        verifier.commit(n)
        hist.rewind_(n)
        x0 = torch.where(n > 0, new, x0)
        if seen is not None:
            keep = torch.arange(T, device=device)[None] < n[:, None]
            seen.scatter_(1, torch.where(keep, em, em[:, :1]), True)   # frozen rows' seen no longer matters
        em_h, j_h = em.tolist(), j.tolist()
        for b in range(B):
            if active[b]:
                out.extend(b, em_h[b][:j_h[b] + 1])
                drafted, accepted, row_rounds = drafted + K, accepted + j_h[b], row_rounds + 1
        rounds += 1
    # the SSD layers of the target still owe the last round's accepted tokens (Algorithm 2's lazy
    # advance): flush so that the target cache is exactly "consumed every kept token" for any reader
    verifier.flush()
    _sync(device)
    t2 = time.perf_counter()
    new_tokens = sum(len(t) for t in out.tokens)
    dec = t2 - t1
    return GenerationStats(
        batch_size=B, prompt_tokens=sum(len(p) for p in ids), new_tokens=new_tokens, prefill_s=t1 - t0,
        decode_s=dec, steps=rounds, tokens_per_s=new_tokens / dec if dec > 0 else 0.0,
        ms_per_step=1e3 * dec / max(rounds, 1), cuda_graph=drunner.graph is not None and verifier.graphed,
        compiled=drunner.compiled and verifier.compiled, fused=drunner.fused and verifier.fused,
        num_draft_tokens=K, drafted=drafted, accepted=accepted,
        acceptance_rate=accepted / drafted if drafted else 0.0,
        mean_tokens_per_round=(accepted + row_rounds) / row_rounds if row_rounds else 0.0)
