"""Where the PDL wait sits in the compiled decode kernels (GPU): prints, for the fused decode-attention split
kernel and the skinny GEMM, how many global loads / L2 prefetches the PTX issues before `griddepcontrol.wait`.
Run after a decode (kernels compiled): python3 benchmarks/ptx_order_check.py"""
import json
import os
import sys

import torch


def _order(ptx: str) -> dict:
    head = ptx.split("griddepcontrol.wait")[0] if "griddepcontrol.wait" in ptx else ""
    return dict(has_wait="griddepcontrol.wait" in ptx, loads_before_wait=head.count("ld.global"),
                prefetch_before_wait=head.count("prefetch.global.L2"), loads_total=ptx.count("ld.global"))


def main():
    from hybridize.ops.attention import triton_decode as td
    from hybridize.ops.gemm import triton as gemm
    dev = torch.device("cuda")
    bf = torch.bfloat16
    out = {}
    B, H, Hkv, P, C = 1, 32, 8, 64, 8256
    q = torch.randn(B, 1, H, P, device=dev, dtype=bf)
    k = torch.randn(B, 1, Hkv, P, device=dev, dtype=bf)
    kc = torch.randn(B, Hkv, C, P, device=dev, dtype=bf)
    inv = 1.0 / (10000 ** (torch.arange(0, P, 2, device=dev).float() / P))
    for early in (1, 0):
        td.FUSED_TUNE["early"] = early
        n = torch.tensor([8192], device=dev)
        td._decode_attention_fused_impl(q, k, k.clone(), inv, kc, kc.clone(), n, 0, P ** -0.5, 1.0, False)
        torch.cuda.synchronize()
    kern = td._kernels()[3]
    for key, compiled in _compiled(kern):
        out[f"attention {key}"] = _order(compiled.asm["ptx"])
    os.environ["HYBRIDIZE_GEMM_PREFETCH"] = "256"
    x = torch.randn(64, 2048, device=dev, dtype=bf)
    w = torch.randn(2048, 2048, device=dev, dtype=bf)
    gemm.skinny_gemm_triton(x, w, None, gemm.GemmConfig(64, 128, 4, 4, 4))
    torch.cuda.synchronize()
    for key, compiled in _compiled(gemm._skinny_kernel):
        out[f"gemm {key}"] = _order(compiled.asm["ptx"])
    json.dump(out, sys.stdout, indent=1)


def _compiled(kernel):
    caches = getattr(kernel, "device_caches", None) or getattr(kernel, "cache", {})
    for dev_cache in caches.values():
        entries = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
        for i, compiled in enumerate(entries.values()):
            yield i, compiled


if __name__ == "__main__":
    main()
