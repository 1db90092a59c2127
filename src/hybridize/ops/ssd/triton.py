"""Triton kernels for the chunked SSD scan (Mamba-2 / discrete Mamba-2), forward and backward.

Semantics are exactly those of :func:`hybridize.ops.ssd.reference.ssd_chunked` (same signature). Per
batch row b and head h (group g = h // (H // G)), with dt after bias/softplus/clamp and a_t = dt_t·A_h
(or ``log_decay``):

    h_t = exp(a_t)·h_{t-1} + dt_t·x_t ⊗ B_t,     y_t = h_t·C_t + D·x_t,     out = y·silu(z)

Chunked algorithm (chunk of Q tokens, cs_l = a_0 + … + a_l inside the chunk, h_in = state entering it)
------------------------------------------------------------------------------------------------------
    y_l    = Σ_{s≤l} (C_l·B_s)·exp(cs_l − cs_s)·dt_s·x_s      intra-chunk: two Q×Q×{N,P} matmuls
           + exp(cs_l)·(h_in·C_l)                            state → output: one Q×N×P matmul
    h_out  = exp(cs_{Q-1})·h_in + Σ_s exp(cs_{Q-1} − cs_s)·dt_s·x_s ⊗ B_s     one P×Q×N matmul

With documents (``seq_idx``) every term is masked: s and l must be in the same document, h_in only
reaches tokens of the document that was running when the chunk started, and only tokens of the
chunk's last document reach h_out (h_in is dropped from h_out if a document starts in the chunk).

Kernels (all dots take x's dtype — bf16/fp16 on tensor cores, or fp32 with ``ieee`` precision — and
accumulate in fp32; the running state is fp32 in registers)
-----------------------------------------------------------------------------------------------------
* ``_ssd_dt_kernel`` — grid (B·nc, ⌈H/BH⌉): dt → clamp(softplus(dt + bias)), per-chunk inclusive
  cumsum of the log decay. Writes ``dtp``, ``cs``: (B, H, nc·Q) fp32 (padding tokens: dt = a = 0).
* ``_ssd_state_fwd_kernel`` — grid (B·H, ⌈P/BP⌉·⌈N/BN⌉, segments): steps 2+3 fused
  (flash-linear-attention's ``chunk_fwd_h`` idea). Each program walks chunks in order keeping a
  (BP, BN) block of the state in fp32 registers and stores the state *entering* each chunk (``hs``
  (B, nc, H, P, N), x's dtype — exactly what the output matmul consumes) and the final state (fp32).
  No per-chunk local states go through HBM (mamba_ssm's chunk_state → state_passing round trip).
  A walk is serial, so when B·H·blocks does not fill the GPU (long L, small batch) the chunks are
  cut into S segments (``_state_plan``): pass 1 computes each segment's own end state and total decay
  in parallel, pass 2 folds the earlier segments into each segment's entering state and walks it.
* ``_ssd_out_fwd_kernel`` — grid (nc, B·H, ⌈P/BP⌉): steps 1+4 fused. C·Bᵀ, the masked decay, ·x,
  + C·h_inᵀ, + D·x, ·silu(z); y written once.

Backward (recompute, nothing big saved: the forward saves only its inputs)
* ``_ssd_dt_kernel`` and ``_ssd_state_fwd_kernel`` again (``hs``).
* ``_ssd_dstate_kernel`` — grid and segments as the state walk: the reverse scan of the state
  gradient. dH_c = ∂L/∂(state at the end of chunk c):  dH_{nc-1} = d final_state and
      dH_{c-1} = exp(cs_{Q-1})·dH_c + Σ_l exp(cs_l)·dy_l ⊗ C_l        (dy = dout·silu(z))
  stores ``dhs`` (B, nc, H, P, N) and d initial_state (= dH_{-1}).
* Everything else is chunk-parallel, in two kernels. With M_ls = [s≤l]·exp(cs_l − cs_s),
  S = M∘(C Bᵀ), Gm_ls = dy_l·x_s, w_s = exp(cs_{Q-1} − cs_s), y_off_l = exp(cs_l)·(C h_inᵀ)_l:
      dx_s  = dt_s·(Sᵀ dy)_s + w_s·dt_s·(B dHᵀ)_s + D·dy_s
      dB_s  = (Wᵀ C)_s + w_s·dt_s·(x dH)_s,       W_ls = M_ls·Gm_ls·dt_s  (summed over the group's heads)
      dC_l  = (W B)_l + exp(cs_l)·(dy h_in)_l
      ddt_s = Σ_l (S∘Gm)_ls + w_s·x_s·(dH B_s)
      dcs_l = Σ_s T_ls − Σ_s T_sl + dy_l·y_off_l − w_l dt_l x_l·(dH B_l)
              (+ at l = Q−1: Σ_s w_s dt_s x_s·(dH B_s) + exp(cs_{Q-1})·⟨h_in, dH⟩),   T = S∘Gm·dt_s
      da    = reverse cumsum of dcs;  ddt += da·A, dA = Σ da·dt  (or d log_decay = da)
  then the dt chain (clamp mask — zero gradient where clamped —, softplus'), dD, dz (y recomputed).
  - ``_ssd_bwd_dx_kernel`` — grid (nc, B·H/heads): dx, dz, ddt, d log_decay and per-chunk
    partial sums of dD, dA, d dt_bias (summed by torch). Per head nothing is shared but B, C, C·Bᵀ,
    so by default one head per program (``dx_heads``): 8192 small programs at 16k tokens, H=32.
  - ``_ssd_bwd_dbc_kernel`` — grid (nc·⌈N/BN⌉, B·G·splits): dB, dC need a sum over the group's heads
    (all 32 with G=1). A program loops over a slice of the heads and accumulates only W (Q×Q) and the
    two state terms (Q×BN, one Q·P·BN matmul each per head); the two Q×Q×BN matmuls with B and C run
    once after the loop. Slices (only when B·nc·⌈N/BN⌉ would not fill the GPU) write fp32 partials
    that torch sums.
  Why two kernels: one program per (chunk, group) looping over all heads (the first version: dx and
  dB/dC in one loop) had ~250 live fp32 registers per thread, spilled, ran B·nc programs (256 at 16k
  tokens for 132 SMs) and took 2.36 ms on an H100; the split takes 0.43 + 0.19 ms.

HBM traffic (forward; e = element size): x twice, B/C, y, and hs twice (B·nc·H·P·N·e each way; N/Q
× the size of x) — for H=32, P=64, N=128, Q=64, 16k tokens, bf16: ≈ 0.48 GB, ≈ 0.14 ms at 3.35 TB/s.

Registered as ``torch.ops.hybridize.ssd_chunked_fwd / ssd_chunked_bwd`` (``torch.library.custom_op`` +
fake + autograd) so torch.compile(fullgraph=True) can capture them; launches do no host sync. Eager
calls use an equivalent ``torch.autograd.Function`` instead (``_SSDEager``): the custom-op Python
dispatch costs ~0.1 ms of host time per forward and ~0.35 ms per forward+backward (H100 host), and a
forward+backward here is host-bound (about 1.6 ms of host time for ~1.1 ms of GPU work at 16k tokens).

Limits: P, N <= 256 (whole-P / whole-N tiles in the chunk kernels; larger shapes go to the reference
through the dispatch); fp32/bf16/fp16. The kernel chunk is ``kernel_chunk(chunk_size)`` (a power of two
in [16, TUNE['chunk']]; the result depends on it only through rounding), and a launch that runs out
of shared memory is retried with half the chunk. Under TRITON_INTERPRET=1 bf16 dots are wrong (numpy
has no bf16) — CPU tests use fp32/fp16.

Tuning: the module-level dict ``TUNE`` (chunk, block sizes, warps, stages, heads per program) is
read at launch time, so a benchmark can sweep it without touching code.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

# Launch knobs (None = heuristic). Read at every launch.
TUNE = {
    "chunk": 64,            # largest kernel chunk; the user's chunk_size is clamped to [16, chunk]
    "state_bp": None,       # P block of the sequential state walks (fwd states, bwd d-states)
    "state_bn": None,       # N block of the sequential state walks
    "state_segments": None, # segments of the state walks (None: enough to fill the SMs; 1: plain walk)
    "state_warps": 4,
    "state_stages": 3,
    "out_bp": None,         # P block of the forward output kernel
    "out_warps": 4,
    "out_stages": 2,
    "dx_heads": 1,          # backward part 1 (dx, ddt, ...): heads per program (None: heuristic;
    "dx_warps": 4,          #   must divide H // G) — 1 head at 4 warps: 0.43 ms vs 0.66+ (H100, 16k tok.)
    "dx_stages": 2,
    "bwd_heads": None,      # backward part 2 (dB, dC): heads per program (must divide H // G)
    "bwd_bn": None,         # backward part 2: N block
    "bwd_warps": 4,
    "bwd_stages": 3,
}

_MAX_PN = 256               # P and N up to this run in the kernels (whole-P / whole-N tiles)
_MAX_SEGMENTS = 16          # segments of a state walk (see _state_plan)


# ------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _softplus(v):
    # torch.nn.functional.softplus (threshold 20: linear above). log1p(e) without a log1p builtin:
    # log(u)·e/(u − 1) with u = 1 + e cancels the rounding of u (exact to a few ulps for tiny e).
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    sp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(v > 20.0, v, sp)


@triton.jit
def _seq_at(seq_ptr, b64, pos, L, ssb, ssl):
    """Document id at positions `pos` clamped into [0, L) (padding continues the last document)."""
    p = tl.minimum(tl.maximum(pos, 0), L - 1).to(tl.int64)
    return tl.load(seq_ptr + b64 * ssb + p * ssl)


# ------------------------------------------------------------------------------------------------
# step 1: dt processing and per-chunk cumulative log decay
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ssd_dt_kernel(dt_ptr, bias_ptr, A_ptr, ld_ptr, dtp_ptr, cs_ptr,
                   L, H, nc, Lp, sdb, sdl, sdh, slb, sll, slh, dt_min, dt_max,
                   HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LOG_DECAY: tl.constexpr,
                   Q: tl.constexpr, BH: tl.constexpr):
    """dt (B, L, H) → dtp, cs (B, H, nc·Q) fp32; one (Q, BH) tile of one chunk per program."""
    pid = tl.program_id(0)
    b = pid // nc
    c = pid % nc
    b64 = b.to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    hm = h < H
    t = c * Q + tl.arange(0, Q)
    tm = t < L
    t64 = t.to(tl.int64)
    m = tm[:, None] & hm[None, :]
    v = tl.load(dt_ptr + b64 * sdb + t64[:, None] * sdl + h[None, :] * sdh, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + h, mask=hm, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        v = _softplus(v)
    v = tl.minimum(tl.maximum(v, dt_min), dt_max)   # always clamped, like the reference
    v = tl.where(m, v, 0.0)                         # padding tokens neither decay nor write
    if LOG_DECAY:
        a = tl.load(ld_ptr + b64 * slb + t64[:, None] * sll + h[None, :] * slh, mask=m, other=0.0)
        a = a.to(tl.float32)
    else:
        a = v * tl.load(A_ptr + h, mask=hm, other=0.0).to(tl.float32)[None, :]
    cs = tl.cumsum(a, axis=0)
    offs = (b64 * H + h[None, :]) * Lp + t64[:, None]
    tl.store(dtp_ptr + offs, v, mask=hm[None, :])
    tl.store(cs_ptr + offs, cs, mask=hm[None, :])


# ------------------------------------------------------------------------------------------------
# steps 2+3: chunk states and state passing, sequential walks over the chunks (optionally segmented)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ssd_state_fwd_kernel(x_ptr, B_ptr, dtp_ptr, cs_ptr, seq_ptr, init_ptr, seg_ptr, segd_ptr, hs_ptr, fin_ptr,
                          L, H, G, P, N, nc, Lp, cps, NSEG,
                          sxb, sxl, sxh, sBb, sBl, sBg, ssb, ssl,
                          Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, LOCAL: tl.constexpr,
                          HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, PREC: tl.constexpr):
    """Walks the chunks [k·cps, (k+1)·cps) of segment k = program_id(2) for one (b, h, P block, N block).

    Per chunk: h_out = decay_c·h_in + (x·w)ᵀ B  with w_s = exp(cs_{Q-1} − cs_s)·dt_s (·[s in the
    chunk's last document]) and decay_c = exp(cs_{Q-1}) (0 if a document starts in the chunk).

    LOCAL (pass 1, segments 0 … NSEG-2): start from zero, store the segment's own end state
    ``seg[b, h, k]`` (fp32) and its total decay ``segd[b, h, k]`` = Π decay_c.
    Otherwise (pass 2): the state entering segment k is the initial state folded through the earlier
    segments (acc = acc·segd_j + seg_j, j < k); then walk, writing hs[b, c, h] = state entering chunk c
    (x's dtype) and, in the last segment, the final state (fp32). With NSEG = 1 this is one plain walk."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    g = h // (H // G)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    bh = b64 * H + h64
    DT = x_ptr.dtype.element_ty
    nnb = tl.cdiv(N, BN)
    p = (tl.program_id(1) // nnb) * BP + tl.arange(0, BP)
    n = (tl.program_id(1) % nnb) * BN + tl.arange(0, BN)
    k = tl.program_id(2)
    c0 = k * cps
    c1 = tl.minimum(c0 + cps, nc)
    pm = p < P
    nm = n < N
    q = tl.arange(0, Q)
    st_off = p[:, None] * N + n[None, :]
    st_m = pm[:, None] & nm[None, :]
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    if not LOCAL:
        if HAS_INIT:
            acc = tl.load(init_ptr + bh * P * N + st_off, mask=st_m, other=0.0).to(tl.float32)
        for j in range(k):
            sj = bh * NSEG + j
            acc = acc * tl.load(segd_ptr + sj) + tl.load(seg_ptr + sj * P * N + st_off, mask=st_m, other=0.0)
    dec = tl.full([], 1.0, tl.float32)
    x_base = x_ptr + b64 * sxb + h64 * sxh
    B_base = B_ptr + b64 * sBb + g.to(tl.int64) * sBg
    d_base = bh * Lp
    if HAS_SEQ:
        doc_prev = _seq_at(seq_ptr, b64, c0 * Q - 1, L, ssb, ssl)   # the initial state's doc: token 0's
    for c in range(c0, c1):
        t = c * Q + q
        tm = t < L
        t64 = t.to(tl.int64)
        if not LOCAL:
            tl.store(hs_ptr + ((b64 * nc + c) * H + h64) * P * N + st_off, acc.to(DT), mask=st_m)
        cs = tl.load(cs_ptr + d_base + t64)
        dtv = tl.load(dtp_ptr + d_base + t64)
        cs_last = tl.load(cs_ptr + d_base + c * Q + Q - 1)
        w = tl.exp(cs_last - cs) * dtv
        decay = tl.exp(cs_last)
        if HAS_SEQ:
            sid = _seq_at(seq_ptr, b64, t, L, ssb, ssl)
            doc_end = _seq_at(seq_ptr, b64, c * Q + Q - 1, L, ssb, ssl)
            w = tl.where(sid == doc_end, w, 0.0)
            decay = tl.where(doc_end == doc_prev, decay, 0.0)
            doc_prev = doc_end
        xT = tl.load(x_base + t64[None, :] * sxl + p[:, None], mask=pm[:, None] & tm[None, :], other=0.0)
        Bt = tl.load(B_base + t64[:, None] * sBl + n[None, :], mask=tm[:, None] & nm[None, :], other=0.0)
        acc = tl.dot((xT.to(tl.float32) * w[None, :]).to(DT), Bt.to(DT), acc * decay, input_precision=PREC)
        dec = dec * decay
    if LOCAL:
        sk = bh * NSEG + k
        tl.store(seg_ptr + sk * P * N + st_off, acc, mask=st_m)
        tl.store(segd_ptr + sk, dec)
    elif k == NSEG - 1:
        tl.store(fin_ptr + bh * P * N + st_off, acc, mask=st_m)


# ------------------------------------------------------------------------------------------------
# steps 1+4: outputs, chunk-parallel
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ssd_out_fwd_kernel(x_ptr, z_ptr, B_ptr, C_ptr, D_ptr, dtp_ptr, cs_ptr, seq_ptr, hs_ptr, y_ptr,
                        L, H, G, P, N, nc, Lp,
                        sxb, sxl, sxh, szb, szl, szh, sBb, sBl, sBg, sCb, sCl, sCg, ssb, ssl,
                        Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                        HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
                        HAS_SEQ: tl.constexpr, PREC: tl.constexpr):
    """y[chunk c, head h, P block] = ((C Bᵀ)∘decay·dt) x + exp(cs)·C h_inᵀ (+ D x) (· silu(z))."""
    c = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // H
    h = pid % H
    g = h // (H // G)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    g64 = g.to(tl.int64)
    DT = x_ptr.dtype.element_ty
    p = tl.program_id(2) * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    q = tl.arange(0, Q)
    pm = p < P
    nm = n < N
    t = c * Q + q
    tm = t < L
    t64 = t.to(tl.int64)
    d_base = (b64 * H + h64) * Lp
    cs = tl.load(cs_ptr + d_base + t64)
    dtv = tl.load(dtp_ptr + d_base + t64)
    qn = tm[:, None] & nm[None, :]
    Cv = tl.load(C_ptr + b64 * sCb + g64 * sCg + t64[:, None] * sCl + n[None, :], mask=qn, other=0.0).to(DT)
    Bv = tl.load(B_ptr + b64 * sBb + g64 * sBg + t64[:, None] * sBl + n[None, :], mask=qn, other=0.0).to(DT)
    CB = tl.dot(Cv, tl.trans(Bv), input_precision=PREC)                      # (Q, Q)
    keep = q[:, None] >= q[None, :]
    e_in = tl.exp(cs)
    if HAS_SEQ:
        sid = _seq_at(seq_ptr, b64, t, L, ssb, ssl)
        doc_in = _seq_at(seq_ptr, b64, c * Q - 1, L, ssb, ssl)               # document of h_in
        keep = keep & (sid[:, None] == sid[None, :])
        e_in = tl.where(sid == doc_in, e_in, 0.0)
    # masked exp(segsum): exp(cs_l − cs_s) for s ≤ l in the same document, 0 elsewhere
    S = CB * tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf"))) * dtv[None, :]
    qp = tm[:, None] & pm[None, :]
    xv = tl.load(x_ptr + b64 * sxb + h64 * sxh + t64[:, None] * sxl + p[None, :], mask=qp, other=0.0)
    y = tl.dot(S.to(DT), xv.to(DT), input_precision=PREC)                   # (Q, BP)
    hT = tl.load(hs_ptr + ((b64 * nc + c) * H + h64) * P * N + p[None, :] * N + n[:, None],
                 mask=nm[:, None] & pm[None, :], other=0.0)                  # h_inᵀ (BN, BP)
    y += tl.dot(Cv, hT.to(DT), input_precision=PREC) * e_in[:, None]
    if HAS_D:
        if D_PER_P:
            Dv = tl.load(D_ptr + h64 * P + p, mask=pm, other=0.0).to(tl.float32)
            y += xv.to(tl.float32) * Dv[None, :]
        else:
            y += xv.to(tl.float32) * tl.load(D_ptr + h64).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + b64 * szb + h64 * szh + t64[:, None] * szl + p[None, :], mask=qp, other=0.0)
        zv = zv.to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(y_ptr + ((b64 * L + t64[:, None]) * H + h64) * P + p[None, :], y.to(y_ptr.dtype.element_ty),
             mask=qp)


# ------------------------------------------------------------------------------------------------
# backward: reverse scan of the state gradient (segmented like the forward walk)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ssd_dstate_kernel(do_ptr, z_ptr, C_ptr, cs_ptr, seq_ptr, dfin_ptr, seg_ptr, segd_ptr, dhs_ptr, dinit_ptr,
                       L, H, G, P, N, nc, Lp, cps, NSEG, k_off,
                       sob, sol, soh, szb, szl, szh, sCb, sCl, sCg, ssb, ssl,
                       Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, LOCAL: tl.constexpr,
                       HAS_DFIN: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
                       PREC: tl.constexpr):
    """dhs[b, c, h] = ∂L/∂(state at the end of chunk c); dinit = ∂L/∂(initial state), fp32.

    dH_{c-1} = decay_c·dH_c + (dy·exp(cs)·[l in h_in's document])ᵀ C  (the transpose of the forward
    state walk, run from the last chunk to the first). Segment k = program_id(2) + k_off covers the
    chunks [k·cps, (k+1)·cps). LOCAL (pass 1, segments 1 … NSEG-1): from zero, store the segment's
    own contribution ``seg[b, h, k]`` and decay ``segd[b, h, k]``. Otherwise (pass 2): fold d final
    through the later segments (j = NSEG-1 … k+1), then walk writing dhs, and dinit in segment 0."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    g = h // (H // G)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    bh = b64 * H + h64
    DT = dhs_ptr.dtype.element_ty
    nnb = tl.cdiv(N, BN)
    p = (tl.program_id(1) // nnb) * BP + tl.arange(0, BP)
    n = (tl.program_id(1) % nnb) * BN + tl.arange(0, BN)
    k = tl.program_id(2) + k_off
    c0 = k * cps
    c1 = tl.minimum(c0 + cps, nc)
    pm = p < P
    nm = n < N
    q = tl.arange(0, Q)
    st_off = p[:, None] * N + n[None, :]
    st_m = pm[:, None] & nm[None, :]
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    if not LOCAL:
        if HAS_DFIN:
            acc = tl.load(dfin_ptr + bh * P * N + st_off, mask=st_m, other=0.0).to(tl.float32)
        for i in range(NSEG - 1 - k):
            sj = bh * NSEG + (NSEG - 1 - i)
            acc = acc * tl.load(segd_ptr + sj) + tl.load(seg_ptr + sj * P * N + st_off, mask=st_m, other=0.0)
    dec = tl.full([], 1.0, tl.float32)
    o_base = do_ptr + b64 * sob + h64 * soh
    z_base = z_ptr + b64 * szb + h64 * szh
    C_base = C_ptr + b64 * sCb + g.to(tl.int64) * sCg
    d_base = bh * Lp
    for i in range(c1 - c0):
        c = c1 - 1 - i
        t = c * Q + q
        tm = t < L
        t64 = t.to(tl.int64)
        if not LOCAL:
            tl.store(dhs_ptr + ((b64 * nc + c) * H + h64) * P * N + st_off, acc.to(DT), mask=st_m)
        cs = tl.load(cs_ptr + d_base + t64)
        cs_last = tl.load(cs_ptr + d_base + c * Q + Q - 1)
        e_in = tl.exp(cs)
        decay = tl.exp(cs_last)
        if HAS_SEQ:
            sid = _seq_at(seq_ptr, b64, t, L, ssb, ssl)
            doc_in = _seq_at(seq_ptr, b64, c * Q - 1, L, ssb, ssl)
            doc_end = _seq_at(seq_ptr, b64, c * Q + Q - 1, L, ssb, ssl)
            e_in = tl.where(sid == doc_in, e_in, 0.0)
            decay = tl.where(doc_end == doc_in, decay, 0.0)
        mT = pm[:, None] & tm[None, :]
        dyT = tl.load(o_base + t64[None, :] * sol + p[:, None], mask=mT, other=0.0).to(tl.float32)
        if HAS_Z:
            zT = tl.load(z_base + t64[None, :] * szl + p[:, None], mask=mT, other=0.0).to(tl.float32)
            dyT = dyT * zT * tl.sigmoid(zT)
        Cv = tl.load(C_base + t64[:, None] * sCl + n[None, :], mask=tm[:, None] & nm[None, :], other=0.0)
        acc = tl.dot((dyT * e_in[None, :]).to(DT), Cv.to(DT), acc * decay, input_precision=PREC)
        dec = dec * decay
    if LOCAL:
        sk = bh * NSEG + k
        tl.store(seg_ptr + sk * P * N + st_off, acc, mask=st_m)
        tl.store(segd_ptr + sk, dec)
    elif k == 0:
        tl.store(dinit_ptr + bh * P * N + st_off, acc, mask=st_m)


# ------------------------------------------------------------------------------------------------
# backward, chunk-parallel part 1: per (chunk, head slice) — dx, dz, ddt, d log-decay, partial sums
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ssd_bwd_dx_kernel(x_ptr, z_ptr, do_ptr, B_ptr, C_ptr, D_ptr, A_ptr, dt_ptr, bias_ptr,
                       dtp_ptr, cs_ptr, seq_ptr, hs_ptr, dhs_ptr,
                       dx_ptr, dz_ptr, ddt_ptr, dDp_ptr, dAp_ptr, dbp_ptr, dld_ptr,
                       L, H, G, P, N, nc, Lp, HPS, n_split,
                       sxb, sxl, sxh, szb, szl, szh, sob, sol, soh, sBb, sBl, sBg, sCb, sCl, sCg,
                       sdb, sdl, sdh, ssb, ssl, dt_min, dt_max,
                       Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                       HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
                       HAS_SEQ: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                       LOG_DECAY: tl.constexpr, PREC: tl.constexpr):
    """One chunk c, heads [split·HPS, (split+1)·HPS) of group g (whole P, whole N): dx, dz, ddt (through
    the dt chain), d log decay, and the per-chunk partial sums of dD, dA, d dt_bias. B, C and C·Bᵀ are
    loaded / computed once for the heads of the program; the head loop is software-pipelined (the
    next head's x, dy, h_in, dH load while this one computes). Formulas: the module docstring."""
    c = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // (G * n_split)
    g = (pid // n_split) % G
    split = pid % n_split
    b64 = b.to(tl.int64)
    g64 = g.to(tl.int64)
    DT = x_ptr.dtype.element_ty
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    q = tl.arange(0, Q)
    pm = p < P
    nm = n < N
    t = c * Q + q
    tm = t < L
    t64 = t.to(tl.int64)
    qn = tm[:, None] & nm[None, :]
    qp = tm[:, None] & pm[None, :]
    st_off = p[:, None] * N + n[None, :]
    st_m = pm[:, None] & nm[None, :]
    # shared by the group's heads: B, C, C·Bᵀ and the document masks
    Cv = tl.load(C_ptr + b64 * sCb + g64 * sCg + t64[:, None] * sCl + n[None, :], mask=qn, other=0.0).to(DT)
    Bv = tl.load(B_ptr + b64 * sBb + g64 * sBg + t64[:, None] * sBl + n[None, :], mask=qn, other=0.0).to(DT)
    CB = tl.dot(Cv, tl.trans(Bv), input_precision=PREC)                      # (Q, Q)
    keep = q[:, None] >= q[None, :]
    if HAS_SEQ:
        sid = _seq_at(seq_ptr, b64, t, L, ssb, ssl)
        doc_in = _seq_at(seq_ptr, b64, c * Q - 1, L, ssb, ssl)
        doc_end = _seq_at(seq_ptr, b64, c * Q + Q - 1, L, ssb, ssl)
        keep = keep & (sid[:, None] == sid[None, :])
    h_first = g * (H // G) + split * HPS
    for j in range(HPS):
        h = h_first + j
        h64 = h.to(tl.int64)
        d_base = (b64 * H + h64) * Lp + c * Q
        cs = tl.load(cs_ptr + d_base + q)
        dtv = tl.load(dtp_ptr + d_base + q)
        cs_last = tl.load(cs_ptr + d_base + Q - 1)
        e_in = tl.exp(cs)                     # h_in → token l
        w_end = tl.exp(cs_last - cs)          # token s → h_out
        decay = tl.exp(cs_last)               # h_in → h_out
        if HAS_SEQ:
            e_in = tl.where(sid == doc_in, e_in, 0.0)
            w_end = tl.where(sid == doc_end, w_end, 0.0)
            decay = tl.where(doc_end == doc_in, decay, 0.0)
        S = CB * tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf")))
        xv = tl.load(x_ptr + b64 * sxb + h64 * sxh + t64[:, None] * sxl + p[None, :], mask=qp, other=0.0)
        dov = tl.load(do_ptr + b64 * sob + h64 * soh + t64[:, None] * sol + p[None, :], mask=qp, other=0.0)
        sb = ((b64 * nc + c) * H + h64) * P * N
        h_in = tl.load(hs_ptr + sb + st_off, mask=st_m, other=0.0).to(DT)     # (BP, BN)
        dH = tl.load(dhs_ptr + sb + st_off, mask=st_m, other=0.0).to(DT)      # (BP, BN)
        xf = xv.to(tl.float32)
        hdH = tl.sum(tl.sum(h_in.to(tl.float32) * dH.to(tl.float32), axis=1), axis=0)
        y_off = tl.dot(Cv, tl.trans(h_in), input_precision=PREC) * e_in[:, None]   # (Q, BP)
        BdH = tl.dot(Bv, tl.trans(dH), input_precision=PREC)                      # (Q, BP): dH B_s
        if HAS_D:
            if D_PER_P:
                Dv = tl.load(D_ptr + h64 * P + p, mask=pm, other=0.0).to(tl.float32)[None, :]
            else:
                Dv = tl.load(D_ptr + h64).to(tl.float32)
        if HAS_Z:
            # recompute the pre-gate y for dz
            zv = tl.load(z_ptr + b64 * szb + h64 * szh + t64[:, None] * szl + p[None, :], mask=qp, other=0.0)
            zv = zv.to(tl.float32)
            y = tl.dot((S * dtv[None, :]).to(DT), xv.to(DT), input_precision=PREC) + y_off
            if HAS_D:
                y += xf * Dv
            sg = tl.sigmoid(zv)
            dof = dov.to(tl.float32)
            dy = dof * zv * sg
            dz = dof * y * sg * (1.0 + zv * (1.0 - sg))
            tl.store(dz_ptr + ((b64 * L + t64[:, None]) * H + h64) * P + p[None, :],
                     dz.to(dz_ptr.dtype.element_ty), mask=qp)
        else:
            dy = dov.to(tl.float32)
        dyc = dy.to(DT)
        if HAS_D:
            if D_PER_P:
                tl.store(dDp_ptr + ((b64 * nc + c) * H + h64) * P + p, tl.sum(dy * xf, axis=0), mask=pm)
            else:
                tl.store(dDp_ptr + (b64 * nc + c) * H + h64, tl.sum(tl.sum(dy * xf, axis=1), axis=0))
        Gm = tl.dot(dyc, tl.trans(xv.to(DT)), input_precision=PREC)          # Gm_ls = dy_l · x_s
        # dx
        dx = tl.dot(tl.trans(S.to(DT)), dyc, input_precision=PREC) + BdH * w_end[:, None]
        dx = dx * dtv[:, None]
        if HAS_D:
            dx += dy * Dv
        tl.store(dx_ptr + ((b64 * L + t64[:, None]) * H + h64) * P + p[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=qp)
        # ddt (direct) and dcs
        SG = S * Gm
        U = tl.sum(xf * BdH, axis=1)                                          # x_s · (dH B_s)
        ddt = tl.sum(SG, axis=0) + w_end * U
        T = SG * dtv[None, :]
        wU = w_end * dtv * U
        dcs = tl.sum(T, axis=1) - tl.sum(T, axis=0) + tl.sum(dy * y_off, axis=1) - wU
        dcs += tl.where(q == Q - 1, tl.sum(wU, axis=0) + decay * hdH, 0.0)
        da = tl.cumsum(dcs, axis=0, reverse=True)                             # cs → per-step a
        if LOG_DECAY:
            tl.store(dld_ptr + (b64 * L + t64) * H + h64, da.to(dld_ptr.dtype.element_ty), mask=tm)
        else:
            ddt += da * tl.load(A_ptr + h64).to(tl.float32)
            tl.store(dAp_ptr + (b64 * nc + c) * H + h64, tl.sum(da * dtv, axis=0))
        # the dt chain: clamp (zero gradient where clamped), softplus, bias
        raw = tl.load(dt_ptr + b64 * sdb + t64 * sdl + h64 * sdh, mask=tm, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + h64).to(tl.float32)
        v = raw
        if SOFTPLUS:
            v = _softplus(raw)
        ddt = tl.where((v >= dt_min) & (v <= dt_max), ddt, 0.0)
        if SOFTPLUS:
            ddt = tl.where(raw > 20.0, ddt, ddt * tl.sigmoid(raw))
        tl.store(ddt_ptr + (b64 * L + t64) * H + h64, ddt.to(ddt_ptr.dtype.element_ty), mask=tm)
        if HAS_BIAS:
            tl.store(dbp_ptr + (b64 * nc + c) * H + h64, tl.sum(tl.where(tm, ddt, 0.0), axis=0))


# ------------------------------------------------------------------------------------------------
# backward, chunk-parallel part 2: per (chunk, group, N block) — dB, dC summed over the group's heads
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ssd_bwd_dbc_kernel(x_ptr, z_ptr, do_ptr, B_ptr, C_ptr, dtp_ptr, cs_ptr, seq_ptr, hs_ptr, dhs_ptr,
                        dB_ptr, dC_ptr,
                        Bsz, L, H, G, P, N, nc, Lp, HPS, n_split,
                        sxb, sxl, sxh, szb, szl, szh, sob, sol, soh, sBb, sBl, sBg, sCb, sCl, sCg,
                        ssb, ssl,
                        Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                        HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, PREC: tl.constexpr):
    """dB, dC of one chunk, one N block, for the heads [split·HPS, (split+1)·HPS) of group g:

        W     = Σ_h M_h ∘ Gm_h ∘ dt_h[s]                        (Q, Q) fp32, Gm_h = dy_h x_hᵀ
        dB    = Wᵀ C + Σ_h (w_end·dt)_h[s] · (x_h dH_h)        dC = W B + Σ_h e_in_h[l] · (dy_h h_in_h)

    B and C are shared by the group's heads, so the two (Q, Q, BN) matmuls with them run once, after
    the head loop; per head only Gm (Q·Q·P) and the two state terms (Q·P·BN) remain."""
    nnb = tl.cdiv(N, BN)
    c = tl.program_id(0) // nnb
    n = (tl.program_id(0) % nnb) * BN + tl.arange(0, BN)
    pid = tl.program_id(1)
    b = pid // (G * n_split)
    g = (pid // n_split) % G
    split = pid % n_split
    b64 = b.to(tl.int64)
    g64 = g.to(tl.int64)
    DT = x_ptr.dtype.element_ty
    p = tl.arange(0, BP)
    q = tl.arange(0, Q)
    pm = p < P
    nm = n < N
    t = c * Q + q
    tm = t < L
    t64 = t.to(tl.int64)
    qn = tm[:, None] & nm[None, :]
    qp = tm[:, None] & pm[None, :]
    st_off = p[:, None] * N + n[None, :]
    st_m = pm[:, None] & nm[None, :]
    keep = q[:, None] >= q[None, :]
    if HAS_SEQ:
        sid = _seq_at(seq_ptr, b64, t, L, ssb, ssl)
        doc_in = _seq_at(seq_ptr, b64, c * Q - 1, L, ssb, ssl)
        doc_end = _seq_at(seq_ptr, b64, c * Q + Q - 1, L, ssb, ssl)
        keep = keep & (sid[:, None] == sid[None, :])
    W = tl.zeros((Q, Q), dtype=tl.float32)
    dB_acc = tl.zeros((Q, BN), dtype=tl.float32)
    dC_acc = tl.zeros((Q, BN), dtype=tl.float32)
    h_first = g * (H // G) + split * HPS
    for j in range(HPS):
        h = h_first + j
        h64 = h.to(tl.int64)
        d_base = (b64 * H + h64) * Lp + c * Q
        cs = tl.load(cs_ptr + d_base + q)
        dtv = tl.load(dtp_ptr + d_base + q)
        cs_last = tl.load(cs_ptr + d_base + Q - 1)
        e_in = tl.exp(cs)
        w_end = tl.exp(cs_last - cs)
        if HAS_SEQ:
            e_in = tl.where(sid == doc_in, e_in, 0.0)
            w_end = tl.where(sid == doc_end, w_end, 0.0)
        xv = tl.load(x_ptr + b64 * sxb + h64 * sxh + t64[:, None] * sxl + p[None, :], mask=qp, other=0.0)
        dov = tl.load(do_ptr + b64 * sob + h64 * soh + t64[:, None] * sol + p[None, :], mask=qp, other=0.0)
        if HAS_Z:
            zv = tl.load(z_ptr + b64 * szb + h64 * szh + t64[:, None] * szl + p[None, :], mask=qp, other=0.0)
            zv = zv.to(tl.float32)
            dyc = (dov.to(tl.float32) * zv * tl.sigmoid(zv)).to(DT)
        else:
            dyc = dov.to(DT)
        xc = xv.to(DT)
        sb = ((b64 * nc + c) * H + h64) * P * N
        h_in = tl.load(hs_ptr + sb + st_off, mask=st_m, other=0.0).to(DT)     # (BP, BN)
        dH = tl.load(dhs_ptr + sb + st_off, mask=st_m, other=0.0).to(DT)      # (BP, BN)
        Gm = tl.dot(dyc, tl.trans(xc), input_precision=PREC)                  # (Q, Q)
        W += tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf"))) * Gm * dtv[None, :]
        dB_acc += tl.dot(xc, dH, input_precision=PREC) * (w_end * dtv)[:, None]
        dC_acc += tl.dot(dyc, h_in, input_precision=PREC) * e_in[:, None]
    Cv = tl.load(C_ptr + b64 * sCb + g64 * sCg + t64[:, None] * sCl + n[None, :], mask=qn, other=0.0).to(DT)
    Bv = tl.load(B_ptr + b64 * sBb + g64 * sBg + t64[:, None] * sBl + n[None, :], mask=qn, other=0.0).to(DT)
    Wc = W.to(DT)
    dB_acc += tl.dot(tl.trans(Wc), Cv, input_precision=PREC)
    dC_acc += tl.dot(Wc, Bv, input_precision=PREC)
    sp = ((split * Bsz + b64) * L + t64[:, None]) * G + g64
    tl.store(dB_ptr + sp * N + n[None, :], dB_acc.to(dB_ptr.dtype.element_ty), mask=qn)
    tl.store(dC_ptr + sp * N + n[None, :], dC_acc.to(dC_ptr.dtype.element_ty), mask=qn)


# ------------------------------------------------------------------------------------------------
# launch helpers
# ------------------------------------------------------------------------------------------------
def _unit_last(t: Optional[Tensor]) -> Optional[Tensor]:
    """Kernels need a unit stride on the last dim only (other strides are passed in)."""
    if t is None:
        return None
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


_SMS = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


# plain-int helpers (triton.cdiv / next_power_of_2 are slower to call from the host in recent Triton)
def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


def kernel_chunk(chunk_size: int) -> int:
    """The kernel's chunk: a power of two in [16, TUNE['chunk']] (the result does not depend on it
    beyond rounding, so the user's chunk_size — often 256 for Mamba-2 — is a hint)."""
    cap = int(TUNE["chunk"])
    q = 1 << max(4, int(chunk_size).bit_length() - 1)     # largest power of two <= chunk_size, >= 16
    return max(16, min(cap, q))


def _prec(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _state_plan(Bsz: int, H: int, P: int, N: int, nc: int, device) -> Tuple[int, int, int, int]:
    """(BP, BN, chunks per segment, segments) of the sequential state walks (forward states and the
    backward reverse scan). A walk is latency-bound per program (one chunk after the other), so it
    needs enough programs: B·H·⌈P/BP⌉·⌈N/BN⌉·segments. Blocks stay large (a smaller block re-reads x
    and B from L2 once per block); when B·H alone does not fill the SMs (long sequences, small batch)
    the chunks are cut into segments (two passes: segment end states in parallel, then the walks).
    At most _MAX_SEGMENTS (each segment folds in all earlier segments' end states), each of at least
    4 chunks. H100, B=1, L=16k, H=32: 64×64 blocks in 8 segments walk in 0.14 ms (d-states 0.07 ms)
    against 0.20 / 0.10 ms for the unsegmented walk with 64×32 blocks."""
    bp = TUNE["state_bp"] or min(64, _pow2(P))
    bn = TUNE["state_bn"] or min(64, _pow2(N))
    segs = TUNE["state_segments"]
    if segs is None:
        progs = Bsz * H * _cdiv(P, bp) * _cdiv(N, bn)
        sms = _num_sms(device)
        segs = 1 if progs >= sms else min(_cdiv(4 * sms, progs), _MAX_SEGMENTS, nc // 4)
    segs = max(1, min(int(segs), nc))
    cps = _cdiv(nc, segs)
    return bp, bn, cps, _cdiv(nc, cps)


def out_block_p(P: int, N: int, dtype: torch.dtype) -> int:
    """P block of the forward output kernel: the whole P up to 64, except that 16-bit inputs whose N tile
    is 64 (32 < N <= 64) get a P tile of 64 even when P <= 32. Measured on an H100 with triton 3.6
    (benchmarks/ssd_tile_probe.py → benchmarks/results/ssd_tile_probe_h100.json): with 16-bit x, a 64-row
    chunk, BN = 64 and BP = 16 or 32 this kernel's outputs are wrong (rel. error 1.1-1.2, once an illegal
    memory access) while the state walks and the whole backward are right; BP = 64 (P padded, masked)
    or a 32-row chunk are right. A code-generation fault of that tile combination, not reduced further;
    padding costs only idle lanes at these small head dims."""
    bp = min(64, _pow2(P))
    if dtype != torch.float32 and _pow2(N) == 64:
        bp = 64
    return bp


def _heads_per_program(hg: int, fixed, progs: int, target: int, knob: str) -> int:
    """Heads per program of a chunk-parallel backward kernel (a divisor of hg = H // G): ``fixed`` (from
    TUNE) or the most that still give ``progs · hg / heads >= target`` programs (fewer heads per program
    means more programs but less reuse of the B/C work, which every program does once)."""
    if fixed:
        if hg % int(fixed):
            raise ValueError(f"TUNE[{knob!r}]={fixed} must divide H // G = {hg}")
        return int(fixed)
    for splits in range(1, hg + 1):
        if hg % splits == 0 and (progs * splits >= target or splits == hg):
            return hg // splits
    return 1


def _dt_launch(dt, dt_bias, A, log_decay, dt_softplus, dt_min, dt_max, Q, nc):
    Bsz, L, H = dt.shape
    Lp = nc * Q
    dtp = torch.empty(Bsz, H, Lp, device=dt.device, dtype=torch.float32)
    cs = torch.empty_like(dtp)
    BH = min(32, _pow2(H, 4))
    ld = log_decay if log_decay is not None else dt
    _ssd_dt_kernel[(Bsz * nc, _cdiv(H, BH))](
        dt, dt_bias if dt_bias is not None else dt, A if A is not None else dt, ld, dtp, cs,
        L, H, nc, Lp, dt.stride(0), dt.stride(1), dt.stride(2), ld.stride(0), ld.stride(1), ld.stride(2),
        float(dt_min), float(dt_max),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), LOG_DECAY=log_decay is not None,
        Q=Q, BH=BH, num_warps=4)
    return dtp, cs


def _seg_buffers(Bsz, H, P, N, nseg, device):
    """Segment end states (B, H, S, P, N) fp32 and decays (B, H, S) of a segmented walk."""
    if nseg == 1:
        z = torch.empty(1, device=device, dtype=torch.float32)
        return z, z
    return (torch.empty(Bsz, H, nseg, P, N, device=device, dtype=torch.float32),
            torch.empty(Bsz, H, nseg, device=device, dtype=torch.float32))


def _states_launch(x, Bm, dtp, cs, seq_idx, initial_state, Q, nc):
    Bsz, L, H, P = x.shape
    G, N = Bm.shape[2], Bm.shape[3]
    hs = torch.empty(Bsz, nc, H, P, N, device=x.device, dtype=x.dtype)
    final = torch.empty(Bsz, H, P, N, device=x.device, dtype=torch.float32)
    BP, BN, cps, nseg = _state_plan(Bsz, H, P, N, nc, x.device)
    seg, segd = _seg_buffers(Bsz, H, P, N, nseg, x.device)
    si = seq_idx if seq_idx is not None else dtp
    blocks = _cdiv(P, BP) * _cdiv(N, BN)
    for local in ([True, False] if nseg > 1 else [False]):
        # pass 1 (local): end states of segments 0 … S-2; pass 2: the walks, entering states folded in
        _ssd_state_fwd_kernel[(Bsz * H, blocks, nseg - 1 if local else nseg)](
            x, Bm, dtp, cs, si, initial_state if initial_state is not None else x, seg, segd, hs, final,
            L, H, G, P, N, nc, nc * Q, cps, nseg,
            x.stride(0), x.stride(1), x.stride(2), Bm.stride(0), Bm.stride(1), Bm.stride(2),
            si.stride(0), si.stride(1) if seq_idx is not None else 0,
            Q=Q, BP=BP, BN=BN, LOCAL=local, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None,
            PREC=_prec(x), num_warps=TUNE["state_warps"], num_stages=TUNE["state_stages"])
    return hs, final


def _dstates_launch(dout, z, Cm, cs, seq_idx, dfin, x_dtype, Q, nc, H):
    """dhs (B, nc, H, P, N) in x's dtype and d initial_state (B, H, P, N) fp32 (the reverse scan)."""
    Bsz, L, _, P = dout.shape
    G, N = Cm.shape[2], Cm.shape[3]
    dev = dout.device
    dhs = torch.empty(Bsz, nc, H, P, N, device=dev, dtype=x_dtype)
    dinit = torch.empty(Bsz, H, P, N, device=dev, dtype=torch.float32)
    BP, BN, cps, nseg = _state_plan(Bsz, H, P, N, nc, dev)
    seg, segd = _seg_buffers(Bsz, H, P, N, nseg, dev)
    si = seq_idx if seq_idx is not None else cs
    zz = z if z is not None else dout
    blocks = _cdiv(P, BP) * _cdiv(N, BN)
    for local in ([True, False] if nseg > 1 else [False]):
        # pass 1 (local): contributions of segments 1 … S-1; pass 2: the walks, from the last segment
        _ssd_dstate_kernel[(Bsz * H, blocks, nseg - 1 if local else nseg)](
            dout, zz, Cm, cs, si, dfin if dfin is not None else cs, seg, segd, dhs, dinit,
            L, H, G, P, N, nc, nc * Q, cps, nseg, 1 if local else 0,
            *_strides3(dout), *_strides3(zz), *_strides3(Cm),
            si.stride(0), si.stride(1) if seq_idx is not None else 0,
            Q=Q, BP=BP, BN=BN, LOCAL=local, HAS_DFIN=dfin is not None, HAS_Z=z is not None,
            HAS_SEQ=seq_idx is not None, PREC=_prec(dout),
            num_warps=TUNE["state_warps"], num_stages=TUNE["state_stages"])
    return dhs, dinit


def _strides3(t: Optional[Tensor]):
    return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)


class _Inputs:
    """Normalised inputs of one call (unit last strides, shapes, kernel chunk)."""

    def __init__(self, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, chunk_size):
        self.x, self.Bm, self.Cm, self.z = _unit_last(x), _unit_last(Bm), _unit_last(Cm), _unit_last(z)
        self.dt, self.log_decay = dt, log_decay
        self.A = A.contiguous() if A is not None else None
        self.D = D.contiguous() if D is not None else None
        self.dt_bias = dt_bias.contiguous() if dt_bias is not None else None
        self.init = initial_state.contiguous() if initial_state is not None else None
        self.seq_idx = seq_idx
        self.Bsz, self.L, self.H, self.P = x.shape
        self.G, self.N = Bm.shape[2], Bm.shape[3]
        self.Q = int(chunk_size)
        self.nc = _cdiv(self.L, self.Q)


def _fwd_impl_q(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
                chunk_size, dt_softplus, dt_min, dt_max):
    inp = _Inputs(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, chunk_size)
    Q, nc = inp.Q, inp.nc
    dtp, cs = _dt_launch(inp.dt, inp.dt_bias, inp.A, inp.log_decay, dt_softplus, dt_min, dt_max, Q, nc)
    hs, final = _states_launch(inp.x, inp.Bm, dtp, cs, inp.seq_idx, inp.init, Q, nc)
    y = torch.empty(inp.Bsz, inp.L, inp.H, inp.P, device=x.device, dtype=x.dtype)
    BP = TUNE["out_bp"] or out_block_p(inp.P, inp.N, x.dtype)
    si = inp.seq_idx if inp.seq_idx is not None else dtp
    zz = inp.z if inp.z is not None else inp.x
    _ssd_out_fwd_kernel[(nc, inp.Bsz * inp.H, _cdiv(inp.P, BP))](
        inp.x, zz, inp.Bm, inp.Cm, inp.D if inp.D is not None else dtp, dtp, cs, si, hs, y,
        inp.L, inp.H, inp.G, inp.P, inp.N, nc, nc * Q,
        *_strides3(inp.x), *_strides3(zz), *_strides3(inp.Bm), *_strides3(inp.Cm),
        si.stride(0), si.stride(1) if inp.seq_idx is not None else 0,
        Q=Q, BP=BP, BN=_pow2(inp.N), HAS_D=inp.D is not None, D_PER_P=inp.D is not None and inp.D.dim() == 2,
        HAS_Z=inp.z is not None, HAS_SEQ=inp.seq_idx is not None, PREC=_prec(x),
        num_warps=TUNE["out_warps"], num_stages=TUNE["out_stages"])
    return y, final


def _bwd_impl_q(dout, dfinal, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
                chunk_size, dt_softplus, dt_min, dt_max):
    inp = _Inputs(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, chunk_size)
    Bsz, L, H, P, G, N, Q, nc = inp.Bsz, inp.L, inp.H, inp.P, inp.G, inp.N, inp.Q, inp.nc
    dev = x.device
    dout = _unit_last(dout).to(x.dtype)
    dfin = dfinal.float().contiguous() if dfinal is not None else None
    # recompute dt, cumsums and the entering states; then the reverse scan of the state gradient
    dtp, cs = _dt_launch(inp.dt, inp.dt_bias, inp.A, inp.log_decay, dt_softplus, dt_min, dt_max, Q, nc)
    hs, _ = _states_launch(inp.x, inp.Bm, dtp, cs, inp.seq_idx, inp.init, Q, nc)
    dhs, dinit = _dstates_launch(dout, inp.z, inp.Cm, cs, inp.seq_idx, dfin, x.dtype, Q, nc, H)
    si = inp.seq_idx if inp.seq_idx is not None else dtp
    ssb, ssl = si.stride(0), (si.stride(1) if inp.seq_idx is not None else 0)
    zz = inp.z if inp.z is not None else inp.x
    prec = _prec(x)
    def ptr(t):     # absent tensors: any valid pointer (never dereferenced: constexpr-guarded)
        return t if t is not None else dtp

    # part 1 (dx, dz, ddt / d log_decay, per-chunk dD, dA, d dt_bias): one program per (chunk, head slice)
    hg = H // G
    hpx = _heads_per_program(hg, TUNE["dx_heads"], nc * Bsz * G, 4 * _num_sms(dev), "dx_heads")
    dx = torch.empty(Bsz, L, H, P, device=dev, dtype=x.dtype)
    dz = torch.empty(Bsz, L, H, P, device=dev, dtype=z.dtype) if z is not None else None
    ddt = torch.empty(Bsz, L, H, device=dev, dtype=dt.dtype)
    dDp = None
    if D is not None:
        dDp = torch.empty((Bsz, nc, H, P) if D.dim() == 2 else (Bsz, nc, H), device=dev, dtype=torch.float32)
    dAp = torch.empty(Bsz, nc, H, device=dev, dtype=torch.float32) if log_decay is None else None
    dbp = torch.empty(Bsz, nc, H, device=dev, dtype=torch.float32) if dt_bias is not None else None
    dld = torch.empty(Bsz, L, H, device=dev, dtype=log_decay.dtype) if log_decay is not None else None
    _ssd_bwd_dx_kernel[(nc, Bsz * G * (hg // hpx))](
        inp.x, zz, dout, inp.Bm, inp.Cm, ptr(inp.D), ptr(inp.A), inp.dt, ptr(inp.dt_bias),
        dtp, cs, si, hs, dhs,
        dx, ptr(dz), ddt, ptr(dDp), ptr(dAp), ptr(dbp), ptr(dld),
        L, H, G, P, N, nc, nc * Q, hpx, hg // hpx,
        *_strides3(inp.x), *_strides3(zz), *_strides3(dout), *_strides3(inp.Bm), *_strides3(inp.Cm),
        *_strides3(inp.dt), ssb, ssl, float(dt_min), float(dt_max),
        Q=Q, BP=_pow2(P), BN=_pow2(N), HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2,
        HAS_Z=z is not None, HAS_SEQ=inp.seq_idx is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), LOG_DECAY=log_decay is not None, PREC=prec,
        num_warps=TUNE["dx_warps"], num_stages=TUNE["dx_stages"])

    # part 2 (dB, dC): one program per (chunk, N block, group, head slice); head slices → fp32 partials
    BNb = TUNE["bwd_bn"] or min(64, _pow2(N))
    hpb = _heads_per_program(hg, TUNE["bwd_heads"], nc * Bsz * G * _cdiv(N, BNb), 2 * _num_sms(dev),
                             "bwd_heads")
    n_split = hg // hpb
    if n_split == 1:    # written once, in the output dtype
        dB = torch.empty(Bsz, L, G, N, device=dev, dtype=Bm.dtype)
        dC = torch.empty(Bsz, L, G, N, device=dev, dtype=Cm.dtype)
    else:
        dB = torch.empty(n_split, Bsz, L, G, N, device=dev, dtype=torch.float32)
        dC = torch.empty_like(dB)
    _ssd_bwd_dbc_kernel[(nc * _cdiv(N, BNb), Bsz * G * n_split)](
        inp.x, zz, dout, inp.Bm, inp.Cm, dtp, cs, si, hs, dhs, dB, dC,
        Bsz, L, H, G, P, N, nc, nc * Q, hpb, n_split,
        *_strides3(inp.x), *_strides3(zz), *_strides3(dout), *_strides3(inp.Bm), *_strides3(inp.Cm),
        ssb, ssl,
        Q=Q, BP=_pow2(P), BN=BNb, HAS_Z=z is not None, HAS_SEQ=inp.seq_idx is not None, PREC=prec,
        num_warps=TUNE["bwd_warps"], num_stages=TUNE["bwd_stages"])
    if n_split > 1:
        dB, dC = dB.sum(0).to(Bm.dtype), dC.sum(0).to(Cm.dtype)

    def empty():   # returns must not alias each other (custom_op rule): a fresh one each time
        return x.new_empty(0)

    dA = dAp.sum((0, 1)).to(A.dtype) if (dAp is not None and A is not None) else empty()
    dD = dDp.sum((0, 1)).to(D.dtype) if D is not None else empty()
    ddt_bias = dbp.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else empty()
    return (dx, ddt, dA, dB, dC, dD, dz if dz is not None else empty(), ddt_bias,
            dinit.to(initial_state.dtype) if initial_state is not None else empty(),
            dld if dld is not None else empty())


# The chunked algorithm is exact for any chunk, so forward and backward may each pick their own: a
# launch that does not fit in shared memory (large P·N) is retried with half the chunk, and the cap is
# remembered per (pass, P, N, dtype, device).
_CHUNK_CAP = {}


def small_tile_chunk_cap(P: int, N: int, dtype: torch.dtype) -> int:
    """Largest kernel chunk for 16-bit inputs with P <= 32 beside a 64-wide N tile (32 < N <= 64): 32.
    Measured on an H100 with triton 3.6 (benchmarks/ssd_tile_probe.py → ssd_tile_probe_h100.json): with a
    64-row chunk the backward dx kernel with the z gate computes wrong dx (rel. error 1.6-1.9) or hits an
    illegal memory access, and the forward output kernel is wrong unless its P tile is padded
    (`out_block_p`); with a 32-row chunk forward and every gradient are right, with and without z / D."""
    if dtype != torch.float32 and P <= 32 and _pow2(N) == 64:
        return 32
    return 1 << 30


def _with_chunk_fallback(kind, x, Bm, chunk_size, run):
    key = (kind, x.shape[-1], Bm.shape[-1], x.dtype, x.device)
    q = min(int(chunk_size), _CHUNK_CAP.get(key, int(chunk_size)),
            small_tile_chunk_cap(x.shape[-1], Bm.shape[-1], x.dtype))
    while True:
        try:
            return run(q)
        except OutOfResources:
            if q <= 16:
                raise
            q //= 2
            _CHUNK_CAP[key] = q


def _fwd_impl(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
              chunk_size, dt_softplus, dt_min, dt_max):
    return _with_chunk_fallback("fwd", x, Bm, chunk_size, lambda q: _fwd_impl_q(
        x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, q, dt_softplus, dt_min, dt_max))


def _bwd_impl(dout, dfinal, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
              chunk_size, dt_softplus, dt_min, dt_max):
    return _with_chunk_fallback("bwd", x, Bm, chunk_size, lambda q: _bwd_impl_q(
        dout, dfinal, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, q, dt_softplus,
        dt_min, dt_max))


# ------------------------------------------------------------------------------------------------
# torch.library registration (torch.compile)
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("hybridize::ssd_chunked_fwd", mutates_args=())
def _ssd_fwd_op(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, D: Optional[Tensor],
                z: Optional[Tensor], dt_bias: Optional[Tensor], initial_state: Optional[Tensor],
                seq_idx: Optional[Tensor], log_decay: Optional[Tensor], chunk_size: int,
                dt_softplus: bool, dt_min: float, dt_max: float) -> Tuple[Tensor, Tensor]:
    return _fwd_impl(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
                     chunk_size, dt_softplus, dt_min, dt_max)


@_ssd_fwd_op.register_fake
def _(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, chunk_size, dt_softplus,
      dt_min, dt_max):
    Bsz, L, H, P = x.shape
    return x.new_empty(Bsz, L, H, P), x.new_empty(Bsz, H, P, Bm.shape[-1], dtype=torch.float32)


@torch.library.custom_op("hybridize::ssd_chunked_bwd", mutates_args=())
def _ssd_bwd_op(dout: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Optional[Tensor],
                Bm: Tensor, Cm: Tensor, D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                initial_state: Optional[Tensor], seq_idx: Optional[Tensor], log_decay: Optional[Tensor],
                chunk_size: int, dt_softplus: bool, dt_min: float, dt_max: float) -> Tuple[
                    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state, dlog_decay); the gradient of
    an absent (None) input is an empty tensor."""
    return _bwd_impl(dout, dfinal, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
                     chunk_size, dt_softplus, dt_min, dt_max)


@_ssd_bwd_op.register_fake
def _(dout, dfinal, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, chunk_size,
      dt_softplus, dt_min, dt_max):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(0)

    dA = like(A) if log_decay is None else x.new_empty(0)
    return (torch.empty_like(x), torch.empty_like(dt), dA, torch.empty_like(Bm), torch.empty_like(Cm),
            like(D), like(z), like(dt_bias), like(initial_state), like(log_decay))


def _setup_context(ctx, inputs, output):
    (x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay,
     chunk_size, dt_softplus, dt_min, dt_max) = inputs
    ctx.save_for_backward(x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay)
    ctx.args = (chunk_size, dt_softplus, dt_min, dt_max)


def _grads(ctx, dout, dfinal, bwd):
    """The backward shared by the custom op's autograd and the eager Function: ``bwd`` is the
    ``ssd_chunked_bwd`` op or its implementation."""
    x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x)
    grads = bwd(dout, dfinal, x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, *ctx.args)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit, dld = grads
    def keep(g, t):
        return g if t is not None else None

    return (dx, ddt, keep(dA, A) if log_decay is None else None, dB, dC, keep(dD, D), keep(dz, z),
            keep(ddt_bias, dt_bias), keep(dinit, initial_state), None, keep(dld, log_decay),
            None, None, None, None)


def _backward(ctx, dout, dfinal):
    return _grads(ctx, dout, dfinal, torch.ops.hybridize.ssd_chunked_bwd)


_ssd_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _SSDEager(torch.autograd.Function):
    """Eager-mode autograd: the same implementations and backward as the custom ops, without their
    Python dispatch (custom_op + register_autograd cost tens of µs of host time per call, while a
    whole SSD forward is a few launches and often host-bound). torch.compile / export and fake or
    subclassed tensors always get the custom ops (see :func:`ssd_chunked_triton`)."""

    @staticmethod
    def forward(ctx, *inputs):
        y, final = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, (y, final))
        ctx.set_materialize_grads(False)     # an unused output's gradient stays None (no zero fill)
        return y, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        return _grads(ctx, dout, dfinal, _bwd_impl)


# ------------------------------------------------------------------------------------------------
# public API (same signature as the reference)
# ------------------------------------------------------------------------------------------------
def kernel_supports(x: Tensor, Bm: Tensor) -> bool:
    """Shapes/dtypes the kernels handle (others go to the reference): 16/32-bit floats, P, N <= 256."""
    return (x.dim() == 4 and Bm.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and 1 <= x.shape[-1] <= _MAX_PN and 1 <= Bm.shape[-1] <= _MAX_PN and x.shape[1] > 0)


def ssd_chunked_triton(x: Tensor, dt: Tensor, A: Optional[Tensor], Bm: Tensor, Cm: Tensor, *,
                       chunk_size: int = 64, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                       dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                       dt_limit=(0.0, float("inf")), initial_state: Optional[Tensor] = None,
                       seq_idx: Optional[Tensor] = None, return_final_state: bool = False,
                       log_decay: Optional[Tensor] = None):
    """Triton chunked SSD; exactly :func:`hybridize.ops.ssd.reference.ssd_chunked`'s semantics.

    x (B,L,H,P), dt (B,L,H), A (H,) (None with log_decay), Bm/Cm (B,L,G,N), D (H,)|(H,P), z (B,L,H,P),
    dt_bias (H,), initial_state (B,H,P,N), seq_idx (B,L) (non-decreasing), log_decay (B,L,H).
    Returns y (B,L,H,P) in x's dtype [, final_state (B,H,P,N) fp32]. Differentiable in every tensor
    but seq_idx. ``chunk_size`` is clamped to a power of two in [16, TUNE['chunk']] (see
    :func:`kernel_chunk`).
    """
    if x.dim() != 4 or dt.shape != x.shape[:3] or Bm.dim() != 4 or Cm.shape != Bm.shape \
            or Bm.shape[:2] != x.shape[:2]:
        raise ValueError(f"ssd: expected x (B,L,H,P), dt (B,L,H), Bm/Cm (B,L,G,N); got x {tuple(x.shape)}, "
                         f"dt {tuple(dt.shape)}, Bm {tuple(Bm.shape)}, Cm {tuple(Cm.shape)}")
    H, G = x.shape[2], Bm.shape[2]
    if H % G:
        raise ValueError(f"ssd: number of heads {H} is not a multiple of the number of groups {G}")
    if log_decay is None and A is None:
        raise ValueError("ssd: A is required unless log_decay is given")
    if not kernel_supports(x, Bm):
        raise ValueError("ssd_chunked_triton: unsupported shape/dtype (see kernel_supports)")
    args = (x, dt, A, Bm, Cm, D, z, dt_bias, initial_state, seq_idx, log_decay, kernel_chunk(chunk_size),
            bool(dt_softplus), float(dt_limit[0]), float(dt_limit[1]))
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        y, final = torch.ops.hybridize.ssd_chunked_fwd(*args)
    elif torch.is_grad_enabled():
        y, final = _SSDEager.apply(*args)
    else:
        y, final = _fwd_impl(*args)
    return (y, final) if return_final_state else y


__all__ = ["TUNE", "kernel_chunk", "kernel_supports", "out_block_p", "small_tile_chunk_cap", "ssd_chunked_triton"]
