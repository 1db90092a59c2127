"""CPU probe of two paper claims on a tiny teacher (seconds): attention-weight initialisation vs random
(Mamba-in-the-Llama) and MOHAWK stages 1+2 before 3 vs stage 3 alone at equal steps.

    python benchmarks/cpu_init_ablation.py        # prints held-out KL(teacher‖student) per variant

The teacher is the 4-layer model of tests/test_stages.py trained on a sparse Markov language; the real
study (issue 3 §6) needs a GPU-trained teacher."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_stages import make_teacher, markov_batches, tcfg  # noqa: E402

from hybridize.convert import convert  # noqa: E402
from hybridize.distill.stages import StageConfig, evaluate_lm, run_stage  # noqa: E402
from hybridize.distill.trainer import Trainer, lm_loss_fn  # noqa: E402

torch.set_num_threads(1)
teacher = make_teacher(std=0.02)
Trainer(teacher, iter(markov_batches(60, seed=1)), lm_loss_fn, tcfg(60)).train()
teacher.eval()
held = markov_batches(2, seed=99)
out = {"init": [], "mohawk": []}
for seed in (0, 1):
    row = {"seed": seed}
    for name, kw in (("attention", {}), ("attention+identity_conv", {"conv_init": "identity"}),
                     ("random", {"init": "random"})):
        s = convert(teacher, "mamba2", attention_fraction=0.5, seed=seed, **kw)
        run_stage(StageConfig(kind="kl", train=tcfg(20)), s, teacher, iter(markov_batches(20, seed=2)))
        row[name] = evaluate_lm(s, held, teacher)["kl"]
    out["init"].append(row)
    s = convert(teacher, "discrete_mamba2", attention_fraction=0.5, seed=seed)
    for kind, bseed in (("mohawk1", 3), ("mohawk2", 4), ("mohawk3", 5)):
        run_stage(StageConfig(kind=kind, train=tcfg(10)), s, teacher, iter(markov_batches(10, seed=bseed)))
    s3 = convert(teacher, "discrete_mamba2", attention_fraction=0.5, seed=seed)
    run_stage(StageConfig(kind="mohawk3", train=tcfg(30)), s3, teacher, iter(markov_batches(30, seed=5)))
    out["mohawk"].append({"seed": seed, "stages_1_2_3": evaluate_lm(s, held, teacher)["kl"],
                          "stage_3_only": evaluate_lm(s3, held, teacher)["kl"]})
print(json.dumps(out, indent=1))
