"""Attention → recurrent-mixer conversion: which layers to convert, the student's config, and the
initialisation of each new mixer from the teacher's attention weights.

    student = hybridize.convert(teacher, mixer="mamba2", attention_fraction=0.5, init="attention")

The student is a `HybridLM` with the teacher's config except `layer_pattern` and the new mixer's
config. Embeddings, LM head, final norm, every block's norms and MLPs, and the kept attention layers
are copied exactly. Conversion is deterministic for a given `seed` and does not touch the global RNG.

Layer selection (Mamba-in-the-Llama, arXiv 2408.15237, and its released configs): attention is kept at
every k-th layer, counting from the last layer of each group of k — layers i with i % k == k - 1 — for
1/k = 50 / 25 / 12.5 % attention; the complements 75 % and 87.5 % convert every 2nd-of-4 / 8th layer
starting at layer 0 (MIL's first progressive steps: SSM layers [0, 4, 8, …] and [0, 8, 16, …]). These
sets are nested (87.5 % ⊃ 75 % ⊃ 50 % ⊃ 25 % ⊃ 12.5 % ⊃ 0 %), so progressive replacement only ever
converts more layers. Explicit `attention_layers` override the fraction.

A teacher may itself be partly converted (progressive replacement): layers that already use `mixer`
are copied as they are; attention layers that leave the kept set are converted.

Initialisation from attention (`init="attention"`); shapes H = query heads, Hkv = key/value heads,
P = head_dim, D = hidden size, rep = H / Hkv:

* Mamba-2 (MIL layout, `layers/mamba2.py`): d_inner = H·P, headdim = d_state = P, ngroups = H,
  d_xb = Hkv·P. in_proj rows x ← V, B ← K, C ← Q (kv heads repeated inside the mixer, like
  `repeat_kv`), out_proj ← O; z and dt rows keep nn.Linear's default init; A_log = log U(1, 16),
  D = 1, dt_bias = softplus⁻¹(dt), dt log-uniform in [1e-3, 0.1] (the mixer's own SSM init). The
  causal conv keeps PyTorch's default Conv1d init by default — this is what the authors' code does
  (`MambaInLlama/mamba2/hybrid_mamba_layer.py` builds the conv with `conv_init=None` and the wrapper
  never touches it); `conv_init="identity"` (last tap 1, bias 0) makes x, B, C exactly silu(V u),
  silu(K u), silu(Q u), so with A → 0, dt = 1, D = 0 the layer *is* causal linear attention with
  feature map silu (tested).
* Mamba-1 (MIL layout, `layers/mamba1.py`): d_inner = H·P, d_state = P, d_xb = Hkv·P, num_heads = H.
  in_proj x rows ← V, x_proj B rows ← K, C rows ← Q, out_proj ← O; z and dt rows, dt_proj, A_log
  (S4D-real, as MIL's Mamba-1 code) and D = 1 keep the mixer's init.
* Discrete Mamba-2 (MOHAWK, `layers/discrete_mamba2.py`): d_inner = H·P, n_v_heads = n_qk_heads = H,
  d_state = P. x ← V and B ← K (kv-head rows repeated to H heads, since the layout has one B per
  qk-head), C ← Q, out_proj ← O; z, the per-head decay logits `a` and the conv keep their default init
  (MOHAWK learns them in stage 1), D = 1, z_bias = 0.
* RG-LRU (Griffin recurrent block, `layers/rglru.py`) — hybridize's own initialisation, no paper
  prescribes one. A diagonal RNN has no q·k matching, so the closest attention it can express is a
  *content-independent, recency-weighted average of the values*. That is exactly an attention head
  with ALiBi position biases (Press et al. 2022) and constant scores: softmax weights
  ∝ exp(−m_h (t − s)), an exponential moving average with decay a_h = exp(−m_h). So:
    - lru_width = H·P, num_heads = H (gate blocks = attention heads);
    - linear_x ← V (kv heads repeated to H), linear_out ← O;
    - conv ← identity (the value enters the recurrence unchanged);
    - gates: weights 0; recurrence-gate bias 0 (r = ½), Λ chosen so the decay a^(c·r) = a_h with the
      ALiBi slopes m_h = 2^(−8(h+1)/H) (for H = 8: a_h ≈ 0.61 … 0.996, windows of ~2 … ~256 tokens);
      input-gate bias = logit(√((1 − a_h)/(1 + a_h))) so √(1 − a²)·i = 1 − a_h, which makes the
      normalised RG-LRU a *convex* EMA h_t = a h_{t−1} + (1 − a) v_t, like softmax weights;
    - linear_y (the GeLU gate branch) weight 0, bias = gelu⁻¹(1), so the gate starts at exactly 1.
  The converted block then computes O·EMA_h(V u) per head (only the very first token of a document is
  scaled by i instead of 1); training then learns content-dependent gates. With `bias=False` blocks
  the linear_y gate keeps its default init.

Biases: teachers with q/k/v (and o) biases (Qwen2) get student projections with biases (`bias=True`
in the mixer config) and the biases are copied to the same rows (z, dt, a rows get 0). RoPE has no
counterpart in a recurrent mixer and is dropped (as in MIL and MOHAWK): the recurrence itself orders
the tokens.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridize.config import (
    ConfigError, DiscreteMamba2Config, HybridConfig, Mamba1Config, Mamba2Config, RGLRUConfig,
)

CONVERTIBLE_MIXERS = ("mamba2", "mamba1", "rglru", "discrete_mamba2")
INIT_MODES = ("attention", "random")
CONV_INITS = ("default", "identity")
#: attention fraction → (k, "keep"): attention at i % k == k-1; (k, "convert"): convert i % k == 0
FRACTIONS = {1.0: None, 0.875: (8, "convert"), 0.75: (4, "convert"), 0.5: (2, "keep"),
             0.25: (4, "keep"), 0.125: (8, "keep"), 0.0: (1, "none")}


class ConversionError(ConfigError):
    """The requested conversion is impossible; the message says why and how to fix it."""


# ---------------------------------------------------------------------------- layer selection
def attention_layers_for_fraction(num_layers: int, fraction: float) -> list[int]:
    """The layers that keep attention for `fraction` ∈ {1, 0.875, 0.75, 0.5, 0.25, 0.125, 0} (see the
    module docstring). Raises ConversionError when the fraction is not exactly representable."""
    key = next((f for f in FRACTIONS if math.isclose(f, float(fraction), abs_tol=1e-9)), None)
    if key is None:
        raise ConversionError(
            f"attention_fraction {fraction} is not supported; choose one of "
            f"{sorted(FRACTIONS, reverse=True)} or pass attention_layers=[...] explicitly")
    layers = _layers_for(num_layers, key)
    if layers is None:
        ok = [f for f in sorted(FRACTIONS, reverse=True) if _layers_for(num_layers, f) is not None]
        raise ConversionError(
            f"attention_fraction {fraction} is not representable with {num_layers} layers "
            f"({key} × {num_layers} = {key * num_layers:g} layers); representable fractions for this model: "
            f"{ok}. Pass attention_layers=[...] to choose the layers yourself")
    return layers


def _layers_for(n: int, key: float) -> Optional[list[int]]:
    """Kept layers for a supported fraction, or None when n layers cannot realise it exactly."""
    rule = FRACTIONS[key]
    if rule is None:
        layers = list(range(n))
    elif rule[1] == "keep":
        layers = [i for i in range(n) if i % rule[0] == rule[0] - 1]
    elif rule[1] == "convert":
        layers = [i for i in range(n) if i % rule[0] != 0]
    else:
        layers = []
    return layers if len(layers) == key * n else None


def resolve_attention_layers(num_layers: int, attention_layers: Optional[Sequence[int]] = None,
                             attention_fraction: Optional[float] = None) -> list[int]:
    """Sorted kept-attention layer indices from explicit indices or a fraction (default 0.5)."""
    if attention_layers is not None and attention_fraction is not None:
        raise ConversionError("give attention_layers or attention_fraction, not both")
    if attention_layers is None:
        frac = 0.5 if attention_fraction is None else attention_fraction
        return attention_layers_for_fraction(num_layers, frac)
    layers = list(attention_layers)
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
    if bad:
        raise ConversionError(f"attention_layers {bad} out of range: the model has {num_layers} layers "
                              f"(valid indices 0 … {num_layers - 1})")
    if len(set(layers)) != len(layers):
        raise ConversionError(f"attention_layers {layers} has duplicates")
    return sorted(layers)


# ---------------------------------------------------------------------------- configs
def _attention_dims(cfg: HybridConfig) -> tuple[int, int, int]:
    a = cfg.attention
    H = a.num_heads
    return H, a.num_kv_heads or H, a.head_dim or cfg.hidden_size // H


def derive_mixer_config(teacher_cfg: HybridConfig, mixer: str):
    """The config of `mixer` whose shapes mirror the teacher's attention (see the module docstring)."""
    H, Hkv, P = _attention_dims(teacher_cfg)
    a = teacher_cfg.attention
    bias = bool(a.qkv_bias or a.o_bias)
    if mixer == "mamba2":
        return Mamba2Config(d_state=P, d_conv=4, expand=1, d_inner=H * P, headdim=P, ngroups=H, d_xb=Hkv * P,
                            bias=bias)
    if mixer == "mamba1":
        return Mamba1Config(d_state=P, d_conv=4, d_inner=H * P, d_xb=Hkv * P, num_heads=H, bias=bias)
    if mixer == "discrete_mamba2":
        return DiscreteMamba2Config(d_state=P, n_qk_heads=H, n_v_heads=H, d_conv=4, expand=1, d_inner=H * P,
                                    bias=bias)
    if mixer == "rglru":
        return RGLRUConfig(lru_width=H * P, num_heads=H, d_conv=4, bias=True)
    raise ConversionError(f"mixer {mixer!r} cannot be converted to; choose one of {CONVERTIBLE_MIXERS}")


