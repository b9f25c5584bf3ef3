"""Record batches from the ring-reader thread to the event loop, bounded.

The reader thread drains the kernel's ring buffer; the pipeline runs on the
event loop, which also serves every HTTP client.  Two rules:

- Bounded, with back-pressure: when the loop falls behind, the reader waits
  for room instead of queueing without limit.  The ring then fills and the
  kernel counts each record it cannot hold (``lost_records``), so memory stays
  bounded and no loss goes uncounted.
- Fair: the loop takes records in slices and yields between them, so a flood
  of traffic never starves the SSE clients or ``/devtools/api/stats``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Callable


class Backlog:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        consume: Callable[[list], None],
        *,
        # Two of the reader's batches (capture/loader.py, BATCH_RECORDS): the loop
        # always has the next one while the reader reads the one after.  The
        # ring is the buffer; records wait there in a fraction of the memory
        # they take as objects (20,000 here held 5 MB more at saturation, for
        # no more transactions: make bench-soak).
        max_records: int = 8_192,
        max_bytes: int = 16 << 20,
        slice_records: int = 2_000,
        slice_bytes: int = 1 << 20,
    ) -> None:
        self._loop = loop
        self._consume = consume
        self.max_records = max_records
        self.max_bytes = max_bytes  # data records carry up to 16 KiB each
        self.slice_records = slice_records
        # A slice of megabyte responses makes as many megabyte events before
        # the publisher runs: bound it in bytes too.
        self.slice_bytes = slice_bytes
        self._batches: deque[tuple[list, int]] = deque()  # (records, their payload bytes)
        self._since: deque[float] = deque()  # monotonic time each batch was queued
        self._queued = 0
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._scheduled = False
        self._closed = False
        self.reader_waits = 0  # times the reader found it full and waited
        self.discarded = 0  # records left unprocessed at the stop (finish)
        # Called on the reader's thread every 10 ms it waits for room: the
        # capture's overload check must run while it is held here (at W2's
        # rate the ring fills in tens of milliseconds).
        self.while_waiting: Callable[[], None] | None = None

    def _full(self) -> bool:
        return (self._queued >= self.max_records or self._queued_bytes >= self.max_bytes) and not self._closed

    def lag(self) -> float:
        """Seconds the oldest waiting batch has waited (a gauge, read without the lock)."""
        try:
            return time.monotonic() - self._since[0]
        except IndexError:
            return 0.0

    def put(self, batch: list) -> None:
        """From the reader thread: queue ``batch``, waiting while full."""
        size = getattr(batch, "data_bytes", None)  # a capture Batch knows it
        if size is None:
            size = _payload_bytes(batch)
        with self._cond:
            if self._full():
                self.reader_waits += 1
                while self._full():
                    self._cond.wait(0.01)
                    if self.while_waiting is not None and self._full():
                        self.while_waiting()
            if self._closed:
                self.discarded += len(batch)
                return
            self._batches.append((batch, size))
            self._since.append(time.monotonic())
            self._queued += len(batch)
            self._queued_bytes += size
            schedule = not self._scheduled
            self._scheduled = True
        if schedule:
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: the agent stopped while capture was starting
                with self._cond:
                    self._closed = True

    def _drain(self) -> None:
        """On the loop: consume one slice, then yield to other callbacks."""
        with self._cond:
            if not self._batches or self._closed:  # closed: finish() had the last word
                self._scheduled = False
                return
            batch, size = self._batches[0]
            if len(batch) <= self.slice_records and size <= self.slice_bytes:
                self._batches.popleft()
                self._since.popleft()
                part, freed = batch, size
            else:
                if size <= self.slice_bytes:
                    # Small records (the usual case): cut by count, and release
                    # the batch's bytes with its last slice rather than sum
                    # every slice record by record.
                    n = self.slice_records
                    part, rest = batch[:n], batch[n:]
                    freed = 0 if rest else size
                    remaining = size
                else:
                    n = _slice_length(batch, self.slice_records, self.slice_bytes)
                    part, rest = batch[:n], batch[n:]
                    freed = _payload_bytes(part)
                    remaining = size - freed
                if rest:
                    self._batches[0] = (rest, remaining)
                else:
                    self._batches.popleft()
                    self._since.popleft()
            self._queued -= len(part)
            self._queued_bytes -= freed
            self._cond.notify()
        try:
            self._consume(part)
        finally:
            self._loop.call_soon(self._drain)

    def close(self) -> None:
        """Release a waiting reader; later batches are dropped (counted: ``discarded``)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def finish(self, seconds: float) -> int:
        """At the stop, on the loop, after :meth:`close`: consume what is queued
        for at most ``seconds``, so the last events reach the clients before
        their goodbye; the rest is dropped.  Returns the records not consumed,
        also counted in ``discarded``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self._cond:
                if not self._batches:
                    break
                batch, _ = self._batches.popleft()
                self._since.popleft()
            self._consume(batch)
        with self._cond:
            left = sum(len(b) for b, _ in self._batches)
            self._batches.clear()
            self._since.clear()
            self._queued = self._queued_bytes = 0
            self.discarded += left
        return left

    def stats(self) -> dict:
        return {"backlog_records": self._queued, "backlog_bytes": self._queued_bytes,
                "backlog_limit_records": self.max_records, "backlog_limit_bytes": self.max_bytes,
                "backlog_reader_waits": self.reader_waits, "backlog_discarded_at_stop": self.discarded}


def _payload_bytes(batch: list) -> int:
    return sum(len(getattr(r, "data", b"")) for r in batch)


def _slice_length(batch: list, max_records: int, max_bytes: int) -> int:
    """How many leading records make a slice (at least one)."""
    size = 0
    for n, r in enumerate(batch[:max_records], 1):
        size += len(getattr(r, "data", b""))
        if size >= max_bytes:
            return n
    return min(len(batch), max_records)
