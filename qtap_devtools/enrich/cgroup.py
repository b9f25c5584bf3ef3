"""Which container a process is in, read from its cgroup path.

``/proc/<pid>/cgroup`` names the cgroup of each hierarchy (v1: one line per
controller, ``4:memory:/docker/<id>``; v2: one ``0::<path>`` line).  Container
runtimes put the container id in that path, in a shape that depends on the
runtime and on the cgroup driver it was configured with:

========================  ====================================================
docker, cgroupfs driver   ``/docker/<id>`` (nested: ``/docker/<a>/docker/<b>``)
docker, systemd driver    ``/system.slice/docker-<id>.scope``
containerd CRI, systemd   ``/kubepods.slice/…/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope``
kubelet, cgroupfs         ``/kubepods/burstable/pod<uid>/<id>`` (runtime not named)
CRI-O                     ``…/crio-<id>.scope`` (cgroupfs: ``…/pod<uid>/crio-<id>``)
podman                    ``/machine.slice/libpod-<id>.scope``, rootless ``…/user@1000.service/user.slice/libpod-<id>.scope/container``,
                          cgroupfs ``/libpod_parent/libpod-<id>``
nerdctl (containerd)      ``/system.slice/nerdctl-<id>.scope``
========================  ====================================================

CRI-O's and podman's ``conmon`` monitors live in ``crio-conmon-<id>.scope`` /
``libpod-conmon-<id>.scope``: they run on the host's side, so they are not
attributed to the container.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from typing import Callable

# A scope or cgroup directory named "<runtime prefix>-<64 hex id>".
_PREFIXED = re.compile(
    r"(?:^|/)(docker|cri-containerd|crio|libpod|nerdctl)-([0-9a-f]{64})(?:\.scope)?(?=/|$)"
)
# cgroupfs docker: a "docker" directory holding one directory per container.
_DOCKER_DIR = re.compile(r"(?:^|/)docker/([0-9a-f]{64})(?=/|$)")
# Any directory that is a bare 64-hex id: kubelet's cgroupfs layout
# (/kubepods/<qos>/pod<uid>/<id>), ECS (/ecs/<task>/<id>), containerd's
# namespaces (/default/<id>).  The path does not say which runtime made it.
_BARE_ID = re.compile(r"(?:^|/)([0-9a-f]{64})(?=/|$)")

_RUNTIME_OF_PREFIX = {
    "docker": "docker",
    "cri-containerd": "containerd",
    "nerdctl": "containerd",
    "crio": "cri-o",
    "libpod": "podman",
}


def parse_cgroup_path(path: str) -> tuple[str, str] | None:
    """``(runtime, container id)`` for one cgroup path, or None.

    The innermost match wins, so a process in a nested container (docker in
    docker) is attributed to the container it runs in.
    """
    best: tuple[int, str, str] | None = None
    for m in _PREFIXED.finditer(path):
        best = _later(best, (m.start(2), _RUNTIME_OF_PREFIX[m.group(1)], m.group(2)))
    for m in _DOCKER_DIR.finditer(path):
        best = _later(best, (m.start(1), "docker", m.group(1)))
    if best is None:
        for m in _BARE_ID.finditer(path):
            best = _later(best, (m.start(1), "unknown", m.group(1)))
    return None if best is None else (best[1], best[2])


def _later(a: tuple[int, str, str] | None, b: tuple[int, str, str]) -> tuple[int, str, str]:
    return b if a is None or b[0] > a[0] else a


def parse_cgroup(text: str) -> tuple[str, str] | None:
    """``(runtime, container id)`` from the contents of ``/proc/<pid>/cgroup``.

    The unified (v2) line is preferred; in hybrid mode it can be ``/`` while
    the v1 controllers carry the container's path, so those are tried next.
    """
    v1: list[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier_id, _controllers, path = parts
        if hier_id == "0":
            found = parse_cgroup_path(path)
            if found is not None:
                return found
        else:
            v1.append(path)
    for path in v1:
        found = parse_cgroup_path(path)
        if found is not None:
            return found
    return None


def container_of(pid: int, proc_root: str = "/proc") -> tuple[str, str] | None:
    """``(runtime, id)`` of the container process ``pid`` runs in, or None
    (host process, or the process is gone)."""
    try:
        with open(f"{proc_root}/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            return parse_cgroup(f.read(65536))
    except OSError:
        return None


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 (unified) hierarchy is mounted: ``/sys/fs/cgroup``
    on a v2 host, ``/sys/fs/cgroup/unified`` in systemd's hybrid mode."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                # id parent major:minor root mount-point options... - fstype source super-options
                left, sep, right = line.partition(" - ")
                if sep and right.split(" ", 1)[0] == "cgroup2":
                    return left.split(" ")[4].replace("\\040", " ")
    except OSError:
        pass
    return None


class CgroupIndex:
    """The container a cgroup v2 id names.

    The kernel puts its process's cgroup id on each exec record.  A container's
    only process can be gone before ``/proc/<pid>/cgroup`` is read, but its
    cgroup was made first, and the mkdir record said that id's path.  For a
    cgroup made before the agent started, the hierarchy is searched for a
    directory with that inode number (a cgroup's id is its inode's), at most
    once per ``WALK_INTERVAL`` and over at most ``MAX_WALK_DIRS`` directories.
    """

    MAX_IDS = 4096  # ids remembered, container or not; the oldest are let go
    MAX_WALK_DIRS = 20_000
    WALK_INTERVAL = 1.0  # seconds between searches of the hierarchy

    def __init__(self, root: str | None = None, clock: Callable[[], float] = time.monotonic):
        self._root = root
        self._clock = clock
        self._ids: OrderedDict[int, tuple[str, str] | None] = OrderedDict()
        self._walked_at: float | None = None
        self.evicted = 0  # ids let go by the bound
        self.walks = 0

    def created(self, cgroup_id: int, path: str) -> None:
        self._remember(cgroup_id, parse_cgroup_path(path))

    def container(self, cgroup_id: int) -> tuple[str, str] | None:
        """``(runtime, container id)`` of the cgroup, or None (a host cgroup,
        or one this index cannot find)."""
        if cgroup_id <= 1:  # 0: not known; 1: the hierarchy's root
            return None
        if cgroup_id in self._ids:
            self._ids.move_to_end(cgroup_id)
            return self._ids[cgroup_id]
        now = self._clock()
        if self._walked_at is None or now - self._walked_at >= self.WALK_INTERVAL:
            self._walked_at = now
            self._walk()
        found = self._ids.get(cgroup_id)
        self._remember(cgroup_id, found)  # not found: asked again only after it falls out
        return found

    def _remember(self, cgroup_id: int, found: tuple[str, str] | None) -> None:
        self._ids[cgroup_id] = found
        self._ids.move_to_end(cgroup_id)
        while len(self._ids) > self.MAX_IDS:
            self._ids.popitem(last=False)
            self.evicted += 1

    def _walk(self) -> None:
        """Index every container's directory in the hierarchy (a directory's
        inode number is its cgroup id: kernfs says so in readdir)."""
        root = self._root or cgroup2_mount()
        if root is None:
            return
        self.walks += 1
        stack, seen = [(root, "")], 0
        while stack and seen < self.MAX_WALK_DIRS:
            path, rel = stack.pop()
            try:
                with os.scandir(path) as it:
                    for entry in it:
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                        seen += 1
                        sub = f"{rel}/{entry.name}"
                        found = parse_cgroup_path(sub)
                        if found is not None:
                            self._remember(entry.inode(), found)
                        stack.append((entry.path, sub))
            except OSError:  # removed while walking
                continue
