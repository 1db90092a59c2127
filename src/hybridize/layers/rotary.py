"""Rotary position embeddings (RoPE), numerically matching Hugging Face transformers.

Frequencies: ``inv_freq[i] = 1 / theta ** (2i / R)`` for ``i < R / 2``, where ``R = rot_dim =
int(head_dim * partial_rotary_factor)`` (the exponent's denominator is the *rotated* width, as in HF's
``_compute_*_parameters`` and RecurrentGemma), then rescaled per ``rope_type``:

* ``"default"``: unchanged.
* ``"linear"``: ``inv_freq / factor`` (position interpolation).
* ``"llama3"``: Llama 3.1's smooth low/high-frequency blend (``factor``, ``low_freq_factor``,
  ``high_freq_factor``, ``original_max_position_embeddings``), exactly HF's ``_compute_llama3_parameters``.
* ``"yarn"``: YaRN (HF's ``_compute_yarn_parameters``); it also scales cos/sin by an attention factor.

``"dynamic"`` (dynamic NTK) is not supported: HF recomputes its frequencies from the longest sequence
seen so far, so a token's embedding depends on the call history — incompatible with exact KV caching.

Only the first ``R`` dims of each head are rotated; the remaining ``head_dim - R`` pass through
unchanged (HF ``partial_rotary_factor`` semantics, e.g. RecurrentGemma uses 0.5). Within those ``R``
dims two layouts exist:

* split-half (Llama / GPT-NeoX, default): dim ``j`` is paired with ``j + R/2`` (``rotate_half``);
* interleaved (GPT-J, ``rope_interleaved=True``): dim ``2j`` is paired with ``2j + 1``.

Everything is computed in fp32; ``apply_rotary`` casts the result back to the input dtype. (HF casts
cos/sin to the activation dtype first and rotates in that dtype, so bf16 results differ by rounding.)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hybridize.config import AttentionConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rotate_half(x: Tensor) -> Tensor:
    """Split-half layout: (x1, x2) → (-x2, x1) over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: Tensor) -> Tensor:
    """Interleaved layout: pairs (x[2j], x[2j+1]) → (-x[2j+1], x[2j])."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> Tensor:
    """Rotate the first ``R = cos.shape[-1]`` dims of every head of ``x``.

    x: (B, H, L, P); cos, sin: (B, L, R) as returned by ``RotaryEmbedding.forward`` (same layout as
    ``interleaved``), R <= P, R even. Returns (B, H, L, P) in x's dtype; computed in fp32.
    """
    rot = cos.shape[-1]
    cos, sin = cos[:, None].float(), sin[:, None].float()       # broadcast over heads
    xf = x.float()
    x_rot, x_pass = xf[..., :rot], xf[..., rot:]
    rotated = rotate_every_two(x_rot) if interleaved else rotate_half(x_rot)
    out = x_rot * cos + rotated * sin
    if x_pass.shape[-1]:
        out = torch.cat((out, x_pass), dim=-1)
    return out.to(x.dtype)


def _rope_params(cfg: AttentionConfig) -> dict:
    """The rope dict of ``cfg`` normalised: keys ``rope_type``, ``rope_theta``, ``partial_rotary_factor``
    plus the type's own parameters. Accepts HF's ``rope_scaling`` (old, ``"type"`` key) and
    ``rope_parameters`` (transformers 5, may carry ``rope_theta`` / ``partial_rotary_factor``)."""
    d = dict(cfg.rope_scaling or {})
    rope_type = d.pop("rope_type", None) or d.pop("type", None) or "default"
    d.pop("type", None)
    # HF 5 dicts repeat these; they must agree with the config's own fields (validate() relies on them).
    for key, own in (("rope_theta", cfg.rope_theta), ("partial_rotary_factor", cfg.partial_rotary_factor)):
        if key in d and d[key] is not None and not math.isclose(float(d[key]), float(own)):
            raise ValueError(f"rope_scaling[{key!r}] = {d[key]} disagrees with AttentionConfig.{key} = "
                             f"{own}; set AttentionConfig.{key} to the checkpoint's value")
        d[key] = own
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; choose one of {SUPPORTED_ROPE_TYPES} "
                         "('dynamic' depends on the call history and cannot be cached exactly)")
    d["rope_type"] = rope_type
    return d


def compute_inv_freq(rot_dim: int, params: dict, max_position_embeddings: int) -> tuple[Tensor, float]:
    """(inv_freq (rot_dim // 2,) fp32 on CPU, attention_scaling) for normalised rope ``params``.

    Mirrors transformers' ``ROPE_INIT_FUNCTIONS`` operation by operation (same fp32 rounding)."""
    base = params["rope_theta"]
    rope_type = params["rope_type"]
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / params["factor"], 1.0
    if rope_type == "llama3":
        factor = params["factor"]
        low_freq_factor = params["low_freq_factor"]
        high_freq_factor = params["high_freq_factor"]
        old_context_len = params.get("original_max_position_embeddings") or max_position_embeddings
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are interpolated (÷ factor), short ones kept, the band between blended smoothly
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama), 1.0
    if rope_type == "yarn":
        factor = params.get("factor")
        orig = params.get("original_max_position_embeddings") or max_position_embeddings
        if factor is None:
            factor = max_position_embeddings / orig
        attention_factor = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")

        def get_mscale(scale, m=1):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
            else:
                attention_factor = get_mscale(factor)
        beta_fast = params.get("beta_fast") or 32
        beta_slow = params.get("beta_slow") or 1

        def correction_dim(num_rot):
            return (rot_dim * math.log(orig / (num_rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rot_dim - 1)
        if low == high:
            high += 0.001                                   # avoid a zero-width ramp
        ramp = ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos_freqs = base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        extra_factor = 1 - ramp
        inv = interpolation * (1 - extra_factor) + extrapolation * extra_factor
        return inv, float(attention_factor)
    raise AssertionError(rope_type)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE.

    ``RotaryEmbedding(head_dim, cfg)``; ``forward(position_ids (B, L)) → cos, sin (B, L, R)`` in fp32,
    already in this module's layout (split-half: ``cat(f, f)``; interleaved: each frequency repeated
    twice), scaled by the rope type's attention factor (1 except YaRN). ``apply_rotary(x, cos, sin)``
    rotates q or k of shape (B, H, L, P).
    """

    def __init__(self, head_dim: int, cfg: AttentionConfig):
        super().__init__()
        self.head_dim = head_dim
        self.rot_dim = int(head_dim * cfg.partial_rotary_factor)
        if self.rot_dim % 2 or not 0 < self.rot_dim <= head_dim:
            raise ValueError(f"rotary width int({head_dim} * {cfg.partial_rotary_factor}) = {self.rot_dim} "
                             "must be even and in (0, head_dim]")
        self.interleaved = cfg.rope_interleaved
        self.params = _rope_params(cfg)
        self.max_position_embeddings = cfg.max_position_embeddings
        inv_freq, self.attention_scaling = compute_inv_freq(self.rot_dim, self.params,
                                                            self.max_position_embeddings)
        # non-persistent: HF checkpoints don't store it, so state dicts map 1:1
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` / `.half()` would round inv_freq (visible at long positions) and `to_empty()`
        # would leave garbage: always recompute it in fp32 (on CPU, like HF) on the new device.
        super()._apply(fn, recurse)
        inv_freq, _ = compute_inv_freq(self.rot_dim, self.params, self.max_position_embeddings)
        self._buffers["inv_freq"] = inv_freq.to(self._buffers["inv_freq"].device)
        return self

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids: (B, L) integer positions → cos, sin: (B, L, R) fp32."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()        # (B, L, R/2)
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos, sin

    def apply_rotary(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: (B, H, L, P) → rotated (B, H, L, P), x's dtype (see module-level ``apply_rotary``)."""
        return apply_rotary(x, cos, sin, interleaved=self.interleaved)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rot_dim={self.rot_dim}, rope_type={self.params['rope_type']!r}, "
                f"theta={self.params['rope_theta']}, interleaved={self.interleaved}")
