"""Split-K ("flash-decoding") Triton attention for decode: a few query tokens per row against a KV cache,
CUDA-graph capturable (no masks, no host sync), self-checked against the reference on first use.
`decode_attention` attends already-written caches; `decode_attention_fused` (the decode step's path) also
applies RoPE, writes the new tokens' k/v and advances lengths, in one launch at small capacities."""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from hybridize.ops._dispatch import use_kernels
from hybridize.ops.attention.reference import decode_attention_reference
from hybridize.ops.pdl import pdl_launch

# Split-K ("flash-decoding") attention of a few query tokens per row against a KV cache. Grid: (batch ×
# kv head × query-row block, split); split s reads slots [s·S, (s+1)·S) ∩ [0, min(C, lengths + T)), so
# an unfilled cache costs nothing and a long one is read by many SMs at once; a second kernel merges the
# splits' (max, sum, acc). The query rows of a program are the n_rep query heads of its kv head times
# the T tokens (GQA without repeating the cache). Visibility (`reference.slot_visibility`) is computed
# in-kernel from lengths: no mask tensor, no host sync, fixed grid (CUDA-graph capturable).
#
# Fused variant (`decode_attention_fused`, what `Attention.step_tokens` runs): the same grid, but it also
# does the work of the small kernels around the attention (at batch-1 decode each is a ~1 µs launch-bound
# kernel, ~9 µs per layer in all on an H100): RoPE of q and of the new k (cos/sin computed in-kernel from
# inv_freq), the k/v cache writes of the T new tokens and ``lengths += T``. Races avoided by construction:
# * the T new tokens are attended from registers (raw k/v of the projection, rotated in-kernel) by the one
#   split that owns the newest token's slot; the cache loop of every split masks the slots being written
#   (stream index >= lengths) out of its loads, so no program reads a slot while it is written; the
#   owner split's first query-row block alone writes them;
# * ``lengths`` is read by every program: with several splits the merge kernel (launched after the split
#   kernel finished) increments it; with one split (small capacity: no merge kernel, the split kernel
#   normalises and writes the output) the last program of a row to finish increments it, found with a
#   per-row atomic counter (`_row_counters`) that this last program resets to 0 for the next launch.
_KERNELS = None
_KERNEL_OK: dict = {}            # (device, dtype, head_dim, n_rep) → bool, from a one-time self-check
_FUSED_OK: dict = {}             # (device, dtype, head_dim, n_rep, rot_dim, interleaved) → bool, likewise
_KERNEL_MAX_P = 256
_KERNEL_MAX_ROWS = 64            # query rows (T · n_rep) per program; more → several row blocks
# Fused kernel: a capacity of at most this many BLOCK_N-slot blocks (256 slots at head_dim <= 64, 128 at
# 128) is read by one split per (row, kv head), which skips the merge kernel. At batch-1 decode the kernel
# is latency-bound (8 kv heads → 8 programs): a merge launch (~1 µs) costs more than reading a few more
# blocks in one program (the loads are pipelined; unfilled slots are not read at all).
_SINGLE_SPLIT_MAX_BLOCKS = 4
#: launch parameters (benchmarks/attn_decode_probe.py sweeps them; H100 results in
#: benchmarks/results/attn_decode_probe_h100.json): warps of the fused kernel's split path and of its
#: single-split path (latency-bound: 8 warps took 6.2 vs 9.8 µs a layer at 64 cached tokens), its
#: pipeline stages, splits loaded per merge iteration and the merge's warps, and how many times over the
#: splits fill the GPU (`_tiles`: 8 warps + fill 2 took 22.9 vs 33.1 µs a layer at 8k tokens, 10.3 vs 12.7
#: at 1k). The merge runs one program per output row and loads all its splits at once: 15.3 vs 22.7 µs a
#: layer at 8k with 4 warps, 14.4 with 1 warp (6.9 / 10.6 / 14.4 µs at 1k / 4k / 8k;
#: attn_decode_probe_s8_h100.json). The unfused kernels (batch > 1) keep 4 warps and fill 4.
#: Optional keys: "block_n" (cache slots per tile; 128 and 32 were slower at 1-8k tokens), "single_max_blocks",
#: "precise". A merge done by the last split program (atomic counters, no merge kernel) was slower too
#: (22-26 vs 22.7 µs a layer at 8k; attn_decode_probe3_h100.json) and was dropped.
#: "stages_long": the split path's pipeline stages once a split reads >= 4 blocks (8k tokens at batch 1:
#: 13.7 vs 14.6 µs a layer with 3 stages; at 4k, 2 blocks a split, 3 stages lost: 10.8 vs 10.5;
#: attn_decode_probe2_s8_h100.json).
#: "early" (HYBRIDIZE_ATTN_EARLY, default 1): lengths and RoPE tables before the PDL wait (`_fused_split_kernel`;
#: 13.1 vs 14.0 µs a layer at 8k, 9.9 vs 10.5 at 4k; the 1.2 B Transformer at batch 1 / 8k: 863 vs 851
#: tokens/s; attn_decode_probe_s9_h100.json, decode_b1_early_s9_h100.json).
FUSED_TUNE = dict(warps=8, single_warps=8, stages=2, stages_long=3, merge_bs=64, merge_warps=1, fill=2,
                  early=int(os.environ.get("HYBRIDIZE_ATTN_EARLY", "1")))


