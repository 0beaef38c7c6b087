/* dpo.c: DPO-family pair losses (sigmoid/cDPO, IPO, hinge, following TRL's DPOTrainer.dpo_loss) with
 * their gradients, and the masked sequence log-prob reduction (see dpo.h). Not the policy/reference
 * forward passes and not the optimizer: this file starts from per-token log-probs. */
#include "glue.h"
#include "dpo.h"
#include <math.h>
#include <stdio.h>
#include <string.h>

/* ---- kernels ---- */

static inline double mask_at(const float *mf, const uint8_t *mu, size_t i) {
    return mf ? (double)mf[i] : (double)(mu[i] != 0);
}

/* Below this many tokens a parallel region costs more than the sum (microseconds of work, while
 * waking threads on a busy machine was measured at ~2 ms per call). */
#define SEQ_PARALLEL_MIN ((size_t)1 << 18)

void cst_seq_logps_forward(double *out, const float *token_logp, const float *mask_f32,
                           const uint8_t *mask_u8, int64_t B, int64_t T, int average) {
#pragma omp parallel for schedule(static) if ((size_t)B * (size_t)T >= SEQ_PARALLEL_MIN)
    for (int64_t b = 0; b < B; b++) {
        /* One thread owns a row and sums it left to right in double: a 512-token sum of log-probs
         * around -10 each loses ~3 digits in float, and the order is fixed for any thread count. */
        const size_t row = (size_t)b * (size_t)T;
        double s = 0.0, w = 0.0;
        for (int64_t t = 0; t < T; t++) {
            const double m = mask_at(mask_f32, mask_u8, row + (size_t)t);
            if (m != 0.0) { /* skip, not multiply: padding may hold -inf, and 0 * -inf is NaN */
                s += m * (double)token_logp[row + (size_t)t];
                w += m;
            }
        }
        out[b] = average ? (w != 0.0 ? s / w : 0.0) : s;
    }
}

void cst_seq_logps_backward(float *dtoken_logp, const double *dout, const float *mask_f32,
                            const uint8_t *mask_u8, int64_t B, int64_t T, int average) {
#pragma omp parallel for schedule(static) if ((size_t)B * (size_t)T >= SEQ_PARALLEL_MIN)
    for (int64_t b = 0; b < B; b++) {
        const size_t row = (size_t)b * (size_t)T;
        double g = dout[b];
        if (average) {
            double w = 0.0;
            for (int64_t t = 0; t < T; t++) w += mask_at(mask_f32, mask_u8, row + (size_t)t);
            g = w != 0.0 ? g / w : 0.0;
        }
        for (int64_t t = 0; t < T; t++) {
            const double m = mask_at(mask_f32, mask_u8, row + (size_t)t);
            if (m != 0.0) dtoken_logp[row + (size_t)t] += (float)(g * m);
        }
    }
}

/* softplus(x) = log(1 + e^x) = -logsigmoid(-x), in the form that never overflows: for x = 1e6 the
 * naive log1p(exp(x)) is inf, while max(x, 0) + log1p(exp(-|x|)) is exactly x. */
static inline double softplus(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }

/* sigmoid(x) without overflow: exp of a non-positive argument only. */
static inline double sigmoid(double x) {
    if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
    const double e = exp(x);
    return e / (1.0 + e);
}

/* TRL's operation order, (pc - pr) - (rc - rr), so that rounding matches its logits bit for bit. */
static inline double pair_logits(const double *pc, const double *pr, const double *rc,
                                 const double *rr, int64_t i) {
    return (pc[i] - pr[i]) - (rc[i] - rr[i]);
}

void cst_dpo_loss_forward(double *losses, double *chosen_rewards, double *rejected_rewards,
                          const double *policy_chosen, const double *policy_rejected,
                          const double *ref_chosen, const double *ref_rejected, int64_t P,
                          double beta, cst_loss_type loss_type, double label_smoothing) {
#pragma omp parallel for schedule(static) if (P > 4096)
    for (int64_t i = 0; i < P; i++) {
        if (losses) {
            const double l = pair_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, i);
            double loss;
            switch (loss_type) {
            case CST_LOSS_IPO: {
                const double d = l - 1.0 / (2.0 * beta);
                loss = d * d;
                break;
            }
            case CST_LOSS_HINGE:
                loss = fmax(0.0, 1.0 - beta * l);
                break;
            default: {
                const double z = beta * l;
                /* -logsigmoid(z) = softplus(-z). The smoothing term is skipped, not multiplied by
                 * zero, so an overflowing softplus can never turn into 0 * inf = NaN. */
                loss = (1.0 - label_smoothing) * softplus(-z);
                if (label_smoothing != 0.0) loss += label_smoothing * softplus(z);
                break;
            }
            }
            losses[i] = loss;
        }
        if (chosen_rewards) chosen_rewards[i] = beta * (policy_chosen[i] - ref_chosen[i]);
        if (rejected_rewards) rejected_rewards[i] = beta * (policy_rejected[i] - ref_rejected[i]);
    }
}

