/* python/gen.c: the entry rows of the cached generation forward (gen.h): the config reader and the
 * checks of caches, scratch and positions. Boundary only: no arithmetic. */
#include "glue.h"
#include "gen.h"
#include "qdot.h"
#include "quant.h"
#include <math.h>
#include <stddef.h>

/* The attributes of a cst.ModelConfig gen.c reads, in order: positive ints, positive finite floats.
 * A new config field is one row here and one member of cst_gen_config. */
static const struct {
    const char *name;
    char kind; /* 'i' int64, 'f' float */
    size_t offset;
} config_fields[] = {
    {"vocab_size", 'i', offsetof(cst_gen_config, V)},     {"dim", 'i', offsetof(cst_gen_config, C)},
    {"n_layers", 'i', offsetof(cst_gen_config, L)},       {"n_heads", 'i', offsetof(cst_gen_config, NH)},
    {"n_kv_heads", 'i', offsetof(cst_gen_config, NKV)},   {"ffn_dim", 'i', offsetof(cst_gen_config, F)},
    {"head_dim", 'i', offsetof(cst_gen_config, HS)},     {"norm_eps", 'f', offsetof(cst_gen_config, norm_eps)},
};

/* Reads and checks a cst.ModelConfig (or anything with its attributes). */
static int read_config(const char *fn, PyObject *o, cst_gen_config *c) {
    for (size_t k = 0; k < sizeof config_fields / sizeof config_fields[0]; k++) {
        const char *name = config_fields[k].name, kind = config_fields[k].kind;
        char *at = (char *)c + config_fields[k].offset;
        PyObject *v = PyObject_GetAttrString(o, name);
        if (!v) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: 'config' has no attribute '%s' (expected a cst.ModelConfig)",
                         fn, name);
            return -1;
        }
        int ok;
        if (kind == 'i') {
            const long long x = PyLong_Check(v) && !PyBool_Check(v) ? PyLong_AsLongLong(v) : -1;
            ok = x >= 1 && x <= ((int64_t)1 << 40);
            *(int64_t *)at = (int64_t)x;
        } else {
            const double x = PyFloat_AsDouble(v);
            ok = x > 0.0 && isfinite(x) && isfinite((float)x) && (float)x > 0.0f;
            *(float *)at = (float)x;
        }
        Py_DECREF(v);
        if (!ok) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s: config.%s must be a positive %s", fn, name,
                         kind == 'i' ? "int" : "finite number");
            return -1;
        }
    }
    if (c->NH % c->NKV || c->HS % 2 || c->HS > ((int64_t)1 << 20) || c->NH > ((int64_t)1 << 20)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: config needs n_heads %% n_kv_heads == 0 and an even head_dim (n_heads=%lld, "
                     "n_kv_heads=%lld, head_dim=%lld)",
                     fn, (long long)c->NH, (long long)c->NKV, (long long)c->HS);
        return -1;
    }
    return 0;
}

/* The scratch size in double precision: rejects sizes whose int64 arithmetic would overflow. */
static int scratch_size_fits(const cst_gen_config *c, double B, double S, double maxT) {
    const double HS = (double)c->HS;
    const double n = B * S * (2.0 * c->C + 2.0 * (c->NH + 2.0 * c->NKV) * HS + c->NH * HS + 3.0 * c->F + HS +
                              1.0 + c->NH * maxT) + B * ((double)c->C + c->V) +
                     B * S * (0.5 * ((double)c->C + c->NH * HS + c->F) + 8.0); /* int8 inputs, generously */
    return n < 4.0e18;
}

_Static_assert(sizeof(cst_gen_config) <= sizeof(((cst_call *)0)->state), "a config fits CST_STATE");

/* Every gen entry point starts from the config: it is read once, and the sizes it fixes are bound
 * before the arrays are checked. */
