"""Decode matmuls: ``linear(x, weight, bias)`` runs the Triton GEMV (`triton.py`) for a one-row CUDA input,
and the skinny-M Triton GEMM (`hybridize.ops.gemm`) for 2..128 rows (batched decode), when that (rows, N,
K, dtype[, fused variant]) was tuned on this device and the kernel beat cuBLAS (plus the separate kernels a
fused variant replaces) there; everything else (training, prefill, untuned shapes, CPU) is ``F.linear``.

    prepare_decode_gemv(model, batch=B)   # route the model's Linears through `linear` and tune the
                                          # matmuls of its batch-B decode step (the generation engine
                                          # does this on CUDA for B <= 128)

Tuning (`tune_shape`) times each candidate block shape and cuBLAS in CUDA-graph replay over enough
copies of W to miss the L2 cache, keeps the fastest, and caches the outcome per GPU / triton / torch
version in ``$HYBRIDIZE_CACHE_DIR/gemv_tuning.json`` (default ``~/.cache/hybridize``), so later processes
skip it. HYBRIDIZE_GEMV=0 turns the routing off (A/B benchmarks); HYBRIDIZE_GEMM=0 only the batched one.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hybridize.ops import conv1d as conv_ops
from hybridize.ops._dispatch import use_kernels
from hybridize.ops.gemv.reference import GLU_ACTS, gemv_fused_reference, gemv_reference
from hybridize.ops.gemv.triton import ConvUpdate

#: (device type, device index, dtype, N, K, has_bias[, variant[, rows]]) → the kernel's config: (block_n,
#: block_k, num_warps, num_stages) of the GEMV (one row), (block_n, block_k, split_k, num_warps, num_stages)
#: of the skinny GEMM (rows > 1); or None: cuBLAS (plain) / the separate ops (fused variants) won. Read
#: inside compiled code: nothing in the key may need a host call. Variants: `variant_name` of a
#: `fused_linear` call.
_CHOICE: dict = {}
#: while `recording` is on: every (key → (weight, has_bias, variant, rows)) a decode call could send to a kernel
_RECORD: Optional[dict] = None
_SUPPORTED = (torch.bfloat16, torch.float16)
#: most rows the skinny GEMM takes (`hybridize.ops.gemm.triton.MAX_M`)
MAX_ROWS = 128
#: most rows for which the fused variants with a prologue (add / gate / norm) are tried: the prologue reworks
#: the (rows, K) input in every program, as much work as the weight tile once rows ~ block_n. At 64 rows on an
#: H100 every such variant lost to the plain GEMM + the separate kernels by 0.7-6.7 µs (qkv + norm 12.7 vs
#: 10.3 µs, Mamba-2's gated norm + out_proj 15.8 vs 9.1; benchmarks/results/decode_b64_skinny_h100.json;
#: again with stream-K in session 10: norm + gate/up + GLU 30.3 vs 27.2 + a ~2.3 µs norm kernel), so
#: above this `fused_linear` runs the prologue as separate ops and fuses the epilogue (GLU / residual) only
FUSED_MAX_ROWS = 16
#: every `tune_shape` record of this process (benchmarks put it in their JSON)
TUNE_LOG: list = []


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").lower() not in ("0", "off", "false", "no")


def gemv_wanted() -> bool:
    return _env_on("HYBRIDIZE_GEMV")


def gemm_wanted() -> bool:
    """HYBRIDIZE_GEMM=0: batched decode steps keep cuBLAS (A/B of the skinny Triton GEMM)."""
    return _env_on("HYBRIDIZE_GEMM")


def gemv_fusion_wanted() -> bool:
    """HYBRIDIZE_GEMV_FUSED=0: `fused_linear` runs its parts one by one (plain GEMV + separate ops; A/B).
    Read at call time on the host; compiled code bakes in the value it saw when it was traced."""
    return _env_on("HYBRIDIZE_GEMV_FUSED")


def _key(weight: Tensor, has_bias: bool, variant: str = "plain", rows: int = 1) -> tuple:
    d = weight.device
    key = (d.type, d.index, weight.dtype, int(weight.shape[0]), int(weight.shape[1]), bool(has_bias))
    key = key if variant == "plain" and rows == 1 else key + (variant,)
    return key if rows == 1 else key + (int(rows),)


def _disk_key(weight: Tensor, has_bias: bool, variant: str = "plain", rows: int = 1) -> str:
    """The tuning cache's key: the GPU's name instead of its index (host call; not for compiled code)."""
    dev = torch.cuda.get_device_name(weight.device) if weight.is_cuda else "cpu"
    key = "|".join(map(str, (dev, weight.dtype, weight.shape[0], weight.shape[1], bool(has_bias))))
    key = key if variant == "plain" and rows == 1 else f"{key}|{variant}"
    return key if rows == 1 else f"{key}|rows={int(rows)}"


def variant_name(add: bool = False, gate: bool = False, norm: bool = False, glu: Optional[str] = None,
                 residual: bool = False, norm_group: int = 0, conv: Optional[str] = None) -> str:
    """'plain' or the fused parts joined by '+', e.g. 'norm+glu:silu', 'gate+norm:64+res' (a norm over groups
    of 64 channels), 'norm+conv:2048:3072:4:silu:nobias' (`conv_variant`)."""
    parts = [n for n, on in (("add", add), ("gate", gate)) if on]
    parts += [f"norm:{norm_group}" if norm_group else "norm"] if norm else []
    parts += [f"glu:{glu}"] if glu else []
    parts += ["res"] if residual else []
    parts += [conv] if conv else []
    return "+".join(parts) or "plain"


def conv_variant(conv: "ConvUpdate") -> str:
    """The variant part of a conv epilogue: 'conv:<start>:<channels>:<width>:<activation>:<bias|nobias>'."""
    return (f"conv:{int(conv.start)}:{conv.weight.shape[0]}:{conv.weight.shape[-1]}:{conv.activation or 'none'}:"
            f"{'bias' if conv.bias is not None else 'nobias'}")


def _parse_variant(variant: str) -> dict:
    parts = set() if variant == "plain" else set(variant.split("+"))
    glu = next((p.split(":", 1)[1] for p in parts if p.startswith("glu:")), None)
    norm = next((p for p in parts if p == "norm" or p.startswith("norm:")), None)
    conv = next((p.split(":")[1:] for p in parts if p.startswith("conv:")), None)
    return dict(add="add" in parts, gate="gate" in parts, norm=norm is not None, glu=glu, residual="res" in parts,
                norm_group=int(norm.split(":")[1]) if norm and ":" in norm else 0,
                conv=None if conv is None else dict(start=int(conv[0]), channels=int(conv[1]), width=int(conv[2]),
                                                    activation=None if conv[3] == "none" else conv[3],
                                                    bias=conv[4] == "bias"))


def _has_prologue(variant: str) -> bool:
    """Whether a fused variant reworks the input (add / gate / norm), which only pays up to FUSED_MAX_ROWS."""
    v = _parse_variant(variant)
    return v["add"] or v["gate"] or v["norm"]


class recording:
    """``with recording() as calls:`` collects, instead of nothing, every (weight, has_bias, variant, rows)
    that a `linear` / `fused_linear` call could run as a Triton kernel (tuned or not): what
    `prepare_decode_gemv` must tune. calls: {key: (weight, has_bias, variant, rows)}."""

    def __enter__(self) -> dict:
        global _RECORD
        self._prev, _RECORD = _RECORD, {}
        return _RECORD

    def __exit__(self, *exc):
        global _RECORD
        _RECORD = self._prev


# ---------------------------------------------------------------------------- the custom op
def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor], cfg: tuple) -> Tensor:
    from hybridize.ops.gemv.triton import GemvConfig, gemv_triton
    return gemv_triton(x, weight, bias, GemvConfig(*cfg))


@torch.library.custom_op("hybridize::gemv", mutates_args=())
def _gemv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], block_n: int, block_k: int, num_warps: int,
             num_stages: int) -> Tensor:
    return _run(x, weight, bias, (block_n, block_k, num_warps, num_stages))


@_gemv_op.register_fake
def _(x, weight, bias, block_n, block_k, num_warps, num_stages):
    return x.new_empty(1, weight.shape[0])


def _gemv_config(x: Tensor, weight: Tensor, bias: Optional[Tensor], variant: str = "plain") -> Optional[tuple]:
    """The tuned Triton config for ``x · weightᵀ`` (fused `variant`) if a kernel serves it — the GEMV for
    one row, the skinny GEMM for 2..MAX_ROWS rows (x (..., K) flattened) — else None (F.linear / the
    separate ops). The config's length tells the two apart (4: GEMV, 5: skinny GEMM)."""
    K = weight.shape[-1]
    if x.shape[-1] != K or x.dtype != weight.dtype or weight.dtype not in _SUPPORTED or weight.dim() != 2 \
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)) \
            or not use_kernels(x, weight):
        return None
    rows = x.numel() // K if K else 0
    if rows < 1 or rows > MAX_ROWS or (rows > 1 and not _GEMM_WANTED[0]) \
            or (rows > FUSED_MAX_ROWS and _has_prologue(variant)):
        return None
    key = _key(weight, bias is not None, variant, rows)
    if _RECORD is not None:
        _RECORD.setdefault(key, (weight, bias is not None, variant, rows))
    return _CHOICE.get(key)


