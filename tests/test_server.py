"""The HTTP surface of a real agent process (replay mode: no root needed)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import orjson
import pytest
import uvicorn

from qtap_devtools import __version__
from qtap_devtools.broadcast import Broadcaster
from qtap_devtools.config import Config, Listen
from qtap_devtools.events import PROCESS_STARTED, PROCESS_STOPPED, Envelope, SystemConnected
from qtap_devtools.server import Runtime, create_app
from qtap_devtools.store import Store
from tests import samples
from tests.agentproc import ROOT, AgentProcess, agent, free_port, get


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    capture = samples.write_capture(tmp / "capture.txt")
    with agent(["replay", str(capture)], free_port(), tmp / "agent.log") as proc:
        yield proc


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:10001", "192.168.1.10", "localhost.evil.com",
                                  "localhost:11070@evil.com", "localhost:evil", "localhost:99999999999999999999",
                                  "localhost:65536", "127.0.0.1:000000080"])
def test_foreign_host_header_is_refused(server, host):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.putrequest("GET", "/devtools/api/stats", skip_host=True)
    conn.putheader("Host", host)
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 403
    err = orjson.loads(resp.read())["error"]
    assert err["code"] == "FORBIDDEN_HOST" and "open it as localhost or 127.0.0.1" in err["message"]  # how to fix it


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "localhost:{port}", "127.0.0.1:{port}"])
def test_local_host_names_are_served(server, host):
    status, _ = get(server.url + "/devtools/api/stats", headers={"Host": host.format(port=server.port)})
    assert status == 200


def test_no_wildcard_cors(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/devtools/api/transactions", headers={"Origin": "http://evil.example.com"})
    resp = conn.getresponse()
    resp.read()
    assert resp.getheader("Access-Control-Allow-Origin") is None


def test_errors_are_json(server):
    status, body = get(server.url + "/devtools/api/nope")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, body = get(server.url + "/devtools/api/transactions/zzz")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("POST", "/devtools/api/stats", body=b"{}")
    resp = conn.getresponse()
    body = orjson.loads(resp.read())
    conn.close()
    assert resp.status == 405 and body["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert set(resp.getheader("Allow").split(", ")) == {"GET", "HEAD"}


@pytest.mark.parametrize("query", ["status=abc", "pid=x", "type=bogus", "limit=-1", "limit=99999999",
                                   "q=" + "x" * 300, "limit=1&limit=2", "limit=1_0", "limit=%201", "limit=%D9%A3",
                                   "offset=1&offset=2", "before=nope", "status=%3E%3D999", "status=%3C000",
                                   "side=left", "pid=99999999999999999999999", "pid=-1", "pid=0", "pid=%2B5",
                                   "pid=1_0", "pid=%D9%A3", "pid=2147483648"])
def test_bad_query_parameters_get_400_with_reason(server, query):
    status, body = get(server.url + "/devtools/api/transactions?" + query)
    assert status == 400 and body["error"]["code"] == "INVALID_REQUEST"
    assert query.split("=")[0] in body["error"]["message"]


@pytest.mark.parametrize("path, query, says", [
    ("/devtools/api/transactions", "stauts=4xx", "'stauts'"),
    ("/devtools/api/events", "typ=request.http_transaction", "'typ'"),
    ("/devtools/api/har", "limt=5", "'limt'"),
    ("/devtools/api/connections", "stat=open", "'stat'"),
    ("/devtools/api/events", "snapshot=maybe", "snapshot: expected true or false"),
    ("/devtools/api/events", "after=1&after=2", "after: give one value, not 2"),
    ("/devtools/api/connections", "state=open&state=closed", "state: give one value, not 2"),
    # Present but empty: an error, not the parameter silently left out.
    ("/devtools/api/events", "after=", "after= is empty"),
    ("/devtools/api/connections", "state=", "state= is empty"),
    ("/devtools/api/transactions", "before=", "before= is empty"),
    ("/devtools/api/events", "type=", "type= is empty"),
    ("/devtools/api/events", "exe=%20,", "exe= is empty"),
    ("/devtools/api/transactions", "status=", "status= is empty"),
    ("/devtools/api/transactions", "status=600", "status='600'"),
    *[(path, "x=1", "'x'") for path in ("/devtools/api/endpoints", "/devtools/api/processes",
                                        "/devtools/api/process-tree", "/devtools/api/stats",
                                        "/devtools/api/transactions/zzz", "/devtools/api", "/healthz", "/readyz",
                                        "/metrics")],
])
def test_a_misspelt_or_unknown_parameter_is_a_400_naming_it(server, path, query, says):
    # Ignored, ``stauts=4xx`` would answer with every transaction as if filtered.
    status, body = get(f"{server.url}{path}?{query}")
    assert status == 400 and body["error"]["code"] == "INVALID_REQUEST"
    assert says in body["error"]["message"]
    if "unknown" in body["error"]["message"]:
        assert "takes:" in body["error"]["message"]


def test_bad_filter_on_the_stream_is_a_400_not_a_stream(server):
    status, body = get(server.url + "/devtools/api/events?status=99x")
    assert status == 400 and "status" in body["error"]["message"]


def test_transactions_page_with_a_cursor_that_new_arrivals_do_not_shift(tmp_path):
    from tests.uihelpers import bulk_transactions

    capture = samples.write_capture(tmp_path / "c.txt", bulk_transactions(25))
    with agent(["replay", str(capture)], free_port(), tmp_path / "a.log") as proc:
        url = proc.url + "/devtools/api/transactions?limit=10"
        pages, before = [], None
        while True:
            status, body = get(url + (f"&before={before}" if before else ""))
            assert status == 200 and body["total"] == 25
            pages.append([t["summary"]["request_path"] for t in body["transactions"]])
            before = body.get("next_before")
            if before is None:
                break
        assert [len(p) for p in pages] == [10, 10, 5]
        assert sum(pages, []) == [f"/v1/items/{i}" for i in reversed(range(25))]  # newest first, each once
        status, doc = get(proc.url + "/devtools/api/har?limit=3")
        assert status == 200 and [e["request"]["url"].rsplit("/", 1)[1] for e in doc["log"]["entries"]] == ["22", "23", "24"]


def test_server_side_filter_on_transactions(server):
    status, body = get(server.url + "/devtools/api/transactions?status=4xx,5xx")
    assert [t["summary"]["response_status"] for t in body["transactions"]] == [500, 404]
    status, body = get(server.url + "/devtools/api/transactions?status=4XX")  # as method= and exe=: any case
    assert status == 200 and [t["summary"]["response_status"] for t in body["transactions"]] == [404]
    status, body = get(server.url + "/devtools/api/transactions?method=POST")
    assert [t["summary"]["request_method"] for t in body["transactions"]] == ["POST"]


def test_rest_processes_connections_endpoints_and_index(server):
    assert get(server.url + "/devtools/api/processes")[1]["processes"] == []  # it stopped in the capture
    conns = get(server.url + "/devtools/api/connections")[1]["connections"]
    assert {c["state"] for c in conns} == {"open", "closed"}
    endpoints = get(server.url + "/devtools/api/endpoints")[1]["endpoints"]
    assert {(e["method"], e["path"]) for e in endpoints} == {("POST", "/v1/users"), ("GET", "/v1/missing"),
                                                             ("GET", "/v1/crash")}
    assert {e["side"] for e in endpoints} == {"client"}  # the capture's are all egress
    assert get(server.url + "/devtools/api/endpoints?side=client")[1]["endpoints"] == endpoints
    assert get(server.url + "/devtools/api/endpoints?side=server")[1]["endpoints"] == []
    assert get(server.url + "/devtools/api/endpoints?side=Client")[1]["endpoints"] == endpoints  # as the stream's
    status, body = get(server.url + "/devtools/api/endpoints?side=both")
    assert status == 400 and "side='both'" in body["error"]["message"], body
    index = get(server.url + "/devtools/api")[1]
    assert any(i["path"] == "/devtools/api/events" for i in index["items"])
    assert all(i["description"] for i in index["items"]), index  # every entry says what it is
    status, text = get(server.url + "/metrics")
    assert status == 200 and 'qtap_devtools_events_total{type="request.http_transaction"} 3' in text


def test_stream_starts_with_system_connected_and_filters(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/devtools/api/events?type=request.http_transaction&status=404")
    resp = conn.getresponse()
    assert resp.getheader("content-type").startswith("text/event-stream")
    lines = [resp.readline().decode().rstrip("\n") for _ in range(7)]
    conn.close()
    assert lines[0] == "event: system.connected"
    hello = orjson.loads(lines[1][6:])
    assert hello["data"]["filters"] == {"type": ["request.http_transaction"], "status": ["404"]}
    assert hello["data"]["mode"] == "replay"
    assert lines[3] == "event: request.http_transaction"
    assert orjson.loads(lines[4][6:])["data"]["data"]["summary"]["response_status"] == 404
    assert lines[5].startswith("id: ")


def cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "qtap_devtools", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_non_loopback_listen_is_refused_with_tunnel_advice(tmp_path):
    capture = samples.write_capture(tmp_path / "c.txt")
    r = cli("replay", str(capture), "--listen", "0.0.0.0:10001")
    assert r.returncode == 2
    assert "ssh -L 10001:localhost:10001" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["run", "--bogus"], ["replay"], ["run", "--listen", "x:y"],
                                  ["run", "--max-body-bytes", "lots"], ["run", "--max-body-bytes", "99999999999999"],
                                  ["run", "--max-body-bytes", "17m"],
                                  ["frobnicate"], ["run", "--ring-mib", "3"],
                                  ["run", "--ring-mib", "-8"], ["run", "--ring-mib", "4096"],
                                  ["run", "--queue-size", "-1"], ["replay", "f", "--queue-size", "x"]])
def test_bad_flags_are_one_line_and_exit_2(args):
    r = cli(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_or_unreadable_capture_is_one_line_exit_2(tmp_path):
    for path in (tmp_path / "missing.txt", tmp_path, "/dev/zero"):  # (zero: a line that never ends)
        r = cli("replay", str(path))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("har", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_a_port_in_use_is_one_line_naming_it_and_exit_1():
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        r = cli("replay", str(ROOT / "examples" / "traffic-capture.txt"), "--listen", f"127.0.0.1:{port}")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == (f"qtap-devtools: error: cannot listen on http://127.0.0.1:{port}: Address already "
                                f"in use (another qtap-devtools? `ss -ltnp 'sport = :{port}'` shows what holds "
                                "it; or --listen)")


def test_a_file_that_is_not_a_capture_is_one_line_exit_1(tmp_path):
    for command in ("replay", "har"):
        r = cli(command, "/bin/true")
        assert r.returncode == 1 and "not a capture file?" in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("qtap-devtools: error: /bin/true: ")


# --help examples: tests/test_cli.py


def test_har_command_converts_a_capture(tmp_path):
    capture = samples.write_capture(tmp_path / "c.txt")
    r = cli("har", str(capture), "-o", str(tmp_path / "out.har"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == f"3 entries written to {tmp_path / 'out.har'}"
    with open(capture, "ab") as fh:
        fh.write(b"event: process.started\ndata: {\"data\": \"x\"}\n\n")
    r = cli("har", str(capture))
    assert r.returncode == 0 and orjson.loads(r.stdout)["log"]["entries"]
    assert r.stderr.strip().splitlines()[-1] == "3 entries; 1 bad record skipped"
    doc = orjson.loads((tmp_path / "out.har").read_bytes())
    assert doc["log"]["version"] == "1.2"
    assert [e["response"]["status"] for e in doc["log"]["entries"]] == [200, 404, 500]
    assert doc["log"]["entries"][0]["request"]["postData"]["text"] == '{"user": "john"}'


def test_a_replays_stream_ends_after_the_files_last_event_for_curl(tmp_path):
    """`curl -sN … | grep | jq` on a capture file prints and exits, as `cat`
    would; the grep in the middle would otherwise hold the file's last events
    in its buffer for ever."""
    events = samples.session_events()
    capture = samples.write_capture(tmp_path / "c.txt", events)
    port = free_port()
    with agent(["replay", str(capture)], port, tmp_path / "a.log"):
        script = (f"curl -sN http://localhost:{port}/devtools/api/events | grep 'request.http_transaction' -A1 "
                  "| grep '^data:' | sed 's/^data: //' | jq -c '.data.data.summary.response_status'")
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
        statuses = [e.payload()["data"]["summary"]["response_status"] for e in events
                    if e.type == "request.http_transaction"]
        assert out.returncode == 0 and out.stdout.split() == [str(s) for s in statuses] and statuses
        whole = subprocess.run(["curl", "-sN", f"http://localhost:{port}/devtools/api/events"],
                               capture_output=True, text=True, timeout=30).stdout
        ids = [line[4:] for line in whole.splitlines() if line.startswith("id: ")]
        assert len(ids) == len(events)
        # Resumed after its last id, it ends at once, with nothing more.
        rest = subprocess.run(["curl", "-sN", "-H", f"Last-Event-ID: {ids[-1]}",
                               f"http://localhost:{port}/devtools/api/events"],
                              capture_output=True, text=True, timeout=30)
        assert rest.returncode == 0 and "id: " not in rest.stdout and "system.connected" in rest.stdout


def test_a_client_gone_in_the_middle_of_the_history_costs_no_log_lines(tmp_path):
    """`curl …?after=0 | head -c 3000`: the agent stops writing to the closed
    socket instead of asyncio logging one warning a write."""
    from tests.uihelpers import bulk_transactions

    capture = samples.write_capture(tmp_path / "c.txt", bulk_transactions(3000))
    port = free_port()
    with agent(["replay", str(capture)], port, tmp_path / "a.log") as proc:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /devtools/api/events?after=0 HTTP/1.1\r\nHost: localhost\r\n"
                         b"Accept: text/event-stream\r\n\r\n")
            got = b""
            while len(got) < 3000:
                got += sock.recv(3000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # a reset, as a killed curl's
            sock.close()
        time.sleep(1)
        assert get(proc.url + "/healthz")[0] == 200
        assert "raised exception" not in proc.output(), proc.output()


def test_head_on_the_stream_opens_no_subscriber(tmp_path):
    """`curl -I …/events`: the headers, and no client left behind holding a queue."""
    capture = samples.write_capture(tmp_path / "c.txt")
    port = free_port()
    with agent(["replay", str(capture)], port, tmp_path / "a.log") as proc:
        for _ in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("HEAD", "/devtools/api/events")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
            assert resp.read() == b""
            conn.close()
        status, health = get(proc.url + "/healthz")
        assert status == 200 and health["clients"] == 0 and health["clientsTotal"] == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_says_goodbye_to_every_client_and_exits_promptly(tmp_path, sig):
    capture = samples.write_capture(tmp_path / "c.txt")
    port = free_port()
    proc = AgentProcess(["replay", str(capture), "--listen", f"127.0.0.1:{port}"], port, tmp_path / "a.log").start()
    streams = []
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        # As EventSource asks: a replay's stream then stays open after the file.
        conn.request("GET", "/devtools/api/events", headers={"Accept": "text/event-stream"})
        streams.append(conn.getresponse())
    for resp in streams:
        resp.readline()  # the stream is live
    t0 = time.monotonic()
    proc.proc.send_signal(sig)
    rc = proc.proc.wait(timeout=2)  # the bound: every client told, process gone within 2 s
    assert rc == 0, proc.output()
    for resp in streams:
        rest = resp.read().decode()  # ends: the server closed the stream cleanly
        assert "event: system.disconnected" in rest
        assert rest.rstrip().split("\n")[-2].startswith("event: system.disconnected") or \
            "system.disconnected" in rest.rstrip().split("\n\n")[-1]
    assert time.monotonic() - t0 < 2


def test_clients_that_stopped_reading_are_ended_at_the_stop_with_one_line_not_a_traceback_each(tmp_path):
    """A client that stops reading (a paused `curl | less`) holds its stream's
    write open: at the stop uvicorn cancels it.  That was an "Exception in ASGI
    application" traceback per client."""
    big = b"x" * 200_000
    txs = [samples.transaction(samples.connection(), f"d4u4jhg7p3qk26l9{i:04d}", response_body=big)
           for i in range(100)]  # 20 MB of bodies, 27 MB of frames: more than any socket holds
    capture = samples.write_capture(tmp_path / "big.txt", txs)
    port = free_port()
    proc = AgentProcess(["replay", str(capture), "--listen", f"127.0.0.1:{port}"], port, tmp_path / "a.log").start()
    stuck = []
    try:
        for _ in range(10):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(f"GET /devtools/api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      "Accept: text/event-stream\r\n\r\n".encode())
            stuck.append(s)  # and never read
        deadline = time.monotonic() + 10
        while get(proc.url + "/healthz")[1]["clients"] < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=5) == 0, proc.output()
    finally:
        for s in stuck:
            s.close()
    out = proc.output()
    assert "Traceback" not in out and "Exception in ASGI application" not in out, out[-3000:]
    # Cut at the end of the drain, each stuck stream ended as a client's leaving does (counted in one line).
    assert "ASGI callable returned without completing response" not in out, out[-3000:]


