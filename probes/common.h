/* Shared record layout and helpers for every probe.
 *
 * Mirrored once in Python: qtap_devtools/capture/records.py.  Every record
 * starts with struct rec_hdr; all integers are little-endian, naturally
 * aligned, no implicit padding.
 *
 * Kernel rule (DESIGN §3): the running kernel's struct layouts do not match our
 * headers, so probes read only helper results, tracepoint args (tracefs formats
 * are read at compile time, so those are right) and user memory.
 */
#ifndef QTAP_COMMON_H
#define QTAP_COMMON_H

#include <uapi/linux/ptrace.h>

#ifndef MAX_CHUNK
#define MAX_CHUNK 16384          /* bytes of payload per data record */
#endif
#ifndef MAX_SPLIT
#define MAX_SPLIT 64             /* data records per call; beyond is lost */
#endif
#ifndef RING_PAGES
#define RING_PAGES 8192          /* 32 MiB with 4 KiB pages */
#endif
#ifndef EXCLUDE_TGID
#define EXCLUDE_TGID 0
#endif
#ifndef EXCLUDE_PORT
#define EXCLUDE_PORT 0
#endif
/* Data records go out without waking the reader; every WAKE_RECORDS records
 * or WAKE_BYTES bytes (per CPU) one forces a wake-up.  The reader also drains
 * the ring on a short timer, so records left unsignalled wait at most that. */
#ifndef WAKE_RECORDS
#define WAKE_RECORDS 1024      /* the loader passes its own (loader.WAKE_RECORDS) */
#endif
#ifndef WAKE_BYTES
#define WAKE_BYTES (256 * 1024)
#endif

#define AF_INET_ 2
#define AF_INET6_ 10
#define EINPROGRESS_ 115

enum rec_kind {
    REC_EXEC = 1,
    REC_FORK = 2,
    REC_EXIT = 3,
    REC_CONNECT = 4,
    REC_ACCEPT = 5,
    REC_ADDRESS = 6,
    REC_CLOSE = 7,
    REC_DATA = 8,
    REC_SNI = 9,
    REC_CGROUP = 10,
};

enum direction { DIR_EGRESS = 0, DIR_INGRESS = 1 };
/* SRC_NODETLS: OpenSSL linked into node (the label Qtap gives it), told
 * apart by its file's armed[] value, not by a program of its own. */
enum source { SRC_SOCKET = 0, SRC_OPENSSL = 1, SRC_GNUTLS = 2, SRC_NODETLS = 3 };

struct rec_hdr {               /* 24 bytes */
    u32 kind;
    u32 pid;                   /* tgid */
    u32 tid;
    s32 fd;                    /* -1 when unknown */
    u64 ts_ns;                 /* bpf_ktime_get_ns(), CLOCK_MONOTONIC */
};

struct addr {                  /* 20 bytes; ip is IPv6 or v4-mapped IPv6 */
    u16 family;                /* 0 unknown, AF_INET, AF_INET6 (as the socket saw it) */
    u16 port;                  /* host byte order */
    u8 ip[16];
};

#define EXEC_ARGS 512          /* argv kept at exec, NUL-separated (process.c) */

struct exec_rec {
    struct rec_hdr h;
    u64 cgroup_id;             /* of its cgroup v2 (unified) cgroup: names its
                                * container even when it is gone before /proc is read */
    u32 uid;
    u32 _pad;
    char comm[16];
    char filename[256];
    /* Its command line, read from the caller's argv as execve began: a
     * process gone before /proc could be read (a fork storm's curls) keeps
     * its arguments.  args_len bytes of args; args_cut: more did not fit. */
    u16 args_len;
    u8 args_cut;
    u8 _pad2[5];
    char args[EXEC_ARGS];
};

struct fork_rec {
    struct rec_hdr h;          /* pid = parent tgid */
    u32 child_pid;
    u32 _pad;
};

struct cgroup_rec {            /* a cgroup v2 directory was made */
    struct rec_hdr h;
    u64 id;                    /* = bpf_get_current_cgroup_id() of its members */
    char path[256];            /* from the hierarchy's root */
};