def _run_gemm(x, weight, bias, cfg, **fused):
    from hybridize.ops.gemm.triton import GemmConfig, skinny_gemm_triton
    return skinny_gemm_triton(x, weight, bias, GemmConfig(*cfg), **fused)


@torch.library.custom_op("hybridize::skinny_gemm", mutates_args=())
def _skinny_gemm_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], block_n: int, block_k: int,
                    split_k: int, num_warps: int, num_stages: int) -> Tensor:
    return _run_gemm(x, weight, bias, (block_n, block_k, split_k, num_warps, num_stages))


@_skinny_gemm_op.register_fake
def _(x, weight, bias, block_n, block_k, split_k, num_warps, num_stages):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``; x (..., K) with 1..MAX_ROWS rows takes the tuned Triton GEMV (one row)
    or skinny GEMM (more) when one is registered for this shape (see the module docstring) and no
    gradient is wanted."""
    cfg = _gemv_config(x, weight, bias)
    if cfg is None:
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, weight.shape[-1])
    compiling = torch.compiler.is_compiling()
    if len(cfg) == 5:
        y = torch.ops.hybridize.skinny_gemm(x2, weight, bias, *cfg) if compiling else _run_gemm(x2, weight, bias, cfg)
    elif compiling:
        y = torch.ops.hybridize.gemv(x2, weight, bias, *cfg)
    else:
        y = _run(x2, weight, bias, cfg)           # direct launch: custom_op's Python dispatch costs µs
    return y.view(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------- fused decode GEMV
def _run_fused(x, weight, bias, add, gate, norm_weight, residual, eps, norm_offset, norm_group, glu, cfg,
               conv=None):
    from hybridize.ops.gemv.triton import GemvConfig, gemv_triton
    out = gemv_triton(x, weight, bias, GemvConfig(*cfg), add=add, gate=gate, norm_weight=norm_weight, eps=eps,
                      norm_offset=norm_offset, norm_group=norm_group, glu=glu or None, residual=residual,
                      conv=conv)
    return out if add is not None else (out, x.new_empty(0))


@torch.library.custom_op("hybridize::gemv_fused_conv", mutates_args=("conv_state",))
def _gemv_fused_conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Optional[Tensor],
                        eps: float, norm_offset: float, conv_state: Tensor, conv_weight: Tensor,
                        conv_bias: Optional[Tensor], conv_start: int, conv_act: str, block_n: int, block_k: int,
                        num_warps: int, num_stages: int) -> Tensor:
    conv = ConvUpdate(conv_state, conv_weight, conv_bias, conv_start, conv_act or None)
    return _run_fused(x, weight, bias, None, None, norm_weight, None, eps, norm_offset, 0, "",
                      (block_n, block_k, num_warps, num_stages), conv)[0]


@_gemv_fused_conv_op.register_fake
def _(x, weight, bias, norm_weight, eps, norm_offset, conv_state, conv_weight, conv_bias, conv_start, conv_act,
      block_n, block_k, num_warps, num_stages):
    return x.new_empty(1, weight.shape[0])


@torch.library.custom_op("hybridize::skinny_gemm_fused", mutates_args=())
def _skinny_gemm_fused_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], add: Optional[Tensor],
                          gate: Optional[Tensor], norm_weight: Optional[Tensor], residual: Optional[Tensor],
                          eps: float, norm_offset: float, norm_group: int, glu: str, block_n: int, block_k: int,
                          split_k: int, num_warps: int, num_stages: int) -> Tuple[Tensor, Tensor]:
    return _run_gemm_fused(x, weight, bias, add, gate, norm_weight, residual, eps, norm_offset, norm_group, glu,
                           (block_n, block_k, split_k, num_warps, num_stages))


@_skinny_gemm_fused_op.register_fake
def _(x, weight, bias, add, gate, norm_weight, residual, eps, norm_offset, norm_group, glu, block_n, block_k,
      split_k, num_warps, num_stages):
    N = weight.shape[0] // 2 if glu else weight.shape[0]
    return x.new_empty(x.shape[0], N), (x.new_empty(x.shape) if add is not None else x.new_empty(0))


def _run_gemm_fused(x, weight, bias, add, gate, norm_weight, residual, eps, norm_offset, norm_group, glu, cfg):
    out = _run_gemm(x, weight, bias, cfg, add=add, gate=gate, norm_weight=norm_weight, eps=eps,
                    norm_offset=norm_offset, norm_group=norm_group, glu=glu or None, residual=residual)
    return out if add is not None else (out, x.new_empty(0))


@torch.library.custom_op("hybridize::gemv_fused", mutates_args=())
def _gemv_fused_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], add: Optional[Tensor],
                   gate: Optional[Tensor], norm_weight: Optional[Tensor], residual: Optional[Tensor], eps: float,
                   norm_offset: float, norm_group: int, glu: str, block_n: int, block_k: int, num_warps: int,
                   num_stages: int) -> Tuple[Tensor, Tensor]:
    return _run_fused(x, weight, bias, add, gate, norm_weight, residual, eps, norm_offset, norm_group, glu,
                      (block_n, block_k, num_warps, num_stages))


@_gemv_fused_op.register_fake
def _(x, weight, bias, add, gate, norm_weight, residual, eps, norm_offset, norm_group, glu, block_n, block_k,
      num_warps, num_stages):
    N = weight.shape[0] // 2 if glu else weight.shape[0]
    return x.new_empty(1, N), (x.new_empty(1, x.shape[-1]) if add is not None else x.new_empty(0))


#: read once per process (module constants for torch.compile; tests flip them)
_FUSION_WANTED = [gemv_fusion_wanted()]
_GEMM_WANTED = [gemm_wanted()]


def _norm_params(norm: nn.Module, gated: bool) -> Optional[tuple]:
    """(weight, eps, offset, group) of an RMSNorm (or of a gate-first GatedRMSNorm when `gated`; group = its
    group size, 0 for one group) the kernel's prologue reproduces; None for any other norm (the caller then
    runs the module itself)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 1:
        return None
    if gated:
        group = getattr(norm, "group_size", None)
        if getattr(norm, "norm_before_gate", True) or not isinstance(group, int) or w.numel() % group:
            return None
        return w, float(norm.eps), 0.0, (0 if group == w.numel() else group)
    if not hasattr(norm, "offset") or hasattr(norm, "group_size"):
        return None
    return w, float(norm.eps), float(norm.offset), 0


