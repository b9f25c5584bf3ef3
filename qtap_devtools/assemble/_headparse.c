/* HTTP/1 header sections parsed, and headers combined, in C: the common case.
 *
 * http1_parse.parse_head_py is the reference.  This module takes the shapes
 * nearly all traffic has (CRLF lines, a valid start line, token header names)
 * and builds the same Head; for anything else (a malformed line, bare LF,
 * obs-fold, a repeated or odd Content-Length) it hands the bytes to the
 * Python parser, which decides and words the error.  So it never has to be
 * right about bad input, only about good input, and a test compares the two
 * on generated heads.  The framing headers other than a plain Content-Length
 * go through the Python _framing_header too: one rule, in one place.
 *
 * combined_headers mirrors model.combined_headers_py the same way: str pairs
 * with ASCII names here (up to 64 of them), anything else handed back.
 *
 * Why C: at ~20,000 transactions a second, parsing two heads per transaction
 * was a fifth of the agent's Python time.
 */
#include "../_capi.h"
#include <string.h>

static PyObject *new_head_fn; /* http1_parse.new_head(is_request, method, ..., close) */
static Py_ssize_t max_head = -1; /* http1_parse.MAX_HEAD, from configure() */
static PyObject *framing_fn;  /* http1_parse._framing_header(msg, lkey, value) */
static PyObject *fallback_fn; /* http1_parse.parse_head_py(head, is_request) */

static PyObject *v11, *v10;   /* "HTTP/1.1", "HTTP/1.0" */
static PyObject *lk_cl, *lk_te, *lk_conn, *lk_up, *lk_ce;
static PyObject *a_content_length, *a_close; /* Head's, set after it is made */
static PyObject *empty_str;

static unsigned char is_token[256];

#define MAX_CONTENT_LENGTH_DIGITS 18

static int all_token(const char *p, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (!is_token[(unsigned char)p[i]])
            return 0;
    return 1;
}

static PyObject *version_of(const char *p, Py_ssize_t n) {
    if (n != 8 || memcmp(p, "HTTP/1.", 7) != 0)
        return NULL;
    if (p[7] == '1')
        return v11;
    if (p[7] == '0')
        return v10;
    return NULL;
}

/* Whether p[0:n] is `lower` in any ASCII case.  Not strncasecmp: it follows
 * the locale, and in a Turkish one "I" is not "i" (TRANSFER-ENCODING was no
 * framing header there), where Python's str.lower() never changes. */
static int ascii_ieq(const char *p, const char *lower, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = p[i];
        if ((c >= 'A' && c <= 'Z' ? c + 32 : c) != lower[i])
            return 0;
    }
    return 1;
}

/* The lower-case framing name for a header name, or NULL for other headers. */
static PyObject *framing_key(const char *p, Py_ssize_t n) {
    switch (n) {
    case 14: return ascii_ieq(p, "content-length", 14) ? lk_cl : NULL;
    case 17: return ascii_ieq(p, "transfer-encoding", 17) ? lk_te : NULL;
    case 10: return ascii_ieq(p, "connection", 10) ? lk_conn : NULL;
    case 7: return ascii_ieq(p, "upgrade", 7) ? lk_up : NULL;
    case 16: return ascii_ieq(p, "content-encoding", 16) ? lk_ce : NULL;
    }
    return NULL;
}

/* Lower-case names most messages carry, made once: a name is matched against
 * these before a new str is made for its lower-case form. */
static const char *const COMMON_NAMES[] = {
    "host", "user-agent", "accept", "accept-encoding", "accept-language", "content-type", "content-length",
    "content-encoding", "transfer-encoding", "connection", "keep-alive", "date", "server", "cache-control",
    "etag", "last-modified", "expires", "vary", "location", "set-cookie", "cookie", "authorization", "referer",
    "origin", "x-request-id", "x-forwarded-for", "accept-ranges", "age", "pragma", "upgrade",
};
#define N_COMMON ((int)(sizeof COMMON_NAMES / sizeof COMMON_NAMES[0]))
/* The same names as most clients and servers send them. */
static const char *const COMMON_SENT[N_COMMON] = {
    "Host", "User-Agent", "Accept", "Accept-Encoding", "Accept-Language", "Content-Type", "Content-Length",
    "Content-Encoding", "Transfer-Encoding", "Connection", "Keep-Alive", "Date", "Server", "Cache-Control",
    "ETag", "Last-Modified", "Expires", "Vary", "Location", "Set-Cookie", "Cookie", "Authorization", "Referer",
    "Origin", "X-Request-Id", "X-Forwarded-For", "Accept-Ranges", "Age", "Pragma", "Upgrade",
};
static PyObject *common_lower[N_COMMON], *common_sent[N_COMMON];
static Py_ssize_t common_len[N_COMMON];