struct exit_rec {
    struct rec_hdr h;
    s32 exit_code;
    u32 code_known;
};

struct connect_rec {
    struct rec_hdr h;
    struct addr remote;
    s32 ret;
};

struct accept_rec {
    struct rec_hdr h;
    struct addr remote;
    struct addr local;         /* family 0 when the join missed */
};

struct address_rec {
    struct rec_hdr h;
    struct addr local;
    struct addr remote;
};

struct close_rec {             /* a known socket's close */
    struct rec_hdr h;
    u64 offsets[4];            /* where each of its streams ended: [is_tls * 2 + direction] */
    u32 known;                 /* bit i: offsets[i] was tracked */
    u16 flags;                 /* DATA_SHEDDING: shed_cap was set at the close */
    u16 _pad;
};

struct sni_rec {
    struct rec_hdr h;
    u64 tls_ref;               /* SSL* / gnutls_session_t */
    u32 len;
    u32 _pad;
    char host[256];
};

struct data_rec {
    struct rec_hdr h;
    u64 offset;                /* of data[0] within its stream */
    u32 len;                   /* bytes in data[] */
    u8 direction;
    u8 source;
    u16 flags;                 /* DATA_SHEDDING: written while shed_cap was set */
    u64 tls_ref;               /* SSL* / session, 0 for socket data */
    u8 data[MAX_CHUNK];
};
#define DATA_HDR_SIZE 48
#define DATA_SHEDDING 1        /* a gap before this record may be bytes the probes left out */


/* ---- shared maps ---- */

BPF_RINGBUF_OUTPUT(events, RING_PAGES);
/* [0] records lost: the ring full, no scratch, or a call's bytes past what one
 * call may emit (MAX_SPLIT records, MAX_IOV iovecs).  [1] those calls alone,
 * also in [0] (a moved [0] is what makes the call's end record): user space
 * tells the ring's losses from the per-call limit by the difference. */
BPF_PERCPU_ARRAY(lost, u64, 2);
/* Scratch for building a record; [0] is the record, busy guards against a
 * preempted uprobe program (they run with migration, not preemption, off). */
BPF_PERCPU_ARRAY(scratch, struct data_rec, 1);
BPF_PERCPU_ARRAY(scratch_busy, u32, 1);

/* (tgid, fd) -> SOCK_* flags.  Filled at connect/accept, seeded from Python,
 * cleared at close.  LRU: a process that exits with sockets open never closes
 * them through close(), and a plain hash filled with those stopped every new
 * socket from being marked, so plaintext capture ended for good. */
struct sock_key { u32 tgid; s32 fd; };
#define SOCK_KNOWN 1
#define SOCK_TLS 2
#define SOCK_EXCLUDED 4
#define SOCK_FRESH 8           /* its connect/accept was seen and no data yet reported:
                                * its TLS handshake, if any, is still to come */
#define SOCK_NEED_ADDR 16      /* accepted with no peer address (accept(fd, NULL, NULL)): its
                                * 4-tuple is read at its first receive (sockets.c) */
#ifndef MAX_SOCKETS
#define MAX_SOCKETS 65536
#endif
BPF_TABLE("lru_hash", struct sock_key, u32, sock_fds, MAX_SOCKETS);

/* Stream offsets: (tgid, fd, tls_ref when fd unknown, direction, is_tls). */
struct off_key { u32 tgid; s32 fd; u64 tls_ref; u32 direction; u32 is_tls; };
BPF_TABLE("lru_hash", struct off_key, u64, offsets, 65536);

/* The TLS library call in flight on this thread, stashed at its entry and
 * consumed at its return (tls_common.h).  While it is active, the thread's
 * socket syscalls are that call's: they tell us its fd and are not emitted
 * as plaintext.  Task storage, not a hash keyed by tid: it is read or written
 * several times per call on the hottest path, and a hash update and delete
 * per call cost more than the whole rest of the entry program; it is also
 * freed with the thread, so a thread that dies mid-call leaves nothing. */
