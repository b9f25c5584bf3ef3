"""The one typed event model, and its wire form.

Every event the agent emits is defined here once.  Its JSON (the SSE ``data:``
line, capture files, REST answers) derives from these classes; HAR and the UI
derive from that JSON.  Field names and nesting follow Qtap's DevTools contract
(seed 003) exactly, including the double ``data.data`` of connection and
transaction events and the base64 transaction JSON; fields the seed does not
show are additions, never renames.

An :class:`Envelope` is an event ready for the wire: its type, its JSON body as a
dict (for filters and state) and its SSE frame, encoded once for every client.
Replayed capture files become envelopes without passing through the typed
classes, so live and replayed streams are served by the same code.
"""

from __future__ import annotations

import binascii
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Final, Mapping

import orjson
import pybase64

from qtap_devtools.enrich.model import ContainerInfo, PodInfo, ProcessInfo
from qtap_devtools.mypyc_attrs import mypyc_attr

SYSTEM_CONNECTED: Final = "system.connected"
SYSTEM_DROPPED: Final = "system.dropped"
SYSTEM_DISCONNECTED: Final = "system.disconnected"
PROCESS_STARTED: Final = "process.started"
PROCESS_STOPPED: Final = "process.stopped"
CONNECTION_OPENED: Final = "connection.opened"
CONNECTION_UPDATED: Final = "connection.updated"
CONNECTION_CLOSED: Final = "connection.closed"
HTTP_TRANSACTION: Final = "request.http_transaction"

EVENT_TYPES: Final = (
    SYSTEM_CONNECTED,
    SYSTEM_DROPPED,
    SYSTEM_DISCONNECTED,
    PROCESS_STARTED,
    PROCESS_STOPPED,
    CONNECTION_OPENED,
    CONNECTION_UPDATED,
    CONNECTION_CLOSED,
    HTTP_TRANSACTION,
)


# Events come in bursts: at 20,000 a second about twenty share each
# millisecond.  A transaction has two times (its start, its end), often in
# different milliseconds, asked for in turn: the last two texts are kept, so
# both runs hit.  The second's prefix is formatted once, and a miss joins it to
# a made suffix (a miss had cost ~4 % of the agent's CPU at 10,000 requests a
# second, by perf, with divmod and a format spec).  Tuples, replaced whole, so
# a reader on another thread never sees half an update.
_last_second: tuple[int, str] = (-1, "")
_last_ms: tuple[int, str] = (-1, "")
_other_ms: tuple[int, str] = (-1, "")
_MS_SUFFIX: Final = tuple(f".{ms:03d}Z" for ms in range(1000))


def rfc3339(ns: int) -> str:
    """UTC, millisecond precision, ``Z`` suffix: ``2025-12-12T16:58:10.452Z``."""
    global _last_second, _last_ms, _other_ms
    ms = ns // 1_000_000
    last = _last_ms
    if last[0] == ms:
        return last[1]
    other = _other_ms
    if other[0] == ms:
        return other[1]
    seconds = ms // 1000
    cached = _last_second
    if cached[0] != seconds:
        cached = _last_second = (seconds, datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))
    text = cached[1] + _MS_SUFFIX[ms - seconds * 1000]
    _other_ms = last
    _last_ms = (ms, text)
    return text


def parse_rfc3339(text: str) -> int:
    """Inverse of :func:`rfc3339` (accepts any ISO 8601 offset); ns since epoch."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000) * 1_000_000


def b64_py(data: bytes) -> str:
    """The reference for ``_b64.encode`` (and the fallback without it)."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


try:
    from qtap_devtools import _b64  # type: ignore[attr-defined]
except ImportError:  # not built: correct, slower
    _b64 = None
_small_b64: Final[Callable[[bytes], str]] = b64_py if _b64 is None else _b64.encode  # typed: see http1_parse.head_end
B64_SIMD_BYTES: Final = 16384

try:  # orjson's output for what events hold, and a transaction's frame in one pass
    from qtap_devtools import _jsonw  # type: ignore[attr-defined]
except ImportError:  # not built: orjson's path
    _jsonw = None


def b64(data: bytes) -> str:
    # pybase64 (SIMD) releases the GIL on every call: worth it for a large
    # body, a loss for the usual small one (see _b64.c).
    if len(data) >= B64_SIMD_BYTES:
        return pybase64.b64encode_as_string(data)
    return _small_b64(data)


def now_ns() -> int:
    return time.time_ns()


# --------------------------------------------------------------------------
# The wire form


