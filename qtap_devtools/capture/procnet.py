"""Sockets as /proc sees them: the fallback when the kernel records miss.

Used at start-up to seed sockets that existed before capture began, and later
to fill a 4-tuple the tracepoints could not give (e.g. accept() without an
address buffer).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from .records import Endpoint, endpoint

TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


@dataclass(frozen=True, slots=True)
class ProcSocket:
    pid: int
    fd: int
    local: Endpoint
    remote: Endpoint
    # Its local port is one its network namespace listens on: an accepted
    # socket, so this process is the server side of it.
    accepted: bool = False


def _hex_ip(text: str) -> bytes:
    raw = bytes.fromhex(text)
    # /proc prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return b"\0" * 10 + b"\xff\xff" + words if len(words) == 4 else words


def _endpoint(field: str) -> Endpoint:
    ip, port = field.split(":")
    return endpoint(_hex_ip(ip), int(port, 16))


def _rows(pid: int | str) -> Iterator[list[str]]:
    """The fields of each socket line of ``pid``'s /proc/net/tcp and tcp6."""
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) >= 10:
                        yield parts
        except OSError:
            continue


def tcp_table(pid: int | str = "self", established_only: bool = True) -> dict[int, tuple[Endpoint, Endpoint]]:
    """inode → (local, remote) for the TCP sockets in ``pid``'s network namespace."""
    return {int(parts[9]): (_endpoint(parts[1]), _endpoint(parts[2])) for parts in _rows(pid)
            if not established_only or parts[3] == TCP_ESTABLISHED}


def listening_ports(pid: int | str = "self") -> set[int]:
    """TCP ports in LISTEN state in ``pid``'s network namespace."""
    return {int(parts[1].rsplit(":", 1)[1], 16) for parts in _rows(pid) if parts[3] == TCP_LISTEN}


def socket_inode(pid: int, fd: int) -> int | None:
    try:
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if link.startswith("socket:[") and link.endswith("]"):
        return int(link[8:-1])
    return None


def socket_fds(pid: int) -> dict[int, int]:
    """fd → socket inode for ``pid``."""
    out = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        inode = socket_inode(pid, int(name))
        if inode is not None:
            out[int(name)] = inode
    return out


def resolve(pid: int, fd: int) -> ProcSocket | None:
    """The 4-tuple of ``pid``'s ``fd`` if it is an established TCP socket."""
    pair = _by_pidfd(pid, fd)
    if pair is not None:
        return ProcSocket(pid, fd, *pair) if pair else None
    inode = socket_inode(pid, fd)
    if inode is None:
        return None
    found = tcp_table(pid, established_only=False).get(inode)
    return ProcSocket(pid, fd, *found) if found else None


_SYS_PIDFD_GETFD = 438  # x86-64 and aarch64 alike (Linux 5.6)
_libc = ctypes.CDLL(None, use_errno=True)
_pidfd_works = hasattr(os, "pidfd_open")


def _by_pidfd(pid: int, fd: int) -> tuple[Endpoint, Endpoint] | tuple[()] | None:
    """The socket's own addresses, asked of a copy of its descriptor
    (pidfd_getfd): a few syscalls, where /proc/net/tcp is read whole (a busy
    server's is thousands of lines).  () when it is not a connected TCP
    socket; None when this cannot tell (no pidfd_getfd: the /proc way)."""
    global _pidfd_works
    if not _pidfd_works:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return ()  # the process is gone
    try:
        dup = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EPERM, errno.EACCES):  # an older kernel, or refused: /proc
                _pidfd_works = err != errno.ENOSYS
                return None
            return ()  # EBADF: closed already
    finally:
        os.close(pidfd)
    try:
        with socket.socket(fileno=dup) as sock:
            try:
                if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                    return ()
                local, remote = sock.getsockname(), sock.getpeername()
                return _sockaddr(sock.family, local), _sockaddr(sock.family, remote)
            except OSError:  # not connected
                return ()
            finally:
                sock.detach()  # the copy is closed below, once
    except OSError:
        return ()
    finally:
        os.close(dup)


def _sockaddr(family: int, addr: tuple) -> Endpoint:
    raw = socket.inet_pton(family, addr[0])
    return endpoint(raw if family == socket.AF_INET6 else b"\0" * 10 + b"\xff\xff" + raw, addr[1])


def established_sockets(exclude_pids: set[int] = frozenset(), exclude_port: int = 0) -> list[ProcSocket]:
    """Every (pid, fd) that is an ESTABLISHED TCP socket right now."""
    out = []
    tables: dict[int, dict[int, tuple[Endpoint, Endpoint]]] = {}  # per netns inode
    listening: dict[int, set[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude_pids:
            continue
        pid = int(name)
        fds = socket_fds(pid)
        if not fds:
            continue
        try:
            netns = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        if netns not in tables:
            tables[netns] = tcp_table(pid)
            listening[netns] = listening_ports(pid)
        table, ports = tables[netns], listening[netns]
        for fd, inode in fds.items():
            pair = table.get(inode)
            if pair is None:
                continue
            local, remote = pair
            if exclude_port and exclude_port in (local.port, remote.port):
                continue
            out.append(ProcSocket(pid, fd, local, remote, accepted=local.port in ports))
    return out


__all__ = ["ProcSocket", "tcp_table", "listening_ports", "socket_inode", "socket_fds", "resolve", "established_sockets"]
