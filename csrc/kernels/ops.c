/* ops.c: per-position kernels of a Llama-family decoder (see ops.h); their boundary is python/ops.c.
 * Every kernel is parallel over rows or column blocks that own disjoint outputs, with a fixed
 * reduction order, so results are bitwise identical for any thread count. Not attention, not matmul. */
#include "ops.h"
#include "simd.h"
#include "vexp.h"
#include <math.h>
#include <string.h>

/* Below this many elements a row-parallel kernel runs on the calling thread: waking the team (a futex
 * wake per region once the spin has lapsed) costs more than the work, e.g. the 16 rows of a decoding
 * step, ~150 such calls per token. Rows are owned by one thread either way, so results do not change. */
#define CST_PAR_MIN_ELEMS 65536


/* ---- embedding ---- */

void cst_embedding_forward(float *out, const int32_t *tokens, const float *wte, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        memcpy(out + n * C, wte + (int64_t)tokens[n] * C, (size_t)C * sizeof(float));
}

/* Columns per block in the scatter backwards: small enough that C = 576 gives 9 parallel blocks,
 * wide enough to read whole cache lines. Fixed, so the result does not depend on the thread count. */
#define CST_COL_BLOCK 64

void cst_embedding_backward(float *dwte, const float *dout, const int32_t *tokens,
                            const int32_t *lengths, int64_t B, int64_t T, int64_t C) {
    /* Two positions with the same token write the same row, so rows cannot be split across threads
     * without atomics; columns can, and each column block then adds positions in order. */
    const int64_t nblk = (C + CST_COL_BLOCK - 1) / CST_COL_BLOCK;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < nblk; blk++) {
        const int64_t c0 = blk * CST_COL_BLOCK;
        const int64_t cn = C - c0 < CST_COL_BLOCK ? C - c0 : CST_COL_BLOCK;
        for (int64_t b = 0; b < B; b++) {
            const int64_t len = lengths ? lengths[b] : T;
            for (int64_t t = 0; t < len; t++) {
                const int64_t n = b * T + t;
                float *dst = dwte + (int64_t)tokens[n] * C + c0;
                const float *src = dout + n * C + c0;
                for (int64_t j = 0; j < cn; j++) dst[j] += src[j];
            }
        }
    }
}

/* ---- RMSNorm ---- */

static double sumsq_f32(const float *x, int64_t n) {
    /* Eight partial sums in a fixed order: vectorisable without reassociation. */
    double acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += (double)x[i + j] * (double)x[i + j];
    double s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += (double)x[i] * (double)x[i];
    return s;
}

void cst_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int64_t N,
                         int64_t C, float eps) {
#pragma omp parallel for schedule(static) if (N * C >= CST_PAR_MIN_ELEMS)
    for (int64_t n = 0; n < N; n++) {
        const float *x = inp + n * C;
        float *y = out + n * C;
        const float r = (float)(1.0 / sqrt(sumsq_f32(x, C) / (double)C + (double)eps));
        /* (x * r) * w, the rounding order of Hugging Face's LlamaRMSNorm. */
        for (int64_t c = 0; c < C; c++) y[c] = (x[c] * r) * weight[c];
        rstd[n] = r;
    }
}

void cst_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                          const float *weight, const float *rstd, int64_t N, int64_t C) {
    if (dinp) {
        /* y = w * x * r with r = (mean(x^2) + eps)^-1/2, so
         * dx = r * (g - x * r^2 * mean(g * x)),  g = dy * w. */
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const float *x = inp + n * C, *dy = dout + n * C;
            float *dx = dinp + n * C;
            double acc[8] = {0};
            int64_t c = 0;
            for (; c + 8 <= C; c += 8)
                for (int j = 0; j < 8; j++)
                    acc[j] += (double)(dy[c + j] * weight[c + j]) * (double)x[c + j];
            double dot = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for (; c < C; c++) dot += (double)(dy[c] * weight[c]) * (double)x[c];
            const double r = rstd[n];
            const float rf = rstd[n];
            const float k = (float)(r * r * dot / (double)C);
            for (c = 0; c < C; c++) dx[c] += rf * (dy[c] * weight[c] - x[c] * k);
        }
    }
    if (dweight) {
        const int64_t nblk = (C + CST_COL_BLOCK - 1) / CST_COL_BLOCK;
#pragma omp parallel for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t c0 = blk * CST_COL_BLOCK;
            const int64_t cn = C - c0 < CST_COL_BLOCK ? C - c0 : CST_COL_BLOCK;
            double acc[CST_COL_BLOCK] = {0};
            for (int64_t n = 0; n < N; n++) {
                const float *x = inp + n * C + c0, *dy = dout + n * C + c0;
                const double r = rstd[n];
                for (int64_t j = 0; j < cn; j++) acc[j] += (double)(dy[j] * x[j]) * r;
            }
            for (int64_t j = 0; j < cn; j++) dweight[c0 + j] += (float)acc[j];
        }
    }
}

