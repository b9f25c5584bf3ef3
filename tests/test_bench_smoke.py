"""The bench harness still runs end to end (``--quick``: a few hundred requests per run).

It checks the harness, not the agent's speed: the last stdout line is one JSON
object with every headline key, of the right type, and results.json is written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")

NUMBERS = (
    "w1_tuned", "w1_entry", "w1_floor_tuned", "w1_floor_entry", "w1_sslsniff", "w2_tuned", "w2_entry",
    "rate10k_added_cpu_us", "rate10k_completeness", "rate10k_p99_added_us", "sse_delay_p99_ms", "rss_mb",
    "rate10k_agent_cpu_us", "rate10k_sse_client_cpu_us", "rate10k_apps_added_cpu_us",
)


def test_quick_bench_prints_every_headline_key(tmp_path):
    out = tmp_path / "results.json"
    stats_before = STATS.read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--probe-stats", "--output", str(out),
         "--agent-args", "--ring-mib 8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    head = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in NUMBERS:
        assert isinstance(head[key], (int, float)) and not isinstance(head[key], bool), (key, head[key], proc.stderr[-3000:])
    for key in ("w1_tuned", "w1_entry", "w1_floor_tuned", "w1_floor_entry", "w1_sslsniff", "w2_tuned", "w2_entry"):
        assert head[key] > 0, key
    assert 0 <= head["rate10k_completeness"] <= 1.5
    assert head["rss_mb"] > 0
    assert isinstance(head["saturation_drops_counted"], bool)
    assert "PASS" in proc.stdout or "MISS" in proc.stdout  # the targets are reported
    results = json.loads(out.read_text())
    assert results["headline"] == head
    assert {r["setup"] for r in results["runs"]} == {
        "untraced", "floor_entry", "floor_tuned", "sslsniff", "agent_tuned", "agent_entry"}
    assert not [r for r in results["runs"] if "error" in r]
    # --agent-args reached both agents (the default ring is 32 MiB).
    assert results["config"]["agent_args"] == ["--ring-mib", "8"]
    assert {r["ring_mib"] for r in results["runs"] if r["setup"].startswith("agent_")} == {8}
    assert "the agent run with --ring-mib 8" in proc.stdout
    # --probe-stats: the programs each setup holds ran, and were timed, on every request.
    for setup in ("floor_tuned", "agent_tuned", "agent_entry"):
        cell = results["setups"][setup]["rate10k"]
        assert cell["probe_bpf_runs_per_request"] >= 4 and cell["probe_bpf_us_per_request"] > 0, (setup, cell)
    assert results["setups"]["untraced"]["rate10k"]["probe_bpf_runs_per_request"] == 0
    # nginx and wrk's own CPU is measured in every run (wrk's once it is reaped).
    assert all(r["apps_cpu_us_per_request"] > 0 for r in results["runs"]), results["runs"]
    assert "agent --attach-mode auto: BPF run time per request" in proc.stdout
    assert STATS.read_text() == stats_before  # put back as it was


def test_a_short_soak_reports_memory_with_the_agent_options_it_ran():
    """``make bench-soak``'s harness, a few thousand transactions: it cannot rot."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--transactions", "2000", "--chunk-seconds", "1",
         "--agent-args", "--queue-size 512"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Each side of a request once; wrk counts a request when its response came, so
    # the (up to 4) in flight when a chunk's wrk stops are on the stream but not in its count.
    in_flight = 4 * len(result["samples"])
    assert result["transactions"] >= 2000 and (result["requests"] + in_flight) * 2 >= result["transactions"]
    assert result["agent_args"] == ["--queue-size", "512"] and "agent options: --queue-size 512" in proc.stdout
    assert 50 < result["peak_rss_mb"] < 1000 and isinstance(result["pass"], bool)
    assert result["samples"] and all(s["max_rss_mb"] > 0 for s in result["samples"])


def test_soak_refuses_agent_options_it_cannot_split():
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--agent-args", "'unclosed"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--agent-args: No closing quotation" in proc.stderr


def test_two_checkouts_agents_trace_the_same_run_side_by_side():
    """``bench.ab``'s harness (this checkout against itself, a trickle): both
    agents put every transaction on their streams and each one's CPU is read."""
    proc = subprocess.run([sys.executable, "-m", "bench.ab", ".", "--quick", "--runs", "2", "--seconds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [line for line in proc.stdout.splitlines() if line.startswith("run ")]
    assert [r.split(" (")[1].split(" started")[0] for r in runs] == ["this", "other"]  # the order alternates
    for line in runs:
        assert "on the stream: this 1.000, other 1.000" in line, proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("median difference (this - other): ")


def test_a_checkout_that_is_not_set_up_is_refused_with_a_reason(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.ab", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "is not a set-up checkout" in proc.stderr and "make setup" in proc.stderr


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_bench_stopped_by_sigterm_leaves_no_agent_nginx_or_wrk_behind():
    """SIGTERM (or a closed terminal's SIGHUP) mid-measurement unwinds like Ctrl-C."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", "--quick", "--only", "agent_tuned",
                             "--output", "/dev/null"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines, kids, left, names = [], set(), [], {}
    try:
        # wrk runs once the agent is up: then every kind of child exists.
        for line in proc.stderr:
            lines.append(line)
            if "agent_tuned: w1: starting the setup" in line:
                break
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            kids = {k for k in _descendants(proc.pid) if _alive(k)}
            names = {k: _comm(k) for k in kids}
            if "wrk" in names.values():
                break
            time.sleep(0.1)
        assert {"wrk", "nginx"} <= set(names.values()), (names, "".join(lines))
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        # Whatever failed, nothing is left to the tests after: an agent left
        # running would trace them all (a first version of this test left one).
        left = [k for k in kids if _alive(k)]
        for k in left:
            os.kill(k, signal.SIGKILL)
    assert rc == 128 + signal.SIGTERM, rest
    assert "stopped by SIGTERM; cleaning up" in rest
    assert not left, {k: names.get(k) for k in left}
