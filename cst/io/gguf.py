"""GGUF (llama.cpp) files <-> cst.Model: reads "llama" (Llama, Mistral, SOLAR) and "qwen2" files with gguf.GGUFReader after a
bounded structural check, dequantises with cst._core, un-permutes Q/K rows; writes F32/F16/BF16 files with
gguf.GGUFWriter. Not a general GGUF tool: other architectures and quantised export are out of scope."""
import os
import struct

import numpy as np

from .. import _core
from ..core.bf16 import staged, to_bf16
from ..core.config import ModelConfig
from ..core.errors import FormatError
from ..core.model import GLOBAL_TENSORS, LAYER_TENSORS, Model, gguf_names, param_layout

# GGUF value types and their fixed sizes (None: string, array).
_VT_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_VT_STRING, _VT_ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


def _ggml_sizes():
    from gguf import GGML_QUANT_SIZES
    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


class _Walker:
    """Bounds-checked little-endian reads of the file's header through ordinary reads (not a memory
    map: a file truncated meanwhile gives a short read, not SIGBUS); every failure is a FormatError.
    need() only checks a size against the file; data skipped over is never read."""

    _WINDOW = 1 << 20

    def __init__(self, fd, size, path):
        self.fd, self.path, self.off, self.size = fd, path, 0, size
        self.win_start, self.win = 0, b""

    def fail(self, what):
        raise FormatError(f"{self.path}: {what} (at byte {self.off} of {self.size})")

    def need(self, n, what):
        if n < 0 or self.off + n > self.size:
            self.fail(f"truncated: {what} needs {n} bytes")

    def read(self, n, what):
        self.need(n, what)
        a = self.off - self.win_start
        if a < 0 or a + n > len(self.win):
            self.win_start, self.win = self.off, os.pread(self.fd, max(n, self._WINDOW), self.off)
            a = 0
            if len(self.win) < n:
                self.fail(f"the file shrank while being read ({what})")
        self.off += n
        return self.win[a:a + n]

    def u32(self, what):
        return struct.unpack("<I", self.read(4, what))[0]

    def u64(self, what):
        return struct.unpack("<Q", self.read(8, what))[0]

    def string(self, what, decode=False):
        n = self.u64(what + " length")
        if not decode:
            self.need(n, what)
            self.off += n
            return None
        if n > 1 << 16:  # keys and tensor names are short; no need to read a damaged length's worth
            self.fail(f"{what} is {n} bytes long (at most 65536)")
        try:
            return self.read(n, what).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def value(self, vtype, what, depth=0):
        if vtype in _VT_SIZE:
            return self.read(_VT_SIZE[vtype], what)
        if vtype == _VT_STRING:
            return self.string(what)
        if vtype == _VT_ARRAY:
            if depth > 2:
                self.fail(f"{what}: arrays nested too deeply")
            itype = self.u32(what + " item type")
            count = self.u64(what + " item count")
            if itype in _VT_SIZE:
                self.need(count * _VT_SIZE[itype], f"{what} ({count} items)")
                self.off += count * _VT_SIZE[itype]
                return None
            if itype not in (_VT_STRING, _VT_ARRAY):
                self.fail(f"{what}: unknown array item type {itype}")
            # Each string or array item occupies at least 8 (or 12) bytes: bound the loop by the file.
            if count * (8 if itype == _VT_STRING else 12) > self.size - self.off:
                self.fail(f"{what}: declares {count} items, more than the file can hold")
            for _ in range(count):
                self.value(itype, what, depth + 1)
            return None
        self.fail(f"{what}: unknown value type {vtype}")


