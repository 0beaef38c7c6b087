/* attention.h: causal multi-head self-attention with grouped-query heads and right padding.
 * Memory-lean: forward saves only the log-sum-exp of each score row (not the (T,T) probabilities);
 * backward recomputes the probabilities from q, k and that lse. Not a KV-cache decoder. */
#ifndef CST_ATTENTION_H
#define CST_ATTENTION_H
#include <stdint.h>

/* Query t of sequence b attends keys s <= t with s < lengths[b] (lengths NULL: all T), scale
 * 1/sqrt(HS); q head h reads kv head h / (NH/NKV). Padded query rows (t >= lengths[b]) get out 0
 * and lse 0.
 * out (B,T,NH,HS), lse (B,NH,T): written. q (B,T,NH,HS), k v (B,T,NKV,HS), lengths (B) in [1,T]. */
void cst_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                           const int32_t *lengths, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                           int64_t HS);

/* Adds the gradients of forward into dq (B,T,NH,HS), dk and dv (B,T,NKV,HS), from dout (B,T,NH,HS)
 * and forward's out and lse. Padded query rows contribute nothing (their dout is ignored). */
void cst_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                            const float *lse, const float *q, const float *k, const float *v,
                            const int32_t *lengths, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                            int64_t HS);

#endif
