"""The HTTP surface: SSE stream, DevTools page, REST, health and metrics.

Routes parse parameters and ask the broadcaster or the store; they hold no state
of their own.  Security defaults (DESIGN §6): the CLI binds loopback only, every
request's ``Host`` must name this agent (a DNS-rebinding page gets 403), there
are no CORS headers at all, and errors are JSON ``{"error": {code, message}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import parse_qsl, quote, unquote

import orjson
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qtap_devtools import __version__, har
from qtap_devtools import events as ev
from qtap_devtools.broadcast import Broadcaster, parse_event_id
from qtap_devtools.config import Config
from qtap_devtools.events import Envelope
from qtap_devtools.filters import FILTER_KEYS, EventFilter, FilterError, checked_side
from qtap_devtools.store import Store
from qtap_devtools.threads import name_thread

log = logging.getLogger(__name__)

API = "/devtools/api"
T = TypeVar("T")
REPLAY_BATCH_BYTES = 256 << 10  # a capture file's events go out this many bytes a write


@dataclass
class Runtime:
    """What the server needs from whoever produces events (capture or replay)."""

    config: Config
    broadcaster: Broadcaster
    store: Store
    mode: str  # "live" | "replay"
    greeting: Callable[[EventFilter], Envelope]
    capture_stats: Callable[[], dict] = dict
    capture_state: Callable[[], dict] = dict  # what system.connected's "capture" says, now
    not_ready: str | None = "capture is starting"
    replay_events: list[Envelope] | None = None
    token: str | None = None
    started_ns: int = field(default_factory=ev.now_ns)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


OWN_HEADER = b"x-qtap-devtools"  # pipeline.OWN_MARKER


class OwnMarker:
    """Names this agent in every response (``X-Qtap-Devtools: <instance>``).

    Its own port is left out of capture, but the page opened through a
    forwarder on this machine (``ssh -L`` to itself, socat, a TLS proxy) came
    back in as traffic: every page load's stream captured again, history and
    all.  The pipeline knows a connection whose responses carry this
    agent's name, shows none of it and stops reading it."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.header = (OWN_HEADER, runtime.broadcaster.instance.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, marked)


class HostGuard:
    """403 unless ``Host`` names this agent; with a token, also require it.

    Bound beyond loopback (which needs a token), clients reach the agent by
    whatever name or address the network gives it, so any ``Host`` passes and
    the token alone guards: a DNS-rebinding page cannot present it (the
    cookie belongs to the agent's own origin)."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        listen = runtime.config.listen
        names = {"localhost", "127.0.0.1", "[::1]", "::1", listen.host, f"[{listen.host}]"}
        self.allowed = {n.lower() for n in names}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").lower()
        name, port = (host.rsplit(":", 1) if ":" in host and not host.endswith("]") else (host, ""))
        any_host = bool(self.runtime.token) and not self.runtime.config.listen.is_loopback
        # Any port (a tunnel may arrive on another), but a port, not "11070@evil.com".
        if (name not in self.allowed or not _port_ok(port)) and not any_host:
            resp = error(403, "FORBIDDEN_HOST", f"Host {host!r} is not this agent (DNS-rebinding guard): open "
                         "it as localhost or 127.0.0.1 (an SSH tunnel's local end works), or bind beyond loopback "
                         "with --listen and --token")
            return await resp(scope, receive, send)
        token = self.runtime.token
        if token and scope["path"] != "/healthz" and not _token_ok(scope, headers, token):
            resp = error(401, "UNAUTHORIZED", "this agent needs its token: Authorization: Bearer <token> or ?token=")
            return await resp(scope, receive, send)
        await self.app(scope, receive, send)


def _token_ok(scope: Scope, headers: dict, token: str) -> bool:
    want = token.encode()

    def same(given: str | bytes) -> bool:  # in constant time, as bytes: any text compares
        return hmac.compare_digest(given if isinstance(given, bytes) else given.encode("utf-8", "replace"), want)

    auth = headers.get(b"authorization", b"")
    if auth.startswith(b"Bearer ") and same(auth[7:]):
        return True
    for part in headers.get(b"cookie", b"").split(b";"):
        k, _, v = part.strip().partition(b"=")
        if k == b"qtap_token" and same(unquote(v.decode("latin-1"))):  # as index() percent-encoded it
            return True
    query = scope.get("query_string", b"").decode("latin-1")
    return any(same(v) for k, v in parse_qsl(query) if k == "token")


def _accepts(request: Request, *names: str) -> None:
    """A 400 for a parameter this route does not read: a misspelt
    ``stauts=4xx`` must not pass for no filter at all."""
    accepted = (*names, "token")
    unknown = sorted({k for k in request.query_params.keys() if k not in accepted})
    if unknown:
        raise FilterError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                          f"this endpoint takes: {', '.join(accepted)}")


def _only(request: Request, *extra: str) -> EventFilter:
    """The request's event filter, once it names only parameters this route reads."""
    _accepts(request, *FILTER_KEYS, *extra)
    return EventFilter.from_query(request.query_params)


