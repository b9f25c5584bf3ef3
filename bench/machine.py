"""What else is on the machine: other BPF tracers, CPU by process, BPF run time.

The bench shares its machine.  Another process holding BPF programs (a test
suite's agent, another bcc tool) puts its uprobes on the very libssl our
"untraced" nginx uses, and any busy neighbour inflates the system-wide
/proc/stat figure.  So every run records the foreign tracers it saw
(``links.tracers``), and a
second CPU figure summed over the processes that take part (nginx, wrk, the
setup's own process, this harness), immune to neighbours, and a third over
nginx and wrk alone: what a setup's probes cost inside the traced programs.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from bench.workload import CLK_TCK


def _ticks(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def cpu_seconds(pids: list[int]) -> float:
    """CPU time so far of ``pids`` (user + system), threads included."""
    return sum(_ticks(p) for p in pids) / CLK_TCK


class ProcessCpu:
    """CPU of ``pids`` (alive throughout), this process unless ``harness`` is
    False, and the children reaped meanwhile (wrk)."""

    def __init__(self, pids: list[int], harness: bool = True) -> None:
        self.pids = pids
        self.harness = harness
        self.start = self._now()

    def _now(self) -> float:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        ticks = sum(_ticks(p) for p in self.pids) + (_ticks(os.getpid()) if self.harness else 0)
        return ticks / CLK_TCK + kids.ru_utime + kids.ru_stime

    def seconds(self) -> float:
        return self._now() - self.start


BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


class BpfRunStats:
    """``kernel.bpf_stats_enabled`` on while the bench runs, as it was after.

    While on, the kernel times every run of every BPF program on the machine:
    two clock reads per run, ~1 µs per request at rate10k with the agent's
    probes.  That is why it is opt-in (``--probe-stats``): the CPU columns of
    such a run include it.
    """

    def __enter__(self) -> "BpfRunStats":
        self.before = BPF_STATS.read_text().strip()
        BPF_STATS.write_text("1\n")
        return self

    def __exit__(self, *exc: object) -> None:
        BPF_STATS.write_text(self.before + "\n")


def bpf_run_time(pids: list[int]) -> tuple[int, int]:
    """``(run_time_ns, run_cnt)`` summed over the BPF programs ``pids`` hold, each program once.

    From ``/proc/PID/fdinfo``: no bpftool needed.  Both stay 0 unless
    ``kernel.bpf_stats_enabled`` is on.
    """
    seen: set[str] = set()
    ns = runs = 0
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) != "anon_inode:bpf-prog":
                    continue
                info = dict(line.split(":", 1) for line in
                            Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines() if ":" in line)
            except OSError:
                continue
            prog = info.get("prog_id", "").strip()
            if not prog or prog in seen:
                continue
            seen.add(prog)
            ns += int(info.get("run_time_ns", "0"))
            runs += int(info.get("run_cnt", "0"))
    return ns, runs
