"""Container metadata from a real Docker daemon (started by the tests, see
tests/dockerenv.py): a pid inside a labelled container maps to its id, name,
image, labels and hostname; a container started later is found; the daemon
going away costs one warning and no waiting, and coming back resumes."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest

from qtap_devtools.enrich import Enricher
from qtap_devtools.enrich.model import PodInfo
from tests.dockerenv import EMPTY_IMAGE, DockerDaemon, DockerUnavailable, docker_daemon  # noqa: F401

pytestmark = pytest.mark.docker

LABELS = {"app": "frontend", "env": "production"}


@pytest.fixture(scope="module")
def daemon():
    """A daemon of this module's own: other test runs on the machine use the
    shared one, and container names here must not collide with theirs."""
    d = DockerDaemon.private()
    try:
        d.start()
    except DockerUnavailable as exc:
        d.cleanup()
        pytest.skip(f"cannot start dockerd: {exc}")
    try:
        d.ensure_image()
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def enricher(daemon):
    e = Enricher(docker_url=daemon.url)
    e.start()
    until(lambda: e.stats()["docker"]["state"] == "connected")
    yield e
    e.stop()


def until(predicate, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def named(enricher: Enricher, pid: int):
    info = enricher.process(pid)
    return info if info is not None and info.container is not None and info.container.name else None


def test_pid_in_a_labelled_container_maps_to_its_container(daemon):
    with daemon.container("my-app", ["sleep", "60"], labels=LABELS, hostname="my-container") as c:
        enricher = Enricher(docker_url=daemon.url)  # started after the container
        enricher.start()
        try:
            info = until(lambda: named(enricher, c.pid))
        finally:
            enricher.stop()
        assert (info.pid, info.binary, info.exe) == (c.pid, "sleep", "/usr/bin/sleep")
        assert (info.container_id, info.runtime) == (c.id, "docker")
        container = info.container
        assert (container.id, container.short_id, container.runtime) == (c.id, c.id[:12], "docker")
        assert (container.name, container.image, dict(container.labels)) == ("my-app", EMPTY_IMAGE, LABELS)
        assert container.hostname == "my-container"
        assert info.hostname == "my-container"
        assert (info.uid, info.user) == (0, "root")
        assert info.pod is None


def test_container_started_after_the_enricher_is_enriched_on_its_first_event(daemon, enricher):
    with daemon.container("late-app", ["sleep", "60"], labels={"phase": "late"}, hostname="late") as c:
        # The first event of a new container: one bounded wait, then it is named.
        info = asyncio.run(enricher.process_enriched(c.pid, timeout=2.0))
        assert info.container is not None and info.container.name == "late-app"
        assert info.container.labels == {"phase": "late"}
        # Cached from now on: the synchronous path has it too.
        assert enricher.process(c.pid).container.name == "late-app"
    # destroyed: the container leaves the cache.
    until(lambda: enricher.docker.lookup_nowait(c.id) is None and enricher.docker.stats()["containers"] == 0)


def test_kubelet_labelled_container_gives_a_pod_without_an_api_server(daemon, enricher):
    labels = {
        "io.kubernetes.pod.name": "web-7d4b9c8f6-x2k9p",
        "io.kubernetes.pod.namespace": "shop",
        "io.kubernetes.pod.uid": "5c8a6b2e-1111-4a3b-9c2d-0e1f2a3b4c5d",
        "io.kubernetes.container.name": "web",
    }
    with daemon.container("k8s_web_web-7d4b9c8f6-x2k9p_shop", ["sleep", "60"], labels=labels) as c:
        info = asyncio.run(enricher.process_enriched(c.pid, timeout=2.0))
        assert info.pod == PodInfo(
            name="web-7d4b9c8f6-x2k9p", namespace="shop", uid="5c8a6b2e-1111-4a3b-9c2d-0e1f2a3b4c5d",
            labels={}, container_name="web",
        )


def test_daemon_stopped_then_restarted(caplog):
    caplog.set_level(logging.WARNING)
    daemon = DockerDaemon.private()
    try:
        daemon.start()
    except DockerUnavailable as exc:
        daemon.cleanup()
        pytest.skip(f"cannot start dockerd: {exc}")
    enricher = Enricher(docker_url=daemon.url)
    try:
        daemon.ensure_image()
        enricher.start()
        with daemon.container("before", ["sleep", "60"]) as c:
            until(lambda: named(enricher, c.pid))

        daemon.stop()
        until(lambda: enricher.stats()["docker"]["state"].startswith("unavailable"))
        unknown = uuid.uuid4().hex * 2
        began = time.monotonic()
        assert enricher.docker.lookup_nowait(unknown) is None
        assert asyncio.run(enricher.docker.lookup(unknown, timeout=0.05)) is None
        assert time.monotonic() - began < 0.2
        time.sleep(2.0)  # several reconnect attempts while it is down
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and r.name.startswith("qtap_devtools")]
        assert len(warnings) == 1 and "docker: unavailable" in warnings[0], warnings

        daemon.start()
        until(lambda: enricher.stats()["docker"]["state"] == "connected", timeout=20)
        with daemon.container("after", ["sleep", "60"], labels={"phase": "after"}) as c:
            info = until(lambda: named(enricher, c.pid))
            assert info.container.name == "after" and info.container.labels == {"phase": "after"}
        assert enricher.stats()["docker"]["connects"] == 2
    finally:
        enricher.stop()
        daemon.cleanup()


def test_shared_daemon_helper_runs_a_host_network_container(docker_daemon):  # noqa: F811
    # The helper the end-to-end tests use: the machine's daemon, started if needed.
    name = f"qtap-smoke-{uuid.uuid4().hex[:8]}"
    with docker_daemon.container(name, ["sleep", "30"], hostname="smoke") as c:
        state = c.inspect()
        assert state["HostConfig"]["NetworkMode"] == "host"
        assert state["Config"]["Image"] == EMPTY_IMAGE
        assert c.exec("cat", "/etc/hostname").stdout.decode().strip() == "smoke"


def test_reconnecting_to_no_daemon_leaves_no_socket_open():
    """Without Docker the agent retries each second; each failed attempt left
    a socket open until the garbage collector came (167 → 218 fds idle)."""
    import gc
    import os

    from qtap_devtools.enrich.docker_meta import DockerMetadata

    meta = DockerMetadata("unix:///nonexistent.sock")
    gc.disable()
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            with pytest.raises(FileNotFoundError):
                meta._connect()
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        gc.enable()


def test_a_lookup_that_outlasts_its_wait_is_counted_and_not_cancelled():
    """No daemon needed: the fetch is stood in for by a future nobody completes."""
    import concurrent.futures

    from qtap_devtools.enrich.docker_meta import DockerMetadata

    meta = DockerMetadata("unix:///nonexistent.sock")
    meta._connected = True
    cid = "ab" * 32
    pending: concurrent.futures.Future = concurrent.futures.Future()
    meta._inflight[cid] = pending
    assert asyncio.run(meta.lookup(cid, timeout=0.01)) is None
    assert meta.stats()["lookups_too_slow"] == 1
    assert not pending.cancelled()  # still shared with the cache and other waiters


@pytest.mark.parametrize("event", [
    {"Type": "container", "Action": "start", "Actor": {"ID": 12345}},
    {"Type": "container", "Action": "start", "Actor": ["not", "a", "mapping"], "id": None},
    {"Type": "container", "Action": "destroy", "Actor": {"ID": ["x"]}},
])
def test_an_event_of_the_wrong_shape_is_ignored(event):
    """No daemon needed: an event whose container id is not a string (the
    daemon's answers are untrusted) schedules nothing; it stopped the fetch
    thread for good."""
    from qtap_devtools.enrich.docker_meta import DockerMetadata

    meta = DockerMetadata("unix:///nonexistent.sock")
    meta._connected = True
    meta._on_event(event)
    assert meta._queue.empty() and not meta._inflight and not meta._destroyed


def _event(action: str, cid: str, **attrs) -> dict:
    return {"Type": "container", "Action": action, "Actor": {"ID": cid, "Attributes": attrs}}


def test_a_create_event_names_the_container_at_once_and_start_asks_nothing_more():
    """No daemon needed: what the event says is cached before any inspect;
    the start that follows does not throw it away for a second inspect."""
    from qtap_devtools.enrich.docker_meta import DockerMetadata

    meta = DockerMetadata("unix:///nonexistent.sock")
    meta._connected = True
    cid = "cd" * 32
    meta._on_event(_event("create", cid, name="web-1", image="nginx:1.25", app="shop", exitCode="0"))
    info = meta.lookup_nowait(cid)
    assert (info.name, info.image, dict(info.labels), info.runtime) == ("web-1", "nginx:1.25", {"app": "shop"}, "docker")
    assert meta._queue.qsize() == 1  # one inspect, for the hostname
    meta._on_event(_event("start", cid, name="web-1", image="nginx:1.25", app="shop"))
    assert meta._queue.qsize() == 1 and meta.lookup_nowait(cid) is info


def test_a_rename_replaces_the_name_even_while_an_older_inspect_is_in_flight():
    from qtap_devtools.enrich.docker_meta import DockerMetadata

    meta = DockerMetadata("unix:///nonexistent.sock")
    meta._connected = True
    cid = "ef" * 32
    meta._on_event(_event("create", cid, name="old", image="img"))
    assert cid in meta._inflight
    meta._on_event(_event("rename", cid, name="new", image="img", oldName="/old"))
    assert meta.lookup_nowait(cid).name == "new" and "oldName" not in meta.lookup_nowait(cid).labels
    assert cid in meta._stale  # the inspect asked before the rename is asked again, not cached


def test_a_renamed_container_is_renamed_on_its_process_next_lookup(tmp_path):
    """The enricher's cached process follows Docker's cache (no /proc read)."""
    from qtap_devtools.enrich.docker_meta import DockerMetadata
    from qtap_devtools.enrich.model import ContainerInfo, ProcessInfo

    e = Enricher(docker=True, proc_root=str(tmp_path))
    meta: DockerMetadata = e.docker
    meta._connected = True
    cid = "ab" * 32
    meta._on_event(_event("create", cid, name="old", image="img"))
    proc = ProcessInfo(pid=7, ppid=1, exe="/usr/bin/curl", binary="curl", cmdline="curl", uid=0, user="root",
                       hostname="h", start_time_ns=1, container_id=cid, runtime="docker")
    e.remember(proc)
    first = e._attach(proc)
    assert first.container.name == "old"
    meta._on_event(_event("rename", cid, name="new", image="img"))
    assert e._attach(first).container.name == "new"
    assert e._attach(first).container == ContainerInfo(id=cid, runtime="docker", name="new", image="img")


def test_a_pods_new_labels_replace_the_old_on_the_next_lookup(tmp_path):
    from qtap_devtools.enrich.model import ContainerInfo, ProcessInfo

    cid = "12" * 32
    pods = {cid: PodInfo(name="api-0", namespace="prod", labels={"tier": "v1"})}

    class Watcher:  # stands in for KubePodWatcher (no API server here)
        def pod_for(self, container_id):
            return pods.get(container_id)

        def container_for(self, container_id):
            return ContainerInfo(id=container_id, runtime="containerd", name="api")

    e = Enricher(docker=False, proc_root=str(tmp_path))
    e.kube = Watcher()
    proc = ProcessInfo(pid=8, ppid=1, exe="/app", binary="app", cmdline="app", uid=0, user="root",
                       hostname="h", start_time_ns=1, container_id=cid, runtime="containerd")
    first = e._attach(proc)
    assert first.pod.labels == {"tier": "v1"}
    pods[cid] = PodInfo(name="api-0", namespace="prod", labels={"tier": "v2"})
    second = e._attach(first)
    assert second.pod.labels == {"tier": "v2"}
    del pods[cid]  # deleted while its process runs: the process is still in it
    assert e._attach(second).pod.labels == {"tier": "v2"}
