/* qdot.c: products against GGUF Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K weight blocks
 * (see qdot.h). Decoding one token reads every weight once, so batch-1 generation is bound by the bytes
 * streamed: 20 bytes per 32 Q4_1 weights instead of 128 in float32. Each path computes, per (weight
 * row, input row), integer block sums and scales them in float32; AVX-512 takes two blocks per vector
 * (vpdpbusd where the CPU has VNNI, else vpmaddubsw + vpmaddwd: the same exact integers), AVX2 one. */
#include "qdot.h"
#include "quant.h"
#include "simd.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

int cst_qdot_supported(int type) {
    return type == CST_GGML_Q8_0 || type == CST_GGML_Q4_0 || type == CST_GGML_Q4_1 || type == CST_GGML_Q5_0 ||
           type == CST_GGML_Q5_1 || type == CST_GGML_Q4_K || type == CST_GGML_Q5_K || type == CST_GGML_Q6_K;
}

void cst_q8_quantize(int8_t *q, float *d, float *s, const float *x, int64_t N, int64_t K) {
    const int64_t nb = K / CST_Q8_BLOCK;
    for (int64_t i = 0; i < N * nb; i++) {
        const float *xb = x + i * CST_Q8_BLOCK;
        int8_t *qb = q + i * CST_Q8_BLOCK;
        float amax = 0.0f;
        for (int j = 0; j < CST_Q8_BLOCK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float dd = amax / 127.0f, id = dd > 0.0f ? 1.0f / dd : 0.0f;
        int sum = 0;
        for (int j = 0; j < CST_Q8_BLOCK; j++) {
            const int v = (int)roundf(xb[j] * id);
            qb[j] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
            sum += qb[j];
        }
        d[i] = dd;
        s[i] = dd * (float)sum;
    }
}

static inline uint16_t ld16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return h;
}

static inline uint32_t ld32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* Bytes per block and where the nibbles (Q8_0: the int8 quants) start; Q5_0 / Q5_1 keep the 32 fifth
 * bits (bit j for weight j) in the 4 bytes before them. */
static inline void block_layout(int type, int64_t *bytes, int64_t *qoff) {
    *bytes = type == CST_GGML_Q8_0 ? 34 : type == CST_GGML_Q4_1 ? 20 : type == CST_GGML_Q5_0 ? 22
             : type == CST_GGML_Q5_1 ? 24 : 18;
    *qoff = type == CST_GGML_Q4_1 ? 4 : type == CST_GGML_Q5_0 ? 6 : type == CST_GGML_Q5_1 ? 8 : 2;
}
/* Q4_1 / Q5_1 store a min per block (weight = q * dw + mw); Q4_0 / Q5_0 are centred instead (weight =
 * (q - zero) * dw), so their blocks add zero * dw * s with this factor. */
static inline int has_min(int type) { return type == CST_GGML_Q4_1 || type == CST_GGML_Q5_1; }
static inline int has_fifth_bit(int type) { return type == CST_GGML_Q5_0 || type == CST_GGML_Q5_1; }
static inline float zero_term(int type) {
    return type == CST_GGML_Q4_0 ? -8.0f : type == CST_GGML_Q5_0 ? -16.0f : 0.0f;
}

/* ---- portable ---- */

/* k-quants: one super-block of 256 weights spans 8 input blocks. Q4_K: sub-block j (32 weights,
 * 6-bit scale sc and min m) is dw * sc * nibble - dmin * m, so its product with input block j is
 * dw * sc * d * sum(nibble * q) - dmin * m * s; Q5_K the same with a fifth bit on each nibble. Q6_K:
 * 16 sub-blocks of 16 weights, (dw * sc) * (q6 - 32) with int8 sc: the two sub-blocks of an input block
 * combine exactly in integers before the scaling. */
static float row_dot_q4k_scalar(const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nsb,
                                int five) {
    float acc = 0.0f, macc = 0.0f;
    const int64_t bytes = five ? 176 : 144;
    for (int64_t sb = 0; sb < nsb; sb++, w += bytes, q += 256, d += 8, s += 8) {
        const float dw = cst_f16_to_f32(ld16(w)), dmin = cst_f16_to_f32(ld16(w + 2));
        const uint8_t *qs = w + (five ? 48 : 16), *qh = w + 16; /* Q5_K: sub-block j's fifth bits are bit j */
        for (int j = 0; j < 8; j += 2, qs += 32) {
            uint8_t sc0, m0, sc1, m1;
            cst_k4_scale_min(j, w + 4, &sc0, &m0);
            cst_k4_scale_min(j + 1, w + 4, &sc1, &m1);
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; l++) {
                const int b0 = five ? ((qh[l] >> j) & 1) << 4 : 0, b1 = five ? ((qh[l] >> (j + 1)) & 1) << 4 : 0;
                lo += ((qs[l] & 0xF) | b0) * q[32 * j + l];
                hi += ((qs[l] >> 4) | b1) * q[32 * j + 32 + l];
            }
            acc += dw * (float)sc0 * d[j] * (float)lo + dw * (float)sc1 * d[j + 1] * (float)hi;
            macc += dmin * (float)m0 * s[j] + dmin * (float)m1 * s[j + 1];
        }
    }
    return acc - macc;
}

