/* JSON as orjson writes it, for the types events hold, and a transaction's
 * SSE frame written in one pass (events.HttpTransaction.envelope).
 *
 * Why: rendering was the largest part of the agent's work per transaction.
 * The transaction's JSON was built as ~60 dict entries, serialized by orjson,
 * base64-encoded into a str, and that str serialized again inside the event.
 * Here the transaction's JSON is written from a flat list of values along a
 * template (events._tx_layout), and the event around it from another list
 * along its own template (events._EVENT_LAYOUT), the first's base64 encoded
 * straight into the second's splice slot: no dicts are built at all.
 *
 * Exactness: this writes only what it writes the way orjson does (compact;
 * the same escapes; floats as repr, which orjson matches when repr has no
 * exponent) and answers None for anything else: a str or dict subclass, a
 * non-str key, an int beyond 64 bits, a surrogate, an exponent, deep nesting.
 * The caller then takes the orjson path, which gives its own output or error.
 * Tests compare the two on generated values.
 *
 * No Python code runs while writing (no __repr__, no __eq__), so the dicts
 * and lists walked cannot change under the walk.
 */
#include "_capi.h"

#include <math.h>

#include "_b64enc.h"

#define UNSUPPORTED 1 /* returned up the walk: not written, take orjson's path */
#define MAX_DEPTH 64  /* orjson's limit is 255; deeper than ours is a capture file's: its path */

enum { LITERAL = 0, VALUE = 1, OPTIONAL = 2, BASE64 = 3, SPLICE = 4 }; /* template slot kinds: events._compile */

typedef struct {
    char *p;
    Py_ssize_t len, cap;
    char small[8192];
} buf_t;

static void buf_init(buf_t *b) {
    b->p = b->small;
    b->len = 0;
    b->cap = sizeof b->small;
}

static void buf_free(buf_t *b) {
    if (b->p != b->small)
        PyMem_Free(b->p);
}

