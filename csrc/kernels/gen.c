/* gen.c: the cached forward for generation (see gen.h): new tokens of B sequences are packed into
 * one row block so each weight matrix is streamed once per step for the whole batch, whatever mix of
 * prefill and decode the step holds. Not a sampler; no backward. */
#include "bf16.h"
#include "gemm.h"
#include "gen.h"
#include "matmul.h"
#include "ops.h"
#include "qdot.h"
#include "quant.h"
#include "simd.h"
#include "vexp.h"
#include "avx512.h"
#include <math.h>
#include <string.h>

static inline __attribute__((always_inline)) float dot_hs(const float *a, const float *b, int64_t n) {
    /* Fixed 8-way partial sums (as gemm.c's scalar dot products): vectorisable without reassociation. */
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Attention of the n new tokens of one sequence for the `group` query heads that share one KV head,
 * over the cached positions 0 .. t0+i (causal): each cached key and value row is loaded once for all
 * of them. q, att: row i at i*qs, head g at g*HS. sc: row i at i*ss, head g at g*maxT (probabilities
 * left there). k, v: position s at s*kvs. */
static inline __attribute__((always_inline)) void attend_body(float *att, float *sc, const float *q,
    const float *k, const float *v, int64_t t0, int64_t n, int64_t group, int64_t HS, int64_t qs,
    int64_t ss, int64_t kvs, int64_t maxT, float scale) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t T = t0 + i + 1;
        const float *q0 = q + i * qs;
        float *sc0 = sc + i * ss;
        for (int64_t s = 0; s < T; s++) {
            const float *kr = k + s * kvs;
            for (int64_t g = 0; g < group; g++) sc0[g * maxT + s] = dot_hs(q0 + g * HS, kr, HS) * scale;
        }
        for (int64_t g = 0; g < group; g++) {
            float *p = sc0 + g * maxT, mx = -INFINITY;
            for (int64_t s = 0; s < T; s++) mx = p[s] > mx ? p[s] : mx;
            for (int64_t s = 0; s < T; s++) p[s] = exp_f32(p[s] - mx);
            double sum = 0.0; /* softmax denominator in double: up to maxT terms */
            for (int64_t s = 0; s < T; s++) sum += p[s];
            const float inv = (float)(1.0 / sum);
            for (int64_t s = 0; s < T; s++) p[s] *= inv;
        }
        float *o0 = att + i * qs;
        for (int64_t d = 0; d < group * HS; d++) o0[d] = 0.0f;
        for (int64_t s = 0; s < T; s++) {
            const float *vr = v + s * kvs;
            for (int64_t g = 0; g < group; g++) {
                const float pr = sc0[g * maxT + s];
                float *o = o0 + g * HS;
                for (int64_t d = 0; d < HS; d++) o[d] += pr * vr[d];
            }
        }
    }
}

typedef void (*attend_fn)(float *, float *, const float *, const float *, const float *, int64_t, int64_t,
                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float);
#define ATTEND_VARIANT(NAME, TGT)                                                                       \
    TGT static void NAME(float *att, float *sc, const float *q, const float *k, const float *v, int64_t t0, \
                         int64_t n, int64_t group, int64_t HS, int64_t qs, int64_t ss, int64_t kvs,     \
                         int64_t maxT, float scale) {                                                   \
        attend_body(att, sc, q, k, v, t0, n, group, HS, qs, ss, kvs, maxT, scale);                      \
    }
ATTEND_VARIANT(attend_scalar, )
#if defined(__x86_64__)
ATTEND_VARIANT(attend_avx2, CST_TARGET_AVX2)
ATTEND_VARIANT(attend_generic_avx512, CST_TARGET_AVX512)

/* ---- AVX-512 attention for head sizes 64 and 128 ----
 * Scores come 16 positions at a time: each position's q.k is a 16-lane vector of partial products
 * (HS/16 FMAs), and one transpose-and-add tree turns the 16 vectors into the 16 scores, instead of a
 * horizontal sum per dot product. The softmax is not normalised in place: the output is scaled by
 * 1/sum at the end. FMA contraction makes its sums differ from the other paths in the last bits. */

