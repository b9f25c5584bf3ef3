/* OpenSSL (libssl, or a binary with it linked in and exported, e.g. node):
 * plaintext at SSL_write entry / SSL_read return. */
#include "tls_common.h"

#define SSL_CTRL_SET_TLSEXT_HOSTNAME 55

/* ---- entry mode: a uprobe at the symbol + a uretprobe ---- */

int ssl_write_enter(struct pt_regs *ctx)
{
    tls_enter(ctx, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), (u32)PT_REGS_PARM3(ctx), 0, DIR_EGRESS, SRC_OPENSSL);
    return 0;
}

int ssl_write_ex_enter(struct pt_regs *ctx)
{
    tls_enter(ctx, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx), PT_REGS_PARM4(ctx), DIR_EGRESS, SRC_OPENSSL);
    return 0;
}

int ssl_read_enter(struct pt_regs *ctx)
{
    tls_enter(ctx, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), (u32)PT_REGS_PARM3(ctx), 0, DIR_INGRESS, SRC_OPENSSL);
    return 0;
}

int ssl_read_ex_enter(struct pt_regs *ctx)
{
    tls_enter(ctx, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx), PT_REGS_PARM4(ctx), DIR_INGRESS, SRC_OPENSSL);
    return 0;
}

/* The uretprobe of entry mode, and of a tuned plan whose cheap return is the
 * wrapper's own (node: its SSL_* start with an emulated push). */
int ssl_return(struct pt_regs *ctx)
{
    /* SSL_read/SSL_write return int: sign-extend the low 32 bits. */
    long ret = (int)PT_REGS_RC(ctx);
    tls_exit(ctx, ret, 0);
    return 0;
}

/* ---- tuned mode: plain uprobes at sites qtap_devtools/capture/tuned.py
 * proved, whose instructions the kernel emulates instead of single-stepping ---- */

/* SSL_write/SSL_read entry site (a few instructions in, arguments still in
 * rdi/rsi/rdx).  The wrapper stores the byte count at a fixed stack slot that
 * is SLOT bytes above rsp as it is here; one program per slot because a
 * uprobe program cannot tell which site it is attached to.  num < 0 returns
 * -1 without reaching the return site, so it must not leave a stash. */
#define SITE_ENTER(name, dir, slot)                                            \
int name##_sp##slot(struct pt_regs *ctx)                                       \
{                                                                              \
    if ((int)PT_REGS_PARM3(ctx) < 0) {                                         \
        tls_cancel();                                                          \
        return 0;                                                              \
    }                                                                          \
    tls_enter(ctx, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), (u32)PT_REGS_PARM3(ctx), \
              PT_REGS_SP(ctx) + slot, dir, SRC_OPENSSL);                       \
    return 0;                                                                  \
}
#define SITE_ENTERS(slot)                                                      \
    SITE_ENTER(ssl_write_site_enter, DIR_EGRESS, slot)                         \
    SITE_ENTER(ssl_read_site_enter, DIR_INGRESS, slot)
SITE_ENTERS(0)
SITE_ENTERS(8)
SITE_ENTERS(16)
SITE_ENTERS(24)
SITE_ENTERS(32)
SITE_ENTERS(40)
SITE_ENTERS(48)
SITE_ENTERS(56)

/* Both tuned return sites:
 *  - a uprobe at the jle right after `call ssl_*_internal; test %eax,%eax`
 *    inside SSL_write/SSL_read: eax is the internal result, the count is in
 *    the stack slot the entry site stashed;
 *  - a uretprobe on ssl_{write,read}_internal(s, buf, num, size_t *count), for
 *    the SSL_*_ex wrappers that have no cheap return site of their own: the
 *    count is at the pointer the entry stashed from rcx.
 * The internal function also returns into SSL_write/SSL_read and into
 * BIO_f_ssl users, so act only on a stash whose count is in memory.  A
 * plain-count stash (an entry-mode SSL_write in flight) is left for its own
 * uretprobe: its eax here would be a success flag, not a count. */
int ssl_site_return(struct pt_regs *ctx)
{
    tls_exit(ctx, (int)PT_REGS_RC(ctx), 1);
    return 0;
}

int ssl_set_fd_enter(struct pt_regs *ctx)
{
    u64 ref = PT_REGS_PARM1(ctx);
    s32 fd = PT_REGS_PARM2(ctx);
    struct tls_key tk = tls_key_of(ref);
    tls_fd.update(&tk, &fd);
    return 0;
}

int ssl_free_enter(struct pt_regs *ctx)
{
    tls_forget(PT_REGS_PARM1(ctx));
    return 0;
}

int ssl_ctrl_enter(struct pt_regs *ctx)
{
    /* SSL_set_tlsext_host_name(s, name) is SSL_ctrl(s, 55, 0, name). */
    if ((int)PT_REGS_PARM2(ctx) != SSL_CTRL_SET_TLSEXT_HOSTNAME || PT_REGS_PARM3(ctx) != 0)
        return 0;
    emit_sni(ctx, PT_REGS_PARM1(ctx), (void *)PT_REGS_PARM4(ctx), 0);
    return 0;
}
