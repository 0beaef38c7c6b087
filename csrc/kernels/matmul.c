/* matmul.c: linear-layer products (see matmul.h) mapped onto the packed GEMM / GEMV kernels of
 * gemm.c and bf16.c. No arithmetic of its own; the Python boundary is in python/matmul.c. */
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

void cst_matmul_backward_ld(float *dinp, int64_t lddi, float *dweight, const float *dout, int64_t lddo,
                            const float *inp, int64_t ldin, const float *weight, int64_t N, int64_t C, int64_t OC,
                            int accumulate) {
    /* dinp (N, C) (+)= dout (N, OC) @ weight (OC, C): both operands row-major. */
    if (dinp && C <= CST_THIN_MAX_COLS && N > GEMV_MAX_ROWS) /* LoRA's dh = dy B */
        cst_gemm_thin_nn(dinp, lddi, dout, lddo, weight, C, N, OC, C, accumulate);
    else if (dinp)
        cst_gemm(dinp, lddi, dout, lddo, 1, weight, C, 1, N, C, OC, accumulate);
    /* dweight (OC, C) += dout^T @ inp: A(o, n) = dout[n*lddo + o] is read transposed while packing. */
    if (dweight && C <= CST_THIN_MAX_COLS) /* LoRA's dB = dy^T h */
        cst_gemm_thin_tn(dweight, C, dout, lddo, inp, ldin, OC, C, N, 1);
    else if (dweight)
        cst_gemm(dweight, C, dout, 1, lddo, inp, ldin, 1, OC, C, N, 1);
}

void cst_matmul_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                         const float *weight, int64_t N, int64_t C, int64_t OC, int accumulate) {
    cst_matmul_backward_ld(dinp, C, dweight, dout, OC, inp, C, weight, N, C, OC, accumulate);
}

int cst_matmul_bf16_forward(float *out, const float *inp, const uint16_t *weight, int64_t N, int64_t C,
                            int64_t OC, int accumulate) {
    return cst_gemm_bf16_nt(out, inp, weight, N, C, OC, accumulate);
}

int cst_matmul_bf16_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                             const uint16_t *weight, int64_t N, int64_t C, int64_t OC, int accumulate) {
    if (dinp && cst_gemm_bf16_nn(dinp, dout, weight, N, OC, C, accumulate) < 0) return -1;
    if (dweight && cst_gemm_bf16_tn(dweight, dout, inp, N, OC, C, 1) < 0) return -1;
    return 0;
}