static int prepare_config(cst_call *c) {
    cst_gen_config *cfg = CST_STATE(c, cst_gen_config);
    if (read_config(c->fn, c->v[0].p, cfg) < 0) return -1;
    cst_dims_set(&c->d, 'L', (npy_intp)cfg->L, "config.n_layers");
    cst_dims_set(&c->d, 'Y', (npy_intp)(cfg->L + 1), "config.n_layers + 1");
    cst_dims_set(&c->d, 'X', (npy_intp)CST_GEN_NROLES, "the layout roles (cst.model.GEN_ROLES)");
    cst_dims_set(&c->d, 'Q', (npy_intp)CST_GEN_QPARTS, "the parts of a quantised fused product (q, k, v)");
    cst_dims_set(&c->d, 'K', (npy_intp)(cfg->NKV * cfg->HS), "config n_kv_heads * head_dim");
    cst_dims_set(&c->d, 'V', (npy_intp)cfg->V, "config.vocab_size");
    cst_dims_set(&c->d, 'H', (npy_intp)(cfg->HS / 2), "half the config's head_dim");
    cst_dims_set(&c->d, 'W', (npy_intp)cst_gen_packed_size(cfg), "gen_packed_size(config)");
    return 0;
}

static void run_gen_packed_size(cst_call *c) { c->ret.i = cst_gen_packed_size(CST_STATE(c, cst_gen_config)); }

static int check_gen_scratch_size(cst_call *c) {
    const long long B = c->v[1].i, S = c->v[2].i, maxT = c->v[3].i;
    if (!scratch_size_fits(CST_STATE(c, cst_gen_config), (double)B, (double)S, (double)maxT)) {
        PyErr_Format(PyExc_ValueError, "%s: scratch for B=%lld, S=%lld, maxT=%lld is too large", c->fn, B, S, maxT);
        return -1;
    }
    return 0;
}

static void run_gen_scratch_size(cst_call *c) {
    c->ret.i = cst_gen_scratch_size(CST_STATE(c, cst_gen_config), c->v[1].i, c->v[2].i, c->v[3].i);
}

/* The layout (argument 2, cst.model.gen_offsets) must place every tensor inside params' P floats; only
 * a layer's q|k|v bias may be absent (-1), and the cells qoff (NULL: none) marks quantised. */
static int check_layout_cells(cst_call *c, const int64_t *qoff) {
    const cst_gen_config *cfg = CST_STATE(c, const cst_gen_config);
    const int64_t *a = c->v[2].p, P = cst_n(c, 'P');
    const int64_t C = cfg->C, QKV = (cfg->NH + 2 * cfg->NKV) * cfg->HS, F = cfg->F;
    const int64_t size[CST_GEN_NROLES] = {C, QKV * C, QKV, C * cfg->NH * cfg->HS, C, 2 * F * C, C * F};
    const int64_t gsize[3] = {cfg->V * C, C, cfg->V * C};
    for (int64_t l = 0; l <= cfg->L; l++)
        for (int r = 0; r < (l < cfg->L ? CST_GEN_NROLES : 3); r++) {
            const int64_t off = a[l * CST_GEN_NROLES + r], n = l < cfg->L ? size[r] : gsize[r];
            if (off == -1 && l < cfg->L && r == CST_GEN_QKV_BIAS) continue;
            if (qoff && qoff[(l * CST_GEN_NROLES + r) * CST_GEN_QPARTS] >= 0) continue;
            if (off < 0 || off > P || n > P - off) {
                PyErr_Format(PyExc_ValueError,
                             "%s: 'layout'[%lld, %d] = %lld places %lld floats outside 'params' (%lld floats)",
                             c->fn, (long long)l, r, (long long)off, (long long)n, (long long)P);
                return -1;
            }
        }
    return 0;
}

static int check_layout(cst_call *c) { return check_layout_cells(c, NULL); }

/* gen_forward's quantised matrices (arguments 13-15, all or none): each marked cell is a matrix role
 * (or the embedding / head) whose parts (all of the role's rows in part 0, or q, k, v / gate, up) are
 * of types it can read and lie, whole rows, inside 'qweights'. */
