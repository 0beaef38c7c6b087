/* bf16.c: conversions between fp32 and bf16 storage, and the k-pair layout of bf16 GEMM operands.
 * Pure data movement with round-to-nearest-even; no products (those are in gemm.c). */
#include "bf16.h"
#include "simd.h"

/* One loop body per SIMD path: the compiler vectorises the integer rounding; results are identical. */
#define BF16_FROM(NAME, TGT)                                                                  \
    TGT static void NAME(uint16_t *dst, const float *src, int64_t n) {                        \
        for (int64_t i = 0; i < n; i++) dst[i] = cst_bf16_round(src[i]);                      \
    }
#define BF16_ROUND(NAME, TGT)                                                                 \
    TGT static void NAME(float *dst, const float *src, int64_t n) {                           \
        for (int64_t i = 0; i < n; i++) dst[i] = cst_bf16_to_f32(cst_bf16_round(src[i]));     \
    }
#define BF16_TO(NAME, TGT)                                                                    \
    TGT static void NAME(float *dst, const uint16_t *src, int64_t n) {                        \
        for (int64_t i = 0; i < n; i++) dst[i] = cst_bf16_to_f32(src[i]);                     \
    }

BF16_FROM(from_scalar, )
BF16_ROUND(round_scalar, )
BF16_TO(to_scalar, )
#if defined(__x86_64__)
BF16_FROM(from_avx2, CST_TARGET_AVX2)
BF16_ROUND(round_avx2, CST_TARGET_AVX2)
BF16_ROUND(round_avx512, CST_TARGET_AVX512)
BF16_TO(to_avx2, CST_TARGET_AVX2)
BF16_TO(to_avx512, CST_TARGET_AVX512)
#endif

/* Pair row d[j] = bf16(r0[j]) | bf16(r1[j]) << 16 for j in [j0, j1); r1 NULL: the odd last row, paired
 * with zero. */
static void pairs_row_scalar(uint32_t *d, const float *r0, const float *r1, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++)
        d[j] = (uint32_t)cst_bf16_round(r0[j]) | (r1 ? (uint32_t)cst_bf16_round(r1[j]) << 16 : 0u);
}

#if defined(__x86_64__)
#include <immintrin.h>
/* cst_bf16_round on 16 lanes with integer ops (the compiler does not vectorise its NaN branch well):
 * u + 0x7fff + lsb, the top half kept; NaN lanes get their top half with the quiet bit set. */
CST_TARGET_AVX512 static inline __m256i round16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

CST_TARGET_AVX512 static void from_avx512_v(uint16_t *dst, const float *src, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(dst + i), round16(_mm512_loadu_ps(src + i)));
    for (; i < n; i++) dst[i] = cst_bf16_round(src[i]);
}

/* The lanes of x that are fp32 denormals (exponent bits 0, mantissa not): vcvtne2ps2bf16 reads them as
 * zero, so its users round vectors holding one another way, keeping the scalar rounding's bits. */
__attribute__((target("avx512f"), always_inline)) static inline __mmask16 denormals16(__m512 x) { /* inlined into the AVX512_BF16 functions */
    const __m512i u = _mm512_castps_si512(x);
    return _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000)) & _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x007fffff));
}

/* The same bits with AVX512_BF16's vcvtne2ps2bf16 (round to nearest even, NaN quieted as above), 32 values
 * an instruction, ~5x the integer rounding's rate on data in L2; a vector holding a denormal goes through
 * round16, so denormals are kept. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void from_avx512bf16(uint16_t *dst,
                                                                                          const float *src,
                                                                                          int64_t n) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512 a = _mm512_loadu_ps(src + i), b = _mm512_loadu_ps(src + i + 16);
        if (denormals16(a) | denormals16(b)) {
            _mm256_storeu_si256((__m256i *)(dst + i), round16(a));
            _mm256_storeu_si256((__m256i *)(dst + i + 16), round16(b));
        } else {
            _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
    }
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(dst + i), round16(_mm512_loadu_ps(src + i)));
    for (; i < n; i++) dst[i] = cst_bf16_round(src[i]);
}

/* The same with vcvtne2ps2bf16: 16 columns of two rows rounded in one instruction, the two halves then
 * interleaved into k pairs (one vpermw); a block holding a denormal, and the tail, take pairs_row_scalar. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void pairs_row_avx512bf16(
    uint32_t *d, const float *r0, const float *r1, int64_t C) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    int64_t j = 0;
    for (; j + 16 <= C; j += 16) {
        const __m512 a = _mm512_loadu_ps(r0 + j), b = r1 ? _mm512_loadu_ps(r1 + j) : _mm512_setzero_ps();
        if (denormals16(a) | denormals16(b))
            pairs_row_scalar(d, r0, r1, j, j + 16);
        else
            _mm512_storeu_si512(d + j, _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(b, a)));
    }
    pairs_row_scalar(d, r0, r1, j, C);
}
#endif

void cst_bf16_from_f32(uint16_t *dst, const float *src, int64_t n) {
#if defined(__x86_64__)
    const cst_simd_path p = cst_simd_current();
    /* the AVX-512 path is on only where the CPU has AVX-512; __builtin_cpu_supports reads a table */
    if (p == CST_SIMD_AVX512)
        return __builtin_cpu_supports("avx512bf16") ? from_avx512bf16(dst, src, n) : from_avx512_v(dst, src, n);
    if (p == CST_SIMD_AVX2) return from_avx2(dst, src, n);
