"""Verify + commit of K tokens on a 1.2 B hybrid: Algorithm-2 (lazy fused SSD advance) vs recording T+1 states,
relative to one compiled decode step. Usage (GPU machine): python benchmarks/verify_timing.py mil50-1b 1 4096 4
(model, batch, context, K). Output: benchmarks/results/verify_algorithm2_h100.log."""
import sys, torch, hybridize as hz
from hybridize.model import HybridLM
from hybridize.generate.cache_ops import alloc_cache
from hybridize.generate.engine import StepRunner, prefill_
from hybridize.generate.speculative import Verifier
args = sys.argv[1:] + ["mil50-1b", "1", "4096", "4"][len(sys.argv) - 1:]
name, (B, ctx, K) = args[0], map(int, args[1:4])
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
m = HybridLM(hz.preset(name)).to(dev, torch.bfloat16 if dev == "cuda" else torch.float32).eval()
V = m.cfg.vocab_size
def ms(fn, reps=50):
    for _ in range(3): fn()
    if dev == "cuda":
        a, b = torch.cuda.Event(True), torch.cuda.Event(True); a.record()
        for _ in range(reps): fn()
        b.record(); b.synchronize(); return a.elapsed_time(b) / reps
    import time; t = time.perf_counter()
    for _ in range(reps): fn()
    return 1e3 * (time.perf_counter() - t) / reps
cache = alloc_cache(m, B, ctx + 4096, window_slack=K, device=dev)
run = StepRunner(m, cache, B)
vers = {lz: Verifier(m, cache, B, K, lazy_ssd=lz) for lz in (True, False)}
prefill_(m, cache, torch.randint(0, V, (B, ctx)).tolist())
tok = torch.randint(0, V, (B,), device=dev)
ids = torch.randint(0, V, (B, K), device=dev)
one = torch.ones(B, dtype=torch.long, device=dev)   # keep 1 token per round: steady-state rounds
step = ms(lambda: run(tok))
print(f"{name} B={B} ctx={ctx}: step {step:.3f} ms")
for lz, v in vers.items():
    r = ms(lambda: (v.verify(ids), v.commit(one)))
    print(f"  {'algorithm2' if lz else 'recording '} lazy_layers={len(v.lazy_layers)} verify+commit K={K}: "
          f"{r:.3f} ms = {r / step:.2f} steps; buffers {v.buffer_bytes()}")
