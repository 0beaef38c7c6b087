/* optim.c: AdamW and the sum of squares for gradient clipping (see optim.h); their boundary is
 * python/optim.c. Element-wise over flat arrays; the reduction uses a fixed chunking, not the thread count. */
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
