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

/* The same with row strides: dinp, dout and inp are column blocks of wider row-major matrices (rows
 * lddi, lddo, ldin apart); weight and dweight are contiguous. LoRA's backward reads one adapter's block
 * of a fused projection's gradient this way (_core.matmul_backward_block). */
void cst_matmul_backward_ld(float *dinp, int64_t lddi, float *dweight, const float *dout, int64_t lddo,
                            const float *inp, int64_t ldin, const float *weight, int64_t N, int64_t C, int64_t OC,
                            int accumulate);

/* The same products with bf16 inputs and fp32 accumulation (gemm.h's cst_gemm_bf16_*): weight is bf16
 * (uint16_t), inp / dout are fp32 rounded to bf16 on the way in; outputs fp32. 0, or -1 without memory. */
int cst_matmul_bf16_forward(float *out, const float *inp, const uint16_t *weight, int64_t N, int64_t C,
                            int64_t OC, int accumulate);
int cst_matmul_bf16_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                             const uint16_t *weight, int64_t N, int64_t C, int64_t OC, int accumulate);

#endif