/* A header name as a str (a new reference): a common one spelled as sent or in
 * lower case is the str made once, whose hash is then known too (~200
 * instructions a name, made, hashed and freed); any other is decoded. */
static PyObject *name_str(const char *p, Py_ssize_t n) {
    for (int i = 0; i < N_COMMON; i++) {
        if (common_len[i] != n)
            continue;
        if (memcmp(p, COMMON_SENT[i], n) == 0)
            return Py_NewRef(common_sent[i]);
        if (memcmp(p, COMMON_NAMES[i], n) == 0)
            return Py_NewRef(common_lower[i]);
    }
    return PyUnicode_DecodeASCII(p, n, NULL);
}

static int set(PyObject *o, PyObject *name, PyObject *value) {
    return PyObject_SetAttr(o, name, value);
}

/* What parse_fast has read so far.  The Head is made from it by one call to
 * http1_parse.new_head (five attribute sets on the compiled class cost ~750
 * instructions, the call about half), once the head is read or, before that,
 * when a rarer header goes to _framing_header, which needs the Head. */
typedef struct {
    int is_request;
    PyObject *method, *target, *reason; /* owned */
    PyObject *version;                  /* borrowed: v11 or v10 */
    long status;
    PyObject *headers;                  /* owned */
    long long content_length;           /* -1: none */
    int close;
} head_parts;

static void parts_clear(head_parts *h) {
    Py_CLEAR(h->method);
    Py_CLEAR(h->target);
    Py_CLEAR(h->reason);
    Py_CLEAR(h->headers);
}

static PyObject *make_head(const head_parts *h) {
    PyObject *status = PyLong_FromLong(h->status);
    PyObject *length = h->content_length < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(h->content_length);
    PyObject *msg = NULL;
    if (status != NULL && length != NULL) {
        PyObject *args[9] = {h->is_request ? Py_True : Py_False, h->method, h->target, h->version, status,
                             h->reason, h->headers, length, h->close ? Py_True : Py_False};
        msg = PyObject_Vectorcall(new_head_fn, args, 9, NULL);
    }
    Py_XDECREF(status);
    Py_XDECREF(length);
    return msg;
}

