"""Capture files: the SSE stream's own bytes, written and read back.

A file written by ``--output`` and one saved with ``curl -sN …/events > f`` are
the same format, so either can be replayed.  Reading is forgiving: a corrupt or
truncated record is reported with its line number and skipped; only a file that
cannot be opened at all is an error.

A file is untrusted input, and valid JSON is not yet a valid event: a record
whose fields have the wrong JSON types (a string where the store, the filters
or the page read an object) is a bad record too, caught here once rather than
as an exception wherever the field is read.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import orjson

from qtap_devtools.events import Envelope, SystemDropped
from qtap_devtools.threads import service_thread

log = logging.getLogger(__name__)

CLOSE_JOIN_SECONDS = 0.2
EPISODE_LOG_SECONDS = 60.0  # a file's trouble starting is said at most this often
MAX_LINE = 64 << 20  # one event's JSON; larger is a corrupt file, not an event


class NotACaptureFile(ValueError):
    """A file with bad records and not one event."""


@dataclass(frozen=True, slots=True)
class BadRecord:
    line: int
    reason: str


class CaptureWriter:
    """Appends each event's SSE frame to a file, from a thread of its own.

    The event loop only queues a frame (``write`` never blocks): a file on a
    slow disk, or a pipe whose reader stalls (``--output >(gzip > f)``), would
    otherwise stop the stream, the REST API and the signal handlers with it.
    The queue holds at most ``max_pending_bytes``; past that an event is not
    saved and is counted (``dropped``).  Each frame is written whole and
    unbuffered, so a crash loses only what was still queued.
    """

    # Two of the largest events (cli.MAX_BODY_BYTES: ~57 MiB each), a
    # transaction's two ends, queue together.
    def __init__(self, path: Path, max_pending_bytes: int = 128 << 20) -> None:
        self.path = path
        torn = _ends_inside_a_frame(path)
        self._fh: BinaryIO = open(path, "ab", buffering=0)
        self.max_pending_bytes = max_pending_bytes
        self.written = 0
        self.errors = 0  # frames a write failed for (a full disk)
        self.dropped = 0  # frames not saved because the file fell behind
        self._marked = 0  # of dropped + errors, how many a system.dropped in the file has said
        # The file ends inside a frame (a failed write cut it, or an earlier
        # run was killed mid-write): the next frame starts after a blank line.
        self._torn = torn
        self._failing = _Episode(path)  # writes fail (a full disk)
        self._behind = _Episode(path)  # the queue is full (a slow disk or pipe)
        self._queue: deque[bytes] = deque()
        self._pending = 0  # bytes queued or being written
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="qtap-file", daemon=True)
        self._thread.start()

    def write(self, *parts: bytes) -> None:
        """Queue one event's frame, whole or in pieces (``Published.parts()``)."""
        frame = parts[0] if len(parts) == 1 else b"".join(parts)
        with self._cond:
            if self._closing:
                return
            if self._pending and self._pending + len(frame) > self.max_pending_bytes:
                self.dropped += 1
                self._behind.fail(f"writing fell {self.max_pending_bytes >> 20} MiB behind; events not saved "
                                  "are counted (file_events_dropped)", self.dropped)
                return
            self._queue.append(frame)
            self._pending += len(frame)
            self._cond.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued frame is written (or failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout)

    def close(self, timeout: float = 2.0) -> int:
        """Write what is queued, waiting at most ``timeout``, and close the file.
        Returns how many queued events were not written by then (also counted
        in ``dropped``): a pipe whose reader stalled must not hold up the exit."""
        self.flush(timeout)
        with self._cond:
            self._closing = True
            unwritten = len(self._queue)
            self._queue.clear()
            self.dropped += unwritten
            self._cond.notify_all()
        self._thread.join(CLOSE_JOIN_SECONDS if unwritten else timeout)  # a write in progress may never return
        if not self._thread.is_alive():
            self._fh.close()
        return unwritten

    def _run(self) -> None:
        service_thread("qtap-file")  # an idle writer would fall behind under load
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
                frame = self._queue.popleft()
            self._write(frame)
            with self._cond:
                caught_up = self._pending == len(frame)
                if caught_up:
                    # Caught up: only now is it "writing again".  (Said when a
                    # smaller event merely fitted the full queue, a pipe that
                    # had not taken a byte more was said to write again.)
                    self._behind.recover(self.dropped)
            if caught_up:
                self._mark_lost()  # before the frame counts as written: flush() waits for it
            with self._cond:
                self._pending -= len(frame)
                self._cond.notify_all()

    def _mark_lost(self) -> None:
        """Say in the file how many events it does not have (dropped while
        it was behind, or a write failed), as a system.dropped, as a slow
        client's stream says it: counted only in the agent's stats, the file
        read back later as if whole (replay and har tell it now)."""
        lost = self.dropped + self.errors
        if lost <= self._marked:
            return
        note = SystemDropped(missed=lost - self._marked, total_missed=lost,
                             reason="the capture file could not take them (it fell behind, or writes to it failed)")
        if self._write(note.envelope().frame, event=False):
            self._marked = lost

    def _write(self, frame: bytes, event: bool = True) -> bool:
        """A failed write is counted (``errors``) and logged once.  A frame cut
        by a failure is ended with a blank line before the next frame that can
        be written, so it reads back as one bad record and not as the ruin of
        the event after it."""
        view, done = memoryview(b"\n\n" + frame if self._torn else frame), 0
        try:
            while done < len(view):
                done += self._fh.write(view[done:]) or 0
        except OSError as exc:
            if done:
                self._torn = True
            if event:  # (a note of our own that fails is tried again at the next catch-up)
                self.errors += 1
                self._failing.fail(f"{exc}; events not saved are counted (file_write_errors)", self.errors)
            return False
        self._torn = False
        if event:
            self.written += 1
            self._failing.recover(self.errors)
        return True


