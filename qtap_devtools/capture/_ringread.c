/* The ring buffer's records walked in C, data records decoded in C.
 *
 * ringbuf.RingReader.read is the reference: same walk (BUSY stops it, DISCARD
 * is skipped, the consumer position is stored once per batch), same records.
 * Data records, nearly all of the traffic, become DataChunk objects here; any
 * other kind, and the rare record that wraps the end of the data area, go to
 * the Python parse_at(area, start, size) as before.  A record that fails to
 * decode is counted and skipped, never fatal: the ring's contents come from
 * the kernel but describe untrusted traffic.
 *
 * Why C: at ~40,000 records a second, the Python loop and its per-record
 * unpack were about a tenth of the agent's CPU.
 */
#include "../_capi.h"
#include <stdint.h>
#include <string.h>

#define BUSY (1u << 31)
#define DISCARD (1u << 30)
#define HDR 8

static PyObject *chunk_type;  /* chunk.DataChunk */
static PyObject *chunk_make;  /* chunk.make: DataChunk(...) */
static PyObject *directions;  /* tuple of str */
static PyObject *sources;     /* tuple of str */
static unsigned data_kind;    /* rec_kind DATA */
static Py_ssize_t data_hdr;   /* DATA_HDR_SIZE: rec_hdr + data_rec header */
static unsigned shedding_flag;
static PyObject *a_data; /* "data" */

/* The 48-byte header, as records._DATA_FULL unpacks it ("<IIIiQQIBBHQ"). */
struct data_hdr {
    uint32_t kind, pid, tid;
    int32_t fd;
    uint64_t ts, offset;
    uint32_t length;
    uint8_t direction, source;
    uint16_t flags;
    uint64_t tls_ref;
} __attribute__((packed));

/* A DataChunk for the data record at p (size bytes), or NULL with an error set;
 * its payload's length added to *payload. */
static PyObject *data_chunk(const char *p, Py_ssize_t size, Py_ssize_t *payload) {
    struct data_hdr h;
    memcpy(&h, p, sizeof h);
    if ((Py_ssize_t)h.length > size - data_hdr) {
        PyErr_Format(PyExc_ValueError, "data record claims %u bytes in %zd", h.length, size);
        return NULL;
    }
    if (h.direction >= PyTuple_GET_SIZE(directions) || h.source >= PyTuple_GET_SIZE(sources)) {
        PyErr_SetString(PyExc_ValueError, "data record with an unknown direction or source");
        return NULL;
    }
    /* Made by chunk.make, as Python would make it: the class is compiled, and a
     * native object is only sound once its own constructor has run. */
    PyObject *args[10] = {
        PyLong_FromUnsignedLong(h.pid), PyLong_FromUnsignedLong(h.tid), PyLong_FromLong(h.fd),
        PyLong_FromUnsignedLongLong(h.ts), PyTuple_GET_ITEM(directions, h.direction),
        PyTuple_GET_ITEM(sources, h.source), PyLong_FromUnsignedLongLong(h.offset),
        PyBytes_FromStringAndSize(p + data_hdr, h.length), PyLong_FromUnsignedLongLong(h.tls_ref),
        (h.flags & shedding_flag) ? Py_True : Py_False,
    };
    PyObject *c = NULL;
    if (args[0] && args[1] && args[2] && args[3] && args[6] && args[7] && args[8])
        c = PyObject_Vectorcall(chunk_make, args, 10, NULL);
    for (int i = 0; i < 10; i++)
        if (i != 4 && i != 5 && i != 9)  /* the new references (the others are borrowed) */
            Py_XDECREF(args[i]);
    if (c == NULL)
        return NULL;
    *payload += h.length;
    return c;
}

/* read(data, consumer, size, page, parse_at, out, max_records, others) -> (taken, errors, data_bytes)
 * Every record goes to out, in ring order; those that are not data records to
 * others as well (the reader's bookkeeping looks at those only), and
 * data_bytes sums the data records' payloads (the backlog's byte bound). */
