"""Griffin's recurrent block with the RG-LRU (arXiv 2402.19427), parameter names and math as HF
transformers' `RecurrentGemmaRecurrentBlock` / `RecurrentGemmaRglru` (and google-deepmind/recurrentgemma),
so RecurrentGemma checkpoints map 1:1 (D = hidden_size, W = lru_width, H = num_heads, bw = W / H):

    linear_y   Linear(D, W)                    branch 1: gelu_tanh(linear_y(x))
    linear_x   Linear(D, W)                    branch 2: linear_x(x) → conv_1d → RG-LRU
    conv_1d    Conv1d(W, W, K, groups=W)       weight (W, 1, K), bias (W,); causal, no activation
    rg_lru.input_gate_weight      (H, bw, bw)  block-diagonal, laid out (head, in, out): y = x_h @ w_h + b_h
    rg_lru.input_gate_bias        (H, bw)
    rg_lru.recurrent_gate_weight  (H, bw, bw)
    rg_lru.recurrent_gate_bias    (H, bw)
    rg_lru.recurrent_param        (W,)         Λ
    linear_out Linear(W, D)                    out = linear_out(branch1 * branch2)

linear_y and linear_x read the same input: for inference, ``fuse_projections_()`` runs them as one
2W × D matmul (`hybridize.layers.fused`; state_dict and checkpoints unchanged).

RG-LRU on the conv output x_t (per channel):

    r_t = σ(W_a x_t + b_a),  i_t = σ(W_x x_t + b_x)
    log a_t = -c · r_t · softplus(Λ)            (c = 8)
    h_t = a_t ⊙ h_{t-1} + m_t ⊙ (i_t ⊙ x_t),    m_t = √(1 - a_t²), or m_t = 1 and h_{t-1} := 0 at a reset

A reset is the first token of a document: a `seq_idx` document start, or t = 0 of a sequence that has
seen no token yet (no state, or a state with `lengths == 0`, e.g. fresh from `init_state`). This is the
`segment_pos == 0` convention of the official code and HF (which reset where position_ids == 0): a fresh
token-by-token decode therefore equals the full forward. A state that has seen tokens continues.

Λ sign convention (official code and HF, opposite to the paper's a = σ(Λ)): the base decay is
a = exp(-softplus(Λ)) = σ(-Λ), and a_t = a^(c·r_t). Initialisation as the official `rnn_param_init`:
a² ~ U(min_decay², max_decay²) ("uniform on a ring"), so the base decay a lies in [min_decay, max_decay]
= [0.9, 0.999] and the decay at r_t = 1 is a^c ∈ [min_decay^c, max_decay^c].

√(1 - a²) uses `SqrtBoundDerivative` (as the official code): its derivative 1 / (2√x) has its
denominator clamped so it is at most 1000, so a → 1 (x → 0) gives finite gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridize.config import RGLRUConfig
from hybridize.layers.base import Mixer, MixerState, doc_starts
from hybridize.layers.fused import FusedProjections
from hybridize.ops.conv1d import causal_conv1d, causal_conv1d_update
from hybridize.ops.gemv import fused_linear
from hybridize.ops.rglru import rglru_scan, rglru_step

MAX_SQRT_GRADIENT = 1000.0


class SqrtBoundDerivative(torch.autograd.Function):
    """sqrt(x) whose backward is grad / sqrt(max(4x, 1 / MAX_SQRT_GRADIENT²)), i.e. the derivative is
    clipped at MAX_SQRT_GRADIENT (finite at x = 0)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad_output / torch.sqrt(torch.clamp(4.0 * x, min=1.0 / MAX_SQRT_GRADIENT ** 2))


def sqrt_bound_derivative(x: Tensor) -> Tensor:
    return SqrtBoundDerivative.apply(x)


@dataclass
class RGLRUState(MixerState):
    """conv: (B, W, K-1) last K-1 conv inputs; rnn: (B, W) fp32 by default; lengths: (B,) long, tokens
    seen by the current document (0 → the next token starts a document: multiplier 1)."""
    conv: Tensor
    rnn: Tensor
    lengths: Tensor


