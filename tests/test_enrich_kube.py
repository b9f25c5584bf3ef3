"""Pods by container id, with the real ``kubernetes`` client talking to the
API-server stand-in (tests/kube_standin.py): list, watch, delete, and the
re-list after 410 Gone; and pods from kubelet labels without any server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tests.kube_standin import KubeApiStandIn, make_pod

from qtap_devtools.enrich import Enricher
from qtap_devtools.enrich.kube import KubePodWatcher, make_api_client, pod_from_labels, split_container_id
from qtap_devtools.enrich.model import PodInfo

WEB_ID = "3f4e1c0b5a6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012a3b4c5d6e7f8"
SIDECAR_ID = "7a1b2c3d4e5f60718293a4b5c6d7e8f9012a3b4c5d6e7f83f4e1c0b5a6d7e8f9"
OTHER_NODE_ID = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
LATER_ID = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"


def web_pod() -> dict:
    return make_pod(
        "web-7d4b9c8f6-x2k9p", namespace="shop", uid="5c8a6b2e-1111-4a3b-9c2d-0e1f2a3b4c5d",
        labels={"app": "frontend", "env": "production"},
        containers={"web": (WEB_ID, "python:3.11-slim"), "istio-proxy": (SIDECAR_ID, "istio/proxyv2:1.22.0")},
    )


def other_node_pod() -> dict:
    return make_pod("db-0", namespace="shop", node="node-2", uid="6d9b7c3f-2222-4b4c-8d3e-1f2a3b4c5d6e",
                    containers={"postgres": (OTHER_NODE_ID, "postgres:16")})


def later_pod() -> dict:
    return make_pod("worker-1", namespace="jobs", uid="7e0c8d4a-3333-4c5d-9e4f-2a3b4c5d6e7f",
                    labels={"app": "worker"}, containers={"worker": (LATER_ID, "busybox:1.36")}, runtime="cri-o")


@pytest.fixture
def stand_in():
    with KubeApiStandIn() as server:
        server.add_pod(web_pod())
        server.add_pod(other_node_pod())
        yield server


@pytest.fixture
def watcher(stand_in):
    api_client, source = make_api_client(stand_in.url)
    w = KubePodWatcher(api_client, "node-1", backoff_initial=0.05, backoff_max=0.2, source=source)
    w.start()
    assert w.wait_synced(10), w.stats()
    yield w
    w.stop()


def until(predicate, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_listed_pod_is_found_by_container_id(watcher, stand_in):
    assert watcher.pod_for(WEB_ID) == PodInfo(
        name="web-7d4b9c8f6-x2k9p", namespace="shop", uid="5c8a6b2e-1111-4a3b-9c2d-0e1f2a3b4c5d",
        labels={"app": "frontend", "env": "production"}, container_name="web",
    )
    assert watcher.pod_for(SIDECAR_ID).container_name == "istio-proxy"
    c = watcher.container_for(WEB_ID)
    assert (c.runtime, c.name, c.image) == ("containerd", "web", "python:3.11-slim")
    # Only this node's pods were asked for.
    assert watcher.pod_for(OTHER_NODE_ID) is None
    kind, query = stand_in.requests[0]
    assert kind == "list" and query["fieldSelector"] == "spec.nodeName=node-1"
    assert watcher.stats()["state"] == "connected"


def test_pod_added_later_appears_and_deleted_pod_leaves(watcher, stand_in):
    assert watcher.pod_for(LATER_ID) is None
    stand_in.add_pod(later_pod())
    pod = until(lambda: watcher.pod_for(LATER_ID))
    assert (pod.name, pod.namespace, pod.container_name) == ("worker-1", "jobs", "worker")
    assert watcher.container_for(LATER_ID).runtime == "cri-o"
    # The watch resumed from the list's version, not from scratch.
    watch_query = next(q for kind, q in stand_in.requests if kind == "watch")
    assert watch_query["resourceVersion"] == "102"
    stand_in.delete_pod(later_pod()["metadata"]["uid"])
    until(lambda: watcher.pod_for(LATER_ID) is None)
    assert watcher.pod_for(WEB_ID) is not None
    assert stand_in.lists == 1


def test_restarted_container_replaces_the_old_id(watcher, stand_in):
    pod = web_pod()
    new_id = "e" * 64
    pod["status"]["containerStatuses"][0]["containerID"] = f"containerd://{new_id}"
    stand_in.modify_pod(pod)
    until(lambda: watcher.pod_for(new_id))
    assert watcher.pod_for(WEB_ID) is None


def test_pods_past_the_cache_size_are_let_go_and_counted(stand_in):
    # Pods not running yet have no container ids: only the pod index grows.
    for i in range(5):
        stand_in.add_pod(make_pod(f"pending-{i}", uid=f"uid-pending-{i}", containers={}))
    api_client, source = make_api_client(stand_in.url)
    w = KubePodWatcher(api_client, "node-1", cache_size=3, backoff_initial=0.05, backoff_max=0.2, source=source)
    w.start()
    try:
        assert w.wait_synced(10), w.stats()
        assert w.stats()["pods"] == 3 and w.stats()["evictions"] >= 3  # 6 pods listed, 3 kept
        stand_in.add_pod(later_pod())
        until(lambda: w.pod_for(LATER_ID))
        assert w.stats()["pods"] == 3 and w.stats()["evictions"] >= 4
    finally:
        w.stop()


def test_watch_ending_with_410_error_event_relists(watcher, stand_in):
    # A deletion the watch never delivers, then the history is compacted:
    # the open watch ends with an ERROR event holding a 410 Status.
    stand_in.add_pod(later_pod())
    until(lambda: watcher.pod_for(LATER_ID))
    stand_in.delete_pod(later_pod()["metadata"]["uid"], notify=False)
    stand_in.compact()
    until(lambda: stand_in.lists == 2)
    until(lambda: watcher.pod_for(LATER_ID) is None)  # only the re-list could tell
    assert watcher.stats()["relists_after_gone"] >= 1
    assert watcher.pod_for(WEB_ID) is not None
    # And it watches on from the new list.
    stand_in.add_pod(make_pod("api-0", uid="8f1d9e5b-4444-4d6e-8f5a-3b4c5d6e7f80",
                              containers={"api": ("d" * 64, "node:20")}))
    until(lambda: watcher.pod_for("d" * 64))


def test_watch_refused_with_http_410_relists():
    with KubeApiStandIn(gone_as_http=True) as stand_in:
        stand_in.add_pod(web_pod())
        api_client, _ = make_api_client(stand_in.url)
        w = KubePodWatcher(api_client, "node-1", backoff_initial=0.05, backoff_max=0.2)
        w.start()
        try:
            assert w.wait_synced(10)
            until(lambda: stand_in.watches >= 1)
            # Compaction closes the open watch with an ERROR event; make the
            # watcher's *next* request be the one refused, with HTTP 410.
            stand_in.delete_pod(web_pod()["metadata"]["uid"], notify=False)
            w._resource_version = "101"  # as if it had fallen behind
            stand_in.compact()
            until(lambda: w.pod_for(WEB_ID) is None)
            assert w.stats()["relists_after_gone"] >= 1
            assert stand_in.lists >= 2
        finally:
            w.stop()


def test_http_410_response_is_an_api_exception_the_watcher_handles():
    # The same refusal, without an open watch in between: the very first
    # watch after the list is refused by status code.
    with KubeApiStandIn(gone_as_http=True) as stand_in:
        stand_in.add_pod(web_pod())
        stand_in.compact()
        stand_in.add_pod(later_pod(), notify=False)
        api_client, _ = make_api_client(stand_in.url)
        w = KubePodWatcher(api_client, "node-1", backoff_initial=0.05, backoff_max=0.2)
        # A stale version makes the first watch be refused.
        w._list = _stale_list(w, "50")  # type: ignore[method-assign]
        w.start()
        try:
            until(lambda: w.stats()["relists_after_gone"] >= 1)
            until(lambda: w.pod_for(LATER_ID))
        finally:
            w.stop()


def _stale_list(w: KubePodWatcher, version: str):
    real = w._list
    calls = {"n": 0}

    def first_list_is_stale():
        real()
        calls["n"] += 1
        if calls["n"] == 1:
            w._resource_version = version
    return first_list_is_stale


def test_unreachable_api_server_backs_off_and_recovers(caplog):
    stand_in = KubeApiStandIn()
    url = stand_in.url  # bound, not serving yet: connections queue then time out?
    stand_in._server.server_close()  # nothing listens: connection refused
    api_client, _ = make_api_client(url)
    w = KubePodWatcher(api_client, "node-1", backoff_initial=0.05, backoff_max=0.2)
    w.start()
    try:
        until(lambda: w.stats()["state"].startswith("unavailable"))
        until(lambda: w.stats()["errors"] >= 3)
        assert sum("kubernetes" in r.getMessage() for r in caplog.records if r.levelname == "WARNING") == 1
    finally:
        w.stop()


def test_enricher_fills_pod_and_container_from_the_api(stand_in, tmp_path: Path):
    proc = tmp_path / "proc"
    d = proc / "4242"
    d.mkdir(parents=True)
    (proc / "stat").write_text("btime 1765557000\n")
    (d / "stat").write_text("4242 (python3.11) S 1 4242 4242 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 700 0 0\n")
    (d / "status").write_text("Uid:\t0\t0\t0\t0\n")
    (d / "cgroup").write_text(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5c8a6b2e_1111_4a3b_9c2d_0e1f2a3b4c5d.slice/"
        f"cri-containerd-{WEB_ID}.scope\n"
    )
    enricher = Enricher(docker=False, kube_api=stand_in.url, node_name="node-1", proc_root=str(proc))
    enricher.start()
    try:
        until(lambda: enricher.kube is not None)  # its client is made off the caller's thread
        assert enricher.kube.wait_synced(10)
        info = enricher.process(4242)
        assert (info.container_id, info.runtime) == (WEB_ID, "containerd")
        assert info.pod.name == "web-7d4b9c8f6-x2k9p" and info.pod.namespace == "shop"
        assert (info.container.name, info.container.image) == ("web", "python:3.11-slim")
        assert info.container.labels == {"app": "frontend", "env": "production"}
        assert enricher.stats()["kubernetes"]["state"] == "connected"
    finally:
        enricher.stop()


# ------------------------------------------------------------- no server


def test_pod_from_kubelet_container_labels():
    labels = {
        "io.kubernetes.pod.name": "web-7d4b9c8f6-x2k9p",
        "io.kubernetes.pod.namespace": "shop",
        "io.kubernetes.pod.uid": "5c8a6b2e-1111-4a3b-9c2d-0e1f2a3b4c5d",
        "io.kubernetes.container.name": "web",
        "io.kubernetes.container.restartCount": "0",
        "annotation.io.kubernetes.container.hash": "9b1c",
        "app": "frontend",
    }
    assert pod_from_labels(labels) == PodInfo(
        name="web-7d4b9c8f6-x2k9p", namespace="shop", uid="5c8a6b2e-1111-4a3b-9c2d-0e1f2a3b4c5d",
        labels={"app": "frontend"}, container_name="web",
    )
    assert pod_from_labels({"app": "frontend"}) is None
    assert pod_from_labels({"io.kubernetes.pod.name": "x"}) is None  # no namespace


def test_container_id_schemes():
    assert split_container_id("containerd://" + WEB_ID) == ("containerd", WEB_ID)
    assert split_container_id("docker://" + WEB_ID) == ("docker", WEB_ID)
    assert split_container_id("cri-o://" + WEB_ID) == ("cri-o", WEB_ID)
    assert split_container_id(WEB_ID) == ("unknown", WEB_ID)


def test_no_cluster_config_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client, reason = make_api_client(None)
    assert client is None and "kubeconfig" in reason


@pytest.mark.parametrize("text", [
    "apiVersion: v1\nclusters: [\n",  # YAML that does not parse
    "- just\n- a list\n",  # YAML of the wrong shape
    "apiVersion: v1\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\n"
    "    certificate-authority-data: '%%%not base64'\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n"
    "current-context: x\nusers:\n- name: u\n  user: {}\n",
])
def test_a_malformed_kubeconfig_is_reported_not_raised(tmp_path, monkeypatch, text):
    (tmp_path / "config").write_text(text)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client, reason = make_api_client(None)
    assert client is None and "kubeconfig" in reason


def test_kubeconfig_is_used_when_there_is_no_in_cluster_config(stand_in, tmp_path, monkeypatch):
    """The kubeconfig path, against the stand-in API server."""
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(f"""\
apiVersion: v1
kind: Config
clusters:
- name: standin
  cluster: {{server: "{stand_in.url}"}}
