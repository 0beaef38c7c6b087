/* gemm.c: packed single-precision GEMM (GotoBLAS/BLIS loop nest) with AVX-512, AVX2+FMA and portable
 * microkernels chosen at run time, plus a GEMV-like path for a few rows times a big weight. Not a BLAS:
 * no alpha/beta beyond "overwrite or add", row-major output only.
 *
 * Loop nest per thread (our C is row-major, so the vector-loaded operand is B and the broadcast one A;
 * this is BLIS's nest with the roles of A and B swapped):
 *   ic over rows in MC:  pc over k in KC:  pack A (MC x KC, MR-row panels, k-major)
 *     jc over columns in NC:  pack B (KC x NC, NR-column panels, k-major; ~512 KiB, stays in L2)
 *       ir over MR-row panels (one A micro-panel, reused from L1 across the jr loop):
 *         jr over NR-column panels: microkernel MR x NR, kc rank-1 updates in registers.
 * Determinism: KC is a per-path constant and every output element is owned by one thread, which adds
 * the KC blocks in ascending k; the split between threads only decides who computes a tile. */
#define _DEFAULT_SOURCE /* syscall() under -std=c11, for the AMX permission request */
#include "gemm.h"
#include "bf16.h"
#include "simd.h"
#include "avx512.h"
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* k block: 256 keeps an A micro-panel (MR x KC, 8 KiB at MR=8) in L1 and a B block (KC x NC,
 * 576 KiB) in the 1 MiB L2 of Zen 4; long enough that loading/storing the C tile is ~1% of the work. */
#define KC 256
/* The AVX-512 fp32 path cuts K into equal blocks of at most 512 instead, with proportionally fewer
 * columns per B block (gemm_run): K = 1024 (every weight gradient) then reads and writes C twice, not
 * four times. On Zen 4 (2 threads, best of 0.5 s, 3-4 alternating rounds on a noisy host) the weight
 * gradients gained 2-6% at the median, the LM head's none; see docs/benchmarks.md. */
#define KCMAX512 512

typedef void (*ukr_fn)(int64_t kc, const float *ap, const float *b, int64_t ldb, float *c,
                       int64_t ldc, int mr, int nr, int beta);

typedef struct {
    int mr, nr;   /* microkernel tile */
    int mcp, ncp; /* A block = mcp row panels, B block = ncp column panels */
    ukr_fn ukr;
    int simd_pack; /* the CPU runs the AVX2 packers */
    int kcmax;     /* 0: k blocks of KC; else K is cut into equal blocks of at most kcmax (multiples of 8) */
} gemm_cfg;

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---- packing (a small fraction of the flops) ---- */

#if defined(__x86_64__)
static void pack_b_t_avx2(float *d, const float *s, int64_t rsb, int64_t csb, int64_t kc, int nr, int NR);
#endif


/* k rows per group when packing a transposed A (a multiple of 8: 8 x MR floats are whole cache lines). */
#define PACK_KG 8

/* A rows [i0, i0+mc), k [p0, p0+kc) -> panels of MR rows: dst[panel*MR*kc + k*MR + i], zero-padded. */
static void pack_a(float *dst, const float *a, int64_t rsa, int64_t csa, int64_t i0, int64_t mc,
                   int64_t p0, int64_t kc, int MR, int simd) {
    if (rsa == 1) {
        /* A transposed in memory (the weight gradient's dout^T): each k gives mc contiguous values. Walk k
         * in groups of PACK_KG rows: the group (PACK_KG x mc values, at most 32 KiB) stays in L1 while it
         * is copied panel by panel, so every source row is still read once, front to back, and each panel
         * receives PACK_KG x MR contiguous values (whole cache lines). One k at a time would write MR
         * values to every panel in turn, MR * kc floats apart: a multiple of 4 KiB whenever kc is a
         * multiple of 128, so those writes all fall in one L1 set (Zen 5, one thread, K = 1024: 217 vs
         * 244 GFLOP/s at K = 576). */
        const int64_t full = mc / MR * MR;
        for (int64_t k0 = 0; k0 < kc; k0 += PACK_KG) {
            const int64_t kn = min64(PACK_KG, kc - k0);
            const float *sk = a + i0 + (p0 + k0) * csa;
            for (int64_t ip = 0; ip < full; ip += MR) {
                float *d = dst + ip * kc + k0 * MR;
                if (MR == 8) /* a constant size, so the copy is two vector moves, not a call */
                    for (int64_t k = 0; k < kn; k++) memcpy(d + k * 8, sk + k * csa + ip, 8 * sizeof(float));
                else
                    for (int64_t k = 0; k < kn; k++) memcpy(d + k * MR, sk + k * csa + ip, (size_t)MR * sizeof(float));
            }
            if (full < mc) {
                float *d = dst + full * kc + k0 * MR;
                const int mr = (int)(mc - full);
                for (int64_t k = 0; k < kn; k++) {
                    for (int i = 0; i < mr; i++) d[k * MR + i] = sk[k * csa + full + i];
                    for (int i = mr; i < MR; i++) d[k * MR + i] = 0.0f;
                }
            }
        }
        return;
    }
    for (int64_t ip = 0; ip < mc; ip += MR) {
        const int mr = (int)min64(MR, mc - ip);
        float *d = dst + ip * kc;
        const float *s = a + (i0 + ip) * rsa + p0 * csa;
#if defined(__x86_64__)
        if (simd && csa == 1) { /* row-major A: same transpose as B = W^T */
            pack_b_t_avx2(d, s, 1, rsa, kc, mr, MR);
            continue;
        }
#endif
        for (int i = 0; i < mr; i++) {
            const float *si = s + i * rsa;
            for (int64_t k = 0; k < kc; k++) d[k * MR + i] = si[k * csa];
        }
        for (int i = mr; i < MR; i++)
            for (int64_t k = 0; k < kc; k++) d[k * MR + i] = 0.0f;
    }
}

/* B k [p0, p0+kc), columns [j0, j0+nc) -> panels of NR columns: dst[panel*NR*kc + k*NR + j].
 * simd != 0 allows the AVX2 transposing packer (the caller's path implies AVX2). */
static void pack_b(float *dst, const float *b, int64_t rsb, int64_t csb, int64_t p0, int64_t kc,
                   int64_t j0, int64_t nc, int NR, int simd) {
    for (int64_t jp = 0; jp < nc; jp += NR) {
        const int nr = (int)min64(NR, nc - jp);
        float *d = dst + jp * kc;
        const float *s = b + p0 * rsb + (j0 + jp) * csb;
        if (csb == 1) { /* row-major B (dinp, dweight) */
            for (int64_t k = 0; k < kc; k++) {
                memcpy(d + k * NR, s + k * rsb, (size_t)nr * sizeof(float));
                for (int j = nr; j < NR; j++) d[k * NR + j] = 0.0f;
            }
        } else { /* B = W^T (forward): column j is row j of W, contiguous in k */
#if defined(__x86_64__)
            if (simd) {
                pack_b_t_avx2(d, s, rsb, csb, kc, nr, NR);
                continue;
            }
#endif
            for (int j = 0; j < nr; j++) {
                const float *sj = s + j * csb;
                for (int64_t k = 0; k < kc; k++) d[k * NR + j] = sj[k * rsb];
            }
            for (int j = nr; j < NR; j++)
                for (int64_t k = 0; k < kc; k++) d[k * NR + j] = 0.0f;
        }
    }
}

#if defined(__x86_64__)
/* d = the k-pair panel of columns [col, col + nr) (nr <= 16; none when nr <= 0) for pairs [p0, p0 + kd) of a
 * row-major bf16 matrix w of K rows (ldw), one pair row every ldd elements: element (p, j) holds w[2p][j]
 * low and w[2p + 1][j] high (zero past row K - 1 and past column nr). Built straight from w's rows, so the
 * input gradient needs no paired copy of w (AMX: 16-column panels, ldd 16; the dot way: 16 columns of
 * a 48-column panel). */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void pack_pairs(uint32_t *d, int64_t ldd,
                                                                           const uint16_t *w, int64_t ldw,
                                                                           int64_t K, int64_t p0, int64_t kd,
                                                                           int64_t col, int nr) {
    const __mmask16 m = nr >= 16 ? (__mmask16)0xFFFF : nr <= 0 ? 0 : (__mmask16)((1u << nr) - 1);
    for (int64_t p = 0; p < kd; p++) {
        const int64_t r = 2 * (p0 + p);
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w + r * ldw + col));
        const __m512i hi = r + 1 < K ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w + (r + 1) * ldw + col))
                                     : _mm512_setzero_si512();
        _mm512_storeu_si512(d + p * ldd, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
}

#endif

/* ---- microkernels: c[0..mr) x [0..nr) (+)= ap (MR x kc packed) @ b (kc rows of ldb stride).
 * b is either a packed zero-padded panel (ldb == NR) or row-major B itself, so loads past nr are
 * masked. beta == 0 overwrites c. ---- */

static void ukr_scalar(int64_t kc, const float *ap, const float *b, int64_t ldb, float *c,
                       int64_t ldc, int mr, int nr, int beta) {
    enum { MR = 4, NR = 16 };
    float acc[MR][NR] = {{0}};
    if (nr == NR) {
        for (int64_t k = 0; k < kc; k++, ap += MR, b += ldb)
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < NR; j++) acc[i][j] += ap[i] * b[j];
    } else {
        for (int64_t k = 0; k < kc; k++, ap += MR, b += ldb)
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < nr; j++) acc[i][j] += ap[i] * b[j];
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) c[i * ldc + j] = beta ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

#if defined(__x86_64__)
#define T512 CST_TARGET_AVX512
#define T256 CST_TARGET_AVX2

/* Transposing pack for B = W^T (the forward product): 8 rows of W x 8 k at a time through an 8x8
 * register transpose, ~5x faster than scalar strided stores. Matters when few rows share the packed
 * B (N of 17..256 against a 49152 x 576 weight). Used by both SIMD paths (AVX-512 implies AVX2). */
