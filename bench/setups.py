"""What runs beside the traced programs in each setup.

A setup is a context manager (start before the runs, stop after) with two
hooks around every wrk run: ``begin(workload)`` just before wrk starts and
``end(run)`` once it has finished, which returns the setup's own measurements
(probe hits, lost samples, the agent's stream and counters).
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import orjson

from bench.sse import SseCounter
from bench.workload import BenchNginx, Workload, WrkResult, busy_jiffies
from qtap_devtools.capture.links import tracers
from tests.realworld import free_port

ROOT = Path(__file__).resolve().parent.parent
FLOOR_C = Path(__file__).with_name("floor.c")
SSLSNIFF = Path("/usr/sbin/sslsniff-bpfcc")
LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
FLOOR_SYMBOLS = ("SSL_read", "SSL_write")


@dataclass
class Run:
    """One wrk run under one setup, handed to ``Setup.end``."""

    workload: Workload
    wrk: WrkResult
    nginx: BenchNginx
    log_offset: int
    busy_at_wrk_end: int
    quick: bool


class SetupUnavailable(Exception):
    """This setup cannot run here; the message says why (the bench goes on without it)."""


class Setup:
    name = "untraced"
    label = "untraced"

    def __enter__(self) -> "Setup":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def pids(self) -> list[int]:
        """Processes this setup runs besides the harness (their CPU is part of its cost)."""
        return []

    def client_pids(self) -> list[int]:
        """The harness's own children reading what the setup reports (their CPU
        counts as the harness's)."""
        return []

    def begin(self, workload: Workload) -> None:
        pass

    def end(self, run: Run) -> dict:
        return {}


class Untraced(Setup):
    pass


# ---------------------------------------------------------------------------
# The floor: count-only probes


class Floor(Setup):
    """A tiny bcc program that counts SSL_read/SSL_write calls, nothing else.

    ``entry``: uprobe + uretprobe at the symbols (the classic attach).
    ``tuned``: plain uprobes at the sites ``tuned.analyze()`` proves for this
    libssl, where the kernel emulates the probed instruction.
    """

    def __init__(self, mode: str, libssl: str = LIBSSL) -> None:
        self.mode = mode
        self.name = f"floor_{mode}"
        self.label = f"floor, {mode} sites (count only)"
        self.libssl = libssl
        self.bpf = None
        self.hits0 = 0

    def __enter__(self) -> "Floor":
        from bcc import BPF

        from qtap_devtools.capture.links import Links

        # Placed as the agent places its own (links.py): a perf event per
        # probe, removed by closing it.  bcc's own attach needs tracefs to
        # detach (unmounted on a fresh machine: its cleanup failed midway and
        # left probes behind) and, in Debian's bcc 0.26, registers the probe
        # with a stray reference-counter offset, which makes the kernel refuse
        # the agent's probes on the same instruction in later setups.
        self.bpf = BPF(src_file=str(FLOOR_C).encode())
        self.links = Links()
        prog = self.bpf.load_func(b"count_hit", BPF.KPROBE).fd

        def place(ret: bool, sym: str = "", addr: int | None = None) -> None:
            module, offset = BPF._check_path_symbol(self.libssl.encode(), sym.encode(), addr, -1)
            self.links.attach(prog, module, offset, ret, cookie=0)

        try:
            if self.mode == "entry":
                for sym in FLOOR_SYMBOLS:
                    place(False, sym=sym)
                    place(True, sym=sym)
            else:
                from qtap_devtools.capture.tuned import SitePlan, analyze

                plans = analyze(self.libssl, FLOOR_SYMBOLS)
                for sym, plan in plans.items():
                    if not isinstance(plan, SitePlan):
                        raise SetupUnavailable(f"no tuned sites in {self.libssl} for {sym}: {plan.reason}")
                    place(False, addr=plan.entry_vaddr)
                    place(plan.return_kind != "uprobe", addr=plan.return_vaddr)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bpf is not None:
            self.links.close()
            self.bpf.cleanup()
            self.bpf = None
        # This process compiled with bcc too: while it holds LLVM's pages, the
        # agent's own are shared and the kernel will not page them out, so the
        # agent's RSS would count ~70 MB of compiler it has already let go.
        from qtap_devtools.capture.loader import release_compiler_pages

        release_compiler_pages()

    def hits(self) -> int:
        return sum(sum(v) for v in self.bpf["hits"].values())

    def begin(self, workload: Workload) -> None:
        self.hits0 = self.hits()

    def end(self, run: Run) -> dict:
        hits = self.hits() - self.hits0
        return {"probe_hits": hits, "probe_hits_per_request": round(hits / max(1, run.wrk.requests), 2)}


