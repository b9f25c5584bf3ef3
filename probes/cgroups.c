/* Cgroup v2 directories as they are made: their id and path.
 *
 * An exec record carries its process's cgroup id; this record turns the id
 * into the path that names the container.  A container's only process (a
 * `docker run --rm … curl`) can be gone before /proc/<pid>/cgroup is read,
 * but its cgroup was made before it ran, and its mkdir was seen here. */
#include "common.h"

TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
    if (args->root != 0)
        return 0;              /* a cgroup v1 hierarchy: ids of another kind */
    struct data_rec *s = scratch_get();
    if (!s) {
        count_lost(1);
        return 0;
    }
    struct cgroup_rec *r = (struct cgroup_rec *)s;
    fill_hdr(&r->h, REC_CGROUP, -1);
    r->id = args->id;
    u32 loc = args->data_loc_path;
    bpf_probe_read_kernel_str(r->path, sizeof(r->path), (void *)args + (loc & 0xffff));
    emit_small(args, r, sizeof(*r));
    scratch_put();
    return 0;
}
