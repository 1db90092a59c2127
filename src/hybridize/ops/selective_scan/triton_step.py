"""Triton kernel for Mamba-1's one-token selective-scan step (decoding).

Semantics are exactly those of :func:`hybridize.ops.selective_scan.reference.selective_scan_step`
(per batch row b, channel c, state index n; g(c) = c // (C // G) for grouped B/C, else shared):

    dt    = softplus?(delta[c] + delta_bias[c])
    h[n]  = exp(dt·A[c, n])·h[n] + dt·u[c]·B[g(c), n]          fp32 math whatever the state dtype
    y     = Σ_n C[g(c), n]·h[n] + D[c]·u[c],   y *= silu(z[c])

The step is a stream over the state (read once, written once in place); everything else is small.
Kernel variant and launch shape come from the module-level :data:`TUNE` dict (read at every call):

* ``"tile"`` (default) — ``_ss_tile_kernel``: each program owns a (BB, BC, BN) block of the state —
  BB = ``rows`` batch rows × BC channels × BN = next_pow2(N) states, ``tile`` = BB·BC·BN elements (see
  :func:`tile_shape`) — loads it once, updates it in registers in fp32, stores it once (state dtype) and
  reduces y. What it does that the first kernel did not:

  - the state block's loads are issued first, then (``fence``) a CTA barrier, then every other load.
    Without the barrier the compiler schedules part of the state loads after the softplus of delta
    (or the sigmoid of z), which waits for that small load: every program then waits for two memory
    round trips instead of one (checked on the sm_90 SASS: 0-2 of 4 state loads issued before the first
    exp without it, all 4 with it);
  - A (C, N) is loaded once per program and shared by its BB batch rows (the first kernel re-read it from
    L2 for every batch row: as many L2→SM bytes as an fp32 state). Its pointers are broadcast to the full
    (BB, BC, BN) block so that the load takes the state's layout; the compiler merges the identical loads;
  - B / C are loaded as one (BB, 1, BN) vector per program (not gathered per element) whenever the block
    lies inside one B/C group (always for shared B/C);
  - no masks when B, C and N fill whole blocks (N = BN: a state row is a run of N contiguous elements, so
    state loads / stores are 16-byte vectors, 4 fp32 or 8 bf16);
  - int32 in-tile offsets on one int64 base per program (int64 in-tile offsets only past int32 strides);
  - u, delta, bias, D, z, y are (BB, BC, 1) tensors: only these small values change layout (through
    shared memory), never the state block. (Triton's layout choice depends on the order of the loads and
    the math in ``_tile_update``; as written, it keeps the state's vectorised layout for every config of
    the probe, fp32 and bf16.)
* ``"persistent"`` — the same tile code in a grid of SMs × ``programs_per_sm`` programs that walk the
  tiles (stride = grid size) and load the next tile's state before updating and storing the current one.
  Size ``programs_per_sm`` to the occupancy (registers) or the tail runs a second round of programs.
* ``"legacy"`` — ``_ss_step_kernel``, the first kernel (kept for A/B, :data:`LEGACY_TUNE`): one (BC, BN)
  block of one batch row per program (BC = ``tile`` // BN), A and B/C gathered per element, int64
  per-element addressing, always masked, evict-first hints on the state.

Knobs: ``tile`` (state elements per program), ``rows`` (BB), ``warps``, ``fence`` (barrier after the state
loads), ``evict_first`` (evict-first cache hints on the state load and store), ``load_cache`` /
``store_cache`` (PTX cache modifiers of the state load / store, e.g. ".cg" / ".cs"; one replaces the
evict-first hint on that access: PTX does not combine them), ``programs_per_sm`` (persistent grid).
``benchmarks/mamba1_step_probe.py`` times them at the Mamba-1 2.8B decode shape.

HBM floor (bytes that must move; S = B·C·N state elements of e_s bytes, e_x the activation size)
----------------------------------------------------------------------------------------------
    2·S·e_s (state read + write) + C·N·4 (A, once) + B·C·e_x·(3 + [z]) (u, delta, y, z) + 2·B·G·N·e_x.
Mamba-1 2.8B (d_inner 5120, N = 16), batch 64, fp32 state: 2·5.24M·4 = 42 MB → 12.5 µs at 3.35 TB/s.

Registered as ``torch.ops.hybridize.selective_scan_step`` (``torch.library.custom_op`` with a fake;
state declared mutated) for torch.compile / CUDA graphs; no host synchronisation.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridize.ops.pdl import pdl_launch

#: Launch knobs, read at every call (see the module docstring). ``variant``: "tile" | "persistent" |
#: "legacy" (the first kernel; uses only ``tile`` and ``warps``). Defaults: the fastest of the H100 probe of
#: 2026-11-22 for fp32 and bf16 states (benchmarks/results/mamba1_step_probe_h100.json: batch 64, C = 5120,
#: N = 16: 16.4 µs fp32 = 1.23 × floor vs mamba_ssm 16.7 and the old kernel 17.9; bf16 9.6 µs = 1.34 ×).
TUNE = {"variant": "tile", "tile": 2048, "rows": 2, "warps": 4, "fence": False, "evict_first": True,
        "load_cache": "", "store_cache": "", "programs_per_sm": 4}
#: The first kernel's configuration, for A/B comparisons: ``TUNE.update(LEGACY_TUNE)``.
LEGACY_TUNE = {"variant": "legacy", "tile": 2048, "warps": 4}

_I32_MAX = 2 ** 31 - 1


@triton.jit
def _softplus(v):
    # torch.nn.functional.softplus (threshold 20); log1p(e) as log(u)·e/(u − 1), u = 1 + e
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    sp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(v > 20.0, v, sp)


# ------------------------------------------------------------------------------------ legacy kernel
@triton.jit
def _ss_step_kernel(u_ptr, d_ptr, A_ptr, B_ptr, C_ptr, s_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                    C, N, n_cblk, ch_per_group,
                    sub, sdb, sAc, sAn, sBb, sBg, sCb, sCg, ssb, ssc, ssn, szb, syb,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr = 0):
    if PDL:    # see hybridize.ops.pdl: wait for the previous kernel before any read or write
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    b = (pid // n_cblk).to(tl.int64)
    c = (pid % n_cblk) * BC + tl.arange(0, BC)
    n = tl.arange(0, BN)
    cm = c < C
    nm = n < N
    m = cm[:, None] & nm[None, :]
    c64 = c.to(tl.int64)

    sp = s_ptr + b * ssb + c64[:, None] * ssc + n[None, :] * ssn
    s = tl.load(sp, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)

    uv = tl.load(u_ptr + b * sub + c, mask=cm, other=0.0).to(tl.float32)
    dt = tl.load(d_ptr + b * sdb + c, mask=cm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    Av = tl.load(A_ptr + c64[:, None] * sAc + n[None, :] * sAn, mask=m, other=0.0).to(tl.float32)
    g = (c // ch_per_group)[:, None]          # sBg = 0 for B/C shared by all channels
    Bv = tl.load(B_ptr + b * sBb + g * sBg + n[None, :], mask=m, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * sCb + g * sCg + n[None, :], mask=m, other=0.0).to(tl.float32)

    s = tl.exp(dt[:, None] * Av) * s + (dt * uv)[:, None] * Bv
    tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=m, eviction_policy="evict_first")

    y = tl.sum(s * Cv, axis=1)
    if HAS_D:
        y += tl.load(D_ptr + c, mask=cm, other=0.0).to(tl.float32) * uv
    if HAS_Z:
        zv = tl.load(z_ptr + b * szb + c, mask=cm, other=0.0).to(tl.float32)
        y *= zv * tl.sigmoid(zv)
    tl.store(y_ptr + b * syb + c, y.to(y_ptr.dtype.element_ty), mask=cm)


# -------------------------------------------------------------------------------- tile kernels
@triton.jit
def _tile_ptrs(s_ptr, t, n_cblk, Bsz, C, N, ssb, ssc, ssn, I64: tl.constexpr,
               BB: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
    """Pointers and bounds mask of tile t's (BB, BC, BN) state block. A tile index t ≥ n_tiles (the
    persistent loop's prefetch past the end) has b0 ≥ B: all masked."""
    b0 = (t // n_cblk) * BB
    c0 = (t % n_cblk) * BC
    bb = tl.arange(0, BB)[:, None, None]
    cl = tl.arange(0, BC)[None, :, None]
    n = tl.arange(0, BN)[None, None, :]
    if I64:
        off = bb.to(tl.int64) * ssb + cl.to(tl.int64) * ssc + n.to(tl.int64) * ssn
    else:
        off = bb * ssb + cl * ssc + n * ssn
    ptrs = s_ptr + (b0.to(tl.int64) * ssb + c0.to(tl.int64) * ssc) + off
    m = (b0 + bb < Bsz) & (c0 + cl < C) & (n < N)
    return ptrs, m


@triton.jit
def _tile_load(s_ptr, t, n_cblk, Bsz, C, N, ssb, ssc, ssn, MASK: tl.constexpr, I64: tl.constexpr,
               EVICT: tl.constexpr, LOAD_CACHE: tl.constexpr,
               BB: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
    """Tile t's (BB, BC, BN) state block in its storage dtype (bounds-masked when MASK)."""
    ptrs, m = _tile_ptrs(s_ptr, t, n_cblk, Bsz, C, N, ssb, ssc, ssn, I64, BB, BC, BN)
    if MASK:
        s = tl.load(ptrs, mask=m, other=0.0, cache_modifier=LOAD_CACHE, eviction_policy=EVICT)
    else:
        s = tl.load(ptrs, cache_modifier=LOAD_CACHE, eviction_policy=EVICT)
    return s


@triton.jit
def _ld(ptrs, mask, MASK: tl.constexpr):
    if MASK:
        v = tl.load(ptrs, mask=mask, other=0.0)
    else:
        v = tl.load(ptrs)
    return v


@triton.jit
def _tile_update(s_raw, t, n_cblk, Bsz, C, N, ch_per_group, s_ptr, ssb, ssc, ssn,
                 u_ptr, d_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                 sub, sdb, sAc, sAn, sBb, sBg, sCb, sCg, szb, syb,
                 HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 MASK: tl.constexpr, GROUP_UNIFORM: tl.constexpr, I64: tl.constexpr,
                 EVICT: tl.constexpr, STORE_CACHE: tl.constexpr,
                 BB: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
    """Update tile t's loaded state block in fp32, store it (state dtype) and y (BB, BC)."""
    b0 = (t // n_cblk) * BB
    c0 = (t % n_cblk) * BC
    b064 = b0.to(tl.int64)
    bb = tl.arange(0, BB)[:, None, None]           # (BB, 1, 1)
    cl = tl.arange(0, BC)[None, :, None]           # (1, BC, 1)
    n = tl.arange(0, BN)[None, None, :]            # (1, 1, BN)
    if I64:
        bb = bb.to(tl.int64)
    rm = b0 + bb < Bsz
    cm = c0 + cl < C
    nm = n < N
    rcm = rm & cm                                  # (BB, BC, 1)
    c = c0 + cl

    # per (row, channel): u, delta (+ bias, softplus) as (BB, BC, 1). (The order of the loads and the math
    # below steers Triton's layout choices: as written, the state's vectorised layout is kept for the
    # (BB, BC, BN) math and only (BB, BC)-sized values cross layouts.)
    uv = _ld(u_ptr + b064 * sub + (bb * sub + c), rcm, MASK).to(tl.float32)
    dt = _ld(d_ptr + b064 * sdb + (bb * sdb + c), rcm, MASK).to(tl.float32)
    if HAS_BIAS:
        dt += _ld(bias_ptr + c, cm, MASK).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    # A: shared by the BB rows. The pointers are broadcast to the full (BB, BC, BN) tile on purpose: the
    # load then gets the state's layout (no shared-memory layout conversion when the state is 16-bit and
    # its vectors are 8 wide), and the BB identical loads of a thread are merged by the compiler.
    Av = _ld(A_ptr + c0.to(tl.int64) * sAc + (bb * 0 + cl * sAc + n * sAn), cm & nm, MASK).to(tl.float32)
    # B, C: one (BB, 1, BN) vector per row when the block lies in one group (or B/C are shared: sBg = 0),
    # else gathered per channel (BB, BC, BN)
    if GROUP_UNIFORM:
        g = (c0 // ch_per_group).to(tl.int64)
        Bv = _ld(B_ptr + (b064 * sBb + g * sBg) + (bb * sBb + n), rm & nm, MASK).to(tl.float32)
        Cv = _ld(C_ptr + (b064 * sCb + g * sCg) + (bb * sCb + n), rm & nm, MASK).to(tl.float32)
    else:
        g = c // ch_per_group
        Bv = _ld(B_ptr + b064 * sBb + (bb * sBb + g * sBg + n), rcm & nm, MASK).to(tl.float32)
        Cv = _ld(C_ptr + b064 * sCb + (bb * sCb + g * sCg + n), rcm & nm, MASK).to(tl.float32)

    s = tl.exp(dt * Av) * s_raw.to(tl.float32) + (dt * uv) * Bv
    sptrs, sm = _tile_ptrs(s_ptr, t, n_cblk, Bsz, C, N, ssb, ssc, ssn, I64, BB, BC, BN)
    if MASK:
        tl.store(sptrs, s.to(s_raw.dtype), mask=sm, cache_modifier=STORE_CACHE, eviction_policy=EVICT)
    else:
        tl.store(sptrs, s.to(s_raw.dtype), cache_modifier=STORE_CACHE, eviction_policy=EVICT)

    y = tl.sum(s * Cv, axis=2, keep_dims=True)     # (BB, BC, 1)
    if HAS_D:
        y += _ld(D_ptr + c, cm, MASK).to(tl.float32) * uv
    if HAS_Z:
        zv = _ld(z_ptr + b064 * szb + (bb * szb + c), rcm, MASK).to(tl.float32)
        y *= zv * tl.sigmoid(zv)
    y_ptrs = y_ptr + b064 * syb + (bb * syb + c)
    if MASK:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=rcm)
    else:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty))


@triton.jit
def _ss_tile_kernel(u_ptr, d_ptr, A_ptr, B_ptr, C_ptr, s_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                    Bsz, C, N, n_cblk, n_tiles, ch_per_group,
                    sub, sdb, sAc, sAn, sBb, sBg, sCb, sCg, ssb, ssc, ssn, szb, syb,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, MASK: tl.constexpr, GROUP_UNIFORM: tl.constexpr,
                    I64: tl.constexpr, PERSISTENT: tl.constexpr, FENCE: tl.constexpr,
                    LOAD_EVICT: tl.constexpr, STORE_EVICT: tl.constexpr,
                    LOAD_CACHE: tl.constexpr, STORE_CACHE: tl.constexpr,
                    BB: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr = 0):
    """Tile t = (row block t // n_cblk, channel block t % n_cblk). Not PERSISTENT: program t does tile t
    (grid = n_tiles). PERSISTENT: program p does tiles p, p + P, p + 2P, … (P = grid size ≤ n_tiles),
    loading tile t + P's state before updating / storing tile t's."""
    if PDL:    # see hybridize.ops.pdl: wait for the previous kernel before any read or write
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    if PERSISTENT:
        npg = tl.num_programs(0)
        s = _tile_load(s_ptr, pid, n_cblk, Bsz, C, N, ssb, ssc, ssn, MASK, I64, LOAD_EVICT, LOAD_CACHE,
                       BB, BC, BN)
        n_iter = (n_tiles - pid + npg - 1) // npg
        t = pid
        for _ in range(n_iter):
            tn = t + npg
            s_next = _tile_load(s_ptr, tn, n_cblk, Bsz, C, N, ssb, ssc, ssn, True, I64,
                                LOAD_EVICT, LOAD_CACHE, BB, BC, BN)      # masked: tn may be past the end
            if FENCE:
                tl.debug_barrier()
            _tile_update(s, t, n_cblk, Bsz, C, N, ch_per_group, s_ptr, ssb, ssc, ssn,
                         u_ptr, d_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                         sub, sdb, sAc, sAn, sBb, sBg, sCb, sCg, szb, syb,
                         HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, MASK, GROUP_UNIFORM, I64, STORE_EVICT, STORE_CACHE,
                         BB, BC, BN)
            s = s_next
            t = tn
    else:
        s = _tile_load(s_ptr, pid, n_cblk, Bsz, C, N, ssb, ssc, ssn, MASK, I64, LOAD_EVICT, LOAD_CACHE,
                       BB, BC, BN)
        if FENCE:
            tl.debug_barrier()
        _tile_update(s, pid, n_cblk, Bsz, C, N, ch_per_group, s_ptr, ssb, ssc, ssn,
                     u_ptr, d_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                     sub, sdb, sAc, sAn, sBb, sBg, sCb, sCg, szb, syb,
                     HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, MASK, GROUP_UNIFORM, I64, STORE_EVICT, STORE_CACHE,
                     BB, BC, BN)


# ------------------------------------------------------------------------------------------ host side
def _unit_last(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2                                    # the interpreter: a small grid that exercises the loop


def tile_shape(Bsz: int, C: int, N: int, tune: Optional[dict] = None):
    """(BB, BC, BN) of the "tile" / "persistent" kernels for TUNE-like knobs: BN = next_pow2(N) (≥ 2),
    BB = ``rows`` (≤ next_pow2(B)), BC = ``tile`` // (BB·BN) (≥ 1, ≤ next_pow2(C))."""
    tune = TUNE if tune is None else tune
    BN = max(2, triton.next_power_of_2(N))
    BB = max(1, min(triton.next_power_of_2(max(Bsz, 1)), triton.next_power_of_2(int(tune.get("rows", 1)))))
    BC = max(1, min(triton.next_power_of_2(max(C, 1)), int(tune["tile"]) // (BB * BN)))
    return BB, BC, BN


def _step_impl(u, delta, A, Bm, Cm, state, D, z, delta_bias, delta_softplus):
    Bsz, C = u.shape
    N = A.shape[1]
    if tuple(state.shape) != (Bsz, C, N) or delta.shape != u.shape or A.shape[0] != C:
        raise ValueError(f"selective_scan_step: expected u, delta (B, C), A (C, N), state (B, C, N); got u "
                         f"{tuple(u.shape)}, delta {tuple(delta.shape)}, A {tuple(A.shape)}, "
                         f"state {tuple(state.shape)}")
    grouped = Bm.dim() == 3
    G = Bm.shape[1] if grouped else 1
    if C % G:
        raise ValueError(f"selective_scan_step: {C} channels are not a multiple of {G} B/C groups")
    u, delta, z, Bm, Cm = _unit_last(u), _unit_last(delta), _unit_last(z), _unit_last(Bm), _unit_last(Cm)
    D = D.contiguous() if D is not None else None
    bias = delta_bias.contiguous() if delta_bias is not None else None
    y = torch.empty(Bsz, C, device=u.device, dtype=u.dtype)
    if y.numel() == 0:
        return y
    sBg = Bm.stride(1) if grouped else 0
    sCg = Cm.stride(1) if grouped else 0
    tune = TUNE
    variant = tune.get("variant", "tile")
    ptrs = (u, delta, A, Bm, Cm, state, D if D is not None else u, z if z is not None else u,
            bias if bias is not None else u, y)
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None,
                 SOFTPLUS=bool(delta_softplus))
    szb = z.stride(0) if z is not None else 0
    if variant == "legacy":
        BN = max(2, triton.next_power_of_2(N))
        BC = max(1, min(triton.next_power_of_2(C), int(tune["tile"]) // BN))
        n_cblk = triton.cdiv(C, BC)
        _ss_step_kernel[(Bsz * n_cblk,)](
            *ptrs, C, N, n_cblk, C // G,
            u.stride(0), delta.stride(0), A.stride(0), A.stride(1), Bm.stride(0), sBg, Cm.stride(0), sCg,
            *state.stride(), szb, y.stride(0), **flags, BC=BC, BN=BN, num_warps=int(tune["warps"]),
            **pdl_launch(u.device))
        return y
    if variant not in ("tile", "persistent"):
        raise ValueError(f"selective_scan_step: unknown TUNE['variant'] {variant!r}")
    BB, BC, BN = tile_shape(Bsz, C, N, tune)
    n_cblk = triton.cdiv(C, BC)
    n_tiles = triton.cdiv(Bsz, BB) * n_cblk
    ssb, ssc, ssn = state.stride()
    cpg = C // G
    # largest in-tile offset (elements) of any operand; int64 in-tile arithmetic only past int32
    span = max((BB - 1) * ssb + (BC - 1) * ssc + (BN - 1) * ssn,
               (BB - 1) * max(u.stride(0), delta.stride(0), szb, y.stride(0), Bm.stride(0), Cm.stride(0))
               + max(BC, BN) + (C - 1) * max(sBg, sCg),
               (BC - 1) * A.stride(0) + (BN - 1) * A.stride(1))
    persistent = variant == "persistent"
    # PTX takes a cache modifier or an eviction priority on one access, not both: the modifier wins
    evict = "evict_first" if tune.get("evict_first", True) else ""
    load_cache, store_cache = str(tune.get("load_cache", "")), str(tune.get("store_cache", ""))
    grid = min(n_tiles, _num_sms(u.device) * max(1, int(tune.get("programs_per_sm", 4)))) if persistent \
        else n_tiles
    _ss_tile_kernel[(grid,)](
        *ptrs, Bsz, C, N, n_cblk, n_tiles, cpg,
        u.stride(0), delta.stride(0), A.stride(0), A.stride(1), Bm.stride(0), sBg, Cm.stride(0), sCg,
        ssb, ssc, ssn, szb, y.stride(0), **flags,
        MASK=bool(Bsz % BB or C % BC or N != BN), GROUP_UNIFORM=(not grouped) or cpg % BC == 0,
        I64=span > _I32_MAX, PERSISTENT=persistent, FENCE=bool(tune.get("fence", True)),
        LOAD_EVICT="" if load_cache else evict, STORE_EVICT="" if store_cache else evict,
        LOAD_CACHE=load_cache, STORE_CACHE=store_cache,
        BB=BB, BC=BC, BN=BN, num_warps=int(tune["warps"]), num_stages=1, **pdl_launch(u.device))
    return y


@torch.library.custom_op("hybridize::selective_scan_step", mutates_args=("state",))
def _ss_step_op(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor,
                D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                delta_softplus: bool) -> Tensor:
    return _step_impl(u, delta, A, Bm, Cm, state, D, z, delta_bias, delta_softplus)


@_ss_step_op.register_fake
def _(u, delta, A, Bm, Cm, state, D, z, delta_bias, delta_softplus):
    return torch.empty_like(u)


def selective_scan_step_triton(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor, *,
                               D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                               delta_bias: Optional[Tensor] = None, delta_softplus: bool = False) -> Tensor:
    """One token. u, delta (B, C); A (C, N); Bm, Cm (B, N) or (B, G, N); state (B, C, N) (fp32/bf16/fp16,
    any strides) updated IN PLACE; D (C,); z (B, C); delta_bias (C,). Returns y (B, C) in u's dtype.
    Same semantics as :func:`hybridize.ops.selective_scan.reference.selective_scan_step`; kernel variant and
    launch shape from :data:`TUNE`."""
    args = (u, delta, A, Bm, Cm, state, D, z, delta_bias, bool(delta_softplus))
    if torch.compiler.is_compiling():
        return torch.ops.hybridize.selective_scan_step(*args)
    return _step_impl(*args)


__all__ = ["LEGACY_TUNE", "TUNE", "selective_scan_step_triton", "tile_shape"]
