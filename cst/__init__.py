"""cst: Configurable Safety Tuning of language models, with a C/OpenMP core.

Importing cst loads only NumPy and the native extension; torch and transformers are never imported.
Submodules (cst.data, cst.eval, cst.judges, ...) load on first use.
"""
import importlib
import os

# libgomp's default spin-waiting (300,000 spins) makes each of the many short parallel regions of
# token-by-token generation cost a whole scheduler slice when other processes share the cores (15-20x
# slower decoding, measured). Pure passive waiting (a futex sleep and wake per region) cost 25-35% of a
# decoding step on free cores instead. 3,000 spins, then sleep, measured better than both on free and
# on busy cores (docs/benchmarks.md). An explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins. Read by
# libgomp when the extension loads, hence before the import below.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "3000"

from . import _core  # noqa: E402
from . import _aliases  # noqa: E402,F401  (cst.trainer, cst.judges, ...: the modules' old names)
from .core.config import ModelConfig  # noqa: E402
from .core.model import Model  # noqa: E402
from . import io  # noqa: E402,F401  (installs Model.save's writer; light: the formats load on first use)
from .core.runtime import get_num_threads, set_num_threads, simd_path  # noqa: E402

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
