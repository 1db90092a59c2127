"""Causal depthwise 1-D convolution (the short conv of Mamba-1/2 and Griffin), pure PyTorch.

y[b, t, c] = bias[c] + sum_{k=0}^{W-1} weight[c, k] * x[b, t - (W-1) + k, c]
where positions before the start of the current document are zero, and positions before t = 0 come
from `initial_state` (the last W-1 inputs of the previous call) when the token belongs to the
document at position 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor



def _activate(y: Tensor, activation: Optional[str]) -> Tensor:
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"unknown conv activation {activation!r}; expected None or 'silu'")


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                  initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                  activation: Optional[str] = None, return_final_state: bool = False):
    """x: (B, L, C); weight: (C, W); bias: (C,); initial_state: (B, C, W-1).

    Returns y (B, L, C) and, if requested, the final conv state (B, C, W-1): the last W-1 inputs of
    the last document (zeros where that document is shorter than W-1 and did not start at 0).
    """
    Bsz, L, C = x.shape
    W = weight.shape[-1]
    dtype = x.dtype
    if L == 0:   # nothing to mix: the state passes through unchanged
        y = x.new_zeros(Bsz, 0, C)
        if not return_final_state:
            return y
        st = initial_state if initial_state is not None else x.new_zeros(Bsz, C, W - 1)
        return y, st.clone()
    xf = x.float().transpose(1, 2)  # (B, C, L)
    if initial_state is None:
        prev = xf.new_zeros(Bsz, C, W - 1)
    else:
        prev = initial_state.float()
    xp = torch.cat([prev, xf], dim=-1)  # (B, C, W-1+L)
    if seq_idx is None:
        windows = xp.unfold(-1, W, 1)  # (B, C, L, W)
    else:
        # mask taps that reach into an earlier document: token t sees tap k (input t-(W-1)+k) only if
        # no document starts in (t-(W-1)+k, t].
        windows = xp.unfold(-1, W, 1).clone()
        # doc id per padded position; state positions belong to the document at position 0
        sid = torch.cat([seq_idx[:, :1].expand(Bsz, W - 1), seq_idx], dim=1)  # (B, W-1+L)
        sid_w = sid.unfold(-1, W, 1)  # (B, L, W)
        same = sid_w == seq_idx[:, :, None]
        windows = windows * same[:, None, :, :].to(windows.dtype)
    y = (windows * weight.float()[None, :, None, :]).sum(-1)  # (B, C, L)
    if bias is not None:
        y = y + bias.float()[None, :, None]
    y = _activate(y, activation).transpose(1, 2).to(dtype)
    if not return_final_state:
        return y
    final = xp[..., -(W - 1):] if W > 1 else xp[..., :0]
    if seq_idx is not None and W > 1:
        sid = torch.cat([seq_idx[:, :1].expand(Bsz, W - 1), seq_idx], dim=1)[:, -(W - 1):]
        final = final * (sid == seq_idx[:, -1:])[:, None, :].to(final.dtype)
    return y, final.to(initial_state.dtype if initial_state is not None else dtype).contiguous()


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = None) -> Tensor:
    """One step. x: (B, C); conv_state: (B, C, W-1), updated in place. Returns y (B, C)."""
    W = weight.shape[-1]
    window = torch.cat([conv_state.float(), x.float()[:, :, None]], dim=-1)  # (B, C, W)
    y = (window * weight.float()[None]).sum(-1)
    if bias is not None:
        y = y + bias.float()
    if W > 1:
        conv_state.copy_(window[:, :, 1:].to(conv_state.dtype))
    return _activate(y, activation).to(x.dtype)
