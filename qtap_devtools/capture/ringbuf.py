"""A BPF ring buffer read through its own mmap'ed pages.

bcc reads a ring by calling back into Python through ctypes once per record
(plus a ``string_at`` copy): about a fifth of the agent's CPU at 25k records/s.
Here the reader walks the records itself, the way libbpf's ``ringbuf_process_ring``
does, and hands back a list per call.

Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (we write it),
page 1 the producer position; the data area follows.  The kernel offers the data
area twice in a row so a record that wraps reads contiguously; we map it once
(a second mapping would count the whole ring twice in RSS) and join the rare
wrapping record from its two pieces.  Each record starts with an 8-byte header
``u32 len; u32 pg_off``; ``len``'s top bits mark a record still being written
(BUSY) or thrown away (DISCARD).  Records and headers are 8-byte aligned, so a
header never wraps.
"""

from __future__ import annotations

import mmap
import select
import struct
from typing import Callable, TypeVar

from qtap_devtools.capture import chunk, records

# The same walk in C, with data records decoded there (``_ringread.c``); built
# by ``make setup``.  Without it, read_records is read with RecordReader.parse_at.
try:
    from qtap_devtools.capture import _ringread
except ImportError:
    _ringread = None
else:
    _ringread.configure(chunk.DataChunk, chunk.make, records.DIRECTIONS, records.SOURCES, records.DATA,
                        records.DATA_HDR_SIZE, records.DATA_SHEDDING)
# A thread that lifts idle threads when the ring falls behind (``_watchdog.c``);
# without it the reader runs as an equal (priority.py).
try:
    from qtap_devtools.capture import _watchdog
except ImportError:
    _watchdog = None

BUSY = 1 << 31
DISCARD = 1 << 30
HDR = 8

T = TypeVar("T")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingReader:
    """Consumer side of one ``BPF_MAP_TYPE_RINGBUF``; one thread at a time."""

    def __init__(self, map_fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring size {size} is not a power of two")
        page = mmap.PAGESIZE
        self.size = size
        self._mask = size - 1
        self._page = page
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._data = mmap.mmap(map_fd, page + size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)
        self.parse_errors = 0
        self.watchdog = None

    def watch(self, fill: float, period_us: int, stall_us: int):
        """Start a :class:`_watchdog.Watchdog` that lifts the threads it is armed
        with once ``fill`` of the ring is unread, or records have waited
        ``stall_us`` with none read; None where it is not built."""
        if _watchdog is not None and self.watchdog is None:
            self.watchdog = _watchdog.Watchdog(self._data, self._consumer, max(1, int(fill * self.size)), period_us,
                                               stall_us)
        return self.watchdog

    def wait(self, timeout_ms: int) -> None:
        """Sleep until the kernel signals new records, or ``timeout_ms``."""
        self._epoll.poll(timeout_ms / 1000)

    def pending_bytes(self) -> int:
        """Bytes written by the kernel and not yet consumed (records, headers, padding)."""
        return _U64.unpack_from(self._data, 0)[0] - _U64.unpack_from(self._consumer, 0)[0]

    def read(self, parse: Callable[[mmap.mmap, int, int], T], out: list[T], max_records: int) -> int:
        """Append ``parse(area, start, length)`` for up to ``max_records`` committed
        records to ``out``, then release them to the kernel; returns how many.

        ``area`` is the ring's own mapping (or, for a record that wraps, a copy
        of it joined): ``parse`` must copy what it keeps, the ring's space is
        reused once released.  A record ``parse`` raises on is counted in
        ``parse_errors`` and skipped.
        """
        data, consumer = self._data, self._consumer
        u32, mask, base = _U32.unpack_from, self._mask, self._page
        data_end = base + self.size
        cons = _U64.unpack_from(consumer, 0)[0]
        prod = _U64.unpack_from(data, 0)[0]
        append, taken = out.append, 0
        try:
            while cons < prod and taken < max_records:
                if cons & 7:  # records start 8-aligned: someone else wrote our consumer page
                    self.parse_errors += 1
                    cons = prod  # what is in the ring cannot be found: let it go, counted
                    break
                start = base + (cons & mask)
                length = u32(data, start)[0]
                if length & BUSY:
                    break  # reserved, not yet committed: later ones must wait too
                size = length & ~(BUSY | DISCARD)
                cons += (size + HDR + 7) & ~7
                if not length & DISCARD:
                    begin = start + HDR
                    try:
                        if size > self.size - HDR:  # longer than the ring: a corrupt length
                            raise ValueError(f"record of {size} bytes in a {self.size}-byte ring")
                        if begin + size <= data_end:
                            append(parse(data, begin, size))
                        else:  # wraps: its tail is at the start of the data area
                            head = data[begin:data_end]
                            append(parse(head + data[base : base + size - len(head)], 0, size))
                    except Exception:  # untrusted layout: count it, keep reading
                        self.parse_errors += 1
                    taken += 1
        finally:
            # One store per batch: the kernel may reuse the space from here on.
            _U64.pack_into(consumer, 0, cons)
        return taken

    def read_records(self, parse_at: Callable[[mmap.mmap | bytes, int, int], records.Record],
                     out: list, others: list, max_records: int) -> tuple[int, int]:
        """:meth:`read` with ``RecordReader.parse_at``, data records decoded in C
        when it is built (the same records).  Every record goes to ``out``; the
        ones that are not data records to ``others`` too.  Returns (records
        taken, payload bytes of the data records among them)."""
        if _ringread is not None:
            taken, errors, data_bytes = _ringread.read(self._data, self._consumer, self.size, self._page,
                                                       parse_at, out, max_records, others)
            self.parse_errors += errors
            return taken, data_bytes
        start = len(out)
        taken = self.read(parse_at, out, max_records)
        data_bytes = 0
        for r in out[start:]:
            if type(r) is records.DataChunk:
                data_bytes += len(r.data)
            else:
                others.append(r)
        return taken, data_bytes

    def close(self) -> None:
        if self.watchdog is not None:  # first: it holds the pages
            self.watchdog.close()
        self._epoll.close()
        self._data.close()
        self._consumer.close()
