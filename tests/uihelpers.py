"""Drive the DevTools page in Debian's chromium through Playwright.

Reusable by any browser test, replayed or live:

    with replay_server(tmp_path, events) as agent:
        page = open_devtools(new_page, agent.url)
        select_row(page, "/v1/users")

or, to choose what the stream says and when (``system.*`` events too):

    with event_feed(page) as feed:
        open_fed(page, agent.url, feed)
        feed.send(SystemDropped(missed=7, total_missed=7))

The page marks what tests need with ``data-testid``; helpers here read those,
never CSS classes or layout.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import queue
import shutil
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from qtap_devtools.enrich.model import ContainerInfo, PodInfo, ProcessInfo
from qtap_devtools.events import (
    Address,
    Connection,
    ConnectionClosed,
    ConnectionOpened,
    HttpMessage,
    HttpTransaction,
    ProcessStarted,
    SystemConnected,
)
from qtap_devtools.ids import new_id
from tests import samples
from tests.agentproc import agent, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_MS = 15_000

# ---------------------------------------------------------------- browser


def _playwright_or_skip():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing; fix: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"playwright does not import: {exc}; fix: .venv/bin/pip install playwright")
    return sync_playwright


@pytest.fixture(scope="session")
def browser():
    """One headless chromium for the session; each test gets its own context.
    ``launch()`` gives chromium a fresh temporary profile every time."""
    sync_playwright = _playwright_or_skip()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Console:
    """Console errors and uncaught exceptions of one page."""

    errors: list[str] = field(default_factory=list)

    def attach(self, page) -> None:
        page.on("console", lambda m: self.errors.append(self._line(m)) if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    @staticmethod
    def _line(m) -> str:
        # A failed load's text does not say which: its location does.
        url = (m.location or {}).get("url")
        return f"console.{m.type}: {m.text}" + (f" ({url})" if url else "")


@pytest.fixture
def page(browser):
    """A page in a fresh context, 1440×900, clipboard allowed, clock shown in
    UTC (times on the page do not depend on the machine); ``page.console``
    holds its console errors."""
    context = browser.new_context(viewport={"width": 1440, "height": 900}, accept_downloads=True,
                                  timezone_id="UTC", locale="en-US")
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    console = Console()
    console.attach(pg)
    pg.console = console
    try:
        yield pg
    finally:
        context.close()


# ---------------------------------------------------------------- the page


def open_devtools(page, base_url: str, query: str = ""):
    """Open the page and wait until its stream is connected.  ``/devtools``
    redirects to ``/devtools/`` (without the query, so a query goes direct)."""
    page.goto(f"{base_url}/devtools/{query}" if query else f"{base_url}/devtools")
    wait_connected(page)
    return page


def wait_connected(page, timeout: float = TIMEOUT_MS):
    page.wait_for_selector('[data-testid="status-connection"][data-state="connected"]', timeout=timeout)


def connection_state(page) -> str:
    return page.get_attribute('[data-testid="status-connection"]', "data-state")


def shown_count(page) -> int:
    """Rows passing the filters (the summary bar's count, not DOM rows)."""
    return int(page.get_attribute('[data-testid="summary-requests"]', "data-shown") or 0)


def total_count(page) -> int:
    return int(page.get_attribute('[data-testid="summary-requests"]', "data-total") or 0)


def next_frame(page) -> None:
    """Wait for the next animation frame: the table draws its rows in one,
    after the summary bar has counted them."""
    page.evaluate("() => new Promise(resolve => requestAnimationFrame(() => resolve()))")


def wait_rows(page, n: int, timeout: float = TIMEOUT_MS) -> None:
    """Wait until ``n`` transactions have arrived (all of them, filters aside)
    and the table has drawn them."""
    page.wait_for_function(
        "n => Number(document.querySelector('[data-testid=summary-requests]').dataset.total) >= n",
        arg=n,
        timeout=timeout,
    )
    next_frame(page)


def wait_shown(page, n: int, timeout: float = TIMEOUT_MS) -> None:
    """Wait until ``n`` rows pass the filters and the table has drawn them."""
    page.wait_for_function(
        "n => Number(document.querySelector('[data-testid=summary-requests]').dataset.shown) === n",
        arg=n,
        timeout=timeout,
    )
    next_frame(page)


def row_locator(page):
    return page.locator('[data-testid="requests-table"] [data-testid="request-row"]')


def rows(page) -> list[str]:
    """Text of the request rows in the DOM, top to bottom (only the rows in
    view exist: the table is virtualised)."""
    return page.evaluate(
        """() => [...document.querySelectorAll('[data-testid=requests-table] [data-testid=request-row]')]
              .sort((a, b) => Number(a.getAttribute('aria-rowindex')) - Number(b.getAttribute('aria-rowindex')))
              .map(r => [...r.children].map(c => c.textContent).join(' | '))"""
    )


def row_ids(page) -> list[str]:
    return page.evaluate(
        """() => [...document.querySelectorAll('[data-testid=requests-table] [data-testid=request-row]')]
              .sort((a, b) => Number(a.getAttribute('aria-rowindex')) - Number(b.getAttribute('aria-rowindex')))
              .map(r => r.dataset.key)"""
    )


def select_row(page, text: str):
    """Click the first request row containing ``text``; the detail pane opens."""
    row = row_locator(page).filter(has_text=text).first
    row.click()
    page.wait_for_selector('[data-testid="detail"]:not([hidden])')
    return row


def detail_tab(page, name: str):
    """Show a detail tab (headers, payload, response, timing, source); its panel."""
    page.click(f'[data-testid="tab-{name}"]')
    return page.locator(f'[data-testid="panel-{name}"]')


def set_filter(page, text: str) -> None:
    page.fill('[data-testid="filter-text"]', text)


def fields(locator) -> dict[str, str]:
    """The name → value pairs of a detail section (General, Source, Timing…)."""
    return locator.evaluate(
        """el => Object.fromEntries([...el.querySelectorAll('[data-testid=field-name]')]
              .map(k => [k.textContent, k.nextElementSibling.textContent]))"""
    )


def wait_toast(page, text: str) -> None:
    """Wait until the latest toast says exactly ``text``.  Its text stays after
    it hides (after about two seconds), so a slow test still sees it."""
    page.wait_for_function(
        "t => document.querySelector('[data-testid=toast]').textContent === t",
        arg=text,
    )


def clipboard(page) -> str:
    return page.evaluate("navigator.clipboard.readText()")


def copy_as_curl(page) -> str:
    """Copy the open transaction as cURL and return the command."""
    page.click('[data-testid="copy-curl"]')
    page.wait_for_selector('[data-testid="toast"]:not([hidden])')
    return page.evaluate("navigator.clipboard.readText()")


def screenshot(page, name: str = "devtools.png") -> Path:
    """Save to test-output/NAME; with QTAP_UPDATE_SCREENSHOT=1 also to docs/NAME."""
    out = ROOT / "test-output" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    if os.environ.get("QTAP_UPDATE_SCREENSHOT") == "1":
        docs = ROOT / "docs" / name
        docs.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, docs)
    return out


