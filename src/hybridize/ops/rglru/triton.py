"""Triton kernels for the RG-LRU linear scan (forward, backward, one-token step).

Semantics are exactly those of :mod:`hybridize.ops.rglru.reference` (same signature):

    h_t = a_t * h_{t-1} + x_t,   h_{t-1} := 0 where reset[b, t],   h_{-1} = initial_state (or 0)

A reset at t is the same as a_t := 0, which is how the kernels implement it. Accumulation in fp32;
h is returned in x's dtype, the final state in fp32.

Kernels
-------
* ``_rglru_fwd_kernel``: grid (B, n_chunks, ceil(C/BLOCK_C)). Each program walks its time chunk
  (all of L when n_chunks = 1, the usual case) in tiles of BLOCK_T steps: it loads a
  (BLOCK_T, BLOCK_C) tile of x and a (many loads in flight, unlike a one-step-at-a-time loop; the
  loop is software-pipelined), scans it with ``tl.associative_scan`` over the pair (a, x) with
  (a1, x1) ∘ (a2, x2) = (a1·a2, a2·x1 + x2), applies the carried state, and keeps the last row as
  the carry. With one chunk x, a are read once and h written once.
* ``_rglru_bwd_kernel``: the same walk in reverse. With g_t = dL/dh_t (total):
      g_t = dh_t + a'_{t+1}·g_{t+1}     (a'_{t+1} = 0 if reset[t+1]; g_L := d final_state),
      dx_t = g_t,  da_t = g_t·h_{t-1} (0 where reset[t]),  d initial_state = a'_0·g_0.
  Tiles are loaded time-reversed so the recurrence is again a forward associative scan.
  h_{t-1} is read from the saved forward output h (x's dtype: with bf16 x, da uses a bf16-rounded
  h_{t-1}, a per-element relative error of ~2^-9, not accumulated).
* Only when B·ceil(C/BLOCK_C) is tiny (< SMs/2 programs) is time split into chunks: a SUMMARY pass
  computes each chunk's affine map (prod a', end state from 0), ``_rglru_carry_kernel`` chains the
  maps sequentially (B·n_chunks·C floats), and the main pass rescans each chunk from its carry-in.
  That reads x, a (resp. a, h, dh) twice; on an H100 it lost to the single pass down to 160
  programs, hence the threshold.
* ``_rglru_step_kernel``: one decode token, state updated in place.

HBM floor (bytes that must move; e_x, e_a element sizes, B·L·C elements)
------------------------------------------------------------------------
* forward:  read x, a + write h           = B·L·C·(2·e_x + e_a)   (+ B·L reset bytes, + states)
* backward: read a, h, dh + write dx, da  = B·L·C·(3·e_x + 2·e_a) (+ resets, states)
* step:     read x, a, state + write h, state = B·C·(2·e_x + e_a + 8)   (fp32 state)
Measured (H100, bf16, GPU time via CUDA-graph replay, triton 3.6): B·L·C = 4·4096·2560: forward
166 us = 1.5 TB/s, backward 202 us = 2.1 TB/s (a device copy: 2.9 TB/s); 1·2048·2560: 34 / 46 us.

Registered as ``torch.ops.hybridize.rglru_scan_fwd / rglru_scan_bwd / rglru_step``
(``torch.library.custom_op`` + fake + autograd) for torch.compile(fullgraph=True); eager calls go
through an equivalent ``torch.autograd.Function`` (custom_op's Python dispatch costs ~100 us a
call). No launch synchronises with the host, so all of them can be captured in CUDA graphs.
"""
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _lin_combine(a1, x1, a2, x2):
    # composition of h -> a1·h + x1 followed by h -> a2·h + x2 (element 1 is earlier in the scan)
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _last_row(v, rows, BLOCK_T: tl.constexpr):
    # row BLOCK_T-1 of a (BLOCK_T, BLOCK_C) tile (a masked sum: register tiles cannot be indexed)
    return tl.sum(tl.where((rows == BLOCK_T - 1)[:, None], v, 0.0), axis=0)