void cst_dpo_loss_backward(double *dpolicy_chosen, double *dpolicy_rejected, const double *dlosses,
                           const double *policy_chosen, const double *policy_rejected,
                           const double *ref_chosen, const double *ref_rejected, int64_t P,
                           double beta, cst_loss_type loss_type, double label_smoothing) {
#pragma omp parallel for schedule(static) if (P > 4096)
    for (int64_t i = 0; i < P; i++) {
        const double l = pair_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, i);
        double dl; /* d loss_i / d logits_i; logits has slope +1 in pc and -1 in pr */
        switch (loss_type) {
        case CST_LOSS_IPO:
            dl = 2.0 * (l - 1.0 / (2.0 * beta));
            break;
        case CST_LOSS_HINGE:
            dl = (1.0 - beta * l > 0.0) ? -beta : 0.0; /* torch.relu's subgradient at 0 is 0 */
            break;
        default: {
            const double z = beta * l;
            dl = -(1.0 - label_smoothing) * sigmoid(-z);
            if (label_smoothing != 0.0) dl += label_smoothing * sigmoid(z);
            dl *= beta;
            break;
        }
        }
        const double g = dlosses ? dlosses[i] * dl : dl;
        if (dpolicy_chosen) dpolicy_chosen[i] += g;
        if (dpolicy_rejected) dpolicy_rejected[i] -= g;
    }
}

/* ---- Python boundary ---- */

/* The mask may be float32 (weights, >= 0) or uint8/bool (0 = ignore). Binds B and T. */
static int mask_arg(const char *fn, PyObject *obj, cst_dims *d, const float **mf, const uint8_t **mu) {
    *mf = NULL;
    *mu = NULL;
    int type = PyArray_Check(obj) ? PyArray_TYPE((PyArrayObject *)obj) : NPY_FLOAT32;
    void *p;
    if (type == NPY_FLOAT32) {
        if (cst_arg(fn, "mask", obj, NPY_FLOAT32, "BT", d, 0, &p) < 0) return -1;
        *mf = p;
        const size_t n = (size_t)cst_dim(d, 'B') * (size_t)cst_dim(d, 'T');
        for (size_t i = 0; i < n; i++)
            if (!(isfinite((*mf)[i]) && (*mf)[i] >= 0.0f)) {
                char v[32];
                snprintf(v, sizeof v, "%.9g", (double)(*mf)[i]);
                PyErr_Format(PyExc_ValueError,
                             "%s: 'mask' must be finite and >= 0, got %s at flat index %zu", fn, v, i);
                return -1;
            }
        return 0;
    }
    if (type == NPY_UINT8 || type == NPY_BOOL) {
        if (cst_arg(fn, "mask", obj, type, "BT", d, 0, &p) < 0) return -1;
        *mu = p;
        return 0;
    }
    PyArray_Descr *got = PyArray_DESCR((PyArrayObject *)obj);
    PyErr_Format(PyExc_TypeError, "%s: 'mask' must have dtype float32, uint8 or bool, got %S", fn,
                 (PyObject *)got);
    return -1;
}

/* Averaging divides by the row's mask sum: an empty row has no average, so reject it by name. */
static int check_rows_nonempty(const char *fn, const float *mf, const uint8_t *mu, int64_t B,
                               int64_t T) {
    for (int64_t b = 0; b < B; b++) {
        double w = 0.0;
        for (int64_t t = 0; t < T; t++) w += mask_at(mf, mu, (size_t)b * (size_t)T + (size_t)t);
        if (w == 0.0) {
            PyErr_Format(PyExc_ValueError,
                         "%s: 'mask' row %lld selects no tokens, so its average log-prob is undefined",
                         fn, (long long)b);
            return -1;
        }
    }
    return 0;
}

