"""Text generation with a KV cache: batched prefill and decode run in C (cst._core.gen_forward); this
module only samples, tracks which sequences are finished, and stops them. Sampling follows Hugging
Face's semantics (repetition penalty, then temperature, top-k, top-p). Not a tokenizer or chat layer.
"""
import math
import numbers
import threading

import numpy as np

from .. import _core
from .config import ModelConfig
from .layout import gen_offsets, num_params
from .ops import rope_tables

# Prompt tokens fed per prefill call. Bounds the scratch (attention scores grow with chunk * maxT);
# longer prompts are prefilled in several calls with identical results.
PREFILL_CHUNK = 256

# From this many sequences on, generate() packs the weights once for the GEMM microkernel (gen_pack):
# every product then runs at GEMM speed instead of the dot-product path. One or two rows are bound by
# reading the weights either way, and packing (~0.05 s for SmolLM2) would not pay off.
PACK_MIN_BATCH = 3


class _PackBuffer:
    """One reusable buffer for packed weights (as large as the model's weights: 538 MB for SmolLM2): a
    fresh array costs up to ~1 s of page faults per call for SmolLM2 (0.08-1.05 s measured). A second
    concurrent generation gets its own array (freed after use). free_pack_buffer() gives the memory back."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buf = None

    def acquire(self, size: int):
        """-> (array of `size` floats, owned): pass both to release()."""
        if self._lock.acquire(blocking=False):
            if self._buf is None or self._buf.size < size:
                self._buf = None
                self._buf = np.empty(size, dtype=np.float32)
            return self._buf[:size], True
        return np.empty(size, dtype=np.float32), False

    def release(self, owned: bool) -> None:
        if owned:
            self._lock.release()

    def clear(self) -> None:
        """Frees the cached buffer (when no generation is using it)."""
        if self._lock.acquire(blocking=False):
            self._buf = None
            self._lock.release()


_pack_buffer = _PackBuffer()


def free_pack_buffer() -> None:
    """Frees the packed-weight buffer that generate() keeps between calls (unless a generation is using
    it); the next batched generate() allocates it again."""
    _pack_buffer.clear()


class KVCache:
    """Caches and scratch for one generation session of `batch_size` sequences of up to `max_len`
    positions, allocated once. `step` appends tokens and returns each active sequence's last logits."""

    def __init__(self, model, batch_size: int, max_len: int, max_chunk: int = PREFILL_CHUNK,
                 packed: np.ndarray | None = None):
        cfg = _check_model(model)
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KVCache: max_len {max_len} exceeds config.max_seq_len {cfg.max_seq_len}")
        if max_len > cfg.attention_window:
            raise ValueError(f"KVCache: max_len {max_len} exceeds config.sliding_window {cfg.sliding_window} "
                             "(cst attends to every cached position; exact only within the window)")
        self.model, self.config = model, cfg
        self.batch_size, self.max_len, self.max_chunk = batch_size, max_len, max_chunk
        kvd = cfg.n_kv_heads * cfg.head_dim
        # Unwritten positions are never read, so the caches need no zeroing.
        self.k = np.empty((cfg.n_layers, batch_size, max_len, kvd), dtype=np.float32)
        self.v = np.empty_like(self.k)
        self.scratch = np.empty(_core.gen_scratch_size(cfg, batch_size, max_chunk, max_len), dtype=np.float32)
        self.logits = np.zeros((batch_size, cfg.vocab_size), dtype=np.float32)
        self.rope_cos, self.rope_sin = rope_tables(max_len, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # A QuantizedModel (cst.quantized) brings its own layout and its GGUF blocks.
        self.layout = getattr(model, "gen_layout", None)
        if self.layout is None:
            self.layout = gen_offsets(cfg)
        self.quant = getattr(model, "gen_quant", None) or {}
        self.lengths = np.zeros(batch_size, dtype=np.int32)  # positions filled per sequence
        self.packed = packed  # optional: the weights packed by _core.gen_pack

    def step(self, tokens: np.ndarray, n_new: np.ndarray) -> np.ndarray:
        """Appends tokens[b, :n_new[b]] to sequence b (n_new[b] == 0 skips it; its logits row keeps
        its previous value). Returns the (B, V) logits array (a view reused by later steps)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        n_new = np.ascontiguousarray(n_new, dtype=np.int32)
        if tokens.shape[1] > self.max_chunk:
            raise ValueError(f"KVCache.step: {tokens.shape[1]} tokens per sequence exceeds max_chunk "
                             f"{self.max_chunk}")
        _core.gen_forward(self.config, self.model.flat_params, self.layout, tokens, self.lengths, n_new,
                          self.rope_cos, self.rope_sin, self.k, self.v, self.scratch, self.logits,
                          packed=self.packed, **self.quant)
        self.lengths += n_new
        return self.logits


def _check_model(model) -> ModelConfig:
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError("generate: model must have a .config that is a cst.ModelConfig")
    flat = getattr(model, "flat_params", None)
    if not isinstance(flat, np.ndarray) or flat.dtype != np.float32 or flat.ndim != 1:
        raise TypeError("generate: model.flat_params must be a 1-D float32 numpy array")
    if getattr(model, "gen_quant", None) is not None:  # quantised: gen_forward checks its own layout
        return cfg
    need = num_params(cfg)
    if flat.size != need:
        raise ValueError(f"generate: model.flat_params has {flat.size} floats, the config needs {need}")
    return cfg


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def apply_repetition_penalty(logits: np.ndarray, seen, penalty: float) -> np.ndarray:
    """HF's RepetitionPenaltyLogitsProcessor on one row: logits of tokens in `seen` are divided by
    `penalty` where > 0 and multiplied where < 0. Returns a new float64 array."""
    out = np.array(logits, dtype=np.float64)
    if penalty != 1.0 and len(seen):
        idx = np.unique(np.asarray(seen, dtype=np.int64))
        s = out[idx]
        out[idx] = np.where(s < 0, s * penalty, s / penalty)
    return out


def process_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """HF's temperature, top-k and top-p warpers, in that order, on one float64 row; removed tokens
    get -inf. top-k keeps ties with the k-th value; top-p keeps the smallest set of most likely tokens
    whose probability reaches top_p, and always at least one."""
    x = np.array(logits, dtype=np.float64) / temperature
    if top_k > 0 and top_k < x.size:
        kth = np.partition(x, x.size - top_k)[x.size - top_k]
        x[x < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(x, kind="stable")  # ascending, like HF's TopPLogitsWarper
        p = np.exp(x[order] - x[order[-1]])
        cum = np.cumsum(p / p.sum())
        remove = cum <= 1.0 - top_p
        remove[-1] = False
        x[order[remove]] = -np.inf
    return x


def _sample(x: np.ndarray, rng: np.random.Generator) -> int:
    p = np.exp(x - x.max())
    cum = np.cumsum(p)
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return min(i, x.size - 1)


def _validate(cfg, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_token_id,
              stop_strings, stream, tokenizer):
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("generate: prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        arr = np.asarray(p)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"generate: prompt {i} must be a non-empty list of token ids")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"generate: prompt {i} must hold integer token ids, got dtype {arr.dtype}")
        if arr.min() < 0 or arr.max() >= cfg.vocab_size:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {cfg.vocab_size})")
        out.append(arr.astype(np.int32))
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    longest = max(a.size for a in out)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"generate: prompt length {longest} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_seq_len {cfg.max_seq_len}")
    if longest + max_new_tokens > cfg.attention_window:
        raise ValueError(f"generate: prompt length {longest} + max_new_tokens {max_new_tokens} exceeds "
                         f"sliding_window {cfg.sliding_window} (cst attends to every position: exact only "
                         "within the window)")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"generate: temperature must be a finite number >= 0, got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"generate: top_k must be an int >= 0, got {top_k!r}")
    if not _is_real(top_p) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"generate: top_p must lie in (0, 1], got {top_p!r}")
    if (not _is_real(repetition_penalty) or not math.isfinite(repetition_penalty)
            or repetition_penalty <= 0):
        raise ValueError(f"generate: repetition_penalty must be a finite number > 0, got {repetition_penalty!r}")
    if eos_token_id is None:
        eos = set()
    else:
        ids = [eos_token_id] if _is_int(eos_token_id) else eos_token_id
        if not isinstance(ids, (list, tuple, set)) or not all(_is_int(e) for e in ids):
            raise ValueError(f"generate: eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
        if any(e < 0 or e >= cfg.vocab_size for e in ids):
            raise ValueError(f"generate: eos_token_id {eos_token_id!r} outside [0, {cfg.vocab_size})")
        eos = {int(e) for e in ids}
    stops = []
    if stop_strings is not None:
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not stops or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("generate: stop_strings must be a non-empty string or a list of them")
        if tokenizer is None:
            raise ValueError("generate: stop_strings needs tokenizer= (an object with .decode or a callable)")
    decode = None
    if tokenizer is not None:
        decode = tokenizer if callable(tokenizer) and not hasattr(tokenizer, "decode") else getattr(
            tokenizer, "decode", None)
        if not callable(decode):
            raise ValueError("generate: tokenizer must have a .decode(ids) method or be a callable")
    if stream is not None:
        if not callable(stream):
            raise ValueError("generate: stream must be a callable taking a token id")
        if len(out) != 1:
            raise ValueError("generate: stream= works with a single prompt only")
    return out, eos, stops, decode


def generate(model, prompts, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
             repetition_penalty=1.0, eos_token_id=None, stop_strings=None, seed=None, stream=None,
             tokenizer=None):
    """New token ids for each prompt (a list of token-id lists), generated with a KV cache.

    temperature 0 is greedy (top_k and top_p are then ignored, as in HF with do_sample=False);
    otherwise tokens are sampled from a numpy.random.Generator(seed), so a seed reproduces the output.
    repetition_penalty applies to every token seen so far (prompt and generated), before the others.
    A sequence stops after max_new_tokens, at an eos_token_id (the EOS token is INCLUDED in its output,
    as in HF), or once its decoded text contains one of stop_strings (the completing token included;
    needs tokenizer, an object with .decode(ids) or a callable). Prompts may differ in length: each
    sequence keeps its own positions, and finished ones stop costing compute. A cst.Model generates as
    Model.generate does: enabled LoRA adapters merged into float32 weights; without them, a bf16 model
    runs on its bf16 matrices (bf16 products, fp32 sums). stream(token_id) is
    called for every generated token, in order (one prompt only). Ctrl-C raises KeyboardInterrupt;
    all state is local to the call, so nothing is left half-updated.
    """
    view = getattr(model, "_generation_view", None)
    if view is not None:  # a cst.Model: enabled adapters merged in; a bf16 base read as bf16
        model = view()
    cfg = _check_model(model)
    prompts, eos, stops, decode = _validate(cfg, prompts, max_new_tokens, temperature, top_k, top_p,
                                            repetition_penalty, eos_token_id, stop_strings, stream, tokenizer)
    B = len(prompts)
    outputs = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return outputs
    rng = np.random.default_rng(seed)
    lens = np.array([p.size for p in prompts])
    longest = int(lens.max())
    chunk = min(longest, PREFILL_CHUNK)
    packed, owned = None, False
    if B >= PACK_MIN_BATCH and getattr(model, "gen_quant", None) is None:  # quantised weights: never packed
        packed, owned = _pack_buffer.acquire(_core.gen_packed_size(cfg))
    try:
        if packed is not None:
            _core.gen_pack(cfg, model.flat_params, gen_offsets(cfg), packed)
        cache = KVCache(model, B, longest + max_new_tokens, max_chunk=chunk, packed=packed)
        return _run(cache, prompts, outputs, lens, longest, chunk, max_new_tokens, temperature, top_k, top_p,
                    repetition_penalty, eos, stops, decode, stream, rng)
    finally:
        _pack_buffer.release(owned)


def _run(cache, prompts, outputs, lens, longest, chunk, max_new_tokens, temperature, top_k, top_p,
         repetition_penalty, eos, stops, decode, stream, rng):
    B = len(prompts)

    # Prefill in chunks; a sequence whose prompt is done gets n_new 0 and keeps its logits row.
    tokens = np.zeros((B, chunk), dtype=np.int32)
    for start in range(0, longest, chunk):
        n_new = np.clip(lens - start, 0, chunk).astype(np.int32)
        tokens[...] = 0
        for b in range(B):
            tokens[b, :n_new[b]] = prompts[b][start:start + n_new[b]]
        logits = cache.step(tokens, n_new)

    seen = [set(p.tolist()) for p in prompts] if repetition_penalty != 1.0 else None
    active = np.ones(B, dtype=bool)
    step_tok = np.zeros((B, 1), dtype=np.int32)
    for t in range(max_new_tokens):
        for b in np.flatnonzero(active):
            row = logits[b]
            if seen is not None:
                row = apply_repetition_penalty(row, list(seen[b]), repetition_penalty)
            if temperature == 0.0:
                tok = int(np.argmax(row))
            else:
                tok = _sample(process_logits(row, temperature, top_k, top_p), rng)
            outputs[b].append(tok)
            if seen is not None:
                seen[b].add(tok)
            if stream is not None:
                stream(tok)
            if tok in eos or (stops and any(s in decode(outputs[b]) for s in stops)):
                active[b] = False
            step_tok[b, 0] = tok
        if t == max_new_tokens - 1 or not active.any():
            break
        logits = cache.step(step_tok, active.astype(np.int32))
    return outputs
