/* attention.c: causal grouped-query self-attention, forward and backward (see attention.h).
 * Saves the per-row log-sum-exp instead of the (B,NH,T,T) probabilities and recomputes them in
 * backward, so memory is O(B*NH*T) per layer. Not a flash kernel for GPUs, and no KV cache. */
#include "attention.h"
#include "simd.h"
#include "avx512.h"
#include <math.h>
#include <string.h>

/* Keys are scored in blocks of KB into a stack buffer: bounded scratch (no allocation) whatever T. */
#define KB 64

#define CST_INLINE static inline __attribute__((always_inline))

/* Dot products keep eight interleaved partial sums combined in a fixed tree. With GNU C vector
 * types (this file needs GCC or clang) the eight lanes are one vector on every path: two SSE
 * registers on baseline x86-64, one ymm register on AVX2/AVX-512. The compiler may not
 * reassociate them, so every SIMD path gives the same bits (head sizes 64 and 128 on AVX-512 take
 * the hand-written kernels further down instead). */
typedef float f8 __attribute__((vector_size(32)));
/* The same vector read through an unaligned, aliasing-safe type: rows need only float alignment. */
typedef float f8u __attribute__((vector_size(32), aligned(4), may_alias));
#define load8(p) (*(const f8u *)(p))
#define CST_F8_ZERO ((f8){0, 0, 0, 0, 0, 0, 0, 0})

CST_INLINE float tree8(const float c[8]) {
    return ((c[0] + c[4]) + (c[1] + c[5])) + ((c[2] + c[6]) + (c[3] + c[7]));
}

