"""SSD — the state-space dual of Mamba-2 (and of MOHAWK's discrete Mamba-2), pure PyTorch.

Semantics (mamba_ssm's ``mamba_chunk_scan_combined``). Per batch row b, head h (group g = h // (H // G)):

    dt_t   = clamp(softplus?(dt_t + dt_bias), *dt_limit)             (default limit (0, inf))
    a_t    = dt_t * A_h            or   log_decay[t, h] when given  (per-step log decay, <= 0)
    h_t    = exp(a_t) * h_{t-1} + dt_t * x_t ⊗ B_t                   h: (P, N)
    y_t    = h_t · C_t + D * x_t
    y_t    = y_t * silu(z_t)                                         when z is given

Documents (``seq_idx``): where a new document starts at t, h_{t-1} is replaced by zeros before the
update above. ``initial_state`` belongs to the document at position 0 only.

Three independent implementations with one signature:

- ``ssd_recurrent`` — the per-step loop; the ground truth.
- ``ssd_quadratic`` — the dual ("attention-like") form: y = (L ∘ C Bᵀ) (dt·x) with the (L, L) decay
  matrix L[t, s] = exp(a_{s+1} + … + a_t) for s <= t in the same document.
- ``ssd_chunked`` — the four-step chunked algorithm of the Mamba-2 paper (what the kernels implement):
  1. intra-chunk outputs (quadratic form inside each chunk),
  2. per-chunk states (state at the chunk end from the chunk's own tokens),
  3. state passing across chunks (a short scan, written as an (n_chunks+1)² decay matrix),
  4. state → output (each chunk reads the state entering it).

Plus ``ssd_step`` (one token, state updated in place) and ``ssd_mixing_matrix`` (the materialised
(B, H, L, L) sequence-mixing matrix, for MOHAWK).

Discrete Mamba-2 passes ``log_decay = -softplus(a_t)`` with ``dt = 1`` (A is then unused and may be
None): ``log_decay`` replaces dt·A as the per-step log decay while dt still multiplies the input.

All forms compute in fp32 and return y in x's dtype; final states are fp32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridize.layers.base import doc_starts

__all__ = ["ssd_recurrent", "ssd_quadratic", "ssd_chunked", "ssd_step", "ssd_mixing_matrix", "segsum"]

_NO_LIMIT = (0.0, float("inf"))   # default dt_limit


# ----------------------------------------------------------------------------- shared preprocessing
def _process_dt(dt: Tensor, dt_bias: Optional[Tensor], dt_softplus: bool, dt_limit) -> Tensor:
    """dt (..., H) → fp32 dt after bias, softplus and clamp to dt_limit. The clamp always runs, as in
    mamba_ssm's kernels and transformers' torch path: even the default (0, inf) zeroes a negative dt."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)   # threshold 20 (linear above), as mamba_ssm
    return dt.clamp(min=float(dt_limit[0]), max=float(dt_limit[1]))


def _log_decay(dt: Tensor, A: Optional[Tensor], log_decay: Optional[Tensor]) -> Tensor:
    """Per-step log decay (..., H) in fp32: log_decay if given, else dt * A."""
    if log_decay is not None:
        return log_decay.float()
    if A is None:
        raise ValueError("ssd: A is required unless log_decay is given")
    return dt * A.float()


