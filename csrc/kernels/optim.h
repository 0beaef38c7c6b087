/* optim.h: the AdamW update on flat float32 arrays (PyTorch's torch.optim.AdamW semantics) and a
 * deterministic sum of squares for global-norm gradient clipping. Not a scheduler, not a zero_grad. */
#ifndef CST_OPTIM_H
#define CST_OPTIM_H
#include <stdint.h>

/* One AdamW step on n elements, in place on param, m (first moment), v (second moment), in
 * PyTorch's order and float32 rounding: g = grad * grad_scale; param *= 1 - lr * weight_decay;
 * m = lerp(m, g, 1 - beta1); v = v * beta2 + (1 - beta2) * g * g;
 * param -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps). step >= 1. */
void cst_adamw_step(float *param, float *m, float *v, const float *grad, int64_t n, double lr,
                    double beta1, double beta2, double eps, double weight_decay, int64_t step,
                    float grad_scale);

/* sum(x^2) over n elements in double: a fixed number of contiguous chunks, each summed in double in
 * a fixed order, then the chunk sums in order, so the result does not depend on the thread count. */
double cst_sum_squares(const float *x, int64_t n);

#endif