def check_gguf(path):
    """Walks the whole GGUF structure with every count and size checked against the file size, so that
    the reader after it never loops on absurd counts or maps beyond the file. Raises FormatError."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise FileNotFoundError(f"{path}: {e.strerror}") from None
    if size < 24:
        raise FormatError(f"{path}: too small to be a GGUF file ({size} bytes)")
    with open(path, "rb") as f:
        info = _walk(_Walker(f.fileno(), size, path))
    info["size"] = size
    return info


def _walk(w):
    magic = w.read(4, "magic")
    if magic != b"GGUF":
        w.fail(f"bad magic {magic!r} (expected b'GGUF')")
    version = w.u32("version")
    if version not in (2, 3):
        w.fail(f"unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors = w.u64("tensor count")
    n_kv = w.u64("metadata count")
    if n_kv * 13 > w.size or n_tensors * 24 > w.size:
        w.fail(f"declares {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold")
    alignment = 32
    keys = set()
    for _ in range(n_kv):
        key = w.string("metadata key", decode=True)
        if key in keys:
            w.fail(f"duplicate metadata key {key!r}")
        keys.add(key)
        vtype = w.u32(f"type of {key!r}")
        v = w.value(vtype, f"value of {key!r}")
        if key == "general.alignment":
            if vtype != 4:
                w.fail("general.alignment must be a uint32")
            alignment = struct.unpack("<I", bytes(v))[0]
            if alignment == 0 or alignment & (alignment - 1):
                w.fail(f"general.alignment {alignment} is not a power of two")
    sizes = _ggml_sizes()
    infos, names = [], set()
    for _ in range(n_tensors):
        name = w.string("tensor name", decode=True)
        if name in names:
            w.fail(f"duplicate tensor {name!r}")
        names.add(name)
        n_dims = w.u32(f"rank of {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            w.fail(f"tensor {name!r} has {n_dims} dimensions (1..{_MAX_DIMS} allowed)")
        dims = [w.u64(f"shape of {name!r}") for _ in range(n_dims)]
        ttype = w.u32(f"type of {name!r}")
        offset = w.u64(f"offset of {name!r}")
        if ttype not in sizes:
            w.fail(f"tensor {name!r} has unknown ggml type {ttype}")
        block, tsize = sizes[ttype]
        n = 1
        for d in dims:
            n *= d
        if n == 0 or dims[0] % block:
            w.fail(f"tensor {name!r} has shape {dims}, not a whole number of {block}-value blocks")
        if offset % alignment:
            # The reader would take it at face value and load the bytes of a neighbour: refuse.
            w.fail(f"tensor {name!r} has data offset {offset}, not a multiple of the file's alignment {alignment}")
        infos.append((name, dims, ttype, offset, n // block * tsize))
    data_start = (w.off + alignment - 1) // alignment * alignment
    for name, dims, ttype, offset, nbytes in infos:
        if data_start + offset + nbytes > w.size:
            raise FormatError(f"{w.path}: tensor {name!r} ({nbytes} bytes at data offset {offset}) extends "
                              f"past the end of the file ({w.size} bytes): truncated or corrupt")
    return {"version": version, "n_tensors": n_tensors, "n_kv": n_kv, "data_start": data_start}


def _reader(path):
    """gguf.GGUFReader over a file check_gguf has walked. The reader memory-maps the file; a file cut
    short by another process while it is mapped would kill this one with SIGBUS, so the size is checked
    again just before mapping, and tensor data is read with ordinary reads (_tensor_bytes)."""
    size = check_gguf(path)["size"]
    import gguf
    try:
        if os.path.getsize(path) != size:
            raise FormatError(f"{path}: the file changed size while being checked (another process writing it?)")
        return gguf.GGUFReader(path)
    except (FormatError, MemoryError):
        raise
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError on damage we did not foresee
        raise FormatError(f"{path}: unreadable GGUF ({type(e).__name__}: {e})") from None


def _tensor_bytes(f, t, path):
    """The raw bytes of reader tensor t, read from file object f (not through the reader's map)."""
    buf = np.empty(int(t.n_bytes), dtype=np.uint8)
    f.seek(int(t.data_offset))
    got = f.readinto(memoryview(buf))
    if got != buf.size:
        raise FormatError(f"{path}: tensor {t.name!r} is truncated ({got} of {buf.size} bytes): the file "
                          "shrank while being read (another process writing it?)")
    return buf


def _field(reader, path, key, kind, default=None, required=False):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise FormatError(f"{path}: missing metadata key {key!r}")
        return default
    try:
        v = f.contents()
    except Exception as e:
        raise FormatError(f"{path}: metadata {key!r} is unreadable ({type(e).__name__}: {e})") from None
    ok = {
        "int": lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool),
        "float": lambda x: isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool),
        "str": lambda x: isinstance(x, str),
        "bool": lambda x: isinstance(x, (bool, np.bool_)),
        "list": lambda x: isinstance(x, list),
    }[kind]
    if not ok(v):
        raise FormatError(f"{path}: metadata {key!r} should be {kind}, got {type(v).__name__}")
    if kind == "int":
        return int(v)
    if kind == "float":
        return float(v)
    return v