def _apply_overrides(mcfg, overrides: Optional[dict], mixer: str):
    if not overrides:
        return mcfg
    known = {f.name for f in dataclasses.fields(mcfg)}
    bad = set(overrides) - known
    if bad:
        raise ConversionError(f"unknown {mixer} config fields {sorted(bad)}; known: {sorted(known)}")
    return dataclasses.replace(mcfg, **overrides)


def student_config(teacher_cfg: HybridConfig, mixer: str, attention_layers: Sequence[int],
                   mixer_config: Optional[dict] = None) -> HybridConfig:
    """The student's HybridConfig: the teacher's, with `mixer` at every layer not in attention_layers."""
    if mixer not in CONVERTIBLE_MIXERS:
        raise ConversionError(f"mixer {mixer!r} cannot be converted to; choose one of {CONVERTIBLE_MIXERS}")
    keep = set(attention_layers)
    pattern = ["attention" if i in keep else mixer for i in range(teacher_cfg.num_layers)]
    cfg = HybridConfig.from_dict(teacher_cfg.to_dict())          # deep copy
    if mixer in teacher_cfg.layer_pattern:
        # progressive step: layers already converted keep their config
        if mixer_config:
            raise ConversionError(f"the teacher already has {mixer} layers, whose config cannot be changed "
                                  "by mixer_config; convert from the all-attention model instead")
        mcfg = getattr(teacher_cfg, mixer)
    else:
        mcfg = _apply_overrides(derive_mixer_config(teacher_cfg, mixer), mixer_config, mixer)
    setattr(cfg, mixer, mcfg)
    cfg.layer_pattern = pattern
    n_attn = len(keep)
    cfg.name = f"{teacher_cfg.name}-{mixer}-attn{round(100 * n_attn / len(pattern))}"
    return cfg.validate()