/* The 6-bit quant of weight v (0..127) of one half (128 weights) of a Q6_K super-block. */
static inline int q6k_quant(const uint8_t *ql, const uint8_t *qh, int v) {
    const int nib = v < 64 ? ql[v] & 0xF : ql[v - 64] >> 4;
    return nib | (((qh[v % 32] >> (2 * (v / 32))) & 3) << 4);
}

static float row_dot_q6k_scalar(const uint8_t *w, const int8_t *q, const float *d, int64_t nsb) {
    float acc = 0.0f;
    for (int64_t sb = 0; sb < nsb; sb++, w += 210, q += 256, d += 8) {
        const int8_t *sc = (const int8_t *)(w + 192);
        const float dw = cst_f16_to_f32(ld16(w + 208));
        for (int b = 0; b < 8; b++) { /* input block b: weights 32b .. 32b+31 */
            const uint8_t *ql = w + 64 * (b / 4), *qh = w + 128 + 32 * (b / 4);
            int isum = 0;
            for (int h = 0; h < 2; h++) {
                int sub = 0;
                for (int l = 0; l < 16; l++) {
                    const int v = 32 * (b % 4) + 16 * h + l;
                    sub += (q6k_quant(ql, qh, v) - 32) * q[32 * b + 16 * h + l];
                }
                isum += sc[2 * b + h] * sub;
            }
            acc += dw * d[b] * (float)isum;
        }
    }
    return acc;
}

static float row_dot_scalar(const uint8_t *w, int type, const int8_t *q, const float *d, const float *s,
                            int64_t nb) {
    if (type == CST_GGML_Q4_K || type == CST_GGML_Q5_K)
        return row_dot_q4k_scalar(w, q, d, s, nb / 8, type == CST_GGML_Q5_K);
    if (type == CST_GGML_Q6_K) return row_dot_q6k_scalar(w, q, d, nb / 8);
    int64_t bb, qo;
    block_layout(type, &bb, &qo);
    float acc = 0.0f, macc = 0.0f;
    for (int64_t b = 0; b < nb; b++, w += bb, q += CST_Q8_BLOCK) {
        const float dw = cst_f16_to_f32(ld16(w));
        int isum = 0;
        if (type == CST_GGML_Q8_0) {
            const int8_t *wq = (const int8_t *)(w + qo);
            for (int j = 0; j < 32; j++) isum += wq[j] * q[j];
        } else {
            const uint8_t *wq = w + qo;
            const uint32_t qh = has_fifth_bit(type) ? ld32(w + qo - 4) : 0;
            for (int j = 0; j < 16; j++)
                isum += (int)((wq[j] & 0xF) | (((qh >> j) & 1) << 4)) * q[j] +
                        (int)((wq[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) * q[j + 16];
            macc += has_min(type) ? cst_f16_to_f32(ld16(w + 2)) * s[b] : zero_term(type) * dw * s[b];
        }
        acc += dw * d[b] * (float)isum;
    }
    return acc + macc;
}

#if defined(__x86_64__)
#define QDOT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QDOT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define QDOT_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512vnni")))

/* ---- AVX2: one block per 256-bit vector ---- */

static inline __attribute__((always_inline)) QDOT_TARGET_AVX2 float hsum8_avx2(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* Byte j = 0xFF where bit j of x is set (Q5_0 / Q5_1's fifth bits, in weight order). */
static inline __attribute__((always_inline)) QDOT_TARGET_AVX2 __m256i bits_to_bytes_avx2(uint32_t x) {
    const __m256i pick = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), pick);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

/* The eight 6-bit scales and mins of a Q4_K / Q5_K super-block as float32. */
static inline __attribute__((always_inline)) QDOT_TARGET_AVX2 void q4k_scales_avx2(const uint8_t *w, __m256 *sc,
                                                                                     __m256 *mn) {
    uint8_t a[8], m[8];
    for (int j = 0; j < 8; j++) cst_k4_scale_min(j, w + 4, &a[j], &m[j]);
    *sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)a)));
    *mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)m)));
}