def _permute(w, n_head):
    """llama.cpp's Q/K row order from Hugging Face's: interleaves the two halves of every head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name):
    """GGUF tensor name for a Hugging Face parameter name (from cst.model's one layout table)."""
    for _, hf, gg, _ in GLOBAL_TENSORS:
        if hf_name == hf:
            return gg
    parts = hf_name.split(".")  # model.layers.N.<module>.<proj>.weight
    if len(parts) > 3 and parts[:2] == ["model", "layers"]:
        rest = ".".join(parts[3:])
        for _, hf, gg, _ in LAYER_TENSORS:
            if rest == hf:
                return f"blk.{parts[2]}.{gg}"
    raise KeyError(f"gguf_name: no GGUF name for {hf_name!r}")


def _f32(x):
    """The shortest decimal of a float32 metadata value (GGUF's 1e-5 reads back as 9.9999997e-06)."""
    with np.errstate(over="ignore"):  # a damaged 1e300 becomes inf, which ModelConfig refuses
        return float(str(np.float32(x)))


# GGUF architectures cst reads. llama.cpp writes Llama 2/3, Mistral and SOLAR as "llama" (Q/K rows
# permuted for its interleaved RoPE) and Qwen2 as "qwen2" (NeoX RoPE: rows as in Hugging Face).
_ARCHS = ("llama", "qwen2")


def _config(reader, path, tensors):
    arch = _field(reader, path, "general.architecture", "str", required=True)
    if arch not in _ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (cst reads {_ARCHS})")
    a = arch + "."
    if "token_embd.weight" not in tensors:
        raise FormatError(f"{path}: no token_embd.weight tensor")
    emb = tensors["token_embd.weight"]
    dim = _field(reader, path, a + "embedding_length", "int", required=True)
    n_heads = _field(reader, path, a + "attention.head_count", "int", required=True)
    head_dim = _field(reader, path, a + "attention.key_length", "int")
    vlen = _field(reader, path, a + "attention.value_length", "int")
    if head_dim is not None and vlen is not None and vlen != head_dim:
        raise ValueError(f"{path}: {a}attention.value_length {vlen} differs from key_length {head_dim}; "
                         "not supported")
    if head_dim is None and n_heads > 0 and dim % n_heads == 0:
        head_dim = dim // n_heads
    scaling = _field(reader, path, a + "rope.scaling.type", "str", default="none")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear",
                        "factor": _f32(_field(reader, path, a + "rope.scaling.factor", "float", required=True))}
    elif scaling not in ("none", ""):
        raise ValueError(f"{path}: {a}rope.scaling.type {scaling!r} is not supported (none, linear)")
    if "rope_freqs.weight" in tensors:
        if rope_scaling is not None:
            raise ValueError(f"{path}: both rope.scaling.type {scaling!r} and rope_freqs.weight: not supported")
        t = tensors["rope_freqs.weight"]
        if int(t.tensor_type) != 0 or t.data.size * 2 != (head_dim or 0):
            raise FormatError(f"{path}: rope_freqs.weight must be F32 with head_dim / 2 values")
        rope_scaling = {"rope_type": "freq_factors", "factors": np.asarray(t.data, np.float32).tolist()}
    window = _field(reader, path, a + "attention.sliding_window", "int")
    try:
        cfg = ModelConfig(
            vocab_size=int(emb.shape[1]) if len(emb.shape) == 2 else -1,
            dim=dim,
            n_layers=_field(reader, path, a + "block_count", "int", required=True),
            n_heads=n_heads,
            n_kv_heads=_field(reader, path, a + "attention.head_count_kv", "int", default=n_heads),
            ffn_dim=_field(reader, path, a + "feed_forward_length", "int", required=True),
            max_seq_len=_field(reader, path, a + "context_length", "int", default=2048),
            rope_theta=_f32(_field(reader, path, a + "rope.freq_base", "float", default=10000.0)),
            norm_eps=_f32(_field(reader, path, a + "attention.layer_norm_rms_epsilon", "float", default=1e-5)),
            tie_embeddings="output.weight" not in tensors,
            head_dim=head_dim, attention_bias="blk.0.attn_q.bias" in tensors, rope_scaling=rope_scaling,
            sliding_window=window or None,
            arch="qwen2" if arch == "qwen2" else "mistral" if window else "llama",
        )
    except ValueError as e:
        raise FormatError(f"{path}: inconsistent hyper-parameters: {e}") from None
    if cfg.n_layers * 9 > len(tensors):  # bounds the layout built from it before any shape check
        raise FormatError(f"{path}: block_count {cfg.n_layers} needs {cfg.n_layers * 9} tensors, "
                          f"the file has {len(tensors)}")
    v = _field(reader, path, a + "rope.dimension_count", "int")
    if v is not None and v != cfg.head_dim:
        raise ValueError(f"{path}: {a}rope.dimension_count = {v} differs from the head size {cfg.head_dim} "
                         "(partial rotary embeddings are not supported)")
    return cfg


