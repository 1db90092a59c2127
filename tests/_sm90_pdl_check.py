"""Run every decode-step launcher on CPU tensors, but instead of launching, compile its kernel for sm_90
(no GPU needed: triton's own ptxas) with PDL on, and print one JSON line per kernel with the PTX positions
of griddepcontrol.wait / launch_dependents and of the first global load / store / atomic, and which
tensors the loads before the wait read. Run by
tests/test_pdl.py in a subprocess (the tests' TRITON_INTERPRET=1 makes kernels interpreted functions)."""
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ["HYBRIDIZE_KERNELS"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import hybridize.ops.pdl as pdl  # noqa: E402

pdl.pdl_enabled = lambda device: True
_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
       torch.int64: "i64"}


_PRED = r"^\s*(@!?%p\d+\s+)?"      # an instruction, predicated or not


def _first(ptx, pattern):
    m = re.search(pattern, ptx, flags=re.M)
    return m.start() if m else None


_REG = re.compile(r"%[a-z]+\d+")


def _pre_wait_load_params(ptx: str, names: list) -> list:
    """Names of the kernel parameters (pointers and the scalars of their offsets) whose values the
    addresses of the global loads before
    griddepcontrol.wait derive from (a forward taint of registers from `ld.param` through every
    instruction: destinations are the registers before an instruction's first comma)."""
    taint: dict = {}
    found: set = set()
    for line in ptx.split("griddepcontrol.wait")[0].splitlines():
        line = line.strip()
        m = re.match(r"(@!?%p\d+\s+)?ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_(\d+)\]", line)
        if m:
            i = int(m.group(3))
            taint[m.group(2)] = {names[i] if i < len(names) else f"param_{i}"}
            continue
        body = re.sub(r"^@!?%p\d+\s+", "", line)
        if "," not in body or body.startswith("//"):
            continue
        head, tail = body.split(",", 1)
        srcs = set().union(*(taint.get(r, set()) for r in _REG.findall(tail)))
        if re.match(r"ld\.global", body):
            addr = re.findall(r"\[([^\]]*)\]", tail)
            found |= set().union(*(taint.get(r, set()) for a in addr for r in _REG.findall(a)))
        for r in _REG.findall(head):
            taint[r] = srcs
    return sorted(found)