static PyObject *py_seq_logps_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *fn = "seq_logps_forward";
    static char *kwlist[] = {"out", "token_logp", "mask", "average", NULL};
    PyObject *o_out, *o_lp, *o_mask;
    int average = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|p:seq_logps_forward", kwlist, &o_out, &o_lp,
                                     &o_mask, &average))
        return NULL;
    cst_dims d;
    cst_dims_init(&d);
    void *out, *lp;
    const float *mf;
    const uint8_t *mu;
    if (cst_arg(fn, "token_logp", o_lp, NPY_FLOAT32, "BT", &d, 0, &lp) < 0 ||
        mask_arg(fn, o_mask, &d, &mf, &mu) < 0 ||
        cst_arg(fn, "out", o_out, NPY_FLOAT64, "B", &d, CST_WRITE, &out) < 0)
        return NULL;
    int64_t B = cst_dim(&d, 'B'), T = cst_dim(&d, 'T');
    if (average && check_rows_nonempty(fn, mf, mu, B, T) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    cst_seq_logps_forward(out, lp, mf, mu, B, T, average);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_seq_logps_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *fn = "seq_logps_backward";
    static char *kwlist[] = {"dtoken_logp", "dout", "mask", "average", NULL};
    PyObject *o_dlp, *o_dout, *o_mask;
    int average = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|p:seq_logps_backward", kwlist, &o_dlp, &o_dout,
                                     &o_mask, &average))
        return NULL;
    cst_dims d;
    cst_dims_init(&d);
    void *dlp, *dout;
    const float *mf;
    const uint8_t *mu;
    if (cst_arg(fn, "dtoken_logp", o_dlp, NPY_FLOAT32, "BT", &d, CST_WRITE, &dlp) < 0 ||
        cst_arg(fn, "dout", o_dout, NPY_FLOAT64, "B", &d, 0, &dout) < 0 ||
        mask_arg(fn, o_mask, &d, &mf, &mu) < 0)
        return NULL;
    int64_t B = cst_dim(&d, 'B'), T = cst_dim(&d, 'T');
    if (average && check_rows_nonempty(fn, mf, mu, B, T) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    cst_seq_logps_backward(dlp, dout, mf, mu, B, T, average);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The scalar hyper-parameters shared by every dpo_loss entry point. */
typedef struct {
    double beta, label_smoothing;
    cst_loss_type type;
} dpo_params;

static int parse_dpo_params(const char *fn, double beta, const char *loss_type, double ls,
                            dpo_params *p) {
    char v[32];
    if (!(isfinite(beta) && beta > 0.0)) {
        snprintf(v, sizeof v, "%.17g", beta);
        PyErr_Format(PyExc_ValueError, "%s: 'beta' must be finite and > 0, got %s", fn, v);
        return -1;
    }
    if (!(ls >= 0.0 && ls <= 0.5)) {
        snprintf(v, sizeof v, "%.17g", ls);
        PyErr_Format(PyExc_ValueError, "%s: 'label_smoothing' must be in [0, 0.5], got %s", fn, v);
        return -1;
    }
    if (!strcmp(loss_type, "sigmoid"))
        p->type = CST_LOSS_SIGMOID;
    else if (!strcmp(loss_type, "ipo"))
        p->type = CST_LOSS_IPO;
    else if (!strcmp(loss_type, "hinge"))
        p->type = CST_LOSS_HINGE;
    else {
        PyErr_Format(PyExc_ValueError,
                     "%s: 'loss_type' must be 'sigmoid', 'ipo' or 'hinge', got '%s'", fn, loss_type);
        return -1;
    }
    p->beta = beta;
    p->label_smoothing = ls;
    return 0;
}

static int check_finite_f64(const char *fn, const char *name, const double *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) {
            char v[32];
            snprintf(v, sizeof v, "%g", x[i]);
            PyErr_Format(PyExc_ValueError, "%s: '%s' must be finite, got %s at index %lld", fn, name,
                         v, (long long)i);
            return -1;
        }
    return 0;
}

/* Validates the four (P) float64 sequence log-prob inputs; binds P. */
static int pair_inputs(const char *fn, PyObject *const o[4], cst_dims *d, const double *x[4]) {
    static const char *names[4] = {"policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"};
    for (int k = 0; k < 4; k++) {
        void *p;
        if (cst_arg(fn, names[k], o[k], NPY_FLOAT64, "P", d, 0, &p) < 0) return -1;
        x[k] = p;
    }
    for (int k = 0; k < 4; k++)
        if (check_finite_f64(fn, names[k], x[k], cst_dim(d, 'P')) < 0) return -1;
    return 0;
}

