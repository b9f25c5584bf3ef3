"""Capture files: the SSE stream's own bytes, written and read back.

A file written by ``--output`` and one saved with ``curl -sN …/events > f`` are
the same format, so either can be replayed.  Reading is forgiving: a corrupt or
truncated record is reported with its line number and skipped; only a file that
cannot be opened at all is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from qtap_devtools.events import Envelope

log = logging.getLogger(__name__)

MAX_LINE = 64 << 20  # one event's JSON; larger is a corrupt file, not an event


@dataclass(frozen=True, slots=True)
class BadRecord:
    line: int
    reason: str


class CaptureWriter:
    """Appends each event's SSE frame and flushes it, so a crash loses at most
    the event in flight."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO = open(path, "ab", buffering=0)
        self.written = 0
        self.errors = 0

    def write(self, *parts: bytes) -> None:
        """One event's frame, whole or in pieces (``Published.parts()``)."""
        frame = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            self._fh.write(frame)  # unbuffered: one write, on disk when this returns
            self.written += 1
        except OSError as exc:
            self.errors += 1
            if self.errors == 1:
                log.error("capture file %s: %s; events are no longer saved", self.path, exc)

    def close(self) -> None:
        self._fh.close()


def read_events(path: Path) -> Iterator[Envelope | BadRecord]:
    """Envelopes in file order, with a :class:`BadRecord` for each bad one.

    Raises OSError only if the file cannot be opened.
    """
    with open(path, "rb") as fh:
        yield from parse_stream(fh)


def parse_stream(lines: Iterator[bytes] | BinaryIO) -> Iterator[Envelope | BadRecord]:
    event_type: str | None = None
    data: list[bytes] = []
    start = 0
    lineno = 0

    def finish() -> Envelope | BadRecord | None:
        if not data:
            return None if event_type is None else BadRecord(start, f"event {event_type!r} has no data line")
        payload = b"\n".join(data)
        try:
            return Envelope.from_wire(event_type or "message", payload)
        except ValueError as exc:
            return BadRecord(start, f"bad JSON in {event_type or 'event'}: {exc}")

    for raw in lines:
        lineno += 1
        if len(raw) > MAX_LINE:
            yield BadRecord(lineno, f"line of {len(raw)} bytes is longer than {MAX_LINE}")
            event_type, data = None, []
            continue
        line = raw.rstrip(b"\r\n")
        if not raw.endswith(b"\n") and line:
            # The last line of a file cut mid-write.
            yield BadRecord(lineno, "truncated record at end of file")
            event_type, data = None, []
            continue
        if not line:
            record = finish()
            if record is not None:
                yield record
            event_type, data = None, []
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
            event_type = value.decode("utf-8", "replace")
            start = lineno
        elif field == b"data":
            if event_type is None and not data:
                start = lineno
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