QDOT_TARGET_AVX2 static float row_dot_q4k_avx2(const uint8_t *w, const int8_t *q, const float *d, const float *s,
                                               int64_t nsb, int five) {
    const __m256i ones = _mm256_set1_epi16(1), lo4 = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10);
    const int64_t bytes = five ? 176 : 144, qoff = five ? 48 : 16;
    __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++, w += bytes, q += 256, d += 8, s += 8) {
        __m256 sc, mn;
        q4k_scales_avx2(w, &sc, &mn);
        float scale[8];
        _mm256_storeu_ps(scale, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(ld16(w))), sc),
                                              _mm256_loadu_ps(d)));
        macc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(ld16(w + 2))), mn), _mm256_loadu_ps(s), macc);
        const __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(w + 16)) : _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            const __m256i p = _mm256_loadu_si256((const __m256i *)(w + qoff + 32 * (j / 2)));
            __m256i u = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(p, 4) : p, lo4);
            if (five) { /* bit j of qh[l] is weight l's fifth bit in sub-block j */
                const __m256i bj = _mm256_set1_epi8((char)(1 << j));
                u = _mm256_or_si256(u, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bj), bj), b4));
            }
            const __m256i x = _mm256_loadu_si256((const __m256i *)(q + 32 * j));
            const __m256i p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(scale[j]), acc);
        }
    }
    return hsum8_avx2(acc) - hsum8_avx2(macc);
}

QDOT_TARGET_AVX2 static float row_dot_q6k_avx2(const uint8_t *w, const int8_t *q, const float *d, int64_t nsb) {
    const __m256i ones = _mm256_set1_epi16(1), lo4 = _mm256_set1_epi8(0x0F), hb = _mm256_set1_epi8(0x30);
    const __m256i c32 = _mm256_set1_epi8(32);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++, w += 210, q += 256, d += 8) {
        const int8_t *sc = (const int8_t *)(w + 192);
        const float dw = _cvtsh_ss(ld16(w + 208));
        for (int b = 0; b < 8; b++) {
            const uint8_t *ql = w + 64 * (b / 4), *qh = w + 128 + 32 * (b / 4);
            const int k = b % 4; /* weights 32k.. of the half: nibbles of ql[32(k%2)..], high ones when k >= 2 */
            const __m256i l = _mm256_loadu_si256((const __m256i *)(ql + 32 * (k % 2)));
            const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
            const __m256i nib = _mm256_and_si256(k >= 2 ? _mm256_srli_epi16(l, 4) : l, lo4);
            const __m256i top = k == 0 ? _mm256_slli_epi16(h, 4) : k == 1 ? _mm256_slli_epi16(h, 2)
                                : k == 2 ? h : _mm256_srli_epi16(h, 2);
            const __m256i u = _mm256_or_si256(nib, _mm256_and_si256(top, hb));
            const __m256i x = _mm256_loadu_si256((const __m256i *)(q + 32 * b));
            const __m256i p32 = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones),
                                                 _mm256_madd_epi16(_mm256_maddubs_epi16(c32, x), ones));
            /* lanes 0-3 hold sub-block 2b, lanes 4-7 sub-block 2b + 1 */
            const __m256 scl = _mm256_set_m128(_mm_set1_ps((float)sc[2 * b + 1]), _mm_set1_ps((float)sc[2 * b]));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_mul_ps(scl, _mm256_set1_ps(dw * d[b])), acc);
        }
    }
    return hsum8_avx2(acc);
}

/* The 32-weight types, 8 blocks per group as the AVX-512 kernel does 16: the f16 scales (and mins) of
 * a group in one gather, its min terms in a vector, one block per vector, two accumulators. */
static inline __attribute__((always_inline)) QDOT_TARGET_AVX2 float row_dot_avx2_of(
    const uint8_t *w, const int type, const int8_t *q, const float *d, const float *s, int64_t nb) {
    int64_t bb, qo;
    block_layout(type, &bb, &qo);
    const __m256i ones = _mm256_set1_epi16(1), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i boff = _mm256_mullo_epi32(lane, _mm256_set1_epi32((int)bb)), low16 = _mm256_set1_epi32(0xFFFF);
    const __m128i lo4 = _mm_set1_epi8(0x0F);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    for (int64_t g = 0; g < nb; g += 8, w += 8 * bb, q += 8 * CST_Q8_BLOCK) {
        const int n = nb - g < 8 ? (int)(nb - g) : 8;
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane); /* blocks of this row */
        const __m256i h = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)w, boff, m, 1);
        const __m256i hd = _mm256_and_si256(h, low16), hm = _mm256_srli_epi32(h, 16);
        const __m256 dw =
            _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(hd), _mm256_extracti128_si256(hd, 1)));
        const __m256 dd = _mm256_mul_ps(dw, _mm256_maskload_ps(d + g, m));
        if (has_min(type))
            macc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(hm),
                                                                    _mm256_extracti128_si256(hm, 1))),
                                   _mm256_maskload_ps(s + g, m), macc);
        else if (type != CST_GGML_Q8_0) /* times zero_term below */
            macc = _mm256_fmadd_ps(dw, _mm256_maskload_ps(s + g, m), macc);
        for (int j = 0; j < n; j++) {
            const uint8_t *wb = w + j * bb;
            const __m256i x = _mm256_loadu_si256((const __m256i *)(q + j * CST_Q8_BLOCK));
            __m256i u, v;
            if (type == CST_GGML_Q8_0) { /* signed x signed: |w| times x with w's sign */
                const __m256i wq = _mm256_loadu_si256((const __m256i *)(wb + qo));
                u = _mm256_sign_epi8(wq, wq);
                v = _mm256_sign_epi8(x, wq);
            } else {
                const __m128i p = _mm_loadu_si128((const __m128i *)(wb + qo));
                u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), lo4), _mm_and_si128(p, lo4));
                if (has_fifth_bit(type))
                    u = _mm256_or_si256(
                        u, _mm256_and_si256(bits_to_bytes_avx2(ld32(wb + qo - 4)), _mm256_set1_epi8(0x10)));
                v = x;
            }
            const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, v), ones));
            const __m256 sc = _mm256_permutevar8x32_ps(dd, _mm256_set1_epi32(j));
            if (j & 1) acc1 = _mm256_fmadd_ps(p, sc, acc1);
            else acc0 = _mm256_fmadd_ps(p, sc, acc0);
        }
    }
    const float mins = hsum8_avx2(macc);
    return hsum8_avx2(_mm256_add_ps(acc0, acc1)) + (has_min(type) ? mins : zero_term(type) * mins);
}