/* One query row of one head over positions 0..T-1: o = softmax(scale q.K^T) V, CH = HS / 16. p: T floats
 * of scratch (the unnormalised probabilities are left there). */
static inline __attribute__((always_inline)) CST_TARGET_AVX512 void attend_row_avx512(
    float *o, float *p, const float *q, const float *k, const float *v, int64_t T, int64_t kvs, float scale,
    const int CH) {
    __m512 qv[8];
    for (int c = 0; c < CH; c++) qv[c] = _mm512_loadu_ps(q + 16 * c);
    const __m512 vscale = _mm512_set1_ps(scale);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t s0 = 0; s0 < T; s0 += 16) {
        __m512 part[16];
        for (int j = 0; j < 16; j++) {
            const int64_t s = s0 + j < T ? s0 + j : T - 1; /* past the end: a repeat, its lane unused */
            const float *kr = k + s * kvs;
            __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr));
            for (int c = 1; c < CH; c++) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kr + 16 * c), acc);
            part[4 * (j % 4) + j / 4] = acc;
        }
        const __mmask16 m = tail_mask(T - s0);
        const __m512 sc = _mm512_mul_ps(hsum16_avx512(part), vscale);
        _mm512_mask_storeu_ps(p + s0, m, sc);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, sc);
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512d sum0 = _mm512_setzero_pd(), sum1 = _mm512_setzero_pd(); /* denominator in double */
    for (int64_t s0 = 0; s0 < T; s0 += 16) {
        const __mmask16 m = tail_mask(T - s0);
        const __m512 e = _mm512_maskz_mov_ps(m, exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + s0), mx)));
        _mm512_mask_storeu_ps(p + s0, m, e);
        sum0 = _mm512_add_pd(sum0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        sum1 = _mm512_add_pd(sum1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    }
    const __m512 inv = _mm512_set1_ps((float)(1.0 / _mm512_reduce_add_pd(_mm512_add_pd(sum0, sum1))));
    /* Two accumulator sets (even and odd positions) keep 2 * CH FMAs in flight. */
    __m512 a0[8], a1[8];
    for (int c = 0; c < CH; c++) a0[c] = a1[c] = _mm512_setzero_ps();
    int64_t s = 0;
    for (; s + 2 <= T; s += 2) {
        const __m512 p0 = _mm512_set1_ps(p[s]), p1 = _mm512_set1_ps(p[s + 1]);
        const float *v0 = v + s * kvs, *v1 = v0 + kvs;
        for (int c = 0; c < CH; c++) {
            a0[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * c), a0[c]);
            a1[c] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v1 + 16 * c), a1[c]);
        }
    }
    if (s < T) {
        const __m512 p0 = _mm512_set1_ps(p[s]);
        for (int c = 0; c < CH; c++) a0[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v + s * kvs + 16 * c), a0[c]);
    }
    for (int c = 0; c < CH; c++) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(_mm512_add_ps(a0[c], a1[c]), inv));
}

/* attend_body's contract. attend_body is the same arithmetic on the scalar and AVX2 paths (no FMA
 * contraction under -std=c11; exp_f32 is exact-portable); AVX-512 has its own kernel for head sizes 64
 * and 128, other sizes take attend_body. Heads are taken one at a time: the block of cached rows they
 * share stays in L1/L2 between them. */
CST_TARGET_AVX512 static void attend_avx512(float *att, float *sc, const float *q, const float *k, const float *v,
                                            int64_t t0, int64_t n, int64_t group, int64_t HS, int64_t qs,
                                            int64_t ss, int64_t kvs, int64_t maxT, float scale) {
    if (!CST_AVX512_HEAD(HS)) {
        attend_generic_avx512(att, sc, q, k, v, t0, n, group, HS, qs, ss, kvs, maxT, scale);
        return;
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t g = 0; g < group; g++) {
            float *o = att + i * qs + g * HS, *p = sc + i * ss + g * maxT;
            const float *qg = q + i * qs + g * HS;
            if (HS == 64) attend_row_avx512(o, p, qg, k, v, t0 + i + 1, kvs, scale, 4);
            else attend_row_avx512(o, p, qg, k, v, t0 + i + 1, kvs, scale, 8);
        }
}
#endif

