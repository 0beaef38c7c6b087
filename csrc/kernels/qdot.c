/* qdot.c: products against GGUF Q8_0 / Q4_0 / Q4_1 weight blocks (see qdot.h). Decoding one token
 * reads every weight once, so batch-1 generation is bound by the bytes streamed: 20 bytes per 32
 * Q4_1 weights instead of 128 in float32. Each path computes, per (weight row, input row), integer
 * block sums and scales them in float32; AVX-512 takes two blocks per vector (vpdpbusd where the CPU
 * has VNNI, else vpmaddubsw + vpmaddwd: the same exact integers), AVX2 one block. */
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
    return type == CST_GGML_Q8_0 || type == CST_GGML_Q4_0 || type == CST_GGML_Q4_1;
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

/* Bytes per block and where the quantised values start. */
static inline void block_layout(int type, int64_t *bytes, int64_t *qoff) {
    *bytes = type == CST_GGML_Q8_0 ? 34 : type == CST_GGML_Q4_1 ? 20 : 18;
    *qoff = type == CST_GGML_Q4_1 ? 4 : 2;
}

/* ---- portable ---- */

static float row_dot_scalar(const uint8_t *w, int type, const int8_t *q, const float *d, const float *s,
                            int64_t nb) {
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
            for (int j = 0; j < 16; j++) isum += (wq[j] & 0xF) * q[j] + (wq[j] >> 4) * q[j + 16];
            macc += type == CST_GGML_Q4_1 ? cst_f16_to_f32(ld16(w + 2)) * s[b] : -8.0f * dw * s[b];
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

QDOT_TARGET_AVX2 static float row_dot_avx2(const uint8_t *w, int type, const int8_t *q, const float *d,
                                           const float *s, int64_t nb) {
    int64_t bb, qo;
    block_layout(type, &bb, &qo);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m128i lo4 = _mm_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float macc = 0.0f;
    for (int64_t b = 0; b < nb; b++, w += bb, q += CST_Q8_BLOCK) {
        const float dw = _cvtsh_ss(ld16(w));
        const __m256i x = _mm256_loadu_si256((const __m256i *)q);
        __m256i u, v;
        if (type == CST_GGML_Q8_0) { /* signed x signed: |w| times x with w's sign */
            const __m256i wq = _mm256_loadu_si256((const __m256i *)(w + qo));
            u = _mm256_sign_epi8(wq, wq);
            v = _mm256_sign_epi8(x, wq);
        } else {
            const __m128i p = _mm_loadu_si128((const __m128i *)(w + qo));
            u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), lo4), _mm_and_si128(p, lo4));
            v = x;
            macc += type == CST_GGML_Q4_1 ? _cvtsh_ss(ld16(w + 2)) * s[b] : -8.0f * dw * s[b];
        }
        const __m256i p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(u, v), ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(dw * d[b]), acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h) + macc;
}

/* ---- AVX-512: two blocks per vector ---- */

/* The 64 unsigned weight bytes of blocks w0 and w1 (Q4: nibbles, low then high of each block) and the
 * matching input bytes (Q8_0: |w| and x with w's sign, as maddubs and vpdpbusd take u8 x s8). */
static inline __attribute__((always_inline)) QDOT_TARGET_AVX512 void pair_operands(
    __m512i *u, __m512i *v, const uint8_t *w0, const uint8_t *w1, __m512i x, int type, int64_t qo) {
    if (type == CST_GGML_Q8_0) {
        const __m512i wq = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w0 + qo))),
            _mm256_loadu_si256((const __m256i *)(w1 + qo)), 1);
        const __mmask64 neg = _mm512_movepi8_mask(wq);
        *u = _mm512_abs_epi8(wq);
        *v = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
    } else {
        const __m512i p = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(w0 + qo)))),
            _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(w1 + qo))), 1);
        /* 128-bit lanes 1 and 3 (16-bit elements 8-15, 24-31) take the high nibbles. */
        *u = _mm512_and_si512(_mm512_mask_srli_epi16(p, 0xFF00FF00u, p, 4), _mm512_set1_epi8(0x0F));
        *v = x;
    }
}

/* One weight row against one input row, two blocks per iteration (the last alone when nb is odd: its
 * pair's upper half reads zeros and gets scale 0). DOT(u, v) gives the 16 int32 sums of 4 products. */