/* One copy per type, so that the block layout and the branches on it are constants. */
QDOT_TARGET_AVX2 static float row_dot_avx2(const uint8_t *w, int type, const int8_t *q, const float *d,
                                           const float *s, int64_t nb) {
    switch (type) {
    case CST_GGML_Q4_K: return row_dot_q4k_avx2(w, q, d, s, nb / 8, 0);
    case CST_GGML_Q5_K: return row_dot_q4k_avx2(w, q, d, s, nb / 8, 1);
    case CST_GGML_Q6_K: return row_dot_q6k_avx2(w, q, d, nb / 8);
    case CST_GGML_Q4_0: return row_dot_avx2_of(w, CST_GGML_Q4_0, q, d, s, nb);
    case CST_GGML_Q4_1: return row_dot_avx2_of(w, CST_GGML_Q4_1, q, d, s, nb);
    case CST_GGML_Q5_0: return row_dot_avx2_of(w, CST_GGML_Q5_0, q, d, s, nb);
    case CST_GGML_Q5_1: return row_dot_avx2_of(w, CST_GGML_Q5_1, q, d, s, nb);
    default: return row_dot_avx2_of(w, CST_GGML_Q8_0, q, d, s, nb);
    }
}

/* ---- AVX-512: two blocks per vector ---- */

/* The 64 unsigned weight bytes u of blocks w0 and w1 (Q4: nibbles, low then high of each block; Q5:
 * with the fifth bits, which are in that same weight order; Q8_0: |w|, with the mask neg of the
 * negative weights, whose inputs are negated: u8 x s8 as maddubs and vpdpbusd take it). */
static inline __attribute__((always_inline)) QDOT_TARGET_AVX512 void weight_operand(
    __m512i *u, __mmask64 *neg, const uint8_t *w0, const uint8_t *w1, int type, int64_t qo) {
    if (type == CST_GGML_Q8_0) {
        const __m512i wq = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w0 + qo))),
            _mm256_loadu_si256((const __m256i *)(w1 + qo)), 1);
        *neg = _mm512_movepi8_mask(wq);
        *u = _mm512_abs_epi8(wq);
    } else {
        const __m512i p = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(w0 + qo)))),
            _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(w1 + qo))), 1);
        /* 128-bit lanes 1 and 3 (16-bit elements 8-15, 24-31) take the high nibbles. */
        *u = _mm512_and_si512(_mm512_mask_srli_epi16(p, 0xFF00FF00u, p, 4), _mm512_set1_epi8(0x0F));
        if (has_fifth_bit(type)) {
            const __mmask64 hi = (__mmask64)ld32(w0 + qo - 4) | ((__mmask64)ld32(w1 + qo - 4) << 32);
            *u = _mm512_mask_add_epi8(*u, hi, *u, _mm512_set1_epi8(0x10));
        }
        *neg = 0;
    }
}

/* k-quants, 64 weights (two input blocks) per vector. Each int32 lane of DOT sums 4 products; the
 * per-lane float scales come from one vector per super-block through a permutation. Q4_K: 32 bytes of
 * nibbles are sub-blocks 2j (low) and 2j+1 (high). Q6_K: a half super-block is 64 bytes of low
 * nibbles ql and 32 of 2-bit pairs qh; weights 0-63 are ql's low nibbles with qh's bits 0-1 (0-31)
 * and 2-3 (32-63), weights 64-127 the high nibbles with bits 4-5 and 6-7. q6 - 32 comes from
 * DOT(q6, x) - DOT(32, x): u8 x s8 as vpdpbusd takes it, int16 pair sums that cannot saturate. */
