"""The capture layer against real processes, real probes and real TLS stacks.

TLS tests run once per attach mode: ``auto`` (OpenSSL probed at the sites
``tuned.analyze`` proves) and ``entry`` (function-entry uprobes + uretprobes)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from qtap_devtools.capture import (
    Attachment,
    Capture,
    DataChunk,
    ProcessExec,
    ProcessExit,
    ProcessFork,
    Record,
    SocketAccept,
    SocketAddress,
    SocketClose,
    SocketConnect,
    TlsServerName,
    CgroupCreated,
)

sys.path.insert(0, str(Path(__file__).parent))
from realworld import (  # noqa: E402
    LARGE_SIZE, SMALL_BODY, Nginx, PlainHttpServer, free_port, have, make_cert, wait_port,
)

pytestmark = pytest.mark.kernel
MAX_CHUNK = 16384


class Collector:
    """Thread-safe record sink with deadline-bounded waits."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._cond = threading.Condition()

    def __call__(self, batch: list[Record]) -> None:
        with self._cond:
            self.records.extend(batch)
            self._cond.notify_all()

    def snapshot(self) -> list[Record]:
        with self._cond:
            return list(self.records)

    def wait_for(self, predicate: Callable[[list[Record]], object], timeout: float = 10.0, what: str = "") -> object:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate(self.records)
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
                self._cond.wait(min(left, 0.1))


def chunks(records, pid, *, fd=None, direction=None, source=None) -> list[DataChunk]:
    return [
        r for r in records
        if type(r) is DataChunk and r.pid == pid
        and (fd is None or r.fd == fd)
        and (direction is None or r.direction == direction)
        and (source is None or r.source == source)
    ]


def connection(records, pid: int, fd: int, opened_ns: int) -> list[Record]:
    """Records of one connection: fds are reused, so cut at its open and close."""
    closed = min((r.ts_ns for r in records if type(r) is SocketClose and r.pid == pid
                  and r.fd == fd and r.ts_ns >= opened_ns), default=1 << 63)
    return [r for r in records if getattr(r, "pid", None) == pid and getattr(r, "fd", None) == fd
            and opened_ns <= r.ts_ns <= closed]


def accepted_from(records, pid: int, peer_port: int) -> SocketAccept:
    found = [r for r in records if type(r) is SocketAccept and r.pid == pid and r.remote and r.remote.port == peer_port]
    assert found, f"no accept in {pid} from port {peer_port}"
    return found[-1]


def stream(records, pid, **kw) -> bytes:
    return b"".join(c.data for c in sorted(chunks(records, pid, **kw), key=lambda c: c.offset))


def assert_contiguous(cs: list[DataChunk]) -> None:
    """Per (fd, direction, source) stream: offsets start at 0 and leave no gap."""
    streams: dict[tuple, list[DataChunk]] = {}
    for c in cs:
        streams.setdefault((c.fd, c.direction, c.source, c.tls_ref if c.fd < 0 else 0), []).append(c)
    for key, items in streams.items():
        items.sort(key=lambda c: c.offset)
        assert items[0].offset == 0, (key, items[0].offset)
        for a, b in zip(items, items[1:]):
            assert b.offset == a.end, (key, a.offset, len(a.data), b.offset)
        assert all(len(c.data) <= MAX_CHUNK for c in items)


LIBSSL = os.path.realpath("/usr/lib/x86_64-linux-gnu/libssl.so.3")
WRAPPERS = ("SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex")


def start_capture(mode: str) -> Capture:
    sink = Collector()
    cap = Capture(sink, max_chunk=MAX_CHUNK, attach_mode=mode)
    cap.start()
    cap.sink = sink  # type: ignore[attr-defined]
    return cap


@pytest.fixture(scope="module")
def capture():
    cap = start_capture("auto")
    yield cap
    cap.stop()


@pytest.fixture(scope="module", params=["auto", "entry"])
def tls_capture(request, capture):
    """The module's auto-mode capture, or an entry-mode one beside it."""
    if request.param == "auto":
        yield capture
        return
    cap = start_capture("entry")
    yield cap
    cap.stop()


def libssl_attachment(cap: Capture) -> Attachment:
    found = [a for a in cap.attachments if os.path.realpath(a.path) == LIBSSL and a.error is None]
    assert found, cap.attachments
    return found[0]


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, cert):
    with Nginx(tmp_path_factory.mktemp("nginx"), cert) as web:
        yield web


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    (root / "hello.txt").write_text("plain hello body\n")
    (root / "large.bin").write_bytes(bytes(i % 253 for i in range(LARGE_SIZE)))
    with PlainHttpServer(root) as srv:
        yield srv


def run(argv: list[str], timeout: float = 20) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.communicate(timeout=timeout)
    return proc


def fd_of_connect(records, pid: int, port: int) -> int:
    fds = [r.fd for r in records if type(r) is SocketConnect and r.pid == pid and r.remote.port == port]
    assert fds, f"no connect record from {pid} to port {port}"
    return fds[-1]


# ---------------------------------------------------------------- loading


def test_every_probe_loads_and_tls_libraries_attach(tls_capture):
    stats = tls_capture.stats()
    assert stats["lost_records"] == 0
    libs = {a.library for a in tls_capture.attachments if a.error is None}
    assert libs >= {"openssl", "gnutls"}, tls_capture.attachments
    ssl = libssl_attachment(tls_capture)
    assert set(ssl.sites) == set(WRAPPERS)
    if tls_capture.attach_mode == "entry":
        assert ssl.mode == "entry"
        assert set(ssl.sites.values()) == {"entry"}
        assert {"SSL_write", "SSL_write:return", "SSL_read", "SSL_read:return"} <= set(ssl.symbols)
    gnutls = next(a for a in tls_capture.attachments if a.library == "gnutls" and a.error is None)
    assert gnutls.mode == "entry" and set(gnutls.sites.values()) == {"entry"}


def test_the_probes_compile_without_a_warning(tls_capture):
    """What the compiler prints goes to the agent's terminal at every start:
    a warning there (a constant operand of &&, once) reads as a fault."""
    assert tls_capture.shed_head_bytes and "warning" not in tls_capture.compile_messages, tls_capture.compile_messages


def test_auto_mode_probes_all_four_libssl_wrappers_at_tuned_sites(capture):
    ssl = libssl_attachment(capture)
    assert ssl.mode == "tuned", ssl.sites
    # The _ex pair: their call at entry and a uretprobe on the internal function.
    # SSL_write/SSL_read: the js at entry, and that same uretprobe as their return
    # (it completes their calls too; the jle after the call would be a second trap).
    for plain, ex in (("SSL_write", "SSL_write_ex"), ("SSL_read", "SSL_read_ex")):
        m = re.fullmatch(r"tuned call@0x[0-9a-f]+/uretprobe@(0x[0-9a-f]+)", ssl.sites[ex])
        assert m, ssl.sites
        assert re.fullmatch(rf"tuned js@0x[0-9a-f]+/uretprobe@{m[1]}", ssl.sites[plain]), ssl.sites


# ---------------------------------------------------------------- TLS