/* ---- rotary embedding ---- */

/* sign = +1 rotates by +angle (forward), -1 by -angle (backward: the transpose of the rotation). */
static void rope_apply(float *x, const float *cos_t, const float *sin_t, int64_t B, int64_t T,
                       int64_t H, int64_t HS, int64_t pos0, float sign) {
    const int64_t half = HS / 2;
#pragma omp parallel for schedule(static) if (B * T * H * HS >= CST_PAR_MIN_ELEMS)
    for (int64_t bt = 0; bt < B * T; bt++) {
        const int64_t pos = pos0 + bt % T;
        const float *cs = cos_t + pos * half, *sn = sin_t + pos * half;
        for (int64_t h = 0; h < H; h++) {
            float *x1 = x + (bt * H + h) * HS, *x2 = x1 + half;
            /* x * cos + rotate_half(x) * sin, in Hugging Face's rounding order. */
            for (int64_t i = 0; i < half; i++) {
                const float a = x1[i], b = x2[i], c = cs[i], s = sign * sn[i];
                x1[i] = a * c + (-b) * s;
                x2[i] = b * c + a * s;
            }
        }
    }
}

void cst_rope_forward(float *x, const float *cos_t, const float *sin_t, int64_t B, int64_t T,
                      int64_t H, int64_t HS, int64_t pos0) {
    rope_apply(x, cos_t, sin_t, B, T, H, HS, pos0, 1.0f);
}

void cst_rope_backward(float *dx, const float *cos_t, const float *sin_t, int64_t B, int64_t T,
                       int64_t H, int64_t HS, int64_t pos0) {
    rope_apply(dx, cos_t, sin_t, B, T, H, HS, pos0, -1.0f);
}

/* ---- SwiGLU ---- */

static inline __attribute__((always_inline)) void swiglu_fwd_row(float *y, const float *g,
                                                                const float *u, int64_t F) {
    for (int64_t i = 0; i < F; i++) y[i] = g[i] / (1.0f + exp_f32(-g[i])) * u[i];
}

static inline __attribute__((always_inline)) void swiglu_bwd_row(float *dg, float *du,
                                                                const float *dy, const float *g,
                                                                const float *u, int64_t F, int acc) {
    for (int64_t i = 0; i < F; i++) {
        const float s = 1.0f / (1.0f + exp_f32(-g[i]));
        const float gs = g[i] * s;
        /* silu'(g) = s * (1 + g * (1 - s)) */
        const float a = dy[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s))), b = dy[i] * gs;
        dg[i] = acc ? dg[i] + a : a;
        du[i] = acc ? du[i] + b : b;
    }
}

static void swiglu_fwd_scalar(float *y, const float *g, const float *u, int64_t F) {
    swiglu_fwd_row(y, g, u, F);
}
CST_TARGET_AVX2 static void swiglu_fwd_avx2(float *y, const float *g, const float *u, int64_t F) {
    swiglu_fwd_row(y, g, u, F);
}
CST_TARGET_AVX512 static void swiglu_fwd_avx512(float *y, const float *g, const float *u, int64_t F) {
    swiglu_fwd_row(y, g, u, F);
}
/* acc as a literal in each branch, so the compiler emits the adding and the writing loop separately. */
#define SWIGLU_BWD(NAME, TGT)                                                                       \
    TGT static void NAME(float *dg, float *du, const float *dy, const float *g, const float *u,    \
                         int64_t F, int acc) {                                                      \
        if (acc) swiglu_bwd_row(dg, du, dy, g, u, F, 1);                                            \
        else swiglu_bwd_row(dg, du, dy, g, u, F, 0);                                                \
    }
SWIGLU_BWD(swiglu_bwd_scalar, )
SWIGLU_BWD(swiglu_bwd_avx2, CST_TARGET_AVX2)
SWIGLU_BWD(swiglu_bwd_avx512, CST_TARGET_AVX512)

void cst_swiglu_forward(float *out, const float *gu, int64_t N, int64_t F) {
    void (*row)(float *, const float *, const float *, int64_t) =
        CST_SIMD_PICK(swiglu_fwd);
#pragma omp parallel for schedule(static) if (N * F >= CST_PAR_MIN_ELEMS)
    for (int64_t n = 0; n < N; n++) row(out + n * F, gu + n * 2 * F, gu + n * 2 * F + F, F);
}

void cst_swiglu_backward(float *dgu, const float *dout, const float *gu, int64_t N, int64_t F, int accumulate) {
    void (*row)(float *, float *, const float *, const float *, const float *, int64_t, int) =
        CST_SIMD_PICK(swiglu_bwd);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        row(dgu + n * 2 * F, dgu + n * 2 * F + F, dout + n * F, gu + n * 2 * F, gu + n * 2 * F + F, F, accumulate);
}

