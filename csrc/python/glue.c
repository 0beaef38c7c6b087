/* glue.c: the one argument parser of the NumPy boundary (see glue.h): converts and validates the
 * arguments an entry descriptor lists, then calls its kernel without the GIL. Raises, never aborts. */
#include "glue.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void cst_dims_init(cst_dims *d) {
    for (int i = 0; i < 26; i++) {
        d->v[i] = -1;
        d->bound_by[i] = NULL;
    }
}

void cst_dims_set(cst_dims *d, char letter, npy_intp value, const char *why) {
    d->v[letter - 'A'] = value;
    d->bound_by[letter - 'A'] = why;
}

static void shape_str(char *buf, size_t n, PyArrayObject *a) {
    size_t used = 0;
    used += (size_t)snprintf(buf + used, n - used, "(");
    for (int i = 0; i < PyArray_NDIM(a) && used < n; i++)
        used += (size_t)snprintf(buf + used, n - used, i ? ", %ld" : "%ld", (long)PyArray_DIM(a, i));
    if (used < n) snprintf(buf + used, n - used, ")");
}

int cst_arg(const char *fn, const char *name, PyObject *obj, int typenum, const char *spec,
            cst_dims *d, int flags, void **data) {
    *data = NULL;
    if (obj == Py_None && (flags & CST_NONE)) return 0;
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: '%s' must be a numpy.ndarray, got %s", fn, name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum) {
        PyArray_Descr *want = PyArray_DescrFromType(typenum);
        PyErr_Format(PyExc_TypeError, "%s: '%s' must have dtype %S, got %S", fn, name,
                     (PyObject *)want, (PyObject *)PyArray_DESCR(a));
        Py_XDECREF(want);
        return -1;
    }
    const int ndim = strcmp(spec, "*") ? (int)strlen(spec) : -1; /* "*": any shape, a flat buffer */
    char shp[256];
    if (ndim >= 0 && PyArray_NDIM(a) != ndim) {
        shape_str(shp, sizeof shp, a);
        PyErr_Format(PyExc_ValueError, "%s: '%s' must have %d dimensions (%s), got shape %s", fn,
                     name, ndim, spec, shp);
        return -1;
    }
    for (int i = 0; i < ndim; i++) {
        int k = spec[i] - 'A';
        npy_intp got = PyArray_DIM(a, i);
        if (d->v[k] < 0) {
            d->v[k] = got;
            d->bound_by[k] = name;
        } else if (d->v[k] != got) {
            shape_str(shp, sizeof shp, a);
            PyErr_Format(PyExc_ValueError,
                         "%s: '%s' has shape %s, but its axis %d (%c) must be %ld to match '%s'", fn,
                         name, shp, i, spec[i], (long)d->v[k],
                         d->bound_by[k] ? d->bound_by[k] : "the other arguments");
            return -1;
        }
    }
    if (!PyArray_IS_C_CONTIGUOUS(a)) {
        PyErr_Format(PyExc_ValueError, "%s: '%s' must be C-contiguous (use np.ascontiguousarray)",
                     fn, name);
        return -1;
    }
    if (!PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s: '%s' must be aligned", fn, name);
        return -1;
    }
    if ((flags & CST_WRITE) && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s: '%s' must be writeable", fn, name);
        return -1;
    }
    *data = PyArray_DATA(a);
    return 0;
}

int cst_check_range_i32(const char *fn, const char *name, const int32_t *ids, npy_intp n,
                        int64_t lo, int64_t hi) {
    for (npy_intp i = 0; i < n; i++) {
        if (ids[i] < lo || ids[i] >= hi) {
            PyErr_Format(PyExc_ValueError, "%s: '%s' has value %d at flat index %ld, outside [%lld, %lld)",
                         fn, name, (int)ids[i], (long)i, (long long)lo, (long long)hi);
            return -1;
        }
    }
    return 0;
}

/* ---- the entry parser ---- */

static const struct {
    int bit, npy;
    const char *name;
} dtypes[] = {{CST_F32, NPY_FLOAT32, "float32"}, {CST_F64, NPY_FLOAT64, "float64"},
              {CST_I32, NPY_INT32, "int32"},     {CST_U8, NPY_UINT8, "uint8"},
              {CST_BOOL, NPY_BOOL, "bool"},      {CST_I64, NPY_INT64, "int64"},
              {CST_U16, NPY_UINT16, "uint16"}};
#define N_DTYPES (int)(sizeof dtypes / sizeof dtypes[0])

