/* A watchdog on the ring buffer's fill that lifts idle threads, without the GIL.
 *
 * With --cpu-priority auto the agent's threads, the ring reader among them,
 * run as SCHED_IDLE while it keeps up (priority.py): a woken nginx or wrk then
 * never waits behind them.  But an idle thread gets no core while the traced
 * programs take every one, so it cannot be the one to notice that the agent
 * has fallen behind; nor can any Python thread, whose GIL an idle thread may
 * hold.  This thread is a plain pthread at normal priority: every period it
 * reads the ring's producer and consumer positions (two loads from the pages
 * the reader maps), and once the unread bytes reach the threshold, or records
 * have waited unread for the stall time (the reader got no core: the stream
 * falls behind even when the ring is far from full), it sets the threads it
 * was armed with to SCHED_OTHER and disarms.  Python lowers them
 * again, and re-arms it, when caught up (CpuPriority).  Its cost: one short
 * wake-up per period.  An agent left running on a quiet machine paid that 80
 * to 100 times a second for nothing, so after QUIET_CHECKS looks at a ring
 * nothing was written to, it looks QUIET_FACTOR times less often, until
 * something is.  The first records after a quiet spell may then wait a quiet
 * period to be noticed; the ring cannot overflow meanwhile, since the probes
 * shed large calls on their own once it is half full (probes/common.h).
 */
#include "../_capi.h"
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <sys/prctl.h>
#include <time.h>

#define MAX_TIDS 256
#define QUIET_CHECKS 100 /* 1 s at the agent's 10 ms */
#define QUIET_FACTOR 10

typedef struct {
    PyObject_HEAD
    Py_buffer data, consumer; /* held while the thread runs: the mmaps cannot close under it */
    int have_buffers;
    uint64_t threshold;  /* unread bytes that lift */
    long period_ns;
    uint64_t stall_ns;   /* records unread, none consumed, this long: lift */
    uint64_t last_cons, waiting_since; /* the consumer position last seen, since when (0: none waiting) */
    uint64_t last_prod, unchanged;     /* the producer position last seen, looks since it moved */
    pthread_t thread;
    int started;
    pthread_mutex_t mu; /* guards tids, stop; the condition wakes the thread for close() */
    pthread_cond_t cv;
    int stop;
    int armed;
    pid_t tids[MAX_TIDS];
    int ntids;
    uint64_t lifts, checks;
} Watchdog;

/* Whether the reader is behind: too much unread, or unread too long. */
static int behind(Watchdog *w, const struct timespec *now) {
    uint64_t cons = __atomic_load_n((const uint64_t *)w->consumer.buf, __ATOMIC_RELAXED);
    uint64_t prod = __atomic_load_n((const uint64_t *)w->data.buf, __ATOMIC_ACQUIRE);
    if (prod <= cons) { /* nothing waits (or a torn read: looked at again next period) */
        w->waiting_since = 0;
        return 0;
    }
    uint64_t t = (uint64_t)now->tv_sec * 1000000000u + (uint64_t)now->tv_nsec;
    if (w->waiting_since == 0 || cons != w->last_cons) { /* it read some since: it has a core */
        w->last_cons = cons;
        w->waiting_since = t;
    }
    return prod - cons >= w->threshold || t - w->waiting_since >= w->stall_ns;
}