def test_curl_to_nginx_tls_is_plaintext_on_both_sides(tls_capture, nginx):
    sink = tls_capture.sink
    worker = nginx.worker_pids[0]
    curl = run(["curl", "-sk", "--http1.1", nginx.url("/small")])
    request_line = b"GET /small HTTP/1.1"
    body = SMALL_BODY.encode()

    sink.wait_for(lambda rs: body in stream(rs, curl.pid, direction="ingress", source="openssl"),
                  what="curl's decrypted response")
    sink.wait_for(lambda rs: body in stream(rs, worker, direction="egress", source="openssl"),
                  what="nginx's plaintext response")
    rs = sink.snapshot()

    curl_fd = fd_of_connect(rs, curl.pid, nginx.port)
    assert stream(rs, curl.pid, fd=curl_fd, direction="egress", source="openssl").startswith(request_line)
    assert body in stream(rs, curl.pid, fd=curl_fd, direction="ingress", source="openssl")

    # nginx's side: the fd accepted from curl's local port.
    curl_local = next(r.local.port for r in rs if type(r) is SocketAddress and r.pid == curl.pid and r.fd == curl_fd)
    accepted = accepted_from(rs, worker, curl_local)
    nfd = accepted.fd
    assert accepted.local is not None and accepted.local.port == nginx.port
    rs = connection(rs, worker, nfd, accepted.ts_ns) + [r for r in rs if getattr(r, "pid", 0) == curl.pid]
    assert stream(rs, worker, fd=nfd, direction="ingress", source="openssl").startswith(request_line)
    assert body in stream(rs, worker, fd=nfd, direction="egress", source="openssl")

    for pid, fd in ((curl.pid, curl_fd), (worker, nfd)):
        tls = chunks(rs, pid, fd=fd, source="openssl")
        raw = chunks(rs, pid, fd=fd, source="socket")
        # Only the handshake (not hooked: SSL_connect / SSL_do_handshake) is seen
        # as raw socket bytes; never ciphertext after the first plaintext chunk.
        first_tls = min(c.ts_ns for c in tls)
        assert all(c.ts_ns < first_tls for c in raw), f"ciphertext after TLS started on {pid}/{fd}"
        assert all(c.data[:1] == b"\x16" for c in raw if c.offset == 0), "raw bytes start with a TLS handshake"
        assert request_line not in b"".join(c.data for c in raw)
        assert_contiguous(tls + raw)


def test_two_mib_tls_response_is_split_with_contiguous_offsets(tls_capture, nginx):
    sink = tls_capture.sink
    worker = nginx.worker_pids[0]
    curl = run(["curl", "-sk", "--http1.1", "-o", "/dev/null", nginx.url("/large")])

    tail = bytes(i % 251 for i in range(LARGE_SIZE))[-4096:]

    # Wait for the body's last bytes, not for a length: the stream holds the
    # head too, so LARGE_SIZE bytes of it arrive before the body's end does.
    sink.wait_for(lambda rs: stream(rs, curl.pid, direction="ingress", source="openssl").endswith(tail),
                  what="2 MiB through curl's SSL_read")
    rs = sink.snapshot()
    ingress = chunks(rs, curl.pid, direction="ingress", source="openssl")
    assert_contiguous(ingress)
    received = sum(len(c.data) for c in ingress)
    assert len(ingress) >= LARGE_SIZE // MAX_CHUNK
    fd = ingress[0].fd
    assert fd == fd_of_connect(rs, curl.pid, nginx.port)
    curl_local = next(r.local.port for r in rs if type(r) is SocketAddress and r.pid == curl.pid and r.fd == fd)
    accepted = accepted_from(rs, worker, curl_local)

    def sent(rs):
        return chunks(connection(rs, worker, accepted.fd, accepted.ts_ns), worker, fd=accepted.fd,
                      direction="egress", source="openssl")

    # nginx's records come from another CPU's share of the ring: wait for them too.
    sink.wait_for(lambda rs: sum(len(c.data) for c in sent(rs)) >= received, what="2 MiB through nginx's SSL_write")
    egress = sent(sink.snapshot())
    assert sum(len(c.data) for c in egress) == received
    assert_contiguous(egress)


def test_wget_gnutls_is_captured(capture, nginx):
    if not have("wget"):
        pytest.skip("wget not installed")
    sink = capture.sink
    wget = run(["wget", "-q", "-O", "/dev/null", "--no-check-certificate", nginx.url("/json?x=1")])
    sink.wait_for(lambda rs: b'"uri":"/json?x=1"' in stream(rs, wget.pid, direction="ingress", source="gnutls"),
                  what="wget's decrypted response")
    rs = sink.snapshot()
    sent = stream(rs, wget.pid, direction="egress", source="gnutls")
    assert sent.startswith(b"GET /json?x=1 HTTP/1.1")
    fd = fd_of_connect(rs, wget.pid, nginx.port)
    assert {c.fd for c in chunks(rs, wget.pid, source="gnutls")} == {fd}
    assert_contiguous(chunks(rs, wget.pid, fd=fd))


NODE_CLIENT = """
const https = require('https');
process.stdin.once('data', () => {
  https.get(process.argv[1], {rejectUnauthorized: false, agent: false}, (res) => {
    let n = 0; res.on('data', (d) => { n += d.length; });
    res.on('end', () => { console.log('done', res.statusCode, n); process.exit(0); });
  });
});
console.log('ready');
"""


