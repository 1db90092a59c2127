"""Discrete Mamba-2 mixer (MOHAWK / Phi-Mamba, Llamba), following goombalab/phi-mamba
``modules/mixers/discrete_mamba2.py`` (also cartesia-ai/edge ``Llamba/mixers/discrete_mamba2.py``).

Parameter names match those checkpoints: ``in_proj.weight``, ``z_bias`` (d_inner,) (only when
bias=False; with bias=True the in_proj bias plays its role), ``conv1d.weight`` (C, 1, W),
``conv1d.bias``, ``D`` (n_v_heads,), ``out_proj.weight``.

Sizes: d_inner = cfg.d_inner or expand * hidden_size, H = n_v_heads, P = headdim = d_inner / H,
G = n_qk_heads, N = d_state, conv_dim = d_inner + 2 G N. in_proj output rows:

    [0, d_inner)                                   x   (H heads of P)      ┐
    [d_inner, d_inner + G N)                       B   (G heads of N)      │ xBC: causal conv
    [d_inner + G N, d_inner + 2 G N)               C   (G heads of N)      ┘
    [conv_dim, conv_dim + d_inner)                 z   (gate)
    [conv_dim + d_inner, conv_dim + d_inner + H)   a   ("A_log": per-head, per-step decay logit)

Per step and head (v-head h reads qk-head h // (H / G)):

    h_t = exp(-softplus(a_t)) h_{t-1} + x_t ⊗ B_t,   y_t = h_t · C_t + D x_t
    out = out_proj(y * silu(z + z_bias))            (no norm, no dt: the SSD op runs with
                                                     log_decay = -softplus(a), dt = 1)

The conv activation: the released Phi-Mamba / Llamba checkpoints use ``activation="identity"``
(no activation after the conv), the default of ``DiscreteMamba2Config.activation``; "silu" is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridize.config import DiscreteMamba2Config
from hybridize.layers.base import Mixer, MixerState
from hybridize.ops import conv1d as conv_ops
from hybridize.ops import ssd as ssd_ops
from hybridize.ops.gemv import fused_linear


@dataclass
class DiscreteMamba2State(MixerState):
    """conv: (B, conv_dim, W-1) — the last W-1 pre-conv xBC inputs; ssm: (B, H, P, N) (fp32 by default)."""
    conv: Tensor
    ssm: Tensor


@dataclass
class _SSMInputs:
    """x (B,L,H,P) post-conv value heads (the ``v`` of ``mixing_matrix``); Bm, Cm (B,L,G,N);
    log_decay (B,L,H) = -softplus(a); z (B,L,d_inner) gate (z_bias included); conv_state or None."""
    x: Tensor
    Bm: Tensor
    Cm: Tensor
    log_decay: Tensor
    z: Tensor
    conv_state: Optional[Tensor]


class DiscreteMamba2Mixer(Mixer):
    """in_proj → causal conv → SSD with per-step decay exp(-softplus(a_t)) → D skip → silu(z) gate →
    out_proj. See the module docstring for the layout."""

    kind = "discrete_mamba2"

    def __init__(self, hidden_size: int, cfg: DiscreteMamba2Config, layer_idx: int = 0):
        super().__init__()
        self.hidden_size = hidden_size
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.d_inner = cfg.d_inner or cfg.expand * hidden_size
        self.n_v_heads = cfg.n_v_heads
        self.n_qk_heads = cfg.n_qk_heads
        self.d_state = cfg.d_state
        self.d_conv = cfg.d_conv
        self.chunk_size = cfg.chunk_size
        if self.d_inner % self.n_v_heads:
            raise ValueError(f"DiscreteMamba2Mixer: d_inner {self.d_inner} is not a multiple of n_v_heads "
                             f"{self.n_v_heads}")
        if self.n_v_heads % self.n_qk_heads:
            raise ValueError(f"DiscreteMamba2Mixer: n_v_heads {self.n_v_heads} is not a multiple of n_qk_heads "
                             f"{self.n_qk_heads}")
        self.headdim = self.d_inner // self.n_v_heads
        self.activation = cfg.activation
        if self.activation not in ("silu", "swish", "identity", None):
            raise ValueError(f"DiscreteMamba2Mixer: activation {self.activation!r}; use 'identity' or 'silu'")
        self._conv_act = None if self.activation in ("identity", None) else "silu"

        self.conv_dim = self.d_inner + 2 * self.n_qk_heads * self.d_state
        self.in_proj = nn.Linear(hidden_size, self.conv_dim + self.d_inner + self.n_v_heads, bias=cfg.bias)
        # Phi-Mamba keeps a separate z bias when the projections have none
        self.z_bias = nn.Parameter(torch.zeros(self.d_inner)) if not cfg.bias else None
        # nn.Conv1d for its (C, 1, W) parameter layout; the op hybridize.ops.conv1d computes
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=self.d_conv, groups=self.conv_dim,
                                padding=self.d_conv - 1, bias=cfg.conv_bias)
        self.D = nn.Parameter(torch.ones(self.n_v_heads))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, hidden_size, bias=cfg.bias)

    # ------------------------------------------------------------------ helpers
    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight[:, 0, :]

    def _split_proj(self, proj: Tensor):
        xbc, z, a = torch.split(proj, [self.conv_dim, self.d_inner, self.n_v_heads], dim=-1)
        if self.z_bias is not None:
            z = z + self.z_bias
        return xbc, z, a

    def _split_xbc(self, xbc: Tensor):
        """(..., conv_dim) → x (..., H, P), Bm (..., G, N), Cm (..., G, N)."""
        GN = self.n_qk_heads * self.d_state
        x, Bm, Cm = torch.split(xbc, [self.d_inner, GN, GN], dim=-1)
        lead = xbc.shape[:-1]
        return (x.reshape(*lead, self.n_v_heads, self.headdim),
                Bm.reshape(*lead, self.n_qk_heads, self.d_state),
                Cm.reshape(*lead, self.n_qk_heads, self.d_state))

    def _ssm_inputs(self, u: Tensor, conv_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                    return_conv_state: bool = False) -> _SSMInputs:
        xbc, z, a = self._split_proj(self.in_proj(u))
        res = conv_ops.causal_conv1d(xbc, self._conv_weight(), self.conv1d.bias, initial_state=conv_state,
                                     seq_idx=seq_idx, activation=self._conv_act,
                                     return_final_state=return_conv_state)
        xbc, new_conv = res if return_conv_state else (res, None)
        x, Bm, Cm = self._split_xbc(xbc)
        return _SSMInputs(x=x, Bm=Bm, Cm=Cm, log_decay=-F.softplus(a.float()), z=z, conv_state=new_conv)

    # ------------------------------------------------------------------ interface
    def init_state(self, batch_size: int, *, max_seqlen: Optional[int] = None, device=None,
                   dtype=None) -> DiscreteMamba2State:
        device = device if device is not None else self.D.device
        dtype = dtype or torch.float32
        return DiscreteMamba2State(
            conv=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.n_v_heads, self.headdim, self.d_state, device=device, dtype=dtype))

    def forward(self, x: Tensor, state: Optional[DiscreteMamba2State] = None, *,
                seq_idx: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                output_state: bool = False):
        """x (B, L, D) → (y (B, L, D), state or None). position_ids are unused."""
        Bsz, L, _ = x.shape
        if state is None and output_state:
            state = self.init_state(Bsz, device=x.device)
        inp = self._ssm_inputs(x, state.conv if state is not None else None, seq_idx,
                               return_conv_state=state is not None)
        res = ssd_ops.ssd_chunked(
            inp.x, torch.ones_like(inp.log_decay), None, inp.Bm, inp.Cm, chunk_size=self.chunk_size, D=self.D,
            z=inp.z.reshape(Bsz, L, self.n_v_heads, self.headdim),
            initial_state=state.ssm if state is not None else None, seq_idx=seq_idx,
            return_final_state=state is not None, log_decay=inp.log_decay)
        y, final = res if state is not None else (res, None)
        out = self.out_proj(y.reshape(Bsz, L, self.d_inner))
        if state is not None:
            state.conv = inp.conv_state.to(state.conv.dtype)
            state.ssm = final.to(state.ssm.dtype)
        return out, state

    step_fuses_norm = True

    def step(self, x: Tensor, state: DiscreteMamba2State, norm: Optional[nn.Module] = None,
             residual: bool = False) -> Tensor:
        """One token x (B, D) → y (B, D), of ``norm(x)`` when a norm is given (x + y with `residual`; at
        batch-1 decode both inside the GEMVs); state.conv and state.ssm are updated in place."""
        Bsz = x.shape[0]
        proj = fused_linear(x, self.in_proj.weight, self.in_proj.bias, norm=norm) if norm is not None \
            else self.in_proj(x)
        xbc, z, a = self._split_proj(proj)
        xbc = conv_ops.causal_conv1d_update(xbc, state.conv, self._conv_weight(), self.conv1d.bias,
                                            activation=self._conv_act)
        xh, Bm, Cm = self._split_xbc(xbc)
        log_decay = -F.softplus(a.float())
        y = ssd_ops.ssd_step(xh, torch.ones_like(log_decay), None, Bm, Cm, state.ssm, D=self.D,
                             z=z.reshape(Bsz, self.n_v_heads, self.headdim), log_decay=log_decay)
        y = y.reshape(Bsz, self.d_inner)
        if residual:
            return fused_linear(y, self.out_proj.weight, self.out_proj.bias, residual=x)
        return self.out_proj(y)

    def mixing_matrix(self, x: Tensor, *, seq_idx: Optional[Tensor] = None) -> Tensor:
        """M (B, H, L, L) fp32 (H = n_v_heads) with y_pre[:, t, h] = sum_s M[:, h, t, s] v[:, s, h],
        where v is the post-conv x per value head and y_pre the SSD output before the z gate,
        D term included on the diagonal."""
        inp = self._ssm_inputs(x, None, seq_idx)
        return ssd_ops.ssd_mixing_matrix(torch.ones_like(inp.log_decay), None, inp.Bm, inp.Cm, D=self.D,
                                         seq_idx=seq_idx, log_decay=inp.log_decay)

    def extra_repr(self) -> str:
        return (f"d_inner={self.d_inner}, n_v_heads={self.n_v_heads}, n_qk_heads={self.n_qk_heads}, "
                f"d_state={self.d_state}, activation={self.activation}")
