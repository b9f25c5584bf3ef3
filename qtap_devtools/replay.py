"""Serve a capture file on the live endpoints, without root."""

from __future__ import annotations

import logging
import platform
import socket
from pathlib import Path

from qtap_devtools import __version__, capfile
from qtap_devtools.broadcast import Broadcaster
from qtap_devtools.config import Config
from qtap_devtools.events import Envelope, SystemConnected
from qtap_devtools.filters import EventFilter
from qtap_devtools.server import Runtime
from qtap_devtools.store import Store

log = logging.getLogger(__name__)

MAX_REPLAY_EVENTS = 2_000_000  # beyond this a file is served in part, and says so
REPLAYED_TYPES_SKIPPED = ("system.",)  # the file's own greetings and goodbyes


def load(path: Path) -> tuple[list[Envelope], list[capfile.BadRecord], int]:
    """Events of a capture file, its bad records, and how many were left out."""
    events: list[Envelope] = []
    bad: list[capfile.BadRecord] = []
    left_out = 0
    for record in capfile.read_events(path):
        if isinstance(record, capfile.BadRecord):
            bad.append(record)
            log.warning("%s:%d: skipped: %s", path, record.line, record.reason)
        elif record.type.startswith(REPLAYED_TYPES_SKIPPED):
            continue
        elif len(events) >= MAX_REPLAY_EVENTS:
            left_out += 1
        else:
            events.append(record)
    if left_out:
        log.warning("%s: served the first %d events; %d more left out", path, MAX_REPLAY_EVENTS, left_out)
    return events, bad, left_out


def build_runtime(config: Config, path: Path) -> Runtime:
    events, bad, left_out = load(path)
    store = Store(transactions=max(config.history_size, 10_000))
    # Replay ids are the record's index in the file: stable across restarts of
    # the same replay, so a page resumes where it was.
    broadcaster = Broadcaster(client_queue_size=config.client_queue_size, history_size=config.history_size,
                              instance="replay")
    broadcaster.add_listener(store.on_published)
    for env in events:
        store.on_event(env)
    capture_state = {
        "state": "replay",
        "file": str(path),
        "events": len(events),
        "badRecords": len(bad),
        "leftOut": left_out,
    }

    def greeting(flt: EventFilter) -> Envelope:
        return SystemConnected(
            version=__version__,
            hostname=socket.gethostname(),
            kernel=platform.release(),
            mode="replay",
            instance=broadcaster.instance,
            capture=capture_state,
            filters=flt.describe(),
        ).envelope()

    return Runtime(
        config=config,
        broadcaster=broadcaster,
        store=store,
        mode="replay",
        greeting=greeting,
        capture_stats=lambda: dict(capture_state),
        not_ready=None,
        replay_events=events,
    )