# ---------------------------------------------------------------- replay server


@contextlib.contextmanager
def replay_server(tmp_path: Path, events=None, port: int | None = None, name: str = "capture.txt",
                  args: tuple[str, ...] = ()):
    """``qtap-devtools replay`` of ``events`` (default: a varied session)."""
    capture = samples.write_capture(tmp_path / name, events if events is not None else rich_session())
    port = port or free_port()
    with agent(["replay", str(capture), *args], port, tmp_path / f"replay-{port}.log") as proc:
        yield proc


def start_replay(tmp_path: Path, capture: Path, port: int, log_name: str):
    """A replay server that the test stops and restarts itself."""
    from tests.agentproc import AgentProcess

    return AgentProcess(["replay", str(capture), "--listen", f"127.0.0.1:{port}"], port, tmp_path / log_name).start()


# ---------------------------------------------------------------- sample traffic

NODE = ProcessInfo(
    pid=4312, ppid=1, exe="/usr/bin/node", binary="node", cmdline="node server.js", uid=1000,
    user="app", hostname="web-7d9f", start_time_ns=samples.CREATED,
    container=ContainerInfo(id="9c1f0e2b7a44" + "0" * 52, runtime="containerd", name="web",
                            image="node:20-slim", labels={"app": "web"}),
    pod=PodInfo(name="web-7d9f8c6b5-x2x9q", namespace="shop"),
)
CURL = ProcessInfo(
    pid=52001, ppid=4000, exe="/usr/bin/curl", binary="curl", cmdline="curl -s https://status.example.org/",
    uid=0, user="root", hostname="devbox", start_time_ns=samples.CREATED,
)


