/* simd.c: CPU feature detection and the process-wide SIMD path. Not a kernel. */
#include "simd.h"
#include <string.h>

static cst_simd_path current = CST_SIMD_SCALAR;

cst_simd_path cst_simd_detect(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma"))
        return CST_SIMD_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CST_SIMD_AVX2;
#endif
    return CST_SIMD_SCALAR;
}

cst_simd_path cst_simd_current(void) { return current; }

int cst_simd_set(cst_simd_path p) {
    if ((int)p < 0 || p > cst_simd_detect()) return -1;
    current = p;
    return 0;
}

const char *cst_simd_name(cst_simd_path p) {
    switch (p) {
    case CST_SIMD_AVX512: return "avx512";
    case CST_SIMD_AVX2: return "avx2";
    default: return "scalar";
    }
}

int cst_simd_parse(const char *s) {
    if (!strcmp(s, "scalar")) return CST_SIMD_SCALAR;
    if (!strcmp(s, "avx2")) return CST_SIMD_AVX2;
    if (!strcmp(s, "avx512")) return CST_SIMD_AVX512;
    return -1;
}
