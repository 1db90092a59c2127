"""CPU probe (issue 6): how fast does Griffin learn selective copying, by depth and local-attention window?

    python benchmarks/cpu_copy_probe.py MIXER LAYERS WINDOW STEPS   # e.g. griffin 3 64 800 (~10-15 min)

Trains one width-128, mixer-only model on selective copying (L = 128, 8 data tokens, vocab 16), batch 32,
lr 3e-3, fp32 on the CPU (chunked reference scans), and prints the eval-accuracy curve (8 points)."""
import sys
import time

import torch

from hybridize.bench.synthetic import use_fast_scans
from hybridize.eval.sweep import train_cell

torch.set_num_threads(1)
use_fast_scans("cpu")
mixer, layers, window, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t = time.time()
r = train_cell("selective_copying", mixer, 128, 128, 3e-3, steps=steps, batch_size=32,
               task_kwargs=dict(num_data_tokens=8), eval_every=max(1, steps // 8), mlp_mult=0, device="cpu",
               dtype="fp32", eval_examples=128, num_layers=layers, window=window)
print(sys.argv[1:], [round(h["accuracy"], 2) for h in r["history"]], round(time.time() - t, 1), flush=True)
