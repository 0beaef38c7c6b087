"""The one parameter layout of a Llama-family decoder: every tensor's role, Hugging Face name, GGUF name
and shape, in memory order, and what is derived from it (the flat buffer's layout, the offsets table the
C generation path reads). Tables and arithmetic on configs only: no weights, no kernels.
"""
import numpy as np

from .config import ModelConfig


# The one parameter layout: every tensor of a layer, in memory order, as (role, Hugging Face name under
# "model.layers.N.", GGUF name under "blk.N.", shape in named sizes). A new tensor is one row here; the
# views, the fused projections, the C generation path (gen_offsets), LoRA and both file formats read it.
# q, k, v are adjacent (one fused (q+k+v, C) matrix is a view), so are their biases, and gate and up.
# Rows whose role ends in "_bias" exist when config.attention_bias is set.
LAYER_TENSORS = (
    ("attn_norm", "input_layernorm.weight", "attn_norm.weight", ("C",)),
    ("q", "self_attn.q_proj.weight", "attn_q.weight", ("QD", "C")),
    ("k", "self_attn.k_proj.weight", "attn_k.weight", ("KD", "C")),
    ("v", "self_attn.v_proj.weight", "attn_v.weight", ("KD", "C")),
    ("q_bias", "self_attn.q_proj.bias", "attn_q.bias", ("QD",)),
    ("k_bias", "self_attn.k_proj.bias", "attn_k.bias", ("KD",)),
    ("v_bias", "self_attn.v_proj.bias", "attn_v.bias", ("KD",)),
    ("o", "self_attn.o_proj.weight", "attn_output.weight", ("C", "QD")),
    ("ffn_norm", "post_attention_layernorm.weight", "ffn_norm.weight", ("C",)),
    ("gate", "mlp.gate_proj.weight", "ffn_gate.weight", ("F", "C")),
    ("up", "mlp.up_proj.weight", "ffn_up.weight", ("F", "C")),
    ("down", "mlp.down_proj.weight", "ffn_down.weight", ("C", "F")),
)
# The tensors outside the layers: (role, HF name, GGUF name, shape). The head exists when untied.
GLOBAL_TENSORS = (
    ("embed", "model.embed_tokens.weight", "token_embd.weight", ("V", "C")),
    ("norm", "model.norm.weight", "output_norm.weight", ("C",)),
    ("head", "lm_head.weight", "output.weight", ("V", "C")),
)


def _sizes(cfg):
    HS = cfg.head_dim
    return {"C": cfg.dim, "F": cfg.ffn_dim, "V": cfg.vocab_size, "QD": cfg.n_heads * HS,
            "KD": cfg.n_kv_heads * HS}


def _present(cfg, role):
    if role.endswith("_bias"):
        return cfg.attention_bias
    if role == "head":
        return not cfg.tie_embeddings
    return True


def tensor_table(cfg: ModelConfig):
    """Every parameter in memory order as (name, shape, role, layer, gguf name); layer None outside
    the layers."""
    n = _sizes(cfg)
    out = []
    glob = {r: (hf, gg, tuple(n[d] for d in dims)) for r, hf, gg, dims in GLOBAL_TENSORS}
    hf, gg, shape = glob["embed"]
    out.append((hf, shape, "embed", None, gg))
    for i in range(cfg.n_layers):
        for role, hf, gg, dims in LAYER_TENSORS:
            if _present(cfg, role):
                out.append((f"model.layers.{i}.{hf}", tuple(n[d] for d in dims), role, i, f"blk.{i}.{gg}"))
    for role in ("norm", "head"):
        if _present(cfg, role):
            hf, gg, shape = glob[role]
            out.append((hf, shape, role, None, gg))
    return out


def param_layout(cfg: ModelConfig):
    """Ordered (name, shape) of every parameter (tensor_table without roles)."""
    return [(name, shape) for name, shape, *_ in tensor_table(cfg)]