static int is_array(int kind) { return kind < CST_DOUBLE; }

/* Appends "'a', 'b' or 'c'" (quote "'") or "a, b or c" to out, for the words of the '|'-separated list. */
static void or_list(char *out, size_t cap, const char *words, const char *quote) {
    int left = 1;
    for (const char *q = words; *q; q++) left += *q == '|';
    for (const char *w = words; left > 0; left--) {
        const size_t n = strcspn(w, "|"), used = strlen(out);
        PyOS_snprintf(out + used, cap - used, "%s%.*s%s%s", quote, (int)n, w, quote,
                      left > 2 ? ", " : left == 2 ? " or " : "");
        w += n + (w[n] == '|');
    }
}

/* "float32|uint8|bool": the dtypes kind allows, as an or_list. */
static void dtype_names(char *out, size_t cap, int kind) {
    *out = 0;
    for (int k = 0; k < N_DTYPES; k++)
        if (kind & dtypes[k].bit)
            PyOS_snprintf(out + strlen(out), cap - strlen(out), "%s%s", *out ? "|" : "", dtypes[k].name);
}

/* The numpy type to check obj against: the array's own when kind allows several and it is one of them. */
static int pick_dtype(const cst_call *c, const cst_param *a, PyObject *obj, int *bit) {
    int first = -1;
    for (int k = 0; k < N_DTYPES; k++) {
        if (!(a->kind & dtypes[k].bit)) continue;
        if (first < 0) first = k;
        if (PyArray_Check(obj) && PyArray_TYPE((PyArrayObject *)obj) == dtypes[k].npy) {
            *bit = dtypes[k].bit;
            return dtypes[k].npy;
        }
    }
    if (a->kind != dtypes[first].bit && PyArray_Check(obj)) { /* several allowed, none matches */
        char names[64], list[96] = "";
        dtype_names(names, sizeof names, a->kind);
        or_list(list, sizeof list, names, "");
        PyErr_Format(PyExc_TypeError, "%s: '%s' must have dtype %s, got %S", c->fn, a->name, list,
                     (PyObject *)PyArray_DESCR((PyArrayObject *)obj));
        return -1;
    }
    *bit = dtypes[first].bit;
    return dtypes[first].npy;
}

/* Derived dimensions ("G=2F E=D/2"): each target is bound from its source as soon as the source is. */
static int apply_derived(cst_call *c, const char *rules) {
    for (const char *r = rules; r && *r;) {
        while (*r == ' ') r++;
        if (!*r) break;
        const char tgt = r[0];
        char *end;
        long mul = 1, div = 1;
        r += 2; /* "X=" */
        if (*r >= '0' && *r <= '9') mul = strtol(r, &end, 10), r = end;
        const char src = *r++;
        if (*r == '/') div = strtol(r + 1, &end, 10), r = end;
        const int t = tgt - 'A', s = src - 'A';
        if (c->d.v[t] >= 0 || c->d.v[s] < 0) continue;
        const char *by = c->d.bound_by[s] ? c->d.bound_by[s] : "the arguments";
        if (c->d.v[s] % div) {
            char must[32] = "even";
            if (div != 2) PyOS_snprintf(must, sizeof must, "a multiple of %ld", div);
            PyErr_Format(PyExc_ValueError, "%s: '%s' has %c = %ld, which must be %s", c->fn, by, src,
                         (long)c->d.v[s], must);
            return -1;
        }
        if (mul != 1)
            PyOS_snprintf(c->d.why[t], sizeof c->d.why[t], "%ld * %s's %c", mul, by, src);
        else
            PyOS_snprintf(c->d.why[t], sizeof c->d.why[t], "%s's %c / %ld", by, src, div);
        cst_dims_set(&c->d, tgt, c->d.v[s] * mul / div, c->d.why[t]);
    }
    return 0;
}

static int parse_array(cst_call *c, const cst_entry *e, int i) {
    const cst_param *a = &e->args[i];
    PyObject *o = c->obj[i];
    c->v[i].p = NULL;
    c->dtype[i] = 0;
    c->size[i] = 0;
    if (!o || (o == Py_None && (a->flags & CST_NONE))) return 0;
    int bit, npy = pick_dtype(c, a, o, &bit);
    if (npy < 0 || cst_arg(c->fn, a->name, o, npy, a->dims, &c->d, a->flags, &c->v[i].p) < 0) return -1;
    c->dtype[i] = bit;
    c->size[i] = PyArray_SIZE((PyArrayObject *)o);
    return apply_derived(c, e->derive);
}