# --------------------------------------------------------------------------
# The greeting, resume and readiness of real agent processes


def test_greeting_names_version_host_kernel_capture_state_and_filters(server):
    capture_file = server.args[1]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/devtools/api/events?pid=60895&method=get")
    resp = conn.getresponse()
    assert resp.readline() == b"event: system.connected\n"
    hello = orjson.loads(resp.readline()[len("data: "):])["data"]
    conn.close()
    assert hello["agent"] == "qtap-devtools" and hello["version"] == __version__
    assert hello["hostname"] == socket.gethostname() and hello["kernel"] == platform.release()
    assert hello["mode"] == "replay"
    assert hello["capture"] == {"state": "replay", "file": capture_file, "events": len(samples.session_events()),
                                "badRecords": 0, "leftOut": 0}
    assert hello["filters"] == {"pid": [60895], "method": ["GET"]}


def test_replay_resumes_after_the_last_event_id_header(server):
    # The capture holds 9 events, numbered <instance>-1 … -9 in file order;
    # the instance names the file, so another file's ids resume from its start.
    with SSE(server.port) as sse:
        instance = sse.event()["data"]["data"]["instance"]
    assert instance.startswith("replay-") and instance != "replay"
    with SSE(server.port, headers={"Last-Event-ID": f"{instance}-7"}) as sse:
        assert sse.event()["event"] == "system.connected"
        got = [sse.event() for _ in range(2)]
    assert [(e["event"], e["id"]) for e in got] == [("connection.closed", f"{instance}-8"),
                                                    ("process.stopped", f"{instance}-9")]
    with SSE(server.port, headers={"Last-Event-ID": "replay-0123456789-7"}) as sse:  # another file's
        assert sse.event()["event"] == "system.connected"
        assert sse.event()["id"] == f"{instance}-1"