/* The widest input of any product, and the floats per row of its converted inputs: int8 blocks
 * (qdot.h: K int8 and two scales per 32 values) and bf16 values (K uint16, for bf16 weights). */
static int64_t qin_kmax(const cst_gen_config *cfg) {
    const int64_t K = cfg->C > cfg->NH * cfg->HS ? cfg->C : cfg->NH * cfg->HS;
    return K > cfg->F ? K : cfg->F;
}
static int64_t qin_floats(const cst_gen_config *cfg) {
    return (qin_kmax(cfg) + 3) / 4 + 2 * (qin_kmax(cfg) / CST_Q8_BLOCK + 1) + (qin_kmax(cfg) + 1) / 2;
}

int64_t cst_gen_scratch_size(const cst_gen_config *cfg, int64_t B, int64_t S, int64_t maxT) {
    const int64_t N = B * S, C = cfg->C, F = cfg->F, HS = cfg->HS;
    const int64_t QKV = (cfg->NH + 2 * cfg->NKV) * HS;
    return N * (2 * C + 2 * QKV + cfg->NH * HS + 3 * F + HS + 1 + cfg->NH * maxT) + B * (C + cfg->V) +
           N * qin_floats(cfg);
}

/* The matrices of one layer as packed, (rows, cols) of y = x W^T: q|k|v fused (they are adjacent in
 * the flat parameters), o, gate|up, down. */
enum { GEN_NW = 4 };
static void layer_shapes(const cst_gen_config *cfg, int64_t rows[GEN_NW], int64_t cols[GEN_NW]) {
    const int64_t C = cfg->C, HS = cfg->HS, QD = cfg->NH * HS, KVD = cfg->NKV * HS, F = cfg->F;
    const int64_t r[GEN_NW] = {QD + 2 * KVD, C, 2 * F, C}, c[GEN_NW] = {C, QD, C, F};
    for (int i = 0; i < GEN_NW; i++) rows[i] = r[i], cols[i] = c[i];
}

int64_t cst_gen_packed_size(const cst_gen_config *cfg) {
    int64_t rows[GEN_NW], cols[GEN_NW], layer = 0;
    layer_shapes(cfg, rows, cols);
    for (int i = 0; i < GEN_NW; i++) layer += cst_gemm_packed_size(rows[i], cols[i]);
    return cfg->L * layer + cst_gemm_packed_size(cfg->V, cfg->C);
}

/* The layout role of each of the GEN_NW matrices. */
static const int gen_matrix_role[GEN_NW] = {CST_GEN_QKV, CST_GEN_O, CST_GEN_GU, CST_GEN_DOWN};

/* Packs q|k|v, o, gate|up and down of every layer, then the LM head, in that order. */
void cst_gen_pack(float *dst, const float *params, const cst_gen_config *cfg, cst_gen_layout layout) {
    int64_t rows[GEN_NW], cols[GEN_NW];
    layer_shapes(cfg, rows, cols);
    for (int64_t l = 0; l < cfg->L; l++)
        for (int i = 0; i < GEN_NW; i++) {
            cst_gemm_pack_nt(dst, params + layout[l * CST_GEN_NROLES + gen_matrix_role[i]], rows[i], cols[i]);
            dst += cst_gemm_packed_size(rows[i], cols[i]);
        }
    cst_gemm_pack_nt(dst, params + layout[cfg->L * CST_GEN_NROLES + CST_GEN_HEAD], cfg->V, cfg->C);
}

/* Up to this many rows a product reads the packed weights (16-row microkernel, no packing of B); more
 * rows (a long prefill) amortise packing B and run faster through cst_gemm's 8 x 48 kernel. */
#define GEN_PACKED_MAX_ROWS 64

/* One weight matrix of a product: float32 (w) or GGUF blocks (q[0], of ggml type type[0]), or parts
 * of rows[p] rows each in blocks of their own types (nq > 1; see cst_gen_quant). */
