/* python/ops.c: the entry rows of the per-token ops (ops.h): embedding, RMSNorm, rotary embedding, SwiGLU,
 * token log-probs. Boundary only: no arithmetic. */
#include "glue.h"
#include "ops.h"

static void run_embedding_forward(cst_call *c) {
    cst_embedding_forward(c->v[0].p, c->v[1].p, c->v[2].p, cst_n(c, 'B') * cst_n(c, 'T'), cst_n(c, 'C'));
}

static void run_embedding_backward(cst_call *c) {
    cst_embedding_backward(c->v[0].p, c->v[1].p, c->v[2].p, c->v[3].p, cst_n(c, 'B'), cst_n(c, 'T'),
                           cst_n(c, 'C'));
}

static void run_rmsnorm_forward(cst_call *c) {
    cst_rmsnorm_forward(c->v[0].p, c->v[1].p, c->v[2].p, c->v[3].p, cst_n(c, 'N'), cst_n(c, 'C'),
                        (float)c->v[4].f);
}

static void run_rmsnorm_backward(cst_call *c) {
    cst_rmsnorm_backward(c->v[0].p, c->v[1].p, c->v[2].p, c->v[3].p, c->v[4].p, c->v[5].p, cst_n(c, 'N'),
                         cst_n(c, 'C'));
}

/* The rows rotated must lie in the tables. */
static int check_rope(cst_call *c) {
    const long long pos0 = c->v[3].i, T = cst_n(c, 'T'), P = cst_n(c, 'P');
    if (pos0 < 0 || pos0 + T > P) {
        PyErr_Format(PyExc_ValueError,
                     "%s: positions pos0=%lld .. pos0+T-1=%lld must lie in the tables' [0, %lld) "
                     "('cos' has %lld rows)", c->fn, pos0, pos0 + T - 1, P, P);
        return -1;
    }
    return 0;
}

static void run_rope_forward(cst_call *c) {
    cst_rope_forward(c->v[0].p, c->v[1].p, c->v[2].p, cst_n(c, 'B'), cst_n(c, 'T'), cst_n(c, 'H'),
                     cst_n(c, 'D'), c->v[3].i);
}

static void run_rope_backward(cst_call *c) {
    cst_rope_backward(c->v[0].p, c->v[1].p, c->v[2].p, cst_n(c, 'B'), cst_n(c, 'T'), cst_n(c, 'H'),
                      cst_n(c, 'D'), c->v[3].i);
}

static void run_swiglu_forward(cst_call *c) {
    cst_swiglu_forward(c->v[0].p, c->v[1].p, cst_n(c, 'N'), cst_n(c, 'F'));
}

static void run_swiglu_backward(cst_call *c) {
    cst_swiglu_backward(c->v[0].p, c->v[1].p, c->v[2].p, cst_n(c, 'N'), cst_n(c, 'F'), (int)c->v[3].i);
}

static int check_logits_columns(cst_call *c) {
    if (cst_n(c, 'V') < 1) {
        PyErr_Format(PyExc_ValueError, "%s: 'logits' must have at least one column", c->fn);
        return -1;
    }
    return 0;
}

static void run_logprobs_forward(cst_call *c) {
    cst_logprobs_forward(c->v[0].p, c->v[1].p, c->v[2].p, c->v[3].p, cst_n(c, 'N'), cst_n(c, 'V'));
}

static void run_logprobs_backward(cst_call *c) {
    cst_logprobs_backward(c->v[0].p, c->v[1].p, c->v[2].p, c->v[3].p, c->v[4].p, cst_n(c, 'N'),
                          cst_n(c, 'V'), 1);
}

static void run_logprobs_backward_inplace(cst_call *c) { /* dlogits is logits: overwrite, not add */
    cst_logprobs_backward(c->v[0].p, c->v[1].p, c->v[0].p, c->v[2].p, c->v[3].p, cst_n(c, 'N'),
                          cst_n(c, 'V'), 0);
}

#define ROPE_ARGS(x)                                                                                 \
    {{x, CST_F32, "BTHD", CST_WRITE | CST_FIRST},                                                    \
     {"cos", CST_F32, "PE"},                                                                         \
     {"sin", CST_F32, "PE"},                                                                         \
     {"pos0", CST_INT64, .def = "0"}},                                                               \
        .derive = "E=D/2", .check = check_rope

