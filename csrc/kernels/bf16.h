/* bf16.h: bfloat16 storage (the top 16 bits of an fp32, as uint16_t) and its conversions, for the bf16
 * compute path: GEMM inputs in bf16, accumulation and everything else in fp32. Not an arithmetic type. */
#ifndef CST_BF16_H
#define CST_BF16_H
#include <stdint.h>
#include <string.h>

/* fp32 -> bf16, round to nearest even (what torch's .to(torch.bfloat16) does); NaN stays a quiet NaN of
 * the same sign; values past the largest bf16 round to infinity. Denormals are kept, not flushed. */
static inline uint16_t cst_bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float cst_bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* dst[i] = bf16(src[i]) / dst[i] = fp32(src[i]) for n elements (vectorised per SIMD path, same results). */
void cst_bf16_from_f32(uint16_t *dst, const float *src, int64_t n);
void cst_bf16_to_f32_n(float *dst, const uint16_t *src, int64_t n);
/* dst[i] = fp32(bf16(src[i])): the value a bf16 GEMM input takes, kept in fp32 (dst may equal src). */
void cst_bf16_round_f32(float *dst, const float *src, int64_t n);

/* dst (R, Cp) = bf16(src (R, C), row stride lds), Cp = C or C + 1 (the extra column zero, so that rows
 * hold whole k pairs); the _bf16 form copies bf16 rows the same way. Parallel over rows. */
void cst_bf16_rows_f32(uint16_t *dst, const float *src, int64_t lds, int64_t R, int64_t C, int64_t Cp);
void cst_bf16_rows_bf16(uint16_t *dst, const uint16_t *src, int64_t lds, int64_t R, int64_t C, int64_t Cp);

/* The pair layout the bf16 GEMM consumes, k running in pairs (vdpbf16ps multiplies two k per lane):
 * dst (ceil(R/2), C) of uint32, dst[p*C + j] = bf16(src[2p][j]) | bf16(src[2p+1][j]) << 16, the missing
 * row of an odd R read as zero; src is (R, C) fp32, row stride lds. (Pairs of bf16 rows are built while
 * packing, by gemm.c's pack_pairs.) */
void cst_bf16_pairs_f32(uint32_t *dst, const float *src, int64_t lds, int64_t R, int64_t C);

/* 1 when this CPU has AVX512_BF16 (vdpbf16ps); the bf16 GEMM's other paths convert to fp32 and FMA. */
int cst_bf16_dot_supported(void);

#endif
