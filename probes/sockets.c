/* Sockets: connect/accept/close, 4-tuples from sock:inet_sock_set_state, and
 * plaintext data from the read/write family of syscalls on known sockets. */
#include "common.h"

#define TCP_ESTABLISHED_ 1
#define TCP_SYN_SENT_ 2
#define TCP_SYN_RECV_ 3
/* How many of a TLS call's syscalls may carry its socket's hellos (data_enter). */
#define HELLO_SYSCALLS 6

/* tcp: the kernel moved a TCP socket to SYN_SENT inside this connect() call.
 * Only then is it a TCP connection attempt: a connect() on a UDP socket (DNS
 * resolvers do it) sets no TCP state and is not a connection of ours. */
struct connect_args { s32 fd; u32 tcp; struct addr remote; };
BPF_HASH(connect_stash, u32, struct connect_args, 16384);   /* tid */
struct accept_args { s32 fd; u32 _pad; u64 peer; };
BPF_HASH(accept_stash, u32, struct accept_args, 16384);     /* tid */

/* sk address seen at SYN_SENT inside connect() -> (tgid, fd). */
BPF_TABLE("lru_hash", u64, struct sock_key, sk_pending, 16384);

/* Established server-side child sockets: peer (ip, port) -> local. */
struct peer_key { u8 ip[16]; u16 port; u16 _pad; };
BPF_TABLE("lru_hash", struct peer_key, struct addr, accepted_local, 16384);

/* A data syscall on a known plaintext socket, from its entry to its exit.
 * Per thread, in task storage like tls_calls: every read/write-family exit
 * of every process looks here. */
struct data_args { s32 fd; u8 dir; u8 skip; u8 active; u8 want_addr; u64 buf; u64 iov; u64 iovcnt; u64 start_ns; };
BPF_TASK_STORAGE(data_stash, struct data_args);

static __always_inline int port_excluded(u16 port)
{
    return EXCLUDE_PORT != 0 && port == EXCLUDE_PORT;
}

/* A new connection on fd: its streams begin at 0.  Offsets an earlier socket
 * with the same number left are dropped: one whose close was not seen (its
 * accept began before the probes, so it was never known) would otherwise
 * have the new connection's first bytes look like a gap after its own. */
static __always_inline void mark_socket(u32 tgid, s32 fd, u32 flags)
{
    struct sock_key k = { .tgid = tgid, .fd = fd };
    sock_fds.update(&k, &flags);
    struct off_key ok = { .tgid = tgid, .fd = fd };
#pragma unroll
    for (int i = 0; i < 4; i++) {
        ok.direction = i & 1;
        ok.is_tls = i >> 1;
        offsets.delete(&ok);
    }
}

/* ---- connect ---- */

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    u64 id = bpf_get_current_pid_tgid();
    if (excluded_self(id >> 32))
        return 0;
    struct connect_args c = {};
    c.fd = args->fd;
    if (!read_sockaddr(&c.remote, args->uservaddr))
        return 0;              /* AF_UNIX and friends: not ours */
    u32 tid = id;
    connect_stash.update(&tid, &c);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    struct connect_args *c = connect_stash.lookup(&tid);
    if (!c)
        return 0;
    long ret = args->ret;
    if (c->tcp && (ret == 0 || ret == -EINPROGRESS_)) {
        u32 flags = SOCK_KNOWN | SOCK_FRESH;
        if (port_excluded(c->remote.port))
            flags |= SOCK_EXCLUDED;
        mark_socket(id >> 32, c->fd, flags);
        if (!(flags & SOCK_EXCLUDED)) {
            struct connect_rec r = {};
            fill_hdr(&r.h, REC_CONNECT, c->fd);
            r.remote = c->remote;
            r.ret = ret;
            emit_small(args, &r, sizeof(r));
        }
    }
    connect_stash.delete(&tid);
    return 0;
}

/* ---- TCP state: the 4-tuple without touching struct sock ---- */

