"""Uprobes attached with a cookie: ``perf_event_open`` on the uprobe PMU, then
``BPF_LINK_CREATE`` with the cookie the program reads back
(``bpf_get_attach_cookie``).

bcc 0.26 attaches a program to a perf event with an ioctl, which carries no
cookie; the probes use theirs to tell which library file a site belongs to
(``armed`` in probes/tls_common.h).  The link holds its perf event, and its
descriptor is held until :meth:`Links.close`: a close in a system call removes
the probe before it returns, whereas closed by a process's exit it is removed
by a kernel worker seconds later (so ``agent.detach_in_background`` closes
them itself).  A kernel without links for perf events (before 5.15) refuses
``BPF_LINK_CREATE``: the caller then attaches through bcc, without a cookie.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import threading

_SYS_PERF_EVENT_OPEN = 298  # x86-64
_SYS_BPF = 321
_BPF_LINK_CREATE = 28
_BPF_PERF_EVENT = 41  # enum bpf_attach_type
_PERF_FLAG_FD_CLOEXEC = 8
_UPROBE_TYPE = "/sys/bus/event_source/devices/uprobe/type"
_RETPROBE_BIT = "/sys/bus/event_source/devices/uprobe/format/retprobe"  # "config:0"

_libc = ct.CDLL(None, use_errno=True)


class _PerfEventAttr(ct.Structure):
    # struct perf_event_attr up to config2 (PERF_ATTR_SIZE_VER1 is 72; the
    # kernel takes a shorter struct and zeroes the rest).
    _fields_ = [
        ("type", ct.c_uint32), ("size", ct.c_uint32), ("config", ct.c_uint64),
        ("sample_period", ct.c_uint64), ("sample_type", ct.c_uint64), ("read_format", ct.c_uint64),
        ("flags", ct.c_uint64), ("wakeup_events", ct.c_uint32), ("bp_type", ct.c_uint32),
        ("uprobe_path", ct.c_uint64), ("probe_offset", ct.c_uint64),
    ]


class _LinkCreateAttr(ct.Structure):
    # union bpf_attr's link_create, with perf_event.bpf_cookie
    _fields_ = [
        ("prog_fd", ct.c_uint32), ("target_fd", ct.c_uint32), ("attach_type", ct.c_uint32),
        ("flags", ct.c_uint32), ("bpf_cookie", ct.c_uint64), ("_pad", ct.c_uint64 * 4),
    ]


def _pmu() -> tuple[int, int]:
    """The uprobe PMU's type and the config bit that makes a uretprobe."""
    with open(_UPROBE_TYPE) as f:
        pmu = int(f.read())
    with open(_RETPROBE_BIT) as f:
        fmt = f.read().strip()  # "config:0"
    return pmu, int(fmt.partition(":")[2])


# One probe placed at a time, process-wide, so that an exit can wait for the
# one being placed and bar the rest (bar_new).
_placing = threading.Lock()
_barred = False
BAR_WAIT_SECONDS = 2.0


def bar_new() -> None:
    """Wait for a probe being placed, and let none be placed after: the
    process is exiting (``agent.main``, before it forks the child that takes
    the probes over).  A probe placed after that fork would be the exiting
    process's alone to remove, and its exit would wait for the kernel's RCU
    grace periods (~0.2 s a probe here); more so one cut off between its
    perf event and its link.  The wait is bounded: a placement stuck in the
    kernel (a process whose memory map is locked) must not hang the stop."""
    global _barred
    held = _placing.acquire(timeout=BAR_WAIT_SECONDS)
    _barred = True
    if held:
        _placing.release()


class LinkUnsupported(OSError):
    """The kernel links no BPF program to a perf event (before 5.15)."""


def _fail(what: str, cls: type[OSError] = OSError) -> OSError:
    err = ct.get_errno()
    return cls(err, f"{what}: {os.strerror(err)}")


_TRACER_FDS = frozenset({"anon_inode:bpf-prog", "anon_inode:bpf_link", "anon_inode:[perf_event]"})