CST_INLINE float dot_f32(const float *a, const float *b, int64_t n) {
    float c[8] = {0};
    int64_t i = 0;
    f8 acc = CST_F8_ZERO;
    for (; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
    memcpy(c, &acc, sizeof c);
    float s = tree8(c);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

CST_INLINE void axpy_f32(float *restrict y, float a, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* One query row against keys 0..n-1 (n >= 1): online softmax over blocks of KB keys, with the
 * running maximum subtracted so large scores cannot overflow. o (HS) is the accumulator and the
 * result; returns the row's log-sum-exp. ks is the stride between consecutive keys. */
CST_INLINE float fwd_row_body(float *restrict o, const float *restrict qr, const float *k0,
                              const float *v0, int64_t ks, int64_t n, int64_t HS, float scale) {
    float sc[KB];
    float m = -INFINITY, l = 0.0f;
    for (int64_t i = 0; i < HS; i++) o[i] = 0.0f;
    for (int64_t j0 = 0; j0 < n; j0 += KB) {
        const int64_t nb = n - j0 < KB ? n - j0 : KB;
        float bm = -INFINITY;
        for (int64_t jj = 0; jj < nb; jj++) {
            const float s = dot_f32(qr, k0 + (j0 + jj) * ks, HS) * scale;
            sc[jj] = s;
            bm = s > bm ? s : bm;
        }
        if (bm > m) {
            /* First block: m = -inf, so c = 0 and the (zero) accumulator stays zero. */
            const float c = expf(m - bm);
            l *= c;
            for (int64_t i = 0; i < HS; i++) o[i] *= c;
            m = bm;
        }
        for (int64_t jj = 0; jj < nb; jj++) {
            const float p = expf(sc[jj] - m);
            l += p;
            axpy_f32(o, p, v0 + (j0 + jj) * ks, HS);
        }
    }
    const float inv = 1.0f / l;
    for (int64_t i = 0; i < HS; i++) o[i] *= inv;
    return m + logf(l);
}

/* Query rows are processed four at a time where they can be: each key is loaded once for four
 * rows and the four dot products form independent dependency chains. Every row still sees its
 * sums in exactly the order of the one-row code (same 8 partial sums, keys ascending, rows in
 * time order), so tiled and untiled rows give the same bits. */
#define QT 4
#ifndef BKEYS
#define BKEYS 32 /* keys per block of the AVX-512 backward */
#endif
_Static_assert(BKEYS % QT == 0, "BKEYS: whole row tiles start at each key block");

/* Four dot products against one shared vector b, each in dot_f32's order. */
CST_INLINE void dot4_f32(float out[QT], const float *a0, const float *a1, const float *a2,
                         const float *a3, const float *b, int64_t n) {
    float c0[8] = {0}, c1[8] = {0}, c2[8] = {0}, c3[8] = {0};
    int64_t i = 0;
    f8 s0 = CST_F8_ZERO, s1 = CST_F8_ZERO, s2 = CST_F8_ZERO, s3 = CST_F8_ZERO;
    for (; i + 8 <= n; i += 8) {
        const f8 x = load8(b + i);
        s0 += load8(a0 + i) * x;
        s1 += load8(a1 + i) * x;
        s2 += load8(a2 + i) * x;
        s3 += load8(a3 + i) * x;
    }
    memcpy(c0, &s0, sizeof c0);
    memcpy(c1, &s1, sizeof c1);
    memcpy(c2, &s2, sizeof c2);
    memcpy(c3, &s3, sizeof c3);
    out[0] = tree8(c0);
    out[1] = tree8(c1);
    out[2] = tree8(c2);
    out[3] = tree8(c3);
    for (; i < n; i++) {
        out[0] += a0[i] * b[i];
        out[1] += a1[i] * b[i];
        out[2] += a2[i] * b[i];
        out[3] += a3[i] * b[i];
    }
}

/* y_r += a[r] * x for four rows sharing x. */
CST_INLINE void axpy4_f32(float *restrict y0, float *restrict y1, float *restrict y2,
                          float *restrict y3, const float a[QT], const float *restrict x,
                          int64_t n) {
    const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i];
        y0[i] += a0 * v;
        y1[i] += a1 * v;
        y2[i] += a2 * v;
        y3[i] += a3 * v;
    }
}

/* y += a[0] x0 + a[1] x1 + a[2] x2 + a[3] x3, added in that order (as four successive axpys). */
CST_INLINE void axpy_sum4_f32(float *restrict y, const float a[QT], const float *x0,
                              const float *x1, const float *x2, const float *x3, int64_t n) {
    const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
    for (int64_t i = 0; i < n; i++) y[i] = (((y[i] + a0 * x0[i]) + a1 * x1[i]) + a2 * x2[i]) + a3 * x3[i];
}

/* Rows t0..t0+3 of one head, all valid (t0 + 3 < length): row r attends keys 0..t0+r. Same
 * online softmax as fwd_row_body, per row. o rows and lse entries are os and 1 apart. */
CST_INLINE void fwd_tile_body(float *o, int64_t os, float *lse, const float *q, const float *k0,
                              const float *v0, int64_t ks, int64_t t0, int64_t HS, float scale) {
    float sc[QT][KB];
    float m[QT], l[QT];
    float *o0 = o, *o1 = o + os, *o2 = o + 2 * os, *o3 = o + 3 * os;
    const float *q0 = q, *q1 = q + os, *q2 = q + 2 * os, *q3 = q + 3 * os;
    float *orow[QT] = {o0, o1, o2, o3};
    for (int r = 0; r < QT; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        for (int64_t i = 0; i < HS; i++) orow[r][i] = 0.0f;
    }
    const int64_t n = t0 + QT;
    for (int64_t j0 = 0; j0 < n; j0 += KB) {
        const int64_t nb = n - j0 < KB ? n - j0 : KB;
        float bm[QT] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
        for (int64_t jj = 0; jj < nb; jj++) {
            const int64_t j = j0 + jj;
            float s[QT];
            dot4_f32(s, q0, q1, q2, q3, k0 + j * ks, HS);
            for (int r = 0; r < QT; r++) {
                /* Keys after row r's own position are masked out of its softmax. */
                const float x = j <= t0 + r ? s[r] * scale : -INFINITY;
                sc[r][jj] = x;
                bm[r] = x > bm[r] ? x : bm[r];
            }
        }
        for (int r = 0; r < QT; r++)
            if (bm[r] > m[r]) {
                const float c = expf(m[r] - bm[r]);
                l[r] *= c;
                for (int64_t i = 0; i < HS; i++) orow[r][i] *= c;
                m[r] = bm[r];
            }
        for (int64_t jj = 0; jj < nb; jj++) {
            const int64_t j = j0 + jj;
            const float *vj = v0 + j * ks;
            if (j <= t0) {
                float p[QT];
                for (int r = 0; r < QT; r++) {
                    p[r] = expf(sc[r][jj] - m[r]);
                    l[r] += p[r];
                }
                axpy4_f32(o0, o1, o2, o3, p, vj, HS);
            } else {
                for (int r = (int)(j - t0); r < QT; r++) {
                    const float p = expf(sc[r][jj] - m[r]);
                    l[r] += p;
                    axpy_f32(orow[r], p, vj, HS);
                }
            }
        }
    }
    for (int r = 0; r < QT; r++) {
        const float inv = 1.0f / l[r];
        for (int64_t i = 0; i < HS; i++) orow[r][i] *= inv;
        lse[r] = m[r] + logf(l[r]);
    }
}

/* Backward of one query row t (keys 0..t); adds into dq row, and dk, dv rows 0..t. */
CST_INLINE void bwd_row(float *dqr, float *dkb, float *dvb, const float *dor, const float *orow,
                        const float *qr, const float *kb, const float *vb, float L, int64_t ks,
                        int64_t t, int64_t HS, float scale) {
    /* D = sum_j p_j dp_j = dout . out: the softmax Jacobian's correction term. */
    const float D = dot_f32(dor, orow, HS);
    for (int64_t j = 0; j <= t; j++) {
        const float *kj = kb + j * ks, *vj = vb + j * ks;
        const float p = expf(dot_f32(qr, kj, HS) * scale - L);
        const float ds = p * (dot_f32(dor, vj, HS) - D) * scale;
        axpy_f32(dqr, ds, kj, HS);
        axpy_f32(dkb + j * ks, ds, qr, HS);
        axpy_f32(dvb + j * ks, p, dor, HS);
    }
}

/* Backward of rows t0..t0+3 (all valid) with bwd_row's arithmetic: dk_j and dv_j receive the rows'
 * terms in time order, dq_r its keys in ascending order, exactly as four bwd_row calls would. */
CST_INLINE void bwd_tile(float *dq, const float *dout, const float *out, const float *q, int64_t qs,
                         float *dkb, float *dvb, const float *kb, const float *vb, const float *L,
                         int64_t ks, int64_t t0, int64_t HS, float scale) {
    const float *q0 = q, *q1 = q + qs, *q2 = q + 2 * qs, *q3 = q + 3 * qs;
    const float *d0 = dout, *d1 = dout + qs, *d2 = dout + 2 * qs, *d3 = dout + 3 * qs;
    float *dq0 = dq, *dq1 = dq + qs, *dq2 = dq + 2 * qs, *dq3 = dq + 3 * qs;
    float D[QT];
    for (int r = 0; r < QT; r++) D[r] = dot_f32(dout + r * qs, out + r * qs, HS);
    for (int64_t j = 0; j < t0 + QT; j++) {
        const float *kj = kb + j * ks, *vj = vb + j * ks;
        float s[QT], dp[QT], p[QT], ds[QT];
        dot4_f32(s, q0, q1, q2, q3, kj, HS);
        dot4_f32(dp, d0, d1, d2, d3, vj, HS);
        for (int r = 0; r < QT; r++) {
            p[r] = expf(s[r] * scale - L[r]);
            ds[r] = p[r] * (dp[r] - D[r]) * scale;
        }
        if (j <= t0) {
            axpy4_f32(dq0, dq1, dq2, dq3, ds, kj, HS);
            axpy_sum4_f32(dkb + j * ks, ds, q0, q1, q2, q3, HS);
            axpy_sum4_f32(dvb + j * ks, p, d0, d1, d2, d3, HS);
        } else {
            /* The diagonal corner: key j exists only for rows r >= j - t0. */
            for (int r = (int)(j - t0); r < QT; r++) {
                axpy_f32(dq + r * qs, ds[r], kj, HS);
                axpy_f32(dkb + j * ks, ds[r], q + r * qs, HS);
                axpy_f32(dvb + j * ks, p[r], dout + r * qs, HS);
            }
        }
    }
}

#ifdef __x86_64__
/* ---- AVX-512 kernels for head sizes 64 and 128 (CH = HS / 16 vectors per row) ----
 * The same algorithms as the portable code above (online softmax over blocks of KB keys; backward
 * from the saved lse), on 16-lane vectors with FMAs: each dot product is CH FMAs into one vector,
 * and the rows' vectors are summed together by one shuffle tree (hsum4_avx512). NR rows (4, or 1 for
 * the rows before the padding) go through one pass over the keys, and every row's arithmetic is the
 * same whatever NR is, so a row's result does not depend on the length of its sequence. The sums
 * differ from the portable path's in the last bits (FMAs, 16 lanes). */

/* Dot products of NR rows (stride rs) with one vector b: lanes 0..NR-1. */
CST_AVX512_INLINE __m128 dots_avx512(const float *a, int64_t rs, const float *b, const int NR, const int CH) {
    __m512 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
    for (int r = 0; r < NR; r++) {
        acc[r] = _mm512_mul_ps(_mm512_loadu_ps(a + r * rs), _mm512_loadu_ps(b));
        for (int c = 1; c < CH; c++)
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(a + r * rs + 16 * c), _mm512_loadu_ps(b + 16 * c), acc[r]);
    }
    return hsum4_avx512(acc[0], acc[1], acc[2], acc[3]);
}