def _port_ok(port: str) -> bool:
    """No port, or a TCP port number (not "11070@evil.com", not 99999999999)."""
    return port == "" or (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535)


def _one(request: Request, name: str) -> str | None:
    """The parameter's one value, or None; given twice is an error, not the
    last one silently winning."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise FilterError(f"{name}: give one value, not {len(values)}")
    if values and not values[0].strip():
        raise FilterError(f"{name}= is empty: give a value, or leave {name} out")
    return values[0] if values else None


def _flag(request: Request, name: str, default: bool) -> bool:
    raw = _one(request, name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in ("true", "1", "yes", "false", "0", "no"):
        raise FilterError(f"{name}: expected true or false")
    return value in ("true", "1", "yes")


_DIGITS = re.compile(r"[0-9]{1,12}")  # ASCII digits only: int() also takes "1_0", " 1" and other scripts' digits


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = _one(request, name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not lo <= int(raw) <= hi:
        raise FilterError(f"{name}: expected an integer from {lo} to {hi}")
    return int(raw)


async def _off_loop(fn: Callable[[], T]) -> T:
    """Run a REST answer's work (parsing and filtering every held transaction,
    rendering a HAR of megabytes) on a worker thread: on the event loop it held
    up the stream, capture and /healthz for as long as it took (a second for a
    full history's HAR).  The GIL still serialises the two, but the loop gets
    its turn every switch interval instead of waiting for the whole answer.
    Two workers: the GIL lets no more run at once, and named, as the agent's
    other threads are, for ``top -H`` (asyncio's own pool names them python)."""
    global _rest_pool
    if _rest_pool is None:
        _rest_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qtap-rest", initializer=name_thread,
                                        initargs=("qtap-rest",))
    return await asyncio.get_running_loop().run_in_executor(_rest_pool, fn)


_rest_pool: ThreadPoolExecutor | None = None


def create_app(rt: Runtime) -> Starlette:
    bc, store, cfg = rt.broadcaster, rt.store, rt.config

    def guarded(fn):
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request)
            except FilterError as exc:
                return error(400, "INVALID_REQUEST", str(exc))

        endpoint.__name__ = fn.__name__
        return endpoint

    def no_parameters(fn):
        """A route that reads no query parameter: one given is a 400 all the same."""
        async def checked(request: Request) -> Response:
            _accepts(request)
            return await fn(request)

        checked.__name__ = fn.__name__
        return guarded(checked)

    @guarded
    async def stream(request: Request) -> Response:
        flt = _only(request, "snapshot", "after")
        if request.method == "HEAD":
            # The headers a GET would get, and no stream: uvicorn never reads
            # from a HEAD whose response streams, so a subscriber made for it
            # would outlive its client (a `curl -I` leaked one, queue and all).
            return Response(headers={"Cache-Control": "no-store", "Content-Type": "text/event-stream; charset=utf-8"})
        snapshot = _flag(request, "snapshot", True)
        resume = request.headers.get("last-event-id") or _one(request, "after")
        resume_after = parse_event_id(resume, bc.instance) if resume else None
        if resume and resume_after is None:
            raise FilterError("Last-Event-ID / after: expected an event id as sent in `id:` lines")
        replay = rt.replay_events
        last = bc.published if replay is None else len(replay)
        if resume_after is not None and resume_after > last:
            # Never sent by this agent: resumed after it, the stream would
            # wait for an event that may never come, and show nothing meanwhile.
            raise FilterError(f"Last-Event-ID / after: event {resume_after} has not been sent; "
                              f"the last is {last} (after=0 for all the history)")
        first: list[Envelope] = [rt.greeting(flt)]
        if replay is None and snapshot and not resume_after:  # fresh, or all history ("after=0"): who runs now
            # With all history, not those whose process.started it holds: it
            # would name them twice.
            told = bc.started_pids() if resume_after == 0 else set()
            first += [e for e in store.snapshot_processes() if e.inner.get("pid") not in told and flt.matches(e)]
        sub = bc.subscribe(flt, first, resume_after)
        # A capture file's stream ends after its last event, as `cat` would, so
        # `curl … | grep | jq` prints and exits; the page's EventSource (which
        # asks for text/event-stream) would only reconnect, so its stays open.
        ends = replay is not None and "text/event-stream" not in request.headers.get("accept", "")

        async def frames():
            try:
                while (frame := await sub.next_batch()) is not None:
                    yield frame
                    # Between writes the loop runs once: a client that went away
                    # is seen (uvicorn stops writing) before the next batch,
                    # instead of asyncio logging every write to its dead socket.
                    await asyncio.sleep(0)
                    if replay is not None and frame.startswith(b"event: system.connected"):
                        async for f in _replay_frames(replay, flt, resume_after):
                            yield f
                            await asyncio.sleep(0)
                        if ends:
                            return
            finally:
                bc.unsubscribe(sub)

        async def _replay_frames(items: list[Envelope], flt: EventFilter, after: int | None):
            """The file's events after ``after``, joined up to REPLAY_BATCH_BYTES
            a write (one event a write at the recorded pace)."""
            speed = cfg.replay_speed
            prev = None
            out: list[bytes] = []
            size = 0
            for index, env in enumerate(items, 1):
                if bc.closed:
                    return
                if after is not None and index <= after:
                    continue
                if prev is None and env.ts_ns:
                    # The recording's start, matched or not: a filter's first
                    # match comes when it came, not at once.
                    prev = env.ts_ns
                if not flt.matches(env):
                    continue
                if speed > 0 and prev is not None and env.ts_ns > prev:
                    if out:
                        yield b"".join(out)
                        out, size = [], 0
                    await asyncio.sleep(replay_pause(env.ts_ns - prev, speed, cfg.replay_max_gap))
                prev = env.ts_ns or prev
                frame = env.frame[:-1] + b"id: %s-%d\n\n" % (bc.instance.encode(), index)
                out.append(frame)
                size += len(frame)
                if size >= REPLAY_BATCH_BYTES:
                    yield b"".join(out)
                    out, size = [], 0
            if out:
                yield b"".join(out)

        # sse-starlette separates lines with "\r\n" by default; our frames use
        # "\n", so the keep-alive comment does too (one line ending per stream).
        return EventSourceResponse(
            frames(),
            ping=cfg.keepalive_seconds,
            sep="\n",
            ping_message_factory=lambda: ServerSentEvent(comment="keep-alive", sep="\n"),
            headers={"Cache-Control": "no-store"},
        )

    @no_parameters
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "clients": len(bc.subscribers), "clientsTotal": bc.subscribed_total,
                             "version": __version__, "uptime_seconds": round((ev.now_ns() - rt.started_ns) / 1e9, 1)})

    @no_parameters
    async def readyz(request: Request) -> Response:
        if rt.not_ready:
            return JSONResponse({"status": "not ready", "reason": rt.not_ready}, status_code=503)
        return JSONResponse({"status": "ready", "mode": rt.mode})

    @guarded
    async def transactions(request: Request) -> Response:
        flt = _only(request, "limit", "offset", "before")
        limit = _int(request, "limit", 100, 1, 10_000)
        offset = _int(request, "offset", 0, 0, 10_000_000)
        before = _one(request, "before")
        held = list(store.transactions.items())  # (requestId, envelope), oldest first; taken here, read off the loop

        def page() -> dict:
            # A held transaction's body is parsed again from its frame when
            # read (megabytes of JSON for a full store: ~0.3-1.5 s of CPU
            # holding the GIL, and ~100 MB of dicts, for every `?limit=10` a
            # dashboard polls).  Only a filter on what the event says needs
            # every one parsed; without one (or on `type` alone) only the
            # page's rows are.
            candidates = [(rid, e.parsed()) for rid, e in held] if flt.reads_content else held
            rows = [(rid, e) for rid, e in candidates if flt.matches(e)]
            rows.reverse()  # newest first
            start = offset
            if before is not None:  # a cursor: new arrivals do not shift the pages after it
                at = next((i for i, (rid, _) in enumerate(rows) if rid == before), None)
                if at is None:
                    raise FilterError(f"before={before!r}: no such transaction held (evicted, or not matching)")
                start += at + 1
            chosen = [e.parsed() for _, e in rows[start : start + limit]]
            return {
                "transactions": [{**e.inner, "ts": e.body.get("ts")} for e in chosen],
                "total": len(rows),
                "limit": limit,
                "offset": offset,
                # Where the next page starts: ?before=<this> (absent on the last page).
                **({"next_before": chosen[-1].inner.get("requestId")} if start + limit < len(rows) and chosen else {}),
            }

        return JSONResponse(await _off_loop(page))

    @no_parameters
    async def transaction(request: Request) -> Response:
        env = store.transactions.get(request.path_params["request_id"])
        if env is None:
            return error(404, "NOT_FOUND", "no such transaction (it may have been evicted; see /devtools/api/stats)")
        env = env.parsed()
        full = ev.decode_transaction(env.body)
        return JSONResponse({**env.inner, "ts": env.body.get("ts"), "transaction": full})

    @no_parameters
    async def processes(request: Request) -> Response:
        return JSONResponse({"processes": store.process_list()})

    @no_parameters
    async def process_tree(request: Request) -> Response:
        return JSONResponse({"tree": store.process_tree()})

    @guarded
    async def connections(request: Request) -> Response:
        _accepts(request, "state")
        state = _one(request, "state") or "all"
        if state not in ("all", "open", "closed"):
            raise FilterError("state: expected all, open or closed")
        return JSONResponse({"connections": store.connection_list(state)})

    @guarded
    async def endpoints(request: Request) -> Response:
        _accepts(request, "side")
        return JSONResponse({"endpoints": store.endpoint_list(checked_side(_one(request, "side")))})

    @no_parameters
    async def stats(request: Request) -> Response:
        return JSONResponse({
            **store.stats(),
            "broadcast": bc.stats(),
            "capture": rt.capture_stats(),
            "capture_state": rt.capture_state(),
            "mode": rt.mode,
            "uptime_seconds": round((ev.now_ns() - rt.started_ns) / 1e9, 1),
            "version": __version__,
        })

    @guarded
    async def har_export(request: Request) -> Response:
        flt = _only(request, "limit")
        limit = _int(request, "limit", 10_000_000, 1, 10_000_000)
        held = store.recent_transactions()

        def export() -> JSONResponse:  # rendered off the loop too: megabytes of JSON
            chosen = []  # the newest: read from the newest back, only as far as the limit needs
            for env in reversed(held):
                if len(chosen) >= limit:
                    break
                env = env.parsed()
                if flt.matches(env):
                    chosen.append(env)
            chosen.reverse()
            doc = har.from_envelopes(chosen)
            return JSONResponse(doc, headers={"Content-Disposition": 'attachment; filename="qtap-devtools.har"'})

        return await _off_loop(export)

    @no_parameters
    async def metrics(request: Request) -> Response:
        return PlainTextResponse(_metrics(rt), media_type="text/plain; version=0.0.4")

    @no_parameters
    async def api_index(request: Request) -> Response:
        items = [
            {"path": r.path, "method": "GET", "description": (r.endpoint.__doc__ or "").strip()}
            for r in routes
            if isinstance(r, Route) and r.endpoint is not devtools_redirect  # listed with the page
        ]
        return JSONResponse({"total": len(items), "items": items})

    async def devtools_redirect(request: Request) -> Response:
        query = request.url.query
        return RedirectResponse("/devtools/" + (f"?{query}" if query else ""))

    async def index(request: Request) -> Response:
        page = resources.files("qtap_devtools").joinpath("ui/index.html")
        try:
            body = page.read_bytes()
        except FileNotFoundError:
            return error(404, "NOT_FOUND", "the DevTools page is not installed")
        resp = Response(body, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})
        if rt.token:
            # The page's own assets and stream are fetched without ?token=; the
            # guard already checked it, so hand the browser a cookie for them.
            # Percent-encoded: a cookie value cannot hold every character a token may.
            resp.set_cookie("qtap_token", quote(rt.token, safe=""), httponly=True, samesite="strict", path="/")
        return resp

    docs = {
        stream: f"Server-Sent Events: the live event stream (filters: {', '.join(FILTER_KEYS)}; snapshot=false; "
                "after=<event id> resumes after it, after=0 replays the history)",
        transactions: "Recent HTTP transactions, newest first (limit, offset or before for the next page, "
                      "and the stream's filters)",
        transaction: "One transaction with its full request and response",
        processes: "Live processes",
        process_tree: "Live processes as a tree",
        connections: "Open and recently closed connections (state=all|open|closed)",
        endpoints: "Endpoint index: side, host, method and route with counts and latency (?side=client|server)",
        stats: "Counters: events by type, drops, capture state",
        har_export: "Recent transactions as HAR 1.2 (same filters as the stream; limit: the newest N)",
        healthz: "Liveness",
        readyz: "Readiness: 200 once capture runs, 503 with the reason before",
        metrics: "Prometheus metrics",
        api_index: "This list",
        index: "The DevTools page (/devtools and / redirect here)",
    }
    for fn, doc in docs.items():
        fn.__doc__ = doc

    ui_dir = resources.files("qtap_devtools").joinpath("ui")
    routes = [
        Route(f"{API}/events", stream),
        Route(f"{API}/transactions", transactions),
        Route(f"{API}/transactions/{{request_id}}", transaction),
        Route(f"{API}/processes", processes),
        Route(f"{API}/process-tree", process_tree),
        Route(f"{API}/connections", connections),
        Route(f"{API}/endpoints", endpoints),
        Route(f"{API}/stats", stats),
        Route(f"{API}/har", har_export),
        Route(API, api_index),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/devtools", devtools_redirect),
        Route("/devtools/", index),
        Route("/", devtools_redirect),
    ]
    if ui_dir.is_dir():
        routes.append(Mount("/devtools/static", StaticFiles(directory=str(ui_dir)), name="static"))

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, "NOT_FOUND", f"no route {request.url.path}; see {API}")

    async def http_error(request: Request, exc: Exception) -> Response:
        # What Starlette raises itself (405 for a POST, ...): JSON like every other error.
        assert isinstance(exc, HTTPException)
        resp = error(exc.status_code, HTTPStatus(exc.status_code).name, str(exc.detail))
        resp.headers.update(exc.headers or {})  # Allow: GET on a 405
        return resp

    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("error serving %s", request.url.path)
        return error(500, "INTERNAL_ERROR", str(exc))

    app = Starlette(
        routes=routes,
        middleware=[Middleware(OwnMarker, runtime=rt), Middleware(HostGuard, runtime=rt)],
        exception_handlers={404: not_found, HTTPException: http_error, 500: internal},
    )
    return app