#define KQUANT_AVX512(NAME, TGT, DOT)                                                                   \
    /* ni input rows (input i at q + i * 256 * nsb, d and s + i * 8 * nsb) against one weight row: the  \
     * weights decoded once, each input's arithmetic the same whatever ni is. */                        \
    static inline __attribute__((always_inline)) TGT void NAME##_q4k_of(                                \
        float *r, const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nsb,      \
        const int five, const int ni) {                                                                 \
        const __m512i ones = _mm512_set1_epi16(1), lo4 = _mm512_set1_epi8(0x0F);                        \
        (void)ones;                                                                                     \
        const int64_t bytes = five ? 176 : 144, qoff = five ? 48 : 16, K = 256 * nsb, nb = 8 * nsb;     \
        const __m512i half = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, \
                                                                4, 3, 2, 1, 0), 3);                     \
        __m512 acc[4];                                                                                  \
        __m256 macc[4];                                                                                 \
        for (int i = 0; i < ni; i++) acc[i] = _mm512_setzero_ps(), macc[i] = _mm256_setzero_ps();      \
        for (int64_t sb = 0; sb < nsb; sb++, w += bytes, q += 256, d += 8, s += 8) {                    \
            __m256 sc, mn;                                                                              \
            q4k_scales_avx2(w, &sc, &mn);                                                               \
            const __m256 dsc = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(ld16(w))), sc);                   \
            const __m256 dmn = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(ld16(w + 2))), mn);               \
            __m512 scale[4];                                                                            \
            for (int i = 0; i < ni; i++) {                                                              \
                scale[i] = _mm512_castps256_ps512(_mm256_mul_ps(dsc, _mm256_loadu_ps(d + i * nb)));     \
                macc[i] = _mm256_fmadd_ps(dmn, _mm256_loadu_ps(s + i * nb), macc[i]);                   \
            }                                                                                           \
            const __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(w + 16)) : _mm256_setzero_si256(); \
            const __m512i qh2 = _mm512_inserti64x4(_mm512_castsi256_si512(qh), qh, 1);                  \
            for (int j = 0; j < 4; j++) {                                                               \
                const __m256i b = _mm256_loadu_si256((const __m256i *)(w + qoff + 32 * j));             \
                const __m512i p = _mm512_inserti64x4(_mm512_castsi256_si512(b), b, 1);                  \
                __m512i u = _mm512_and_si512(_mm512_mask_srli_epi16(p, 0xFFFF0000u, p, 4), lo4);        \
                if (five) { /* sub-blocks 2j (low half) and 2j+1 (high half): bits 2j and 2j+1 of qh */ \
                    const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << (2 * j))),      \
                                                           _mm256_set1_epi8((char)(2 << (2 * j))), 1);  \
                    u = _mm512_mask_add_epi8(u, _mm512_test_epi8_mask(qh2, bit), u, _mm512_set1_epi8(0x10)); \
                }                                                                                       \
                const __m512i idx = _mm512_add_epi32(half, _mm512_set1_epi32(2 * j));                   \
                for (int i = 0; i < ni; i++) {                                                          \
                    const __m512i p32 = DOT(u, _mm512_loadu_si512((const void *)(q + i * K + 64 * j))); \
                    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p32), _mm512_permutexvar_ps(idx, scale[i]), acc[i]); \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int i = 0; i < ni; i++) r[i] = _mm512_reduce_add_ps(acc[i]) - hsum8_avx2(macc[i]);         \
    }                                                                                                   \
    static inline __attribute__((always_inline)) TGT void NAME##_q6k_of(                                \
        float *r, const uint8_t *w, const int8_t *q, const float *d, int64_t nsb, const int ni) {       \
        const __m512i ones = _mm512_set1_epi16(1), lo4 = _mm512_set1_epi8(0x0F);                        \
        (void)ones;                                                                                     \
        const __m512i hb = _mm512_set1_epi8(0x30), c32 = _mm512_set1_epi8(32);                          \
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);    \
        const __m512i sub16 = _mm512_srli_epi32(lane, 2), sub32 = _mm512_srli_epi32(lane, 3);           \
        const int64_t K = 256 * nsb, nb = 8 * nsb;                                                      \
        __m512 acc[4];                                                                                  \
        for (int i = 0; i < ni; i++) acc[i] = _mm512_setzero_ps();                                      \
        for (int64_t sb = 0; sb < nsb; sb++, w += 210, q += 256, d += 8) {                              \
            const __m512 scf = _mm512_mul_ps(                                                           \
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 192)))),  \
                _mm512_set1_ps(_cvtsh_ss(ld16(w + 208))));                                              \
            __m512 dv[4];                                                                               \
            for (int i = 0; i < ni; i++) dv[i] = _mm512_castps256_ps512(_mm256_loadu_ps(d + i * nb));   \
            for (int h = 0; h < 2; h++) {                                                               \
                const __m512i l = _mm512_loadu_si512((const void *)(w + 64 * h));                       \
                const __m256i hq = _mm256_loadu_si256((const __m256i *)(w + 128 + 32 * h));             \
                const __m512i hh = _mm512_inserti64x4(_mm512_castsi256_si512(hq), _mm256_srli_epi16(hq, 2), 1); \
                for (int c = 0; c < 2; c++) {                                                           \
                    const int g = 2 * h + c; /* weights 64g .. 64g+63 of the super-block */             \
                    const __m512i u =                                                                   \
                        c ? _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), lo4), _mm512_and_si512(hh, hb)) \
                          : _mm512_or_si512(_mm512_and_si512(l, lo4), _mm512_and_si512(_mm512_slli_epi16(hh, 4), hb)); \
                    const __m512 sl = _mm512_permutexvar_ps(_mm512_add_epi32(sub16, _mm512_set1_epi32(4 * g)), scf); \
                    const __m512i didx = _mm512_add_epi32(sub32, _mm512_set1_epi32(2 * g));             \
                    for (int i = 0; i < ni; i++) {                                                      \
                        const __m512i x = _mm512_loadu_si512((const void *)(q + i * K + 64 * g));       \
                        const __m512i p32 = _mm512_sub_epi32(DOT(u, x), DOT(c32, x));                   \
                        const __m512 dl = _mm512_permutexvar_ps(didx, dv[i]);                           \
                        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p32), _mm512_mul_ps(sl, dl), acc[i]); \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int i = 0; i < ni; i++) r[i] = _mm512_reduce_add_ps(acc[i]);                               \
    }                                                                                                   \
    TGT static float NAME##_q4k(const uint8_t *w, const int8_t *q, const float *d, const float *s,      \
                                int64_t nsb) {                                                          \
        float r;                                                                                        \
        NAME##_q4k_of(&r, w, q, d, s, nsb, 0, 1);                                                       \
        return r;                                                                                       \
    }                                                                                                   \
    TGT static float NAME##_q5k(const uint8_t *w, const int8_t *q, const float *d, const float *s,      \
                                int64_t nsb) {                                                          \
        float r;                                                                                        \
        NAME##_q4k_of(&r, w, q, d, s, nsb, 1, 1);                                                       \
        return r;                                                                                       \
    }                                                                                                   \
    TGT static float NAME##_q6k(const uint8_t *w, const int8_t *q, const float *d, int64_t nsb) {       \
        float r;                                                                                        \
        NAME##_q6k_of(&r, w, q, d, nsb, 1);                                                             \
        return r;                                                                                       \
    }

