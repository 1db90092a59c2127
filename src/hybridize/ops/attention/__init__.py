"""Attention ops: GQA helpers and slot bookkeeping (`reference.py`), and the split-K decode-attention
Triton kernel (`triton_decode.py`) used by `Attention.step_tokens` on CUDA."""
from hybridize.ops.attention.reference import decode_attention_reference, repeat_kv, slot_visibility
from hybridize.ops.attention.triton_decode import decode_attention, decode_kernel_ok

__all__ = ["decode_attention", "decode_attention_reference", "decode_kernel_ok", "repeat_kv",
           "slot_visibility"]