struct task_struct;
struct tls_call {
    u64 tls_ref;               /* SSL* / gnutls_session_t */
    u64 buf;
    u64 num;                   /* bytes asked for: a count read back is capped by it */
    u64 len_ptr;               /* where the byte count is written (SSL_*_ex's
                                * size_t *, or a tuned site's stack slot); 0:
                                * the return value is the count */
    u64 start_ns;              /* when the call began: a write's records carry it */
    u8 dir;
    u8 source;
    u8 active;                 /* 0: no call in flight (the slot lives as long as the thread) */
    u8 hello_left;             /* syscalls this call may still report as ciphertext: the
                                * first TLS call on a SOCK_FRESH socket, whose handshake
                                * they carry (sockets.c, data_enter) */
    s32 fd;                    /* the connection's fd as known at entry or seen by this
                                * call's syscalls; -1 unknown.  Carried here so the
                                * syscalls and the return need no tls_fd lookup of their own */
};
BPF_TASK_STORAGE(tls_calls, struct tls_call);

static __always_inline struct task_struct *current_task(void)
{
    return (struct task_struct *)bpf_get_current_task_btf();
}

static __always_inline struct tls_call *tls_call_slot(int create)
{
    return tls_calls.task_storage_get(current_task(), 0, create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

/* (tgid, SSL* or gnutls session) -> fd.  Per process: the workers a master
 * forked (nginx, gunicorn) each hold their own objects at the same addresses,
 * and one worker's fd or SSL_free must not stand for another's. */
struct tls_key { u32 tgid; u32 _pad; u64 ref; };
BPF_TABLE("lru_hash", struct tls_key, s32, tls_fd, 65536);
/* A tls_fd value user space writes for an object not to read any more: the
 * agent's own API through a TLS forwarder on this machine (loader.py,
 * exclude_socket).  Its calls stash nothing, so no record is made of them. */
#define FD_EXCLUDED -2

static __always_inline struct tls_key tls_key_of(u64 ref)
{
    struct tls_key k = { .tgid = bpf_get_current_pid_tgid() >> 32, ._pad = 0, .ref = ref };
    return k;
}

/* Overload shedding.  While user space is behind it sets shed_cap[0] to a
 * byte count: a call whose bytes start like an HTTP/1 message (a status line
 * or an upper-case method and a space) or with an HTTP/2 frame that is not
 * DATA (HEADERS, with SETTINGS, WINDOW_UPDATE… ahead of it) keeps at most
 * that many, its head; any other call keeps none.  The stream offset still
 * advances by the whole call, so user space reads what was left out as a gap
 * in a body and keeps framing.  0: no shedding.  shed_stats: [0] calls cut,
 * [1] bytes not copied. */
BPF_ARRAY(shed_cap, u64, 1);
BPF_PERCPU_ARRAY(shed_stats, u64, 3);   /* [2]: of [0], cut by the probes on their own (below) */

/* The probes' own shedding, for when user space cannot set shed_cap in time.
 * The reader sets it once the ring is half full, but at idle priority, on a
 * machine whose cores the traced programs fill, it may not run for tens of
 * milliseconds, in which a burst of large bodies (eight 5 MiB downloads at
 * once) filled the 32 MiB ring: the kernel then lost whole records, heads and
 * all, of transactions that had nothing to do with the burst.  So a call that
 * would be cut also looks at the ring itself, and while SELF_SHED_FILL bytes
 * wait unread it keeps SELF_SHED_HEAD, as if shed_cap said so.  0: off
 * (--no-shed).  The loader passes both. */
#ifndef SELF_SHED_FILL
#define SELF_SHED_FILL 0
#endif
#ifndef SELF_SHED_HEAD
#define SELF_SHED_HEAD 4096
#endif

/* The ring's unread bytes.  bcc 0.26 has no ringbuf_query() method, and the
 * raw helper needs the map pointer, which only bcc's rewriting of a method
 * call emits (events.ringbuf_output(...) becomes bpf_ringbuf_output(<the
 * map>, ...)).  So a query is dressed as an output with a flag no output
 * uses, and every bpf_ringbuf_output the rewriting emits goes through this
 * switch, which the compiler folds away where the flags are constant. */
#define RING_QUERY_FLAG 0x5157
static __always_inline long ring_output_or_query(void *ring, void *data, u64 size, u64 flags)
{
    if (flags == RING_QUERY_FLAG)
        return bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA);
    return bpf_ringbuf_output(ring, data, size, flags);
}
#define bpf_ringbuf_output(ring, data, size, flags) ring_output_or_query((void *)(ring), (data), (size), (flags))

static __always_inline u64 ring_unread(void)
{
    u8 unused = 0;
    return (u64)events.ringbuf_output(&unused, 0, RING_QUERY_FLAG);
}

static __always_inline int starts_like_message(u64 ubuf)
{
    u8 b[8] = {};
    if (!ubuf || bpf_probe_read_user(b, sizeof(b), (void *)ubuf) != 0)
        return 0;
    if (b[0] == 'H' && b[1] == 'T' && b[2] == 'T' && b[3] == 'P' && b[4] == '/' && b[5] == '1' && b[6] == '.')
        return 1;
    /* An HTTP/2 frame header: a length within the default maximum frame
     * (16 KiB), a type from HEADERS (1) to CONTINUATION (9), the stream id's
     * reserved bit clear.  Body bytes look like this about once in 60,000
     * calls, which then keep their head as well. */
    if (b[0] == 0 && b[1] <= 0x40 && b[3] >= 1 && b[3] <= 9 && !(b[5] & 0x80))
        return 1;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (b[i] == ' ')
            return i >= 3;
        if (b[i] < 'A' || b[i] > 'Z')
            return 0;
    }
    return 0;
}

