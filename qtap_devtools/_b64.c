/* Base64 (RFC 4648 §4: standard alphabet, padded) of a small buffer, straight
 * into an ASCII str, holding the GIL.
 *
 * Why not pybase64 for everything: it releases the GIL on every call.  At
 * 20,000 small transactions a second, each of them two encodes, every release
 * handed the GIL to the ring-reader thread and back; the hand-offs cost more
 * than the encoding (7.6 % of the agent's CPU in pthread_cond_signal).  Large
 * inputs still go to pybase64 (events.b64): there SIMD wins, and letting the
 * reader run meanwhile is right.  binascii is the reference (tests compare).
 */
#include "_capi.h"

#include "_b64enc.h"

static PyObject *encode(PyObject *Py_UNUSED(module), PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t n = view.len;
    if (n > PY_SSIZE_T_MAX / 4 * 3 - 3) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    PyObject *out = PyUnicode_New(b64_size(n), 127);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    b64_encode(view.buf, n, PyUnicode_1BYTE_DATA(out));
    PyBuffer_Release(&view);
    return out;
}

static PyObject *simd(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(arg)) {
    return PyUnicode_FromString(B64_LEVEL_NAMES[b64_level]);
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_O, "encode(data) -> str: base64 of a bytes-like object, padded, no newline."},
    {"simd", simd, METH_NOARGS, "simd() -> str: the widest steps encode uses on this CPU: \"avx512vbmi\", \"ssse3\" or \"\" (none)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_b64", NULL, -1, methods};

PyMODINIT_FUNC PyInit__b64(void) {
    b64enc_init();
    return PyModule_Create(&module);
}
