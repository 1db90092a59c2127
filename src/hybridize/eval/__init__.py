"""Evaluation: perplexity (sliding windows, per-position curves, length extrapolation), synthetic recall
and copy tasks (MQAR, selective copying, induction heads) with a training sweep, and an lm-eval-harness
adapter (`hybridize.eval.lm_eval_adapter`, optional: needs ``pip install lm-eval``).

    from hybridize.eval import perplexity, mqar, run_sweep
    r = perplexity(model, token_ids, seq_len=1024, stride=512)       # r["ppl"], r["per_position_loss"]
    batch = mqar(64, seq_len=256, num_kv_pairs=16, seed=0)            # {"input_ids", "labels"}

Plots live in `hybridize.eval.plots` (matplotlib) and are imported only when asked for.
"""
from hybridize.eval.perplexity import Window, bin_curve, extrapolation, perplexity, sliding_windows  # noqa: F401
from hybridize.eval.sweep import (  # noqa: F401
    MIXERS, MixerSpec, best_cells, format_table, parse_mixer, run_sweep, synthetic_config, train_cell,
)
from hybridize.eval.synthetic import (  # noqa: F401
    IGNORE_INDEX, MQAR_HARD_GRID, MQAR_STANDARD_GRID, TASKS, SyntheticStream, SyntheticTaskError,
    answer_accuracy, induction_heads, make_task, mqar, power_law_probs, selective_copying,
)
