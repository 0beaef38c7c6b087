/* python/matmul.c: the entry rows of the linear-layer products (matmul.h). Boundary only: no arithmetic. */
#include "glue.h"
#include "bf16.h"
#include "gemm.h"
#include "matmul.h"
#include <string.h>

static void run_matmul_forward(cst_call *c) {
    cst_matmul_forward(c->v[0].p, c->v[1].p, c->v[2].p, cst_n(c, 'N'), cst_n(c, 'C'), cst_n(c, 'O'),
                       (int)c->v[3].i);
}

static void run_matmul_backward(cst_call *c) {
    cst_matmul_backward(c->v[0].p, c->v[1].p, c->v[2].p, c->v[3].p, c->v[4].p, cst_n(c, 'N'), cst_n(c, 'C'),
                        cst_n(c, 'O'), (int)c->v[5].i);
}

static void run_matmul_bf16_forward(cst_call *c) {
    c->failed = cst_matmul_bf16_forward(c->v[0].p, c->v[1].p, c->v[2].p, cst_n(c, 'N'), cst_n(c, 'C'),
                                        cst_n(c, 'O'), (int)c->v[3].i) < 0;
}

static void run_matmul_bf16_backward(cst_call *c) {
    c->failed = cst_matmul_bf16_backward(c->v[0].p, c->v[1].p, c->v[2].p, c->v[3].p, c->v[4].p, cst_n(c, 'N'),
                                         cst_n(c, 'C'), cst_n(c, 'O'), (int)c->v[5].i) < 0;
}

/* dinp/inp (N, S) and dout (N, R) hold the product's operands as column blocks [in_col, in_col + C) and
 * [out_col, out_col + O). */
static void run_matmul_backward_block(cst_call *c) {
    const int64_t S = cst_n(c, 'S'), R = cst_n(c, 'R'), in_col = c->v[6].i;
    float *dinp = c->v[0].p;
    cst_matmul_backward_ld(dinp ? dinp + in_col : NULL, S, c->v[1].p, (const float *)c->v[2].p + c->v[5].i, R,
                           (const float *)c->v[3].p + in_col, S, c->v[4].p, cst_n(c, 'N'), cst_n(c, 'C'),
                           cst_n(c, 'O'), (int)c->v[7].i);
}

static int check_column_blocks(cst_call *c) {
    const int64_t out_col = c->v[5].i, in_col = c->v[6].i;
    if (out_col + cst_n(c, 'O') > cst_n(c, 'R')) {
        PyErr_Format(PyExc_ValueError, "%s: out_col %lld + weight's %lld rows exceed dout's %lld columns", c->fn,
                     (long long)out_col, (long long)cst_n(c, 'O'), (long long)cst_n(c, 'R'));
        return -1;
    }
    if (in_col + cst_n(c, 'C') > cst_n(c, 'S')) {
        PyErr_Format(PyExc_ValueError, "%s: in_col %lld + weight's %lld columns exceed inp's %lld columns", c->fn,
                     (long long)in_col, (long long)cst_n(c, 'C'), (long long)cst_n(c, 'S'));
        return -1;
    }
    return 0;
}

static void run_gemv_bf16(cst_call *c) {
    cst_gemv_bf16_nt(c->v[0].p, cst_n(c, 'O'), c->v[1].p, c->v[2].p, cst_n(c, 'N'), cst_n(c, 'C'), cst_n(c, 'O'),
                     (int)c->v[3].i);
}

static void run_bf16_from_f32(cst_call *c) {
    const int64_t n = cst_n(c, 'N');
    cst_bf16_rows_f32(c->v[0].p, c->v[1].p, n, 1, n, n);
}

static void run_bf16_to_f32(cst_call *c) { cst_bf16_to_f32_n(c->v[0].p, c->v[1].p, cst_n(c, 'N')); }

