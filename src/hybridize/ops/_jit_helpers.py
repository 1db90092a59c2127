"""Small @triton.jit helpers shared by kernels (imports triton: import it where triton is already needed;
kernels built lazily import it inside their builder)."""
import triton
import triton.language as tl


@triton.jit
def prefetch_l2(ptrs):
    """One `prefetch.global.L2` per pointer of `ptrs` (any shape): warms L2 without registers or a wait —
    what the PDL kernels issue before `gdc_wait` for data no earlier kernel of the step writes (weights).
    Returns a dummy int32 tensor (inline asm needs an output)."""
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def glu_act(g, GLU: tl.constexpr):
    """The gate activation of a fused GLU epilogue (fp32): 1 silu, 2 gelu (tanh approximation), 3 gelu (erf)."""
    if GLU == 1:
        g = g * tl.sigmoid(g)
    elif GLU == 2:    # tanh u = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        g = g * tl.sigmoid(2.0 * u)
    else:
        g = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    return g
