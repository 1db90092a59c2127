"""Build a HybridLM from a local Hugging Face checkpoint directory.

IMPORTERS[model_type](path, raw_config_dict) → HybridLM with the checkpoint's weights;
CONFIG_CONVERTERS[model_type](raw_config_dict) → the equivalent HybridConfig (no weights).
"""
from hybridize.importers.llama import import_llama, llama_config
from hybridize.importers.mamba2 import import_mamba2, mamba2_config
from hybridize.importers.recurrent_gemma import import_recurrent_gemma, recurrent_gemma_config

IMPORTERS: dict = {"llama": import_llama, "mistral": import_llama, "qwen2": import_llama,
                   "mamba2": import_mamba2, "recurrent_gemma": import_recurrent_gemma}
CONFIG_CONVERTERS: dict = {"llama": llama_config, "mistral": llama_config, "qwen2": llama_config,
                           "mamba2": mamba2_config, "recurrent_gemma": recurrent_gemma_config}
