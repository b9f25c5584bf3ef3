"""``doctor``: capture possible here (as root), impossible without root, and
each line names its check and, when it fails, the fix."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qtap_devtools import doctor
from tests.agentproc import ROOT


def run_doctor(prefix: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "qtap_devtools", "doctor"], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)


def unprivileged() -> list[str]:
    """A command prefix that drops root (as root), or nothing (already not root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.mark.kernel
def test_doctor_reports_capture_possible_here():
    btf_present = Path("/sys/kernel/btf/vmlinux").exists()
    tracefs_mounted = Path("/sys/kernel/tracing/events").is_dir()  # before doctor's trial probe mounts it
    r = run_doctor()
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "capture possible" in out
    for name in ("root", "bpf", "btf", "tracefs", "tracepoints", "uprobes", "kprobes", "bcc", "kernel headers",
                 "trial probe", "tls libraries", "capture probes", "docker"):
        assert f"] {name}:" in out, f"no {name} line in:\n{out}"
    assert "[ok  ] trial probe" in out
    # No kprobes here, and that must not count against capture.
    assert "[ok  ] kprobes: absent — fine" in out or "[ok  ] kprobes: available" in out
    # BTF is required (task storage); capture is possible here, so it is present.
    assert btf_present
    assert "[ok  ] btf: /sys/kernel/btf/vmlinux present" in out
    assert "[ok  ] trial probe: compiled, verified and attached a tracepoint probe with a ring buffer and task storage" \
        in out
    if tracefs_mounted:
        assert "[ok  ] tracefs: mounted at /sys/kernel/tracing" in out
    else:
        assert "[warn] tracefs: not mounted at /sys/kernel/tracing" in out
        assert "fix: mount -t tracefs none /sys/kernel/tracing" in out


def test_doctor_without_root_exits_1_and_says_to_run_as_root():
    r = run_doctor(unprivileged())
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    lines = out.splitlines()
    root = [line for line in lines if line.startswith("[FAIL] root:")]
    assert len(root) == 1, out
    assert "fix: run as root: sudo qtap-devtools" in root[0]
    assert lines[-1].startswith("capture cannot work here: fix root")
    # Every check reports under its own name, none crashes for lack of permission.
    names = [line.split("] ", 1)[1].split(":", 1)[0] for line in lines if line.startswith("[")]
    assert names == ["root", "bpf", "btf", "tracefs", "tracepoints", "uprobes", "kprobes", "bcc", "compiled parts", "kernel headers",
                     "trial probe", "tls libraries", "capture probes", "docker", "running agent"], out
    assert "check crashed" not in out
    # Each failing line says how to fix it, once.
    for line in lines:
        if line.startswith("[FAIL]"):
            assert line.count("fix:") == 1, line


# --------------------------------------------------------------------------
# Checks one by one, on a fake /sys


def test_btf_line(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "BTF", tmp_path / "vmlinux")
    check = doctor._btf()
    assert not check.ok and check.required
    assert check.line() == ("[FAIL] btf: no kernel BTF — fix: a kernel with CONFIG_DEBUG_INFO_BTF=y (the probes keep "
                            "each thread's TLS call in task storage, which needs it)")
    (tmp_path / "vmlinux").write_bytes(b"\x9f\xeb")
    check = doctor._btf()
    assert check.ok and check.line() == f"[ok  ] btf: {tmp_path / 'vmlinux'} present"


def test_tracefs_and_tracepoint_lines(tmp_path, monkeypatch):
    tracefs = tmp_path / "tracing"
    monkeypatch.setattr(doctor, "TRACEFS", tracefs)
    tracefs.mkdir()
    check = doctor._tracefs()
    assert check.line() == f"[warn] tracefs: not mounted at {tracefs} (the agent mounts it at start) " \
                           f"— fix: mount -t tracefs none {tracefs}"
    tp = doctor._tracepoints()
    assert not tp.ok and tp.required and f"mount -t tracefs none {tracefs}" in tp.line()
    for name in ("syscalls/sys_enter_connect", "syscalls/sys_exit_read", "sched/sched_process_exec"):
        (tracefs / "events" / name).mkdir(parents=True)
    assert doctor._tracefs().line() == f"[ok  ] tracefs: mounted at {tracefs}"
    tp = doctor._tracepoints()
    assert not tp.ok and "sock/inet_sock_set_state" in tp.detail
    (tracefs / "events" / "sock/inet_sock_set_state").mkdir(parents=True)
    assert doctor._tracepoints().line() == "[ok  ] tracepoints: syscalls, sched and sock tracepoints available"


def fake_checks(monkeypatch, **results):
    names = ["_root", "_bpf_syscall", "_btf", "_tracefs", "_tracepoints", "_uprobes", "_kprobes", "_bcc", "_compiled",
             "_tls_libraries", "_capture_probes", "_docker"]
    for name in names:
        monkeypatch.setattr(doctor, name, results.get(name, lambda n=name: doctor.Check(n.strip("_"), True, "fine")))
    monkeypatch.setattr(doctor, "_headers", results.get("_headers", lambda c: doctor.Check("kernel headers", True, "ok")))
    monkeypatch.setattr(doctor, "_trial_load", results.get("_trial_load", lambda c: doctor.Check("trial probe", True, "ok")))


def test_exit_status_counts_required_failures_only(monkeypatch):
    lines: list[str] = []
    fake_checks(monkeypatch, _docker=lambda: doctor.Check("docker", False, "no daemon", "start it", required=False))
    assert doctor.run(print_fn=lines.append) == 0
    assert "[warn] docker: no daemon — fix: start it" in lines and lines[-1].startswith("capture possible")

    lines.clear()
    fake_checks(monkeypatch, _uprobes=lambda: doctor.Check("uprobes", False, "no uprobe support", "a kernel with X"))
    assert doctor.run(print_fn=lines.append) == 1
    assert "[FAIL] uprobes: no uprobe support — fix: a kernel with X" in lines
    assert lines[-1] == "capture cannot work here: fix uprobes (see above)"


def test_a_crashing_check_is_a_failure_under_its_own_name(monkeypatch):
    def boom(cache_dir):
        raise PermissionError(13, "Permission denied")

    lines: list[str] = []
    fake_checks(monkeypatch, _headers=boom)
    assert doctor.run(print_fn=lines.append) == 1
    assert any(line.startswith("[FAIL] kernel headers: check crashed: PermissionError") for line in lines), lines
    assert lines[-1] == "capture cannot work here: fix kernel headers (see above)"


def test_running_agent_line_reports_a_real_agent_with_nothing_dropped(tmp_path):
    from tests import samples
    from tests.agentproc import agent, free_port

    capture = samples.write_capture(tmp_path / "c.txt")
    port = free_port()
    with agent(["replay", str(capture)], port, tmp_path / "a.log") as proc:
        check = doctor._running_agent(proc.url)
    assert check.ok and check.detail.startswith(f"replay agent at {proc.url}") and "nothing dropped" in check.detail


def test_an_agent_started_with_a_token_is_not_reported_absent(tmp_path):
    from tests import samples
    from tests.agentproc import agent, free_port

    capture = samples.write_capture(tmp_path / "c.txt")
    port = free_port()
    with agent(["replay", str(capture), "--token", "s3cr/t"], port, tmp_path / "a.log") as proc:
        without = doctor._running_agent(proc.url)
        wrong = doctor._running_agent(proc.url, "nope")
        right = doctor._running_agent(proc.url, "s3cr/t")
        # The start-up line says how to reach it with the token.  It is printed
        # once uvicorn says it started, which can be just after it first answers.
        deadline = time.monotonic() + 10
        while "serving" not in proc.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "/devtools?token=<token, percent-encoded>" in proc.output()
    assert not without.ok and "started with --token" in without.detail and "QTAP_TOKEN" in without.fix
    assert not wrong.ok and "token was wrong" in wrong.detail
    assert right.ok and "nothing dropped" in right.detail


def test_running_agent_line_names_every_drop_counter(monkeypatch):
    """The agent's stats are stood in for (a loss cannot be forced on a replay
    agent): each counter in DROP_COUNTERS is named with its count."""
    import io

    stats = b'{"mode": "live", "uptime_seconds": 3.5, "capture": {"lost_records": 1200, "pending_dropped_total": 0,' \
            b' "cpu_priority": "auto (SCHED_IDLE while keeping up, normal when behind)", "cpu_priority_now": "normal",' \
            b' "cpu_priority_reader_lifts": 1234, "probe_arming": "none (BPF_LINK_CREATE for a perf event: Invalid argument)",' \
            b' "tuned_analysis_failures": 2,' \
            b' "enrich": {"kubernetes": {"state": "unavailable: [Errno 111] Connection refused"},' \
            b' "docker": {"state": "connected"}}},' \
            b' "broadcast": {"subscriberDrops": 7}}'
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: io.BytesIO(stats))
    check = doctor._running_agent("http://127.0.0.1:10001")
    assert not check.ok and not check.required
    assert "1,200 records the kernel could not fit in the ring buffer" in check.detail
    assert "7 events slow clients missed" in check.detail and "dropped before publishing" not in check.detail
    assert check.line().endswith("— fix: a bigger --ring-mib; fewer or faster clients, or a bigger --queue-size")
    assert "CPU priority auto (SCHED_IDLE while keeping up, normal when behind), now normal, the ring reader " \
           "lifted 1,234 times by its watchdog;" in check.detail
    assert "probe arming none (BPF_LINK_CREATE" in check.detail
    assert "2 TLS library analyses failed (those files have entry probes" in check.detail
    assert "kubernetes unavailable: [Errno 111] Connection refused (pod names come only from" in check.detail
    assert "docker" not in check.detail


