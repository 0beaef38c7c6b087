/* python/optim.c: the entry rows of AdamW and the sum of squares used for clipping (optim.h). Boundary only. */
#include "glue.h"
#include "optim.h"

static void run_adamw_step(cst_call *c) {
    cst_adamw_step(c->v[0].p, c->v[2].p, c->v[3].p, c->v[1].p, cst_n(c, 'N'), c->v[4].f, c->v[5].f,
                   c->v[6].f, c->v[7].f, c->v[8].f, c->v[9].i, (float)c->v[10].f);
}

static void run_sum_squares(cst_call *c) { c->ret.f = cst_sum_squares(c->v[0].p, cst_n(c, 'N')); }

const cst_entry cst_optim_entries[] = {
    {"adamw_step", run_adamw_step,
     {{"param", CST_F32, "N", CST_WRITE | CST_FIRST | CST_EXCLUSIVE},
      {"grad", CST_F32, "N"},
      {"m", CST_F32, "N", CST_WRITE | CST_EXCLUSIVE},
      {"v", CST_F32, "N", CST_WRITE | CST_EXCLUSIVE},
      {"lr", CST_DOUBLE, .range = ">= 0"},
      {"beta1", CST_DOUBLE, .range = "[0, 1)"},
      {"beta2", CST_DOUBLE, .range = "[0, 1)"},
      {"eps", CST_DOUBLE, .range = ">= 0"},
      {"weight_decay", CST_DOUBLE, .range = ">= 0"},
      {"step", CST_INT64, .range = ">= 1"}, /* the count including this step */
      {"grad_scale", CST_DOUBLE, .flags = CST_FINITE, .def = "1.0"}},
     .doc = "one torch.optim.AdamW step in place on flat float32 arrays; step counts from 1; grad is multiplied "
            "by grad_scale first (clipping) and is not modified."},
    {"sum_squares", run_sum_squares,
     {{"x", CST_F32, "N"}},
     .ret = CST_RET_FLOAT,
     .doc = "Returns float: sum of x**2 over a flat float32 array, in double, deterministic."},
    {NULL},
};
