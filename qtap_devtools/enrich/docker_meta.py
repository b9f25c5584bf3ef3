"""Docker container metadata by id: name, image, labels, hostname.

Never on the capture path.  Lookups read a bounded cache; a miss schedules an
``inspect`` on a background thread.  A second thread follows the daemon's
event stream: a container's ``create`` event carries its name, image and
labels, which go into the cache at once (its process has not run yet, so its
first event is named without waiting for an ``inspect``, however many
containers start together); ``rename`` and ``update`` replace them; destroyed
containers leave the cache.  An ``inspect`` still follows, for the hostname.
After a ``create`` the image's layer directories (overlay2's) go to
``on_layers``, so that the capture attaches the image's own TLS libraries
before the container's first process runs: from an ``inspect`` of the image
the event names, which the daemon answers at once, and else from the
container's, which waits while that container is being started.
Without a daemon (no socket, refused, no permission) one warning is logged,
lookups answer None at once, and the event thread retries every second at
most until the daemon is back.

The daemon is found at ``base_url`` (default ``unix:///var/run/docker.sock``);
``DOCKER_HOST`` is not read here: configuration comes from the CLI.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Mapping

from qtap_devtools.enrich.model import ContainerInfo
from qtap_devtools.threads import service_thread

log = logging.getLogger(__name__)

DEFAULT_URL = "unix:///var/run/docker.sock"
_STOP = object()


class DockerMetadata:
    def __init__(
        self,
        base_url: str | None = None,
        *,
        cache_size: int = 4096,
        negative_cache_size: int = 1024,
        negative_ttl: float = 30.0,
        fetch_queue_size: int = 1024,
        request_timeout: float = 5.0,
        backoff_initial: float = 0.25,
        # A container started while the daemon restarts is named only if we
        # are back before it ends: retrying a Unix socket each second costs nothing.
        backoff_max: float = 1.0,
    ):
        self.base_url = base_url or DEFAULT_URL
        self._cache_size = cache_size
        self._cache: OrderedDict[str, ContainerInfo] = OrderedDict()
        # Ids the daemon does not know (a containerd or CRI-O container on the
        # same host): not asked again until the entry expires.
        self._negative_size = negative_cache_size
        self._negative_ttl = negative_ttl
        self._negative: OrderedDict[str, float] = OrderedDict()
        # Recently destroyed ids: an inspect that raced the destroy event must
        # not put the container back.
        self._destroyed: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=fetch_queue_size)
        self._inflight: dict[str, concurrent.futures.Future[ContainerInfo | None]] = {}
        # In-flight ids renamed or updated meanwhile: their answer may predate
        # the change, so it is not cached and the id is asked again.
        self._stale: set[str] = set()
        self._request_timeout = request_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._api: Any = None  # APIClient for inspects, set while connected
        self._stream: Any = None
        self._events_api: Any = None  # the APIClient the event stream came from
        self._connected = False
        self._warned = False
        self.state = "starting"
        # Counters
        self.evictions = 0
        self.fetches = 0
        self.fetch_errors = 0
        self.fetch_dropped = 0  # queue full
        self.lookups_too_slow = 0  # waits that outlasted their bound: an event went out without the name
        self.not_docker = 0
        self.events = 0
        self.connects = 0
        self.negative_evicted = 0  # ids not Docker's, let go (the bound): asked again when seen
        self.destroyed_evicted = 0
        # Given a created container's image layers (host directories, topmost
        # first), on the fetch thread; it must not block (the capture queues them).
        self.on_layers: Callable[[list[str]], None] | None = None
        # created ids whose layers are awaited -> the image their create event named
        self._want_layers: OrderedDict[str, str | None] = OrderedDict()
        self._want_layers_size = fetch_queue_size
        self.layers_given = 0  # containers whose image layers went to the capture at create
        self.layers_from_image = 0  # of those, read from the image's inspect (the rest: the container's)
        self.layers_not_overlay = 0  # no overlay2 layers in the inspect (another storage driver): found at start

    # ---------------------------------------------------------------- lookups

    def lookup_nowait(self, container_id: str) -> ContainerInfo | None:
        """The cached metadata, or None; a miss schedules a background fetch."""
        info = self._cache.get(container_id)
        if info is not None:
            return info
        self._schedule(container_id)
        return None

    async def lookup(self, container_id: str, timeout: float = 0.05) -> ContainerInfo | None:
        """The metadata, waiting at most ``timeout`` seconds for a fetch."""
        info = self._cache.get(container_id)
        if info is not None:
            return info
        future = self._schedule(container_id)
        if future is None:
            return None
        wrapped = asyncio.wrap_future(future)
        # asyncio.wait, not wait_for: a timeout must not cancel the shared
        # fetch that other callers (and the cache) are waiting on.
        done, _ = await asyncio.wait({wrapped}, timeout=timeout)
        if not done:
            self.lookups_too_slow += 1  # the event goes out without; later ones carry it
            return None
        return wrapped.result()

    def prefetch(self, container_id: str) -> None:
        """Start fetching ``container_id`` now, without waiting for it."""
        if container_id not in self._cache:
            self._schedule(container_id)

    def _schedule(self, container_id: str) -> concurrent.futures.Future[ContainerInfo | None] | None:
        if not self._connected or not container_id or not isinstance(container_id, str):
            return None
        with self._lock:
            future = self._inflight.get(container_id)
            if future is not None:
                return future
            expiry = self._negative.get(container_id)
            if expiry is not None and expiry > time.monotonic():
                return None
            future = concurrent.futures.Future()
            try:
                self._queue.put_nowait(container_id)
            except queue.Full:
                self.fetch_dropped += 1
                return None
            self._inflight[container_id] = future
            return future

    def may_answer(self, container_id: str) -> bool:
        """Whether a lookup of ``container_id`` could still succeed: the daemon
        is (or may be about to be) connected and has not said it does not
        know the id."""
        if self.state != "starting" and not self._connected:
            return False
        expiry = self._negative.get(container_id)
        return expiry is None or expiry <= time.monotonic()

    def stats(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "url": self.base_url,
            "containers": len(self._cache),
            "capacity": self._cache_size,
            "evictions": self.evictions,
            "fetches": self.fetches,
            "fetch_errors": self.fetch_errors,
            "fetch_dropped": self.fetch_dropped,
            "lookups_too_slow": self.lookups_too_slow,
            "not_docker": self.not_docker,
            "events": self.events,
            "connects": self.connects,
            "negative_evicted": self.negative_evicted,
            "destroyed_evicted": self.destroyed_evicted,
            "layers_given": self.layers_given,
            "layers_from_image": self.layers_from_image,
            "layers_not_overlay": self.layers_not_overlay,
        }

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._threads:
            return
        self._threads = [
            threading.Thread(target=self._follow, name="qtap-docker-events", daemon=True),
            threading.Thread(target=self._fetcher, name="qtap-docker-fetch", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._connected = False
        self._close_stream()
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass  # the fetcher polls the stop flag too
        deadline = time.monotonic() + timeout  # for all the threads, not each
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.state = "stopped"

    # ------------------------------------------------------ the event thread

    def _follow(self) -> None:
        service_thread("qtap-docker-ev")
        backoff = self._backoff_initial
        while not self._stop.is_set():
            try:
                stream = self._connect()
            except Exception as exc:  # no socket, refused, permission, bad reply
                self._close_stream()
                self._unavailable(_reason(exc, self.base_url))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                continue
            backoff = self._backoff_initial
            try:
                if self._stop.is_set():  # stop() ran before it could see the stream
                    break
                for event in stream:
                    self._on_event(event)
            except Exception as exc:  # the stream broke mid-event
                log.debug("docker: event stream ended: %s", exc)
            finally:
                self._close_stream()
            # The stream ends when the daemon goes away (or on stop); the next
            # connect attempt tells which.

    def _connect(self) -> Any:
        path = self.base_url.removeprefix("unix://")
        if path != self.base_url and not os.path.exists(path):
            # No daemon (the usual case on a host without Docker): said without
            # trying, since a failed attempt's socket lingers until the garbage
            # collector comes (the SDK's exceptions hold it in a cycle).
            raise FileNotFoundError(errno.ENOENT, "no socket", path)
        import docker
        from docker.constants import MINIMUM_DOCKER_API_VERSION

        # Each client is made with a version, so it asks nothing until used
        # and one that fails is closed here.  (version="auto" asks in its
        # constructor, and a failed one kept its socket until the garbage
        # collector came: a socket a second while the daemon is away.)
        clients: list[Any] = []

        def client(version: str) -> Any:
            made = docker.APIClient(base_url=self.base_url, version=version, timeout=self._request_timeout)
            clients.append(made)
            return made

        try:
            version = client(MINIMUM_DOCKER_API_VERSION).version(api_version=False)["ApiVersion"]
            api = client(version)
            stream = api.events(decode=True, filters={"type": "container"})
            inspect = client(version)  # a second client: the event stream holds its connection
        except Exception:
            for made in clients:
                made.close()
            raise
        clients[0].close()
        self._stream, self._events_api = stream, api
        old, self._api = self._api, inspect
        if old is not None:
            old.close()
        self._connected = True
        self.connects += 1
        if self._warned:
            log.info("docker: connected again at %s; container metadata resumes", self.base_url)
        self._warned = False
        self.state = "connected"
        self._resync(api)
        return stream

    def _resync(self, api: Any) -> None:
        """After (re)connecting: drop containers destroyed while we were away,
        fetch the running ones (they may have started meanwhile)."""
        existing = {c["Id"] for c in api.containers(all=True)}
        with self._lock:
            for cid in [cid for cid in self._cache if cid not in existing]:
                del self._cache[cid]
            self._negative.clear()
        running = [c["Id"] for c in api.containers()]
        for cid in running[: self._cache_size]:
            if cid not in self._cache:
                self._schedule(cid)

    def _unavailable(self, reason: str) -> None:
        self._connected = False
        self.state = f"unavailable: {reason}"
        if not self._warned:
            self._warned = True
            log.warning(
                "docker: unavailable (%s); container names will be missing until it is back (retrying)",
                reason,
            )

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        api, self._events_api = self._events_api, None
        for closing in (stream, api):
            if closing is not None:
                try:
                    closing.close()
                except Exception:  # already closed by the daemon going away
                    pass

    def _on_event(self, event: Mapping[str, Any]) -> None:
        if event.get("Type", "container") != "container":
            return
        self.events += 1
        action = str(event.get("Action") or event.get("status") or "").split(":", 1)[0]
        actor = event.get("Actor")
        cid = (actor.get("ID") if isinstance(actor, Mapping) else None) or event.get("id")
        if not isinstance(cid, str) or not cid:  # the daemon's answer is untrusted too
            return
        if action == "destroy":
            with self._lock:
                self._cache.pop(cid, None)
                self._want_layers.pop(cid, None)  # removed before its inspect answered
                self._destroyed[cid] = None
                if len(self._destroyed) > self._negative_size:
                    self._destroyed.popitem(last=False)
                    self.destroyed_evicted += 1
        elif action in ("create", "start", "rename", "update"):
            told = container_from_event(cid, actor)
            with self._lock:
                self._negative.pop(cid, None)
                known = self._cache.get(cid)
                if action == "start" and known is not None:
                    return  # named at create (or before a restart): nothing of ours changed
                if told is not None:
                    if known is not None and known.hostname:  # the event does not say it
                        told = dataclasses.replace(told, hostname=known.hostname)
                    self._put(cid, told)
                else:
                    self._cache.pop(cid, None)
                if action in ("rename", "update") and cid in self._inflight:
                    self._stale.add(cid)
                if action == "create" and self.on_layers is not None:
                    attrs = actor.get("Attributes") if isinstance(actor, Mapping) else None
                    image = attrs.get("image") if isinstance(attrs, Mapping) else None
                    self._want_layers[cid] = image if isinstance(image, str) and image else None
                    if len(self._want_layers) > self._want_layers_size:  # their inspects never came (dropped)
                        self._want_layers.popitem(last=False)
            self._schedule(cid)  # the hostname, and the labels exactly

    # ---------------------------------------------------- the fetch thread

    def _fetcher(self) -> None:
        service_thread("qtap-docker-get")
        import docker

        while not self._stop.is_set():
            try:
                # stop() queues _STOP, or finds the queue full and so this
                # loop busy: the timeout is a backstop, not a poll (at 0.5 s it
                # was two of an idle agent's wake-ups a second).
                cid = self._queue.get(timeout=5.0)
            except queue.Empty:
                continue
            if cid is _STOP:
                break
            info: ContainerInfo | None = None
            api = self._api
            try:
                if api is not None and self._connected:
                    self.fetches += 1
                    self._layers_from_image(api, cid)
                    data = api.inspect_container(cid)
                    self._give_layers(cid, data)  # first: the container may be starting now
                    info = container_from_inspect(data)
            except docker.errors.NotFound:
                self.not_docker += 1
                with self._lock:
                    self._negative[cid] = time.monotonic() + self._negative_ttl
                    if len(self._negative) > self._negative_size:
                        self._negative.popitem(last=False)
                        self.negative_evicted += 1
            except Exception as exc:  # daemon went away mid-fetch, or an answer of the wrong shape
                self.fetch_errors += 1
                log.debug("docker: inspect %.12s failed: %s", cid, exc)
            with self._lock:
                if cid in self._stale:  # renamed while we asked: ask again
                    self._stale.discard(cid)
                    try:
                        self._queue.put_nowait(cid)
                        continue  # the same future waits for the new answer
                    except queue.Full:
                        self.fetch_dropped += 1
                        info = None
                if info is not None and cid not in self._destroyed:
                    self._put(cid, info)
                future = self._inflight.pop(cid, None)
            if future is not None:
                future.set_result(info)
        # Wake anyone still waiting.
        with self._lock:
            pending, self._inflight = self._inflight, {}
        for future in pending.values():
            future.set_result(None)

    def _layers_from_image(self, api: Any, cid: str) -> None:
        """A created container's image layers from an ``inspect`` of its image,
        before the container's own: the daemon answers that at once, where the
        container's waits while it is being started (180 ms measured here, by
        when a short first process has run).  Any failure leaves them to the
        container's inspect."""
        with self._lock:
            image = self._want_layers.get(cid)
        if image is None:
            return
        try:
            layers = layers_of_image(api.inspect_image(image))
        except Exception as exc:  # gone, retagged, the daemon away: the container's inspect follows
            log.debug("docker: inspect of image %s failed: %s", image, exc)
            return
        if layers and self._hand_layers(cid, layers):
            self.layers_from_image += 1

    def _give_layers(self, cid: str, data: Mapping[str, Any]) -> None:
        """A created container's image layers, from its inspect, to ``on_layers``, once."""
        if cid not in self._want_layers or self.on_layers is None:
            return
        # Nothing here may fail the inspect it rides on: the container's name
        # and hostname come from the same answer.
        try:
            layers = image_layer_dirs(data)
        except Exception:  # a bug of ours (the daemon's answer is checked); names must keep coming
            log.exception("docker: reading %.12s's image layers", cid)
            return
        if layers is None:
            with self._lock:
                self._want_layers.pop(cid, None)
            self.layers_not_overlay += 1  # its libraries are found at its first process, as before
            return
        self._hand_layers(cid, layers)

    def _hand_layers(self, cid: str, layers: list[str]) -> bool:
        """``layers`` to ``on_layers`` if ``cid``'s are still wanted; whether they went."""
        on_layers = self.on_layers
        with self._lock:
            wanted = self._want_layers.pop(cid, False) is not False  # its value: an image name or None
        if not wanted or on_layers is None or not layers:
            return False
        try:
            log.debug("docker: %.12s created: its %d image layers to the capture", cid, len(layers))
            on_layers(layers)
        except Exception:  # a bug of ours; names must keep coming
            log.exception("docker: handing %.12s's image layers to the capture", cid)
            return False
        self.layers_given += 1
        return True

    def _put(self, cid: str, info: ContainerInfo) -> None:
        """Cache ``info`` (under the lock), the oldest going past the bound."""
        self._cache[cid] = info
        self._cache.move_to_end(cid)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
            self.evictions += 1