static __always_inline void tp_addr(struct addr *a, u16 family, const u8 *v4,
                                    const u8 *v6, u16 port)
{
    a->family = family;
    a->port = port;
    if (family == AF_INET_) {
        __builtin_memset(a->ip, 0, 10);
        a->ip[10] = 0xff;
        a->ip[11] = 0xff;
        a->ip[12] = v4[0];
        a->ip[13] = v4[1];
        a->ip[14] = v4[2];
        a->ip[15] = v4[3];
    } else {
        __builtin_memcpy(a->ip, v6, 16);
    }
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != 6)
        return 0;
    u64 sk = (u64)args->skaddr;
    if (args->newstate == TCP_SYN_SENT_) {
        /* Process context: inside connect() of the thread that owns it. */
        u64 id = bpf_get_current_pid_tgid();
        u32 tid = id;
        struct connect_args *c = connect_stash.lookup(&tid);
        if (!c)
            return 0;
        c->tcp = 1;
        struct sock_key k = { .tgid = id >> 32, .fd = c->fd };
        sk_pending.update(&sk, &k);
        return 0;
    }
    if (args->newstate != TCP_ESTABLISHED_)
        return 0;
    struct address_rec r = {};
    tp_addr(&r.local, args->family, args->saddr, args->saddr_v6, args->sport);
    tp_addr(&r.remote, args->family, args->daddr, args->daddr_v6, args->dport);
    if (args->oldstate == TCP_SYN_RECV_) {
        /* A server-side child: joined at accept() by its peer. */
        struct peer_key pk = {};
        __builtin_memcpy(pk.ip, r.remote.ip, 16);
        pk.port = r.remote.port;
        accepted_local.update(&pk, &r.local);
        return 0;
    }
    struct sock_key *k = sk_pending.lookup(&sk);
    if (!k)
        return 0;
    r.h.kind = REC_ADDRESS;
    r.h.pid = k->tgid;
    r.h.tid = 0;
    r.h.fd = k->fd;
    r.h.ts_ns = bpf_ktime_get_ns();
    sk_pending.delete(&sk);
    if (port_excluded(r.local.port) || port_excluded(r.remote.port))
        return 0;
    emit_small(args, &r, sizeof(r));
    return 0;
}

/* ---- accept ---- */

static __always_inline void accept_enter(s32 fd, u64 peer)
{
    u64 id = bpf_get_current_pid_tgid();
    if (excluded_self(id >> 32))
        return;
    struct accept_args a = { .fd = fd, .peer = peer };
    u32 tid = id;
    accept_stash.update(&tid, &a);
}

static __always_inline void accept_exit(void *ctx, long ret)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    struct accept_args *a = accept_stash.lookup(&tid);
    u64 peer = 0;
    if (a) {
        peer = a->peer;
        accept_stash.delete(&tid);
    } else if (ret < 0 || excluded_self(id >> 32)) {
        return;
    }
    /* No stash: the call began before the probes were placed (a server
     * waiting in a blocking accept() when the agent started).  The new socket
     * is still marked and reported, with no peer: user space reads its
     * addresses from /proc, as for an accept(fd, NULL, NULL). */
    if (ret < 0)
        return;
    struct accept_rec r = {};
    fill_hdr(&r.h, REC_ACCEPT, ret);
    if (peer) {
        if (!read_sockaddr(&r.remote, (void *)peer))
            return;            /* AF_UNIX peer */
        struct peer_key pk = {};
        __builtin_memcpy(pk.ip, r.remote.ip, 16);
        pk.port = r.remote.port;
        struct addr *local = accepted_local.lookup(&pk);
        if (local) {
            r.local = *local;
            r.local.family = r.remote.family;
            accepted_local.delete(&pk);
        }
    }
    u32 flags = SOCK_KNOWN | SOCK_FRESH;
    if (port_excluded(r.local.port))
        flags |= SOCK_EXCLUDED;
    else if (!r.local.family || !r.remote.family)
        flags |= SOCK_NEED_ADDR;
    mark_socket(id >> 32, ret, flags);
    if (!(flags & SOCK_EXCLUDED))
        emit_small(ctx, &r, sizeof(r));
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept)
{
    accept_enter(args->fd, (u64)args->upeer_sockaddr);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{
    accept_exit(args, args->ret);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept4)
{
    accept_enter(args->fd, (u64)args->upeer_sockaddr);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
    accept_exit(args, args->ret);
    return 0;
}

/* ---- close ---- */

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    u64 id = bpf_get_current_pid_tgid();
    struct sock_key k = { .tgid = id >> 32, .fd = args->fd };
    u32 *flags = sock_fds.lookup(&k);
    if (!flags)
        return 0;
    u32 f = *flags;
    sock_fds.delete(&k);
    /* Where each stream ended goes with the close: bytes moved after the last
     * record (shed, or lost) are then a known hole at the end, and a response
     * whose tail was shed still completes, rather than look cut by the close. */
    struct close_rec r = {};
    struct off_key ok = { .tgid = k.tgid, .fd = k.fd };
#pragma unroll
    for (int i = 0; i < 4; i++) {
        ok.direction = i & 1;
        ok.is_tls = i >> 1;
        u64 *off = offsets.lookup(&ok);
        if (off) {
            r.offsets[i] = *off;
            r.known |= 1 << i;
            offsets.delete(&ok);
        }
    }
    if (f & SOCK_EXCLUDED)
        return 0;
    fill_hdr(&r.h, REC_CLOSE, k.fd);
    int zero = 0;
    u64 *cap = shed_cap.lookup(&zero);
    if (cap && *cap)
        r.flags = DATA_SHEDDING;
    emit_small(args, &r, sizeof(r));
    return 0;
}

