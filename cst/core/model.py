"""A Llama-family decoder whose parameters live in one flat float32 buffer (or, with dtype "bf16", its
matrices in one bf16 buffer and its norms and biases in a float32 one), named as in Hugging Face
checkpoints. The math runs in cst._core; this module only lays out memory and calls kernels in order.
"""
import numpy as np

from .. import _core
from .bf16 import from_bf16, to_bf16
from .config import ModelConfig
from .ops import rope_tables
from .runtime import _release_blas_threads_if_allowed
from .shared_prompt import SkipPlan, check_skip
# The layout tables live in cst.core.layout (generation reads them without importing the model); their
# names stay importable from here.
from .layout import (GEN_GLOBALS, GEN_ROLES, GLOBAL_TENSORS, LAYER_TENSORS, check_trainable,  # noqa: F401
                     gen_offsets, gen_offsets_bf16, gguf_names, num_params, param_layout, tensor_table)


def _views(flat: np.ndarray, layout):
    views, off = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        views[name] = flat[off:off + n].reshape(shape)
        off += n
    return views


def _offsets(layout):
    out, off = {}, 0
    for name, shape in layout:
        out[name] = off
        off += int(np.prod(shape))
    return out


# The fused projections every layer routes through _linear_forward / _linear_backward, and the
# Hugging Face weights each one stacks (rows in this order).
LINEARS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gu": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


# How the base weights can be stored: "f32" (trainable), or "bf16": every matrix (embedding and LM head
# included) as bf16 bits, frozen, multiplied by the bf16 GEMMs with fp32 accumulation; norms and biases
# stay float32, like every activation, gradient, adapter and optimizer state.
DTYPES = ("f32", "bf16")


def _matmul_forward(out, x, w, accumulate=False):
    """out (N, OC) (+)= x (N, C) @ w (OC, C)^T; a bf16 (uint16) w takes the bf16 GEMM (x rounded to bf16)."""
    if w.dtype == np.uint16:
        _core.matmul_bf16_forward(out, x, w, accumulate)
    else:
        _core.matmul_forward(out, x, w, accumulate)


def _matmul_backward(dx, dw, dout, x, w, accumulate=True):
    """dx (+)= dout @ w, dw += dout^T @ x (either may be None); bf16 w as in _matmul_forward."""
    if w.dtype == np.uint16:
        _core.matmul_bf16_backward(dx, dw, dout, x, w, accumulate)
    else:
        _core.matmul_backward(dx, dw, dout, x, w, accumulate)


# Model.save's writer, cst.io.save, installed by cst.io when it is imported (cst/__init__ imports it): the
# model is the layer below the file formats and does not import them.
_save = None


class _Acts:
    """Views of the activation arena for one (B, T): what forward saves for backward, plus scratch."""


