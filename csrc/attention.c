/* attention.c: causal grouped-query self-attention, forward and backward (see attention.h).
 * Saves the per-row log-sum-exp instead of the (B,NH,T,T) probabilities and recomputes them in
 * backward, so memory is O(B*NH*T) per layer. Not a flash kernel for GPUs, and no KV cache. */
#include "glue.h"
#include "attention.h"
#include "simd.h"
#include <math.h>

/* Keys are scored in blocks of KB into a stack buffer: bounded scratch (no allocation) whatever T. */
#define KB 64

#define CST_INLINE static inline __attribute__((always_inline))

/* Eight interleaved partial sums combined in a fixed tree: the compiler vectorises the inner loop
 * without reassociating, so every SIMD path gives the same bits. */
CST_INLINE float dot_f32(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

CST_INLINE void axpy_f32(float *restrict y, float a, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* One query row against keys 0..n-1 (n >= 1): online softmax over blocks of KB keys, with the
 * running maximum subtracted so large scores cannot overflow. o (HS) is the accumulator and the
 * result; returns the row's log-sum-exp. ks is the stride between consecutive keys. */
CST_INLINE float fwd_row_body(float *restrict o, const float *restrict qr, const float *k0,
                              const float *v0, int64_t ks, int64_t n, int64_t HS, float scale) {
    float sc[KB];
    float m = -INFINITY, l = 0.0f;
    for (int64_t i = 0; i < HS; i++) o[i] = 0.0f;
    for (int64_t j0 = 0; j0 < n; j0 += KB) {
        const int64_t nb = n - j0 < KB ? n - j0 : KB;
        float bm = -INFINITY;
        for (int64_t jj = 0; jj < nb; jj++) {
            const float s = dot_f32(qr, k0 + (j0 + jj) * ks, HS) * scale;
            sc[jj] = s;
            bm = s > bm ? s : bm;
        }
        if (bm > m) {
            /* First block: m = -inf, so c = 0 and the (zero) accumulator stays zero. */
            const float c = expf(m - bm);
            l *= c;
            for (int64_t i = 0; i < HS; i++) o[i] *= c;
            m = bm;
        }
        for (int64_t jj = 0; jj < nb; jj++) {
            const float p = expf(sc[jj] - m);
            l += p;
            axpy_f32(o, p, v0 + (j0 + jj) * ks, HS);
        }
    }
    const float inv = 1.0f / l;
    for (int64_t i = 0; i < HS; i++) o[i] *= inv;
    return m + logf(l);
}

/* Every q head of kv group (b, g): their dq rows and the group's dk, dv rows belong to this call
 * alone, so groups run in parallel without atomics, and the loop order below fixes every sum. */
CST_INLINE void bwd_group_body(float *dq, float *dk, float *dv, const float *dout, const float *out,
                               const float *lse, const float *q, const float *k, const float *v,
                               int64_t b, int64_t g, int64_t len, int64_t T, int64_t NH,
                               int64_t NKV, int64_t HS, float scale) {
    const int64_t rep = NH / NKV;
    const int64_t qs = NH * HS, ks = NKV * HS; /* strides between time steps */
    const float *kb = k + (size_t)b * T * ks + g * HS, *vb = v + (size_t)b * T * ks + g * HS;
    float *dkb = dk + (size_t)b * T * ks + g * HS, *dvb = dv + (size_t)b * T * ks + g * HS;
    for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
        for (int64_t t = 0; t < len; t++) {
            const size_t row = ((size_t)b * T + t) * qs + h * HS;
            const float *qr = q + row, *dor = dout + row, *orow = out + row;
            float *dqr = dq + row;
            const float L = lse[((size_t)b * NH + h) * T + t];
            /* D = sum_j p_j dp_j = dout . out: the softmax Jacobian's correction term. */
            const float D = dot_f32(dor, orow, HS);
            for (int64_t j = 0; j <= t; j++) {
                const float *kj = kb + j * ks, *vj = vb + j * ks;
                const float p = expf(dot_f32(qr, kj, HS) * scale - L);
                const float ds = p * (dot_f32(dor, vj, HS) - D) * scale;
                axpy_f32(dqr, ds, kj, HS);
                axpy_f32(dkb + j * ks, ds, qr, HS);
                axpy_f32(dvb + j * ks, p, dor, HS);
            }
        }
    }
}

typedef float (*fwd_row_fn)(float *, const float *, const float *, const float *, int64_t, int64_t,
                            int64_t, float);
typedef void (*bwd_group_fn)(float *, float *, float *, const float *, const float *, const float *,
                             const float *, const float *, const float *, int64_t, int64_t, int64_t,
                             int64_t, int64_t, int64_t, int64_t, float);

/* One copy of the row and group kernels per SIMD path: the bodies are inlined into functions
 * compiled for that target, so wider vectors are used without hand-written intrinsics. */
#define CST_ATTN_PATH(suffix, attr)                                                              \
    static attr float fwd_row_##suffix(float *o, const float *qr, const float *k0, const float *v0, \
                                       int64_t ks, int64_t n, int64_t HS, float scale) {         \
        return fwd_row_body(o, qr, k0, v0, ks, n, HS, scale);                                    \
    }                                                                                            \
    static attr void bwd_group_##suffix(float *dq, float *dk, float *dv, const float *dout,      \
                                        const float *out, const float *lse, const float *q,      \
                                        const float *k, const float *v, int64_t b, int64_t g,    \
                                        int64_t len, int64_t T, int64_t NH, int64_t NKV,         \
                                        int64_t HS, float scale) {                               \
        bwd_group_body(dq, dk, dv, dout, out, lse, q, k, v, b, g, len, T, NH, NKV, HS, scale);   \
    }