T256 static void pack_b_t_avx2(float *d, const float *s, int64_t rsb, int64_t csb, int64_t kc, int nr,
                               int NR) {
    int j = 0;
    for (; j + 8 <= nr; j += 8) {
        const float *r0 = s + j * csb;
        int64_t k = 0;
        if (rsb == 1) {
            for (; k + 8 <= kc; k += 8) {
                __m256 a0 = _mm256_loadu_ps(r0 + k), a1 = _mm256_loadu_ps(r0 + csb + k);
                __m256 a2 = _mm256_loadu_ps(r0 + 2 * csb + k), a3 = _mm256_loadu_ps(r0 + 3 * csb + k);
                __m256 a4 = _mm256_loadu_ps(r0 + 4 * csb + k), a5 = _mm256_loadu_ps(r0 + 5 * csb + k);
                __m256 a6 = _mm256_loadu_ps(r0 + 6 * csb + k), a7 = _mm256_loadu_ps(r0 + 7 * csb + k);
                __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
                __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
                __m256 t4 = _mm256_unpacklo_ps(a4, a5), t5 = _mm256_unpackhi_ps(a4, a5);
                __m256 t6 = _mm256_unpacklo_ps(a6, a7), t7 = _mm256_unpackhi_ps(a6, a7);
                __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
                __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
                __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
                __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
                float *o = d + k * NR + j;
                _mm256_storeu_ps(o + 0 * NR, _mm256_permute2f128_ps(u0, u4, 0x20));
                _mm256_storeu_ps(o + 1 * NR, _mm256_permute2f128_ps(u1, u5, 0x20));
                _mm256_storeu_ps(o + 2 * NR, _mm256_permute2f128_ps(u2, u6, 0x20));
                _mm256_storeu_ps(o + 3 * NR, _mm256_permute2f128_ps(u3, u7, 0x20));
                _mm256_storeu_ps(o + 4 * NR, _mm256_permute2f128_ps(u0, u4, 0x31));
                _mm256_storeu_ps(o + 5 * NR, _mm256_permute2f128_ps(u1, u5, 0x31));
                _mm256_storeu_ps(o + 6 * NR, _mm256_permute2f128_ps(u2, u6, 0x31));
                _mm256_storeu_ps(o + 7 * NR, _mm256_permute2f128_ps(u3, u7, 0x31));
            }
        }
        for (; k < kc; k++)
            for (int jj = 0; jj < 8; jj++) d[k * NR + j + jj] = r0[jj * csb + k * rsb];
    }
    for (; j < nr; j++)
        for (int64_t k = 0; k < kc; k++) d[k * NR + j] = s[j * csb + k * rsb];
    for (j = nr; j < NR; j++)
        for (int64_t k = 0; k < kc; k++) d[k * NR + j] = 0.0f;
}

#define R6(X) X(0) X(1) X(2) X(3) X(4) X(5)

/* AVX-512 tile MR x (NV*16), fully unrolled so the accumulators stay in zmm registers (checked: no
 * spills with GCC 12). 8 x 48 is used: 24 accumulators + 3 B vectors; A is broadcast from memory.
 * Zen 4 issues one zmm FMA per cycle with latency 4, so 24 chains hide latency, and 3 loads + 8
 * broadcasts per 24 FMAs stay under the load ports' limit. Measured on Zen 4 (1 thread, CPU time):
 * 8x48 beat 14x32, 12x32 and 6x64 by 2-8%, and its MR = 8 wastes little on short M tails. */
T512 static inline __attribute__((always_inline)) void ukr512_t(int64_t kc, const float *ap,
    const float *b, int64_t ldb, float *c, int64_t ldc, int mr, int nr, int beta, const int MR, const int NV,
    const int PF) {
    __m512 acc[16][4];
    __mmask16 m[4];
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {
        int r = nr - 16 * v;
        m[v] = r >= 16 ? (__mmask16)0xFFFF : r <= 0 ? 0 : (__mmask16)((1u << r) - 1);
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++)
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
    for (int i = 0; i < mr; i++) _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) _mm_prefetch((const char *)(c + i * ldc + 16 * v), _MM_HINT_T0);
    if (nr == NV * 16) {
        for (int64_t k = 0; k < kc; k++, ap += MR, b += ldb) {
            __m512 bv[4];
            if (PF) _mm_prefetch((const char *)(b + PF * ldb), _MM_HINT_T0);
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) bv[v] = _mm512_loadu_ps(b + 16 * v);
            _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++) {
                const __m512 a_ = _mm512_set1_ps(ap[i]);
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(a_, bv[v], acc[i][v]);
            }
        }
    } else {
        for (int64_t k = 0; k < kc; k++, ap += MR, b += ldb) {
            __m512 bv[4];
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) bv[v] = _mm512_maskz_loadu_ps(m[v], b + 16 * v);
            _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++) {
                const __m512 a_ = _mm512_set1_ps(ap[i]);
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(a_, bv[v], acc[i][v]);
            }
        }
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++) if (i < mr) {
        float *cr = c + i * ldc;
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {
            __m512 r = acc[i][v];
            if (beta) r = _mm512_add_ps(_mm512_maskz_loadu_ps(m[v], cr + 16 * v), r);
            _mm512_mask_storeu_ps(cr + 16 * v, m[v], r);
        }
    }
}
T512 static void ukr512_8x48(int64_t kc, const float *ap, const float *b, int64_t ldb, float *c, int64_t ldc, int mr, int nr, int beta) { ukr512_t(kc, ap, b, ldb, c, ldc, mr, nr, beta, 8, 3, 0); }
/* The 16 x 16 kernel reads a weight panel once, 64 bytes per k, and is as much bound by memory as by
 * FMAs; prefetching 32 k steps (2 KiB) ahead into L1 overlaps the two. A 16-row SmolLM2 decoding step
 * (medians of 15, 32 cached positions): no prefetch 39-40 ms, 8 lines 35-47, 16 lines 32, 32 lines
 * 29-31, 64 and 128 lines 31-33. Prefetches never fault, so running past the buffer's end is harmless. */
#define PACKED_PREFETCH_K 32
/* 16 x 16 for prepacked weights: 16 rows (a decode step of 16 sequences) in one pass over each weight
 * panel, so the panel is read from memory once; 16 accumulators, 1 load + 16 broadcasts per 16 FMAs. */
T512 static void ukr512_16x16(int64_t kc, const float *ap, const float *b, int64_t ldb, float *c, int64_t ldc, int mr, int nr, int beta) { ukr512_t(kc, ap, b, ldb, c, ldc, mr, nr, beta, 16, 1, PACKED_PREFETCH_K); }

/* 6 x 16: 12 ymm accumulators + 2 B + 1 broadcast = 15 of 16 registers (the classic Haswell tile). */
T256 static void ukr_avx2(int64_t kc, const float *ap, const float *b, int64_t ldb, float *c,
                          int64_t ldc, int mr, int nr, int beta) {
#define D2(i) __m256 c##i##_0 = _mm256_setzero_ps(), c##i##_1 = _mm256_setzero_ps();
#define F2(i)                                                                                     \
    {                                                                                             \
        const __m256 a_ = _mm256_broadcast_ss(ap + i);                                            \
        c##i##_0 = _mm256_fmadd_ps(a_, b0, c##i##_0);                                             \
        c##i##_1 = _mm256_fmadd_ps(a_, b1, c##i##_1);                                             \
    }
    R6(D2)
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nr), idx);
    const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nr - 8), idx);
    for (int i = 0; i < mr; i++) _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
    if (nr == 16) {
        for (int64_t k = 0; k < kc; k++, ap += 6, b += ldb) {
            const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
            R6(F2)
        }
    } else {
        for (int64_t k = 0; k < kc; k++, ap += 6, b += ldb) {
            const __m256 b0 = _mm256_maskload_ps(b, m0), b1 = _mm256_maskload_ps(b + 8, m1);
            R6(F2)
        }
    }