def test_a_failing_output_file_is_given_its_own_fix(monkeypatch):
    """`run --output /dev/full`: the fix is about the file, not the ring or clients."""
    import io

    stats = b'{"mode": "live", "uptime_seconds": 2, "capture": {"file_write_errors": 126}, "broadcast": {}}'
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: io.BytesIO(stats))
    line = doctor._running_agent("http://127.0.0.1:10001").line()
    assert "126 events the --output file lacks (writes failed: disk full?)" in line
    assert line.endswith("— fix: free space where --output writes, or another --output"), line


def test_no_running_agent_is_fine(monkeypatch):
    from tests.agentproc import free_port

    check = doctor._running_agent(f"http://127.0.0.1:{free_port()}")
    assert check.ok and check.detail.startswith("none answers")


def test_a_front_with_an_untrusted_certificate_or_another_server_is_said_as_it_is(tmp_path):
    """`doctor --agent https://…` at the agent's TLS front (a self-signed
    certificate): before, "none answers at …" as if no agent ran."""
    import http.server
    import ssl
    import threading

    from tests.realworld import make_cert

    cert = make_cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert, cert.key)

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>not an agent</html>")

        def log_message(self, *args):
            pass

    for tls in (True, False):
        httpd = http.server.HTTPServer(("127.0.0.1", 0), Page)
        if tls:
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            url = f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}"
            check = doctor._running_agent(url)
        finally:
            httpd.shutdown()
            httpd.server_close()
        assert not check.ok and not check.required, check
        if tls:
            assert f"cannot check the agent at {url}: its TLS certificate is not trusted (self" in check.detail
            assert "--agent http://127.0.0.1:10001" in check.line()
        else:
            assert check.detail.startswith(f"what answers at {url} is not a qtap-devtools agent"), check


def test_unbuilt_or_stale_compiled_parts_are_a_warning_with_the_fix(monkeypatch):
    from qtap_devtools import compiled

    assert doctor._compiled().ok, compiled.describe()[1]
    monkeypatch.setattr(compiled, "missing", lambda: ["capture/_ringread"])
    check = doctor._compiled()
    assert not check.ok and not check.required
    assert "make setup" in check.line() and "not built" in check.detail and "capture/_ringread" in check.detail
    monkeypatch.setattr(compiled, "missing", lambda: [])
    monkeypatch.setattr(compiled, "stale", lambda: ["pipeline"])
    check = doctor._compiled()
    assert not check.ok and "older than their source" in check.detail and "pipeline" in check.detail