CST_ATTN_PATH(scalar, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CST_ATTN_X86 1
CST_ATTN_PATH(avx2, __attribute__((target("avx2,fma"))))
CST_ATTN_PATH(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))))
#endif

static void pick_path(fwd_row_fn *f, bwd_group_fn *g) {
    *f = fwd_row_scalar;
    *g = bwd_group_scalar;
#ifdef CST_ATTN_X86
    switch (cst_simd_current()) {
    case CST_SIMD_AVX512: *f = fwd_row_avx512; *g = bwd_group_avx512; break;
    case CST_SIMD_AVX2: *f = fwd_row_avx2; *g = bwd_group_avx2; break;
    default: break;
    }
#endif
}

void cst_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                           const int32_t *lengths, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                           int64_t HS) {
    fwd_row_fn row;
    bwd_group_fn unused;
    pick_path(&row, &unused);
    const int64_t rep = NH / NKV, qs = NH * HS, ks = NKV * HS;
    const float scale = 1.0f / sqrtf((float)HS);
    /* Rows are independent; dynamic chunks even out the causal triangle's uneven row costs. */
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t i = 0; i < B * NH * T; i++) {
        const int64_t b = i / (NH * T), h = (i / T) % NH, t = i % T;
        const int64_t len = lengths ? lengths[b] : T;
        float *o = out + ((size_t)b * T + t) * qs + h * HS;
        if (t >= len) {
            for (int64_t c = 0; c < HS; c++) o[c] = 0.0f;
            lse[i] = 0.0f;
            continue;
        }
        const size_t kv0 = (size_t)b * T * ks + (h / rep) * HS;
        lse[i] = row(o, q + ((size_t)b * T + t) * qs + h * HS, k + kv0, v + kv0, ks, t + 1, HS,
                     scale);
    }
}

void cst_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                            const float *lse, const float *q, const float *k, const float *v,
                            const int32_t *lengths, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                            int64_t HS) {
    fwd_row_fn unused;
    bwd_group_fn group;
    pick_path(&unused, &group);
    const float scale = 1.0f / sqrtf((float)HS);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < B * NKV; i++) {
        const int64_t b = i / NKV, g = i % NKV;
        const int64_t len = lengths ? lengths[b] : T;
        group(dq, dk, dv, dout, out, lse, q, k, v, b, g, len, T, NH, NKV, HS, scale);
    }
}

/* ---- Python boundary ---- */

/* Shared checks: head grouping and lengths in [1, T]. */
static int check_heads_lengths(const char *fn, const cst_dims *d, const int32_t *lengths) {
    int64_t NH = cst_dim(d, 'H'), NKV = cst_dim(d, 'K');
    if (NKV < 1 || NH % NKV) {
        PyErr_Format(PyExc_ValueError,
                     "%s: the number of q heads (%ld, axis 2 of 'q') must be a multiple of the "
                     "number of kv heads (%ld, axis 2 of 'k')",
                     fn, (long)NH, (long)NKV);
        return -1;
    }
    if (cst_dim(d, 'S') < 1) {
        PyErr_Format(PyExc_ValueError, "%s: head size (axis 3 of 'q') must be >= 1", fn);
        return -1;
    }
    if (lengths && cst_check_range_i32(fn, "lengths", lengths, cst_dim(d, 'B'), 1,
                                       (int64_t)cst_dim(d, 'T') + 1) < 0)
        return -1;
    return 0;
}

