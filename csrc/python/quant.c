/* python/quant.c: the entry row of GGUF block decoding (quant.h), and quant_block_info. Boundary only. */
#include "glue.h"
#include "quant.h"

typedef struct {
    int64_t n_blocks;
} dequant_state;

/* Both arrays are flat buffers of any shape: raw must hold whole blocks that decode to out's size. */
static int check_dequantize(cst_call *c) {
    const int type = (int)c->v[2].i;
    int64_t be, bb;
    if (!cst_quant_block_info(type, &be, &bb)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: unknown or unsupported ggml type_id %d (supported: F32 0, F16 1, Q4_0 2, "
                     "Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12, Q5_K 13, Q6_K 14, BF16 30)",
                     c->fn, type);
        return -1;
    }
    const char *tname = cst_quant_type_name(type);
    const int64_t nbytes = (int64_t)c->size[1], nout = (int64_t)c->size[0];
    if (nbytes % bb) {
        PyErr_Format(PyExc_ValueError,
                     "%s: 'raw' has %lld bytes, not a whole number of %s blocks (%lld bytes each)", c->fn,
                     (long long)nbytes, tname, (long long)bb);
        return -1;
    }
    const int64_t n_blocks = nbytes / bb;
    if (n_blocks * be != nout) {
        PyErr_Format(PyExc_ValueError,
                     "%s: 'raw' holds %lld %s blocks = %lld values, but 'out' has %lld elements", c->fn,
                     (long long)n_blocks, tname, (long long)(n_blocks * be), (long long)nout);
        return -1;
    }
    CST_STATE(c, dequant_state)->n_blocks = n_blocks;
    return 0;
}

static void run_dequantize(cst_call *c) {
    cst_dequantize(c->v[0].p, c->v[1].p, CST_STATE(c, dequant_state)->n_blocks, (int)c->v[2].i);
}

const cst_entry cst_quant_entries[] = {
    {"dequantize", run_dequantize,
     {{"out", CST_F32, "*", CST_WRITE},
      {"raw", CST_U8, "*"},
      {"type_id", CST_INT64, .range = "[0, 2147483647]"}},
     .check = check_dequantize,
     .doc = "decode ggml blocks in raw (uint8, any shape) into out (float32, "
            "n_blocks * block_elems values). Raises ValueError for an unknown type or mismatched sizes."},
    {NULL},
};

/* Not a kernel: a table lookup returning a tuple. */
static PyObject *py_quant_block_info(PyObject *self, PyObject *args) {
    int type;
    if (!PyArg_ParseTuple(args, "i:quant_block_info", &type)) return NULL;
    int64_t be, bb;
    if (!cst_quant_block_info(type, &be, &bb)) {
        PyErr_Format(PyExc_ValueError, "quant_block_info: unknown or unsupported ggml type_id %d", type);
        return NULL;
    }
    return Py_BuildValue("(sLL)", cst_quant_type_name(type), (long long)be, (long long)bb);
}

PyMethodDef cst_quant_methods[] = {
    {"quant_block_info", py_quant_block_info, METH_VARARGS,
     "quant_block_info(type_id) -> (name, block_elems, block_bytes) for a type dequantize decodes."},
    {NULL, NULL, 0, NULL},
};
