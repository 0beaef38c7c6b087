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

void cst_matmul_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                         const float *weight, int64_t N, int64_t C, int64_t OC, int accumulate) {
    /* dinp (N, C) (+)= dout (N, OC) @ weight (OC, C): both operands row-major. */
    if (dinp && C <= CST_THIN_MAX_COLS && N > GEMV_MAX_ROWS) /* LoRA's dh = dy B */
        cst_gemm_thin_nn(dinp, dout, weight, N, OC, C, accumulate);
    else if (dinp)
        cst_gemm(dinp, C, dout, OC, 1, weight, C, 1, N, C, OC, accumulate);
    /* dweight (OC, C) += dout^T @ inp: A(o, n) = dout[n*OC + o] is read transposed while packing. */
    if (dweight && C <= CST_THIN_MAX_COLS) /* LoRA's dB = dy^T h */
        cst_gemm_thin_tn(dweight, dout, inp, OC, C, N, 1);
    else if (dweight)
        cst_gemm(dweight, C, dout, 1, OC, inp, C, 1, OC, C, N, 1);
}

void cst_lora_bd_backward(float *dH, float *dB, const float *dout, const float *H, const float *Bbd,
                          int64_t N, int64_t ROWS, int64_t NR, int64_t nblocks, const int32_t *blocks) {
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t r0 = blocks[4 * b], r1 = blocks[4 * b + 1], c0 = blocks[4 * b + 2], c1 = blocks[4 * b + 3];
        if (dH) cst_gemm_thin_nn_ld(dH + c0, NR, dout + r0, ROWS, Bbd + r0 * NR + c0, NR, N, r1 - r0, c1 - c0, 1);
        if (dB) cst_gemm_thin_tn_ld(dB + r0 * NR + c0, NR, dout + r0, ROWS, H + c0, NR, r1 - r0, c1 - c0, N, 1);
    }
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
