"""Split-K ("flash-decoding") Triton attention for decode: a few query tokens per row against a KV cache,
CUDA-graph capturable (no masks, no host sync), self-checked against the reference on first use."""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from hybridize.ops._dispatch import use_kernels
from hybridize.ops.attention.reference import decode_attention_reference

# Split-K ("flash-decoding") attention of a few query tokens per row against a KV cache. Grid: (batch ×
# kv head × query-row block, split); split s reads slots [s·S, (s+1)·S) ∩ [0, min(C, lengths + T)), so
# an unfilled cache costs nothing and a long one is read by many SMs at once; a second kernel merges the
# splits' (max, sum, acc). The query rows of a program are the n_rep query heads of its kv head times
# the T tokens (GQA without repeating the cache). Visibility (`reference.slot_visibility`) is computed
# in-kernel from lengths: no mask tensor, no host sync, fixed grid (CUDA-graph capturable).
_KERNELS = None
_KERNEL_OK: dict = {}            # (device, dtype, head_dim, n_rep) → bool, from a one-time self-check
_KERNEL_MAX_P = 256
_KERNEL_MAX_ROWS = 64            # query rows (T · n_rep) per program; more → several row blocks


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _build_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _split_kernel(Q, K, V, N0, Mo, Lo, Ao,
                      sqb, sqh, sqt, sqp, skb, skh, skc, skp, svb, svh, svc, svp,
                      Hkv, C, T, G, R, P, S, RB, slots_per_split, window, qk_scale,
                      HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
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
            qk = tl.where(valid, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            pr = tl.exp2(qk - m_use[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
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
    def _merge_kernel(Mo, Lo, Ao, Out, sob, sot, soh, sop, Hkv, G, R, P, S, RB,
                      BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rb = pid % RB
        bj = pid // RB
        b = bj // Hkv
        j = bj % Hkv
        rr = tl.arange(0, BLOCK_R)
        r = rb * BLOCK_R + rr
        p = tl.arange(0, BLOCK_P)
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_P], tl.float32)
        for sid in range(0, S):
            base = (pid * S + sid) * BLOCK_R + rr
            ms = tl.load(Mo + base)
            ls = tl.load(Lo + base)
            a_s = tl.load(Ao + base[:, None] * BLOCK_P + p[None, :])
            m_new = tl.maximum(m, ms)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            w_old = tl.exp2(m - m_use)
            w_new = tl.exp2(ms - m_use)
            l = l * w_old + ls * w_new
            acc = acc * w_old[:, None] + a_s * w_new[:, None]
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        t = r // G
        h = j * G + r % G
        tl.store(Out + b * sob + t[:, None] * sot + h[:, None] * soh + p[None, :] * sop,
                 out.to(Out.dtype.element_ty), mask=(r < R)[:, None] & (p < P)[None, :])

    return triton, _split_kernel, _merge_kernel


_SM_COUNT: dict = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 16
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def _decode_attention_impl(q: Tensor, k: Tensor, v: Tensor, n0: Tensor, window: int, scale: float) -> Tensor:
    """q (B, H, T, P) (any strides) at stream indices n0 + t, already written to k, v (B, Hkv, C, P);
    n0 (B,) int64; window 0 = none → out (B, T, H, P) in q's dtype."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build_kernels()
    triton, split_kernel, merge_kernel = _KERNELS
    B, H, T, P = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = H // Hkv
    R = T * G
    out = torch.empty(B, T, H, P, device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    BLOCK_R = max(16, min(_next_pow2(R), _KERNEL_MAX_ROWS))
    RB = triton.cdiv(R, BLOCK_R)
    BLOCK_P = max(16, _next_pow2(P))
    BLOCK_N = 64 if BLOCK_P <= 64 else (32 if BLOCK_P <= 128 else 16)
    n_blocks = triton.cdiv(C, BLOCK_N)
    programs = B * Hkv * RB
    want = triton.cdiv(4 * _num_sms(q.device), programs)            # splits to fill the GPU ~4 times
    S = max(1, min(n_blocks, want))
    blocks_per_split = triton.cdiv(n_blocks, S)
    S = triton.cdiv(n_blocks, blocks_per_split)
    f32 = dict(device=q.device, dtype=torch.float32)
    Mo = torch.empty(programs * S * BLOCK_R, **f32)
    Lo = torch.empty(programs * S * BLOCK_R, **f32)
    Ao = torch.empty(programs * S * BLOCK_R * BLOCK_P, **f32)
    n0 = n0.contiguous()
    # fp32 models: exact fp32 dots (no TF32); the interpreter (CPU tests) has no 16-bit tl.dot
    ieee = q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    split_kernel[(programs, S)](
        q, k, v, n0, Mo, Lo, Ao, *q.stride(), *k.stride(), *v.stride(),
        Hkv, C, T, G, R, P, S, RB, blocks_per_split * BLOCK_N, int(window), float(scale) * 1.4426950408889634,
        HAS_WINDOW=window > 0, IEEE=ieee, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P,
        num_warps=4, num_stages=2)
    merge_kernel[(programs,)](Mo, Lo, Ao, out, out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                              Hkv, G, R, P, S, RB, BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P, num_warps=4)
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
