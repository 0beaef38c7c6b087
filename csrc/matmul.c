/* matmul.c: linear-layer products (see matmul.h) mapped onto the packed GEMM / GEMV kernels of
 * gemm.c, plus their Python boundary. No arithmetic of its own. */
#include "glue.h"
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

PyMethodDef cst_matmul_methods[] = {
    {"matmul_forward", (PyCFunction)(void (*)(void))py_matmul_forward, METH_VARARGS | METH_KEYWORDS,
     "matmul_forward(out, inp, weight, accumulate=False): out (N,OC) = inp (N,C) @ weight (OC,C)^T."},
    {"matmul_backward", (PyCFunction)(void (*)(void))py_matmul_backward, METH_VARARGS | METH_KEYWORDS,
     "matmul_backward(dinp, dweight, dout, inp, weight): dinp += dout @ weight; dweight += dout^T @ inp "
     "(either output may be None)."},
    {NULL, NULL, 0, NULL},
};