def _conn(cid: str, proc: ProcessInfo, host: str, ip: str, port: int = 443, tls: bool = True) -> Connection:
    return Connection(
        connection_id=cid, pid=proc.pid, fd=9, opened_ns=samples.TS, direction="egress-external",
        local=Address("10.0.0.5", 40000 + proc.pid % 1000), remote=Address(ip, port), process=proc,
        sni=host if tls else None, http_host=host, l7_protocol="http1",
        tls_version="TLS 1.3" if tls else None, tls_libraries=["openssl"] if tls else [],
        tls_introspected=tls, is_tls=tls, bytes_sent=1840, bytes_received=9210,
    )


def _tx(conn: Connection, method: str, path: str, status: int | None, *, offset_ms: int, duration: float,
        req_headers: dict | None = None, req_body: bytes = b"", req_type: str | None = None,
        resp_headers: dict | None = None, resp_body: bytes = b"", resp_type: str | None = "application/json",
        reason: str = "", truncated_of: int | None = None, error: str | None = None,
        resp_trailers: dict | None = None) -> HttpTransaction:
    host = conn.http_host or ""
    headers = {"Host": host, "User-Agent": "node-fetch/1.0", "Accept": "*/*", **(req_headers or {})}
    if req_type:
        headers["Content-Type"] = req_type
    response = None
    if status is not None:
        response = HttpMessage(
            headers={"Content-Type": resp_type, **(resp_headers or {})} if resp_type else dict(resp_headers or {}),
            body=resp_body, body_size=truncated_of or len(resp_body), content_type=resp_type,
            body_truncated=truncated_of is not None, trailers=resp_trailers,
        )
    send = min(1.0, duration / 10)
    receive = duration / 5
    return HttpTransaction(
        request_id=new_id(samples.TS / 1e9 + offset_ms / 1000), connection=conn, method=method,
        scheme="https" if conn.is_tls else "http", authority=host, path=path, http_version="HTTP/1.1",
        request=HttpMessage(headers=headers, body=req_body, body_size=len(req_body), content_type=req_type),
        status=status, reason=reason, response=response,
        start_ns=samples.TS + int((offset_ms - duration) * 1e6), duration_ms=duration,
        bytes_sent=300 + len(req_body), bytes_received=200 + len(resp_body),
        timing={"send_ms": send, "wait_ms": duration - send - receive, "receive_ms": receive},
        error=error, incomplete=error is not None, ts_ns=samples.TS + offset_ms * 1_000_000,
    )