static int grow(buf_t *b, Py_ssize_t need) {
    if (need > PY_SSIZE_T_MAX / 2 - b->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t cap = b->cap * 2;
    while (cap < b->len + need)
        cap *= 2;
    char *p;
    if (b->p == b->small) {
        if ((p = PyMem_Malloc(cap)) != NULL)
            memcpy(p, b->small, b->len);
    } else {
        p = PyMem_Realloc(b->p, cap);
    }
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

#define RESERVE(b, n)                                         \
    do {                                                      \
        if ((b)->len + (n) > (b)->cap && grow((b), (n)) < 0) \
            return -1;                                        \
    } while (0)

/* The first and the last sizeof(T) bytes of s[0, n) to d, by fixed-size
 * moves: all of it when n is at most twice sizeof(T). */
#define COPY_ENDS(T)                                        \
    do {                                                    \
        T head_, tail_;                                     \
        memcpy(&head_, s, sizeof head_);                    \
        memcpy(&tail_, s + n - sizeof tail_, sizeof tail_); \
        memcpy(d, &head_, sizeof head_);                    \
        memcpy(d + n - sizeof tail_, &tail_, sizeof tail_); \
    } while (0)

/* Nearly every copy here is a few bytes (a template's text between two
 * values, a number's digits): copied inline by two loads and two stores that
 * may overlap, all within both ends, instead of a call into libc's memcpy,
 * which took ~3 % of the agent's CPU at 10,000 requests a second (perf). */
static inline __attribute__((always_inline)) void copy(char *d, const char *s, Py_ssize_t n) {
    if (n > 32)
        memcpy(d, s, n);
    else if (n >= 16)
        COPY_ENDS(__m128i);
    else if (n >= 8)
        COPY_ENDS(uint64_t);
    else if (n >= 4)
        COPY_ENDS(uint32_t);
    else
        for (Py_ssize_t i = 0; i < n; i++)
            d[i] = s[i];
}

static inline __attribute__((always_inline)) int put(buf_t *b, const char *s, Py_ssize_t n) {
    RESERVE(b, n);
    copy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

/* For each ASCII byte: 0 to copy it, else the letter after the backslash
 * ('u' for \u00XX).  orjson's set: the controls, '"' and '\\'; not DEL. */
static char escape[128];

static inline __attribute__((always_inline)) char *w_ascii(char *d, unsigned c) {
    char e = escape[c];
    if (e == 0) {
        *d++ = (char)c;
    } else if (e != 'u') {
        *d++ = '\\';
        *d++ = e;
    } else {
        memcpy(d, "\\u00", 4);
        d[4] = "0123456789abcdef"[c >> 4];
        d[5] = "0123456789abcdef"[c & 15];
        d += 6;
    }
    return d;
}

/* A code point below 0x100. */
static inline __attribute__((always_inline)) char *w_latin1(char *d, unsigned c) {
    if (c < 0x80)
        return w_ascii(d, c);
    *d++ = (char)(0xc0 | c >> 6);
    *d++ = (char)(0x80 | (c & 0x3f));
    return d;
}

static int w_str(buf_t *b, PyObject *s) {
    if (PyUnicode_READY(s) < 0) /* a legacy str some extension made: its data, made now */
        return -1;
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    if (n > (PY_SSIZE_T_MAX - 18) / 6) {
        PyErr_NoMemory();
        return -1;
    }
    RESERVE(b, n * 6 + 18); /* the worst: every character a \u00XX; and a 16-byte store at the end */
    char *d = b->p + b->len;
    *d++ = '"';
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    if (kind == PyUnicode_1BYTE_KIND) {
        const Py_UCS1 *t = data;
        Py_ssize_t i = 0;
        /* 16 at a time while none needs more than a copy (most text): a
         * control, '"', '\\' or a byte past ASCII stops the run.  The store
         * is made before the check; the reservation covers it.  The last
         * load of a string may read past its end (its NUL, then whatever
         * follows) when that stays within the page, which is mapped: those
         * bytes are masked off.  Most strings here are shorter than 16. */
        const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\'), space = _mm_set1_epi8(0x20);
        while (i < n) {
            Py_ssize_t left = n - i;
            unsigned valid = 0xffff;
            if (left < 16) {
                if (((uintptr_t)(t + i) & 4095) > 4096 - 16) {
                    for (; i < n; i++)
                        d = w_latin1(d, t[i]);
                    break;
                }
                valid = (1u << left) - 1;
            }
            __m128i v = _mm_loadu_si128((const __m128i *)(t + i));
            _mm_storeu_si128((__m128i *)d, v);
            /* signed: below 0x20, or 0x80 and up */
            __m128i stop = _mm_or_si128(_mm_cmplt_epi8(v, space),
                                        _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)));
            unsigned mask = (unsigned)_mm_movemask_epi8(stop) & valid;
            if (mask == 0) {
                Py_ssize_t k = left < 16 ? left : 16;
                i += k;
                d += k;
                continue;
            }
            unsigned k = (unsigned)__builtin_ctz(mask);
            i += k;
            d += k;
            d = w_latin1(d, t[i++]);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_UCS4 c = PyUnicode_READ(kind, data, i);
            if (c < 0x80) {
                d = w_ascii(d, c);
            } else if (c < 0x800) {
                *d++ = (char)(0xc0 | c >> 6);
                *d++ = (char)(0x80 | (c & 0x3f));
            } else if (c >= 0xd800 && c <= 0xdfff) {
                return UNSUPPORTED; /* orjson: "surrogates not allowed" */
            } else if (c < 0x10000) {
                *d++ = (char)(0xe0 | c >> 12);
                *d++ = (char)(0x80 | (c >> 6 & 0x3f));
                *d++ = (char)(0x80 | (c & 0x3f));
            } else {
                *d++ = (char)(0xf0 | c >> 18);
                *d++ = (char)(0x80 | (c >> 12 & 0x3f));
                *d++ = (char)(0x80 | (c >> 6 & 0x3f));
                *d++ = (char)(0x80 | (c & 0x3f));
            }
        }
    }
    *d++ = '"';
    b->len = d - b->p;
    return 0;
}

static int w_unsigned(buf_t *b, unsigned long long v, int negative) {
    char tmp[24], *e = tmp + sizeof tmp, *d = e;
    do {
        *--d = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (negative)
        *--d = '-';
    return put(b, d, e - d);
}

static int w_int(buf_t *b, PyObject *o) {
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow == 0) {
        if (v == -1 && PyErr_Occurred())
            return -1;
        return v < 0 ? w_unsigned(b, 0ULL - (unsigned long long)v, 1) : w_unsigned(b, (unsigned long long)v, 0);
    }
    if (overflow > 0) { /* orjson writes up to 2**64 - 1 */
        unsigned long long u = PyLong_AsUnsignedLongLong(o);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return UNSUPPORTED;
        }
        return w_unsigned(b, u, 0);
    }
    return UNSUPPORTED;
}