# ---------------------------------------------------------------------------- helpers
def _rows_repeated(w: Tensor, n_kv: int, rep: int) -> Tensor:
    """(n_kv·P, …) rows → (n_kv·rep·P, …): kv head j → heads j·rep … j·rep+rep−1 (repeat_kv)."""
    return w.reshape(n_kv, -1, *w.shape[1:]).repeat_interleave(rep, dim=0).reshape(-1, *w.shape[1:])


def _bias_or_zeros(lin: nn.Linear, n: int, like: Tensor) -> Tensor:
    return lin.bias.detach() if lin.bias is not None else like.new_zeros(n)


def _set_conv(conv: nn.Conv1d, how: str) -> None:
    """'identity': y_t = x_t (last tap 1, others 0, bias 0); 'default': leave PyTorch's init."""
    if how == "identity":
        conv.weight.zero_()
        conv.weight[:, 0, -1] = 1.0
        if conv.bias is not None:
            conv.bias.zero_()
    elif how != "default":
        raise ConversionError(f"conv_init {how!r}; choose one of {CONV_INITS}")


def _copy_linear_rows(dst: nn.Linear, lo: int, src_w: Tensor, src_b: Optional[Tensor]) -> None:
    dst.weight[lo: lo + src_w.shape[0]] = src_w
    if dst.bias is not None:
        dst.bias[lo: lo + src_w.shape[0]] = src_b if src_b is not None else 0.0


