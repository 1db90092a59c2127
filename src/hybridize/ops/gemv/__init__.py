"""Batch-1 decode GEMV: ``linear(x, weight, bias)`` runs the Triton GEMV (`triton.py`) for a one-row CUDA
input when that (N, K, dtype) was tuned on this device and the kernel beat cuBLAS there; everything else
(training, prefill, batch > 1, CPU, untuned shapes) is ``F.linear``.

    prepare_decode_gemv(model)   # route the model's Linears through `linear` and tune its shapes
                                 # (the generation engine does this for batch-1 steps on CUDA)

Tuning (`tune_shape`) times each candidate block shape and cuBLAS in CUDA-graph replay over enough
copies of W to miss the L2 cache, keeps the fastest, and caches the outcome per GPU / triton / torch
version in ``$HYBRIDIZE_CACHE_DIR/gemv_tuning.json`` (default ``~/.cache/hybridize``), so later processes
skip it. HYBRIDIZE_GEMV=0 turns the routing off (A/B benchmarks).
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

from hybridize.ops._dispatch import use_kernels
from hybridize.ops.gemv.reference import GLU_ACTS, gemv_fused_reference, gemv_reference

#: (device type, device index, dtype, N, K, has_bias) → (block_n, block_k, num_warps, num_stages), or
#: None: cuBLAS won. Read inside compiled code: nothing in the key may need a host call.
_CHOICE: dict = {}
_SUPPORTED = (torch.bfloat16, torch.float16)
#: every `tune_shape` record of this process (benchmarks put it in their JSON)
TUNE_LOG: list = []


def gemv_wanted() -> bool:
    return os.environ.get("HYBRIDIZE_GEMV", "").lower() not in ("0", "off", "false", "no")


def gemv_fusion_wanted() -> bool:
    """HYBRIDIZE_GEMV_FUSED=0: `fused_linear` runs its parts one by one (plain GEMV + separate ops; A/B).
    Read at call time on the host; compiled code bakes in the value it saw when it was traced."""
    return os.environ.get("HYBRIDIZE_GEMV_FUSED", "").lower() not in ("0", "off", "false", "no")


def _key(weight: Tensor, has_bias: bool) -> tuple:
    d = weight.device
    return (d.type, d.index, weight.dtype, int(weight.shape[0]), int(weight.shape[1]), bool(has_bias))


def _disk_key(weight: Tensor, has_bias: bool) -> str:
    """The tuning cache's key: the GPU's name instead of its index (host call; not for compiled code)."""
    dev = torch.cuda.get_device_name(weight.device) if weight.is_cuda else "cpu"
    return "|".join(map(str, (dev, weight.dtype, weight.shape[0], weight.shape[1], bool(has_bias))))


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


def _gemv_config(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[tuple]:
    """The tuned Triton config for ``x · weightᵀ`` if the batch-1 GEMV serves it, else None (F.linear)."""
    K = weight.shape[-1]
    if x.numel() != K or x.dtype != weight.dtype or weight.dtype not in _SUPPORTED or weight.dim() != 2 \
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)) \
            or not use_kernels(x, weight):
        return None
    return _CHOICE.get(_key(weight, bias is not None))


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``; a single row x (..., K) with numel K takes the tuned Triton GEMV
    when one is registered for this shape (see the module docstring) and no gradient is wanted."""
    cfg = _gemv_config(x, weight, bias)
    if cfg is None:
        return F.linear(x, weight, bias)
    x2 = x.reshape(1, weight.shape[-1])
    if torch.compiler.is_compiling():
        y = torch.ops.hybridize.gemv(x2, weight, bias, *cfg)
    else:
        y = _run(x2, weight, bias, cfg)           # direct launch: custom_op's Python dispatch costs µs
    return y.view(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------- fused decode GEMV
def _run_fused(x, weight, bias, add, gate, norm_weight, residual, eps, norm_offset, glu, cfg):
    from hybridize.ops.gemv.triton import GemvConfig, gemv_triton
    out = gemv_triton(x, weight, bias, GemvConfig(*cfg), add=add, gate=gate, norm_weight=norm_weight, eps=eps,
                      norm_offset=norm_offset, glu=glu or None, residual=residual)
    return out if add is not None else (out, x.new_empty(0))


@torch.library.custom_op("hybridize::gemv_fused", mutates_args=())
def _gemv_fused_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], add: Optional[Tensor],
                   gate: Optional[Tensor], norm_weight: Optional[Tensor], residual: Optional[Tensor], eps: float,
                   norm_offset: float, glu: str, block_n: int, block_k: int, num_warps: int,
                   num_stages: int) -> Tuple[Tensor, Tensor]:
    return _run_fused(x, weight, bias, add, gate, norm_weight, residual, eps, norm_offset, glu,
                      (block_n, block_k, num_warps, num_stages))