static int check_quant(cst_call *c) {
    const cst_gen_config *cfg = CST_STATE(c, const cst_gen_config);
    const int given = (c->v[13].p != NULL) + (c->v[14].p != NULL) + (c->v[15].p != NULL);
    if (given == 0) return 0;
    if (given != 3) {
        PyErr_Format(PyExc_ValueError, "%s: 'qweights', 'qoffsets' and 'qtypes' go together", c->fn);
        return -1;
    }
    if (c->v[12].p) {
        PyErr_Format(PyExc_ValueError, "%s: 'packed' and 'qweights' exclude each other", c->fn);
        return -1;
    }
    const int64_t *offs = c->v[14].p, *typs = c->v[15].p, nbytes = (int64_t)c->size[13];
    const int64_t C = cfg->C, QD = cfg->NH * cfg->HS, KVD = cfg->NKV * cfg->HS, F = cfg->F;
    /* (rows, cols) of each role's matrix; 0 rows: not a matrix. The rows of each part when split. */
    const int64_t rows[CST_GEN_NROLES] = {0, QD + 2 * KVD, 0, C, 0, 2 * F, C};
    const int64_t cols[CST_GEN_NROLES] = {0, C, 0, QD, 0, C, F};
    const int64_t qkv_rows[CST_GEN_QPARTS] = {QD, KVD, KVD}, gu_rows[CST_GEN_QPARTS] = {F, F, 0};
    for (int64_t l = 0; l <= cfg->L; l++)
        for (int r = 0; r < CST_GEN_NROLES; r++) {
            const int64_t i = (l * CST_GEN_NROLES + r) * CST_GEN_QPARTS, *off = offs + i, *types = typs + i;
            if (off[0] < 0) continue;
            const int glob = l == cfg->L, embed = glob && r == CST_GEN_EMBED;
            if ((glob && r != CST_GEN_EMBED && r != CST_GEN_HEAD) || (!glob && rows[r] == 0)) {
                PyErr_Format(PyExc_ValueError, "%s: 'qoffsets'[%lld, %d] marks a tensor that is not a weight matrix",
                             c->fn, (long long)l, r);
                return -1;
            }
            const int fused = !glob && (r == CST_GEN_QKV || r == CST_GEN_GU);
            const int nparts = !fused || off[1] < 0 ? 1 : r == CST_GEN_QKV ? 3 : 2;
            for (int p = 1; p < CST_GEN_QPARTS; p++)
                if ((p < nparts) != (off[p] >= 0)) {
                    PyErr_Format(PyExc_ValueError, "%s: 'qoffsets'[%lld, %d] gives %s", c->fn, (long long)l, r,
                                 fused ? "some parts of a fused product, not all (q, k, v; gate, up) or only the first"
                                       : "more than one part of a matrix that is not fused");
                    return -1;
                }
            for (int p = 0; p < nparts; p++) {
                const int64_t nr = glob ? cfg->V : nparts == 1 ? rows[r] : r == CST_GEN_QKV ? qkv_rows[p] : gu_rows[p];
                const int64_t nc = glob ? C : cols[r], o = off[p];
                int64_t be = 0, bb = 0;
                const int type = types[p] < 0 || types[p] > 1024 ? -1 : (int)types[p];
                const int known = type >= 0 && cst_quant_block_info(type, &be, &bb);
                if (!known || type == CST_GGML_F32 || (!embed && !cst_qdot_supported(type) && type != CST_GGML_BF16) ||
                    nc % be) {
                    PyErr_Format(PyExc_ValueError, "%s: 'qtypes'[%lld, %d, %d] = %lld cannot be read here (products: "
                                 "Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12, Q5_K 13, Q6_K 14, BF16 30; the embedding: any ggml "
                                 "block type "
                                 "dequantize reads, in whole rows)",
                                 c->fn, (long long)l, r, p, (long long)types[p]);
                    return -1;
                }
                const int64_t need = nr * (nc / be) * bb;
                if (o > nbytes || need > nbytes - o) {
                    PyErr_Format(PyExc_ValueError, "%s: 'qoffsets'[%lld, %d, %d] = %lld places %lld bytes outside "
                                 "'qweights' (%lld bytes)", c->fn, (long long)l, r, p, (long long)o, (long long)need,
                                 (long long)nbytes);
                    return -1;
                }
                if (type == CST_GGML_BF16 && (((uintptr_t)c->v[13].p + (uintptr_t)o) & 1)) {
                    PyErr_Format(PyExc_ValueError, "%s: 'qoffsets'[%lld, %d, %d] = %lld puts a BF16 matrix at an odd "
                                 "address (bf16 values must be 2-byte aligned)", c->fn, (long long)l, r, p, (long long)o);
                    return -1;
                }
            }
        }
    return 0;
}