#define ROW_DOT_AVX512(NAME, TGT, DOT)                                                                  \
    static inline __attribute__((always_inline)) TGT float NAME##_of(                                   \
        const uint8_t *w, const int type, const int8_t *q, const float *d, const float *s, int64_t nb) { \
        int64_t bb, qo;                                                                                 \
        block_layout(type, &bb, &qo);                                                                   \
        const __m512i ones = _mm512_set1_epi16(1);                                                      \
        (void)ones;                                                                                     \
        __m512 acc = _mm512_setzero_ps();                                                               \
        float macc = 0.0f;                                                                              \
        for (int64_t b = 0; b < nb; b += 2) {                                                           \
            const int two = b + 1 < nb;                                                                 \
            const uint8_t *w0 = w + b * bb, *w1 = two ? w0 + bb : w0;                                   \
            const __m512i x = _mm512_maskz_loadu_epi8(two ? ~(__mmask64)0 : 0xFFFFFFFFull, q + b * CST_Q8_BLOCK); \
            __m512i u, v;                                                                               \
            pair_operands(&u, &v, w0, w1, x, type, qo);                                                 \
            const __m512i p32 = DOT(u, v);                                                              \
            const float dw0 = _cvtsh_ss(ld16(w0)), dw1 = two ? _cvtsh_ss(ld16(w1)) : 0.0f;              \
            const __m512 sc = _mm512_insertf32x8(_mm512_set1_ps(dw0 * d[b]),                            \
                                                 _mm256_set1_ps(two ? dw1 * d[b + 1] : 0.0f), 1);       \
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p32), sc, acc);                                    \
            if (type == CST_GGML_Q4_1) {                                                                \
                macc += _cvtsh_ss(ld16(w0 + 2)) * s[b];                                                 \
                if (two) macc += _cvtsh_ss(ld16(w1 + 2)) * s[b + 1];                                    \
            } else if (type == CST_GGML_Q4_0) {                                                         \
                macc += -8.0f * dw0 * s[b];                                                             \
                if (two) macc += -8.0f * dw1 * s[b + 1];                                                \
            }                                                                                           \
        }                                                                                               \
        return _mm512_reduce_add_ps(acc) + macc;                                                        \
    }                                                                                                   \
    /* One copy per type, so that the block layout and the branches on it are constants. */            \
    TGT static float NAME(const uint8_t *w, int type, const int8_t *q, const float *d, const float *s,   \
                          int64_t nb) {                                                                 \
        if (type == CST_GGML_Q4_1) return NAME##_of(w, CST_GGML_Q4_1, q, d, s, nb);                     \
        if (type == CST_GGML_Q4_0) return NAME##_of(w, CST_GGML_Q4_0, q, d, s, nb);                     \
        return NAME##_of(w, CST_GGML_Q8_0, q, d, s, nb);                                                \
    }
#define DOT_BW(u, v) _mm512_madd_epi16(_mm512_maddubs_epi16(u, v), ones)
#define DOT_VNNI(u, v) _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, v)
ROW_DOT_AVX512(row_dot_avx512bw, QDOT_TARGET_AVX512, DOT_BW)
ROW_DOT_AVX512(row_dot_vnni, QDOT_TARGET_VNNI, DOT_VNNI)
#endif

typedef float (*row_dot_fn)(const uint8_t *, int, const int8_t *, const float *, const float *, int64_t);

/* The row kernel of the current SIMD path (AVX-512 with VNNI when the CPU has it; CST_NO_VNNI=1 in the
 * environment at the first call takes the AVX512BW kernel, so that tests reach it on VNNI machines). */
static row_dot_fn pick_row_dot(void) {
#if defined(__x86_64__)
    static int vnni = -1;
    if (vnni < 0) {
        const char *off = getenv("CST_NO_VNNI");
        vnni = __builtin_cpu_supports("avx512vnni") && !(off && off[0] == '1');
    }
    if (cst_simd_current() == CST_SIMD_AVX512) return vnni ? row_dot_vnni : row_dot_avx512bw;
    if (cst_simd_current() == CST_SIMD_AVX2) return row_dot_avx2;
#endif
    return row_dot_scalar;
}

void cst_qmatvec(float *out, const uint8_t *w, int type, const int8_t *q, const float *d, const float *s,
                 int64_t N, int64_t K, int64_t O, int accumulate) {
    int64_t bb, qo;
    block_layout(type, &bb, &qo);
    const int64_t nb = K / CST_Q8_BLOCK, row_bytes = nb * bb;
    const row_dot_fn dot = pick_row_dot();
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < O; o++) {
        const uint8_t *wr = w + o * row_bytes;
        for (int64_t n = 0; n < N; n++) {
            const float r = dot(wr, type, q + n * K, d + n * nb, s + n * nb, nb);
            out[n * O + o] = accumulate ? out[n * O + o] + r : r;
        }
    }
}