#: launch parameters of the unfused kernels (batch > 1; benchmarks/attn_decode_batch_probe.py): warps and
#: pipeline stages of the split kernel, GPU fills (`_tiles`), cache slots per tile (0: by head dim); once the
#: (row, kv head) programs alone fill the SMs, "warps_many" / "stages_many" (long splits of few programs
#: each: deeper pipelines pay). H100, 8k tokens, µs a layer: batch 64 383 vs 423 (84 vs 76 % of the floor),
#: batch 32 219.6 vs 220.0; below the threshold 4 warps / 2 stages stay: batch 16 100.9 vs 120.6, batch 8
#: 58.5 vs 61.9 (attn_decode_batch_probe_s9_h100.json)
UNFUSED_TUNE = dict(warps=4, stages=2, fill=4, block_n=0, warps_many=8, stages_many=3)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _build_kernels():
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _softmax_step(qk, m_i, l_i):
        """Online softmax: scores qk (rows, cols) (-inf: masked) against the running max m_i and sum l_i →
        (m_new, alpha = rescale of the old accumulator, pr = exp2(qk - m_new), l_new)."""
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        pr = tl.exp2(qk - m_use[:, None])
        return m_new, alpha, pr, l_i * alpha + tl.sum(pr, 1)

    # the interpreter (TRITON_INTERPRET=1) resolves a kernel's callees in its module's globals
    globals()["_softmax_step"] = _softmax_step

    @triton.jit
    def _split_kernel(Q, K, V, N0, Mo, Lo, Ao,
                      sqb, sqh, sqt, sqp, skb, skh, skc, skp, svb, svh, svc, svp,
                      Hkv, C, T, G, R, P, S, RB, slots_per_split, window, qk_scale,
                      HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr = 0):
        if PDL:    # see hybridize.ops.pdl: wait for the previous kernel before any read or write
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0).to(tl.int64)       # ((b · Hkv) + j) · RB + rb; int64 offsets throughout
        sid = tl.program_id(1).to(tl.int64)
        rb = pid % RB
        bj = pid // RB
        b = bj // Hkv
        j = bj % Hkv
        n0 = tl.load(N0 + b).to(tl.int64)
        last = n0 + T - 1                         # stream index of the newest token (all T written)
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        p = tl.arange(0, BLOCK_P)
        rmask = r < R
        pmask = p < P
        t = r // G
        h = j * G + r % G
        q = tl.load(Q + b * sqb + h[:, None] * sqh + t[:, None] * sqt + p[None, :] * sqp,
                    mask=rmask[:, None] & pmask[None, :], other=0.0)
        qpos = n0 + t
        lo = sid * slots_per_split
        hi = tl.minimum(tl.minimum(lo + slots_per_split, C), last + 1)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_P], tl.float32)
        kb = K + b * skb + j * skh
        vb = V + b * svb + j * svh
        for start in range(lo, hi, BLOCK_N):
            s = start + tl.arange(0, BLOCK_N)
            smask = s < hi
            kv_mask = smask[:, None] & pmask[None, :]
            k = tl.load(kb + s[:, None] * skc + p[None, :] * skp, mask=kv_mask, other=0.0)
            if IEEE:
                qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            d = tl.where(smask, last - s, 0)              # >= 0 where it matters
            ts = last - d % C                             # stream index held by slot s
            age = qpos[:, None] - ts[None, :]
            valid = smask[None, :] & (ts[None, :] >= 0) & (age >= 0)
            if HAS_WINDOW:
                valid = valid & (age < window)
            m_new, alpha, pr, l_i = _softmax_step(tl.where(valid, qk * qk_scale, float("-inf")), m_i, l_i)
            v = tl.load(vb + s[:, None] * svc + p[None, :] * svp, mask=kv_mask, other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(pr, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
            m_i = m_new
        base = (pid * S + sid) * BLOCK_R + tl.arange(0, BLOCK_R)
        tl.store(Mo + base, m_i)
        tl.store(Lo + base, l_i)
        tl.store(Ao + base[:, None] * BLOCK_P + p[None, :], acc)

    @triton.jit
    def _merge_kernel(Mo, Lo, Ao, Out, N0, sob, sot, soh, sop, Hkv, G, R, P, S, RB, T,
                      INC_LENGTHS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_S: tl.constexpr = 64, PDL: tl.constexpr = 0):
        # grid (split-kernel program (b, j, rb), query row of its block): one output row per program, its
        # BLOCK_S splits' (max, sum, acc) loaded in one go. At batch 1 a long context has ~30 splits per
        # (kv head, row): folding them one at a time was a chain of dependent L2 round trips (~10 µs at 8k)
        if PDL:    # see hybridize.ops.pdl: wait for the previous kernel before any read or write
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0).to(tl.int64)
        rr = tl.program_id(1)
        rb = pid % RB
        bj = pid // RB
        b = bj // Hkv
        j = bj % Hkv
        r = rb * BLOCK_R + rr
        if r < R:
            p = tl.arange(0, BLOCK_P)
            m = tl.full([1], float("-inf"), tl.float32)
            l = tl.zeros([1], tl.float32)
            acc = tl.zeros([BLOCK_P], tl.float32)
            for s0 in range(0, S, BLOCK_S):
                sids = s0 + tl.arange(0, BLOCK_S)
                smask = sids < S
                base = (pid * S + sids) * BLOCK_R + rr                                     # (BLOCK_S,)
                ms = tl.load(Mo + base, mask=smask, other=float("-inf"))
                ls = tl.load(Lo + base, mask=smask, other=0.0)
                a_s = tl.load(Ao + base[:, None] * BLOCK_P + p[None, :], mask=smask[:, None], other=0.0)
                m_new = tl.maximum(m, tl.max(ms, 0))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                w_old = tl.exp2(m - m_use)
                w_new = tl.exp2(ms - m_use)                                                # (BLOCK_S,)
                l = l * w_old + tl.sum(ls * w_new, 0)
                acc = acc * w_old + tl.sum(a_s * w_new[:, None], 0)
                m = m_new
            out = acc / tl.where(l > 0, l, 1.0)
            t = r // G
            h = j * G + r % G
            tl.store(Out + b * sob + t * sot + h * soh + p * sop, out.to(Out.dtype.element_ty), mask=p < P)
        if INC_LENGTHS:
            # the split kernel (the only reader of lengths) has finished: one program per row advances it
            if (j == 0) & (rb == 0) & (rr == 0):
                tl.store(N0 + b, tl.load(N0 + b) + T)

    @triton.jit
    def _rope_tables(pos, p, IF, HALF, rope_scale, INTERLEAVED: tl.constexpr, PRECISE: tl.constexpr):
        """RoPE as `hybridize.layers.rotary` does it, written x·cos + x[partner]·sin: pos (M, 1) positions,
        p (BLOCK_P,) dims → cos, sin (M, BLOCK_P) fp32 (cos/sin(pos · inv_freq) · rope_scale; the sign of
        rotate_half / rotate_every_two folded into sin; 1 and 0 past the 2·HALF rotated dims), partner
        (BLOCK_P,): the dim each one pairs with."""
        rot = p < 2 * HALF
        if INTERLEAVED:                           # GPT-J: dim 2i pairs with 2i + 1, frequency i
            partner = p ^ 1
            fi = p // 2
            neg = (p % 2) == 0
        else:                                     # split-half: dim i pairs with i ± HALF, frequency i % HALF
            first = p < HALF
            partner = tl.where(first, p + HALF, p - HALF)
            fi = tl.where(first, p, p - HALF)
            neg = first
        partner = tl.where(rot, partner, p)
        f = tl.load(IF + tl.where(rot, fi, 0), mask=rot, other=0.0)
        ang = pos.to(tl.float32) * f[None, :]     # = torch's position.float() * inv_freq
        if PRECISE:                               # full range reduction: angles reach 1e5+ rad
            c = libdevice.cos(ang)
            sn = libdevice.sin(ang)
        else:                                     # the interpreter (numpy) has no libdevice
            c = tl.cos(ang)
            sn = tl.sin(ang)
        c = tl.where(rot[None, :], c * rope_scale, 1.0)
        sn = tl.where(rot[None, :], tl.where(neg[None, :], -sn, sn) * rope_scale, 0.0)
        return c, sn, partner

    @triton.jit
    def _load_rope(ptr, mask, p, sp, c, sn, partner, ROPE: tl.constexpr):
        """Rows of q or k: ptr (M,) row starts, mask (M, BLOCK_P) → (M, BLOCK_P) in the input dtype, rotated
        with `_rope_tables`' cos / sin / partner (fp32 math, rounded once, as `apply_rotary`)."""
        x = tl.load(ptr[:, None] + p[None, :] * sp, mask=mask, other=0.0)
        if ROPE:
            xp = tl.load(ptr[:, None] + partner[None, :] * sp, mask=mask, other=0.0)
            x = (x.to(tl.float32) * c + xp.to(tl.float32) * sn).to(x.dtype)
        return x

    # the interpreter (TRITON_INTERPRET=1) resolves a kernel's callees in its module's globals, not in
    # closures as the compiler does
    globals()["_rope_tables"] = _rope_tables
    globals()["_load_rope"] = _load_rope

    @triton.jit
    def _cached_tile(kb, vb, s, hi, last, n0, C, p, pmask, skc, skp, svc, svp, window, HAS_WINDOW: tl.constexpr):
        """Loads of one tile of cached slots s (BLOCK_N,): k, v (BLOCK_N, BLOCK_P) and keep (BLOCK_N,):
        slots of the split (< hi) holding a token older than the new ones (stream index in [0, n0); the
        new tokens' slots hold stale data until the owner split writes them), within the window."""
        d = tl.where(s < hi, last - s, 0)
        ts = last - d % C                         # stream index held by slot s once the T tokens are in
        keep = (s < hi) & (ts >= 0) & (ts < n0)
        if HAS_WINDOW:
            keep = keep & (n0 - ts < window)                  # visible to the oldest query at least
        kv_mask = keep[:, None] & pmask[None, :]
        k = tl.load(kb + s[:, None] * skc + p[None, :] * skp, mask=kv_mask, other=0.0)
        v = tl.load(vb + s[:, None] * svc + p[None, :] * svp, mask=kv_mask, other=0.0)
        return k, v, keep, ts

    @triton.jit
    def _attend_tile(q, k, v, keep, ts, qpos, m_i, l_i, acc, qk_scale, window, HAS_WINDOW: tl.constexpr,
                     IEEE: tl.constexpr):
        """Online-softmax update of (m_i, l_i, acc) with one tile of cached tokens (`_cached_tile`)."""
        if IEEE:
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        valid = keep[None, :]                     # age = qpos - ts > 0 for every cached token
        if HAS_WINDOW:
            valid = valid & (qpos[:, None] - ts[None, :] < window)
        m_new, alpha, pr, l_i = _softmax_step(tl.where(valid, qk * qk_scale, float("-inf")), m_i, l_i)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pr, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        return m_new, l_i, acc

    globals()["_cached_tile"] = _cached_tile
    globals()["_attend_tile"] = _attend_tile

    @triton.jit
    def _fused_split_kernel(Q, Kn, Vn, IF, Kc, Vc, N0, Cnt, Mo, Lo, Ao, Out,
                            sqb, sqt, sqh, sqp, snb, snt, snh, snp, sub, sut, suh, sup,
                            skb, skh, skc, skp, svb, svh, svc, svp, sob, sot, soh, sop,
                            Hkv, C, T, G, R, P, S, RB, HALF, slots_per_split, window, qk_scale, rope_scale,
                            HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr, ROPE: tl.constexpr,
                            INTERLEAVED: tl.constexpr, PRECISE: tl.constexpr, SINGLE: tl.constexpr,
                            ONE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr = 0,
                            EARLY: tl.constexpr = 0):
        # EARLY (with PDL): lengths are read and the RoPE tables computed before `gdc_wait`, while the q/k/v
        # projection (the kernel just before; it does not write lengths: only this layer's attention
        # kernels do) drains, so the wait is followed by q's load instead of the chain lengths → cos / sin →
        # q. Reading the split's first k / v tile there too (into registers, or L2-prefetching the split)
        # was slower: 19.8 / 18.5 vs 14.0 µs a layer at 8k (benchmarks/results/attn_decode_probe_s9_h100.json)
        pid = tl.program_id(0).to(tl.int64)       # ((b · Hkv) + j) · RB + rb; int64 offsets throughout
        sid = tl.program_id(1).to(tl.int64)
        rb = pid % RB
        bj = pid // RB
        b = bj // Hkv
        j = bj % Hkv
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        p = tl.arange(0, BLOCK_P)
        rmask = r < R
        pmask = p < P
        t = r // G
        h = j * G + r % G
        lo = sid * slots_per_split
        kb = Kc + b * skb + j * skh
        vb = Vc + b * svb + j * svh
        if PDL and not EARLY:    # see hybridize.ops.pdl: wait for the previous kernel before any read or write
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        n0 = tl.load(N0 + b).to(tl.int64)         # tokens cached before the T new ones
        last = n0 + T - 1                         # stream index of the newest token
        qpos = n0 + t
        hi = tl.minimum(tl.minimum(lo + slots_per_split, C), last + 1)
        # RoPE tables: one row when T = 1 (every query row and the new key sit at position n0)
        if ROPE:
            if ONE:
                qc, qs, partner = _rope_tables(tl.zeros([1, 1], tl.int64) + n0, p, IF, HALF, rope_scale,
                                               INTERLEAVED, PRECISE)
            else:
                qc, qs, partner = _rope_tables(qpos[:, None], p, IF, HALF, rope_scale, INTERLEAVED, PRECISE)
        else:
            qc = tl.full([1, BLOCK_P], 1.0, tl.float32)
            qs = tl.zeros([1, BLOCK_P], tl.float32)
            partner = p
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_P], tl.float32)
        if PDL and EARLY:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        q = _load_rope(Q + b * sqb + t * sqt + h * sqh, rmask[:, None] & pmask[None, :], p, sqp, qc, qs,
                       partner, ROPE)
        if IEEE:
            q = q.to(tl.float32)
        # cached tokens: the split's slots holding a token older than the new ones
        for start in range(lo, hi, BLOCK_N):
            k, v, keep, ts = _cached_tile(kb, vb, start + tl.arange(0, BLOCK_N), hi, last, n0, C, p, pmask,
                                          skc, skp, svc, svp, window, HAS_WINDOW)
            m_i, l_i, acc = _attend_tile(q, k, v, keep, ts, qpos, m_i, l_i, acc, qk_scale, window, HAS_WINDOW,
                                         IEEE)
        # the T new tokens, from registers, by the split owning the newest token's slot
        if sid == (last % C) // slots_per_split:
            tn = tl.arange(0, BLOCK_T)            # BLOCK_T = 1 when T = 1
            tmask = tn < T
            nmask = tmask[:, None] & pmask[None, :]
            if ROPE and not ONE:
                kc, ks, _ = _rope_tables((n0 + tn)[:, None], p, IF, HALF, rope_scale, INTERLEAVED, PRECISE)
            else:
                kc = qc
                ks = qs
            kn = _load_rope(Kn + b * snb + tn * snt + j * snh, nmask, p, snp, kc, ks, partner, ROPE)
            kn = kn.to(Kc.dtype.element_ty)
            vn = tl.load(Vn + b * sub + tn[:, None] * sut + j * suh + p[None, :] * sup, mask=nmask, other=0.0)
            vn = vn.to(Vc.dtype.element_ty)
            if rb == 0:
                slot = (n0 + tn) % C
                tl.store(kb + slot[:, None] * skc + p[None, :] * skp, kn, mask=nmask)
                tl.store(vb + slot[:, None] * svc + p[None, :] * svp, vn, mask=nmask)
            if ONE:                               # (BLOCK_R, 1): a row-wise dot, no 16-wide padded tile
                qk = tl.sum(q.to(tl.float32) * kn.to(tl.float32), 1)[:, None]
            elif IEEE:
                qk = tl.dot(q, tl.trans(kn.to(tl.float32)), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(kn))
            valid = tmask[None, :] & (tn[None, :] <= t[:, None])
            if HAS_WINDOW:
                valid = valid & (t[:, None] - tn[None, :] < window)
            m_new, alpha, pr, l_i = _softmax_step(tl.where(valid, qk * qk_scale, float("-inf")), m_i, l_i)
            if ONE:
                acc = acc * alpha[:, None] + pr * vn.to(tl.float32)
            elif IEEE:
                acc = acc * alpha[:, None] + tl.dot(pr, vn.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pr.to(vn.dtype), vn)
            m_i = m_new
        if SINGLE:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(Out + b * sob + t[:, None] * sot + h[:, None] * soh + p[None, :] * sop,
                     out.to(Out.dtype.element_ty), mask=rmask[:, None] & pmask[None, :])
            # lengths[b] += T once every program of row b has read it: the last of its Hkv · RB programs
            # to get here (acq_rel atomic; the barrier orders the whole program's reads before it)
            tl.debug_barrier()
            done = tl.atomic_add(Cnt + b, 1)
            if done == Hkv * RB - 1:
                tl.store(N0 + b, n0 + T)
                tl.store(Cnt + b, 0)
        else:
            base = (pid * S + sid) * BLOCK_R + tl.arange(0, BLOCK_R)
            tl.store(Mo + base, m_i)
            tl.store(Lo + base, l_i)
            tl.store(Ao + base[:, None] * BLOCK_P + p[None, :], acc)

    return triton, _split_kernel, _merge_kernel, _fused_split_kernel