#define S2(i)                                                                                     \
    if (i < mr) {                                                                                 \
        float *cr = c + i * ldc;                                                                  \
        if (nr == 16) {                                                                           \
            if (beta) {                                                                           \
                c##i##_0 = _mm256_add_ps(_mm256_loadu_ps(cr), c##i##_0);                          \
                c##i##_1 = _mm256_add_ps(_mm256_loadu_ps(cr + 8), c##i##_1);                      \
            }                                                                                     \
            _mm256_storeu_ps(cr, c##i##_0);                                                       \
            _mm256_storeu_ps(cr + 8, c##i##_1);                                                   \
        } else {                                                                                  \
            if (beta) {                                                                           \
                c##i##_0 = _mm256_add_ps(_mm256_maskload_ps(cr, m0), c##i##_0);                   \
                c##i##_1 = _mm256_add_ps(_mm256_maskload_ps(cr + 8, m1), c##i##_1);               \
            }                                                                                     \
            _mm256_maskstore_ps(cr, m0, c##i##_0);                                                \
            _mm256_maskstore_ps(cr + 8, m1, c##i##_1);                                            \
        }                                                                                         \
    }
    R6(S2)
#undef D2
#undef F2
#undef S2
}
#endif /* __x86_64__ */

static gemm_cfg cfg_for(cst_simd_path p) {
    gemm_cfg g = {4, 16, 256, 32, ukr_scalar, 0};
#if defined(__x86_64__)
    /* MC ~ 1024 rows so that N = 1024 needs one A block; NC = 512-576 columns -> B block of
     * 512-576 KiB, half the 1 MiB L2. */
    if (p == CST_SIMD_AVX512) g = (gemm_cfg){8, 48, 128, 12, ukr512_8x48, 1, KCMAX512};
    else if (p == CST_SIMD_AVX2) g = (gemm_cfg){6, 16, 171, 32, ukr_avx2, 1};
#else
    (void)p;
#endif
    return g;
}

/* ---- scratch: a few cached aligned blocks reused across calls (page-faulting a fresh 3 MiB each call
 * costs ~5% on mid-size products). A caller takes the first free block (the bf16 products hold two for
 * their converted operands while the GEMM takes a third); past those it gets its own malloc. ---- */

#define SCRATCH_SLOTS 3
static atomic_flag scratch_busy[SCRATCH_SLOTS] = {ATOMIC_FLAG_INIT, ATOMIC_FLAG_INIT, ATOMIC_FLAG_INIT};
static float *scratch_cache[SCRATCH_SLOTS];
static size_t scratch_cache_len[SCRATCH_SLOTS];

/* *cached: 1 + the block's slot, or 0 for a private malloc. */
static float *scratch_get(size_t nfloat, int *cached) {
    size_t bytes = (nfloat * sizeof(float) + 63) & ~(size_t)63;
    for (int s = 0; s < SCRATCH_SLOTS; s++) {
        if (atomic_flag_test_and_set_explicit(&scratch_busy[s], memory_order_acquire)) continue;
        if (scratch_cache_len[s] < bytes) {
            free(scratch_cache[s]);
            scratch_cache[s] = aligned_alloc(64, bytes);
            scratch_cache_len[s] = scratch_cache[s] ? bytes : 0;
        }
        if (scratch_cache[s]) {
            *cached = 1 + s;
            return scratch_cache[s];
        }
        atomic_flag_clear_explicit(&scratch_busy[s], memory_order_release);
        break;
    }
    *cached = 0;
    return aligned_alloc(64, bytes);
}

static void scratch_put(float *p, int cached) {
    if (cached) atomic_flag_clear_explicit(&scratch_busy[cached - 1], memory_order_release);
    else free(p);
}

/* ---- driver ---- */

typedef struct {
    float *c;
    int64_t ldc;
    const float *a;
    int64_t rsa, csa;
    const float *b;
    int64_t rsb, csb;
    int64_t K;
    int accumulate;
    int64_t kc, nc, mc; /* k block, column block and row block of this call */
    const uint16_t *b16; /* not NULL: B's k pairs are pairs of rows of this bf16 matrix (k16 rows, rsb apart;
                          * pack_pairs), b unused: the dot way's input gradient (NR a multiple of 16) */
    int64_t k16;
} gemm_args;

/* B's panels for columns [j0, j0 + nc), pairs [p0, p0 + kc), from x->b16's rows (see gemm_args). */
static void pack_b_pairs(float *dst, const gemm_args *x, int64_t p0, int64_t kc, int64_t j0, int64_t nc, int NR) {
#if defined(__x86_64__)
    for (int64_t jp = 0; jp < nc; jp += NR)
        for (int v = 0; v < NR; v += 16)
            pack_pairs((uint32_t *)dst + jp * kc + v, NR, x->b16, x->rsb, x->k16, p0, kc, j0 + jp + v,
                       (int)min64(16, nc - jp - v));
#else
    (void)dst, (void)x, (void)p0, (void)kc, (void)j0, (void)nc, (void)NR;
#endif
}

/* Rows [m0, m1) x columns [n0, n1) of C, sequentially, with this thread's pack buffers. */
static void gemm_region(const gemm_cfg *g, const gemm_args *x, float *abuf, float *bbuf, int64_t m0,
                        int64_t m1, int64_t n0, int64_t n1) {
    const int MR = g->mr, NR = g->nr;
    const int64_t MC = x->mc, NC = x->nc, KB = x->kc;
    /* Few rows: packing B would cost as much as the product, so a row-major B is read in place. */
    const int direct_b = !x->b16 && x->csb == 1 && m1 - m0 <= 2 * MR;
    for (int64_t ic = m0; ic < m1; ic += MC) {
        const int64_t mc = min64(MC, m1 - ic);
        for (int64_t pc = 0; pc < x->K; pc += KB) {
            const int64_t kc = min64(KB, x->K - pc);
            const int beta = x->accumulate || pc > 0;
            pack_a(abuf, x->a, x->rsa, x->csa, ic, mc, pc, kc, MR, g->simd_pack);
            for (int64_t jc = n0; jc < n1; jc += NC) {
                const int64_t nc = min64(NC, n1 - jc);
                if (x->b16)
                    pack_b_pairs(bbuf, x, pc, kc, jc, nc, NR);
                else if (!direct_b)
                    pack_b(bbuf, x->b, x->rsb, x->csb, pc, kc, jc, nc, NR, g->simd_pack);
                for (int64_t ip = 0; ip < mc; ip += MR) {
                    const int mr = (int)min64(MR, mc - ip);
                    float *crow = x->c + (ic + ip) * x->ldc + jc;
                    for (int64_t jp = 0; jp < nc; jp += NR) {
                        const int nr = (int)min64(NR, nc - jp);
                        if (direct_b)
                            g->ukr(kc, abuf + ip * kc, x->b + pc * x->rsb + jc + jp, x->rsb, crow + jp,
                                   x->ldc, mr, nr, beta);
                        else
                            g->ukr(kc, abuf + ip * kc, bbuf + jp * kc, NR, crow + jp, x->ldc, mr, nr,
                                   beta);
                    }
                }
            }
        }
    }
}

/* Unblocked fallback when scratch cannot be allocated: slow but correct and thread-count independent. */
static void gemm_naive(const gemm_args *x, int64_t M, int64_t N) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            float s = 0.0f;
            for (int64_t k = 0; k < x->K; k++) s += x->a[i * x->rsa + k * x->csa] * x->b[k * x->rsb + j * x->csb];
            float *cij = x->c + i * x->ldc + j;
            *cij = x->accumulate ? *cij + s : s;
        }
}

static int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* The blocked product with the tiles and microkernel of g (fp32 elements, or bf16 k pairs); -1 when no
 * memory for the packing buffers. */
static int gemm_run(const gemm_cfg *gp, float *c, int64_t ldc, const float *a, int64_t rsa, int64_t csa,
                     const float *b, int64_t rsb, int64_t csb, int64_t M, int64_t N, int64_t K, int accumulate,
                     const uint16_t *b16, int64_t k16) {
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0) {
        if (!accumulate)
            for (int64_t i = 0; i < M; i++) memset(c + i * ldc, 0, (size_t)N * sizeof(float));
        return 0;
    }
    const gemm_cfg g = *gp;
    /* k block: KC, or K cut into equal blocks of at most kcmax, so that a long K touches C fewer times
     * (C is read and written once per block); the B block keeps its KC x ncp*NR size in bytes. The
     * blocking depends on K alone, never on the thread count. */
    int64_t kb = KC, ncp = g.ncp;
    if (g.kcmax) {
        const int64_t nkb = (K + g.kcmax - 1) / g.kcmax;
        kb = ((K + nkb - 1) / nkb + 7) / 8 * 8;
        ncp = (int64_t)g.ncp * KC / kb;
        if (ncp < 1) ncp = 1;
    }
    const gemm_args x = {c, ldc, a, rsa, csa, b, rsb, csb, K, accumulate, kb, ncp * g.nr, (int64_t)g.mcp * g.mr,
                         b16, k16};
    const int64_t pm = (M + g.mr - 1) / g.mr, pn = (N + g.nr - 1) / g.nr;
    /* Split output tiles along the dimension with more panels; tiny products stay on one thread. */
    const int split_rows = pm > pn;
    int nt = max_threads();
    if ((double)M * N * K < 1e6) nt = 1; /* fork/join (~5 us) would cost more than it saves */
    if (nt > (split_rows ? pm : pn)) nt = (int)(split_rows ? pm : pn);
    const size_t abuf_len = (size_t)g.mcp * g.mr * kb, bbuf_len = (size_t)ncp * g.nr * kb;
    int cached;
    float *scratch = scratch_get((abuf_len + bbuf_len) * (size_t)nt, &cached);
    if (!scratch) return -1;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int t = 0; t < nt; t++) {
        float *abuf = scratch + (size_t)t * (abuf_len + bbuf_len), *bbuf = abuf + abuf_len;
        const int64_t P = split_rows ? pm : pn;
        const int64_t p0 = P * t / nt, p1 = P * (t + 1) / nt;
        if (split_rows)
            gemm_region(&g, &x, abuf, bbuf, p0 * g.mr, min64(p1 * g.mr, M), 0, N);
        else
            gemm_region(&g, &x, abuf, bbuf, 0, M, p0 * g.nr, min64(p1 * g.nr, N));
    }
    scratch_put(scratch, cached);
    return 0;
}

void cst_gemm(float *c, int64_t ldc, const float *a, int64_t rsa, int64_t csa, const float *b,
              int64_t rsb, int64_t csb, int64_t M, int64_t N, int64_t K, int accumulate) {
    const gemm_cfg g = cfg_for(cst_simd_current());
    if (gemm_run(&g, c, ldc, a, rsa, csa, b, rsb, csb, M, N, K, accumulate, NULL, 0) < 0) {
        const gemm_args x = {c, ldc, a, rsa, csa, b, rsb, csb, K, accumulate};
        gemm_naive(&x, M, N);
    }
}

/* ---- GEMV-like path: out (N, OC) (+)= x (N, C) @ w (OC, C)^T for small N ----
 * A tile of NX input rows x NW weight rows keeps NX*NW vector dot products in registers and reads
 * each weight row from memory once per tile; the NX x C inputs stay in L1/L2. Lane sums are reduced
 * in a fixed order, so the result depends only on the path and C. */

/* x's rows ldx apart, out's ldo apart (C and OC in a plain product). ELEM rows read through LD (the
 * bf16 form widens each element exactly, so both forms sum the same products in the same order). */
#define GEMV_SCALAR(NAME, ELEM, LD)                                                                    \
    static void NAME(float *out, int64_t ldo, const ELEM *x, int64_t ldx, const ELEM *w, int64_t N,     \
                     int64_t C, int64_t o0, int64_t o1, int accumulate) {                               \
        for (int64_t o = o0; o < o1; o++) {                                                            \
            const ELEM *wo = w + o * C;                                                                \
            for (int64_t n = 0; n < N; n++) {                                                          \
                const ELEM *xn = x + n * ldx;                                                          \
                float acc[8] = {0};                                                                    \
                int64_t i = 0;                                                                         \
                for (; i + 8 <= C; i += 8)                                                             \
                    for (int j = 0; j < 8; j++) acc[j] += LD(xn[i + j]) * LD(wo[i + j]);               \
                float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])); \
                for (; i < C; i++) s += LD(xn[i]) * LD(wo[i]);                                         \
                float *y = out + n * ldo + o;                                                          \
                *y = accumulate ? *y + s : s;                                                          \
            }                                                                                          \
        }                                                                                              \
    }
#define GEMV_LD_F32(v) (v)
GEMV_SCALAR(gemv_scalar_ld, float, GEMV_LD_F32)
GEMV_SCALAR(gemv_bf16_scalar_ld, uint16_t, cst_bf16_to_f32)

static void gemv_scalar(float *out, int64_t ldo, const float *x, const float *w, int64_t N, int64_t C,
                        int64_t o0, int64_t o1, int accumulate) {
    gemv_scalar_ld(out, ldo, x, C, w, N, C, o0, o1, accumulate);
}

static void gemv_bf16_scalar(float *out, int64_t ldo, const uint16_t *x, const uint16_t *w, int64_t N, int64_t C,
                             int64_t o0, int64_t o1, int accumulate) {
    gemv_bf16_scalar_ld(out, ldo, x, C, w, N, C, o0, o1, accumulate);
}

#if defined(__x86_64__)
/* Tile of up to NX x NW (rows beyond nx/nw repeat the last valid one and are not stored). */
#define GEMV_TILE(NAME, TGT, ELEM, VEC, W, LOAD, MLOAD, MASKT, MKMASK, FMA, ZERO, REDUCE)           \
    TGT static inline __attribute__((always_inline)) void NAME(                                     \
        float *out, int64_t ldo, const ELEM *x, int64_t ldx, const ELEM *w, int64_t C, int64_t n0,   \
        int nx, int64_t o0, int nw, const int NX, const int NW, int accumulate) {                   \
        const ELEM *xp[16], *wp[16];                                                                 \
        VEC acc[16][16];                                                                             \
        _Pragma("GCC unroll 16") for (int i = 0; i < NX; i++) xp[i] =                               \
            x + (n0 + (i < nx ? i : nx - 1)) * ldx;                                                  \
        _Pragma("GCC unroll 16") for (int j = 0; j < NW; j++) wp[j] =                               \
            w + (o0 + (j < nw ? j : nw - 1)) * C;                                                    \
        _Pragma("GCC unroll 16") for (int i = 0; i < NX; i++)                                       \
            _Pragma("GCC unroll 16") for (int j = 0; j < NW; j++) acc[i][j] = ZERO();               \
        int64_t k = 0;                                                                               \
        for (; k + W <= C; k += W) {                                                                 \
            VEC wv[16];                                                                              \
            _Pragma("GCC unroll 16") for (int j = 0; j < NW; j++) wv[j] = LOAD(wp[j] + k);          \
            _Pragma("GCC unroll 16") for (int i = 0; i < NX; i++) {                                 \
                const VEC xv = LOAD(xp[i] + k);                                                      \
                _Pragma("GCC unroll 16") for (int j = 0; j < NW; j++) acc[i][j] =                   \
                    FMA(xv, wv[j], acc[i][j]);                                                       \
            }                                                                                        \
        }                                                                                            \
        if (k < C) {                                                                                 \
            const MASKT m = MKMASK((int)(C - k));                                                    \
            VEC wv[16];                                                                              \
            _Pragma("GCC unroll 16") for (int j = 0; j < NW; j++) wv[j] = MLOAD(wp[j] + k, m);      \
            _Pragma("GCC unroll 16") for (int i = 0; i < NX; i++) {                                 \
                const VEC xv = MLOAD(xp[i] + k, m);                                                  \
                _Pragma("GCC unroll 16") for (int j = 0; j < NW; j++) acc[i][j] =                   \
                    FMA(xv, wv[j], acc[i][j]);                                                       \
            }                                                                                        \
        }                                                                                            \
        _Pragma("GCC unroll 16") for (int i = 0; i < NX; i++)                                       \
            _Pragma("GCC unroll 16") for (int j = 0; j < NW; j++) if (i < nx && j < nw) {           \
                float *y = out + (n0 + i) * ldo + o0 + j;                                            \
                const float s = REDUCE(acc[i][j]);                                                   \
                *y = accumulate ? *y + s : s;                                                        \
            }                                                                                        \
    }