class RGLRU(nn.Module):
    """The RG-LRU (gates + normalised linear recurrence). Parameters as HF `RecurrentGemmaRglru`."""

    def __init__(self, width: int, num_heads: int, c: float = 8.0, min_decay: float = 0.9,
                 max_decay: float = 0.999):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"RGLRU: width {width} is not a multiple of num_heads {num_heads}")
        self.width, self.num_heads, self.block_width = width, num_heads, width // num_heads
        self.c, self.min_decay, self.max_decay = c, min_decay, max_decay
        H, bw = num_heads, self.block_width
        self.recurrent_param = nn.Parameter(torch.empty(width))
        self.input_gate_weight = nn.Parameter(torch.empty(H, bw, bw))
        self.input_gate_bias = nn.Parameter(torch.empty(H, bw))
        self.recurrent_gate_weight = nn.Parameter(torch.empty(H, bw, bw))
        self.recurrent_gate_bias = nn.Parameter(torch.empty(H, bw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Official init: gate weights N(0, 1/bw), zero biases, Λ from `init_recurrent_param`."""
        std = math.sqrt(1.0 / self.block_width)
        nn.init.normal_(self.input_gate_weight, std=std)
        nn.init.normal_(self.recurrent_gate_weight, std=std)
        nn.init.zeros_(self.input_gate_bias)
        nn.init.zeros_(self.recurrent_gate_bias)
        self.recurrent_param.copy_(init_recurrent_param(self.width, self.min_decay, self.max_decay))
        self.recurrent_param._no_reinit = True
        self.recurrent_param._no_weight_decay = True

    def _block_linear(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        xh = x.unflatten(-1, (self.num_heads, self.block_width))
        return (torch.einsum("...hi,hij->...hj", xh, w.float()) + b.float()).flatten(-2)

    def gates(self, x: Tensor, reset: Tensor):
        """x: (..., W) conv output; reset: (...) bool. Returns (log_a, v, m) in fp32, all (..., W):
        the log-decay log a_t, the gated input v = i_t ⊙ x_t and the multiplier m_t (1 at resets)."""
        xf = x.float()
        i = torch.sigmoid(self._block_linear(xf, self.input_gate_weight, self.input_gate_bias))
        r = torch.sigmoid(self._block_linear(xf, self.recurrent_gate_weight, self.recurrent_gate_bias))
        log_a = -self.c * r * F.softplus(self.recurrent_param.float())
        a_sq = torch.exp(2 * log_a)  # more accurate than a * a
        m = sqrt_bound_derivative(1 - a_sq)
        m = torch.where(reset[..., None], torch.ones_like(m), m)
        return log_a, xf * i, m

    def base_decay(self) -> Tensor:
        """(W,) the base decay exp(-softplus(Λ)); the decay at r_t = 1 is base_decay() ** c."""
        return torch.exp(-F.softplus(self.recurrent_param.float()))


def init_recurrent_param(width: int, min_decay: float = 0.9, max_decay: float = 0.999,
                         eps: float = 1e-8) -> Tensor:
    """Λ such that exp(-softplus(Λ)) = a with a² ~ U(min², max²) (official `rnn_param_init`)."""
    a = torch.empty(width).uniform_(min_decay ** 2 + eps, max_decay ** 2 + eps).sqrt()
    return torch.log(1.0 / a - 1.0)  # softplus^-1(-log a) = log(exp(-log a) - 1)


class RGLRUBlock(FusedProjections, Mixer):
    """Griffin / Hawk recurrent block (see the module docstring)."""

    kind = "rglru"
    _fused_names = ("linear_y", "linear_x")

    def __init__(self, hidden_size: int, cfg: RGLRUConfig, layer_idx: int = 0):
        super().__init__()
        self.hidden_size = hidden_size
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.lru_width = W = cfg.lru_width or hidden_size
        self.d_conv = cfg.d_conv
        self.linear_y = nn.Linear(hidden_size, W, bias=cfg.bias)
        self.linear_x = nn.Linear(hidden_size, W, bias=cfg.bias)
        self.linear_out = nn.Linear(W, hidden_size, bias=cfg.bias)
        self.conv_1d = nn.Conv1d(W, W, kernel_size=cfg.d_conv, groups=W, padding=cfg.d_conv - 1,
                                 bias=cfg.conv_bias)
        self.rg_lru = RGLRU(W, cfg.num_heads, c=cfg.c, min_decay=cfg.min_decay, max_decay=cfg.max_decay)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Official init: linear_x/y N(0, 1/D), linear_out N(0, 1/W) (the official code scales this by
        final_w_init_variance_scale = 2 / num_layers at model level), conv N(0, 0.01/K), zero biases."""
        for lin, fan_in in ((self.linear_x, self.hidden_size), (self.linear_y, self.hidden_size),
                            (self.linear_out, self.lru_width)):
            nn.init.normal_(lin.weight, std=math.sqrt(1.0 / fan_in))
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.conv_1d.weight, std=math.sqrt(0.01 / self.d_conv))
        if self.conv_1d.bias is not None:
            nn.init.zeros_(self.conv_1d.bias)
        self.rg_lru.reset_parameters()

    # ------------------------------------------------------------------ pieces
    def _conv_weight(self) -> Tensor:
        return self.conv_1d.weight.squeeze(1)  # (W, K)

    def _resets(self, Bsz: int, L: int, state: Optional[RGLRUState], seq_idx: Optional[Tensor],
                device) -> Tensor:
        """(B, L) bool: document starts; t = 0 too when the sequence has seen no token."""
        reset = doc_starts(seq_idx)
        if reset is None:
            reset = torch.zeros(Bsz, L, dtype=torch.bool, device=device)
        if L:
            reset[:, 0] = True if state is None else (state.lengths == 0)
        return reset

    def _features(self, x: Tensor, state: Optional[RGLRUState], seq_idx: Optional[Tensor]):
        y, xb = self._project(x)                    # one matmul when fused
        y_branch = F.gelu(y, approximate="tanh")
        conv = causal_conv1d(xb, self._conv_weight(), self.conv_1d.bias,
                             initial_state=None if state is None else state.conv, seq_idx=seq_idx,
                             activation=None, return_final_state=state is not None)
        xc, conv_final = conv if state is not None else (conv, None)
        reset = self._resets(x.shape[0], x.shape[1], state, seq_idx, x.device)
        log_a, v, m = self.rg_lru.gates(xc, reset)
        return y_branch, log_a, v, m, reset, conv_final

    # ------------------------------------------------------------------ interface
    def forward(self, x: Tensor, state: Optional[RGLRUState] = None, *, seq_idx: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, output_state: bool = False):
        """x: (B, L, D) → (y (B, L, D), state or None). position_ids is ignored (resets come from
        seq_idx and the state's `lengths`)."""
        Bsz, L, _ = x.shape
        if state is None and output_state:
            state = self.init_state(Bsz, device=x.device)
        y_branch, log_a, v, m, reset, conv_final = self._features(x, state, seq_idx)
        h, h_final = rglru_scan(v * m, torch.exp(log_a), initial_state=None if state is None else state.rnn,
                                reset=reset, return_final_state=True)
        out = self.linear_out(h.to(y_branch.dtype) * y_branch)
        if state is None:
            return out, None
        state.conv = conv_final.to(state.conv.dtype)
        state.rnn = h_final.to(state.rnn.dtype)
        state.lengths = _lengths_after(state.lengths, reset, L)
        return out, state

    step_fuses_norm = True

    def step(self, x: Tensor, state: RGLRUState, norm: Optional[nn.Module] = None,
             residual: bool = False) -> Tensor:
        """One token: x (B, D) → y (B, D), of ``norm(x)`` when a norm is given (x + y with `residual`: the
        block's residual add inside the output GEMV at batch 1); state updated in place."""
        y, xb = self._project(x, norm)              # one matmul when fused (the norm inside at batch 1)
        y_branch = F.gelu(y, approximate="tanh")
        xc = causal_conv1d_update(xb, state.conv, self._conv_weight(), self.conv_1d.bias, activation=None)
        reset = state.lengths == 0
        log_a, v, m = self.rg_lru.gates(xc, reset)
        a = torch.where(reset[:, None], torch.zeros_like(log_a), torch.exp(log_a))  # h_{t-1} := 0 at a document start
        h = rglru_step(v * m, a, state.rnn)
        state.lengths.add_(1)
        g = h.to(y_branch.dtype) * y_branch
        if residual:
            return fused_linear(g, self.linear_out.weight, self.linear_out.bias, residual=x)
        return self.linear_out(g)

    def init_state(self, batch_size: int, *, max_seqlen: Optional[int] = None, device=None,
                   dtype=None) -> RGLRUState:
        """Zero state (lengths 0: the next token starts a document). Conv state in the parameters' dtype,
        rnn state in `dtype` (default fp32)."""
        device = device if device is not None else self.linear_x.weight.device
        return RGLRUState(
            conv=torch.zeros(batch_size, self.lru_width, self.d_conv - 1, device=device,
                             dtype=self.conv_1d.weight.dtype),
            rnn=torch.zeros(batch_size, self.lru_width, device=device, dtype=dtype or torch.float32),
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def mixing_input(self, x: Tensor, *, seq_idx: Optional[Tensor] = None) -> Tensor:
        """v of the mixing matrix: i_t ⊙ x_t (post-conv), (B, L, W) fp32."""
        return self._features(x, None, seq_idx)[2]

    def mixing_matrix(self, x: Tensor, *, seq_idx: Optional[Tensor] = None) -> Tensor:
        """(B, W, L, L) fp32, one lower-triangular matrix per channel:
        M[c, t, s] = (prod_{k=s+1}^{t} a_k[c]) · m_s[c] for s <= t in the same document, else 0,
        so that M @ `mixing_input(x)` (per channel) is the RG-LRU output h (fresh sequence)."""
        _, log_a, v, m, reset, _ = self._features(x, None, seq_idx)
        L = x.shape[1]
        cum = torch.cumsum(log_a, dim=1).transpose(1, 2)                  # (B, W, L)
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[None]
        if seq_idx is not None:
            mask = mask & (seq_idx[:, :, None] == seq_idx[:, None, :])
        seg = (cum[:, :, :, None] - cum[:, :, None, :]).masked_fill(~mask[:, None], float("-inf"))
        return torch.exp(seg) * m.transpose(1, 2)[:, :, None, :]


def _lengths_after(lengths: Tensor, reset: Tensor, L: int) -> Tensor:
    """Tokens seen by the last document after a chunk of L tokens with the given resets."""
    ar = torch.arange(L, device=reset.device)
    last = torch.where(reset, ar, torch.full_like(ar, -1)).max(dim=1).values if L else None
    if last is None:
        return lengths
    return torch.where(last >= 0, L - last, lengths + L)
