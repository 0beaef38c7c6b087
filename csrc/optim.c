/* optim.c: AdamW and the sum of squares for gradient clipping (see optim.h), with their NumPy
 * boundary. Element-wise over flat arrays; the reduction uses a fixed chunking, not the thread count. */
#include "glue.h"
#include "optim.h"
#include <math.h>

typedef struct {
    float decay, w1, b2, w2, neg_step_size, bc2_sqrt, eps, grad_scale;
} adamw_consts;

/* The loop stays scalar: sqrtf may set errno, so GCC guards each call with a branch (only
 * -fno-math-errno lifts that, and this build does not use it). About 9 ns per element on one core,
 * small next to a forward/backward pass over the same parameters. */
static inline __attribute__((always_inline)) void adamw_range(float *param, float *m, float *v,
                                                            const float *grad, int64_t lo,
                                                            int64_t hi, adamw_consts k,
                                                            int lerp_low) {
    for (int64_t i = lo; i < hi; i++) {
        const float g = grad[i] * k.grad_scale;
        const float p = param[i] * k.decay; /* decay is exactly 1 without weight decay */
        /* torch.lerp's two forms, chosen by the weight, for its rounding. */
        const float mi = lerp_low ? m[i] + k.w1 * (g - m[i]) : g - (g - m[i]) * (1.0f - k.w1);
        const float vi = v[i] * k.b2 + k.w2 * g * g;
        const float denom = sqrtf(vi) / k.bc2_sqrt + k.eps;
        param[i] = p + k.neg_step_size * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

/* Two instances so that the lerp form is a constant inside each loop. */
static void adamw_range_low(float *param, float *m, float *v, const float *grad, int64_t lo,
                            int64_t hi, adamw_consts k) {
    adamw_range(param, m, v, grad, lo, hi, k, 1);
}
static void adamw_range_high(float *param, float *m, float *v, const float *grad, int64_t lo,
                             int64_t hi, adamw_consts k) {
    adamw_range(param, m, v, grad, lo, hi, k, 0);
}

/* Elements per parallel chunk: element-wise work, so any split gives the same bits. */
#define CST_ADAMW_CHUNK 16384

void cst_adamw_step(float *param, float *m, float *v, const float *grad, int64_t n, double lr,
                    double beta1, double beta2, double eps, double weight_decay, int64_t step,
                    float grad_scale) {
    /* Scalars are formed in double and rounded to float once, as PyTorch does with Python floats
     * passed to float32 tensor ops. */
    adamw_consts k;
    k.decay = weight_decay != 0.0 ? (float)(1.0 - lr * weight_decay) : 1.0f;
    k.w1 = (float)(1.0 - beta1);
    k.b2 = (float)beta2;
    k.w2 = (float)(1.0 - beta2);
    const double bc1 = 1.0 - pow(beta1, (double)step);
    const double bc2 = 1.0 - pow(beta2, (double)step);
    k.neg_step_size = (float)(-(lr / bc1));
    k.bc2_sqrt = (float)sqrt(bc2);
    k.eps = (float)eps;
    k.grad_scale = grad_scale;
    void (*range)(float *, float *, float *, const float *, int64_t, int64_t, adamw_consts) =
        fabs(1.0 - beta1) < 0.5 ? adamw_range_low : adamw_range_high;
    const int64_t nchunk = (n + CST_ADAMW_CHUNK - 1) / CST_ADAMW_CHUNK;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nchunk; c++) {
        const int64_t lo = c * CST_ADAMW_CHUNK;
        const int64_t hi = n - lo < CST_ADAMW_CHUNK ? n : lo + CST_ADAMW_CHUNK;
        range(param, m, v, grad, lo, hi, k);
    }
}

/* Chunks of the sum of squares: fixed, so the order of additions is the same for any thread count;
 * many enough that all threads get work on a 135M-element gradient. */
#define CST_SUMSQ_CHUNKS 256

double cst_sum_squares(const float *x, int64_t n) {
    double part[CST_SUMSQ_CHUNKS];
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < CST_SUMSQ_CHUNKS; c++) {
        const int64_t lo = n * c / CST_SUMSQ_CHUNKS, hi = n * (c + 1) / CST_SUMSQ_CHUNKS;
        double acc[8] = {0};
        int64_t i = lo;
        for (; i + 8 <= hi; i += 8)
            for (int j = 0; j < 8; j++) acc[j] += (double)x[i + j] * (double)x[i + j];
        double s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (; i < hi; i++) s += (double)x[i] * (double)x[i];
        part[c] = s;
    }
    double s = 0.0;
    for (int c = 0; c < CST_SUMSQ_CHUNKS; c++) s += part[c];
    return s;
}