T512 static inline __mmask16 mk_mask16(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
T512 static inline __m512 mload16(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
T512 static inline float reduce16(__m512 v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
GEMV_TILE(gemv_tile512, T512, float, __m512, 16, _mm512_loadu_ps, mload16, __mmask16, mk_mask16,
          _mm512_fmadd_ps, _mm512_setzero_ps, reduce16)

T256 static inline __m256i mk_mask8(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
T256 static inline __m256 mload8(const float *p, __m256i m) { return _mm256_maskload_ps(p, m); }
T256 static inline float reduce8(__m256 h) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
GEMV_TILE(gemv_tile256, T256, float, __m256, 8, _mm256_loadu_ps, mload8, __m256i, mk_mask8, _mm256_fmadd_ps,
          _mm256_setzero_ps, reduce8)

/* Few rows: tiles of 1 x W1 (one input row), 2 x W2 (two) or NX3 x W3 input x weight rows; each output
 * is one chain of the tile's vector sums, whatever the tile, so a row's result does not depend on N.
 * W1 is 1: for one input row, weight rows are streamed one after another, front to back, which Zen 4's
 * prefetchers follow best (a single chain per row still outruns memory): a standalone C loop on one
 * thread read a 113 MB bf16 matrix at 21.7-23.3 GB/s this way, 9.3-14.0 GB/s with 2, 4 or 16 rows
 * interleaved, prefetched or not (2026-12-03). SmolLM2's float32 batch-1
 * decoding step went from 32.6-33.5 to 21.3-22.3 ms on one thread (16-row tiles before), 22.6-29.0 to
 * 19.8-20.3 ms on two (Zen 4 VM, 2026-12-03, KVCache.step medians). */
#define GEMV_ROWS(NAME, TGT, TILE, ELEM, W1, W2, NX3, W3)                                              \
    TGT static void NAME(float *out, int64_t ldo, const ELEM *x, const ELEM *w, int64_t N, int64_t C,  \
                         int64_t o0, int64_t o1, int accumulate) {                                    \
        for (int64_t o = o0; o < o1;) {                                                               \
            if (N == 1) {                                                                             \
                const int nw = (int)min64(W1, o1 - o);                                                \
                TILE(out, ldo, x, C, w, C, 0, 1, o, nw, 1, W1, accumulate);                           \
                o += nw;                                                                              \
            } else if (N == 2) {                                                                      \
                const int nw = (int)min64(W2, o1 - o);                                                \
                TILE(out, ldo, x, C, w, C, 0, 2, o, nw, 2, W2, accumulate);                           \
                o += nw;                                                                              \
            } else {                                                                                  \
                const int nw = (int)min64(W3, o1 - o);                                                \
                for (int64_t n = 0; n < N; n += NX3)                                                  \
                    TILE(out, ldo, x, C, w, C, n, (int)min64(NX3, N - n), o, nw, NX3, W3, accumulate); \
                o += nw;                                                                              \
            }                                                                                         \
        }                                                                                             \
    }
GEMV_ROWS(gemv_avx512, T512, gemv_tile512, float, 1, 10, 6, 4)
GEMV_ROWS(gemv_avx2, T256, gemv_tile256, float, 1, 5, 3, 4)

/* bf16 rows (bf16 x and w, fp32 sums). "dot": k pairs as 32-bit elements, each vdpbf16ps adding the
 * products of 16 pairs into 16 fp32 lanes (even C only); "convert": 16 (AVX-512) or 8 (AVX2) bf16
 * widened to fp32 per load, then FMA. */
#define T512BF __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))
T512BF static inline __m512 dpbf16_carrier(__m512 x, __m512 w, __m512 acc) {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
}

/* NX input rows x NW weight rows, NX * NW = 16 (1 x 16, 2 x 8, 4 x 4), the 16 sums out of one
 * transpose-and-add tree (hsum16_avx512) instead of 16 separate reductions: with 2 bytes per weight the
 * reductions were a third of the instructions of decoding at C = 576. hsum16 adds each vector's lanes
 * in reduce16's order, so an output does not depend on the tile it was computed in (or on N). Rows
 * past nx / nw repeat the last valid one and are not stored. The next tile's weight rows are
 * prefetched as these stream by (measured when one input row still took 1 x 16 tiles: batch-1 decoding
 * went from about 60 to 73-79 tok/s on the Zen 4 VM; one row now streams singly, GEMV_ROWS). */
T512BF static inline __attribute__((always_inline)) void gemv_bf16dot_tile16(
    float *out, int64_t ldo, const float *x, int64_t ldx, const float *w, int64_t C, int64_t n0, int nx, int64_t o0,
    int nw, const int NX, const int NW, int accumulate) {
    const float *xp[4], *wp[16];
    __m512 acc[16];
    for (int i = 0; i < NX; i++) xp[i] = x + (n0 + (i < nx ? i : nx - 1)) * ldx;
    for (int j = 0; j < NW; j++) wp[j] = w + (o0 + (j < nw ? j : nw - 1)) * C;
    for (int a = 0; a < 16; a++) acc[a] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= C; k += 16) {
        __m512 wv[16];
        _Pragma("GCC unroll 16") for (int j = 0; j < NW; j++) {
            _mm_prefetch((const char *)(wp[j] + NW * C + k), _MM_HINT_T0); /* the next tile's row j */
            wv[j] = _mm512_loadu_ps(wp[j] + k);
        }
        _Pragma("GCC unroll 4") for (int i = 0; i < NX; i++) {
            const __m512 xv = _mm512_loadu_ps(xp[i] + k);
            _Pragma("GCC unroll 16") for (int j = 0; j < NW; j++) acc[i * NW + j] = dpbf16_carrier(xv, wv[j], acc[i * NW + j]);
        }
    }
    if (k < C) {
        const __mmask16 m = mk_mask16((int)(C - k));
        __m512 wv[16];
        _Pragma("GCC unroll 16") for (int j = 0; j < NW; j++) wv[j] = _mm512_maskz_loadu_ps(m, wp[j] + k);
        _Pragma("GCC unroll 4") for (int i = 0; i < NX; i++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, xp[i] + k);
            _Pragma("GCC unroll 16") for (int j = 0; j < NW; j++) acc[i * NW + j] = dpbf16_carrier(xv, wv[j], acc[i * NW + j]);
        }
    }
    __m512 v[16];
    for (int a = 0; a < 16; a++) v[4 * (a % 4) + a / 4] = acc[a]; /* lane a of the tree's result = sum of acc[a] */
    const __m512 sum = hsum16_avx512(v);
    const __mmask16 sm = mk_mask16(nw);
    for (int i = 0; i < NX; i++) {
        if (i >= nx) break;
        float *y = out + (n0 + i) * ldo + o0;
        /* lanes i*NW .. i*NW + nw - 1 to y[0 .. nw-1] */
        __m512 r = _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_set1_epi32(i * NW),
                                                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                                            13, 14, 15)), sum);
        if (accumulate) r = _mm512_add_ps(_mm512_maskz_loadu_ps(sm, y), r);
        _mm512_mask_storeu_ps(y, sm, r);
    }
}

/* The dot way's tiles: 1 x 1 is GEMV_TILE's single chain (the weight rows streamed one after another,
 * see GEMV_ROWS), 2 x 8 and 4 x 4 the transpose-and-add tree above. */
GEMV_TILE(gemv_bf16dot_tile1, T512BF, float, __m512, 16, _mm512_loadu_ps, mload16, __mmask16, mk_mask16,
          dpbf16_carrier, _mm512_setzero_ps, reduce16)
T512BF static inline __attribute__((always_inline)) void gemv_bf16dot_tile(
    float *out, int64_t ldo, const float *x, int64_t ldx, const float *w, int64_t C, int64_t n0, int nx, int64_t o0,
    int nw, const int NX, const int NW, int accumulate) {
    if (NX * NW == 16) gemv_bf16dot_tile16(out, ldo, x, ldx, w, C, n0, nx, o0, nw, NX, NW, accumulate);
    else gemv_bf16dot_tile1(out, ldo, x, ldx, w, C, n0, nx, o0, nw, NX, NW, accumulate);
}
/* Rows of C k pairs, read as 32-bit elements. */
GEMV_ROWS(gemv_bf16dot_avx512, T512BF, gemv_bf16dot_tile, float, 1, 8, 4, 4)

T512 static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
T512 static inline __m512 mload16_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
GEMV_TILE(gemv_tile512_bf16, T512, uint16_t, __m512, 16, load16_bf16, mload16_bf16, __mmask16, mk_mask16,
          _mm512_fmadd_ps, _mm512_setzero_ps, reduce16)
GEMV_ROWS(gemv_bf16_avx512, T512, gemv_tile512_bf16, uint16_t, 1, 10, 6, 4)

T256 static inline __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
T256 static inline int mk_count8(int n) { return n < 8 ? n : 8; }
T256 static inline __m256 mload8_bf16(const uint16_t *p, int n) { /* the first n of 8, zeros after */
    uint16_t t[8] = {0};
    memcpy(t, p, (size_t)n * sizeof(uint16_t));
    return load8_bf16(t);
}
GEMV_TILE(gemv_tile256_bf16, T256, uint16_t, __m256, 8, load8_bf16, mload8_bf16, int, mk_count8, _mm256_fmadd_ps,
          _mm256_setzero_ps, reduce8)
GEMV_ROWS(gemv_bf16_avx2, T256, gemv_tile256_bf16, uint16_t, 1, 5, 3, 4)
#endif

/* Products below this many multiply-adds run on one thread. Decoding streams every weight matrix from
 * memory once per token, and one core cannot draw the machine's bandwidth: on the 2-core Zen 4 VM,
 * 1e5 instead of 1e6 (which put the 576 x 576, 960 x 576 and 576 x 1536 products of SmolLM2 on one
 * thread) took bf16 batch-1 decoding from about 50 to 60-67 tok/s. */
#ifndef GEMV_MIN_PARALLEL
#define GEMV_MIN_PARALLEL 1e5
#endif

/* How both GEMVs split the OC weight rows: *nt threads (one below GEMV_MIN_PARALLEL multiply-adds), one
 * contiguous block of rows each (a multiple of 16, so whole tiles of every width but the tail). Each
 * thread streams its part of w front to back, and 2 threads split 576 rows 288 / 288 where 64-row chunks
 * gave 320 / 256; dynamic 64- or 256-row chunks were no faster (bf16 decoding, Zen 4 VM). Which thread
 * computes a row never changes its result. Returns the rows per block. */
