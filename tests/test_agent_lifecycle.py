"""The live agent's shutdown: every client told, the process gone within 2 s
(the issue's bound), its port free, and its probes removed after it."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import time

import pytest

from tests.agentproc import AgentProcess, free_port, get

pytestmark = pytest.mark.kernel


def processes_with(text: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmd = open(f"/proc/{name}/cmdline", "rb").read().replace(b"\0", b" ")
            except OSError:
                continue
            if text.encode() in cmd:
                found.append(int(name))
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_live_agent_says_goodbye_and_exits_within_two_seconds(tmp_path, sig):
    port = free_port()
    listen = f"127.0.0.1:{port}"
    proc = AgentProcess(["run", "--no-docker", "--listen", listen], port, tmp_path / "agent.log").start("/readyz")
    streams = []
    for _ in range(2):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/devtools/api/events?snapshot=false")
        resp = conn.getresponse()
        assert resp.readline().startswith(b"event: system.connected")
        streams.append(resp)
    proc.proc.send_signal(sig)
    rc = proc.proc.wait(timeout=2)  # removing ~20 uprobes takes the kernel ~6 s: not on our exit path
    assert rc == 0, proc.output()
    for resp in streams:
        assert b"event: system.disconnected" in resp.read()
    with socket.socket() as s:  # free at once for a restart (which, like uvicorn, reuses addresses)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    # The probes are removed by a child that outlives the agent; it is gone
    # once the kernel has removed them (a failure bound, not a speed check).
    deadline = time.monotonic() + 60
    while processes_with(listen):
        assert time.monotonic() < deadline, "the detaching child never exited"
        time.sleep(0.2)


def test_an_agent_that_exits_on_an_error_leaves_its_port_free(tmp_path):
    """`run | head -3`: once head has gone, the agent's next status line fails
    (a broken pipe) and it exits with an error, its server still up.  The
    child that outlives it to remove the probes must not hold the port."""
    import subprocess
    import sys

    port = free_port()
    with open(tmp_path / "stderr.log", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "qtap_devtools", "run", "--no-docker", "--listen",
                                 f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        try:
            lines = [proc.stdout.readline() for _ in range(3)]  # CPU priority, serving, starting capture
            assert b"starting capture" in lines[-1], lines
            proc.stdout.close()  # head exits
            rc = proc.wait(timeout=120)  # at its next line, once capture runs
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == 1 and b"Broken pipe" in (tmp_path / "stderr.log").read_bytes()
    with socket.socket() as s:  # free at once, as after a signal
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    deadline = time.monotonic() + 60
    while processes_with(f"127.0.0.1:{port}"):
        assert time.monotonic() < deadline, "the detaching child never exited"
        time.sleep(0.2)


def test_a_signal_while_the_probes_compile_stops_the_agent_without_waiting_for_them(tmp_path):
    port = free_port()
    proc = AgentProcess(["run", "--no-docker", "--listen", f"127.0.0.1:{port}"], port,
                        tmp_path / "agent.log").start("/healthz")  # serving; capture still starting
    deadline = time.monotonic() + 30
    while "starting capture" not in proc.output():
        assert time.monotonic() < deadline, proc.output()
        time.sleep(0.01)
    proc.proc.send_signal(signal.SIGTERM)
    rc = proc.proc.wait(timeout=5)  # a hang bound: compiling alone takes seconds
    out = proc.output()
    assert rc == 0, out
    assert "SIGTERM received" in out or "shutting down" in out
    assert "capture running" not in out  # it stopped before capture was up, not after


def test_a_signal_while_the_probes_are_placed_exits_within_two_seconds(tmp_path):
    """Stopped once the first library has its probes, while the start-up thread
    places more: the process exits within the bound, not after the kernel has
    removed what was placed (~6 s); a child that outlives it takes that wait."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    proc = AgentProcess(["run", "--no-docker", "--listen", listen], port, tmp_path / "agent.log").start("/healthz")
    deadline = time.monotonic() + 60
    while "attached to" not in proc.output():
        assert time.monotonic() < deadline, proc.output()
        time.sleep(0.01)
    proc.proc.send_signal(signal.SIGTERM)
    rc = proc.proc.wait(timeout=2)
    assert rc == 0, proc.output()
    assert "capture running" not in proc.output()
    deadline = time.monotonic() + 60
    while processes_with(listen):
        assert time.monotonic() < deadline, "the detaching child never exited"
        time.sleep(0.2)


def agent_threads(pid: int) -> dict[int, str]:
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            out[int(t)] = open(f"/proc/{pid}/task/{t}/comm").read().strip()
    return out


@pytest.mark.parametrize("flag, policy, nice, said", [
    ([], os.SCHED_IDLE, 0, "auto (SCHED_IDLE while keeping up, normal when behind)"),
    (["--cpu-priority", "low"], os.SCHED_OTHER, 19, "low (nice 19)"),
])
def test_every_agent_thread_runs_at_the_cpu_priority_asked(tmp_path, flag, policy, nice, said):
    port = free_port()
    proc = AgentProcess(["run", "--no-docker", "--listen", f"127.0.0.1:{port}", *flag], port,
                        tmp_path / "agent.log").start("/readyz")
    try:
        # Ready means capturing: the ring reader, bcc's and the server's threads all exist.
        threads = agent_threads(proc.proc.pid)
        assert len(threads) >= 3
        service = [t for t, name in threads.items() if name.startswith("qtap-")]
        assert sorted(threads[t] for t in service) == ["qtap-attach", "qtap-ring"], threads  # --no-docker
        rest = [t for t in threads if t not in service]
        assert {os.sched_getscheduler(t) for t in rest} == {policy}
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {nice}
        # The ring reader measures how far behind the agent is, the exec
        # watcher attaches to new processes: they must get a core when the
        # traced programs take every one, so they run as equals.
        assert {os.sched_getscheduler(t) for t in service} == {os.SCHED_OTHER}
        status, body = get(proc.url + "/devtools/api/stats")
        assert status == 200 and body["capture"]["cpu_priority"] == said
        assert f"CPU priority {said}" in proc.output()
    finally:
        proc.stop()


def test_each_run_appended_to_an_output_file_begins_with_its_greeting_and_ends_with_its_goodbye(tmp_path):
    """Two runs append to one --output file: each run's part starts with the
    agent's system.connected (its instance, version, host), as a stream saved
    with curl does, and a stopped run's ends with its system.disconnected."""
    from qtap_devtools import capfile

    out = tmp_path / "capture.txt"
    for _ in range(2):
        port = free_port()
        proc = AgentProcess(["run", "--no-docker", "--listen", f"127.0.0.1:{port}", "--output", str(out)], port,
                            tmp_path / "agent.log").start("/healthz")
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=10) == 0, proc.output()
    events = [e for e in capfile.read_events(out) if not isinstance(e, capfile.BadRecord)]
    system = [(e.type, e.inner) for e in events if e.type.startswith("system.")]
    assert [t for t, _ in system] == ["system.connected", "system.disconnected"] * 2, system
    first, second = system[0][1], system[2][1]
    assert first["instance"] != second["instance"] and first["mode"] == "live"
    assert first["version"] and first["hostname"] == socket.gethostname()
    assert system[1][1]["reason"] == "agent shutting down"
    assert events[0].type == "system.connected"  # nothing of a run before its greeting