/* A float that is exactly the double nearest k / 1000 for an integer k (an
 * event's milliseconds, rounded to the microsecond) printed without the
 * general algorithm: k / 1000 rounds to it, and no decimal with fewer digits
 * does (any other multiple of 0.001 lies more than an ulp away below 1e9), so
 * k's digits with the dot three places in, trailing zeros dropped, are its
 * shortest repr.  0 when it is not such a float. */
static int w_millis(buf_t *b, double v) {
    double a = fabs(v);
    if (!(a < 1e9))
        return 0;
    double scaled = a * 1000.0;
    long long k = (long long)scaled;
    if ((double)k != scaled || (double)k / 1000.0 != a)
        return 0;
    char t[32], *e = t + sizeof t, *d = e; /* written backwards */
    int frac = (int)(k % 1000), places = 3;
    for (; places && frac % 10 == 0; places--)
        frac /= 10;
    if (places == 0)
        *--d = '0';
    for (; places; places--, frac /= 10)
        *--d = (char)('0' + frac % 10);
    *--d = '.';
    long long whole = k / 1000;
    do {
        *--d = (char)('0' + whole % 10);
        whole /= 10;
    } while (whole);
    if (signbit(v))
        *--d = '-';
    return put(b, d, e - d) < 0 ? -1 : 1;
}

static int w_float(buf_t *b, PyObject *o) {
    double v = PyFloat_AS_DOUBLE(o);
    if (!isfinite(v))
        return put(b, "null", 4);
    int done = w_millis(b, v);
    if (done)
        return done < 0 ? -1 : 0;
    char *r = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (r == NULL)
        return -1;
    int rc = strchr(r, 'e') ? UNSUPPORTED : put(b, r, strlen(r));
    PyMem_Free(r);
    return rc;
}

static int w_base64(buf_t *b, const unsigned char *s, Py_ssize_t n) {
    if (n > PY_SSIZE_T_MAX / 4 * 3 - 6) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t size = b64_size(n);
    RESERVE(b, size + 2);
    char *d = b->p + b->len;
    *d = '"';
    b64_encode(s, n, (unsigned char *)d + 1);
    d[size + 1] = '"';
    b->len += size + 2;
    return 0;
}

static int w_value(buf_t *b, PyObject *o, int depth);

static int w_dict(buf_t *b, PyObject *o, int depth) {
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    int rc, first = 1;
    if (put(b, "{", 1) < 0)
        return -1;
    while (PyDict_Next(o, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k))
            return UNSUPPORTED;
        if (!first && put(b, ",", 1) < 0)
            return -1;
        first = 0;
        if ((rc = w_str(b, k)) != 0 || (rc = put(b, ":", 1)) != 0 || (rc = w_value(b, v, depth)) != 0)
            return rc;
    }
    return put(b, "}", 1);
}

static int w_items(buf_t *b, PyObject **items, Py_ssize_t n, int depth) {
    int rc;
    if (put(b, "[", 1) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i && put(b, ",", 1) < 0)
            return -1;
        if ((rc = w_value(b, items[i], depth)) != 0)
            return rc;
    }
    return put(b, "]", 1);
}

static int w_value(buf_t *b, PyObject *o, int depth) {
    if (PyUnicode_CheckExact(o))
        return w_str(b, o);
    if (o == Py_None)
        return put(b, "null", 4);
    if (PyLong_CheckExact(o))
        return w_int(b, o);
    if (o == Py_True)
        return put(b, "true", 4);
    if (o == Py_False)
        return put(b, "false", 5);
    if (PyFloat_CheckExact(o))
        return w_float(b, o);
    if (depth >= MAX_DEPTH)
        return UNSUPPORTED;
    if (PyDict_CheckExact(o))
        return w_dict(b, o, depth + 1);
    if (PyList_CheckExact(o))
        return w_items(b, ((PyListObject *)o)->ob_item, PyList_GET_SIZE(o), depth + 1);
    if (PyTuple_CheckExact(o))
        return w_items(b, ((PyTupleObject *)o)->ob_item, PyTuple_GET_SIZE(o), depth + 1);
    return UNSUPPORTED;
}

/* The recipes' grep guard (events.json_line): the dot of this text, where
 * captured text carries it, written as \u002e.  Rewrites b from ``from`` on,
 * but for [skip, skip_end): the base64, whose alphabet has no dot. */
