/* vexp.h: a vectorisable float exp shared by the kernels (ops.c's softmax, SiLU and loss; gen.c's
 * decode attention). Header-only, static inline. */
#ifndef CST_VEXP_H
#define CST_VEXP_H
#include <math.h>
#include <stdint.h>

/* ---- a vectorisable exp ----
 * libm's expf sets errno, so compilers will not vectorise loops that call it without -ffast-math.
 * This one is branch-free (Cephes' expf polynomial, about 1 ulp), so the same C loop compiles to
 * SSE2, AVX2 or AVX-512 code with identical results (no FMA contraction under -std=c11). Inputs
 * above 88.376 give +inf (the true overflow is at 88.72) and below -87.34 give 0 (no denormals). */

/* c ? a : b as a bit mask. A plain ?: lets GCC sink the arithmetic around it into branches, which
 * under the default -ftrapping-math it then refuses to if-convert, so the loop stays scalar. */
static inline float select_f32(int c, float a, float b) {
    union { float f; int32_t i; } ua, ub, r;
    ua.f = a;
    ub.f = b;
    const int32_t m = -(int32_t)(c != 0);
    r.i = (ua.i & m) | (ub.i & ~m);
    return r.f;
}

static inline float exp_f32(float x) {
    const float hi = 88.3762626647949f, lo = -87.3365478515625f;
    float xc = select_f32(x < lo, lo, x);
    xc = select_f32(xc > hi, hi, xc);
    /* n = round(x / ln2) by the 1.5 * 2^23 trick: the integer lands in the low mantissa bits. */
    union { float f; int32_t i; } t, magic, s;
    magic.f = 12582912.0f;
    t.f = xc * 1.44269504088896341f + magic.f;
    const float n = t.f - magic.f;
    const int32_t ni = t.i - magic.i;
    float r = xc - n * 0.693359375f; /* ln2 split in two so that n * ln2_hi is exact */
    r = r - n * -2.12194440e-4f;
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    s.i = (ni + 127) * (1 << 23);
    float y = p * s.f;
    y = select_f32(x < lo, 0.0f, y);
    y = select_f32(x > hi, INFINITY, y);
    return select_f32(x != x, x, y);
}

#endif
