"""From capture records to events: connections, reassembly, enrichment.

:class:`Pipeline` is fed batches of typed capture records (in the event loop's
thread) and produces typed events in order.  It tracks one :class:`_Conn` per
(pid, fd) — or per (pid, TLS session) when a TLS library works on memory
buffers and no fd is known — runs a sans-IO HTTP/1 or HTTP/2 assembler per connection,
and reads the TLS handshake's clear bytes for SNI and version.  It never raises
on captured bytes: what cannot be parsed marks the connection ``other``.

Timestamps from the kernel are CLOCK_MONOTONIC; events carry wall-clock time,
so the offset between the two clocks is taken once at start.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Final
from urllib.parse import urlsplit

from qtap_devtools import ids
from qtap_devtools.assemble.http1 import ConnectionAssembler, Direction, Role
from qtap_devtools.assemble.http2 import PREFACE as HTTP2_PREFACE, Http2Assembler, joined_sender
from qtap_devtools.assemble.model import HttpExchange, combined_headers
from qtap_devtools.assemble.tls_hello import HelloReader, looks_like_tls
from qtap_devtools.capture import records as rec
from qtap_devtools.capture.chunk import DataChunk, Source  # compiled: compared as its type object, not looked up in rec
from qtap_devtools.config import Config
from qtap_devtools.enrich.cgroup import CgroupIndex
from qtap_devtools.enrich.model import ProcessInfo
from qtap_devtools.enrich.procfs import host_user_name
from qtap_devtools.events import (
    Address,
    Connection,
    ConnectionClosed,
    ConnectionOpened,
    ConnectionUpdated,
    Event,
    HttpMessage,
    HttpTransaction,
    ProcessStarted,
    ProcessStopped,
)

log: Final = logging.getLogger(__name__)

MAX_CONNECTIONS: Final = 65_536
OWN_MARKER: Final = "x-qtap-devtools"  # the response header naming the agent that sent it (lower case)
# A connection seen open whose TLS library's first plaintext does not start a
# request (or HTTP/2) may be HTTP whose library was attached after it was in
# use (a new binary, attached at its exec: its first plaintext falls anywhere
# in a message), or another protocol (SMTP, a database).  This much of it is
# searched for the next request before it is taken for the latter.
JOIN_SEEK_BYTES: Final = 256 << 10
MAX_PENDING_SNI: Final = 4096
OPEN_GRACE_NS: Final = 100_000_000  # wait this long for a connection's addresses before announcing it
_REQUEST_START: Final = re.compile(rb"^[A-Z]{3,12} \S+ HTTP/1\.[01]\r?\n")
_HOST_FIELD: Final = re.compile(rb"\nhost:[ \t]*([^\r\n]+)", re.I)
_REQUEST_DIRECTION: Final = {"client": "egress", "server": "ingress"}
_OTHER: Final[dict[str, Direction]] = {"egress": "ingress", "ingress": "egress"}


def _host_name(host: str) -> str:
    """``example.com:8080`` → ``example.com``; ``[::1]:8080`` → ``[::1]``."""
    host = host.strip()
    if host.startswith("["):
        return host[: host.find("]") + 1] or host
    return host.rsplit(":", 1)[0]


def mono_to_wall_offset() -> int:
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def classify(remote_ip: str | None) -> str:
    """``egress-internal`` for loopback/private/link-local peers, else external."""
    if not remote_ip:
        return "egress-external"
    try:
        ip = ipaddress.ip_address(remote_ip)
    except ValueError:
        return "egress-external"
    return "egress-internal" if (ip.is_private or ip.is_loopback or ip.is_link_local) else "egress-external"


@dataclass
class _Conn:
    info: Connection
    role: Role
    assembler: ConnectionAssembler
    announced: bool = False
    opened_mono: int = 0
    hello: dict = field(default_factory=dict)  # direction -> HelloReader
    last_l7: str = "unknown"
    last_tls: tuple = ()
    fed: bool = False  # has the assembler seen any bytes yet
    lent: bool = False  # an fd-less TLS stream that knows its socket (_lend)
    carried: bool = False  # a socket whose events its TLS stream makes now (_lend)
    accepted: bool = False  # seeded from /proc with a listening local port
    shed: bool = False  # the last record fed was written while the capture shed bodies
    own: bool = False  # carries this agent's own API, through a forwarder (OWN_MARKER)
    tls_ref: int = 0  # its TLS library's object (SSL*), once its plaintext came
    # Bytes a stream joined at its TLS library's first plaintext may still be
    # searched for an HTTP message before it is taken for another protocol
    # (JOIN_SEEK_BYTES); -1: no limit.
    seek_left: int = -1
    # Set, in place of ``assembler``, once the client's HTTP/2 preface is seen
    # (kept apart so the HTTP/1 path stays typed for mypyc).
    h2: Http2Assembler | None = None


class Pipeline:
    def __init__(
        self,
        config: Config,
        emit: Callable[[Event], None],
        process_info: Callable[[int], ProcessInfo | None],
        *,
        forget_process: Callable[[int], None] = lambda pid: None,
        remember_process: Callable[[ProcessInfo], None] = lambda info: None,
        own_pid: int | None = None,
        own_port: int | None = None,
        cgroups: CgroupIndex | None = None,
    ) -> None:
        self.config = config
        self.cgroups = cgroups if cgroups is not None else CgroupIndex()
        self.emit = emit
        self.process_info = process_info
        self.forget_process = forget_process  # an exec replaces what the cache knew
        self.remember_process = remember_process  # what the ring reader read at exec
        self.own_pid = own_pid if own_pid is not None else os.getpid()
        self.own_port = None if config.capture_own_port else (own_port or config.listen.port)
        # This agent's responses carry OWN_MARKER with this value (server.py):
        # a connection whose response does is the agent's own API reached
        # through a forwarder or tunnel on this machine (its own port is left
        # out already).  Its transactions are not shown, and ``on_own_socket``
        # stops the probes reading it.  None with --capture-own-port.
        self.own_marker: str | None = None
        self.on_own_socket: Callable[[int, int, int], None] = lambda pid, fd, tls_ref: None
        self.clock_offset = mono_to_wall_offset()
        self.conns: OrderedDict[tuple, _Conn] = OrderedDict()
        self.pending_sni: OrderedDict[tuple[int, int], str] = OrderedDict()
        # On loopback the handshake completes inside connect(), so the kernel's
        # address record can arrive before the connect record it belongs to.
        self.pending_addr: OrderedDict[tuple, rec.SocketAddress] = OrderedDict()
        self.processes: OrderedDict[int, ProcessInfo] = OrderedDict()
        # _process's answers while one batch of records is handled (a few
        # milliseconds of traffic; the enricher's own answer is fresh for a
        # second): a pid's thousand transactions ask once.  None between
        # batches; a pid's answer is dropped at its exec or exit.
        self._answered: dict[int, ProcessInfo | None] | None = None
        self.parents: OrderedDict[int, int] = OrderedDict()
        # The pids whose process.started went out (at exec, in the start's
        # snapshot, or at a forked child's first connection), oldest first.
        self.announced: OrderedDict[int, None] = OrderedDict()
        # (pid, socket fd) -> key of the fd-less TLS stream that borrowed it.
        self.borrowers: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        # (pid, tid) -> the TLS socket that thread last read ciphertext from,
        # and the fd-less TLS stream whose plaintext it wrote last, whose
        # ciphertext its next socket write carries (_match_socket).
        self.cipher_read: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        self.plain_written: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        self.counters = {
            "records": 0,
            "transactions": 0,
            "connections_evicted": 0,
            "unpaired_close": 0,
            "own_traffic_skipped": 0,
            "connects_not_established": 0,
            # HTTP/2 connections decoded, from their preface or joined mid-connection.
            "http2_connections": 0,
            # ... of which joined mid-connection (their start not seen): streams
            # open then are not shown, later ones are (incomplete where a field
            # referred to what came before).
            "http2_connections_joined": 0,
            # ... of which decoding stopped (a capture gap, a malformed frame or
            # header block): their open streams went out incomplete, the rest unread.
            "http2_connections_undecodable": 0,
            # Capture gaps (shedding, a full ring) HTTP/2 decoding read past by
            # finding the next frame: the streams they touched are incomplete.
            "http2_gaps_read_past": 0,
            # Streams past the open-stream limit of one connection, not shown.
            "http2_streams_not_tracked": 0,
            # Oldest entries let go from the side tables (processes, parents, a
            # TLS stream's borrowed socket, an SNI or address waiting for its
            # socket), each bounded: only a flood of short-lived ones reaches this.
            "state_evicted": 0,
            # Processes that exited before the agent read their /proc entry
            # (the agent behind, or a very short-lived process): shown with what
            # the kernel said: its container from its cgroup id, no user name.
            "processes_gone_before_read": 0,
            # Processes whose container /proc did not say (gone, or gone midway
            # through the read) and the kernel's cgroup id did.
            "containers_from_cgroup_id": 0,
            # Cgroup ids let go from their bounded index (CgroupIndex.MAX_IDS).
            "cgroup_ids_evicted": 0,
            # Records whose handling raised (a bug): logged, counted, the rest go on.
            "record_errors": 0,
            # TLS connections opened after the probes went live that closed with
            # no plaintext from a TLS library the agent reads (Go, BoringSSL,
            # NSS, rustls, a static OpenSSL, or none exchanged): the programs
            # are named once each in the log.
            "tls_connections_unread": 0,
            # TLS streams whose fd was learned after their first plaintext
            # (open before the agent; plaintext their library had buffered),
            # then continued as their socket's connection (_fd_found).
            "tls_fd_found_late": 0,
        }
        self.unread_exes: set[str] = set()
        # When the TLS probes placed at the start went live (monotonic ns; 0:
        # not yet).  A TLS connection opened before then that closes with no
        # plaintext seen says nothing about its library: its calls may all have
        # come before the probes (nginx and curl, mid-request as the agent starts).
        self.tls_armed_mono = 0

    # ------------------------------------------------------------ helpers

    def wall(self, mono_ns: int) -> int:
        return mono_ns + self.clock_offset if mono_ns else time.time_ns()

    def _process(self, pid: int) -> ProcessInfo | None:
        answered = self._answered
        if answered is None:
            return self._ask_process(pid)
        if pid in answered:
            return answered[pid]
        answer = answered[pid] = self._ask_process(pid)
        return answer

    def _ask_process(self, pid: int) -> ProcessInfo | None:
        # The enricher's answer first: it improves as container metadata arrives.
        info = self.process_info(pid)
        if info is not None:
            known = self.processes.get(pid)
            if not info.exe and known is not None and known.exe:
                # A process killed and not yet reaped: its /proc entry is there
                # but no longer names its executable. What we knew still does.
                return known
            self._remember(info)
            return info
        return self.processes.get(pid)  # gone from /proc: what we knew of it

    def _remember(self, info: ProcessInfo) -> None:
        self.processes[info.pid] = info
        self.processes.move_to_end(info.pid)
        while len(self.processes) > MAX_CONNECTIONS:
            self.processes.popitem(last=False)
            self.counters["state_evicted"] += 1

    def _new_conn(self, key: tuple, pid: int, fd: int, ts: int, role: Role,
                  remote: rec.Endpoint | None, local: rec.Endpoint | None) -> _Conn:
        old = self.conns.pop(key, None)
        if old is not None:  # fd reused without a close we saw
            self._finish(old, ts)
        direction = "ingress" if role == "server" else classify(remote.ip if remote else None)
        info = Connection(
            connection_id=ids.new_id(self.wall(ts) / 1e9),
            pid=pid,
            fd=fd,
            opened_ns=self.wall(ts),
            direction=direction,
            local=Address(local.ip, local.port) if local else None,
            remote=Address(remote.ip, remote.port) if remote else None,
            process=self._process(pid),
        )
        conn = _Conn(info, role, self._assembler(role), opened_mono=ts)
        self.conns[key] = conn
        if len(self.conns) > MAX_CONNECTIONS:
            _, evicted = self.conns.popitem(last=False)
            self.counters["connections_evicted"] += 1
            self._finish(evicted, ts)
        return conn

    def _assembler(self, role: Role) -> ConnectionAssembler:
        return ConnectionAssembler(
            role=role,
            max_body_bytes=self.config.max_body_bytes,
            stream_limit_ns=int(self.config.stream_limit_seconds * 1e9),
        )

    def _is_own(self, pid: int, *endpoints: rec.Endpoint | None) -> bool:
        if pid == self.own_pid:
            return True
        if self.own_port is None:
            return False
        return any(e is not None and e.port == self.own_port and _is_loopback(e.ip) for e in endpoints)

    def _announce(self, conn: _Conn) -> None:
        if not conn.announced:
            conn.announced = True
            process = conn.info.process = self._process(conn.info.pid) or conn.info.process
            if process is not None and process.pid not in self.announced:
                # Forked, not exec'd (a pre-forking server's worker, a
                # multiprocessing child): no exec announced it.  Said with its
                # first connection, or it would show only at its exit.
                self.announce_process(process, conn.info.opened_ns)
            self.emit(ConnectionOpened(conn.info, ts_ns=conn.info.opened_ns))

    def _maybe_updated(self, conn: _Conn, ts: int) -> None:
        if conn.carried or conn.own or (not conn.announced and not conn.lent and conn.info.fd < 0):
            # A socket's events are its TLS stream's once lent; an fd-less TLS
            # stream waits to be one connection with its socket (_lend), and
            # on_tick announces it alone if no socket comes.
            return
        info = conn.info
        tls = (info.tls_version, tuple(info.tls_libraries), info.sni, info.tls_introspected)
        if info.l7_protocol != conn.last_l7 or tls != conn.last_tls:
            first = conn.last_l7 == "unknown" and not conn.last_tls
            conn.last_l7, conn.last_tls = info.l7_protocol, tls
            self._announce(conn)
            if info.l7_protocol != "unknown" or not first:
                self.emit(ConnectionUpdated(info, ts_ns=self.wall(ts)))

    # ------------------------------------------------------------ records

    def on_records(self, batch: list) -> None:
        self.counters["records"] += len(batch)
        self._answered = {}
        for r in batch:
            kind = type(r)
            try:
                if kind is DataChunk:  # nearly every record
                    self.on_data(r)
                elif kind is rec.SocketAddress:
                    self.on_address(r)
                elif kind is rec.SocketConnect:
                    self.on_connect(r)
                elif kind is rec.SocketAccept:
                    self.on_accept(r)
                elif kind is rec.SocketClose:
                    self.on_close(r)
                elif kind is rec.TlsServerName:
                    self.on_sni(r)
                elif kind is rec.ProcessExec:
                    self.on_exec(r)
                elif kind is rec.ProcessFork:
                    self.on_fork(r)
                elif kind is rec.ProcessExit:
                    self.on_exit(r)
                elif kind is rec.CgroupCreated:
                    self.cgroups.created(r.id, r.path)
                    self.counters["cgroup_ids_evicted"] = self.cgroups.evicted
            except Exception:  # a bug shown by one record must not lose the rest of the batch
                self._record_failed()
        self._answered = None

    def _record_failed(self) -> None:
        n = self.counters["record_errors"] = self.counters["record_errors"] + 1
        if n == 1 or n % 1000 == 0:
            log.exception("handling a capture record failed (%d so far, counted in record_errors)", n)

    def on_exec(self, r: rec.ProcessExec) -> None:
        if r.pid == self.own_pid:
            return
        self.processes.pop(r.pid, None)
        if self._answered:
            self._answered.pop(r.pid, None)
        self.forget_process(r.pid)
        if r.process is not None:  # read at exec, by the ring reader: the process may be gone now
            self.remember_process(r.process)
        info = self.process_info(r.pid) or r.process  # the latter where nothing cached it
        if info is not None and _execd_again(info, r):
            # /proc was read once the process had exec'd another program: that
            # one's exec record follows.  This one is described as the kernel
            # saw it, with what an exec does not change from /proc.
            info = dataclasses.replace(
                _minimal_process(r.pid, info.ppid, r.filename, r.comm, r.uid, info.start_time_ns, r.args),
                user=info.user, hostname=info.hostname, container_id=info.container_id, container=info.container,
                pod=info.pod, runtime=info.runtime)
        known = info
        if info is None:  # gone already: describe it from what the kernel said
            self.counters["processes_gone_before_read"] += 1
            info = _minimal_process(r.pid, self.parents.get(r.pid, 0), r.filename, r.comm, r.uid,
                                    self.wall(r.ts_ns), r.args)
        elif not info.exe:  # it exited while /proc was being read: the kernel's filename stands in
            info = dataclasses.replace(info, exe=r.filename, binary=os.path.basename(r.filename) or info.binary,
                                       cmdline=info.cmdline or r.args or r.filename)
        elif not info.cmdline:  # it exited between reading its exe and its command line (a pipeline's `tr`)
            info = dataclasses.replace(info, cmdline=r.args or r.filename)
        if info.container_id is None:  # /proc did not say (or was gone before the cgroup was read)
            found = self.cgroups.container(r.cgroup_id)
            self.counters["cgroup_ids_evicted"] = self.cgroups.evicted
            if found is not None:
                self.counters["containers_from_cgroup_id"] += 1
                info = dataclasses.replace(info, runtime=found[0], container_id=found[1])
        if known is None and info.container_id is None and not info.user and info.uid >= 0:
            # Gone before /proc was read, and in no container as its cgroup
            # says: the host's passwd names its user (a container's could not
            # be read any more).
            info = dataclasses.replace(info, user=host_user_name(info.uid))
        if info is not known:
            self.remember_process(info)  # the enricher's answer for its transactions, not the copy without
        self._remember(info)
        self.announce_process(info, self.wall(r.ts_ns))

    def announce_process(self, info: ProcessInfo, ts_ns: int) -> None:
        """process.started for ``info``, remembered as said (bounded)."""
        announced = self.announced
        announced[info.pid] = None
        announced.move_to_end(info.pid)
        if len(announced) > MAX_CONNECTIONS:
            announced.popitem(last=False)
            self.counters["state_evicted"] += 1
        self.emit(ProcessStarted(info, ts_ns=ts_ns))

    def on_fork(self, r: rec.ProcessFork) -> None:
        # Announced at exec, or lazily at its first connection; the parent is
        # remembered for processes gone before /proc could be read.
        self.parents[r.child_pid] = r.parent_pid
        while len(self.parents) > MAX_CONNECTIONS:
            self.parents.popitem(last=False)
            self.counters["state_evicted"] += 1

    def on_exit(self, r: rec.ProcessExit) -> None:
        if r.pid == self.own_pid:
            return
        # Its open connections end first, while what we knew of it is still
        # known: a killed process's /proc no longer names its executable, and
        # its last transactions said exe "".
        for key in [k for k in self.conns if k[0] == r.pid]:
            self._finish(self.conns.pop(key), r.ts_ns)
        info = self.processes.pop(r.pid, None)
        self.announced.pop(r.pid, None)
        if self._answered:
            self._answered.pop(r.pid, None)
        self.forget_process(r.pid)
        if info is not None:
            self.emit(ProcessStopped(info, exit_code=r.exit_code, ts_ns=self.wall(r.ts_ns)))

    def on_connect(self, r: rec.SocketConnect) -> None:
        if self._is_own(r.pid, r.remote):
            self.counters["own_traffic_skipped"] += 1
            return
        conn = self._new_conn((r.pid, r.fd), r.pid, r.fd, r.ts_ns, "client", r.remote, None)
        early = self.pending_addr.pop((r.pid, r.fd), None)
        if early is not None:
            self._apply_address(conn, early)

    def on_accept(self, r: rec.SocketAccept) -> None:
        if self._is_own(r.pid, r.local, r.remote):
            self.counters["own_traffic_skipped"] += 1
            return
        conn = self._new_conn((r.pid, r.fd), r.pid, r.fd, r.ts_ns, "server", r.remote, r.local)
        if r.local is not None and r.remote is not None:
            self._announce(conn)

    def on_address(self, r: rec.SocketAddress) -> None:
        conn = self.conns.get((r.pid, r.fd))
        if self._is_own(r.pid, r.local, r.remote):
            if conn is not None:
                del self.conns[(r.pid, r.fd)]
            return
        if conn is None:
            if r.origin == "kernel":
                self.pending_addr[(r.pid, r.fd)] = r  # its connect record is on the way
                while len(self.pending_addr) > MAX_PENDING_SNI:
                    self.pending_addr.popitem(last=False)
                    self.counters["state_evicted"] += 1
                return
            # A socket open before the agent started: the server side if its
            # local port is a listening one (direction ingress from the start).
            ts = r.ts_ns or time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            # The assembler still starts "unknown": it joins mid-stream and
            # resynchronises at the next message start.
            conn = self._new_conn((r.pid, r.fd), r.pid, r.fd, ts, "unknown", r.remote, r.local)
            conn.accepted = r.accepted
        self._apply_address(conn, r)

    def _apply_address(self, conn: _Conn, r: rec.SocketAddress) -> None:
        info = conn.info
        late = conn.announced and info.remote is None
        info.local = Address(r.local.ip, r.local.port)
        info.remote = Address(r.remote.ip, r.remote.port)
        info.direction = "ingress" if conn.role == "server" or conn.accepted else classify(r.remote.ip)
        if late and not conn.own:
            # Announced before its addresses came (a TLS stream on it went
            # first): say them now, not only at its close.
            self.emit(ConnectionUpdated(info, ts_ns=self.wall(r.ts_ns)))
        self._announce(conn)

    def on_close(self, r: rec.SocketClose) -> None:
        self.pending_addr.pop((r.pid, r.fd), None)
        if r.ends:
            self._read_to_ends(r)
        conn = self.conns.pop((r.pid, r.fd), None)
        if conn is not None:
            self._finish(conn, r.ts_ns)
        borrower = self.borrowers.pop((r.pid, r.fd), None)
        if borrower is not None:
            # The socket a memory-BIO TLS stream rode on is closed: so is the stream.
            tls = self.conns.pop(borrower, None)
            if tls is not None:
                self._finish(tls, r.ts_ns)

    def _read_to_ends(self, r: rec.SocketClose) -> None:
        """The bytes a stream moved after its last record (shed, or lost) are
        a hole at its end, fed as one before the close ends its messages: a
        response whose tail the capture shed then completes, marked shed, where
        it had looked cut short by the close.  (HTTP/1; HTTP/2 frames in a
        hole cannot be told apart.)"""
        conn = self.conns.get((r.pid, r.fd))
        if conn is None or conn.h2 is not None or not conn.fed:
            return
        info = conn.info
        tls = info.tls_introspected and bool(info.tls_libraries)
        source: Source = "socket"
        if tls:
            last = info.tls_libraries[-1]
            source = "gnutls" if last == "gnutls" else "nodetls" if last == "nodetls" else "openssl"
        shed = r.shedding or conn.shed
        for i, direction in enumerate(rec.DIRECTIONS):
            end = r.ends[(2 if tls else 0) + i] if len(r.ends) == 4 else None
            pos = conn.assembler.position(direction)
            if end is not None and pos is not None and end > pos:
                self.on_data(DataChunk(r.pid, r.pid, r.fd, r.ts_ns, direction, source, end, b"", 0, shed))

    def on_sni(self, r: rec.TlsServerName) -> None:
        conn = self.conns.get((r.pid, r.fd)) if r.fd is not None and r.fd >= 0 else None
        if conn is None:
            conn = self.conns.get((r.pid, "tls", r.ssl_ptr))
        if conn is not None:
            conn.info.sni = r.host
            self._maybe_updated(conn, r.ts_ns)
            return
        self.pending_sni[(r.pid, r.ssl_ptr)] = r.host
        while len(self.pending_sni) > MAX_PENDING_SNI:
            self.pending_sni.popitem(last=False)
            self.counters["state_evicted"] += 1

    def on_data(self, r: rec.DataChunk) -> None:
        # Its fields, read once.
        pid, fd, data, direction, ts, offset, source = r.pid, r.fd, r.data, r.direction, r.ts_ns, r.offset, r.source
        key = (pid, fd) if fd >= 0 else (pid, "tls", r.tls_ref)
        conn = self.conns.get(key)
        if fd >= 0 and source != "socket" and (conn is None or not conn.info.tls_introspected):
            conn = self._fd_found(key, r) or conn
        if conn is not None and fd < 0 and offset == 0 and self._position(conn, direction):
            # A TLS stream known only by its SSL* starts again at offset 0:
            # the kernel forgot its offsets at SSL_free and malloc handed the
            # address to a new session.  The old stream is over.
            del self.conns[key]
            self._finish(conn, ts)
            conn = None
        # Whether this call may change what connection.updated reports (TLS
        # facts here, the protocol below): most chunks change nothing.
        changed = conn is None
        if conn is None:
            if pid == self.own_pid or not data:  # (an end record of a stream never seen)
                return
            conn = self._new_conn(key, pid, fd, ts, "unknown", None, None)
            early = self.pending_addr.pop(key, None) if fd >= 0 else None
            if early is not None:
                self._apply_address(conn, early)
            elif fd < 0:
                self._borrow_socket(conn, key)
        if fd < 0 and not conn.lent:
            self._match_socket(conn, key, r)
        info = conn.info
        tls_source = source != "socket"
        if tls_source:
            conn.tls_ref = r.tls_ref
            if not info.tls_introspected and conn.assembler.upgraded:
                # TLS begun inside a tunnel this connection's plaintext set up
                # (HTTPS through an HTTP proxy: CONNECT, then a handshake): the
                # library's plaintext is a new HTTP stream, from its offset 0.
                conn.assembler = self._assembler(conn.role)
            if not info.tls_introspected or source not in info.tls_libraries:
                info.is_tls = True
                info.tls_introspected = True
                if source not in info.tls_libraries:
                    info.tls_libraries.append(source)
                changed = True
            sni = self.pending_sni.pop((pid, r.tls_ref), None) if self.pending_sni else None
            if sni and not info.sni:
                info.sni = sni
                changed = True
        elif info.is_tls or (conn.h2 is None and conn.assembler.protocol == "unknown" and looks_like_tls(data)):
            # Ciphertext on the socket: read the handshake, never parse it as HTTP.
            info.is_tls = True
            if not info.tls_introspected:
                self._cipher_moved(key, r)
            reader = conn.hello.setdefault(direction, HelloReader())
            hello = reader.feed(data)
            if hello is not None:
                if hello.server_name and not info.sni:
                    info.sni = hello.server_name
                if hello.version:
                    info.tls_version = hello.version
            self._maybe_updated(conn, ts)
            return
        # Bytes moved but not captured count too (past the per-call record
        # limit, shed, sent with sendfile): the offsets say how many.
        expected = self._position(conn, direction)
        moved = len(data) + (offset - expected if expected is not None and offset > expected else 0)
        if direction == "egress":
            info.bytes_sent += moved
        else:
            info.bytes_received += moved
        h2 = conn.h2
        if h2 is None and conn.assembler.protocol in ("unknown", "other") and data:
            # "other" too: an HTTP/2 server sends its SETTINGS before it reads the
            # client's preface, and those bytes are not HTTP/1.
            if data.startswith(HTTP2_PREFACE):
                h2 = self._to_http2(conn, r, direction)
            elif offset > 0 or (tls_source and not conn.fed):
                # Its start not seen (open before the agent, or before its TLS
                # library was attached, whose offsets count from its first call
                # seen, so 0): HTTP/2 if these bytes are frames, and a header
                # block in them says which end sent them.  (From a true start
                # the first plaintext is the preface, or a server's SETTINGS:
                # no header block.)
                sender = joined_sender(data)
                if sender and (conn.role == "unknown" or
                               (sender == "client") == (direction == _REQUEST_DIRECTION[conn.role])):
                    h2 = self._to_http2(conn, r, direction if sender == "client" else _OTHER[direction],
                                        joined=True)
        if h2 is not None:
            for ex in h2.on_data(direction, data, ts, offset, r.shedding):
                self._transaction(conn, ex)
            if h2.resyncs > h2.resyncs_counted:
                self.counters["http2_gaps_read_past"] += h2.resyncs - h2.resyncs_counted
                h2.resyncs_counted = h2.resyncs
            if h2.failure and not h2.counted:
                h2.counted = True
                self.counters["http2_connections_undecodable"] += 1
                # Said at INFO for the first few (a user wondering where requests
                # went finds why); the counter says how many in all.
                level = logging.INFO if self.counters["http2_connections_undecodable"] <= 20 else logging.DEBUG
                log.log(level, "HTTP/2 decoding stopped on %s: %s (its later requests are not shown; counted in "
                        "capture.http2_connections_undecodable)", info.resolve_endpoint() or key, h2.failure)
            self._maybe_updated(conn, ts)
            return
        if not data:
            # Where a call ended whose bytes were not all emitted
            # (probes/common.h, emit_end): a message cut so ends now.
            for ex in conn.assembler.on_data(direction, data, ts, offset, r.shedding):
                self._transaction(conn, ex)
            return
        if conn.role == "unknown":
            if _REQUEST_START.match(data, 0, 8192):
                # A stream we did not see open (the process started it before
                # us, or its TLS library works on memory buffers), or one we
                # joined mid-message: a call that begins with a request says
                # whoever made it is the client.  Pairing from here is sound
                # for non-pipelined peers: no response to an earlier request
                # can still be in flight once the next request has been sent.
                conn.role = "client" if direction == "egress" else "server"
                conn.assembler = self._assembler(conn.role)
                conn.seek_left = -1
                if conn.role == "server":
                    info.direction = "ingress"
        elif not conn.fed and tls_source and not (direction == _REQUEST_DIRECTION[conn.role]
                                                  and _REQUEST_START.match(data, 0, 8192)) \
                and not _h2_settings(data):
            # Not a request first, on a connection seen open: a response (its
            # TLS library was attached after the request went out: a new
            # process, a file attached at its exec), or anything in a message
            # (a body's tail: Node's keep-alive loop was lost whole as
            # "other"), or another protocol.  Joined mid-stream, as above;
            # what is not a response is searched for HTTP only so far.
            conn.role = "unknown"
            conn.assembler = self._assembler("unknown")
            if not data.startswith(b"HTTP/"):
                conn.seek_left = JOIN_SEEK_BYTES
        conn.fed = True
        conn.shed = r.shedding
        exchanges = conn.assembler.on_data(direction, data, ts, offset, r.shedding)
        proto = conn.assembler.protocol
        if conn.seek_left >= 0 and proto == "unknown":
            conn.seek_left -= len(data)
            if conn.seek_left < 0:  # no HTTP in all that: another protocol, read no further
                conn.assembler.not_http()
                proto = "other"
        if proto == "other" and _h2_settings(data):
            # An HTTP/2 server's first write, before it has read the client's
            # preface: not "other" yet (the preface, next, makes it http2).
            proto = "unknown"
        if proto != "unknown":
            info.l7_protocol = proto
            if proto == "http1" and not info.http_host and direction == _REQUEST_DIRECTION.get(conn.role):
                # The Host names the endpoint from the first request on, so the
                # connection.updated that says http1 already carries it (without
                # SNI it would otherwise say the IP until the response completes).
                head_end = data.find(b"\r\n\r\n", 0, 8192)
                found = _HOST_FIELD.search(data, 0, head_end if head_end >= 0 else 8192)
                if found:
                    info.http_host = _host_name(found.group(1).decode("latin-1"))
        if changed or not conn.last_tls or info.l7_protocol != conn.last_l7:
            self._maybe_updated(conn, ts)
        for ex in exchanges:
            self._transaction(conn, ex)

    def _to_http2(self, conn: _Conn, r: rec.DataChunk, client: str, joined: bool = False) -> Http2Assembler:
        """The connection is HTTP/2 from ``r`` on: ``r`` holds the client's
        preface, or (``joined``) frames from the middle of the connection.
        ``client`` is the direction of the client's bytes.  The other
        direction goes on from where it is (a server's SETTINGS may have been
        read already)."""
        here: Direction = "egress" if r.direction == "egress" else "ingress"
        other: Direction = _OTHER[here]
        if conn.role == "unknown":
            conn.role = "client" if client == "egress" else "server"
            if conn.role == "server":
                conn.info.direction = "ingress"
        conn.info.l7_protocol = "http2"
        conn.fed = True
        h2 = conn.h2 = Http2Assembler(
            client_direction="egress" if client == "egress" else "ingress",
            offsets={here: r.offset, other: conn.assembler.position(other)},
            max_body_bytes=self.config.max_body_bytes,
            stream_limit_ns=int(self.config.stream_limit_seconds * 1e9),
            joined=joined,
        )
        self.counters["http2_connections"] += 1
        if joined:
            self.counters["http2_connections_joined"] += 1
        return h2

    @staticmethod
    def _position(conn: _Conn, direction: str) -> int | None:
        h2 = conn.h2
        return conn.assembler.position(direction) if h2 is None else h2.position(direction)  # type: ignore[arg-type]

    def _borrow_socket(self, conn: _Conn, key: tuple) -> None:
        """A TLS library on memory buffers (node, Python's asyncio) shows no
        fd; its ciphertext goes out on a socket we do see.  If the process has
        exactly one TLS socket whose plaintext is still unaccounted for, that
        is this stream's socket.  With several, the thread that moves the
        plaintext names it (:meth:`_match_socket`)."""
        pid = conn.info.pid
        candidates = [c for k, c in self.conns.items()
                      if k[0] == pid and k[1] != "tls" and c.info.is_tls and not c.info.tls_introspected]
        if len(candidates) == 1:
            self._lend(conn, key, candidates[0])

    def _fd_found(self, key: tuple, r: rec.DataChunk) -> _Conn | None:
        """A TLS stream begun with no fd names one now: its socket was not
        known when its calls began (open before the agent, seeded from /proc
        after), or its library had the plaintext buffered.  The kernel carried
        its offsets over (probes/sockets.c, tls_offsets_to_fd), so it goes on
        as that socket's connection: one connection, not one without
        addresses and another from here on."""
        tls_key = (r.pid, "tls", r.tls_ref)
        tls = self.conns.pop(tls_key, None)
        if tls is None:
            return None
        sock = self.conns.get(key)
        if sock is not None:
            if not tls.lent:
                self._lend(tls, tls_key, sock, r.ts_ns)
            if not sock.carried:
                # Each was announced on its own (the stream alone, after its
                # grace): the stream has the addresses now, the socket's id ends.
                sock.info.tls_introspected = True  # its bytes were the stream's, not unread
                self._finish(sock, r.ts_ns)
        else:
            early = self.pending_addr.pop(key, None)
            if early is not None:
                self._apply_address(tls, early)
        if self.borrowers.get(key) == tls_key:
            del self.borrowers[key]
        tls.info.fd = r.fd
        self.conns[key] = tls
        self.counters["tls_fd_found_late"] += 1
        return tls

    def _match_socket(self, conn: _Conn, key: tuple, r: rec.DataChunk) -> None:
        """Which socket an fd-less TLS stream rides on, from the thread that
        moves its plaintext: such a library is driven by one thread at a time,
        which reads ciphertext from the socket, then the plaintext out of the
        library (so: the socket it last read), and writes plaintext into the
        library, then its ciphertext to the socket (so: the socket it writes
        next, :meth:`_cipher_moved`)."""
        thread = (r.pid, r.tid)
        if r.direction == "ingress":
            sock = self.conns.get(self.cipher_read.get(thread, ()))
            if sock is not None and sock.info.is_tls and not sock.info.tls_introspected:
                self._lend(conn, key, sock, r.ts_ns)
        else:
            self.plain_written[thread] = key
            self.plain_written.move_to_end(thread)
            self._bound(self.plain_written)

    def _cipher_moved(self, key: tuple, r: rec.DataChunk) -> None:
        thread = (r.pid, r.tid)
        if r.direction == "egress":
            tls_key = self.plain_written.pop(thread, None)
            tls = self.conns.get(tls_key) if tls_key is not None else None
            if tls is not None and not tls.lent:
                self._lend(tls, tls_key, self.conns[key], r.ts_ns)  # type: ignore[arg-type]
        else:
            self.cipher_read[thread] = key
            self.cipher_read.move_to_end(thread)
            self._bound(self.cipher_read)

    def _bound(self, table: OrderedDict) -> None:
        while len(table) > MAX_CONNECTIONS:
            table.popitem(last=False)
            self.counters["state_evicted"] += 1

    def _lend(self, conn: _Conn, key: tuple, sock: _Conn, ts: int = 0) -> None:
        """``sock`` carries the TLS stream ``conn``: take its addresses (and,
        before any byte was parsed, its role), and let it stand for the
        stream in connection events."""
        conn.lent = True
        sock.info.tls_introspected = True  # now accounted for
        self.borrowers[(conn.info.pid, sock.info.fd)] = key
        self._bound(self.borrowers)
        info = conn.info
        if not conn.announced:
            # One connection, not two: the stream takes the socket's identity
            # (its id, addresses and opening, announced already), and the
            # socket's own events stop.
            shared = sock.info
            shared.is_tls = True
            shared.tls_libraries.extend(lib for lib in info.tls_libraries if lib not in shared.tls_libraries)
            shared.sni = shared.sni or info.sni
            shared.http_host = shared.http_host or info.http_host
            shared.bytes_sent += info.bytes_sent
            shared.bytes_received += info.bytes_received
            shared.transactions += info.transactions
            if info.l7_protocol != "unknown":
                shared.l7_protocol = info.l7_protocol
            conn.info = shared
            conn.announced, conn.last_l7, conn.last_tls = sock.announced, sock.last_l7, sock.last_tls
            sock.carried = sock.announced = True  # announced by the stream, if not already
            if not conn.fed:
                conn.role = sock.role
                conn.assembler = self._assembler(sock.role)
            self._maybe_updated(conn, ts or conn.opened_mono)
            return
        info.local, info.remote = sock.info.local, sock.info.remote
        info.direction, info.tls_version = sock.info.direction, sock.info.tls_version
        info.sni = info.sni or sock.info.sni
        if not conn.fed:
            conn.role = sock.role
            conn.assembler = self._assembler(sock.role)
        if conn.announced:  # its first plaintext went before its socket was known
            self.emit(ConnectionUpdated(info, ts_ns=self.wall(ts)))


    # ------------------------------------------------------------ time

    def on_tick(self, mono_now: int) -> None:
        """Periodic: announce connections whose addresses never came, and let
        assemblers emit streaming responses that passed the time limit."""
        for conn in list(self.conns.values()):
            if not conn.announced and mono_now - conn.opened_mono > OPEN_GRACE_NS \
                    and not self._never_established(conn):
                self._announce(conn)
            try:
                h2 = conn.h2
                for ex in conn.assembler.on_tick(mono_now) if h2 is None else h2.on_tick(mono_now):
                    self._transaction(conn, ex)
            except Exception:  # as for a record: one connection's bug must not stop the others
                self._record_failed()

    def close_all(self) -> None:
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        while self.conns:
            _, conn = self.conns.popitem(last=False)
            self._finish(conn, now)

    # ------------------------------------------------------------ output

    def _finish(self, conn: _Conn, ts: int) -> None:
        if conn.carried:
            return  # its TLS stream reports the connection (and ends with it, on_close)
        if not conn.announced and self._never_established(conn):
            # A connect that was refused or abandoned: no connection to report.
            self.counters["connects_not_established"] += 1
            return
        h2 = conn.h2
        for ex in conn.assembler.on_close(ts) if h2 is None else h2.on_close(ts):
            self._transaction(conn, ex)
        if h2 is not None and h2.streams_dropped:
            self.counters["http2_streams_not_tracked"] += h2.streams_dropped
        info = conn.info
        if info.is_tls and not info.tls_introspected and conn.opened_mono >= self.tls_armed_mono > 0:
            self._unread(conn)
        if conn.own and not conn.announced:
            return  # the agent's own API: closed as it was opened, unseen
        self._announce(conn)
        conn.info.closed_ns = self.wall(ts)
        self.emit(ConnectionClosed(conn.info, ts_ns=conn.info.closed_ns))

    def _unread(self, conn: _Conn) -> None:
        self.counters["tls_connections_unread"] += 1
        process = conn.info.process
        exe = process.exe if process is not None else f"pid {conn.info.pid}"
        if exe not in self.unread_exes and len(self.unread_exes) < 256:
            self.unread_exes.add(exe)
            log.info("%s: a TLS connection closed with no plaintext seen (%s): its TLS library is not one "
                     "the agent reads (Go, BoringSSL, NSS, rustls, a static OpenSSL…), it was attached after "
                     "the connection's last call (a new binary, attached at its exec), or nothing was sent; "
                     "counted in capture.tls_connections_unread", exe, conn.info.resolve_endpoint() or "?")

    @staticmethod
    def _never_established(conn: _Conn) -> bool:
        """A client socket whose connect() has not completed as far as we know:
        no 4-tuple from the kernel (its ESTABLISHED transition) or /proc, and
        no bytes.  connection.opened is for a connect that completed."""
        info = conn.info
        return conn.role == "client" and info.local is None and not conn.fed and not info.is_tls

    def _own_connection(self, conn: _Conn) -> None:
        self.counters["own_traffic_skipped"] += 1
        if not conn.own:
            conn.own = True
            if conn.info.fd >= 0 or conn.tls_ref:
                self.on_own_socket(conn.info.pid, conn.info.fd, conn.tls_ref)

    def _transaction(self, conn: _Conn, ex: HttpExchange) -> None:
        req = ex.request
        if req is None:
            self.counters["unpaired_close"] += 1
            return
        resp = ex.response
        resp_lower: dict = {}
        resp_headers = combined_headers(resp.headers, resp_lower) if resp is not None else {}
        if conn.own or (self.own_marker is not None and resp_lower.get(OWN_MARKER) == self.own_marker):
            self._own_connection(conn)
            return
        self._announce(conn)  # a connection is opened before its first transaction
        info = conn.info
        info.transactions += 1
        info.process = self._process(info.pid) or info.process
        req_lower: dict = {}
        req_headers = combined_headers(req.headers, req_lower)
        # HTTP/2 names the host in its :authority pseudo-header (RFC 9113 §8.3.1).
        host = _text(req_lower.get("host") or req_lower.get(":authority"))
        if host and not info.http_host:
            info.http_host = _host_name(host)
        scheme = "https" if info.is_tls else "http"
        target = req.target
        parts = _absolute_form(target)
        if parts is not None:  # absolute-form (proxies)
            scheme, authority, path = parts
        elif req.method == "CONNECT" and not target.startswith("/"):
            # authority-form (RFC 9110 §7.1): the tunnel's far end, not a path
            authority, path = target, ""
        else:
            authority = host or info.sni or _addr_text(info.remote if info.direction != "ingress" else info.local)
            path = target
        start = ex.start_ns
        # The later of the two ends: a server may answer before it has read the
        # whole request (a refused upload), whose end then closes the exchange.
        end = max(ex.end_ns or 0, ex.request_end_ns or 0) or start
        # The phases follow one another and add up to the duration (HAR's
        # `time` is their sum): a request that ended after its response began
        # (a refused upload; a request whose end was shed and placed at the
        # close) was sending until then, and the receiving is what comes after
        # both.  (They had overlapped: send 58.5 + receive 6.0 ms in a 58.5 ms
        # exchange.)
        timing = {}
        if ex.request_end_ns:
            timing["send_ms"] = _ms(ex.request_end_ns - start)
        if ex.response_start_ns and ex.request_end_ns:
            timing["wait_ms"] = _ms(ex.response_start_ns - ex.request_end_ns)
        elif ex.request_end_ns and not ex.response_start_ns:
            # No answer came (a client that gave up on a hung server, a
            # server that died): it waited from its request's end to the
            # exchange's.  Without this a 1 s hang said {"send_ms": 0.0}, and
            # HAR's `time` 0 ms.
            timing["wait_ms"] = _ms(end - ex.request_end_ns)
        if ex.response_start_ns and ex.end_ns:
            timing["receive_ms"] = _ms(end - max(ex.response_start_ns, ex.request_end_ns or 0))
        client = conn.role != "server" and info.direction != "ingress"
        sent, received = (ex.request_bytes, ex.response_bytes) if client else (ex.response_bytes, ex.request_bytes)
        self.counters["transactions"] += 1
        self.emit(HttpTransaction(
            request_id=ids.new_id(self.wall(start) / 1e9),
            connection=info,
            method=req.method,
            scheme=scheme,
            authority=authority or "",
            path=path,
            http_version=req.version,
            request=HttpMessage(
                headers=req_headers,
                body=req.body,
                body_size=req.body_wire_size,
                content_type=_text(req_lower.get("content-type")),
                content_encoding=req.content_encoding,
                body_truncated=req.body_truncated,
                body_decode_error=req.body_decode_error,
                trailers=combined_headers(req.trailers, {}) if req.trailers else None,
            ),
            status=resp.status if resp is not None else None,
            reason=resp.reason if resp is not None else None,
            response=None if resp is None else HttpMessage(
                headers=resp_headers,
                body=resp.body,
                body_size=resp.body_wire_size,
                content_type=_text(resp_lower.get("content-type")),
                content_encoding=resp.content_encoding,
                body_truncated=resp.body_truncated,
                body_decode_error=resp.body_decode_error,
                trailers=combined_headers(resp.trailers, {}) if resp.trailers else None,
            ),
            start_ns=self.wall(start),
            duration_ms=_ms(end - start),
            bytes_sent=sent,
            bytes_received=received,
            timing=timing,
            error=ex.error,
            partial=ex.partial,
            incomplete=ex.incomplete,
            upgraded=ex.upgraded,
            shed=ex.shed,
            informational=tuple(ex.informational),
            user_agent=_text(req_lower.get("user-agent")),
            ts_ns=self.wall(end),
            response_version=resp.version if resp is not None else None,
        ))


def _h2_settings(data: bytes) -> bool:
    """Whether ``data`` starts with an HTTP/2 SETTINGS frame (RFC 9113 §6.5)."""
    return len(data) >= 9 and data[3] == 4 and data[4] <= 1 and data[5:9] == b"\0\0\0\0" \
        and ((data[0] << 16) | (data[1] << 8) | data[2]) % 6 == 0


def _text(value: str | list[str] | None) -> str | None:
    """A combined header value as one string (only Set-Cookie repeats stay a list)."""
    return value if value is None or type(value) is str else ", ".join(value)


def _addr_text(a: Address | None) -> str:
    if a is None:
        return ""
    return f"[{a.ip}]:{a.port}" if ":" in a.ip else f"{a.ip}:{a.port}"


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _absolute_form(target: str) -> tuple[str, str, str] | None:
    """(scheme, authority, path and query) if ``target`` is an absolute URL (a
    proxy's request), else None.  One urlsplit refuses (``http://[x/``) is
    cut at its first slash, so the URL shown is the target as captured."""
    # Two one-string checks: mypyc makes each a native call, the tuple a generic one (~400 instructions).
    if not (target.startswith("http://") or target.startswith("https://")):
        return None
    try:
        parts = urlsplit(target)
    except ValueError:
        scheme, _, rest = target.partition("://")
        slash = rest.find("/")
        return (scheme, rest, "") if slash < 0 else (scheme, rest[:slash], rest[slash:])
    return parts.scheme, parts.netloc, parts.path + (f"?{parts.query}" if parts.query else "")


def _ms(ns: int) -> float:
    """A duration in milliseconds to the microsecond, rounded half up, never
    negative.  ``round(ns / 1e6, 3)`` was 4 calls of 0.4 µs per transaction
    (float rounding goes through decimal conversion); this is integers."""
    return (ns + 500) // 1000 / 1000 if ns > 0 else 0.0


def _execd_again(info: ProcessInfo, r: rec.ProcessExec) -> bool:
    """Whether ``info``, read from /proc after exec record ``r`` was written,
    is of a later exec of the same process (``sh -c 'exec sleep 1'``: both
    records were read as sleep).  Its command line then is not the one the
    kernel read from this exec's argv; argv the kernel could not read whole
    tells nothing.  (A program that rewrites its argv early, as nginx's master
    does, is then described as it was exec'd: also true.)"""
    return bool(r.args) and not r.args.endswith("…") and bool(info.cmdline) and info.cmdline != r.args


def _minimal_process(pid: int, ppid: int, filename: str, comm: str, uid: int, ts: int,
                     args: str = "") -> ProcessInfo:
    # No user name: a container's passwd is read through /proc/<pid>/root.
    # The command line the kernel read from its execve's argv, if it could.
    return ProcessInfo(
        pid=pid, ppid=ppid, exe=filename, binary=os.path.basename(filename) or comm, cmdline=args or filename,
        uid=uid, user="", hostname=os.uname().nodename, start_time_ns=ts,
    )
