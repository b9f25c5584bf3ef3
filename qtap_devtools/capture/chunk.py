"""A data record's typed form: compiled by mypyc, so the pipeline reads its
fields as a struct's (as a plain class, each of the 17 reads the pipeline
made of every record was an attribute lookup; see ``records`` for the other
kinds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qtap_devtools.mypyc_attrs import mypyc_attr

Direction = Literal["egress", "ingress"]
Source = Literal["socket", "openssl", "gnutls", "nodetls"]


@mypyc_attr(acyclic=True)  # ints, str, bytes: in no cycle (mypyc_attrs)
@dataclass(slots=True)  # for __eq__ and __repr__; __init__ written out: generated, it would run interpreted
class DataChunk:
    pid: int
    tid: int
    fd: int  # -1 when the TLS library's fd is not known (e.g. node's memory BIO)
    ts_ns: int
    direction: Direction
    source: Source
    offset: int  # of data[0] within (pid, fd, direction, tls-or-not)
    data: bytes
    tls_ref: int = 0  # SSL* / gnutls session; 0 for socket data
    # Written while the probes were shedding (probes/common.h): a gap before it
    # may be bytes they left out on purpose, not lost ones.
    shedding: bool = False

    def __init__(self, pid: int, tid: int, fd: int, ts_ns: int, direction: Direction, source: Source, offset: int,
                 data: bytes, tls_ref: int = 0, shedding: bool = False) -> None:
        self.pid = pid
        self.tid = tid
        self.fd = fd
        self.ts_ns = ts_ns
        self.direction = direction
        self.source = source
        self.offset = offset
        self.data = data
        self.tls_ref = tls_ref
        self.shedding = shedding

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


def make(pid: int, tid: int, fd: int, ts_ns: int, direction: Direction, source: Source, offset: int, data: bytes,
         tls_ref: int, shedding: bool) -> DataChunk:
    """``DataChunk(...)``, for the C ring reader: a compiled function takes its
    arguments off the call's stack and calls the constructor directly, where
    calling the class packs and parses them (~680 instructions more a record)."""
    return DataChunk(pid, tid, fd, ts_ns, direction, source, offset, data, tls_ref, shedding)