@mypyc_attr(acyclic=True)  # a frame, JSON-like body and values: in no cycle (mypyc_attrs)
class Envelope:
    """An event ready to send: ``body`` is ``{"data": …, "ts": …}``.

    Immutable by convention.  The frame is the event; ``body`` is its parsed
    form, for filters and state.  Once a transaction has been published its
    body is let go (:meth:`release`) and parsed again from the frame on the
    rare later read (REST, HAR, a filtered resume): held for every event in
    history, the dicts cost more memory than the frames themselves.

    A transaction's frame written in one pass comes with no body at all, only
    ``values``: the event's values along ``_EVENT_LAYOUT``, which the store
    reads by index and from which ``body`` is built if a filter asks.
    """

    __slots__ = ("type", "frame", "ts_ns", "_body", "values")

    def __init__(self, type_: str, body: Mapping[str, Any] | None, frame: bytes, ts_ns: int,
                 values: list[Any] | None = None) -> None:
        self.type = type_
        self.frame = frame  # "event: T\ndata: JSON\n\n", encoded once for all clients
        self.ts_ns = ts_ns
        self._body = body
        self.values = values

    def __repr__(self) -> str:
        return f"Envelope(type={self.type!r}, ts_ns={self.ts_ns}, frame={len(self.frame)} bytes)"

    @property
    def body(self) -> Mapping[str, Any]:
        body = self._body
        if body is None:
            values = self.values
            if values is not None:  # held until release(), as a body made with the frame is
                body = self._body = _unflatten(_EVENT_SLOTS, _with_encoded(values, self.frame))
            else:
                start = self.frame.index(b"\ndata: ") + 7
                body = orjson.loads(memoryview(self.frame)[start:-2])
        return body

    def release(self) -> None:
        """Forget the parsed body; ``body`` parses the frame again if asked."""
        self._body = None
        self.values = None

    def parsed(self) -> "Envelope":
        """This event with its body parsed once and held, for a caller about to
        read it several times (filter, then render); dropped with the copy."""
        return self if self._body is not None else Envelope(self.type, self.body, self.frame, self.ts_ns)

    @classmethod
    def of(cls, type_: str, data: Mapping[str, Any], ts_ns: int) -> "Envelope":
        body = {"data": data, "ts": rfc3339(ts_ns)}
        return cls(type_, body, sse_frame(type_, json_line(body)), ts_ns)

    @classmethod
    def from_wire(cls, type_: str, json_text: bytes | str) -> "Envelope":
        """An event read back from a stream or file; raises ValueError if bad."""
        body = orjson.loads(json_text)
        if not isinstance(body, dict) or "data" not in body:
            raise ValueError('not an event: expected an object with a "data" field')
        ts = body.get("ts")
        ts_ns = 0
        if isinstance(ts, str):
            try:
                ts_ns = parse_rfc3339(ts)
            except ValueError:
                raise ValueError(f'"ts" {ts[:40]!r} is not an RFC 3339 time') from None
        return cls(type_, body, sse_frame(type_, json_line(body)), ts_ns)

    @property
    def inner(self) -> dict[str, Any]:
        """The payload under the seed's double nesting (``data.data``) or ``data``."""
        # dict, not the Mapping ABC: bodies are built here or by orjson, and
        # an ABC check costs microseconds on a path every filter walks.
        data = self.body.get("data")
        if type(data) is not dict:
            return {}
        inner = data.get("data")
        return inner if type(inner) is dict else data


_TX_TYPE: Final = HTTP_TRANSACTION.encode()
_TX_TYPE_ESCAPED: Final = HTTP_TRANSACTION.replace(".", "\\u002e").encode()
_TX_HEAD: Final = b"event: " + _TX_TYPE + b"\ndata: "  # a transaction's frame up to its JSON
_SPLICE_AT: Final = b'"type":"http_transaction","data":"'


def _base64_at(text: bytes) -> int:
    """Where the base64 transaction starts in an event's JSON (empty there, or
    written): found once, and only where it is meant, because inside a JSON
    string every quote is escaped, so this run of quotes cannot occur in one."""
    return text.index(_SPLICE_AT) + len(_SPLICE_AT)


def _with_encoded(values: list[Any], frame: bytes) -> list[Any]:
    """An event's values with its base64 transaction, read back from its frame,
    in the splice slot."""
    at = _base64_at(frame)
    out = list(values)
    out[EV_ENCODED] = frame[at:frame.index(b'"', at)].decode("ascii")
    return out


