/* python/matmul.c: the entry rows of the linear-layer products (matmul.h). Boundary only: no arithmetic. */
#include "glue.h"
#include "matmul.h"

static void run_matmul_forward(cst_call *c) {
    cst_matmul_forward(c->v[0].p, c->v[1].p, c->v[2].p, cst_n(c, 'N'), cst_n(c, 'C'), cst_n(c, 'O'),
                       (int)c->v[3].i);
}

static void run_matmul_backward(cst_call *c) {
    cst_matmul_backward(c->v[0].p, c->v[1].p, c->v[2].p, c->v[3].p, c->v[4].p, cst_n(c, 'N'), cst_n(c, 'C'),
                        cst_n(c, 'O'));
}

const cst_entry cst_matmul_entries[] = {
    {"matmul_forward", run_matmul_forward,
     {{"out", CST_F32, "NO", CST_WRITE},
      {"inp", CST_F32, "NC", CST_FIRST},
      {"weight", CST_F32, "OC"},
      {"accumulate", CST_FLAG, .def = "False"}},
     .doc = "out (N,OC) = inp (N,C) @ weight (OC,C)^T."},
    {"matmul_backward", run_matmul_backward,
     {{"dinp", CST_F32, "NC", CST_WRITE | CST_NONE},
      {"dweight", CST_F32, "OC", CST_WRITE | CST_NONE},
      {"dout", CST_F32, "NO"},
      {"inp", CST_F32, "NC", CST_FIRST},
      {"weight", CST_F32, "OC", CST_FIRST}},
     .doc = "dinp += dout @ weight; dweight += dout^T @ inp "
            "(either output may be None)."},
    {NULL},
};