const cst_entry cst_matmul_entries[] = {
    {"matmul_forward", run_matmul_forward,
     {{"out", CST_F32, "NO", CST_WRITE},
      {"inp", CST_F32, "NC", CST_FIRST},
      {"weight", CST_F32, "OC"},
      {"accumulate", CST_FLAG, .def = "False"}},
     .doc = "out (N,OC) = inp (N,C) @ weight (OC,C)^T."},
    {"matmul_backward", run_matmul_backward,
     {{"dinp", CST_F32, "NC", CST_WRITE | CST_NONE},
      {"dweight", CST_F32, "OC", CST_WRITE | CST_NONE},
      {"dout", CST_F32, "NO"},
      {"inp", CST_F32, "NC", CST_FIRST},
      {"weight", CST_F32, "OC", CST_FIRST},
      {"accumulate", CST_FLAG, .def = "True"}},
     .doc = "dinp += dout @ weight (= with accumulate=False); dweight += dout^T @ inp "
            "(either output may be None)."},
    {"matmul_bf16_forward", run_matmul_bf16_forward,
     {{"out", CST_F32, "NO", CST_WRITE | CST_EXCLUSIVE},
      {"inp", CST_F32, "NC", CST_FIRST},
      {"weight", CST_U16, "OC"},
      {"accumulate", CST_FLAG, .def = "False"}},
     .doc = "out (N,OC) = bf16(inp) (N,C) @ weight (OC,C, bf16 bits as uint16)^T, accumulated in fp32."},
    {"matmul_bf16_backward", run_matmul_bf16_backward,
     {{"dinp", CST_F32, "NC", CST_WRITE | CST_NONE | CST_EXCLUSIVE},
      {"dweight", CST_F32, "OC", CST_WRITE | CST_NONE | CST_EXCLUSIVE},
      {"dout", CST_F32, "NO"},
      {"inp", CST_F32, "NC", CST_FIRST},
      {"weight", CST_U16, "OC", CST_FIRST},
      {"accumulate", CST_FLAG, .def = "True"}},
     .doc = "dinp += bf16(dout) @ weight (= with accumulate=False); dweight += bf16(dout)^T @ bf16(inp), "
            "fp32 accumulation (either output may be None)."},
    {"gemv_bf16", run_gemv_bf16,
     {{"out", CST_F32, "NO", CST_WRITE | CST_EXCLUSIVE},
      {"inp", CST_U16, "NC", CST_FIRST},
      {"weight", CST_U16, "OC"},
      {"accumulate", CST_FLAG, .def = "False"}},
     .doc = "out (N,OC) (+)= inp (N,C) @ weight (OC,C)^T, both bf16 bits (uint16), fp32 sums: generation's "
            "product on a bf16 base (one chain per output, so N and the thread count do not change a row)."},
    {"matmul_backward_block", run_matmul_backward_block,
     {{"dinp", CST_F32, "NS", CST_WRITE | CST_NONE | CST_EXCLUSIVE},
      {"dweight", CST_F32, "OC", CST_WRITE | CST_NONE | CST_EXCLUSIVE},
      {"dout", CST_F32, "NR"},
      {"inp", CST_F32, "NS", CST_FIRST},
      {"weight", CST_F32, "OC", CST_FIRST},
      {"out_col", CST_INT64, .range = ">= 0"},
      {"in_col", CST_INT64, .range = ">= 0"},
      {"accumulate", CST_FLAG, .def = "True"}},
     .check = check_column_blocks,
     .doc = "matmul_backward on column blocks: dinp[:, in_col:in_col+C] (+)= dout[:, out_col:out_col+O] @ weight "
            "(O,C) (= with accumulate=False); dweight += dout[:, out_col:out_col+O]^T @ inp[:, in_col:in_col+C] "
            "(either output may be None); the rest of dinp is not touched."},
    {"bf16_from_f32", run_bf16_from_f32,
     {{"dst", CST_U16, "N", CST_WRITE | CST_EXCLUSIVE}, {"src", CST_F32, "N", CST_FIRST}},
     .doc = "dst (N,) uint16 = src (N,) float32 rounded to bf16 (nearest even), as torch converts."},
    {"bf16_to_f32", run_bf16_to_f32,
     {{"dst", CST_F32, "N", CST_WRITE | CST_EXCLUSIVE}, {"src", CST_U16, "N", CST_FIRST}},
     .doc = "dst (N,) float32 = src (N,) bf16 bits (exact)."},
    {NULL},
};

/* Not a kernel entry point: which bf16 GEMM kernel runs (and, given a name, chooses it). */
static PyObject *py_bf16_gemm_way(PyObject *self, PyObject *args) {
    const char *way = NULL;
    if (!PyArg_ParseTuple(args, "|z:bf16_gemm_way", &way)) return NULL;
    if (way) {
        const int w = !strcmp(way, "dot") ? CST_BF16_DOT : !strcmp(way, "amx") ? CST_BF16_AMX
                      : !strcmp(way, "convert") ? CST_BF16_CONVERT : -2;
        if (w == -2)
            return PyErr_Format(PyExc_ValueError, "bf16_gemm_way: unknown way '%s' (amx, dot or convert)", way);
        if (cst_gemm_bf16_set_way(w) < 0)
            return PyErr_Format(PyExc_ValueError, "bf16_gemm_way: this CPU (or OS) cannot run '%s'", way);
    }
    const int w = cst_gemm_bf16_way();
    return PyUnicode_FromString(w == CST_BF16_DOT ? "dot" : w == CST_BF16_AMX ? "amx" : "convert");
}

PyMethodDef cst_matmul_methods[] = {
    {"bf16_gemm_way", py_bf16_gemm_way, METH_VARARGS,
     "bf16_gemm_way(way=None) -> 'amx' | 'dot' | 'convert': the bf16 GEMM kernel in use; a name chooses it "
     "(ValueError when this CPU cannot run it)."},
    {NULL, NULL, 0, NULL},
};