def _heads(M: Tensor, H: int) -> Tensor:
    """B or C (..., G, N) → (..., H, N) fp32: head h reads group h // (H // G)."""
    G = M.shape[-2]
    if H % G:
        raise ValueError(f"ssd: number of heads {H} is not a multiple of the number of groups {G}")
    return M.float().repeat_interleave(H // G, dim=-2)


def _skip_and_gate(y: Tensor, x: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    """y (fp32, (..., H, P)) + D x, then * silu(z); cast to x.dtype."""
    if D is not None:
        Df = D.float()
        y = y + x.float() * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def segsum(a: Tensor) -> Tensor:
    """a (..., T) → (..., T, T) with out[..., t, s] = a[s+1] + … + a[t] for s <= t, -inf above the diagonal.

    Built by a masked cumulative sum rather than cumsum differences, so long sums of large negative
    values do not lose the small ones to cancellation.
    """
    T = a.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=a.device)
    x = a[..., :, None].expand(*a.shape, T)               # x[..., t, s] = a[t]
    x = x.masked_fill(~torch.tril(ones, diagonal=-1), 0.0)  # keep t > s
    out = torch.cumsum(x, dim=-2)                          # sum over s < k <= t
    return out.masked_fill(~torch.tril(ones, diagonal=0), -math.inf)


def _same_doc(seq_idx: Tensor) -> Tensor:
    """(B, L) → (B, L, L) bool: tokens t and s belong to the same document."""
    return seq_idx[:, :, None] == seq_idx[:, None, :]


def _check(x: Tensor, dt: Tensor, Bm: Tensor, Cm: Tensor):
    if x.dim() != 4 or dt.shape != x.shape[:3] or Bm.dim() != 4 or Cm.shape != Bm.shape \
            or Bm.shape[:2] != x.shape[:2]:
        raise ValueError(f"ssd: expected x (B,L,H,P), dt (B,L,H), Bm/Cm (B,L,G,N); got x {tuple(x.shape)}, "
                         f"dt {tuple(dt.shape)}, Bm {tuple(Bm.shape)}, Cm {tuple(Cm.shape)}")


# ----------------------------------------------------------------------------- recurrent (ground truth)
def _update(h: Tensor, x: Tensor, dt: Tensor, a: Tensor, Bh: Tensor) -> Tensor:
    """One recurrence step in fp32. h (B,H,P,N); x (B,H,P); dt, a (B,H); Bh (B,H,N)."""
    return torch.exp(a)[..., None, None] * h + (dt[..., None] * x)[..., None] * Bh[..., None, :]


def ssd_recurrent(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, *, chunk_size: int = 64,
                  D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                  dt_softplus: bool = False, dt_limit=_NO_LIMIT, initial_state: Optional[Tensor] = None,
                  seq_idx: Optional[Tensor] = None, return_final_state: bool = False,
                  log_decay: Optional[Tensor] = None):
    """Per-step loop (chunk_size is accepted for signature compatibility and ignored).

    x (B,L,H,P), dt (B,L,H), A (H,), Bm/Cm (B,L,G,N), D (H,)|(H,P), z (B,L,H,P), dt_bias (H,),
    initial_state (B,H,P,N), seq_idx (B,L), log_decay (B,L,H).
    Returns y (B,L,H,P) in x.dtype [, final_state (B,H,P,N) fp32].
    """
    _check(x, dt, Bm, Cm)
    Bsz, L, H, P = x.shape
    N = Bm.shape[-1]
    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit)
    a = _log_decay(dtp, A, log_decay)
    xf, Bh, Ch = x.float(), _heads(Bm, H), _heads(Cm, H)
    h = (initial_state.float() if initial_state is not None
         else xf.new_zeros(Bsz, H, P, N))
    starts = doc_starts(seq_idx)
    ys = []
    for t in range(L):
        if starts is not None:
            # a new document forgets everything before it
            h = h * (~starts[:, t]).to(h.dtype)[:, None, None, None]
        h = _update(h, xf[:, t], dtp[:, t], a[:, t], Bh[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, dim=1) if L else xf.new_zeros(Bsz, 0, H, P)
    y = _skip_and_gate(y, x, D, z)
    return (y, h) if return_final_state else y


def step_head_reps(x: Tensor, dt: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor, A: Optional[Tensor] = None,
                   A_log: Optional[Tensor] = None, log_decay: Optional[Tensor] = None):
    """Check ``ssd_step``'s arguments → (H // Hx, H // Gb, H // Gc): head h reads x row h // (H // Hx),
    B group h // (H // Gb), C group h // (H // Gc). Shared by the reference and the kernel."""
    if A is not None and A_log is not None:
        raise ValueError("ssd_step: pass A (H,) or A_log (H,) (then A = -exp(A_log)), not both")
    if A is None and A_log is None and log_decay is None:
        raise ValueError("ssd_step: one of A (H,), A_log (H,) or log_decay (B, H) is required")
    ok = state.dim() == 4 and x.dim() == 3 and Bm.dim() == 3 and Cm.dim() == 3
    if ok:
        Bsz, H, P, N = state.shape
        heads = (x.shape[1], Bm.shape[1], Cm.shape[1])
        ok = (x.shape[0] == Bm.shape[0] == Cm.shape[0] == Bsz and x.shape[2] == P and Bm.shape[2] == N
              and Cm.shape[2] == N and tuple(dt.shape) == (Bsz, H)
              and all(k > 0 and H % k == 0 for k in heads))
    if not ok:
        raise ValueError(
            "ssd_step: expected state (B, H, P, N), x (B, Hx, P), dt (B, H), Bm (B, Gb, N), Cm (B, Gc, N) "
            "with Hx, Gb, Gc each dividing H (head h reads x[:, h // (H // Hx)], Bm[:, h // (H // Gb)], "
            f"Cm[:, h // (H // Gc)]); got state {tuple(state.shape)}, x {tuple(x.shape)}, dt {tuple(dt.shape)}, "
            f"Bm {tuple(Bm.shape)}, Cm {tuple(Cm.shape)}")
    return tuple(H // k for k in heads)


def ssd_step(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, state: Tensor, *,
             D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
             dt_softplus: bool = False, dt_limit=_NO_LIMIT, log_decay: Optional[Tensor] = None,
             A_log: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None, norm_eps: float = 1e-5,
             norm_group: int = 0) -> Tensor:
    """One token. state (B,H,P,N) — updated IN PLACE (copy_, keeping its dtype); x (B,Hx,P),
    Bm (B,Gb,N), Cm (B,Gc,N) with Hx, Gb, Gc dividing H: head h reads x[:, h // (H // Hx)] (also for
    D·x; x rows shared like GQA's repeat_kv), Bm[:, h // (H // Gb)], Cm[:, h // (H // Gc)];
    dt (B,H); A (H,), or A_log (H,) with A = -exp(A_log.float()) (pass A=None), or log_decay (B,H)
    (which replaces dt·A); D (H,)|(H,P), z (B,H,P). Returns y (B,H,P) in x.dtype.

    norm_weight (H·P,): Mamba-2's gated RMSNorm on the gated output (`layers.norm.GatedRMSNorm` with
    norm_before_gate=False), over groups of `norm_group` channels of a head (a divisor of P; 0: P)."""
    x_rep, _, _ = step_head_reps(x, dt, Bm, Cm, state, A, A_log, log_decay)
    H = state.shape[1]
    if A_log is not None:
        A = -torch.exp(A_log.float())
    x = x.repeat_interleave(x_rep, dim=1)        # exact copies, in x's dtype
    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit)
    a = _log_decay(dtp, A, log_decay)
    h = _update(state.float(), x.float(), dtp, a, _heads(Bm, H))
    state.copy_(h.to(state.dtype))
    y = torch.einsum("bhpn,bhn->bhp", h, _heads(Cm, H))
    if norm_weight is None:
        return _skip_and_gate(y, x, D, z)
    y = _skip_and_gate(y, x.float(), D, z)                           # fp32: normalised before the cast
    return group_rms_norm(y, norm_weight, norm_eps, norm_group).to(x.dtype)


def group_rms_norm(y: Tensor, weight: Tensor, eps: float, group: int) -> Tensor:
    """y (B,H,P) fp32 normalised over groups of `group` channels of each head (0: P) · weight (H·P,)."""
    Bsz, H, P = y.shape
    group = group or P
    if P % group:
        raise ValueError(f"ssd_step: norm_group {group} must divide the head dim {P}")
    g = y.reshape(Bsz, H, P // group, group)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return g.reshape(Bsz, H, P) * weight.float().reshape(H, P)


# ----------------------------------------------------------------------------- quadratic (dual) form
def _decay_matrix(a: Tensor, seq_idx: Optional[Tensor]) -> Tensor:
    """a (B,L,H) → (B,H,L,L) fp32: exp(a_{s+1} + … + a_t) for s <= t in the same document, else 0."""
    decay = torch.exp(segsum(a.transpose(1, 2)))
    if seq_idx is not None:
        decay = decay * _same_doc(seq_idx)[:, None].to(decay.dtype)
    return decay


def _mixing(dtp: Tensor, decay: Tensor, Bh: Tensor, Ch: Tensor) -> Tensor:
    """(B,H,L,L) fp32 with M[t, s] = (C_t · B_s) · decay[t, s] · dt_s (dt folded in, no D).
    dtp (B,L,H); decay (B,H,L,L); Bh, Ch (B,L,H,N)."""
    CB = torch.einsum("bthn,bshn->bhts", Ch, Bh)
    return CB * decay * dtp.transpose(1, 2)[:, :, None, :]


def ssd_quadratic(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, *, chunk_size: int = 64,
                  D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                  dt_softplus: bool = False, dt_limit=_NO_LIMIT, initial_state: Optional[Tensor] = None,
                  seq_idx: Optional[Tensor] = None, return_final_state: bool = False,
                  log_decay: Optional[Tensor] = None):
    """Dual form: materialise the (B,H,L,L) mixing matrix (chunk_size ignored). Same signature and
    shapes as ``ssd_recurrent``. The initial state reaches token t (of the first document) through
    C_t · exp(a_0 + … + a_t) h0."""
    _check(x, dt, Bm, Cm)
    H = x.shape[2]
    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit)
    a = _log_decay(dtp, A, log_decay)
    xf, Bh, Ch = x.float(), _heads(Bm, H), _heads(Cm, H)
    decay = _decay_matrix(a, seq_idx)                            # (B,H,L,L)
    M = _mixing(dtp, decay, Bh, Ch)
    y = torch.einsum("bhts,bshp->bthp", M, xf)
    if initial_state is not None:
        h0 = initial_state.float()
        decay0 = torch.exp(torch.cumsum(a, dim=1))                # (B,L,H): h0 → token t, inclusive
        if seq_idx is not None:
            decay0 = decay0 * (seq_idx == seq_idx[:, :1])[:, :, None].to(decay0.dtype)
        y = y + torch.einsum("bthn,bhpn,bth->bthp", Ch, h0, decay0)
    out = _skip_and_gate(y, x, D, z)
    if not return_final_state:
        return out
    # Final state: the last row of the decay matrix (token s → token L-1), applied to dt·x ⊗ B.
    final = torch.einsum("bhs,bshp,bshn->bhpn", decay[:, :, -1, :], xf * dtp[..., None], Bh)
    if initial_state is not None:
        final = final + decay0[:, -1, :, None, None] * h0
    return out, final


def ssd_mixing_matrix(dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, *, D: Optional[Tensor] = None,
                      dt_bias: Optional[Tensor] = None, dt_softplus: bool = False, dt_limit=_NO_LIMIT,
                      seq_idx: Optional[Tensor] = None, log_decay: Optional[Tensor] = None) -> Tensor:
    """The materialised sequence-mixing matrix M (B,H,L,L) fp32 with

        y[b, t, h, :] = sum_s M[b, h, t, s] · x[b, s, h, :]

    (dt folded in; a per-head D (H,) is added on the diagonal; no z gate, no initial state).
    A per-channel D (H,P) cannot be written as a per-head matrix: add D·x yourself."""
    if D is not None and D.dim() != 1:
        raise ValueError("ssd_mixing_matrix: D must be per-head (H,); a (H, P) D is not a per-head matrix — "
                         "pass D=None and add D * x separately")
    H = dt.shape[-1]
    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit)
    a = _log_decay(dtp, A, log_decay)
    M = _mixing(dtp, _decay_matrix(a, seq_idx), _heads(Bm, H), _heads(Cm, H))
    if D is not None:
        L = M.shape[-1]
        M = M + torch.diag_embed(D.float()[:, None].expand(H, L))[None]
    return M


