/* python/qdot.c: the entry rows of the quantised products (qdot.h): the int8 input quantisation and
 * the product against raw GGUF blocks, as generation uses them inside gen_forward. Boundary only. */
#include "glue.h"
#include "qdot.h"
#include "quant.h"

static void run_q8_quantize(cst_call *c) {
    cst_q8_quantize(c->v[0].p, c->v[1].p, c->v[2].p, c->v[3].p, cst_n(c, 'N'), cst_n(c, 'K'));
}

/* The weights must be whole rows of blocks of a type the product reads. */
static int check_qmatvec(cst_call *c) {
    const int type = (int)c->v[5].i;
    int64_t be, bb;
    if (!cst_qdot_supported(type) || !cst_quant_block_info(type, &be, &bb)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: ggml type_id %d is not one qmatvec reads (Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12, "
                     "Q5_K 13, Q6_K 14)",
                     c->fn, type);
        return -1;
    }
    if (cst_n(c, 'K') % be) {
        PyErr_Format(PyExc_ValueError, "%s: K = %lld is not a multiple of %s's %lld weights per block", c->fn,
                     (long long)cst_n(c, 'K'), cst_quant_type_name(type), (long long)be);
        return -1;
    }
    const int64_t need = cst_n(c, 'O') * (cst_n(c, 'K') / be) * bb;
    if ((int64_t)c->size[1] != need) {
        PyErr_Format(PyExc_ValueError, "%s: 'w' has %lld bytes, %lld rows of %lld %s values need %lld", c->fn,
                     (long long)c->size[1], (long long)cst_n(c, 'O'), (long long)cst_n(c, 'K'),
                     cst_quant_type_name(type), (long long)need);
        return -1;
    }
    return 0;
}

static void run_qmatvec(cst_call *c) {
    cst_qmatvec(c->v[0].p, c->v[1].p, (int)c->v[5].i, c->v[2].p, c->v[3].p, c->v[4].p, cst_n(c, 'N'),
                cst_n(c, 'K'), cst_n(c, 'O'), cst_n(c, 'O'), (int)c->v[6].i);
}

const cst_entry cst_qdot_entries[] = {
    {"q8_quantize", run_q8_quantize,
     {{"q", CST_U8, "NK", CST_WRITE | CST_EXCLUSIVE},
      {"d", CST_F32, "NB", CST_WRITE | CST_EXCLUSIVE},
      {"s", CST_F32, "NB", CST_WRITE | CST_EXCLUSIVE},
      {"x", CST_F32, "NK", CST_FIRST | CST_FINITE}},
     .derive = "B=K/32",
     .doc = "x (N,K) float32, K % 32 == 0 -> int8 blocks of 32: q (N,K) (int8 bits in uint8), scales d "
            "(N,K/32) = max|x|/127 and s = d * sum(q) per block; the inputs of qmatvec."},
    {"qmatvec", run_qmatvec,
     {{"out", CST_F32, "NO", CST_WRITE | CST_EXCLUSIVE},
      {"w", CST_U8, "*"},
      {"q", CST_U8, "NK", CST_FIRST},
      {"d", CST_F32, "NB"},
      {"s", CST_F32, "NB"},
      {"type_id", CST_INT64, .range = "[0, 2147483647]"},
      {"accumulate", CST_FLAG, .def = "False"}},
     .derive = "B=K/32", .check = check_qmatvec,
     .doc = "out (N,O) (+)= the product of the q8_quantize'd rows (q, d, s) with the weights w: O rows of "
            "K/32 raw GGUF blocks of type_id (Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8; or K/256 super-blocks of "
            "Q4_K 12, Q5_K 13, Q6_K 14), "
            "read without dequantising."},
    {NULL},
};