def _compile_instead(self, *args, grid, warmup, **kwargs):
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    sig, const = {}, {}
    for i, p in enumerate(self.params):
        v = bound.get(p.name, p.default)
        if p.is_constexpr:
            sig[p.name], const[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TY[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i64" if abs(v) >= 2 ** 31 else "i32"
        else:
            sig[p.name] = "fp32"
    # what the launcher specialises on: 16-byte aligned pointers, integers divisible by 16 (without these
    # hints loads are not vectorised and no K loop is software-pipelined)
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(self.params) if not p.is_constexpr and (
        isinstance(bound.get(p.name), torch.Tensor) or (type(bound.get(p.name)) is int and bound[p.name]
                                                         and bound[p.name] % 16 == 0))}
    ptx = triton.compile(triton.compiler.ASTSource(fn=self, signature=sig, constexprs=const, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
    print(json.dumps(dict(kernel=self.fn.__name__, launch_pdl=bool(opts.get("launch_pdl")),
                          prefetch=_first(ptx, r"^\s*prefetch\.global"),
                          wait=_first(ptx, r"griddepcontrol\.wait"), cp_async=len(re.findall(r"cp\.async\.", ptx)),
                          launch=_first(ptx, r"griddepcontrol\.launch_dependents"),
                          load=_first(ptx, _PRED + r"ld\.global"), store=_first(ptx, _PRED + r"(st|atom|red)\.global"),
                          loads_before_wait=len(re.findall(_PRED + r"ld\.global", ptx.split("griddepcontrol.wait")[0],
                                                           flags=re.M)),
                          pre_wait_load_tensors=[n for n in _pre_wait_load_params(
                              ptx, [p.name for p in self.params if not p.is_constexpr]) if sig[n].startswith("*")])),
          flush=True)


JITFunction.run = _compile_instead


def main():
    from hybridize.ops.argmax import triton as argmax
    from hybridize.ops.attention import triton_decode as att
    from hybridize.ops.conv1d import triton as conv
    from hybridize.ops.gemv.triton import ConvUpdate, GemvConfig, gemv_triton
    from hybridize.ops.rglru import triton as rglru
    from hybridize.ops.selective_scan import triton_step as ss
    from hybridize.ops.ssd import triton_step as ssd
    bf = torch.bfloat16
    x = torch.randn(1, 256, dtype=bf)
    w = torch.randn(512, 256, dtype=bf)
    nw = torch.ones(256, dtype=bf)
    gemv_triton(x, w, None, GemvConfig(2, 128, 4, 3), norm_weight=nw, eps=1e-5, glu="silu")
    gemv_triton(x, w, None, GemvConfig(2, 128, 4, 3), add=x, residual=torch.zeros(512, dtype=bf))
    gemv_triton(x, w, None, GemvConfig(2, 128, 4, 3), norm_weight=nw, eps=1e-5,     # Mamba's in_proj + conv
                conv=ConvUpdate(torch.zeros(1, 300, 3), torch.randn(300, 4, dtype=bf), None, 100))
    B, H, Hkv, P, C = 2, 8, 2, 64, 256
    q, k = torch.randn(B, 1, H, P, dtype=bf), torch.randn(B, 1, Hkv, P, dtype=bf)
    kc = torch.zeros(B, Hkv, C, P, dtype=bf)
    for n in (10, 250):     # single-split (counters) and split + merge
        att._decode_attention_fused_impl(q, k, k.clone(), torch.ones(32), kc, kc.clone(), torch.full((B,), n), 0,
                                         0.125, 1.0, False)
    att._decode_attention_impl(q.transpose(1, 2).contiguous(), kc, kc.clone(), torch.tensor([250] * B), 0, 0.125)
    conv._update_impl(torch.randn(2, 256, dtype=bf), torch.zeros(2, 256, 3, dtype=bf),
                      torch.randn(256, 4, dtype=bf), None, True)
    rglru._step_impl(torch.randn(2, 256), torch.rand(2, 256), torch.zeros(2, 256))
    argmax.argmax_triton(torch.randn(1, 5000, dtype=bf))      # the greedy step's argmax (two kernels)
    u = torch.randn(2, 512, dtype=bf)
    ss._step_impl(u, u.clone(), -torch.rand(512, 16), torch.randn(2, 1, 16, dtype=bf),
                  torch.randn(2, 1, 16, dtype=bf), torch.zeros(2, 512, 16), torch.ones(512), None, None, True)
    from hybridize.ops.gemm.triton import GemmConfig, skinny_gemm_triton
    xm = torch.randn(8, 256, dtype=bf)
    skinny_gemm_triton(xm, w, None, GemmConfig(64, 64, 1, 4, 3), glu="silu", residual=torch.randn(8, 256, dtype=bf))
    skinny_gemm_triton(xm, w, None, GemmConfig(64, 64, 2, 4, 3), norm_weight=nw, eps=1e-5)    # split-K (combine)
    skinny_gemm_triton(xm, w, None, GemmConfig(64, 64, -5, 4, 3), glu="silu")       # stream-K, uneven parts
    ssd._step_impl(torch.randn(2, 8, 64, dtype=bf), torch.rand(2, 8, dtype=bf), None, torch.randn(2, 1, 128, dtype=bf),
                   torch.randn(2, 1, 128, dtype=bf), torch.zeros(2, 8, 64, 128, dtype=bf), None,
                   torch.randn(2, 8, 64, dtype=bf), None, None, True, 0.0, float("inf"), torch.randn(8),
                   torch.ones(512, dtype=bf), 1e-5, 64)                # the gated-norm epilogue
    xh = torch.randn(2, 2, 64, dtype=bf)     # the Mamba-in-the-Llama decode call: shared x / B rows, A_log
    ssd._step_impl(xh, torch.rand(2, 8, dtype=bf), None, torch.randn(2, 2, 128, dtype=bf),
                   torch.randn(2, 8, 128, dtype=bf), torch.zeros(2, 8, 64, 128), None, None, None, None, True, 0.0,
                   float("inf"), torch.randn(8))


if __name__ == "__main__":
    sys.exit(main())