static const char GUARDED[] = "request.http_transaction";
#define GUARDED_LEN ((Py_ssize_t)sizeof GUARDED - 1)
#define GUARD_AT 7 /* the dot */

/* The text wholly inside p[from, to), found by its 'q': memchr is vectorized,
 * where glibc's memmem steps through every byte (~1,000 instructions a
 * transaction's JSON), and a JSON line has few q's outside its base64 (fewer
 * than dots: addresses, versions and host names have those). */
#define FIND_AT 2 /* the q */
static char *find_between(char *p, Py_ssize_t from, Py_ssize_t to) {
    Py_ssize_t at = from + FIND_AT, last = to - (GUARDED_LEN - FIND_AT); /* where the q may be */
    while (at <= last) {
        char *q = memchr(p + at, 'q', (size_t)(last - at + 1));
        if (q == NULL)
            return NULL;
        if (memcmp(q - FIND_AT, GUARDED, GUARDED_LEN) == 0)
            return q - FIND_AT;
        at = q - p + 1;
    }
    return NULL;
}

static char *find_guarded(buf_t *b, Py_ssize_t from, Py_ssize_t skip, Py_ssize_t skip_end) {
    char *hit = from < skip ? find_between(b->p, from, skip) : NULL;
    if (hit == NULL)
        hit = find_between(b->p, from > skip_end ? from : skip_end, b->len);
    return hit;
}

static int guard(buf_t *b, Py_ssize_t from, Py_ssize_t skip, Py_ssize_t skip_end) {
    char *hit = find_guarded(b, from, skip, skip_end);
    if (hit == NULL)
        return 0;
    buf_t out;
    buf_init(&out);
    Py_ssize_t done = 0;
    while (hit != NULL) {
        Py_ssize_t at = hit - b->p + GUARD_AT;
        if (put(&out, b->p + done, at - done) < 0 || put(&out, "\\u002e", 6) < 0) {
            buf_free(&out);
            return -1;
        }
        done = at + 1;
        hit = find_guarded(b, done, skip, skip_end);
    }
    if (put(&out, b->p + done, b->len - done) < 0) {
        buf_free(&out);
        return -1;
    }
    buf_free(b);
    if (out.p == out.small) { /* out's inline buffer dies with this frame */
        buf_init(b);
        memcpy(b->p, out.small, out.len);
        b->len = out.len;
    } else {
        *b = out;
    }
    return 0;
}

static PyObject *answer(buf_t *b, int rc) {
    PyObject *out = rc == 0 ? PyBytes_FromStringAndSize(b->p, b->len) : NULL;
    buf_free(b);
    if (rc == UNSUPPORTED)
        Py_RETURN_NONE;
    return out;
}

static PyObject *line(PyObject *Py_UNUSED(module), PyObject *o) {
    buf_t b;
    buf_init(&b);
    int rc = w_value(&b, o, 0);
    if (rc == 0)
        rc = guard(&b, 0, b.len, b.len);
    return answer(&b, rc);
}

/* The template's slots in order; a value is taken for each but a LITERAL.  A
 * SPLICE slot's value is not read: the base64 of src goes there, its first
 * character at *at (one SPLICE at most, and only where src is given). */
static int w_template(buf_t *b, PyObject *prefixes, PyObject *kinds, PyObject *values, const unsigned char *src,
                      Py_ssize_t src_len, Py_ssize_t *at) {
    Py_ssize_t slots = PyTuple_GET_SIZE(prefixes);
    PyObject **items = PySequence_Fast_ITEMS(values);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(values), taken = 0;
    const char *kind = PyBytes_AS_STRING(kinds);
    for (Py_ssize_t i = 0; i < slots; i++) {
        PyObject *prefix = PyTuple_GET_ITEM(prefixes, i), *v = NULL;
        int rc;
        if (kind[i] != LITERAL) {
            if (taken == n) {
                PyErr_Format(PyExc_ValueError, "template of %zd slots given only %zd values", slots, n);
                return -1;
            }
            v = items[taken++];
            if (kind[i] == OPTIONAL && v == Py_None)
                continue;
        }
        if (put(b, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix)) < 0)
            return -1;
        if (v == NULL)
            continue;
        if (kind[i] == BASE64) {
            if (!PyBytes_CheckExact(v))
                return UNSUPPORTED;
            rc = w_base64(b, (const unsigned char *)PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
        } else if (kind[i] == SPLICE) {
            if (src == NULL || *at >= 0) {
                PyErr_SetString(PyExc_ValueError, "a splice slot where none is expected, or a second one");
                return -1;
            }
            *at = b->len + 1; /* past the opening quote */
            rc = w_base64(b, src, src_len);
        } else {
            rc = w_value(b, v, 1);
        }
        if (rc != 0)
            return rc;
    }
    if (taken != n) {
        PyErr_Format(PyExc_ValueError, "template of %zd slots given %zd values: %zd too many", slots, n, n - taken);
        return -1;
    }
    return 0;
}

