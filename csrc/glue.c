/* glue.c: argument validation for the NumPy boundary (see glue.h). Raises, never aborts. */
#include "glue.h"
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

npy_intp cst_dim(const cst_dims *d, char letter) { return d->v[letter - 'A']; }

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
    if (obj == Py_None && (flags & CST_OPTIONAL)) return 0;
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
    int ndim = (int)strlen(spec);
    char shp[256];
    if (PyArray_NDIM(a) != ndim) {
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