def json_line(body: Mapping[str, Any]) -> bytes:
    """The one-line JSON of an event.

    Captured text can contain the words ``request.http_transaction`` — the
    command line of the very ``grep`` in seed 003's recipes does, and its
    ``process.started`` event is on the stream.  Such a data line would match
    the recipes' ``grep "request.http_transaction" -A1`` and feed a non-
    transaction to ``base64 -d``, or be counted by ``grep … | wc -l``.  So the
    dot is written as the JSON escape ``\\u002e``: the same string to every
    JSON parser, invisible to grep.  Only ``event:`` lines carry the literal.
    """
    line = None if _jsonw is None else _jsonw.line(body)
    return orjson.dumps(body).replace(_TX_TYPE, _TX_TYPE_ESCAPED) if line is None else line


def sse_frame(type_: str, json_line: bytes) -> bytes:
    """One SSE event.  ``data:`` comes right after ``event:`` and is one line
    (JSON never contains a raw newline), because the seed's recipes read it
    with ``grep … -A1``.  We send no ``id:`` line."""
    # One copy of a frame that can be megabytes (a chain of + makes one per +).
    return b"".join((b"event: ", type_.encode(), b"\ndata: ", json_line, b"\n\n"))


# --------------------------------------------------------------------------
# Shared pieces


def user_json(info: ProcessInfo) -> dict | None:
    """None when no uid is known; the name is None when only the kernel's uid
    is (the process was gone before its passwd could be read)."""
    return {"id": info.uid, "name": info.user or None} if info.uid >= 0 else None


def container_json(c: ContainerInfo | None, *, labels: bool = True) -> dict | None:
    if c is None:
        return None
    out: dict[str, Any] = {"id": c.short_id, "name": c.name, "image": c.image}
    if labels:
        out["labels"] = dict(c.labels)
    out["fullId"] = c.id
    out["runtime"] = c.runtime
    return out


def pod_json(p: PodInfo | None) -> dict | None:
    if p is None:
        return None
    return {
        "name": p.name,
        "namespace": p.namespace,
        "uid": p.uid,
        "labels": dict(p.labels),
        "containerName": p.container_name,
    }


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


# --------------------------------------------------------------------------
# Events


class Event:
    ts_ns: int

    @property
    def type(self) -> str:
        """``request.http_transaction``, …: each class says its own.  (A
        property, not a ClassVar: mypyc cannot compile a dataclass that
        assigns one.)"""
        raise NotImplementedError

    def payload(self) -> dict:
        raise NotImplementedError

    def envelope(self) -> Envelope:
        return Envelope.of(self.type, self.payload(), self.ts_ns)


@dataclass(slots=True)
class SystemConnected(Event):
    version: str
    hostname: str
    kernel: str
    mode: str  # "live" or "replay"
    capture: Mapping[str, Any]
    filters: Mapping[str, Any]
    instance: str = ""  # the prefix of this agent run's event ids
    ts_ns: int = field(default_factory=now_ns)

    @property
    def type(self) -> str:
        return SYSTEM_CONNECTED

    def payload(self) -> dict:
        return {
            "agent": "qtap-devtools",
            "instance": self.instance,
            "version": self.version,
            "hostname": self.hostname,
            "kernel": self.kernel,
            "mode": self.mode,
            "capture": dict(self.capture),
            "filters": dict(self.filters),
        }


@dataclass(slots=True)
class SystemDropped(Event):
    """Sent to one client: how many events it missed, and why."""

    missed: int
    total_missed: int
    ts_ns: int = field(default_factory=now_ns)
    reason: str = "client fell behind; its queue overflowed"

    @property
    def type(self) -> str:
        return SYSTEM_DROPPED

    def payload(self) -> dict:
        return {
            "missed": self.missed,
            "totalMissed": self.total_missed,
            "reason": self.reason,
        }


@dataclass(slots=True)
class SystemDisconnected(Event):
    reason: str
    ts_ns: int = field(default_factory=now_ns)

    @property
    def type(self) -> str:
        return SYSTEM_DISCONNECTED

    def payload(self) -> dict:
        return {"reason": self.reason}


@dataclass(slots=True)
class ProcessStarted(Event):
    process: ProcessInfo
    ts_ns: int = field(default_factory=now_ns)

    @property
    def type(self) -> str:
        return PROCESS_STARTED

    def payload(self) -> dict:
        p = self.process
        out = {
            "binary": p.binary,
            "path": p.exe,
            "pid": p.pid,
            "hostname": p.hostname,
            "user": user_json(p),
            "container": container_json(p.container),
            "pod": pod_json(p.pod),
            "createdAt": rfc3339(p.start_time_ns),
            "ppid": p.ppid,
            "cmdline": p.cmdline,
        }
        return _drop_none(out)