_SM_COUNT: dict = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 16
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build_kernels()
    return _KERNELS


def _tiles(B: int, Hkv: int, R: int, C: int, P: int, device, single_max_blocks: int = 0, fill: int = 4,
           block_n: int = 0):
    """Launch geometry: (BLOCK_R, RB, BLOCK_P, BLOCK_N, S, blocks_per_split). S splits of the C slots,
    enough to fill the GPU `fill` times over the B · Hkv · RB (row, kv head, query-row block) programs; one
    split when the capacity is at most `single_max_blocks` blocks of BLOCK_N slots."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    BLOCK_R = max(16, min(_next_pow2(R), _KERNEL_MAX_ROWS))
    RB = cdiv(R, BLOCK_R)
    BLOCK_P = max(16, _next_pow2(P))
    BLOCK_N = block_n or (64 if BLOCK_P <= 64 else (32 if BLOCK_P <= 128 else 16))
    n_blocks = cdiv(C, BLOCK_N)
    programs = B * Hkv * RB
    want = cdiv(fill * _num_sms(device), programs)                   # splits to fill the GPU `fill` times
    S = 1 if n_blocks <= single_max_blocks else max(1, min(n_blocks, want))
    blocks_per_split = cdiv(n_blocks, S)
    S = cdiv(n_blocks, blocks_per_split)
    return BLOCK_R, RB, BLOCK_P, BLOCK_N, S, blocks_per_split


def _merge(merge_kernel, Mo, Lo, Ao, out, lengths, Hkv, G, R, P, S, RB, T, BLOCK_R, BLOCK_P, *,
           inc_lengths: bool):
    """The merge launch (one program per (row, kv head, row block) × query row of the block): the S splits'
    partial softmax states → out (and lengths += T when `inc_lengths`)."""
    programs = out.shape[0] * Hkv * RB
    merge_kernel[(programs, min(BLOCK_R, R))](
        Mo, Lo, Ao, out, lengths, *out.stride(), Hkv, G, R, P, S, RB, T, INC_LENGTHS=inc_lengths,
        BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P, BLOCK_S=min(_next_pow2(S), int(FUSED_TUNE["merge_bs"])),
        num_warps=int(FUSED_TUNE["merge_warps"]), **pdl_launch(out.device))


def _ieee(dtype) -> bool:
    # fp32 models: exact fp32 dots (no TF32); the interpreter (CPU tests) has no 16-bit tl.dot
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _decode_attention_impl(q: Tensor, k: Tensor, v: Tensor, n0: Tensor, window: int, scale: float) -> Tensor:
    """q (B, H, T, P) (any strides) at stream indices n0 + t, already written to k, v (B, Hkv, C, P);
    n0 (B,) int64; window 0 = none → out (B, T, H, P) in q's dtype."""
    _, split_kernel, merge_kernel, _ = _kernels()
    B, H, T, P = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = H // Hkv
    R = T * G
    out = torch.empty(B, T, H, P, device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    BLOCK_R, RB, BLOCK_P, BLOCK_N, S, blocks_per_split = _tiles(B, Hkv, R, C, P, q.device,
                                                                 fill=int(UNFUSED_TUNE["fill"]),
                                                                 block_n=int(UNFUSED_TUNE["block_n"]))
    programs = B * Hkv * RB
    many = programs >= _num_sms(q.device)
    f32 = dict(device=q.device, dtype=torch.float32)
    Mo = torch.empty(programs * S * BLOCK_R, **f32)
    Lo = torch.empty(programs * S * BLOCK_R, **f32)
    Ao = torch.empty(programs * S * BLOCK_R * BLOCK_P, **f32)
    n0 = n0.contiguous()
    split_kernel[(programs, S)](
        q, k, v, n0, Mo, Lo, Ao, *q.stride(), *k.stride(), *v.stride(),
        Hkv, C, T, G, R, P, S, RB, blocks_per_split * BLOCK_N, int(window), float(scale) * 1.4426950408889634,
        HAS_WINDOW=window > 0, IEEE=_ieee(q.dtype), BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P,
        num_warps=int(UNFUSED_TUNE["warps_many" if many else "warps"]),
        num_stages=int(UNFUSED_TUNE["stages_many" if many else "stages"]), **pdl_launch(q.device))
    _merge(merge_kernel, Mo, Lo, Ao, out, n0, Hkv, G, R, P, S, RB, T, BLOCK_R, BLOCK_P, inc_lengths=False)
    return out


@torch.library.custom_op("hybridize::decode_attention", mutates_args=())
def _decode_attention_op(q: Tensor, k: Tensor, v: Tensor, n0: Tensor, window: int, scale: float) -> Tensor:
    return _decode_attention_impl(q, k, v, n0, window, scale)


@_decode_attention_op.register_fake
def _(q, k, v, n0, window, scale):
    B, H, T, P = q.shape
    return q.new_empty(B, T, H, P)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, n0: Tensor, window: int, scale: float) -> Tensor:
    """The decode kernel (see above): q (B, H, T, P) → (B, T, H, P). A custom op under torch.compile,
    a direct launch otherwise (custom_op's Python dispatch costs ~50-100 us)."""
    if torch.compiler.is_compiling():
        return torch.ops.hybridize.decode_attention(q, k, v, n0, window, scale)
    return _decode_attention_impl(q, k, v, n0, window, scale)


