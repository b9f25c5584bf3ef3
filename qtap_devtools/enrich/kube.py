"""Pods on this node, by container id, from the Kubernetes API.

A background thread lists the pods scheduled on this node, then watches them
from the list's ``resourceVersion`` (the informer pattern, with only the
fields we need kept).  A watch that ends normally is resumed from the last
version seen; one that is told its version is too old (410 Gone, either as
an ``ERROR`` event in the stream or as the HTTP status of the request)
re-lists, because events were lost.  Other errors back off and retry.

Responses are read as raw JSON (``_preload_content=False``) rather than
deserialised into ``V1Pod`` models: the models cost far more than the five
fields we keep.

Without an API server, Kubernetes metadata still comes from the labels the
kubelet puts on containers it runs through Docker: :func:`pod_from_labels`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Iterator, Mapping

from qtap_devtools.enrich.model import ContainerInfo, PodInfo
from qtap_devtools.threads import service_thread

log = logging.getLogger(__name__)

# Kubelet's labels on the containers it creates (dockershim and cri-dockerd).
POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
POD_UID_LABEL = "io.kubernetes.pod.uid"
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"

_RUNTIME_OF_SCHEME = {"containerd": "containerd", "docker": "docker", "cri-o": "cri-o"}
LIST_PAGE_PODS = 500  # pods per list response (an expired continue token is a 410: listed again)


def pod_from_labels(labels: Mapping[str, str]) -> PodInfo | None:
    """The pod a container belongs to, from the kubelet's container labels;
    None when they are not there.  The pod's own labels are not copied onto
    containers, so ``labels`` holds the container's other labels."""
    name, namespace = labels.get(POD_NAME_LABEL), labels.get(POD_NAMESPACE_LABEL)
    if not name or not namespace:
        return None
    return PodInfo(
        name=name,
        namespace=namespace,
        uid=labels.get(POD_UID_LABEL),
        labels={k: v for k, v in labels.items() if not k.startswith(("io.kubernetes.", "annotation."))},
        container_name=labels.get(CONTAINER_NAME_LABEL),
    )


def split_container_id(value: str) -> tuple[str, str]:
    """``"containerd://<id>"`` → ``("containerd", "<id>")``."""
    scheme, sep, cid = value.partition("://")
    if not sep:
        return "unknown", value
    return _RUNTIME_OF_SCHEME.get(scheme, scheme or "unknown"), cid


class _Entry:
    __slots__ = ("pod", "container")

    def __init__(self, pod: PodInfo, container: ContainerInfo):
        self.pod = pod
        self.container = container


