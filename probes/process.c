/* Process lifecycle: exec, fork (processes only, not threads), exit with code. */
#include "common.h"

#define CLONE_THREAD_ 0x00010000

BPF_HASH(exit_codes, u32, s32, 16384);     /* tgid -> exit_group() code */
BPF_HASH(clone_flags, u32, u64, 16384);    /* tid -> flags of its running clone */

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (excluded_self(tgid))
        return 0;
    struct data_rec *s = scratch_get();
    if (!s) {
        count_lost(1);
        return 0;
    }
    struct exec_rec *r = (struct exec_rec *)s;
    fill_hdr(&r->h, REC_EXEC, -1);
    /* At exec the container's process is already in its cgroup (runc joins
     * it before it execs the container's command). */
    r->cgroup_id = bpf_get_current_cgroup_id();
    r->uid = (u32)bpf_get_current_uid_gid();
    r->_pad = 0;
    bpf_get_current_comm(r->comm, sizeof(r->comm));
    u32 loc = args->data_loc_filename;
    bpf_probe_read_kernel_str(r->filename, sizeof(r->filename),
                              (void *)args + (loc & 0xffff));
    emit_small(args, r, sizeof(*r));
    scratch_put();
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_clone)
{
    u32 tid = bpf_get_current_pid_tgid();
    u64 flags = args->clone_flags;
    clone_flags.update(&tid, &flags);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_clone3)
{
    u32 tid = bpf_get_current_pid_tgid();
    u64 flags = 0;
    bpf_probe_read_user(&flags, sizeof(flags), args->uargs);  /* clone_args.flags */
    clone_flags.update(&tid, &flags);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_clone)
{
    u32 tid = bpf_get_current_pid_tgid();
    clone_flags.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_clone3)
{
    u32 tid = bpf_get_current_pid_tgid();
    clone_flags.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 tid = bpf_get_current_pid_tgid();
    u64 *flags = clone_flags.lookup(&tid);
    if (flags && (*flags & CLONE_THREAD_))
        return 0;              /* a new thread, not a new process */
    struct fork_rec r = {};
    fill_hdr(&r.h, REC_FORK, -1);
    if (excluded_self(r.h.pid))
        return 0;
    r.child_pid = args->child_pid;
    emit_small(args, &r, sizeof(r));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    s32 code = args->error_code & 0xff;
    exit_codes.update(&tgid, &code);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if ((u32)id != tgid)
        return 0;              /* only the thread-group leader */
    struct exit_rec r = {};
    fill_hdr(&r.h, REC_EXIT, -1);
    s32 *code = exit_codes.lookup(&tgid);
    if (code) {
        r.exit_code = *code;
        r.code_known = 1;
        exit_codes.delete(&tgid);
    } else {
        r.exit_code = -1;
    }
    if (!excluded_self(tgid))
        emit_small(args, &r, sizeof(r));
    return 0;
}