/* 1: parsed into *out; 0: not the common case, let Python decide; -1: error set. */
static int parse_fast(const char *buf, Py_ssize_t n, int is_request, PyObject **out) {
    *out = NULL;
    if (n > 0 && buf[n - 1] == '\r')
        n--;
    if (n == 0 || buf[n - 1] == '\n')
        return 0; /* a head ending in a line end holds an empty line: Python's to refuse */
    /* Lines end in CRLF; a bare LF or a lone CR is for the Python parser. */
    const char *first_end = NULL;
    for (const char *q = buf; (q = memchr(q, '\r', buf + n - q)) != NULL; q++)
        if (q + 1 >= buf + n || q[1] != '\n')
            return 0;
    for (const char *q = buf; (q = memchr(q, '\n', buf + n - q)) != NULL; q++) {
        if (q == buf || q[-1] != '\r')
            return 0;
        if (first_end == NULL)
            first_end = q - 1;
    }
    const char *end = buf + n;
    const char *line_end = first_end ? first_end : end;
    Py_ssize_t line_len = line_end - buf;

    head_parts h = {is_request, NULL, NULL, NULL, NULL, 0, NULL, -1, 0};
    PyObject *msg = NULL; /* made when needed: see head_parts */
    if (is_request) {
        const char *sp1 = memchr(buf, ' ', line_len);
        if (sp1 == NULL)
            return 0;
        const char *sp2 = memchr(sp1 + 1, ' ', line_end - sp1 - 1);
        if (sp2 == NULL || memchr(sp2 + 1, ' ', line_end - sp2 - 1) != NULL)
            return 0;
        Py_ssize_t mlen = sp1 - buf, tlen = sp2 - sp1 - 1;
        h.version = version_of(sp2 + 1, line_end - sp2 - 1);
        if (mlen == 0 || !all_token(buf, mlen) || tlen == 0 || h.version == NULL)
            return 0;
        h.method = PyUnicode_DecodeASCII(buf, mlen, NULL);
        h.target = PyUnicode_DecodeLatin1(sp1 + 1, tlen, NULL);
        h.reason = Py_NewRef(empty_str);
        if (h.method == NULL || h.target == NULL)
            goto fail;
    } else {
        const char *sp = memchr(buf, ' ', line_len);
        if (sp == NULL)
            return 0;
        h.version = version_of(buf, sp - buf);
        const char *rest = sp + 1;
        Py_ssize_t rest_len = line_end - rest;
        if (h.version == NULL || rest_len < 3)
            return 0;
        for (int i = 0; i < 3; i++)
            if (rest[i] < '0' || rest[i] > '9')
                return 0;
        if (rest_len > 3 && rest[3] != ' ')
            return 0;
        h.status = (rest[0] - '0') * 100 + (rest[1] - '0') * 10 + (rest[2] - '0');
        h.method = Py_NewRef(empty_str);
        h.target = Py_NewRef(empty_str);
        h.reason = rest_len > 4 ? PyUnicode_DecodeLatin1(rest + 4, rest_len - 4, NULL) : Py_NewRef(empty_str);
        if (h.reason == NULL)
            goto fail;
    }
    h.headers = PyList_New(0);
    if (h.headers == NULL)
        goto fail;

    int have_length = 0;
    for (const char *p = first_end ? first_end + 2 : end; p < end;) {
        const char *nl = memchr(p, '\r', end - p);
        const char *le = nl ? nl : end;
        const char *colon = memchr(p, ':', le - p);
        if (colon == NULL || colon == p || !all_token(p, colon - p))
            goto decline; /* includes obs-fold: a line starting with SP/HTAB */
        const char *v = colon + 1, *ve = le;
        while (v < ve && (*v == ' ' || *v == '\t'))
            v++;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
            ve--;
        PyObject *key = name_str(p, colon - p);
        PyObject *text = key ? PyUnicode_DecodeLatin1(v, ve - v, NULL) : NULL;
        PyObject *pair = text ? PyTuple_Pack(2, key, text) : NULL;
        Py_XDECREF(key);
        if (pair == NULL || PyList_Append(h.headers, pair) < 0) {
            Py_XDECREF(pair);
            Py_XDECREF(text);
            goto fail;
        }
        Py_DECREF(pair);
        PyObject *lkey = framing_key(p, colon - p);
        p = nl ? nl + 2 : end;
        if (lkey == lk_cl && !have_length && ve - v >= 1 && ve - v <= MAX_CONTENT_LENGTH_DIGITS) {
            /* The usual Content-Length: digits only, the first one seen. */
            long long value = 0;
            const char *d = v;
            for (; d < ve && *d >= '0' && *d <= '9'; d++)
                value = value * 10 + (*d - '0');
            if (d == ve) {
                have_length = 1;
                Py_DECREF(text);
                if (msg == NULL)
                    h.content_length = value;
                else if (set_new(msg, a_content_length, PyLong_FromLongLong(value)) < 0)
                    goto fail;
                continue;
            }
        }
        if (lkey == lk_conn && ve > v && all_token(v, ve - v)) {
            /* The usual Connection: one token (keep-alive, close), where
             * Python's strip() and lower() change nothing but ASCII case. */
            Py_DECREF(text);
            if (ve - v == 5 && ascii_ieq(v, "close", 5)) {
                if (msg == NULL)
                    h.close = 1;
                else if (set(msg, a_close, Py_True) < 0)
                    goto fail;
            }
            continue;
        }
        if (lkey != NULL) {
            if (lkey == lk_cl)
                have_length = 1;
            if (msg == NULL && (msg = make_head(&h)) == NULL) {
                Py_DECREF(text);
                goto fail;
            }
            PyObject *r = PyObject_CallFunctionObjArgs(framing_fn, msg, lkey, text, NULL);
            Py_DECREF(text);
            if (r == NULL) {
                /* A framing error: the Python parser raises it, worded its way. */
                PyErr_Clear();
                goto decline;
            }
            Py_DECREF(r);
        } else {
            Py_DECREF(text);
        }
    }
    if (msg == NULL && (msg = make_head(&h)) == NULL)
        goto fail;
    parts_clear(&h);
    *out = msg;
    return 1;

decline:
    parts_clear(&h);
    Py_XDECREF(msg);
    return 0;
fail:
    parts_clear(&h);
    Py_XDECREF(msg);
    return -1;
}