def _copy_out(dst: nn.Linear, o_proj: nn.Linear) -> None:
    if dst.weight.shape != o_proj.weight.shape:
        raise ConversionError(f"out projection {tuple(dst.weight.shape)} does not match the attention's "
                              f"o_proj {tuple(o_proj.weight.shape)}")
    dst.weight.copy_(o_proj.weight)
    if dst.bias is not None:
        dst.bias.copy_(_bias_or_zeros(o_proj, dst.bias.numel(), dst.bias))


def _check_shape(name: str, got: int, want: int, mixer: str) -> None:
    if got != want:
        raise ConversionError(f"{mixer}: {name} is {got} but attention init needs {want}; use the derived "
                              "config (no mixer_config overrides of the shapes) or init='random'")


# ---------------------------------------------------------------------------- initialisers
@torch.no_grad()
def init_mamba2_from_attention(m, attn, conv_init: str = "default") -> None:
    """MIL: in_proj rows [z, x←V, B←K, C←Q, dt], out_proj←O; SSM parameters re-initialised."""
    H, Hkv, P = attn.num_heads, attn.num_kv_heads, attn.head_dim
    _check_shape("d_xb", m.d_xb or -1, Hkv * P, "mamba2")
    _check_shape("d_inner", m.d_inner, H * P, "mamba2")
    _check_shape("nheads", m.nheads, H, "mamba2")
    d_in, d_xb = m.d_inner, m.d_xb
    if m.in_proj.bias is not None:
        m.in_proj.bias.zero_()                                         # z and dt rows
    _copy_linear_rows(m.in_proj, d_in, attn.v_proj.weight, attn.v_proj.bias)
    _copy_linear_rows(m.in_proj, d_in + d_xb, attn.k_proj.weight, attn.k_proj.bias)
    _copy_linear_rows(m.in_proj, d_in + 2 * d_xb, attn.q_proj.weight, attn.q_proj.bias)
    _copy_out(m.out_proj, attn.o_proj)
    m.reset_ssm_parameters()                                           # A_log = log U(1,16), D = 1, dt bias
    _set_conv(m.conv1d, conv_init)


@torch.no_grad()
def init_mamba1_from_attention(m, attn, conv_init: str = "default") -> None:
    """MIL Mamba-1: in_proj x←V, x_proj B←K, C←Q, out_proj←O (z, dt, A, D keep the mixer init)."""
    H, Hkv, P = attn.num_heads, attn.num_kv_heads, attn.head_dim
    if not m.mil:
        raise ConversionError("mamba1: attention init needs the Mamba-in-the-Llama layout (d_xb set)")
    _check_shape("num_heads", m.num_heads, H, "mamba1")
    _check_shape("d_state", m.d_state, P, "mamba1")
    _check_shape("d_xb", m.conv_dim, Hkv * P, "mamba1")
    R = m.dt_rank
    if m.in_proj.bias is not None:
        m.in_proj.bias.zero_()
    if m.x_proj.bias is not None:
        m.x_proj.bias.zero_()
    _copy_linear_rows(m.in_proj, 0, attn.v_proj.weight, attn.v_proj.bias)
    _copy_linear_rows(m.x_proj, R, attn.k_proj.weight, attn.k_proj.bias)
    _copy_linear_rows(m.x_proj, R + m.b_width, attn.q_proj.weight, attn.q_proj.bias)
    _copy_out(m.out_proj, attn.o_proj)
    _set_conv(m.conv1d, conv_init)


@torch.no_grad()
def init_discrete_mamba2_from_attention(m, attn, conv_init: str = "default") -> None:
    """MOHAWK: in_proj rows [x←V (repeated), B←K (repeated), C←Q, z, a], out_proj←O."""
    H, Hkv, P = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rep = H // Hkv
    _check_shape("n_qk_heads", m.n_qk_heads, H, "discrete_mamba2")
    _check_shape("n_v_heads", m.n_v_heads, H, "discrete_mamba2")
    _check_shape("d_state", m.d_state, P, "discrete_mamba2")
    _check_shape("headdim", m.headdim, P, "discrete_mamba2")
    d_in, GN = m.d_inner, m.n_qk_heads * m.d_state

    def rep_b(lin):
        return None if lin.bias is None else _rows_repeated(lin.bias, Hkv, rep)

    if m.in_proj.bias is not None:
        m.in_proj.bias.zero_()                                         # z and a rows
    _copy_linear_rows(m.in_proj, 0, _rows_repeated(attn.v_proj.weight, Hkv, rep), rep_b(attn.v_proj))
    _copy_linear_rows(m.in_proj, d_in, _rows_repeated(attn.k_proj.weight, Hkv, rep), rep_b(attn.k_proj))
    _copy_linear_rows(m.in_proj, d_in + GN, attn.q_proj.weight, attn.q_proj.bias)
    _copy_out(m.out_proj, attn.o_proj)
    m.D.fill_(1.0)
    if m.z_bias is not None:
        m.z_bias.zero_()
    _set_conv(m.conv1d, conv_init)


