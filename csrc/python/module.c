/* module.c: the cst._core extension module: one function per row of every entry table (glue.h) plus
 * the process-wide settings (threads, SIMD path). No kernels here. */
#define CST_MODULE_MAIN
#include "glue.h"
#include "simd.h"
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static PyObject *py_set_num_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i:set_num_threads", &n)) return NULL;
    if (n < 1) {
        PyErr_Format(PyExc_ValueError, "set_num_threads: 'n' must be >= 1, got %d", n);
        return NULL;
    }
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *noargs) {
#ifdef _OPENMP
    return PyLong_FromLong(omp_get_max_threads());
#else
    return PyLong_FromLong(1);
#endif
}

static PyObject *py_has_openmp(PyObject *self, PyObject *noargs) {
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *py_simd_path(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(cst_simd_name(cst_simd_current()));
}

static PyObject *py_simd_supported(PyObject *self, PyObject *noargs) {
    cst_simd_path best = cst_simd_detect();
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (int p = 0; p <= (int)best; p++) {
        PyObject *s = PyUnicode_FromString(cst_simd_name((cst_simd_path)p));
        if (!s || PyList_Append(out, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(s);
    }
    return out;
}

static PyObject *py_set_simd_path(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s:set_simd_path", &name)) return NULL;
    int p = cst_simd_parse(name);
    if (p < 0) {
        PyErr_Format(PyExc_ValueError,
                     "set_simd_path: unknown path '%s' (expected scalar, avx2 or avx512)", name);
        return NULL;
    }
    if (cst_simd_set((cst_simd_path)p) < 0) {
        PyErr_Format(PyExc_ValueError, "set_simd_path: this CPU does not support '%s' (best: %s)",
                     name, cst_simd_name(cst_simd_detect()));
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"set_num_threads", py_set_num_threads, METH_VARARGS, "set_num_threads(n): OpenMP threads for kernels."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"has_openmp", py_has_openmp, METH_NOARGS, "has_openmp() -> bool: built with OpenMP."},
    {"simd_path", py_simd_path, METH_NOARGS, "simd_path() -> str: the SIMD path in use."},
    {"simd_supported", py_simd_supported, METH_NOARGS, "simd_supported() -> list of paths this CPU runs."},
    {"set_simd_path", py_set_simd_path, METH_VARARGS, "set_simd_path(name): force scalar/avx2/avx512."},
    {NULL, NULL, 0, NULL},
};

static const cst_entry *entry_tables[] = {cst_matmul_entries, cst_ops_entries,  cst_attention_entries,
                                          cst_dpo_entries,    cst_optim_entries, cst_gen_entries,
                                          cst_quant_entries, cst_qdot_entries};

static struct PyModuleDef core_module = {PyModuleDef_HEAD_INIT, "_core",
                                         "cst native core: kernels for Llama-family models.", -1,
                                         module_methods};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();
    cst_simd_set(cst_simd_detect());
    const char *env = getenv("CST_SIMD");
    if (env && *env) {
        int p = cst_simd_parse(env);
        if (p < 0) {
            PyErr_Format(PyExc_ValueError, "CST_SIMD='%s' is not one of scalar, avx2, avx512", env);
            return NULL;
        }
        if (cst_simd_set((cst_simd_path)p) < 0) {
            PyErr_Format(PyExc_ValueError, "CST_SIMD='%s' is not supported by this CPU (best: %s)",
                         env, cst_simd_name(cst_simd_detect()));
            return NULL;
        }
    }
    PyObject *m = PyModule_Create(&core_module);
    if (m && PyModule_AddFunctions(m, cst_quant_methods) < 0) Py_CLEAR(m);
    if (m && PyModule_AddFunctions(m, cst_matmul_methods) < 0) Py_CLEAR(m);
    for (size_t t = 0; m && t < sizeof entry_tables / sizeof entry_tables[0]; t++)
        if (cst_add_entries(m, entry_tables[t]) < 0) Py_CLEAR(m);
    return m;
}
