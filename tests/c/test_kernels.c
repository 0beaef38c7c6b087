/* test_kernels.c: the kernels as plain C, without Python: a few results of each family against values
 * worked out by hand, on every SIMD path this CPU runs. Built and run by tests/test_kernels_c.py with
 * the system C compiler; exits non-zero (after printing each mismatch) when any check fails. */
#include "attention.h"
#include "bf16.h"
#include "dpo.h"
#include "matmul.h"
#include "ops.h"
#include "optim.h"
#include "quant.h"
#include "simd.h"
#include <math.h>
#include <stdio.h>
#include <string.h>

static int failures = 0;

static void check(const char *what, double got, double want, double tol) {
    if (!(fabs(got - want) <= tol)) {
        printf("FAIL %s [%s]: got %.9g, want %.9g\n", what, cst_simd_name(cst_simd_current()), got, want);
        failures++;
    }
}

static void matmul_checks(void) {
    /* inp (2,3) @ weight (2,3)^T: rows [1,2,3], [4,5,6] against [1,0,1], [0,1,0]. */
    const float inp[6] = {1, 2, 3, 4, 5, 6}, w[6] = {1, 0, 1, 0, 1, 0};
    float out[4] = {100, 100, 100, 100};
    cst_matmul_forward(out, inp, w, 2, 3, 2, 0);
    check("matmul out[0,0]", out[0], 4, 0);
    check("matmul out[0,1]", out[1], 2, 0);
    check("matmul out[1,0]", out[2], 10, 0);
    check("matmul out[1,1]", out[3], 5, 0);
    cst_matmul_forward(out, inp, w, 2, 3, 2, 1); /* accumulate: twice the product */
    check("matmul accumulate", out[3], 10, 0);
    /* dweight (2,3) += dout^T @ inp with dout = ones (2,2): every row is the column sums [5,7,9]. */
    const float dout[4] = {1, 1, 1, 1};
    float dw[6] = {0};
    cst_matmul_backward(NULL, dw, dout, inp, w, 2, 3, 2, 1);
    check("matmul dweight[1,2]", dw[5], 9, 0);
}

static void ops_checks(void) {
    const int32_t tok[2] = {2, 0};
    const float wte[6] = {0, 1, 2, 3, 4, 5}; /* V=3, C=2 */
    float emb[4];
    cst_embedding_forward(emb, tok, wte, 2, 2);
    check("embedding row 0", emb[1], 5, 0);
    check("embedding row 1", emb[2], 0, 0);
    /* rmsnorm of [3, 4]: mean square 12.5, so out = x / sqrt(12.5) * weight. */
    const float x[2] = {3, 4}, g[2] = {1, 2};
    float y[2], rstd[1];
    cst_rmsnorm_forward(y, rstd, x, g, 1, 2, 0.0f);
    check("rmsnorm rstd", rstd[0], 1.0 / sqrt(12.5), 1e-7);
    check("rmsnorm out[1]", y[1], 8.0 / sqrt(12.5), 1e-6);
    /* swiglu: silu(gate) * up, silu(1) = 1 / (1 + e^-1). */
    const float gu[4] = {0, 1, 3, 2}; /* gate [0, 1], up [3, 2] */
    float h[2];
    cst_swiglu_forward(h, gu, 1, 2);
    check("swiglu silu(0)", h[0], 0, 0);
    check("swiglu silu(1) * 2", h[1], 2.0 / (1.0 + exp(-1.0)), 1e-6);
    /* Uniform logits over V = 4: every log-prob is -log 4; target -1 ignores the row. */
    const float logits[8] = {0, 0, 0, 0, 1, 1, 1, 1};
    const int32_t tgt[2] = {3, -1};
    float logp[2];
    double lse[2];
    cst_logprobs_forward(logp, lse, logits, tgt, 2, 4);
    check("logprobs uniform", logp[0], -log(4.0), 1e-6);
    check("logprobs lse", lse[0], log(4.0), 1e-12);
    check("logprobs ignored row", logp[1], 0, 0);
}