/* ---- token log-probabilities ---- */

/* The max of a row and sum(exp(x - max)) in double: the hot loop of the loss (V = 49152 per row). */
static inline __attribute__((always_inline)) double row_sumexp(const float *x, int64_t V, float *mx) {
    /* 16 running maxima, combined at the end: the max is exact in any order. */
    float mm[16];
    for (int j = 0; j < 16; j++) mm[j] = -INFINITY;
    int64_t i = 0;
    for (; i + 16 <= V; i += 16)
        for (int j = 0; j < 16; j++) mm[j] = x[i + j] > mm[j] ? x[i + j] : mm[j];
    float m = -INFINITY;
    for (int j = 0; j < 16; j++) m = mm[j] > m ? mm[j] : m;
    for (; i < V; i++) m = x[i] > m ? x[i] : m;
    *mx = m;
    /* exp in float (vectorised), summed into 16 double lanes in a fixed order. */
    double acc[16] = {0};
    float e[16];
    i = 0;
    for (; i + 16 <= V; i += 16) {
        for (int j = 0; j < 16; j++) e[j] = exp_f32(x[i + j] - m);
        for (int j = 0; j < 16; j++) acc[j] += (double)e[j];
    }
    double s = 0.0;
    for (int j = 0; j < 16; j++) s += acc[j];
    for (; i < V; i++) s += (double)exp_f32(x[i] - m);
    return s;
}

/* dx = scale * (onehot - exp(x - lse)), with lse = ref + rest split so that x - ref is exact for the
 * logits that matter even at 1e4 magnitude (the float lse alone would be off by up to 5e-4). */
static inline __attribute__((always_inline)) void row_grad(float *dx, const float *x, int64_t V,
                                                          float ref, float rest, float scale,
                                                          int accumulate) {
    const float ns = -scale;
    if (accumulate)
        for (int64_t i = 0; i < V; i++) dx[i] += ns * exp_f32((x[i] - ref) - rest);
    else
        for (int64_t i = 0; i < V; i++) dx[i] = ns * exp_f32((x[i] - ref) - rest);
}

static double row_sumexp_scalar(const float *x, int64_t V, float *mx) { return row_sumexp(x, V, mx); }
CST_TARGET_AVX2 static double row_sumexp_avx2(const float *x, int64_t V, float *mx) {
    return row_sumexp(x, V, mx);
}
CST_TARGET_AVX512 static double row_sumexp_avx512(const float *x, int64_t V, float *mx) {
    return row_sumexp(x, V, mx);
}
static void row_grad_scalar(float *dx, const float *x, int64_t V, float ref, float rest, float scale,
                            int acc) {
    row_grad(dx, x, V, ref, rest, scale, acc);
}
CST_TARGET_AVX2 static void row_grad_avx2(float *dx, const float *x, int64_t V, float ref, float rest,
                                          float scale, int acc) {
    row_grad(dx, x, V, ref, rest, scale, acc);
}
CST_TARGET_AVX512 static void row_grad_avx512(float *dx, const float *x, int64_t V, float ref,
                                              float rest, float scale, int acc) {
    row_grad(dx, x, V, ref, rest, scale, acc);
}

void cst_logprobs_forward(float *logp, double *lse, const float *logits, const int32_t *targets,
                          int64_t N, int64_t V) {
    double (*sumexp)(const float *, int64_t, float *) =
        CST_SIMD_PICK(row_sumexp);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        if (targets[n] < 0) {
            logp[n] = 0.0f;
            lse[n] = 0.0;
            continue;
        }
        const float *x = logits + n * V;
        float m;
        const double s = sumexp(x, V, &m);
        const double l = (double)m + log(s);
        lse[n] = l;
        logp[n] = (float)((double)x[targets[n]] - l);
    }
}

void cst_logprobs_backward(float *dlogits, const float *dlogp, const float *logits,
                           const int32_t *targets, const double *lse, int64_t N, int64_t V,
                           int accumulate) {
    void (*grad)(float *, const float *, int64_t, float, float, float, int) =
        CST_SIMD_PICK(row_grad);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float *dx = dlogits + n * V;
        const int32_t tgt = targets[n];
        if (tgt < 0) {
            if (!accumulate) memset(dx, 0, (size_t)V * sizeof(float));
            continue;
        }
        const float *x = logits + n * V;
        const float g = dlogp[n];
        const float ref = (float)lse[n];
        const float rest = (float)(lse[n] - (double)ref);
        /* The target's term is computed before the row is overwritten (dx may alias x), with
         * 1 - p = -expm1(x_t - lse) in double so a confident target loses no digits. */
        const float dt = (float)(-(double)g * expm1((double)x[tgt] - lse[n]));
        const float old = accumulate ? dx[tgt] : 0.0f;
        grad(dx, x, V, ref, rest, g, accumulate);
        dx[tgt] = old + dt;
    }
}
