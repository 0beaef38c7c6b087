/* ops.h: the per-position kernels of a Llama-family decoder (embedding, RMSNorm, rotary embedding,
 * SwiGLU, token log-probabilities), each a forward/backward pair. Backward ADDS into gradients unless
 * a function says otherwise. Not attention, not the linear layers (matmul.h), not the optimiser.
 * Shape letters: N rows (= B*T), C channels, B batch, T time, H heads, HS head size, V vocab, F ffn. */
#ifndef CST_OPS_H
#define CST_OPS_H
#include <stdint.h>

/* out (B*T, C) = wte (V, C)[tokens (B*T)]. tokens must lie in [0, V) (checked at the boundary). */
void cst_embedding_forward(float *out, const int32_t *tokens, const float *wte, int64_t N, int64_t C);

/* dwte (V, C) += scatter of dout (B, T, C) by tokens (B, T). lengths (B) or NULL: positions
 * t >= lengths[b] contribute nothing. Parallel over column blocks, positions in order: deterministic. */
void cst_embedding_backward(float *dwte, const float *dout, const int32_t *tokens,
                            const int32_t *lengths, int64_t B, int64_t T, int64_t C);

/* out (N, C) = inp * rstd * weight (C), rstd (N) = 1 / sqrt(mean(inp^2) + eps), mean in double. */
void cst_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int64_t N,
                         int64_t C, float eps);

/* dinp (N, C) += d out/d inp applied to dout; dweight (C) += sum over rows of dout * inp * rstd.
 * Either output may be NULL (frozen norm, or no input gradient). No scratch: dweight is reduced over
 * column blocks, rows in order, in double. */
void cst_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                          const float *weight, const float *rstd, int64_t N, int64_t C);

/* In place on x (B, T, H, HS): Hugging Face "rotate_half" rotary embedding of position pos0 + t:
 * (x_i, x_{i+HS/2}) rotated by angle (pos0+t) * inv_freq_i, with cos/sin tables (Tmax, HS/2),
 * Tmax >= pos0 + T. */
void cst_rope_forward(float *x, const float *cos_t, const float *sin_t, int64_t B, int64_t T,
                      int64_t H, int64_t HS, int64_t pos0);

/* In place on the gradient dx (B, T, H, HS): rotation by the negative angle (the transpose).
 * Overwrites (the rotation is a bijection on the gradient buffer, there is nothing to add to). */
void cst_rope_backward(float *dx, const float *cos_t, const float *sin_t, int64_t B, int64_t T,
                       int64_t H, int64_t HS, int64_t pos0);

/* out (N, F) = silu(gu[:, :F]) * gu[:, F:], gu (N, 2F) = [gate | up] of the fused projection. */
void cst_swiglu_forward(float *out, const float *gu, int64_t N, int64_t F);

/* dgu (N, 2F) += [dout * up * silu'(gate) | dout * silu(gate)]. */
void cst_swiglu_backward(float *dgu, const float *dout, const float *gu, int64_t N, int64_t F, int accumulate);

/* logp (N) = log_softmax(logits (N, V))[targets (N)], lse (N, double) = log-sum-exp of each row
 * (max-shifted, summed in double). Target -1 means ignore: logp 0, lse 0, row not even read. */
void cst_logprobs_forward(float *logp, double *lse, const float *logits, const int32_t *targets,
                          int64_t N, int64_t V);

/* dlogits (N, V) += dlogp (N) * (onehot(target) - softmax(logits)) when accumulate != 0, or
 * dlogits = that when accumulate == 0, in which case dlogits may alias logits (in-place backward).
 * Ignored rows (target -1): left alone when accumulating, zeroed otherwise. */
void cst_logprobs_backward(float *dlogits, const float *dlogp, const float *logits,
                           const int32_t *targets, const double *lse, int64_t N, int64_t V,
                           int accumulate);

#endif