static PyObject *py_attention_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *fn = "attention_forward";
    static char *kwlist[] = {"out", "lse", "q", "k", "v", "lengths", NULL};
    PyObject *o_out, *o_lse, *o_q, *o_k, *o_v, *o_len = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|O:attention_forward", kwlist, &o_out, &o_lse,
                                     &o_q, &o_k, &o_v, &o_len))
        return NULL;
    cst_dims d;
    cst_dims_init(&d);
    void *out, *lse, *q, *k, *v, *len;
    if (cst_arg(fn, "q", o_q, NPY_FLOAT32, "BTHS", &d, 0, &q) < 0 ||
        cst_arg(fn, "k", o_k, NPY_FLOAT32, "BTKS", &d, 0, &k) < 0 ||
        cst_arg(fn, "v", o_v, NPY_FLOAT32, "BTKS", &d, 0, &v) < 0 ||
        cst_arg(fn, "out", o_out, NPY_FLOAT32, "BTHS", &d, CST_WRITE, &out) < 0 ||
        cst_arg(fn, "lse", o_lse, NPY_FLOAT32, "BHT", &d, CST_WRITE, &lse) < 0 ||
        cst_arg(fn, "lengths", o_len, NPY_INT32, "B", &d, CST_OPTIONAL, &len) < 0 ||
        check_heads_lengths(fn, &d, len) < 0)
        return NULL;
    int64_t B = cst_dim(&d, 'B'), T = cst_dim(&d, 'T'), NH = cst_dim(&d, 'H'),
            NKV = cst_dim(&d, 'K'), HS = cst_dim(&d, 'S');
    Py_BEGIN_ALLOW_THREADS
    cst_attention_forward(out, lse, q, k, v, len, B, T, NH, NKV, HS);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_attention_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *fn = "attention_backward";
    static char *kwlist[] = {"dq", "dk", "dv", "dout", "out", "lse", "q", "k", "v", "lengths", NULL};
    PyObject *o_dq, *o_dk, *o_dv, *o_dout, *o_out, *o_lse, *o_q, *o_k, *o_v, *o_len = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOOO|O:attention_backward", kwlist, &o_dq,
                                     &o_dk, &o_dv, &o_dout, &o_out, &o_lse, &o_q, &o_k, &o_v,
                                     &o_len))
        return NULL;
    cst_dims d;
    cst_dims_init(&d);
    void *dq, *dk, *dv, *dout, *out, *lse, *q, *k, *v, *len;
    if (cst_arg(fn, "q", o_q, NPY_FLOAT32, "BTHS", &d, 0, &q) < 0 ||
        cst_arg(fn, "k", o_k, NPY_FLOAT32, "BTKS", &d, 0, &k) < 0 ||
        cst_arg(fn, "v", o_v, NPY_FLOAT32, "BTKS", &d, 0, &v) < 0 ||
        cst_arg(fn, "out", o_out, NPY_FLOAT32, "BTHS", &d, 0, &out) < 0 ||
        cst_arg(fn, "lse", o_lse, NPY_FLOAT32, "BHT", &d, 0, &lse) < 0 ||
        cst_arg(fn, "dout", o_dout, NPY_FLOAT32, "BTHS", &d, 0, &dout) < 0 ||
        cst_arg(fn, "dq", o_dq, NPY_FLOAT32, "BTHS", &d, CST_WRITE, &dq) < 0 ||
        cst_arg(fn, "dk", o_dk, NPY_FLOAT32, "BTKS", &d, CST_WRITE, &dk) < 0 ||
        cst_arg(fn, "dv", o_dv, NPY_FLOAT32, "BTKS", &d, CST_WRITE, &dv) < 0 ||
        cst_arg(fn, "lengths", o_len, NPY_INT32, "B", &d, CST_OPTIONAL, &len) < 0 ||
        check_heads_lengths(fn, &d, len) < 0)
        return NULL;
    if (dq == dk || dq == dv || dk == dv) {
        PyErr_Format(PyExc_ValueError, "%s: 'dq', 'dk' and 'dv' must be distinct arrays", fn);
        return NULL;
    }
    int64_t B = cst_dim(&d, 'B'), T = cst_dim(&d, 'T'), NH = cst_dim(&d, 'H'),
            NKV = cst_dim(&d, 'K'), HS = cst_dim(&d, 'S');
    Py_BEGIN_ALLOW_THREADS
    cst_attention_backward(dq, dk, dv, dout, out, lse, q, k, v, len, B, T, NH, NKV, HS);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyMethodDef cst_attention_methods[] = {
    {"attention_forward", (PyCFunction)(void (*)(void))py_attention_forward,
     METH_VARARGS | METH_KEYWORDS,
     "attention_forward(out, lse, q, k, v, lengths=None): causal GQA attention. q (B,T,NH,HS), "
     "k v (B,T,NKV,HS), lengths (B,) int32 in [1,T] or None; writes out (B,T,NH,HS) and the "
     "row log-sum-exp lse (B,NH,T) that backward needs. Padded query rows give 0."},
    {"attention_backward", (PyCFunction)(void (*)(void))py_attention_backward,
     METH_VARARGS | METH_KEYWORDS,
     "attention_backward(dq, dk, dv, dout, out, lse, q, k, v, lengths=None): adds the gradients "
     "into dq (B,T,NH,HS), dk and dv (B,T,NKV,HS)."},
    {NULL, NULL, 0, NULL},
};