@_gemv_fused_op.register_fake
def _(x, weight, bias, add, gate, norm_weight, residual, eps, norm_offset, glu, block_n, block_k, num_warps,
      num_stages):
    N = weight.shape[0] // 2 if glu else weight.shape[0]
    return x.new_empty(1, N), (x.new_empty(1, x.shape[-1]) if add is not None else x.new_empty(0))


#: read once per process (a module constant for torch.compile; tests flip it)
_FUSION_WANTED = [gemv_fusion_wanted()]


def _norm_params(norm: nn.Module, gated: bool) -> Optional[tuple]:
    """(weight, eps, offset) of an RMSNorm (or of a one-group, gate-first GatedRMSNorm when `gated`) the
    kernel's prologue reproduces; None for any other norm (the caller then runs the module itself)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 1:
        return None
    if gated:
        if getattr(norm, "norm_before_gate", True) or getattr(norm, "group_size", None) != w.numel():
            return None
        return w, float(norm.eps), 0.0
    if not hasattr(norm, "offset") or hasattr(norm, "group_size"):
        return None
    return w, float(norm.eps), float(norm.offset)


def fused_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, add: Optional[Tensor] = None,
                 norm: Optional[nn.Module] = None, gate: Optional[Tensor] = None, glu: Optional[str] = None,
                 residual: Optional[Tensor] = None):
    """A decode-step matmul with its neighbours fused in; x (..., K) → y (..., N) [, h (..., K)]:

        h = x + add;  u = norm(h) (or norm(h, gate): Mamba-2's gated RMSNorm);  z = linear(u, weight, bias)
        y = act(z_gate) · z_up  (glu: weight = [gate rows; up rows]);  y = residual + y

    `h` (the residual stream) is returned too when `add` is given. For one row on CUDA with a tuned shape
    this is one Triton kernel (`triton.gemv_triton`; the RMSNorm's mean is taken in the same pass over K, so
    nothing extra is read); otherwise the modules / ops run one after another, exactly as unfused code
    would. In fp32 inside the kernel: results differ from the unfused ops by the roundings skipped."""
    if gate is not None and norm is None:
        raise ValueError("fused_linear: gate is applied inside the gated norm; pass norm=GatedRMSNorm(...) too")
    if glu is not None and glu not in GLU_ACTS:
        raise ValueError(f"fused_linear: glu must be one of {sorted(GLU_ACTS)}, got {glu!r}")
    cfg = _gemv_config(x, weight, bias) if _FUSION_WANTED[0] else None
    nparams = _norm_params(norm, gate is not None) if norm is not None else None
    extras = [t for t in (add, gate, residual) if t is not None]
    if cfg is not None and (norm is None or nparams is not None) \
            and all(t.dtype == x.dtype and t.device == x.device for t in extras):
        nw, eps, off = nparams if nparams is not None else (None, 0.0, 0.0)
        K = weight.shape[-1]
        args = (x.reshape(1, K), weight, bias, add, gate, nw, residual, eps, off, glu or "")
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
    return (z, h) if add is not None else z


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


def tune_shape(N: int, K: int, dtype: torch.dtype, device, has_bias: bool = False,
               l2_bytes: int = 256 << 20) -> dict:
    """Time every candidate config and cuBLAS for y (1, N) = x (1, K) Wᵀ on `device`; returns a record
    {config, triton_us, cublas_us, floor_us (at 3.35 TB/s), all: {config: µs}} and registers the choice."""
    from hybridize.ops.gemv.triton import CANDIDATES, _clip, gemv_triton

    elt = torch.empty((), dtype=dtype).element_size()
    copies = max(2, min(64, -(-l2_bytes // max(1, N * K * elt))))   # cycle through > L2 worth of weights
    ws = [torch.randn(N, K, device=device, dtype=dtype) * K ** -0.5 for _ in range(copies)]
    b = torch.randn(N, device=device, dtype=dtype) if has_bias else None
    x = torch.randn(1, K, device=device, dtype=dtype)
    ys = [None] * copies

    def cublas(i):
        ys[i] = F.linear(x, ws[i], b)

    rec: dict = {"N": N, "K": K, "dtype": str(dtype), "bias": has_bias, "copies": copies, "all": {}}
    rec["cublas_us"] = _graph_time_us(cublas, copies)
    want = F.linear(x.float(), ws[0].float(), None if b is None else b.float())
    best = None
    for cand in dict.fromkeys(_clip(c, N, K) for c in CANDIDATES):
        cfg = (cand.block_n, cand.block_k, cand.num_warps, cand.num_stages)
        try:
            got = gemv_triton(x, ws[0], b, cand).float()
            if not torch.allclose(got, want, atol=2e-2, rtol=2e-2):
                rec["all"][str(cfg)] = "mismatch"
                continue

            def tri(i, cand=cand):
                ys[i] = gemv_triton(x, ws[i], b, cand)

            us = _graph_time_us(tri, copies)
        except Exception as e:  # noqa: BLE001 — a config that fails to compile / launch is skipped
            rec["all"][str(cfg)] = f"{type(e).__name__}: {str(e)[:120]}"
            continue
        rec["all"][str(cfg)] = us
        if best is None or us < best[1]:
            best = (cfg, us)
    rec["floor_us"] = N * K * elt / 3.35e12 * 1e6
    rec["config"] = best[0] if best and best[1] < 0.98 * rec["cublas_us"] else None
    rec["triton_us"] = best[1] if best else None
    _CHOICE[_key(ws[0], has_bias)] = rec["config"]
    TUNE_LOG.append(rec)
    del ws
    return rec


def prepare_decode_gemv(model: nn.Module, tune: bool = True) -> dict:
    """Route `model`'s Linears through `linear` and make sure each of its matmul shapes has a tuning
    decision on this device (from the disk cache, else measured now: ~1-3 s per shape). Returns
    {"routed": n, "shapes": {…: config or None}, "tuned_now": [records]}. No-op off CUDA / when
    HYBRIDIZE_GEMV=0 / without triton."""
    out: dict = {"routed": 0, "shapes": {}, "tuned_now": []}
    params = list(model.parameters())
    if not gemv_wanted() or not params or not params[0].is_cuda or not use_kernels(params[0]):
        return out
    out["routed"] = route_linears_(model)
    disk = _load_disk()
    new: dict = {}
    shapes = model_weight_shapes(model)
    todo = sum(_key(w, b) not in _CHOICE and _disk_key(w, b) not in disk for w, b in shapes)
    if todo and tune:
        print(f"hybridize: tuning the batch-1 GEMV for {todo} matrix shape(s) on this GPU (once; cached in "
              f"{_cache_path()})", file=sys.stderr, flush=True)
    for w, has_bias in shapes:
        if w.dtype not in _SUPPORTED:
            continue
        key, skey = _key(w, has_bias), _disk_key(w, has_bias)
        if key not in _CHOICE and skey in disk:
            cfg = disk[skey]
            _CHOICE[key] = tuple(cfg) if cfg else None
        if key not in _CHOICE and tune:
            rec = tune_shape(w.shape[0], w.shape[1], w.dtype, w.device, has_bias)
            out["tuned_now"].append(rec)
            new[skey] = rec["config"]
        out["shapes"][skey] = _CHOICE.get(key)
    if new:
        _save_disk(new)
    return out


__all__ = ["linear", "fused_linear", "gemv_fusion_wanted", "gemv_fused_reference", "GemvLinear", "route_linears_", "unroute_linears_", "prepare_decode_gemv", "tune_shape",
           "gemv_reference", "gemv_wanted"]