static void run_gen_pack(cst_call *c) {
    cst_gen_pack(c->v[3].p, c->v[1].p, CST_STATE(c, cst_gen_config), c->v[2].p);
}

/* What the table cannot say: the tables cover the cache, the scratch is large enough, and each
 * sequence's new tokens fit its cache and the vocabulary. */
static int check_gen_forward(cst_call *c) {
    const cst_gen_config *cfg = CST_STATE(c, const cst_gen_config);
    if (check_quant(c) < 0 || check_layout_cells(c, c->v[13].p ? c->v[14].p : NULL) < 0) return -1;
    if (cst_n(c, 'R') < cst_n(c, 'M')) {
        PyErr_Format(PyExc_ValueError, "%s: 'rope_cos' and 'rope_sin' have %lld positions, the caches %lld",
                     c->fn, (long long)cst_n(c, 'R'), (long long)cst_n(c, 'M'));
        return -1;
    }
    const int64_t B = cst_n(c, 'B'), S = cst_n(c, 'S'), maxT = cst_n(c, 'M');
    if (!scratch_size_fits(cfg, (double)B, (double)S, (double)maxT)) {
        PyErr_Format(PyExc_ValueError, "%s: 'tokens' (B=%lld, S=%lld) and caches (maxT=%lld) need too much scratch",
                     c->fn, (long long)B, (long long)S, (long long)maxT);
        return -1;
    }
    const int64_t need = cst_gen_scratch_size(cfg, B, S, maxT);
    if (cst_n(c, 'Z') < need) {
        PyErr_Format(PyExc_ValueError,
                     "%s: 'scratch' has %lld floats, needs gen_scratch_size(config, B=%lld, S=%lld, "
                     "maxT=%lld) = %lld",
                     c->fn, (long long)cst_n(c, 'Z'), (long long)B, (long long)S, (long long)maxT,
                     (long long)need);
        return -1;
    }
    const int32_t *tokens = c->v[3].p, *start = c->v[4].p, *nnew = c->v[5].p;
    for (int64_t b = 0; b < B; b++) {
        if (nnew[b] < 0 || nnew[b] > S) {
            PyErr_Format(PyExc_ValueError, "%s: 'n_new'[%lld] = %d must lie in [0, S=%lld]", c->fn,
                         (long long)b, (int)nnew[b], (long long)S);
            return -1;
        }
        if (start[b] < 0 || (int64_t)start[b] + nnew[b] > maxT) {
            PyErr_Format(PyExc_ValueError,
                         "%s: 'start_pos'[%lld] = %d with n_new %d does not fit the cache (maxT=%lld)", c->fn,
                         (long long)b, (int)start[b], (int)nnew[b], (long long)maxT);
            return -1;
        }
        if (cst_check_range_i32(c->fn, "tokens", tokens + b * S, nnew[b], 0, cfg->V) < 0) return -1;
    }
    return 0;
}