def tiny_png(width: int = 24, height: int = 16) -> bytes:
    """A real PNG (a blue-green gradient), built here so no file is needed."""
    raw = b"".join(
        b"\x00" + b"".join(bytes((20, 80 + 7 * x, 200 - 6 * y)) for x in range(width)) for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def rich_session() -> list:
    """Seed 003's session plus traffic that exercises every viewer: a form post,
    an image, binary, a truncated body, cookies, a redirect, an error."""
    shop = _conn("d4u5a1g7p3qk26l9aaa0", NODE, "shop.example.com", "93.184.216.34")
    cdn = _conn("d4u5a1g7p3qk26l9aaa1", NODE, "cdn.example.net", "151.101.1.57")
    plain = _conn("d4u5a1g7p3qk26l9aaa2", CURL, "status.example.org", "192.0.2.10", port=80, tls=False)
    cart = (b'{"cart":{"id":"c-1029","items":[{"sku":"A-1","qty":2,"price":12.5},'
            b'{"sku":"B-7","qty":1,"price":99.0}],"coupon":null,"gift":false},"total":124.0}')
    events = [
        *samples.session_events()[:4],
        ProcessStarted(NODE, ts_ns=samples.TS + 100_000_000),
        ProcessStarted(CURL, ts_ns=samples.TS + 200_000_000),
        ConnectionOpened(shop, ts_ns=samples.TS + 800_000_000),
        ConnectionOpened(cdn, ts_ns=samples.TS + 810_000_000),
        ConnectionOpened(plain, ts_ns=samples.TS + 820_000_000),
        *samples.session_events()[4:7],
        _tx(shop, "GET", "/api/cart?session=7f3a&lang=en", 200, offset_ms=38200, duration=42.6,
            resp_body=cart, resp_headers={"Set-Cookie": ["sid=7f3a; HttpOnly; Secure", "theme=dark; Path=/"],
                                          "Cache-Control": "no-store"}, reason="OK"),
        _tx(shop, "POST", "/login", 302, offset_ms=38400, duration=118.0, req_type="application/x-www-form-urlencoded",
            req_body=b"user=alice%40example.com&password=hunter2&remember=on", resp_type="text/html",
            resp_headers={"Location": "/account"}, resp_body=b"<a href=\"/account\">Found</a>", reason="Found"),
        _tx(cdn, "GET", "/img/logo.png", 200, offset_ms=38500, duration=23.1, resp_type="image/png",
            resp_body=tiny_png(), reason="OK"),
        _tx(cdn, "GET", "/fonts/inter.woff2", 200, offset_ms=38600, duration=31.4, resp_type="font/woff2",
            resp_body=bytes(range(256)) * 2, reason="OK"),
        _tx(shop, "GET", "/api/products?page=2", 200, offset_ms=38800, duration=212.0,
            resp_body=b'{"products":[' + b",".join(b'{"id":%d,"name":"Item %d"}' % (i, i) for i in range(60)) + b"]}",
            truncated_of=1_048_576 * 3, reason="OK", resp_headers={"Transfer-Encoding": "chunked"},
            resp_trailers={"X-Checksum": "sha256=9f86d081"}),
        _tx(shop, "DELETE", "/api/cart/items/B-7", 204, offset_ms=39000, duration=17.2, resp_type=None, reason="No Content"),
        _tx(plain, "GET", "/health", 200, offset_ms=39100, duration=4.2, resp_type="text/plain", resp_body=b"ok\n",
            reason="OK"),
        _tx(shop, "PUT", "/api/profile", 422, offset_ms=39300, duration=64.0, req_type="application/json",
            req_body=b'{"email":"not-an-email"}', resp_body=b'{"error":"invalid email","field":"email"}',
            reason="Unprocessable Entity"),
        _tx(shop, "GET", "/api/stream", None, offset_ms=39500, duration=5003.0, error="connection reset before response"),
        _tx(plain, "OPTIONS", "/v2/", 204, offset_ms=39600, duration=2.8, resp_type=None),
        ConnectionClosed(plain, ts_ns=samples.TS + 39_700_000_000),
    ]
    return events


def bulk_transactions(n: int) -> list:
    """``n`` transactions with unique request ids (the 10,000-row test)."""
    conn = samples.connection("d4u4jhg7p3qk26l91icg", "api.example.com")
    out = []
    for i in range(n):
        out.append(samples.transaction(
            conn, new_id(samples.TS / 1e9 + i), method="GET" if i % 3 else "POST",
            path=f"/v1/items/{i}", status=200 if i % 10 else 404, ts_offset_ms=36064 + i * 7,
            response_body=b'{"item": %d}' % i,
        ))
    return out


def screenshot_session() -> list:
    """The varied session and a little background traffic, to fill the picture."""
    api = _conn("d4u5a1g7p3qk26l9aab0", NODE, "api.payments.example", "198.51.100.7")
    paths = ["/v2/charges", "/v2/customers/cus_81", "/v2/invoices?limit=20", "/v2/balance", "/v2/events"]
    extra = []
    for i in range(22):
        status = (200, 200, 201, 200, 304, 200, 404, 200, 503)[i % 9]
        extra.append(_tx(api, ("GET", "POST", "GET", "GET")[i % 4], paths[i % len(paths)], status,
                         offset_ms=40_000 + i * 180, duration=18.0 + (i * 37) % 260,
                         resp_body=b'{"object":"list","data":[],"has_more":false}', reason="OK"))
    return [*rich_session(), *extra]


# ---------------------------------------------------------------- a hand-fed stream


class EventFeed:
    """A stand-in for ``/devtools/api/events`` that the test writes to, frame
    by frame, over one open stream: what arrives, and when, is the test's
    choice (no timers).  Replay cannot send ``system.*`` records (it skips
    them), so the status strip is tested through this.

    ``attach(page)`` routes the page's stream here (``route.continue_`` to
    this server's URL, which the page cannot see); the page itself is still
    served by a real agent.  Each connection the page opens is recorded with
    its query (``after=``), and ``send`` writes to the newest one.
    """

    def __init__(self, instance: str = "feed") -> None:
        self.instance = instance
        self.sent = 0  # events sent: their ids are instance-1, instance-2, …
        self.queries: list[str] = []  # the query of every connection, in order
        self._streams: list[queue.Queue] = []
        self._lock = threading.Lock()
        self.page = None
        feed = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                # As the agent answers HEAD on its stream: the headers, no
                # stream (the page asks so when its stream failed, to say why).
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()

            def do_GET(self):
                q: queue.Queue = queue.Queue()
                with feed._lock:
                    feed._streams.append(q)
                    feed.queries.append(self.path.partition("?")[2])
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(b": hello\n\n")
                self.wfile.flush()
                while True:
                    item = q.get()
                    if item is None:
                        return  # HTTP/1.0 without a length: closing ends the body
                    try:
                        self.wfile.write(item)
                        self.wfile.flush()
                    except OSError:
                        return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def attach(self, page) -> None:
        def to_feed(route):
            query = urlsplit(route.request.url).query
            route.continue_(url=f"{self.url}/devtools/api/events{'?' + query if query else ''}")

        self.page = page
        page.route("**/devtools/api/events*", to_feed)

    def wait_connections(self, n: int, timeout: float = TIMEOUT_MS / 1000) -> None:
        """Wait until the page has opened ``n`` streams.  Playwright's sync API
        runs route handlers only inside its own calls, so this waits in one."""
        end = time.monotonic() + timeout
        while len(self.queries) < n:
            if time.monotonic() > end:
                raise TimeoutError(f"the page opened {len(self.queries)} streams, not {n}")
            self.page.wait_for_timeout(20)

    def send(self, *events) -> str:
        """Write events (of the real event model) to the newest stream, each
        with the next id; returns the last id sent."""
        self.wait_connections(1)
        out = b""
        for event in events:
            self.sent += 1
            out += event.envelope().frame[:-1] + b"id: %s-%d\n\n" % (self.instance.encode(), self.sent)
        with self._lock:
            self._streams[-1].put(out)
        return f"{self.instance}-{self.sent}"

    def end_stream(self) -> None:
        """Close the newest stream, as an agent that went away would."""
        with self._lock:
            self._streams[-1].put(None)

    def close(self) -> None:
        with self._lock:
            for q in self._streams:
                q.put(None)
        self.server.shutdown()
        self.server.server_close()


def open_fed(page, base_url: str, feed, query: str = "", capture: dict | None = None):
    """Open the page on an agent with its stream routed to ``feed``, greet it
    (``system.connected``) and wait until it shows it is connected."""
    page.goto(f"{base_url}/devtools/{query}")
    feed.wait_connections(1)
    feed.send(greeting(capture))
    wait_connected(page)
    return page


@contextlib.contextmanager
def event_feed(page, instance: str = "feed"):
    feed = EventFeed(instance)
    feed.attach(page)
    try:
        yield feed
    finally:
        feed.close()


def greeting(capture: dict | None = None, mode: str = "live", version: str = "0.0.0-test"):
    """The ``system.connected`` an agent sends first (its capture state)."""
    return SystemConnected(version=version, hostname="feedhost", kernel="6.1.0-test", mode=mode,
                           capture=capture or {"state": "running", "attached": []}, filters={})
