"""The C ring walk against the Python one, on a ring laid out in ordinary memory.

``RingReader.read_records`` (C when built) and ``RingReader.read`` with
``RecordReader.parse_at`` (Python) must take the same records from the same
bytes: data records decoded field by field, other kinds through parse_at,
DISCARD skipped, BUSY stopping the batch, a record that wraps joined, a
malformed one counted and skipped, and the consumer position left at the same
place.  The kernel side is covered by the probe tests (8 MiB through a 1 MiB
ring); this one reaches the corners on purpose.
"""

from __future__ import annotations

import dataclasses

import mmap
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtap_devtools.capture import records as rec
from qtap_devtools.capture import ringbuf
from qtap_devtools.capture.ringbuf import BUSY, DISCARD, HDR, RingReader

PAGE = mmap.PAGESIZE
SIZE = 1 << 14  # data area: small, so generated traffic wraps


def test_the_c_ring_reader_is_built_and_in_use():
    if ringbuf._ringread is None:
        if os.environ.get("CI"):
            pytest.fail("qtap_devtools.capture._ringread is not built (make setup compiles it)")
        pytest.skip("C ring reader not built")


class FakeRing(RingReader):
    """A RingReader over anonymous memory laid out like the kernel's mapping."""

    def __init__(self) -> None:
        self.size, self._mask, self._page = SIZE, SIZE - 1, PAGE
        self._consumer = mmap.mmap(-1, PAGE)
        self._data = mmap.mmap(-1, PAGE + SIZE)
        self.parse_errors = 0
        self.prod = 0

    def write(self, body: bytes, *, busy: bool = False, discard: bool = False) -> None:
        """Append one record as the kernel would, wrapping at the end of the data area."""
        start = self.prod & self._mask
        length = len(body) | (BUSY if busy else 0) | (DISCARD if discard else 0)
        struct.pack_into("<II", self._data, PAGE + start, length, 0)
        for i in range(len(body)):  # byte by byte: the body may wrap
            self._data[PAGE + ((start + HDR + i) & self._mask)] = body[i]
        self.prod += (len(body) + HDR + 7) & ~7
        struct.pack_into("<Q", self._data, 0, self.prod)

    def clone(self) -> "FakeRing":
        other = FakeRing()
        other._data[:] = self._data[:]
        other._consumer[:] = self._consumer[:]
        other.prod = self.prod
        return other

    def consumer(self) -> int:
        return struct.unpack_from("<Q", self._consumer, 0)[0]


def data_record(pid: int, payload: bytes, *, direction: int = 0, source: int = 1, flags: int = 0,
                claimed: int | None = None) -> bytes:
    head = struct.pack("<IIIiQQIBBHQ", rec.DATA, pid, pid + 1, -1 if pid % 2 else 5, 10 * pid, 7 * pid,
                       len(payload) if claimed is None else claimed, direction, source, flags, pid << 20)
    return head + payload


def close_record(pid: int) -> bytes:
    # struct close_rec: the header, where each stream ended (here: the first one, at 7), known bits, flags
    return struct.pack("<IIIiQ", rec.CLOSE, pid, pid, 3, 99) + struct.pack("<4QIHH", 7, 0, 0, 0, 1, 0, 0)


def fields(r):
    return (type(r).__name__, {f.name: getattr(r, f.name) for f in dataclasses.fields(r)})


def test_the_python_walk_gives_the_same_by_products(monkeypatch):
    """read_records without the C part: same records, others and bytes."""
    ring = FakeRing()
    ring.write(data_record(3, b"abc"))
    ring.write(close_record(4))
    ring.write(data_record(5, b"hello"))
    monkeypatch.setattr(ringbuf, "_ringread", None)
    out: list = []
    others: list = []
    assert ring.read_records(rec.RecordReader().parse_at, out, others, 10) == (3, 8)
    assert [type(r).__name__ for r in out] == ["DataChunk", "SocketClose", "DataChunk"]
    assert [type(r).__name__ for r in others] == ["SocketClose"]


