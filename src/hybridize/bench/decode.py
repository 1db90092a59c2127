"""Decode throughput of hybridize's engine (torch.compile'd step replayed from CUDA graphs) for a ~1B
Llama-style Transformer and its Mamba-2 hybrids, vs transformers' `generate` on an equivalent
`LlamaForCausalLM` (static cache, SDPA), vs the HBM floor; plus the cost of verifying K tokens
(speculative decoding, `Verifier`: fixed-K in-place pass, compiled + graph) relative to one step.

    PYTHONPATH=src python -m hybridize.bench.decode --json-out results.json          # H100, ~6-10 min
    PYTHONPATH=src python -m hybridize.bench.decode --quick --json-out /tmp/q.json    # CPU smoke test
    ... --models llama-1b --batches 1 --contexts 0 --profile llama-1b:1:0         # top kernels of a step

Compilation: each model compiles its step twice (batch 1, batch > 1: one graph serves every KV capacity)
and its verifier once per K; that time is excluded from the per-token numbers and reported as setup_s.

Fused projections: the engine fuses q/k/v, gate/up (and RG-LRU branches) into one matmul each at setup
(`HybridLM.fuse_projections_`); every row records "fused". --no-fuse (or HYBRIDIZE_FUSE=0) measures the
separate projections, for an A/B of the same models.

Random weights, bf16, greedy. The context is filled by prefilling random tokens (hybridize's chunked
prefill; HF's own prefill); decode latency excludes it:
* hybridize: `GenerationStats.decode_s / steps` (one host sync at the end, graph replay per token);
  --also-uncompiled adds the same measurement without torch.compile (eager step in the CUDA graph, the
  engine before compilation) for comparison; compile / capture time is reported as setup_s.
* HF: (t(generate N+1 tokens) − t(generate 1 token)) / N, both with the same prompt; the compile that
  HF's generate would trigger for a static cache is disabled unless --hf-compile.
* HBM floor per step: bytes that must move ÷ --hbm-bw (3.35e12 B/s, H100 SXM): all weights except the
  embedding table (B rows of it; tied heads read it whole), the KV cache at the mean context of the
  decode, and the recurrent states read and written back (fp32).
Results are written to --json-out after every measurement (a partial run keeps what it measured); a
--budget-s guard skips what would not fit in the time budget.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import sys
import time
from pathlib import Path

import torch

import hybridize as hz
import hybridize.ops.gemv as gemv_mod
from hybridize.bench.utils import median_ms, write_json
from hybridize.generate import generate
from hybridize.generate.cache_ops import alloc_cache, restore_positions_, save_positions
from hybridize.generate.engine import StepRunner, fuse_wanted, prefill_
from hybridize.generate.speculative import Verifier
from hybridize.model import HybridLM
from hybridize.ops.gemv import gemv_wanted

T_START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T_START


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


#: --state-dtype: the recurrent states' dtype (the KV cache follows the weights, bf16)
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(name: str, device, dtype) -> HybridLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = HybridLM(hz.preset(name))
    return model.to(dtype=dtype).eval()


def step_bytes(model: HybridLM, batch: int, context: float, kv_dtype, state_dtype=torch.float32) -> dict:
    """HBM bytes one decode step must move (see the module docstring)."""
    emb = model.embed_tokens.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.cfg.tie_embeddings:      # untied: the input table is only gathered (B rows)
        weights -= emb.numel() * emb.element_size() - batch * emb.shape[1] * emb.element_size()
    mem = model.decode_memory(max(int(context), 1), dtype=kv_dtype, state_dtype=state_dtype)
    kv = batch * mem["kv_cache_bytes"]
    rec = 2 * batch * mem["recurrent_state_bytes"]          # read + write back
    return {"weights": weights, "kv_cache": kv, "recurrent_state_rw": rec, "total": weights + kv + rec}


# ---------------------------------------------------------------------------- hybridize decode
def bench_hybridize(model, name, batch, context, args, device, compile="auto") -> dict:
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(batch * 100003 + context)
    prompts = torch.randint(0, V, (batch, context + 1), generator=g).tolist()
    sync(device)
    t0 = time.perf_counter()
    res = generate(model, prompts, max_new_tokens=args.new_tokens, use_cuda_graph="auto", compile=compile,
                   prefill_chunk=args.prefill_chunk, fuse=args.fuse, state_dtype=STATE_DTYPES[args.state_dtype])
    sync(device)
    s = res.stats
    setup_s = time.perf_counter() - t0 - s.prefill_s - s.decode_s
    ms = 1e3 * s.decode_s / s.steps
    by = step_bytes(model, batch, context + args.new_tokens / 2, torch.bfloat16, STATE_DTYPES[args.state_dtype])
    floor_ms = 1e3 * by["total"] / args.hbm_bw
    return {"model": name if s.compiled else f"{name} (no compile)", "batch": batch, "context": context,
            "new_tokens": s.steps, "ms_per_token": ms, "tokens_per_s": batch * s.steps / s.decode_s,
            "prefill_s": s.prefill_s, "setup_s": setup_s, "cuda_graph": s.cuda_graph, "compiled": s.compiled,
            "fused": s.fused, "gemv_shapes": s.gemv_shapes, "state_dtype": args.state_dtype,
            "hbm_floor_ms": floor_ms, "hbm_floor_tokens_per_s": 1e3 * batch / floor_ms,
            "fraction_of_hbm_floor": floor_ms / ms, "bytes_per_step": by}


# ---------------------------------------------------------------------------- transformers baseline
def hf_llama(model: HybridLM, device, dtype):
    """An equivalent `LlamaForCausalLM` (same shapes; its own random weights), SDPA attention."""
    import transformers

    c = model.cfg
    a = c.attention
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.mlp.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
        head_dim=a.head_dim or c.hidden_size // a.num_heads, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta}, attn_implementation="sdpa",
        pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        ref = transformers.LlamaForCausalLM(cfg)
    return ref.to(dtype=dtype).eval()


def bench_hf(ref, batch, context, args, device, *, static_cache=True) -> dict:
    """transformers' `generate` (greedy) on `ref`: an equivalent LlamaForCausalLM (static cache, SDPA), or
    with static_cache=False a HybridLM itself (its GenerationMixin path: HybridCache, eager forward)."""
    from transformers import GenerationConfig

    V = ref.config.vocab_size
    g = torch.Generator().manual_seed(batch * 100003 + context)
    ids = torch.randint(0, V, (batch, context + 1), generator=g).to(device)
    extra = {}
    if "prefill_chunk_size" in GenerationConfig().__dict__ and context > args.prefill_chunk:
        extra["prefill_chunk_size"] = args.prefill_chunk
    if static_cache:
        extra.update(cache_implementation="static", disable_compile=not args.hf_compile)

    def run(n, x=ids):
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0, **extra)
        sync(device)
        assert out.shape[1] == x.shape[1] + n
        return time.perf_counter() - t

    run(2, ids[:, :2])                         # warm-up (allocator, cuBLAS; compile when enabled)
    t1, tn = run(1), run(args.new_tokens + 1)
    ms = 1e3 * (tn - t1) / args.new_tokens
    mode = (f"generate, static cache, sdpa, {'torch.compile' if args.hf_compile else 'eager'}" if static_cache
            else "generate (transformers' GenerationMixin on the HybridLM: HybridCache, eager)")
    return {"model": "transformers.LlamaForCausalLM" if static_cache else f"transformers.generate:{args._name}",
            "batch": batch, "context": context, "new_tokens": args.new_tokens, "ms_per_token": ms,
            "tokens_per_s": 1e3 * batch / ms, "mode": mode}


# ---------------------------------------------------------------------------- verification cost
def bench_verify(model, name, batch, context, args, device) -> list:
    """Time to verify K tokens (`Verifier.verify`: the target consumes K tokens in place, compiled + graph)
    and to verify + roll back (`commit`), vs one decode step (compiled + graph), at `context`."""
    V, ks = model.cfg.vocab_size, args.verify_ks
    cache = alloc_cache(model, batch, context + max(ks) + 16, window_slack=max(ks), device=device)
    t0 = time.perf_counter()
    runner = StepRunner(model, cache, batch, "auto", fuse=args.fuse)   # compiled + captured on the empty cache
    verifiers = {K: Verifier(model, cache, batch, K, "auto", fuse=args.fuse) for K in ks}
    sync(device)
    setup_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(7)
    prefill_(model, cache, torch.randint(0, V, (batch, context), generator=g).tolist(),
             prefill_chunk=args.prefill_chunk)
    saved = save_positions(cache)
    tok = torch.randint(0, V, (batch,), generator=g).to(device)

    def events(fn, undo, reps):
        return median_ms(fn, undo, reps, device)

    restore = functools.partial(restore_positions_, cache, saved)
    step_ms = events(lambda: runner(tok), restore, args.verify_reps)
    rows = []
    for K in ks:
        ver = verifiers[K]
        ids = torch.randint(0, V, (batch, K), generator=g).to(device)
        one = torch.ones(batch, dtype=torch.long, device=device)
        zero = torch.zeros(batch, dtype=torch.long, device=device)
        v = events(lambda: ver.verify(ids), lambda: ver.commit(zero), args.verify_reps)
        vc = events(lambda: (ver.verify(ids), ver.commit(one)), restore, args.verify_reps)
        rows.append({"model": name, "batch": batch, "context": context, "K": K, "verify_ms": v,
                     "verify_commit_ms": vc, "step_ms": step_ms, "verify_over_step": v / step_ms,
                     "verify_commit_over_step": vc / step_ms, "compiled": ver.compiled, "graphed": ver.graphed,
                     "step_compiled": runner.compiled, "fused": runner.fused and ver.fused, "setup_s": setup_s})
    return rows


def profile_step(model, batch, context, args, device) -> list:
    """Top CUDA kernels of 20 graph-replayed decode steps (torch.profiler), for --profile."""
    from torch.profiler import ProfilerActivity, profile

    cache = alloc_cache(model, batch, context + 64, device=device, state_dtype=STATE_DTYPES[args.state_dtype])
    runner = StepRunner(model, cache, batch, "auto", fuse=args.fuse)     # (its capture zeroes the cache)
    for st in cache.states:          # attention reads `context` cached tokens (their values do not matter)
        if hasattr(st, "lengths"):
            st.lengths.fill_(context)
    tok = torch.zeros(batch, dtype=torch.long, device=device)
    for _ in range(3):
        runner(tok)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            runner(tok)
        sync(device)
    rows = []
    for e in prof.key_averages():
        dt = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if dt:
            rows.append({"kernel": e.key[:120], "calls_per_step": e.count / 20, "us_per_step": dt / 20})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama-1b,mil50-1b,mil0-1b,mil25-1b,mil12-1b")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--contexts", default="0,4096,8192")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--verify-model", default="mil50-1b", help="the model (one of --models) whose verification "
                   "cost is measured")
    p.add_argument("--verify-ks", default="1,2,4,8", help="tokens verified per call (one compile each)")
    p.add_argument("--verify-batches", default="1,8")
    p.add_argument("--verify-contexts", default="0,4096")
    p.add_argument("--verify-reps", type=int, default=10)
    p.add_argument("--also-uncompiled", action="store_true", help="also measure every decode config without "
                   "torch.compile (the eager step in a CUDA graph)")
    p.add_argument("--no-gemv", dest="gemv", action="store_false", help="batch-1 steps use cuBLAS for every "
                   "matmul (A/B of the tuned Triton GEMV, hybridize.ops.gemv; = HYBRIDIZE_GEMV=0)")
    p.add_argument("--no-gemv-fusion", dest="gemv_fusion", action="store_false", help="batch-1 GEMVs without "
                   "their fused norms / residual adds / GLU (A/B of hybridize.ops.gemv.fused_linear; = "
                   "HYBRIDIZE_GEMV_FUSED=0)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep q/k/v, gate/up (and RG-LRU "
                   "branches) as separate matmuls (A/B of the engine's fused projections; = HYBRIDIZE_FUSE=0)")
    p.add_argument("--profile", default="", help="MODEL:BATCH:CONTEXT[,...]: print the top CUDA kernels of a "
                   "graph-replayed decode step")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--hf-hybrid", default="", help="MODEL:BATCH:CONTEXT[,...]: also time transformers' own "
                   "`generate` on that HybridLM (GenerationMixin path), to compare with this engine")
    p.add_argument("--hf-compile", action="store_true", help="let HF's generate torch.compile the static-cache "
                   "forward (compiles once per batch/context: slow)")
    p.add_argument("--state-dtype", default="fp32", choices=list(STATE_DTYPES),
                   help="recurrent state dtype of the hybrids (default fp32; bf16 halves the state bytes)")
    p.add_argument("--hbm-bw", type=float, default=3.35e12, help="HBM bytes/s for the floor (H100 SXM)")
    p.add_argument("--mem-fraction", type=float, default=0.8, help="skip configs whose KV/state estimate "
                   "exceeds this fraction of free GPU memory")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip remaining configs past this time")
    p.add_argument("--quick", action="store_true", help="tiny presets and sizes (CPU smoke test)")
    p.add_argument("--json-out", default="gpu_decode.json")
    args = p.parse_args(argv)
    if not args.gemv:
        os.environ["HYBRIDIZE_GEMV"] = "0"
    if not args.gemv_fusion:
        os.environ["HYBRIDIZE_GEMV_FUSED"] = "0"
        gemv_mod._FUSION_WANTED[0] = False
    if args.quick:
        args.models, args.verify_model = "llama-debug,mil50-debug", "mil50-debug"
        args.batches, args.contexts, args.new_tokens = "1,2", "0,40", 8
        args.verify_ks, args.verify_batches, args.verify_contexts, args.verify_reps = "1,3", "1", "0,24", 3
    models = args.models.split(",")
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    args.verify_ks = [int(x) for x in args.verify_ks.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    import transformers

    report = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
              "dtype": str(dtype), "hbm_bytes_per_s": args.hbm_bw, "new_tokens": args.new_tokens,
              "fuse": fuse_wanted(args.fuse), "gemv": gemv_wanted(),
              "gemv_fusion": gemv_mod._FUSION_WANTED[0], "gemv_tuning": gemv_mod.TUNE_LOG,
              "decode": [], "hf_generate": [], "verify": [], "profile": [], "skipped": [], "errors": []}
    out = Path(args.json_out)

    def save():
        report["total_s"] = elapsed()
        write_json(report, out, indent=2)

    def attempt(what: dict, need_bytes: int, fn, *fn_args):
        """fn(*fn_args), unless out of time or memory; errors are recorded, not raised."""
        if elapsed() > args.budget_s:
            report["skipped"].append({**what, "why": "time budget"})
            return None
        if device.type == "cuda" and need_bytes:
            free = torch.cuda.mem_get_info(device)[0]
            if need_bytes > args.mem_fraction * free:
                report["skipped"].append({**what, "why": f"memory: needs ~{need_bytes / 2**30:.1f} GiB, "
                                                         f"{free / 2**30:.1f} GiB free"})
                return None
        try:
            return fn(*fn_args)
        except torch.cuda.OutOfMemoryError as e:
            report["errors"].append({**what, "error": f"OOM: {str(e)[:200]}"})
        except Exception as e:  # noqa: BLE001 — record and go on: a partial report beats none
            report["errors"].append({**what, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        finally:
            free_memory(device)
        return None

    def line(r):
        print(f"[{elapsed():6.1f}s] {r['model']:>30} B={r['batch']:<3} ctx={r['context']:<5} "
              f"{r['ms_per_token']:7.2f} ms/token {r['tokens_per_s']:9.1f} tok/s"
              + (f"  (HBM floor {r['hbm_floor_ms']:.2f} ms, {100 * r['fraction_of_hbm_floor']:.0f} %)"
                 if "hbm_floor_ms" in r else "") + ("  [unfused]" if r.get("fused") is False else "")
              + (f"  [{r['gemv_shapes']} GEMV shapes]" if r.get("gemv_shapes") else ""), flush=True)

    if args.verify_ks and args.verify_model not in models:      # say so instead of measuring nothing
        report["skipped"].append({"stage": "verify", "model": args.verify_model,
                                  "why": f"--verify-model {args.verify_model} is not in --models"})
        print(f"note: no verification timings: --verify-model {args.verify_model} is not in --models", flush=True)
    for name in models:
        model = build_model(name, device, dtype)
        # warm-up: Triton compilation, cuBLAS handles, graph pools
        generate(model, [[1, 2, 3]], max_new_tokens=4, fuse=args.fuse)
        ref = None
        if name.startswith("llama") and not args.no_hf:
            ref = attempt({"model": "hf", "stage": "build"}, 0, hf_llama, model, device, dtype)
        for ctx in contexts:
            for B in batches:
                need = B * model.decode_memory(ctx + args.new_tokens + 1, dtype=torch.bfloat16)["total_bytes"]
                need = int(need * 1.2)        # + the prefill scratch rows
                what = {"model": name, "batch": B, "context": ctx}
                r = attempt(what, need, bench_hybridize, model, name, B, ctx, args, device)
                if r:
                    report["decode"].append(r)
                    line(r)
                if args.also_uncompiled:
                    r = attempt({**what, "compile": False}, need, bench_hybridize, model, name, B, ctx, args,
                                device, False)
                    if r:
                        report["decode"].append(r)
                        line(r)
                if ref is not None:
                    r = attempt({**what, "model": "hf"}, need, bench_hf, ref, B, ctx, args, device)
                    if r:
                        report["hf_generate"].append(r)
                        line(r)
                save()
        ref = None
        for spec in [x for x in args.hf_hybrid.split(",") if x]:
            hm, hb, hc = spec.split(":")
            if hm != name:
                continue
            args._name = name
            r = attempt({"model": name, "stage": "hf_generate_hybrid", "batch": int(hb), "context": int(hc)}, 0,
                        functools.partial(bench_hf, static_cache=False), model, int(hb), int(hc), args, device)
            if r:
                report["hf_generate"].append(r)
                line(r)
            save()
        if name == args.verify_model:
            for ctx in [int(x) for x in args.verify_contexts.split(",")]:
                for B in [int(x) for x in args.verify_batches.split(",")]:
                    rows = attempt({"model": name, "stage": "verify", "batch": B, "context": ctx}, 0,
                                   bench_verify, model, name, B, ctx, args, device)
                    for r in rows or []:
                        report["verify"].append(r)
                        print(f"[{elapsed():6.1f}s] verify {name} B={B} ctx={ctx} K={r['K']}: "
                              f"{r['verify_ms']:.2f} ms = {r['verify_over_step']:.2f} steps of "
                              f"{r['step_ms']:.2f} ms (+ commit: {r['verify_commit_ms']:.2f} ms = "
                              f"{r['verify_commit_over_step']:.2f} steps; setup {r['setup_s']:.0f} s)", flush=True)
                    save()
        for spec in [x for x in args.profile.split(",") if x]:
            pm, pb, pc = spec.split(":")
            if pm != name:
                continue
            rows = attempt({"model": name, "stage": "profile", "batch": int(pb), "context": int(pc)}, 0,
                           profile_step, model, int(pb), int(pc), args, device)
            if rows:
                report["profile"].append({"model": name, "batch": int(pb), "context": int(pc),
                                          "fused": model.projections_fused(), "kernels": rows[:40]})
                print(f"[{elapsed():6.1f}s] profile {name} B={pb} ctx={pc}: "
                      f"{sum(r['us_per_step'] for r in rows):.0f} us of kernels per step, "
                      f"{sum(r['calls_per_step'] for r in rows):.0f} launches")
                for r in rows[:15]:
                    print(f"    {r['us_per_step']:8.1f} us  {r['calls_per_step']:6.1f}x  {r['kernel']}")
            save()
        model = None
        free_memory(device)
    save()
    print(f"wrote {out} in {elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
