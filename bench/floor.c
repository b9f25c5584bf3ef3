/* The physical floor: what a uprobe costs with no work behind it.
 *
 * Attached at SSL_read/SSL_write (entry mode: uprobe + uretprobe at the
 * symbols; tuned mode: plain uprobes at the sites tuned.analyze() proves).
 * Counts calls and nothing else: no stash, no copy, no ring buffer.  A per-CPU
 * slot, so two cores never contend on one cache line.
 */
#include <uapi/linux/ptrace.h>

BPF_PERCPU_ARRAY(hits, u64, 1);

int count_hit(struct pt_regs *ctx)
{
    u32 k = 0;
    u64 *v = hits.lookup(&k);
    if (v)
        *v += 1;
    return 0;
}
