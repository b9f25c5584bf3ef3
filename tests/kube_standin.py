"""A stand-in for the Kubernetes API server — NOT Kubernetes.

No API server can be installed on this machine, so the pod watcher is tested
against this: an HTTP server on 127.0.0.1 answering the two requests the
watcher makes, in the shapes the real API server uses:

* ``GET /api/v1/pods?fieldSelector=spec.nodeName%3D<node>`` — a ``PodList``
  with ``metadata.resourceVersion``;
* the same with ``watch=true&resourceVersion=<rv>`` — a chunked stream of
  newline-delimited watch events (``ADDED``/``MODIFIED``/``DELETED``, each
  ``{"type": …, "object": <Pod>}``), ending at ``timeoutSeconds``.

History can be compacted (:meth:`KubeApiStandIn.compact`), as etcd does: open
watches then end with an ``ERROR`` event whose object is a ``Status`` with
code 410 (what the real server sends from its watch cache), and a watch asked
for a version older than the compaction is refused the same way — or, with
``gone_as_http=True``, with an HTTP 410 response carrying that ``Status``.

It knows nothing else: no namespaces endpoints, no label selectors, no auth.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


def make_pod(
    name: str,
    *,
    namespace: str = "default",
    node: str = "node-1",
    uid: str,
    labels: dict[str, str] | None = None,
    containers: dict[str, tuple[str, str]],
    runtime: str = "containerd",
) -> dict[str, Any]:
    """A running Pod object; ``containers`` maps container name → (container
    id, image), reported in ``status.containerStatuses[].containerID`` as
    ``<runtime>://<id>`` like the kubelet does."""
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": "0",
            "creationTimestamp": "2025-12-12T16:40:00Z",
            "labels": dict(labels or {}),
        },
        "spec": {
            "nodeName": node,
            "containers": [{"name": cname, "image": image} for cname, (_cid, image) in containers.items()],
        },
        "status": {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "containerStatuses": [
                {
                    "name": cname,
                    "image": image,
                    "imageID": f"docker.io/library/{image}@sha256:" + "0" * 64,
                    "containerID": f"{runtime}://{cid}",
                    "ready": True,
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": "2025-12-12T16:40:02Z"}},
                }
                for cname, (cid, image) in containers.items()
            ],
        },
    }


def status_gone(message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Expired",
        "code": 410,
    }


