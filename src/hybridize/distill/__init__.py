"""Distillation: losses (KL, cross-entropy, DPO, MOHAWK) and the generic trainer."""
from hybridize.distill.losses import (  # noqa: F401
    chunked_cross_entropy, chunked_kl_div, cross_entropy_from_hidden, dpo_loss, dpo_metrics,
    hidden_state_alignment_loss, kl_div, kl_from_hidden, kl_mask_from_labels, matrix_orientation_loss,
    sequence_logprobs, token_logprobs,
)
from hybridize.distill.trainer import (  # noqa: F401
    TrainConfig, Trainer, TrainingError, add_train_arguments, latest_checkpoint, lm_loss_fn, lr_at,
    make_eval_fn, plot_metrics, train_config_from_args,
)