/* How many of a call's `total` bytes to copy under the current shed cap;
 * *shedding is set while the cap is on. */
static __always_inline u64 shed_limit(u64 total, u64 first_buf, u16 *shedding)
{
    int zero = 0, one = 1;
    u64 *capp = shed_cap.lookup(&zero);
    u64 cap = capp ? *capp : 0;
    int own = 0;
    /* Only a call that would be cut asks the ring: small calls pay nothing. */
    if (!cap && SELF_SHED_FILL > 0 && total > SELF_SHED_HEAD && ring_unread() >= SELF_SHED_FILL) {
        cap = SELF_SHED_HEAD;
        own = 1;
    }
    *shedding = cap ? DATA_SHEDDING : 0;
    if (!cap || total <= cap)
        return total;
    u64 keep = starts_like_message(first_buf) ? cap : 0;
    u64 *calls = shed_stats.lookup(&zero);
    if (calls)
        *calls += 1;
    u64 *bytes = shed_stats.lookup(&one);
    if (bytes)
        *bytes += total - keep;
    if (own) {
        int two = 2;
        u64 *by_probes = shed_stats.lookup(&two);
        if (by_probes)
            *by_probes += 1;
    }
    return keep;
}

static __always_inline void count_lost(u64 n)
{
    int zero = 0;
    u64 *v = lost.lookup(&zero);
    if (v)
        *v += n;
}

static __always_inline void count_call_cut(void)
{
    int one = 1;
    u64 *v = lost.lookup(&one);
    if (v)
        *v += 1;
}

static __always_inline int excluded_self(u32 tgid)
{
    return EXCLUDE_TGID != 0 && tgid == EXCLUDE_TGID;
}

static __always_inline void fill_hdr(struct rec_hdr *h, u32 kind, s32 fd)
{
    u64 id = bpf_get_current_pid_tgid();
    h->kind = kind;
    h->pid = id >> 32;
    h->tid = (u32)id;
    h->fd = fd;
    h->ts_ns = bpf_ktime_get_ns();
}

/* Small fixed-size records go straight out of the stack.  They are rare and
 * a reader waits on them (a connection opens, a process starts), so they
 * always wake it: the default "adaptive" wake-up would stay silent whenever
 * unsignalled data records sit before them in the ring. */