CST_AVX512_INLINE float lane_f32(__m128 v, int r) {
    float t[4];
    _mm_storeu_ps(t, v);
    return t[r];
}

/* Rows t0 .. t0+NR-1 of one head (all valid): row r attends keys 0..t0+r. o rows and q rows are os
 * apart, lse entries 1 apart. */
CST_AVX512_INLINE void fwd_rows_avx512(float *o, int64_t os, float *lse, const float *q, const float *k0,
                                       const float *v0, int64_t ks, int64_t t0, float scale, const int NR,
                                       const int CH) {
    float sc[4][KB];
    float m[4], l[4];
    __m512 acc[4][8];
    for (int r = 0; r < NR; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        for (int c = 0; c < CH; c++) acc[r][c] = _mm512_setzero_ps();
    }
    const int64_t n = t0 + NR;
    for (int64_t j0 = 0; j0 < n; j0 += KB) {
        const int64_t nb = n - j0 < KB ? n - j0 : KB;
        for (int64_t jj = 0; jj < nb; jj++) {
            const int64_t j = j0 + jj;
            float s[4];
            _mm_storeu_ps(s, _mm_mul_ps(dots_avx512(q, os, k0 + j * ks, NR, CH), _mm_set1_ps(scale)));
            for (int r = 0; r < NR; r++) sc[r][jj] = j <= t0 + r ? s[r] : -INFINITY;
        }
        for (int r = 0; r < NR; r++) {
            /* the block's maximum, then its exps (masked keys give 0) and their sum, 16 at a time */
            __m512 vm = _mm512_set1_ps(-INFINITY);
            for (int64_t jj = 0; jj < nb; jj += 16) {
                const __mmask16 mk = tail_mask(nb - jj);
                vm = _mm512_mask_max_ps(vm, mk, vm, _mm512_maskz_loadu_ps(mk, sc[r] + jj));
            }
            const float bm = _mm512_reduce_max_ps(vm);
            if (bm > m[r]) {
                const float c = expf(m[r] - bm); /* first block: exp(-inf) = 0 */
                l[r] *= c;
                for (int cc = 0; cc < CH; cc++) acc[r][cc] = _mm512_mul_ps(acc[r][cc], _mm512_set1_ps(c));
                m[r] = bm;
            }
            const __m512 mx = _mm512_set1_ps(m[r]);
            __m512 sum = _mm512_setzero_ps();
            for (int64_t jj = 0; jj < nb; jj += 16) {
                const __mmask16 mk = tail_mask(nb - jj);
                const __m512 e = _mm512_maskz_mov_ps(mk, exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sc[r] + jj), mx)));
                _mm512_mask_storeu_ps(sc[r] + jj, mk, e);
                sum = _mm512_add_ps(sum, e);
            }
            l[r] += _mm512_reduce_add_ps(sum);
        }
        /* o_r += p_rj v_j over the row's own keys, in key order */
        for (int64_t jj = 0; jj < nb; jj++) {
            const int64_t j = j0 + jj;
            const float *vj = v0 + j * ks;
            __m512 vv[8];
            for (int c = 0; c < CH; c++) vv[c] = _mm512_loadu_ps(vj + 16 * c);
            for (int r = 0; r < NR; r++)
                if (j <= t0 + r) {
                    const __m512 p = _mm512_set1_ps(sc[r][jj]);
                    for (int c = 0; c < CH; c++) acc[r][c] = _mm512_fmadd_ps(p, vv[c], acc[r][c]);
                }
        }
    }
    for (int r = 0; r < NR; r++) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        for (int c = 0; c < CH; c++) _mm512_storeu_ps(o + r * os + 16 * c, _mm512_mul_ps(acc[r][c], inv));
        lse[r] = m[r] + logf(l[r]);
    }
}

