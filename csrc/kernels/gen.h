/* gen.h: the cached forward of a Llama-family decoder for text generation: prefill and decode in one
 * function, with a per-sequence KV cache. Inference only (no activations are kept for backward), float32.
 * Not the training forward (cst/model.py) and not a sampler (cst/generate.py samples). */
#ifndef CST_GEN_H
#define CST_GEN_H
#include <stddef.h>
#include <stdint.h>

/* Model sizes, as in cst.ModelConfig. HS = C / NH. */
typedef struct {
    int64_t V, C, L, NH, NKV, F;
    float rope_theta, norm_eps;
    int tie_embeddings;
} cst_gen_config;

/* Floats in the flat parameter buffer laid out as cst.model.param_layout lists. */
int64_t cst_gen_num_params(const cst_gen_config *cfg);

/* Floats of scratch cst_gen_forward needs for B sequences of up to S new tokens each and caches of
 * maxT positions (the attention scores of every new token against every cached position dominate). */
int64_t cst_gen_scratch_size(const cst_gen_config *cfg, int64_t B, int64_t S, int64_t maxT);

/* Appends tokens[b, 0:n_new[b]] to sequence b at positions start_pos[b] .. start_pos[b]+n_new[b]-1:
 * writes their keys and values into the caches and the logits of the LAST new token into logits[b].
 * Sequences with n_new[b] == 0 cost nothing and their logits row is left as it was.
 * logits (B,V): written for active rows.  kcache, vcache (L,B,maxT,NKV*HS): positions written.
 * scratch (cst_gen_scratch_size floats).  params (cst_gen_num_params floats).
 * tokens (B,S) in [0,V) where used; start_pos (B) >= 0; n_new (B) in [0,S]; start_pos+n_new <= maxT.
 * rope_cos, rope_sin (>= maxT, HS/2): rotary tables by position (cst.ops.rope_tables).
 * Positions below start_pos[b] must already hold sequence b's keys and values.
 * packed: NULL, or cst_gen_pack's output for these params. */
void cst_gen_forward(float *logits, float *kcache, float *vcache, float *scratch, const float *params,
                     const float *packed, const int32_t *tokens, const int32_t *start_pos,
                     const int32_t *n_new, const float *rope_cos, const float *rope_sin,
                     const cst_gen_config *cfg, int64_t B, int64_t S, int64_t maxT);

/* The weight matrices packed once (cst_gemm_pack_nt's layout, the same on every SIMD path): q|k|v, o,
 * gate|up and down of each layer, then the LM head. cst_gen_forward with packed != NULL reads products of
 * up to 64 rows from there (norms and embeddings still come from params). */
int64_t cst_gen_packed_size(const cst_gen_config *cfg);
void cst_gen_pack(float *dst, const float *params, const cst_gen_config *cfg);

#endif