static PyObject *py_dpo_loss_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *fn = "dpo_loss_forward";
    static char *kwlist[] = {"losses", "chosen_rewards", "rejected_rewards", "policy_chosen",
                             "policy_rejected", "ref_chosen", "ref_rejected", "beta", "loss_type",
                             "label_smoothing", NULL};
    PyObject *o_l, *o_cr, *o_rr, *o_in[4];
    double beta, ls = 0.0;
    const char *type = "sigmoid";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOd|sd:dpo_loss_forward", kwlist, &o_l, &o_cr,
                                     &o_rr, &o_in[0], &o_in[1], &o_in[2], &o_in[3], &beta, &type,
                                     &ls))
        return NULL;
    dpo_params prm;
    if (parse_dpo_params(fn, beta, type, ls, &prm) < 0) return NULL;
    cst_dims d;
    cst_dims_init(&d);
    const double *x[4];
    void *l, *cr, *rr;
    if (pair_inputs(fn, o_in, &d, x) < 0 ||
        cst_arg(fn, "losses", o_l, NPY_FLOAT64, "P", &d, CST_WRITE | CST_OPTIONAL, &l) < 0 ||
        cst_arg(fn, "chosen_rewards", o_cr, NPY_FLOAT64, "P", &d, CST_WRITE | CST_OPTIONAL, &cr) < 0 ||
        cst_arg(fn, "rejected_rewards", o_rr, NPY_FLOAT64, "P", &d, CST_WRITE | CST_OPTIONAL, &rr) < 0)
        return NULL;
    int64_t P = cst_dim(&d, 'P');
    Py_BEGIN_ALLOW_THREADS
    cst_dpo_loss_forward(l, cr, rr, x[0], x[1], x[2], x[3], P, prm.beta, prm.type,
                         prm.label_smoothing);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_dpo_loss_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *fn = "dpo_loss_backward";
    static char *kwlist[] = {"dpolicy_chosen", "dpolicy_rejected", "dlosses", "policy_chosen",
                             "policy_rejected", "ref_chosen", "ref_rejected", "beta", "loss_type",
                             "label_smoothing", NULL};
    PyObject *o_dc, *o_dr, *o_dl, *o_in[4];
    double beta, ls = 0.0;
    const char *type = "sigmoid";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOd|sd:dpo_loss_backward", kwlist, &o_dc, &o_dr,
                                     &o_dl, &o_in[0], &o_in[1], &o_in[2], &o_in[3], &beta, &type,
                                     &ls))
        return NULL;
    dpo_params prm;
    if (parse_dpo_params(fn, beta, type, ls, &prm) < 0) return NULL;
    cst_dims d;
    cst_dims_init(&d);
    const double *x[4];
    void *dc, *dr, *dl;
    if (pair_inputs(fn, o_in, &d, x) < 0 ||
        cst_arg(fn, "dlosses", o_dl, NPY_FLOAT64, "P", &d, CST_OPTIONAL, &dl) < 0 ||
        cst_arg(fn, "dpolicy_chosen", o_dc, NPY_FLOAT64, "P", &d, CST_WRITE | CST_OPTIONAL, &dc) < 0 ||
        cst_arg(fn, "dpolicy_rejected", o_dr, NPY_FLOAT64, "P", &d, CST_WRITE | CST_OPTIONAL, &dr) < 0)
        return NULL;
    int64_t P = cst_dim(&d, 'P');
    if (dl && check_finite_f64(fn, "dlosses", dl, P) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    cst_dpo_loss_backward(dc, dr, dl, x[0], x[1], x[2], x[3], P, prm.beta, prm.type,
                          prm.label_smoothing);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Everything a training step needs in one call: per-pair losses, rewards and per-pair gradients
 * (overwritten, not accumulated: this is where the backward chain starts). */
static PyObject *py_dpo_loss(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *fn = "dpo_loss";
    static char *kwlist[] = {"losses", "chosen_rewards", "rejected_rewards", "grad_chosen",
                             "grad_rejected", "policy_chosen", "policy_rejected", "ref_chosen",
                             "ref_rejected", "beta", "loss_type", "label_smoothing", NULL};
    PyObject *o_l, *o_cr, *o_rr, *o_gc, *o_gr, *o_in[4];
    double beta, ls = 0.0;
    const char *type = "sigmoid";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOOOd|sd:dpo_loss", kwlist, &o_l, &o_cr, &o_rr,
                                     &o_gc, &o_gr, &o_in[0], &o_in[1], &o_in[2], &o_in[3], &beta,
                                     &type, &ls))
        return NULL;
    dpo_params prm;
    if (parse_dpo_params(fn, beta, type, ls, &prm) < 0) return NULL;
    cst_dims d;
    cst_dims_init(&d);
    const double *x[4];
    void *l, *cr, *rr, *gc, *gr;
    if (pair_inputs(fn, o_in, &d, x) < 0 ||
        cst_arg(fn, "losses", o_l, NPY_FLOAT64, "P", &d, CST_WRITE, &l) < 0 ||
        cst_arg(fn, "chosen_rewards", o_cr, NPY_FLOAT64, "P", &d, CST_WRITE, &cr) < 0 ||
        cst_arg(fn, "rejected_rewards", o_rr, NPY_FLOAT64, "P", &d, CST_WRITE, &rr) < 0 ||
        cst_arg(fn, "grad_chosen", o_gc, NPY_FLOAT64, "P", &d, CST_WRITE, &gc) < 0 ||
        cst_arg(fn, "grad_rejected", o_gr, NPY_FLOAT64, "P", &d, CST_WRITE, &gr) < 0)
        return NULL;
    int64_t P = cst_dim(&d, 'P');
    Py_BEGIN_ALLOW_THREADS
    cst_dpo_loss_forward(l, cr, rr, x[0], x[1], x[2], x[3], P, prm.beta, prm.type,
                         prm.label_smoothing);
    memset(gc, 0, (size_t)P * sizeof(double));
    memset(gr, 0, (size_t)P * sizeof(double));
    cst_dpo_loss_backward(gc, gr, NULL, x[0], x[1], x[2], x[3], P, prm.beta, prm.type,
                          prm.label_smoothing);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyMethodDef cst_dpo_methods[] = {
    {"seq_logps_forward", (PyCFunction)(void (*)(void))py_seq_logps_forward,
     METH_VARARGS | METH_KEYWORDS,
     "seq_logps_forward(out, token_logp, mask, average=False): out (B,) float64 = sum over t of "
     "mask*token_logp (B,T) float32 (mask float32 >= 0, uint8 or bool); average divides by the "
     "row's mask sum (rows with no tokens are rejected)."},
    {"seq_logps_backward", (PyCFunction)(void (*)(void))py_seq_logps_backward,
     METH_VARARGS | METH_KEYWORDS,
     "seq_logps_backward(dtoken_logp, dout, mask, average=False): dtoken_logp (B,T) float32 += "
     "dout (B,) float64 * mask (/ row mask sum when average)."},
    {"dpo_loss_forward", (PyCFunction)(void (*)(void))py_dpo_loss_forward,
     METH_VARARGS | METH_KEYWORDS,
     "dpo_loss_forward(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected, "
     "ref_chosen, ref_rejected, beta, loss_type='sigmoid', label_smoothing=0.0): per-pair losses "
     "and rewards, all (P,) float64; outputs may be None."},
    {"dpo_loss_backward", (PyCFunction)(void (*)(void))py_dpo_loss_backward,
     METH_VARARGS | METH_KEYWORDS,
     "dpo_loss_backward(dpolicy_chosen, dpolicy_rejected, dlosses, policy_chosen, policy_rejected, "
     "ref_chosen, ref_rejected, beta, loss_type='sigmoid', label_smoothing=0.0): adds "
     "dlosses * d loss / d policy_{chosen,rejected} (dlosses None = ones; grads may be None)."},
    {"dpo_loss", (PyCFunction)(void (*)(void))py_dpo_loss, METH_VARARGS | METH_KEYWORDS,
     "dpo_loss(losses, chosen_rewards, rejected_rewards, grad_chosen, grad_rejected, policy_chosen, "
     "policy_rejected, ref_chosen, ref_rejected, beta, loss_type='sigmoid', label_smoothing=0.0): "
     "writes per-pair losses, rewards and d loss_i / d policy_{chosen,rejected}_i in one call."},
    {NULL, NULL, 0, NULL},
};