def replay_pause(gap_ns: int, speed: float, max_gap: float) -> float:
    """Seconds to wait before an event recorded ``gap_ns`` after the previous
    one, replayed at ``speed``: a quiet spell is shortened to ``max_gap``."""
    return min(gap_ns / 1e9 / speed, max_gap)


def _label(value: str) -> str:
    """A Prometheus label value: a replayed file's event types are anyone's text."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# Capture stats (see /devtools/api/stats) that are levels, not running counts:
# everything else there only grows, so it is a Prometheus counter (`_total`).
CAPTURE_GAUGES = {
    "pending_events": "Events made and waiting to be published (enrichment waits)",
    "attachments": "TLS library files attached now",
    "attachments_tuned": "TLS library files attached with tuned probes now",
    "attachments_failed": "TLS library files some of whose probes are not placed now (refused ones are retried)",
    "probes_linked": "Probes placed now",
    "byte_budget_per_second": "Plaintext taken in per second before shedding (--max-capture-rate), bytes",
    "ring_bytes": "Size of the kernel ring buffer (--ring-mib), bytes",
    "ring_pending_bytes": "Bytes in the kernel ring not yet read by the agent",
    "backlog_records": "Records read from the ring and waiting for the pipeline",
    "backlog_bytes": "Bytes of records waiting for the pipeline",
    "backlog_limit_records": "Records the backlog holds at most",
    "backlog_limit_bytes": "Bytes the backlog holds at most",
    "shedding": "1 while overload shedding cuts bodies",
}
CAPTURE_COUNTER_HELP = {
    "records": "Capture records handled by the pipeline",
    "transactions": "HTTP transactions assembled",
    "own_traffic_skipped": "The agent's own API traffic left out (its port; its responses through a forwarder)",
    "lost_records": "Records the kernel could not put in the ring (full)",
    "calls_over_record_limit": "Calls over 1 MiB (or 16 iovecs) whose bytes past that were not copied",
    "shed_calls": "TLS/socket calls whose bytes were cut while shedding",
    "shed_bytes": "Bytes left out while shedding",
    "shed_calls_by_probes": "Of shed_calls, cut by the probes on their own (the ring half full before the reader could say so)",
    "shed_episodes": "Times overload shedding started",
    "processes_gone_before_read": "Processes gone before their /proc entry was read",
    "containers_from_cgroup_id": "Processes whose container was named from the kernel's cgroup id",
    "tls_connections_unread": "TLS connections whose plaintext no attached library gave",
    "tls_fd_found_late": "TLS streams whose socket was learned after their first plaintext, then joined to it",
    "http2_connections": "HTTP/2 connections decoded (from their preface, or joined mid-connection)",
    "http2_connections_joined": "HTTP/2 connections decoded from their middle (their start was not seen)",
    "http2_connections_undecodable": "HTTP/2 connections whose decoding stopped (a capture gap, bad frames)",
    "http2_gaps_read_past": "Capture gaps HTTP/2 decoding read past at the next frame",
    "http2_streams_not_tracked": "HTTP/2 streams past one connection's limits (open streams, pushes, header bytes held), not shown",
    "record_errors": "Records whose handling failed (a bug; logged)",
    "file_events_dropped": "Events the --output file fell too far behind to take",
    "file_write_errors": "Events the --output file lacks: failed writes",
}


def _metrics(rt: Runtime) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]) -> None:
        lines.append(f"# HELP qtap_devtools_{name} {help_}")
        lines.append(f"# TYPE qtap_devtools_{name} {kind}")
        for labels, value in samples:
            lines.append(f"qtap_devtools_{name}{labels} {value}")

    st = rt.store
    metric("build_info", "gauge", "The agent's version and mode (always 1)",
           [(f'{{version="{_label(__version__)}",mode="{_label(rt.mode)}"}}', 1)])
    metric("uptime_seconds", "gauge", "Seconds since the agent started", [("", round((ev.now_ns() - rt.started_ns) / 1e9, 1))])
    metric("events_total", "counter", "Events published, by type",
           [(f'{{type="{_label(t)}"}}', n) for t, n in sorted(st.by_type.items())])
    metric("history_evicted_total", "counter", "Transactions let go from the REST history (its bounds)",
           [("", st.transactions.evicted)])
    bcs = rt.broadcaster.stats()
    metric("sse_clients", "gauge", "Connected SSE clients", [("", bcs["subscribers"])])
    metric("sse_dropped_events_total", "counter", "Events slow SSE clients missed", [("", bcs["subscriberDrops"])])
    cap = rt.capture_stats()
    for key, value in sorted(cap.items()):
        if not isinstance(value, (int, float)) or isinstance(value, bool) and key not in CAPTURE_GAUGES:
            continue
        if key in CAPTURE_GAUGES:
            metric(f"capture_{key}", "gauge", CAPTURE_GAUGES[key], [("", int(value))])
        else:
            name = key if key.endswith("_total") else f"{key}_total"
            help_ = CAPTURE_COUNTER_HELP.get(key, f"capture.{key} in /devtools/api/stats")
            metric(f"capture_{name}", "counter", help_, [("", value)])
    docker = (cap.get("enrich") or {}).get("docker") or {}
    if "lookups_too_slow" in docker:
        metric("docker_lookups_too_slow_total", "counter",
               "Docker lookups an event stopped waiting for (50 ms): it went out without the name",
               [("", docker["lookups_too_slow"])])
    metric("ready", "gauge", "1 once capture runs", [("", 0 if rt.not_ready else 1)])
    return "\n".join(lines) + "\n"