static int type_error(const cst_call *c, const cst_param *a, const char *what, PyObject *o) {
    PyErr_Format(PyExc_TypeError, "%s: '%s' must be %s, got %s", c->fn, a->name, what,
                 Py_TYPE(o)->tp_name);
    return -1;
}

/* Scalars convert as PyArg_ParseTuple's d, L, p, s and O would; omitted ones take a->def. */
static int parse_scalar(cst_call *c, const cst_param *a, int i) {
    PyObject *o = c->obj[i];
    cst_value *v = &c->v[i];
    if (!o) {
        switch (a->kind) {
        case CST_DOUBLE: v->f = strtod(a->def, NULL); break;
        case CST_FLAG: v->i = !strcmp(a->def, "True"); break;
        case CST_STR:
        case CST_CHOICE: v->s = a->def; break;
        case CST_OBJECT: v->p = Py_None; break;
        default: v->i = strtoll(a->def, NULL, 10); break;
        }
        return 0;
    }
    switch (a->kind) {
    case CST_DOUBLE:
        v->f = PyFloat_AsDouble(o);
        if (v->f == -1.0 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError)) return -1;
            PyErr_Clear();
            return type_error(c, a, "a real number", o);
        }
        return 0;
    case CST_INT64:
        if (!PyIndex_Check(o)) return type_error(c, a, "an integer", o);
        v->i = PyLong_AsLongLong(o);
        return v->i == -1 && PyErr_Occurred() ? -1 : 0;
    case CST_FLAG: {
        const int t = PyObject_IsTrue(o);
        v->i = t;
        return t < 0 ? -1 : 0;
    }
    case CST_STR:
    case CST_CHOICE: {
        if (!PyUnicode_Check(o)) return type_error(c, a, "a str", o);
        Py_ssize_t n;
        v->s = PyUnicode_AsUTF8AndSize(o, &n);
        if (!v->s) return -1;
        if ((Py_ssize_t)strlen(v->s) != n) {
            PyErr_Format(PyExc_ValueError, "%s: '%s' contains a null character", c->fn, a->name);
            return -1;
        }
        return 0;
    }
    default: v->p = o; return 0;
    }
}

/* A range ("[0, V)", "(0, 0.5]", "> 0", ">= 1"): its bounds, each a number or a letter with "+k". */
typedef struct {
    double lo, hi;
    int lo_in, hi_in;
} range;

static double bound_value(const cst_call *c, const char *s, const char **end) {
    while (*s == ' ') s++;
    if (*s >= 'A' && *s <= 'Z') {
        double x = (double)cst_n(c, *s++);
        if (*s == '+') x += strtod(s + 1, (char **)&s);
        *end = s;
        return x;
    }
    return strtod(s, (char **)end);
}

static range parse_range(const cst_call *c, const char *s) {
    range r = {-INFINITY, INFINITY, 0, 0};
    const char *p;
    if (s[0] == '>') {
        r.lo_in = s[1] == '=';
        r.lo = bound_value(c, s + 1 + r.lo_in, &p);
        return r;
    }
    r.lo_in = s[0] == '[';
    r.lo = bound_value(c, s + 1, &p);
    r.hi = bound_value(c, p + 1, &p);
    r.hi_in = *p == ']';
    return r;
}

static int in_range(range r, double x) {
    return (r.lo_in ? x >= r.lo : x > r.lo) && (r.hi_in ? x <= r.hi : x < r.hi);
}

/* Scalar constraints: finiteness, a range, a choice among words. */
static int check_scalar(cst_call *c, const cst_param *a, int i) {
    cst_value *v = &c->v[i];
    if (a->kind == CST_CHOICE) {
        const char *w = a->range;
        for (int k = 0; *w; k++) {
            const size_t n = strcspn(w, "|");
            if (strlen(v->s) == n && !strncmp(v->s, w, n)) {
                v->i = k;
                return 0;
            }
            w += n + (w[n] == '|');
        }
        char words[128] = "";
        or_list(words, sizeof words, a->range, "'");
        PyErr_Format(PyExc_ValueError, "%s: '%s' must be %s, got '%s'", c->fn, a->name, words, v->s);
        return -1;
    }
    if (a->kind == CST_DOUBLE && ((a->flags & CST_FINITE) || a->range) &&
        !(isfinite(v->f) && (!a->range || in_range(parse_range(c, a->range), v->f)))) {
        PyObject *x = PyFloat_FromDouble(v->f);
        if (x && a->range)
            PyErr_Format(PyExc_ValueError, "%s: '%s' must be a finite number %s%s, got %R", c->fn, a->name,
                         a->range[0] == '>' ? "" : "in ", a->range, x);
        else if (x)
            PyErr_Format(PyExc_ValueError, "%s: '%s' must be finite, got %R", c->fn, a->name, x);
        Py_XDECREF(x);
        return -1;
    }
    if (a->kind == CST_INT64 && a->range &&
        !in_range(parse_range(c, a->range), (double)v->i)) {
        PyErr_Format(PyExc_ValueError, "%s: '%s' must be %s%s, got %lld", c->fn, a->name,
                     a->range[0] == '>' ? "" : "in ", a->range, v->i);
        return -1;
    }
    return 0;
}