class _Episode:
    """Says when a trouble with the file starts and when it ends, with how
    many events it cost: a full disk that frees up again is otherwise silent
    from its first error on.  At most one start a minute is said (a nearly full
    disk can fail and succeed by turns); an end only after a start was said."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.on = False
        self._said_at = -EPISODE_LOG_SECONDS
        self._said = False  # this episode's start was logged
        self._count_before = 0

    def fail(self, why: str, count: int) -> None:
        if self.on:
            return
        self.on, self._count_before = True, count - 1
        now = time.monotonic()
        self._said = now - self._said_at >= EPISODE_LOG_SECONDS
        if self._said:
            self._said_at = now
            log.error("capture file %s: %s", self.path, why)

    def recover(self, count: int) -> None:
        if not self.on:
            return
        self.on = False
        if self._said:
            lost = count - self._count_before
            log.warning("capture file %s: writing again; %d event%s not saved", self.path, lost,
                        "" if lost == 1 else "s")


def _ends_inside_a_frame(path: Path) -> bool:
    """Whether ``path`` is a regular file, not empty, that does not end with
    a frame's blank line.  (A pipe is not read: it is a stream of our own.)"""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return False
        with open(path, "rb") as fh:
            fh.seek(max(0, st.st_size - 2))
            tail = fh.read(2)
    except OSError:
        return False
    return not tail.endswith(b"\n\n") and tail != b"\n"


GZIP_MAGIC = b"\x1f\x8b"