# ----------------------------------------------------------------------------- chunked (the kernel's algorithm)
def ssd_chunked(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, *, chunk_size: int = 64,
                D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                dt_softplus: bool = False, dt_limit=_NO_LIMIT, initial_state: Optional[Tensor] = None,
                seq_idx: Optional[Tensor] = None, return_final_state: bool = False,
                log_decay: Optional[Tensor] = None):
    """Chunked SSD (Mamba-2 paper, §6). Same signature and shapes as ``ssd_recurrent``; L need not be
    a multiple of chunk_size (padded internally with tokens that neither decay nor write).

    Indices below: c chunk, l/s positions in a chunk (Q = chunk_size), h head, p head dim, n state.
    """
    _check(x, dt, Bm, Cm)
    Bsz, L, H, P = x.shape
    N = Bm.shape[-1]
    Q = int(chunk_size)
    if Q <= 0:
        raise ValueError(f"ssd_chunked: chunk_size must be positive, got {chunk_size}")
    nc = max(1, -(-L // Q))
    pad = nc * Q - L

    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit)
    a = _log_decay(dtp, A, log_decay)                      # (B,L,H)
    xdt = x.float() * dtp[..., None]                       # dt multiplies the input
    Bh, Ch = _heads(Bm, H), _heads(Cm, H)
    # Padding tokens: a = 0 (no decay) and xdt = 0 (no write), so the state after the last chunk is
    # the state after the last real token. They continue the last document.
    a = F.pad(a, (0, 0, 0, pad))
    xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
    Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))
    Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
    xdt = xdt.reshape(Bsz, nc, Q, H, P)
    Bh = Bh.reshape(Bsz, nc, Q, H, N)
    Ch = Ch.reshape(Bsz, nc, Q, H, N)
    a = a.reshape(Bsz, nc, Q, H).permute(0, 3, 1, 2)       # (B,H,c,l)
    cs = torch.cumsum(a, dim=-1)                           # within-chunk inclusive cumsum
    if seq_idx is not None:
        sid = torch.cat([seq_idx, seq_idx[:, -1:].expand(Bsz, pad)], dim=1)  # padding: last document
        sid = sid.reshape(Bsz, nc, Q)                      # (B,c,l)
        doc_end = sid[:, :, -1]                            # document at each chunk end
        # document the state entering chunk c belongs to (chunk 0: the initial state's, i.e. token 0's)
        doc_in = torch.cat([seq_idx[:, :1], doc_end[:, :-1]], dim=1)

    # 1. intra-chunk (diagonal blocks): quadratic form inside each chunk
    decay = torch.exp(segsum(a))                           # (B,H,c,l,s)
    if seq_idx is not None:
        decay = decay * (sid[:, :, :, None] == sid[:, :, None, :])[:, None].to(decay.dtype)
    scores = torch.einsum("bclhn,bcshn->bhcls", Ch, Bh) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. per-chunk states: state at each chunk end from the chunk's own tokens (zero entering state);
    #    only tokens of the chunk's last document survive to its end.
    decay_to_end = torch.exp(cs[..., -1:] - cs)            # (B,H,c,l)
    if seq_idx is not None:
        decay_to_end = decay_to_end * (sid == doc_end[:, :, None])[:, None].to(decay_to_end.dtype)
    chunk_states = torch.einsum("bhcl,bclhn,bclhp->bchpn", decay_to_end, Bh, xdt)

    # 3. state passing. Boundary 0 is before chunk 0 (the initial state), boundary i the end of
    #    chunk i-1. The state at boundary j reaches boundary i > j with decay exp(sum of the chunk
    #    log decays in between), unless a document starts in one of those chunks.
    h0 = initial_state.float() if initial_state is not None else xdt.new_zeros(Bsz, H, P, N)
    states = torch.cat([h0[:, None], chunk_states], dim=1)                 # (B,c+1,H,P,N)
    chunk_decay = F.pad(cs[..., -1], (1, 0))                               # (B,H,c+1)
    passing = torch.exp(segsum(chunk_decay))                               # (B,H,i,j)
    if seq_idx is not None:
        breaks = F.pad((doc_end != doc_in).long(), (1, 0)).cumsum(dim=1)  # (B,c+1)
        alive = breaks[:, :, None] == breaks[:, None, :]                   # no document start in (j, i]
        passing = passing * alive[:, None].to(passing.dtype)
    boundary = torch.einsum("bhij,bjhpn->bihpn", passing, states)
    entering, final = boundary[:, :-1], boundary[:, -1]                    # (B,c,H,P,N), (B,H,P,N)

    # 4. state → output: each token reads the state entering its chunk, decayed up to it, if it is
    #    still in that state's document.
    decay_from_start = torch.exp(cs)                                       # (B,H,c,l)
    if seq_idx is not None:
        decay_from_start = decay_from_start * (sid == doc_in[:, :, None])[:, None].to(decay_from_start.dtype)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, entering, decay_from_start)

    y = (y_diag + y_off).reshape(Bsz, nc * Q, H, P)[:, :L]
    out = _skip_and_gate(y, x, D, z)
    return (out, final) if return_final_state else out