typedef struct {
    const float *w;
    const uint8_t *q[CST_GEN_QPARTS];
    int type[CST_GEN_QPARTS], nq;
    int64_t rows[CST_GEN_QPARTS];
} gen_mat;

/* Layout cell (row l, role r): the matrix from the quantised blocks when quant has it, else params. */
static gen_mat gen_matrix(const float *params, cst_gen_layout layout, const cst_gen_quant *quant,
                          const cst_gen_config *cfg, int64_t l, int r) {
    const int64_t i = l * CST_GEN_NROLES + r, *off = quant ? quant->offsets + i * CST_GEN_QPARTS : NULL;
    gen_mat m = {NULL, {NULL}, {0}, 0, {0}};
    if (!off || off[0] < 0) {
        m.w = params + layout[i];
        return m;
    }
    const int64_t KVD = cfg->NKV * cfg->HS;
    const int64_t qkv[CST_GEN_QPARTS] = {cfg->NH * cfg->HS, KVD, KVD}, gu[CST_GEN_QPARTS] = {cfg->F, cfg->F, 0};
    m.nq = off[1] < 0 ? 1 : r == CST_GEN_QKV ? 3 : 2;
    for (int p = 0; p < m.nq; p++) {
        m.q[p] = quant->raw + off[p];
        m.type[p] = (int)quant->types[i * CST_GEN_QPARTS + p];
        m.rows[p] = r == CST_GEN_QKV ? qkv[p] : gu[p]; /* read only when nq > 1 */
    }
    return m;
}

/* Scratch for a quantised product's N input rows of up to K values: int8 blocks, and bf16 values
 * for BF16 weights. */
typedef struct {
    int8_t *q;
    float *d, *s;
    uint16_t *b;
} gen_qin;

/* y = x W^T: from the GGUF blocks (inputs quantised once per product: int8 blocks for the block types,
 * bf16 for BF16 weights), from the packed copy when there is one and N is small, else from the weight
 * itself; *wp always moves past this matrix's packed copy. */
static void linear(float *out, const float *x, gen_mat m, const float **wp, const gen_qin *qin, int64_t N,
                   int64_t C, int64_t OC, int accumulate) {
    if (m.nq) {
        int q8 = 0, bf = 0;
        for (int p = 0; p < m.nq; p++) {
            if (m.type[p] == CST_GGML_BF16) bf = 1;
            else q8 = 1;
        }
        if (q8) cst_q8_quantize(qin->q, qin->d, qin->s, x, N, C);
        if (bf) cst_bf16_from_f32(qin->b, x, N * C);
        for (int p = 0, o = 0; p < m.nq; o += (int)m.rows[p], p++) {
            const int64_t rows = m.nq > 1 ? m.rows[p] : OC;
            if (m.type[p] == CST_GGML_BF16)
                cst_gemv_bf16_nt(out + o, OC, qin->b, (const uint16_t *)(const void *)m.q[p], N, C, rows, accumulate);
            else cst_qmatvec(out + o, m.q[p], m.type[p], qin->q, qin->d, qin->s, N, C, rows, OC, accumulate);
        }
    } else if (*wp && N <= GEN_PACKED_MAX_ROWS) cst_gemm_packed_nt(out, x, *wp, N, C, OC, accumulate);
    else cst_matmul_forward(out, x, m.w, N, C, OC, accumulate);
    if (*wp) *wp += cst_gemm_packed_size(OC, C);
}