def _permuted(cfg):
    """n_head per HF name whose rows llama.cpp permutes (q and k of the "llama" architecture)."""
    if cfg.arch == "qwen2":
        return {}
    out = {}
    for i in range(cfg.n_layers):
        out[f"model.layers.{i}.self_attn.q_proj.weight"] = cfg.n_heads
        out[f"model.layers.{i}.self_attn.k_proj.weight"] = cfg.n_kv_heads
    return out


def _tokenizer(reader, path):
    from .tokenizer import Tokenizer
    t = "tokenizer.ggml."
    model = _field(reader, path, t + "model", "str")
    if model is None:
        return None
    tokens = _field(reader, path, t + "tokens", "list", required=True)
    try:
        return Tokenizer.from_gguf_fields(
            tokens, _field(reader, path, t + "token_type", "list"), _field(reader, path, t + "merges", "list"),
            model=model, pre=_field(reader, path, t + "pre", "str"),
            bos_token_id=_field(reader, path, t + "bos_token_id", "int"),
            eos_token_id=_field(reader, path, t + "eos_token_id", "int"),
            pad_token_id=_field(reader, path, t + "padding_token_id", "int"),
            unk_token_id=_field(reader, path, t + "unknown_token_id", "int"),
            chat_template=_field(reader, path, "tokenizer.chat_template", "str"),
            scores=_field(reader, path, t + "scores", "list"))
    except FormatError:
        raise
    except (ValueError, TypeError) as e:
        raise FormatError(f"{path}: bad tokenizer metadata: {e}") from None


def load_gguf_tokenizer(path):
    """Only the tokenizer of a GGUF file (None when it has none)."""
    path = os.fspath(path)
    return _tokenizer(_reader(path), path)