const cst_entry cst_ops_entries[] = {
    {"embedding_forward", run_embedding_forward,
     {{"out", CST_F32, "BTC", CST_WRITE},
      {"tokens", CST_I32, "BT", .range = "[0, V)"},
      {"wte", CST_F32, "VC", CST_FIRST}},
     .doc = "out (B,T,C) = wte (V,C)[tokens (B,T) int32]."},
    /* Padded positions are skipped, but their ids are still checked: a bad id is a bug upstream. */
    {"embedding_backward", run_embedding_backward,
     {{"dwte", CST_F32, "VC", CST_WRITE | CST_FIRST},
      {"dout", CST_F32, "BTC"},
      {"tokens", CST_I32, "BT", CST_FIRST, .range = "[0, V)"},
      {"lengths", CST_I32, "B", CST_NONE, .def = "None", .range = "[0, T]"}},
     .doc = "dwte (V,C) += scatter of dout (B,T,C) by "
            "tokens; positions t >= lengths[b] (int32 (B)) contribute nothing. Deterministic."},
    {"rmsnorm_forward", run_rmsnorm_forward,
     {{"out", CST_F32, "NC", CST_WRITE},
      {"rstd", CST_F32, "N", CST_WRITE},
      {"inp", CST_F32, "NC"},
      {"weight", CST_F32, "C"},
      {"eps", CST_DOUBLE, .range = "> 0"}},
     .doc = "out (N,C) = inp * rstd * weight (C); "
            "rstd (N) = 1/sqrt(mean(inp^2) + eps)."},
    {"rmsnorm_backward", run_rmsnorm_backward,
     {{"dinp", CST_F32, "NC", CST_WRITE | CST_NONE},
      {"dweight", CST_F32, "C", CST_WRITE | CST_NONE},
      {"dout", CST_F32, "NC"},
      {"inp", CST_F32, "NC", CST_FIRST},
      {"weight", CST_F32, "C", CST_FIRST},
      {"rstd", CST_F32, "N"}},
     .doc = "dinp (N,C) += ..., dweight (C) += ... "
            "(either may be None). Needs no scratch."},
    {"rope_forward", run_rope_forward, ROPE_ARGS("x"),
     .doc = "in place on x (B,T,H,HS), HF rotate_half rotary embedding at "
            "positions pos0+t; cos/sin (Tmax, HS/2) from cst.ops.rope_tables."},
    {"rope_backward", run_rope_backward, ROPE_ARGS("dx"),
     .doc = "in place on the gradient dx (B,T,H,HS): rotation by -angle "
            "(overwrites, does not add)."},
    {"swiglu_forward", run_swiglu_forward,
     {{"out", CST_F32, "NF", CST_WRITE | CST_FIRST},
      {"gu", CST_F32, "NG"}},
     .derive = "G=2F",
     .doc = "out (N,F) = silu(gu[:, :F]) * gu[:, F:], gu (N,2F) = [gate | up]."},
    {"swiglu_backward", run_swiglu_backward,
     {{"dgu", CST_F32, "NG", CST_WRITE},
      {"dout", CST_F32, "NF"},
      {"gu", CST_F32, "NG"},
      {"accumulate", CST_FLAG, .def = "True"}},
     .derive = "G=2F",
     .doc = "dgu (N,2F) += gradient of swiglu_forward (= with accumulate=False)."},
    {"logprobs_forward", run_logprobs_forward,
     {{"logp", CST_F32, "N", CST_WRITE},
      {"lse", CST_F64, "N", CST_WRITE},
      {"logits", CST_F32, "NV"},
      {"targets", CST_I32, "N", .range = "[-1, V)"}},
     .check = check_logits_columns,
     .doc = "logp (N) float32 = log_softmax(logits (N,V))[targets "
            "(N) int32]; lse (N) float64 = row log-sum-exp. Target -1 ignores the row (logp 0, lse 0)."},
    {"logprobs_backward", run_logprobs_backward,
     {{"dlogits", CST_F32, "NV", CST_WRITE | CST_EXCLUSIVE},
      {"dlogp", CST_F32, "N"},
      {"logits", CST_F32, "NV", CST_FIRST},
      {"targets", CST_I32, "N", .range = "[-1, V)"},
      {"lse", CST_F64, "N"}},
     .doc = "dlogits (N,V) += dlogp * (onehot - "
            "softmax(logits)); ignored rows untouched. dlogits must not be logits (logprobs_backward_inplace "
            "overwrites logits with the gradient)."},
    {"logprobs_backward_inplace", run_logprobs_backward_inplace,
     {{"logits", CST_F32, "NV", CST_WRITE | CST_FIRST},
      {"dlogp", CST_F32, "N"},
      {"targets", CST_I32, "N", .range = "[-1, V)"},
      {"lse", CST_F64, "N"}},
     .doc = "overwrites logits (N,V) with "
            "dlogp * (onehot - softmax(logits)) (no extra (N,V) buffer); ignored rows become 0."},
    {NULL},
};