static __always_inline void emit_small(void *ctx, void *rec, u32 size)
{
    if (events.ringbuf_output(rec, size, BPF_RB_FORCE_WAKEUP) != 0)
        count_lost(1);
}

/* Wake-up batching for data records.  bcc 0.26 has no ringbuf_query() method
 * and the raw helper needs a map pointer only bcc's own methods emit, so the
 * fill level is approximated per CPU: records and bytes written since this
 * CPU last forced a wake-up.  Per-CPU and racy by design (uprobe programs may
 * interleave on one CPU): an occasional extra or missed wake-up is harmless. */
struct wake_state { u64 records; u64 bytes; u64 flag; };
BPF_PERCPU_ARRAY(wake_states, struct wake_state, 1);

/* Every access is volatile, through map memory: the chunk loop of emit_buf
 * calls this per record, and a count carried in a register would give each
 * iteration a different range and stop the verifier from pruning (the same
 * reason as struct emit_state below). */
static __always_inline u64 data_wake_flag(struct wake_state *w, u32 size)
{
    u64 records = *(volatile u64 *)&w->records + 1;
    u64 bytes = *(volatile u64 *)&w->bytes + size;
    *(volatile u64 *)&w->flag = BPF_RB_NO_WAKEUP;
    if (records >= WAKE_RECORDS || bytes >= WAKE_BYTES) {
        records = 0;
        bytes = 0;
        *(volatile u64 *)&w->flag = BPF_RB_FORCE_WAKEUP;
    }
    *(volatile u64 *)&w->records = records;
    *(volatile u64 *)&w->bytes = bytes;
    return *(volatile u64 *)&w->flag;
}

static __always_inline struct data_rec *scratch_get(void)
{
    int zero = 0;
    u32 *busy = scratch_busy.lookup(&zero);
    if (!busy)
        return 0;
    /* Increment, then look: only the program that sees exactly 1 owns the
     * scratch.  (clang 14's BPF target cannot use xadd's return value.) */
    __sync_fetch_and_add(busy, 1);
    if (*(volatile u32 *)busy != 1) {
        __sync_fetch_and_add(busy, -1);
        return 0;
    }
    return scratch.lookup(&zero);
}

static __always_inline void scratch_put(void)
{
    int zero = 0;
    u32 *busy = scratch_busy.lookup(&zero);
    if (busy)
        __sync_fetch_and_add(busy, -1);
}

/* sockaddr (user memory) -> struct addr.  Returns 0 when not AF_INET/6. */
static __always_inline int read_sockaddr(struct addr *a, const void *uaddr)
{
    u16 family = 0;
    if (!uaddr || bpf_probe_read_user(&family, sizeof(family), uaddr) != 0)
        return 0;
    __builtin_memset(a, 0, sizeof(*a));
    if (family == AF_INET_) {
        u8 sa[8];              /* family(2) port(2) addr(4) */
        if (bpf_probe_read_user(sa, sizeof(sa), uaddr) != 0)
            return 0;
        a->family = AF_INET_;
        a->port = ((u16)sa[2] << 8) | sa[3];
        a->ip[10] = 0xff;
        a->ip[11] = 0xff;
        a->ip[12] = sa[4];
        a->ip[13] = sa[5];
        a->ip[14] = sa[6];
        a->ip[15] = sa[7];
        return 1;
    }
    if (family == AF_INET6_) {
        u8 sa[24];             /* family(2) port(2) flowinfo(4) addr(16) */
        if (bpf_probe_read_user(sa, sizeof(sa), uaddr) != 0)
            return 0;
        a->family = AF_INET6_;
        a->port = ((u16)sa[2] << 8) | sa[3];
        __builtin_memcpy(a->ip, &sa[8], 16);
        return 1;
    }
    return 0;
}

/* Emit `total` bytes the process moved as data records, split at MAX_CHUNK.
 * The bytes come from one user buffer (iov == 0) or an iovec array.  The
 * stream offset advances by `total` even when records are lost, so user
 * space sees the gap.
 *
 * Verifier cost: the chunk loop is nested inside the iovec loop and neither
 * carries a constant across iterations other than its own counter, so the
 * verifier explores MAX_IOV x MAX_SPLIT bodies, not every combination (one
 * shared "records emitted" counter made it explode past 1M instructions). */
