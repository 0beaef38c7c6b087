"""Inference on a GGUF file's quantised weights: `cst.load(path, dtype="q")` keeps every weight matrix
stored in a format the C products read (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, BF16) as its raw
GGUF blocks, and dequantises only the rest (norms, biases, F32/F16 matrices) to float32; a matrix
in another block type (Q2_K, Q3_K, IQ...) is refused (FormatError). Generation (generate, chat) reads
the blocks directly (csrc/kernels/qdot.c); training needs float32 weights, so a QuantizedModel refuses
it: load the file without dtype="q", or call .dequantize()."""
import numpy as np

from ..core.errors import FormatError
from ..core.layout import GEN_GLOBALS, GEN_ROLES, GGML_BF16, check_trainable, tensor_table
from ..core.model import Model

# ggml types the products read (quant.h's ids): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, and BF16
# (bf16 products with fp32 sums, the inputs rounded to bf16).
PRODUCT_TYPES = (2, 3, 6, 7, 8, 12, 13, 14, GGML_BF16)
# Matrices of these types are not kept: they run in float32 (F32, F16).
FLOAT_TYPES = (0, 1)
# The roles whose tensors are weight matrices of a product.
_MATRIX_ROLES = ("q", "k", "v", "o", "gate", "up", "down", "head")
# The weight matrices of one product, by the role of its first tensor in GEN_ROLES.
_GROUPS = {"q": ("q", "k", "v"), "o": ("o",), "gate": ("gate", "up"), "down": ("down",)}


class QuantizedModel:
    """A Llama-family model for generation whose weight matrices stay in their GGUF blocks.

    `flat_params` holds only the float32 tensors (norms, biases, matrices of types the products do not
    read), `gen_layout` places them for the C generation path (-1 for a quantised matrix), and
    `gen_quant` holds the blocks: `qweights` (uint8, rows of each fused product in Hugging Face order),
    `qoffsets` and `qtypes` ((n_layers + 1, len(GEN_ROLES), 3) int64, -1 where float32; [..., 0] the whole
    matrix, or [..., 0:3] the parts q, k, v / gate, up of a fused product whose tensors differ in type).
    `quantized_types` names the type of every tensor kept quantised. generate and chat work as on a Model; forward,
    backward and training raise TypeError."""

    trainable = False  # cst.core.layout.check_trainable refuses it

    quantized = True

    def __init__(self, config, flat_params, gen_layout, gen_quant, quantized_types, source=None, reload=None):
        self._reload = reload
        self.config = config
        self.flat_params = flat_params
        self.gen_layout = gen_layout
        self.gen_quant = gen_quant
        self.quantized_types = quantized_types
        self.source = source
        self.tokenizer = None
        self.adapter = None
        self.last_truncated = None

    @property
    def nbytes(self) -> int:
        """Bytes of weights held (blocks plus float32 tensors)."""
        return int(self.gen_quant["qweights"].nbytes + self.flat_params.nbytes)

    def merged(self):
        return self

    def _generation_view(self):  # what Model.generate reads: the blocks themselves
        return self

    generate = Model.generate
    chat = Model.chat

    def dequantize(self):
        """The float32 cst.Model of the same file (read again from `source`), for training or export."""
        if self.source is None or self._reload is None:
            raise ValueError("dequantize: this QuantizedModel has no source file")
        return self._reload()

    def save(self, path, format="hf", dtype=None):
        """Writes the dequantised model (see Model.save)."""
        return self.dequantize().save(path, format=format, dtype=dtype)

    def _refuse(self, *args, **kwargs):
        check_trainable(self, "training")

    forward = forward_logprobs = token_logprobs = backward = backward_logprobs = zero_grad = _refuse


