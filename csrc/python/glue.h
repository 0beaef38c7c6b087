/* glue.h: the CPython/NumPy boundary. Each kernel entry point is one descriptor (cst_entry: its name,
 * its arguments with dtype, named dimensions and flags) read by one parser, cst_entry_call, which
 * validates everything once, releases the GIL and calls the entry's run function. Not a kernel header:
 * kernels take plain pointers and sizes and never see a PyObject. */
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
    char why[26][48]; /* text of a derived binding ("2 * out's F"), pointed to by bound_by */
} cst_dims;

void cst_dims_init(cst_dims *d);
/* Pre-binds a letter to a known value (e.g. a size derived from other arguments). */
void cst_dims_set(cst_dims *d, char letter, npy_intp value, const char *why);

/* Validates obj as an ndarray of typenum, C-contiguous and aligned, whose shape matches spec
 * (one letter per axis, e.g. "BTC"; "*" takes any shape). CST_WRITE in flags requires a writeable array.
 * On success stores the data pointer in *data and returns 0; on failure sets TypeError/ValueError
 * naming fn and name and returns -1. CST_NONE in flags accepts None (then *data = NULL). */
int cst_arg(const char *fn, const char *name, PyObject *obj, int typenum, const char *spec,
            cst_dims *d, int flags, void **data);

/* Checks that every int32 in ids[0..n) lies in [lo, hi); ValueError naming fn/name otherwise. */
int cst_check_range_i32(const char *fn, const char *name, const int32_t *ids, npy_intp n,
                        int64_t lo, int64_t hi);

/* ---- entry descriptors ---- */

/* Argument kinds. Arrays: one dtype, or several or-ed together (the call records which one came).
 * Scalars: converted from Python like PyArg_ParseTuple's d, L, p, s and O; a CST_CHOICE is a str
 * that must be one of the words of its range, stored as the word's index (v.i). */
enum {
    CST_F32 = 1, CST_F64 = 2, CST_I32 = 4, CST_U8 = 8, CST_BOOL = 16, CST_I64 = 32, CST_U16 = 64, /* arrays */
    CST_DOUBLE = 256, CST_INT64, CST_FLAG, CST_STR, CST_CHOICE, CST_OBJECT /* scalars */
};
/* Argument flags.
 * CST_WRITE: the kernel writes the array (must be writeable).
 * CST_NONE: None is accepted (the run function gets NULL).
 * CST_FIRST: checked before the other arrays, so its shape is the one the others must match
 *   (arrays are checked: CST_FIRST ones, then read-only ones, then written ones, each in table order).
 * CST_FINITE: every element must be finite (float arrays), or the number must be (CST_DOUBLE).
 * CST_EXCLUSIVE: shares no memory with any other array argument (the kernel reads what it writes). */
enum { CST_WRITE = 1, CST_NONE = 2, CST_FIRST = 4, CST_FINITE = 8, CST_EXCLUSIVE = 16 };
#define CST_OPTIONAL CST_NONE /* the name hand-written wrappers used */

#define CST_MAX_ARGS 16

typedef struct {
    const char *name; /* the keyword, also used in every message */
    int kind;         /* CST_F32 ... CST_OBJECT */
    const char *dims; /* arrays: one letter per axis ("BTC"), or "*" for any shape */
    int flags;        /* CST_WRITE | CST_NONE | ... */
    const char *def;  /* NULL: required; else the value when omitted ("None", "False", "0", "1.0", "sigmoid") */
    const char *range; /* numbers and int32 arrays: the allowed values, "[0, V)", "[1, T]", "> 0", ">= 1"
                        * (a bound is a number or a dimension letter); a CST_DOUBLE with a range must also
                        * be finite. CST_CHOICE: the allowed words, "sigmoid|ipo|hinge" */
} cst_param;

typedef union {
    void *p; /* array data (NULL for None), or the PyObject of a CST_OBJECT */
    double f;
    long long i; /* CST_INT64, CST_FLAG, CST_CHOICE */
    const char *s;
} cst_value;

/* One call being parsed: what the run function and the hooks see. */
typedef struct {
    const char *fn;
    cst_dims d;
    cst_value v[CST_MAX_ARGS];   /* by table position */
    PyObject *obj[CST_MAX_ARGS]; /* the objects passed (NULL when omitted) */
    npy_intp size[CST_MAX_ARGS]; /* arrays: element count */
    int dtype[CST_MAX_ARGS];     /* arrays: the CST_F32 ... bit of the array passed (0 for None) */
    union { double f; long long i; } ret;
    int failed; /* set by a run function whose kernel ran out of memory: MemoryError */
    _Alignas(16) unsigned char state[256]; /* per-call state of the hooks (a parsed config, an enum) */
} cst_call;

enum { CST_RET_NONE = 0, CST_RET_FLOAT, CST_RET_INT };

/* One kernel entry point. The parser converts the scalars and checks their ranges, runs prepare,
 * checks the arrays (dtype TypeError; ndim, named and derived dimensions, contiguity, alignment,
 * writeability ValueError), runs check, then the index ranges, finiteness and aliasing, releases the
 * GIL and calls run. Every error names the function and the argument. */
typedef struct {
    const char *name;
    void (*run)(cst_call *c); /* calls the kernel; runs without the GIL, must not touch Python */
    cst_param args[CST_MAX_ARGS];
    const char *derive;         /* derived dimensions, bound when their source is: "G=2F", "E=D/2" */
    int (*prepare)(cst_call *c); /* optional, with the GIL: reads scalars, pre-binds dimensions */
    int (*check)(cst_call *c);   /* optional, with the GIL: checks no table row can say */
    int ret;                    /* CST_RET_NONE, or run stores c->ret.f / c->ret.i */
    const char *doc;
} cst_entry;

/* Shorthand for the dimension a letter is bound to in a call. */
#define CST_STATE(c, type) ((type *)(c)->state) /* a hook's per-call state, at most 256 bytes */
static inline int64_t cst_n(const cst_call *c, char letter) { return (int64_t)c->d.v[letter - 'A']; }

/* Entry tables contributed by each boundary file (terminated by a row with name NULL), joined by
 * module.c into the module's functions. */
extern const cst_entry cst_matmul_entries[];
extern const cst_entry cst_ops_entries[];
extern const cst_entry cst_optim_entries[];
extern const cst_entry cst_quant_entries[];
extern const cst_entry cst_qdot_entries[];
extern const cst_entry cst_dpo_entries[];
extern const cst_entry cst_gen_entries[];
extern const cst_entry cst_attention_entries[];

/* Plain functions that are not kernel entry points (a NULL-name terminated PyMethodDef table). */
extern PyMethodDef cst_quant_methods[];
extern PyMethodDef cst_matmul_methods[];

/* Calls entry e with Python arguments: the one parser every entry point goes through. */
PyObject *cst_entry_call(const cst_entry *e, PyObject *args, PyObject *kw);
/* Adds one function per row of table to module (each calls cst_entry_call with its row). */
int cst_add_entries(PyObject *module, const cst_entry *table);

#endif
