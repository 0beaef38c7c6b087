/* glue.h: the CPython/NumPy boundary shared by every csrc/ file. Arguments are validated here once
 * (dtype, rank, named dimensions, contiguity, alignment, writeability); kernels never see a PyObject.
 * Not a kernel header: kernels live in their own files and take plain pointers and sizes. */
#ifndef CST_GLUE_H
#define CST_GLUE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL cst_ARRAY_API
#ifndef CST_MODULE_MAIN
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>
#include <stdint.h>

/* Named dimensions: one slot per letter A..Z, -1 while unbound. The first array that uses a letter
 * binds it; later arrays must agree, and the error names both the array and the letter. */
typedef struct {
    npy_intp v[26];
    const char *bound_by[26];
} cst_dims;

void cst_dims_init(cst_dims *d);
/* Pre-binds a letter to a known value (e.g. a size derived from other arguments). */
void cst_dims_set(cst_dims *d, char letter, npy_intp value, const char *why);
npy_intp cst_dim(const cst_dims *d, char letter);

/* Validates obj as an ndarray of typenum, C-contiguous and aligned, whose shape matches spec
 * (one letter per axis, e.g. "BTC"). writeable != 0 requires a writeable array. On success stores
 * the data pointer in *data and returns 0; on failure sets TypeError/ValueError naming fn and name
 * and returns -1. CST_OPTIONAL in flags accepts None (then *data = NULL). */
enum { CST_WRITE = 1, CST_OPTIONAL = 2 };
int cst_arg(const char *fn, const char *name, PyObject *obj, int typenum, const char *spec,
            cst_dims *d, int flags, void **data);

/* Checks that every int32 in ids[0..n) lies in [lo, hi); ValueError naming fn/name otherwise. */
int cst_check_range_i32(const char *fn, const char *name, const int32_t *ids, npy_intp n,
                        int64_t lo, int64_t hi);

/* Method tables contributed by each csrc/ file (NULL-name terminated), joined by module.c. */
extern PyMethodDef cst_matmul_methods[];
extern PyMethodDef cst_ops_methods[];
extern PyMethodDef cst_optim_methods[];
extern PyMethodDef cst_quant_methods[];
extern PyMethodDef cst_dpo_methods[];
extern PyMethodDef cst_gen_methods[];
extern PyMethodDef cst_attention_methods[];

#endif