def test_unprivileged_agent_is_not_ready_and_its_greeting_says_why(tmp_path):
    """The real ``run`` command without root: it serves, but /readyz is 503
    with the reason, and the greeting's capture state is "failed" with it."""
    port = free_port()
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen(
        [*unprivileged(), sys.executable, "-m", "qtap_devtools", "run", "--listen", f"127.0.0.1:{port}"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # until capture has been tried (it fails at once without root)
            assert proc.poll() is None, (tmp_path / "agent.log").read_text()
            try:
                status, body = get(url + "/readyz")
            except OSError:
                status, body = None, None
            if status is not None and body.get("reason") != "capture is starting":
                break
            assert time.monotonic() < deadline, f"never left 'capture is starting': {status} {body}"
            time.sleep(0.1)
        assert status == 503 and body["status"] == "not ready"
        assert "root" in body["reason"] and "sudo qtap-devtools run" in body["reason"]
        with SSE(port) as sse:
            hello = sse.event()
        assert hello["event"] == "system.connected"
        data = hello["data"]["data"]
        assert data["mode"] == "live" and data["version"] == __version__
        assert data["hostname"] == socket.gethostname() and data["kernel"] == platform.release()
        assert data["capture"] == {"state": "failed", "error": body["reason"]}
        assert data["filters"] == {}
        assert get(url + "/healthz")[0] == 200  # alive, just not capturing
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    assert rc == 0, (tmp_path / "agent.log").read_text()
    said = (tmp_path / "agent.log").read_text()
    assert said.count("capture not running: not root") == 1, said  # once, not as a log line as well


# --------------------------------------------------------------------------
# The app in-process on a real uvicorn: readiness, snapshot, keep-alive,
# drops over HTTP and Last-Event-ID, with a broadcaster the test feeds.


def unprivileged() -> list[str]:
    """A command prefix that drops root (as root), or nothing (already not root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


class SSE:
    """A real HTTP client of the event stream that keeps every raw line."""

    def __init__(self, port: int, path: str = "/devtools/api/events", headers: dict | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # the failure timeout
        self.conn.request("GET", path, headers=headers or {})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, (self.resp.status, self.resp.read())
        self.raw: list[bytes] = []

    def line(self) -> bytes:
        line = self.resp.readline()
        assert line, "the stream ended"
        self.raw.append(line)
        return line

    def event(self) -> dict:
        """The next event: {"event": type, "data": parsed JSON, "id": id or None}."""
        fields: dict = {}
        while True:
            line = self.line()
            if line in (b"\n", b"\r\n"):
                if fields:
                    return {"event": fields.get("event"), "data": orjson.loads(fields["data"]), "id": fields.get("id")}
                continue
            if line.startswith(b":"):
                continue
            key, _, value = line.rstrip(b"\r\n").decode().partition(": ")
            fields[key] = value

    def __enter__(self) -> "SSE":
        return self

    def __exit__(self, *exc) -> None:
        self.conn.close()


class InProcess:
    """``create_app(rt)`` served by a real uvicorn in a thread on a free port."""

    def __init__(self, *, queue_size: int = 4096, keepalive: float = 15.0,
                 not_ready: str | None = "capture is starting", listen_host: str = "127.0.0.1",
                 token: str | None = None) -> None:
        self.port = free_port()
        # uvicorn binds loopback whatever ``listen_host`` says: the guard reads the config.
        cfg = Config(listen=Listen(listen_host, self.port), client_queue_size=queue_size,
                     keepalive_seconds=keepalive)
        self.bc = Broadcaster(client_queue_size=queue_size)
        store = Store()
        self.bc.add_listener(store.on_published)

        def greeting(flt):
            return SystemConnected(version=__version__, hostname="test-host", kernel="test-kernel", mode="live",
                                   capture={"state": "starting"}, filters=flt.describe(),
                                   instance=self.bc.instance).envelope()

        self.rt = Runtime(config=cfg, broadcaster=self.bc, store=store, mode="live", greeting=greeting,
                          not_ready=not_ready, token=token)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.rt), host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False, lifespan="off", ws="none"))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            await self.server.serve()

        asyncio.run(main())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's event loop (the broadcaster's thread)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to the test thread
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout=10)

    def publish(self, *envelopes: Envelope) -> None:
        """Publish all in one go on the loop: no client runs in between."""
        self.call(lambda: [self.bc.publish(e) for e in envelopes])

    def __enter__(self) -> "InProcess":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.call(self.bc.close, "test over")
        self.server.should_exit = True
        self.thread.join(timeout=10)


def proc_env(pid: int, **extra) -> Envelope:
    return Envelope.of(PROCESS_STARTED, {"pid": pid, "binary": f"bin{pid}", **extra}, samples.TS)


def test_readyz_is_503_with_the_reason_until_capture_runs():
    with InProcess(not_ready="capture is starting") as app:
        status, body = get(app.url + "/readyz")
        assert status == 503
        assert body == {"status": "not ready", "reason": "capture is starting"}
        assert "qtap_devtools_ready 0" in get(app.url + "/metrics")[1]
        assert get(app.url + "/healthz")[0] == 200  # liveness is not readiness
        app.rt.not_ready = "not root: eBPF capture needs root; run: sudo qtap-devtools run"
        status, body = get(app.url + "/readyz")
        assert status == 503 and body["reason"].startswith("not root")
        app.rt.not_ready = None  # what the agent does once capture runs
        status, body = get(app.url + "/readyz")
        assert status == 200 and body == {"status": "ready", "mode": "live"}
        assert "qtap_devtools_ready 1" in get(app.url + "/metrics")[1]


def test_new_client_gets_a_process_snapshot_after_the_greeting():
    with InProcess(not_ready=None) as app:
        app.publish(proc_env(101), proc_env(102), proc_env(103),
                    Envelope.of(PROCESS_STOPPED, {"pid": 102}, samples.TS))
        with SSE(app.port) as sse:
            assert sse.event()["event"] == "system.connected"
            snap = [sse.event() for _ in range(2)]
            app.publish(proc_env(104))
            after = sse.event()
        # The live processes, without the stopped one, as process.started with no id
        # (a reconnect resumes from real events, not from a snapshot).
        assert [(e["event"], e["data"]["data"]["pid"], e["id"]) for e in snap] == [
            ("process.started", 101, None), ("process.started", 103, None)]
        assert snap[0]["data"]["data"]["binary"] == "bin101"
        assert after["data"]["data"]["pid"] == 104 and after["id"] == f"{app.bc.instance}-5"


def test_all_history_names_each_running_process_once():
    """after=0: the snapshot leaves out the processes whose process.started
    the history replays (the page opens so: each was listed twice)."""
    with InProcess(not_ready=None) as app:
        app.call(app.rt.store.on_event, proc_env(100))  # known to the store, its start no longer in the history
        app.publish(proc_env(101), proc_env(103))
        with SSE(app.port, "/devtools/api/events?after=0") as sse:
            assert sse.event()["event"] == "system.connected"
            got = [sse.event() for _ in range(3)]
            app.publish(proc_env(104))
            got.append(sse.event())
    assert [(e["data"]["data"]["pid"], e["id"] is None) for e in got] == [
        (100, True), (101, False), (103, False), (104, False)]


@pytest.mark.parametrize("query", ["snapshot=false", "snapshot=0", "snapshot=no"])
def test_snapshot_false_suppresses_the_snapshot(query):
    with InProcess(not_ready=None) as app:
        app.publish(proc_env(101), proc_env(103))
        with SSE(app.port, "/devtools/api/events?" + query) as sse:
            assert sse.event()["event"] == "system.connected"
            app.publish(proc_env(999))
            nxt = sse.event()
        # Had a snapshot been sent, 101 would come first.
        assert nxt["data"]["data"]["pid"] == 999


def test_snapshot_respects_the_stream_filter():
    with InProcess(not_ready=None) as app:
        app.publish(proc_env(101), proc_env(103))
        with SSE(app.port, "/devtools/api/events?pid=103") as sse:
            assert sse.event()["event"] == "system.connected"
            first = sse.event()
        assert first["data"]["data"]["pid"] == 103


def test_a_page_of_the_newest_transactions_parses_only_that_page(monkeypatch):
    """A held transaction's body is parsed again from its frame when read.
    `?limit=5` parsed all 10,000 the store holds (0.3-1.5 s of CPU and ~100 MB
    of dicts for each poll of a dashboard); HAR's `limit` took the newest of
    all of them parsed.  Now only the page's rows are, unless a filter must
    read every body; the answers are the same."""
    from tests.uihelpers import bulk_transactions

    with InProcess(not_ready=None) as app:
        txs = bulk_transactions(1500)
        app.publish(*(t.envelope() for t in txs))
        ids = [t.request_id for t in txs]
        parses = []
        real = orjson.loads
        monkeypatch.setattr(orjson, "loads", lambda data, *a: parses.append(1) or real(data, *a))

        status, body = get(app.url + "/devtools/api/transactions?limit=5")
        assert status == 200 and [t["requestId"] for t in body["transactions"]] == ids[::-1][:5]
        assert body["total"] == 1500 and body["next_before"] == ids[-5]
        assert len(parses) <= 10, len(parses)

        parses.clear()
        status, body = get(app.url + f"/devtools/api/transactions?limit=3&before={ids[-5]}&type=request")
        assert status == 200 and [t["requestId"] for t in body["transactions"]] == ids[::-1][5:8]
        assert len(parses) <= 10, len(parses)

        parses.clear()
        status, har = get(app.url + "/devtools/api/har?limit=4")
        assert status == 200 and [e["_requestId"] for e in har["log"]["entries"]] == ids[-4:]
        assert len(parses) <= 20, len(parses)

        # A filter on what the event says still reads them all, and finds the same.
        status, body = get(app.url + "/devtools/api/transactions?limit=2&status=404")
        assert [t["requestId"] for t in body["transactions"]] == [ids[i] for i in range(1499, -1, -1) if i % 10 == 0][:2]
        assert body["total"] == 150
        status, har = get(app.url + "/devtools/api/har?limit=2&method=POST")
        assert [e["_requestId"] for e in har["log"]["entries"]] == [ids[i] for i in range(1500) if i % 3 == 0][-2:]


def test_keep_alive_is_a_comment_with_the_streams_own_line_endings():
    assert Config().keepalive_seconds == 15  # the interval, by default
    with InProcess(not_ready=None, keepalive=0.2) as app:
        with SSE(app.port, "/devtools/api/events?snapshot=false") as sse:
            assert sse.event()["event"] == "system.connected"
            while not sse.line().startswith(b":"):
                pass
            comment = sse.raw[-1]
            blank = sse.line()
            app.publish(proc_env(7))
            nxt = sse.event()
    assert comment == b": keep-alive\n"  # not sse-starlette's default "\r\n"
    assert blank == b"\n"
    assert nxt["event"] == "process.started"  # the stream goes on after it
    assert not [line for line in sse.raw if b"\r" in line], sse.raw


def test_a_client_that_falls_behind_gets_system_dropped_over_http():
    with InProcess(not_ready=None, queue_size=8) as app:
        with SSE(app.port, "/devtools/api/events?snapshot=false") as slow:
            assert slow.event()["event"] == "system.connected"
            # 30 events in one go: the client cannot take any before its queue of 8 is full.
            app.publish(*[proc_env(1000 + i) for i in range(30)])
            got = [slow.event() for _ in range(9)]
            app.publish(proc_env(5000))
            later = slow.event()
        assert [e["data"]["data"]["pid"] for e in got[:8]] == list(range(1000, 1008))
        notice = got[8]
        assert notice["event"] == "system.dropped"
        assert notice["data"]["data"]["missed"] == 22 and notice["data"]["data"]["totalMissed"] == 22
        assert later["data"]["data"]["pid"] == 5000  # and the stream carries on
        status, stats = get(app.url + "/devtools/api/stats")
        assert stats["broadcast"]["subscriberDrops"] == 22


def test_last_event_id_header_resumes_after_that_event():
    with InProcess(not_ready=None) as app:
        app.publish(*[proc_env(i) for i in range(1, 6)])  # ids <instance>-1 … -5
        inst = app.bc.instance
        with SSE(app.port, headers={"Last-Event-ID": f"{inst}-3"}) as sse:
            assert sse.event()["event"] == "system.connected"
            resumed = [sse.event() for _ in range(2)]
            app.publish(proc_env(6))
            live = sse.event()
        # No snapshot on resume: straight to what the client missed, then live events.
        assert [(e["data"]["data"]["pid"], e["id"]) for e in resumed] == [(4, f"{inst}-4"), (5, f"{inst}-5")]
        assert (live["data"]["data"]["pid"], live["id"]) == (6, f"{inst}-6")

        # An id from an earlier run of the agent: everything still in history.
        with SSE(app.port, headers={"Last-Event-ID": "0123456789abcdefghij-3"}) as sse:
            assert sse.event()["event"] == "system.connected"
            again = [sse.event()["data"]["data"]["pid"] for _ in range(6)]
        assert again == [1, 2, 3, 4, 5, 6]

        status, body = get(app.url + "/devtools/api/events", headers={"Last-Event-ID": "not-an-id"})
        assert status == 400 and "Last-Event-ID" in body["error"]["message"]
        # Past the last event sent (a typo, a digit too many): a 400, not a
        # stream that waits silently for an event that may never come.
        for bad in (f"{inst}-7", "99999999999999999999999999"):
            status, body = get(f"{app.url}/devtools/api/events?after={bad}")
            assert status == 400 and "has not been sent; the last is 6" in body["error"]["message"], body
        with SSE(app.port, "/devtools/api/events?after=6") as sse:  # the last one: live events from now
            assert sse.event()["event"] == "system.connected"
            app.publish(proc_env(7))
            assert sse.event()["data"]["data"]["pid"] == 7


def _raw_get(port: int, path: str, host: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host)
    for k, v in (headers or {}).items():
        conn.putheader(k, v)
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), body


def test_bound_beyond_loopback_with_a_token_any_host_name_is_served_with_the_token():
    # As `--listen 0.0.0.0:PORT --token …`: clients use whatever name reaches the
    # machine, so Host cannot be checked; the token is the guard.  (uvicorn
    # itself binds loopback here: no traffic leaves the machine.)
    token = "a+b/c=é"
    with InProcess(not_ready=None, listen_host="0.0.0.0", token=token) as app:
        host = f"agent.example:{app.port}"
        assert _raw_get(app.port, "/devtools/api/stats", host)[0] == 401
        assert _raw_get(app.port, "/healthz", host)[0] == 200
        assert _raw_get(app.port, "/devtools/api/stats", host, {"Authorization": "Bearer wrong"})[0] == 401
        # A token outside ASCII, sent as the UTF-8 bytes a client sends: compared, not a 500.
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=5)
        conn.putrequest("GET", "/devtools/api/stats", skip_host=True)
        conn.putheader("Host", host)
        conn.putheader("Authorization", b"Bearer " + token.encode())
        conn.endheaders()
        assert conn.getresponse().status == 200
        conn.close()
        quoted = urllib.parse.quote(token, safe="")
        assert _raw_get(app.port, f"/devtools/api/stats?token={quoted}", host)[0] == 200
        # The page hands the browser a cookie; sent back as the browser would, it is accepted.
        status, headers, _ = _raw_get(app.port, f"/devtools/?token={quoted}", host)
        cookie = headers["set-cookie"].split(";")[0]
        assert status == 200 and cookie.startswith("qtap_token=")
        assert _raw_get(app.port, "/devtools/api/stats", host, {"Cookie": cookie.encode("latin-1")})[0] == 200


def test_on_loopback_the_host_check_holds_even_with_a_token():
    with InProcess(not_ready=None, token="s3cret") as app:
        status, _, body = _raw_get(app.port, "/devtools/api/stats", f"agent.example:{app.port}",
                                   {"Authorization": "Bearer s3cret"})
        assert status == 403 and orjson.loads(body)["error"]["code"] == "FORBIDDEN_HOST"
        assert _raw_get(app.port, "/devtools/api/stats", f"localhost:{app.port}",
                        {"Authorization": "Bearer s3cret"})[0] == 200


def test_metrics_label_values_are_escaped():
    # A replayed file's event type is anyone's text: it must not break the format.
    from qtap_devtools.server import _label

    assert _label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_a_paced_replay_shortens_quiet_spells_to_max_gap():
    from qtap_devtools.server import replay_pause

    assert replay_pause(2_000_000_000, 1.0, 5.0) == 2.0  # as recorded
    assert replay_pause(2_000_000_000, 4.0, 5.0) == 0.5  # four times as fast
    assert replay_pause(35_000_000_000, 1.0, 5.0) == 5.0  # the example's 35 s before its first request


def test_rest_answers_are_worked_on_two_named_threads(server):
    """REST answers render on worker threads (not the event loop).  They were
    asyncio's own pool: up to 32 threads on a big machine, each named python
    in ``top -H``, where the README says the agent's threads are ``qtap-*``."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: get(server.url + "/devtools/api/har")[0], range(16)))
    assert answers == [200] * 16
    pid = server.proc.pid
    comms = [open(f"/proc/{pid}/task/{tid}/comm").read().strip() for tid in os.listdir(f"/proc/{pid}/task")
             if tid != str(pid)]  # the main thread keeps the program's name
    workers = [c for c in comms if not c.startswith("qtap-")]
    assert workers == [] and 1 <= comms.count("qtap-rest") <= 2, comms