/* Backward of rows t0 .. t0+NR-1 (all valid) with keys [jlo, min(jhi, t0+NR)) of 0..t0+NR-1 (jlo a
 * multiple of 4): adds into their dq rows and into dk, dv rows of those keys, row by row in time order
 * for each dk/dv row (as NR one-row calls would). Every key's p and ds are computed lane by lane, so
 * splitting the keys into ranges (ascending, one call each) gives the same bits as one call. */
CST_AVX512_INLINE void bwd_rows_avx512(float *dq, const float *dout, const float *out, const float *q,
                                       int64_t qs, float *dkb, float *dvb, const float *kb, const float *vb,
                                       const float *L, int64_t ks, int64_t t0, int64_t jlo, int64_t jhi,
                                       float scale, const int NR, const int CH) {
    float Dv[4] = {0, 0, 0, 0}, Lv[4] = {0, 0, 0, 0};
    for (int r = 0; r < NR; r++) {
        Dv[r] = lane_f32(dots_avx512(dout + r * qs, qs, out + r * qs, 1, CH), 0);
        Lv[r] = L[r];
    }
    const __m512 D = _mm512_castps128_ps512(_mm_loadu_ps(Dv)), Lr = _mm512_castps128_ps512(_mm_loadu_ps(Lv));
    const __m512 vscale = _mm512_set1_ps(scale);
    __m512 g[4][8];
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < CH; c++) g[r][c] = _mm512_loadu_ps(dq + r * qs + 16 * c);
    /* Keys in blocks of 4: first every (key, row) pair's p and ds (16 lanes: key-major, 4 rows each),
     * then the accumulations, so the exp is off each key's critical path. */
    const __m512 Lr4 = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3), Lr);
    const __m512 D4 = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3), D);
    const int64_t n = t0 + NR < jhi ? t0 + NR : jhi;
    for (int64_t j0 = jlo; j0 < n; j0 += 4) {
        const int nk = n - j0 < 4 ? (int)(n - j0) : 4;
        float sv[16] = {0}, dpv[16] = {0};
        __mmask16 valid = 0;
        for (int jj = 0; jj < nk; jj++) {
            const int64_t j = j0 + jj;
            _mm_storeu_ps(sv + 4 * jj, dots_avx512(q, qs, kb + j * ks, NR, CH));
            _mm_storeu_ps(dpv + 4 * jj, dots_avx512(dout, qs, vb + j * ks, NR, CH));
            const int first = j <= t0 ? 0 : (int)(j - t0); /* rows that see key j: r >= j - t0 */
            valid |= (__mmask16)((((1u << NR) - 1u) & ~((1u << first) - 1u)) << (4 * jj));
        }
        const __m512 p = _mm512_maskz_mov_ps(valid, exp_avx512(_mm512_fmsub_ps(_mm512_loadu_ps(sv), vscale, Lr4)));
        const __m512 ds = _mm512_maskz_mov_ps(
            valid, _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dpv), D4)), vscale));
        float pv[16], dsv[16];
        _mm512_storeu_ps(pv, p);
        _mm512_storeu_ps(dsv, ds);
        for (int jj = 0; jj < nk; jj++) {
            const int64_t j = j0 + jj;
            const float *kj = kb + j * ks;
            const int first = j <= t0 ? 0 : (int)(j - t0);
            __m512 kv[8], dk[8], dv[8];
            for (int c = 0; c < CH; c++) {
                kv[c] = _mm512_loadu_ps(kj + 16 * c);
                dk[c] = _mm512_loadu_ps(dkb + j * ks + 16 * c);
                dv[c] = _mm512_loadu_ps(dvb + j * ks + 16 * c);
            }
            for (int r = first; r < NR; r++) {
                const __m512 a = _mm512_set1_ps(dsv[4 * jj + r]), b = _mm512_set1_ps(pv[4 * jj + r]);
                for (int c = 0; c < CH; c++) {
                    g[r][c] = _mm512_fmadd_ps(a, kv[c], g[r][c]);
                    dk[c] = _mm512_fmadd_ps(a, _mm512_loadu_ps(q + r * qs + 16 * c), dk[c]);
                    dv[c] = _mm512_fmadd_ps(b, _mm512_loadu_ps(dout + r * qs + 16 * c), dv[c]);
                }
            }
            for (int c = 0; c < CH; c++) {
                _mm512_storeu_ps(dkb + j * ks + 16 * c, dk[c]);
                _mm512_storeu_ps(dvb + j * ks + 16 * c, dv[c]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < CH; c++) _mm512_storeu_ps(dq + r * qs + 16 * c, g[r][c]);
}

/* Out-of-line entry points (called from the per-path bodies only when the AVX-512 path is on). */
static CST_TARGET_AVX512 void fwd_rows_x512(float *o, int64_t os, float *lse, const float *q, const float *k0,
                                            const float *v0, int64_t ks, int64_t t0, int64_t HS, float scale,
                                            int NR) {
    if (HS == 64) {
        if (NR == 4) fwd_rows_avx512(o, os, lse, q, k0, v0, ks, t0, scale, 4, 4);
        else fwd_rows_avx512(o, os, lse, q, k0, v0, ks, t0, scale, 1, 4);
    } else {
        if (NR == 4) fwd_rows_avx512(o, os, lse, q, k0, v0, ks, t0, scale, 4, 8);
        else fwd_rows_avx512(o, os, lse, q, k0, v0, ks, t0, scale, 1, 8);
    }
}

static CST_TARGET_AVX512 void bwd_rows_x512(float *dq, const float *dout, const float *out, const float *q,
                                            int64_t qs, float *dkb, float *dvb, const float *kb, const float *vb,
                                            const float *L, int64_t ks, int64_t t0, int64_t jlo, int64_t jhi,
                                            int64_t HS, float scale, int NR) {
    if (HS == 64) {
        if (NR == 4) bwd_rows_avx512(dq, dout, out, q, qs, dkb, dvb, kb, vb, L, ks, t0, jlo, jhi, scale, 4, 4);
        else bwd_rows_avx512(dq, dout, out, q, qs, dkb, dvb, kb, vb, L, ks, t0, jlo, jhi, scale, 1, 4);
    } else {
        if (NR == 4) bwd_rows_avx512(dq, dout, out, q, qs, dkb, dvb, kb, vb, L, ks, t0, jlo, jhi, scale, 4, 8);
        else bwd_rows_avx512(dq, dout, out, q, qs, dkb, dvb, kb, vb, L, ks, t0, jlo, jhi, scale, 1, 8);
    }
}
#endif

/* Every q head of kv group (b, g): their dq rows and the group's dk, dv rows belong to this call
 * alone, so groups run in parallel without atomics, and the loop order below fixes every sum. */
CST_INLINE void bwd_group_body(float *dq, float *dk, float *dv, const float *dout, const float *out,
                               const float *lse, const float *q, const float *k, const float *v,
                               int64_t b, int64_t g, int64_t len, int64_t T, int64_t NH,
                               int64_t NKV, int64_t HS, float scale, const int x512) {
    const int64_t rep = NH / NKV;
    const int64_t qs = NH * HS, ks = NKV * HS; /* strides between time steps */
#ifdef __x86_64__
    const int fast = x512 && CST_AVX512_HEAD(HS);
#else
    (void)x512;
#endif
    const float *kb = k + (size_t)b * T * ks + g * HS, *vb = v + (size_t)b * T * ks + g * HS;
    float *dkb = dk + (size_t)b * T * ks + g * HS, *dvb = dv + (size_t)b * T * ks + g * HS;
    for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
        const float *L = lse + ((size_t)b * NH + h) * T;
#ifdef __x86_64__
        /* Keys in blocks of BKEYS, each block's k, v, dk and dv rows (32 KiB at HS 64) staying in L1
         * while every row that sees them passes: one pass over all keys per 4 rows streamed them from
         * L2 (4 x 40 KiB per row tile at T = 160). Per dk/dv row the rows still come in time order,
         * and per dq row the keys in key order, so the sums are the same as unblocked. */
        if (fast) {
            for (int64_t j0 = 0; j0 < len; j0 += BKEYS) {
                const int64_t j1 = j0 + BKEYS;
                int64_t t = j0; /* the first row that sees a key of the block, a tile's first (BKEYS % QT == 0) */
                for (; t + QT <= len; t += QT) {
                    const size_t row = ((size_t)b * T + t) * qs + h * HS;
                    bwd_rows_x512(dq + row, dout + row, out + row, q + row, qs, dkb, dvb, kb, vb, L + t, ks, t,
                                  j0, j1, HS, scale, QT);
                }
                for (; t < len; t++) {
                    const size_t row = ((size_t)b * T + t) * qs + h * HS;
                    bwd_rows_x512(dq + row, dout + row, out + row, q + row, qs, dkb, dvb, kb, vb, L + t, ks, t,
                                  j0, j1, HS, scale, 1);
                }
            }
            continue;
        }
#endif
        int64_t t = 0;
        for (; t + QT <= len; t += QT) {
            const size_t row = ((size_t)b * T + t) * qs + h * HS;
            bwd_tile(dq + row, dout + row, out + row, q + row, qs, dkb, dvb, kb, vb, L + t, ks, t,
                     HS, scale);
        }
        for (; t < len; t++) {
            const size_t row = ((size_t)b * T + t) * qs + h * HS;
            bwd_row(dq + row, dkb, dvb, dout + row, out + row, q + row, kb, vb, L[t], ks, t, HS,
                    scale);
        }
    }
}