/* parse_head(buf[start:stop], is_request), the whole buffer when ``whole``.
 * In place: the reader's buffer is bytes or a bytearray, whose slicing
 * compiled code does through the generic protocol and a copy (~300
 * instructions a message).  Only what the fast parser declines is copied
 * out, for the Python parser. */
static PyObject *parse_span(PyObject *buf, Py_ssize_t start, Py_ssize_t stop, int whole, PyObject *is_request_obj) {
    if (new_head_fn == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_headparse.configure() was not called");
        return NULL;
    }
    int is_request = PyObject_IsTrue(is_request_obj);
    if (is_request < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (whole) {
        start = 0;
        stop = view.len;
    } else if (start < 0 || stop < start || stop > view.len) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "parse_head_at: [%zd:%zd] is not within a buffer of %zd bytes", start, stop,
                     view.len);
        return NULL;
    }
    PyObject *msg;
    int rc = parse_fast((const char *)view.buf + start, stop - start, is_request, &msg);
    PyObject *head = rc != 0 ? NULL
                     : whole ? Py_NewRef(buf)
                             : PyBytes_FromStringAndSize((const char *)view.buf + start, stop - start);
    PyBuffer_Release(&view);
    if (rc < 0)
        return NULL;
    if (rc > 0)
        return msg;
    if (head == NULL)
        return NULL;
    msg = PyObject_CallFunctionObjArgs(fallback_fn, head, is_request_obj, NULL);
    Py_DECREF(head);
    return msg;
}

static PyObject *parse_head(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "parse_head(head, is_request)");
        return NULL;
    }
    return parse_span(args[0], 0, 0, 1, args[1]);
}

static PyObject *parse_head_at(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "parse_head_at(buf, start, stop, is_request)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]), stop = PyLong_AsSsize_t(args[2]);
    if ((start == -1 || stop == -1) && PyErr_Occurred())
        return NULL;
    return parse_span(args[0], start, stop, 0, args[3]);
}

/* The lower-case form of an ASCII name: the same object when it has no capitals. */
static PyObject *ascii_lower(PyObject *name) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(name);
    const Py_UCS1 *p = PyUnicode_1BYTE_DATA(name);
    Py_ssize_t i = 0;
    while (i < n && !(p[i] >= 'A' && p[i] <= 'Z'))
        i++;
    if (i == n)
        return Py_NewRef(name);
    PyObject *low = PyUnicode_New(n, 127);
    if (low == NULL)
        return NULL;
    Py_UCS1 *q = PyUnicode_1BYTE_DATA(low);
    for (i = 0; i < n; i++)
        q[i] = (p[i] >= 'A' && p[i] <= 'Z') ? p[i] + 32 : p[i];
    return low;
}

/* More fields than this: combined the dicts' way (in Python), not by n² compares. */
#define COMBINE_MAX 64

/* The lower-case form of an ASCII name (a new reference). */
static PyObject *lower_name(PyObject *name) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(name);
    const char *p = (const char *)PyUnicode_1BYTE_DATA(name);
    for (int i = 0; i < N_COMMON; i++)
        if (common_len[i] == n && ascii_ieq(p, COMMON_NAMES[i], n))
            return Py_NewRef(common_lower[i]);
    return ascii_lower(name);
}

static int same_ascii(PyObject *a, PyObject *b) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    return a == b || (n == PyUnicode_GET_LENGTH(b) && memcmp(PyUnicode_1BYTE_DATA(a), PyUnicode_1BYTE_DATA(b), n) == 0);
}

/* 1: combined into *out; 0: not str pairs with ASCII names (or very many), let
 * Python do it; -1: error.  `seq` is a list or tuple (PySequence_Fast), and
 * holds the names used as keys alive throughout. */