# ------------------------------------------------------------------------------------------ fused variant
_COUNTERS: dict = {}             # device → int32 zeros, one per batch row (single-split lengths update)
_OLD_COUNTERS: list = []         # replaced buffers: CUDA graphs captured with them may still replay


def _row_counters(device, B: int) -> "Tensor | None":
    """The per-row completion counters of the single-split fused kernel (all 0 between launches: the last
    program of a row resets its own). Allocated once per device (grown when B outgrows it, the old buffer
    kept alive for graphs that captured it); None while a CUDA graph is being captured and the buffer is
    missing or too small (the caller then takes the split + merge path, which needs none).
    Launches that share a device must not run concurrently on different streams (they would share
    counters); one decode step's launches are in stream order."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= B:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if buf is not None:
        _OLD_COUNTERS.append(buf)
    buf = _COUNTERS[key] = torch.zeros(max(B, 4096), device=device, dtype=torch.int32)   # 16 KB
    return buf


def _decode_attention_fused_impl(q: Tensor, k: Tensor, v: Tensor, inv_freq: Tensor, k_cache: Tensor,
                                 v_cache: Tensor, lengths: Tensor, window: int, scale: float,
                                 rope_scale: float, interleaved: bool) -> Tensor:
    """See `decode_attention_fused`."""
    _, _, merge_kernel, fused_split = _kernels()
    B, T, H, P = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    R = T * G
    out = torch.empty(B, T, H, P, device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    if T > C:
        raise ValueError(f"decode_attention_fused: {T} new tokens do not fit a cache of {C} slots")
    if lengths.dtype != torch.int64 or not lengths.is_contiguous():
        raise ValueError("decode_attention_fused: lengths must be a contiguous int64 tensor (advanced in "
                         "place)")
    BLOCK_R, RB, BLOCK_P, BLOCK_N, S, blocks_per_split = _tiles(B, Hkv, R, C, P, q.device,
                                                                 FUSED_TUNE.get("single_max_blocks",
                                                                                _SINGLE_SPLIT_MAX_BLOCKS),
                                                                 int(FUSED_TUNE["fill"]),
                                                                 int(FUSED_TUNE.get("block_n") or 0))
    programs = B * Hkv * RB
    counters = _row_counters(q.device, B) if S == 1 else None
    single = counters is not None
    inv_freq = inv_freq.to(torch.float32).contiguous()
    half = inv_freq.numel()
    if 2 * half > P:
        raise ValueError(f"decode_attention_fused: rotary width {2 * half} > head_dim {P}")
    if single:
        Mo = Lo = Ao = out                                    # unused
    else:
        f32 = dict(device=q.device, dtype=torch.float32)
        Mo = torch.empty(programs * S * BLOCK_R, **f32)
        Lo = torch.empty(programs * S * BLOCK_R, **f32)
        Ao = torch.empty(programs * S * BLOCK_R * BLOCK_P, **f32)
        counters = lengths                                    # unused
    pdl = pdl_launch(q.device)
    fused_split[(programs, S)](
        q, k, v, inv_freq, k_cache, v_cache, lengths, counters, Mo, Lo, Ao, out,
        *q.stride(), *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        Hkv, C, T, G, R, P, S, RB, half, blocks_per_split * BLOCK_N, int(window),
        float(scale) * 1.4426950408889634, float(rope_scale),
        HAS_WINDOW=window > 0, IEEE=_ieee(q.dtype), ROPE=half > 0, INTERLEAVED=bool(interleaved),
        PRECISE=os.environ.get("TRITON_INTERPRET") != "1" and FUSED_TUNE.get("precise", True), SINGLE=single,
        ONE=T == 1, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P,
        BLOCK_T=1 if T == 1 else max(16, _next_pow2(T)), EARLY=int(FUSED_TUNE.get("early", 0)),
        num_warps=int(FUSED_TUNE["single_warps" if single else "warps"]),
        num_stages=int(FUSED_TUNE["stages_long" if blocks_per_split >= 4 and not single else "stages"]), **pdl)
    if not single:
        _merge(merge_kernel, Mo, Lo, Ao, out, lengths, Hkv, G, R, P, S, RB, T, BLOCK_R, BLOCK_P,
               inc_lengths=True)
    return out


@torch.library.custom_op("hybridize::decode_attention_fused", mutates_args=("k_cache", "v_cache", "lengths"))
def _decode_attention_fused_op(q: Tensor, k: Tensor, v: Tensor, inv_freq: Tensor, k_cache: Tensor,
                               v_cache: Tensor, lengths: Tensor, window: int, scale: float, rope_scale: float,
                               interleaved: bool) -> Tensor:
    return _decode_attention_fused_impl(q, k, v, inv_freq, k_cache, v_cache, lengths, window, scale,
                                        rope_scale, interleaved)


@_decode_attention_fused_op.register_fake
def _(q, k, v, inv_freq, k_cache, v_cache, lengths, window, scale, rope_scale, interleaved):
    B, T, H, P = q.shape
    return q.new_empty(B, T, H, P)


def decode_attention_fused(q: Tensor, k: Tensor, v: Tensor, inv_freq: Tensor, k_cache: Tensor,
                           v_cache: Tensor, lengths: Tensor, window: int, scale: float,
                           rope_scale: float = 1.0, interleaved: bool = False) -> Tensor:
    """A decode step's attention in one or two launches: RoPE, cache writes, attention, ``lengths += T``.

    q (B, T, H, P), k, v (B, T, Hkv, P): the T new tokens' projections *before* RoPE, any strides (e.g.
    views of a fused q/k/v projection's output); inv_freq (R/2,) fp32 (`RotaryEmbedding.inv_freq`; R = 0:
    no RoPE), rope_scale its attention factor (YaRN; 1 otherwise), interleaved its pair layout;
    k_cache, v_cache (B, Hkv, C, P) in q's dtype, lengths (B,) int64 contiguous, T <= C.

    Same result as the unfused step (`Attention.step_tokens`' reference path): the first R dims of q and
    k rotated at positions ``lengths[b] + t`` (as `hybridize.layers.rotary.apply_rotary`, rounded to the
    input dtype), rotated k and v written to slots ``(lengths[b] + t) % C``, each new token attending the
    visible cached tokens and the new tokens 0 … t (window 0 = none), then ``lengths += T`` in place.
    Returns (B, T, H, P) in q's dtype. A custom op (mutating the caches and lengths) under torch.compile,
    a direct launch otherwise."""
    if torch.compiler.is_compiling():
        return torch.ops.hybridize.decode_attention_fused(q, k, v, inv_freq, k_cache, v_cache, lengths,
                                                          window, scale, rope_scale, interleaved)
    return _decode_attention_fused_impl(q, k, v, inv_freq, k_cache, v_cache, lengths, window, scale,
                                        rope_scale, interleaved)


def decode_attention_fused_reference(q, k, v, inv_freq, k_cache, v_cache, lengths, window, scale,
                                     rope_scale=1.0, interleaved=False):
    """What `decode_attention_fused` does, in PyTorch, the way the unfused step does it (cos/sin as
    `RotaryEmbedding.forward`, `apply_rotary`, index_put cache writes, fp32 attention, lengths += T)."""
    from hybridize.layers.rotary import apply_rotary  # lazy: hybridize.layers imports this package

    B, T, H, P = q.shape
    n0 = lengths.clone()
    pos = n0[:, None] + torch.arange(T, device=q.device)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if inv_freq.numel():
        freqs = pos[..., None].float() * inv_freq.float()
        emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if rope_scale != 1.0:
            cos, sin = cos * rope_scale, sin * rope_scale
        qt = apply_rotary(qt, cos, sin, interleaved=interleaved)
        kt = apply_rotary(kt, cos, sin, interleaved=interleaved)
    rows = torch.arange(B, device=q.device)[:, None]
    slots = torch.remainder(pos, k_cache.shape[2])
    k_cache[rows, :, slots] = kt.transpose(1, 2).to(k_cache.dtype)
    v_cache[rows, :, slots] = vt.transpose(1, 2).to(v_cache.dtype)
    out = _exact_fp32(decode_attention_reference, qt, k_cache, v_cache, n0, window, scale)
    lengths.add_(T)
    return out.to(q.dtype)


def _exact_fp32(fn, *args):
    """fn(*args) with TF32 matmuls off: a process that enabled them (``allow_tf32``, as the benchmarks do
    for training speed) would otherwise judge the exact fp32 kernel against a TF32 reference (measured
    on an H100: max abs err 1.2e-3 > 1e-4, kernel wrongly disabled)."""
    flag = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return fn(*args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


def _self_check(device, dtype, P: int, G: int) -> bool:
    """Run the kernel once on random caches (wrapped ring, window, partial fill, T = 1 and 3) against
    `decode_attention_reference`; False (and a warning) on an exception or a mismatch."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
        for T, C, window, lens in ((1, 70, 0, [0, 69, 5]), (3, 40, 0, [0, 11, 37]), (3, 24, 20, [50, 3, 21]),
                                   (1, 300, 0, [299, 150, 0])):
            Hkv = 2
            B = len(lens)
            q = torch.randn(B, T, Hkv * G, P, generator=g).to(device, dtype).transpose(1, 2)
            k = torch.randn(B, Hkv, C, P, generator=g).to(device, dtype)
            v = torch.randn(B, Hkv, C, P, generator=g).to(device, dtype)
            n0 = torch.tensor(lens, device=device)
            got = _decode_attention_impl(q, k, v, n0, window, P ** -0.5).float()
            want = _exact_fp32(decode_attention_reference, q, k, v, n0, window, P ** -0.5)
            if not torch.allclose(got, want, atol=tol, rtol=tol):
                err = (got - want).abs().max().item()
                raise RuntimeError(f"mismatch vs reference (max abs err {err:.3g}, T={T}, C={C}, window={window})")
        return True
    except Exception as e:  # noqa: BLE001 — any failure → SDPA path
        warnings.warn(f"decode-attention kernel disabled for {dtype}, head_dim {P}, n_rep {G} on {device} "
                      f"({type(e).__name__}: {str(e)[:300]}); using SDPA")
        return False


def decode_kernel_ok(q: Tensor, k_cache: Tensor, n_rep: int) -> bool:
    """Whether `step_tokens` uses the kernel: on CUDA (or HYBRIDIZE_KERNELS=1), supported dtype / head
    dim, and the one-time self-check passed. Under torch.compile or CUDA-graph capture the self-check
    cannot run: an unchecked configuration takes the SDPA path (`StepRunner` steps eagerly first)."""
    P = q.shape[-1]
    if P > _KERNEL_MAX_P or q.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or k_cache.dtype != q.dtype:
        return False
    # the dispatch rule first: a configuration that passed its self-check must not bypass
    # HYBRIDIZE_KERNELS=0 (or run CPU tensors through the interpreter once the variable is unset)
    if not use_kernels(q, k_cache):
        return False
    key = (str(q.device), q.dtype, P, n_rep)
    ok = _KERNEL_OK.get(key)
    if ok is not None:
        return ok
    if torch.compiler.is_compiling():
        return False
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    ok = _KERNEL_OK[key] = _self_check(q.device, q.dtype, P, n_rep)
    return ok


def _fused_self_check(device, dtype, P: int, G: int, rot_dim: int, interleaved: bool) -> bool:
    """Run `decode_attention_fused` once per geometry (one split and split + merge, T = 1 and 3, a wrapped
    ring with a window, rows at different lengths incl. empty) against `decode_attention_fused_reference`:
    outputs, both caches and lengths. False (and a warning) on an exception or a mismatch."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2).float() / max(rot_dim, 1)))
        inv_freq = inv_freq.to(device)
        for T, C, window, lens in ((1, 70, 0, [0, 69, 5]), (3, 40, 0, [0, 11, 37]),
                                   (3, 24, 20, [50, 3, 4021]), (1, 300, 0, [299, 150, 0]),
                                   (3, 300, 0, [297, 7, 0])):
            Hkv = 2
            B = len(lens)
            q = torch.randn(B, T, Hkv * G, P, generator=g).to(device, dtype)
            k = torch.randn(B, T, Hkv, P, generator=g).to(device, dtype)
            v = torch.randn(B, T, Hkv, P, generator=g).to(device, dtype)
            caches = [torch.randn(B, Hkv, C, P, generator=g).to(device, dtype) for _ in range(2)]
            n0 = torch.tensor(lens, device=device)
            got_kv, want_kv = [c.clone() for c in caches], [c.clone() for c in caches]
            got_n, want_n = n0.clone(), n0.clone()
            got = _decode_attention_fused_impl(q, k, v, inv_freq, *got_kv, got_n, window, P ** -0.5, 1.0,
                                               interleaved).float()
            want = decode_attention_fused_reference(q, k, v, inv_freq, *want_kv, want_n, window, P ** -0.5,
                                                    1.0, interleaved).float()
            for what, a, b in (("output", got, want), ("k cache", got_kv[0].float(), want_kv[0].float()),
                               ("v cache", got_kv[1].float(), want_kv[1].float())):
                if not torch.allclose(a, b, atol=tol, rtol=tol):
                    err = (a - b).abs().max().item()
                    raise RuntimeError(f"{what} mismatch vs reference (max abs err {err:.3g}, T={T}, C={C}, "
                                       f"window={window})")
            if not torch.equal(got_n, want_n):
                raise RuntimeError(f"lengths {got_n.tolist()} != {want_n.tolist()} (T={T}, C={C})")
        return True
    except Exception as e:  # noqa: BLE001 — any failure → the unfused path
        warnings.warn(f"fused decode-attention kernel disabled for {dtype}, head_dim {P}, n_rep {G}, rotary "
                      f"{rot_dim}{' interleaved' if interleaved else ''} on {device} "
                      f"({type(e).__name__}: {str(e)[:300]}); using the unfused path")
        return False


def decode_fused_ok(q: Tensor, k_cache: Tensor, n_rep: int, rot_dim: int, interleaved: bool) -> bool:
    """Whether `step_tokens` uses `decode_attention_fused`: `decode_kernel_ok` (same dispatch rule) and a
    one-time self-check of the fused kernel for this (device, dtype, head dim, n_rep, rotary width and
    layout) passed. Unchecked under torch.compile or CUDA-graph capture → False (the unfused path)."""
    if not decode_kernel_ok(q, k_cache, n_rep):
        return False
    key = (str(q.device), q.dtype, q.shape[-1], n_rep, int(rot_dim), bool(interleaved))
    ok = _FUSED_OK.get(key)
    if ok is not None:
        return ok
    if torch.compiler.is_compiling():
        return False
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    ok = _FUSED_OK[key] = _fused_self_check(q.device, q.dtype, q.shape[-1], n_rep, int(rot_dim),
                                            bool(interleaved))
    return ok