void cst_gen_forward(float *logits, float *kcache, float *vcache, float *scratch, const float *params,
                     const float *packed, const int32_t *tokens, const int32_t *start_pos,
                     const int32_t *n_new, const float *rope_cos, const float *rope_sin,
                     const cst_gen_config *cfg, cst_gen_layout layout, int64_t B, int64_t S, int64_t maxT,
                     const cst_gen_quant *quant) {
    const float *wp = packed;
    const int64_t V = cfg->V, C = cfg->C, L = cfg->L, NH = cfg->NH, NKV = cfg->NKV, F = cfg->F;
    const int64_t HS = cfg->HS, half = HS / 2, QD = NH * HS, KVD = NKV * HS, group = NH / NKV;
    const attend_fn attend = CST_SIMD_PICK(attend);

    /* Active rows, packed: sequence b's new tokens are rows off .. off+n_new[b]-1. */
    int64_t N = 0, nact = 0;
    for (int64_t b = 0; b < B; b++) {
        N += n_new[b];
        nact += n_new[b] > 0;
    }
    if (N == 0) return;

    /* Scratch carve-up; sized for B*S rows, used for N <= B*S. */
    const int64_t R = B * S;
    float *x = scratch;                  /* (N,C) residual stream */
    float *xn = x + R * C;               /* (N,C) normed input of a block */
    float *q = xn + R * C;               /* (N,NH*HS) */
    float *k = q + R * QD;               /* (N,NKV*HS) */
    float *v = k + R * KVD;              /* (N,NKV*HS) */
    float *att = v + R * KVD;            /* (N,NH*HS) attention output */
    float *gu = att + R * QD;            /* (N,2F) fused gate|up */
    float *hb = gu + R * 2 * F;          /* (N,F) swiglu output */
    float *rc = hb + R * F;              /* (N,HS/2) cos of each row's position */
    float *rs = rc + R * half;           /* (N,HS/2) sin */
    float *rstd = rs + R * half;         /* (N) rmsnorm's by-product, unused here */
    float *scores = rstd + R;            /* (N,NH,maxT) attention probabilities */
    float *qkv = scores + R * NH * maxT; /* (N,NH*HS+2*NKV*HS) fused q|k|v */
    float *lastx = qkv + R * (QD + 2 * KVD); /* (nact,C) last new token of each active sequence */
    float *lastlog = lastx + B * C;      /* (nact,V) their logits */
    float *qin_base = lastlog + B * V;   /* (N, qin_floats) int8 input blocks of quantised products */

    /* Embeddings, and the rotary table rows of each row's position: gathered per row, the packed
     * rows look like one sequence at positions 0..N-1 to cst_rope_forward. */
    const int64_t kmax = qin_kmax(cfg);
    gen_qin qin;
    qin.q = (int8_t *)qin_base;
    qin.d = qin_base + R * ((kmax + 3) / 4);
    qin.s = qin.d + R * (kmax / CST_Q8_BLOCK + 1);
    qin.b = (uint16_t *)(void *)(qin.s + R * (kmax / CST_Q8_BLOCK + 1));
    const gen_mat embed = gen_matrix(params, layout, quant, cfg, L, CST_GEN_EMBED);
    int64_t emb_blocks = 0, emb_row_bytes = 0;
    if (embed.nq) {
        int64_t be, bb;
        cst_quant_block_info(embed.type[0], &be, &bb);
        emb_blocks = C / be, emb_row_bytes = emb_blocks * bb;
    }
    for (int64_t b = 0, off = 0; b < B; off += n_new[b], b++) {
        for (int64_t i = 0; i < n_new[b]; i++) {
            const int64_t r = off + i, pos = start_pos[b] + i, tok = tokens[b * S + i];
            if (embed.nq) cst_dequantize(x + r * C, embed.q[0] + tok * emb_row_bytes, emb_blocks, embed.type[0]);
            else memcpy(x + r * C, embed.w + tok * C, (size_t)C * sizeof(float));
            memcpy(rc + r * half, rope_cos + pos * half, (size_t)half * sizeof(float));
            memcpy(rs + r * half, rope_sin + pos * half, (size_t)half * sizeof(float));
        }
    }

    const float scale = (float)(1.0 / sqrt((double)HS));
    for (int64_t l = 0; l < L; l++) {
        const int64_t *at = layout + l * CST_GEN_NROLES;
        const float *w_in = params + at[CST_GEN_ATTN_NORM], *w_post = params + at[CST_GEN_FFN_NORM];
        const float *b_qkv = at[CST_GEN_QKV_BIAS] < 0 ? NULL : params + at[CST_GEN_QKV_BIAS];
        const gen_mat w_qkv = gen_matrix(params, layout, quant, cfg, l, CST_GEN_QKV);
        const gen_mat w_o = gen_matrix(params, layout, quant, cfg, l, CST_GEN_O);
        const gen_mat w_gu = gen_matrix(params, layout, quant, cfg, l, CST_GEN_GU);
        const gen_mat w_down = gen_matrix(params, layout, quant, cfg, l, CST_GEN_DOWN);
        float *kl = kcache + l * B * maxT * KVD, *vl = vcache + l * B * maxT * KVD;

        cst_rmsnorm_forward(xn, rstd, x, w_in, N, C, cfg->norm_eps);
        /* q|k|v as one product, then split: RoPE and the cache copy want q, k and v contiguous. */
        linear(qkv, xn, w_qkv, &wp, &qin, N, C, QD + 2 * KVD, 0);
        for (int64_t r = 0; r < N; r++) {
            float *row = qkv + r * (QD + 2 * KVD);
            if (b_qkv)
                for (int64_t j = 0; j < QD + 2 * KVD; j++) row[j] += b_qkv[j];
            memcpy(q + r * QD, row, (size_t)QD * sizeof(float));
            memcpy(k + r * KVD, row + QD, (size_t)KVD * sizeof(float));
            memcpy(v + r * KVD, row + QD + KVD, (size_t)KVD * sizeof(float));
        }
        cst_rope_forward(q, rc, rs, 1, N, NH, HS, 0);
        cst_rope_forward(k, rc, rs, 1, N, NKV, HS, 0);

        /* Every new key/value goes into the cache before any query of its sequence reads it. */
        for (int64_t b = 0, off = 0; b < B; off += n_new[b], b++) {
            const int64_t t0 = start_pos[b], n = n_new[b];
            memcpy(kl + (b * maxT + t0) * KVD, k + off * KVD, (size_t)(n * KVD) * sizeof(float));
            memcpy(vl + (b * maxT + t0) * KVD, v + off * KVD, (size_t)(n * KVD) * sizeof(float));
        }

        /* Causal attention over the cache, one (sequence, KV head) per task. Dynamic schedule because
         * tasks differ in length; each output is still reduced by one thread in a fixed order. */
#pragma omp parallel for schedule(dynamic, 1)
        for (int64_t bk = 0; bk < B * NKV; bk++) {
            const int64_t b = bk / NKV, kh = bk % NKV;
            if (n_new[b] == 0) continue;
            int64_t off = 0;
            for (int64_t bb = 0; bb < b; bb++) off += n_new[bb];
            attend(att + off * QD + kh * group * HS, scores + off * NH * maxT + kh * group * maxT,
                   q + off * QD + kh * group * HS, kl + b * maxT * KVD + kh * HS, vl + b * maxT * KVD + kh * HS,
                   start_pos[b], n_new[b], group, HS, QD, NH * maxT, KVD, maxT, scale);
        }

        linear(x, att, w_o, &wp, &qin, N, QD, C, 1); /* residual add */
        cst_rmsnorm_forward(xn, rstd, x, w_post, N, C, cfg->norm_eps);
        linear(gu, xn, w_gu, &wp, &qin, N, C, 2 * F, 0);
        cst_swiglu_forward(hb, gu, N, F);
        linear(x, hb, w_down, &wp, &qin, N, F, C, 1); /* residual add */
    }

    /* LM head on the last new token of each active sequence only. */
    const float *w_norm = params + layout[L * CST_GEN_NROLES + CST_GEN_NORM];
    const gen_mat w_head = gen_matrix(params, layout, quant, cfg, L, CST_GEN_HEAD);
    for (int64_t b = 0, off = 0, j = 0; b < B; off += n_new[b], b++)
        if (n_new[b] > 0) memcpy(lastx + (j++) * C, x + (off + n_new[b] - 1) * C, (size_t)C * sizeof(float));
    cst_rmsnorm_forward(xn, rstd, lastx, w_norm, nact, C, cfg->norm_eps);
    linear(lastlog, xn, w_head, &wp, &qin, nact, C, V, 0);
    for (int64_t b = 0, j = 0; b < B; b++)
        if (n_new[b] > 0) memcpy(logits + b * V, lastlog + (j++) * V, (size_t)V * sizeof(float));
}