def alibi_slopes(num_heads: int) -> Tensor:
    """m_h = 2^(−8(h+1)/H), h = 0 … H−1 (ALiBi's geometric slopes, for any H)."""
    return torch.pow(2.0, -8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64) / num_heads)


def _gelu_tanh_inverse_of_one() -> float:
    """b with gelu_tanh(b) = 1 (bisection in float64)."""
    lo, hi = 0.0, 2.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if F.gelu(torch.tensor(mid, dtype=torch.float64), approximate="tanh").item() < 1.0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


GELU_TANH_INV_ONE = _gelu_tanh_inverse_of_one()


@torch.no_grad()
def init_rglru_from_attention(blk, attn, conv_init: str = "identity") -> None:
    """hybridize's ALiBi-EMA initialisation of a Griffin recurrent block (see the module docstring)."""
    H, Hkv, P = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rep = H // Hkv
    _check_shape("lru_width", blk.lru_width, H * P, "rglru")
    lru = blk.rg_lru
    _check_shape("num_heads", lru.num_heads, H, "rglru")
    blk.linear_x.weight.copy_(_rows_repeated(attn.v_proj.weight, Hkv, rep))
    if blk.linear_x.bias is not None:
        vb = attn.v_proj.bias
        blk.linear_x.bias.copy_(_rows_repeated(vb, Hkv, rep) if vb is not None else 0.0)
    _copy_out(blk.linear_out, attn.o_proj)
    if blk.linear_y.bias is not None:                                  # GeLU gate ≡ 1
        blk.linear_y.weight.zero_()
        blk.linear_y.bias.fill_(GELU_TANH_INV_ONE)
    _set_conv(blk.conv_1d, conv_init)
    # decay a_h = exp(−m_h) at r = ½:  a_base^(c/2) = a_h
    a_h = torch.exp(-alibi_slopes(H)).repeat_interleave(P)             # (W,) float64
    a_base = a_h ** (2.0 / lru.c)
    lru.recurrent_param.copy_(torch.log(1.0 / a_base - 1.0))           # exp(−softplus(Λ)) = a_base
    lru.recurrent_gate_weight.zero_()
    lru.recurrent_gate_bias.zero_()
    i = torch.sqrt((1.0 - a_h) / (1.0 + a_h))                          # √(1−a²)·i = 1 − a
    lru.input_gate_weight.zero_()
    lru.input_gate_bias.copy_(torch.log(i / (1.0 - i)).view(H, P))


INITIALISERS = {"mamba2": (init_mamba2_from_attention, "default"),
                "mamba1": (init_mamba1_from_attention, "default"),
                "discrete_mamba2": (init_discrete_mamba2_from_attention, "default"),
                "rglru": (init_rglru_from_attention, "identity")}


