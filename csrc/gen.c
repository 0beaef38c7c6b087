/* gen.c: placeholder method table; the kernels of this family land here. */
#include "glue.h"

PyMethodDef cst_gen_methods[] = {
    {NULL, NULL, 0, NULL},
};