#endif
    from_scalar(dst, src, n);
}

/* Large arrays in parallel chunks of 64 Ki elements (elementwise, so any split gives the same bits). */
#define BF16_CHUNKED(FN, DST, SRC, N)                                                          \
    do {                                                                                       \
        const int64_t nch_ = ((N) + 65535) / 65536;                                            \
        _Pragma("omp parallel for schedule(static) if (nch_ > 1)")                             \
        for (int64_t ch = 0; ch < nch_; ch++) {                                                \
            const int64_t i0 = ch * 65536, n_ = (N) - i0 < 65536 ? (N) - i0 : 65536;           \
            FN((DST) + i0, (SRC) + i0, n_);                                                    \
        }                                                                                      \
    } while (0)

static void to_path(float *dst, const uint16_t *src, int64_t n) {
#if defined(__x86_64__)
    const cst_simd_path p = cst_simd_current();
    if (p == CST_SIMD_AVX512) return to_avx512(dst, src, n);
    if (p == CST_SIMD_AVX2) return to_avx2(dst, src, n);
#endif
    to_scalar(dst, src, n);
}

static void round_path(float *dst, const float *src, int64_t n) {
#if defined(__x86_64__)
    const cst_simd_path p = cst_simd_current();
    if (p == CST_SIMD_AVX512) return round_avx512(dst, src, n);
    if (p == CST_SIMD_AVX2) return round_avx2(dst, src, n);
#endif
    round_scalar(dst, src, n);
}

void cst_bf16_to_f32_n(float *dst, const uint16_t *src, int64_t n) { BF16_CHUNKED(to_path, dst, src, n); }

void cst_bf16_round_f32(float *dst, const float *src, int64_t n) { BF16_CHUNKED(round_path, dst, src, n); }

void cst_bf16_pairs_f32(uint32_t *dst, const float *src, int64_t lds, int64_t R, int64_t C) {
    /* Its one caller, the dot way of the bf16 GEMM, runs only on CPUs with AVX512_BF16; the scalar rows
     * keep it correct anywhere. */
#if defined(__x86_64__)
    const int vec = __builtin_cpu_supports("avx512bf16");
#else
    const int vec = 0;
#endif
#pragma omp parallel for schedule(static) if ((double)R * C >= 1e5)
    for (int64_t p = 0; p < (R + 1) / 2; p++) {
        const float *r0 = src + 2 * p * lds, *r1 = 2 * p + 1 < R ? r0 + lds : NULL;
#if defined(__x86_64__)
        if (vec) {
            pairs_row_avx512bf16(dst + p * C, r0, r1, C);
            continue;
        }
#endif
        pairs_row_scalar(dst + p * C, r0, r1, 0, C);
    }
    (void)vec;
}

void cst_bf16_rows_f32(uint16_t *dst, const float *src, int64_t lds, int64_t R, int64_t C, int64_t Cp) {
    if (lds == C && Cp == C && (double)R * C < 1e5) return cst_bf16_from_f32(dst, src, R * C);
#pragma omp parallel for schedule(static) if ((double)R * C >= 1e5)
    for (int64_t r = 0; r < R; r++) {
        cst_bf16_from_f32(dst + r * Cp, src + r * lds, C);
        for (int64_t j = C; j < Cp; j++) dst[r * Cp + j] = 0;
    }
}

void cst_bf16_rows_bf16(uint16_t *dst, const uint16_t *src, int64_t lds, int64_t R, int64_t C, int64_t Cp) {
    for (int64_t r = 0; r < R; r++) {
        memcpy(dst + r * Cp, src + r * lds, (size_t)C * sizeof(uint16_t));
        for (int64_t j = C; j < Cp; j++) dst[r * Cp + j] = 0;
    }
}

int cst_bf16_dot_supported(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && cst_simd_detect() == CST_SIMD_AVX512;
#else
    return 0;
#endif
}