static int64_t gemv_part(int64_t N, int64_t C, int64_t OC, int *nt) {
    *nt = (double)N * C * OC < GEMV_MIN_PARALLEL ? 1 : max_threads();
    return (OC + 16 * *nt - 1) / (16 * *nt) * 16;
}

void cst_gemv_nt(float *out, const float *x, const float *w, int64_t N, int64_t C, int64_t OC,
                 int accumulate) {
    if (N <= 0 || OC <= 0) return;
    void (*gemv)(float *, int64_t, const float *, const float *, int64_t, int64_t, int64_t, int64_t, int) =
        CST_SIMD_PICK(gemv);
    int nt;
    const int64_t part = gemv_part(N, C, OC, &nt), nchunk = (OC + part - 1) / part;
    (void)nt; /* unused without OpenMP */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t ch = 0; ch < nchunk; ch++) {
        const int64_t o0 = ch * part, o1 = min64(o0 + part, OC);
        gemv(out, OC, x, w, N, C, o0, o1, accumulate);
    }
}

void cst_gemv_bf16_nt(float *out, int64_t ldo, const uint16_t *x, const uint16_t *w, int64_t N, int64_t C,
                      int64_t OC, int accumulate) {
    if (N <= 0 || OC <= 0) return;
    void (*gemv)(float *, int64_t, const uint16_t *, const uint16_t *, int64_t, int64_t, int64_t, int64_t, int) =
        CST_SIMD_PICK(gemv_bf16);
#if defined(__x86_64__)
    const int dot = C % 2 == 0 && cst_simd_current() == CST_SIMD_AVX512 && cst_gemm_bf16_way() != CST_BF16_CONVERT &&
                    cst_bf16_dot_supported();
#else
    const int dot = 0;
#endif
    int nt;
    const int64_t part = gemv_part(N, C, OC, &nt), nchunk = (OC + part - 1) / part;
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t ch = 0; ch < nchunk; ch++) {
        const int64_t o0 = ch * part, o1 = min64(o0 + part, OC);
#if defined(__x86_64__)
        if (dot) { /* rows of C / 2 k pairs, read as 32-bit elements */
            gemv_bf16dot_avx512(out, ldo, (const float *)(const void *)x, (const float *)(const void *)w, N, C / 2, o0,
                                o1, accumulate);
            continue;
        }
#endif
        gemv(out, ldo, x, w, N, C, o0, o1, accumulate);
    }
}

/* ---- thin products: few output columns (LoRA's h = x A^T and dB = dy^T h at rank 8-64) ----
 * The packed GEMM wastes most of its 8 x 48 tile on 8-64 columns and packs the whole wide operand
 * for little arithmetic; these kernels read both operands in place instead. Each output element is
 * still reduced by one thread in a fixed order, so results do not depend on the thread count (they
 * differ in rounding from cst_gemm's order, as the GEMV path's do). */

/* Rows of x per parallel chunk of cst_gemm_thin_nt: whole 6- and 3-row tiles, enough chunks to balance. */
#define THIN_ROWS 48

#if defined(__x86_64__)
/* 6 x 4 dot products (24 accumulators, 10 loads per 24 FMAs) whose four sums per row come out of one
 * shuffle tree: a quarter of the reduction work of the GEMV tile's four separate sums, which would cost
 * ~20% at C = 576. Rows past nx / nw repeat the last valid one and are not stored. */
T512 static inline __attribute__((always_inline)) void thin_nt_tile512(float *out, int64_t ldo, const float *x,
    int64_t ldx, const float *w, int64_t C, int64_t n0, int nx, int64_t o0, int nw, int accumulate) {
    const float *xp[6], *wp[4];
    __m512 acc[6][4];
    _Pragma("GCC unroll 6") for (int i = 0; i < 6; i++) xp[i] = x + (n0 + (i < nx ? i : nx - 1)) * ldx;
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) wp[j] = w + (o0 + (j < nw ? j : nw - 1)) * C;
    _Pragma("GCC unroll 6") for (int i = 0; i < 6; i++)
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= C; k += 16) {
        __m512 wv[4];
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) wv[j] = _mm512_loadu_ps(wp[j] + k);
        _Pragma("GCC unroll 6") for (int i = 0; i < 6; i++) {
            const __m512 xv = _mm512_loadu_ps(xp[i] + k);
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (k < C) {
        const __mmask16 m = mk_mask16((int)(C - k));
        __m512 wv[4];
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) wv[j] = _mm512_maskz_loadu_ps(m, wp[j] + k);
        _Pragma("GCC unroll 6") for (int i = 0; i < 6; i++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, xp[i] + k);
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    const __mmask8 sm = (__mmask8)((1u << nw) - 1);
    _Pragma("GCC unroll 6") for (int i = 0; i < 6; i++) if (i < nx) {
        float *y = out + (n0 + i) * ldo + o0;
        __m128 s = hsum4_avx512(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        if (accumulate) s = _mm_add_ps(_mm_maskz_loadu_ps(sm, y), s);
        _mm_mask_storeu_ps(y, sm, s);
    }
}

/* Rows [n0, n1) of out: 6 x 4 (AVX-512) or 3 x 4 (AVX2, the GEMV path's tile) dot-product tiles. */
T512 static void thin_nt_avx512(float *out, int64_t ldo, const float *x, int64_t ldx, const float *w, int64_t C,
                                int64_t OC, int64_t n0, int64_t n1, int accumulate) {
    for (int64_t n = n0; n < n1; n += 6)
        for (int64_t o = 0; o < OC; o += 4)
            thin_nt_tile512(out, ldo, x, ldx, w, C, n, (int)min64(6, n1 - n), o, (int)min64(4, OC - o), accumulate);
}

T256 static void thin_nt_avx2(float *out, int64_t ldo, const float *x, int64_t ldx, const float *w, int64_t C,
                              int64_t OC, int64_t n0, int64_t n1, int accumulate) {
    for (int64_t n = n0; n < n1; n += 3)
        for (int64_t o = 0; o < OC; o += 4)
            gemv_tile256(out, ldo, x, ldx, w, C, n, (int)min64(3, n1 - n), o, (int)min64(4, OC - o), 3, 4, accumulate);
}
#endif

/* out (N, OC), rows ldo apart, (+)= x (N, C), rows ldx apart, @ w (OC, C)^T. */
static void thin_nt(float *out, int64_t ldo, const float *x, int64_t ldx, const float *w, int64_t N, int64_t C,
                    int64_t OC, int accumulate) {
    const cst_simd_path p = cst_simd_current();
    const int64_t nchunk = (N + THIN_ROWS - 1) / THIN_ROWS;
    int nt = max_threads();
    if ((double)N * C * OC < 1e6) nt = 1;
    (void)nt;
    /* Row-outer order (the GEMV path's is weight-outer): a tile's rows of x stay in L1 while the few
     * weight rows stream from L1/L2, so x, the big operand, is read from memory once. */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t ch = 0; ch < nchunk; ch++) {
        const int64_t n0 = ch * THIN_ROWS, n1 = min64(n0 + THIN_ROWS, N);
#if defined(__x86_64__)
        if (p == CST_SIMD_AVX512) thin_nt_avx512(out, ldo, x, ldx, w, C, OC, n0, n1, accumulate);
        else if (p == CST_SIMD_AVX2) thin_nt_avx2(out, ldo, x, ldx, w, C, OC, n0, n1, accumulate);
        else
#endif
            gemv_scalar_ld(out + n0 * ldo, ldo, x + n0 * ldx, ldx, w, n1 - n0, C, 0, OC, accumulate);
    }
    (void)p;
}

/* cst_gemm_thin_tn tiles: TM rows of c (vectors along M, contiguous in each row of a) x TJ columns
 * (broadcast from a row of b), one accumulator per element for all of K. The tile is stored through a
 * small buffer since its vectors run down columns of c. Tails repeat a valid column and are not stored. */
#define THIN_TN_TILE(NAME, TGT, VEC, W, NV, TJ, LOAD, MLOAD, MASKT, MKMASK, SET1, FMA, ZERO, STORE)       \
    TGT static void NAME(float *c, int64_t ldc, const float *a, int64_t lda, const float *b, int64_t ldb, \
                         int64_t M, int64_t R, int64_t K, int64_t m0, int64_t j0, int accumulate) {        \
        const int nm = (int)min64(NV * W, M - m0), nj = (int)min64(TJ, R - j0);                           \
        MASKT mk[NV];                                                                                     \
        int jo[TJ];                                                                                       \
        VEC acc[TJ][NV];                                                                                  \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) mk[v] = MKMASK(nm > W * v ? nm - W * v : 0); \
        _Pragma("GCC unroll 8") for (int j = 0; j < TJ; j++) jo[j] = j < nj ? j : nj - 1;                 \
        _Pragma("GCC unroll 8") for (int j = 0; j < TJ; j++)                                              \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[j][v] = ZERO();                      \
        const float *ak = a + m0, *bk = b + j0;                                                           \
        if (nm == NV * W && nj == TJ) {                                                                   \
            for (int64_t k = 0; k < K; k++, ak += lda, bk += ldb) {                                       \
                VEC av[NV];                                                                               \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) av[v] = LOAD(ak + W * v);            \
                _Pragma("GCC unroll 8") for (int j = 0; j < TJ; j++) {                                    \
                    const VEC bb = SET1(bk[j]);                                                           \
                    _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[j][v] = FMA(av[v], bb, acc[j][v]); \
                }                                                                                         \
            }                                                                                             \
        } else {                                                                                          \
            for (int64_t k = 0; k < K; k++, ak += lda, bk += ldb) {                                       \
                VEC av[NV];                                                                               \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) av[v] = MLOAD(ak + W * v, mk[v]);    \
                _Pragma("GCC unroll 8") for (int j = 0; j < TJ; j++) {                                    \
                    const VEC bb = SET1(bk[jo[j]]);                                                       \
                    _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[j][v] = FMA(av[v], bb, acc[j][v]); \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        float t[NV * W];                                                                                  \
        for (int j = 0; j < nj; j++) {                                                                    \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) STORE(t + W * v, acc[j][v]);             \
            float *cj = c + m0 * ldc + j0 + j;                                                            \
            for (int i = 0; i < nm; i++) cj[i * ldc] = accumulate ? cj[i * ldc] + t[i] : t[i];            \
        }                                                                                                 \
    }

#if defined(__x86_64__)
/* AVX-512: 48 x 8, 24 accumulators, 3 loads + 8 broadcasts per 24 FMAs. */
THIN_TN_TILE(thin_tn_tile512, T512, __m512, 16, 3, 8, _mm512_loadu_ps, mload16, __mmask16, mk_mask16,
             _mm512_set1_ps, _mm512_fmadd_ps, _mm512_setzero_ps, _mm512_storeu_ps)
