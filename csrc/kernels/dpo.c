/* dpo.c: DPO-family pair losses (sigmoid/cDPO, IPO, hinge, following TRL's DPOTrainer.dpo_loss) with
 * their gradients, and the masked sequence log-prob reduction (see dpo.h). Not the policy/reference
 * forward passes and not the optimizer: this file starts from per-token log-probs. */
#include "dpo.h"
#include <math.h>
#include <string.h>

/* ---- kernels ---- */

static inline double mask_at(const float *mf, const uint8_t *mu, size_t i) {
    return mf ? (double)mf[i] : (double)(mu[i] != 0);
}

/* Below this many tokens a parallel region costs more than the sum (microseconds of work, while
 * waking threads on a busy machine was measured at ~2 ms per call). */
#define SEQ_PARALLEL_MIN ((size_t)1 << 18)

void cst_seq_logps_forward(double *out, const float *token_logp, const float *mask_f32,
                           const uint8_t *mask_u8, int64_t B, int64_t T, int average) {
#pragma omp parallel for schedule(static) if ((size_t)B * (size_t)T >= SEQ_PARALLEL_MIN)
    for (int64_t b = 0; b < B; b++) {
        /* One thread owns a row and sums it left to right in double: a 512-token sum of log-probs
         * around -10 each loses ~3 digits in float, and the order is fixed for any thread count. */
        const size_t row = (size_t)b * (size_t)T;
        double s = 0.0, w = 0.0;
        for (int64_t t = 0; t < T; t++) {
            const double m = mask_at(mask_f32, mask_u8, row + (size_t)t);
            if (m != 0.0) { /* skip, not multiply: padding may hold -inf, and 0 * -inf is NaN */
                s += m * (double)token_logp[row + (size_t)t];
                w += m;
            }
        }
        out[b] = average ? (w != 0.0 ? s / w : 0.0) : s;
    }
}

void cst_seq_logps_backward(float *dtoken_logp, const double *dout, const float *mask_f32,
                            const uint8_t *mask_u8, int64_t B, int64_t T, int average) {
#pragma omp parallel for schedule(static) if ((size_t)B * (size_t)T >= SEQ_PARALLEL_MIN)
    for (int64_t b = 0; b < B; b++) {
        const size_t row = (size_t)b * (size_t)T;
        double g = dout[b];
        if (average) {
            double w = 0.0;
            for (int64_t t = 0; t < T; t++) w += mask_at(mask_f32, mask_u8, row + (size_t)t);
            g = w != 0.0 ? g / w : 0.0;
        }
        for (int64_t t = 0; t < T; t++) {
            const double m = mask_at(mask_f32, mask_u8, row + (size_t)t);
            if (m != 0.0) dtoken_logp[row + (size_t)t] += (float)(g * m);
        }
    }
}

/* softplus(x) = log(1 + e^x) = -logsigmoid(-x), in the form that never overflows: for x = 1e6 the
 * naive log1p(exp(x)) is inf, while max(x, 0) + log1p(exp(-|x|)) is exactly x. */
static inline double softplus(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }

/* sigmoid(x) without overflow: exp of a non-positive argument only. */
static inline double sigmoid(double x) {
    if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
    const double e = exp(x);
    return e / (1.0 + e);
}

/* TRL's operation order, (pc - pr) - (rc - rr), so that rounding matches its logits bit for bit. */
static inline double pair_logits(const double *pc, const double *pr, const double *rc,
                                 const double *rr, int64_t i) {
    return (pc[i] - pr[i]) - (rc[i] - rr[i]);
}

void cst_dpo_loss_forward(double *losses, double *chosen_rewards, double *rejected_rewards,
                          const double *policy_chosen, const double *policy_rejected,
                          const double *ref_chosen, const double *ref_rejected, int64_t P,
                          double beta, cst_loss_type loss_type, double label_smoothing) {
#pragma omp parallel for schedule(static) if (P > 4096)
    for (int64_t i = 0; i < P; i++) {
        if (losses) {
            const double l = pair_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, i);
            double loss;
            switch (loss_type) {
            case CST_LOSS_IPO: {
                const double d = l - 1.0 / (2.0 * beta);
                loss = d * d;
                break;
            }
            case CST_LOSS_HINGE:
                loss = fmax(0.0, 1.0 - beta * l);
                break;
            default: {
                const double z = beta * l;
                /* -logsigmoid(z) = softplus(-z). The smoothing term is skipped, not multiplied by
                 * zero, so an overflowing softplus can never turn into 0 * inf = NaN. */
                loss = (1.0 - label_smoothing) * softplus(-z);
                if (label_smoothing != 0.0) loss += label_smoothing * softplus(z);
                break;
            }
            }
            losses[i] = loss;
        }
        if (chosen_rewards) chosen_rewards[i] = beta * (policy_chosen[i] - ref_chosen[i]);
        if (rejected_rewards) rejected_rewards[i] = beta * (policy_rejected[i] - ref_rejected[i]);
    }
}

void cst_dpo_loss_backward(double *dpolicy_chosen, double *dpolicy_rejected, const double *dlosses,
                           const double *policy_chosen, const double *policy_rejected,
                           const double *ref_chosen, const double *ref_rejected, int64_t P,
                           double beta, cst_loss_type loss_type, double label_smoothing) {
#pragma omp parallel for schedule(static) if (P > 4096)
    for (int64_t i = 0; i < P; i++) {
        const double l = pair_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, i);
        double dl; /* d loss_i / d logits_i; logits has slope +1 in pc and -1 in pr */
        switch (loss_type) {
        case CST_LOSS_IPO:
            dl = 2.0 * (l - 1.0 / (2.0 * beta));
            break;
        case CST_LOSS_HINGE:
            dl = (1.0 - beta * l > 0.0) ? -beta : 0.0; /* torch.relu's subgradient at 0 is 0 */
            break;
        default: {
            const double z = beta * l;
            dl = -(1.0 - label_smoothing) * sigmoid(-z);
            if (label_smoothing != 0.0) dl += label_smoothing * sigmoid(z);
            dl *= beta;
            break;
        }
        }
        const double g = dlosses ? dlosses[i] * dl : dl;
        if (dpolicy_chosen) dpolicy_chosen[i] += g;
        if (dpolicy_rejected) dpolicy_rejected[i] -= g;
    }
}
