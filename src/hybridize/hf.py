"""transformers glue: the PretrainedConfig that wraps a HybridConfig, and Auto* registration.

After `import hybridize`, `AutoConfig` / `AutoModelForCausalLM.from_pretrained(dir)` load hybridize
checkpoints (model_type "hybridize") without trust_remote_code.
"""
from __future__ import annotations

from typing import Optional, Union

from transformers import PretrainedConfig

from hybridize.config import HybridConfig

MODEL_TYPE = "hybridize"


class HybridLMConfig(PretrainedConfig):
    """HF-side config. The typed source of truth is `self.hybrid` (a HybridConfig as a dict);
    the top-level fields mirror what transformers' utilities look for (vocab_size, hidden_size, …)."""

    model_type = MODEL_TYPE

    def __init__(self, hybrid: Optional[Union[dict, HybridConfig]] = None, **kwargs):
        if isinstance(hybrid, HybridConfig):
            hcfg = hybrid.validate()
        elif hybrid is None:
            hcfg = HybridConfig().validate()
        else:
            hcfg = HybridConfig.from_dict(hybrid)
        self.hybrid = hcfg.to_dict()
        self.vocab_size = hcfg.vocab_size
        self.hidden_size = hcfg.hidden_size
        self.num_hidden_layers = hcfg.num_layers
        self.layer_pattern = list(hcfg.layer_pattern)
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "layer_pattern"):
            kwargs.pop(k, None)
        kwargs.setdefault("tie_word_embeddings", hcfg.tie_embeddings)
        kwargs.setdefault("bos_token_id", hcfg.bos_token_id)
        kwargs.setdefault("eos_token_id", hcfg.eos_token_id)
        kwargs.setdefault("pad_token_id", hcfg.pad_token_id)
        # HF's generate() must not build a KV cache of its own: it runs our slow full-recompute path.
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)

    @property
    def typed(self) -> HybridConfig:
        """The typed HybridConfig."""
        return HybridConfig.from_dict(self.hybrid)


_registered = False


def register_auto_classes() -> None:
    """Register HybridLMConfig / HybridLM with transformers' Auto classes (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from hybridize.model import HybridLM

    AutoConfig.register(MODEL_TYPE, HybridLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(HybridLMConfig, HybridLM, exist_ok=True)
    AutoModel.register(HybridLMConfig, HybridLM, exist_ok=True)
    _registered = True