def container_from_inspect(data: Mapping[str, Any]) -> ContainerInfo:
    """``docker inspect`` JSON → ContainerInfo.  ``Config.Image`` is the name
    the user ran (``python:3.11-slim``); the top-level ``Image`` is a digest."""
    config = data.get("Config") or {}
    return ContainerInfo(
        id=data["Id"],
        runtime="docker",
        name=(data.get("Name") or "").lstrip("/") or None,
        image=config.get("Image") or data.get("Image"),
        labels=dict(config.get("Labels") or {}),
        hostname=config.get("Hostname") or None,
    )


def image_layer_dirs(data: Mapping[str, Any]) -> list[str] | None:
    """The image layer directories of an inspected container (overlay2's
    ``GraphDriver.Data.LowerDir``, on the host, topmost first); None for
    another storage driver or an answer without them; empty for an image of
    no layer (``FROM scratch`` and nothing added).

    The container's own layers are left out: its upper directory is empty
    until it runs, and its ``-init`` layer holds only what Docker mounts over
    (``/etc/hosts``, ``/dev/console``); both are new for every container, and
    would only crowd the capture's cache of layers read."""
    layers = _overlay2_data(data)
    lower = layers.get("LowerDir") if layers is not None else None
    if not isinstance(lower, str):
        return None
    dirs = _on_host(lower.split(":"))
    return None if dirs is None else [d for d in dirs if not d.rstrip("/").endswith("-init/diff")]


