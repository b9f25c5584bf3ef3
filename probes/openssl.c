/* OpenSSL (libssl, or a binary with it linked in and exported, e.g. node):
 * plaintext at SSL_write entry / SSL_read return. */
#include "tls_common.h"

#define SSL_CTRL_SET_TLSEXT_HOSTNAME 55

int ssl_write_enter(struct pt_regs *ctx)
{
    tls_enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, DIR_EGRESS, SRC_OPENSSL);
    return 0;
}

int ssl_write_ex_enter(struct pt_regs *ctx)
{
    tls_enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM4(ctx), DIR_EGRESS, SRC_OPENSSL);
    return 0;
}

int ssl_read_enter(struct pt_regs *ctx)
{
    tls_enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, DIR_INGRESS, SRC_OPENSSL);
    return 0;
}

int ssl_read_ex_enter(struct pt_regs *ctx)
{
    tls_enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM4(ctx), DIR_INGRESS, SRC_OPENSSL);
    return 0;
}

int ssl_return(struct pt_regs *ctx)
{
    /* SSL_read/SSL_write return int: sign-extend the low 32 bits. */
    long ret = (int)PT_REGS_RC(ctx);
    tls_exit(ctx, ret);
    return 0;
}

int ssl_set_fd_enter(struct pt_regs *ctx)
{
    u64 ref = PT_REGS_PARM1(ctx);
    s32 fd = PT_REGS_PARM2(ctx);
    tls_fd.update(&ref, &fd);
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
