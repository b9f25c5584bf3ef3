"""Opening files another process (a container) controls, as root, safely.

The agent reads a container's ``/etc/passwd`` and ``/etc/hostname`` and its
TLS libraries through ``/proc/<pid>/root``.  Whoever is root in the container
chooses what is there:

- a FIFO or a device at that path would block ``open`` (or ``read``) for
  ever, and with it the thread that asked (the ring reader, the attacher);
- an absolute symlink would be resolved against the agent's root, the
  host's, not the container's.

So :func:`open_regular` opens without blocking, takes regular files only, and
resolves ``/proc/<pid>/root/…`` inside that root (``openat2`` with
``RESOLVE_IN_ROOT``, Linux 5.6+; older kernels fall back to a plain open that
refuses a final symlink).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat

_SYS_OPENAT2 = 437  # x86-64 and every architecture since 5.6 (the unified syscall table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_IN_ROOT = re.compile(r"^(/proc/\d+/root)(/.*)$")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_openat2_works = True


def open_regular(path: str) -> int:
    """A read-only descriptor of the regular file at ``path``; OSError if it is
    not one (FIFO, device, directory, socket) or cannot be opened."""
    m = _IN_ROOT.match(path)
    fd = _open_in_root(m.group(1), m.group(2)) if m else os.open(path, _FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of the regular file at ``path``; None if it is not
    one or cannot be read."""
    try:
        fd = open_regular(path)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def _open_in_root(root: str, rest: str) -> int:
    global _openat2_works
    if not _openat2_works:
        return os.open(root + rest, _FLAGS | os.O_NOFOLLOW)
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = _OpenHow(_FLAGS, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
        # Every argument as a long: syscall() is variadic and reads them so.
        fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(dirfd),
                           ctypes.c_char_p(rest.lstrip("/").encode()), ctypes.byref(how),
                           ctypes.c_long(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), root + rest)
    finally:
        os.close(dirfd)
    _openat2_works = False  # a kernel before 5.6: no resolving inside the root
    return os.open(root + rest, _FLAGS | os.O_NOFOLLOW)
