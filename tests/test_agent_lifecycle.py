"""The live agent's shutdown: every client told, the process gone within 2 s
(the issue's bound), its port free, and its probes removed after it."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.agentproc import AgentProcess, free_port, get, threads_of

pytestmark = pytest.mark.kernel
STOP_UNDER_LOAD_SECONDS = 6


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


def stopped(proc: AgentProcess, seconds: float) -> int:
    """The agent's exit status once it has exited, within ``seconds`` of a
    signal; else a failure that says what its threads were doing."""
    try:
        return proc.proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        where = threads_of(proc.proc.pid)
        proc.stop(signal.SIGKILL)
        raise AssertionError(f"not stopped in {seconds} s; its threads:\n{where}\n{proc.output()[-3000:]}") from None


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
    rc = stopped(proc, 2)  # removing ~20 uprobes takes the kernel ~6 s: not on our exit path
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


def test_a_pipe_given_as_output_is_at_its_end_when_the_agent_has_exited(tmp_path):
    """``--output >(gzip > f)``: the shell hands the agent the pipe as a
    descriptor of its own; the child left removing the probes must not hold
    it, or gzip finishes seconds after the agent and ``f`` is still empty."""
    r, w = os.pipe()
    port = free_port()
    proc = AgentProcess(["run", "--no-docker", "--listen", f"127.0.0.1:{port}", "--output", f"/dev/fd/{w}"], port,
                        tmp_path / "agent.log", pass_fds=(w,)).start("/readyz")
    os.close(w)
    os.set_blocking(r, False)
    data = b""
    try:
        assert proc.stop(signal.SIGINT) == 0, proc.output()
        while chunk := os.read(r, 1 << 16):  # BlockingIOError: someone still holds the pipe open
            data += chunk
    finally:
        os.close(r)
    assert data.rstrip(b"\n").rsplit(b"\n\n", 1)[-1].startswith(b"event: system.disconnected"), data[-500:]


@contextlib.contextmanager
def every_core_busy():
    """Programs at normal priority spinning on every core: an idle thread gets none."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def test_an_idle_agent_on_a_cpu_other_programs_fill_still_stops_within_seconds(tmp_path):
    """--cpu-priority auto runs the agent idle; a stop must not wait for a
    free core (it took 28 s before the stop lifted every thread).

    Lifted, it shares the cores with the spinners: 0.3-0.5 s here, yet one
    CI run in four took over 2 s (this machine is a VM, its cores shared with
    others).  The bound is a failure bound for the 28 s, not a speed check."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    proc = AgentProcess(["run", "--no-docker", "--listen", listen], port, tmp_path / "agent.log").start("/readyz")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/devtools/api/events?snapshot=false")
    resp = conn.getresponse()
    assert resp.readline().startswith(b"event: system.connected")
    with every_core_busy():
        time.sleep(1)  # the agent's threads idle behind the spinners
        proc.proc.send_signal(signal.SIGINT)
        rc = stopped(proc, STOP_UNDER_LOAD_SECONDS)
        assert rc == 0, proc.output()
        assert b"event: system.disconnected" in resp.read()
        deadline = time.monotonic() + 60  # its probes removed, under the same load
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
    # bcc compiles with fd 2 pointed at a temporary file, to catch its messages
    # (loader._capture_fd2): the stop comes in the middle of the compile.
    deadline = time.monotonic() + 30
    while not os.readlink(f"/proc/{proc.proc.pid}/fd/2").endswith("(deleted)"):
        assert time.monotonic() < deadline, proc.output()
        time.sleep(0.01)
    time.sleep(0.5)
    proc.proc.send_signal(signal.SIGTERM)
    rc = proc.proc.wait(timeout=5)  # a hang bound: compiling alone takes seconds
    out = proc.output()
    assert rc == 0, out  # not a crash in the compiler's teardown (agent.exit_now)
    assert "SIGTERM received; shutting down" in out  # said as it happened, not lost with the compile's fd 2
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
    rc = stopped(proc, 2)
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


@pytest.mark.parametrize("flag, policy, nice, said, helpers", [
    # The ring reader idle too, lifted by the watchdog when behind (priority.py).
    ([], os.SCHED_IDLE, 0, "auto (SCHED_IDLE while keeping up, normal when behind)", ["qtap-attach", "qtap-watchdog"]),
    (["--cpu-priority", "low"], os.SCHED_OTHER, 19, "low (nice 19)", ["qtap-attach", "qtap-ring"]),
])
def test_every_agent_thread_runs_at_the_cpu_priority_asked(tmp_path, flag, policy, nice, said, helpers):
    port = free_port()
    proc = AgentProcess(["run", "--no-docker", "--listen", f"127.0.0.1:{port}", *flag], port,
                        tmp_path / "agent.log").start("/readyz")
    try:
        # Ready means capturing: the ring reader, bcc's and the server's threads all exist.
        threads = agent_threads(proc.proc.pid)
        assert len(threads) >= 3
        service = [t for t, name in threads.items() if name in helpers]
        assert sorted(threads[t] for t in service) == helpers, threads  # --no-docker
        assert "qtap-ring" in threads.values()
        rest = [t for t in threads if t not in service]
        # auto: idle while it keeps up; a start on a busy machine may find it
        # behind and lifted for a moment (priority.HOLD_SECONDS), then lowered.
        deadline = time.monotonic() + 10
        while {os.sched_getscheduler(t) for t in rest} != {policy} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {os.sched_getscheduler(t) for t in rest} == {policy}
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {nice}
        # The exec watcher attaches to new processes, the watchdog (or, without
        # it, the ring reader) notices the agent falling behind: they must get
        # a core when the traced programs take every one, so they run as equals.
        assert {os.sched_getscheduler(t) for t in service} == {os.SCHED_OTHER}
        status, body = get(proc.url + "/devtools/api/stats")
        assert status == 200 and body["capture"]["cpu_priority"] == said
        assert ("cpu_priority_reader_lifts" in body["capture"]) == (not flag)
        assert f"CPU priority {said}" in proc.output()
    finally:
        proc.stop()


def test_an_idle_agent_on_a_cpu_the_traced_programs_fill_is_lifted_by_its_watchdog_and_loses_nothing(tmp_path):
    """--cpu-priority auto: every agent thread but its helpers idle, the ring
    reader too.  Programs at normal priority spinning on every core leave an
    idle thread hardly a core, so the reader can rarely notice that it falls
    behind: the watchdog thread lifts it (or, given a tick by the scheduler,
    the reader finds itself behind and makes the whole agent an equal: one run
    in five here), and then every transaction arrives.  A lone request, far too
    little to fill the ring, arrives too (it lifts the reader once it has
    waited unread, if nothing else gives the reader a core)."""
    from tests import realworld as rw
    from tests.stream import StreamReader

    port, marker, requests = free_port(), f"lift-{os.getpid()}", 1000
    # A 1 MiB ring: lifted at 100 KiB unread; the traffic writes ~1 MiB of records.
    proc = AgentProcess(["run", "--no-docker", "--listen", f"127.0.0.1:{port}", "--ring-mib", "1"], port,
                        tmp_path / "agent.log").start("/readyz")
    try:
        with rw.Nginx(tmp_path, rw.make_cert(tmp_path / "cert")) as nginx, every_core_busy():
            stream = StreamReader(port)
            lone = subprocess.run(["curl", "-sk", "-o", "/dev/null", nginx.url(f"/small?{marker}-lone")], timeout=60)
            assert lone.returncode == 0
            assert len(stream.transactions(f"{marker}-lone", count=2, timeout=60)) == 2, stream.health()
            urls = [nginx.url(f"/small?{marker}={i}") for i in range(requests)]
            done = subprocess.run(["curl", "-sk", "-o", "/dev/null", *urls], timeout=120)
            assert done.returncode == 0
            got = stream.transactions(f"{marker}=", count=2 * requests, timeout=60)  # the client's and nginx's
            capture = get(proc.url + "/devtools/api/stats")[1]["capture"]
            lifted = {k: v for k, v in capture.items() if k.startswith("cpu_priority")}
            assert capture["cpu_priority_reader_lifts"] + capture["cpu_priority_switches"] >= 1, lifted
            assert len(got) == 2 * requests, f"{len(got)} of {2 * requests}; {stream.health()}; {capture}"
            assert capture["lost_records"] == 0 and stream.missed == 0
            stream.close()
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


def test_an_agent_started_while_another_captures_says_so(tmp_path):
    """Two agents both work, but every TLS call then runs both agents' probes:
    the second says so, naming the first (as the lock's holder wrote it)."""
    from qtap_devtools.agentlock import CaptureLock

    first = CaptureLock()  # in the place of a first agent: the same lock, held here
    assert first.claim("http://127.0.0.1:1") is None, "another agent is running on this machine"
    port = free_port()
    try:
        proc = AgentProcess(["run", "--no-docker", "--listen", f"127.0.0.1:{port}"], port,
                            tmp_path / "agent.log").start("/readyz")
        assert proc.stop(signal.SIGINT) == 0, proc.output()
    finally:
        first.release()
    assert (f"another qtap-devtools agent is capturing on this machine (pid {os.getpid()} serving "
            "http://127.0.0.1:1)") in proc.output()


@pytest.mark.parametrize("stdout_is", ["file", "pipe"])
def test_output_to_stdout_keeps_the_status_lines_out_of_the_capture(tmp_path, stdout_is):
    """`run --output /dev/stdout > cap.txt`: the status lines went to the
    same file through stdout, another open of it at its own offset, and
    wrote over the capture's first bytes (the greeting cut, and any line at
    the stop over the first events).  They go to stderr when stdout is the
    capture (`| gzip > f.gz`: a pipe, where they were junk among the frames)."""
    import threading

    from qtap_devtools import capfile
    from qtap_devtools.events import Envelope

    port = free_port()
    cap, err = tmp_path / "cap.txt", tmp_path / "stderr.log"
    with open(cap, "wb") as out, open(err, "wb") as errfh:
        proc = subprocess.Popen([sys.executable, "-m", "qtap_devtools", "run", "--no-docker", "--listen",
                                 f"127.0.0.1:{port}", "--output", "/dev/stdout"],
                                stdout=out if stdout_is == "file" else subprocess.PIPE, stderr=errfh,
                                stdin=subprocess.DEVNULL)
        if stdout_is == "pipe":  # as `| cat > cap.txt` would
            copier = threading.Thread(target=lambda: out.write(proc.stdout.read()), daemon=True)
            copier.start()
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
                with contextlib.suppress(OSError):
                    if get(f"http://127.0.0.1:{port}/readyz", timeout=2)[0] == 200:
                        break
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            assert stopped_process(proc, 30) == 0
            if stdout_is == "pipe":
                copier.join(10)
        finally:
            if proc.poll() is None:
                proc.kill()
    records = list(capfile.read_events(cap))
    assert [r for r in records if not isinstance(r, Envelope)] == [], cap.read_bytes()[:300]
    assert records[0].type == "system.connected" and records[-1].type == "system.disconnected"
    assert "capture running" in err.read_text()


def stopped_process(proc: subprocess.Popen, seconds: float) -> int:
    return proc.wait(timeout=seconds)