static void *watch(void *arg) {
    Watchdog *w = arg;
    /* Started from a thread that may be idle already: this one must not be. */
    struct sched_param none = {0};
    sched_setscheduler(0, SCHED_OTHER, &none);
    prctl(PR_SET_NAME, "qtap-watchdog", 0, 0, 0);
    /* Its wake-ups may be late by a quarter period: the kernel can then fold
     * them into other timers' instead of interrupting a traced program. */
    prctl(PR_SET_TIMERSLACK, (unsigned long)w->period_ns / 4, 0, 0, 0);
    pthread_mutex_lock(&w->mu);
    while (!w->stop) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_nsec += w->unchanged >= QUIET_CHECKS ? w->period_ns * QUIET_FACTOR : w->period_ns;
        until.tv_sec += until.tv_nsec / 1000000000L;
        until.tv_nsec %= 1000000000L;
        while (!w->stop && pthread_cond_timedwait(&w->cv, &w->mu, &until) != ETIMEDOUT)
            ;
        if (w->stop)
            break;
        w->checks++;
        uint64_t prod = __atomic_load_n((const uint64_t *)w->data.buf, __ATOMIC_RELAXED);
        if (prod != w->last_prod) {
            w->last_prod = prod;
            w->unchanged = 0;
        } else if (w->unchanged < QUIET_CHECKS) {
            w->unchanged++;
        }
        if (w->armed && behind(w, &until)) {
            for (int i = 0; i < w->ntids; i++)
                sched_setscheduler(w->tids[i], SCHED_OTHER, &none); /* ESRCH: it ended meanwhile */
            w->armed = 0;
            w->lifts++;
        }
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

static void stop_thread(Watchdog *w) {
    if (w->started) {
        pthread_mutex_lock(&w->mu);
        w->stop = 1;
        pthread_cond_signal(&w->cv);
        pthread_mutex_unlock(&w->mu);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(w->thread, NULL);
        Py_END_ALLOW_THREADS
        w->started = 0;
    }
    if (w->have_buffers) {
        PyBuffer_Release(&w->consumer);
        PyBuffer_Release(&w->data);
        w->have_buffers = 0;
    }
}

/* Watchdog(data, consumer, threshold_bytes, period_us, stall_us): data maps the
 * ring's producer page (its position first), consumer the consumer page. */
static int wd_init(Watchdog *w, PyObject *args, PyObject *kw) {
    PyObject *data, *consumer;
    unsigned long long threshold;
    long period_us, stall_us;
    if (w->started || w->have_buffers) {
        PyErr_SetString(PyExc_RuntimeError, "Watchdog is already running");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OOKll:Watchdog", &data, &consumer, &threshold, &period_us, &stall_us))
        return -1;
    if (threshold == 0 || period_us < 100 || period_us > 1000000 || stall_us < period_us || stall_us > 60000000) {
        PyErr_SetString(PyExc_ValueError, "Watchdog: threshold must be positive, the period 100 µs to 1 s and the "
                                          "stall time from the period to 60 s");
        return -1;
    }
    if (PyObject_GetBuffer(data, &w->data, PyBUF_SIMPLE) < 0)
        return -1;
    if (PyObject_GetBuffer(consumer, &w->consumer, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&w->data);
        return -1;
    }
    w->have_buffers = 1;
    if (w->data.len < 8 || w->consumer.len < 8 || ((uintptr_t)w->data.buf | (uintptr_t)w->consumer.buf) & 7) {
        stop_thread(w);
        PyErr_SetString(PyExc_ValueError, "Watchdog: the positions must be 8 aligned bytes");
        return -1;
    }
    w->threshold = threshold;
    w->period_ns = period_us * 1000L;
    w->stall_ns = (uint64_t)stall_us * 1000u;
    w->last_cons = w->waiting_since = 0;
    w->last_prod = w->unchanged = 0;
    w->stop = w->armed = w->ntids = 0;
    w->lifts = w->checks = 0;
    pthread_mutex_init(&w->mu, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&w->cv, &attr);
    pthread_condattr_destroy(&attr);
    int rc = pthread_create(&w->thread, NULL, watch, w);
    if (rc != 0) {
        stop_thread(w);
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    w->started = 1;
    return 0;
}

/* arm(tids): lift these threads once the ring holds threshold unread bytes. */
static PyObject *wd_arm(Watchdog *w, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "arm() takes a sequence of thread ids");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_TIDS) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "arm(): at most %d threads, not %zd", MAX_TIDS, n);
    }
    pid_t tids[MAX_TIDS];
    for (Py_ssize_t i = 0; i < n; i++) {
        long tid = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (tid <= 0) {
            Py_DECREF(seq);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "arm(): thread ids are positive");
            return NULL;
        }
        tids[i] = (pid_t)tid;
    }
    Py_DECREF(seq);
    pthread_mutex_lock(&w->mu);
    memcpy(w->tids, tids, n * sizeof tids[0]);
    w->ntids = (int)n;
    w->waiting_since = 0; /* a stall is timed from now */
    w->armed = w->started && n > 0; /* arm([]) disarms */
    pthread_mutex_unlock(&w->mu);
    Py_RETURN_NONE;
}

static PyObject *wd_close(Watchdog *w, PyObject *unused) {
    stop_thread(w);
    Py_RETURN_NONE;
}

static PyObject *wd_get(Watchdog *w, void *which) {
    pthread_mutex_lock(&w->mu);
    uint64_t v = which == (void *)0   ? (uint64_t)w->armed
                 : which == (void *)1 ? w->lifts
                 : which == (void *)2 ? w->checks
                                      : (uint64_t)(w->unchanged >= QUIET_CHECKS);
    pthread_mutex_unlock(&w->mu);
    return which == (void *)0 || which == (void *)3 ? PyBool_FromLong((long)v) : PyLong_FromUnsignedLongLong(v);
}

static void wd_dealloc(Watchdog *w) {
    stop_thread(w);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyMethodDef wd_methods[] = {
    {"arm", (PyCFunction)wd_arm, METH_O, "arm(tids): lift these threads when the ring is behind, once; arm([]) disarms"},
    {"close", (PyCFunction)wd_close, METH_NOARGS, "stop the thread and let go of the ring's pages"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef wd_getset[] = {
    {"armed", (getter)wd_get, NULL, "armed and not yet lifted", (void *)0},
    {"lifts", (getter)wd_get, NULL, "times it lifted the threads", (void *)1},
    {"checks", (getter)wd_get, NULL, "times it looked at the ring", (void *)2},
    {"quiet", (getter)wd_get, NULL, "nothing written to the ring for a while: it looks less often", (void *)3},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WatchdogType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "qtap_devtools.capture._watchdog.Watchdog",
    .tp_basicsize = sizeof(Watchdog),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Watchdog(data, consumer, threshold_bytes, period_us, stall_us)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)wd_init,
    .tp_dealloc = (destructor)wd_dealloc,
    .tp_methods = wd_methods,
    .tp_getset = wd_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_watchdog", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__watchdog(void) {
    if (PyType_Ready(&WatchdogType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Watchdog", (PyObject *)&WatchdogType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
