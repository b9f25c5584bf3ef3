/* What the C parts share: interning attribute names once, setting new references. */
#ifndef QTAP_CAPI_H
#define QTAP_CAPI_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* In a module's init function: an interned str, or return NULL. */
#define INTERN(var, text)                                     \
    do {                                                      \
        if ((var = PyUnicode_InternFromString(text)) == NULL) \
            return NULL;                                      \
    } while (0)

/* Set a new reference and drop it; -1 if it is NULL or the set fails. */
static inline int set_new(PyObject *o, PyObject *name, PyObject *value) {
    if (value == NULL)
        return -1;
    int rc = PyObject_SetAttr(o, name, value);
    Py_DECREF(value);
    return rc;
}
#endif
