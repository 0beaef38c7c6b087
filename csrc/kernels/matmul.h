/* matmul.h: the dense products of a linear layer, y = x W^T as in torch.nn.Linear (W is (OC, C)).
 * Every output element is reduced by one thread in a fixed order, so results do not depend on the
 * thread count. Not a general BLAS. */
#ifndef CST_MATMUL_H
#define CST_MATMUL_H
#include <stdint.h>

/* out (N, OC) = inp (N, C) @ weight (OC, C)^T; added into out when accumulate != 0. */
void cst_matmul_forward(float *out, const float *inp, const float *weight, int64_t N, int64_t C,
                        int64_t OC, int accumulate);

/* dinp (N, C) += dout (N, OC) @ weight (OC, C) (= when accumulate == 0, which saves zeroing dinp first);
 * dweight (OC, C) += dout^T @ inp (N, C). Either output may be NULL to skip it (frozen weights, or the
 * first layer's input). */
void cst_matmul_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                         const float *weight, int64_t N, int64_t C, int64_t OC, int accumulate);

/* The B side of the LoRA backward of a fused projection (q|k|v, gate|up) whose adapters' B matrices
 * sit in one block-diagonal Bbd (ROWS, NR): block b (blocks[4b..4b+3] = r0, r1, c0, c1) is the B of
 * the module on output rows [r0, r1) and rank columns [c0, c1); everything outside the blocks is zero
 * and never read. For each block, on its nonzero part only:
 *   dH[:, c0:c1] += dout[:, r0:r1] @ Bbd[r0:r1, c0:c1]   (dH (N, NR), dout (N, ROWS))
 *   dB[r0:r1, c0:c1] += dout[:, r0:r1]^T @ H[:, c0:c1]   (dB (ROWS, NR), H (N, NR))
 * The blocks' column ranges must not overlap (the caller checks). */
void cst_lora_bd_backward(float *dH, float *dB, const float *dout, const float *H, const float *Bbd,
                          int64_t N, int64_t ROWS, int64_t NR, int64_t nblocks, const int32_t *blocks);

/* The same products with bf16 inputs and fp32 accumulation (gemm.h's cst_gemm_bf16_*): weight is bf16
 * (uint16_t), inp / dout are fp32 rounded to bf16 on the way in; outputs fp32. 0, or -1 without memory. */
int cst_matmul_bf16_forward(float *out, const float *inp, const uint16_t *weight, int64_t N, int64_t C,
                            int64_t OC, int accumulate);
int cst_matmul_bf16_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                             const uint16_t *weight, int64_t N, int64_t C, int64_t OC, int accumulate);

#endif