@triton.jit
def _rglru_fwd_kernel(x_ptr, a_ptr, carry_ptr, reset_ptr, h_ptr, fin_ptr, sum_ptr,
                      L, C, chunk_len, n_chunks,
                      sxb, sxl, sab, sal, scb, scn, srb, srl, shb, shl,
                      HAS_CARRY: tl.constexpr, HAS_RESET: tl.constexpr, SUMMARY: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Scan of one (batch, time chunk, channel block).

    SUMMARY=False: h over the chunk from the carried-in state (initial_state for a single chunk,
    else the per-chunk carries of _rglru_carry_kernel); the last chunk writes the final state.
    SUMMARY=True: scan from h = 0 and write only the chunk's affine map h_end = P·h_in + S
    (P = prod a', S = h_end from 0) into sum[b, chunk, 0/1, c]."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rows = tl.arange(0, BLOCK_T)
    if HAS_CARRY:
        carry = tl.load(carry_ptr + b * scb + chunk * scn + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_C,), dtype=tl.float32)
    prod = tl.full((BLOCK_C,), 1.0, dtype=tl.float32)
    t_start = chunk * chunk_len
    t_end = tl.minimum(t_start + chunk_len, L)
    for t0 in tl.range(t_start, t_end, BLOCK_T, num_stages=NUM_STAGES):
        t = t0 + rows
        tmask = t < L  # chunk_len is a multiple of BLOCK_T: tiles never cross a chunk end
        m = tmask[:, None] & cmask[None, :]
        t64 = t.to(tl.int64)[:, None]
        # padded rows (t >= L) get a = 1, x = 0: they pass the carry through unchanged
        xv = tl.load(x_ptr + b * sxb + t64 * sxl + c[None, :], mask=m, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + b * sab + t64 * sal + c[None, :], mask=m, other=1.0).to(tl.float32)
        if HAS_RESET:
            r = tl.load(reset_ptr + b * srb + t.to(tl.int64) * srl, mask=tmask, other=0)
            av = tl.where((r != 0)[:, None], 0.0, av)
        acum, xcum = tl.associative_scan((av, xv), 0, _lin_combine)
        h = acum * carry[None, :] + xcum
        if SUMMARY:
            prod = prod * _last_row(acum, rows, BLOCK_T)
        else:
            tl.store(h_ptr + b * shb + t64 * shl + c[None, :], h.to(h_ptr.dtype.element_ty), mask=m)
        carry = _last_row(h, rows, BLOCK_T)
    if SUMMARY:
        offs = ((b * n_chunks + chunk) * 2) * C + c
        tl.store(sum_ptr + offs, prod, mask=cmask)
        tl.store(sum_ptr + offs + C, carry, mask=cmask)
    else:
        if chunk == n_chunks - 1:
            # final state: fp32, allocated contiguous (B, C)
            tl.store(fin_ptr + b * C + c, carry, mask=cmask)


@triton.jit
def _rglru_carry_kernel(sum_ptr, carry0_ptr, cin_ptr, n_chunks, C, s0b,
                        HAS_CARRY0: tl.constexpr, REVERSE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sequential pass over the chunk maps: cin[b, k] = state entering chunk k (in scan order),
    starting from carry0 (initial_state forward, d final_state backward). B·n_chunks·C floats."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if HAS_CARRY0:
        carry = tl.load(carry0_ptr + b * s0b + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(0, n_chunks):
        if REVERSE:
            k = n_chunks - 1 - i
        else:
            k = i
        row = b * n_chunks + k
        tl.store(cin_ptr + row * C + c, carry, mask=cmask)
        p = tl.load(sum_ptr + (row * 2) * C + c, mask=cmask, other=0.0)
        s = tl.load(sum_ptr + (row * 2 + 1) * C + c, mask=cmask, other=0.0)
        carry = p * carry + s


@triton.jit
def _rglru_bwd_kernel(a_ptr, h_ptr, init_ptr, reset_ptr, dh_ptr, carry_ptr, dx_ptr, da_ptr, dinit_ptr,
                      sum_ptr,
                      L, C, chunk_len, n_chunks,
                      sab, sal, shb, shl, sib, srb, srl, sdb, sdl, scb, scn,
                      HAS_INIT: tl.constexpr, HAS_RESET: tl.constexpr, HAS_CARRY: tl.constexpr,
                      SUMMARY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                      NUM_STAGES: tl.constexpr):
    """Reverse scan of g over one (batch, time chunk, channel block); see the module docstring.
    The carry is g at the first step after the chunk (d final_state after the last one).
    SUMMARY=True writes only the chunk's map g_start = P·g_in + S into sum[b, chunk, 0/1, c]."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rows = tl.arange(0, BLOCK_T)
    if HAS_CARRY:
        carry = tl.load(carry_ptr + b * scb + chunk * scn + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_C,), dtype=tl.float32)
    prod = tl.full((BLOCK_C,), 1.0, dtype=tl.float32)
    t_start = chunk * chunk_len
    t_end = tl.minimum(t_start + chunk_len, L)
    n_tiles = tl.cdiv(t_end - t_start, BLOCK_T)
    for i in tl.range(0, n_tiles, num_stages=NUM_STAGES):
        t0 = t_start + (n_tiles - 1 - i) * BLOCK_T
        t = t0 + (BLOCK_T - 1) - rows          # row 0 is the latest time step of the tile
        tmask = t < L
        m = tmask[:, None] & cmask[None, :]
        t64 = t.to(tl.int64)[:, None]
        dy = tl.load(dh_ptr + b * sdb + t64 * sdl + c[None, :], mask=m, other=0.0).to(tl.float32)
        # coefficient carrying g_{t+1} into g_t: a'_{t+1}; 1 at t = L-1 (carry = d final) and on
        # padded rows t >= L (they pass the carry through)
        tn = t + 1
        nmask = tn < L
        an = tl.load(a_ptr + b * sab + t64 * sal + sal + c[None, :],
                     mask=nmask[:, None] & cmask[None, :], other=1.0).to(tl.float32)
        if HAS_RESET:
            rn = tl.load(reset_ptr + b * srb + tn.to(tl.int64) * srl, mask=nmask, other=0)
            an = tl.where((rn != 0)[:, None], 0.0, an)
        gcum_a, gcum = tl.associative_scan((an, dy), 0, _lin_combine)
        g = gcum_a * carry[None, :] + gcum
        if SUMMARY:
            prod = prod * _last_row(gcum_a, rows, BLOCK_T)
        else:
            # dx, da are allocated contiguous (B, L, C)
            offs = b * L * C + t64 * C + c[None, :]
            tl.store(dx_ptr + offs, g.to(dx_ptr.dtype.element_ty), mask=m)
            # h_{t-1}: the saved output, or the initial state at t = 0; zero where a reset drops it
            hp = tl.load(h_ptr + b * shb + t64 * shl - shl + c[None, :],
                         mask=(tmask & (t >= 1))[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            if HAS_INIT:
                h0 = tl.load(init_ptr + b * sib + c, mask=cmask, other=0.0).to(tl.float32)
                hp = tl.where((t == 0)[:, None], h0[None, :], hp)
            if HAS_RESET:
                r = tl.load(reset_ptr + b * srb + t.to(tl.int64) * srl, mask=tmask, other=0)
                hp = tl.where((r != 0)[:, None], 0.0, hp)
            tl.store(da_ptr + offs, (g * hp).to(da_ptr.dtype.element_ty), mask=m)
        # the last row of the reversed tile is t = t0 (always valid): g_{t0} carries on
        carry = _last_row(g, rows, BLOCK_T)
    if SUMMARY:
        offs = ((b * n_chunks + chunk) * 2) * C + c
        tl.store(sum_ptr + offs, prod, mask=cmask)
        tl.store(sum_ptr + offs + C, carry, mask=cmask)
    else:
        if HAS_INIT:
            if chunk == 0:
                # d h_{-1} = a'_0 · g_0 (carry is g_0; L >= 1 is guaranteed by the launcher)
                a0 = tl.load(a_ptr + b * sab + c, mask=cmask, other=0.0).to(tl.float32)
                if HAS_RESET:
                    r0 = tl.load(reset_ptr + b * srb)
                    a0 = tl.where(r0 != 0, 0.0, a0)
                tl.store(dinit_ptr + b * C + c, (a0 * carry).to(dinit_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _rglru_step_kernel(x_ptr, a_ptr, s_ptr, h_ptr, C, sxb, sab, ssb, ssc, shb, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    xv = tl.load(x_ptr + b * sxb + c, mask=cmask, other=0.0).to(tl.float32)
    av = tl.load(a_ptr + b * sab + c, mask=cmask, other=0.0).to(tl.float32)
    sp = s_ptr + b * ssb + c.to(tl.int64) * ssc
    h = av * tl.load(sp, mask=cmask, other=0.0).to(tl.float32) + xv
    tl.store(sp, h.to(s_ptr.dtype.element_ty), mask=cmask)
    tl.store(h_ptr + b * shb + c, h.to(h_ptr.dtype.element_ty), mask=cmask)


# ------------------------------------------------------------------------------------------------
# launch helpers
# ------------------------------------------------------------------------------------------------
# Tunables (module-level so a benchmark can sweep them). Chosen on an H100 (bf16): a single pass
# with (BLOCK_T, BLOCK_C) = (128, 16) and a 2-stage pipelined time loop reaches 1.5 TB/s forward
# and 2.1 TB/s backward at B·L·C = 4·4096·2560 (a copy: 2.9 TB/s); at 1·2048·2560 (160 programs)
# BLOCK_T = 256 gives 0.93 / 1.14 TB/s. Splitting time into chunks (two-pass: x, a read twice) was
# slower at both sizes, so it is only used when there are fewer than chunk_below_per_sm · SMs
# programs (tiny B·C), aiming at ~2 programs per SM.
_TUNE = {"block_t": 128, "block_t_small": 256, "block_c": 16, "num_warps": 4, "stages": 2,
         "chunk_below_per_sm": 0.5, "min_chunk": 256, "force_chunks": None}


def _rows_unit_stride(t: Tensor) -> Tensor:
    """Kernels need a unit channel stride only (batch/time strides are passed in)."""
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _num_sms_cached(device_type: str, index: Optional[int]) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else 0).multi_processor_count
    return 1  # interpreter: few programs


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    return _num_sms_cached(device.type, index)


def _plan(Bsz: int, L: int, C: int, device: torch.device):
    """-> BLOCK_T, BLOCK_C, chunk_len, n_chunks."""
    sms = _num_sms(device)
    BLOCK_C = min(_TUNE["block_c"], max(16, triton.next_power_of_2(max(C, 1))))
    progs = Bsz * triton.cdiv(C, BLOCK_C)
    # fewer programs -> longer tiles: more bytes in flight per program
    block_t = _TUNE["block_t"] if progs >= 2 * sms else _TUNE["block_t_small"]
    BLOCK_T = min(block_t, max(16, triton.next_power_of_2(max(L, 1))))
    n_chunks = _TUNE["force_chunks"]
    if n_chunks is None:
        n_chunks = 1
        if progs < _TUNE["chunk_below_per_sm"] * sms:
            n_chunks = min(triton.cdiv(2 * sms, progs), triton.cdiv(L, _TUNE["min_chunk"]))
    n_chunks = max(1, min(n_chunks, triton.cdiv(L, BLOCK_T)))
    chunk_len = triton.cdiv(triton.cdiv(max(L, 1), n_chunks), BLOCK_T) * BLOCK_T
    n_chunks = max(1, triton.cdiv(L, chunk_len))
    return BLOCK_T, BLOCK_C, chunk_len, n_chunks


def _launch_opts():
    return {"NUM_STAGES": _TUNE["stages"], "num_warps": _TUNE["num_warps"]}


def _reset_args(reset: Optional[Tensor], x: Tensor):
    if reset is None:
        return x, 0, 0
    if reset.dtype == torch.bool:
        reset = reset.view(torch.uint8)  # zero-copy reinterpretation: byte loads
    return reset, reset.stride(0), reset.stride(1)


def _chunk_carries(sums: Tensor, carry0: Optional[Tensor], reverse: bool, BLOCK_C: int) -> Tensor:
    """(B, n_chunks, 2, C) chunk maps -> (B, n_chunks, C) states entering each chunk."""
    Bsz, n_chunks, _, C = sums.shape
    cin = torch.empty(Bsz, n_chunks, C, device=sums.device, dtype=torch.float32)
    _rglru_carry_kernel[(Bsz, triton.cdiv(C, BLOCK_C))](
        sums, carry0 if carry0 is not None else sums, cin, n_chunks, C,
        carry0.stride(0) if carry0 is not None else 0,
        HAS_CARRY0=carry0 is not None, REVERSE=reverse, BLOCK_C=BLOCK_C, num_warps=1)
    return cin


def _fwd_impl(x: Tensor, a: Tensor, initial_state: Optional[Tensor], reset: Optional[Tensor]):
    if x.dim() != 3 or a.shape != x.shape:
        raise ValueError(f"x and a must both be (B, L, C), got {tuple(x.shape)} and {tuple(a.shape)}")
    Bsz, L, C = x.shape
    x, a = _rows_unit_stride(x), _rows_unit_stride(a)
    h = torch.empty(Bsz, L, C, device=x.device, dtype=x.dtype)
    final = torch.empty(Bsz, C, device=x.device, dtype=torch.float32)
    if Bsz * C == 0:
        return h, final
    if L == 0:
        if initial_state is None:
            final.zero_()
        else:
            final.copy_(initial_state)
        return h, final
    init = _rows_unit_stride(initial_state) if initial_state is not None else None
    rs, srb, srl = _reset_args(reset, x)
    BLOCK_T, BLOCK_C, chunk_len, n_chunks = _plan(Bsz, L, C, x.device)
    grid = (Bsz, n_chunks, triton.cdiv(C, BLOCK_C))
    common = (L, C, chunk_len, n_chunks, x.stride(0), x.stride(1), a.stride(0), a.stride(1))
    if n_chunks == 1:
        carry, scb, scn = init, (init.stride(0) if init is not None else 0), 0
    else:
        sums = torch.empty(Bsz, n_chunks, 2, C, device=x.device, dtype=torch.float32)
        _rglru_fwd_kernel[grid](x, a, x, rs, h, final, sums, *common, 0, 0, srb, srl, 0, 0,
                                HAS_CARRY=False, HAS_RESET=reset is not None, SUMMARY=True,
                                BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, **_launch_opts())
        carry = _chunk_carries(sums, init, False, BLOCK_C)
        scb, scn = carry.stride(0), carry.stride(1)
    _rglru_fwd_kernel[grid](x, a, carry if carry is not None else x, rs, h, final, final, *common,
                            scb, scn, srb, srl, h.stride(0), h.stride(1),
                            HAS_CARRY=carry is not None, HAS_RESET=reset is not None, SUMMARY=False,
                            BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, **_launch_opts())
    return h, final


def _bwd_impl(a, h, initial_state, reset, dh, dfinal):
    Bsz, L, C = a.shape
    dx = torch.empty(Bsz, L, C, device=a.device, dtype=h.dtype)
    da = torch.empty(Bsz, L, C, device=a.device, dtype=a.dtype)
    idtype = initial_state.dtype if initial_state is not None else torch.float32
    # only returned to autograd when initial_state exists, and then fully written: no memset
    dinit = torch.empty(Bsz, C, device=a.device, dtype=idtype)
    if Bsz * C == 0:
        return dx, da, dinit
    if L == 0:
        if dfinal is not None:
            dinit.copy_(dfinal)
        else:
            dinit.zero_()
        return dx, da, dinit
    a, h, dh = _rows_unit_stride(a), _rows_unit_stride(h), _rows_unit_stride(dh)
    init = _rows_unit_stride(initial_state) if initial_state is not None else None
    dfin = _rows_unit_stride(dfinal) if dfinal is not None else None
    rs, srb, srl = _reset_args(reset, a)
    BLOCK_T, BLOCK_C, chunk_len, n_chunks = _plan(Bsz, L, C, a.device)
    grid = (Bsz, n_chunks, triton.cdiv(C, BLOCK_C))
    common = (L, C, chunk_len, n_chunks, a.stride(0), a.stride(1), h.stride(0), h.stride(1),
              init.stride(0) if init is not None else 0, srb, srl, dh.stride(0), dh.stride(1))
    init_arg = init if init is not None else a
    if n_chunks == 1:
        carry, scb, scn = dfin, (dfin.stride(0) if dfin is not None else 0), 0
    else:
        sums = torch.empty(Bsz, n_chunks, 2, C, device=a.device, dtype=torch.float32)
        _rglru_bwd_kernel[grid](a, h, init_arg, rs, dh, a, dx, da, dinit, sums, *common, 0, 0,
                                HAS_INIT=init is not None, HAS_RESET=reset is not None, HAS_CARRY=False,
                                SUMMARY=True, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, **_launch_opts())
        carry = _chunk_carries(sums, dfin, True, BLOCK_C)
        scb, scn = carry.stride(0), carry.stride(1)
    _rglru_bwd_kernel[grid](a, h, init_arg, rs, dh, carry if carry is not None else a, dx, da, dinit, dinit,
                            *common, scb, scn,
                            HAS_INIT=init is not None, HAS_RESET=reset is not None,
                            HAS_CARRY=carry is not None, SUMMARY=False, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
                            **_launch_opts())
    return dx, da, dinit


def _step_impl(x: Tensor, a: Tensor, state: Tensor) -> Tensor:
    Bsz, C = x.shape
    x, a = _rows_unit_stride(x), _rows_unit_stride(a)
    h = torch.empty_like(x)
    BLOCK_C = min(1024, triton.next_power_of_2(max(C, 1)))
    _rglru_step_kernel[(Bsz, triton.cdiv(C, BLOCK_C))](
        x, a, state, h, C, x.stride(0), a.stride(0), state.stride(0), state.stride(1), h.stride(0),
        BLOCK_C=BLOCK_C, num_warps=4)
    return h


# ------------------------------------------------------------------------------------------------
# torch.library registration (torch.compile) and the eager autograd.Function
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("hybridize::rglru_scan_fwd", mutates_args=())
def _rglru_scan_fwd_op(x: Tensor, a: Tensor, initial_state: Optional[Tensor],
                       reset: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return _fwd_impl(x, a, initial_state, reset)


@_rglru_scan_fwd_op.register_fake
def _(x, a, initial_state, reset):
    Bsz, L, C = x.shape
    return x.new_empty(Bsz, L, C), x.new_empty(Bsz, C, dtype=torch.float32)


@torch.library.custom_op("hybridize::rglru_scan_bwd", mutates_args=())
def _rglru_scan_bwd_op(a: Tensor, h: Tensor, initial_state: Optional[Tensor], reset: Optional[Tensor],
                       dh: Tensor, dfinal: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(a, h, initial_state, reset, dh, dfinal)


@_rglru_scan_bwd_op.register_fake
def _(a, h, initial_state, reset, dh, dfinal):
    Bsz, L, C = a.shape
    idtype = initial_state.dtype if initial_state is not None else torch.float32
    return h.new_empty(Bsz, L, C), a.new_empty(Bsz, L, C), a.new_empty(Bsz, C, dtype=idtype)


def _setup_context(ctx, inputs, output):
    x, a, initial_state, reset = inputs
    ctx.save_for_backward(a, output[0], initial_state, reset)


def _backward(ctx, dh, dfinal, bwd):
    a, h, initial_state, reset = ctx.saved_tensors
    if dh is None:  # only the final state was used
        dh = torch.zeros_like(h)
    dx, da, dinit = bwd(a, h, initial_state, reset, dh, dfinal)
    return dx, da, (dinit if initial_state is not None else None), None


_rglru_scan_fwd_op.register_autograd(
    lambda ctx, dh, dfinal: _backward(ctx, dh, dfinal, torch.ops.hybridize.rglru_scan_bwd),
    setup_context=_setup_context)


class _RGLRUScanFn(torch.autograd.Function):
    """Eager path: the same kernels without custom_op's Python dispatch (~100-200 us a call)."""

    @staticmethod
    def forward(ctx, x, a, initial_state, reset):
        out = _fwd_impl(x, a, initial_state, reset)
        _setup_context(ctx, (x, a, initial_state, reset), out)
        return out

    @staticmethod
    def backward(ctx, dh, dfinal):
        return _backward(ctx, dh, dfinal, _bwd_impl)


@torch.library.custom_op("hybridize::rglru_step", mutates_args=("state",))
def _rglru_step_op(x: Tensor, a: Tensor, state: Tensor) -> Tensor:
    return _step_impl(x, a, state)


@_rglru_step_op.register_fake
def _(x, a, state):
    return torch.empty_like(x)


# ------------------------------------------------------------------------------------------------
# public API (same signatures as the reference)
# ------------------------------------------------------------------------------------------------
def rglru_scan_triton(x: Tensor, a: Tensor, *, initial_state: Optional[Tensor] = None,
                      reset: Optional[Tensor] = None, return_final_state: bool = True):
    """x, a: (B, L, C); initial_state: (B, C) (fp32 recommended); reset: (B, L) bool.

    Returns h (B, L, C) in x's dtype and, if requested, the final state (B, C) in fp32.
    Differentiable in x, a and initial_state. Under torch.compile this is the custom op
    torch.ops.hybridize.rglru_scan_fwd; in eager mode an autograd.Function around the same launches.
    """
    if torch.compiler.is_compiling():
        h, final = torch.ops.hybridize.rglru_scan_fwd(x, a, initial_state, reset)
    else:
        h, final = _RGLRUScanFn.apply(x, a, initial_state, reset)
    return (h, final) if return_final_state else h


def rglru_step_triton(x: Tensor, a: Tensor, state: Tensor) -> Tensor:
    """One step: x, a: (B, C); state (B, C) (any strides) updated in place. Returns h in x's dtype.
    No host synchronisation: capturable in a CUDA graph."""
    if x.dim() != 2 or a.shape != x.shape or state.shape != x.shape:
        raise ValueError("x, a and state must all be (B, C)")
    if torch.compiler.is_compiling():
        return torch.ops.hybridize.rglru_step(x, a, state)
    return _step_impl(x, a, state)


__all__ = ["rglru_scan_triton", "rglru_step_triton"]
