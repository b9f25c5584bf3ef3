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

import re

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