/* One weight row against one input row, 16 blocks per group: their f16 scales (and Q4_1 mins) come in
 * one gather and one conversion, the min terms accumulate as a vector (no serial scalar chain), and
 * each pair of blocks takes its two scales from that vector by a permutation. A group's blocks past
 * the row's end are masked: gathered as 0, their inputs loaded as 0. Two accumulators halve the
 * fused-multiply-add latency chain. DOT(u, v) gives the 16 int32 sums of 4 products. */
#define ROW_DOT_AVX512(NAME, TGT, DOT)                                                                  \
    /* n (<= 16) blocks from w against ni input rows (q, d, s of input i at + i * K, + i * nb): a       \
     * constant 16 for whole groups, so that the pair loop unrolls; the weights are decoded once for   \
     * all ni inputs, and each input's arithmetic is the same whatever ni is (the same bits). */       \
    static inline __attribute__((always_inline)) TGT void NAME##_group(                                 \
        __m512 acc[][3], const uint8_t *w, const int type, const int8_t *q, const float *d, const float *s, \
        const int n, const int ni, int64_t K, int64_t nb) {                                             \
        int64_t bb, qo;                                                                                 \
        block_layout(type, &bb, &qo);                                                                   \
        const __m512i ones = _mm512_set1_epi16(1);                                                      \
        (void)ones;                                                                                     \
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);    \
        const __m512i pair = _mm512_srli_epi32(lane, 3);                                                \
        const __m512i boff = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)bb));                      \
        const __mmask16 m = (__mmask16)(n == 16 ? 0xFFFFu : (1u << n) - 1u);                            \
        /* bytes 0-3 of each block: the f16 scale, then the Q4_1 / Q5_1 min (or unused bytes) */        \
        const __m512i h = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, boff, w, 1);          \
        const __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));                                    \
        const __m512 mw = has_min(type) ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16))) : dw; \
        __m512 dd[4];                                                                                   \
        for (int i = 0; i < ni; i++) {                                                                  \
            dd[i] = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(m, d + i * nb));                            \
            if (type != CST_GGML_Q8_0) /* Q4_1 / Q5_1: mins; Q4_0 / Q5_0: scales times zero_term at the end */ \
                acc[i][2] = _mm512_fmadd_ps(mw, _mm512_maskz_loadu_ps(m, s + i * nb), acc[i][2]);       \
        }                                                                                               \
        for (int j = 0; j < n; j += 2) {                                                                \
            const int two = j + 1 < n;                                                                  \
            const uint8_t *w0 = w + j * bb, *w1 = two ? w0 + bb : w0;                                   \
            __m512i u;                                                                                  \
            __mmask64 neg;                                                                              \
            weight_operand(&u, &neg, w0, w1, type, qo);                                                 \
            const __m512i idx = _mm512_add_epi32(pair, _mm512_set1_epi32(j));                           \
            for (int i = 0; i < ni; i++) {                                                              \
                const __m512i x = _mm512_maskz_loadu_epi8(two ? ~(__mmask64)0 : 0xFFFFFFFFull,          \
                                                          q + i * K + j * CST_Q8_BLOCK);                \
                const __m512i v = type == CST_GGML_Q8_0 ? _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x) : x; \
                const __m512 p = _mm512_cvtepi32_ps(DOT(u, v));                                         \
                acc[i][(j >> 1) & 1] = _mm512_fmadd_ps(p, _mm512_permutexvar_ps(idx, dd[i]), acc[i][(j >> 1) & 1]); \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
    static inline __attribute__((always_inline)) TGT void NAME##_of(                                    \
        float *r, const uint8_t *w, const int type, const int8_t *q, const float *d, const float *s, int64_t nb, \
        const int ni) {                                                                                 \
        int64_t bb, qo;                                                                                 \
        block_layout(type, &bb, &qo);                                                                   \
        const int64_t K = nb * CST_Q8_BLOCK;                                                            \
        __m512 acc[4][3];                                                                               \
        for (int i = 0; i < ni; i++) acc[i][0] = acc[i][1] = acc[i][2] = _mm512_setzero_ps();           \
        int64_t g = 0;                                                                                  \
        for (; g + 16 <= nb; g += 16)                                                                   \
            NAME##_group(acc, w + g * bb, type, q + g * CST_Q8_BLOCK, d + g, s + g, 16, ni, K, nb);     \
        if (g < nb)                                                                                     \
            NAME##_group(acc, w + g * bb, type, q + g * CST_Q8_BLOCK, d + g, s + g, (int)(nb - g), ni, K, nb); \
        for (int i = 0; i < ni; i++) { /* one horizontal sum per row: the min terms folded in first */  \
            const __m512 mins = has_min(type) ? acc[i][2] : _mm512_mul_ps(acc[i][2], _mm512_set1_ps(zero_term(type))); \
            r[i] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), mins));      \
        }                                                                                               \
    }                                                                                                   \
    /* Four input rows against one weight row. */                                                   \
    TGT static void NAME##_x4(float r[4], const uint8_t *w, int type, const int8_t *q, const float *d,  \
                              const float *s, int64_t nb) {                                             \
        switch (type) {                                                                                 \
        case CST_GGML_Q4_K: NAME##_q4k_of(r, w, q, d, s, nb / 8, 0, 4); break;                          \
        case CST_GGML_Q5_K: NAME##_q4k_of(r, w, q, d, s, nb / 8, 1, 4); break;                          \
        case CST_GGML_Q6_K: NAME##_q6k_of(r, w, q, d, nb / 8, 4); break;                                \
        case CST_GGML_Q4_1: NAME##_of(r, w, CST_GGML_Q4_1, q, d, s, nb, 4); break;                      \
        case CST_GGML_Q4_0: NAME##_of(r, w, CST_GGML_Q4_0, q, d, s, nb, 4); break;                      \
        case CST_GGML_Q5_1: NAME##_of(r, w, CST_GGML_Q5_1, q, d, s, nb, 4); break;                      \
        case CST_GGML_Q5_0: NAME##_of(r, w, CST_GGML_Q5_0, q, d, s, nb, 4); break;                      \
        default: NAME##_of(r, w, CST_GGML_Q8_0, q, d, s, nb, 4); break;                                 \
        }                                                                                               \
    }                                                                                                   \
    /* One copy per type, so that the block layout and the branches on it are constants. */            \
    TGT static float NAME(const uint8_t *w, int type, const int8_t *q, const float *d, const float *s,   \
                          int64_t nb) {                                                                 \
        if (type == CST_GGML_Q4_K) return NAME##_q4k(w, q, d, s, nb / 8);                               \
        if (type == CST_GGML_Q5_K) return NAME##_q5k(w, q, d, s, nb / 8);                               \
        if (type == CST_GGML_Q6_K) return NAME##_q6k(w, q, d, nb / 8);                                  \
        float r;                                                                                        \
        switch (type) {                                                                                 \
        case CST_GGML_Q4_1: NAME##_of(&r, w, CST_GGML_Q4_1, q, d, s, nb, 1); break;                     \
        case CST_GGML_Q4_0: NAME##_of(&r, w, CST_GGML_Q4_0, q, d, s, nb, 1); break;                     \
        case CST_GGML_Q5_1: NAME##_of(&r, w, CST_GGML_Q5_1, q, d, s, nb, 1); break;                     \
        case CST_GGML_Q5_0: NAME##_of(&r, w, CST_GGML_Q5_0, q, d, s, nb, 1); break;                     \
        default: NAME##_of(&r, w, CST_GGML_Q8_0, q, d, s, nb, 1); break;                                \
        }                                                                                               \
        return r;                                                                                       \
    }
