"""Fan-out of events to any number of subscribers, each with a bounded queue.

The producer (capture or replay) calls :meth:`Broadcaster.publish` and never
waits: a subscriber that falls behind loses the newest events beyond its queue
size, they are counted, and it is told how many with a ``system.dropped`` event
as soon as its queue has room again.  Each event's SSE frame is encoded once
(in :class:`~qtap_devtools.events.Envelope`) and shared by every subscriber.

Every published event gets a sequence number, sent as the SSE ``id:``, so a
client that reconnects with ``Last-Event-ID`` resumes from the recent history
without losing what it had not received.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Final, Iterable

from qtap_devtools import ids
from qtap_devtools.events import HTTP_TRANSACTION, PROCESS_STARTED, Envelope, SystemDisconnected, SystemDropped
from qtap_devtools.filters import EventFilter
from qtap_devtools.mypyc_attrs import mypyc_attr

log: Final = logging.getLogger(__name__)

_CLOSE: Final = object()
# A builtin named in compiled code is looked up in the builtins module at every
# use (~200 instructions); a Final holds it.
_memoryview: Final = memoryview
# A busy stream is written at most this often per client.  Every write is a trip
# through the ASGI stack and a syscall (~50 µs at rate10k), and at 20,000 events
# a second they came ~1,000 times a second with a few events each.  An event
# after a quiet spell still goes out at once; only the next one waits.
SEND_PACE_SECONDS: Final = 0.005
# At most this much of a client's queue goes out in one write.  More than one
# turn of a saturated event loop adds (a slice of the record backlog makes
# ~1 MiB of frames): at 256 KiB a client that read everything still lost
# events to its queue at W1, after the agent had done all the work for them.
SEND_BATCH_BYTES: Final = 4 << 20
# What all clients' queues may hold together, each its share of it (and at most
# its own limit): a client that stops reading (a paused `curl | less`) holds
# the frames it has not taken, and each one stuck at a different moment held
# its own ~68 MB, without bound in their number.  Frames shared by several
# queues are counted in each, so the memory is at most this.
ALL_CLIENTS_BYTES: Final = 256 << 20
# system.dropped's reasons.
QUEUE_OVERFLOWED: Final = "client fell behind; its queue overflowed"
HISTORY_EVICTED: Final = "resumed past the history the agent still holds (older events were evicted)"
HISTORY_CUT: Final = "the history asked for is larger than this client's share of memory: its oldest events are left out"


@mypyc_attr(acyclic=True)  # an Envelope and bytes: in no cycle (mypyc_attrs)
class Published:
    """One event as published: its sequence number, envelope and ``id:`` line.

    A plain slotted class (immutable by convention): a frozen dataclass's
    ``__init__`` costs a microsecond per event on the hottest path.
    """

    __slots__ = ("seq", "envelope", "id_line", "size")

    def __init__(self, seq: int, envelope: Envelope, id_line: bytes) -> None:
        self.seq = seq
        self.envelope = envelope
        # `id:` goes after `data:` so `grep EVENT -A1` still yields the data line.
        # Kept apart from the envelope's frame, not joined to a copy of it: a
        # transaction's frame can be megabytes, and history holds thousands.
        self.id_line = id_line  # b"id: <instance>-<seq>\n", or b"" for unnumbered events
        self.size = len(envelope.frame) + len(id_line)

    def __repr__(self) -> str:
        return f"Published(seq={self.seq}, type={self.envelope.type!r}, size={self.size})"

    @classmethod
    def make(cls, instance: bytes, seq: int, envelope: Envelope) -> "Published":
        # The id names this agent instance: after a restart, sequence numbers
        # start again, and a client resuming with an old id must not skip new events.
        # Published(), not cls(): compiled, a direct call; through cls, a generic one.
        return Published(seq, envelope, b"id: %s-%d\n" % (instance, seq))

    @classmethod
    def unnumbered(cls, envelope: Envelope) -> "Published":
        # Greetings and snapshots carry no id: a reconnect resumes from the
        # last real event, not from a greeting.
        return Published(0, envelope, b"")

    def parts(self) -> list:
        """The SSE frame as pieces to join at write time (no copy before then)."""
        out: list = []
        self.add_parts(out)
        return out

    def add_parts(self, out: list) -> None:
        """``parts()`` appended to ``out`` (a subscriber's batch): no list of its own."""
        frame = self.envelope.frame
        if not self.id_line:
            out.append(frame)
            return
        out.append(_memoryview(frame)[:-1])
        out.append(self.id_line)
        out.append(b"\n")

    @property
    def frame(self) -> bytes:
        """The whole SSE frame, id line included, exactly as the stream sends it."""
        return b"".join(self.parts())


def parse_event_id(text: str, instance: str) -> int | None:
    """The sequence number to resume after, or 0 for "all you have" when the
    id comes from another instance (the agent restarted); None if malformed."""
    inst, sep, seq = text.rpartition("-")
    # "²".isdigit(), but int() refuses it; "-5" is not "after 5".
    if not (seq.isascii() and seq.isdigit()) or len(text) > 100 or (sep and not inst):
        return None
    return int(seq) if inst in ("", instance) else 0


@dataclass(eq=False)
class Subscriber:
    filter: EventFilter
    maxsize: int
    # Events are bounded in count and in bytes: 4096 transactions with 1 MiB
    # bodies would otherwise hold gigabytes for one slow client.
    max_bytes: int = 64 << 20
    # Published, _Gap or _CLOSE, oldest first.  A list, replaced when a batch
    # is taken: its append and index are native calls, a deque's are method
    # lookups (three per event per client).
    queue: list[object] = field(default_factory=list)
    queued_bytes: int = 0
    missed: int = 0  # since the last system.dropped sent to it
    total_missed: int = 0
    delivered: int = 0
    pace: float = SEND_PACE_SECONDS
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # next_batch() waits on _wakeup: only then does offer() set it (Event.set is
    # interpreted Python, and offer runs once per event per client).
    _waiting: bool = False
    _sent_at: float = 0.0  # monotonic time the last batch was taken
    gap_reason: str = QUEUE_OVERFLOWED  # why the events in `missed` are missing
    closed: bool = False  # its goodbye is queued
    # Items queued at subscribe (greeting, snapshot, the history asked for)
    # not yet taken: they do not count against ``maxsize``, which bounds how
    # far a client falls behind live events, not how much history it asked for.
    preloaded: int = 0

    def preload(self, items: list[Published], gap: int, reason: str) -> None:
        """Queue the history asked for, past the count bound, after a notice
        of the ``gap`` events before it that are not sent."""
        if gap:
            self.gap_reason = reason
            self.missed += gap
            self.total_missed += gap
            self._mark_gap()
        for item in items:
            self.queue.append(item)
            self.queued_bytes += item.size
        self.preloaded = len(self.queue)

    def offer(self, item: Published) -> None:
        size = item.size
        if (len(self.queue) - self.preloaded >= self.maxsize
                or (self.queue and self.queued_bytes + size > self.max_bytes)
                or self.closed):  # (after its goodbye: it cannot be told, but it is counted)
            self.missed += 1
            self.total_missed += 1
            return
        self._mark_gap()
        self.queue.append(item)
        self.queued_bytes += size
        if self._waiting:
            self._waiting = False
            self._wakeup.set()

    def limit_bytes(self, max_bytes: int) -> int:
        """A new bound (its share shrank): the oldest queued events past it
        are dropped, counted, and told where they were.  Returns how many."""
        self.max_bytes = max_bytes
        if self.queued_bytes <= max_bytes:
            return 0
        queue = self.queue
        kept: list[object] = []
        dropped = 0
        for item in queue:
            if self.queued_bytes > max_bytes and isinstance(item, Published) and item.seq:
                self.queued_bytes -= item.size
                dropped += 1
            else:
                kept.append(item)
        if dropped:
            self.total_missed += dropped
            kept.insert(0, _Gap(dropped, self.total_missed, QUEUE_OVERFLOWED))
            queue[:] = kept  # in place: next_batch may hold this list across an await
        return dropped

    def _mark_gap(self) -> None:
        # The notice goes where the missing events would have been.
        if self.missed:
            self.queue.append(_Gap(self.missed, self.total_missed, self.gap_reason))
            self.missed = 0
            self.gap_reason = QUEUE_OVERFLOWED

    def close(self, final: Envelope | None) -> None:
        # The goodbye may exceed maxsize: a client must learn why its stream ends.
        self._mark_gap()
        if final is not None:
            self.queue.append(Published.unnumbered(final))
        self.queue.append(_CLOSE)
        self.closed = True
        self._wakeup.set()

    async def next_batch(self, batch_bytes: int = SEND_BATCH_BYTES) -> bytes | None:
        """The SSE frames queued now, joined (waiting for the first), with
        drop notices in stream order; None once the stream is closed.

        Up to ``batch_bytes`` go out together: each batch costs a trip through
        the ASGI stack and a socket write, which per event was the largest cost
        of a busy stream; and a batch smaller than that is taken at most every
        ``pace`` seconds.  (A coroutine, not an async generator, so that mypyc
        compiles this module.)"""
        while True:
            queue = self.queue
            while not queue:
                if self.missed:
                    self._mark_gap()
                    break
                self._wakeup.clear()
                self._waiting = True
                await self._wakeup.wait()
            wait = self._sent_at + self.pace - time.monotonic()
            if wait > 0 and self.queued_bytes < batch_bytes and queue[-1] is not _CLOSE:
                await asyncio.sleep(wait)  # let more join this batch
            out: list = []
            size = 0
            taken, n = 0, len(queue)
            while taken < n and size < batch_bytes:
                item = queue[taken]
                if item is _CLOSE:
                    break
                taken += 1
                if isinstance(item, Published):  # narrowed: read natively, not by name
                    item.add_parts(out)
                    self.queued_bytes -= item.size
                    size += item.size
                    self.delivered += 1
                else:
                    assert isinstance(item, _Gap)
                    frame = SystemDropped(missed=item.missed, total_missed=item.total,
                                          reason=item.reason).envelope().frame
                    out.append(frame)
                    size += len(frame)
            if taken:
                self.queue = queue[taken:] if taken < n else []
                if self.preloaded:
                    self.preloaded = max(0, self.preloaded - taken)
            if out:
                self._sent_at = time.monotonic()
                return b"".join(out)
            if queue[taken] is _CLOSE:
                return None


@dataclass(frozen=True, slots=True)
class _Gap:
    missed: int
    total: int
    reason: str


class Broadcaster:
    def __init__(self, *, client_queue_size: int = 4096, history_size: int = 10_000,
                 client_queue_bytes: int = 64 << 20, all_clients_bytes: int = ALL_CLIENTS_BYTES,
                 history_bytes: int = 64 << 20, instance: str | None = None) -> None:
        # The instance tags event ids: the full time-ordered id (not a prefix),
        # so two agents started within the same second never share it.
        self.instance = instance or ids.new_id(time.time())
        self._instance_bytes = self.instance.encode()
        self.client_queue_size = client_queue_size
        self.client_queue_bytes = client_queue_bytes
        self.all_clients_bytes = all_clients_bytes
        self.history: deque[Published] = deque()
        self.history_size = history_size
        self.history_bytes = history_bytes
        self._history_used = 0
        self.history_evicted = 0
        # A list: compiled code walks it natively (a set is walked by the generic
        # iterator protocol, at every publish); a client's is removed at most once.
        self.subscribers: list[Subscriber] = []
        self.published = 0  # also the last event's sequence number
        self.subscribed_total = 0  # streams ever opened: tells a new one from a replaced one
        self.dropped_total = 0  # events lost by slow subscribers, summed over them
        self.closed = False
        self._listeners: list[Callable[[Published], None]] = []

    def add_listener(self, fn: Callable[[Published], None]) -> None:
        """A synchronous consumer of every event (state store, file writer):
        it gets the numbered frame exactly as the SSE stream sends it."""
        self._listeners.append(fn)

    def publish(self, envelope: Envelope) -> Published:
        self.published += 1  # a native int, not next() of an itertools.count: a generic call
        item = Published.make(self._instance_bytes, self.published, envelope)
        self._remember(item)
        for fn in self._listeners:
            fn(item)
        for sub in self.subscribers:
            if sub.filter.matches(envelope):
                before = sub.total_missed
                sub.offer(item)
                self.dropped_total += sub.total_missed - before
        if envelope.type == HTTP_TRANSACTION:
            # Every synchronous consumer has read it; what stays (history,
            # queues, the store) needs only the frame.
            envelope.release()
        return item

    def _remember(self, item: Published) -> None:
        """Keep ``item`` in the history, bounded in count and bytes (oldest out)."""
        history = self.history
        history.append(item)
        self._history_used += item.size
        while len(history) > 1 and (len(history) > self.history_size or self._history_used > self.history_bytes):
            self._history_used -= history.popleft().size
            self.history_evicted += 1

    def subscribe(
        self,
        event_filter: EventFilter,
        first: Iterable[Envelope] = (),
        resume_after: int | None = None,
    ) -> Subscriber:
        """A new subscriber whose queue starts with ``first`` (unbounded by the
        queue size: the greeting and snapshot must arrive whole), then history
        after ``resume_after`` when the client is resuming."""
        sub = Subscriber(event_filter, self.client_queue_size, self._share(len(self.subscribers) + 1))
        for env in first:
            sub.queue.append(Published.unnumbered(env))
        items: list[Published] = []
        gap, reason = 0, HISTORY_EVICTED
        if resume_after is not None:
            oldest = self.history[0].seq if self.history else self.published + 1
            if resume_after + 1 < oldest:
                # What came between is no longer kept: say so rather than
                # resume as if nothing was missed (filtered or not, it is
                # counted: the client cannot know which it would have had).
                gap = oldest - resume_after - 1
            items = [item for item in self.history if item.seq > resume_after and event_filter.matches(item.envelope)]
            # All of it, whatever the queue's count bound (the page asks for
            # the whole history as it opens); within the client's share of
            # memory, its newest part if it is more.
            size = sum(item.size for item in items)
            cut = 0
            while cut < len(items) - 1 and size > sub.max_bytes:
                size -= items[cut].size
                cut += 1
            if cut:
                gap, reason = gap + cut, HISTORY_CUT
                items = items[cut:]
                self.dropped_total += cut
        sub.preload(items, gap, reason)
        if self.closed:
            sub.close(None)
        self.subscribers.append(sub)
        self.subscribed_total += 1
        self._reshare()
        return sub

    def _share(self, clients: int) -> int:
        """Each client's queue bound in bytes: its own limit, or its share of
        the limit for all of them, whichever is less."""
        return min(self.client_queue_bytes, self.all_clients_bytes // max(1, clients))

    def _reshare(self) -> None:
        each = self._share(len(self.subscribers))
        for sub in self.subscribers:
            self.dropped_total += sub.limit_bytes(each)

    def started_pids(self) -> set[Any]:
        """The pids whose process.started the history holds."""
        return {item.envelope.inner.get("pid") for item in self.history if item.envelope.type == PROCESS_STARTED}

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)
            self._reshare()

    def close(self, reason: str) -> None:
        """Say goodbye to every subscriber and end their streams."""
        self.closed = True
        for sub in list(self.subscribers):
            sub.close(SystemDisconnected(reason=reason).envelope())

    def stats(self) -> dict:
        return {
            "published": self.published,
            "subscribers": len(self.subscribers),
            "subscribersTotal": self.subscribed_total,
            "subscriberDrops": self.dropped_total,
            "history": len(self.history),
            "historyLimit": self.history_size,
            "historyBytes": self._history_used,
            "historyBytesLimit": self.history_bytes,
            "historyEvicted": self.history_evicted,
            "clientQueueSize": self.client_queue_size,
            "clientQueueBytes": self._share(len(self.subscribers)),
            "allClientsQueueBytes": self.all_clients_bytes,
        }