/* ---- Python boundary ---- */

static int check_finite(const char *fn, const char *name, double x) {
    if (!isfinite(x)) {
        PyObject *o = PyFloat_FromDouble(x);
        if (o) PyErr_Format(PyExc_ValueError, "%s: '%s' must be finite, got %R", fn, name, o);
        Py_XDECREF(o);
        return -1;
    }
    return 0;
}

static PyObject *py_adamw_step(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *fn = "adamw_step";
    static char *kwlist[] = {"param", "grad", "m", "v", "lr", "beta1", "beta2", "eps",
                             "weight_decay", "step", "grad_scale", NULL};
    PyObject *o_p, *o_g, *o_m, *o_v;
    double lr, beta1, beta2, eps, wd, gs = 1.0;
    long long step;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOdddddL|d:adamw_step", kwlist, &o_p, &o_g, &o_m,
                                     &o_v, &lr, &beta1, &beta2, &eps, &wd, &step, &gs))
        return NULL;
    if (check_finite(fn, "lr", lr) < 0 || check_finite(fn, "eps", eps) < 0 ||
        check_finite(fn, "weight_decay", wd) < 0 || check_finite(fn, "grad_scale", gs) < 0)
        return NULL;
    if (!(beta1 >= 0.0 && beta1 < 1.0) || !(beta2 >= 0.0 && beta2 < 1.0)) {
        PyErr_Format(PyExc_ValueError, "%s: 'beta1' and 'beta2' must lie in [0, 1)", fn);
        return NULL;
    }
    if (lr < 0.0 || eps < 0.0 || wd < 0.0) {
        PyErr_Format(PyExc_ValueError, "%s: 'lr', 'eps' and 'weight_decay' must be >= 0", fn);
        return NULL;
    }
    if (step < 1) {
        PyErr_Format(PyExc_ValueError, "%s: 'step' must be >= 1 (the count including this step), got %lld",
                     fn, step);
        return NULL;
    }
    cst_dims d;
    cst_dims_init(&d);
    void *p, *g, *m, *v;
    if (cst_arg(fn, "param", o_p, NPY_FLOAT32, "N", &d, CST_WRITE, &p) < 0 ||
        cst_arg(fn, "grad", o_g, NPY_FLOAT32, "N", &d, 0, &g) < 0 ||
        cst_arg(fn, "m", o_m, NPY_FLOAT32, "N", &d, CST_WRITE, &m) < 0 ||
        cst_arg(fn, "v", o_v, NPY_FLOAT32, "N", &d, CST_WRITE, &v) < 0)
        return NULL;
    if (p == m || p == v || m == v || g == m || g == v || g == p) {
        PyErr_Format(PyExc_ValueError, "%s: 'param', 'grad', 'm' and 'v' must be distinct arrays", fn);
        return NULL;
    }
    int64_t n = cst_dim(&d, 'N');
    Py_BEGIN_ALLOW_THREADS
    cst_adamw_step(p, m, v, g, n, lr, beta1, beta2, eps, wd, step, (float)gs);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_sum_squares(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *fn = "sum_squares";
    static char *kwlist[] = {"x", NULL};
    PyObject *o_x;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:sum_squares", kwlist, &o_x)) return NULL;
    cst_dims d;
    cst_dims_init(&d);
    void *x;
    if (cst_arg(fn, "x", o_x, NPY_FLOAT32, "N", &d, 0, &x) < 0) return NULL;
    int64_t n = cst_dim(&d, 'N');
    double s;
    Py_BEGIN_ALLOW_THREADS
    s = cst_sum_squares(x, n);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(s);
}

PyMethodDef cst_optim_methods[] = {
    {"adamw_step", (PyCFunction)(void (*)(void))py_adamw_step, METH_VARARGS | METH_KEYWORDS,
     "adamw_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0): one "
     "torch.optim.AdamW step in place on flat float32 arrays; step counts from 1; grad is multiplied "
     "by grad_scale first (clipping) and is not modified."},
    {"sum_squares", (PyCFunction)(void (*)(void))py_sum_squares, METH_VARARGS | METH_KEYWORDS,
     "sum_squares(x) -> float: sum of x**2 over a flat float32 array, in double, deterministic."},
    {NULL, NULL, 0, NULL},
};
