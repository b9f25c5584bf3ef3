"""Enrichment facade (interim: /proc only, until the Docker/Kubernetes layer lands)."""

from __future__ import annotations

import os
import pwd
import socket
import time
from collections import OrderedDict

from .model import ContainerInfo, PodInfo, ProcessInfo

__all__ = ["Enricher", "ContainerInfo", "PodInfo", "ProcessInfo"]

_CLK = os.sysconf("SC_CLK_TCK")


def _boot_ns() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime"):
                return int(line.split()[1]) * 1_000_000_000
    return 0


_BOOT = _boot_ns()


def read_process(pid: int) -> ProcessInfo | None:
    base = f"/proc/{pid}"
    try:
        with open(f"{base}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid, start = int(fields[1]), int(fields[19])
        try:
            exe = os.readlink(f"{base}/exe").removesuffix(" (deleted)")
        except OSError:
            exe = ""
        with open(f"{base}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").strip().decode("utf-8", "replace")
        with open(f"{base}/comm") as f:
            comm = f.read().strip()
        uid = os.stat(base).st_uid
    except (OSError, ValueError, IndexError):
        return None
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return ProcessInfo(
        pid=pid, ppid=ppid, exe=exe, binary=os.path.basename(exe) or comm, cmdline=cmdline, uid=uid, user=user,
        hostname=socket.gethostname(), start_time_ns=_BOOT + start * 1_000_000_000 // _CLK,
    )


class Enricher:
    def __init__(self, *, docker: bool = True, docker_url=None, kube_api=None, node_name=None, cache_size=65536):
        self.cache: OrderedDict[int, ProcessInfo] = OrderedDict()
        self.cache_size = cache_size
        self.evicted = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def list_pids(self) -> list[int]:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]

    def process(self, pid: int) -> ProcessInfo | None:
        info = self.cache.get(pid)
        if info is None:
            info = read_process(pid)
            if info is not None:
                self.cache[pid] = info
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
                    self.evicted += 1
        return info

    async def process_enriched(self, pid: int, timeout: float = 0.05) -> ProcessInfo | None:
        return self.process(pid)

    def forget(self, pid: int) -> None:
        self.cache.pop(pid, None)

    def stats(self) -> dict:
        return {"processes_cached": len(self.cache), "evicted": self.evicted, "docker": "interim: not wired"}