#ifndef MAX_IOV
#define MAX_IOV 16
#endif
struct iovec_ { u64 base; u64 len; };

/* Loop state kept in map memory, which the verifier does not track: every
 * iteration re-reads it as an unknown scalar, so no refined bounds pile up
 * across iterations and the paths through one iteration rejoin.  Keeping
 * these in registers made the verifier explore combinations of iterations
 * (quadratic in MAX_SPLIT; > 1M instructions with iovecs). */
struct emit_state { u64 ubuf; u64 len; u64 off; u64 done; u64 end; u64 lost0; };
BPF_PERCPU_ARRAY(emit_states, struct emit_state, 1);

static __always_inline void emit_buf(struct data_rec *r, struct emit_state *st, u64 *lostp,
                                     struct wake_state *w)
{
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < MAX_SPLIT; i++) {
        u64 len = *(volatile u64 *)&st->len;
        u64 pos = (u64)i * MAX_CHUNK;
        if (pos >= len)
            return;
        u64 n = len - pos;
        /* Clamp in a form this verifier keeps: a 32-bit unsigned, masked,
         * then compared (otherwise "R2 min value is negative"). */
        u32 n32 = n > MAX_CHUNK ? MAX_CHUNK : n;
        asm volatile("%[n] &= 0x7fffffff" : [n] "+r"(n32));
        if (n32 > MAX_CHUNK)
            n32 = MAX_CHUNK;
        r->offset = *(volatile u64 *)&st->off + pos;
        r->len = n32;
        long err = bpf_probe_read_user(r->data, n32, (void *)(*(volatile u64 *)&st->ubuf + pos));
        if (err == 0)
            err = events.ringbuf_output(r, DATA_HDR_SIZE + n32, data_wake_flag(w, DATA_HDR_SIZE + n32));
        if (err != 0)
            __sync_fetch_and_add(lostp, 1);
    }
    if ((u64)MAX_SPLIT * MAX_CHUNK < *(volatile u64 *)&st->len) {
        __sync_fetch_and_add(lostp, 1);   /* beyond MAX_SPLIT records: the offset skips it */
        count_call_cut();
    }
}

static __always_inline void data_header(struct data_rec *r, s32 fd, u8 dir, u8 src, u64 tls_ref, u16 flags,
                                        u64 start_ns)
{
    u64 id = bpf_get_current_pid_tgid();
    r->h.kind = REC_DATA;
    r->h.pid = id >> 32;
    r->h.tid = (u32)id;
    r->h.fd = fd;
    r->h.ts_ns = start_ns ? start_ns : bpf_ktime_get_ns();
    r->direction = dir;
    r->source = src;
    r->flags = flags;
    r->tls_ref = tls_ref;
}

/* A call moved bytes up to stream offset `end` that were not all emitted
 * (past MAX_SPLIT records or MAX_IOV iovecs, or sent with sendfile): the
 * record's header alone, with no bytes, at `end` says so at once.  Otherwise
 * user space saw the hole only at the stream's next record, and a keep-alive
 * connection's last response, cut so, waited for it and was called
 * incomplete at close.  (Shed calls have none: it would cost as much as the
 * data saved.) */
static __always_inline void emit_end(struct data_rec *r, u64 end)
{
    r->offset = end;
    r->len = 0;
    if (events.ringbuf_output(r, DATA_HDR_SIZE, 0) != 0)
        count_lost(1);
}

/* Bytes a socket moved that we cannot copy (sendfile): the stream offset
 * moves on, and a record with no bytes says where it is now. */
static __always_inline void skip_data(s32 fd, u8 dir, u64 total, u64 start_ns)
{
    struct off_key ok = {};
    ok.tgid = bpf_get_current_pid_tgid() >> 32;
    ok.fd = fd;
    ok.direction = dir;
    u64 end = total;
    u64 *offp = offsets.lookup(&ok);
    if (offp) {
        end = *offp + total;
        *offp = end;
    } else {
        offsets.update(&ok, &total);
    }
    struct data_rec *r = scratch_get();
    if (!r) {
        count_lost(1);
        return;
    }
    data_header(r, fd, dir, SRC_SOCKET, 0, 0, start_ns);
    emit_end(r, end);
    scratch_put();
}

