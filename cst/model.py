"""A Llama-family decoder whose parameters live in one flat float32 buffer, named as in Hugging Face
checkpoints. The math runs in cst._core; this module only lays out memory and calls kernels in order.
"""
import numpy as np

from . import _core
from .config import ModelConfig


def param_layout(cfg: ModelConfig):
    """Ordered (name, shape) of every parameter. Within a layer q, k, v are adjacent (so one fused
    (q+k+v, C) matrix is a view), and so are gate and up."""
    C, F, HS = cfg.dim, cfg.ffn_dim, cfg.head_dim
    out = [("model.embed_tokens.weight", (cfg.vocab_size, C))]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (C,)),
            (p + "self_attn.q_proj.weight", (cfg.n_heads * HS, C)),
            (p + "self_attn.k_proj.weight", (cfg.n_kv_heads * HS, C)),
            (p + "self_attn.v_proj.weight", (cfg.n_kv_heads * HS, C)),
            (p + "self_attn.o_proj.weight", (C, cfg.n_heads * HS)),
            (p + "post_attention_layernorm.weight", (C,)),
            (p + "mlp.gate_proj.weight", (F, C)),
            (p + "mlp.up_proj.weight", (F, C)),
            (p + "mlp.down_proj.weight", (C, F)),
        ]
    out.append(("model.norm.weight", (C,)))
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", (cfg.vocab_size, C)))
    return out


def _views(flat: np.ndarray, layout):
    views, off = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        views[name] = flat[off:off + n].reshape(shape)
        off += n
    return views


class Model:
    """Llama-family decoder. `params` and `grads` map Hugging Face names to float32 views of one flat
    buffer each (`flat_params`, `flat_grads`), so optimisers and checkpoints see a single array."""

    def __init__(self, config: ModelConfig, seed: int = 0):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"Model: config must be a cst.ModelConfig, got {type(config).__name__}")
        self.config = config
        self.layout = param_layout(config)
        n = sum(int(np.prod(s)) for _, s in self.layout)
        self.flat_params = np.empty(n, dtype=np.float32)
        self.params = _views(self.flat_params, self.layout)
        self.flat_grads = None
        self.grads = None
        # Hugging Face's Llama initialisation: N(0, 0.02) for matrices, ones for norms.
        rng = np.random.default_rng(seed)
        for name, arr in self.params.items():
            if arr.ndim == 1:
                arr[...] = 1.0
            else:
                arr[...] = rng.normal(0.0, 0.02, size=arr.shape).astype(np.float32)

    @property
    def num_parameters(self) -> int:
        return int(self.flat_params.size)

    def _ensure_grads(self):
        if self.flat_grads is None:
            self.flat_grads = np.zeros_like(self.flat_params)
            self.grads = _views(self.flat_grads, self.layout)

    def zero_grad(self):
        """Clears every gradient; backward adds into them, so call this between steps."""
        self._ensure_grads()
        self.flat_grads[...] = 0.0
