"""Enrichment: who a process is — binary, user, hostname, container, pod.

:class:`Enricher` is the one object the pipeline talks to.  ``process(pid)``
is synchronous and cheap (one small ``/proc`` read on a cache hit, dictionary
lookups for containers and pods), so it can run on the capture path; a
container or pod not known yet is fetched in the background and appears on a
later call.  ``await process_enriched(pid)`` waits a bounded time for that
fetch instead, for events that are emitted once (``process.started``).

Processes are cached by ``(pid, start time)``: a reused pid has a later start
time, so it never inherits the metadata of the process that had the pid
before.  ``exec`` keeps both, so the capture layer calls ``forget(pid)`` then.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from qtap_devtools.enrich.cgroup import container_of, parse_cgroup, parse_cgroup_path
from qtap_devtools.enrich.docker_meta import DockerMetadata, container_from_inspect
from qtap_devtools.enrich.kube import KubePodWatcher, make_api_client, pod_from_labels
from qtap_devtools.enrich.model import ContainerInfo, PodInfo, ProcessInfo
from qtap_devtools.enrich import procfs
from qtap_devtools.enrich.procfs import list_pids, read_process, read_start_time_ns

__all__ = [
    "ContainerInfo",
    "DockerMetadata",
    "Enricher",
    "KubePodWatcher",
    "PodInfo",
    "ProcessInfo",
    "container_from_inspect",
    "container_of",
    "list_pids",
    "parse_cgroup",
    "parse_cgroup_path",
    "pod_from_labels",
    "read_process",
]

log = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0  # how long a process entry is trusted without re-reading /proc


class Enricher:
    def __init__(
        self,
        *,
        docker: bool = True,
        docker_url: str | None = None,
        kube_api: str | None = None,
        node_name: str | None = None,
        process_cache_size: int = 16384,
        container_cache_size: int = 4096,
        pod_cache_size: int = 8192,
        proc_root: str = "/proc",
    ):
        self.proc_root = proc_root
        self._cache_size = process_cache_size
        self._processes: OrderedDict[tuple[int, int], ProcessInfo] = OrderedDict()
        self._latest: dict[int, int] = {}  # pid → start time of its newest cached entry
        self._fresh_until: dict[int, float] = {}  # pid → monotonic time its entry needs no /proc check until
        self.process_evictions = 0
        self.process_reads = 0
        self.fresh_marks_cleared = 0
        self.docker: DockerMetadata | None = (
            DockerMetadata(docker_url, cache_size=container_cache_size) if docker else None
        )
        self._kube_api = kube_api
        self._node_name = node_name
        self._pod_cache_size = pod_cache_size
        self.kube: KubePodWatcher | None = None
        self._kube_state = "disabled (no --kube-api or --node-name)"
        self._kube_lock = threading.Lock()
        self._stopped = False

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the background threads; returns at once, whatever the daemons."""
        if self.docker is not None:
            self.docker.start()
        if self._kube_api or self._node_name:
            # Loading the client's config may run a kubeconfig credential
            # plugin (`exec`), which can take seconds or never end: not on
            # the caller's thread (the agent's event loop).
            self._kube_state = "starting"
            threading.Thread(target=self._start_kube, name="qtap-kube-start", daemon=True).start()

    def _start_kube(self) -> None:
        try:
            api_client, source = make_api_client(self._kube_api)
        except Exception as exc:  # a bug in reading the config must not leave the state at "starting"
            log.exception("kubernetes: reading the client configuration failed")
            api_client, source = None, f"client configuration failed: {exc}"
        if api_client is None:
            self._kube_state = f"unavailable: {source}"
            log.warning("kubernetes: %s; pod names come only from kubelet container labels", source)
            return
        kube = KubePodWatcher(api_client, self._node_name, cache_size=self._pod_cache_size, source=source)
        with self._kube_lock:
            if self._stopped:
                return
            self.kube = kube
            kube.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the lookups, waiting at most ``timeout`` in all: their threads
        are daemons, and a hung Docker daemon or API server must not hold up
        the agent's exit (a call in flight cannot be interrupted)."""
        deadline = time.monotonic() + timeout
        with self._kube_lock:
            self._stopped = True  # a watcher still starting never starts
        if self.docker is not None:
            self.docker.stop(timeout=max(0.0, deadline - time.monotonic()) / 2)
        if self.kube is not None:
            self.kube.stop(timeout=max(0.0, deadline - time.monotonic()))

    # -------------------------------------------------------------- processes

    def process(self, pid: int) -> ProcessInfo | None:
        """What is known of ``pid`` now; None if it is gone and was never seen.

        A process that has exited is answered from the cache (its
        ``process.stopped`` event still needs a name).
        """
        now = time.monotonic()
        latest = self._latest.get(pid)
        if latest is not None and self._fresh_until.get(pid, 0.0) > now:
            # Checked against /proc moments ago (pid reuse shows as a new start
            # time; exec and exit call forget()): one /proc read per process per
            # second, not one per transaction.
            info = self._processes.get((pid, latest))
            if info is not None and info.container_id is None:
                return info  # a host process (most of them): nothing to attach, once per transaction
            if info is not None:
                enriched = self._attach(info)
                if enriched is not info:
                    self._store((pid, latest), enriched)
                return enriched
        start = read_start_time_ns(pid, self.proc_root)
        if start is None:  # gone: what was read while it ran, with what is known of its container now
            latest = self._latest.get(pid)
            info = self._processes.get((pid, latest)) if latest is not None else None
            if info is None:
                return None
            enriched = self._attach(info)
            if enriched is not info:
                self._store((pid, info.start_time_ns), enriched)
            return enriched
        key = (pid, start)
        info = self._processes.get(key)
        if info is None:
            info = read_process(pid, self.proc_root)
            if info is None:
                return None
            self.process_reads += 1
            key = (pid, info.start_time_ns)
        else:
            self._processes.move_to_end(key)
        enriched = self._attach(info)
        if enriched is not info or key not in self._processes:
            self._store(key, enriched)
        if len(self._fresh_until) >= self._cache_size:
            self.fresh_marks_cleared += len(self._fresh_until)  # each costs one more /proc stat read
            self._fresh_until.clear()
        self._fresh_until[pid] = now + RECHECK_SECONDS
        return enriched

    async def process_enriched(self, pid: int, timeout: float = 0.05) -> ProcessInfo | None:
        """Like :meth:`process`, but waits up to ``timeout`` seconds for
        container metadata not cached yet."""
        info = self.process(pid)
        if info is None or info.container_id is None or self.docker is None:
            return info
        if info.container is not None and info.container.name is not None:
            return info
        await self.docker.lookup(info.container_id, timeout)
        # The wait is over: what is known now, the bare id at least (the
        # event must not pass for a host process); later events carry the rest.
        enriched = self._attach(info, waited=True)
        if enriched is info:
            return info
        self._store((info.pid, info.start_time_ns), enriched)
        return enriched

    def read_now(self, pid: int) -> ProcessInfo | None:
        """What ``/proc`` says of ``pid`` now, and its container's Docker
        lookup started; None if it is gone.  Safe on any thread: it touches
        no cache of ours.  The ring reader calls it at exec, because a
        short-lived process is often gone before the event loop reaches it."""
        info = read_process(pid, self.proc_root)
        if info is not None and info.container_id and self.docker is not None:
            self.docker.prefetch(info.container_id)
        return info

    def remember(self, info: ProcessInfo) -> None:
        """Cache ``info`` (e.g. built by the capture layer from an exec event)."""
        self._store((info.pid, info.start_time_ns), info)

    def forget(self, pid: int) -> None:
        """Drop what is cached for ``pid``: it exec'd, so binary and command
        line changed while pid and start time did not."""
        self._fresh_until.pop(pid, None)
        start = self._latest.pop(pid, None)
        if start is not None:
            self._processes.pop((pid, start), None)

    def _store(self, key: tuple[int, int], info: ProcessInfo) -> None:
        pid, start = key
        previous = self._latest.get(pid)
        if previous is not None and previous != start:
            self._processes.pop((pid, previous), None)  # the pid was reused
        self._processes[key] = info
        self._processes.move_to_end(key)
        self._latest[pid] = start
        while len(self._processes) > self._cache_size:
            (old_pid, old_start), _ = self._processes.popitem(last=False)
            if self._latest.get(old_pid) == old_start:
                del self._latest[old_pid]
            self.process_evictions += 1

    def list_pids(self) -> list[int]:
        return list_pids(self.proc_root)

    # ------------------------------------------------------ containers, pods

    def container(self, container_id: str, runtime: str | None = None, waited: bool = False) -> ContainerInfo | None:
        """Docker's metadata, else what the pod's status says, else the bare
        id — but None while Docker may still answer (unless the caller has
        ``waited`` for it), so a caller can tell "not yet" (worth a short
        wait) from "nothing more to know".  Docker is waited for before the
        pod's status is used: the two name a container differently, and which
        one an event got must not depend on timing."""
        if self.docker is not None:
            found = self.docker.lookup_nowait(container_id)
            if found is not None:
                return found
            if not waited and self.docker.may_answer(container_id):
                return None
        if self.kube is not None:
            found = self.kube.container_for(container_id)
            if found is not None:
                return found
        return ContainerInfo(id=container_id, runtime=runtime or "unknown")

    def pod(self, container: ContainerInfo) -> PodInfo | None:
        if self.kube is not None:
            found = self.kube.pod_for(container.id)
            if found is not None:
                return found
        return pod_from_labels(container.labels)

    def _attach(self, info: ProcessInfo, waited: bool = False) -> ProcessInfo:
        """``info`` with container and pod as they are known now: filled in
        as lookups answer, and replaced when they change (a ``docker rename``,
        a pod's new labels) — a few dictionary reads per call."""
        cid = info.container_id
        if cid is None:
            return info
        current = info.container
        container = self.container(cid, info.runtime, waited)
        if container is None:
            return info  # Docker may still answer: the caller may wait for it
        if container.name is None and current is not None and current.name is not None:
            container = current  # a bare id never replaces what we knew
        if container is current and self.kube is None:
            return info  # unchanged (its labels' pod was read when it was attached); the common case
        # The watcher's pod when it has one (its labels may have changed);
        # else what we had, else the kubelet's labels.  A pod deleted while
        # its process still runs keeps its name: the process is still in it.
        pod = (self.kube.pod_for(cid) if self.kube is not None else None) or info.pod or self.pod(container)
        hostname = info.hostname
        if container.hostname and hostname != container.hostname and _is_default_host(info):
            hostname = container.hostname
        if container == current and pod == info.pod and hostname == info.hostname:
            return info
        return dataclasses.replace(info, container=container, pod=pod, hostname=hostname)

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        return {
            "processes": {
                "cached": len(self._processes),
                "capacity": self._cache_size,
                "evictions": self.process_evictions,
                "reads": self.process_reads,
                "fresh_marks_cleared": self.fresh_marks_cleared,
                "passwd_files_evicted": procfs.passwd_evicted,
            },
            "docker": self.docker.stats() if self.docker is not None else {"state": "disabled"},
            "kubernetes": self.kube.stats() if self.kube is not None else {"state": self._kube_state},
        }


def _is_default_host(info: ProcessInfo) -> bool:
    # procfs could not read the container's /etc/hostname (e.g. not root) and
    # fell back to the system's; Docker's Config.Hostname is then better.
    from qtap_devtools.enrich.procfs import system_hostname

    return info.hostname == system_hostname()
