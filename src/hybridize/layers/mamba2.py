"""Mamba-2 mixer (standard layout, and the Mamba-in-the-Llama layout).

Parameters are named as in HF transformers' ``Mamba2Mixer`` (and mamba_ssm's ``Mamba2``), so an HF
``Mamba2ForCausalLM`` layer maps 1:1: ``in_proj.weight``, ``conv1d.weight`` (C, 1, W), ``conv1d.bias``,
``dt_bias`` (H,), ``A_log`` (H,), ``D`` (H,) (or (d_inner,) with ``D_has_hdim``), ``norm.weight``
(d_inner,), ``out_proj.weight``.

Sizes: d_inner = cfg.d_inner or expand * hidden_size, H = nheads = d_inner / headdim, P = headdim,
N = d_state, G = ngroups, W = d_conv.

Standard layout (cfg.d_xb is None) — in_proj output rows (conv_dim = d_inner + 2 G N):

    [0, d_inner)                                   z   (gate of the norm)
    [d_inner, 2 d_inner)                           x   (H heads of P)        ┐
    [2 d_inner, 2 d_inner + G N)                   B   (G groups of N)       │ xBC: conv1d + silu
    [2 d_inner + G N, 2 d_inner + 2 G N)           C   (G groups of N)       ┘
    [2 d_inner + 2 G N, 2 d_inner + 2 G N + H)     dt  (per head)

  Head h reads B/C group h // (H // G). (mamba_ssm's optional gated-MLP rows (d_mlp > 0, a prefix
  [z0, x0] of the projection) are not supported: loading such a checkpoint raises.)

Mamba-in-the-Llama layout (cfg.d_xb set; requires ngroups == nheads and d_state == headdim) —
in_proj output rows (conv_dim = 2 d_xb + d_inner):

    [0, d_inner)                                   z                         ← (new; gate)
    [d_inner, d_inner + d_xb)                      x   (n_kv heads of P)     ← V projection
    [d_inner + d_xb, d_inner + 2 d_xb)             B   (n_kv heads of N)     ← K projection
    [d_inner + 2 d_xb, 2 d_inner + 2 d_xb)         C   (H heads of N)        ← Q projection
    [2 d_inner + 2 d_xb, 2 d_inner + 2 d_xb + H)   dt  (per head)
    out_proj                                                                 ← O projection

  n_kv = d_xb / P. The conv runs over [x, B, C] (width 2 d_xb + d_inner) BEFORE repetition; then x
  and B are repeated over query groups exactly like HF's ``repeat_kv``: kv head j serves query heads
  j*rep … j*rep + rep - 1 (rep = H / n_kv), i.e. query head h reads kv head h // rep.

The SSD input is then x (B, L, H, P) with B, C (B, L, G, N), dt (B, L, H) (softplus(dt + dt_bias),
clamped to dt_limit), A = -exp(A_log); y = SSD(...) + D x; out = out_proj(norm(y * silu(z))) with a
group-wise RMSNorm over groups of ``norm_group_size`` (default d_inner / ngroups) channels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from hybridize.config import Mamba2Config
from hybridize.layers.base import Mixer, MixerState
from hybridize.layers.norm import GatedRMSNorm
from hybridize.ops import conv1d as conv_ops
from hybridize.ops import ssd as ssd_ops
from hybridize.ops.gemv import FUSED_MAX_ROWS, ConvUpdate, fused_linear


@dataclass
class Mamba2State(MixerState):
    """conv: (B, conv_dim, W-1) — the last W-1 pre-conv xBC inputs; ssm: (B, H, P, N) (fp32 by default)."""
    conv: Tensor
    ssm: Tensor


@dataclass
class _SSMInputs:
    """What the SSD op consumes, for one call. x (B,L,H,P) is the post-conv, post-repetition value
    (the ``v`` of ``mixing_matrix``); Bm, Cm (B,L,G,N); dt (B,L,H) raw (before bias/softplus);
    z (B,L,d_inner); conv_state (B,conv_dim,W-1) or None."""
    x: Tensor
    Bm: Tensor
    Cm: Tensor
    dt: Tensor
    z: Tensor
    conv_state: Optional[Tensor]


class Mamba2Mixer(Mixer):
    """Mamba-2 block: in_proj → causal conv + silu → SSD → gated RMSNorm → out_proj. See the module
    docstring for the projection layout."""

    kind = "mamba2"

    def __init__(self, hidden_size: int, cfg: Mamba2Config, layer_idx: int = 0):
        super().__init__()
        self.hidden_size = hidden_size
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.d_inner = cfg.d_inner or cfg.expand * hidden_size
        self.headdim = cfg.headdim
        if self.d_inner % self.headdim:
            raise ValueError(f"Mamba2Mixer: d_inner {self.d_inner} is not a multiple of headdim {self.headdim}")
        self.nheads = self.d_inner // self.headdim
        self.ngroups = cfg.ngroups
        self.d_state = cfg.d_state
        self.d_conv = cfg.d_conv
        self.chunk_size = cfg.chunk_size
        self.dt_limit = (float(cfg.dt_limit[0]), float(cfg.dt_limit[1]))
        if self.nheads % self.ngroups:
            raise ValueError(f"Mamba2Mixer: nheads {self.nheads} is not a multiple of ngroups {self.ngroups}")

        self.d_xb = cfg.d_xb
        if self.d_xb is None:
            # widths of x, B, C inside xBC; x and B need no repetition
            self.xbc_sizes = [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state]
            self.n_kv = self.nheads
            self.kv_rep = 1
        else:
            if self.ngroups != self.nheads or self.d_state != self.headdim:
                raise ValueError(
                    f"Mamba2Mixer (Mamba-in-the-Llama layout, d_xb={self.d_xb}): needs ngroups == nheads and "
                    f"d_state == headdim, got ngroups={self.ngroups}, nheads={self.nheads}, "
                    f"d_state={self.d_state}, headdim={self.headdim}")
            if self.d_xb % self.headdim or self.nheads % (self.d_xb // self.headdim):
                raise ValueError(f"Mamba2Mixer: d_xb {self.d_xb} must be n_kv * headdim with n_kv dividing "
                                 f"nheads {self.nheads}")
            self.n_kv = self.d_xb // self.headdim
            self.kv_rep = self.nheads // self.n_kv
            self.xbc_sizes = [self.d_xb, self.d_xb, self.d_inner]
        self.conv_dim = sum(self.xbc_sizes)

        self.in_proj = nn.Linear(hidden_size, self.d_inner + self.conv_dim + self.nheads, bias=cfg.bias)
        # nn.Conv1d only for its (C, 1, W) parameter layout (HF / mamba_ssm checkpoints); the op
        # hybridize.ops.conv1d does the computation.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=self.d_conv, groups=self.conv_dim,
                                padding=self.d_conv - 1, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.d_inner if cfg.D_has_hdim else self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, eps=cfg.norm_eps,
                                 group_size=cfg.norm_group_size or self.d_inner // self.ngroups,
                                 norm_before_gate=cfg.norm_before_gate)
        self.out_proj = nn.Linear(self.d_inner, hidden_size, bias=cfg.bias)
        self.reset_ssm_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Mamba-2 init: A = U(A_init_range) (A_log = log A), D = 1, dt_bias = softplus⁻¹(dt) with dt
        log-uniform in [dt_min, dt_max], floored at dt_init_floor."""
        cfg = self.cfg
        dev = self.A_log.device
        if dev.type == "meta":
            return
        lo, hi = cfg.A_init_range
        if not (0 < lo <= hi):
            raise ValueError(f"Mamba2Mixer: A_init_range must satisfy 0 < lo <= hi, got {cfg.A_init_range}")
        A = torch.empty(self.nheads, device=dev, dtype=torch.float32).uniform_(lo, hi)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(self.nheads, device=dev, dtype=torch.float32)
                       * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # inverse of softplus

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.get(prefix + "in_proj.weight")
        expected = self.in_proj.out_features
        if w is not None and w.shape[0] > expected and (w.shape[0] - expected) % 2 == 0:
            d_mlp = (w.shape[0] - expected) // 2
            raise ValueError(
                f"Mamba2Mixer: {prefix}in_proj.weight has {w.shape[0]} rows, {2 * d_mlp} more than this layer's "
                f"{expected}: the checkpoint uses mamba_ssm's gated-MLP rows (d_mlp={d_mlp} > 0), which are "
                "not supported")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ helpers
    def _A(self) -> Tensor:
        return -torch.exp(self.A_log.float())

    def _D(self) -> Tensor:
        return self.D.view(self.nheads, self.headdim) if self.cfg.D_has_hdim else self.D

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight[:, 0, :]                       # (C, W)

    def _split_xbc(self, xbc: Tensor):
        """Post-conv xBC (..., conv_dim) → x (..., H, P), Bm (..., G, N), Cm (..., G, N), applying the
        Mamba-in-the-Llama repetition (kv head j → query heads j*rep … j*rep+rep-1) when d_xb is set."""
        x, Bm, Cm = torch.split(xbc, self.xbc_sizes, dim=-1)
        lead = xbc.shape[:-1]
        if self.d_xb is None:
            return (x.reshape(*lead, self.nheads, self.headdim),
                    Bm.reshape(*lead, self.ngroups, self.d_state),
                    Cm.reshape(*lead, self.ngroups, self.d_state))
        x = x.reshape(*lead, self.n_kv, self.headdim).repeat_interleave(self.kv_rep, dim=-2)
        Bm = Bm.reshape(*lead, self.n_kv, self.d_state).repeat_interleave(self.kv_rep, dim=-2)
        return x, Bm, Cm.reshape(*lead, self.ngroups, self.d_state)

    def _ssm_inputs(self, u: Tensor, conv_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                    return_conv_state: bool = False) -> _SSMInputs:
        """u (B, L, D) → the SSD inputs (see ``_SSMInputs``), running in_proj and the causal conv."""
        z, xbc, dt = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        res = conv_ops.causal_conv1d(xbc, self._conv_weight(), self.conv1d.bias, initial_state=conv_state,
                                     seq_idx=seq_idx, activation="silu", return_final_state=return_conv_state)
        xbc, new_conv = res if return_conv_state else (res, None)
        x, Bm, Cm = self._split_xbc(xbc)
        return _SSMInputs(x=x, Bm=Bm, Cm=Cm, dt=dt, z=z, conv_state=new_conv)

    # ------------------------------------------------------------------ interface
    def init_state(self, batch_size: int, *, max_seqlen: Optional[int] = None, device=None,
                   dtype=None) -> Mamba2State:
        device = device if device is not None else self.A_log.device
        dtype = dtype or torch.float32
        return Mamba2State(
            conv=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=dtype))

    def forward(self, x: Tensor, state: Optional[Mamba2State] = None, *, seq_idx: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, output_state: bool = False):
        """x (B, L, D) → (y (B, L, D), state or None). position_ids are unused (no positions in SSMs)."""
        Bsz, L, _ = x.shape
        if state is None and output_state:
            state = self.init_state(Bsz, device=x.device)
        inp = self._ssm_inputs(x, state.conv if state is not None else None, seq_idx,
                               return_conv_state=state is not None)
        res = ssd_ops.ssd_chunked(
            inp.x, inp.dt, self._A(), inp.Bm, inp.Cm, chunk_size=self.chunk_size, D=self._D(),
            dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
            initial_state=state.ssm if state is not None else None, seq_idx=seq_idx,
            return_final_state=state is not None)
        y, final = res if state is not None else (res, None)
        out = self.out_proj(self.norm(y.reshape(Bsz, L, self.d_inner), inp.z))
        if state is not None:
            # advance by reassignment (autograd-friendly), keeping the state's dtypes
            state.conv = inp.conv_state.to(state.conv.dtype)
            state.ssm = final.to(state.ssm.dtype)
        return out, state

    step_fuses_norm = True

    def step(self, x: Tensor, state: Mamba2State, norm: Optional[nn.Module] = None,
             residual: bool = False) -> Tensor:
        """One token x (B, D) → y (B, D), of ``norm(x)`` when a norm is given (x + y with `residual`);
        state.conv and state.ssm are updated in place. At batch-1 decode the norms, the conv step, the gate
        and the residual add run inside the in / out GEMVs."""
        Bsz = x.shape[0]
        # in_proj (+ the pre-norm) and the conv step on its xBC rows: one kernel at batch-1 decode (the
        # GEMV's epilogue owns its rows' conv channels), the linear then the conv op otherwise
        conv = ConvUpdate(state.conv, self._conv_weight(), self.conv1d.bias, self.d_inner, "silu")
        proj, xbc = fused_linear(x, self.in_proj.weight, self.in_proj.bias, norm=norm, conv=conv)
        z, dt = proj[..., :self.d_inner], proj[..., self.d_inner + self.conv_dim:]
        # Views of the conv output, NOT repeated: x (B, n_kv, P), B (B, n_kv, N), C (B, H, N) for the
        # MIL layout; x (B, H, P), B/C (B, G, N) otherwise. The step kernel maps head h to its rows and
        # computes A = -exp(A_log) itself, so no copy / exp kernels run around it.
        xh, Bm, Cm = torch.split(xbc, self.xbc_sizes, dim=-1)
        xh, Bm, Cm = (xh.unflatten(-1, (-1, self.headdim)), Bm.unflatten(-1, (-1, self.d_state)),
                      Cm.unflatten(-1, (-1, self.d_state)))
        res = x if residual else None
        if self._norm_in_step(Bsz):
            # many rows: the gated norm runs in the step kernel's epilogue (each program holds whole groups)
            # rather than as its own kernels; fewer rows fuse it into the out-projection's prologue instead
            nrm, zh = self.norm, z.unflatten(-1, (-1, self.headdim))
            y = ssd_ops.ssd_step(xh, dt, None, Bm, Cm, state.ssm, D=self._D(), z=zh, dt_bias=self.dt_bias,
                                 dt_softplus=True, dt_limit=self.dt_limit, A_log=self.A_log,
                                 norm_weight=nrm.weight, norm_eps=nrm.eps, norm_group=nrm.group_size)
            return fused_linear(y.reshape(Bsz, self.d_inner), self.out_proj.weight, self.out_proj.bias, residual=res)
        y = ssd_ops.ssd_step(xh, dt, None, Bm, Cm, state.ssm, D=self._D(), dt_bias=self.dt_bias,
                             dt_softplus=True, dt_limit=self.dt_limit, A_log=self.A_log)
        return fused_linear(y.reshape(Bsz, self.d_inner), self.out_proj.weight, self.out_proj.bias,
                            norm=self.norm, gate=z, residual=res)

    def _norm_in_step(self, rows: int) -> bool:
        """Whether `step` hands the gated norm to the SSD step kernel: above `ops.gemv.FUSED_MAX_ROWS` rows
        (where the out-projection does not fuse it) when its groups lie within a head."""
        return rows > FUSED_MAX_ROWS and not self.norm.norm_before_gate and self.headdim % self.norm.group_size == 0

    def mixing_matrix(self, x: Tensor, *, seq_idx: Optional[Tensor] = None) -> Tensor:
        """M (B, H, L, L) fp32 with y_pre[:, t, h] = sum_s M[:, h, t, s] v[:, s, h], where v is the
        post-conv (post-repetition) x per head and y_pre the SSD output before the gated norm, D term
        included on the diagonal. With D_has_hdim the D term is per channel and NOT included."""
        inp = self._ssm_inputs(x, None, seq_idx)
        return ssd_ops.ssd_mixing_matrix(inp.dt, self._A(), inp.Bm, inp.Cm,
                                         D=None if self.cfg.D_has_hdim else self.D, dt_bias=self.dt_bias,
                                         dt_softplus=True, dt_limit=self.dt_limit, seq_idx=seq_idx)

    def extra_repr(self) -> str:
        layout = "standard" if self.d_xb is None else f"mil(d_xb={self.d_xb}, rep={self.kv_rep})"
        return (f"d_inner={self.d_inner}, nheads={self.nheads}, headdim={self.headdim}, "
                f"ngroups={self.ngroups}, d_state={self.d_state}, layout={layout}")