/* AVX2: 24 x 4, 12 accumulators + 3 loads + 1 broadcast = 16 ymm registers. */
THIN_TN_TILE(thin_tn_tile256, T256, __m256, 8, 3, 4, _mm256_loadu_ps, mload8, __m256i, mk_mask8,
             _mm256_set1_ps, _mm256_fmadd_ps, _mm256_setzero_ps, _mm256_storeu_ps)
#endif

void cst_gemm_thin_nt(float *out, const float *x, const float *w, int64_t N, int64_t C, int64_t OC,
                      int accumulate) {
    if (N <= 0 || OC <= 0) return;
    /* The few rows of w are reread for every tile of x: a 64-byte aligned copy (at most 64 x C floats)
     * saves the split cache-line loads of NumPy's 16-byte alignment, ~10% at rank 32-64. */
    int cached = 0;
    float *wa = ((uintptr_t)w & 63) ? scratch_get((size_t)(OC * C), &cached) : NULL;
    if (wa) memcpy(wa, w, (size_t)(OC * C) * sizeof(float));
    thin_nt(out, OC, x, C, wa ? wa : w, N, C, OC, accumulate);
    if (wa) scratch_put(wa, cached);
}

void cst_gemm_thin_nn(float *out, int64_t ldo, const float *x, int64_t ldx, const float *w, int64_t ldw,
                      int64_t N, int64_t C, int64_t OC, int accumulate) {
    if (N <= 0 || OC <= 0) return;
    int cached;
    float *wt = scratch_get((size_t)(C * OC), &cached);
    if (!wt) { /* no memory for w^T: the packed GEMM reads w (C, OC) as it is */
        cst_gemm(out, ldo, x, ldx, 1, w, ldw, 1, N, OC, C, accumulate);
        return;
    }
    for (int64_t k = 0; k < C; k++) /* w^T (OC, C): a few KiB to a few hundred, next to the product */
        for (int64_t o = 0; o < OC; o++) wt[o * C + k] = w[k * ldw + o];
    thin_nt(out, ldo, x, ldx, wt, N, C, OC, accumulate);
    scratch_put(wt, cached);
}

void cst_gemm_thin_tn(float *c, int64_t ldc, const float *a, int64_t lda, const float *b, int64_t ldb,
                      int64_t M, int64_t R, int64_t K, int accumulate) {
    if (M <= 0 || R <= 0) return;
    const cst_simd_path p = cst_simd_current();
    if (K <= 0 || p == CST_SIMD_SCALAR) { /* the packed GEMM's portable kernel; a (K, M) read transposed */
        cst_gemm(c, ldc, a, 1, lda, b, ldb, 1, M, R, K, accumulate);
        return;
    }
#if defined(__x86_64__)
    const int TM = p == CST_SIMD_AVX512 ? 48 : 24, TJ = p == CST_SIMD_AVX512 ? 8 : 4;
    const int64_t ntile = (M + TM - 1) / TM;
    int nt = max_threads();
    if ((double)M * R * K < 1e6) nt = 1;
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t tm = 0; tm < ntile; tm++)
        for (int64_t j0 = 0; j0 < R; j0 += TJ) {
            if (p == CST_SIMD_AVX512) thin_tn_tile512(c, ldc, a, lda, b, ldb, M, R, K, tm * TM, j0, accumulate);
            else thin_tn_tile256(c, ldc, a, lda, b, ldb, M, R, K, tm * TM, j0, accumulate);
        }
#endif
}

/* ---- bf16 inputs, fp32 accumulation ----
 * Two ways, chosen per CPU. Both round the inputs to bf16 and sum exact products (a product of two bf16
 * values fits in fp32) in fp32, so they differ only in the order and blocking of the sums:
 * - "dot" (vdpbf16ps, AVX512_BF16): operands in the k-pair layout of bf16.h, each 32-bit element
 *   holding the bf16 values at k = 2p and 2p + 1. Packing is pure 32-bit data movement, so the fp32
 *   driver (gemm_run) runs unchanged on K/2 pair elements with a microkernel that takes pairs; it adds
 *   a[2p+1] b[2p+1], then a[2p] b[2p] into each fp32 lane, and flushes denormals to zero. Twice the fp32
 *   rate where vdpbf16ps issues like an FMA (AMD Zen 4/5, family >= 25); half of it on the Intel Xeon
 *   with AMX this was measured on (1 thread, 576 x 576 x 1024: 78 vs 145 GFLOP/s), so Intel CPUs and
 *   CPUs without AVX512_BF16 use
 * - "convert": the bf16 operands expanded to fp32 (activations rounded to bf16 and back) into scratch,
 *   then the fp32 GEMM of the current path. The weights still live in bf16 (half the memory). */

#if defined(__x86_64__)
/* T512BF: defined with the bf16 GEMV above. */

/* 8 x 48 as the fp32 kernel: 24 accumulators, 3 loads (48 columns x one k pair) + 8 pair broadcasts per
 * 24 vdpbf16ps, each worth two fp32 FMAs. */
T512BF static void ukr512_bf16_8x48(int64_t kc, const float *ap_, const float *b_, int64_t ldb, float *c,
                                    int64_t ldc, int mr, int nr, int beta) {
    enum { MR = 8, NV = 3 };
    const int32_t *ap = (const int32_t *)ap_;
    const int32_t *b = (const int32_t *)b_;
    __m512 acc[MR][NV];
    __mmask16 m[NV];
    _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) {
        int r = nr - 16 * v;
        m[v] = r >= 16 ? (__mmask16)0xFFFF : r <= 0 ? 0 : (__mmask16)((1u << r) - 1);
    }
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++)
        _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
    for (int i = 0; i < mr; i++) _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) _mm_prefetch((const char *)(c + i * ldc + 16 * v), _MM_HINT_T0);
    for (int64_t k = 0; k < kc; k++, ap += MR, b += ldb) {
        __m512i bv[NV];
        _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) bv[v] = _mm512_maskz_loadu_epi32(m[v], b + 16 * v);
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {
            const __m512i a_ = _mm512_set1_epi32(ap[i]);
            _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++)
                acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)a_, (__m512bh)bv[v]);
        }
    }
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) if (i < mr) {
        float *cr = c + i * ldc;
        _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) {
            __m512 r = acc[i][v];
            if (beta) r = _mm512_add_ps(_mm512_maskz_loadu_ps(m[v], cr + 16 * v), r);
            _mm512_mask_storeu_ps(cr + 16 * v, m[v], r);
        }
    }
}
#endif

/* ---- AMX (Intel Sapphire Rapids and later): tdpbf16ps multiplies a 16 x 32 bf16 tile of A by a
 * 32 x 16 tile of B (k pairs, the layout of bf16.h) into a 16 x 16 fp32 tile, ~16x the fp32 FMA rate.
 * A is read in place as row-major pairs padded to 32 rows and 16 pairs (the caller converts it so);
 * B is packed per thread, one block of AMX_KB k pairs at a time, into 16-column panels (pack_b, whose
 * panel IS a stack of B tiles) of up to AMX_PANELS panels. Each thread owns a contiguous range of
 * panels; every 16 x 16 output tile is summed by one thread over each k block in ascending 32-k steps,
 * the blocks added into the output in ascending order. Blocking k keeps a block of A (AMX_MB rows) and
 * the packed panels in L2 while every panel pair reuses them: without it, products with a long k (the
 * input gradient of gate|up or of the LM head, k = 28,672-49,152) streamed all of A from memory once per
 * panel pair and ran at a third of the forward's rate. ---- */
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define TAMX __attribute__((target("amx-tile,amx-bf16")))
#ifndef AMX_PANELS
#define AMX_PANELS 16 /* B panels packed at once: 256 columns */
#endif
#ifndef AMX_KB
#define AMX_KB 512     /* k pairs per block (a multiple of 16): a panel pair is 64 KiB */
#endif
#ifndef AMX_MB
#define AMX_MB 128     /* rows of A per block (a multiple of 32): 256 KiB of A per k block */
#endif

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tilecfg;

/* Linux hands out the 8 KiB of tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA). */
static int amx_usable(void) {
    static int ok = -1;
    if (ok < 0) {
        __builtin_cpu_init();
        ok = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
             syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    }
    return ok;
}

/* c (mr x nr of a 16 x 16 tile t) = t, or += t. */
TAMX __attribute__((target("avx512f"))) static void amx_store_tile(float *c, int64_t ldc, const float *t, int mr,
                                                                   int nr, int accumulate) {
    const __mmask16 m = nr >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nr) - 1);
    for (int i = 0; i < mr; i++) {
        __m512 v = _mm512_loadu_ps(t + 16 * i);
        if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c + i * ldc), v);
        _mm512_mask_storeu_ps(c + i * ldc, m, v);
    }
}

/* Tiles 0-3: the 2 x 2 output tiles; 4-5: two 16-row A tiles; 6-7: two B panels' tiles. Rows [i_lo,
 * i_hi) of c, k pairs [0, KPp) of a (already offset to the block) and of the packed panels bp. */
TAMX static void amx_panels(float *c, int64_t ldc, const uint32_t *a, int64_t lda, const uint32_t *bp,
                            int64_t i_lo, int64_t i_hi, int64_t M, int64_t N, int64_t KPp, int64_t jp0, int npan,
                            int accumulate) {
    float t[16 * 16];
    /* Panel pair outer: its two B panels stay in L1/L2 while the block of A's tiles streams from L2;
     * A-outer order measured 1.5-2x slower (A and B blocks together overflow L1). */
    for (int q = 0; q < npan; q += 2)
        for (int64_t i0 = i_lo; i0 < i_hi; i0 += 32) {
            const uint32_t *b0 = bp + (int64_t)q * 16 * KPp, *b1 = b0 + 16 * KPp;
            const uint32_t *a0 = a + i0 * lda, *a1 = a0 + 16 * lda;
            /* A whole 16 x 16 output tile of this thread's range goes between the tile and c directly:
             * loaded as the accumulator's start (accumulate) and stored from it. Edge tiles go through t. */
#define AMX_FULL(DI, DJ) (q + DJ / 16 < npan && i0 + DI + 16 <= M && (jp0 + q) * 16 + DJ + 16 <= N)
#define AMX_START(T, DI, DJ)                                                                        \
            if (accumulate && AMX_FULL(DI, DJ))                                                     \
                _tile_loadd(T, c + (i0 + DI) * ldc + (jp0 + q) * 16 + DJ, ldc * 4);                 \
            else                                                                                    \
                _tile_zero(T);
            AMX_START(0, 0, 0)
            AMX_START(1, 0, 16)
            AMX_START(2, 16, 0)
            AMX_START(3, 16, 16)
#undef AMX_START
            for (int64_t p = 0; p < KPp; p += 16) {
                _tile_loadd(4, a0 + p, lda * 4);
                _tile_loadd(5, a1 + p, lda * 4);
                _tile_loadd(6, b0 + p * 16, 64);
                _tile_loadd(7, b1 + p * 16, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
/* The all-zero partner of an odd panel count (q + 1 == npan) is never stored: its columns belong to the
 * next range, another thread's (it once raced with that thread's stores). */
#define AMX_STORE(T, DI, DJ)                                                                        \
            if (AMX_FULL(DI, DJ)) {                                                                 \
                _tile_stored(T, c + (i0 + DI) * ldc + (jp0 + q) * 16 + DJ, ldc * 4);                \
            } else if (q + DJ / 16 < npan) {                                                        \
                _tile_stored(T, t, 64);                                                             \
                const int64_t r0 = i0 + DI, c0 = (jp0 + q) * 16 + DJ;                               \
                if (c0 < N) amx_store_tile(c + r0 * ldc + c0, ldc, t, (int)min64(16, M - r0),       \
                                           (int)min64(16, N - c0), accumulate);                     \
            }
            AMX_STORE(0, 0, 0)
            AMX_STORE(1, 0, 16)
            AMX_STORE(2, 16, 0)
            AMX_STORE(3, 16, 16)
#undef AMX_STORE
#undef AMX_FULL
        }
}

/* r[j] = column j of the 16 x 16 block of 32-bit elements r[0..15] (rows): 32-bit then 64-bit interleaves
 * inside each 128-bit lane leave u[4i + m], lane L, holding column 4L + m of rows 4i..4i + 3; two
 * rounds of 128-bit lane shuffles then gather each column's four lanes into one register. */
__attribute__((target("avx512f"))) static inline void transpose16x16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int m = 0; m < 4; m++) {
        const __m512i p = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x44), q = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xEE);
        const __m512i v = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x44);
        const __m512i w = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xEE);
        r[m] = _mm512_shuffle_i32x4(p, v, 0x88);
        r[4 + m] = _mm512_shuffle_i32x4(p, v, 0xDD);
        r[8 + m] = _mm512_shuffle_i32x4(q, w, 0x88);
        r[12 + m] = _mm512_shuffle_i32x4(q, w, 0xDD);
    }
}