static void attention_checks(void) {
    /* One position: the only key gets probability 1, so out = v. B=1, T=1, NH=2, NKV=1, HS=2. */
    const float q[4] = {1, 2, 3, 4}, k[2] = {5, 6}, v[2] = {7, -8};
    float out[4], lse[2];
    cst_attention_forward(out, lse, q, k, v, NULL, 1, 1, 2, 1, 2);
    check("attention out = v", out[2], 7, 1e-6);
    check("attention out = v", out[3], -8, 1e-6);
    /* lse of one score: the score itself, q.k / sqrt(HS) = (5 + 12) / sqrt(2) for head 0. */
    check("attention lse", lse[0], 17.0 / sqrt(2.0), 1e-5);
}

static void optim_checks(void) {
    const float sq[3] = {1, 2, 3};
    check("sum_squares", cst_sum_squares(sq, 3), 14, 0);
    /* First AdamW step from m = v = 0: the update is lr * g / |g| (bias-corrected), up to eps. */
    float p[2] = {1, 1}, m[2] = {0}, v2[2] = {0};
    const float grad[2] = {0.5f, -2.0f};
    cst_adamw_step(p, m, v2, grad, 2, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, 1.0f);
    check("adamw step +g", p[0], 0.9, 1e-6);
    check("adamw step -g", p[1], 1.1, 1e-6);
}

static void dpo_checks(void) {
    /* Equal policy and reference log-probs: the margin is 0 and the sigmoid loss is log 2. */
    const double z[1] = {0};
    double loss[1], cr[1], rr[1];
    cst_dpo_loss_forward(loss, cr, rr, z, z, z, z, 1, 0.1, CST_LOSS_SIGMOID, 0.0);
    check("dpo sigmoid loss at 0", loss[0], log(2.0), 1e-15);
    /* The masked sum of [-1, -2, -3] with mask [1, 0, 1] is -4; averaged, -2. */
    const float lp[3] = {-1, -2, -3};
    const uint8_t mask[3] = {1, 0, 1};
    double s[1];
    cst_seq_logps_forward(s, lp, NULL, mask, 1, 3, 0);
    check("seq_logps sum", s[0], -4, 0);
    cst_seq_logps_forward(s, lp, NULL, mask, 1, 3, 1);
    check("seq_logps average", s[0], -2, 0);
}

static void quant_checks(void) {
    /* One Q8_0 block: f16 scale 0.5 (0x3800) then 32 int8 quants i - 16: values (i - 16) / 2. */
    uint8_t raw[34] = {0x00, 0x38};
    for (int i = 0; i < 32; i++) raw[2 + i] = (uint8_t)(int8_t)(i - 16);
    float out[32];
    int64_t be, bb;
    check("Q8_0 block info", cst_quant_block_info(8, &be, &bb) ? (double)(be * 100 + bb) : -1, 3234, 0);
    cst_dequantize(out, raw, 1, 8);
    check("Q8_0 value 0", out[0], -8, 0);
    check("Q8_0 value 31", out[31], 7.5, 0);
    check("f16 1.0", cst_f16_to_f32(0x3C00), 1, 0);
    check("bf16 -2.0", cst_bf16_to_f32(0xC000), -2, 0);
}

int main(void) {
    const cst_simd_path best = cst_simd_detect();
    for (int p = 0; p <= (int)best; p++) {
        if (cst_simd_set((cst_simd_path)p) < 0) {
            printf("FAIL cannot select SIMD path %d\n", p);
            return 1;
        }
        matmul_checks();
        ops_checks();
        attention_checks();
        optim_checks();
        dpo_checks();
        quant_checks();
    }
    printf("%d failure(s) on %d SIMD path(s)\n", failures, (int)best + 1);
    return failures != 0;
}