def read_events(path: Path) -> Iterator[Envelope | BadRecord]:
    """Envelopes in file order, with a :class:`BadRecord` for each bad one.
    A gzip file (``--output >(gzip > f)``) is read through gzip.

    Raises OSError only if the file cannot be opened.
    """
    with open(path, "rb") as raw:
        if raw.peek(2)[:2] != GZIP_MAGIC:
            yield from parse_stream(raw)
            return
        # Decompressed here, not by gzip.GzipFile: its error, raised inside
        # readline, lost the event the parser still held and what the failing
        # read had decoded (a member corrupt early in a file: the file refused
        # whole), and it read nothing past the damage, where the next run's
        # member (`--output >(gzip >> f.gz)`) may be whole.
        src = _Gunzip(raw)
        yield from parse_stream(io.BufferedReader(src, 1 << 16))
        if src.damage:
            again = f"; reading went on at the next gzip member {src.resumed} time{'s' if src.resumed > 1 else ''}" \
                if src.resumed else ""
            yield BadRecord(0, f"the gzip stream ends early or is damaged ({src.damage[0]}); what came before it is "
                               f"kept{again}")


GZIP_MEMBER = b"\x1f\x8b\x08"  # a gzip member's first bytes (magic, deflate)
GZIP_STEP = 16 << 10  # compressed bytes decoded at a time
# A member cut short and followed by the next run's member is not seen at the
# boundary: its decoder reads on into the next member's bytes until they make
# no sense, a few KiB later.  The next member's start is looked for in this
# much of what was decoded last (and a start found must decode).
GZIP_LOOKBACK = 4 << 20
GZIP_TRIAL = 64 << 10


