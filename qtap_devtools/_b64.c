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

static const char ALPHABET[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static char pairs[4096][2];  /* 12 bits -> their two characters */

static PyObject *encode(PyObject *Py_UNUSED(module), PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t n = view.len;
    if (n > PY_SSIZE_T_MAX / 4 * 3 - 3) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    PyObject *out = PyUnicode_New((n + 2) / 3 * 4, 127);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const unsigned char *s = view.buf;
    Py_UCS1 *d = PyUnicode_1BYTE_DATA(out);
    Py_ssize_t i = 0;
    for (; i + 3 <= n; i += 3, d += 4) {
        unsigned v = (unsigned)s[i] << 16 | (unsigned)s[i + 1] << 8 | s[i + 2];
        memcpy(d, pairs[v >> 12], 2);
        memcpy(d + 2, pairs[v & 0xfff], 2);
    }
    if (i < n) {
        unsigned v = (unsigned)s[i] << 16 | (i + 1 < n ? (unsigned)s[i + 1] << 8 : 0);
        d[0] = ALPHABET[v >> 18];
        d[1] = ALPHABET[v >> 12 & 63];
        d[2] = i + 1 < n ? ALPHABET[v >> 6 & 63] : '=';
        d[3] = '=';
    }
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_O, "encode(data) -> str: base64 of a bytes-like object, padded, no newline."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_b64", NULL, -1, methods};

PyMODINIT_FUNC PyInit__b64(void) {
    for (int j = 0; j < 4096; j++) {
        pairs[j][0] = ALPHABET[j >> 6];
        pairs[j][1] = ALPHABET[j & 63];
    }
    return PyModule_Create(&module);
}
