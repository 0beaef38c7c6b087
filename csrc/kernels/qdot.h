/* qdot.h: products against weight matrices kept in their GGUF block formats (Q8_0, Q4_0, Q4_1, Q5_0,
 * Q5_1, and the k-quants Q4_K, Q5_K, Q6_K), for
 * generation: the input rows are quantised once per product to int8 blocks of 32 values with one
 * float scale each (cst_q8_quantize), then every (weight block, input block) pair is an integer dot
 * product scaled by the two blocks' scales. Inference only: no backward, no quantisation of weights. */
#ifndef CST_QDOT_H
#define CST_QDOT_H
#include <stdint.h>

#define CST_Q8_BLOCK 32 /* input values per int8 block, = the weights per Q8_0/Q4_0/Q4_1 block */

/* 1 when cst_qmatvec reads weights of this ggml type (quant.h's ids), else 0. */
int cst_qdot_supported(int type);

/* Quantises N rows of K floats (K % 32 == 0) to int8 blocks, the same on every SIMD path. Block b of
 * row n (values x[n*K + 32b ..]): d = max|x| / 127, q = round-half-away(x * (1/d)) (0 when d == 0),
 * s = d * sum(q). q (N*K), d and s (N*K/32). */
void cst_q8_quantize(int8_t *q, float *d, float *s, const float *x, int64_t N, int64_t K);

/* out[n, o] (+)= sum over blocks b of row o of the weights w (O rows of K/32 blocks of `type`, or K/256
 * super-blocks for the k-quants, as in a GGUF tensor with ne = [K, O]) of the block product with block
 * b of input row n (Q5_*: the nibble with its fifth bit, 0..31):
 *   Q8_0  dw * d * sum(wq * q)
 *   Q4_0  dw * d * sum(nibble * q) - 8 * dw * s         (weight = (nibble - 8) * dw)
 *   Q4_1  dw * d * sum(nibble * q) + mw * s             (weight = nibble * dw + mw)
 *   Q5_0  dw * d * sum(q5 * q) - 16 * dw * s;  Q5_1  dw * d * sum(q5 * q) + mw * s
 *   Q4_K  dw * sc * d * sum(nibble * q) - dmin * m * s  (sub-block of 32: 6-bit scale sc and min m;
 *                                                        Q5_K the same with q5)
 *   Q6_K  dw * d * sum over its two 16-weight sub-blocks of sc * sum((q6 - 32) * q)  (int8 sc)
 * with (q, d, s) from cst_q8_quantize; integer sums are exact, the float sums' order differs between
 * SIMD paths. One thread per output row: results do not depend on the thread count. w needs no
 * alignment. Row n of out starts at out + n * ldo (ldo >= O: a part of a wider output). accumulate 0
 * overwrites out. */
void cst_qmatvec(float *out, const uint8_t *w, int type, const int8_t *q, const float *d, const float *s,
                 int64_t N, int64_t K, int64_t O, int64_t ldo, int accumulate);

#endif