def tracers(exclude: set[int]) -> list[str]:
    """``"pid comm"`` of the processes, not in ``exclude``, that hold a BPF
    program, a BPF link or a perf event: whatever can hold a uprobe."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                if os.readlink(f"/proc/{name}/fd/{fd}") in _TRACER_FDS:
                    with open(f"/proc/{name}/comm") as f:
                        out.append(f"{name} {f.read().strip()}")
                    break
        except OSError:  # gone, or a descriptor closed while we read
            continue
    return out


def _uprobe_refused(offset: int) -> OSError:
    err = ct.get_errno()
    # No path: what the agent opened is a /proc/self/fd link; its caller names the file.
    what = f"perf_event_open of a uprobe at file offset {offset:#x}: {os.strerror(err)}"
    if err != errno.EINVAL:
        return OSError(err, what)
    # The kernel keeps one uprobe per instruction, shared by every program
    # probing it, and refuses a second whose reference-counter offset differs
    # (its log: "ref_ctr_offset mismatch").  bcc 0.26's Python bindings, as
    # Debian 12 ships them, pass none to a C function that takes one, so
    # theirs is whatever was on the stack: sslsniff-bpfcc and its kin hold
    # SSL_write and SSL_read that way.
    held = ", ".join(tracers({os.getpid()})) or "no other process"
    return OSError(err, f"{what}: most likely another program probes this instruction, registered differently "
                        f"(Debian 12's bcc tools, such as sslsniff-bpfcc, do; the kernel log says 'ref_ctr_offset "
                        f"mismatch'); probes may be held by: {held}; the agent tries again at every sweep, "
                        "so it attaches once that program stops")


class Links:
    """The uprobes this process attached itself, by cookie: take one
    cookie's away with :meth:`take`, close all with :meth:`close`."""

    def __init__(self) -> None:
        self._fds: dict[int, list[int]] = {}  # cookie -> its links' descriptors
        self._pmu: tuple[int, int] | None = None

    def __len__(self) -> int:
        return sum(len(fds) for fds in self._fds.values())

    def attach(self, prog_fd: int, path: bytes, offset: int, ret: bool, cookie: int) -> None:
        """Run ``prog_fd`` at file ``offset`` of ``path`` (its return with
        ``ret``), reading ``cookie``.  Raises OSError (LinkUnsupported: no
        cookies on this kernel, attach another way)."""
        with _placing:
            if _barred:
                raise OSError(errno.ESHUTDOWN, "the agent is stopping: no more probes are placed")
            self._attach(prog_fd, path, offset, ret, cookie)

    def _attach(self, prog_fd: int, path: bytes, offset: int, ret: bool, cookie: int) -> None:
        if self._pmu is None:
            self._pmu = _pmu()
        pmu, ret_bit = self._pmu
        path_buf = ct.create_string_buffer(path)
        attr = _PerfEventAttr(type=pmu, size=ct.sizeof(_PerfEventAttr), config=(1 << ret_bit) if ret else 0,
                              sample_period=1, wakeup_events=1,
                              uprobe_path=ct.addressof(path_buf), probe_offset=offset)
        # pid -1, cpu 0: every process that maps the file (as bcc does).
        perf_fd = _libc.syscall(_SYS_PERF_EVENT_OPEN, ct.byref(attr), -1, 0, -1, _PERF_FLAG_FD_CLOEXEC)
        if perf_fd < 0:
            raise _uprobe_refused(offset)
        link = _LinkCreateAttr(prog_fd=prog_fd, target_fd=perf_fd, attach_type=_BPF_PERF_EVENT, bpf_cookie=cookie)
        link_fd = _libc.syscall(_SYS_BPF, _BPF_LINK_CREATE, ct.byref(link), ct.sizeof(link))
        error = _fail("BPF_LINK_CREATE for a perf event", LinkUnsupported) if link_fd < 0 else None
        os.close(perf_fd)  # the link holds the perf event: one descriptor per probe
        if error is not None:
            raise error
        self._fds.setdefault(cookie, []).append(link_fd)

    def take(self, cookie: int) -> list[int]:
        """The descriptors of ``cookie``'s probes, theirs to close now
        (:func:`close_all`)."""
        return self._fds.pop(cookie, [])

    def close(self) -> None:
        for cookie in list(self._fds):
            close_all(self.take(cookie))


def close_all(fds: list[int]) -> None:
    """Close probes' links: each close removes its probe before it returns,
    which waits for the kernel's RCU grace periods (~0.2 s a probe here)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
