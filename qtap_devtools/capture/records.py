"""Typed capture records: the Python mirror of ``probes/common.h``.

Each ring-buffer record starts with ``struct rec_hdr`` (kind, pid, tid, fd,
ts_ns).  ``parse(raw)`` turns one record into one of the classes below (or a
``chunk.DataChunk``, compiled, for data records); it
raises ``ValueError`` only for a record shorter than its kind's layout, which
means probes and this file disagree (a programming error, not bad input).
"""

from __future__ import annotations

import ipaddress
import mmap
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Union

from qtap_devtools.capture.chunk import DataChunk, Direction, Source

if TYPE_CHECKING:
    from qtap_devtools.enrich.model import ProcessInfo

# enum rec_kind in common.h
EXEC, FORK, EXIT, CONNECT, ACCEPT, ADDRESS, CLOSE, DATA, SNI, CGROUP = range(1, 11)

DIRECTIONS: tuple[Direction, Direction] = ("egress", "ingress")
SOURCES: tuple[Source, Source, Source, Source] = ("socket", "openssl", "gnutls", "nodetls")

AF_INET = 2
AF_INET6 = 10

_HDR = struct.Struct("<IIIiQ")  # 24 bytes
_ADDR = "H H 16s"  # family, port (host order), ip (v6 or v4-mapped)
_EXEC = struct.Struct("<24xQI4x16s256s")
_EXEC_ARGS = struct.Struct("<312xHB5x512s")  # args_len, args_cut, args (probes/common.h exec_rec)
_CGROUP = struct.Struct("<24xQ256s")
_FORK = struct.Struct("<24xII")
_EXIT = struct.Struct("<24xiI")
_CONNECT = struct.Struct("<24x" + _ADDR + "i")
_ACCEPT = struct.Struct("<24x" + _ADDR + _ADDR)
_ADDRESS = _ACCEPT
_SNI = struct.Struct("<24xQII256s")
_CLOSE = struct.Struct("<24x4QIHH")  # struct close_rec: offsets[4], known, flags
_DATA = struct.Struct("<24xQIBBHQ")
DATA_HDR_SIZE = 48
DATA_SHEDDING = 1  # data_rec.flags (common.h)
assert _DATA.size == DATA_HDR_SIZE
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str  # dotted IPv4 (v4-mapped shown as IPv4) or compressed IPv6
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(slots=True)
class ProcessExec:
    pid: int
    ts_ns: int
    filename: str
    comm: str
    # What /proc said of the process when the ring reader saw the exec, set by
    # the reader before delivery (not frozen for that alone).  A short-lived
    # process is often gone by the time the event loop gets to the record.
    process: Optional[ProcessInfo] = None
    cgroup_id: int = 0  # its cgroup v2 cgroup's (0: none known)
    uid: int = -1
    # Its argv as execve began, as /proc/<pid>/cmdline reads ("" if not read;
    # ending "…" where the kernel kept only its first ~500 bytes).
    args: str = ""


@dataclass(frozen=True, slots=True)
class CgroupCreated:
    id: int  # what bpf_get_current_cgroup_id() says of the cgroup's members
    path: str  # from the cgroup v2 hierarchy's root, e.g. /docker/<id>
    ts_ns: int


@dataclass(frozen=True, slots=True)
class ProcessFork:
    parent_pid: int
    child_pid: int
    ts_ns: int


@dataclass(frozen=True, slots=True)
class ProcessExit:
    pid: int
    ts_ns: int
    exit_code: int | None  # None: it did not call exit_group (e.g. killed by a signal)


@dataclass(frozen=True, slots=True)
class SocketConnect:
    pid: int
    fd: int
    ts_ns: int
    remote: Endpoint
    in_progress: bool = False  # non-blocking connect returned -EINPROGRESS


@dataclass(frozen=True, slots=True)
class SocketAccept:
    pid: int
    fd: int
    ts_ns: int
    remote: Endpoint | None  # None when accept() was given no address buffer
    local: Endpoint | None


@dataclass(frozen=True, slots=True)
class SocketAddress:
    """The full 4-tuple of (pid, fd); from the kernel, or /proc as a fallback."""

    pid: int
    fd: int
    local: Endpoint
    remote: Endpoint
    ts_ns: int = 0
    origin: Literal["kernel", "proc", "seed"] = "kernel"
    # Seeded sockets only: the local port is a listening one (this side accepted).
    accepted: bool = False


@dataclass(frozen=True, slots=True)
class SocketClose:
    pid: int
    fd: int
    ts_ns: int
    # Where the socket's streams ended, by (is_tls, direction): (plaintext
    # egress, ingress, TLS plaintext egress, ingress); None where untracked.
    ends: tuple[int | None, ...] = ()
    shedding: bool = False  # the capture was shedding bodies at the close


@dataclass(frozen=True, slots=True)
class TlsServerName:
    pid: int
    fd: int | None
    ssl_ptr: int
    host: str
    ts_ns: int = 0