/* The A operand of the weight gradient, dW = dy^T x, whose k runs down dy's rows: dst (ceil(M/32)*32
 * rows of KPp pairs), dst[o * KPp + p] = d16[2p][o] | d16[2p + 1][o] << 16 for the bf16 matrix d16 (K rows
 * of M), zero past row K - 1, column M - 1 and pair ceil(K/2) - 1. Built 16 x 16 pairs at a time: the
 * k-pair panel of pack_pairs, transposed in registers. */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void amx_a_pairs_t(uint32_t *dst, const uint16_t *d16,
                                                                              int64_t K, int64_t M, int64_t KPp) {
    const int64_t nb = (M + 15) / 16, Mp = (M + 31) / 32 * 32, KP = (K + 1) / 2;
#pragma omp parallel for schedule(static) if ((double)M * K >= 1e5)
    for (int64_t ob = 0; ob < nb; ob++) {
        const int64_t col = ob * 16;
        const int nr = (int)min64(16, M - col);
        uint32_t blk[16 * 16];
        for (int64_t p0 = 0; p0 < KPp; p0 += 16) {
            const int64_t kd = p0 < KP ? min64(16, KP - p0) : 0;
            if (kd) pack_pairs(blk, 16, d16, M, K, p0, kd, col, nr);
            __m512i r[16];
            for (int p = 0; p < 16; p++)
                r[p] = p < kd ? _mm512_loadu_si512(blk + 16 * p) : _mm512_setzero_si512();
            transpose16x16(r);
            for (int j = 0; j < 16; j++) _mm512_storeu_si512(dst + (col + j) * KPp + p0, r[j]);
        }
    }
    if (Mp > nb * 16) memset(dst + nb * 16 * KPp, 0, (size_t)((Mp - nb * 16) * KPp) * 4);
}

/* B is b's pair elements (b[k*rsb + j*csb]), or, when w16 is not NULL, the pairs of rows of the bf16
 * matrix w16 (K16 rows of N columns; pack_pairs). */
TAMX static void amx_thread(float *c, int64_t ldc, const uint32_t *a, int64_t lda, const uint32_t *b,
                            int64_t rsb, int64_t csb, const uint16_t *w16, int64_t K16, int64_t M, int64_t N,
                            int64_t KP, int64_t KPp, int64_t j0, int64_t j1, uint32_t *bp, int accumulate) {
    amx_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
    for (int64_t jc = j0; jc < j1; jc += AMX_PANELS) {
        const int npan = (int)min64(AMX_PANELS, j1 - jc);
        for (int64_t p0 = 0; p0 < KPp; p0 += AMX_KB) {
            /* kb: the block's pairs (a multiple of 16); kd <= kb of them hold data (p0 < KP always). */
            const int64_t kb = min64(AMX_KB, KPp - p0), kd = min64(kb, KP - p0);
            for (int q = 0; q < npan + (npan & 1); q++) { /* an odd count gets an all-zero partner panel */
                uint32_t *d = bp + (int64_t)q * 16 * kb;
                const int64_t col = (jc + q) * 16;
                if (q < npan && w16)
                    pack_pairs(d, 16, w16, N, K16, p0, kd, col, (int)min64(16, N - col));
                else if (q < npan)
                    pack_b((float *)d, (const float *)b, rsb, csb, p0, kd, col, min64(16, N - col), 16, 1);
                memset(d + (q < npan ? kd : 0) * 16, 0, (size_t)((q < npan ? kb - kd : kb) * 16) * 4);
            }
            for (int64_t i0 = 0; i0 < M; i0 += AMX_MB)
                amx_panels(c, ldc, a + p0, lda, bp, i0, min64(i0 + AMX_MB, M), M, N, kb, jc, npan,
                           accumulate || p0 > 0);
        }
    }
    _tile_release();
}

/* c (M, N) (+)= a @ b: a (>= ceil(M/32)*32 rows, lda = KPp = KP rounded up to 16 pairs, zero-padded),
 * b (KP, N) pair elements at b[k*rsb + j*csb], or (w16 not NULL) the row pairs of the bf16 matrix w16
 * (K16 = 2 KP or 2 KP - 1 rows of N). -1 when no memory for the B panels. */
static int amx_gemm(float *c, int64_t ldc, const uint32_t *a, int64_t lda, const uint32_t *b, int64_t rsb,
                    int64_t csb, const uint16_t *w16, int64_t K16, int64_t M, int64_t N, int64_t KP, int accumulate) {
    const int64_t KPp = (KP + 15) / 16 * 16, np = (N + 15) / 16;
    int nt = max_threads();
    if ((double)M * N * KP < 5e5) nt = 1; /* fork/join would cost more than it saves */
    if (nt > np) nt = (int)np;
    const size_t per = (size_t)(AMX_PANELS + 1) * 16 * (size_t)min64(AMX_KB, KPp);
    int cached;
    uint32_t *scratch = (uint32_t *)scratch_get(per * (size_t)nt, &cached);
    if (!scratch) return -1;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int t = 0; t < nt; t++)
        amx_thread(c, ldc, a, lda, b, rsb, csb, w16, K16, M, N, KP, KPp, np * t / nt, np * (t + 1) / nt,
                   scratch + (size_t)t * per, accumulate);
    scratch_put((float *)scratch, cached);
    return 0;
}
#else
static void amx_a_pairs_t(uint32_t *dst, const uint16_t *d16, int64_t K, int64_t M, int64_t KPp) {
    (void)dst; (void)d16; (void)K; (void)M; (void)KPp;
}
static int amx_usable(void) { return 0; }
static int amx_gemm(float *c, int64_t ldc, const uint32_t *a, int64_t lda, const uint32_t *b, int64_t rsb,
                    int64_t csb, const uint16_t *w16, int64_t K16, int64_t M, int64_t N, int64_t KP, int accumulate) {
    (void)c; (void)ldc; (void)a; (void)lda; (void)b; (void)rsb; (void)csb; (void)w16; (void)K16; (void)M; (void)N;
    (void)KP; (void)accumulate;
    return -1;
}
#endif

/* x (N, C) fp32 -> bf16 rows of KPp pairs (2 KPp bf16, zero beyond C) and ceil(N/32)*32 rows (zero
 * beyond N): the A operand amx_gemm reads in place. Returns the buffer's size in bytes for given sizes. */
static int64_t amx_a_bytes(int64_t N, int64_t C) { return (N + 31) / 32 * 32 * ((C + 31) / 32 * 32) * 2; }

static void amx_a_from_f32(uint16_t *dst, const float *x, int64_t N, int64_t C) {
    const int64_t Cpp = (C + 31) / 32 * 32, Np = (N + 31) / 32 * 32;
    cst_bf16_rows_f32(dst, x, C, N, C, Cpp);
    memset(dst + N * Cpp, 0, (size_t)((Np - N) * Cpp) * 2);
}

/* -1 until first use, then the CST_BF16_* way chosen (or set). */
static int bf16_way = -1;

static int cpu_family(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0u), "c"(0u));
    if (!(b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u)) return 0; /* not "AuthenticAMD" */
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1u), "c"(0u));
    return (int)(((a >> 8) & 0xf) + ((a >> 20) & 0xff)); /* family + extended family */
#else
    return 0;
#endif
}

int cst_gemm_bf16_way(void) {
    if (bf16_way < 0)
        bf16_way = amx_usable() ? CST_BF16_AMX
                   : cst_bf16_dot_supported() && cpu_family() >= 25 ? CST_BF16_DOT : CST_BF16_CONVERT;
    return cst_simd_current() == CST_SIMD_AVX512 ? bf16_way : CST_BF16_CONVERT;
}

int cst_gemm_bf16_set_way(int way) {
    if (way == CST_BF16_DOT && !cst_bf16_dot_supported()) return -1;
    if (way == CST_BF16_AMX && !amx_usable()) return -1;
    if (way != CST_BF16_DOT && way != CST_BF16_CONVERT && way != CST_BF16_AMX) return -1;
    bf16_way = way;
    return 0;
}

static const gemm_cfg bf16_dot_cfg = {
#if defined(__x86_64__)
    /* KC counts k pairs here: 256 pairs = 512 k, an A micro-panel of 8 KiB and a B block of 576 KiB. */
    8, 48, 128, 12, ukr512_bf16_8x48, 1
#else
    0
#endif
};

/* Scratch for the converted operands, released on every path out. */
typedef struct {
    void *p[2];
    int cached[2];
} bf16_bufs;

static void *bufs_get(bf16_bufs *s, int i, int64_t bytes) {
    s->p[i] = scratch_get((size_t)((bytes + 3) / 4), &s->cached[i]);
    return s->p[i];
}

static int bufs_put(bf16_bufs *s, int status) {
    for (int i = 0; i < 2; i++)
        if (s->p[i]) scratch_put(s->p[i], s->cached[i]);
    return status;
}