/* `start_ns`: when the call that moved the bytes began, for writes; 0 for
 * reads, stamped now.  A write is stamped when the program handed its bytes
 * over, a read when they were there: on loopback the peer has often read a
 * request, and answered it, before the writer's call returns, and stamped at
 * its return a client's request would look later than the server's reply. */
static __always_inline void emit_data(void *ctx, s32 fd, u8 dir, u8 src,
                                      u64 tls_ref, u64 buf, u64 iov,
                                      u64 iovcnt, u64 total, u64 start_ns)
{
    if (total == 0)
        return;
    u64 id = bpf_get_current_pid_tgid();
    struct off_key ok = {};
    ok.tgid = id >> 32;
    ok.fd = fd;
    ok.tls_ref = fd < 0 ? tls_ref : 0;
    ok.direction = dir;
    ok.is_tls = src != SRC_SOCKET;
    u64 base_off = 0;
    u64 *offp = offsets.lookup(&ok);
    if (offp) {
        /* In place: a map update per call costs more than the lookup. */
        base_off = *offp;
        *offp = base_off + total;
    } else {
        offsets.update(&ok, &total);
    }

    u64 first_buf = buf;
    if (iov) {
        struct iovec_ v0 = {};
        if (iovcnt > 0)
            bpf_probe_read_user(&v0, sizeof(v0), (void *)iov);
        first_buf = v0.base;
    }
    u16 flags = 0;
    u64 whole = total;
    total = shed_limit(total, first_buf, &flags);   /* the offset above already moved past it all */
    if (total == 0)
        return;   /* shed (overload): no end record, which would cost as much as the data saved */

    struct data_rec *r = scratch_get();
    if (!r) {
        count_lost(1);
        return;
    }
    data_header(r, fd, dir, src, tls_ref, flags, start_ns);

    int zero = 0;
    struct emit_state *st = emit_states.lookup(&zero);
    u64 *lostp = lost.lookup(&zero);
    struct wake_state *w = wake_states.lookup(&zero);
    if (!st || !lostp || !w) {
        scratch_put();
        return;
    }
    /* Records this call could not emit show as a count that moved (another
     * program on this CPU may move it too: an extra end record is harmless).
     * Both kept in map memory, out of the verifier's sight across the loops
     * (see emit_state). */
    st->end = base_off + whole;
    st->lost0 = *(volatile u64 *)lostp;
    if (!iov) {
        st->ubuf = buf;
        st->len = total;
        st->off = base_off;
        emit_buf(r, st, lostp, w);
        if (*(volatile u64 *)lostp != *(volatile u64 *)&st->lost0)
            emit_end(r, *(volatile u64 *)&st->end);
        scratch_put();
        return;
    }
    st->done = 0;
#pragma clang loop unroll(disable)
    for (u32 j = 0; j < MAX_IOV; j++) {
        u64 d = *(volatile u64 *)&st->done;
        if (j >= iovcnt || d >= total)
            break;
        struct iovec_ v = {};
        if (bpf_probe_read_user(&v, sizeof(v), (void *)(iov + j * sizeof(v))) != 0)
            break;
        u64 n = total - d;
        if (n > v.len)
            n = v.len;
        st->ubuf = v.base;
        st->len = n;
        st->off = base_off + d;
        emit_buf(r, st, lostp, w);
        st->done = d + n;
    }
    if (*(volatile u64 *)&st->done < total) {
        __sync_fetch_and_add(lostp, 1);   /* more iovecs than MAX_IOV */
        count_call_cut();
    }
    if (*(volatile u64 *)lostp != *(volatile u64 *)&st->lost0)
        emit_end(r, *(volatile u64 *)&st->end);
    scratch_put();
}

#endif