# ---------------------------------------------------------------------------
# bcc's sslsniff


# On kernels whose minmax.h makes min() a statement expression with a
# compile-time type check, bcc's rewriter turns it into a call of a non-static
# helper and clang refuses ("cannot call non-static helper function").  The fix
# is one line: a plain conditional instead of min().
SSLSNIFF_BROKEN = "min((size_t)MAX_BUF_SIZE, (size_t)len)"
SSLSNIFF_FIXED = "((size_t)len < MAX_BUF_SIZE ? (size_t)len : (size_t)MAX_BUF_SIZE)"
SSLSNIFF_POLL = "while 1:\n    try:\n        b.perf_buffer_poll()"
READY = "bench: sslsniff ready"
LOST = re.compile(r"Possibly lost (\d+) samples")


def patched_sslsniff(directory: Path, source: Path = SSLSNIFF) -> Path:
    """A temporary copy of sslsniff with the one-line fix and a ready marker on stderr."""
    if not source.exists():
        raise SetupUnavailable(f"{source} missing (apt-get install bpfcc-tools)")
    text = source.read_text()
    if SSLSNIFF_BROKEN in text:
        text = text.replace(SSLSNIFF_BROKEN, SSLSNIFF_FIXED)
    if SSLSNIFF_POLL not in text:
        raise SetupUnavailable(f"{source}: its poll loop is not where the bench expects it")
    marker = f"__import__('sys').stderr.write({READY!r} + chr(10)); __import__('sys').stderr.flush()\n"
    text = text.replace(SSLSNIFF_POLL, marker + SSLSNIFF_POLL, 1)
    out = directory / "sslsniff.py"
    out.write_text(text)
    return out


