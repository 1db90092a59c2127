"""Mamba-1's selective scan, pure PyTorch (semantics of mamba_ssm's `selective_scan_ref`).

Per channel c and state index n (everything in fp32):

    delta_t = softplus(delta_t + delta_bias)            (bias / softplus optional)
    h_t[c, n] = exp(delta_t[c] * A[c, n]) * h_{t-1}[c, n] + delta_t[c] * B_t[g(c), n] * u_t[c]
    y_t[c]    = sum_n C_t[g(c), n] * h_t[c, n] + D[c] * u_t[c]
    y_t[c]   *= silu(z_t[c])                             (gate optional)

B / C are either shared by all channels, `(B, L, N)`, or grouped, `(B, L, G, N)`, where channel c uses
group g(c) = c // (C // G) (contiguous blocks of channels, as in mamba_ssm).

Packed batches: where a document starts (`seq_idx` changes) the state is reset to zero before the
update, so nothing crosses a document boundary. `initial_state` belongs to the document at position 0.

`selective_scan` (sequential loop) is the ground truth. `selective_scan_chunked` computes the same
thing with one materialised (T x T) decay block per chunk of T tokens (exact up to rounding; faster on
CPU for long sequences) and is tested against the loop.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridize.layers.base import doc_starts


def _prep_delta(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    d = delta.float()
    if delta_bias is not None:
        d = d + delta_bias.float()
    return F.softplus(d) if delta_softplus else d


def _expand_groups(M: Tensor, C: int, grouped: bool) -> Tensor:
    """(..., N) → (..., 1, N) (shared by all channels, broadcasts) or (..., G, N) → (..., C, N):
    channel c gets group c // (C // G)."""
    M = M.float()
    if not grouped:
        return M.unsqueeze(-2)
    G = M.shape[-2]
    if C % G:
        raise ValueError(f"selective_scan: number of channels {C} is not a multiple of the number of B/C groups {G}")
    return M.repeat_interleave(C // G, dim=-2)


def _check(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor):
    Bsz, L, C = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta {tuple(delta.shape)} must have u's shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != C:
        raise ValueError(f"selective_scan: A must be (C={C}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, M in (("Bm", Bm), ("Cm", Cm)):
        if M.shape[:2] != (Bsz, L) or M.shape[-1] != N or M.dim() not in (3, 4):
            raise ValueError(f"selective_scan: {name} must be (B, L, N) or (B, L, G, N) with N={N}, "
                             f"got {tuple(M.shape)}")


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, *,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                   return_final_state: bool = False):
    """Sequential fp32 selective scan (the ground truth).

    u, delta: (B, L, C); A: (C, N) (negative for a decaying state); Bm, Cm: (B, L, N) or (B, L, G, N);
    D: (C,); z: (B, L, C); delta_bias: (C,); initial_state: (B, C, N); seq_idx: (B, L).

    Returns y (B, L, C) in u's dtype and, if requested, the final state (B, C, N) in fp32.
    """
    _check(u, delta, A, Bm, Cm)
    Bsz, L, C = u.shape
    N = A.shape[1]
    uf = u.float()
    dt = _prep_delta(delta, delta_bias, delta_softplus)           # (B, L, C)
    Af = A.float()
    Bx = _expand_groups(Bm, C, Bm.dim() == 4)                     # (B, L, C|1, N)
    Cx = _expand_groups(Cm, C, Cm.dim() == 4)
    starts = doc_starts(seq_idx)
    h = uf.new_zeros(Bsz, C, N) if initial_state is None else initial_state.float()
    ys = []
    for t in range(L):
        if starts is not None:
            h = torch.where(starts[:, t, None, None], torch.zeros_like(h), h)
        dA = torch.exp(dt[:, t, :, None] * Af)                    # (B, C, N)
        h = dA * h + (dt[:, t] * uf[:, t])[:, :, None] * Bx[:, t]
        ys.append((h * Cx[:, t]).sum(-1))                         # (B, C)
    y = torch.stack(ys, dim=1) if L else uf.new_zeros(Bsz, 0, C)
    if D is not None:
        y = y + uf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, h) if return_final_state else y


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, *,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                           delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                           initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                           return_final_state: bool = False, chunk_size: int = 16):
    """Same contract as `selective_scan`; processes `chunk_size` tokens at a time.

    Within a chunk, with cum_t = sum_{k<=t} delta_k * A (per channel and state index):
        h_t = exp(cum_t) h_prev + sum_{s<=t} exp(cum_t - cum_s) delta_s B_s u_s
    The exponent cum_t - cum_s (s <= t) is never positive, so no overflow (no log-space tricks, no
    division by a decay). Memory per chunk: (B, C, T, T, N) fp32.
    """
    _check(u, delta, A, Bm, Cm)
    Bsz, L, C = u.shape
    N = A.shape[1]
    uf = u.float()
    dt = _prep_delta(delta, delta_bias, delta_softplus)
    Af = A.float()
    Bx = _expand_groups(Bm, C, Bm.dim() == 4).expand(Bsz, L, C, N)
    Cx = _expand_groups(Cm, C, Cm.dim() == 4).expand(Bsz, L, C, N)
    h = uf.new_zeros(Bsz, C, N) if initial_state is None else initial_state.float()
    ys = []
    for s0 in range(0, L, chunk_size):
        s1 = min(s0 + chunk_size, L)
        T = s1 - s0
        cum = torch.cumsum(dt[:, s0:s1, :, None] * Af, dim=1)      # (B, T, C, N)
        x = (dt[:, s0:s1] * uf[:, s0:s1])[..., None] * Bx[:, s0:s1]  # (B, T, C, N)
        causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()
        if seq_idx is None:
            mask = causal.expand(Bsz, T, T)                         # (B, t, s)
            carry = torch.ones(Bsz, T, dtype=torch.bool, device=u.device)
        else:
            sid = seq_idx[:, s0:s1]
            mask = causal & (sid[:, :, None] == sid[:, None, :])
            # the carried state belongs to the document of token s0-1 (or of position 0 for the
            # initial state)
            prev = seq_idx[:, s0 - 1 if s0 > 0 else 0]
            carry = sid == prev[:, None]
        seg = cum[:, :, None] - cum[:, None, :]                     # (B, t, s, C, N)
        seg = seg.masked_fill(~mask[..., None, None], float("-inf"))
        decay = torch.exp(seg)
        hs = torch.einsum("btscn,bscn->btcn", decay, x)             # (B, T, C, N)
        hs = hs + torch.exp(cum) * h[:, None] * carry[:, :, None, None].to(h.dtype)
        ys.append((hs * Cx[:, s0:s1]).sum(-1))
        h = hs[:, -1]
    y = torch.cat(ys, dim=1) if L else uf.new_zeros(Bsz, 0, C)
    if D is not None:
        y = y + uf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, h) if return_final_state else y


def selective_scan_step(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor, *,
                        D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                        delta_bias: Optional[Tensor] = None, delta_softplus: bool = False) -> Tensor:
    """One token. u, delta: (B, C); Bm, Cm: (B, N) or (B, G, N); state: (B, C, N), updated in place.

    Returns y (B, C) in u's dtype.
    """
    C = u.shape[-1]
    uf = u.float()
    dt = _prep_delta(delta, delta_bias, delta_softplus)            # (B, C)
    dA = torch.exp(dt[:, :, None] * A.float())
    h = dA * state.float() + (dt * uf)[:, :, None] * _expand_groups(Bm, C, Bm.dim() == 3)
    state.copy_(h.to(state.dtype))
    y = (h * _expand_groups(Cm, C, Cm.dim() == 3)).sum(-1)
    if D is not None:
        y = y + uf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)
