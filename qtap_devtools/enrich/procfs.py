"""One process's identity, read from ``/proc``.

Everything here is read in user space because the BPF side cannot read kernel
structs on our kernels (DESIGN §3).  Any read can fail: the process may exit
between two of them.  Only a missing ``stat`` means "gone"; other missing
pieces leave a field at its fallback so a short-lived process is still shown.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import OrderedDict
from functools import lru_cache

from qtap_devtools import rootfs
from qtap_devtools.enrich.cgroup import container_of
from qtap_devtools.enrich.model import ProcessInfo

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Long enough for any real command line a person reads; /proc can return MiBs.
MAX_CMDLINE_BYTES = 32 * 1024
# Parsed passwd files, keyed by file identity; one per distinct container image.
PASSWD_CACHE_SIZE = 64
MAX_PASSWD_BYTES = 256 * 1024  # read of a passwd file, at most (a container chooses its size)

_passwd_cache: OrderedDict[tuple[int, int, int, int], dict[int, str]] = OrderedDict()
passwd_evicted = 0  # parsed passwd files let go (read again when seen again)
# Processes are read on the event loop and on the ring reader's thread (at exec).
_passwd_lock = threading.Lock()


@lru_cache(maxsize=8)
def boot_time_ns(proc_root: str = "/proc") -> int:
    """Wall-clock time of boot, ns.

    ``starttime`` in ``/proc/<pid>/stat`` counts CLOCK_BOOTTIME ticks, so for
    the live system boot time is ``REALTIME - BOOTTIME`` (``btime`` in
    ``/proc/stat`` is only whole seconds).  A fake proc root (tests) says its
    own ``btime``.
    """
    if proc_root != "/proc":
        try:
            with open(f"{proc_root}/stat", encoding="ascii") as f:
                for line in f:
                    if line.startswith("btime "):
                        return int(line.split()[1]) * 1_000_000_000
        except (OSError, ValueError):
            pass
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def list_pids(proc_root: str = "/proc") -> list[int]:
    """Pids of the processes alive now (thread ids are not listed by /proc)."""
    try:
        names = os.listdir(proc_root)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


def parse_stat(text: str) -> tuple[str, int, int] | None:
    """``(comm, ppid, starttime ticks)`` from ``/proc/<pid>/stat``.

    ``comm`` may itself hold spaces and parentheses, so the fields are split
    after the *last* ``)``.  Fields are numbered as in proc(5): state is 3,
    ppid 4, starttime 22.
    """
    open_, close = text.find("("), text.rfind(")")
    if open_ < 0 or close < open_:
        return None
    fields = text[close + 2 :].split()
    try:
        return text[open_ + 1 : close], int(fields[4 - 3]), int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def read_start_time_ns(pid: int, proc_root: str = "/proc") -> int | None:
    """When ``pid`` started (wall clock ns), or None if it is gone.  With the pid
    this identifies one process: a reused pid has a later start time."""
    stat = _read_text(f"{proc_root}/{pid}/stat")
    parsed = parse_stat(stat) if stat is not None else None
    if parsed is None:
        return None
    return _ticks_to_ns(parsed[2], proc_root)


def read_process(pid: int, proc_root: str = "/proc") -> ProcessInfo | None:
    """What ``/proc`` says about ``pid``; None if the process is gone.

    Container and pod metadata are left empty; the ``Enricher`` adds them.
    The container id and runtime come from the cgroup path.
    """
    base = f"{proc_root}/{pid}"
    stat = _read_text(f"{base}/stat")
    parsed = parse_stat(stat) if stat is not None else None
    if parsed is None:
        return None
    comm, ppid, start_ticks = parsed

    exe = _read_exe(base)
    uid = _read_uid(base)
    found = container_of(pid, proc_root)
    runtime, container_id = found if found is not None else (None, None)
    return ProcessInfo(
        pid=pid,
        ppid=ppid,
        exe=exe,
        binary=os.path.basename(exe) if exe else comm,
        cmdline=_read_cmdline(base),
        uid=uid if uid is not None else -1,
        user=_user_name(base, uid),
        hostname=_hostname(base, proc_root),
        start_time_ns=_ticks_to_ns(start_ticks, proc_root),
        container_id=container_id,
        runtime=runtime,
    )


def _ticks_to_ns(ticks: int, proc_root: str) -> int:
    return boot_time_ns(proc_root) + ticks * 1_000_000_000 // CLK_TCK


def _read_text(path: str, limit: int = 65536) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:  # ENOENT/ESRCH: exited; EACCES: another user's, not root
        return None


def _read_exe(base: str) -> str:
    try:
        exe = os.readlink(f"{base}/exe")
    except OSError:  # kernel thread, zombie, or gone
        return ""
    # An upgraded or removed binary still runs; the link then says so.
    return exe.removesuffix(" (deleted)")


def _read_cmdline(base: str) -> str:
    try:
        with open(f"{base}/cmdline", "rb") as f:
            raw = f.read(MAX_CMDLINE_BYTES)
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")


def _read_uid(base: str) -> int | None:
    """Effective uid: the user ``ps`` shows (setuid programs run as their owner)."""
    text = _read_text(f"{base}/status")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("Uid:"):
            ids = line.split()
            try:
                return int(ids[2])
            except (IndexError, ValueError):
                return None
    return None


def host_user_name(uid: int) -> str:
    """A uid's name on the host (init's passwd, then ours): for a process gone
    before /proc was read, known to be in no container."""
    return _user_name("/proc/1", uid)


def _user_name(base: str, uid: int | None) -> str:
    """The name in the process's own ``/etc/passwd`` (a container's uid 1000 is
    not the host's), then the host's, then the number."""
    if uid is None:
        return ""
    for path in (f"{base}/root/etc/passwd", "/etc/passwd"):
        name = _passwd(path).get(uid)
        if name is not None:
            return name
    return str(uid)


def _passwd(path: str) -> dict[int, str]:
    try:
        fd = rootfs.open_regular(path)  # a container's: inside its root, never blocking
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        with _passwd_lock:
            users = _passwd_cache.get(key)
            if users is not None:
                _passwd_cache.move_to_end(key)
                return users
        with os.fdopen(fd, "rb", closefd=False) as f:
            text = f.read(MAX_PASSWD_BYTES).decode("utf-8", "replace")
    except OSError:
        return {}
    finally:
        os.close(fd)
    users = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            users.setdefault(int(fields[2]), fields[0])
    global passwd_evicted
    with _passwd_lock:
        _passwd_cache[key] = users
        if len(_passwd_cache) > PASSWD_CACHE_SIZE:
            _passwd_cache.popitem(last=False)
            passwd_evicted += 1
    return users


def _hostname(base: str, proc_root: str) -> str:
    """The container's hostname when the process has its own UTS namespace,
    else the system's.

    The reference namespace is pid 1's; where pid 1 cannot be inspected (a
    sandbox hides it) it is our own, which is the host's when the agent runs
    on the host as it must.
    """
    try:
        own = os.readlink(f"{base}/ns/uts")
    except OSError:
        own = None
    if own is not None and own != _reference_uts(proc_root):
        raw = rootfs.read_regular(f"{base}/root/etc/hostname", 256)
        name = raw.decode("utf-8", "replace").strip() if raw else ""
        if name:
            return name
    return system_hostname()


def _reference_uts(proc_root: str) -> str | None:
    for who in ("1", "self"):
        try:
            return os.readlink(f"{proc_root}/{who}/ns/uts")
        except OSError:
            continue
    return None


def system_hostname() -> str:
    return socket.gethostname()
