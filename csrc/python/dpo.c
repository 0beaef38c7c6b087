/* python/dpo.c: the entry rows of the masked sequence log-probs and the DPO pair losses (dpo.h). Boundary only. */
#include "glue.h"
#include "dpo.h"
#include <math.h>
#include <stdio.h>
#include <string.h>

/* The mask may be float32 (weights, finite and >= 0) or uint8/bool (0 = ignore); averaging divides by
 * a row's mask sum, so with average an empty row has no average and is rejected by name. */
static int check_mask(cst_call *c, int i, int average) {
    const float *mf = c->dtype[i] == CST_F32 ? c->v[i].p : NULL;
    const uint8_t *mu = mf ? NULL : c->v[i].p;
    const int64_t B = cst_n(c, 'B'), T = cst_n(c, 'T');
    for (size_t k = 0; mf && k < (size_t)B * (size_t)T; k++)
        if (!(isfinite(mf[k]) && mf[k] >= 0.0f)) {
            char v[32];
            snprintf(v, sizeof v, "%.9g", (double)mf[k]);
            PyErr_Format(PyExc_ValueError, "%s: 'mask' must be finite and >= 0, got %s at flat index %zu",
                         c->fn, v, k);
            return -1;
        }
    for (int64_t b = 0; average && b < B; b++) {
        double w = 0.0;
        for (size_t t = (size_t)b * (size_t)T; t < (size_t)(b + 1) * (size_t)T; t++)
            w += mf ? (double)mf[t] : (double)(mu[t] != 0);
        if (w == 0.0) {
            PyErr_Format(PyExc_ValueError,
                         "%s: 'mask' row %lld selects no tokens, so its average log-prob is undefined",
                         c->fn, (long long)b);
            return -1;
        }
    }
    return 0;
}

static int check_seq_logps(cst_call *c) { return check_mask(c, 2, (int)c->v[3].i); }

#define MASK(c) ((c)->dtype[2] == CST_F32 ? (c)->v[2].p : NULL), ((c)->dtype[2] == CST_F32 ? NULL : (c)->v[2].p)

static void run_seq_logps_forward(cst_call *c) {
    cst_seq_logps_forward(c->v[0].p, c->v[1].p, MASK(c), cst_n(c, 'B'), cst_n(c, 'T'), (int)c->v[3].i);
}

static void run_seq_logps_backward(cst_call *c) {
    cst_seq_logps_backward(c->v[0].p, c->v[1].p, MASK(c), cst_n(c, 'B'), cst_n(c, 'T'), (int)c->v[3].i);
}

/* The pair inputs and hyper-parameters every DPO entry point takes after its outputs. */
#define PAIR_ARGS                                                                                    \
    {"policy_chosen", CST_F64, "P", CST_FIRST | CST_FINITE}, {"policy_rejected", CST_F64, "P", CST_FINITE}, \
        {"ref_chosen", CST_F64, "P", CST_FINITE}, {"ref_rejected", CST_F64, "P", CST_FINITE},        \
        {"beta", CST_DOUBLE, .range = "> 0"},                                                        \
        {"loss_type", CST_CHOICE, .def = "sigmoid", .range = "sigmoid|ipo|hinge"},                    \
        {"label_smoothing", CST_DOUBLE, .def = "0.0", .range = "[0, 0.5]"}
/* The arguments of PAIR_ARGS starting at position `at`, as the kernels take them. */
#define PAIRS(c, at) (c)->v[at].p, (c)->v[at + 1].p, (c)->v[at + 2].p, (c)->v[at + 3].p, cst_n(c, 'P'), \
                     (c)->v[at + 4].f, (cst_loss_type)(c)->v[at + 5].i, (c)->v[at + 6].f

static void run_dpo_loss_forward(cst_call *c) { cst_dpo_loss_forward(c->v[0].p, c->v[1].p, c->v[2].p, PAIRS(c, 3)); }

static void run_dpo_loss_backward(cst_call *c) {
    cst_dpo_loss_backward(c->v[0].p, c->v[1].p, c->v[2].p, PAIRS(c, 3));
}

/* Everything a training step needs in one call: per-pair losses, rewards and per-pair gradients
 * (overwritten, not accumulated: this is where the backward chain starts). */
static void run_dpo_loss(cst_call *c) {
    cst_dpo_loss_forward(c->v[0].p, c->v[1].p, c->v[2].p, PAIRS(c, 5));
    memset(c->v[3].p, 0, (size_t)cst_n(c, 'P') * sizeof(double));
    memset(c->v[4].p, 0, (size_t)cst_n(c, 'P') * sizeof(double));
    cst_dpo_loss_backward(c->v[3].p, c->v[4].p, NULL, PAIRS(c, 5));
}

const cst_entry cst_dpo_entries[] = {
    {"seq_logps_forward", run_seq_logps_forward,
     {{"out", CST_F64, "B", CST_WRITE},
      {"token_logp", CST_F32, "BT"},
      {"mask", CST_F32 | CST_U8 | CST_BOOL, "BT"},
      {"average", CST_FLAG, .def = "False"}},
     .check = check_seq_logps,
     .doc = "out = sum over t of mask * token_logp, in double per row (a float32 mask must be >= 0); "
            "average divides by the row's mask sum (rows with no tokens are rejected)."},
    {"seq_logps_backward", run_seq_logps_backward,
     {{"dtoken_logp", CST_F32, "BT", CST_WRITE | CST_FIRST},
      {"dout", CST_F64, "B"},
      {"mask", CST_F32 | CST_U8 | CST_BOOL, "BT"},
      {"average", CST_FLAG, .def = "False"}},
     .check = check_seq_logps,
     .doc = "dtoken_logp += dout * mask (/ the row's mask sum when average)."},
    {"dpo_loss_forward", run_dpo_loss_forward,
     {{"losses", CST_F64, "P", CST_WRITE | CST_NONE},
      {"chosen_rewards", CST_F64, "P", CST_WRITE | CST_NONE},
      {"rejected_rewards", CST_F64, "P", CST_WRITE | CST_NONE},
      PAIR_ARGS},
     .doc = "per-pair losses and rewards; outputs may be None."},
    {"dpo_loss_backward", run_dpo_loss_backward,
     {{"dpolicy_chosen", CST_F64, "P", CST_WRITE | CST_NONE},
      {"dpolicy_rejected", CST_F64, "P", CST_WRITE | CST_NONE},
      {"dlosses", CST_F64, "P", CST_NONE | CST_FINITE},
      PAIR_ARGS},
     .doc = "adds dlosses * d loss / d policy_{chosen,rejected} (dlosses None = ones; grads may be None)."},
    {"dpo_loss", run_dpo_loss,
     {{"losses", CST_F64, "P", CST_WRITE},
      {"chosen_rewards", CST_F64, "P", CST_WRITE},
      {"rejected_rewards", CST_F64, "P", CST_WRITE},
      {"grad_chosen", CST_F64, "P", CST_WRITE},
      {"grad_rejected", CST_F64, "P", CST_WRITE},
      PAIR_ARGS},
     .doc = "writes per-pair losses, rewards and d loss_i / d policy_{chosen,rejected}_i in one call."},
    {NULL},
};
