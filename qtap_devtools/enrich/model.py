"""What enrichment knows about a process: its identity, user, container and pod.

These are the values the event model (``qtap_devtools.events``) turns into the
``process``/``source`` parts of seed 003's events.  They are frozen so one
instance can be cached and shared by every event of a process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

RUNTIMES = ("docker", "containerd", "cri-o", "podman", "unknown")


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    id: str  # full container id (64 hex usually)
    runtime: str  # one of RUNTIMES
    name: str | None = None
    image: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    hostname: str | None = None

    @property
    def short_id(self) -> str:
        """The 12-character id ``docker ps`` shows and seed 003 sends."""
        return self.id[:12]


@dataclass(frozen=True, slots=True)
class PodInfo:
    name: str
    namespace: str
    uid: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    container_name: str | None = None


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    ppid: int
    exe: str
    binary: str
    cmdline: str
    uid: int
    user: str
    hostname: str
    start_time_ns: int  # wall clock, ns since epoch
    container_id: str | None = None
    container: ContainerInfo | None = None
    pod: PodInfo | None = None
    runtime: str | None = None  # the container runtime the cgroup path names