def containers_of_pod(pod: Mapping[str, Any]) -> list[tuple[str, PodInfo, ContainerInfo]]:
    """``(container id, PodInfo, ContainerInfo)`` for each started container
    of a pod object (a dict in the API's JSON shape)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    labels = dict(meta.get("labels") or {})
    out = []
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or ():
            raw_id = cs.get("containerID")
            if not raw_id:  # not started yet
                continue
            runtime, cid = split_container_id(raw_id)
            pod_info = PodInfo(
                name=meta.get("name", ""),
                namespace=meta.get("namespace", ""),
                uid=meta.get("uid"),
                labels=labels,
                container_name=cs.get("name"),
            )
            container = ContainerInfo(
                id=cid, runtime=runtime, name=cs.get("name"), image=cs.get("image"), labels=labels
            )
            out.append((cid, pod_info, container))
    return out


class KubePodWatcher:
    """Container id → pod, for the pods on one node, kept current by a watch.

    ``api_client`` is a configured ``kubernetes.client.ApiClient``; see
    :func:`make_api_client`.  With ``node_name`` None every pod is watched.
    """

    def __init__(
        self,
        api_client: Any,
        node_name: str | None,
        *,
        cache_size: int = 8192,
        watch_timeout_seconds: int = 300,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        source: str = "",
    ):
        from kubernetes import client as k8s

        self._api = k8s.CoreV1Api(api_client)
        self._api_client = api_client
        self.node_name = node_name
        self.source = source
        self._cache_size = cache_size  # containers, not pods
        self._watch_timeout = watch_timeout_seconds
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._lock = threading.Lock()
        self._by_container: OrderedDict[str, _Entry] = OrderedDict()
        # pod uid (or ns/name) → container ids; as bounded as the containers
        # (without --node-name every pod of the cluster is listed).
        self._by_pod: OrderedDict[str, set[str]] = OrderedDict()
        self._resource_version: str | None = None
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._response: Any = None
        self.state = "starting"
        self._warned = False
        # Counters
        self.evictions = 0
        self.lists = 0
        self.relists_after_gone = 0
        self.watches = 0
        self.errors = 0
        self.events = 0

    # ---------------------------------------------------------------- queries

    def pod_for(self, container_id: str) -> PodInfo | None:
        entry = self._by_container.get(container_id)
        return entry.pod if entry is not None else None

    def container_for(self, container_id: str) -> ContainerInfo | None:
        """What the pod's status says of the container: name, image, runtime."""
        entry = self._by_container.get(container_id)
        return entry.container if entry is not None else None

    def wait_synced(self, timeout: float) -> bool:
        """True once the first list has been loaded."""
        return self._synced.wait(timeout)

    def stats(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "source": self.source,
            "node": self.node_name,
            "pods": len(self._by_pod),
            "pods_by_container": len(self._by_container),
            "capacity": self._cache_size,
            "evictions": self.evictions,
            "lists": self.lists,
            "relists_after_gone": self.relists_after_gone,
            "watches": self.watches,
            "events": self.events,
            "errors": self.errors,
            "resource_version": self._resource_version,
        }

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="qtap-kube-pods", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        _abort(self._response)
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped"

    # ------------------------------------------------------------ the watcher

    def _run(self) -> None:
        service_thread("qtap-kube-pods")
        from kubernetes.client.exceptions import ApiException


        backoff = self._backoff_initial
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                began = time.monotonic()
                self._watch()
                # A watch ends normally at its timeout; resume from the last
                # version at once, unless the server keeps closing it early.
                backoff = self._backoff_initial
                if time.monotonic() - began >= 1.0:
                    continue
                self._stop.wait(backoff)
                continue
            except _Gone:
                self.relists_after_gone += 1
                need_list = True
                self._stop.wait(0.05)  # never a tight loop against a confused server
                continue
            except ApiException as exc:
                if self._stop.is_set():
                    break
                if exc.status == 410:
                    self.relists_after_gone += 1
                    need_list = True
                    continue
                self._failed(f"API error {exc.status} {exc.reason}")
            except Exception as exc:  # network errors of every kind: retry
                if self._stop.is_set():
                    break
                self._failed(_describe(exc))
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self._backoff_max)

    def _failed(self, reason: str) -> None:
        self.errors += 1
        self.state = f"unavailable: {reason}"
        if not self._warned:
            self._warned = True
            log.warning("kubernetes: %s; pod metadata will be missing until it answers (retrying)", reason)
        else:
            log.debug("kubernetes: %s", reason)

    def _selector(self) -> dict[str, Any]:
        return {"field_selector": f"spec.nodeName={self.node_name}"} if self.node_name else {}

    def _list(self) -> None:
        # In pages (the API's limit/continue): without --node-name every pod of
        # the cluster is listed, and one response would hold them all at once.
        fresh: OrderedDict[str, _Entry] = OrderedDict()
        by_pod: OrderedDict[str, set[str]] = OrderedDict()
        evicted = 0
        token: str | None = None
        while True:
            page = {"_continue": token} if token else {}
            resp = self._api.list_pod_for_all_namespaces(
                limit=LIST_PAGE_PODS, _preload_content=False, _request_timeout=(5, 60), **page, **self._selector()
            )
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            for pod in body.get("items") or ():
                ids = set()
                for cid, pod_info, container in containers_of_pod(pod):
                    fresh[cid] = _Entry(pod_info, container)
                    ids.add(cid)
                by_pod[_pod_key(pod)] = ids
            for index in (fresh, by_pod):
                while len(index) > self._cache_size:
                    index.popitem(last=False)
                    evicted += 1
            metadata = body.get("metadata") or {}
            token = metadata.get("continue")
            if not token:  # the last page: its version is the whole list's
                break
        self.lists += 1
        with self._lock:
            self._by_container = fresh
            self._by_pod = by_pod
            self.evictions += evicted
            self._resource_version = metadata.get("resourceVersion")
        if self.state != "connected":
            if self._warned:
                log.info("kubernetes: connected again")
            self._warned = False
        self.state = "connected"
        self._synced.set()

    def _watch(self) -> None:
        self.watches += 1
        resp = self._api.list_pod_for_all_namespaces(
            watch=True,
            resource_version=self._resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout,
            _preload_content=False,
            _request_timeout=(5, self._watch_timeout + 30),
            **self._selector(),
        )
        self._response = resp
        try:
            if self._stop.is_set():  # stop() ran before it could see resp
                return
            for event in _lines(resp):
                if self._stop.is_set():
                    return
                self._apply(event)
        finally:
            self._response = None
            _abort(resp)

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            # A Status object; 410 means our resourceVersion was compacted away.
            if obj.get("code") == 410:
                raise _Gone(obj.get("message", ""))
            raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
        self.events += 1
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self._upsert(obj)
        elif kind == "DELETED":
            self._remove(_pod_key(obj))
        if version:
            self._resource_version = version  # BOOKMARK carries only this

    def _upsert(self, pod: Mapping[str, Any]) -> None:
        key = _pod_key(pod)
        entries = containers_of_pod(pod)
        with self._lock:
            # A restarted container gets a new id; the old one is gone.
            for cid in self._by_pod.get(key, set()) - {cid for cid, _, _ in entries}:
                self._by_container.pop(cid, None)
            for cid, pod_info, container in entries:
                self._by_container[cid] = _Entry(pod_info, container)
                self._by_container.move_to_end(cid)
            self._by_pod[key] = {cid for cid, _, _ in entries}
            self._by_pod.move_to_end(key)
            while len(self._by_container) > self._cache_size:
                self._by_container.popitem(last=False)
                self.evictions += 1
            while len(self._by_pod) > self._cache_size:
                # Its containers stay until evicted in turn; only its deletion
                # can no longer remove them early.
                self._by_pod.popitem(last=False)
                self.evictions += 1

    def _remove(self, key: str) -> None:
        with self._lock:
            for cid in self._by_pod.pop(key, set()):
                self._by_container.pop(cid, None)


