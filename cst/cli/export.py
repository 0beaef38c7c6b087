"""`cst export`: a model (and a checkpoint merged into it) written as a Hugging Face directory or GGUF."""
import os

from ..io.gguf import SAVE_DTYPES
from .common import CliError, UsageError, _count, _model_from_args, _say


def _size(n_bytes):
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.1f} KiB"


# ---- export ----

_DTYPES = {"hf": {"float32": "float32", "f32": "float32", "float16": "float16", "f16": "float16"},
           "gguf-lora": {"float32": "f32", "f32": "f32", "float16": "f16", "f16": "f16"}}
_DTYPES["gguf"] = dict(_DTYPES["gguf-lora"], bfloat16="bf16", bf16="bf16",
                       **{q: q for q in SAVE_DTYPES if q.startswith("q")})  # the block types save_gguf writes


def _export_gguf_lora(args, dtype):
    """The LoRA adapters of a `cst train` checkpoint as a llama.cpp GGUF LoRA adapter."""
    from ..io.gguf import save_gguf_lora
    if not args.checkpoint:
        raise UsageError("--format gguf-lora needs --checkpoint (a LoRA run of `cst train`)")
    model = _model_from_args(args, need_tokenizer=False, merge=False)
    if model.adapter is None:
        raise CliError(f"--checkpoint {args.checkpoint}: a full fine-tuning checkpoint has no LoRA adapter; "
                       "use --format gguf")
    save_gguf_lora(model.adapter, args.output, dtype=dtype or "f32")
    print(f"wrote {args.output} (llama.cpp LoRA adapter, r={model.adapter.r}, alpha={model.adapter.alpha:g}, "
          f"{dtype or 'f32'}, {_size(os.path.getsize(args.output))}); apply it to the base model's GGUF, e.g. "
          f"llama-cli -m BASE.gguf --lora {args.output}")
    return 0


def cmd_export(args):
    dtype = None
    if args.dtype is not None:
        dtype = _DTYPES[args.format].get(args.dtype)
        if dtype is None:
            raise UsageError(f"--dtype: {args.dtype!r} is not available for --format {args.format}; "
                             f"use {' or '.join(sorted(set(_DTYPES[args.format].values())))}")
    if args.format == "gguf-lora":
        return _export_gguf_lora(args, dtype)
    out = os.path.abspath(args.output)
    if args.format == "gguf" and os.path.isdir(out):
        raise UsageError(f"OUTPUT {args.output}: is a directory; --format gguf writes one file (e.g. "
                         f"{os.path.join(args.output, 'model.gguf')})")
    if args.format == "hf" and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"OUTPUT {args.output}: is a file; --format hf writes a directory")
    model = _model_from_args(args, need_tokenizer=False)
    if model.tokenizer is None:
        _say("warning: the model has no tokenizer; the export will not have one either")
    model.save(args.output, format=args.format, dtype=dtype)
    size = 0
    if os.path.isdir(args.output):
        size = sum(os.path.getsize(os.path.join(args.output, n)) for n in os.listdir(args.output))
    elif os.path.isfile(args.output):
        size = os.path.getsize(args.output)
    print(f"wrote {args.output} ({args.format}, {dtype or 'float32'}, {_count(model.num_parameters)} parameters, "
          f"{_size(size)})")
    return 0
