"""Typed configuration of a HybridLM: one dataclass per mixer kind, validation that explains what is
wrong, and presets (including tiny debug sizes for tests).

A model is described by `HybridConfig.layer_pattern`, a list with one mixer kind per layer:
"attention", "mamba2", "mamba1", "rglru", "discrete_mamba2".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

MIXER_KINDS = ("attention", "mamba2", "mamba1", "rglru", "discrete_mamba2")


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message says which and how to fix it."""


@dataclass
class AttentionConfig:
    num_heads: int = 8
    num_kv_heads: Optional[int] = None          # None → num_heads (MHA); 1 → MQA
    head_dim: Optional[int] = None              # None → hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None         # {"rope_type": "llama3"|"linear"|"default", ...} as in HF
    partial_rotary_factor: float = 1.0          # fraction of head_dim that is rotated
    rope_interleaved: bool = False              # False: split-half (Llama/NeoX); True: GPT-J pairs
    max_position_embeddings: int = 8192
    sliding_window: Optional[int] = None        # None → full causal attention
    qkv_bias: bool = False
    o_bias: bool = False
    softmax_scale: Optional[float] = None       # None → head_dim ** -0.5


@dataclass
class Mamba2Config:
    """Mamba-2 block. `d_inner = expand * hidden_size` unless set. Mamba-in-the-Llama layout:
    `d_xb` = width of x and B before repetition over query groups (n_kv_heads * head_dim); None → the
    standard Mamba-2 layout (x of width d_inner, B/C of width ngroups * d_state)."""
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    d_inner: Optional[int] = None
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple = (0.0, float("inf"))
    A_init_range: tuple = (1.0, 16.0)
    conv_bias: bool = True
    bias: bool = False                          # in_proj / out_proj bias
    norm_group_size: Optional[int] = None       # None → d_inner // ngroups
    norm_before_gate: bool = False
    norm_eps: float = 1e-5
    d_xb: Optional[int] = None                  # Mamba-in-the-Llama: x/B width before repetition
    D_has_hdim: bool = False


@dataclass
class Mamba1Config:
    """Mamba-1 selective-scan block. Mamba-in-the-Llama layout: `d_xb` set (x and B from the key/value
    width, repeated over query groups; C at the query width, with `repeat_heads` heads of `d_state`)."""
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    d_inner: Optional[int] = None
    dt_rank: Optional[int] = None               # None → ceil(hidden_size / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    d_xb: Optional[int] = None
    num_heads: Optional[int] = None             # MIL layout: number of query heads (C is per head)


@dataclass
class RGLRUConfig:
    """Griffin's recurrent block with the RG-LRU."""
    lru_width: Optional[int] = None             # None → hidden_size
    num_heads: int = 8                          # blocks of the block-diagonal gate weights
    d_conv: int = 4
    c: float = 8.0
    min_decay: float = 0.9                      # base decay a = sigmoid(Λ) initialised in [min, max]
    max_decay: float = 0.999
    conv_bias: bool = True
    bias: bool = True                           # biases of the linear projections


@dataclass
class DiscreteMamba2Config:
    """MOHAWK's discrete Mamba-2 (Phi-Mamba): per-head B/C (n_qk_heads), per-head input-dependent decay
    exp(-softplus(a_t)), no dt, D skip, z gate, out_proj(y * silu(z))."""
    d_state: int = 64
    n_qk_heads: int = 8
    n_v_heads: int = 8
    d_conv: int = 4
    expand: int = 1
    d_inner: Optional[int] = None
    chunk_size: int = 64
    conv_bias: bool = True
    bias: bool = False
    activation: str = "identity"                # after the conv: "identity" (Phi-Mamba / Llamba) or "silu"


@dataclass
class MLPConfig:
    intermediate_size: int = 0                  # 0 → no MLP (e.g. HF Mamba2 blocks)
    activation: str = "silu"                    # "silu" (SwiGLU) | "gelu_tanh" (GeGLU) | "gelu"
    bias: bool = False


