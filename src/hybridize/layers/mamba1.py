"""Mamba-1 mixer (selective SSM), with the standard layout of HF transformers' `MambaMixer` and the
Mamba-in-the-Llama (MIL, arXiv 2408.15237) layout that is initialised from an attention layer.

Standard layout (`cfg.d_xb is None`), parameter names and shapes exactly as HF `MambaMixer`, so HF /
mamba_ssm Mamba-1 checkpoints map 1:1 (D = hidden_size, E = d_inner, R = dt_rank, N = d_state):

    in_proj   Linear(D, 2E)            rows [0, E) → x, rows [E, 2E) → z (gate)
    conv1d    Conv1d(E, E, W, groups=E) weight (E, 1, W), bias (E,)   causal, then SiLU → u
    x_proj    Linear(E, R + 2N, no bias) applied to u: rows [0, R) → dt, [R, R+N) → B, [R+N, R+2N) → C
    dt_proj   Linear(R, E)             delta = softplus(dt_proj.weight @ dt + dt_proj.bias)
    A_log     (E, N)                   A = -exp(A_log)
    D         (E,)
    out_proj  Linear(E, D)             out = out_proj(scan(u, delta, A, B, C, D) * silu(z))

B and C are shared by all E channels.

MIL layout (`cfg.d_xb` set, `cfg.num_heads` = H query heads). Head size P = E / H, Hkv = d_xb / P key/value
heads, rep = H / Hkv. B/C heads have d_state = N entries; initialising from attention needs N == P (then
the B width Hkv*N is d_xb and the C width H*N is E). x, B and C come from the layer input (like V, K, Q),
not from the convolved x:

    in_proj   Linear(D, d_xb + E)      rows [0, d_xb) → x (from V: v_proj rows),
                                       rows [d_xb, d_xb + E) → z (no attention counterpart)
    conv1d    Conv1d(d_xb, d_xb, W, groups=d_xb)   applied to x at d_xb width, then SiLU
    x_proj    Linear(D, R + Hkv*N + H*N, bias=cfg.bias) applied to the layer input:
                  rows [0, R)                    → dt (no attention counterpart)
                  rows [R, R + Hkv*N)            → B (from K: k_proj rows, kv head j = rows R + j*N ...)
                  rows [R + Hkv*N, R + (Hkv+H)*N) → C (from Q: q_proj rows, head h = rows ... + h*N ...)
    dt_proj   Linear(R, E); A_log (E, N); D (E,)
    out_proj  Linear(E, D)             (from O: o_proj)

After the conv, x (Hkv heads of P) and B (Hkv heads of N) are repeated over query groups exactly like HF
`repeat_kv`: kv head j serves query heads j*rep ... j*rep + rep - 1 (`repeat_interleave` on the head
axis). Channel c = h*P + p of the scan uses B/C of head h (B, C are passed grouped with G = H).
Note: MIL's released code defaults to repeating x *before* the conv (`repeat_kv_before_conv=True`, a conv
of width E); here the conv runs at d_xb width, so such conv weights do not map 1:1 (the other ones do).

State: `Mamba1State(conv (B, C_conv, W-1), ssm (B, E, N))`, C_conv = E (standard) or d_xb (MIL).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridize.config import Mamba1Config
from hybridize.layers.base import Mixer, MixerState
from hybridize.ops.conv1d import causal_conv1d, causal_conv1d_update
from hybridize.ops.selective_scan import selective_scan, selective_scan_step


@dataclass
class Mamba1State(MixerState):
    """conv: (B, C_conv, W-1) last W-1 conv inputs; ssm: (B, d_inner, d_state), fp32 by default."""
    conv: Tensor
    ssm: Tensor


class Mamba1Mixer(Mixer):
    """Mamba-1 block (see the module docstring for the two layouts)."""

    kind = "mamba1"

    def __init__(self, hidden_size: int, cfg: Mamba1Config, layer_idx: int = 0):
        super().__init__()
        self.hidden_size = hidden_size
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.d_inner = cfg.d_inner or cfg.expand * hidden_size
        self.d_state = cfg.d_state
        self.d_conv = cfg.d_conv
        self.dt_rank = cfg.dt_rank or math.ceil(hidden_size / 16)
        self.mil = cfg.d_xb is not None
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        if self.mil:
            if not cfg.num_heads:
                raise ValueError("Mamba1Mixer: the Mamba-in-the-Llama layout (d_xb set) needs num_heads")
            H = cfg.num_heads
            if E % H:
                raise ValueError(f"Mamba1Mixer: d_inner {E} is not a multiple of num_heads {H}")
            P = E // H
            if cfg.d_xb % P or H % (cfg.d_xb // P):
                raise ValueError(f"Mamba1Mixer: d_xb {cfg.d_xb} must be a multiple of the head size {P} "
                                 f"(= d_inner / num_heads) with num_heads divisible by d_xb / head size")
            self.num_heads, self.head_dim = H, P
            self.num_kv_heads = cfg.d_xb // P
            self.rep = H // self.num_kv_heads
            self.conv_dim = cfg.d_xb
            self.b_width, self.c_width = self.num_kv_heads * N, H * N
            self.in_proj = nn.Linear(hidden_size, cfg.d_xb + E, bias=cfg.bias)
            self.x_proj = nn.Linear(hidden_size, R + self.b_width + self.c_width, bias=cfg.bias)
        else:
            self.num_heads = self.num_kv_heads = self.rep = None
            self.head_dim = None
            self.conv_dim = E
            self.b_width = self.c_width = N
            self.in_proj = nn.Linear(hidden_size, 2 * E, bias=cfg.bias)
            self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=cfg.d_conv, groups=self.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.empty(E, N))
        self.D = nn.Parameter(torch.empty(E))
        self.out_proj = nn.Linear(E, hidden_size, bias=cfg.bias)
        self.reset_ssm_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_ssm_parameters(self):
        """mamba_ssm / HF init of the SSM parameters: S4D-real A (A[c] = -(1 .. N)), D = 1, dt_proj
        weight ~ U(±R^-0.5) and dt_proj bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        floored at dt_init_floor. A generic model init must not overwrite these (the tensors are
        tagged `_no_reinit` / `_no_weight_decay` as in mamba_ssm)."""
        cfg = self.cfg
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.d_inner, -1)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_proj.bias._no_reinit = True
        self.dt_proj.weight._no_reinit = True
        self.A_log._no_reinit = True
        self.D._no_reinit = True
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    # ------------------------------------------------------------------ pieces
    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight.squeeze(1)  # (C_conv, W)

    def _split_in(self, hs: Tensor):
        """in_proj → x (…, C_conv), z (…, E)."""
        return self.in_proj(hs).split([self.conv_dim, self.d_inner], dim=-1)

    def _repeat_heads(self, t: Tensor, width: int) -> Tensor:
        """(…, Hkv*width) → (…, H, width), kv head j → query heads j*rep … j*rep+rep-1."""
        t = t.unflatten(-1, (self.num_kv_heads, width))
        return t.repeat_interleave(self.rep, dim=-2)

    def _ssm_inputs(self, hs: Tensor, xc: Tensor):
        """From the layer input hs and the post-conv x xc: u (…, E), delta (…, E) (before bias and
        softplus), B and C ((…, N) standard; (…, H, N) MIL)."""
        src = hs if self.mil else xc
        dt, Bm, Cm = self.x_proj(src).split([self.dt_rank, self.b_width, self.c_width], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)  # the bias enters the scan as delta_bias
        if self.mil:
            u = self._repeat_heads(xc, self.head_dim).flatten(-2)
            Bm = self._repeat_heads(Bm, self.d_state)
            Cm = Cm.unflatten(-1, (self.num_heads, self.d_state))
        else:
            u = xc
        return u, delta, Bm, Cm

    def _A(self) -> Tensor:
        return -torch.exp(self.A_log.float())

    def _features(self, x: Tensor, state: Optional[Mamba1State], seq_idx: Optional[Tensor]):
        xs, z = self._split_in(x)
        conv = causal_conv1d(xs, self._conv_weight(), self.conv1d.bias,
                             initial_state=None if state is None else state.conv, seq_idx=seq_idx,
                             activation="silu", return_final_state=state is not None)
        xc, conv_final = conv if state is not None else (conv, None)
        u, delta, Bm, Cm = self._ssm_inputs(x, xc)
        return u, z, delta, Bm, Cm, conv_final

    # ------------------------------------------------------------------ interface
    def forward(self, x: Tensor, state: Optional[Mamba1State] = None, *, seq_idx: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, output_state: bool = False):
        """x: (B, L, D) → (y (B, L, D), state or None). position_ids is ignored."""
        if state is None and output_state:
            state = self.init_state(x.shape[0], device=x.device)
        u, z, delta, Bm, Cm, conv_final = self._features(x, state, seq_idx)
        res = selective_scan(u, delta, self._A(), Bm, Cm, D=self.D, z=z, delta_bias=self.dt_proj.bias,
                             delta_softplus=True, initial_state=None if state is None else state.ssm,
                             seq_idx=seq_idx, return_final_state=state is not None)
        if state is None:
            return self.out_proj(res), None
        y, ssm_final = res
        state.conv = conv_final.to(state.conv.dtype)
        state.ssm = ssm_final.to(state.ssm.dtype)
        return self.out_proj(y), state

    def step(self, x: Tensor, state: Mamba1State) -> Tensor:
        """One token: x (B, D) → y (B, D); state updated in place."""
        xs, z = self._split_in(x)
        xc = causal_conv1d_update(xs, state.conv, self._conv_weight(), self.conv1d.bias, activation="silu")
        u, delta, Bm, Cm = self._ssm_inputs(x, xc)
        y = selective_scan_step(u, delta, self._A(), Bm, Cm, state.ssm, D=self.D, z=z,
                                delta_bias=self.dt_proj.bias, delta_softplus=True)
        return self.out_proj(y)

    def init_state(self, batch_size: int, *, max_seqlen: Optional[int] = None, device=None,
                   dtype=None) -> Mamba1State:
        """Zero state. The conv state has the parameters' dtype, the SSM state `dtype` (default fp32)."""
        device = device if device is not None else self.A_log.device
        conv = torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device,
                           dtype=self.conv1d.weight.dtype)
        ssm = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=dtype or torch.float32)
        return Mamba1State(conv=conv, ssm=ssm)

    def mixing_input(self, x: Tensor, *, seq_idx: Optional[Tensor] = None) -> Tensor:
        """v of the mixing matrix: the post-conv (and, MIL, head-repeated) scan input u, (B, L, E)."""
        return self._features(x, None, seq_idx)[0]

    def mixing_matrix(self, x: Tensor, *, seq_idx: Optional[Tensor] = None, include_D: bool = True) -> Tensor:
        """(B, E, L, L) fp32, one matrix per channel c:

            M[c, t, s] = sum_n C_t[n] exp(sum_{k=s+1}^{t} delta_k[c] A[c, n]) delta_s[c] B_s[n]   (s <= t,
                         same document; 0 otherwise)  + D[c] on the diagonal (include_D)

        so that (M @ u)[c, t] is the scan output before the silu(z) gate, u = `mixing_input(x)`.
        Memory O(B E L^2) (plus one (B, E, L, L) temporary per state index).
        """
        u, z, delta, Bm, Cm, _ = self._features(x, None, seq_idx)
        Bsz, L, E = u.shape
        dt = F.softplus(delta.float() + self.dt_proj.bias.float())      # (B, L, E)
        A = self._A()                                                    # (E, N)
        if self.mil:
            Bx = Bm.float().repeat_interleave(self.head_dim, dim=-2)      # (B, L, E, N)
            Cx = Cm.float().repeat_interleave(self.head_dim, dim=-2)
        else:
            Bx, Cx = Bm.float()[:, :, None], Cm.float()[:, :, None]       # (B, L, 1, N)
        cum = torch.cumsum(dt[..., None] * A, dim=1)                     # (B, L, E, N)
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[None]
        if seq_idx is not None:
            mask = mask & (seq_idx[:, :, None] == seq_idx[:, None, :])
        M = u.new_zeros(Bsz, E, L, L, dtype=torch.float32)
        for n in range(self.d_state):
            c = cum[..., n].transpose(1, 2)                               # (B, E, L)
            seg = (c[:, :, :, None] - c[:, :, None, :]).masked_fill(~mask[:, None], float("-inf"))
            Ct = Cx[..., n].expand(Bsz, L, E).transpose(1, 2)             # (B, E, L)
            Bs = (Bx[..., n] * dt).transpose(1, 2)                        # (B, E, L)
            M = M + Ct[:, :, :, None] * torch.exp(seg) * Bs[:, :, None, :]
        if include_D:
            M = M + torch.diag_embed(self.D.float().expand(Bsz, L, E).transpose(1, 2))
        return M
