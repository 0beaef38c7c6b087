/* matmul.c: linear-layer products (see matmul.h) mapped onto the packed GEMM / GEMV kernels of
 * gemm.c, plus their Python boundary. No arithmetic of its own. */
#include "glue.h"
#include "bf16.h"
#include <string.h>
#include "gemm.h"
#include "matmul.h"

/* Tiny batches (token-by-token generation) stream the weight once with dot products instead of
 * packing it: packing a 49152 x 576 weight for one row would cost more than the product. Measured on
 * Zen 4, the dot-product path wins up to N ~ 32-64 for OC = 49152 and ties the GEMM at N = 64. */
#define GEMV_MAX_ROWS 32

void cst_matmul_forward(float *out, const float *inp, const float *weight, int64_t N, int64_t C,
                        int64_t OC, int accumulate) {
    if (N <= GEMV_MAX_ROWS)
        cst_gemv_nt(out, inp, weight, N, C, OC, accumulate);
    else if (OC <= CST_THIN_MAX_COLS) /* LoRA's h = x A^T */
        cst_gemm_thin_nt(out, inp, weight, N, C, OC, accumulate);
    else /* out = inp @ B with B(k, j) = weight[j*C + k] */
        cst_gemm(out, OC, inp, C, 1, weight, 1, C, N, OC, C, accumulate);
}

void cst_matmul_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                         const float *weight, int64_t N, int64_t C, int64_t OC) {
    /* dinp (N, C) += dout (N, OC) @ weight (OC, C): both operands row-major. */
    if (dinp && C <= CST_THIN_MAX_COLS && N > GEMV_MAX_ROWS) /* LoRA's dh = dy B */
        cst_gemm_thin_nn(dinp, dout, weight, N, OC, C, 1);
    else if (dinp)
        cst_gemm(dinp, C, dout, OC, 1, weight, C, 1, N, C, OC, 1);
    /* dweight (OC, C) += dout^T @ inp: A(o, n) = dout[n*OC + o] is read transposed while packing. */
    if (dweight && C <= CST_THIN_MAX_COLS) /* LoRA's dB = dy^T h */
        cst_gemm_thin_tn(dweight, dout, inp, OC, C, N, 1);
    else if (dweight)
        cst_gemm(dweight, C, dout, 1, OC, inp, C, 1, OC, C, N, 1);
}

int cst_matmul_bf16_forward(float *out, const float *inp, const uint16_t *weight, int64_t N, int64_t C,
                            int64_t OC, int accumulate) {
    return cst_gemm_bf16_nt(out, inp, weight, N, C, OC, accumulate);
}

int cst_matmul_bf16_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                             const uint16_t *weight, int64_t N, int64_t C, int64_t OC) {
    if (dinp && cst_gemm_bf16_nn(dinp, dout, weight, N, OC, C, 1) < 0) return -1;
    if (dweight && cst_gemm_bf16_tn(dweight, dout, inp, N, OC, C, 1) < 0) return -1;
    return 0;
}

/* ---- Python boundary ---- */

