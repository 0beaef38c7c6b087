/* dpo.h: the preference-loss family of TRL's DPOTrainer (sigmoid/cDPO, IPO, hinge) and the masked
 * sequence log-prob reduction that feeds it. Pair-level math in double; no model code, no
 * reference-model logic, no batching policy (the caller decides which rows are chosen/rejected). */
#ifndef CST_DPO_H
#define CST_DPO_H
#include <stdint.h>

typedef enum { CST_LOSS_SIGMOID = 0, CST_LOSS_IPO = 1, CST_LOSS_HINGE = 2 } cst_loss_type;

/* out (B) = per-row sum over t of mask[b,t] * token_logp[b,t], accumulated in double; with
 * average != 0 divided by the row's mask sum (TRL's IPO uses this per-token average). Exactly one of
 * mask_f32 / mask_u8 (B, T) is non-NULL. Positions whose mask is 0 are skipped, so padding may hold
 * -inf or NaN. A row whose mask sums to 0 gives 0 when averaging (the boundary rejects it first). */
void cst_seq_logps_forward(double *out, const float *token_logp, const float *mask_f32,
                           const uint8_t *mask_u8, int64_t B, int64_t T, int average);

/* dtoken_logp (B, T) += dout[b] * mask[b,t] (/ row mask sum when average != 0). Masked-out positions
 * are left untouched. */
void cst_seq_logps_backward(float *dtoken_logp, const double *dout, const float *mask_f32,
                            const uint8_t *mask_u8, int64_t B, int64_t T, int average);

/* Per pair i of P: logits = (pc - pr) - (rc - rr);
 *   sigmoid: -(1-ls) logsigmoid(beta*logits) - ls logsigmoid(-beta*logits)
 *   ipo:     (logits - 1/(2 beta))^2            (ls ignored, as in TRL)
 *   hinge:   max(0, 1 - beta*logits)            (ls ignored, as in TRL)
 * losses, chosen_rewards = beta (pc - rc), rejected_rewards = beta (pr - rr); all (P). Any output
 * may be NULL. Finite for any finite input (|logits| up to 1e6 and beyond). */
void cst_dpo_loss_forward(double *losses, double *chosen_rewards, double *rejected_rewards,
                          const double *policy_chosen, const double *policy_rejected,
                          const double *ref_chosen, const double *ref_rejected, int64_t P,
                          double beta, cst_loss_type loss_type, double label_smoothing);

/* dpolicy_chosen (P) += dlosses[i] * d loss_i / d pc_i; dpolicy_rejected (P) += dlosses[i] *
 * d loss_i / d pr_i (= the negative of the former). dlosses NULL means 1 for every pair. Either
 * gradient may be NULL. The hinge's kink (beta*logits == 1) gets gradient 0, like torch.relu. */
void cst_dpo_loss_backward(double *dpolicy_chosen, double *dpolicy_rejected, const double *dlosses,
                           const double *policy_chosen, const double *policy_rejected,
                           const double *ref_chosen, const double *ref_rejected, int64_t P,
                           double beta, cst_loss_type loss_type, double label_smoothing);

#endif
