"""What enrichment knows about a process, its container and its pod."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    id: str  # full container id (64 hex usually)
    runtime: str  # "docker" | "containerd" | "cri-o" | "podman" | "unknown"
    name: str | None = None
    image: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    hostname: str | None = None

    @property
    def short_id(self) -> str:
        """The 12-character form Docker shows, as seed 003 does."""
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
