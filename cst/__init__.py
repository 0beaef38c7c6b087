"""cst: Configurable Safety Tuning of language models, with a C/OpenMP core.

Importing cst loads only NumPy and the native extension; torch and transformers are never imported.
"""
from . import _core
from .config import ModelConfig
from .model import Model
from .runtime import get_num_threads, set_num_threads, simd_path

__version__ = "0.1.0"

__all__ = ["Model", "ModelConfig", "get_num_threads", "set_num_threads", "simd_path", "__version__"]