static PyObject *py_matmul_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *fn = "matmul_forward";
    static char *kwlist[] = {"out", "inp", "weight", "accumulate", NULL};
    PyObject *o_out, *o_inp, *o_w;
    int accumulate = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|p:matmul_forward", kwlist, &o_out, &o_inp, &o_w,
                                     &accumulate))
        return NULL;
    cst_dims d;
    cst_dims_init(&d);
    void *out, *inp, *w;
    if (cst_arg(fn, "inp", o_inp, NPY_FLOAT32, "NC", &d, 0, &inp) < 0 ||
        cst_arg(fn, "weight", o_w, NPY_FLOAT32, "OC", &d, 0, &w) < 0 ||
        cst_arg(fn, "out", o_out, NPY_FLOAT32, "NO", &d, CST_WRITE, &out) < 0)
        return NULL;
    int64_t N = cst_dim(&d, 'N'), C = cst_dim(&d, 'C'), OC = cst_dim(&d, 'O');
    Py_BEGIN_ALLOW_THREADS
    cst_matmul_forward(out, inp, w, N, C, OC, accumulate);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_matmul_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *fn = "matmul_backward";
    static char *kwlist[] = {"dinp", "dweight", "dout", "inp", "weight", NULL};
    PyObject *o_dinp, *o_dw, *o_dout, *o_inp, *o_w;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO:matmul_backward", kwlist, &o_dinp, &o_dw,
                                     &o_dout, &o_inp, &o_w))
        return NULL;
    cst_dims d;
    cst_dims_init(&d);
    void *dinp, *dw, *dout, *inp, *w;
    if (cst_arg(fn, "inp", o_inp, NPY_FLOAT32, "NC", &d, 0, &inp) < 0 ||
        cst_arg(fn, "weight", o_w, NPY_FLOAT32, "OC", &d, 0, &w) < 0 ||
        cst_arg(fn, "dout", o_dout, NPY_FLOAT32, "NO", &d, 0, &dout) < 0 ||
        cst_arg(fn, "dinp", o_dinp, NPY_FLOAT32, "NC", &d, CST_WRITE | CST_OPTIONAL, &dinp) < 0 ||
        cst_arg(fn, "dweight", o_dw, NPY_FLOAT32, "OC", &d, CST_WRITE | CST_OPTIONAL, &dw) < 0)
        return NULL;
    int64_t N = cst_dim(&d, 'N'), C = cst_dim(&d, 'C'), OC = cst_dim(&d, 'O');
    Py_BEGIN_ALLOW_THREADS
    cst_matmul_backward(dinp, dw, dout, inp, w, N, C, OC);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_matmul_bf16_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *fn = "matmul_bf16_forward";
    static char *kwlist[] = {"out", "inp", "weight", "accumulate", NULL};
    PyObject *o_out, *o_inp, *o_w;
    int accumulate = 0, st;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|p:matmul_bf16_forward", kwlist, &o_out, &o_inp, &o_w,
                                     &accumulate))
        return NULL;
    cst_dims d;
    cst_dims_init(&d);
    void *out, *inp, *w;
    if (cst_arg(fn, "inp", o_inp, NPY_FLOAT32, "NC", &d, 0, &inp) < 0 ||
        cst_arg(fn, "weight", o_w, NPY_UINT16, "OC", &d, 0, &w) < 0 ||
        cst_arg(fn, "out", o_out, NPY_FLOAT32, "NO", &d, CST_WRITE, &out) < 0)
        return NULL;
    int64_t N = cst_dim(&d, 'N'), C = cst_dim(&d, 'C'), OC = cst_dim(&d, 'O');
    Py_BEGIN_ALLOW_THREADS
    st = cst_matmul_bf16_forward(out, inp, w, N, C, OC, accumulate);
    Py_END_ALLOW_THREADS
    if (st < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_matmul_bf16_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *fn = "matmul_bf16_backward";
    static char *kwlist[] = {"dinp", "dweight", "dout", "inp", "weight", NULL};
    PyObject *o_dinp, *o_dw, *o_dout, *o_inp, *o_w;
    int st;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO:matmul_bf16_backward", kwlist, &o_dinp, &o_dw,
                                     &o_dout, &o_inp, &o_w))
        return NULL;
    cst_dims d;
    cst_dims_init(&d);
    void *dinp, *dw, *dout, *inp, *w;
    if (cst_arg(fn, "inp", o_inp, NPY_FLOAT32, "NC", &d, 0, &inp) < 0 ||
        cst_arg(fn, "weight", o_w, NPY_UINT16, "OC", &d, 0, &w) < 0 ||
        cst_arg(fn, "dout", o_dout, NPY_FLOAT32, "NO", &d, 0, &dout) < 0 ||
        cst_arg(fn, "dinp", o_dinp, NPY_FLOAT32, "NC", &d, CST_WRITE | CST_OPTIONAL, &dinp) < 0 ||
        cst_arg(fn, "dweight", o_dw, NPY_FLOAT32, "OC", &d, CST_WRITE | CST_OPTIONAL, &dw) < 0)
        return NULL;
    int64_t N = cst_dim(&d, 'N'), C = cst_dim(&d, 'C'), OC = cst_dim(&d, 'O');
    Py_BEGIN_ALLOW_THREADS
    st = cst_matmul_bf16_backward(dinp, dw, dout, inp, w, N, C, OC);
    Py_END_ALLOW_THREADS
    if (st < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* bf16_from_f32 / bf16_to_f32: one (n,) array converted into another; to_bf16 picks the direction. */
static PyObject *bf16_convert(PyObject *args, PyObject *kw, const char *fn, const char *format, int to_bf16) {
    static char *kwlist[] = {"dst", "src", NULL};
    PyObject *o_dst, *o_src;
    if (!PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, &o_dst, &o_src)) return NULL;
    cst_dims d;
    cst_dims_init(&d);
    void *dst, *src;
    if (cst_arg(fn, "src", o_src, to_bf16 ? NPY_FLOAT32 : NPY_UINT16, "N", &d, 0, &src) < 0 ||
        cst_arg(fn, "dst", o_dst, to_bf16 ? NPY_UINT16 : NPY_FLOAT32, "N", &d, CST_WRITE, &dst) < 0)
        return NULL;
    int64_t n = cst_dim(&d, 'N');
    Py_BEGIN_ALLOW_THREADS
    if (to_bf16) cst_bf16_rows_f32(dst, src, n, 1, n, n);
    else cst_bf16_to_f32_n(dst, src, n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_bf16_from_f32(PyObject *self, PyObject *args, PyObject *kw) {
    return bf16_convert(args, kw, "bf16_from_f32", "OO:bf16_from_f32", 1);
}

static PyObject *py_bf16_to_f32(PyObject *self, PyObject *args, PyObject *kw) {
    return bf16_convert(args, kw, "bf16_to_f32", "OO:bf16_to_f32", 0);
}

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
    {"matmul_forward", (PyCFunction)(void (*)(void))py_matmul_forward, METH_VARARGS | METH_KEYWORDS,
     "matmul_forward(out, inp, weight, accumulate=False): out (N,OC) = inp (N,C) @ weight (OC,C)^T."},
    {"matmul_backward", (PyCFunction)(void (*)(void))py_matmul_backward, METH_VARARGS | METH_KEYWORDS,
     "matmul_backward(dinp, dweight, dout, inp, weight): dinp += dout @ weight; dweight += dout^T @ inp "
     "(either output may be None)."},
    {"matmul_bf16_forward", (PyCFunction)(void (*)(void))py_matmul_bf16_forward, METH_VARARGS | METH_KEYWORDS,
     "matmul_bf16_forward(out, inp, weight, accumulate=False): out (N,OC) fp32 = bf16(inp) (N,C) @ weight^T, "
     "weight (OC,C) bf16 as uint16; fp32 accumulation."},
    {"matmul_bf16_backward", (PyCFunction)(void (*)(void))py_matmul_bf16_backward, METH_VARARGS | METH_KEYWORDS,
     "matmul_bf16_backward(dinp, dweight, dout, inp, weight): dinp += bf16(dout) @ weight; dweight (fp32) += "
     "bf16(dout)^T @ bf16(inp) (either output may be None)."},
    {"bf16_from_f32", (PyCFunction)(void (*)(void))py_bf16_from_f32, METH_VARARGS | METH_KEYWORDS,
     "bf16_from_f32(dst, src): dst (n,) uint16 = src (n,) float32 rounded to bf16 (nearest even)."},
    {"bf16_to_f32", (PyCFunction)(void (*)(void))py_bf16_to_f32, METH_VARARGS | METH_KEYWORDS,
     "bf16_to_f32(dst, src): dst (n,) float32 = src (n,) bf16 (uint16), exact."},
    {"bf16_gemm_way", py_bf16_gemm_way, METH_VARARGS,
     "bf16_gemm_way(way=None): sets 'amx' (tiles), 'dot' (vdpbf16ps) or 'convert' (fp32 GEMM on bf16-rounded "
     "inputs) if "
     "given; returns the way the current SIMD path uses."},
    {NULL, NULL, 0, NULL},
};