/* Array values: an int32 range, finiteness. */
static int check_values(const cst_call *c, const cst_param *a, int i) {
    if (!c->v[i].p) return 0;
    if (a->range) {
        const range r = parse_range(c, a->range);
        const int64_t lo = (int64_t)r.lo + !r.lo_in;
        const int64_t hi = isfinite(r.hi) ? (int64_t)r.hi + r.hi_in : INT64_MAX;
        if (cst_check_range_i32(c->fn, a->name, c->v[i].p, c->size[i], lo, hi) < 0) return -1;
    }
    if (!(a->flags & CST_FINITE)) return 0;
    for (npy_intp k = 0; k < c->size[i]; k++) {
        const double x = c->dtype[i] == CST_F64 ? ((const double *)c->v[i].p)[k]
                                                : (double)((const float *)c->v[i].p)[k];
        if (!isfinite(x)) {
            char s[32];
            PyOS_snprintf(s, sizeof s, "%g", x);
            PyErr_Format(PyExc_ValueError, "%s: '%s' must be finite, got %s at index %lld", c->fn,
                         a->name, s, (long long)k);
            return -1;
        }
    }
    return 0;
}

static int overlaps(const cst_call *c, int i, int j) {
    const char *pa = c->v[i].p, *pb = c->v[j].p;
    if (!pa || !pb) return 0;
    const npy_intp na = PyArray_NBYTES((PyArrayObject *)c->obj[i]);
    const npy_intp nb = PyArray_NBYTES((PyArrayObject *)c->obj[j]);
    return na > 0 && nb > 0 && pa < pb + nb && pb < pa + na;
}

/* CST_EXCLUSIVE arrays share no memory with any other array argument: the one aliasing rule. */
static int check_aliasing(const cst_call *c, const cst_entry *e, int n) {
    for (int i = 0; i < n; i++) {
        if (!(e->args[i].flags & CST_EXCLUSIVE)) continue;
        for (int j = 0; j < n; j++) {
            if (j == i || !is_array(e->args[j].kind) || ((e->args[j].flags & CST_EXCLUSIVE) && j < i)) continue;
            if (overlaps(c, i, j)) {
                PyErr_Format(PyExc_ValueError,
                             "%s: '%s' must not be '%s' or share memory with it (the arrays a kernel "
                             "writes must be distinct from its other arguments)",
                             c->fn, e->args[i].name, e->args[j].name);
                return -1;
            }
        }
    }
    return 0;
}

/* The order arrays are checked in: CST_FIRST ones, then read-only ones, then written ones. */
static int check_rank(const cst_param *a) {
    return (a->flags & CST_FIRST) ? 0 : (a->flags & CST_WRITE) ? 2 : 1;
}

