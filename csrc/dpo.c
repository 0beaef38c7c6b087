/* dpo.c: placeholder method table; the kernels of this family land here. */
#include "glue.h"

PyMethodDef cst_dpo_methods[] = {
    {NULL, NULL, 0, NULL},
};
