/* python/attention.c: the entry rows of causal grouped-query attention (attention.h). Boundary only. */
#include "glue.h"
#include "attention.h"

/* Head grouping: every kv head serves the same number of q heads. */
static int check_heads(cst_call *c) {
    const int64_t NH = cst_n(c, 'H'), NKV = cst_n(c, 'K');
    if (NKV < 1 || NH % NKV) {
        PyErr_Format(PyExc_ValueError,
                     "%s: the number of q heads (%ld, axis 2 of 'q') must be a multiple of the "
                     "number of kv heads (%ld, axis 2 of 'k')",
                     c->fn, (long)NH, (long)NKV);
        return -1;
    }
    if (cst_n(c, 'S') < 1) {
        PyErr_Format(PyExc_ValueError, "%s: head size (axis 3 of 'q') must be >= 1", c->fn);
        return -1;
    }
    return 0;
}

static void run_attention_forward(cst_call *c) {
    cst_attention_forward(c->v[0].p, c->v[1].p, c->v[2].p, c->v[3].p, c->v[4].p, c->v[5].p, cst_n(c, 'B'),
                          cst_n(c, 'T'), cst_n(c, 'H'), cst_n(c, 'K'), cst_n(c, 'S'));
}

static void run_attention_backward(cst_call *c) {
    cst_attention_backward(c->v[0].p, c->v[1].p, c->v[2].p, c->v[3].p, c->v[4].p, c->v[5].p, c->v[6].p,
                           c->v[7].p, c->v[8].p, c->v[9].p, cst_n(c, 'B'), cst_n(c, 'T'), cst_n(c, 'H'),
                           cst_n(c, 'K'), cst_n(c, 'S'));
}

#define LENGTHS {"lengths", CST_I32, "B", CST_NONE, .def = "None", .range = "[1, T]"}

const cst_entry cst_attention_entries[] = {
    {"attention_forward", run_attention_forward,
     {{"out", CST_F32, "BTHS", CST_WRITE},
      {"lse", CST_F32, "BHT", CST_WRITE},
      {"q", CST_F32, "BTHS", CST_FIRST},
      {"k", CST_F32, "BTKS"},
      {"v", CST_F32, "BTKS"},
      LENGTHS},
     .check = check_heads,
     .doc = "causal GQA attention over the first lengths[b] positions (all T when None); writes out and the row "
            "log-sum-exp lse that backward needs. Padded query rows give 0."},
    {"attention_backward", run_attention_backward,
     {{"dq", CST_F32, "BTHS", CST_WRITE | CST_EXCLUSIVE},
      {"dk", CST_F32, "BTKS", CST_WRITE | CST_EXCLUSIVE},
      {"dv", CST_F32, "BTKS", CST_WRITE | CST_EXCLUSIVE},
      {"dout", CST_F32, "BTHS"},
      {"out", CST_F32, "BTHS"},
      {"lse", CST_F32, "BHT"},
      {"q", CST_F32, "BTHS", CST_FIRST},
      {"k", CST_F32, "BTKS", CST_FIRST},
      {"v", CST_F32, "BTKS"},
      LENGTHS},
     .check = check_heads,
     .doc = "adds the gradients into dq, dk and dv."},
    {NULL},
};