def fused_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, add: Optional[Tensor] = None,
                 norm: Optional[nn.Module] = None, gate: Optional[Tensor] = None, glu: Optional[str] = None,
                 residual: Optional[Tensor] = None, conv: Optional["ConvUpdate"] = None):
    """A decode-step matmul with its neighbours fused in; x (..., K) → y (..., N) [, h (..., K)]:

        h = x + add;  u = norm(h) (or norm(h, gate): Mamba-2's gated RMSNorm);  z = linear(u, weight, bias)
        y = act(z_gate) · z_up  (glu: weight = [gate rows; up rows]);  y = residual + y

    `h` (the residual stream) is returned too when `add` is given. For one row on CUDA with a tuned shape
    this is one Triton kernel (`triton.gemv_triton`; the RMSNorm's mean is taken in the same pass over K, so
    nothing extra is read); otherwise the modules / ops run one after another, exactly as unfused code
    would. In fp32 inside the kernel: results differ from the unfused ops by the roundings skipped.

    conv (a `ConvUpdate`, with at most a norm besides): Mamba's in_proj → conv1d step. Returns (y, c): c
    (..., C) = causal_conv1d_update(y[..., start:start + C], conv.state, ...) (the state advanced in place),
    y the projection; in the kernel path c is a view of y (its conv rows overwritten), otherwise the
    conv op's output (y untouched) — read only the other rows of y."""
    if gate is not None and norm is None:
        raise ValueError("fused_linear: gate is applied inside the gated norm; pass norm=GatedRMSNorm(...) too")
    if glu is not None and glu not in GLU_ACTS:
        raise ValueError(f"fused_linear: glu must be one of {sorted(GLU_ACTS)}, got {glu!r}")
    if conv is not None and (add is not None or gate is not None or glu is not None or residual is not None):
        raise ValueError("fused_linear: a conv epilogue combines with a norm only (no add / gate / glu / residual)")
    if (add is not None or norm is not None) and (glu is not None or residual is not None) and conv is None \
            and x.shape[-1] and x.numel() // x.shape[-1] > FUSED_MAX_ROWS:
        # many rows: the prologue (add / norm) runs as its own ops, the epilogue (GLU / residual) stays fused
        h = x if add is None else x + add
        y = fused_linear(norm(h, gate) if gate is not None else (norm(h) if norm is not None else h),
                         weight, bias, glu=glu, residual=residual)
        return (y, h) if add is not None else y
    if conv is not None and x.numel() != x.shape[-1]:
        # several rows: the conv epilogue is the GEMV's only (one row); the norm may still fuse into the GEMM
        z = fused_linear(x, weight, bias, norm=norm)
        return z, _conv_step(z, conv)
    nparams = _norm_params(norm, gate is not None) if norm is not None else None
    extras = [t for t in (add, gate, residual) if t is not None]
    cfg = None
    if _FUSION_WANTED[0] and (norm is None or nparams is not None) \
            and all(t.dtype == x.dtype and t.device == x.device for t in extras) \
            and (conv is None or (conv.state.device == x.device and x.numel() == x.shape[-1])):
        variant = variant_name(add is not None, gate is not None, norm is not None, glu, residual is not None,
                               nparams[3] if nparams is not None else 0, conv_variant(conv) if conv else None)
        cfg = _gemv_config(x, weight, bias, variant)
    if cfg is not None:
        nw, eps, off, group = nparams if nparams is not None else (None, 0.0, 0.0, 0)
        K = weight.shape[-1]
        if len(cfg) == 5:                       # skinny GEMM (several rows; no conv epilogue: not recorded)
            x2 = x.reshape(-1, K)
            rows = lambda t: None if t is None else t.reshape(x2.shape[0], -1)   # noqa: E731
            args = (x2, weight, bias, rows(add), rows(gate), nw, rows(residual), eps, off, group, glu or "")
            if torch.compiler.is_compiling():
                y, h = torch.ops.hybridize.skinny_gemm_fused(*args, *cfg)
            else:
                y, h = _run_gemm_fused(*args, cfg)
            y = y.view(*x.shape[:-1], y.shape[-1])
            return (y, h.view(x.shape)) if add is not None else y
        if conv is not None:
            cargs = (x.reshape(1, K), weight, bias, nw, eps, off, conv.state, conv.weight, conv.bias,
                     int(conv.start), conv.activation or "")
            if torch.compiler.is_compiling():
                y = torch.ops.hybridize.gemv_fused_conv(*cargs, *cfg)
            else:
                y = _run_fused(x.reshape(1, K), weight, bias, None, None, nw, None, eps, off, 0, "", cfg, conv)[0]
            y = y.view(*x.shape[:-1], y.shape[-1])
            return y, y[..., conv.start:conv.start + conv.weight.shape[0]]
        args = (x.reshape(1, K), weight, bias, add, gate, nw, residual, eps, off, group, glu or "")
        if torch.compiler.is_compiling():
            y, h = torch.ops.hybridize.gemv_fused(*args, *cfg)
        else:
            y, h = _run_fused(*args, cfg)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return (y, h.view(x.shape)) if add is not None else y
    h = x if add is None else x + add
    u = h if norm is None else (norm(h, gate) if gate is not None else norm(h))
    z = linear(u, weight, bias)
    if glu is not None:
        g, up = z.chunk(2, dim=-1)
        z = GLU_ACTS[glu](g) * up
    if residual is not None:
        z = residual + z
    if conv is not None:
        return z, _conv_step(z, conv)
    return (z, h) if add is not None else z