/* ---- data ---- */

/* A TLS object's fd is learned only when its calls make syscalls on a known
 * socket, which can be late: a connection open before the agent (its socket
 * seeded from /proc after the calls began), or plaintext the library had
 * already buffered.  Its records so far were counted by the object alone;
 * from now they count by fd.  Carry the counts over so the stream's offsets
 * go on where they were (the pipeline then continues that stream as the
 * socket's connection), instead of starting again at 0. */
static __always_inline void tls_offsets_to_fd(u32 tgid, u64 ref, s32 fd)
{
#pragma unroll
    for (u32 dir = 0; dir < 2; dir++) {
        struct off_key from = { .tgid = tgid, .fd = -1, .tls_ref = ref, .direction = dir, .is_tls = 1 };
        u64 *n = offsets.lookup(&from);
        if (!n)
            continue;
        u64 at = *n;
        struct off_key to = { .tgid = tgid, .fd = fd, .tls_ref = 0, .direction = dir, .is_tls = 1 };
        offsets.update(&to, &at);
        offsets.delete(&from);
    }
}

/* A socket accepted with no peer address (SOCK_NEED_ADDR): this syscall on
 * it may reach tcp_recvmsg, whose tcp_rcv_space_adjust tracepoint names the
 * socket's 4-tuple, in this task, before the syscall returns. */