#define DOT_BW(u, v) _mm512_madd_epi16(_mm512_maddubs_epi16(u, v), ones)
#define DOT_VNNI(u, v) _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, v)
KQUANT_AVX512(row_dot_avx512bw, QDOT_TARGET_AVX512, DOT_BW)
KQUANT_AVX512(row_dot_vnni, QDOT_TARGET_VNNI, DOT_VNNI)
ROW_DOT_AVX512(row_dot_avx512bw, QDOT_TARGET_AVX512, DOT_BW)
ROW_DOT_AVX512(row_dot_vnni, QDOT_TARGET_VNNI, DOT_VNNI)
#endif

#define QDOT_PREFETCH 8192 /* bytes ahead of the current weight row that cst_qmatvec prefetches */

typedef float (*row_dot_fn)(const uint8_t *, int, const int8_t *, const float *, const float *, int64_t);
/* Four input rows at once (input i at q + i * K, d + i * nb, s + i * nb), each giving the bits the
 * single-row kernel gives it. */
typedef void (*row_dot4_fn)(float *, const uint8_t *, int, const int8_t *, const float *, const float *, int64_t);

#if defined(__x86_64__)
/* 1 when the AVX-512 kernels take the VNNI instruction (CST_NO_VNNI=1 in the environment at the first
 * call takes the AVX512BW kernel, so that tests reach it on VNNI machines). */
