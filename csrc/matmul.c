/* matmul.c: linear-layer products (see matmul.h). Portable reference path: correct and
 * deterministic, with 8 fixed partial sums so compilers vectorise without reassociation. */
#include "glue.h"
#include "matmul.h"

static float dot_f32(const float *a, const float *b, int64_t n) {
    /* Eight interleaved partial sums in a fixed order: vectorisable, and the same on every run. */
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void cst_matmul_forward(float *out, const float *inp, const float *weight, int64_t N, int64_t C,
                        int64_t OC, int accumulate) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *x = inp + n * C;
        float *y = out + n * OC;
        for (int64_t o = 0; o < OC; o++) {
            float s = dot_f32(x, weight + o * C, C);
            y[o] = accumulate ? y[o] + s : s;
        }
    }
}

void cst_matmul_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                         const float *weight, int64_t N, int64_t C, int64_t OC) {
    if (dinp) {
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            float *dx = dinp + n * C;
            const float *dy = dout + n * OC;
            for (int64_t o = 0; o < OC; o++) {
                const float g = dy[o];
                const float *w = weight + o * C;
                for (int64_t c = 0; c < C; c++) dx[c] += g * w[c];
            }
        }
    }
    if (dweight) {
#pragma omp parallel for schedule(static)
        for (int64_t o = 0; o < OC; o++) {
            float *dw = dweight + o * C;
            for (int64_t n = 0; n < N; n++) {
                const float g = dout[n * OC + o];
                const float *x = inp + n * C;
                for (int64_t c = 0; c < C; c++) dw[c] += g * x[c];
            }
        }
    }
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