static int combine_fast(PyObject *seq, PyObject *by_lower, PyObject **out) {
    *out = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (n > COMBINE_MAX)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = items[i];
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyUnicode_CheckExact(PyTuple_GET_ITEM(pair, 0)) || !PyUnicode_IS_ASCII(PyTuple_GET_ITEM(pair, 0)) ||
            !PyUnicode_CheckExact(PyTuple_GET_ITEM(pair, 1)))
            return 0;
    }
    /* Each distinct name in first-seen order: its lower-case form and its
     * value so far (both owned), and the case it was first sent in. */
    PyObject *low[COMBINE_MAX], *key[COMBINE_MAX], *val[COMBINE_MAX], *combined = NULL;
    Py_ssize_t u = 0;
    int rc = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(items[i], 0), *value = PyTuple_GET_ITEM(items[i], 1);
        PyObject *l = lower_name(name);
        if (l == NULL)
            goto done;
        Py_ssize_t j = 0;
        while (j < u && !same_ascii(low[j], l))
            j++;
        if (j == u) {
            low[u] = l;
            key[u] = name;
            val[u++] = Py_NewRef(value);
            continue;
        }
        Py_DECREF(l);
        PyObject *seen = val[j], *next;
        if (PyUnicode_CompareWithASCIIString(low[j], "set-cookie") == 0) {
            /* Its values may hold commas: repeats stay a list (a new one, as [*seen, value]). */
            next = PyList_Check(seen) ? PyList_GetSlice(seen, 0, PyList_GET_SIZE(seen)) : PyList_New(0);
            if (next != NULL && ((!PyList_Check(seen) && PyList_Append(next, seen) < 0) ||
                                 PyList_Append(next, value) < 0))
                Py_CLEAR(next);
        } else {
            /* Cookie pairs are separated by "; " (RFC 6265 §4.2.1): joined
             * with ", " two cookies would read as one whose value has a comma. */
            int cookie = PyUnicode_CompareWithASCIIString(low[j], "cookie") == 0;
            next = PyUnicode_FromFormat(cookie ? "%S; %U" : "%S, %U", seen, value);
        }
        if (next == NULL)
            goto done;
        Py_SETREF(val[j], next);
    }
    if ((combined = PyDict_New()) == NULL)
        goto done;
    for (Py_ssize_t j = 0; j < u; j++)
        if (PyDict_SetItem(combined, key[j], val[j]) < 0)
            goto done;
    if (by_lower != NULL && by_lower != Py_None)
        for (Py_ssize_t j = 0; j < u; j++)
            if (PyObject_SetItem(by_lower, low[j], val[j]) < 0)
                goto done;
    *out = combined;
    combined = NULL;
    rc = 1;
done:
    for (Py_ssize_t j = 0; j < u; j++) {
        Py_DECREF(low[j]);
        Py_DECREF(val[j]);
    }
    Py_XDECREF(combined);
    return rc;
}

static PyObject *combine_fallback; /* model._combined_headers_py */

static PyObject *combine(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "combined_headers(headers, by_lower=None)");
        return NULL;
    }
    PyObject *by_lower = nargs == 2 ? args[1] : Py_None;
    /* Materialised once: a one-shot iterator drained here must not reach the
     * fallback empty. */
    PyObject *seq = PySequence_Fast(args[0], "headers must be a sequence");
    if (seq == NULL)
        return NULL;
    PyObject *out = NULL;
    int rc = combine_fast(seq, by_lower, &out);
    if (rc == 0) {
        if (combine_fallback == NULL)
            PyErr_SetString(PyExc_RuntimeError, "_headparse.configure_combine() was not called");
        else
            out = PyObject_CallFunctionObjArgs(combine_fallback, seq, by_lower, NULL);
    }
    Py_DECREF(seq);
    return out;
}

static PyObject *configure_combine(PyObject *self, PyObject *fallback) {
    Py_XSETREF(combine_fallback, Py_NewRef(fallback));
    Py_RETURN_NONE;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *new_head, *framing, *fallback;
    Py_ssize_t max;
    if (!PyArg_ParseTuple(args, "OOOn:configure", &new_head, &framing, &fallback, &max))
        return NULL;
    if (max <= 0) {
        PyErr_SetString(PyExc_ValueError, "configure: max_head must be positive");
        return NULL;
    }
    if (!PyCallable_Check(new_head)) {
        PyErr_SetString(PyExc_TypeError, "configure: new_head must be callable");
        return NULL;
    }
    Py_XSETREF(new_head_fn, Py_NewRef(new_head));
    Py_XSETREF(framing_fn, Py_NewRef(framing));
    Py_XSETREF(fallback_fn, Py_NewRef(fallback));
    max_head = max;
    Py_RETURN_NONE;
}