static PyObject *ring_read(PyObject *self, PyObject *args) {
    PyObject *data_obj, *consumer_obj, *parse_at, *out, *others;
    Py_ssize_t size, page, max_records;
    if (!PyArg_ParseTuple(args, "OOnnOO!nO!:read", &data_obj, &consumer_obj, &size, &page, &parse_at,
                          &PyList_Type, &out, &max_records, &PyList_Type, &others))
        return NULL;
    if (chunk_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_ringread.configure() was not called");
        return NULL;
    }
    if (size <= 0 || (size & (size - 1)) || page < 8) {
        PyErr_SetString(PyExc_ValueError, "ring size must be a power of two and page at least 8");
        return NULL;
    }
    Py_buffer data, consumer;
    if (PyObject_GetBuffer(data_obj, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(consumer_obj, &consumer, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *result = NULL;
    if (data.len < page + size || consumer.len < 8) {
        PyErr_SetString(PyExc_ValueError, "ring mappings are smaller than the ring");
        goto done;
    }
    const char *base = data.buf;
    uint64_t *cons_pos = consumer.buf;
    const uint64_t mask = (uint64_t)size - 1;
    const Py_ssize_t data_end = page + size;
    /* The kernel publishes the producer position, and each record's length,
     * with release stores: read them with acquire loads. */
    uint64_t cons = __atomic_load_n(cons_pos, __ATOMIC_RELAXED);
    uint64_t prod = __atomic_load_n((const uint64_t *)base, __ATOMIC_ACQUIRE);
    Py_ssize_t taken = 0, errors = 0, data_bytes = 0;
    while (cons < prod && taken < max_records) {
        if (cons & 7) { /* records start 8-aligned: someone else wrote our consumer page */
            errors++;
            cons = prod; /* what is in the ring cannot be found: let it go, counted */
            break;
        }
        Py_ssize_t start = page + (Py_ssize_t)(cons & mask);
        uint32_t len = __atomic_load_n((const uint32_t *)(base + start), __ATOMIC_ACQUIRE);
        if (len & BUSY)
            break; /* reserved, not yet committed: later ones must wait too */
        Py_ssize_t rsize = len & ~(BUSY | DISCARD);
        cons += ((uint64_t)rsize + HDR + 7) & ~(uint64_t)7;
        if (len & DISCARD)
            continue;
        taken++;
        if (rsize > size - HDR) { /* longer than the ring: a corrupt length, never copied */
            errors++;
            continue;
        }
        Py_ssize_t begin = start + HDR;
        PyObject *rec;
        int decoded = 0;
        if (begin + rsize <= data_end && rsize >= data_hdr && (unsigned char)base[begin] == data_kind) {
            rec = data_chunk(base + begin, rsize, &data_bytes);
            decoded = 1;
        } else if (begin + rsize <= data_end) {
            rec = PyObject_CallFunction(parse_at, "Onn", data_obj, begin, rsize);
        } else { /* wraps: its tail is at the start of the data area */
            Py_ssize_t head = data_end - begin;
            PyObject *joined = PyBytes_FromStringAndSize(NULL, rsize);
            if (joined == NULL)
                goto store;
            memcpy(PyBytes_AS_STRING(joined), base + begin, head);
            memcpy(PyBytes_AS_STRING(joined) + head, base + page, rsize - head);
            rec = PyObject_CallFunction(parse_at, "Onn", joined, (Py_ssize_t)0, rsize);
            Py_DECREF(joined);
        }
        if (rec == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                goto store; /* KeyboardInterrupt, MemoryError…: not the record's fault */
            PyErr_Clear(); /* untrusted layout: count it, keep reading */
            errors++;
            continue;
        }
        int rc = PyList_Append(out, rec);
        if (rc == 0 && !decoded) {
            if (Py_TYPE(rec) == (PyTypeObject *)chunk_type) { /* a data record that wrapped */
                PyObject *payload = PyObject_GetAttr(rec, a_data);
                if (payload == NULL)
                    rc = -1;
                else if (PyBytes_Check(payload))
                    data_bytes += PyBytes_GET_SIZE(payload);
                Py_XDECREF(payload);
            } else {
                rc = PyList_Append(others, rec);
            }
        }
        Py_DECREF(rec);
        if (rc < 0)
            goto store;
    }
    result = Py_BuildValue("nnn", taken, errors, data_bytes);
store:
    /* One store per batch: the kernel may reuse the space from here on. */
    __atomic_store_n(cons_pos, cons, __ATOMIC_RELEASE);
done:
    PyBuffer_Release(&consumer);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *type, *make, *dirs, *srcs;
    unsigned kind, flag;
    Py_ssize_t hdr;
    if (!PyArg_ParseTuple(args, "OOO!O!InI:configure", &type, &make, &PyTuple_Type, &dirs, &PyTuple_Type, &srcs,
                          &kind, &hdr, &flag))
        return NULL;
    if (!PyType_Check(type) || !PyCallable_Check(make) || hdr != (Py_ssize_t)sizeof(struct data_hdr)) {
        PyErr_SetString(PyExc_ValueError, "configure: DataChunk must be a class, make a callable and the header "
                                          "48 bytes");
        return NULL;
    }
    Py_XSETREF(chunk_type, Py_NewRef(type));
    Py_XSETREF(chunk_make, Py_NewRef(make));
    Py_XSETREF(directions, Py_NewRef(dirs));
    Py_XSETREF(sources, Py_NewRef(srcs));
    data_kind = kind;
    data_hdr = hdr;
    shedding_flag = flag;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"read", ring_read, METH_VARARGS,
     "read(data, consumer, size, page, parse_at, out, max_records, others) -> (taken, errors, data_bytes)"},
    {"configure", configure, METH_VARARGS,
     "configure(DataChunk, make, DIRECTIONS, SOURCES, DATA, DATA_HDR_SIZE, DATA_SHEDDING)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ringread", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ringread(void) {
    INTERN(a_data, "data");
    return PyModule_Create(&module);
}