class Batch(list):
    """Records in ring order that know their data records' payload bytes (the
    backlog's byte bound), so nobody has to sum them record by record."""

    __slots__ = ("data_bytes",)

    def __init__(self) -> None:
        super().__init__()
        self.data_bytes = 0


Record = Union[
    ProcessExec, ProcessFork, ProcessExit, SocketConnect, SocketAccept,
    SocketAddress, SocketClose, DataChunk, TlsServerName, CgroupCreated,
]


def endpoint(ip16: bytes, port: int) -> Endpoint:
    if ip16[:12] == _V4_MAPPED:
        return Endpoint(".".join(str(b) for b in ip16[12:]), port)
    return Endpoint(str(ipaddress.IPv6Address(ip16)), port)


def _addr(family: int, port: int, ip16: bytes) -> Endpoint | None:
    return endpoint(ip16, port) if family in (AF_INET, AF_INET6) else None


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse(raw: bytes) -> Record:
    """One ring-buffer record → its typed form."""
    kind, pid, tid, fd, ts = _HDR.unpack_from(raw)
    if kind == DATA:
        offset, length, direction, source, flags, tls_ref = _DATA.unpack_from(raw)
        return DataChunk(
            pid, tid, fd, ts, DIRECTIONS[direction], SOURCES[source], offset,
            raw[DATA_HDR_SIZE : DATA_HDR_SIZE + length], tls_ref, bool(flags & DATA_SHEDDING),
        )
    if kind == EXEC:
        cgroup_id, uid, comm, filename = _EXEC.unpack_from(raw)
        args = ""
        if len(raw) >= _EXEC_ARGS.size:
            length, cut, argv = _EXEC_ARGS.unpack_from(raw)
            args = argv[:length].rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace") + ("…" if cut else "")
        return ProcessExec(pid, ts, _cstr(filename), _cstr(comm), None, cgroup_id, uid, args)
    if kind == FORK:
        child, _ = _FORK.unpack_from(raw)
        return ProcessFork(pid, child, ts)
    if kind == EXIT:
        code, known = _EXIT.unpack_from(raw)
        return ProcessExit(pid, ts, code if known else None)
    if kind == CONNECT:
        fam, port, ip, ret = _CONNECT.unpack_from(raw)
        return SocketConnect(pid, fd, ts, endpoint(ip, port), ret != 0)
    if kind == ACCEPT:
        rfam, rport, rip, lfam, lport, lip = _ACCEPT.unpack_from(raw)
        return SocketAccept(pid, fd, ts, _addr(rfam, rport, rip), _addr(lfam, lport, lip))
    if kind == ADDRESS:
        lfam, lport, lip, rfam, rport, rip = _ADDRESS.unpack_from(raw)
        return SocketAddress(pid, fd, endpoint(lip, lport), endpoint(rip, rport), ts)
    if kind == CLOSE:
        *offsets, known, flags, _ = _CLOSE.unpack_from(raw)
        ends = tuple(off if known >> i & 1 else None for i, off in enumerate(offsets))
        return SocketClose(pid, fd, ts, ends, bool(flags & DATA_SHEDDING))
    if kind == SNI:
        ref, length, _, host = _SNI.unpack_from(raw)
        return TlsServerName(pid, fd if fd >= 0 else None, ref, host[:length].decode("ascii", "replace"), ts)
    if kind == CGROUP:
        cgroup_id, path = _CGROUP.unpack_from(raw)
        return CgroupCreated(cgroup_id, _cstr(path), ts)
    raise ValueError(f"unknown record kind {kind} ({len(raw)} bytes)")


_DATA_FULL = struct.Struct("<IIIiQQIBBHQ")  # rec_hdr + data_rec's header, one unpack
assert _DATA_FULL.size == DATA_HDR_SIZE


class RecordReader:
    """``parse_at``: the record at a place in the ring's pages.

    Data records, nearly all of the traffic, take one precompiled unpack of the
    48-byte header and one slice; everything else goes through ``parse``.
    (``_ringread.c`` decodes data records the same way when it is built.)
    """

    __slots__ = ("parse_at",)

    def __init__(self) -> None:
        unpack = _DATA_FULL.unpack_from
        chunk, directions, sources, slow = DataChunk, DIRECTIONS, SOURCES, parse

        def read_at(area: mmap.mmap | bytes, start: int, size: int) -> Record:
            """The record of ``size`` bytes at ``area[start:]`` (the ring's own pages):
            only the payload is copied out."""
            if area[start] != DATA or size < DATA_HDR_SIZE:  # kind < 256: its low byte
                return slow(area[start : start + size])
            _, pid, tid, fd, ts, offset, length, direction, source, flags, tls_ref = unpack(area, start)
            if length > size - DATA_HDR_SIZE:
                raise ValueError(f"data record claims {length} bytes in {size}")
            begin = start + DATA_HDR_SIZE
            return chunk(pid, tid, fd, ts, directions[direction], sources[source], offset,
                         area[begin : begin + length], tls_ref, (flags & DATA_SHEDDING) != 0)

        self.parse_at = read_at
