"""cst: Configurable Safety Tuning of language models, with a C/OpenMP core.

Importing cst loads only NumPy and the native extension; torch and transformers are never imported.
Submodules (cst.data, cst.eval, cst.judges, ...) load on first use.
"""
import importlib
import os

# libgomp's default spin-waiting makes each of the many short parallel regions of token-by-token
# generation cost a whole scheduler slice when other processes share the cores (15-20x slower decoding,
# measured); passive waiting costs little when the cores are free. An explicit setting wins. Read by
# libgomp when the extension loads, hence before the import below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import _core  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .model import Model  # noqa: E402
from .runtime import get_num_threads, set_num_threads, simd_path  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "load": ("io", "load"), "save": ("io", "save"), "FormatError": ("errors", "FormatError"),
    "Tokenizer": ("tokenizer", "Tokenizer"), "LoRA": ("lora", "LoRA"), "Trainer": ("trainer", "Trainer"),
    "TrainingError": ("trainer", "TrainingError"), "DPOConfig": ("training_config", "DPOConfig"),
    "AdamW": ("optim", "AdamW"), "dpo_loss": ("losses", "dpo_loss"), "generate": ("generate", "generate"),
}
_SUBMODULES = {"data", "eval", "judges", "metrics", "synth", "prompts", "losses", "optim", "lora", "trainer",
               "generate", "io", "gguf", "hf", "tokenizer", "ops", "plots", "schedule", "training_config",
               "errors", "cli", "demo"}

__all__ = ["Model", "ModelConfig", "get_num_threads", "set_num_threads", "simd_path", "__version__",
           *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cst' has no attribute {name!r}")
