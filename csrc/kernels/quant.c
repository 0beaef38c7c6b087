/* quant.c: decodes ggml/GGUF tensor blocks (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
 * Q6_K) to float32, one OpenMP iteration per block: training dequantises once at load time (the
 * products that read Q8_0/Q4_0/Q4_1 blocks directly for generation are in qdot.c). Arithmetic mirrors gguf-py's reference (same products, same
 * order, no fused multiply-add) so results are bit-identical to gguf.quants.dequantize. */
#include "quant.h"
#include "bf16.h"
#include <string.h>

float cst_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf / NaN keep their payload */
    } else if (exp) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man) {
        /* Subnormal half: normalise the mantissa; every half subnormal is a float32 normal. */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Little-endian loads that need no alignment: GGUF blocks sit at arbitrary byte offsets. */
static inline uint16_t ld16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t ld32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline float ldh(const uint8_t *p) { return cst_f16_to_f32(ld16(p)); }

int cst_quant_block_info(int type, int64_t *block_elems, int64_t *block_bytes) {
    int64_t e, b;
    switch (type) {
    case CST_GGML_F32: e = 1, b = 4; break;
    case CST_GGML_F16: e = 1, b = 2; break;
    case CST_GGML_BF16: e = 1, b = 2; break;
    case CST_GGML_Q4_0: e = 32, b = 18; break;
    case CST_GGML_Q4_1: e = 32, b = 20; break;
    case CST_GGML_Q5_0: e = 32, b = 22; break;
    case CST_GGML_Q5_1: e = 32, b = 24; break;
    case CST_GGML_Q8_0: e = 32, b = 34; break;
    case CST_GGML_Q4_K: e = 256, b = 144; break;
    case CST_GGML_Q5_K: e = 256, b = 176; break;
    case CST_GGML_Q6_K: e = 256, b = 210; break;
    default: return 0;
    }
    *block_elems = e;
    *block_bytes = b;
    return 1;
}

const char *cst_quant_type_name(int type) {
    switch (type) {
    case CST_GGML_F32: return "F32";
    case CST_GGML_F16: return "F16";
    case CST_GGML_BF16: return "BF16";
    case CST_GGML_Q4_0: return "Q4_0";
    case CST_GGML_Q4_1: return "Q4_1";
    case CST_GGML_Q5_0: return "Q5_0";
    case CST_GGML_Q5_1: return "Q5_1";
    case CST_GGML_Q8_0: return "Q8_0";
    case CST_GGML_Q4_K: return "Q4_K";
    case CST_GGML_Q5_K: return "Q5_K";
    case CST_GGML_Q6_K: return "Q6_K";
    default: return NULL;
    }
}

static void block_q4_0(float *y, const uint8_t *b) {
    const float d = ldh(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((int)(qs[j] & 0xF) - 8);
        y[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
    }
}

static void block_q4_1(float *y, const uint8_t *b) {
    const float d = ldh(b), m = ldh(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)(qs[j] & 0xF) + m;
        y[j + 16] = d * (float)(qs[j] >> 4) + m;
    }
}

static void block_q5_0(float *y, const uint8_t *b) {
    const float d = ldh(b);
    const uint32_t qh = ld32(b + 2);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        int x0 = (int)((qs[j] & 0xF) | (((qh >> j) & 1u) << 4)) - 16;
        int x1 = (int)((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - 16;
        y[j] = d * (float)x0;
        y[j + 16] = d * (float)x1;
    }
}

static void block_q5_1(float *y, const uint8_t *b) {
    const float d = ldh(b), m = ldh(b + 2);
    const uint32_t qh = ld32(b + 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        unsigned x0 = (qs[j] & 0xF) | (((qh >> j) & 1u) << 4);
        unsigned x1 = (qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4);
        y[j] = d * (float)x0 + m;
        y[j + 16] = d * (float)x1 + m;
    }
}

static void block_q8_0(float *y, const uint8_t *b) {
    const float d = ldh(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = (float)qs[j] * d;
}

static void block_q4_k(float *y, const uint8_t *b) {
    const float d = ldh(b), dmin = ldh(b + 2);
    const uint8_t *scales = b + 4, *q = b + 16;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
        uint8_t sc, m;
        cst_k4_scale_min(is, scales, &sc, &m);
        const float d1 = d * (float)sc, m1 = dmin * (float)m;
        cst_k4_scale_min(is + 1, scales, &sc, &m);
        const float d2 = d * (float)sc, m2 = dmin * (float)m;
        for (int l = 0; l < 32; l++) y[j + l] = d1 * (float)(q[l] & 0xF) - m1;
        for (int l = 0; l < 32; l++) y[j + 32 + l] = d2 * (float)(q[l] >> 4) - m2;
    }
}

static void block_q5_k(float *y, const uint8_t *b) {
    const float d = ldh(b), dmin = ldh(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *ql = b + 48;
    unsigned u1 = 1, u2 = 2;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
        uint8_t sc, m;
        cst_k4_scale_min(is, scales, &sc, &m);
        const float d1 = d * (float)sc, m1 = dmin * (float)m;
        cst_k4_scale_min(is + 1, scales, &sc, &m);
        const float d2 = d * (float)sc, m2 = dmin * (float)m;
        for (int l = 0; l < 32; l++)
            y[j + l] = d1 * (float)((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - m1;
        for (int l = 0; l < 32; l++)
            y[j + 32 + l] = d2 * (float)((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
    }
}

static void block_q6_k(float *y, const uint8_t *b) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = ldh(b + 208);
    for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8) {
        for (int l = 0; l < 32; l++) {
            const int is = l / 16;
            const int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            /* (d * scale) first, then * q: the reference's order. */
            y[n + l] = (d * (float)sc[is + 0]) * (float)q1;
            y[n + l + 32] = (d * (float)sc[is + 2]) * (float)q2;
            y[n + l + 64] = (d * (float)sc[is + 4]) * (float)q3;
            y[n + l + 96] = (d * (float)sc[is + 6]) * (float)q4;
        }
    }
}

void cst_dequantize(float *out, const uint8_t *raw, int64_t n_blocks, int type) {
    int64_t be = 0, bb = 0;
    if (!cst_quant_block_info(type, &be, &bb)) return;
    if (type == CST_GGML_F32) {
        memcpy(out, raw, (size_t)n_blocks * 4);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n_blocks; i++) {
        float *y = out + (size_t)i * (size_t)be;
        const uint8_t *b = raw + (size_t)i * (size_t)bb;
        switch (type) {
        case CST_GGML_F16: y[0] = ldh(b); break;
        case CST_GGML_BF16: y[0] = cst_bf16_to_f32(ld16(b)); break;
        case CST_GGML_Q4_0: block_q4_0(y, b); break;
        case CST_GGML_Q4_1: block_q4_1(y, b); break;
        case CST_GGML_Q5_0: block_q5_0(y, b); break;
        case CST_GGML_Q5_1: block_q5_1(y, b); break;
        case CST_GGML_Q8_0: block_q8_0(y, b); break;
        case CST_GGML_Q4_K: block_q4_k(y, b); break;
        case CST_GGML_Q5_K: block_q5_k(y, b); break;
        case CST_GGML_Q6_K: block_q6_k(y, b); break;
        default: break;
        }
    }
}
