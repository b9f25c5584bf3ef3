"""Capture files: bad records are reported with their line and skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtap_devtools import capfile, har, replay
from qtap_devtools.events import Envelope
from tests import samples


def test_roundtrip_of_written_events(tmp_path):
    path = samples.write_capture(tmp_path / "c.txt")
    got = list(capfile.read_events(path))
    assert all(isinstance(r, Envelope) for r in got)
    assert [r.type for r in got] == [e.type for e in samples.session_events()]


def test_corrupt_and_truncated_records_are_reported_and_skipped(tmp_path):
    good = samples.session_events()[0].envelope().frame
    path = tmp_path / "c.txt"
    path.write_bytes(
        good
        + b": keep-alive\n\n"
        + b"event: process.started\ndata: {not json\n\n"
        + b"garbage line\n\n"
        + good
        + b"event: process.started\ndata: {\"data\": {\"pid\": 1}, \"ts\": \"2025-"  # cut mid-write
    )
    got = list(capfile.read_events(path))
    bad = [r for r in got if isinstance(r, capfile.BadRecord)]
    assert sum(isinstance(r, Envelope) for r in got) == 2
    assert [b.line for b in bad] == [6, 9, 15]
    assert "bad JSON" in bad[0].reason and "truncated" in bad[2].reason


def test_a_record_that_is_not_utf8_says_so(tmp_path):
    path = tmp_path / "c.txt"
    data = b'{"data": {"pid": 1, "exe": "\xff"}}'
    path.write_bytes(b"event: process.started\ndata: " + data + b"\n\n")
    (bad,) = capfile.read_events(path)
    assert isinstance(bad, capfile.BadRecord)
    at = data.index(b"\xff")
    assert bad.reason == f"bad JSON in process.started: not valid UTF-8 (byte 0xff at offset {at} of its data)"


def test_an_overlong_line_or_event_is_one_bad_record_and_never_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(capfile, "MAX_LINE", 1000)
    good = samples.session_events()[0].envelope().frame
    path = tmp_path / "c.txt"
    path.write_bytes(
        good
        + b"event: process.started\ndata: " + b"x" * 5000 + b"\n\n"  # one line too long
        + b"event: process.started\n" + b"data: " + b"y" * 600 + b"\n" + b"data: " + b"z" * 600 + b"\n"
        + b"data: more\n\n"  # many lines, one event too long
        + good
    )
    read = []
    real = capfile._bounded_lines

    def watched(fh):
        for line in real(fh):
            read.append(len(line))
            yield line

    monkeypatch.setattr(capfile, "_bounded_lines", watched)
    got = list(capfile.read_events(path))
    assert [type(r).__name__ for r in got] == ["Envelope", "BadRecord", "BadRecord", "Envelope"]
    assert "line longer than 1000 bytes" in got[1].reason and got[1].line == 5
    assert "event longer than 1000 bytes" in got[2].reason and got[2].line == 7
    assert max(read) == 1001  # what was read of the long line


def test_writer_appends_exact_frames_and_flushes(tmp_path):
    path = tmp_path / "out.txt"
    w = capfile.CaptureWriter(path)
    frame = samples.session_events()[0].envelope().frame
    w.write(frame)
    assert w.flush(timeout=10)
    assert path.read_bytes() == frame  # written out before close: a crash loses nothing written
    w.close()


def test_a_run_appending_to_a_file_cut_mid_frame_loses_none_of_its_own_events(tmp_path):
    """An earlier run killed mid-write left half a frame: the new run's first
    event was glued onto it and lost with it."""
    events = samples.session_events()
    path = tmp_path / "out.txt"
    whole = events[0].envelope().frame
    path.write_bytes(whole + events[1].envelope().frame[:40])  # the earlier run, killed
    w = capfile.CaptureWriter(path)
    for e in events[2:4]:
        w.write(e.envelope().frame)
    w.close()
    got = list(capfile.read_events(path))
    assert [r.type for r in got if isinstance(r, Envelope)] == [events[0].type, events[2].type, events[3].type]
    assert sum(isinstance(r, capfile.BadRecord) for r in got) == 1  # the cut frame, alone


def test_a_byte_order_mark_and_a_last_id_line_without_its_newline_lose_nothing(tmp_path):
    frames = [e.envelope().frame for e in samples.session_events()[:2]]
    path = tmp_path / "edited.txt"
    path.write_bytes(b"\xef\xbb\xbf" + frames[0] + frames[1][:-1] + b"id: 7")  # saved by an editor, cut after the id
    got = list(capfile.read_events(path))
    assert [type(r) for r in got] == [Envelope, Envelope]


def test_a_gzip_capture_is_read_through_gzip_and_a_cut_one_keeps_what_came_before(tmp_path, caplog):
    import gzip

    data = b"".join(e.envelope().frame for e in samples.session_events())
    path = tmp_path / "c.txt.gz"
    path.write_bytes(gzip.compress(data))
    assert [r.type for r in capfile.read_events(path)] == [e.type for e in samples.session_events()]
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    got = list(capfile.read_events(cut))
    assert isinstance(got[0], Envelope) and isinstance(got[-1], capfile.BadRecord)
    assert "gzip" in got[-1].reason
    with caplog.at_level("WARNING", logger="qtap_devtools.replay"):
        replay.load(cut)
    said = [r.getMessage() for r in caplog.records if "gzip stream" in r.getMessage()]  # (tmp_path says "gzip")
    assert len(said) == 1 and said[0].startswith(f"{cut}: the gzip stream ends early")  # not "{cut}:0:"


# --------------------------------------------------------------------------
# Valid JSON, wrong shape: a bad record too (the store, filters and HAR read these fields)


def _record(event_type: str, body: dict) -> bytes:
    import orjson

    return b"event: %s\ndata: %s\n\n" % (event_type.encode(), orjson.dumps({**body, "ts": "2025-12-12T16:58:10.452Z"}))


def _tx(inner: dict) -> bytes:
    return _record("request.http_transaction", {"data": {"data": {"requestId": "r1", "data": "e30=", **inner}}})


@pytest.mark.parametrize("record, says", [
    (_record("process.started", {"data": "x"}), '"data" is not an object'),
    (_record("process.started", {"data": {"pid": 1, "container": "c"}}), "data.container is not an object"),
    (_record("process.stopped", {"data": {"pid": [1]}}), "data.pid is not a plain value"),
    (_tx({"summary": "oops"}), "data.data.summary is not an object"),
    (_tx({"summary": {"request_path": 5}}), "summary.request_path is not text"),
    (_tx({"summary": {"response_status": [200]}}), "summary.response_status is not a plain value"),
    (_tx({"requestId": {"a": 1}}), "data.data.requestId is not a plain value"),
    (_record("connection.opened", {"data": {"data": {"meta": "m"}}}), "data.data.meta is not an object"),
    (_record("connection.closed", {"data": {"data": {"meta": {"connectionId": ["c"]}}}}),
     "meta.connectionId is not a plain value"),
    (_record("connection.opened", {"data": {"data": {"source": {"container": 3}}}}),
     "source.container is not an object"),
])
def test_a_record_of_the_wrong_shape_is_a_bad_record_with_its_reason(tmp_path, record, says):
    good = samples.session_events()[0].envelope().frame
    path = tmp_path / "c.txt"
    path.write_bytes(good + record + good)
    got = list(capfile.read_events(path))
    bad = [r for r in got if isinstance(r, capfile.BadRecord)]
    assert sum(isinstance(r, Envelope) for r in got) == 2
    assert len(bad) == 1 and bad[0].line == good.count(b"\n") + 1 and says in bad[0].reason, bad


def test_every_event_the_agent_writes_has_the_shape_readers_expect(tmp_path):
    path = samples.write_capture(tmp_path / "c.txt")
    assert not [r for r in capfile.read_events(path) if isinstance(r, capfile.BadRecord)]


# --------------------------------------------------------------------------
# Loading for replay and HAR


def test_load_keeps_frames_lets_transaction_json_go_and_indexes_each_event_first(tmp_path):
    path = samples.write_capture(tmp_path / "c.txt")
    seen = []
    events, bad, left_out = replay.load(path, lambda env: seen.append((env.type, env.inner.get("requestId"))))
    assert (bad, left_out) == (0, 0) and len(seen) == len(events)
    txs = [e for e in events if e.type == "request.http_transaction"]
    assert [rid for t, rid in seen if t == "request.http_transaction"] == [t.inner["requestId"] for t in txs]
    # Held as frames only (one copy of a big body, not two); still readable from the frame.
    assert all(t._body is None for t in txs)
    assert txs[0].body["data"]["data"]["summary"]["request_method"] == "POST"


def test_load_past_its_byte_limit_serves_the_start_of_the_file_and_counts_the_rest(tmp_path):
    path = samples.write_capture(tmp_path / "c.txt")
    everything, _, _ = replay.load(path)
    limit = sum(len(e.frame) for e in everything[:3])
    events, _, left_out = replay.load(path, max_bytes=limit)
    assert [e.frame for e in events] == [e.frame for e in everything[:3]]  # a prefix: no gaps
    assert left_out == len(everything) - 3
    events, _, left_out = replay.load(path, max_events=2)
    assert len(events) == 2 and left_out == len(everything) - 2


def test_a_file_of_no_events_is_not_a_capture_file(tmp_path):
    path = tmp_path / "binary"
    path.write_bytes(bytes(range(256)) * 4000 + b"\n")
    with pytest.raises(capfile.NotACaptureFile, match="not a capture file"):
        replay.load(path)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert replay.load(empty) == ([], 0, 0)  # empty is a capture of nothing, not an error


def test_events_after_a_long_prefix_of_other_lines_are_read(tmp_path):
    """stderr in the same file: 1,000 log lines before the first event made
    the whole capture "not a capture file"."""
    path = tmp_path / "logged.txt"
    log = b"".join(b"2026-12-05 INFO log line %d\n" % i for i in range(5000))
    path.write_bytes(log + samples.write_capture(tmp_path / "c.txt").read_bytes())
    events, bad, _ = replay.load(path)
    assert bad == 5000 and [e.type for e in events] == [e.type for e in samples.session_events()]


def test_the_largest_transaction_the_agent_keeps_is_one_line_a_replay_reads(tmp_path):
    """--max-body-bytes at its most on both sides: the agent's own capture
    file must replay it (at 256m, a 36 MiB body made a line replay refused)."""
    import os

    from qtap_devtools.cli import MAX_BODY_BYTES

    conn = samples.connection("d4u4jhg7p3qk26l91icg", "api.example.com")
    big = samples.transaction(conn, "d4u4jhg7p3qk26l91id0", request_body=os.urandom(MAX_BODY_BYTES),
                              response_body=os.urandom(MAX_BODY_BYTES))
    frame = big.envelope().frame
    assert len(frame) <= capfile.MAX_LINE
    writer = capfile.CaptureWriter(tmp_path / "big.txt")
    assert writer.max_pending_bytes >= 2 * len(frame)  # both ends of it queue together
    writer.write(frame)
    writer.close()
    [event] = [e for e in capfile.read_events(tmp_path / "big.txt")]
    assert isinstance(event, Envelope) and event.type == "request.http_transaction"


def test_har_leaves_out_only_the_transactions_it_cannot_convert_and_says_so(tmp_path):
    import base64

    import orjson

    def tx_record(rid: str, tx: object) -> bytes:
        data = base64.b64encode(orjson.dumps(tx)).decode()
        return _record("request.http_transaction", {"data": {"data": {"requestId": rid, "data": data}}})

    path = samples.write_capture(tmp_path / "c.txt")
    with open(path, "ab") as fh:
        get = {"method": "GET"}
        fh.write(tx_record("bad-body", {"request": {**get, "body": "!!not base64!!"}}))
        fh.write(tx_record("bad-duration", {"request": get, "duration_ms": "abc"}))
        fh.write(tx_record("a-list", [1]))
        fh.write(tx_record("not-a-tx", {"not": "a transaction"}))  # was an entry of empty strings
        # Converted: a Location header whose value list is empty, or not text.
        fh.write(tx_record("no-location", {"request": get, "response": {"status": 302, "headers": {"Location": []}}}))
        fh.write(tx_record("odd-location", {"request": get, "response": {"status": 301, "headers": {"location": 7}}}))
    events, _, _ = replay.load(path)
    doc = har.from_envelopes(events)
    entries = doc["log"]["entries"]  # in the order they started: the hand-made ones first
    assert [e["response"]["status"] for e in entries] == [302, 301, 200, 404, 500]
    assert [e["response"]["redirectURL"] for e in entries[:2]] == ["", ""]
    assert doc["log"]["comment"].startswith("4 transactions left out, not convertible (first: bad-body: "
                                            "request.body is not valid base64")


class _Trickle:
    """A file that takes at most 5 bytes a write, then fails: a disk filling up."""

    def __init__(self, room: int) -> None:
        self.data, self.room = bytearray(), room

    def write(self, b) -> int:
        if self.room <= 0:
            raise OSError(28, "No space left on device")
        n = min(5, len(b), self.room)
        self.data += bytes(b[:n])
        self.room -= n
        return n

    def close(self) -> None:
        pass


def test_writer_finishes_short_writes_and_counts_what_it_could_not_write(tmp_path, caplog):
    frames = [e.envelope().frame for e in samples.session_events()[:4]]
    w = capfile.CaptureWriter(tmp_path / "out.txt")
    w._fh = _Trickle(room=len(frames[0]) + 10)
    for f in frames[:3]:
        w.write(f)
    assert w.flush(timeout=10)
    assert (w.written, w.errors) == (1, 2)
    w._fh.room = 1 << 20  # space again
    w.write(frames[3])
    assert w.flush(timeout=10)
    assert (w.written, w.errors) == (2, 2)
    # Said once when it starts, and when it ends, with what it cost.
    said = [r.getMessage() for r in caplog.records if r.name == "qtap_devtools.capfile"]
    assert said == [f"capture file {tmp_path / 'out.txt'}: [Errno 28] No space left on device; events not saved "
                    "are counted (file_write_errors)",
                    f"capture file {tmp_path / 'out.txt'}: writing again; 2 events not saved"]
    # The cut frame reads back as one bad record, and the events either side of it whole.
    path = tmp_path / "cut.txt"
    path.write_bytes(bytes(w._fh.data))
    got = list(capfile.read_events(path))
    assert [r.frame for r in got if isinstance(r, Envelope) and r.type != "system.dropped"] == [frames[0], frames[3]]
    assert sum(isinstance(r, capfile.BadRecord) for r in got) == 1
    # And the file says it lacks the two (once it could be written to again).
    assert [r.body["data"]["missed"] for r in got if isinstance(r, Envelope) and r.type == "system.dropped"] == [2]


def test_an_unwritable_output_file_is_counted_in_the_agents_stats(tmp_path):
    from qtap_devtools.agent import Agent
    from qtap_devtools.config import Config

    agent = Agent(Config(output=Path("/dev/full"), docker=False))
    for e in samples.session_events()[:4]:
        agent.broadcaster.publish(e.envelope())
    assert agent.writer.flush(timeout=10)
    stats = agent.capture_stats()
    # The run's greeting and the four events.
    assert (stats["file_events_written"], stats["file_write_errors"], stats["file_events_dropped"]) == (0, 5, 0)
    agent.writer.close()


def test_a_stalled_output_never_blocks_the_publisher_and_what_it_cannot_take_is_counted(tmp_path):
    # A FIFO nobody reads: a write to it blocks.  The event loop must not.
    import os

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    keep_open = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads
    try:
        frames = [e.envelope().frame for e in samples.session_events()]
        w = capfile.CaptureWriter(fifo, max_pending_bytes=256 << 10)
        big = frames[0] * (1 + (80 << 10) // len(frames[0]))  # ~80 KiB: the pipe holds 64
        for _ in range(20):
            w.write(big)  # returns at once every time
        assert w.dropped > 0 and w.written < 20
        assert not w.flush(timeout=0.2)  # still stuck on the pipe
        dropped, written = w.dropped, w.written
        unwritten = w.close(timeout=0.2)  # gives up on it rather than hang, and says what it left
        # All 20 accounted for: written, refused while queued, left at the close,
        # or the one frame the writer is stuck inside.
        assert unwritten > 0 and w.dropped == dropped + unwritten
        assert written + w.dropped in (19, 20), (written, w.dropped)
    finally:
        os.close(keep_open)


def test_a_cut_gzip_capture_keeps_every_event_a_cut_plain_one_keeps(tmp_path):
    """A gzip file cut anywhere (gzip killed before it flushed: Ctrl-C on a
    shell's `--output >(gzip > f.gz)`) gives every event that `zcat` gives
    whole.  The last complete event was lost: gzip's error came while the
    parser still held it, waiting for its blank line."""
    import gzip
    import zlib

    # Frames as the agent writes them, each with its id line.
    data = b"".join(e.envelope().frame[:-1] + b"id: i-%d\n\n" % n for n, e in enumerate(samples.session_events(), 1))
    packed = gzip.compress(data)
    for cut_at in range(20, len(packed), 3):
        cut = tmp_path / "cut.txt.gz"
        cut.write_bytes(packed[:cut_at])
        plain = tmp_path / "cut.txt"
        plain.write_bytes(zlib.decompressobj(wbits=31).decompress(packed[:cut_at]))  # what zcat prints
        want = [r.frame for r in capfile.read_events(plain) if isinstance(r, Envelope)]
        got = list(capfile.read_events(cut))
        assert [r.frame for r in got if isinstance(r, Envelope)] == want, cut_at
        assert isinstance(got[-1], capfile.BadRecord) and "gzip" in got[-1].reason


def test_a_run_appended_after_a_cut_gzip_member_is_read_and_a_corrupt_members_start_kept(tmp_path):
    """`--output >(gzip >> f.gz)` appends one gzip member per run.  A run
    whose gzip was killed leaves a cut member, and the next run's member
    follows it: the file was refused whole ("not a capture file?", exit 1),
    the cut member's readable start and every later run lost, because the
    decompressor's error dropped what the failing read had decoded and
    nothing looked past it."""
    import gzip

    def frames(prefix: str) -> bytes:
        return b"".join(e.envelope().frame[:-1] + b"id: %s-%d\n\n" % (prefix.encode(), n)
                        for n, e in enumerate(samples.session_events(), 1))

    first, second = frames("run1"), frames("run2")
    a, b = gzip.compress(first), gzip.compress(second)
    whole = [r.frame for r in capfile.read_events(samples.write_capture(tmp_path / "plain.txt"))]
    for cut_at in (len(a) // 3, len(a) // 2, len(a) - 9):  # inside the data, and inside the trailer
        path = tmp_path / "runs.txt.gz"
        path.write_bytes(a[:cut_at] + b)
        got = list(capfile.read_events(path))
        events = [r for r in got if isinstance(r, Envelope)]
        plain = tmp_path / "cut.txt"
        plain.write_bytes(zlib_prefix(a[:cut_at]))
        kept = [r for r in capfile.read_events(plain) if isinstance(r, Envelope)]
        # The cut member's events as zcat shows them, then every event of the next run.
        assert [e.frame for e in events] == [e.frame for e in kept] + whole, cut_at
        assert any(isinstance(r, capfile.BadRecord) and "gzip" in r.reason for r in got)
    # A member corrupt in its middle: what it decoded before the damage is kept.
    mid = len(a) // 2
    path = tmp_path / "corrupt.txt.gz"
    path.write_bytes(a[:mid] + bytes(x ^ 0x55 for x in a[mid : mid + 40]) + a[mid + 40 :] + b)
    events = [r for r in capfile.read_events(path) if isinstance(r, Envelope)]
    assert len(events) >= len(kept_prefix(a, mid)) + len(whole)
    # And a replay serves it: the file is not refused.
    got, bad, _ = replay.load(path)
    assert len(got) >= len(whole) and bad >= 1


def zlib_prefix(data: bytes) -> bytes:
    """What zcat prints of a gzip member cut short (all it can decode)."""
    import zlib

    d, out = zlib.decompressobj(wbits=31), []
    for i in range(len(data)):
        try:
            out.append(d.decompress(data[i : i + 1]))
        except zlib.error:
            break
    return b"".join(out)


def kept_prefix(packed: bytes, cut_at: int) -> list:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".txt") as fh:
        fh.write(zlib_prefix(packed[:cut_at]))
        fh.flush()
        return [r for r in capfile.read_events(Path(fh.name)) if isinstance(r, Envelope)]


def test_a_stalled_output_is_said_to_write_again_only_once_it_has_caught_up(tmp_path, caplog):
    """After an event was dropped, any smaller one that still fitted the
    queue logged "writing again" though the pipe had not taken a byte more
    (a stalled `--output >(gzip > f)` said so, then fell behind again)."""
    import os
    import time

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # reads nothing until the test drains it
    try:
        frames = [e.envelope().frame for e in samples.session_events()]
        w = capfile.CaptureWriter(fifo, max_pending_bytes=256 << 10)
        big = frames[0] * (1 + (100 << 10) // len(frames[0]))
        with caplog.at_level("WARNING", logger="qtap_devtools.capfile"):
            for _ in range(6):
                w.write(big)
            assert w.dropped > 0
            w.write(frames[1])  # small: it fits, but nothing has been written
            time.sleep(0.2)
            assert not any("writing again" in r.getMessage() for r in caplog.records)
            end = time.monotonic() + 10
            while not w.flush(timeout=0.05):  # the reader catches up
                assert time.monotonic() < end
                try:
                    while os.read(reader, 1 << 20):
                        pass
                except BlockingIOError:
                    pass
            said = [r.getMessage() for r in caplog.records if "writing again" in r.getMessage()]
            assert said == [f"capture file {fifo}: writing again; {w.dropped} event{'s' if w.dropped > 1 else ''} "
                            "not saved"], said
        w.close(timeout=1)
    finally:
        os.close(reader)


def _dropped(missed: int, reason: str = "client fell behind; its queue overflowed") -> bytes:
    from qtap_devtools.events import SystemDropped

    return SystemDropped(missed=missed, total_missed=missed, reason=reason).envelope().frame


def test_a_saved_stream_that_missed_events_says_so_when_replayed_or_converted(tmp_path, caplog):
    """`curl -sN …/events > f` from a client that fell behind holds the
    agent's system.dropped: replay and har skipped it with the other system
    events, and showed the file as if it held all the traffic."""
    import json
    import subprocess
    import sys

    frames = [e.envelope().frame for e in samples.session_events()]
    path = tmp_path / "slow.txt"
    path.write_bytes(b"".join(frames[:3]) + _dropped(720) + b"".join(frames[3:]) + _dropped(5))
    notes: list[str] = []
    with caplog.at_level("WARNING", logger="qtap_devtools.replay"):
        events, bad, _ = replay.load(path, notes=notes)
    assert bad == 0 and len(events) == len(frames)
    assert notes == ["the stream saved in this file missed 725 events (system.dropped: client fell behind; its "
                     "queue overflowed)"]
    assert any("missed 725 events" in r.getMessage() for r in caplog.records)
    r = subprocess.run([sys.executable, "-m", "qtap_devtools", "har", str(path)], capture_output=True, text=True,
                       timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    assert "missed 725 events" in json.loads(r.stdout)["log"]["comment"]
    assert "missed 725 events" in r.stderr


def test_events_the_output_file_could_not_take_are_marked_in_it_once_it_catches_up(tmp_path):
    """The file's own drops were counted in the agent's stats only: the file
    read back later as whole.  Once caught up, the writer says in it how
    many events it left out, as a slow client's stream does."""
    import os
    import time

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    got = bytearray()
    try:
        frames = [e.envelope().frame for e in samples.session_events()]
        w = capfile.CaptureWriter(fifo, max_pending_bytes=256 << 10)
        big = frames[0] * (1 + (100 << 10) // len(frames[0]))
        for _ in range(6):
            w.write(big)
        dropped = w.dropped
        assert dropped > 0
        end = time.monotonic() + 10
        while not w.flush(timeout=0.05):
            assert time.monotonic() < end
            try:
                while chunk := os.read(reader, 1 << 20):
                    got += chunk
            except BlockingIOError:
                pass
        w.write(frames[1])
        assert w.flush(timeout=5)
        w.close(timeout=1)
        try:
            while chunk := os.read(reader, 1 << 20):
                got += chunk
        except BlockingIOError:
            pass
    finally:
        os.close(reader)
    path = tmp_path / "read.txt"
    path.write_bytes(bytes(got))
    records = [r for r in capfile.read_events(path) if isinstance(r, Envelope)]
    marks = [r for r in records if r.type == "system.dropped"]
    assert [m.body["data"]["missed"] for m in marks] == [dropped]
    assert "capture file" in marks[0].body["data"]["reason"]
    assert records[-1].frame == frames[1]  # and writing went on after it
    notes: list[str] = []
    replay.load(path, notes=notes)
    assert notes and f"missed {dropped} event" in notes[0]
