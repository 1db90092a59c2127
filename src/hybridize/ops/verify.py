"""Speculative verification for SSD (Mamba-2 / discrete Mamba-2) layers — Algorithm 2 of
Mamba-in-the-Llama (arXiv 2408.15237).

A recurrent target layer verifying K drafted tokens must produce K outputs, but keeping K states
(one per possible acceptance count) would cost K state writes. Algorithm 2 instead keeps

* the state at the last *verified* token, and
* the per-step inputs of the last round (x, dt, B — and log_decay for discrete Mamba-2),

and after j tokens of a round are accepted advances the cached state by those j steps *lazily*, at the
start of the next round's verification, in the same kernel. Per round the state is read once and
written once, whatever K is.

API (every function has a plain-PyTorch ``*_reference`` beside it, built from
:func:`hybridize.ops.ssd.reference.ssd_step` on a cloned state; the dispatching names run the Triton
kernels of :mod:`hybridize.ops.ssd.triton_step` on CUDA):

* ``ssd_verify(x (B,K,H,P), dt (B,K,H), A (H,), Bm (B,K,G,N), Cm (B,K,G,N), state (B,H,P,N), *, D, z,
  dt_bias, dt_softplus, dt_limit, log_decay, advance_prev=None)`` → y (B,K,H,P): the outputs of K
  sequential ``ssd_step`` calls from ``state``, which is NOT modified — unless
  ``advance_prev=(PendingSteps(x, dt, Bm[, log_decay]) of the previous round, accepted (B,) int)`` is
  given: then the state is first advanced IN PLACE by each row's accepted prefix, and the K outputs
  are computed from the advanced state (the fused lazy advance).
* ``ssd_advance(state, x, dt, A, Bm, accepted, *, dt_bias, dt_softplus, dt_limit, log_decay)``:
  advance ``state`` in place by each row's accepted count (0..K) of the inputs (B,K,...).

A round of speculative decoding for one layer, with T = K + 1 tokens verified per round::

    pending = None
    while ...:
        y = ssd_verify(x, dt, A, Bm, Cm, state, ..., advance_prev=pending)   # T outputs, no state copy
        n = ...                                             # tokens kept per row, (B,) in [0, T]
        pending = (PendingSteps(x, dt, Bm), n)              # advanced inside the next call
    prev, n = pending
    ssd_advance(state, prev.x, prev.dt, A, prev.Bm, n, ...)  # flush at the end

bf16/fp16 states: the references round the state after every step (what ``ssd_step`` does); the
kernel keeps the running state in fp32 registers and rounds once, when it stores it — a small,
slightly more accurate difference.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from hybridize.ops._dispatch import use_kernels
from hybridize.ops.ssd.reference import ssd_step

_NO_LIMIT = (0.0, float("inf"))
_KERNEL_MAX_N = 256
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class PendingSteps(NamedTuple):
    """The previous round's per-step inputs: x (B,Kp,H,P), dt (B,Kp,H) raw (the call's dt_bias /
    softplus / limit apply), Bm (B,Kp,G,N), log_decay (B,Kp,H) or None (iff the calls use log_decay).
    Same fields as :class:`hybridize.ops.ssd.triton_step.PendingSteps`."""
    x: Tensor
    dt: Tensor
    Bm: Tensor
    log_decay: Optional[Tensor] = None


def _check(x: Tensor, dt: Tensor, Bm: Tensor, Cm: Optional[Tensor], state: Tensor):
    if x.dim() != 4 or dt.shape != x.shape[:3] or Bm.dim() != 4 or Bm.shape[:2] != x.shape[:2] \
            or (Cm is not None and Cm.shape != Bm.shape):
        got = f"x {tuple(x.shape)}, dt {tuple(dt.shape)}, Bm {tuple(Bm.shape)}"
        got += f", Cm {tuple(Cm.shape)}" if Cm is not None else ""
        raise ValueError(f"ssd_verify: expected x (B,K,H,P), dt (B,K,H), Bm/Cm (B,K,G,N); got {got}")
    Bsz, _, H, P = x.shape
    if tuple(state.shape) != (Bsz, H, P, Bm.shape[-1]):
        raise ValueError(f"ssd_verify: state must be (B,H,P,N) = {(Bsz, H, P, Bm.shape[-1])}, "
                         f"got {tuple(state.shape)}")


# ----------------------------------------------------------------------------- references
def ssd_advance_reference(state: Tensor, x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor,
                          accepted: Tensor, *, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                          dt_limit=_NO_LIMIT, log_decay: Optional[Tensor] = None) -> None:
    """Row b of ``state`` (B,H,P,N) takes the first accepted[b] steps of x (B,K,H,P), dt (B,K,H),
    Bm (B,K,G,N) (log_decay (B,K,H)); in place. accepted (B,) int is clamped to [0, K]."""
    _check(x, dt, Bm, None, state)
    K = x.shape[1]
    n = accepted.to(state.device).long().clamp(0, K)
    for j in range(K):
        rows = n > j                                                   # (B,) rows still advancing
        tmp = state.clone()
        ssd_step(x[:, j], dt[:, j], A, Bm[:, j], Bm[:, j], tmp, dt_bias=dt_bias, dt_softplus=dt_softplus,
                 dt_limit=dt_limit, log_decay=None if log_decay is None else log_decay[:, j])
        state.copy_(torch.where(rows[:, None, None, None], tmp, state))


def _pending(advance_prev):
    prev, accepted = advance_prev
    return PendingSteps(*prev), accepted


def ssd_verify_reference(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, state: Tensor, *,
                         D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                         dt_bias: Optional[Tensor] = None, dt_softplus: bool = False, dt_limit=_NO_LIMIT,
                         log_decay: Optional[Tensor] = None, advance_prev=None) -> Tensor:
    """K sequential ``ssd_step`` calls on a clone of ``state`` → y (B,K,H,P) (x's dtype). With
    ``advance_prev`` the state is first advanced in place (see :func:`ssd_advance_reference`)."""
    _check(x, dt, Bm, Cm, state)
    kw = dict(dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    if advance_prev is not None:
        prev, accepted = _pending(advance_prev)
        ssd_advance_reference(state, prev.x, prev.dt, A, prev.Bm, accepted, log_decay=prev.log_decay, **kw)
    s = state.clone()
    ys = [ssd_step(x[:, k], dt[:, k], A, Bm[:, k], Cm[:, k], s, D=D, z=None if z is None else z[:, k],
                   log_decay=None if log_decay is None else log_decay[:, k], **kw)
          for k in range(x.shape[1])]
    return torch.stack(ys, dim=1) if ys else x.new_empty(x.shape)


# ----------------------------------------------------------------------------- dispatch
def _kernel_ok(x: Tensor, Bm: Tensor, state: Tensor, *tensors) -> bool:
    return (x.dtype in _FLOATS and state.dtype in _FLOATS and 1 <= Bm.shape[-1] <= _KERNEL_MAX_N
            and use_kernels(x, Bm, state, *tensors))


def ssd_verify(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, state: Tensor, *,
               D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
               dt_softplus: bool = False, dt_limit=_NO_LIMIT, log_decay: Optional[Tensor] = None,
               advance_prev=None) -> Tensor:
    """Verify K tokens from the cached state (see the module docstring). x (B,K,H,P), dt (B,K,H),
    A (H,), Bm/Cm (B,K,G,N), state (B,H,P,N), D (H,)|(H,P), z (B,K,H,P), dt_bias (H,),
    log_decay (B,K,H); advance_prev = (PendingSteps | (x, dt, Bm[, log_decay]), accepted (B,)).
    Returns y (B,K,H,P) in x's dtype."""
    _check(x, dt, Bm, Cm, state)
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, log_decay=log_decay,
              advance_prev=advance_prev)
    if _kernel_ok(x, Bm, state, dt, A, Cm, D, z, dt_bias, log_decay):
        from hybridize.ops.ssd.triton_step import ssd_verify_triton
        return ssd_verify_triton(x, dt, A, Bm, Cm, state, **kw)
    return ssd_verify_reference(x, dt, A, Bm, Cm, state, **kw)


def ssd_advance(state: Tensor, x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, accepted: Tensor, *,
                dt_bias: Optional[Tensor] = None, dt_softplus: bool = False, dt_limit=_NO_LIMIT,
                log_decay: Optional[Tensor] = None) -> None:
    """Advance state (B,H,P,N) in place by accepted[b] ∈ [0, K] steps of x (B,K,H,P), dt (B,K,H),
    Bm (B,K,G,N) (log_decay (B,K,H))."""
    _check(x, dt, Bm, None, state)
    kw = dict(dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, log_decay=log_decay)
    if _kernel_ok(x, Bm, state, dt, A, dt_bias, log_decay, accepted):
        from hybridize.ops.ssd.triton_step import ssd_advance_triton
        return ssd_advance_triton(state, x, dt, A, Bm, accepted, **kw)
    return ssd_advance_reference(state, x, dt, A, Bm, accepted, **kw)


__all__ = ["PendingSteps", "ssd_advance", "ssd_advance_reference", "ssd_verify", "ssd_verify_reference"]