static __always_inline void want_address(s32 fd)
{
    struct data_args *d = data_stash.task_storage_get(current_task(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (d) {
        d->fd = fd;
        d->want_addr = 1;
    }
}

TRACEPOINT_PROBE(tcp, tcp_rcv_space_adjust)
{
    struct data_args *d = data_stash.task_storage_get(current_task(), 0, 0);
    if (!d || !d->want_addr)
        return 0;
    d->want_addr = 0;
    u64 id = bpf_get_current_pid_tgid();
    struct sock_key k = { .tgid = id >> 32, .fd = d->fd };
    u32 *flags = sock_fds.lookup(&k);
    if (!flags || !(*flags & SOCK_NEED_ADDR))
        return 0;
    *flags &= ~SOCK_NEED_ADDR;
    struct address_rec r = {};
    tp_addr(&r.local, args->family, args->saddr, args->saddr_v6, args->sport);
    tp_addr(&r.remote, args->family, args->daddr, args->daddr_v6, args->dport);
    fill_hdr(&r.h, REC_ADDRESS, k.fd);
    r.h.tid = 0;
    emit_small(args, &r, sizeof(r));
    return 0;
}

/* Called at every data syscall entry.  Inside a TLS library call the fd is
 * the TLS connection's: remember it and mark the socket TLS so its
 * ciphertext is never reported as plaintext. */
static __always_inline void data_enter(s32 fd, u8 dir, u64 buf, u64 iov, u64 iovcnt,
                                       const void *msg, u8 skip)
{
    u64 id = bpf_get_current_pid_tgid();
    struct sock_key k = { .tgid = id >> 32, .fd = fd };
    /* Only a known socket counts, inside a TLS call too: node's OpenSSL uses
     * a memory BIO and its SSL calls make unrelated syscalls (e.g. an eventfd
     * write).  Every read and write of every process comes here, most of
     * them on files and pipes: this lookup is all they cost. */
    u32 *flags = sock_fds.lookup(&k);
    if (!flags)
        return;
    if (*flags & SOCK_NEED_ADDR)
        want_address(fd);
    struct tls_call *t = tls_call_slot(0);
    if (t && t->active) {
        /* Every TLS call's syscalls land here, nearly always with the fd its
         * entry already found for the object: only a new one goes to the map. */
        if (t->fd != fd) {
            struct tls_key tk = { .tgid = k.tgid, ._pad = 0, .ref = t->tls_ref };
            s32 *known = tls_fd.lookup(&tk);
            if (!known) {
                tls_fd.update(&tk, &fd);
                tls_offsets_to_fd(k.tgid, t->tls_ref, fd);
            } else if (*known != fd)
                *known = fd;
            t->fd = fd;
            t->hello_left = 0;
        }
        if (!(*flags & SOCK_TLS)) {
            /* The first TLS call on this socket.  Were none of its bytes seen
             * before (SOCK_FRESH), its handshake is in this call: a client
             * that never calls SSL_connect (openssl s_client) makes it inside
             * its first SSL_write.  The hellos are where the version is read,
             * so the call's first few syscalls are still reported, as
             * ciphertext.  A few: the ClientHello is one write, the
             * ServerHello a read of a record header and one of its body. */
            if (*flags & SOCK_FRESH)
                t->hello_left = HELLO_SYSCALLS;
            *flags = (*flags | SOCK_TLS) & ~SOCK_FRESH;
        }
        if (!t->hello_left || (*flags & SOCK_EXCLUDED))
            return;
        t->hello_left--;
    } else if (*flags & (SOCK_TLS | SOCK_EXCLUDED)) {
        return;
    }
    if (excluded_self(k.tgid))
        return;
    if (*flags & SOCK_FRESH)
        *flags &= ~SOCK_FRESH;
    if (msg) {
        /* struct user_msghdr: msg_name, msg_namelen, msg_iov, msg_iovlen */
        u64 hdr[4] = {};
        if (bpf_probe_read_user(hdr, sizeof(hdr), msg) != 0)
            return;
        iov = hdr[2];
        iovcnt = hdr[3];
    }
    struct data_args *d = data_stash.task_storage_get(current_task(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!d) {
        count_lost(1);
        return;
    }
    d->fd = fd;
    d->dir = dir;
    d->skip = skip;
    d->buf = buf;
    d->iov = iov;
    d->iovcnt = iovcnt;
    d->start_ns = dir == DIR_EGRESS ? bpf_ktime_get_ns() : 0;  /* see emit_data */
    d->active = 1;
}

static __always_inline void data_exit(void *ctx, long ret)
{
    struct data_args *d = data_stash.task_storage_get(current_task(), 0, 0);
    if (!d)
        return;
    d->want_addr = 0;  /* its receive, if any, has run: a later tracepoint is another socket's */
    if (!d->active)
        return;
    struct data_args a = *d;
    d->active = 0;
    if (ret <= 0)
        return;
    if (a.skip) {
        skip_data(a.fd, a.dir, ret, a.start_ns);
        return;
    }
    emit_data(ctx, a.fd, a.dir, SRC_SOCKET, 0, a.buf, a.iov, a.iovcnt, ret, a.start_ns);
}

TRACEPOINT_PROBE(syscalls, sys_enter_read)
{ data_enter(args->fd, DIR_INGRESS, (u64)args->buf, 0, 0, 0, 0); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_read)
{ data_exit(args, args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_write)
{ data_enter(args->fd, DIR_EGRESS, (u64)args->buf, 0, 0, 0, 0); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_write)
{ data_exit(args, args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom)
{ data_enter(args->fd, DIR_INGRESS, (u64)args->ubuf, 0, 0, 0, 0); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom)
{ data_exit(args, args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto)
{ data_enter(args->fd, DIR_EGRESS, (u64)args->buff, 0, 0, 0, 0); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto)
{ data_exit(args, args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_readv)
{ data_enter(args->fd, DIR_INGRESS, 0, (u64)args->vec, args->vlen, 0, 0); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_readv)
{ data_exit(args, args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_writev)
{ data_enter(args->fd, DIR_EGRESS, 0, (u64)args->vec, args->vlen, 0, 0); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_writev)
{ data_exit(args, args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg)
{ data_enter(args->fd, DIR_INGRESS, 0, 0, 0, args->msg, 0); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg)
{ data_exit(args, args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg)
{ data_enter(args->fd, DIR_EGRESS, 0, 0, 0, args->msg, 0); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg)
{ data_exit(args, args->ret); return 0; }

/* sendfile(2) moves file bytes to the socket with no user buffer to read:
 * the stream offset moves past them, so user space sees a hole of exactly
 * that size inside the body and keeps its framing.  Without this, the next
 * response's head would be read as the rest of this body. */
TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64)
{ data_enter(args->out_fd, DIR_EGRESS, 0, 0, 0, 0, 1); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendfile64)
{ data_exit(args, args->ret); return 0; }
/* splice(2) moves bytes between a pipe and a socket the same way (TCP
 * proxies, Go's io.Copy onto a TCP connection): one end is a pipe, so at most
 * one of the two data_enter calls finds a socket it knows. */
TRACEPOINT_PROBE(syscalls, sys_enter_splice)
{
    data_enter(args->fd_out, DIR_EGRESS, 0, 0, 0, 0, 1);
    data_enter(args->fd_in, DIR_INGRESS, 0, 0, 0, 0, 1);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_splice)
{ data_exit(args, args->ret); return 0; }