/* Templates found well-formed, held so their addresses stay theirs: the
 * agent's few are module constants, and checking each slot of both for every
 * transaction cost ~600 instructions. */
#define KNOWN_TEMPLATES 8
static PyObject *known_prefixes[KNOWN_TEMPLATES], *known_kinds[KNOWN_TEMPLATES];

static int is_template(PyObject *prefixes, PyObject *kinds, PyObject *values) {
    if (!(PyList_Check(values) || PyTuple_Check(values)))
        return 0;
    for (int k = 0; k < KNOWN_TEMPLATES && known_prefixes[k] != NULL; k++)
        if (known_prefixes[k] == prefixes && known_kinds[k] == kinds)
            return 1;
    if (!PyTuple_Check(prefixes) || !PyBytes_Check(kinds) || PyBytes_GET_SIZE(kinds) != PyTuple_GET_SIZE(prefixes))
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(prefixes); i++)
        if (!PyBytes_Check(PyTuple_GET_ITEM(prefixes, i)))
            return 0;
    /* Immutable (a tuple of bytes, bytes): once well-formed, always. */
    for (int k = 0; k < KNOWN_TEMPLATES; k++)
        if (known_prefixes[k] == NULL) {
            known_prefixes[k] = Py_NewRef(prefixes);
            known_kinds[k] = Py_NewRef(kinds);
            break;
        }
    return 1;
}

static PyObject *tx_frame(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7 || !PyBytes_Check(args[0]) || !is_template(args[1], args[2], args[3]) ||
        !is_template(args[4], args[5], args[6])) {
        PyErr_SetString(PyExc_TypeError, "tx_frame(head: bytes, tx_prefixes, tx_kinds, tx_values, prefixes, kinds, "
                                         "values): prefixes a tuple of bytes, kinds bytes of as many, values a list "
                                         "or tuple");
        return NULL;
    }
    PyObject *head = args[0];
    buf_t tx, frame;
    buf_init(&tx);
    buf_init(&frame);
    Py_ssize_t at = -1;
    int rc = w_template(&tx, args[1], args[2], args[3], NULL, 0, NULL);
    if (rc == 0)
        rc = put(&frame, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head));
    if (rc == 0)
        rc = w_template(&frame, args[4], args[5], args[6], (const unsigned char *)tx.p, tx.len, &at);
    if (rc == 0 && at < 0) {
        PyErr_SetString(PyExc_ValueError, "tx_frame: the event's template has no splice slot");
        rc = -1;
    }
    if (rc == 0)
        rc = guard(&frame, PyBytes_GET_SIZE(head), at, at + b64_size(tx.len));
    if (rc == 0)
        rc = put(&frame, "\n\n", 2);
    buf_free(&tx);
    return answer(&frame, rc);
}

static PyMethodDef methods[] = {
    {"line", line, METH_O,
     "line(obj) -> bytes | None: orjson.dumps(obj) with json_line's grep guard, or None where this\n"
     "writer does not write as orjson would (take orjson's path)."},
    {"tx_frame", (PyCFunction)(void (*)(void))tx_frame, METH_FASTCALL,
     "tx_frame(head, tx_prefixes, tx_kinds, tx_values, prefixes, kinds, values) -> bytes | None\n\n"
     "The transaction's JSON from tx_values along its template, base64-encoded at the SPLICE slot of\n"
     "the event's JSON, written from values along its template: head + that JSON (guarded) + two\n"
     "newlines.  None where orjson's path must decide."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jsonw", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jsonw(void) {
    b64enc_init();
    for (int c = 0; c < 0x20; c++)
        escape[c] = 'u';
    escape['\b'] = 'b';
    escape['\t'] = 't';
    escape['\n'] = 'n';
    escape['\f'] = 'f';
    escape['\r'] = 'r';
    escape['"'] = '"';
    escape['\\'] = '\\';
    return PyModule_Create(&module);
}