typedef void (*fwd_tile_fn)(float *, float *, const float *, const float *, const float *,
                            const int32_t *, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            float);
typedef void (*bwd_group_fn)(float *, float *, float *, const float *, const float *, const float *,
                             const float *, const float *, const float *, int64_t, int64_t, int64_t,
                             int64_t, int64_t, int64_t, int64_t, float);

/* Work item i of the forward: QT consecutive rows of one (b, h). Full tiles of valid rows take
 * the tiled kernel; the tail before the padding goes row by row; padded rows are zeroed. */
CST_INLINE void fwd_item_body(float *out, float *lse, const float *q, const float *k, const float *v,
                              const int32_t *lengths, int64_t i, int64_t B, int64_t T, int64_t NH,
                              int64_t NKV, int64_t HS, float scale, const int x512) {
    const int64_t ntile = (T + QT - 1) / QT;
    const int64_t b = i / (NH * ntile), h = (i / ntile) % NH, t0 = (i % ntile) * QT;
    const int64_t len = lengths ? lengths[b] : T;
    const int64_t rep = NH / NKV, qs = NH * HS, ks = NKV * HS;
    const size_t kv0 = (size_t)b * T * ks + (h / rep) * HS;
    float *L = lse + ((size_t)b * NH + h) * T;
    const size_t row0 = ((size_t)b * T + t0) * qs + h * HS;
#ifdef __x86_64__
    const int fast = x512 && CST_AVX512_HEAD(HS);
#else
    const int fast = 0;
    (void)x512;
#endif
    if (t0 + QT <= len) {
#ifdef __x86_64__
        if (fast) {
            fwd_rows_x512(out + row0, qs, L + t0, q + row0, k + kv0, v + kv0, ks, t0, HS, scale, QT);
            return;
        }
#endif
        fwd_tile_body(out + row0, qs, L + t0, q + row0, k + kv0, v + kv0, ks, t0, HS, scale);
        return;
    }
    for (int64_t t = t0; t < t0 + QT && t < T; t++) {
        float *o = out + row0 + (t - t0) * qs;
        if (t >= len) {
            for (int64_t c = 0; c < HS; c++) o[c] = 0.0f;
            L[t] = 0.0f;
        } else {
#ifdef __x86_64__
            if (fast) {
                fwd_rows_x512(o, qs, L + t, q + row0 + (t - t0) * qs, k + kv0, v + kv0, ks, t, HS, scale, 1);
                continue;
            }
#endif
            L[t] = fwd_row_body(o, q + row0 + (t - t0) * qs, k + kv0, v + kv0, ks, t + 1, HS, scale);
        }
    }
}

