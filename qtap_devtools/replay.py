"""Serve a capture file on the live endpoints, without root."""

from __future__ import annotations

import hashlib
import logging
import platform
import socket
from pathlib import Path
from typing import Callable

from qtap_devtools import __version__, capfile
from qtap_devtools.broadcast import Broadcaster
from qtap_devtools.config import Config
from qtap_devtools.events import HTTP_TRANSACTION, SYSTEM_DROPPED, Envelope, SystemConnected
from qtap_devtools.filters import EventFilter
from qtap_devtools.server import Runtime
from qtap_devtools.store import Store

log = logging.getLogger(__name__)

MAX_REPLAY_EVENTS = 2_000_000  # beyond this a file is served in part, and says so
# Frames held for serving, summed: a replay keeps each event's SSE frame (its
# parsed JSON is let go, as live), so memory is about this much plus the index.
MAX_REPLAY_BYTES = 1 << 30
REPLAYED_TYPES_SKIPPED = ("system.",)  # the file's own greetings and goodbyes
MAX_BAD_LOGGED = 10  # a file of garbage is one summary line past these
# Bad records before the first event past which it is not a capture file: a
# binary or a log is refused after a few megabytes, not read whole; a capture
# behind a long log prefix (stderr in the same file) is still read.
GIVE_UP_BAD = 100_000


def load(
    path: Path, on_event: Callable[[Envelope], None] | None = None, *, max_events: int = MAX_REPLAY_EVENTS,
    max_bytes: int = MAX_REPLAY_BYTES, notes: list[str] | None = None,
) -> tuple[list[Envelope], int, int]:
    """Events of a capture file, how many bad records it has, and how many
    events were left out (past ``max_events`` or ``max_bytes`` of frames).

    ``on_event`` sees each kept event while its JSON is still parsed; then a
    transaction's parsed JSON is let go (read again from the frame if asked),
    so a file of large bodies is held once, not twice.  Raises
    :class:`capfile.NotACaptureFile` when the file has bad records and no event.
    What a reader of the file should be told (the stream it saved missed
    events) is logged and, if given, appended to ``notes``.
    """
    events: list[Envelope] = []
    bad = 0
    first_bad: capfile.BadRecord | None = None
    left_out = 0
    held = 0
    # Bad records are told once the file has shown an event: a file of none
    # (a binary, a log) is refused in one line, not after a screen of them.
    untold: list[capfile.BadRecord] = []
    seen = False
    # The stream the file holds missed events: its client fell behind, or
    # the agent's --output did (system.dropped).  Skipped with the other
    # system events, the file passed for all the traffic.
    missed = 0
    missed_why: str | None = None

    def tell(record: capfile.BadRecord) -> None:
        if record.line:
            log.warning("%s:%d: skipped: %s", path, record.line, record.reason)
        else:  # the file as a whole (a gzip stream cut short): no line to name
            log.warning("%s: %s", path, record.reason)

    for record in capfile.read_events(path):
        if isinstance(record, capfile.BadRecord):
            bad += 1
            first_bad = first_bad or record
            if bad <= MAX_BAD_LOGGED:
                if seen:
                    tell(record)
                else:
                    untold.append(record)
            if bad >= GIVE_UP_BAD and not seen:
                break
            continue
        if not seen:
            seen = True
            for earlier in untold:
                tell(earlier)
        if record.type.startswith(REPLAYED_TYPES_SKIPPED):
            if record.type == SYSTEM_DROPPED:
                count = record.body["data"].get("missed")
                if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                    missed += count
                    reason = record.body["data"].get("reason")
                    missed_why = missed_why or (reason if isinstance(reason, str) else None)
            continue
        elif left_out or len(events) >= max_events or held + len(record.frame) > max_bytes:
            left_out += 1  # and every later one: what is served is the file's start, without gaps
        else:
            if on_event is not None:
                on_event(record)
            if record.type == HTTP_TRANSACTION:
                record.release()
            events.append(record)
            held += len(record.frame)
    if MAX_BAD_LOGGED < bad and seen:
        log.warning("%s: %d more bad records skipped", path, bad - MAX_BAD_LOGGED)
    if first_bad is not None and not seen:
        raise capfile.NotACaptureFile(
            f"{path}: not a capture file? {bad if bad < GIVE_UP_BAD else 'the first %d' % bad} records bad, none an "
            f"event (line {first_bad.line}: {first_bad.reason}). Capture files are written by `run --output FILE` "
            "or `curl -sN …/devtools/api/events > FILE`")
    if not seen and not bad:
        log.warning("%s: no events in this file (empty, or only comments)", path)
    if missed:
        note = (f"the stream saved in this file missed {missed} event{'s' if missed > 1 else ''}"
                + (f" (system.dropped: {missed_why})" if missed_why else " (system.dropped)"))
        log.warning("%s: %s", path, note)
        if notes is not None:
            notes.append(note)
    if left_out:
        log.warning("%s: served the first %d events (%d MiB of frames); %d more left out (limits: %d events, "
                    "%d MiB)", path, len(events), held >> 20, left_out, max_events, max_bytes >> 20)
    return events, bad, left_out


def replay_instance(path: Path) -> str:
    """``replay-`` and a digest of the file's identity (where it is, its size, when it changed)."""
    try:
        st = path.stat()
        identity = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    except OSError:
        identity = str(path)
    return "replay-" + hashlib.blake2b(identity.encode("utf-8", "replace"), digest_size=5).hexdigest()


def build_runtime(config: Config, path: Path) -> Runtime:
    store = Store(transactions=max(config.history_size, 10_000))
    notes: list[str] = []
    events, bad, left_out = load(path, store.on_event, notes=notes)
    # Replay ids are the record's index in the file, tagged with the file:
    # stable across restarts of the same replay, so a page resumes where it
    # was; another file on the same port is another instance, so a page
    # resuming from the last one's ids is given all of this one.
    broadcaster = Broadcaster(client_queue_size=config.client_queue_size, history_size=config.history_size,
                              instance=replay_instance(path))
    broadcaster.add_listener(store.on_published)
    capture_state = {
        "state": "replay",
        "file": str(path),
        "events": len(events),
        "badRecords": bad,
        "leftOut": left_out,
        **({"notes": notes} if notes else {}),
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
        capture_state=lambda: dict(capture_state),
        not_ready=None,
        replay_events=events,
    )