def build(cfg, tensors, raw_of, dequantize_into, permuted, path, unpermute, reload):
    """QuantizedModel of cfg from a GGUF file's tensors ({gguf name: reader tensor}); raw_of(t) gives a
    tensor's bytes, dequantize_into(dst, t, hf_name) its float32 values in Hugging Face order (Q/K rows
    un-permuted), permuted {hf name: n_head} the Q/K rows llama.cpp reordered, unpermute(w, n_head) undoes
    that order, reload() reads the file again as a float32 Model (the reader, cst.io.gguf, hands these in)."""
    _unpermute = unpermute
    table = tensor_table(cfg)
    by_role = {(layer, role): (name, shape, gg) for name, shape, role, layer, gg in table}
    # A matrix in a block type the products do not read is refused here, naming the type, before any
    # work (the float32 loader refuses it too: every block type cst decodes is one the products read).
    for name, shape, role, layer, gg in table:
        matrix = role in _MATRIX_ROLES or (role == "embed" and cfg.tie_embeddings)
        t = tensors[gg].tensor_type
        if matrix and int(t) not in PRODUCT_TYPES + FLOAT_TYPES:
            kind = getattr(t, "name", f"ggml type id {int(t)}")
            raise FormatError(f"{path}: tensor {gg!r} is {kind}, a block type cst does not read (dtype='q' reads "
                              "Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K and BF16 blocks; F32 and F16 "
                              "matrices run in float32)")

    def kept(layer, roles):
        return all(int(tensors[by_role[(layer, r)][2]].tensor_type) in PRODUCT_TYPES for r in roles)

    quant_groups = {}  # (layer, first role) -> roles, for the products kept as blocks
    for i in range(cfg.n_layers):
        for first, roles in _GROUPS.items():
            if kept(i, roles):
                quant_groups[(i, first)] = roles
    globals_kept = [r for r in ("embed", "head") if (None, r) in by_role and kept(None, (r,))]
    quantised_names = {by_role[(layer, r)][0] for (layer, _), roles in quant_groups.items() for r in roles}
    quantised_names |= {by_role[(None, r)][0] for r in globals_kept}

    # float32 tensors, in layout order (so fused groups left in float32 stay adjacent)
    offs, size = {}, 0
    for name, shape, role, layer, gg in table:
        if name not in quantised_names:
            offs[(layer, role)] = size
            size += int(np.prod(shape))
    flat = np.empty(size, np.float32)
    for name, shape, role, layer, gg in table:
        if name not in quantised_names:
            o = offs[(layer, role)]
            dequantize_into(flat[o:o + int(np.prod(shape))].reshape(shape), tensors[gg], name)

    # the blocks: each product's tensors' rows concatenated, Q/K rows in Hugging Face order; a fused
    # product whose tensors differ in type (Q4_K q, k and Q6_K v) is given as its parts
    rows, qoffs, qtypes, total = [], {}, {}, 0

    def add(layer, first, roles):
        nonlocal total
        types = [int(tensors[by_role[(layer, r)][2]].tensor_type) for r in roles]
        qoffs[(layer, first)], qtypes[(layer, first)] = [], types if len(set(types)) > 1 else types[:1]
        for r in roles:
            if r == roles[0] or len(set(types)) > 1:
                qoffs[(layer, first)].append(total)
            name, shape, gg = by_role[(layer, r)]
            b = np.asarray(raw_of(tensors[gg])).reshape(-1).view(np.uint8).reshape(shape[0], -1)
            if name in permuted:
                b = _unpermute(b, permuted[name])
            rows.append(b)
            total += b.size

    for (layer, first), roles in quant_groups.items():
        add(layer, first, roles)
    for r in globals_kept:
        add(None, r, (r,))
    qweights = np.empty(total, np.uint8)
    o = 0
    for b in rows:
        qweights[o:o + b.size] = b.reshape(-1)
        o += b.size

    L = cfg.n_layers
    layout = np.full((L + 1, len(GEN_ROLES)), -1, np.int64)
    qo = np.full((L + 1, len(GEN_ROLES), 3), -1, np.int64)  # 3 parts at most: q, k, v
    qt = np.full_like(qo, -1)
    for i in range(L + 1):
        roles = GEN_ROLES if i < L else GEN_GLOBALS
        layer = i if i < L else None
        for j, role in enumerate(roles):
            key = (layer, role)
            if i == L and role == "head" and cfg.tie_embeddings:
                key = (None, "embed")
            if key in qoffs:
                qo[i, j, :len(qoffs[key])], qt[i, j, :len(qtypes[key])] = qoffs[key], qtypes[key]
            elif key in offs:
                layout[i, j] = offs[key]
    names = {by_role[(layer, r)][2]: int(tensors[by_role[(layer, r)][2]].tensor_type)
             for (layer, _), roles in quant_groups.items() for r in roles}
    names.update({by_role[(None, r)][2]: int(tensors[by_role[(None, r)][2]].tensor_type) for r in globals_kept})
    return QuantizedModel(cfg, flat, layout, {"qweights": qweights, "qoffsets": qo, "qtypes": qt}, names,
                          source=path, reload=reload)
