/* gemm.h: the single-precision matrix products behind matmul.c: a GotoBLAS/BLIS-style packed GEMM on
 * strided operands and a GEMV-like path for a few rows against a large (OC, C) weight. Not a BLAS:
 * row-major C only, no alpha, and results are bitwise independent of the OpenMP thread count. */
#ifndef CST_GEMM_H
#define CST_GEMM_H
#include <stdint.h>

/* c (M, N), row stride ldc: c = a @ b, or c += a @ b when accumulate != 0.
 * a (M, K) element (i, k) at a[i*rsa + k*csa]; b (K, N) element (k, j) at b[k*rsb + j*csb].
 * Each element is summed over k in ascending order in fixed blocks of k, by one thread. */
void cst_gemm(float *c, int64_t ldc, const float *a, int64_t rsa, int64_t csa, const float *b,
              int64_t rsb, int64_t csb, int64_t M, int64_t N, int64_t K, int accumulate);

/* out (N, OC) = x (N, C) @ w (OC, C)^T (or += when accumulate): row-by-row dot products that stream
 * w once, for small N (token-by-token generation). Parallel over OC. */
void cst_gemv_nt(float *out, const float *x, const float *w, int64_t N, int64_t C, int64_t OC,
                 int accumulate);

/* The same for bf16 rows: out (N, OC), rows ldo apart (ldo >= OC: a column block of a wider output),
 * (+)= x (N, C) @ w (OC, C)^T with x and w bf16 (uint16_t bits, rows C apart, no alignment needed) and
 * fp32 sums: what generation runs on a bf16 base. Each output is one thread's single chain of vector
 * sums over k, so results depend on neither the thread count nor N (a row alone or among others).
 * The AVX-512 path uses vdpbf16ps on k pairs where cst_gemm_bf16_way() is not "convert" and C is
 * even; otherwise bf16 is widened to fp32 (exactly) and multiplied with FMA (AVX-512, AVX2) or plain
 * products (scalar). Paths differ in summation order only. */
void cst_gemv_bf16_nt(float *out, int64_t ldo, const uint16_t *x, const uint16_t *w, int64_t N, int64_t C,
                      int64_t OC, int accumulate);

/* Thin products (LoRA at rank <= CST_THIN_MAX_COLS): outputs of few columns, operands read in place.
 * cst_gemm_thin_nt: out (N, OC) (+)= x (N, C) @ w (OC, C)^T, dot-product tiles, parallel over rows.
 * cst_gemm_thin_nn: out (N, OC) (+)= x (N, C) @ w (C, OC): w transposed into scratch, then thin_nt.
 * cst_gemm_thin_tn: c (M, R) (+)= a (K, M)^T @ b (K, R), vectors along M, parallel over M.
 * These two take each operand's row stride (ldo/ldc, ldx/lda, ldw/ldb), so a block of columns of a wider
 * matrix is read or written in place (cst_matmul_backward_ld).
 * Each element is reduced by one thread in a fixed order (not cst_gemm's). */
#define CST_THIN_MAX_COLS 64
void cst_gemm_thin_nt(float *out, const float *x, const float *w, int64_t N, int64_t C, int64_t OC,
                      int accumulate);
void cst_gemm_thin_nn(float *out, int64_t ldo, const float *x, int64_t ldx, const float *w, int64_t ldw,
                      int64_t N, int64_t C, int64_t OC, int accumulate);
void cst_gemm_thin_tn(float *c, int64_t ldc, const float *a, int64_t lda, const float *b, int64_t ldb,
                      int64_t M, int64_t R, int64_t K, int accumulate);

/* bf16 inputs, fp32 accumulation and outputs (bf16 stored as uint16_t; fp32 inputs are rounded to bf16
 * first, as torch's autocast does). Each returns 0, or -1 when no memory for its converted operands.
 * cst_gemm_bf16_nt: out (N, OC) (+)= x (N, C) @ w (OC, C)^T   (a linear layer's forward)
 * cst_gemm_bf16_nn: out (N, C) (+)= dy (N, OC) @ w (OC, C)     (its input gradient)
 * cst_gemm_bf16_tn: out (OC, C) (+)= dy (N, OC)^T @ x (N, C)   (its weight gradient)
 * Each element is summed in fixed blocks of k by one thread (thread-count independent). Two ways
 * (gemm.c): CST_BF16_DOT, vdpbf16ps on k pairs (AVX-512 path, AVX512_BF16, default on AMD family >= 25);
 * CST_BF16_AMX, tile products (forward and input gradient; default where the CPU and Linux allow AMX);
 * CST_BF16_CONVERT, operands expanded to fp32 and the fp32 GEMM (everywhere else). cst_gemm_bf16_way:
 * the way the current SIMD path uses; cst_gemm_bf16_set_way: choose one (-1 if the CPU lacks it). */
enum { CST_BF16_CONVERT = 0, CST_BF16_DOT = 1, CST_BF16_AMX = 2 };
int cst_gemm_bf16_nt(float *out, const float *x, const uint16_t *w, int64_t N, int64_t C, int64_t OC,
                     int accumulate);
int cst_gemm_bf16_nn(float *out, const float *dy, const uint16_t *w, int64_t N, int64_t OC, int64_t C,
                     int accumulate);
int cst_gemm_bf16_tn(float *out, const float *dy, const float *x, int64_t N, int64_t OC, int64_t C,
                     int accumulate);
int cst_gemm_bf16_way(void);
int cst_gemm_bf16_set_way(int way);

/* Prepacked weights (generation packs each weight once and multiplies it many times). The layout is the
 * same on every SIMD path: panels of CST_PACK_NR rows of w, k-major, zero-padded —
 * dst[p*NR*C + k*NR + j] = w[(p*NR + j)*C + k]. cst_gemm_packed_size: floats of w (OC, C) packed.
 * cst_gemm_packed_nt: out (M, OC) (+)= a (M, C) @ w^T from that packing, each element summed over the
 * same k blocks in the same order as cst_gemm; rows in blocks of 64. */
#define CST_PACK_NR 16
int64_t cst_gemm_packed_size(int64_t OC, int64_t C);
void cst_gemm_pack_nt(float *dst, const float *w, int64_t OC, int64_t C);
void cst_gemm_packed_nt(float *out, const float *a, const float *wp, int64_t M, int64_t C, int64_t OC,
                        int accumulate);

#endif