static int use_vnni(void) {
    static int vnni = -1;
    if (vnni < 0) {
        const char *off = getenv("CST_NO_VNNI");
        vnni = __builtin_cpu_supports("avx512vnni") && !(off && off[0] == '1');
    }
    return vnni;
}
#endif

/* The row kernel of the current SIMD path. */
static row_dot_fn pick_row_dot(void) {
#if defined(__x86_64__)
    if (cst_simd_current() == CST_SIMD_AVX512) return use_vnni() ? row_dot_vnni : row_dot_avx512bw;
    if (cst_simd_current() == CST_SIMD_AVX2) return row_dot_avx2;
#endif
    return row_dot_scalar;
}

/* The four-row kernel, where there is one (AVX-512), else NULL. */
static row_dot4_fn pick_row_dot4(void) {
#if defined(__x86_64__)
    if (cst_simd_current() == CST_SIMD_AVX512) return use_vnni() ? row_dot_vnni_x4 : row_dot_avx512bw_x4;
#endif
    return NULL;
}

void cst_qmatvec(float *out, const uint8_t *w, int type, const int8_t *q, const float *d, const float *s,
                 int64_t N, int64_t K, int64_t O, int64_t ldo, int accumulate) {
    int64_t be, bb;
    cst_quant_block_info(type, &be, &bb);
    const int64_t nb = K / CST_Q8_BLOCK, row_bytes = K / be * bb;
    const row_dot_fn dot = pick_row_dot();
    const row_dot4_fn dot4 = pick_row_dot4();
    const int64_t total = O * row_bytes;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < O; o++) {
        const uint8_t *wr = w + o * row_bytes;
        /* Batch-1 decoding streams every weight once from DRAM, and one core's hardware prefetch does
         * not keep enough lines in flight: asking for the bytes QDOT_PREFETCH ahead of this row cut
         * one token's products on SmolLM2 Q4_1 from 14.4-14.8 to 10.0-10.9 ms on one thread (best of
         * 20, 3 runs each, 2026-12-01, Xeon with AVX-512, load average 4.5; 8-32 KB about equal). */
        for (int64_t b = o * row_bytes + QDOT_PREFETCH; b < (o + 1) * row_bytes + QDOT_PREFETCH && b < total; b += 64)
            __builtin_prefetch(w + b, 0, 3);
        int64_t n = 0;
        /* Several input rows (batched decoding, prefill): the weight row decoded once per four. */
        for (; dot4 && n + 4 <= N; n += 4) {
            float r[4];
            dot4(r, wr, type, q + n * K, d + n * nb, s + n * nb, nb);
            for (int i = 0; i < 4; i++) out[(n + i) * ldo + o] = accumulate ? out[(n + i) * ldo + o] + r[i] : r[i];
        }
        for (; n < N; n++) {
            const float r = dot(wr, type, q + n * K, d + n * nb, s + n * nb, nb);
            out[n * ldo + o] = accumulate ? out[n * ldo + o] + r : r;
        }
    }
}
