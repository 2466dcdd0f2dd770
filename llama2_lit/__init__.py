"""llama2_lit: the Llama 2 recipe as a PyTorch Lightning course codebase."""

from llama2_lit.config import PRESETS, ModelConfig
from llama2_lit.model import KVCache, Transformer

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Transformer"]
__version__ = "0.1.0"
