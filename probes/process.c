/* Process lifecycle: exec, fork (processes only, not threads), exit with code. */
#include "common.h"

#define CLONE_THREAD_ 0x00010000

BPF_HASH(exit_codes, u32, s32, 16384);     /* tgid -> exit_group() code */

#define ARG_MAX_READ 256       /* one argument's most; with the offset masked to
                                * EXEC_ARGS/2 - 1, every read stays in the buffer */
#define ARGS_READ 24           /* arguments read at most */
struct exec_args {
    u16 len;
    u8 cut;
    u8 _pad[5];
    char buf[EXEC_ARGS + ARG_MAX_READ];
};
BPF_PERCPU_ARRAY(args_scratch, struct exec_args, 1);
/* tid -> argv of its execve in progress; an LRU so one whose exec never
 * completed (and was not seen failing) cannot fill it. */
BPF_TABLE("lru_hash", u32, struct exec_args, exec_args, 4096);

static __always_inline int read_argv(const char *const *argv)
{
    u32 zero = 0;
    struct exec_args *a = args_scratch.lookup(&zero);
    if (!a)
        return 0;
    a->len = 0;
    a->cut = 0;
    u32 off = 0;
    int whole = 0;     /* argv's NULL was reached: anything else that ends the loop cut it */
    #pragma unroll
    for (int i = 0; i < ARGS_READ; i++) {
        const char *arg = NULL;
        if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]) != 0)
            break;
        if (!arg) {
            whole = 1;
            break;
        }
        if (off >= EXEC_ARGS / 2)
            break;
        long n = bpf_probe_read_user_str(&a->buf[off & (EXEC_ARGS / 2 - 1)], ARG_MAX_READ, arg);
        if (n <= 0)
            break;
        off += n;      /* past its NUL: the separator */
        if (n == ARG_MAX_READ)
            a->cut = 1;
    }
    if (!whole)
        a->cut = 1;
    if (off == 0)
        return 0;
    a->len = off > EXEC_ARGS ? EXEC_ARGS : off;
    u32 tid = bpf_get_current_pid_tgid();
    exec_args.update(&tid, a);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
    if (excluded_self(bpf_get_current_pid_tgid() >> 32))
        return 0;
    return read_argv((const char *const *)args->argv);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
    if (excluded_self(bpf_get_current_pid_tgid() >> 32))
        return 0;
    return read_argv((const char *const *)args->argv);
}

/* A failed exec returns to the caller: its argv is no one's. */
TRACEPOINT_PROBE(syscalls, sys_exit_execve)
{
    u32 tid = bpf_get_current_pid_tgid();
    if (args->ret < 0)
        exec_args.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_execveat)
{
    u32 tid = bpf_get_current_pid_tgid();
    if (args->ret < 0)
        exec_args.delete(&tid);
    return 0;
}
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
    /* old_pid: the thread that called execve (a thread other than the
     * leader takes the leader's pid as it execs). */
    u32 caller = args->old_pid;
    struct exec_args *a = exec_args.lookup(&caller);
    r->args_len = 0;
    r->args_cut = 0;
    if (a) {
        r->args_len = a->len;
        r->args_cut = a->cut;
        bpf_probe_read_kernel(r->args, sizeof(r->args), a->buf);
        exec_args.delete(&caller);
    }
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