def layers_of_image(data: Mapping[str, Any]) -> list[str] | None:
    """The layer directories of an inspected image (overlay2's: its top
    layer's ``UpperDir``, then ``LowerDir``, on the host, topmost first); None
    for another storage driver or an answer without them."""
    layers = _overlay2_data(data)
    if layers is None:
        return None
    upper, lower = layers.get("UpperDir"), layers.get("LowerDir")
    if not isinstance(upper, str) or not (lower is None or isinstance(lower, str)):
        return None
    return _on_host([upper, *(lower.split(":") if lower else [])])


def _overlay2_data(data: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """An inspect answer's ``GraphDriver.Data``, if its driver is overlay2."""
    driver = data.get("GraphDriver")
    if not isinstance(driver, Mapping) or driver.get("Name") != "overlay2":
        return None
    layers = driver.get("Data")
    return layers if isinstance(layers, Mapping) else None


def _on_host(dirs: list[str]) -> list[str] | None:
    """``dirs`` if every one is an absolute path on the host; None for an answer we do not understand."""
    return dirs if all(d.startswith("/") for d in dirs) else None


# Event attributes that are not the container's labels.
_NOT_LABELS = frozenset({"name", "image", "oldName", "exitCode", "signal", "execID", "execDuration"})


def container_from_event(cid: str, actor: Any) -> ContainerInfo | None:
    """What a container event's ``Actor.Attributes`` say (its labels, with
    ``name`` and ``image``), or None where they do not name it.  The
    daemon's answer is untrusted: values that are not strings are left out."""
    attrs = actor.get("Attributes") if isinstance(actor, Mapping) else None
    if not isinstance(attrs, Mapping):
        return None
    name, image = attrs.get("name"), attrs.get("image")
    if not isinstance(name, str) or not name:
        return None
    labels = {k: v for k, v in attrs.items() if isinstance(k, str) and isinstance(v, str) and k not in _NOT_LABELS}
    return ContainerInfo(id=cid, runtime="docker", name=name.lstrip("/"),
                         image=image if isinstance(image, str) and image else None, labels=labels)


def _reason(exc: BaseException, url: str) -> str:
    """A short cause: the OS error at the bottom of the SDK's wrapping."""
    where = url.removeprefix("unix://")
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FileNotFoundError):
            return f"no socket at {where}"
        if isinstance(seen, ConnectionRefusedError):
            return f"connection refused at {where}"
        if isinstance(seen, PermissionError):
            return f"permission denied on {where}"
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    for marker, reason in (
        ("No such file or directory", f"no socket at {where}"),
        ("Connection refused", f"connection refused at {where}"),
        ("Permission denied", f"permission denied on {where}"),
    ):
        if marker in text:
            return reason
    return text if len(text) < 200 else text[:197] + "..."
