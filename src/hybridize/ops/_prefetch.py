"""L2 prefetch from Triton kernels (imports triton: import it where triton is already needed)."""
import triton
import triton.language as tl


@triton.jit
def prefetch_l2(ptrs):
    """One `prefetch.global.L2` per pointer of `ptrs` (any shape): warms L2 without registers or a wait —
    what the PDL kernels issue before `gdc_wait` for data no earlier kernel of the step writes (weights).
    Returns a dummy int32 tensor (inline asm needs an output)."""
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                     dtype=tl.int32, is_pure=False, pack=1)