def load_gguf(path, with_tokenizer=True, dtype="f32"):
    """cst.Model from a Llama GGUF file, dequantised to float32, Q/K rows in Hugging Face order; the
    tokenizer (or None when the file has none) is attached as model.tokenizer. dtype "bf16": the matrices
    rounded to bf16 one tensor at a time (see cst.Model). dtype "q": a cst.quantized.QuantizedModel for
    inference that keeps Q4_0..Q8_0 and Q4_K/Q5_K/Q6_K matrices as blocks."""
    if dtype not in ("f32", "bf16", "q"):
        raise ValueError(f"load_gguf: dtype must be 'f32', 'bf16' or 'q', got {dtype!r}")
    path = os.fspath(path)
    reader = _reader(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = _config(reader, path, tensors)
    layout, names, permuted = param_layout(cfg), gguf_names(cfg), _permuted(cfg)
    extra = sorted(set(tensors) - set(names.values()) - {"rope_freqs.weight"})
    if extra:
        raise FormatError(f"{path}: unexpected tensors for this {cfg.arch} model: {extra[:5]}")
    # Every shape is checked against the metadata before the float32 buffer is allocated, so damaged
    # metadata cannot ask for a huge allocation.
    for name, shape in layout:
        gname = names[name]
        t = tensors.get(gname)
        if t is None:
            raise FormatError(f"{path}: missing tensor {gname!r}")
        got = tuple(int(d) for d in reversed(t.shape.tolist()))
        if got != tuple(shape):
            raise FormatError(f"{path}: tensor {gname!r} has shape {got}, expected {tuple(shape)} (from the metadata)")
    with open(path, "rb") as f:
        if dtype == "q":
            from .quantized import build

            def dequantize_into(dst, t, name):
                _load_into(dst, f, path, t, permuted.get(name))

            model = build(cfg, tensors, lambda t: _tensor_bytes(f, t, path), dequantize_into, permuted, path,
                          _unpermute, lambda: load_gguf(path))
        else:
            model = Model(cfg, init=False, dtype=dtype)  # the weights are read next: no random initialisation
            for name, shape in model.layout:
                with staged(model.params[name]) as dst:
                    _load_into(dst, f, path, tensors[names[name]], permuted.get(name))
    model.tokenizer = _tokenizer(reader, path) if with_tokenizer else None
    return model


def _load_into(dst, f, path, t, n_head):
    """Reads tensor t's blocks (with ordinary reads, checked against the file's size) into the float32
    array dst, dequantised, with llama.cpp's Q/K row permutation undone when n_head is not None."""
    raw = _tensor_bytes(f, t, path)
    try:
        if n_head is None:
            _core.dequantize(dst, raw, int(t.tensor_type))
        else:
            tmp = np.empty(dst.shape, dtype=np.float32)
            _core.dequantize(tmp, raw, int(t.tensor_type))
            dst[...] = _unpermute(tmp, n_head)
    except ValueError as e:
        kind = getattr(t.tensor_type, "name", None)
        raise FormatError(f"{path}: tensor {t.name!r}{f' ({kind})' if kind else ''}: {e}") from None


# save_gguf's dtypes and llama.cpp's file type id for each (general.file_type); those starting with "q"
# are block types, the GGMLQuantizationType of the same name in upper case.
SAVE_DTYPES = {"f32": 0, "f16": 1, "bf16": 32, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9}


def save_gguf(model, tokenizer, path, dtype="f32"):
    """Writes model (and tokenizer, when not None) as a "llama" GGUF ("qwen2" for Qwen2). dtype "f32",
    "f16" or "bf16" (rounded to nearest even) for 2-D weights, or a block type: "q8_0", "q4_0", "q4_1",
    "q5_0" or "q5_1", quantised by the gguf library; the blocks are byte for byte those of llama.cpp's
    llama_model_quantize on the f32 file. As there, the output matrix (the LM head, or the embedding when
    tied) of the 4- and 5-bit types is Q8_0 (llama.cpp would take Q6_K where rows are whole 256-value
    blocks, which the gguf library cannot write). A matrix whose rows are not whole 32-value blocks is
    written in f32. Norms and biases stay f32 as llama.cpp expects. Written to a temp file, then renamed
    into place."""
    import gguf
    from ..core.atomic import atomic_path
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save_gguf: dtype must be one of {', '.join(map(repr, SAVE_DTYPES))}, got {dtype!r}")
    block = getattr(gguf.GGMLQuantizationType, dtype.upper()) if dtype.startswith("q") else None
    cfg = model.config
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        if cfg.attention_bias and cfg.arch != "qwen2":
            raise ValueError(f"save_gguf: attention_bias on arch {cfg.arch!r}: only qwen2 has q/k/v biases")
        w = gguf.GGUFWriter(tmp, "qwen2" if cfg.arch == "qwen2" else "llama")
        w.add_name("cst model")
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.ffn_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        rs = cfg.rope_scaling
        if rs is not None and rs["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rs["factor"]))
        elif rs is not None:  # llama3 and freq_factors: per-frequency divisors, as llama.cpp's converter
            from ..core.ops import llama3_freq_factors
            factors = (llama3_freq_factors(cfg.head_dim, cfg.rope_theta, rs) if rs["rope_type"] == "llama3"
                       else np.asarray(rs["factors"], np.float32))
            w.add_tensor("rope_freqs.weight", np.ascontiguousarray(factors, np.float32))
        if cfg.sliding_window is not None:
            w.add_sliding_window(cfg.sliding_window)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(SAVE_DTYPES[dtype])  # llama.cpp's ALL_F32, MOSTLY_F16, MOSTLY_BF16, MOSTLY_Q8_0, ...
        if block is not None:  # required by the GGUF spec where tensors are quantised; llama.cpp writes 2
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer is not None:
            f = tokenizer.gguf_fields()
            w.add_tokenizer_model(f["model"])
            w.add_tokenizer_pre("gpt-2" if f["pre"] == "gpt2" else f["pre"])  # llama.cpp's name for GPT-2's regex
            w.add_token_list(f["tokens"])
            w.add_token_types(f["token_types"])
            if f["scores"] is not None:
                w.add_token_scores(f["scores"])
            w.add_token_merges(f["merges"])
            for key, adder in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                               ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
                if f[key] is not None:
                    adder(int(f[key]))
            w.add_add_bos_token(False)
            if f["chat_template"]:
                w.add_chat_template(f["chat_template"])
        names, permuted = gguf_names(cfg), _permuted(cfg)
        output = "token_embd.weight" if cfg.tie_embeddings else "output.weight"  # the LM head's matrix
        for name, _ in model.layout:
            a = model.params[name]
            if name in permuted:
                a = _permute(a, permuted[name])
            if dtype == "bf16" and a.ndim == 2:
                w.add_tensor(names[name], to_bf16(a), raw_dtype=gguf.GGMLQuantizationType.BF16)
                continue
            if block is not None and a.ndim == 2 and a.shape[1] % gguf.GGML_QUANT_SIZES[block][0] == 0:
                bt = gguf.GGMLQuantizationType.Q8_0 if names[name] == output else block
                w.add_tensor(names[name], gguf.quants.quantize(np.ascontiguousarray(a, np.float32), bt), raw_dtype=bt)
                continue
            a = np.ascontiguousarray(a, dtype=np.float16 if (dtype == "f16" and a.ndim == 2) else np.float32)
            w.add_tensor(names[name], a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def save_gguf_lora(lora, path, dtype="f32"):
    """Writes LoRA adapters as a llama.cpp GGUF LoRA adapter (general.type "adapter", adapter.type "lora",
    adapter.lora.alpha), which llama.cpp applies at run time on the base model's GGUF (`--lora FILE`,
    llama_adapter_lora_init). Tensors blk.N.<name>.weight.lora_a hold A (R, in) and .lora_b hold B
    (out, R), i.e. ggml shapes [in, R] and [R, out], as llama.cpp checks them; llama.cpp scales by
    alpha / R like PEFT. B of q/k gets the Q/K row permutation of the base weights (the permuted
    weight W + s B A is W_p + s B_p A). dtype "f32" or "f16". Written atomically."""
    import gguf
    from ..core.atomic import atomic_path
    if dtype not in ("f32", "f16"):
        raise ValueError(f"save_gguf_lora: dtype must be 'f32' or 'f16', got {dtype!r}")
    cfg = lora.model.config
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_type("adapter")
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora.alpha))
        w.add_file_type(0 if dtype == "f32" else 1)
        for name, arr in lora.params.items():
            # base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight
            module, ab = name[len("base_model.model."):].rsplit(".lora_", 1)
            module_name = gguf_name(module + ".weight")
            a = arr
            if ab == "B.weight" and module.endswith("q_proj"):
                a = _permute(a, cfg.n_heads)
            elif ab == "B.weight" and module.endswith("k_proj"):
                a = _permute(a, cfg.n_kv_heads)
            a = np.ascontiguousarray(a, dtype=np.float16 if dtype == "f16" else np.float32)
            w.add_tensor(module_name + (".lora_a" if ab == "A.weight" else ".lora_b"), a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