RECORDS = st.one_of(
    st.builds(lambda pid, n, d, s, f: ("data", data_record(pid, bytes(range(n % 251)) * (n // 251 + 1), direction=d,
                                                            source=s, flags=f)),
              st.integers(1, 1 << 20), st.integers(0, 3000), st.integers(0, 1), st.integers(0, 2), st.integers(0, 3)),
    st.builds(lambda pid: ("close", close_record(pid)), st.integers(1, 1000)),
    st.builds(lambda pid: ("discard", data_record(pid, b"x" * 40)), st.integers(1, 1000)),
    st.sampled_from([("bad", data_record(1, b"short", claimed=4000)),  # claims more than it holds
                     ("bad", data_record(2, b"dir", direction=7)),  # no such direction
                     ("bad", struct.pack("<IIIiQ", 77, 1, 1, 1, 1)),  # no such kind
                     ("bad", b"\x08")]),  # a data kind byte and nothing else
)


@settings(max_examples=150, deadline=None)
@given(st.lists(RECORDS, max_size=25), st.integers(0, SIZE // 8 - 1), st.booleans(), st.integers(1, 30))
def test_c_and_python_take_the_same_records(items, skip, busy_last, batch):
    if ringbuf._ringread is None:
        pytest.skip("C ring reader not built")
    ring = FakeRing()
    # Start anywhere in the ring so records wrap at every position.
    ring.prod = skip * 8
    struct.pack_into("<Q", ring._consumer, 0, ring.prod)
    struct.pack_into("<Q", ring._data, 0, ring.prod)
    room = SIZE - 64
    for kind, body in items:
        need = (len(body) + HDR + 7) & ~7
        if need > room:
            break
        room -= need
        ring.write(body, discard=kind == "discard")
    if busy_last and room > 64:
        ring.write(close_record(5), busy=True)
        ring.write(close_record(6))  # committed, but behind a busy one: must wait
    py_ring, c_ring = ring.clone(), ring.clone()
    parse_at = rec.RecordReader().parse_at
    while True:
        py_out: list = []
        c_out: list = []
        c_others: list = []
        py_n = py_ring.read(parse_at, py_out, batch)
        c_n, c_bytes = c_ring.read_records(parse_at, c_out, c_others, batch)
        assert (c_n, [fields(r) for r in c_out], c_ring.consumer(), c_ring.parse_errors) == \
            (py_n, [fields(r) for r in py_out], py_ring.consumer(), py_ring.parse_errors)
        # The bookkeeping by-products: records that are not data, and the data's bytes.
        assert [fields(r) for r in c_others] == [fields(r) for r in py_out if type(r) is not rec.DataChunk]
        assert c_bytes == sum(len(r.data) for r in py_out if type(r) is rec.DataChunk)
        if py_n < batch:
            break


def walk_both(ring: FakeRing, monkeypatch) -> list[tuple]:
    """(taken, records, consumer, parse errors) from the C walk and from the Python one."""
    got = []
    for c in (True, False):
        r = ring.clone()
        if not c:
            monkeypatch.setattr(ringbuf, "_ringread", None)
        elif ringbuf._ringread is None:
            continue
        out: list = []
        taken, _ = r.read_records(rec.RecordReader().parse_at, out, [], 10)
        got.append((taken, [fields(x) for x in out], r.consumer(), r.parse_errors))
    return got


def test_a_record_longer_than_the_ring_is_counted_not_copied(monkeypatch):
    """A length no kernel writes: the C walk once copied past the ring's end
    (a crash, or bytes of whatever memory lay beyond) where Python sliced short."""
    ring = FakeRing()
    ring.prod = SIZE - 8  # the record wraps
    struct.pack_into("<Q", ring._consumer, 0, ring.prod)
    ring.write(data_record(3, b"x" * 40))
    struct.pack_into("<I", ring._data, PAGE + SIZE - 8, SIZE + 200)  # the length, now a lie
    ring.prod = SIZE - 8 + ((SIZE + 200 + HDR + 7) & ~7)
    struct.pack_into("<Q", ring._data, 0, ring.prod)
    for result in walk_both(ring, monkeypatch):
        assert result == (1, [], ring.prod, 1)


def test_a_consumer_position_off_the_record_grid_lets_the_ring_go(monkeypatch):
    """Records start 8-aligned; a consumer page someone else wrote does not say
    where: what the ring holds is let go, counted, and reading goes on from the producer."""
    ring = FakeRing()
    ring.prod = SIZE - 8
    ring.write(data_record(3, b"hello"))
    struct.pack_into("<Q", ring._consumer, 0, SIZE - 4)  # within 8 bytes of the end, and off the grid
    for result in walk_both(ring, monkeypatch):
        assert result == (0, [], ring.prod, 1)