/* One copy of the row and group kernels per SIMD path: the bodies are inlined into functions
 * compiled for that target, so wider vectors are used without hand-written intrinsics. */
#define CST_ATTN_PATH(suffix, attr, x512)                                                        \
    static attr void fwd_item_##suffix(float *out, float *lse, const float *q, const float *k,   \
                                       const float *v, const int32_t *lengths, int64_t i,        \
                                       int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS, \
                                       float scale) {                                            \
        fwd_item_body(out, lse, q, k, v, lengths, i, B, T, NH, NKV, HS, scale, x512);            \
    }                                                                                            \
    static attr void bwd_group_##suffix(float *dq, float *dk, float *dv, const float *dout,      \
                                        const float *out, const float *lse, const float *q,      \
                                        const float *k, const float *v, int64_t b, int64_t g,    \
                                        int64_t len, int64_t T, int64_t NH, int64_t NKV,         \
                                        int64_t HS, float scale) {                               \
        bwd_group_body(dq, dk, dv, dout, out, lse, q, k, v, b, g, len, T, NH, NKV, HS, scale, x512); \
    }

CST_ATTN_PATH(scalar, , 0)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
CST_ATTN_PATH(avx2, __attribute__((target("avx2,fma"))), 0)
CST_ATTN_PATH(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), 1)
#endif

void cst_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                           const int32_t *lengths, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                           int64_t HS) {
    const fwd_tile_fn item = CST_SIMD_PICK(fwd_item);
    const float scale = 1.0f / sqrtf((float)HS);
    const int64_t n = B * NH * ((T + QT - 1) / QT);
    /* Tiles are independent; dynamic chunks even out the causal triangle's uneven tile costs. */
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t i = 0; i < n; i++) item(out, lse, q, k, v, lengths, i, B, T, NH, NKV, HS, scale);
}

void cst_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                            const float *lse, const float *q, const float *k, const float *v,
                            const int32_t *lengths, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                            int64_t HS) {
    const bwd_group_fn group = CST_SIMD_PICK(bwd_group);
    const float scale = 1.0f / sqrtf((float)HS);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < B * NKV; i++) {
        const int64_t b = i / NKV, g = i % NKV;
        const int64_t len = lengths ? lengths[b] : T;
        group(dq, dk, dv, dout, out, lse, q, k, v, b, g, len, T, NH, NKV, HS, scale);
    }
}
