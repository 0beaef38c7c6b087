/* gen.h: the cached forward of a Llama-family decoder for text generation: prefill and decode in one
 * function, with a per-sequence KV cache. Inference only (no activations are kept for backward), float32.
 * Not the training forward (cst/model.py) and not a sampler (cst/generate.py samples). */
#ifndef CST_GEN_H
#define CST_GEN_H
#include <stddef.h>
#include <stdint.h>

/* Model sizes, as in cst.ModelConfig (HS = config.head_dim, not necessarily C / NH). */
typedef struct {
    int64_t V, C, L, NH, NKV, F, HS;
    float norm_eps;
} cst_gen_config;

/* Where each tensor lies in the flat parameters: cst.model.gen_offsets, one row of CST_GEN_NROLES
 * float offsets per layer (-1: absent; only the bias may be), then one row with the embedding, final
 * norm and LM head. q, k, v (and their biases) are adjacent, as are gate and up. */
enum { CST_GEN_ATTN_NORM, CST_GEN_QKV, CST_GEN_QKV_BIAS, CST_GEN_O, CST_GEN_FFN_NORM, CST_GEN_GU, CST_GEN_DOWN,
       CST_GEN_NROLES };
enum { CST_GEN_EMBED, CST_GEN_NORM, CST_GEN_HEAD };
typedef const int64_t *cst_gen_layout; /* (L + 1, CST_GEN_NROLES) */

/* Weight matrices kept in GGUF blocks (qdot.h) instead of float32 params, for cst_gen_forward: per
 * layout cell i, offsets[i][0] >= 0 is the byte offset in raw of that matrix (rows in the order the
 * fused product wants, HF's q/k order), of ggml type types[i][0]; -1 reads the cell from params. A
 * fused product whose matrices differ in type (a Q4_K_M file's Q4_K q, k with a Q6_K v) is given as
 * its parts instead: q, k, v (QKV) or gate, up (GU) at offsets[i][0..], each of its own type; parts
 * 1 and 2 are -1 when part 0 holds all the rows. Only the matrix roles (QKV, O, GU, DOWN) and the
 * embedding and head may be quantised: the embedding row of a token is dequantised (any
 * cst_quant_block_info type), products use cst_qmatvec (its types) or, for BF16 matrices (at even
 * byte offsets), cst_gemv_bf16_nt with the inputs rounded to bf16. */
enum { CST_GEN_QPARTS = 3 };
typedef struct {
    const uint8_t *raw;
    const int64_t *offsets, *types; /* (L + 1, CST_GEN_NROLES, CST_GEN_QPARTS) */
} cst_gen_quant;

/* Floats of scratch cst_gen_forward needs for B sequences of up to S new tokens each and caches of
 * maxT positions (the attention scores of every new token against every cached position dominate). */
int64_t cst_gen_scratch_size(const cst_gen_config *cfg, int64_t B, int64_t S, int64_t maxT);

/* Appends tokens[b, 0:n_new[b]] to sequence b at positions start_pos[b] .. start_pos[b]+n_new[b]-1:
 * writes their keys and values into the caches and the logits of the LAST new token into logits[b].
 * Sequences with n_new[b] == 0 cost nothing and their logits row is left as it was.
 * logits (B,V): written for active rows.  kcache, vcache (L,B,maxT,NKV*HS): positions written.
 * scratch (cst_gen_scratch_size floats).  params: every tensor at its offset in layout.
 * tokens (B,S) in [0,V) where used; start_pos (B) >= 0; n_new (B) in [0,S]; start_pos+n_new <= maxT.
 * rope_cos, rope_sin (>= maxT, HS/2): rotary tables by position (cst.ops.rope_tables).
 * Positions below start_pos[b] must already hold sequence b's keys and values.
 * packed: NULL, or cst_gen_pack's output for these params. quant: NULL, or the matrices read from their
 * GGUF blocks (with packed NULL); their layout cells are not read. */
void cst_gen_forward(float *logits, float *kcache, float *vcache, float *scratch, const float *params,
                     const float *packed, const int32_t *tokens, const int32_t *start_pos,
                     const int32_t *n_new, const float *rope_cos, const float *rope_sin,
                     const cst_gen_config *cfg, cst_gen_layout layout, int64_t B, int64_t S, int64_t maxT,
                     const cst_gen_quant *quant);

/* The weight matrices packed once (cst_gemm_pack_nt's layout, the same on every SIMD path): q|k|v, o,
 * gate|up and down of each layer, then the LM head. cst_gen_forward with packed != NULL reads products of
 * up to 64 rows from there (norms and embeddings still come from params). */
int64_t cst_gen_packed_size(const cst_gen_config *cfg);
void cst_gen_pack(float *dst, const float *params, const cst_gen_config *cfg, cst_gen_layout layout);

#endif