@dataclass(slots=True)
class ProcessStopped(ProcessStarted):
    exit_code: int | None = None

    @property
    def type(self) -> str:
        return PROCESS_STOPPED

    def payload(self) -> dict:
        out = ProcessStarted.payload(self)
        out["exitCode"] = self.exit_code
        return out


@dataclass(slots=True)
class Address:
    ip: str
    port: int

    def json(self) -> dict:
        return {"ip": self.ip, "port": self.port}


@dataclass(slots=True)
class Connection:
    """What we know of one TCP connection of one local process."""

    connection_id: str
    pid: int
    fd: int
    opened_ns: int  # wall clock
    direction: str  # "egress-external" | "egress-internal" | "ingress"
    local: Address | None = None
    remote: Address | None = None
    process: ProcessInfo | None = None
    endpoint_id: str | None = None
    sni: str | None = None
    http_host: str | None = None
    l7_protocol: str = "unknown"  # "http1" | "http2" | "other" | "unknown"
    tls_version: str | None = None
    tls_libraries: list[str] = field(default_factory=list)
    tls_introspected: bool = False
    is_tls: bool = False
    bytes_sent: int = 0
    bytes_received: int = 0
    closed_ns: int | None = None
    transactions: int = 0

    def resolve_endpoint(self) -> str | None:
        """``meta.endpointId``: SNI, else the HTTP Host, else the peer's IP."""
        if self.direction == "ingress":
            # For a server the endpoint is the name clients asked it for.
            return self.sni or self.http_host or (self.local.ip if self.local else None)
        return self.sni or self.http_host or (self.remote.ip if self.remote else None)

    def _side(self, address: Address | None, local: bool) -> dict:
        out: dict[str, Any] = {"address": address.json() if address else None}
        p = self.process
        if local and p is not None:
            out.update(
                hostname=p.hostname,
                exe=p.exe,
                user=p.user,
                pid=p.pid,
                container=container_json(p.container, labels=False),
                pod=pod_json(p.pod),
            )
        elif local:
            out["pid"] = self.pid
        return _drop_none(out)

    def tags(self) -> dict[str, list[str]]:
        p = self.process
        tags: dict[str, list[str]] = {}
        if p is not None:
            tags["bin"] = [p.binary]
            tags["host"] = [p.hostname]
            labels = dict(p.container.labels) if p.container else {}
            if p.pod is not None:
                labels.update(p.pod.labels)
            if labels:
                tags["label"] = [f"{k}={v}" for k, v in sorted(labels.items())]
        return tags

    def json(self) -> dict:
        """The seed's connection object (``data.data`` of connection events)."""
        # The initiator is the source: for an accepted socket that is the peer.
        ingress = self.direction == "ingress"
        source = self._side(self.remote if ingress else self.local, local=not ingress)
        destination = self._side(self.local if ingress else self.remote, local=ingress)
        meta: dict[str, Any] = {
            "connectionId": self.connection_id,
            "endpointId": self.resolve_endpoint(),
            "tlsProbeTypesDetected": list(self.tls_libraries),
            "tlsProbeIntrospected": self.tls_introspected,
        }
        out: dict[str, Any] = {
            "meta": meta,
            "direction": self.direction,
            "socketProtocol": "tcp",
            "l7Protocol": self.l7_protocol,
            "tlsVersion": self.tls_version,
            "source": source,
            "destination": destination,
            "tags": self.tags(),
            "pid": self.pid,
            "openedAt": rfc3339(self.opened_ns),
            "bytesSent": self.bytes_sent,
            "bytesReceived": self.bytes_received,
            "transactions": self.transactions,
        }
        if self.sni:
            meta["sni"] = self.sni
        if self.closed_ns is not None:
            out["closedAt"] = rfc3339(self.closed_ns)
            out["durationMs"] = max(0, (self.closed_ns - self.opened_ns) // 1_000_000)
        return out


@dataclass(slots=True)
class ConnectionEvent(Event):
    connection: Connection
    ts_ns: int = field(default_factory=now_ns)

    @property
    def type(self) -> str:
        return CONNECTION_OPENED

    def payload(self) -> dict:
        return {"data": self.connection.json()}


@dataclass(slots=True)
class ConnectionOpened(ConnectionEvent):
    @property
    def type(self) -> str:
        return CONNECTION_OPENED


@dataclass(slots=True)
class ConnectionUpdated(ConnectionEvent):
    @property
    def type(self) -> str:
        return CONNECTION_UPDATED


@dataclass(slots=True)
class ConnectionClosed(ConnectionEvent):
    @property
    def type(self) -> str:
        return CONNECTION_CLOSED


@mypyc_attr(acyclic=True)  # headers, bytes, scalars
@dataclass(slots=True)
class HttpMessage:
    """One side of a transaction as the wire form shows it."""

    headers: Mapping[str, Any]
    body: bytes
    body_size: int  # on the wire, before content decoding
    content_type: str | None = None
    content_encoding: str | None = None
    body_truncated: bool = False
    body_decode_error: str | None = None
    trailers: Mapping[str, Any] | None = None  # a chunked body's trailer fields

    # __init__ written out, as in assemble/model.py: generated, it would run interpreted.
    def __init__(
        self,
        headers: Mapping[str, Any], body: bytes, body_size: int, content_type: str | None = None,
        content_encoding: str | None = None, body_truncated: bool = False,
        body_decode_error: str | None = None, trailers: Mapping[str, Any] | None = None,
    ) -> None:
        self.headers = headers
        self.body = body
        self.body_size = body_size
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.body_truncated = body_truncated
        self.body_decode_error = body_decode_error
        self.trailers = trailers

    def add_values(self, out: list[Any]) -> None:
        """This message's values in ``_MESSAGE_SLOTS`` order, appended to the transaction's."""
        headers, trailers = self.headers, self.trailers
        out.append(self.content_type)
        out.append(headers if type(headers) is dict else dict(headers))  # the pipeline's own dict: no copy
        out.append(self.body)
        out.append(self.body_size)
        out.append(len(self.body))
        out.append(self.body_truncated)
        out.append(self.content_encoding or None)
        out.append(self.body_decode_error or None)
        out.append((trailers if type(trailers) is dict else dict(trailers)) if trailers else None)


# --------------------------------------------------------------------------
# A transaction's JSON and its event's, slot by slot
#
# Each slot is a dotted key path, in the order the keys are written; "?" marks
# a key written only when its value is not None, ":b64" a bytes value written
# as base64, ":splice" the place of the base64 transaction in the event.
# transaction_json and the event's body build the dicts from the values;
# _jsonw writes the same bytes straight from them (no dicts), for the frame.

# HttpTransaction(user_agent=) left out: the request's headers are looked up.
_LOOK_UP: Final = "\0look it up"
_MESSAGE_SLOTS: Final = ("content_type", "headers", "body:b64", "body_size", "body_captured", "body_truncated",
                         "content_encoding?", "body_decode_error?", "trailers?")


def _tx_layout(response: bool) -> tuple[str, ...]:
    return (
        *(f"metadata.{k}" for k in (
            "process_id", "process_exe", "container_name", "container_image", "bytes_sent", "bytes_received",
            "connection_id", "endpoint_id", "container_id", "pod_name", "pod_namespace", "user", "hostname",
            "tls_version", "tls_library", "local_address", "remote_address")),
        *(f"request.{k}" for k in (
            "method", "url", "scheme", "path", "authority", "protocol", "http_version", "user_agent", *_MESSAGE_SLOTS)),
        *((f"response.{k}" for k in ("status", "reason", "http_version", *_MESSAGE_SLOTS)) if response else ("response",)),
        # Whole milliseconds, as the seed (typed clients read an integer); the precise figure is duration_us.
        "duration_ms", "duration_us", "direction", "started_at", "timing",
        # Flags only when set (most transactions have none).
        "error?", "partial?", "incomplete?", "upgraded?", "shed?", "informational?",
    )


# The summary: what tables and filters read without decoding the transaction.
_SUMMARY_KEYS: Final = (
    "request_method", "request_host", "request_scheme", "request_protocol", "response_status", "duration_ms",
    "container_name", "process_exe", "direction",
    # Additions to the seed's.
    "request_path", "request_url", "request_http_version", "duration_us", "response_content_type",
    "request_body_size", "response_body_size", "process_pid", "container_id", "pod_name", "error",
)
_EVENT_LAYOUT: Final = (
    # "data" right after "type": _base64_at finds it by the pair.
    *(f"data.data.{k}" for k in ("connectionId", "endpointId", "requestId", "type", "data:splice", "contentType")),
    *(f"data.data.summary.{k}" for k in _SUMMARY_KEYS),
    "ts",
)
# Where the store reads an event's values (Envelope.values).
EV_ENDPOINT: Final = _EVENT_LAYOUT.index("data.data.endpointId")
EV_REQUEST_ID: Final = _EVENT_LAYOUT.index("data.data.requestId")
EV_ENCODED: Final = _EVENT_LAYOUT.index("data.data.data:splice")
EV_METHOD: Final = _EVENT_LAYOUT.index("data.data.summary.request_method")
EV_HOST: Final = _EVENT_LAYOUT.index("data.data.summary.request_host")
EV_STATUS: Final = _EVENT_LAYOUT.index("data.data.summary.response_status")
EV_PATH: Final = _EVENT_LAYOUT.index("data.data.summary.request_path")
EV_DURATION_US: Final = _EVENT_LAYOUT.index("data.data.summary.duration_us")
EV_PID: Final = _EVENT_LAYOUT.index("data.data.summary.process_pid")
EV_DIRECTION: Final = _EVENT_LAYOUT.index("data.data.summary.direction")

LITERAL: Final = 0  # the template's slot kinds, as _jsonw.c names them
VALUE: Final = 1
OPTIONAL: Final = 2
BASE64: Final = 3
SPLICE: Final = 4

# A slot parsed: the path of objects it is in, its key, optional, its kind.
_Slot = tuple[tuple[str, ...], str, bool, int]


def _parse(layout: tuple[str, ...]) -> list[_Slot]:
    out = []
    for slot in layout:
        optional = slot.endswith("?")
        name, _, suffix = slot.rstrip("?").partition(":")
        *path, key = name.split(".")
        out.append((tuple(path), key, optional, {"": VALUE, "b64": BASE64, "splice": SPLICE}[suffix]))
    return out


def _compile(slots: list[_Slot]) -> tuple[tuple[bytes, ...], bytes]:
    """The JSON text before each value (with the kind of value), and after the last."""
    prefixes: list[bytes] = []
    kinds = bytearray()
    at: tuple[str, ...] = ()  # the object path we are in
    text, first = "{", True  # literal text not yet placed; at the first key of the object
    for path, key, optional, kind in slots:
        common = 0
        while common < min(len(at), len(path)) and at[common] == path[common]:
            common += 1
        if len(at) > common:
            text += "}" * (len(at) - common)
            first = False
        for name in path[common:]:
            text += ("" if first else ",") + orjson.dumps(name).decode() + ":{"
            first = True
        at = path
        key_text = ("" if first else ",") + orjson.dumps(key).decode() + ":"
        if optional:
            # Skipped with its value: so it carries no structure, and is never
            # first in its object (the next key's comma assumes a key before it).
            assert not first and kind == VALUE, key
            if text:
                prefixes.append(text.encode())
                kinds.append(LITERAL)
            prefixes.append(key_text.encode())
            kinds.append(OPTIONAL)
            text = ""
        else:
            prefixes.append((text + key_text).encode())
            kinds.append(kind)
            text = ""
        first = False
    prefixes.append(("}" * len(at) + "}").encode())
    kinds.append(LITERAL)
    return tuple(prefixes), bytes(kinds)


def _unflatten(slots: list[_Slot], values: list[Any]) -> dict:
    out: dict[str, Any] = {}
    for (path, key, optional, kind), value in zip(slots, values):
        if optional and value is None:
            continue
        d = out
        for name in path:
            inner = d.get(name)
            if inner is None:
                inner = d[name] = {}
            d = inner
        d[key] = b64(value) if kind == BASE64 else value
    return out


_TX_SLOTS: Final = _parse(_tx_layout(True))
_TX_SLOTS_NO_RESPONSE: Final = _parse(_tx_layout(False))
_TX_TEMPLATE: Final = _compile(_TX_SLOTS)
_TX_TEMPLATE_NO_RESPONSE: Final = _compile(_TX_SLOTS_NO_RESPONSE)
_EVENT_SLOTS: Final = _parse(_EVENT_LAYOUT)
_EVENT_TEMPLATE: Final = _compile(_EVENT_SLOTS)
_EVENT_PREFIXES: Final = _EVENT_TEMPLATE[0]  # passed as themselves: a starred call builds a tuple each time
_EVENT_KINDS: Final = _EVENT_TEMPLATE[1]
# Bound once: a module's attribute is a dictionary lookup at every call.
_tx_frame: Final[Callable[..., bytes | None] | None] = None if _jsonw is None else _jsonw.tx_frame
_FRAME_BODY_BYTES: Final = 8192  # past this, bodies go the path whose base64 lets the GIL go (b64)
_TX_ENDPOINT: Final = _tx_layout(True).index("metadata.endpoint_id")  # the same in both layouts
_TX_URL: Final = _tx_layout(True).index("request.url")


def percent_encoded(path: str) -> str:
    """A target with bytes past ASCII (not allowed on the wire, but sent, e.g.
    raw UTF-8): the URL percent-encodes them as a browser does, so it is the
    one requested and Copy-as-cURL or a HAR replay sends the same bytes.  The
    heads are read as Latin-1, one character per byte."""
    out = []
    for c in path:
        if c < "\x80":
            out.append(c)
        else:
            out.extend(f"%{b:02X}" for b in c.encode("latin-1" if c <= "\xff" else "utf-8"))
    return "".join(out)


@dataclass(slots=True)
class HttpTransaction(Event):
    request_id: str
    connection: Connection
    method: str
    scheme: str  # "https" or "http"
    authority: str
    path: str
    http_version: str
    request: HttpMessage
    status: int | None
    reason: str | None
    response: HttpMessage | None
    start_ns: int  # wall clock of the first request byte
    duration_ms: float
    bytes_sent: int
    bytes_received: int
    timing: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None
    partial: bool = False
    incomplete: bool = False
    upgraded: bool = False
    shed: bool = False  # a body cut on purpose: the agent was behind or over its capture rate
    informational: tuple[int, ...] = ()
    user_agent: str | None = None  # the request's User-Agent; None: it has none
    ts_ns: int = field(default_factory=now_ns)
    response_version: str | None = None

    # __init__ written out, as in assemble/model.py: generated, it would run interpreted.
    def __init__(
        self,
        request_id: str, connection: Connection, method: str, scheme: str, authority: str, path: str,
        http_version: str, request: HttpMessage, status: int | None, reason: str | None,
        response: HttpMessage | None, start_ns: int, duration_ms: float, bytes_sent: int,
        bytes_received: int, timing: Mapping[str, float] | None = None, error: str | None = None,
        partial: bool = False, incomplete: bool = False, upgraded: bool = False, shed: bool = False,
        informational: tuple[int, ...] = (), user_agent: str | None = _LOOK_UP, ts_ns: int | None = None,
        response_version: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.connection = connection
        self.method = method
        self.scheme = scheme
        self.authority = authority
        self.path = path
        self.http_version = http_version
        self.request = request
        self.status = status
        self.reason = reason
        self.response = response
        self.start_ns = start_ns
        self.duration_ms = duration_ms
        self.bytes_sent = bytes_sent
        self.bytes_received = bytes_received
        self.timing = {} if timing is None else timing
        self.error = error
        self.partial = partial
        self.incomplete = incomplete
        self.upgraded = upgraded
        self.shed = shed
        self.informational = informational
        # The pipeline has it at hand (None when there is none); other makers leave it out.
        self.user_agent = header(request.headers, "user-agent") if user_agent is _LOOK_UP else user_agent
        self.ts_ns = now_ns() if ts_ns is None else ts_ns
        self.response_version = response_version  # the status line's: a server may answer 1.0 to 1.1

    @property
    def type(self) -> str:
        return HTTP_TRANSACTION

    @property
    def url(self) -> str:
        # OPTIONS *: the target URI has an empty path (RFC 9112 §3.2.4).
        path = self.path
        if not path.isascii():
            path = percent_encoded(path)
        return f"{self.scheme}://{self.authority}{path if path != '*' else ''}"

    def values(self) -> list[Any]:
        """The transaction JSON's values in ``_tx_layout(self.response is not None)`` order."""
        c = self.connection
        p = c.process
        container = p.container if p else None
        pod = p.pod if p else None
        local, remote = c.local, c.remote
        req = self.request
        values: list[Any] = [
            str(c.pid),
            p.exe if p else None,
            container.name if container else None,
            container.image if container else None,
            self.bytes_sent,
            self.bytes_received,
            c.connection_id,
            c.resolve_endpoint(),
            container.short_id if container else None,
            pod.name if pod else None,
            pod.namespace if pod else None,
            (p.user or None) if p else None,
            p.hostname if p else None,
            c.tls_version,
            c.tls_libraries[0] if c.tls_libraries else None,
            {"ip": local.ip, "port": local.port} if local else None,
            {"ip": remote.ip, "port": remote.port} if remote else None,
            self.method,
            self.url,
            self.scheme,
            self.path,
            self.authority,
            "http2" if self.http_version == "HTTP/2" else "http1",
            self.http_version,
            self.user_agent,
        ]
        # Appended one by one: a list or tuple made to extend this one costs more.
        req.add_values(values)
        response = self.response
        if response is None:
            values.append(None)
        else:
            values.append(self.status)
            values.append(self.reason)
            values.append(self.response_version)
            response.add_values(values)
        timing = self.timing
        values.append(round_even(self.duration_ms))
        values.append(round_even(self.duration_ms * 1000))
        values.append(c.direction)
        values.append(rfc3339(self.start_ns))
        values.append(timing if type(timing) is dict else dict(timing))
        values.append(self.error or None)
        values.append(True if self.partial else None)
        values.append(True if self.incomplete else None)
        values.append(True if self.upgraded else None)
        values.append(True if self.shed else None)
        values.append(list(self.informational) if self.informational else None)
        return values

    def transaction_json(self) -> dict:
        """The full transaction: the base64 ``data`` field of the event."""
        return _unflatten(_TX_SLOTS if self.response is not None else _TX_SLOTS_NO_RESPONSE, self.values())

    def encoded(self) -> str:
        """The base64 of the transaction's JSON: the event's ``data.data``."""
        return b64(orjson.dumps(self.transaction_json()))

    def payload(self) -> dict:
        return _unflatten(_EVENT_SLOTS, self.event_values(self.encoded()))["data"]

    def event_values(self, encoded: str) -> list[Any]:
        """The event's values in ``_EVENT_LAYOUT`` order, ``encoded`` the base64 transaction."""
        return self._event_values(encoded, self.connection.resolve_endpoint(), self.url)

    def _event_values(self, encoded: str, endpoint: str | None, url: str) -> list[Any]:
        c = self.connection
        p = c.process
        container = p.container if p else None
        pod = p.pod if p else None
        response = self.response
        return [
            c.connection_id,
            endpoint,
            self.request_id,
            "http_transaction",
            encoded,
            "application/json",
            # the summary
            self.method,
            self.authority,
            self.scheme,
            "http2" if self.http_version == "HTTP/2" else "http1",
            self.status,
            round_even(self.duration_ms),
            container.name if container else None,
            p.exe if p else None,
            c.direction,
            self.path,
            url,
            self.http_version,
            round_even(self.duration_ms * 1000),  # duration_ms is whole ms: 0 for most on loopback
            response.content_type if response else None,
            self.request.body_size,
            response.body_size if response else 0,
            c.pid,
            container.short_id if container else None,
            pod.name if pod else None,
            self.error,
            rfc3339(self.ts_ns),
        ]

    def envelope(self) -> Envelope:
        """The same frame as ``Envelope.of`` makes of :meth:`payload`, made in
        one pass by ``_jsonw`` where it can (see _jsonw.c), else spliced."""
        response = self.response
        tx_frame = _tx_frame
        if tx_frame is not None and len(self.request.body) + (len(response.body) if response else 0) <= _FRAME_BODY_BYTES:
            values = self.values()
            # The endpoint and URL as the transaction has them: made once.
            event_values = self._event_values("", values[_TX_ENDPOINT], values[_TX_URL])
            prefixes, kinds = _TX_TEMPLATE if response is not None else _TX_TEMPLATE_NO_RESPONSE
            frame = tx_frame(_TX_HEAD, prefixes, kinds, values, _EVENT_PREFIXES, _EVENT_KINDS, event_values)
            if frame is not None:
                return Envelope(HTTP_TRANSACTION, None, frame, self.ts_ns, event_values)
        return self._spliced()

    def _spliced(self) -> Envelope:
        """The frame from orjson's output: the base64 transaction is most of
        it and needs no JSON escaping (nor json_line's grep guard: its
        alphabet has no dot), so the JSON around it is serialized alone and
        the base64 copied in once."""
        encoded = self.encoded()
        values = self.event_values("")
        line = json_line(_unflatten(_EVENT_SLOTS, values))
        at = _base64_at(line)
        frame = b"".join((_TX_HEAD, line[:at], encoded.encode("ascii"), line[at:], b"\n\n"))
        return Envelope(HTTP_TRANSACTION, None, frame, self.ts_ns, values)


def round_even(x: float) -> int:
    """``round(x)``, natively: the builtin is a generic call from compiled code
    (~500 instructions; four per transaction).  Halves go to the even
    neighbour; NaN and infinity raise as ``round`` does (through ``int``)."""
    whole = int(x)  # toward zero; exact, as is the fraction below
    rest = x - whole
    if rest > 0.5 or (rest == 0.5 and whole & 1):
        return whole + 1
    if rest < -0.5 or (rest == -0.5 and whole & 1):
        return whole - 1
    return whole


def header(headers: Mapping[str, Any], name: str) -> str | None:
    """A header's value from a combined-headers dict, matched case-insensitively."""
    for key, value in headers.items():
        if key.lower() == name:
            return value if isinstance(value, str) else ", ".join(value)
    return None


def decode_transaction(envelope_body: Mapping[str, Any]) -> dict | None:
    """The full transaction JSON of a ``request.http_transaction`` body, or
    None if it has none (or it is not a JSON object: a capture file's)."""
    try:
        inner = envelope_body["data"]["data"]
        tx = orjson.loads(pybase64.b64decode(inner["data"], validate=True))
    except (KeyError, TypeError, ValueError):
        return None
    return tx if isinstance(tx, dict) else None
