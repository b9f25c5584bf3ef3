/* Shared by the TLS library probes: stash a call at entry, emit at return. */
#ifndef QTAP_TLS_COMMON_H
#define QTAP_TLS_COMMON_H
#include "common.h"

#ifndef MAX_ARMED
#define MAX_ARMED 101          /* the loader passes attach.MAX_ATTACHMENTS + 1 */
#endif

/* A library file's data entry sites are placed one at a time.  Were each live
 * at once, a call in between could be seen writing and not reading (or the
 * reverse), and a request would pair with the next one's response for the rest
 * of its connection.  So a site stashes nothing until user space has placed
 * every site of its file and set armed[<its attach cookie>]; slot 0 (no cookie:
 * a kernel without them, see capture/links.py) is armed from the start.
 * The value: 0 not yet, 1 armed, or armed and the source its records name
 * (SRC_NODETLS: the same OpenSSL probes, on node's own copy). */
BPF_ARRAY(armed, u8, MAX_ARMED);

static __always_inline u8 tls_armed(void *ctx)
{
    u32 slot = bpf_get_attach_cookie(ctx);
    u8 *on = armed.lookup(&slot);
    return on ? *on : 0;
}

static __always_inline void tls_enter(void *ctx, u64 ref, u64 buf, u64 num, u64 len_ptr, u8 dir, u8 src)
{
    if (excluded_self(bpf_get_current_pid_tgid() >> 32))
        return;
    u8 arm = tls_armed(ctx);
    if (!arm)
        return;
    struct tls_key tk = tls_key_of(ref);
    s32 *fdp = tls_fd.lookup(&tk);
    if (fdp && *fdp == FD_EXCLUDED)
        return;
    struct tls_call *c = tls_call_slot(1);
    if (!c) {
        count_lost(1);         /* no slot (memory, or a nested program held the lock): this call is missed */
        return;
    }
    c->tls_ref = ref;
    c->buf = buf;
    c->num = num;
    c->len_ptr = len_ptr;
    c->start_ns = dir == DIR_EGRESS ? bpf_ktime_get_ns() : 0;
    c->dir = dir;
    c->source = arm > 1 ? arm : src;
    c->fd = fdp ? *fdp : -1;
    c->hello_left = 0;
    c->active = 1;
}

/* The thread makes a call that will not reach any return probe: drop what an
 * earlier call may have left, so its socket syscalls are not taken for TLS. */
static __always_inline void tls_cancel(void)
{
    struct tls_call *c = tls_call_slot(0);
    if (c)
        c->active = 0;
}

/* `ret` is the byte count (SSL_read/SSL_write/gnutls_record_*) when the stash
 * has no len_ptr; otherwise a success flag (> 0, the _ex variants and the
 * internal ssl_{read,write}_internal) and the count is read from *len_ptr.
 * `need_len_ptr`: act only on a stash whose count is in memory (a return
 * probe on an internal function that plain-count callers also reach). */
static __always_inline void tls_exit(void *ctx, long ret, int need_len_ptr)
{
    struct tls_call *cp = tls_call_slot(0);
    if (!cp || !cp->active)
        return;
    if (need_len_ptr && !cp->len_ptr)
        return;
    struct tls_call c = *cp;
    cp->active = 0;
    if (ret <= 0)
        return;
    u64 n = ret;
    if (c.len_ptr) {
        n = 0;
        bpf_probe_read_user(&n, sizeof(n), (void *)c.len_ptr);
    }
    if (n > c.num)
        n = c.num;             /* never read past the caller's buffer */
    emit_data(ctx, c.fd, c.dir, c.source, c.tls_ref, c.buf, 0, 0, n, c.start_ns);
}

/* The TLS object is gone: forget its fd and any fd-less stream offsets. */
static __always_inline void tls_forget(u64 ref)
{
    struct tls_key tk = tls_key_of(ref);
    tls_fd.delete(&tk);
    u32 tgid = tk.tgid;
    struct off_key ok = { .tgid = tgid, .fd = -1, .tls_ref = ref, .is_tls = 1 };
    ok.direction = 0;
    offsets.delete(&ok);
    ok.direction = 1;
    offsets.delete(&ok);
}

static __always_inline void emit_sni(void *ctx, u64 ref, const void *host, u32 maxlen)
{
    if (!host)
        return;
    struct data_rec *s = scratch_get();
    if (!s) {
        count_lost(1);
        return;
    }
    struct sni_rec *r = (struct sni_rec *)s;
    s32 fd = -1;
    struct tls_key tk = tls_key_of(ref);
    s32 *fdp = tls_fd.lookup(&tk);
    if (fdp)
        fd = *fdp;
    fill_hdr(&r->h, REC_SNI, fd);
    r->tls_ref = ref;
    r->_pad = 0;
    long n = bpf_probe_read_user_str(r->host, sizeof(r->host), host);
    r->len = n > 0 ? n - 1 : 0;
    if (maxlen && r->len > maxlen)
        r->len = maxlen;
    if (!excluded_self(r->h.pid))
        emit_small(ctx, r, sizeof(*r));
    scratch_put();
}
#endif