class Sslsniff(Setup):
    """``sslsniff`` as a user runs it (all its libraries), output to /dev/null.

    It has no lost-sample callback, so bcc reports overflowing perf buffers as
    ``Possibly lost N samples`` on stderr: we count those.
    """

    name = "sslsniff"
    label = "bcc sslsniff > /dev/null"

    def __enter__(self) -> "Sslsniff":
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-sslsniff-")
        d = Path(self.tmp.name)
        script = patched_sslsniff(d)
        self.err_path = d / "stderr"
        self.err = open(self.err_path, "wb")
        # Debian's bcc is for the system python, not necessarily our venv's.
        self.proc = subprocess.Popen(["/usr/bin/python3", str(script)], stdout=subprocess.DEVNULL,
                                     stderr=self.err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while READY not in self._stderr().splitlines():
            if self.proc.poll() is not None:
                tail = self._stderr().strip().splitlines()[-3:]
                self.__exit__()
                raise SetupUnavailable(f"sslsniff exited {self.proc.returncode}: {' / '.join(tail)}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise SetupUnavailable("sslsniff not attached after 90 s")
            time.sleep(0.1)
        return self

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def _stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()
        self.tmp.cleanup()

    def begin(self, workload: Workload) -> None:
        self.offset = len(self._stderr())

    def end(self, run: Run) -> dict:
        time.sleep(0.5)  # let it report the last overflow
        found = [int(n) for n in LOST.findall(self._stderr()[self.offset:])]
        return {"lost_sample_messages": len(found), "lost_samples": sum(found),
                "alive": self.proc.poll() is None}


# ---------------------------------------------------------------------------
# The agent


def _get_json(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return orjson.loads(resp.read())


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in kB."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


DROP_COUNTERS = (("capture", "lost_records"), ("capture", "pending_dropped_total"), ("broadcast", "subscriberDrops"))


class Agent(Setup):
    """``python -m qtap_devtools run --attach-mode MODE`` with one SSE client reading everything."""

    def __init__(self, mode: str, extra_args: list[str] | None = None, checkout: Path | None = None) -> None:
        """``checkout``: run that checkout's agent, with its own virtual
        environment (``bench.ab``), instead of this one's."""
        self.checkout = checkout
        self.mode = mode
        self.cli_mode = "auto" if mode == "tuned" else "entry"
        self.name = f"agent_{mode}"
        self.label = f"agent, --attach-mode {self.cli_mode}"
        self.extra = extra_args or []
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.reader: SseCounter | None = None
        self.attach = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Agent":
        self.tracers_before = set(tracers({os.getpid()}))
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-agent-")
        self.log_path = Path(self.tmp.name) / "agent.log"
        self.log = open(self.log_path, "wb")
        python, cwd = (sys.executable, ROOT) if self.checkout is None else (
            str(self.checkout / ".venv" / "bin" / "python"), self.checkout)
        self.proc = subprocess.Popen(
            [python, "-m", "qtap_devtools", "run", "--listen", f"127.0.0.1:{self.port}",
             "--attach-mode", self.cli_mode, "--no-docker", *self.extra],
            cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                tail = " / ".join(self.output().strip().splitlines()[-3:])
                self.__exit__()
                raise SetupUnavailable(f"agent exited {self.proc.returncode}: {tail}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise SetupUnavailable("agent not ready after 120 s")
            time.sleep(0.2)
        self.attach = self._attach_description()
        if self.attach == "unknown":
            refused = [line for line in self.output().splitlines() if "could not attach to" in line and "libssl" in line]
            self.__exit__()
            raise SetupUnavailable(f"the agent did not attach to libssl: {refused[0] if refused else 'no word of it'}")
        self.reader = SseCounter(self.port)
        self.rss_max = 0
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_rss, name="rss", daemon=True)
        self._poller.start()
        return self

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def client_pids(self) -> list[int]:
        return [self.reader.pid] if self.reader is not None else []

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _attach_description(self) -> str:
        """How the agent says it attached to libssl (e.g. "openssl, entry probes")."""
        for line in self.output().splitlines():
            m = re.search(r"attached to \S*libssl\S* \(([^)]*)\)", line)
            if m:
                return m.group(1)
        return "unknown"

    def _poll_rss(self) -> None:
        while not self._stop.wait(0.25):
            rss = _status(self.proc.pid).get("VmRSS", 0)
            self.rss_max = max(self.rss_max, rss)

    def __exit__(self, *exc: object) -> None:
        if getattr(self, "_stop", None) is not None:
            self._stop.set()
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # The agent exits at once and leaves its probes to a child that detaches
        # them (seconds): the next setup's measurement must not run beside them.
        deadline = time.monotonic() + 30
        while set(tracers({os.getpid()})) - self.tracers_before and time.monotonic() < deadline:
            time.sleep(0.2)
        self.log.close()
        self.tmp.cleanup()

    def stats(self) -> dict:
        return _get_json(self.url + "/devtools/api/stats")

    def drops(self, stats: dict) -> dict[str, int]:
        return {key: int(stats.get(section, {}).get(key, 0) or 0) for section, key in DROP_COUNTERS}

    @staticmethod
    def shed_calls(stats: dict) -> int:
        return int(stats.get("capture", {}).get("shed_calls", 0) or 0)

    @staticmethod
    def priority_changes(stats: dict) -> tuple[int, int]:
        """(times --cpu-priority auto went normal, times its watchdog lifted the ring reader)."""
        capture = stats.get("capture", {})
        return (int(capture.get("cpu_priority_switches", 0) or 0),
                int(capture.get("cpu_priority_reader_lifts", 0) or 0))

    def begin(self, workload: Workload) -> None:
        stats = self.stats()
        self.stats0 = self.drops(stats)
        self.shed0 = self.shed_calls(stats)
        self.priority0 = self.priority_changes(stats)
        self.missed0 = self.reader.missed
        self.rss_max = 0

    def end(self, run: Run) -> dict:
        w, reader = run.workload, self.reader
        client_pid, server_pid = run.wrk.pid, run.nginx.worker_pid
        want_client = run.wrk.requests
        want_server = run.nginx.completed_since(run.log_offset, w.path)
        # Let the stream drain: done when both sides are complete, or nothing
        # new has arrived for a while (a saturated agent may still be working
        # through its ring buffer), or the settle budget is spent.
        quiet_needed = 3.0
        budget = 20.0 if run.quick else 45.0
        start = time.monotonic()
        busy_end, last_total = run.busy_at_wrk_end, -1
        settled = False
        while time.monotonic() - start < budget:
            total = reader.tx_total(w.path)
            if total != last_total:
                busy_end, last_total = busy_jiffies(), total
            if reader.count(w.path, client_pid) >= want_client and reader.count(w.path, server_pid) >= want_server:
                settled = True
                break
            if reader.quiet_for(w.path, start) >= quiet_needed:
                settled = True
                break
            time.sleep(0.2)
        stats = self.stats()
        switches, lifts = self.priority_changes(stats)
        drops = {k: v - self.stats0[k] for k, v in self.drops(stats).items()}
        drops["sse_missed"] = reader.missed - self.missed0
        got_client, got_server = reader.count(w.path, client_pid), reader.count(w.path, server_pid)
        missing = max(0, want_client - got_client) + max(0, want_server - got_server)
        delays = reader.delays(w.path)
        status = _status(self.proc.pid)
        return {
            "attach": self.attach,
            "ring_mib": int(stats.get("capture", {}).get("ring_bytes", 0) or 0) >> 20,
            "stream_client": got_client, "expected_client": want_client,
            "stream_server": got_server, "expected_server": want_server,
            "completeness_client": got_client / want_client if want_client else None,
            "completeness_server": got_server / want_server if want_server else None,
            "missing": missing,
            "drops": drops,
            # Calls whose body the probes cut while the agent was behind: the
            # transaction is on the stream, its body is not (not a drop).
            "shed_calls": self.shed_calls(stats) - self.shed0,
            # How the agent's CPU priority moved during the run (priority.py).
            "priority_switches": switches - self.priority0[0],
            "reader_lifts": lifts - self.priority0[1],
            # Every missing transaction is either still to come (not settled) or
            # the agent says it dropped something.
            "drops_counted": missing == 0 or sum(drops.values()) > 0,
            "settled": settled,
            "sse_delay_p50_ms": percentile(delays, 50),
            "sse_delay_p99_ms": percentile(delays, 99),
            "rss_mb": round(max(self.rss_max, status.get("VmRSS", 0)) / 1024, 1),
            "hwm_mb": round(status.get("VmHWM", 0) / 1024, 1),
            "busy_end": busy_end,
            "reader_error": reader.error,
        }


def all_setups(agent_args: list[str] | None = None) -> dict[str, Callable[[], Setup]]:
    """``agent_args``: extra ``run`` options for both agent setups (``--agent-args``)."""
    return {
        "untraced": lambda: Untraced(),
        "floor_entry": lambda: Floor("entry"),
        "floor_tuned": lambda: Floor("tuned"),
        "sslsniff": lambda: Sslsniff(),
        "agent_tuned": lambda: Agent("tuned", agent_args),
        "agent_entry": lambda: Agent("entry", agent_args),
    }


SETUP_ORDER = tuple(all_setups())

__all__ = ["Run", "Setup", "SetupUnavailable", "Untraced", "Floor", "Sslsniff", "Agent", "all_setups",
           "SETUP_ORDER", "percentile"]