users:
- name: tester
  user: {{token: not-checked-by-the-stand-in}}
contexts:
- name: standin
  context: {{cluster: standin, user: tester}}
current-context: standin
""")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    api_client, source = make_api_client(None)
    assert source == "kubeconfig"
    w = KubePodWatcher(api_client, "node-1", backoff_initial=0.05, backoff_max=0.2, source=source)
    w.start()
    try:
        assert w.wait_synced(10), w.stats()
        pod = w.pod_for(WEB_ID)
        assert pod is not None and pod.name == "web-7d4b9c8f6-x2k9p" and pod.namespace == "shop"
    finally:
        w.stop()


def test_in_cluster_config_comes_before_the_kubeconfig(stand_in, tmp_path, monkeypatch):
    """A pod's service account: host and port from the environment, token and CA on disk."""
    from kubernetes.config import incluster_config

    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("token-from-the-service-account")
    (sa / "ca.crt").write_text("not used over plain http\n")
    host, port = stand_in.url.removeprefix("http://").rsplit(":", 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(sa / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(sa / "ca.crt"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    api_client, source = make_api_client(None)
    assert source == "in-cluster"
    assert api_client.configuration.host == f"https://{host}:{port}"


def test_a_client_config_that_never_loads_does_not_hold_up_start_or_stop(monkeypatch):
    # A kubeconfig credential plugin (`exec`) that hangs: start() returns at
    # once, the state says so, and stop() is not held up either.
    import threading

    import qtap_devtools.enrich as enrich_mod

    release = threading.Event()

    def hanging(url):
        release.wait(30)
        return None, "released"

    monkeypatch.setattr(enrich_mod, "make_api_client", hanging)
    enricher = Enricher(docker=False, node_name="node-1")
    enricher.start()  # returns: the test would hang here otherwise
    assert enricher.stats()["kubernetes"]["state"] == "starting"
    enricher.stop(timeout=0.2)
    release.set()
    until(lambda: enricher.stats()["kubernetes"]["state"] == "unavailable: released")
    assert enricher.kube is None


def test_a_watch_line_past_its_bound_breaks_the_watch_instead_of_growing(monkeypatch):
    from qtap_devtools.enrich import kube

    monkeypatch.setattr(kube, "MAX_WATCH_LINE", 1000)

    class Endless:  # a watch answer that never ends its line
        def stream(self, n, decode_content=True):
            while True:
                yield b"x" * 300

    with pytest.raises(RuntimeError, match="longer than"):
        list(kube._lines(Endless()))


def test_the_pod_list_is_read_in_pages(stand_in, monkeypatch):
    """Without --node-name the list is every pod of the cluster: read in pages
    (limit/continue), each of the first page's snapshot, and indexed whole."""
    from qtap_devtools.enrich import kube

    monkeypatch.setattr(kube, "LIST_PAGE_PODS", 4)
    ids = [f"{i:064x}" for i in range(10)]
    for i, cid in enumerate(ids):
        stand_in.add_pod(make_pod(f"p-{i}", uid=f"uid-p-{i}", node=f"node-{i % 3}",
                                  containers={"app": (cid, "app:1")}))
    api_client, source = make_api_client(stand_in.url)
    w = KubePodWatcher(api_client, None, backoff_initial=0.05, backoff_max=0.2, source=source)
    w.start()
    try:
        assert w.wait_synced(10), w.stats()
        assert all(w.pod_for(cid) is not None for cid in ids)
        pages = [q for kind, q in stand_in.requests if kind == "list"]
        assert [q["limit"] for q in pages] == ["4"] * len(pages) and len(pages) >= 3
        assert "continue" not in pages[0] and all("continue" in q for q in pages[1:])
        assert w.stats()["lists"] == 1
        # The watch goes on from the list's version: a pod added now is seen.
        stand_in.add_pod(later_pod())
        until(lambda: w.pod_for(LATER_ID))
    finally:
        w.stop()