def test_node_https_get_is_captured_through_the_node_binary(tls_capture, nginx):
    if not have("node"):
        pytest.skip("node not installed")
    capture = tls_capture
    sink = capture.sink
    node = subprocess.Popen(["node", "-e", NODE_CLIENT, nginx.url("/json?from=node")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while not any(a.library == "openssl" and a.path.endswith("/bin/node") and a.error is None
                      for a in capture.attachments):
            assert time.monotonic() < deadline, f"node not attached: {capture.attachments}"
            time.sleep(0.05)
        node.stdin.write("go\n")
        node.stdin.flush()
        assert node.stdout.readline().startswith("done 200")
        att = next(a for a in capture.attachments if a.path.endswith("/bin/node") and a.error is None)
        # node's wrappers start with an emulated push: its plan is entry + uretprobe
        # at the symbol, attached by ELF virtual address (node's != file offset).
        if capture.attach_mode == "auto":
            assert att.mode == "tuned", att.sites
            assert all(re.fullmatch(r"tuned push@(0x[0-9a-f]+)/uretprobe@\1", att.sites[s]) for s in WRAPPERS)
        else:
            assert att.mode == "entry"
    finally:
        node.kill()
        node.wait()
    # node's own OpenSSL: the openssl probes, its records "nodetls" (its file's armed value).
    sink.wait_for(lambda rs: b'"uri":"/json?from=node"' in stream(rs, node.pid, direction="ingress", source="nodetls"),
                  what="node's decrypted response")
    rs = sink.snapshot()
    assert b"GET /json?from=node HTTP/1.1" in stream(rs, node.pid, direction="egress", source="nodetls")
    assert not chunks(rs, node.pid, source="openssl")
    # Node's OpenSSL talks to a memory BIO, so no syscall nests in SSL_*: the fd
    # is unknown (-1) and the stream is keyed by the SSL* instead.
    tls = chunks(rs, node.pid, source="nodetls")
    assert {c.fd for c in tls} == {-1}
    assert len({c.tls_ref for c in tls}) == 1
    assert_contiguous(tls)


LEAK_SOCKETS = """
import socket, sys, os
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1024)
kept = []
for _ in range(int(sys.argv[1])):
    client = socket.create_connection(server.getsockname())
    kept += [client, server.accept()[0]]
os._exit(0)  # with every socket open: none goes through close()
"""


def test_sockets_left_open_at_exit_do_not_stop_plaintext_capture(plain_server):
    """The socket table was a plain hash cleared only by close(): filled by
    processes that exited with sockets open, it marked no new socket, and
    plaintext capture ended for good.  A small table shows it quickly."""
    sink = Collector()
    cap = Capture(sink, max_chunk=MAX_CHUNK, seed_existing=False, max_sockets=256)
    cap.start()
    try:
        leak = subprocess.run([sys.executable, "-c", LEAK_SOCKETS, "300"], timeout=60)  # 600 sockets
        assert leak.returncode == 0
        curl = run(["curl", "-s", plain_server.url("/hello.txt?after=leak")])
        sink.wait_for(lambda rs: any(type(r) is DataChunk and r.pid == curl.pid and r.source == "socket"
                                     and b"after=leak" in r.data for r in rs), what="curl's plaintext request")
    finally:
        cap.stop()


def test_sni_from_curl_resolve(capture, nginx):
    sink = capture.sink
    host = "sni.example.test"
    curl = run(["curl", "-sk", "--resolve", f"{host}:{nginx.port}:127.0.0.1",
                f"https://{host}:{nginx.port}/small"])
    found = sink.wait_for(
        lambda rs: [r for r in rs if type(r) is TlsServerName and r.pid == curl.pid], what="SNI record")
    assert found[0].host == host
    assert found[0].ssl_ptr != 0


KEEPALIVE_TLS_CLIENT = """
import http.client, ssl, sys
c = http.client.HTTPSConnection("127.0.0.1", int(sys.argv[1]), context=ssl._create_unverified_context())
c.request("GET", "/small?first=1"); c.getresponse().read()
print("first", flush=True)
sys.stdin.readline()
c.request("GET", "/json?second=1"); body = c.getresponse().read()
print("second", len(body), flush=True)
sys.stdin.readline()   # the connection stays open: no close record follows the data
"""


def test_python_ssl_ex_calls_are_captured_with_their_fd_and_a_lone_request_is_delivered(tls_capture, nginx):
    """Python's ssl calls SSL_write_ex/SSL_read_ex (tuned: the uretprobe on the
    internal function).  The second request is a handful of data records and
    nothing else: no wake-up is forced for them, so they arrive through the
    reader's periodic drain."""
    sink = tls_capture.sink
    client = subprocess.Popen([sys.executable, "-c", KEEPALIVE_TLS_CLIENT, str(nginx.port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "first"
        sink.wait_for(lambda rs: b"GET /small?first=1" in stream(rs, client.pid, direction="egress",
                                                                    source="openssl"), what="the first request")
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().startswith("second")
        # Only a failure timeout: the drain runs every DRAIN_MS (50 ms).
        sink.wait_for(lambda rs: b'"uri":"/json?second=1"' in stream(rs, client.pid, direction="ingress",
                                                                      source="openssl"),
                      timeout=10, what="the lone second response, with no later record to wake the reader")
        rs = sink.snapshot()
        fd = fd_of_connect(rs, client.pid, nginx.port)
        sent = stream(rs, client.pid, fd=fd, direction="egress", source="openssl")
        assert sent.startswith(b"GET /small?first=1 HTTP/1.1\r\n")
        assert b"GET /json?second=1 HTTP/1.1\r\n" in sent
        tls = chunks(rs, client.pid, source="openssl")
        assert {c.fd for c in tls} == {fd}
        assert_contiguous(tls)
    finally:
        client.kill()
        client.wait()


STEPPED_TLS_CLIENT = """
import http.client, ssl, sys
c = http.client.HTTPSConnection("127.0.0.1", int(sys.argv[1]), context=ssl._create_unverified_context())
for i, line in enumerate(sys.stdin):
    c.request("GET", f"/small?step={i}"); c.getresponse().read()
    print(i, flush=True)
"""


def test_a_tls_stream_whose_socket_is_learned_late_keeps_its_offsets(nginx):
    """A TLS connection open before the capture, its socket not yet known (as
    in the moment before /proc is read): its calls learn no fd and are counted
    by their SSL* alone.  Once the socket is known, the next call names its fd
    and its offsets go on from where the fd-less ones stopped (the pipeline
    then joins the two as one connection: test_pipeline)."""
    client = subprocess.Popen([sys.executable, "-c", STEPPED_TLS_CLIENT, str(nginx.port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def step(n: int) -> None:
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == str(n)

    sink = Collector()
    cap = Capture(sink, max_chunk=MAX_CHUNK, seed_existing=False)
    try:
        step(0)  # before the capture
        cap.start()
        step(1)  # the socket unknown: no fd
        sink.wait_for(lambda rs: b"step=1" in stream(rs, client.pid, fd=-1, direction="egress", source="openssl"),
                      what="the fd-less request")
        seeded = [r for r in cap.seed_existing_sockets() if r.pid == client.pid]
        assert len(seeded) == 1 and seeded[0].remote.port == nginx.port
        fd = seeded[0].fd
        step(2)
        sink.wait_for(lambda rs: chunks(rs, client.pid, fd=fd, direction="ingress", source="openssl"),
                      what="the response read with the fd")
        rs = sink.snapshot()
        for direction in ("egress", "ingress"):
            before = chunks(rs, client.pid, fd=-1, direction=direction, source="openssl")
            after = chunks(rs, client.pid, fd=fd, direction=direction, source="openssl")
            assert before and after, direction
            assert {c.tls_ref for c in before} == {c.tls_ref for c in after}
            # One stream: the fd's first offset is where the fd-less ones ended.
            assert min(c.offset for c in after) == max(c.end for c in before), direction
        assert stream(rs, client.pid, fd=fd, direction="egress", source="openssl").startswith(b"GET /small?step=2 ")
    finally:
        cap.stop()
        client.kill()
        client.wait()


# ---------------------------------------------------------------- plaintext


def test_plaintext_curl_to_http_server_with_connection_records(capture, plain_server):
    sink = capture.sink
    curl = run(["curl", "-s", plain_server.url("/hello.txt")])
    srv = plain_server.pid
    sink.wait_for(lambda rs: any(type(r) is SocketClose and r.pid == curl.pid for r in rs), what="curl's close")
    sink.wait_for(lambda rs: b"plain hello body" in stream(rs, srv, direction="egress", source="socket"),
                  what="server's response bytes")
    rs = sink.snapshot()
    fd = fd_of_connect(rs, curl.pid, plain_server.port)
    connect = next(r for r in rs if type(r) is SocketConnect and r.pid == curl.pid and r.fd == fd)
    assert connect.remote.ip == "127.0.0.1"
    addr = next(r for r in rs if type(r) is SocketAddress and r.pid == curl.pid and r.fd == fd)
    assert addr.remote.port == plain_server.port and addr.local.ip == "127.0.0.1"
    assert addr.local.port not in (0, plain_server.port)

    assert stream(rs, curl.pid, fd=fd, direction="egress", source="socket").startswith(b"GET /hello.txt HTTP/1.1")
    assert b"plain hello body" in stream(rs, curl.pid, fd=fd, direction="ingress", source="socket")
    assert any(type(r) is SocketClose and r.pid == curl.pid and r.fd == fd for r in rs)

    accept = accepted_from(rs, srv, addr.local.port)
    rs = connection(rs, srv, accept.fd, accept.ts_ns) + [r for r in rs if getattr(r, "pid", 0) == curl.pid]
    assert accept.remote.ip == "127.0.0.1"
    assert accept.local is not None and accept.local.port == plain_server.port
    assert stream(rs, srv, fd=accept.fd, direction="ingress", source="socket").startswith(b"GET /hello.txt")
    assert_contiguous(chunks(rs, curl.pid, fd=fd) + chunks(rs, srv, fd=accept.fd))


def test_plaintext_two_mib_write_is_split_at_max_chunk(capture, plain_server):
    sink = capture.sink
    curl = run(["curl", "-s", "-o", "/dev/null", plain_server.url("/large.bin")])
    srv = plain_server.pid
    sink.wait_for(lambda rs: any(type(r) is SocketClose and r.pid == curl.pid for r in rs), what="curl's close")
    rs = sink.snapshot()
    fd = fd_of_connect(rs, curl.pid, plain_server.port)
    local = next(r.local.port for r in rs if type(r) is SocketAddress and r.pid == curl.pid and r.fd == fd)
    accept = accepted_from(rs, srv, local)

    def done(rs):
        conn = connection(rs, srv, accept.fd, accept.ts_ns)
        return len(stream(conn, srv, fd=accept.fd, direction="egress", source="socket")) > LARGE_SIZE
    sink.wait_for(done, what="2 MiB written by http.server")
    rs = sink.snapshot()
    mine = chunks(connection(rs, srv, accept.fd, accept.ts_ns), srv, fd=accept.fd, direction="egress")
    assert any(len(c.data) == MAX_CHUNK for c in mine), "writes larger than MAX_CHUNK are split"
    assert_contiguous(mine)
    assert sum(len(c.data) for c in mine) >= LARGE_SIZE
    assert capture.stats()["lost_records"] == 0


PRE_CONNECTED_CLIENT = """
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
c.request("GET", "/hello.txt"); c.getresponse().read()
print("first", flush=True)
sys.stdin.readline()
c.request("GET", "/hello.txt?second=1"); body = c.getresponse().read()
print("second", len(body), flush=True)
"""


def test_connection_opened_before_capture_is_seeded_and_captured(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.txt").write_text("plain hello body\n")
    # `python -m http.server` speaks HTTP/1.0 and closes after each reply; this
    # one keeps the connection alive, so it outlives the capture's start.
    script = tmp_path / "server.py"
    script.write_text(
        "import http.server, sys\n"
        "class H(http.server.SimpleHTTPRequestHandler):\n"
        "    protocol_version = 'HTTP/1.1'\n"
        "    def log_message(self, *a): pass\n"
        f"http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), "
        f"lambda *a, **k: H(*a, directory={str(root)!r}, **k)).serve_forever()\n"
    )
    port = free_port()
    server = subprocess.Popen([sys.executable, str(script), str(port)])
    client = None
    try:
        wait_port(port, proc=server)
        client = subprocess.Popen([sys.executable, "-c", PRE_CONNECTED_CLIENT, str(port)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "first"
        sink = Collector()
        with Capture(sink) as cap:
            seeded = [r for r in sink.snapshot() if type(r) is SocketAddress and r.origin == "seed"]
            mine = [r for r in seeded if r.pid == client.pid]
            assert mine and mine[0].remote.port == port
            client.stdin.write("go\n")
            client.stdin.flush()
            assert client.stdout.readline().startswith("second")
            sink.wait_for(lambda rs: b"GET /hello.txt?second=1" in stream(rs, client.pid, fd=mine[0].fd, direction="egress"),
                          what="the request on the pre-existing connection")
            sink.wait_for(lambda rs: b"plain hello body" in stream(rs, client.pid, fd=mine[0].fd, direction="ingress"),
                          what="the response on the pre-existing connection")
            assert cap.stats()["lost_records"] == 0
    finally:
        for p in (client, server):
            if p is not None:
                p.kill()
                p.wait()


# ---------------------------------------------------------------- processes


NULL_ACCEPT_SERVER = """
import ctypes, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
s = socket.socket(socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET)
s.bind(("::1" if sys.argv[1] == "6" else "127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
fd = libc.accept(s.fileno(), None, None)  # no address buffer, as node and Go accept
c = socket.socket(fileno=fd)
print(fd, c.recv(100).decode(), flush=True)
c.sendall(b"pong")
c.close()
"""


@pytest.mark.parametrize("family", ["4", "6"])
def test_a_socket_accepted_with_no_address_buffer_gets_its_address_from_the_kernel(capture, family):
    """accept(fd, NULL, NULL) gives the accept record no peer; the socket's
    first receive names its 4-tuple (tcp_rcv_space_adjust), in the kernel,
    however short the connection (asking /proc after it closed finds nothing)."""
    sink = capture.sink
    server = subprocess.Popen([sys.executable, "-c", NULL_ACCEPT_SERVER, family], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        host = "::1" if family == "6" else "127.0.0.1"
        with socket.create_connection((host, port)) as client:
            client.sendall(b"ping")
            assert client.recv(100) == b"pong"
            local = client.getsockname()
        fd, said = server.stdout.readline().split()
        assert said == "ping"
        fd = int(fd)

        def kernel_address(rs):
            return [r for r in rs if type(r) is SocketAddress and r.pid == server.pid and r.fd == fd
                    and r.origin == "kernel"]

        [address] = sink.wait_for(kernel_address, what="the address record from the first receive")
        accept = [r for r in sink.snapshot() if type(r) is SocketAccept and r.pid == server.pid and r.fd == fd]
        assert accept and accept[0].remote is None  # the kernel had no peer from accept itself
        assert (address.local.ip, address.local.port) == (host, port)
        assert (address.remote.ip, address.remote.port) == (host, local[1])
    finally:
        server.kill()
        server.wait()


def test_short_lived_process_exec_fork_exit(capture):
    sink = capture.sink
    sh = run(["sh", "-c", "/bin/true; echo done"])

    def the_true(rs):
        return [r for r in rs if type(r) is ProcessFork and r.parent_pid == sh.pid]
    forks = sink.wait_for(the_true, what="sh forking /bin/true")
    child = forks[0].child_pid
    sink.wait_for(lambda rs: any(type(r) is ProcessExit and r.pid == child for r in rs), what="true's exit")
    rs = sink.snapshot()
    exec_ = next(r for r in rs if type(r) is ProcessExec and r.pid == child)
    assert exec_.filename == "/bin/true" and exec_.comm == "true"
    exit_ = next(r for r in rs if type(r) is ProcessExit and r.pid == child)
    assert exit_.exit_code == 0
    assert exit_.ts_ns >= exec_.ts_ns >= forks[0].ts_ns


def test_an_exec_record_carries_the_command_line_read_from_argv(capture):
    """A process gone before /proc was read (a fork storm's curls) was named
    by its filename alone; the kernel now reads its argv as execve begins,
    also when a thread other than the leader execs, and says when it cut."""
    sink = capture.sink
    m = f"m{os.getpid()}x{time.monotonic_ns()}"

    def exec_of(pid: int) -> ProcessExec:
        found = sink.wait_for(lambda rs: [r for r in rs if type(r) is ProcessExec and r.pid == pid],
                              what=f"the exec of {pid}")
        return found[0]

    plain = run(["/bin/sh", "-c", "exit 0", "an argument with spaces", m])
    assert exec_of(plain.pid).args == f"/bin/sh -c exit 0 an argument with spaces {m}"
    long = run(["/bin/true", "a" * 300, m])  # one argument past what is read of one
    assert exec_of(long.pid).args == "/bin/true " + "a" * 255 + "…"
    many = run(["/bin/true", *[str(i) for i in range(40)], m])  # more arguments than are read
    assert exec_of(many.pid).args == "/bin/true " + " ".join(str(i) for i in range(23)) + "…"
    threaded = run([sys.executable, "-c", "import os, sys, threading\n"
                    "t = threading.Thread(target=os.execv, args=('/bin/true', ['/bin/true', sys.argv[1]]))\n"
                    "t.start(); t.join()", m])
    execs = sink.wait_for(lambda rs: [r for r in rs if type(r) is ProcessExec and r.pid == threaded.pid
                                      and r.filename == "/bin/true"], what="the thread's exec")
    assert execs[0].args == f"/bin/true {m}"


def test_a_cgroup_made_and_a_process_exec_in_it_carry_the_same_id(capture):
    """The mkdir record's id is the directory's inode number and the id an exec
    in that cgroup carries: how a container's process gone before /proc was
    read is still named (CgroupIndex)."""
    from qtap_devtools.enrich.cgroup import cgroup2_mount
    root = cgroup2_mount()
    assert root is not None, "no cgroup v2 hierarchy mounted"
    made = Path(root) / f"qtap-test-{os.getpid()}"
    made.mkdir()
    try:
        sink = capture.sink
        inode = made.stat().st_ino
        created = sink.wait_for(lambda rs: [r for r in rs if type(r) is CgroupCreated and r.path.endswith(made.name)],
                                what="the cgroup's mkdir record")
        assert (created[0].id, created[0].path) == (inode, "/" + str(made.relative_to(root)))
        sh = run(["sh", "-c", f"echo $$ > {made}/cgroup.procs && exec /bin/true"])
        assert sh.returncode == 0
        execs = sink.wait_for(lambda rs: [r for r in rs if type(r) is ProcessExec and r.pid == sh.pid
                                          and r.filename == "/bin/true"], what="true's exec")
        assert (execs[0].cgroup_id, execs[0].uid) == (inode, os.getuid())
    finally:
        for _ in range(50):  # the cgroup empties once true's exit is reaped
            try:
                made.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_exit_code_of_sh_exit_3(capture):
    sink = capture.sink
    sh = run(["sh", "-c", "exit 3"])
    assert sh.returncode == 3
    ex = sink.wait_for(lambda rs: [r for r in rs if type(r) is ProcessExit and r.pid == sh.pid], what="sh's exit")
    assert ex[0].exit_code == 3
    assert any(type(r) is ProcessExec and r.pid == sh.pid and r.filename.endswith("sh") for r in sink.snapshot())


def test_the_agent_itself_is_not_captured(capture, plain_server):
    urllib.request.urlopen(plain_server.url("/hello.txt"), timeout=5).read()
    run(["true"])  # something after it, so the ring has been drained past our request
    time.sleep(0.3)
    assert not [r for r in capture.sink.snapshot() if getattr(r, "pid", None) == os.getpid()]


def _drain(peer: socket.socket) -> None:
    """Read ``peer`` until it closes, in the background."""
    def loop() -> None:
        try:
            while peer.recv(1 << 20):
                pass
        except OSError:
            pass
    threading.Thread(target=loop, daemon=True).start()


def test_a_full_ring_is_handed_over_in_bounded_batches():
    """While the consumer is stalled, 20,000 small writes pile up in the ring;
    the next drain must hand them over at most BATCH_RECORDS at a time (a
    consumer that is full can then stop the reader), losing none."""
    from qtap_devtools.capture.loader import BATCH_RECORDS

    sizes: list[int] = []
    stall = threading.Event()
    got = Collector()

    def consumer(batch):
        sizes.append(len(batch))
        stall.wait(30)  # held until the writer is done
        got(batch)

    cap = Capture(consumer, max_chunk=MAX_CHUNK, seed_existing=False)
    cap.start()
    try:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            writer = subprocess.Popen([sys.executable, "-c", (
                "import socket, sys\n"
                f"s = socket.create_connection(('127.0.0.1', {port}))\n"
                "for i in range(20000): s.send(b'0123456789')\n"
                "print('done', flush=True); sys.stdin.readline()\n")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            peer, _ = listener.accept()
            _drain(peer)
            assert writer.stdout.readline().strip() == "done"
            stall.set()
            got.wait_for(lambda rs: len(chunks(rs, writer.pid, direction="egress")) >= 20000, timeout=60,
                         what="all 20,000 writes")
            writer.stdin.write("\n")
            writer.stdin.flush()
            writer.wait(10)
            peer.close()
        # More than a batch was waiting in the ring (the stall worked), and it
        # came over in full batches, never as one list of everything.
        assert max(sizes) == BATCH_RECORDS, sizes[:20]
        assert cap.stats()["lost_records"] == 0
    finally:
        stall.set()
        cap.stop()


def test_the_compilers_code_pages_are_handed_back_after_loading(capture):
    """bcc's LLVM and clang are needed only to compile the probes: their ~80 MiB
    of resident code pages are released once the probes are loaded.  Pages
    another process maps as well (a bcc tool running then) are not ours to
    release, and the kernel keeps them: only this process's own are counted."""
    from qtap_devtools.capture.loader import COMPILER_LIBRARIES

    assert capture.compiler_pages_released > 0
    resident, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts[0]) > 8 and ":" not in parts[0]:
                current = len(parts) > 5 and bool(COMPILER_LIBRARIES.search(parts[5]))
            elif current and parts[0] in ("Private_Clean:", "Private_Dirty:"):
                resident += int(parts[1]) * 1024
    assert resident < 16 << 20, f"{resident >> 20} MiB of compiler pages still resident"


class HalfPlaced(Capture):
    """A capture that makes a TLS call at the worst moment of its start: once
    libssl's write side is placed and its read side is not."""

    def __init__(self, sink, during: Callable[[], object], write_side_placed, **kw) -> None:
        super().__init__(sink, **kw)
        self.during, self.write_side_placed = during, write_side_placed
        self.result: object = None

    def _place(self, path, where, fn_name, ret, slot) -> None:
        super()._place(path, where, fn_name, ret, slot)
        if self.result is None and os.path.realpath(path) == LIBSSL and self.write_side_placed(where, fn_name, ret):
            self.result = self.during()


@pytest.mark.parametrize("mode", ["auto", "entry"])
def test_a_call_made_while_a_librarys_probes_are_placed_is_not_half_seen(nginx, mode):
    """A request written and its response read while only the write probes
    were live was seen without its response, and paired with the next
    request's response for the rest of its connection.  A file's probes now
    act together, once the last is placed (probes/tls_common.h, armed)."""
    def during() -> subprocess.Popen:
        return run(["curl", "-sk", "--http1.1", "-o", "/dev/null", nginx.url("/small?m=half")])

    write_side = {"auto": lambda where, fn, ret: fn.startswith("ssl_write_site_enter"),
                  "entry": lambda where, fn, ret: where == "SSL_write" and ret}[mode]
    sink = Collector()
    cap = HalfPlaced(sink, during, write_side, max_chunk=MAX_CHUNK, attach_mode=mode, seed_existing=False)
    cap.start()
    try:
        assert cap.probe_arming == "per file", cap.probe_arming
        half = cap.result
        assert isinstance(half, subprocess.Popen) and half.returncode == 0, "the call in between did not run"
        whole = run(["curl", "-sk", "--http1.1", "-o", "/dev/null", nginx.url("/small?m=whole")])
        worker = nginx.worker_pids[0]
        for pid in (whole.pid, worker):
            sink.wait_for(lambda rs: b"m=whole" in stream(rs, pid, source="openssl"), what=f"{pid}'s request")
        sink.wait_for(lambda rs: SMALL_BODY.encode() in stream(rs, whole.pid, direction="ingress", source="openssl"),
                      what="the later response")
        time.sleep(0.2)  # the reader drains every 50 ms: whatever the first call left is in by now
        rs = sink.snapshot()
        seen = [(r.pid, r.direction) for r in rs if type(r) is DataChunk and r.source == "openssl"
                and r.pid in (half.pid, worker) and b"m=half" in r.data]
        assert not seen, f"the call made while the probes were placed was seen in part: {seen}"
        assert not chunks(rs, half.pid, source="openssl")
    finally:
        cap.stop()


def test_a_kernel_without_uprobe_cookies_still_captures_through_bcc(nginx, monkeypatch):
    """Before 5.15 a perf event takes no BPF link: the probes go through bcc,
    cookie 0, armed from the start, and the capture says so."""
    from qtap_devtools.capture import links

    def refuse(*args, **kw):
        raise links.LinkUnsupported(22, "BPF_LINK_CREATE for a perf event: Invalid argument")

    monkeypatch.setattr(links.Links, "attach", refuse)
    sink = Collector()
    cap = Capture(sink, max_chunk=MAX_CHUNK, seed_existing=False)
    cap.start()
    try:
        assert cap.probe_arming.startswith("none (") and "Invalid argument" in cap.probe_arming
        assert libssl_attachment(cap).mode == "tuned"
        curl = run(["curl", "-sk", "--http1.1", nginx.url("/small?m=bcc")])
        sink.wait_for(lambda rs: SMALL_BODY.encode() in stream(rs, curl.pid, direction="ingress", source="openssl"),
                      what="curl's response through probes bcc attached")
        assert stream(sink.snapshot(), curl.pid, direction="egress", source="openssl").startswith(b"GET /small?m=bcc")
    finally:
        cap.stop()


def test_a_library_loaded_long_after_exec_is_attached_by_the_sweep(tmp_path):
    """A copy of libssl outside the library directories (a new inode), loaded
    by a process well after its exec-time scans: the periodic sweep finds it."""
    import shutil

    copy = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, copy)
    cap = Capture(Collector(), max_chunk=MAX_CHUNK, seed_existing=False, sweep_seconds=0.5)
    cap.start()
    child = subprocess.Popen([sys.executable, "-c", (
        "import ctypes, sys\n"
        "sys.stdin.readline()\n"
        f"ctypes.CDLL({str(copy)!r})\n"
        "print('loaded', flush=True)\n"
        "sys.stdin.readline()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # past the exec-time scans (0-1 s): only a sweep can find it now
        assert not [a for a in cap.attachments if a.path == str(copy)]
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "loaded"
        deadline = time.monotonic() + 30
        while not [a for a in cap.attachments if os.path.realpath(a.path) == str(copy)]:
            assert time.monotonic() < deadline, [a.path for a in cap.attachments]
            time.sleep(0.1)
        att = next(a for a in cap.attachments if os.path.realpath(a.path) == str(copy))
        assert att.ok and att.library == "openssl" and att.mode == "tuned"
    finally:
        child.kill()
        child.wait()
        cap.stop()


def test_a_file_no_process_maps_any_more_is_detached_and_attached_again_when_used(tmp_path, nginx):
    """A copy of libssl outside the library directories (as an image's own
    is), used through LD_LIBRARY_PATH: attached while a process maps it,
    detached once none has for two sweeps (its probes closed, its slot free),
    and attached and captured again when a process loads it again."""
    import shutil

    copy = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, copy)
    sink = Collector()
    cap = Capture(sink, max_chunk=MAX_CHUNK, seed_existing=False, sweep_seconds=0.3, keep_idle=0)
    cap.start()

    def holder() -> subprocess.Popen:  # keeps the copy mapped until its stdin closes
        child = subprocess.Popen([sys.executable, "-c", f"import ctypes, sys\nctypes.CDLL({str(copy)!r})\n"
                                  "print('loaded', flush=True)\nsys.stdin.read()\n"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "loaded"
        return child

    def mine() -> list[Attachment]:
        return [a for a in cap.attachments if a.path.endswith(str(copy))]  # /proc/PID/root/…: PID may be gone

    def until(cond, what: str) -> None:
        deadline = time.monotonic() + 30
        while not cond():
            assert time.monotonic() < deadline, f"{what}: {[a.path for a in cap.attachments]} {cap.stats()}"
            time.sleep(0.05)

    def captured_through_the_copy(m: str) -> None:
        curl = subprocess.run(["curl", "-sk", "--http1.1", "-o", "/dev/null", nginx.url(f"/small?m={m}")],
                              env={**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}, timeout=20)
        assert curl.returncode == 0
        sink.wait_for(lambda rs: any(m.encode() in c.data for c in rs if type(c) is DataChunk
                                     and c.source == "openssl" and c.direction == "egress"), what=m)

    held = [holder()]
    try:
        until(mine, "the copy was never attached")
        captured_through_the_copy("one")
        linked = cap.stats()["probes_linked"]
        held.pop().stdin.close()
        until(lambda: not mine(), "the copy was never detached")
        stats = cap.stats()
        assert stats["attachments_detached"] == 1 and stats["probes_linked"] < linked, stats
        held.append(holder())
        until(mine, "the copy was not attached again")
        assert cap.stats()["probes_linked"] == linked
        captured_through_the_copy("two")
    finally:
        for child in held:
            child.stdin.close()
            child.wait(10)
        cap.stop()


# A uprobe held as another program holds it: registered with a
# reference-counter offset, as bcc 0.26's Python tools register theirs (with
# whatever was on the stack: 6 was seen here).  No program on it: the kernel
# registers the probe at perf_event_open.  Held until stdin closes.
_FOREIGN_UPROBE = """
import ctypes as ct, os, sys
from bcc import BPF
from qtap_devtools.capture import links
path = sys.argv[1].encode()
_, offset = BPF._check_path_symbol(path, sys.argv[2].encode(), None, -1)
pmu, _ = links._pmu()
buf = ct.create_string_buffer(path)
attr = links._PerfEventAttr(type=pmu, size=ct.sizeof(links._PerfEventAttr), config=6 << 32, sample_period=1,
                            wakeup_events=1, uprobe_path=ct.addressof(buf), probe_offset=offset)
fd = links._libc.syscall(links._SYS_PERF_EVENT_OPEN, ct.byref(attr), -1, 0, -1, 0)
print("held" if fd >= 0 else os.strerror(ct.get_errno()), flush=True)
sys.stdin.read()
"""


def test_a_probe_another_program_holds_is_named_and_ours_placed_once_it_stops(tmp_path, nginx):
    """With bcc's sslsniff running, the kernel refused the agent's probes on
    SSL_write with a bare EINVAL, and the file stayed half attached until the
    agent restarted.  Now the error names what may hold it, and a sweep
    places them once it is gone."""
    import shutil

    copy = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, copy)
    foreign = subprocess.Popen([sys.executable, "-c", _FOREIGN_UPROBE, str(copy), "SSL_write"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parent.parent)
    sink = Collector()
    cap = Capture(sink, max_chunk=MAX_CHUNK, seed_existing=False, sweep_seconds=0.3, attach_mode="entry",
                  extra_binaries=[str(copy)])
    try:
        assert foreign.stdout.readline().strip() == "held"
        cap.start()
        att = next(a for a in cap.attachments if a.path == str(copy))
        assert not att.ok and "SSL_write" not in att.sites and att.sites["SSL_read"] == "entry"
        assert att.error.startswith("SSL_write and SSL_write return: perf_event_open of a uprobe at file offset 0x")
        assert "ref_ctr_offset mismatch" in att.error and f"{foreign.pid} python" in att.error, att.error
        assert cap.stats()["attachments_failed"] == 1
        foreign.stdin.close()
        foreign.wait(10)
        deadline = time.monotonic() + 30
        while not att.ok:
            assert time.monotonic() < deadline, att.error
            time.sleep(0.05)
        assert att.sites["SSL_write"] == "entry" and cap.stats()["attachments_retried"] == 1
        curl = subprocess.Popen(["curl", "-sk", "--http1.1", "-o", "/dev/null", nginx.url("/small?m=placed")],
                                env={**os.environ, "LD_LIBRARY_PATH": str(tmp_path)})
        assert curl.wait(20) == 0
        sink.wait_for(lambda rs: stream(rs, curl.pid, source="openssl").startswith(b"GET /small?m=placed"),
                      what="the request written through the probes placed late")
    finally:
        if foreign.poll() is None:
            foreign.kill()
            foreign.wait()
        cap.stop()


def _tcp_child(script: str) -> tuple[subprocess.Popen, socket.socket]:
    """A child connected to a socket of ours (returned with it) that runs
    ``script`` with its end as ``s``: what it sends and reads is what the
    probes see.  ``step()`` in the script waits for ``_go``."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        child = subprocess.Popen([sys.executable, "-c", (
            "import socket, sys, time\n"
            f"s = socket.create_connection(('127.0.0.1', {listener.getsockname()[1]}))\n"
            "def step():\n"
            "    print('ready', flush=True); sys.stdin.readline()\n"
            + script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        peer, _ = listener.accept()
    return child, peer


def _go(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline().strip() == "ready"
    proc.stdin.write("\n")
    proc.stdin.flush()


def test_a_call_past_the_records_per_call_limit_ends_with_a_record_of_where_it_ended(capture):
    """One write of 2 MiB + 10 (a blocking socket moves it in one call): the
    probes emit 64 records of 16 KiB and count the call as cut (not as records
    the ring lost), and a record with no bytes says where the call ended, so
    the cut shows at once."""
    size = (2 << 20) + 10
    before = capture.stats()
    writer, peer = _tcp_child(f"step(); s.sendall(b'z' * {size})\nstep()\n")
    with peer:
        _drain(peer)
        _go(writer)
        sink = capture.sink
        ended = sink.wait_for(lambda rs: [c for c in chunks(rs, writer.pid, direction="egress", source="socket")
                                          if not c.data], what="the record of where the write ended")
        _go(writer)
        writer.wait(10)
    mine = chunks(sink.snapshot(), writer.pid, fd=ended[0].fd, direction="egress", source="socket")
    kept = [c for c in mine if c.data]
    assert [c.offset for c in ended] == [size]
    assert len(kept) == 64 and sum(len(c.data) for c in kept) == 64 * MAX_CHUNK
    assert ended[0].ts_ns == kept[0].ts_ns  # stamped as the write's records: when the call began
    after = capture.stats()
    assert after["calls_over_record_limit"] - before["calls_over_record_limit"] == 1
    assert after["lost_records"] == before["lost_records"]


def test_a_ring_smaller_than_the_traffic_wraps_without_corrupting_records():
    """8 MiB through a 1 MiB ring: the reader walks records across the wrap
    (a record that wraps is joined from the end and the start of the data
    area); every record that arrives holds exactly the bytes written at its offset."""
    pattern = bytes(range(251)) * (8 * 1024 * 1024 // 251 + 64)
    got = Collector()
    cap = Capture(got, max_chunk=MAX_CHUNK, seed_existing=False, ring_mib=1, shed_head_bytes=0)
    cap.start()
    try:
        writer, peer = _tcp_child(
            "p = bytes(range(251)) * (8 * 1024 * 1024 // 251 + 64)\n"
            "step()\n"
            "for i in range(128):\n"
            "    s.sendall(p[i * 65536:(i + 1) * 65536]); time.sleep(0.002)\n"
            "step()\n")
        with peer:
            _drain(peer)
            _go(writer)
            _go(writer)  # the writes are done
            got.wait_for(lambda rs: sum(len(c.data) for c in chunks(rs, writer.pid, direction="egress"))
                         >= 4 << 20, timeout=30, what="most of 8 MiB")
            writer.wait(10)
        time.sleep(0.2)
        cs = chunks(got.snapshot(), writer.pid, direction="egress")
        assert sum(len(c.data) for c in cs) >= 4 << 20
        for c in cs:
            assert c.data == pattern[c.offset : c.end], f"record at offset {c.offset} differs"
        assert cap.stats()["parse_errors"] == 0
    finally:
        cap.stop()


def shedding_capture(got: Collector, level: list[float]) -> Capture:
    """A capture whose pressure is ``level[0]`` (1.0 to start), shedding once returned."""
    cap = Capture(got, max_chunk=MAX_CHUNK, seed_existing=False, pressure=lambda: level[0])
    cap.start()
    deadline = time.monotonic() + 5
    while not cap.shedding and time.monotonic() < deadline:
        time.sleep(0.02)
    if not cap.shedding:
        cap.stop()
        raise AssertionError("shedding did not start under full pressure")
    return cap


def test_while_shedding_calls_keep_their_message_head_and_bodies_are_cut():
    """Behind (pressure past SHED_ON), a call that starts a message keeps its
    first shed_head_bytes, a body-only call keeps nothing, offsets still move
    by whole calls (user space sees a gap, framing intact); caught up, whole
    calls again.  The probes count what they cut."""
    from qtap_devtools.capture.loader import SHED_HEAD_BYTES

    level = [1.0]
    got = Collector()
    cap = shedding_capture(got, level)
    try:
        head = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 80000\r\n\r\n"
        first = head + b"a" * (20000 - len(head))
        writer, peer = _tcp_child(
            f"step(); s.sendall({first!r}); s.sendall(b'b' * 30000)\n"
            "step(); s.sendall(b'c' * 30000)\n"
            "step()\n")
        with peer:
            _drain(peer)
            _go(writer)
            got.wait_for(lambda rs: chunks(rs, writer.pid, direction="egress"), what="the head record")
            level[0] = 0.0
            deadline = time.monotonic() + 5
            while cap.shedding and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not cap.shedding, "shedding did not stop with the pressure gone"
            _go(writer)
            got.wait_for(lambda rs: sum(len(c.data) for c in chunks(rs, writer.pid, direction="egress"))
                         >= SHED_HEAD_BYTES + 30000, what="the unshed write")
            _go(writer)
            writer.wait(10)
        cs = sorted(chunks(got.snapshot(), writer.pid, direction="egress"), key=lambda c: c.offset)
        assert cs[0].offset == 0 and cs[0].data == first[:SHED_HEAD_BYTES]  # the head, kept
        assert cs[0].shedding and not any(c.shedding for c in cs[1:])  # the flag says when
        assert not [c for c in cs if 20000 <= c.offset < 50000]  # the body-only call: nothing
        rest = [c for c in cs if c.offset >= 50000]
        assert rest[0].offset == 50000 and b"".join(c.data for c in rest) == b"c" * 30000
        calls, cut = cap.shed_counts()
        assert calls >= 2 and cut >= (20000 - SHED_HEAD_BYTES) + 30000
        stats = cap.stats()
        assert stats["shed_episodes"] == 1 and stats["shed_bytes"] == cut and stats["lost_records"] == 0
    finally:
        cap.stop()


def test_with_the_reader_stalled_the_probes_shed_on_their_own_before_the_ring_overflows():
    """A reader that gets no core (idle priority on a machine the traced
    programs fill) cannot turn shedding on.  A burst of large writes then
    filled the ring, and the kernel lost whole records, of any connection.
    Now the probes look at the ring themselves: past half of it unread, a
    body-only call keeps nothing, so the ring never overflows; nothing is lost
    and the stream's offsets still say where every byte went."""
    stall = threading.Event()
    stalled = threading.Event()
    got = Collector()

    def consumer(batch):
        stalled.set()
        stall.wait(30)  # held until the burst is over
        got(batch)

    cap = Capture(consumer, max_chunk=MAX_CHUNK, seed_existing=False, ring_mib=1)
    cap.start()
    call, calls = 64 * 1024, 24  # 1.5 MiB of body into a 1 MiB ring
    try:
        writer, peer = _tcp_child(
            "s.sendall(b'x')\n"
            f"step(); [s.sendall(b'b' * {call}) for _ in range({calls})]; s.sendall(b'end')\n"
            "step()\n")
        with peer:
            _drain(peer)
            assert stalled.wait(10), "the first record never reached the consumer"
            _go(writer)
            assert writer.stdout.readline().strip() == "ready"  # the burst and "end" are written
            assert not cap.shedding  # user space, stalled, never said to shed
            stall.set()
            end = 1 + call * calls
            got.wait_for(lambda rs: any(c.offset == end for c in chunks(rs, writer.pid, direction="egress")),
                         what="the write after the burst")
            writer.stdin.write("\n")
            writer.stdin.flush()
            writer.wait(10)
        cs = sorted(chunks(got.snapshot(), writer.pid, direction="egress"), key=lambda c: c.offset)
        body = [c for c in cs if 1 <= c.offset < end]
        kept = sum(len(c.data) for c in body)
        assert (1 << 19) - call <= kept < 1 << 20, kept  # about half the ring, whole calls, then nothing
        assert all(c.data == b"b" * len(c.data) for c in body)
        assert [c.data for c in cs if c.offset >= end] == [b"end"]  # offsets still moved by whole calls
        stats = cap.stats()
        assert stats["lost_records"] == 0
        assert stats["shed_calls_by_probes"] == stats["shed_calls"] >= calls - (1 << 20) // call
        assert stats["shed_bytes"] == call * calls - kept
    finally:
        stall.set()
        cap.stop()


def test_while_shedding_an_http2_call_that_starts_with_headers_keeps_its_head():
    """HTTP/2: a call that begins with a frame other than DATA (a response's
    HEADERS, ahead of its first DATA) keeps its head, so the status and
    headers survive; one that begins with DATA keeps nothing.  (Before, every
    HTTP/2 call was cut whole: a download begun while shedding lost its status.)"""
    from qtap_devtools.capture.loader import SHED_HEAD_BYTES

    def frame(ftype: int, payload: bytes, flags: int = 0, sid: int = 1) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload

    headers_first = frame(1, b"\x88" + b"\x40" * 40, flags=4) + frame(0, b"d" * 16000)
    data_first = frame(0, b"e" * 16000) + frame(0, b"f" * 4000, flags=1)
    level = [1.0]
    got = Collector()
    cap = shedding_capture(got, level)
    try:
        # Then a call under the cap, kept whole: one ring, so once its record
        # is read, any the calls before it made are too.
        writer, peer = _tcp_child(f"step(); s.sendall({headers_first!r}); s.sendall({data_first!r}); "
                                  "s.sendall(b'end')\nstep()\n")
        with peer:
            _drain(peer)
            _go(writer)
            got.wait_for(lambda rs: any(c.data == b"end" for c in chunks(rs, writer.pid, direction="egress")),
                         what="the last call's record")
            _go(writer)
            writer.wait(10)
        cs = sorted(chunks(got.snapshot(), writer.pid, direction="egress"), key=lambda c: c.offset)
        end = len(headers_first) + len(data_first)
        assert [(c.offset, c.data) for c in cs] == [(0, headers_first[:SHED_HEAD_BYTES]), (end, b"end")]
    finally:
        cap.stop()


def test_past_its_byte_budget_capture_keeps_heads_until_the_budget_refills():
    """--max-capture-rate: once more plaintext came in than the budget holds,
    the probes shed exactly as when behind (cause "over budget"); once a
    quarter of it has refilled, whole calls again."""
    budget = 128 * 1024  # a second's worth passes whole, then ~2 s of debt
    got = Collector()
    cap = Capture(got, max_chunk=MAX_CHUNK, seed_existing=False, byte_budget=budget)
    cap.start()
    try:
        head = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n"
        first = len(head) + 400000
        writer, peer = _tcp_child(
            f"step(); s.sendall({head!r} + b'a' * 400000)\n"
            "step(); s.sendall(b'b' * 300000)\n"
            "step(); s.sendall(b'c' * 20000)\n"
            "step()\n")
        with peer:
            _drain(peer)
            _go(writer)
            deadline = time.monotonic() + 10
            while not cap.shedding and time.monotonic() < deadline:
                time.sleep(0.01)
            assert cap.shedding and cap.shed_cause == "over budget"
            _go(writer)  # sent while shedding: a body-only call keeps nothing
            deadline = time.monotonic() + 10
            while cap.shedding and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not cap.shedding, "shedding did not stop with the budget refilled"
            _go(writer)
            got.wait_for(lambda rs: any(c.offset >= first + 300000 for c in chunks(rs, writer.pid, direction="egress")),
                         what="the write after the budget refilled")
            _go(writer)
            writer.wait(10)
        time.sleep(0.1)
        cs = sorted(chunks(got.snapshot(), writer.pid, direction="egress"), key=lambda c: c.offset)
        assert sum(len(c.data) for c in cs if c.offset < first) >= budget  # a burst of a second's worth passed
        assert not [c for c in cs if first <= c.offset < first + 300000]
        rest = [c for c in cs if c.offset >= first + 300000]
        assert rest[0].offset == first + 300000 and b"".join(c.data for c in rest) == b"c" * 20000
        calls, cut = cap.shed_counts()
        assert calls >= 1 and cut >= 300000
        stats = cap.stats()
        assert stats["shed_episodes"] == stats["shed_episodes_over_budget"] == 1
        assert stats["byte_budget_per_second"] == budget and stats["lost_records"] == 0
        assert stats["data_bytes_read"] >= sum(len(c.data) for c in cs)
        assert stats["ring_bytes"] == cap.ring_mib << 20 and 0 <= stats["ring_pending_bytes"] < stats["ring_bytes"]
    finally:
        cap.stop()


def test_bytes_sent_with_sendfile_move_the_stream_offset_past_them(capture, tmp_path):
    """nginx with ``sendfile on`` (Debian's default) sends a file's bytes with
    sendfile(2), which has no buffer to copy: the stream offset must still move
    past them, so the next response on the connection is found where it is,
    not read as more of the body."""
    with Nginx(tmp_path, None, sendfile=True) as srv:
        worker = srv.worker_pids[0]
        curl = run(["curl", "-s", "-o", "/dev/null", "-o", "/dev/null", srv.url("/large"), srv.url("/small")])
        assert curl.returncode == 0

        def second_head(rs):
            return [c for c in chunks(rs, worker, direction="egress", source="socket")
                    if SMALL_BODY.strip().encode() in c.data]

        capture.sink.wait_for(second_head, what="the /small response")
        out = sorted(chunks(capture.sink.snapshot(), worker, direction="egress", source="socket"),
                     key=lambda c: c.ts_ns)
        (small,) = second_head(out)
        fd = small.fd
        mine = [c for c in out if c.fd == fd and c.ts_ns <= small.ts_ns]
        heads = [c for c in mine if c.data.startswith(b"HTTP/1.1 200 OK")]
        assert len(heads) == 2 and heads[0].offset == 0
        head_len = heads[0].data.index(b"\r\n\r\n") + 4
        assert len(heads[0].data) == head_len  # the file itself went out with sendfile
        assert heads[1].offset == head_len + LARGE_SIZE  # found where it is
        assert sum(len(c.data) for c in mine) < 4096  # nothing of the 2 MiB body was copied
        # Each sendfile call says at once where the stream is now: the file's
        # last bytes are not known to be sent only when the next response comes.
        ends = [c.offset for c in mine if not c.data]
        assert ends and ends == sorted(ends) and ends[-1] == head_len + LARGE_SIZE, ends


def test_bytes_moved_with_splice_move_the_stream_offset_both_ways(capture):
    """splice(2) between a pipe and a socket (TCP proxies do this) copies no
    user buffer either: both directions' offsets must move past those bytes."""
    child, peer = _tcp_child(
        "import os\n"
        "r, w = os.pipe()\n"
        "step(); s.sendall(b'HEAD-A')\n"
        "os.write(w, b'x' * 5000); n = 0\n"
        "while n < 5000: n += os.splice(r, s.fileno(), 5000 - n)\n"
        "s.sendall(b'HEAD-B')\n"
        "step(); got = 0\n"
        "while got < 7000: got += os.splice(s.fileno(), w, 7000 - got); os.read(r, 65536)\n"
        "data = s.recv(100)\n"
        "step()\n")
    with peer:
        _go(child)
        expect = b"HEAD-A" + b"x" * 5000 + b"HEAD-B"
        buf = b""
        while len(buf) < len(expect):
            buf += peer.recv(65536)
        assert buf == expect
        _go(child)  # the child now splices 7000 bytes in from the socket, then reads 'TAIL'
        peer.sendall(b"y" * 7000 + b"TAIL")  # it splices exactly 7000: TAIL is left for recv
        _go(child)
        child.wait(10)

    def got(rs):
        out = chunks(rs, child.pid, direction="egress", source="socket")
        inn = chunks(rs, child.pid, direction="ingress", source="socket")
        return (out, inn) if any(c.data == b"HEAD-B" for c in out) and any(c.data == b"TAIL" for c in inn) else None

    out, inn = capture.sink.wait_for(got, what="the records after both splices")
    assert [(c.offset, c.data) for c in out if c.data] == [(0, b"HEAD-A"), (5006, b"HEAD-B")]
    assert [(c.offset, c.data) for c in inn if c.data] == [(7000, b"TAIL")]
    # and each splice call says where its stream is now, with a record of no bytes
    for records, last in ((out, 5006), (inn, 7000)):
        ends = [c.offset for c in records if not c.data]
        assert ends and ends == sorted(ends) and ends[-1] == last, ends
