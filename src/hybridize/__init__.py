"""hybridize: turn a pretrained Transformer into a fast attention / linear-RNN hybrid, and run it fast."""
from hybridize.config import HybridConfig, preset  # noqa: F401

__version__ = "0.1.0"
