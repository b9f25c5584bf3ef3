"""Capture files: bad records are reported with their line and skipped."""

from __future__ import annotations

from qtap_devtools import capfile
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


def test_writer_appends_exact_frames_and_flushes(tmp_path):
    path = tmp_path / "out.txt"
    w = capfile.CaptureWriter(path)
    frame = samples.session_events()[0].envelope().frame
    w.write(frame)
    assert path.read_bytes() == frame  # visible before close: a crash loses nothing written
    w.close()
