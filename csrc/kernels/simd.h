/* simd.h: run-time choice of the SIMD path. The extension is compiled for baseline x86-64; faster
 * paths are compiled per function with target attributes and chosen here from the CPU's features,
 * so one build runs on any x86-64 machine. CST_SIMD=scalar|avx2|avx512 forces a path. */
#ifndef CST_SIMD_H
#define CST_SIMD_H

typedef enum { CST_SIMD_SCALAR = 0, CST_SIMD_AVX2 = 1, CST_SIMD_AVX512 = 2 } cst_simd_path;

/* Best path this CPU supports. */
cst_simd_path cst_simd_detect(void);
/* Path kernels use now (initialised from CST_SIMD or detection at import). */
cst_simd_path cst_simd_current(void);

/* Function attributes for the per-path copies of a kernel (x86-64 GCC/Clang; the build itself targets
 * the baseline ISA, and callers dispatch on cst_simd_current()). */
#define CST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define CST_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
/* The one way a kernel dispatches: NAME_avx512, NAME_avx2 or NAME_scalar for the current path (the AVX
 * variants exist on x86-64 only; elsewhere NAME_scalar). Picked once per call, before the loop. */
#if defined(__x86_64__)
#define CST_SIMD_PICK(name)                                                                          \
    (cst_simd_current() == CST_SIMD_AVX512 ? name##_avx512                                           \
     : cst_simd_current() == CST_SIMD_AVX2 ? name##_avx2                                            \
                                           : name##_scalar)
#else
#define CST_SIMD_PICK(name) (name##_scalar)
#endif
/* Sets the path; returns -1 if the CPU lacks it. */
int cst_simd_set(cst_simd_path p);
const char *cst_simd_name(cst_simd_path p);
/* Parses "scalar"/"avx2"/"avx512"; returns -1 for anything else. */
int cst_simd_parse(const char *s);

#endif
