"""The compiled parts are built, current and the ones in use.

Outside CI a machine without a compiler runs the Python and skips this; under
CI the suite must test what ships compiled, so a missing build fails.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qtap_devtools import compiled


def test_every_compiled_module_is_built_and_imported_from_its_build():
    ok, detail = compiled.describe()
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{detail} (make setup builds them)")
        pytest.skip(detail)
    for name in [*compiled.C_PARTS, *compiled.MYPYC_MODULES]:
        module = importlib.import_module("qtap_devtools." + name.replace("/", "."))
        assert module.__file__.endswith(compiled.SUFFIX), module.__file__


def test_a_source_edited_after_its_build_is_reported_stale(tmp_path, monkeypatch):
    (tmp_path / "pipeline.py").write_text("# source\n")
    built = tmp_path / f"pipeline{compiled.SUFFIX}"
    built.write_bytes(b"")
    os.utime(built, (1_000_000, 1_000_000))  # built long before the edit
    monkeypatch.setattr(compiled, "PACKAGE", tmp_path)
    monkeypatch.setattr(compiled, "C_PARTS", {})
    monkeypatch.setattr(compiled, "MYPYC_MODULES", ("pipeline",))
    assert compiled.stale() == ["pipeline"]
    ok, detail = compiled.describe()
    assert not ok and "older than their source" in detail and f"{compiled.MYPYC_GROUP}__mypyc" in detail
    os.utime(built)  # rebuilt now
    assert compiled.stale() == []


def test_the_interpreted_path_still_passes_the_reassembly_pipeline_and_event_tests():
    """Without a compiler the same Python runs interpreted: keep that path
    tested (QTAP_INTERPRETED=1 loads the .py even when built)."""
    env = {**os.environ, "QTAP_INTERPRETED": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_compiled.py::test_modules_load_from_where_asked",
         "tests/test_assemble_http1.py", "tests/test_pipeline.py", "tests/test_events.py",
         "tests/test_broadcast.py", "tests/test_store.py"],
        cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-500:]


def test_modules_load_from_where_asked():
    interpreted = bool(os.environ.get("QTAP_INTERPRETED"))
    if not interpreted and compiled.missing():
        pytest.skip("not built")
    for name in compiled.MYPYC_MODULES:
        module = importlib.import_module("qtap_devtools." + name.replace("/", "."))
        assert module.__file__.endswith(".py" if interpreted else compiled.SUFFIX), module.__file__


def test_the_classes_declared_acyclic_are_not_tracked_by_the_cycle_collector():
    """``@mypyc_attr(acyclic=True)`` took: the records, heads, messages and
    envelopes made for every transaction are not linked into the collector's
    lists (mypyc_attrs).  Run as Python the decorator does nothing."""
    import gc

    from qtap_devtools.assemble.http1_parse import Head, Message
    from qtap_devtools.assemble.model import HttpExchange, HttpRequest, HttpResponse
    from qtap_devtools.broadcast import Published
    from qtap_devtools.capture.chunk import DataChunk
    from qtap_devtools.events import Envelope, HttpMessage

    if os.environ.get("QTAP_INTERPRETED") or compiled.missing():
        pytest.skip("runs as Python")
    request, response = HttpRequest("GET", "/", "HTTP/1.1", ()), HttpResponse(200, "OK", "HTTP/1.1", ())
    envelope = Envelope("t", {"data": {}}, b"frame", 0, [1, "a", {"b": None}])
    made = [DataChunk(1, 1, 3, 0, "egress", "openssl", 0, b"x"), Head(True), request, response,
            HttpExchange(request, response, 0, None, None, 0), HttpMessage({"a": "b"}, b"", 0), envelope,
            Published(1, envelope, b"id: x-1\n")]
    assert [type(o).__name__ for o in made if gc.is_tracked(o)] == []
    assert gc.is_tracked(Message(Head(True), 0, 0))  # its exchange may point back at it: tracked


def test_the_python_runs_when_asked_or_when_the_compiled_runtime_is_missing(tmp_path, monkeypatch):
    assert compiled.run_source_instead({"QTAP_INTERPRETED": "1"})
    if not compiled.missing():
        assert not compiled.run_source_instead({})
    monkeypatch.setattr(compiled, "PACKAGE", tmp_path)  # a build that left the group runtime out
    assert compiled.run_source_instead({})


def test_the_agent_says_at_start_up_when_it_runs_slower_than_it_could(monkeypatch):
    assert "QTAP_INTERPRETED" in compiled.running_note({"QTAP_INTERPRETED": "1"})
    monkeypatch.setattr(compiled, "missing", lambda: ["pipeline"])
    note = compiled.running_note({})
    assert "not built" in note and "pipeline" in note and "make setup" in note
    monkeypatch.setattr(compiled, "missing", lambda: [])
    monkeypatch.setattr(compiled, "stale", lambda: [])
    assert compiled.running_note({}) is None
