/* GnuTLS (e.g. wget): plaintext at gnutls_record_send entry / recv return. */
#include "tls_common.h"

#define GNUTLS_NAME_DNS 1

int gnutls_send_enter(struct pt_regs *ctx)
{
    tls_enter(ctx, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx), 0, DIR_EGRESS, SRC_GNUTLS);
    return 0;
}

int gnutls_recv_enter(struct pt_regs *ctx)
{
    tls_enter(ctx, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx), 0, DIR_INGRESS, SRC_GNUTLS);
    return 0;
}

int gnutls_return(struct pt_regs *ctx)
{
    tls_exit(ctx, (long)PT_REGS_RC(ctx), 0);   /* ssize_t */
    return 0;
}

int gnutls_set_int2_enter(struct pt_regs *ctx)
{
    /* gnutls_transport_set_int2(session, recv_fd, send_fd) */
    u64 ref = PT_REGS_PARM1(ctx);
    s32 fd = PT_REGS_PARM3(ctx);
    struct tls_key tk = tls_key_of(ref);
    tls_fd.update(&tk, &fd);
    return 0;
}

int gnutls_deinit_enter(struct pt_regs *ctx)
{
    tls_forget(PT_REGS_PARM1(ctx));
    return 0;
}

int gnutls_server_name_set_enter(struct pt_regs *ctx)
{
    /* gnutls_server_name_set(session, type, name, name_length) */
    if ((int)PT_REGS_PARM2(ctx) != GNUTLS_NAME_DNS)
        return 0;
    emit_sni(ctx, PT_REGS_PARM1(ctx), (void *)PT_REGS_PARM3(ctx), PT_REGS_PARM4(ctx));
    return 0;
}