class Model:
    """Llama-family decoder. `params` and `grads` map Hugging Face names to float32 views of one flat
    buffer each (`flat_params`, `flat_grads`), so optimisers and checkpoints see a single array.

    dtype "bf16" (cst.load(..., dtype="bf16"), or `to_bf16()`): every matrix is a uint16 view (bf16
    bits) of `flat_bf16`, the norms and biases float32 views of `flat_vectors`, and there is no
    float32 copy (`flat_params` raises TypeError; `float32_params()` makes one). The base is then
    frozen (`frozen_base` stays True): train LoRA adapters on it.

    Training step: `logits = m.forward(tokens, lengths)`, then `m.backward(dlogits)` adds into
    `m.grads`; or the memory-lean pair `forward_logprobs` / `backward_logprobs`, which never holds the
    full (B, T, V) logits. Activations live in an arena that grows to the largest (B, T) seen and is
    reused afterwards: the logits returned by `forward` are a view into it, overwritten by the next
    call (copy them to keep them). `frozen_base = True` makes backward compute activation gradients
    only (for adapters), leaving `grads` untouched."""

    def __init__(self, config: ModelConfig, seed: int = 0, init: bool = True, dtype: str = "f32"):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"Model: config must be a cst.ModelConfig, got {type(config).__name__}")
        if dtype not in DTYPES:
            raise ValueError(f"Model: dtype must be one of {DTYPES}, got {dtype!r}")
        self.config = config
        self.layout = param_layout(config)
        self._storage(dtype)
        self.flat_grads = None
        self.grads = None
        self.adapter = None  # a cst.lora.LoRA once attached; every projection consults it
        self.tokenizer = None
        self.last_truncated = None  # per conversation of the last chat(): hit max_new_tokens
        # Rows of the lean LM head computed at once: bounds the (rows, V) scratch to about 16 MB.
        self.logits_chunk_rows = max(1, (1 << 22) // config.vocab_size)
        self._arena = {}
        self._state = None  # "logits" after forward, "logprobs" after forward_logprobs
        self._acts_saved = None
        self._head_rows = None  # positions the last forward_logprobs sent through the LM head
        self._rope = None
        self._skip = None  # the cst.shared_prompt.SkipPlan of the last forward_logprobs, if any
        self._gfused = None
        self._bf16_gen_tables = None  # gen_offsets_bf16(config), made on the first bf16 generation
        if not init:  # weights about to be loaded: skip drawing 135M normals
            for flat in self.param_buffers():
                flat[...] = 0
            return
        # Hugging Face's Llama initialisation: N(0, 0.02) for matrices, ones for norms (the same draws
        # for both dtypes: a bf16 model is its float32 twin rounded).
        rng = np.random.default_rng(seed)
        for name, arr in self.params.items():
            if arr.ndim == 1:
                arr[...] = 1.0
            elif arr.dtype == np.uint16:
                to_bf16(rng.normal(0.0, 0.02, size=arr.shape).astype(np.float32), out=arr)
            else:
                arr[...] = rng.normal(0.0, 0.02, size=arr.shape).astype(np.float32)

    def _storage(self, dtype):
        """Allocates the parameter buffers of `dtype` and the views over them (params, fused)."""
        self.dtype = dtype
        if dtype == "f32":
            self._flat = np.empty(sum(int(np.prod(s)) for _, s in self.layout), dtype=np.float32)
            self.flat_bf16 = self.flat_vectors = None
            self.params = _views(self._flat, self.layout)
            self._fused = self._fused_views(self._flat)
            self.frozen_base = False
            return
        mats = [(n, s) for n, s in self.layout if len(s) == 2]
        vecs = [(n, s) for n, s in self.layout if len(s) == 1]
        self._flat = None
        self.flat_bf16 = np.empty(sum(int(np.prod(s)) for _, s in mats), dtype=np.uint16)
        self.flat_vectors = np.empty(sum(int(np.prod(s)) for _, s in vecs), dtype=np.float32)
        views = {**_views(self.flat_bf16, mats), **_views(self.flat_vectors, vecs)}
        self.params = {name: views[name] for name, _ in self.layout}  # layout order, as for float32
        self._fused = self._fused_views(self.flat_bf16, mats, self.flat_vectors, vecs)
        self.frozen_base = True

    def param_buffers(self):
        """The arrays that hold the parameters: (flat_params,) or (flat_bf16, flat_vectors)."""
        return (self._flat,) if self.dtype == "f32" else (self.flat_bf16, self.flat_vectors)

    @property
    def flat_params(self) -> np.ndarray:
        """The one float32 buffer of every parameter (float32 models only)."""
        if self._flat is None:
            raise TypeError("Model.flat_params: this model stores its base in bf16 (flat_bf16, with norms and "
                            "biases in flat_vectors) and has no float32 buffer; float32_params() gives a float32 "
                            "copy, and folding adapters into the weights (merging) needs a float32 model: "
                            "cst.load(path) without dtype='bf16'")
        return self._flat

    @property
    def num_parameters(self) -> int:
        return int(sum(b.size for b in self.param_buffers()))

    @property
    def nbytes(self) -> int:
        """Bytes of parameters held (float32: 4 per parameter; bf16: 2 per matrix element, 4 per norm)."""
        return int(sum(b.nbytes for b in self.param_buffers()))

    def float32_params(self) -> np.ndarray:
        """A float32 copy of every parameter in the flat layout of a float32 model (bf16 values exact)."""
        if self.dtype == "f32":
            return self._flat.copy()
        flat = np.empty(num_params(self.config), dtype=np.float32)
        for name, dst in _views(flat, self.layout).items():
            src = self.params[name]
            if src.dtype == np.uint16:
                from_bf16(src, out=dst)
            else:
                dst[...] = src
        return flat

    def to_bf16(self):
        """Stores the base in bf16 from now on (matrices rounded to nearest even, norms and biases kept
        float32), freeing the float32 buffer and any base gradients; the base is frozen from then on.
        Briefly holds both copies (1.5x the float32 size). Returns the model; a bf16 model is unchanged."""
        if self.dtype == "bf16":
            return self
        old = self.params
        self._storage("bf16")
        for name, arr in self.params.items():
            if arr.dtype == np.uint16:
                to_bf16(old[name], out=arr)
            else:
                arr[...] = old[name]
        self.flat_grads = self.grads = self._gfused = None
        return self

    def _fused_views(self, flat, layout=None, vflat=None, vlayout=None):
        """Per layer {which: (rows, C) view} over the adjacent q/k/v and gate/up weights of `flat`
        (laid out as `layout`, default the model's); the q|k|v biases from vflat (default flat)."""
        cfg = self.config
        layout = self.layout if layout is None else layout
        vflat, vlayout = (flat, layout) if vflat is None else (vflat, vlayout)
        offs, voffs = _offsets(layout), _offsets(vlayout)
        shapes = dict(self.layout)
        layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            d = {}
            for which, parts in LINEARS.items():
                rows = sum(shapes[p + q + ".weight"][0] for q in parts)
                cols = shapes[p + parts[0] + ".weight"][1]
                o = offs[p + parts[0] + ".weight"]
                d[which] = flat[o:o + rows * cols].reshape(rows, cols)
            if cfg.attention_bias:  # q|k|v biases, adjacent like their weights
                o = voffs[p + "self_attn.q_proj.bias"]
                d["qkv_bias"] = vflat[o:o + d["qkv"].shape[0]]
            layers.append(d)
        return layers

    def _ensure_grads(self):
        if self.dtype != "f32":
            raise TypeError("Model: this model's base is stored in bf16 and is frozen (no base gradients); train "
                            "LoRA adapters on it (cst.LoRA(model).attach(), or DPOConfig(lora_r=...)), or load it "
                            "in float32 for full fine-tuning")
        if self.flat_grads is None:
            self.flat_grads = np.zeros_like(self.flat_params)
            self.grads = _views(self.flat_grads, self.layout)
            self._gfused = self._fused_views(self.flat_grads)

    def zero_grad(self):
        """Clears every gradient; backward adds into them, so call this between steps."""
        self._ensure_grads()
        self.flat_grads[...] = 0.0

    def release_buffers(self):
        """Frees the activation arena (it is re-created on the next forward)."""
        self._arena = {}
        self._acts_saved = None
        self._state = None

    # ---- the one place every projection goes through (adapters hook here) ----

    def _linear_forward(self, layer: int, which: str, x, out, accumulate: bool = False):
        """out (N, rows) (+)= x (N, C) @ W^T for the fused projection `which` of `layer` (see LINEARS)."""
        _matmul_forward(out, x, self._fused[layer][which], accumulate)
        if self.adapter is not None:
            self.adapter.forward(layer, which, x, out)

    def _linear_backward(self, layer: int, which: str, dx, dout, x, accumulate: bool = True):
        """dx (N, C) += dout @ W (= when not accumulate), and W's gradient += dout^T @ x unless the base
        is frozen."""
        dw = None if self.frozen_base else self._gfused[layer][which]
        _matmul_backward(dx, dw, dout, x, self._fused[layer][which], accumulate)
        if self.adapter is not None:
            self.adapter.backward(layer, which, dx, dout, x)

    # ---- buffers ----

    def _buf(self, name, shape, dtype=np.float32):
        n = int(np.prod(shape))
        a = self._arena.get(name)
        if a is None or a.size < n or a.dtype != dtype:
            a = np.empty(max(n, 1), dtype=dtype)
            self._arena[name] = a
        return a[:n].reshape(shape)

    def _acts(self, B, T):
        cfg = self.config
        L, C, F, NH, NKV, HS = cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        N, QKV = B * T, (NH + 2 * NKV) * HS
        a = _Acts()
        b = self._buf
        a.res = b("res", (L + 1, N, C))  # residual stream entering each layer (last: final norm's input)
        a.mid = b("mid", (L, N, C))  # residual after attention
        a.rstd1, a.rstd2, a.rstdf = b("rstd1", (L, N)), b("rstd2", (L, N)), b("rstdf", (N,))
        a.q = b("q", (L, B, T, NH, HS))  # after rotary
        a.k = b("k", (L, B, T, NKV, HS))  # after rotary
        a.v = b("v", (L, B, T, NKV, HS))
        a.att = b("att", (L, B, T, NH, HS))  # NH * HS may differ from C (head_dim set)
        a.lse = b("lse", (L, B, NH, T))
        a.gu = b("gu", (L, N, 2 * F))
        a.lnf = b("lnf", (N, C))
        # Scratch, recomputed where backward needs it: normed inputs, the qkv product, swiglu output.
        a.ln, a.qkv, a.h = b("ln", (N, C)), b("qkv", (N, QKV)), b("h", (N, F))
        return a

    def _grad_acts(self, a, B, T):
        cfg = self.config
        C, F, NH, NKV, HS = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        N = B * T
        b = self._buf
        a.dres, a.dln, a.datt = b("dres", (N, C)), b("dln", (N, C)), b("datt", (N, NH * HS))
        a.dq, a.dk, a.dv = b("dq", (B, T, NH, HS)), b("dk", (B, T, NKV, HS)), b("dv", (B, T, NKV, HS))
        a.dqkv, a.dh, a.dgu = b("dqkv", (N, (NH + 2 * NKV) * HS)), b("dh", (N, F)), b("dgu", (N, 2 * F))

    def _rope_for(self, T):
        if self._rope is None or self._rope[0].shape[0] < T:
            cfg = self.config
            cos, sin = rope_tables(max(T, 64), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            self._rope = (np.ascontiguousarray(cos, np.float32), np.ascontiguousarray(sin, np.float32))
        return self._rope

    # ---- validation ----

    def _check_inputs(self, fn, tokens, lengths):
        cfg = self.config
        if not isinstance(tokens, np.ndarray):
            raise TypeError(f"{fn}: 'tokens' must be a numpy.ndarray of int32, got {type(tokens).__name__}")
        if tokens.dtype != np.int32:
            raise TypeError(f"{fn}: 'tokens' must have dtype int32, got {tokens.dtype}")
        if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(f"{fn}: 'tokens' must have shape (B, T) with B, T >= 1, got {tokens.shape}")
        B, T = tokens.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"{fn}: 'tokens' has T = {T} > max_seq_len = {cfg.max_seq_len}")
        if T > cfg.attention_window:
            raise ValueError(f"{fn}: 'tokens' has T = {T} > sliding_window = {cfg.sliding_window}: cst runs "
                             "full causal attention, exact only up to the window; shorten the sequences")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"{fn}: 'tokens' ids must lie in [0, {cfg.vocab_size}), got min {lo}, max {hi}")
        if lengths is not None:
            if not isinstance(lengths, np.ndarray):
                raise TypeError(f"{fn}: 'lengths' must be None or a numpy.ndarray of int32, "
                                f"got {type(lengths).__name__}")
            if lengths.dtype != np.int32:
                raise TypeError(f"{fn}: 'lengths' must have dtype int32, got {lengths.dtype}")
            if lengths.shape != (B,):
                raise ValueError(f"{fn}: 'lengths' must have shape ({B},), got {lengths.shape}")
            if lengths.min() < 1 or lengths.max() > T:
                raise ValueError(f"{fn}: 'lengths' must lie in [1, {T}], got min {int(lengths.min())}, "
                                 f"max {int(lengths.max())}")
        tok = self._buf("tokens", (B, T), np.int32)
        tok[...] = tokens
        self._skip = None  # set by forward_logprobs(skip=...) after this check
        if lengths is None:
            self._lengths, self._pad = None, None
        else:
            self._lengths = np.array(lengths, dtype=np.int32)  # (B,): tiny, and kept past the call
            pad = np.arange(T)[None, :] >= self._lengths[:, None]
            self._pad = np.flatnonzero(pad) if pad.any() else None
        self._shape = (B, T)
        return tok

    def _check_grad(self, fn, name, arr, shape):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{fn}: '{name}' must be a numpy.ndarray of float32, got {type(arr).__name__}")
        if arr.dtype != np.float32:
            raise TypeError(f"{fn}: '{name}' must have dtype float32, got {arr.dtype}")
        if arr.shape != shape:
            raise ValueError(f"{fn}: '{name}' must have shape {shape} (from the last forward), got {arr.shape}")
        if not arr.flags.c_contiguous:
            raise ValueError(f"{fn}: '{name}' must be C-contiguous (use np.ascontiguousarray)")

    # ---- forward ----

    def _trunk(self, tokens):
        """Embedding, every layer and the final norm; leaves the normed hidden states in lnf."""
        _release_blas_threads_if_allowed()  # OpenBLAS threads left spinning would halve our GEMMs
        cfg = self.config
        B, T = tokens.shape
        N, C, L, eps = B * T, cfg.dim, cfg.n_layers, cfg.norm_eps
        QD, KD = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        cos, sin = self._rope_for(T)
        a = self._acts(B, T)
        P = self.params
        E = P["model.embed_tokens.weight"]
        if E.dtype == np.uint16:  # bf16 rows, gathered then widened (exact)
            from_bf16(E[tokens.reshape(-1)], out=a.res[0])
        else:
            _core.embedding_forward(a.res[0].reshape(B, T, C), tokens, E)
        for i in range(L):
            p = f"model.layers.{i}."
            x, mid = a.res[i], a.mid[i]
            _core.rmsnorm_forward(a.ln, a.rstd1[i], x, P[p + "input_layernorm.weight"], eps)
            self._linear_forward(i, "qkv", a.ln, a.qkv)
            if cfg.attention_bias:
                a.qkv += self._fused[i]["qkv_bias"]
            # Split the fused product: attention and rotary want (B,T,H,HS) contiguous arrays.
            np.copyto(a.q[i].reshape(N, QD), a.qkv[:, :QD])
            np.copyto(a.k[i].reshape(N, KD), a.qkv[:, QD:QD + KD])
            np.copyto(a.v[i].reshape(N, KD), a.qkv[:, QD + KD:])
            if self._skip is not None:  # one row per pair sharing its prompt (cst.shared_prompt)
                self._skip.rope(a.q[i])
                self._skip.rope(a.k[i])
                self._skip.attention_forward(self._buf, a.att[i], a.lse[i], a.q[i], a.k[i], a.v[i])
            else:
                _core.rope_forward(a.q[i], cos, sin)
                _core.rope_forward(a.k[i], cos, sin)
                _core.attention_forward(a.att[i], a.lse[i], a.q[i], a.k[i], a.v[i], self._lengths)
            np.copyto(mid, x)
            self._linear_forward(i, "o", a.att[i].reshape(N, QD), mid, accumulate=True)
            _core.rmsnorm_forward(a.ln, a.rstd2[i], mid, P[p + "post_attention_layernorm.weight"], eps)
            self._linear_forward(i, "gu", a.ln, a.gu[i])
            _core.swiglu_forward(a.h, a.gu[i])
            np.copyto(a.res[i + 1], mid)
            self._linear_forward(i, "down", a.h, a.res[i + 1], accumulate=True)
        _core.rmsnorm_forward(a.lnf, a.rstdf, a.res[L], P["model.norm.weight"], eps)
        return a

    @property
    def _lm_head(self):
        name = "model.embed_tokens.weight" if self.config.tie_embeddings else "lm_head.weight"
        return self.params[name], (self.grads[name] if self.grads is not None else None)

    def forward(self, tokens, lengths=None):
        """tokens (B, T) int32, lengths (B,) int32 in [1, T] or None (right padding) -> logits
        (B, T, V) float32, a view into the arena valid until the next call."""
        self._state = None
        tokens = self._check_inputs("forward", tokens, lengths)
        B, T = tokens.shape
        V = self.config.vocab_size
        a = self._trunk(tokens)
        logits = self._buf("logits", (B, T, V))
        _matmul_forward(logits.reshape(B * T, V), a.lnf, self._lm_head[0])
        # Zeroing the padded rows of the saved head input makes their head-weight gradient vanish
        # without copying dlogits; backward zeroes their input gradient likewise.
        if self._pad is not None:
            a.lnf[self._pad] = 0.0
        self._acts_saved = a
        self._state = "logits"
        return logits

    def forward_logprobs(self, tokens, targets, lengths=None, skip=None):
        """Memory-lean forward for training on log-probabilities: tokens, targets (B, T) int32
        (targets in [-1, V), -1 = ignore) -> logp (B, T) float32, log p(targets[b,t] | tokens[b,:t+1]).
        The LM head runs in row chunks over the positions whose target is not ignored: only the final
        hidden states and row log-sum-exps are saved.
        Padded and ignored positions give 0. The result is a view valid until the next call.
        skip (B, 2) int32 [s0, s1) (needs lengths): a shared-prompt row [prompt, chosen, rejected], the
        tokens from s1 on computed as if they followed token s0 - 1 (see cst.shared_prompt); the target
        at s1 - 1 is then scored from position s0 - 1."""
        self._state = None
        tokens = self._check_inputs("forward_logprobs", tokens, lengths)
        if skip is not None:
            check_skip("forward_logprobs", skip, self._lengths, tokens.shape[0])
            cos, sin = self._rope_for(tokens.shape[1])
            self._skip = SkipPlan(skip, self._lengths, tokens.shape[1], cos, sin)
        B, T = tokens.shape
        cfg = self.config
        if not isinstance(targets, np.ndarray):
            raise TypeError(f"forward_logprobs: 'targets' must be a numpy.ndarray of int32, "
                            f"got {type(targets).__name__}")
        if targets.dtype != np.int32:
            raise TypeError(f"forward_logprobs: 'targets' must have dtype int32, got {targets.dtype}")
        if targets.shape != (B, T):
            raise ValueError(f"forward_logprobs: 'targets' must have shape {(B, T)} like 'tokens', "
                             f"got {targets.shape}")
        if targets.min() < -1 or targets.max() >= cfg.vocab_size:
            raise ValueError(f"forward_logprobs: 'targets' must lie in [-1, {cfg.vocab_size}), got min "
                             f"{int(targets.min())}, max {int(targets.max())}")
        return self._forward_logprobs(tokens, targets)

    def _forward_logprobs(self, tokens, targets):
        B, T = tokens.shape
        N = B * T
        tg = self._buf("targets", (N,), np.int32)
        tg[...] = targets.reshape(N)
        if self._pad is not None:
            tg[self._pad] = -1
        a = self._trunk(tokens)
        # The LM head runs only on the rows whose target is scored (a DPO batch's prompt rows are about
        # half of it): their final hidden states are gathered into one block, and the rest give 0.
        rows = np.flatnonzero(tg >= 0)
        self._head_rows = rows
        R = len(rows)
        x = self._buf("head_in", (R, self.config.dim))
        np.take(a.lnf, rows if self._skip is None else self._skip.head_src(rows), axis=0, out=x)
        tsel = tg[rows]
        lp, ls = self._buf("head_logp", (R,)), self._buf("head_lse", (R,), np.float64)
        W = self._lm_head[0]
        for r0, r1, chunk in self._chunks(R):
            _matmul_forward(chunk, x[r0:r1], W)
            _core.logprobs_forward(lp[r0:r1], ls[r0:r1], chunk, tsel[r0:r1])
        logp = self._buf("logp", (N,))
        logp.fill(0.0)
        logp[rows] = lp
        self._acts_saved = a
        self._state = "logprobs"
        return logp.reshape(B, T)

    def _chunks(self, R):
        """(r0, r1, logits scratch) over R gathered head rows, at most logits_chunk_rows at a time."""
        C = max(1, min(R, self.logits_chunk_rows))
        for r0 in range(0, R, C):
            r1 = min(R, r0 + C)
            yield r0, r1, self._buf("logits_chunk", (r1 - r0, self.config.vocab_size))

    def token_logprobs(self, tokens, lengths=None):
        """tokens (B, T) int32 -> (B, T-1) float32 log p(tokens[b, t+1] | tokens[b, :t+1]); positions
        whose next token is padding give 0. Chunked like forward_logprobs; a fresh array is returned,
        and no backward can follow."""
        self._state = None
        tokens = self._check_inputs("token_logprobs", tokens, lengths)
        B, T = tokens.shape
        targets = np.full((B, T), -1, np.int32)
        targets[:, :-1] = tokens[:, 1:]
        if self._lengths is not None:
            targets[np.arange(T)[None, :] >= self._lengths[:, None] - 1] = -1
        out = self._forward_logprobs(tokens, targets)[:, :-1].copy()
        self._state = None
        return out

    # ---- backward ----

    def backward(self, dlogits):
        """Adds the gradients of the last forward, given dlogits (B, T, V) float32, into `grads`
        (allocated on first use). Rows of padded positions are ignored."""
        if self._state != "logits":
            raise ValueError("backward: call forward(tokens, lengths) first (no saved activations)")
        B, T = self._shape
        N, V = B * T, self.config.vocab_size
        self._check_grad("backward", "dlogits", dlogits, (B, T, V))
        if not self.frozen_base:
            self._ensure_grads()
        a = self._acts_saved
        self._grad_acts(a, B, T)
        W, dW = self._lm_head
        dlnf = a.dln
        dlnf.fill(0.0)
        _matmul_backward(dlnf, None if self.frozen_base else dW, dlogits.reshape(N, V), a.lnf, W)
        if self._pad is not None:
            dlnf[self._pad] = 0.0
        self._backward_trunk(a, B, T)

    def backward_logprobs(self, dlogp):
        """Adds the gradients of the last forward_logprobs, given dlogp (B, T) float32 (d loss / d
        logp), into `grads`, recomputing the LM head one row chunk at a time."""
        if self._state != "logprobs":
            raise ValueError("backward_logprobs: call forward_logprobs(tokens, targets, lengths) first")
        B, T = self._shape
        N = B * T
        self._check_grad("backward_logprobs", "dlogp", dlogp, (B, T))
        if not self.frozen_base:
            self._ensure_grads()
        a = self._acts_saved
        self._grad_acts(a, B, T)
        W, dW = self._lm_head
        dW = None if self.frozen_base else dW
        rows = self._head_rows
        R = len(rows)
        x, dx = self._buf("head_in", (R, self.config.dim)), self._buf("head_dx", (R, self.config.dim))
        tsel, ls = self._buf("targets", (N,), np.int32)[rows], self._buf("head_lse", (R,), np.float64)
        dsel = np.ascontiguousarray(dlogp.reshape(N)[rows])
        dx.fill(0.0)
        for r0, r1, chunk in self._chunks(R):
            _matmul_forward(chunk, x[r0:r1], W)
            _core.logprobs_backward_inplace(chunk, dsel[r0:r1], tsel[r0:r1], ls[r0:r1])
            _matmul_backward(dx[r0:r1], dW, chunk, x[r0:r1], W)
        dlnf = a.dln
        dlnf.fill(0.0)
        dlnf[rows] = dx
        if self._skip is not None:
            self._skip.head_backward(dlnf)
        self._backward_trunk(a, B, T)

    def _backward_trunk(self, a, B, T):
        """From d lnf (in a.dln) down to the embedding, adding into grads unless frozen."""
        _release_blas_threads_if_allowed()
        cfg = self.config
        N, C, L, eps = B * T, cfg.dim, cfg.n_layers, cfg.norm_eps
        QD, KD = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        cos, sin = self._rope_for(T)
        P, frozen = self.params, self.frozen_base
        G = (lambda name: None) if frozen else (lambda name: self.grads[name])
        dres = a.dres
        dres.fill(0.0)
        _core.rmsnorm_backward(dres, G("model.norm.weight"), a.dln, a.res[L], P["model.norm.weight"], a.rstdf)
        for i in reversed(range(L)):
            p = f"model.layers.{i}."
            x, mid = a.res[i], a.mid[i]
            # MLP block; its normed input and swiglu output are recomputed rather than saved.
            w2 = P[p + "post_attention_layernorm.weight"]
            _core.rmsnorm_forward(a.ln, a.rstd2[i], mid, w2, eps)
            _core.swiglu_forward(a.h, a.gu[i])
            # The first product into each input gradient writes it (accumulate=False) instead of
            # adding into a zeroed buffer: one pass over dh, dgu, dln and datt less per layer.
            self._linear_backward(i, "down", a.dh, dres, a.h, accumulate=False)
            _core.swiglu_backward(a.dgu, a.dh, a.gu[i], False)
            self._linear_backward(i, "gu", a.dln, a.dgu, a.ln, accumulate=False)
            _core.rmsnorm_backward(dres, G(p + "post_attention_layernorm.weight"), a.dln, mid, w2, a.rstd2[i])
            # Attention block; dres now holds d mid, which is also d x through the residual.
            w1 = P[p + "input_layernorm.weight"]
            _core.rmsnorm_forward(a.ln, a.rstd1[i], x, w1, eps)
            self._linear_backward(i, "o", a.datt, dres, a.att[i].reshape(N, QD), accumulate=False)
            a.dq.fill(0.0)
            a.dk.fill(0.0)
            a.dv.fill(0.0)
            if self._skip is not None:
                self._skip.attention_backward(self._buf, a.dq, a.dk, a.dv, a.datt.reshape(a.att[i].shape),
                                              a.att[i], a.lse[i], a.q[i], a.k[i], a.v[i])
                self._skip.rope(a.dq, backward=True)
                self._skip.rope(a.dk, backward=True)
            else:
                _core.attention_backward(a.dq, a.dk, a.dv, a.datt.reshape(a.att[i].shape), a.att[i], a.lse[i],
                                         a.q[i], a.k[i], a.v[i], self._lengths)
                _core.rope_backward(a.dq, cos, sin)
                _core.rope_backward(a.dk, cos, sin)
            np.copyto(a.dqkv[:, :QD], a.dq.reshape(N, QD))
            np.copyto(a.dqkv[:, QD:QD + KD], a.dk.reshape(N, KD))
            np.copyto(a.dqkv[:, QD + KD:], a.dv.reshape(N, KD))
            if cfg.attention_bias and not frozen:  # padded rows of dqkv are zero
                self._gfused[i]["qkv_bias"] += a.dqkv.sum(axis=0, dtype=np.float64).astype(np.float32)
            self._linear_backward(i, "qkv", a.dln, a.dqkv, a.ln, accumulate=False)
            _core.rmsnorm_backward(dres, G(p + "input_layernorm.weight"), a.dln, x, w1, a.rstd1[i])
        if not frozen:
            tokens = self._buf("tokens", (B, T), np.int32)
            _core.embedding_backward(self.grads["model.embed_tokens.weight"], dres.reshape(B, T, C),
                                     tokens, self._lengths)

    # ---- inference, chat and export ----

    def merged(self):
        """The model as export sees it: itself without an enabled adapter, else a snapshot whose
        weights have the adapters added in (a copy; the model is not changed). A bf16 model gives a
        float32 snapshot on every call (the writers read float32 weights)."""
        if self.adapter is None or not self.adapter.enabled:
            return self.as_float32()
        return _Snapshot(self, self.adapter.merged_params())

    def as_float32(self):
        """The base model with float32 weights, as the writers and the C generation path read it: the
        model itself when it is float32, else a read-only snapshot (a float32 copy, made on each call)."""
        return self if self.dtype == "f32" else _Snapshot(self, self.float32_params())

    def generate(self, prompts, **kwargs):
        """New token ids for each prompt (lists of ids), with the KV cache; see cst.generate.generate
        for the sampling options (max_new_tokens, temperature, top_k, top_p, repetition_penalty,
        eos_token_id, stop_strings, seed, stream)."""
        from .generate import generate
        if "eos_token_id" not in kwargs and self.tokenizer is not None:
            kwargs["eos_token_id"] = self.tokenizer.eos_token_id
        if kwargs.get("stop_strings") and "tokenizer" not in kwargs and self.tokenizer is not None:
            kwargs["tokenizer"] = self.tokenizer
        return generate(self, prompts, **kwargs)

    def _generation_view(self):
        """What generation reads: a bf16 model without an enabled adapter runs on its bf16 matrices
        themselves (bf16 products, fp32 sums; no float32 copy); otherwise merged(): float32 weights,
        adapters folded in exactly."""
        if self.dtype == "bf16" and (self.adapter is None or not self.adapter.enabled):
            return _Bf16Generation(self)
        return self.merged()

    def chat(self, conversations, max_new_tokens=256, trust_content=False, **kwargs):
        """Replies to chat conversations (lists of {"role", "content"} messages) rendered with the
        model's own chat template; one conversation gives a str, a list of them a list of str.
        `last_truncated` then says, per conversation, whether max_new_tokens cut the reply.
        Special-token text inside message contents stays plain text (a user cannot forge a system
        turn); trust_content=True lets it become control tokens (Tokenizer.encode_chat)."""
        if self.tokenizer is None:
            raise ValueError("chat: this model has no tokenizer (load one with cst.load)")
        single = isinstance(conversations, (list, tuple)) and conversations and isinstance(conversations[0], dict)
        convs = [conversations] if single else list(conversations)
        if not convs:
            raise ValueError("chat: no conversation given")
        for i, c in enumerate(convs):
            if not isinstance(c, (list, tuple)) or not c or not all(isinstance(m, dict) for m in c):
                raise ValueError(f"chat: conversation {i} must be a non-empty list of message dicts")
        tok = self.tokenizer
        prompts = [tok.encode_chat(list(c), add_generation_prompt=True, trust_content=trust_content)
                   for c in convs]
        outs = self.generate(prompts, max_new_tokens=max_new_tokens, **kwargs)
        eos = tok.eos_token_id
        self.last_truncated = [len(o) >= max_new_tokens and (not o or o[-1] != eos) for o in outs]
        texts = [tok.decode([t for t in o if t != eos], skip_special_tokens=True).strip() for o in outs]
        return texts[0] if single else texts

    def save(self, path, format="hf", dtype=None):
        """Writes the model (adapters merged) and its tokenizer: format "hf" (a directory that
        transformers loads) or "gguf" (F32 or F16); atomic. The writer is cst.io.save (see _save)."""
        return _save(self.merged(), path, format=format, dtype=dtype, tokenizer=self.tokenizer)


class _Bf16Generation:
    """A bf16 Model as the C generation path reads it: the matrices straight from flat_bf16 (as BF16
    "blocks", cst.core.layout.gen_offsets_bf16), the norms and biases from flat_vectors. No copy."""

    def __init__(self, model):
        self.config, self.tokenizer = model.config, model.tokenizer
        self.flat_params = model.flat_vectors
        if model._bf16_gen_tables is None:  # they depend on the config only (2 ms for SmolLM2): made once
            model._bf16_gen_tables = gen_offsets_bf16(model.config)
        self.gen_layout, qoffsets, qtypes = model._bf16_gen_tables
        self.gen_quant = {"qweights": model.flat_bf16.view(np.uint8), "qoffsets": qoffsets, "qtypes": qtypes}


class _Snapshot:
    """Read-only stand-in for a Model with other weights (adapters merged): what generation and
    export read (config, layout, params, flat_params, tokenizer)."""

    def __init__(self, model, flat):
        self.config, self.layout, self.tokenizer = model.config, model.layout, model.tokenizer
        self.flat_params = flat
        self.params = _views(flat, model.layout)
