/* quant.h: GGUF/ggml block formats decoded to float32. Decoding only: cst never quantises weights, it
 * reads llama.cpp files and trains in float32 (qdot.h reads some block types directly for generation). Layouts follow ggml-quants.c; type ids are ggml's. */
#ifndef CST_QUANT_H
#define CST_QUANT_H

#include <stddef.h>
#include <stdint.h>

enum {
    CST_GGML_F32 = 0,
    CST_GGML_F16 = 1,
    CST_GGML_Q4_0 = 2,
    CST_GGML_Q4_1 = 3,
    CST_GGML_Q5_0 = 6,
    CST_GGML_Q5_1 = 7,
    CST_GGML_Q8_0 = 8,
    CST_GGML_Q4_K = 12,
    CST_GGML_Q5_K = 13,
    CST_GGML_Q6_K = 14,
    CST_GGML_BF16 = 30,
};

/* Weights per block and bytes per block of a type; returns 0 (and sets nothing) for a type this
 * file does not decode. */
int cst_quant_block_info(int type, int64_t *block_elems, int64_t *block_bytes);

/* Short ggml name of a type ("Q4_1"), or NULL when unknown. */
const char *cst_quant_type_name(int type);

/* out (n_blocks * block_elems) = decode(raw (n_blocks * block_bytes)). raw needs no alignment.
 * The type must be one cst_quant_block_info accepts. */
void cst_dequantize(float *out, const uint8_t *raw, int64_t n_blocks, int type);

/* Q4_K / Q5_K pack eight 6-bit (scale, min) pairs of 32-weight sub-blocks into 12 bytes q; pair j
 * (ggml's get_scale_min_k4). Shared by the decoder (quant.c) and the products (qdot.c). */
static inline void cst_k4_scale_min(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* IEEE half bit patterns to float32, exactly (subnormals, inf and NaN included); bfloat16's is
 * bf16.h's cst_bf16_to_f32. */
float cst_f16_to_f32(uint16_t h);

#endif