class _Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


def _pod_key(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"


MAX_WATCH_LINE = 16 << 20  # one watch event; a pod is at most 1.5 MB in etcd


def _lines(resp: Any) -> Iterator[dict[str, Any]]:
    """Watch events: one JSON object per line of a chunked response."""
    buf = b""
    for chunk in resp.stream(65536, decode_content=True):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
        if len(buf) > MAX_WATCH_LINE:  # the watch is broken: it is started again (a relist)
            raise RuntimeError(f"watch event longer than {MAX_WATCH_LINE >> 20} MiB")
    if buf.strip():
        yield json.loads(buf)


def _abort(resp: Any) -> None:
    """Unblock a thread reading ``resp`` (a urllib3 response) by shutting
    down its socket; closing the response alone does not wake a blocked read."""
    if resp is None:
        return
    import socket

    try:
        sock = resp.connection.sock if resp.connection is not None else None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass
    try:
        resp.release_conn()
    except Exception:  # already closed by the reader
        pass


def _describe(exc: BaseException) -> str:
    seen = exc
    while seen.__cause__ or seen.__context__:
        seen = seen.__cause__ or seen.__context__
    text = str(seen) or type(seen).__name__
    return text if len(text) < 200 else text[:197] + "..."


def make_api_client(api_url: str | None) -> tuple[Any, str] | tuple[None, str]:
    """A ``kubernetes`` ``ApiClient`` and where its configuration came from.

    An explicit ``api_url`` (``--kube-api``) wins, because the user asked for
    it; then the in-cluster service account; then the kubeconfig.  Returns
    ``(None, reason)`` when there is none.
    """
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    if api_url:
        cfg = k8s.Configuration()
        cfg.host = api_url.rstrip("/")
        return k8s.ApiClient(cfg), f"api {cfg.host}"
    try:
        cfg = k8s.Configuration()
        k8s_config.load_incluster_config(client_configuration=cfg)
        return k8s.ApiClient(cfg), "in-cluster"
    except k8s_config.ConfigException:
        pass
    try:
        cfg = k8s.Configuration()
        # The client reads $KUBECONFIG once, when it is imported; read it at
        # call time, as kubectl does, so the setting of the moment counts.
        k8s_config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg)
        return k8s.ApiClient(cfg), "kubeconfig"
    except Exception as exc:  # a missing, unreadable or malformed kubeconfig (YAML, base64, shapes)
        return None, f"no in-cluster config, no usable kubeconfig ({_describe(exc)})"
