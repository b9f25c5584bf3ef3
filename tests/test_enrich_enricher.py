"""The Enricher facade without daemons: process cache keyed by (pid, start
time), exec refresh, and a missing Docker daemon costing one warning."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from pathlib import Path

import pytest

import qtap_devtools.enrich as enrich_mod
from qtap_devtools.enrich import Enricher
from qtap_devtools.enrich.model import ContainerInfo

CONTAINER_ID = "ac55e22af23b9f1c0e1d2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f"


def _write_process(root: Path, pid: int, comm: str, starttime: int, cgroup: str = "0::/\n") -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "stat").write_text(f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {starttime} 0 0\n")
    (d / "status").write_text("Uid:\t0\t0\t0\t0\n")
    (d / "cmdline").write_bytes(comm.encode() + b"\0")
    (d / "cgroup").write_text(cgroup)


@pytest.fixture
def fake_proc(tmp_path):
    root = tmp_path / "proc"
    root.mkdir()
    (root / "stat").write_text("btime 1765557000\n")
    return root


def test_reused_pid_is_a_new_process(fake_proc, monkeypatch):
    # Once its entry is due for a /proc check (at once, here): the exit that
    # freed the pid may have been lost.
    monkeypatch.setattr(enrich_mod, "RECHECK_SECONDS", 0.0)
    enricher = Enricher(docker=False, proc_root=str(fake_proc))
    _write_process(fake_proc, 500, "curl", starttime=1000)
    first = enricher.process(500)
    assert first is not None and first.binary == "curl"
    # The same pid, a later start time: another process.
    _write_process(fake_proc, 500, "wget", starttime=2000)
    second = enricher.process(500)
    assert second is not None and second.binary == "wget"
    assert second.start_time_ns > first.start_time_ns
    assert enricher.stats()["processes"]["cached"] == 1


def test_a_process_is_read_from_proc_once_per_recheck_interval(fake_proc):
    """Every transaction asks for its process: the answer comes from the cache
    until the entry is due for a /proc check, or the pipeline saw the pid exit."""
    enricher = Enricher(docker=False, proc_root=str(fake_proc))
    _write_process(fake_proc, 503, "curl", starttime=1000)
    assert enricher.process(503).binary == "curl"
    (fake_proc / "503" / "stat").unlink()  # a /proc read now would fail
    for _ in range(100):
        assert enricher.process(503).binary == "curl"
    _write_process(fake_proc, 503, "wget", starttime=2000)
    enricher.forget(503)  # the exit, as the pipeline reports it
    assert enricher.process(503).binary == "wget"


def test_exec_is_seen_after_forget(fake_proc):
    enricher = Enricher(docker=False, proc_root=str(fake_proc))
    _write_process(fake_proc, 501, "bash", starttime=1000)
    assert enricher.process(501).binary == "bash"
    _write_process(fake_proc, 501, "python3", starttime=1000)  # exec keeps pid and start time
    assert enricher.process(501).binary == "bash"  # cached
    enricher.forget(501)
    assert enricher.process(501).binary == "python3"


def test_exited_process_is_answered_from_the_cache(fake_proc):
    enricher = Enricher(docker=False, proc_root=str(fake_proc))
    _write_process(fake_proc, 502, "curl", starttime=1000)
    seen = enricher.process(502)
    for f in (fake_proc / "502").iterdir():
        f.unlink()
    (fake_proc / "502").rmdir()
    assert enricher.process(502) == seen
    assert enricher.process(503) is None  # never seen


def test_remember_serves_a_given_process(fake_proc):
    enricher = Enricher(docker=False, proc_root=str(fake_proc))
    _write_process(fake_proc, 504, "node", starttime=1000)
    info = enricher.process(504)
    custom = dataclasses.replace(info, cmdline="node server.js")
    enricher.remember(custom)
    assert enricher.process(504).cmdline == "node server.js"


def test_process_cache_is_bounded_and_counts_evictions(fake_proc):
    enricher = Enricher(docker=False, proc_root=str(fake_proc), process_cache_size=3)
    for pid in range(600, 610):
        _write_process(fake_proc, pid, f"p{pid}", starttime=pid)
        assert enricher.process(pid) is not None
    stats = enricher.stats()["processes"]
    assert stats["cached"] == 3 and stats["evictions"] == 7


def test_container_id_without_any_daemon_gives_a_bare_container(fake_proc):
    enricher = Enricher(docker=False, proc_root=str(fake_proc))
    _write_process(fake_proc, 505, "python3.11", 1000, cgroup=f"0::/system.slice/docker-{CONTAINER_ID}.scope\n")
    info = enricher.process(505)
    assert info.container == ContainerInfo(id=CONTAINER_ID, runtime="docker")
    assert info.container.short_id == "ac55e22af23b"
    assert info.pod is None


def test_no_docker_daemon_is_one_warning_and_fast_none(caplog, fake_proc):
    caplog.set_level(logging.WARNING)
    _write_process(fake_proc, 506, "python3.11", 1000, cgroup=f"0::/system.slice/docker-{CONTAINER_ID}.scope\n")
    enricher = Enricher(docker_url="unix:///nonexistent/docker.sock", proc_root=str(fake_proc))
    began = time.monotonic()
    enricher.start()
    try:
        assert time.monotonic() - began < 0.5
        _until(lambda: enricher.stats()["docker"]["state"].startswith("unavailable"))
        assert enricher.stats()["docker"]["state"] == "unavailable: no socket at /nonexistent/docker.sock"

        began = time.monotonic()
        for _ in range(1000):
            info = enricher.process(506)
        assert time.monotonic() - began < 1.0
        assert info.container.id == CONTAINER_ID and info.container.name is None

        began = time.monotonic()
        info = asyncio.run(enricher.process_enriched(506, timeout=0.05))
        assert time.monotonic() - began < 0.2
        assert info.container.name is None

        time.sleep(1.6)  # several reconnect attempts (0.5 s, then 1 s)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "docker" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "no socket at /nonexistent/docker.sock" in warnings[0].getMessage()
    finally:
        began = time.monotonic()
        enricher.stop()
        assert time.monotonic() - began < 2.5


def test_own_process_through_the_facade():
    enricher = Enricher(docker=False)
    info = enricher.process(os.getpid())
    assert info is not None and info.pid == os.getpid()
    assert asyncio.run(enricher.process_enriched(os.getpid())) == info
    assert enricher.stats()["docker"] == {"state": "disabled"}
    assert enricher.stats()["kubernetes"]["state"].startswith("disabled")


def _until(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_stop_is_bounded_when_the_docker_daemon_hangs(tmp_path):
    # A daemon that accepts and never answers: the lookup threads are stuck in
    # a read nothing can interrupt, and the agent's exit must not wait on them
    # (they are daemon threads) for more than the time stop() is given.
    import socket
    import threading

    path = str(tmp_path / "docker.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(8)], daemon=True).start()
    enricher = Enricher(docker_url="unix://" + path)
    enricher.start()
    deadline = time.monotonic() + 10
    while not held:  # the events thread has connected and is waiting for an answer
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    enricher.stop(timeout=0.3)
    assert time.monotonic() - started < 2.0  # a hang bound: the old code waited 2 s per thread
    assert all(t.daemon for t in enricher.docker._threads)
    server.close()
