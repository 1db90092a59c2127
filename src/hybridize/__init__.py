"""hybridize: turn a pretrained Transformer into a fast attention / linear-RNN hybrid, and run it fast.

    import hybridize as hz
    model = hz.load("path/to/hf-or-hybridize-checkpoint")   # or a preset name, e.g. "mil50-tiny"
"""
from hybridize.api import CheckpointError, load  # noqa: F401
from hybridize.config import ConfigError, HybridConfig, preset  # noqa: F401
from hybridize.hf import HybridLMConfig, register_auto_classes  # noqa: F401
from hybridize.model import HybridCache, HybridLM  # noqa: F401

register_auto_classes()

from hybridize.convert import convert  # noqa: E402,F401
from hybridize.generate import generate  # noqa: E402,F401  (the function; shadows the subpackage name)

__version__ = "0.1.0"