def _conv_step(z: Tensor, conv: "ConvUpdate") -> Tensor:
    """The conv op's step on z's conv rows (z (..., N) → (..., C); conv.state advanced in place)."""
    C = conv.weight.shape[0]
    state = conv.state if conv.state.dim() == 3 else conv.state[None]
    c = conv_ops.causal_conv1d_update(z.reshape(-1, z.shape[-1])[:, conv.start:conv.start + C], state,
                                      conv.weight, conv.bias, activation=conv.activation)
    return c.view(*z.shape[:-1], C)


class GemvLinear(nn.Linear):
    """nn.Linear whose forward is `linear` (same parameters, state_dict and module attributes)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def route_linears_(model: nn.Module) -> int:
    """Make every plain nn.Linear of `model` a `GemvLinear` (in place; ``F.linear`` unless a tuned shape
    applies, so the model computes the same everywhere else). Returns how many were switched."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = GemvLinear
            n += 1
    return n


def unroute_linears_(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        if type(m) is GemvLinear:
            m.__class__ = nn.Linear
            n += 1
    return n


def model_weight_shapes(model: nn.Module) -> set:
    """The (weight, has_bias) of every matmul a decode step of `model` runs: Linears and fused projections
    (one representative tensor per distinct shape / dtype / bias)."""
    seen: dict = {}
    for m in model.modules():
        fused = getattr(m, "_fused", None)
        if fused is not None and getattr(m, "projections_fused", lambda: False)():
            seen.setdefault(_key(fused.weight, fused.bias is not None), (fused.weight, fused.bias is not None))
        if isinstance(m, nn.Linear):
            seen.setdefault(_key(m.weight, m.bias is not None), (m.weight, m.bias is not None))
    return list(seen.values())


# ---------------------------------------------------------------------------- tuning
def _cache_path() -> Path:
    root = os.environ.get("HYBRIDIZE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hybridize")
    return Path(root) / "gemv_tuning.json"


def _versions() -> str:
    import triton
    return f"torch {torch.__version__} triton {triton.__version__}"


def _load_disk() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
        return data.get(_versions(), {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_disk(entries: dict) -> None:
    """Merge `entries` into the cache file (atomic replace; a failure only costs re-tuning later)."""
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data.setdefault(_versions(), {}).update(entries)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".gemv_tuning")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


def _graph_time_us(fn_per_copy, copies: int, reps: int = 20) -> float:
    """Median µs per call of fn_per_copy(i) for i over the copies, replayed from one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):                   # warm-up (compiles kernels, cuBLAS workspaces)
            fn_per_copy(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn_per_copy(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / copies)
    times.sort()
    return times[len(times) // 2]


#: what a fused kernel must beat: the plain GEMV plus what the separate kernels it replaces cost in a
#: CUDA-graph replayed decode step (H100 profiles, benchmarks/results/decode_gemv_h100.json: an RMSNorm
#: 1.6-1.9 µs, act(gate)·up 1.1-1.2 µs; a residual add mostly rides along with the next norm kernel;
#: Mamba-2's conv update 2.1 µs, decode_fused_gemv_h100.json)
SAVED_US = {"norm": 1.5, "glu": 1.0, "add": 0.5, "res": 0.5, "gate": 0.0, "conv": 2.0}
#: the same for the skinny GEMM (rows > 1): at batch 64 torch.compile'd steps ran an (add +) RMSNorm as one
#: 2.1-2.5 µs kernel, act(gate)·up 1.7 µs, Mamba-2's gated norm 1.5 µs
#: (benchmarks/results/decode_b64_profile_s8_h100.json)
SAVED_US_ROWS = {"norm": 2.0, "glu": 1.5, "add": 0.3, "res": 0.3, "gate": 0.0, "conv": 0.0}


def _saved_us(variant: str, rows: int = 1) -> float:
    table = SAVED_US if rows == 1 else SAVED_US_ROWS
    return sum(table[p.split(":")[0]] for p in variant.split("+")) if variant != "plain" else 0.0


def _variant_inputs(variant: str, N: int, K: int, dtype, device, rows: int = 1) -> dict:
    """Random inputs for a fused variant of an (N, K) weight (N counts gate + up rows for a GLU)."""
    v = _parse_variant(variant)
    n_out = N // 2 if v["glu"] else N
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)   # noqa: E731
    conv = None
    if v["conv"] is not None:
        c = v["conv"]
        conv = ConvUpdate(torch.randn(1, c["channels"], c["width"] - 1, device=device),
                          mk(c["channels"], c["width"]), mk(c["channels"]) if c["bias"] else None, c["start"],
                          c["activation"])
    return dict(add=mk(rows, K) if v["add"] else None, gate=mk(rows, K) if v["gate"] else None,
                norm_weight=mk(K) if v["norm"] else None, eps=1e-5, norm_group=v["norm_group"], glu=v["glu"],
                residual=mk(rows, n_out) if v["residual"] else None, conv=conv)


def _fresh_conv(fused: dict) -> dict:
    """`fused` with a copy of its conv state (the checks must all start from the same state)."""
    conv = fused.get("conv")
    return fused if conv is None else dict(fused, conv=conv._replace(state=conv.state.clone()))


def _kernel_api(rows: int):
    """(candidates, clip, run(x, w, b, cfg, **fused), config → tuple) of the GEMV (rows = 1) or the skinny
    GEMM (rows > 1)."""
    if rows == 1:
        from hybridize.ops.gemv.triton import CANDIDATES, _clip, gemv_triton
        return CANDIDATES, _clip, gemv_triton, lambda c: (c.block_n, c.block_k, c.num_warps, c.num_stages)
    from hybridize.ops.gemm.triton import CANDIDATES, clip, skinny_gemm_triton

    def run(x, w, b, cfg, conv=None, **fused):
        return skinny_gemm_triton(x, w, b, cfg, **fused)
    return CANDIDATES, clip, run, lambda c: (c.block_n, c.block_k, c.split_k, c.num_warps, c.num_stages)


def _config_obj(cfg: tuple):
    if len(cfg) == 5:
        from hybridize.ops.gemm.triton import GemmConfig
        return GemmConfig(*cfg)
    from hybridize.ops.gemv.triton import GemvConfig
    return GemvConfig(*cfg)


#: `tune_shape` re-times the best candidate and the baseline when they are within this fraction of each other
CLOSE_CALL = 0.06


def tune_shape(N: int, K: int, dtype: torch.dtype, device, has_bias: bool = False,
               l2_bytes: int = 256 << 20, variant: str = "plain", rows: int = 1) -> dict:
    """Time every candidate config for y = x (rows, K) Wᵀ (N, K) on `device` — the GEMV for one row, the
    skinny GEMM for more; plain, or the fused `variant` (`variant_name`) — and register the choice. The
    plain kernel competes with cuBLAS; a fused variant with the plain choice + `SAVED_US` (`SAVED_US_ROWS`)
    of its parts (what running them separately would cost). Returns a record {config, triton_us,
    baseline_us, cublas_us (plain), floor_us (at 3.35 TB/s), all: {config: µs}}."""
    candidates, clip, run, as_tuple = _kernel_api(rows)
    elt = torch.empty((), dtype=dtype).element_size()
    copies = max(2, min(64, -(-l2_bytes // max(1, N * K * elt))))   # cycle through > L2 worth of weights
    ws = [torch.randn(N, K, device=device, dtype=dtype) * K ** -0.5 for _ in range(copies)]
    b = torch.randn(N, device=device, dtype=dtype) if has_bias else None
    x = torch.randn(rows, K, device=device, dtype=dtype)
    ys = [None] * copies
    fused = _variant_inputs(variant, N, K, dtype, device, rows) if variant != "plain" else {}
    n_out = N // 2 if fused.get("glu") else N

    rec: dict = {"N": N, "K": K, "rows": rows, "dtype": str(dtype), "bias": has_bias, "variant": variant,
                 "copies": copies, "all": {}}
    if variant == "plain":
        def base(i):
            ys[i] = F.linear(x, ws[i], b)
        rec["cublas_us"] = rec["baseline_us"] = _graph_time_us(base, copies)
        want = F.linear(x.float(), ws[0].float(), None if b is None else b.float())
    else:
        plain = _CHOICE.get(_key(ws[0], has_bias, "plain", rows))
        if plain is None:                       # the plain matmul is cuBLAS here
            def base(i):
                ys[i] = F.linear(x, ws[i], b)
        else:
            def base(i, cfg=_config_obj(plain)):
                ys[i] = run(x, ws[i], b, cfg)
        rec["plain_us"] = _graph_time_us(base, copies)
        rec["baseline_us"] = rec["plain_us"] + _saved_us(variant, rows)
        want = gemv_fused_reference(x, ws[0], b, **_fresh_conv(fused))
        want = (want[0] if isinstance(want, tuple) else want).float()
    best = None
    for cand in dict.fromkeys(clip(c, n_out, K) for c in candidates):
        cfg = as_tuple(cand)
        try:
            got = run(x, ws[0], b, cand, **_fresh_conv(fused))
            got = (got[0] if isinstance(got, tuple) else got).float()
            if not torch.allclose(got, want, atol=3e-2, rtol=3e-2):
                rec["all"][str(cfg)] = "mismatch"
                continue

            def tri(i, cand=cand):
                ys[i] = run(x, ws[i], b, cand, **fused)

            us = _graph_time_us(tri, copies)
        except Exception as e:  # noqa: BLE001 — a config that fails to compile / launch is skipped
            rec["all"][str(cfg)] = f"{type(e).__name__}: {str(e)[:120]}"
            continue
        rec["all"][str(cfg)] = us
        if best is None or us < best[1]:
            best = (cfg, us, tri)
    rec["floor_us"] = (N * K + rows * (K + n_out)) * elt / 3.35e12 * 1e6
    margin = 0.98 if variant == "plain" else 1.0
    if best is not None and abs(best[1] / (margin * rec["baseline_us"]) - 1.0) < CLOSE_CALL:
        # a close call (one timing's noise flips it between runs): time both twice more, take the medians
        saved = rec["baseline_us"] - rec.get("plain_us", rec["baseline_us"])
        base_us, best_us = [rec["baseline_us"] - saved], [best[1]]
        for _ in range(2):
            base_us.append(_graph_time_us(base, copies))
            best_us.append(_graph_time_us(best[2], copies))
        rec["baseline_us"] = sorted(base_us)[1] + saved
        best = (best[0], sorted(best_us)[1])
        rec["rechecked"] = {"baseline_us": base_us, "triton_us": best_us}
    rec["config"] = best[0] if best and best[1] < margin * rec["baseline_us"] else None
    rec["triton_us"] = best[1] if best else None
    _CHOICE[_key(ws[0], has_bias, variant, rows)] = rec["config"]
    TUNE_LOG.append(rec)
    del ws
    return rec


def _decode_calls(model: nn.Module, batch: int = 1) -> list:
    """(weight, has_bias, variant, rows) of every matmul a batch-`batch` decode step of `model` would send to
    a Triton kernel: recorded from one eager step on a throw-away cache (HybridLM), else the model's Linear
    and fused projection shapes (plain)."""
    step, init_cache = getattr(model, "step", None), getattr(model, "init_cache", None)
    if callable(step) and callable(init_cache):
        p = next(model.parameters())
        try:
            cache = init_cache(batch, max_seqlen=4, device=p.device, dtype=p.dtype)
            with recording() as calls, torch.no_grad():
                step(torch.zeros(batch, dtype=torch.long, device=p.device), cache)
            plain = [c for c in calls.values() if c[2] == "plain"]
            return plain + [c for c in calls.values() if c[2] != "plain"]     # baselines first
        except Exception as e:  # noqa: BLE001 — tuning must not break generation: fall back to the shapes
            print(f"hybridize: could not record the decode step's matmuls ({type(e).__name__}: {e}); tuning "
                  "the plain shapes only", file=sys.stderr)
    return [(w, b, "plain", batch) for w, b in model_weight_shapes(model)]


def prepare_decode_gemv(model: nn.Module, tune: bool = True, batch: int = 1) -> dict:
    """Route `model`'s Linears through `linear` and make sure each matmul of its batch-`batch` decode step
    (plain and fused variants, `_decode_calls`) has a tuning decision on this device (from the disk cache,
    else measured now: ~1-3 s each). Returns {"routed": n, "shapes": {…: config or None}, "tuned_now":
    [records]}. No-op off CUDA / when HYBRIDIZE_GEMV=0 (HYBRIDIZE_GEMM=0 for batch > 1) / without triton /
    for batches over MAX_ROWS."""
    out: dict = {"routed": 0, "shapes": {}, "tuned_now": []}
    params = list(model.parameters())
    if not gemv_wanted() or not params or not params[0].is_cuda or not use_kernels(params[0]) \
            or not 1 <= batch <= MAX_ROWS or (batch > 1 and not _GEMM_WANTED[0]):
        return out
    out["routed"] = route_linears_(model)
    disk = _load_disk()
    new: dict = {}
    calls = [c for c in _decode_calls(model, batch) if c[0].dtype in _SUPPORTED]
    todo = sum(_key(*c) not in _CHOICE and _disk_key(*c) not in disk for c in calls)
    if todo and tune:
        what = "GEMV" if batch == 1 else f"skinny GEMM ({batch} rows)"
        print(f"hybridize: tuning the decode {what} for {todo} matrix shape(s) / fused variant(s) on this GPU "
              f"(once; cached in {_cache_path()})", file=sys.stderr, flush=True)
    for w, has_bias, variant, rows in calls:
        key, skey = _key(w, has_bias, variant, rows), _disk_key(w, has_bias, variant, rows)
        if key not in _CHOICE and skey in disk:
            cfg = disk[skey]
            _CHOICE[key] = tuple(cfg) if cfg else None
        if key not in _CHOICE and tune:
            rec = tune_shape(w.shape[0], w.shape[1], w.dtype, w.device, has_bias, variant=variant, rows=rows)
            out["tuned_now"].append(rec)
            new[skey] = rec["config"]
        out["shapes"][skey] = _CHOICE.get(key)
    if new:
        _save_disk(new)
    return out


__all__ = ["linear", "fused_linear", "ConvUpdate", "conv_variant", "gemv_fusion_wanted", "variant_name", "recording",
           "gemv_fused_reference", "GemvLinear", "route_linears_", "unroute_linears_", "prepare_decode_gemv",
           "tune_shape", "gemv_reference", "gemv_wanted", "gemm_wanted", "MAX_ROWS"]
