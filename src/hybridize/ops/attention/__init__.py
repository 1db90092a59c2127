"""Attention ops: GQA helpers and slot bookkeeping (`reference.py`), and the split-K decode-attention
Triton kernels (`triton_decode.py`) used by `Attention.step_tokens` on CUDA: `decode_attention_fused`
(RoPE, cache writes, attention and the lengths update of a decode step in one or two launches) and the
attention-only `decode_attention`."""
from hybridize.ops.attention.reference import decode_attention_reference, repeat_kv, slot_visibility
from hybridize.ops.attention.triton_decode import (
                                                   decode_attention,
                                                   decode_attention_fused,
                                                   decode_attention_fused_reference,
                                                   decode_fused_ok,
                                                   decode_kernel_ok,
)

__all__ = ["decode_attention", "decode_attention_fused", "decode_attention_fused_reference",
           "decode_attention_reference", "decode_fused_ok", "decode_kernel_ok", "repeat_kv",
           "slot_visibility"]