class _Gunzip(io.RawIOBase):
    """The bytes of every gzip member of a file, past damage where it can:
    of a member cut short (gzip killed before it flushed) or corrupt, all it
    decodes to before the damage is kept (as zcat prints it); then reading
    goes on at the next member found, after a blank line that ends the frame
    the damage cut (it reads back as one bad record).  ``damage`` says what
    was wrong, ``resumed`` how often reading went on past it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._in = bytearray()  # compressed bytes read and not yet decoded
        self._at = 0  # the file offset of _in[0]
        self._eof = False
        self._z: Any = None  # the member's decompressor; None between members
        self._out = bytearray()  # decoded, not yet read
        self._done = False
        self._tail = bytearray()  # the member's last compressed bytes decoded, at most GZIP_LOOKBACK
        self._member_at = 0  # the file offset where the member began
        self.damage: list[str] = []
        self.resumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while not self._out and not self._done:
            self._step()
        n = min(len(buf), len(self._out))
        buf[:n] = self._out[:n]
        del self._out[:n]
        return n

    def _fill(self) -> None:
        while len(self._in) < GZIP_STEP and not self._eof:
            more = self._raw.read(1 << 20)
            if more:
                self._in += more
            else:
                self._eof = True

    def _consume(self, n: int) -> None:
        if self._z is not None:
            self._tail += self._in[:n]
            if len(self._tail) > GZIP_LOOKBACK:
                del self._tail[: len(self._tail) - GZIP_LOOKBACK]
        del self._in[:n]
        self._at += n

    def _step(self) -> None:
        self._fill()
        if self._z is None:  # a member starts here, or the file ends
            if not self._in:
                self._done = True
            elif not self._in.startswith(GZIP_MEMBER):
                if any(self._in) or not self._eof:  # (zero padding at the end is no damage, as for gzip)
                    self.damage.append(f"bytes that are not gzip at byte {self._at}")
                    self._resync()
                else:
                    self._done = True
            else:
                self._z = zlib.decompressobj(wbits=31)
                self._tail.clear()
                self._member_at = self._at
            return
        if not self._in:
            self._done = True
            self.damage.append("Compressed file ended before the end-of-stream marker was reached")
            return
        chunk = bytes(self._in[:GZIP_STEP])
        before = self._z.copy()
        try:
            self._out += self._z.decompress(chunk)
        except zlib.error as exc:
            # Again from before this chunk, a byte at a time: everything
            # up to the damaged byte is kept (its chunk's output was lost).
            self._z, fed = before, 0
            while fed < len(chunk):
                try:
                    self._out += self._z.decompress(chunk[fed : fed + 1])
                except zlib.error:
                    break
                fed += 1
            self._consume(fed + 1)
            self._z = None
            self.damage.append(f"{exc} at byte {self._at - 1}")
            if not self._member_after_damage():
                self._consume(max(0, len(self._in) - (len(GZIP_MEMBER) - 1)))  # searched already
                self._resync()
            return
        if self._z.eof:  # the member ended: what follows it is the next one
            self._consume(len(chunk) - len(self._z.unused_data))
            self._z = None
        else:
            self._consume(len(chunk))

    def _member_after_damage(self) -> bool:
        """Whether a member that decodes starts after the damaged member's
        start, in what its decoder went through last; if so, read on there."""
        data = bytes(self._tail + self._in)
        base = self._at - len(self._tail)  # the file offset of data[0]
        at = max(0, self._member_at + 1 - base)
        while (found := data.find(GZIP_MEMBER, at)) >= 0:
            at = found + 1
            if found + 10 > len(data) or data[found + 3] & 0xE0:  # a header's reserved flags are 0
                continue
            try:
                zlib.decompressobj(wbits=31).decompress(data[found : found + GZIP_TRIAL])
            except zlib.error:
                continue
            self._in = bytearray(data[found:])
            self._at = base + found
            self._tail.clear()
            self.resumed += 1
            self._out += b"\n\n"  # ends the frame the damage cut
            return True
        return False

    def _resync(self) -> None:
        """After damage: skip to the next gzip member in what is still to be read, if there is one."""
        skip_first = self._in.startswith(GZIP_MEMBER)  # the damaged member's own start
        while True:
            found = self._in.find(GZIP_MEMBER, 1 if skip_first else 0)
            if found >= 0:
                self._consume(found)
                self.resumed += 1
                self._out += b"\n\n"  # ends the frame the damage cut
                return
            if self._eof:
                self._consume(len(self._in))
                self._done = True
                return
            keep = len(GZIP_MEMBER) - 1  # a member's start may straddle two reads
            self._consume(max(0, len(self._in) - keep))
            skip_first = False
            more = self._raw.read(1 << 20)
            if more:
                self._in += more
            else:
                self._eof = True


def _bounded_lines(fh: BinaryIO) -> Iterator[bytes]:
    """The file's lines, none read whole past MAX_LINE: a longer one comes as
    its first MAX_LINE + 1 bytes, and the rest of it is skipped.  A UTF-8
    byte-order mark (an editor's) before the first line is dropped."""
    first = True
    while True:
        line = fh.readline(MAX_LINE + 1)
        if not line:
            return
        if first:
            first = False
            line = line.removeprefix(b"\xef\xbb\xbf")
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while True:
                rest = fh.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
        yield line


def parse_stream(lines: Iterator[bytes] | BinaryIO) -> Iterator[Envelope | BadRecord]:
    if hasattr(lines, "readline"):
        lines = _bounded_lines(lines)  # type: ignore[arg-type]
    event_type: str | None = None
    data: list[bytes] = []
    size = 0  # of data, across its lines: one event's JSON, bounded like a line
    start = 0
    lineno = 0

    def finish() -> Envelope | BadRecord | None:
        if not data:
            return None if event_type is None else BadRecord(start, f"event {event_type!r} has no data line")
        payload = b"\n".join(data)
        try:
            env = Envelope.from_wire(event_type or "message", payload)
        except orjson.JSONDecodeError as exc:
            try:
                payload.decode()
            except UnicodeDecodeError as bad:  # orjson says "surrogates not allowed" for any invalid UTF-8
                return BadRecord(start, f"bad JSON in {event_type or 'event'}: not valid UTF-8 "
                                        f"(byte 0x{payload[bad.start]:02x} at offset {bad.start} of its data)")
            return BadRecord(start, f"bad JSON in {event_type or 'event'}: {exc}")
        except ValueError as exc:  # JSON, but not an event (its shape, its timestamp)
            return BadRecord(start, f"{event_type or 'event'}: {exc}")
        problem = shape_error(env.type, env.body)
        return env if problem is None else BadRecord(start, f"{env.type}: {problem}")

    for raw in lines:
        lineno += 1
        if len(raw) > MAX_LINE:
            yield BadRecord(lineno, f"line longer than {MAX_LINE} bytes")
            event_type, data, size = None, [], 0
            continue
        line = raw.rstrip(b"\r\n")
        if not raw.endswith(b"\n") and line and not line.startswith((b"id:", b"retry:", b":")):
            # The last line of a file cut mid-write (an event's id is not
            # needed to read it: a frame cut there is whole).
            yield BadRecord(lineno, "truncated record at end of file")
            event_type, data, size = None, [], 0
            continue
        if not line:
            record = finish()
            if record is not None:
                yield record
            event_type, data, size = None, [], 0
            continue
        if line.startswith(b":"):
            continue  # keep-alive comment
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"event":
            if event_type is not None or data:
                record = finish()  # a record without its blank line
                if record is not None:
                    yield record
                data = []
            size = 0
            event_type = value.decode("utf-8", "replace")
            start = lineno
        elif field == b"data":
            if event_type is None and not data:
                start = lineno
            size += len(value)
            if size > MAX_LINE:
                # Many data lines make one event: bounded as one line is, and
                # the rest of its lines skipped (size stays over until its end).
                if data:
                    yield BadRecord(start, f"event longer than {MAX_LINE} bytes")
                    event_type, data = None, []
                continue
            data.append(value)
        elif field in (b"id", b"retry"):
            continue
        elif line.startswith(b"--"):
            continue  # grep -A separators in hand-filtered files
        else:
            yield BadRecord(lineno, f"unexpected line {line[:40]!r}")
    record = finish()
    if record is not None:
        yield record


# What each event family's readers dereference: fields that must be objects
# (or absent) and fields that must be plain values (they become dict keys,
# route text, numbers), by where they sit in the event's payload.
_Shape = tuple[tuple[str, ...], tuple[str, ...]]  # (objects, scalars)
_PROCESS: _Shape = (("container", "user", "pod"), ("pid", "ppid", "path", "binary", "hostname"))
_CONNECTION: _Shape = (("meta", "source", "destination", "tags"), ("pid", "direction", "l7Protocol"))
_META: _Shape = ((), ("connectionId", "endpointId", "sni"))
_SIDE: _Shape = (("address", "container", "pod"), ("pid", "exe"))
_TRANSACTION: _Shape = (("summary",), ("requestId", "endpointId", "connectionId", "data"))


def shape_error(event_type: str, body: Mapping[str, Any]) -> str | None:
    """Why ``body`` (an event read from a file) would trip its readers, or None."""
    data = body.get("data")
    if not isinstance(data, dict):
        return '"data" is not an object'
    if event_type.startswith("process."):
        return _check(data, "data", _PROCESS)
    if not event_type.startswith(("connection.", "request.")):
        return None
    # The seed's double nesting (data.data), or a flat payload.
    inner, where = (data["data"], "data.data") if isinstance(data.get("data"), dict) else (data, "data")
    if event_type.startswith("connection."):
        problem = _check(inner, where, _CONNECTION)
        if problem:
            return problem
        return (_check(inner.get("meta") or {}, f"{where}.meta", _META)
                or _check(inner.get("source") or {}, f"{where}.source", _SIDE)
                or _check(inner.get("destination") or {}, f"{where}.destination", _SIDE))
    problem = _check(inner, where, _TRANSACTION)
    if problem:
        return problem
    summary = inner.get("summary") or {}
    for key, value in summary.items():
        if not _scalar(value):
            return f"{where}.summary.{key} is not a plain value"
    path = summary.get("request_path")
    return None if path is None or isinstance(path, str) else f"{where}.summary.request_path is not text"


def _check(obj: Mapping[str, Any], where: str, shape: _Shape) -> str | None:
    objects, scalars = shape
    for key in objects:
        if obj.get(key) is not None and not isinstance(obj[key], dict):
            return f"{where}.{key} is not an object"
    for key in scalars:
        if not _scalar(obj.get(key)):
            return f"{where}.{key} is not a plain value"
    return None


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))