class KubeApiStandIn:
    def __init__(self, *, gone_as_http: bool = False):
        self.gone_as_http = gone_as_http
        self._cond = threading.Condition()
        self._pods: dict[str, dict[str, Any]] = {}  # uid → pod
        self._rv = 100
        self._log: list[tuple[int, str, dict[str, Any]]] = []  # (rv, type, pod)
        self._compacted = 0  # watches from before this version get 410
        self._generation = 0  # bumped by compact(): open watches end with 410
        self._closing = False
        self._snapshots: dict[int, list] = {}  # resourceVersion -> the pods a paged list answers from
        self.requests: list[tuple[str, dict[str, str]]] = []  # ("list"|"watch", query)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.stand_in = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- control

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "KubeApiStandIn":
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="kube-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "KubeApiStandIn":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def lists(self) -> int:
        return sum(1 for kind, _ in self.requests if kind == "list")

    @property
    def watches(self) -> int:
        return sum(1 for kind, _ in self.requests if kind == "watch")

    def add_pod(self, pod: dict[str, Any], *, notify: bool = True) -> None:
        self._put("ADDED", pod, notify)

    def modify_pod(self, pod: dict[str, Any], *, notify: bool = True) -> None:
        self._put("MODIFIED", pod, notify)

    def delete_pod(self, uid: str, *, notify: bool = True) -> None:
        """``notify=False``: the deletion is not sent to open watches — as if
        they missed it, which only a re-list repairs."""
        with self._cond:
            pod = self._pods.pop(uid)
            self._record("DELETED", pod, notify)

    def compact(self) -> None:
        """Forget history up to now: open watches end with ERROR 410, and
        watches resuming from an older version are refused with 410."""
        with self._cond:
            self._compacted = self._rv
            self._log.clear()
            self._generation += 1
            self._cond.notify_all()

    def _put(self, kind: str, pod: dict[str, Any], notify: bool) -> None:
        with self._cond:
            pod = copy.deepcopy(pod)
            self._pods[pod["metadata"]["uid"]] = pod
            self._record(kind, pod, notify)

    def _record(self, kind: str, pod: dict[str, Any], notify: bool) -> None:
        self._rv += 1
        pod["metadata"]["resourceVersion"] = str(self._rv)
        if notify:
            self._log.append((self._rv, kind, copy.deepcopy(pod)))
        self._cond.notify_all()

    # ------------------------------------------------------------ answering

    def _matching(self, pod: dict[str, Any], node: str | None) -> bool:
        return node is None or pod.get("spec", {}).get("nodeName") == node

    def pod_list(self, node: str | None, limit: int = 0, token: str | None = None) -> dict[str, Any]:
        """A PodList, or with ``limit`` one page of it: like the real server,
        every page is of the snapshot the first one was taken from, and all
        but the last carry a ``continue`` token."""
        with self._cond:
            if token:
                rv, start = (int(x) for x in token.split(":"))
                items = self._snapshots[rv]
            else:
                rv, start = self._rv, 0
                items = self._snapshots[rv] = [copy.deepcopy(p) for p in self._pods.values() if self._matching(p, node)]
            end = start + limit if limit else len(items)
            metadata: dict[str, Any] = {"resourceVersion": str(rv)}
            if end < len(items):
                metadata["continue"] = f"{rv}:{end}"
            return {"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": items[start:end]}

    def watch_events(self, node: str | None, since: int | None, timeout: float):
        """Yield watch events (dicts) until the timeout, a compaction, or stop.
        ``since`` None: the current pods as ADDED first, like the real server.

        The watch starts here, not at the first event read: a compaction right
        after the request arrived must end it (a generator body would take its
        snapshot only once the response is being written)."""
        end = time.monotonic() + timeout
        with self._cond:
            generation = self._generation
            if since is None:
                pending = [{"type": "ADDED", "object": copy.deepcopy(p)} for p in self._pods.values() if self._matching(p, node)]
                sent = self._rv
            else:
                pending, sent = [], since
        return self._watching(node, generation, pending, sent, end)

    def _watching(self, node: str | None, generation: int, pending: list, sent: int, end: float):
        yield from pending
        while True:
            with self._cond:
                while True:
                    if self._closing:
                        return
                    if self._generation != generation:
                        yield {"type": "ERROR", "object": status_gone(f"too old resource version: {sent} ({self._compacted})")}
                        return
                    fresh = [(rv, k, p) for rv, k, p in self._log if rv > sent]
                    if fresh:
                        break
                    left = end - time.monotonic()
                    if left <= 0:
                        return
                    self._cond.wait(min(left, 0.5))
            for rv, kind, pod in fresh:
                sent = rv
                if self._matching(pod, node):
                    yield {"type": kind, "object": copy.deepcopy(pod)}

    def is_expired(self, since: int) -> bool:
        with self._cond:
            return since < self._compacted


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        stand_in: KubeApiStandIn = self.server.stand_in  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path != "/api/v1/pods":
            self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "message": f"the stand-in does not serve {url.path}", "reason": "NotFound", "code": 404})
            return
        node = None
        selector = query.get("fieldSelector", "")
        if selector:
            key, _, value = selector.partition("=")
            if key != "spec.nodeName":
                self._json(400, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "message": f"unsupported field selector {selector}", "reason": "BadRequest", "code": 400})
                return
            node = value
        if query.get("watch") not in ("true", "1"):
            stand_in.requests.append(("list", query))
            self._json(200, stand_in.pod_list(node, int(query.get("limit") or 0), query.get("continue")))
            return
        rv = query.get("resourceVersion")
        since = int(rv) if rv and rv != "0" else None
        timeout = float(query.get("timeoutSeconds", "1800"))
        if since is not None and stand_in.is_expired(since):
            message = f"too old resource version: {since}"
            if stand_in.gone_as_http:
                stand_in.requests.append(("watch", query))
                self._json(410, status_gone(message))
                return
            events = iter([{"type": "ERROR", "object": status_gone(message)}])
        else:
            events = stand_in.watch_events(node, since, timeout)
        stand_in.requests.append(("watch", query))  # counted once it would see a compaction
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in events:
                self._chunk(json.dumps(event).encode() + b"\n")
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# ------------------------------------------------ the end-to-end tests' names


class KubeStandIn(KubeApiStandIn):
    """The stand-in, serving from construction; ``close()`` stops it."""

    def __init__(self, *, gone_as_http: bool = False):
        super().__init__(gone_as_http=gone_as_http)
        self.start()

    def add(self, pod: dict[str, Any], *, notify: bool = True) -> None:
        self.add_pod(pod, notify=notify)

    def close(self) -> None:
        self.stop()


def pod(
    name: str,
    namespace: str,
    container_id: str,
    node: str,
    *,
    labels: dict[str, str] | None = None,
    runtime: str = "containerd",
    container_name: str | None = None,
    image: str = "qtap-empty:latest",
    uid: str | None = None,
) -> dict[str, Any]:
    """A one-container pod running ``container_id`` on ``node``."""
    import uuid

    return make_pod(
        name, namespace=namespace, node=node, uid=uid or str(uuid.uuid4()), labels=labels,
        containers={container_name or name.split("-")[0]: (container_id, image)}, runtime=runtime,
    )