def num_params(cfg: ModelConfig) -> int:
    """Floats in the flat parameter buffer of cfg."""
    return sum(int(np.prod(shape)) for _, shape, *_ in tensor_table(cfg))


def gguf_names(cfg: ModelConfig):
    """{Hugging Face name: GGUF name} for every parameter of cfg."""
    return {name: gg for name, _, _, _, gg in tensor_table(cfg)}


# Column of each role in gen_offsets' rows (csrc/gen.h's CST_GEN_* roles): the first tensor of a fused
# group stands for it. The last row holds the embedding, final norm and LM head offsets.
GEN_ROLES = ("attn_norm", "q", "q_bias", "o", "ffn_norm", "gate", "down")
GEN_GLOBALS = ("embed", "norm", "head")


def _flat_offsets(cfg: ModelConfig, keep=None):
    """{(layer, role): offset} of the tensors `keep(shape)` selects (default all), packed in memory order."""
    offs, off = {}, 0
    for name, shape, role, layer, _ in tensor_table(cfg):
        if keep is None or keep(shape):
            offs[(layer, role)] = off
            off += int(np.prod(shape))
    return offs


def _gen_table(cfg: ModelConfig, offs):
    """gen_offsets' table from {(layer, role): offset}: -1 where a role has no entry; the head is the
    embedding's entry when it has none of its own (tied)."""
    out = np.full((cfg.n_layers + 1, len(GEN_ROLES)), -1, np.int64)
    for i in range(cfg.n_layers):
        for j, role in enumerate(GEN_ROLES):
            out[i, j] = offs.get((i, role), -1)
    for j, role in enumerate(GEN_GLOBALS):
        tied = offs.get((None, "embed"), -1) if role == "head" else -1
        out[cfg.n_layers, j] = offs.get((None, role), tied)
    return out


def gen_offsets(cfg: ModelConfig):
    """(n_layers + 1, len(GEN_ROLES)) int64: the float offset of each role's tensor in the flat
    parameters (-1: absent), last row the embedding, final norm and head (the embedding when tied).
    This is how the C generation path learns the layout."""
    return _gen_table(cfg, _flat_offsets(cfg))


# ggml's type id of bf16 (csrc/kernels/quant.h CST_GGML_BF16): the generation path reads such matrices
# with bf16 products.
GGML_BF16 = 30


def gen_offsets_bf16(cfg: ModelConfig):
    """The generation tables of a model whose matrices lie in one bf16 buffer and its norms and biases in
    one float32 buffer, each in memory order (cst.Model with dtype "bf16"): (layout, qoffsets, qtypes) for
    _core.gen_forward, `layout` placing the vectors in the float32 buffer (-1 for the matrices),
    `qoffsets` ((n_layers + 1, len(GEN_ROLES), 3) int64) each matrix's byte offset in the bf16 buffer
    (part 0 only: q|k|v and gate|up are adjacent there too), `qtypes` GGML_BF16 where a matrix is."""
    layout = _gen_table(cfg, _flat_offsets(cfg, lambda shape: len(shape) == 1))
    mats = _gen_table(cfg, {k: 2 * o for k, o in _flat_offsets(cfg, lambda shape: len(shape) == 2).items()})
    qoffsets = np.full(mats.shape + (3,), -1, np.int64)
    qoffsets[..., 0] = mats
    qtypes = np.where(qoffsets >= 0, GGML_BF16, -1).astype(np.int64)
    return layout, qoffsets, qtypes


def check_trainable(model, who: str) -> None:
    """Raises TypeError when `model` cannot train: a model whose weights stay quantised (cst.io.quantized
    marks those with trainable = False)."""
    if getattr(model, "trainable", True) is False:
        raise TypeError(f"{who}: this model was loaded with dtype='q' (weights kept as GGUF blocks, inference "
                        "only); train a float32 model: cst.load(path) or model.dequantize()")