# ---------------------------------------------------------------------------- convert
def convert(teacher, mixer: str = "mamba2", attention_layers: Optional[Sequence[int]] = None,
            attention_fraction: Optional[float] = None, init: str = "attention", seed: int = 0, *,
            conv_init: Optional[str] = None, mixer_config: Optional[dict] = None):
    """Convert a (partly) attention `HybridLM` into a hybrid student → new `HybridLM` (teacher untouched).

    mixer:              "mamba2" | "mamba1" | "rglru" | "discrete_mamba2".
    attention_layers:   layers that keep attention (overrides attention_fraction).
    attention_fraction: 1, 0.875, 0.75, 0.5 (default), 0.25, 0.125 or 0 — interleaved as in MIL.
    init:               "attention" (weights from the teacher's attention, see the module docstring) or
                        "random" (the mixer's own initialisation).
    conv_init:          "default" (PyTorch's Conv1d init, as MIL's code) or "identity"; None → the
                        mixer's default here (identity for rglru, default for the others).
    mixer_config:       overrides of the derived mixer config (e.g. {"chunk_size": 128}).
    """
    from hybridize.layers.attention import Attention
    from hybridize.model import HybridLM

    if not isinstance(teacher, HybridLM):
        raise ConversionError(f"convert() needs a hybridize HybridLM teacher, got {type(teacher).__name__}; "
                              "load one with hybridize.load(path)")
    if mixer not in CONVERTIBLE_MIXERS:
        raise ConversionError(f"mixer {mixer!r} cannot be converted to; choose one of {CONVERTIBLE_MIXERS}")
    if init not in INIT_MODES:
        raise ConversionError(f"init {init!r}; choose one of {INIT_MODES}")
    tcfg = teacher.cfg
    keep = resolve_attention_layers(tcfg.num_layers, attention_layers, attention_fraction)
    not_attn = [i for i in keep if tcfg.layer_pattern[i] != "attention"]
    if not_attn:
        raise ConversionError(f"layers {not_attn} are to keep attention but the teacher has "
                              f"{[tcfg.layer_pattern[i] for i in not_attn]} there; keep only attention "
                              f"layers (the teacher's attention layers are {tcfg.attention_layers()})")
    wrong = [i for i in range(tcfg.num_layers)
             if i not in keep and tcfg.layer_pattern[i] not in ("attention", mixer)]
    if wrong:
        raise ConversionError(f"layers {wrong} of the teacher are {[tcfg.layer_pattern[i] for i in wrong]}, "
                              f"which cannot become {mixer}; convert from an attention model (or one with "
                              f"{mixer} layers)")
    if not tcfg.attention_layers():
        raise ConversionError("the teacher has no attention layers to convert")
    cfg = student_config(tcfg, mixer, keep, mixer_config)
    init_fn, default_conv = INITIALISERS[mixer]
    conv_init = conv_init or default_conv
    if conv_init not in CONV_INITS:
        raise ConversionError(f"conv_init {conv_init!r}; choose one of {CONV_INITS}")

    p = next(teacher.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = HybridLM(cfg)
        student.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            _copy_shared(teacher, student)
            for i, (tb, sb) in enumerate(zip(teacher.layers, student.layers)):
                if sb.kind == tb.kind:                                 # kept attention / already converted
                    sb.mixer.load_state_dict(tb.mixer.state_dict())
                elif init == "attention":
                    assert isinstance(tb.mixer, Attention)
                    init_fn(sb.mixer, tb.mixer, conv_init)
                elif conv_init == "identity":
                    _set_conv(_conv_of(sb.mixer), "identity")
    student.refresh_buffers()
    student.train(teacher.training)
    return student


def _conv_of(mixer) -> nn.Conv1d:
    return getattr(mixer, "conv1d", None) or getattr(mixer, "conv_1d")


def _copy_shared(teacher, student) -> None:
    """Embeddings, head, final norm, and every block's norms and MLP."""
    student.embed_tokens.load_state_dict(teacher.embed_tokens.state_dict())
    student.norm.load_state_dict(teacher.norm.state_dict())
    if not student.cfg.tie_embeddings:
        student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    for tb, sb in zip(teacher.layers, student.layers):
        sb.mixer_norm.load_state_dict(tb.mixer_norm.state_dict())
        if sb.mlp is not None:
            sb.mlp_norm.load_state_dict(tb.mlp_norm.state_dict())
            sb.mlp.load_state_dict(tb.mlp.state_dict())


def converted_layers(student, teacher=None) -> list[int]:
    """Layers whose mixer is not attention (or, given the teacher, differs from the teacher's)."""
    if teacher is None:
        return [i for i, k in enumerate(student.layer_pattern) if k != "attention"]
    return [i for i, (a, b) in enumerate(zip(student.layer_pattern, teacher.layer_pattern)) if a != b]


def describe(student) -> dict:
    """A small JSON-able summary of a (converted) model's layout."""
    pat = student.layer_pattern
    return {"layer_pattern": pat, "attention_layers": [i for i, k in enumerate(pat) if k == "attention"],
            "attention_fraction": sum(k == "attention" for k in pat) / len(pat),
            "parameters": sum(p.numel() for p in student.parameters())}


__all__ = ["convert", "ConversionError", "attention_layers_for_fraction", "resolve_attention_layers",
           "derive_mixer_config", "student_config", "converted_layers", "CONVERTIBLE_MIXERS",
           "init_mamba2_from_attention", "init_mamba1_from_attention", "init_discrete_mamba2_from_attention",
           "init_rglru_from_attention", "alibi_slopes", "describe"]
