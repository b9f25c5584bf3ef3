"""What else is on the machine: other BPF tracers, and CPU by process.

The bench shares its machine.  Another process holding BPF programs (a test
suite's agent, another bcc tool) puts its uprobes on the very libssl our
"untraced" nginx uses, and any busy neighbour inflates the system-wide
/proc/stat figure.  So every run records the foreign tracers it saw, and a
second CPU figure summed over the processes that take part (nginx, wrk, the
setup's own process, this harness), immune to neighbours.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from bench.workload import CLK_TCK


def foreign_tracers(mine: set[int]) -> list[str]:
    """``"pid comm"`` of processes not in ``mine`` that hold a BPF program fd."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in mine:
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == "anon_inode:bpf-prog":
                    comm = (proc / "comm").read_text().strip()
                    out.append(f"{proc.name} {comm}")
                    break
        except OSError:
            continue
    return out


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
    """CPU of ``pids`` (alive throughout), this process, and the children reaped meanwhile."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start = self._now()

    def _now(self) -> float:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        ticks = sum(_ticks(p) for p in self.pids) + _ticks(os.getpid())
        return ticks / CLK_TCK + kids.ru_utime + kids.ru_stime

    def seconds(self) -> float:
        return self._now() - self.start