/* Where the head in b[start:limit] ends (the LF starting its blank line), or -1. */
static Py_ssize_t head_end_in(const char *b, Py_ssize_t len, Py_ssize_t start, Py_ssize_t limit) {
    if (limit > len)
        limit = len;
    for (Py_ssize_t p = start; p + 2 <= limit; p++) {
        const char *nl = memchr(b + p, '\n', (size_t)(limit - 1 - p)); /* an LF with a byte after it */
        if (nl == NULL)
            break;
        p = nl - b;
        if (b[p + 1] == '\n' || (b[p + 1] == '\r' && p + 3 <= limit && b[p + 2] == '\n'))
            return p;
    }
    return -1;
}

/* head_end(buf, start, limit) -> int: http1_parse.head_end_py in one pass.
 * Two bytes.find calls per message (LF CR LF, then LF LF up to it) were a
 * tenth of reading a small one, most of it the method calls. */
static PyObject *head_end(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "head_end(buf, start, limit)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]), limit = PyLong_AsSsize_t(args[2]);
    if ((start == -1 || limit == -1) && PyErr_Occurred())
        return NULL;
    if (start < 0 || limit < 0) {  /* bytes.find would count these from the end */
        PyErr_SetString(PyExc_ValueError, "head_end: start and limit must not be negative");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t found = head_end_in(view.buf, view.len, start, limit);
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(found);
}

/* plausible_start's answer for b[:len]. */
static int plausible_in(const char *b, Py_ssize_t len, Py_ssize_t pos, Py_ssize_t end, int is_request) {
    Py_ssize_t have = pos < len ? len - pos : 0;
    if (!is_request) {
        /* The whole prefix, or as much of it as there is. */
        Py_ssize_t n = have < 5 ? have : 5;
        return memcmp(b + pos, "HTTP/", (size_t)n) == 0;
    }
    /* A token up to a space within 24 bytes (the buffer's end bounds the
     * search, `end` the token when no space is found). */
    Py_ssize_t window = have < 24 ? have : 24;
    const char *sp = window > 0 ? memchr(b + pos, ' ', (size_t)window) : NULL;
    Py_ssize_t stop = sp ? sp - b : (end < pos + 24 ? end : pos + 24);
    if (stop > len)
        stop = len;
    Py_ssize_t n = stop > pos ? stop - pos : 0;
    if (sp == NULL && n >= 24)
        return 0;
    return all_token(b + pos, n);
}

/* plausible_start(buf, pos, end, is_request) -> bool: http1_parse.plausible_start_py.
 * Whether a message could start at buf[pos]: a response with "HTTP/" (or
 * the start of it, when fewer bytes are in), a request with a token of at
 * most 23 bytes before a space.  Called for every message, where the
 * method calls on a bytes|bytearray cost ~1,200 instructions. */
static PyObject *plausible_start(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "plausible_start(buf, pos, end, is_request)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]);
    if ((pos == -1 || end == -1) && PyErr_Occurred())
        return NULL;
    if (pos < 0 || end < 0) {  /* slices would count these from the end */
        PyErr_SetString(PyExc_ValueError, "plausible_start: pos and end must not be negative");
        return NULL;
    }
    int is_request = PyObject_IsTrue(args[3]);
    if (is_request < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int ok = plausible_in(view.buf, view.len, pos, end, is_request);
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

/* read_head(buf, pos, end, scan, is_request) -> (Head, next) | None.
 * The reader's usual step in one call (http1_parse.read_head_py): a message
 * starting at buf[pos] (no blank lines before it), plausible, its whole head
 * in buf[:end] within MAX_HEAD, searched for its end from `scan`, parsed by
 * the fast parser; `next` is where what follows it starts.  None for
 * anything else, for the reader's step-by-step path (which words every
 * error).  Three calls and two generic byte reads a message were ~1,500
 * instructions a transaction, most of it boxing offsets. */
static PyObject *read_head(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "read_head(buf, pos, end, scan, is_request)");
        return NULL;
    }
    if (new_head_fn == NULL || max_head < 0) {
        PyErr_SetString(PyExc_RuntimeError, "_headparse.configure() was not called");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]), scan = PyLong_AsSsize_t(args[3]);
    if ((pos == -1 || end == -1 || scan == -1) && PyErr_Occurred())
        return NULL;
    if (pos < 0 || end < 0 || scan < pos) {
        PyErr_SetString(PyExc_ValueError, "read_head: needs 0 <= pos <= scan and 0 <= end");
        return NULL;
    }
    int is_request = PyObject_IsTrue(args[4]);
    if (is_request < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const char *b = view.buf;
    if (end > view.len)
        end = view.len;
    PyObject *head = NULL;
    int rc = 0;
    Py_ssize_t next = -1;
    if (pos < end && b[pos] != '\r' && b[pos] != '\n' && plausible_in(b, end, pos, end, is_request)) {
        Py_ssize_t stop = head_end_in(b, end, scan, pos + max_head);
        if (stop >= 0) {
            next = stop + (b[stop + 1] == '\n' ? 2 : 3);
            rc = parse_fast(b + pos, stop - pos, is_request, &head);
        }
    }
    PyBuffer_Release(&view);
    if (rc < 0) {
        /* A framing header the Python check refused: the step-by-step path
         * reads it again and words it. */
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (rc == 0)
        Py_RETURN_NONE;
    PyObject *n = PyLong_FromSsize_t(next);
    PyObject *out = n != NULL ? PyTuple_New(2) : NULL;
    if (out == NULL) {
        Py_XDECREF(n);
        Py_DECREF(head);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, head);
    PyTuple_SET_ITEM(out, 1, n);
    return out;
}

static PyMethodDef methods[] = {
    {"plausible_start", (PyCFunction)(void (*)(void))plausible_start, METH_FASTCALL,
     "Whether a message could start at buf[pos] (http1_parse.plausible_start_py)."},
    {"head_end", (PyCFunction)(void (*)(void))head_end, METH_FASTCALL,
     "head_end(buf, start, limit) -> int: http1_parse.head_end_py."},
    {"parse_head", (PyCFunction)(void (*)(void))parse_head, METH_FASTCALL,
     "parse_head(head, is_request) -> Head: the common case in C, the rest by the Python parser."},
    {"parse_head_at", (PyCFunction)(void (*)(void))parse_head_at, METH_FASTCALL,
     "parse_head_at(buf, start, stop, is_request) -> Head: parse_head(buf[start:stop], is_request), no slice."},
    {"read_head", (PyCFunction)(void (*)(void))read_head, METH_FASTCALL,
     "read_head(buf, pos, end, scan, is_request) -> (Head, next) | None: http1_parse.read_head_py."},
    {"configure", configure, METH_VARARGS, "configure(new_head, _framing_header, parse_head_py, max_head)"},
    {"combined_headers", (PyCFunction)(void (*)(void))combine, METH_FASTCALL,
     "combined_headers(headers, by_lower=None): model.combined_headers for str pairs with ASCII names."},
    {"configure_combine", configure_combine, METH_O, "configure_combine(combined_headers_py)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_headparse", NULL, -1, methods};

PyMODINIT_FUNC PyInit__headparse(void) {
    const char *tok = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    for (const char *c = tok; *c; c++)
        is_token[(unsigned char)*c] = 1;
    INTERN(v11, "HTTP/1.1");
    INTERN(v10, "HTTP/1.0");
    INTERN(lk_cl, "content-length");
    INTERN(lk_te, "transfer-encoding");
    INTERN(lk_conn, "connection");
    INTERN(lk_up, "upgrade");
    INTERN(lk_ce, "content-encoding");
    INTERN(a_content_length, "content_length");
    INTERN(a_close, "close");
    INTERN(empty_str, "");
    for (int i = 0; i < N_COMMON; i++) {
        INTERN(common_lower[i], COMMON_NAMES[i]);
        INTERN(common_sent[i], COMMON_SENT[i]);
        common_len[i] = (Py_ssize_t)strlen(COMMON_NAMES[i]);
        if ((Py_ssize_t)strlen(COMMON_SENT[i]) != common_len[i] || !ascii_ieq(COMMON_SENT[i], COMMON_NAMES[i], common_len[i])) {
            PyErr_Format(PyExc_SystemError, "_headparse: COMMON_SENT[%d] is not COMMON_NAMES[%d]", i, i);
            return NULL;
        }
    }
    return PyModule_Create(&module);
}
