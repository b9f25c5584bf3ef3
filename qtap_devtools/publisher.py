"""From the pipeline to the broadcaster: events in order, rendered once.

Every event the pipeline makes passes through here, so this module is compiled
with the rest of the hot path (``compiled.MYPYC_MODULES``).  An event is
rendered (``Event.envelope``) when it is made, since the connection objects it
refers to keep changing afterwards.  The exception is
an event whose process is in a container whose metadata is not cached yet: it
waits, at most ``wait_seconds`` from when it was made, so the first event of a
new container carries its name.  Order is kept: events behind a waiting one
wait with it (their own deadlines run from when they were made, so a queue
behind one slow lookup does not wait once per event).  With nothing waiting,
an event is published as it is emitted: a queue and a task's turn would only
hand it over later in the same thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from typing import Any, Callable, Final

from qtap_devtools.enrich.model import ContainerInfo, ProcessInfo
from qtap_devtools.events import Envelope, Event, HttpTransaction

log: Final = logging.getLogger(__name__)

MAX_PENDING_EVENTS: Final = 100_000  # made but not yet published (enrichment waits)
ENRICH_WAIT_SECONDS: Final = 0.05


def process_of(event: Event) -> ProcessInfo | None:
    """The ProcessInfo an event is about (its own, or its connection's), or None.
    (Typed: compiled, its caller reads the fields natively.)"""
    if isinstance(event, HttpTransaction):  # nearly every event: skip the getattr that raises and is caught
        return event.connection.process
    proc = getattr(event, "process", None)
    if proc is not None:
        return proc
    conn = getattr(event, "connection", None)
    return conn.process if conn is not None else None


def set_process(event: Event, info: Any) -> None:
    if hasattr(event, "process"):
        setattr(event, "process", info)
    conn = getattr(event, "connection", None)
    if conn is not None:
        conn.process = info


class Publisher:
    """``emit`` from the pipeline (the loop's thread); ``run`` as a task.

    ``enricher`` is an :class:`~qtap_devtools.enrich.Enricher` (``docker`` and
    ``process_enriched`` are used); ``remember`` is told a process's fresher
    info when a wait brought its container's metadata."""

    def __init__(
        self,
        publish: Callable[[Envelope], Any],
        enricher: Any,
        remember: Callable[[Any], None],
        *,
        max_pending: int = MAX_PENDING_EVENTS,
        wait_seconds: float = ENRICH_WAIT_SECONDS,
    ) -> None:
        self.publish = publish
        self.enricher = enricher
        self.remember = remember
        self.max_pending = max_pending
        self.wait_seconds = wait_seconds
        self.pending: deque[Any] = deque()  # Envelope, or (Event, deadline) while its container is looked up
        self.dropped = 0
        self._wake = asyncio.Event()
        self._sleeping = False  # run() waits on _wake: only then does emit() need to set it
        self._busy = False  # run() has taken an event from the queue and not yet published it

    def __len__(self) -> int:
        return len(self.pending)

    def emit(self, event: Event) -> None:
        pending = self.pending
        if len(pending) >= self.max_pending:
            self.dropped += 1
            return
        info = process_of(event)
        if info is not None and info.container_id and info.container is None:
            docker = self.enricher.docker
            # The lookup starts now, not when the event's turn comes.
            if docker is not None:
                docker.prefetch(info.container_id)
            pending.append((event, time.monotonic() + self.wait_seconds))
        elif not pending and not self._busy:  # nothing before it: published now, in order
            env = event.envelope()
            try:
                self.publish(env)
            except Exception:  # a bug in one event must not stop the pipeline
                log.exception("could not publish an event")
            return
        else:
            pending.append(event.envelope())
        if self._sleeping:
            self._sleeping = False
            self._wake.set()

    async def run(self) -> None:
        pending = self.pending
        while True:
            while not pending:
                self._wake.clear()
                self._sleeping = True
                await self._wake.wait()
            item = pending.popleft()
            self._busy = True  # while it waits for its container, events emitted queue behind it
            try:
                if isinstance(item, Envelope):
                    self.publish(item)
                else:
                    self.publish(await self._enriched(item[0], item[1]))
            except Exception:  # a bug in one event must not stop the stream
                log.exception("could not publish an event")
            finally:
                self._busy = False

    async def _enriched(self, event: Event, deadline: float) -> Envelope:
        info = process_of(event)
        assert info is not None and info.container_id is not None  # queued here only so (emit)
        wait = max(0.0, deadline - time.monotonic())
        fresh = await self.enricher.process_enriched(info.pid, timeout=wait) or info
        if fresh.container is None:
            # The wait is over: the id at least (the cgroup's), so the event does
            # not pass for a host process; later events carry the name.
            fresh = dataclasses.replace(fresh, container=ContainerInfo(id=info.container_id,
                                                                       runtime=fresh.runtime or "unknown"))
        set_process(event, fresh)
        self.remember(fresh)
        return event.envelope()