int cst_gemm_bf16_nt(float *out, const float *x, const uint16_t *w, int64_t N, int64_t C, int64_t OC,
                     int accumulate) {
    bf16_bufs s = {{NULL, NULL}, {0, 0}};
    if (cst_gemm_bf16_way() == CST_BF16_CONVERT) {
        float *xr = bufs_get(&s, 0, N * C * 4), *wf = bufs_get(&s, 1, OC * C * 4);
        if (!xr || !wf) return bufs_put(&s, -1);
        cst_bf16_round_f32(xr, x, N * C);
        cst_bf16_to_f32_n(wf, w, OC * C);
        cst_gemm(out, OC, xr, C, 1, wf, 1, C, N, OC, C, accumulate);
        return bufs_put(&s, 0);
    }
    const int amx = cst_gemm_bf16_way() == CST_BF16_AMX;
    const int64_t Cp = C + (C & 1);
    uint16_t *xa = bufs_get(&s, 0, amx ? amx_a_bytes(N, C) : N * Cp * 2);
    const uint16_t *wa = w;
    if (!xa) return bufs_put(&s, -1);
    if (Cp != C) { /* odd C: rows of w padded to whole pairs */
        uint16_t *wp = bufs_get(&s, 1, OC * Cp * 2);
        if (!wp) return bufs_put(&s, -1);
        cst_bf16_rows_bf16(wp, w, C, OC, C, Cp);
        wa = wp;
    }
    if (amx) {
        amx_a_from_f32(xa, x, N, C);
        const int st = amx_gemm(out, OC, (const uint32_t *)xa, (C + 31) / 32 * 16, (const uint32_t *)wa, 1, Cp / 2,
                                NULL, 0, N, OC, Cp / 2, accumulate);
        return bufs_put(&s, st);
    }
    cst_bf16_rows_f32(xa, x, C, N, C, Cp);
    /* A (N, Cp/2 pairs) row-major; B(k, j) = pair k of row j of w. */
    const int st = gemm_run(&bf16_dot_cfg, out, OC, (const float *)xa, Cp / 2, 1, (const float *)wa, 1, Cp / 2,
                            N, OC, Cp / 2, accumulate, NULL, 0);
    return bufs_put(&s, st);
}

int cst_gemm_bf16_nn(float *out, const float *dy, const uint16_t *w, int64_t N, int64_t OC, int64_t C,
                     int accumulate) {
    bf16_bufs s = {{NULL, NULL}, {0, 0}};
    if (cst_gemm_bf16_way() == CST_BF16_CONVERT) {
        float *dr = bufs_get(&s, 0, N * OC * 4), *wf = bufs_get(&s, 1, OC * C * 4);
        if (!dr || !wf) return bufs_put(&s, -1);
        cst_bf16_round_f32(dr, dy, N * OC);
        cst_bf16_to_f32_n(wf, w, OC * C);
        cst_gemm(out, C, dr, OC, 1, wf, C, 1, N, C, OC, accumulate);
        return bufs_put(&s, 0);
    }
    const int amx = cst_gemm_bf16_way() == CST_BF16_AMX;
    const int64_t OCp = OC + (OC & 1);
    uint16_t *da = bufs_get(&s, 0, amx ? amx_a_bytes(N, OC) : N * OCp * 2);
    if (!da) return bufs_put(&s, -1);
    if (amx) { /* B's panels are built from w's row pairs directly (pack_pairs) */
        amx_a_from_f32(da, dy, N, OC);
        const int st = amx_gemm(out, C, (const uint32_t *)da, (OC + 31) / 32 * 16, NULL, 0, 0, w, OC, N, C,
                                OCp / 2, accumulate);
        return bufs_put(&s, st);
    }
    cst_bf16_rows_f32(da, dy, OC, N, OC, OCp);
    /* A (N, OCp/2 pairs) row-major; B(p, j) = rows 2p and 2p + 1 of w, paired while packing (pack_pairs). */
    const int st = gemm_run(&bf16_dot_cfg, out, C, (const float *)da, OCp / 2, 1, NULL, C, 1, N, C, OCp / 2,
                            accumulate, w, OC);
    return bufs_put(&s, st);
}

int cst_gemm_bf16_tn(float *out, const float *dy, const float *x, int64_t N, int64_t OC, int64_t C,
                     int accumulate) {
    bf16_bufs s = {{NULL, NULL}, {0, 0}};
    if (cst_gemm_bf16_way() == CST_BF16_AMX && N > 0) {
        /* k = N runs down the rows of both: B's panels come from x's bf16 row pairs (pack_pairs), A is dy's
         * pairs transposed (amx_a_pairs_t), built from dy in bf16, whose buffer then holds x in bf16. */
        const int64_t KP = (N + 1) / 2, KPp = (KP + 15) / 16 * 16, rows = N * (OC > C ? OC : C);
        uint16_t *h = bufs_get(&s, 0, rows * 2);
        uint32_t *a = bufs_get(&s, 1, (OC + 31) / 32 * 32 * KPp * 4);
        if (!h || !a) return bufs_put(&s, -1);
        cst_bf16_rows_f32(h, dy, OC, N, OC, OC);
        amx_a_pairs_t(a, h, N, OC, KPp);
        cst_bf16_rows_f32(h, x, C, N, C, C);
        return bufs_put(&s, amx_gemm(out, C, a, KPp, NULL, 0, 0, h, N, OC, C, KP, accumulate));
    }
    if (cst_gemm_bf16_way() != CST_BF16_DOT) { /* the convert way: the fp32 GEMM on rounded inputs */
        float *dr = bufs_get(&s, 0, N * OC * 4), *xr = bufs_get(&s, 1, N * C * 4);
        if (!dr || !xr) return bufs_put(&s, -1);
        cst_bf16_round_f32(dr, dy, N * OC);
        cst_bf16_round_f32(xr, x, N * C);
        cst_gemm(out, C, dr, 1, OC, xr, C, 1, OC, C, N, accumulate);
        return bufs_put(&s, 0);
    }
    const int64_t NP = (N + 1) / 2;
    uint32_t *dp = bufs_get(&s, 0, NP * OC * 4), *xp = bufs_get(&s, 1, NP * C * 4);
    if (!dp || !xp) return bufs_put(&s, -1);
    cst_bf16_pairs_f32(dp, dy, OC, N, OC); /* A(o, p) = pair p of column o of dy */
    cst_bf16_pairs_f32(xp, x, C, N, C);
    const int st = gemm_run(&bf16_dot_cfg, out, C, (const float *)dp, 1, OC, (const float *)xp, C, 1, OC, C, NP,
                            accumulate, NULL, 0);
    return bufs_put(&s, st);
}

/* ---- prepacked weights: y = x W^T against W packed once into the B panels of the current path ----
 * Generation multiplies the same weights by a few rows per token; packing them once per call of
 * generate (not once per product) lets those rows run through the GEMM microkernel at full speed
 * instead of the dot-product path, and a long prompt's prefill skips packing B altogether. */

/* The packed path's tiles: panels of CST_PACK_NR columns on every path (the scalar 4x16 and AVX2 6x16
 * kernels already use 16; AVX-512 gets a 16 x 16 kernel instead of 8 x 48), so one packing serves all of
 * them. Every kernel sums each element over k in the same order, so the tile shape does not change
 * results. */
static gemm_cfg packed_cfg_for(cst_simd_path p) {
    gemm_cfg g = cfg_for(p);
#if defined(__x86_64__)
    if (p == CST_SIMD_AVX512) g = (gemm_cfg){16, CST_PACK_NR, 64, 0, ukr512_16x16, 1};
#endif
    return g;
}

int64_t cst_gemm_packed_size(int64_t OC, int64_t C) { return (OC + CST_PACK_NR - 1) / CST_PACK_NR * CST_PACK_NR * C; }

void cst_gemm_pack_nt(float *dst, const float *w, int64_t OC, int64_t C) {
    const gemm_cfg g = packed_cfg_for(cst_simd_current());
    const int NR = CST_PACK_NR;
    const int64_t np = (OC + NR - 1) / NR;
    int nt = max_threads();
    if ((double)OC * C < 1e6) nt = 1;
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t p = 0; p < np; p++)
        pack_b(dst + p * NR * C, w, 1, C, 0, C, p * NR, min64(NR, OC - p * NR), NR, g.simd_pack);
}

/* No memory for packing A: unblocked, straight from the packed weights (slow, still correct). */
static void packed_naive(float *c, const float *a, const float *wp, int64_t M, int64_t C, int64_t OC, int NR,
                         int accumulate) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; i++)
        for (int64_t o = 0; o < OC; o++) {
            const float *col = wp + (o / NR) * NR * C + o % NR;
            float s = 0.0f;
            for (int64_t k = 0; k < C; k++) s += a[i * C + k] * col[k * NR];
            c[i * OC + o] = accumulate ? c[i * OC + o] + s : s;
        }
}

/* Rows per packed product: A (up to 64 x C) is packed whole and each weight panel streams through once;
 * more rows are done in blocks of this many. */
#define FEW_ROWS 64

void cst_gemm_packed_nt(float *c, const float *a, const float *wp, int64_t M, int64_t C, int64_t OC,
                        int accumulate) {
    if (M <= 0 || OC <= 0) return;
    const gemm_cfg g = packed_cfg_for(cst_simd_current());
    const int MR = g.mr, NR = CST_PACK_NR;
    if (C <= 0) {
        if (!accumulate)
            for (int64_t i = 0; i < M; i++) memset(c + i * OC, 0, (size_t)OC * sizeof(float));
        return;
    }
    if (M > FEW_ROWS) { /* blocks of rows, each its own product (rows are independent) */
        for (int64_t m0 = 0; m0 < M; m0 += FEW_ROWS)
            cst_gemm_packed_nt(c + m0 * OC, a + m0 * C, wp, min64(FEW_ROWS, M - m0), C, OC, accumulate);
        return;
    }
    /* A packed whole (every k block) once per thread; then each panel of the thread's contiguous range
     * walks all of k, so the packed weights stream from memory in one sequential run per thread. The k
     * blocks and their order are cst_gemm's, hence the same sums. Threads split the column panels. */
    const int64_t pm = (M + MR - 1) / MR, pn = (OC + NR - 1) / NR;
    int nt = max_threads();
    if ((double)M * OC * C < 1e6) nt = 1;
    if (nt > pn) nt = (int)pn;
    const int64_t mpad = pm * MR, nkb = (C + KC - 1) / KC;
    const size_t abuf_len = (size_t)(mpad * nkb * KC);
    int cached;
    float *scratch = scratch_get(abuf_len * (size_t)nt, &cached);
    if (!scratch) return packed_naive(c, a, wp, M, C, OC, NR, accumulate);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int t = 0; t < nt; t++) {
        float *abuf = scratch + (size_t)t * abuf_len;
        const int64_t j0 = pn * t / nt, j1 = pn * (t + 1) / nt;
        for (int64_t pb = 0; pb < nkb; pb++) {
            const int64_t pc = pb * KC, kc = min64(KC, C - pc);
            pack_a(abuf + pb * mpad * KC, a, C, 1, 0, M, pc, kc, MR, g.simd_pack);
        }
        for (int64_t jp = j0; jp < j1; jp++) {
            const int nr = (int)min64(NR, OC - jp * NR);
            for (int64_t pb = 0; pb < nkb; pb++) {
                const int64_t pc = pb * KC, kc = min64(KC, C - pc);
                const float *bp = wp + jp * NR * C + pc * NR, *ab = abuf + pb * mpad * KC;
                for (int64_t ip = 0; ip < M; ip += MR)
                    g.ukr(kc, ab + ip * kc, bp, NR, c + ip * OC + jp * NR, OC, (int)min64(MR, M - ip), nr,
                          accumulate || pc > 0);
            }
        }
    }
    scratch_put(scratch, cached);
}