static void run_gen_forward(cst_call *c) {
    const cst_gen_quant q = {c->v[13].p, c->v[14].p, c->v[15].p};
    cst_gen_forward(c->v[11].p, c->v[8].p, c->v[9].p, c->v[10].p, c->v[1].p, c->v[12].p, c->v[3].p, c->v[4].p,
                    c->v[5].p, c->v[6].p, c->v[7].p, CST_STATE(c, const cst_gen_config), c->v[2].p, cst_n(c, 'B'),
                    cst_n(c, 'S'), cst_n(c, 'M'), c->v[13].p ? &q : NULL);
}

#define CONFIG {"config", CST_OBJECT}
/* The kernel reads what it writes: no written buffer may overlap another argument. */
#define OUT(name, dims) {name, CST_F32, dims, CST_WRITE | CST_EXCLUSIVE}

const cst_entry cst_gen_entries[] = {
    {"gen_packed_size", run_gen_packed_size, {CONFIG}, .prepare = prepare_config, .ret = CST_RET_INT,
     .doc = "Returns int: float32 elements gen_pack writes."},
    {"gen_pack", run_gen_pack,
     {CONFIG, {"params", CST_F32, "P"}, {"layout", CST_I64, "YX"}, OUT("out", "W")},
     .prepare = prepare_config, .check = check_layout,
     .doc = "layout (L+1, 7) int64 from cst.model.gen_offsets places each tensor in params; packs every weight matrix of params into out "
            "(gen_packed_size(config) floats, the same layout on every SIMD path) for gen_forward(packed=out). "
            "Pack again after the weights change."},
    {"gen_scratch_size", run_gen_scratch_size,
     {CONFIG,
      {"B", CST_INT64, .range = "[0, 16777216]"},
      {"S", CST_INT64, .range = "[0, 16777216]"},
      {"maxT", CST_INT64, .range = "[0, 16777216]"}},
     .prepare = prepare_config, .check = check_gen_scratch_size, .ret = CST_RET_INT,
     .doc = "Returns int: float32 scratch elements gen_forward needs."},
    {"gen_forward", run_gen_forward,
     {CONFIG,
      {"params", CST_F32, "P"},
      {"layout", CST_I64, "YX"},
      {"tokens", CST_I32, "BS"},
      {"start_pos", CST_I32, "B"},
      {"n_new", CST_I32, "B"},
      {"rope_cos", CST_F32, "RH"},
      {"rope_sin", CST_F32, "RH"},
      OUT("kcache", "LBMK"),
      OUT("vcache", "LBMK"),
      OUT("scratch", "Z"),
      OUT("logits", "BV"),
      {"packed", CST_F32, "W", CST_NONE, .def = "None"},
      {"qweights", CST_U8, "*", CST_NONE, .def = "None"},
      {"qoffsets", CST_I64, "YXQ", CST_NONE, .def = "None"},
      {"qtypes", CST_I64, "YXQ", CST_NONE, .def = "None"}},
     .prepare = prepare_config, .check = check_gen_forward,
     .doc = "layout (L+1, 7) int64 from cst.model.gen_offsets places each tensor in params; appends tokens (B,S) int32 [b, :n_new[b]] at positions start_pos[b].. of each sequence's "
            "KV cache, rotary tables (>=maxT, HS/2) from cst.ops.rope_tables, "
            "(L,B,maxT,NKV*HS) and writes the logits of each active sequence's last new token into logits "
            "(B,V); rows with n_new 0 are untouched. packed (from gen_pack, optional): the weights "
            "packed once, so that products of few rows run through the GEMM microkernel. qweights (uint8), qoffsets and "
            "qtypes ((L+1, 7, 3) int64, optional, together): matrices read from GGUF blocks at those byte offsets "
            "(-1: from params), rows in the fused order, [..., 0] the whole matrix or [..., 0:3] the parts q, k, "
            "v (gate, up) of a fused product whose matrices differ in type; their layout cells are ignored."},
    {NULL},
};