@dataclass
class HybridConfig:
    vocab_size: int = 32000
    hidden_size: int = 512
    layer_pattern: list = field(default_factory=lambda: ["attention"] * 4)
    mlp: MLPConfig = field(default_factory=lambda: MLPConfig(intermediate_size=1408))
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    mamba1: Mamba1Config = field(default_factory=Mamba1Config)
    rglru: RGLRUConfig = field(default_factory=RGLRUConfig)
    discrete_mamba2: DiscreteMamba2Config = field(default_factory=DiscreteMamba2Config)
    norm_eps: float = 1e-6
    norm_offset: float = 0.0                    # 1.0 for Gemma-style (1 + w) RMSNorm weights
    tie_embeddings: bool = False
    embedding_scale: Optional[float] = None     # e.g. sqrt(hidden_size) for Griffin/RecurrentGemma
    embedding_scale_in_dtype: bool = True       # round the scale to the activation dtype (as Gemma does)
    logit_softcap: Optional[float] = None       # logits = cap * tanh(logits / cap)
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2
    pad_token_id: Optional[int] = None
    name: str = "hybrid"

    # ---------------------------------------------------------------- derived
    @property
    def num_layers(self) -> int:
        return len(self.layer_pattern)

    def attention_layers(self) -> list:
        return [i for i, k in enumerate(self.layer_pattern) if k == "attention"]

    # ---------------------------------------------------------------- validation
    def validate(self) -> "HybridConfig":
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        need(self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
        need(self.hidden_size > 0, f"hidden_size must be positive, got {self.hidden_size}")
        need(isinstance(self.layer_pattern, (list, tuple)) and len(self.layer_pattern) > 0,
             "layer_pattern must be a non-empty list of mixer kinds, e.g. ['attention', 'mamba2']")
        for i, k in enumerate(self.layer_pattern):
            need(k in MIXER_KINDS, f"layer_pattern[{i}] = {k!r} is not a mixer kind; choose one of {MIXER_KINDS}")
        kinds = set(self.layer_pattern)
        need(self.mlp.intermediate_size >= 0, "mlp.intermediate_size must be >= 0 (0 disables the MLP)")
        need(self.mlp.activation in ("silu", "gelu_tanh", "gelu"),
             f"mlp.activation = {self.mlp.activation!r}; choose 'silu', 'gelu_tanh' or 'gelu'")
        if "attention" in kinds:
            a = self.attention
            need(a.num_heads > 0, "attention.num_heads must be positive")
            kv = a.num_kv_heads or a.num_heads
            need(a.num_heads % kv == 0,
                 f"attention.num_heads ({a.num_heads}) must be a multiple of num_kv_heads ({kv}) for GQA")
            hd = a.head_dim or self.hidden_size // a.num_heads
            need(a.head_dim is not None or self.hidden_size % a.num_heads == 0,
                 f"hidden_size {self.hidden_size} is not divisible by attention.num_heads {a.num_heads}; set head_dim")
            rot = int(hd * a.partial_rotary_factor)
            need(0 < a.partial_rotary_factor <= 1 and rot % 2 == 0,
                 f"partial_rotary_factor {a.partial_rotary_factor} × head_dim {hd} must give an even rotary width")
            need(a.sliding_window is None or a.sliding_window > 0, "attention.sliding_window must be > 0 or None")
        if "mamba2" in kinds:
            m = self.mamba2
            d_inner = m.d_inner or m.expand * self.hidden_size
            need(d_inner % m.headdim == 0, f"mamba2: d_inner {d_inner} must be a multiple of headdim {m.headdim}")
            nheads = d_inner // m.headdim
            need(nheads % m.ngroups == 0, f"mamba2: nheads {nheads} must be a multiple of ngroups {m.ngroups}")
            need(m.chunk_size > 0, "mamba2.chunk_size must be positive")
            need(0 < m.dt_min <= m.dt_max, f"mamba2: need 0 < dt_min <= dt_max, got {m.dt_min}, {m.dt_max}")
            if m.d_xb is not None:
                need(d_inner % m.d_xb == 0 and m.d_xb % m.headdim == 0,
                     f"mamba2: d_xb {m.d_xb} must divide d_inner {d_inner} and be a multiple of headdim {m.headdim}")
        if "mamba1" in kinds:
            m1 = self.mamba1
            need(m1.d_state > 0 and m1.d_conv >= 1, "mamba1: d_state must be > 0 and d_conv >= 1")
        if "rglru" in kinds:
            r = self.rglru
            w = r.lru_width or self.hidden_size
            need(w % r.num_heads == 0, f"rglru: lru_width {w} must be a multiple of num_heads {r.num_heads}")
            need(0 < r.min_decay < r.max_decay < 1, "rglru: need 0 < min_decay < max_decay < 1")
        if "discrete_mamba2" in kinds:
            d = self.discrete_mamba2
            d_inner = d.d_inner or d.expand * self.hidden_size
            need(d_inner % d.n_v_heads == 0, f"discrete_mamba2: d_inner {d_inner} must be a multiple of n_v_heads")
            need(d.n_v_heads % d.n_qk_heads == 0, "discrete_mamba2: n_v_heads must be a multiple of n_qk_heads")
        return self

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for sub in ("mamba2",):
            lim = d[sub]["dt_limit"]
            d[sub]["dt_limit"] = [lim[0], None if math.isinf(lim[1]) else lim[1]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HybridConfig":
        d = dict(d)
        subs = {"mlp": MLPConfig, "attention": AttentionConfig, "mamba2": Mamba2Config,
                "mamba1": Mamba1Config, "rglru": RGLRUConfig, "discrete_mamba2": DiscreteMamba2Config}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown HybridConfig fields {sorted(unknown)}; known fields: {sorted(known)}")
        for name, typ in subs.items():
            if name in d and isinstance(d[name], dict):
                sd = dict(d[name])
                sk = {f.name for f in dataclasses.fields(typ)}
                bad = set(sd) - sk
                if bad:
                    raise ConfigError(f"unknown {name} config fields {sorted(bad)}; known: {sorted(sk)}")
                if name == "mamba2" and "dt_limit" in sd:
                    lo, hi = sd["dt_limit"]
                    sd["dt_limit"] = (float(lo), float("inf") if hi is None else float(hi))
                for t in ("A_init_range",):
                    if t in sd:
                        sd[t] = tuple(sd[t])
                d[name] = typ(**sd)
        d["layer_pattern"] = list(d.get("layer_pattern", []))
        return cls(**d).validate()


# ---------------------------------------------------------------------- presets
def _pattern_every(n_layers: int, every: Optional[int], mixer: str) -> list:
    """Attention at every `every`-th layer (counting from the last in each group, as in the paper's
    interleaving), `mixer` elsewhere; every=None → no attention."""
    if every is None:
        return [mixer] * n_layers
    return ["attention" if (i % every) == every - 1 else mixer for i in range(n_layers)]


def preset(name: str, **overrides) -> HybridConfig:
    """Named configurations. Sizes: `debug` (tests), `tiny` (CPU demo), `small`, `1b`.

    Names: llama-<size>, hawk-<size>, griffin-<size>, mamba2-<size>, mil50-<size>, mil25-<size>,
    mil12-<size> (Mamba-in-the-Llama hybrids with 50/25/12.5 % attention).
    """
    if "-" not in name:
        raise ConfigError(f"preset name {name!r} must look like '<family>-<size>'; see `hybridize info --list`")
    family, size = name.rsplit("-", 1)
    sizes = {
        #          d,    layers, heads, kv, vocab, ffn
        "debug": (64, 4, 4, 2, 256, 128),
        "tiny": (256, 6, 8, 4, 4096, 704),
        "small": (768, 12, 12, 4, 32000, 2048),
        "1b": (2048, 16, 32, 8, 128256, 8192),
    }
    if size not in sizes:
        raise ConfigError(f"unknown preset size {size!r}; choose one of {sorted(sizes)}")
    d, n, h, kv, vocab, ffn = sizes[size]
    hd = d // h
    attn = AttentionConfig(num_heads=h, num_kv_heads=kv, head_dim=hd, rope_theta=10000.0)
    mil_m2 = Mamba2Config(d_state=hd, headdim=hd, d_inner=d, d_xb=kv * hd, ngroups=h, expand=1,
                          chunk_size=64 if size != "debug" else 16)
    if family == "llama":
        cfg = HybridConfig(vocab_size=vocab, hidden_size=d, layer_pattern=["attention"] * n,
                           mlp=MLPConfig(ffn), attention=attn)
    elif family in ("mil50", "mil25", "mil12", "mil0"):
        every = {"mil50": 2, "mil25": 4, "mil12": 8, "mil0": None}[family]
        cfg = HybridConfig(vocab_size=vocab, hidden_size=d, layer_pattern=_pattern_every(n, every, "mamba2"),
                           mlp=MLPConfig(ffn), attention=attn, mamba2=mil_m2)
    elif family == "mamba2":
        cfg = HybridConfig(vocab_size=vocab, hidden_size=d, layer_pattern=["mamba2"] * n,
                           mlp=MLPConfig(0), tie_embeddings=True,
                           mamba2=Mamba2Config(d_state=min(128, 4 * hd), headdim=min(64, hd), expand=2,
                                               chunk_size=64 if size != "debug" else 16))
        cfg.layer_pattern = ["mamba2"] * (2 * n)   # no MLP → twice the layers, as in Mamba-2
    elif family in ("hawk", "griffin"):
        r = RGLRUConfig(lru_width=d, num_heads=h)
        pattern = ["rglru"] * n if family == "hawk" else \
            ["attention" if i % 3 == 2 else "rglru" for i in range(n)]
        cfg = HybridConfig(vocab_size=vocab, hidden_size=d, layer_pattern=pattern,
                           mlp=MLPConfig(3 * d, activation="gelu_tanh"),
                           attention=AttentionConfig(num_heads=h, num_kv_heads=1, head_dim=hd,
                                                     sliding_window=1024 if size != "debug" else 16),
                           rglru=r, tie_embeddings=True, embedding_scale=math.sqrt(d))
    else:
        raise ConfigError(f"unknown preset family {family!r}; choose llama, hawk, griffin, mamba2, "
                          "mil50, mil25, mil12 or mil0")
    if size == "1b" and family != "mamba2":
        cfg.tie_embeddings = True      # as Llama-3.2-1B: 1.24 B parameters for the Transformer
    cfg.name = name
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ConfigError(f"unknown override {k!r} for preset {name!r}")
        setattr(cfg, k, v)
    return cfg.validate()


PRESET_FAMILIES = ("llama", "hawk", "griffin", "mamba2", "mil50", "mil25", "mil12", "mil0")
PRESET_SIZES = ("debug", "tiny", "small", "1b")
