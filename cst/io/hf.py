"""Hugging Face Llama checkpoint directories <-> cst.Model: config.json, model.safetensors (single or
sharded, F32/F16/BF16 read by a size-checked reader of our own, so NumPy suffices and bfloat16 needs no
torch), tokenizer files. Writing uses the safetensors library. Llama, Mistral and Qwen2 (see config_from_hf)."""
import json
import os
import struct

import numpy as np

from .. import _core
from ..core.bf16 import staged
from ..core.config import ModelConfig
from ..core.errors import FormatError
from ..core.model import Model, param_layout

_ST_DTYPES = {"F32": (4, 0), "F16": (2, 1), "BF16": (2, 30)}  # itemsize, ggml type for _core.dequantize
_MAX_HEADER = 100 * 1024 * 1024
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_safetensors_header(path):
    """{name: (dtype, shape, start, end)} with absolute byte ranges, every size checked against the
    file. Raises FormatError naming the file on any inconsistency."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: too small to be a safetensors file ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, _MAX_HEADER):
            raise FormatError(f"{path}: header length {n} exceeds the file ({size} bytes): corrupt or truncated")
        raw = f.read(n)
    header = _json_object(raw, path, "header ")
    data_start, data_size = 8 + n, size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise FormatError(f"{path}: entry {name!r} is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise FormatError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                   for o in offs)):
            raise FormatError(f"{path}: tensor {name!r} has invalid data_offsets {offs!r}")
        b, e = offs
        if not 0 <= b <= e <= data_size:
            raise FormatError(f"{path}: tensor {name!r} bytes [{b}, {e}) lie outside the data section "
                              f"({data_size} bytes): corrupt or truncated")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has dtype {dtype!r} (supported: F32, F16, BF16)")
        count = 1
        for d in shape:
            count *= d
        if count * _ST_DTYPES[dtype][0] != e - b:
            raise FormatError(f"{path}: tensor {name!r} of shape {shape} {dtype} needs "
                              f"{count * _ST_DTYPES[dtype][0]} bytes, but its offsets span {e - b}")
        out[name] = (dtype, tuple(shape), data_start + b, data_start + e)
    return out


def _read_into(path, f, entry, dst, name):
    dtype, _, b, e = entry
    f.seek(b)
    itemsize, ggml_type = _ST_DTYPES[dtype]
    if dtype == "F32":
        buf = dst.reshape(-1).view(np.uint8)
    else:
        buf = np.empty(e - b, dtype=np.uint8)
    got = f.readinto(memoryview(buf))
    if got != e - b:
        raise FormatError(f"{path}: tensor {name!r} is truncated ({got} of {e - b} bytes)")
    if dtype != "F32":
        _core.dequantize(dst.reshape(-1), buf, ggml_type)


def _json_object(text, path, what=""):
    """The JSON object in `text` (str or UTF-8 bytes) of file `path`; FormatError naming the file (and
    `what` part of it) when it is not valid JSON, nested too deeply, or not an object."""
    try:
        d = json.loads(text)
    except ValueError as e:  # UnicodeDecodeError included
        raise FormatError(f"{path}: {what}not valid JSON ({e})") from None
    except RecursionError:
        raise FormatError(f"{path}: {what}JSON nested too deeply") from None
    if not isinstance(d, dict):
        raise FormatError(f"{path}: {what}is not a JSON object")
    return d


def _load_json(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    return _json_object(raw, path)


# model_type -> the class name transformers writes in "architectures".
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Fields whose presence (with a value other than these) means a model cst would compute wrongly.
_REFUSED = {"mlp_bias": (None, False), "quantization_config": (None,), "pretraining_tp": (None, 1),
            "attention_dropout": (None, 0, 0.0), "rope_local_base_freq": (None,)}


def _typed(d, key, kind, path):
    """d[key] when it is absent, null or a `kind`; else FormatError naming the file and the key."""
    v = d.get(key)
    if v is not None and not isinstance(v, kind):
        raise FormatError(f"{path}: {key!r} must be {'an object' if kind is dict else 'a list'} or null, "
                          f"got {type(v).__name__} {v!r:.60}")
    return v


def config_from_hf(d, path="config.json"):
    """ModelConfig from a Hugging Face config.json dict: Llama (2, 3.x, SOLAR), Mistral or Qwen2/2.5.
    Anything cst does not compute (other architectures, RoPE types, biases, activations) raises an
    error naming the field; a field of the wrong JSON type raises FormatError naming it."""
    kind = d.get("model_type")
    archs = _typed(d, "architectures", list, path) or []
    if not all(isinstance(a, str) for a in archs):
        raise FormatError(f"{path}: 'architectures' must be a list of strings, got {archs!r:.60}")
    if not isinstance(kind, str) or kind not in _HF_CLASSES or (archs and _HF_CLASSES[kind] not in archs):
        raise ValueError(f"{path}: model_type {kind!r} / architectures {archs} is not supported (cst loads "
                         f"{', '.join(_HF_CLASSES.values())})")
    for key, ok in _REFUSED.items():
        if d.get(key) not in ok:
            raise ValueError(f"{path}: {key} = {d.get(key)!r} is not supported")
    for key in ("rope_parameters", "rope_scaling"):
        _typed(d, key, dict, path)
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {d.get('hidden_act')!r} is not supported (only silu)")
    # transformers 5 writes rope_parameters (with rope_theta inside); older files rope_scaling + rope_theta.
    rope = dict(d.get("rope_parameters") or {})
    rope.update(d.get("rope_scaling") or {})
    rtype = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rtype not in (None, "default"):
        if rtype not in ("linear", "llama3"):
            raise ValueError(f"{path}: rope_scaling rope_type {rtype!r} is not supported (default, linear, llama3)")
        scaling = {k: v for k, v in rope.items() if k not in ("type", "rope_theta")}
        scaling["rope_type"] = rtype
        if rtype == "llama3" and "original_max_position_embeddings" not in scaling:
            scaling["original_max_position_embeddings"] = d.get("original_max_position_embeddings")
        extra = sorted(set(scaling) - {"rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings"})
        if extra:
            raise ValueError(f"{path}: rope_scaling fields {extra} are not supported")
    if kind == "qwen2":
        bias = True  # Qwen2 always has q/k/v biases (and none on o_proj)
    else:
        bias = bool(d.get("attention_bias"))
        if bias:
            raise ValueError(f"{path}: attention_bias = true on {kind!r} (biases on q, k, v and o_proj) is not "
                             "supported; cst computes q/k/v biases only, as in Qwen2")
    window = d.get("sliding_window")
    if kind == "qwen2" and not d.get("use_sliding_window"):
        window = None
    if kind == "llama":
        window = None
    try:
        cfg = ModelConfig(
            vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            ffn_dim=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 2048),
            rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            head_dim=d.get("head_dim"), attention_bias=bias, rope_scaling=scaling, sliding_window=window,
            arch=kind)
    except KeyError as e:
        raise FormatError(f"{path}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise FormatError(f"{path}: {e}") from None
    return cfg


def config_to_hf(cfg, tokenizer=None, dtype="float32"):
    if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] not in ("linear", "llama3"):
        raise ValueError(f"save_hf: rope_scaling {cfg.rope_scaling['rope_type']!r} (per-frequency factors "
                         "from a GGUF rope_freqs.weight) has no Hugging Face config equivalent")
    if cfg.attention_bias and cfg.arch != "qwen2":
        raise ValueError(f"save_hf: attention_bias on arch {cfg.arch!r}: only qwen2 has q/k/v biases alone")
    d = {
        "architectures": [_HF_CLASSES[cfg.arch]], "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype,
        "initializer_range": 0.02, "use_cache": True,
    }
    if cfg.arch == "llama":
        d.update(attention_bias=False, mlp_bias=False)
    elif cfg.arch == "mistral":
        d.update(sliding_window=cfg.sliding_window)
    else:
        d.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                 max_window_layers=0 if cfg.sliding_window is not None else cfg.n_layers)
    if tokenizer is not None:
        d.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    return d


def _weight_files(path):
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return {None: single}
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found "
                                "(only safetensors checkpoints are supported)")
    wm = _load_json(index).get("weight_map")
    if not isinstance(wm, dict):
        raise FormatError(f"{index}: no weight_map object")
    files = {}
    for name, fname in wm.items():
        if not isinstance(fname, str) or os.path.basename(fname) != fname:
            raise FormatError(f"{index}: weight_map entry {name!r} -> {fname!r} is not a file in the directory")
        files[name] = os.path.join(path, fname)
    return files


def load_hf(path, with_tokenizer=True, dtype="f32"):
    """cst.Model from a Hugging Face Llama directory; model.tokenizer is set from tokenizer.json when
    present, else None. dtype "bf16": the matrices rounded to bf16 one tensor at a time (cst.Model)."""
    if dtype not in ("f32", "bf16"):
        raise ValueError(f"load_hf: dtype must be 'f32' or 'bf16', got {dtype!r}")
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    cfg = config_from_hf(_load_json(cfg_path), cfg_path)
    files = _weight_files(path)
    # name -> (file, header entry), over all shards
    headers, where = {}, {}
    for f in sorted(set(files.values())):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} not found (listed in model.safetensors.index.json)")
        headers[f] = read_safetensors_header(f)
        for name, entry in headers[f].items():
            if name in where:
                raise FormatError(f"{f}: tensor {name!r} also appears in {where[name][0]}")
            where[name] = (f, entry)
    if cfg.n_layers * 9 > len(where):  # bounds the layout built from it (9: a layer's fewest tensors)
        raise FormatError(f"{cfg_path}: num_hidden_layers {cfg.n_layers} needs {cfg.n_layers * 9} tensors, "
                          f"the checkpoint has {len(where)}")
    layout = param_layout(cfg)
    wanted = {n for n, _ in layout}
    extra = sorted(n for n in where if n not in wanted and not n.endswith(_IGNORED_SUFFIXES)
                   and not (n == "lm_head.weight" and cfg.tie_embeddings))
    if extra:
        raise FormatError(f"{path}: unexpected tensors for this config: {extra[:5]}")
    # Shapes are checked before the float32 buffer is allocated: a damaged config.json cannot ask for
    # a huge allocation.
    for name, shape in layout:
        if name not in where:
            raise FormatError(f"{path}: tensor {name!r} missing from the safetensors file(s)")
        f, entry = where[name]
        if entry[1] != tuple(shape):
            raise FormatError(f"{f}: tensor {name!r} has shape {entry[1]}, expected {tuple(shape)} "
                              f"from {cfg_path}")
    model = Model(cfg, init=False, dtype=dtype)  # the weights are read next: no random initialisation
    handles = {}
    try:
        for name, shape in model.layout:
            f, entry = where[name]
            if f not in handles:
                handles[f] = open(f, "rb")
            with staged(model.params[name]) as dst:
                _read_into(f, handles[f], entry, dst, name)
    finally:
        for h in handles.values():
            h.close()
    model.tokenizer = None
    if with_tokenizer and os.path.isfile(os.path.join(path, "tokenizer.json")):
        from .tokenizer import Tokenizer
        model.tokenizer = Tokenizer.from_hf_dir(path)
    return model


def save_hf(model, tokenizer, path, dtype="float32"):
    """Writes config.json, generation_config.json, model.safetensors (float32 or float16) and, when a
    tokenizer is given, tokenizer.json + tokenizer_config.json, into directory path (atomically)."""
    from safetensors.numpy import save_file
    from ..core.atomic import atomic_dir
    if dtype not in ("float32", "float16"):
        raise ValueError(f"save_hf: dtype must be 'float32' or 'float16', got {dtype!r}")
    np_dtype = np.float32 if dtype == "float32" else np.float16
    cfg = model.config
    with atomic_dir(path) as tmp:
        tensors = {name: np.ascontiguousarray(model.params[name], dtype=np_dtype) for name, _ in model.layout}
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(cfg, tokenizer, dtype), f, indent=2)
        gen = {"_from_model_config": True}
        if tokenizer is not None:
            gen.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        if tokenizer is not None:
            for name, text in tokenizer.hf_files().items():
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(text)
    # A stale shard index next to the fresh single file would confuse loaders that prefer the index.
    stale = os.path.join(os.fspath(path), "model.safetensors.index.json")
    if os.path.exists(stale):
        os.remove(stale)
    return os.fspath(path)