PyObject *cst_entry_call(const cst_entry *e, PyObject *args, PyObject *kw) {
    cst_call c;
    c.fn = e->name;
    cst_dims_init(&c.d);
    int n = 0, opt = -1;
    char fmt[CST_MAX_ARGS + 2 + 64], *f = fmt;
    char *kwlist[CST_MAX_ARGS + 1];
    for (; n < CST_MAX_ARGS && e->args[n].name; n++) {
        if (e->args[n].def && opt < 0) *f++ = '|', opt = n;
        *f++ = 'O';
        kwlist[n] = (char *)e->args[n].name;
        c.obj[n] = NULL;
    }
    kwlist[n] = NULL;
    PyOS_snprintf(f, sizeof fmt - (size_t)(f - fmt), ":%s", e->name);
    PyObject **o = c.obj;
    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwlist, &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                                     &o[7], &o[8], &o[9], &o[10], &o[11], &o[12], &o[13], &o[14], &o[15]))
        return NULL;
    for (int i = 0; i < n; i++) {
        const cst_param *a = &e->args[i];
        if (!is_array(a->kind) && (parse_scalar(&c, a, i) < 0 || check_scalar(&c, a, i) < 0)) return NULL;
    }
    if (e->prepare && e->prepare(&c) < 0) return NULL;
    for (int rank = 0; rank < 3; rank++)
        for (int i = 0; i < n; i++)
            if (is_array(e->args[i].kind) && check_rank(&e->args[i]) == rank && parse_array(&c, e, i) < 0)
                return NULL;
    if (e->check && e->check(&c) < 0) return NULL;
    for (int rank = 0; rank < 3; rank++)
        for (int i = 0; i < n; i++) {
            const cst_param *a = &e->args[i];
            if (is_array(a->kind) && check_rank(a) == rank && check_values(&c, a, i) < 0) return NULL;
        }
    if (check_aliasing(&c, e, n) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    c.failed = 0;
    e->run(&c);
    Py_END_ALLOW_THREADS
    if (c.failed) return PyErr_NoMemory();
    if (e->ret == CST_RET_FLOAT) return PyFloat_FromDouble(c.ret.f);
    if (e->ret == CST_RET_INT) return PyLong_FromLongLong(c.ret.i);
    Py_RETURN_NONE;
}

/* "name(out, inp, accumulate=False)\n--\n\n" (Python's text signature for builtins), the row's text, then
 * one line per argument with its dtype, dimensions and flags: the docstring says what the table says. */
static char *entry_doc(const cst_entry *e) {
    const size_t cap = 4096;
    char *d = PyMem_RawMalloc(cap);
    if (!d) return NULL;
    size_t n = (size_t)PyOS_snprintf(d, cap, "%s(", e->name);
    for (int i = 0; i < CST_MAX_ARGS && e->args[i].name && n < cap; i++) {
        const cst_param *a = &e->args[i];
        const int quote = a->def && (a->kind == CST_STR || a->kind == CST_CHOICE);
        n += (size_t)PyOS_snprintf(d + n, cap - n, "%s%s%s%s%s%s", i ? ", " : "", a->name, a->def ? "=" : "",
                                   quote ? "'" : "", a->def ? a->def : "", quote ? "'" : "");
    }
    if (n < cap) n += (size_t)PyOS_snprintf(d + n, cap - n, ")\n--\n\n%s\n", e->doc ? e->doc : "");
    for (int i = 0; i < CST_MAX_ARGS && e->args[i].name && n < cap; i++) {
        const cst_param *a = &e->args[i];
        if (!is_array(a->kind)) continue;
        char types[64];
        dtype_names(types, sizeof types, a->kind);
        n += (size_t)PyOS_snprintf(d + n, cap - n, "\n  %s: %s (%s)%s%s%s%s", a->name, types, a->dims,
                                   (a->flags & CST_WRITE) ? ", written" : "",
                                   (a->flags & CST_NONE) ? ", or None" : "",
                                   a->range ? ", values in " : "", a->range ? a->range : "");
    }
    return d;
}

static PyObject *entry_trampoline(PyObject *capsule, PyObject *args, PyObject *kw) {
    const cst_entry *e = PyCapsule_GetPointer(capsule, "cst.entry");
    return e ? cst_entry_call(e, args, kw) : NULL;
}

int cst_add_entries(PyObject *module, const cst_entry *table) {
    size_t n = 0;
    while (table[n].name) n++;
    /* Lives as long as the process: a function's method definition must outlive the function. */
    PyMethodDef *defs = PyMem_RawCalloc(n + 1, sizeof(PyMethodDef));
    if (!defs) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *modname = PyModule_GetNameObject(module);
    if (!modname) return -1;
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        char *doc = entry_doc(&table[i]);
        defs[i] = (PyMethodDef){table[i].name, (PyCFunction)(void (*)(void))entry_trampoline,
                                METH_VARARGS | METH_KEYWORDS, doc};
        PyObject *cap = doc ? PyCapsule_New((void *)&table[i], "cst.entry", NULL) : PyErr_NoMemory();
        PyObject *fn = cap ? PyCFunction_NewEx(&defs[i], cap, modname) : NULL;
        Py_XDECREF(cap);
        rc = fn ? PyModule_AddObject(module, table[i].name, fn) : -1;
        if (rc < 0) Py_XDECREF(fn);
    }
    Py_DECREF(modname);
    return rc;
}
