"""End to end, as root: the real agent with real probes, real clients and servers.

One agent runs for the module on port 10001 (the seed's recipes name that
port), an SSE client reads its whole stream, and each test makes real traffic
with a unique marker in the URL and checks what a user would check: method,
URL, status, headers, bodies, process, direction and connection events.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import pytest

from tests import realworld as rw
from tests.agentproc import agent, free_port
from tests.recipes import json_docs, recipes, run_recipe
from tests.stream import StreamReader, body_of

pytestmark = pytest.mark.kernel

CURL = ["curl", "-sS", "--max-time", "10", "-k"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    with agent(["run", "--output", str(tmp / "capture.txt")], 10001, tmp / "agent.log", ready_path="/readyz") as proc:
        reader = StreamReader(10001)
        try:
            yield proc, reader, tmp
        finally:
            reader.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return rw.make_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture(scope="module")
def nginx(live, cert, tmp_path_factory):
    with rw.Nginx(tmp_path_factory.mktemp("nginx"), cert) as server:
        yield server


def marker() -> str:
    return uuid.uuid4().hex[:12]


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CURL, *args], capture_output=True, timeout=30, check=True)


class Sides(dict):
    """Transactions by direction; a missing side fails with what did arrive."""

    def __missing__(self, key):
        seen = {d: [(t["request"]["url"], t["metadata"]["process_exe"]) for t in txs] for d, txs in self.items()}
        raise AssertionError(f"no {key} transaction; got {seen or 'none'}")


def by_direction(txs: list[dict]) -> dict[str, list[dict]]:
    out = Sides()
    for tx in txs:
        out.setdefault(tx["direction"], []).append(tx)
    return out


def test_curl_get_over_tls_is_one_transaction_each_side(live, nginx):
    _, reader, _ = live
    m = marker()
    url = nginx.url(f"/json?m={m}", host="localhost")
    curl(url)
    sides = by_direction(reader.transactions(m, count=2))
    client, server = sides["egress-internal"][0], sides["ingress"][0]
    for tx in (client, server):
        assert tx["request"]["method"] == "GET"
        assert tx["request"]["url"] == url
        assert tx["response"]["status"] == 200
        assert json.loads(body_of(tx["response"])) == {"method": "GET", "uri": f"/json?m={m}", "args": f"m={m}"}
        assert tx["request"]["headers"]["User-Agent"].startswith("curl/")
        assert tx["response"]["headers"]["Content-Type"] == "application/json"
    assert client["metadata"]["process_exe"] == "/usr/bin/curl"
    assert server["metadata"]["process_exe"] == "/usr/sbin/nginx"
    summary = client["_event"]["summary"]
    assert summary["request_scheme"] == "https" and summary["response_status"] == 200
    # The client's connection is framed by opened … updated … closed.
    conn = reader.find(lambda t, d: t == "connection.closed"
                       and d["data"]["data"]["meta"]["connectionId"] == client["_event"]["connectionId"])
    assert conn, "no connection.closed for curl's connection"
    kinds = [t for t, _ in reader.connection_events(client["_event"]["connectionId"])]
    assert kinds[0] == "connection.opened" and kinds[-1] == "connection.closed" and "connection.updated" in kinds
    closed = conn[0][1]["data"]["data"]
    assert closed["meta"]["tlsProbeTypesDetected"] == ["openssl"] and closed["meta"]["tlsProbeIntrospected"]
    assert closed["l7Protocol"] == "http1" and closed["destination"]["address"]["port"] == nginx.port
    assert closed["meta"]["endpointId"] == "localhost"
    assert closed["bytesSent"] > 0 and closed["bytesReceived"] > 0


def test_curl_post_json_is_one_transaction_with_its_body(live, nginx):
    _, reader, _ = live
    m = marker()
    payload = json.dumps({"user": "john", "m": m})
    curl("-X", "POST", "-H", "Content-Type: application/json", "-d", payload, nginx.url(f"/json?m={m}"))
    client = by_direction(reader.transactions(m, count=2))["egress-internal"][0]
    assert client["request"]["method"] == "POST"
    assert client["request"]["content_type"] == "application/json"
    assert json.loads(body_of(client["request"])) == {"user": "john", "m": m}
    assert json.loads(body_of(client["response"]))["method"] == "POST"


def test_three_requests_on_one_keep_alive_connection(live, nginx):
    _, reader, _ = live
    m = marker()
    urls = [nginx.url(f"/json?m={m}&i={i}") for i in range(3)]
    curl(*urls)
    client = by_direction(reader.transactions(m, count=6))["egress-internal"]
    assert [tx["request"]["url"] for tx in client] == urls
    assert len({tx["_event"]["connectionId"] for tx in client}) == 1
    assert [json.loads(body_of(tx["response"]))["args"] for tx in client] == [f"m={m}&i={i}" for i in range(3)]


def test_gzip_response_body_is_decoded_and_wire_size_kept(live, nginx):
    _, reader, _ = live
    m = marker()
    curl("-H", "Accept-Encoding: gzip", nginx.url(f"/gzip?m={m}"))
    client = by_direction(reader.transactions(m, count=2))["egress-internal"][0]
    resp = client["response"]
    assert resp["content_encoding"] == "gzip"
    assert body_of(resp) == b"compress me please " * 2000
    assert resp["body_size"] < len(b"compress me please " * 2000)


def test_2mib_response_is_kept_to_the_body_limit_and_marked_truncated(live, nginx):
    _, reader, _ = live
    m = marker()
    curl("-o", "/dev/null", nginx.url(f"/large?m={m}"))
    client = by_direction(reader.transactions(m, count=2, timeout=30))["egress-internal"][0]
    resp = client["response"]
    assert resp["status"] == 200 and resp["body_truncated"] is True
    assert len(body_of(resp)) == 1 << 20
    assert body_of(resp)[:1000] == bytes(i % 251 for i in range(1000))


def test_python_http_client_to_python_ssl_server_chunked(live, cert):
    _, reader, _ = live
    m = marker()
    with rw.PythonTlsServer(cert) as server:
        code = textwrap.dedent(f"""
            import http.client, ssl
            ctx = ssl._create_unverified_context()
            c = http.client.HTTPSConnection("127.0.0.1", {server.port}, context=ctx)
            c.request("GET", "/chunked?m={m}")
            print(c.getresponse().read().decode())
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=True, text=True)
        assert json.loads(out.stdout) == {"chunks": ["one", "two"]}
        txs = by_direction(reader.transactions(m, count=2))
    client = txs["egress-internal"][0]
    assert client["metadata"]["process_exe"].startswith(("/usr/bin/python3", "/usr/local/bin/python3"))
    assert json.loads(body_of(client["response"])) == {"chunks": ["one", "two"]}
    assert client["response"]["headers"]["Transfer-Encoding"] == "chunked"
    assert txs["ingress"][0]["response"]["status"] == 200


def test_node_https_get(live, nginx):
    _, reader, _ = live
    m = marker()
    script = (
        f"require('https').get('{nginx.url(f'/json?m={m}')}', {{rejectUnauthorized: false}}, r => {{"
        "let b=''; r.on('data', d => b += d); r.on('end', () => console.log(b)); });"
    )
    out = subprocess.run(["node", "-e", script], capture_output=True, timeout=30, check=True, text=True)
    assert m in out.stdout
    client = [tx for tx in reader.transactions(m, count=2) if tx["metadata"]["process_exe"].endswith("node")]
    assert client, "node's transaction missing"
    assert client[0]["request"]["method"] == "GET" and client[0]["response"]["status"] == 200
    assert json.loads(body_of(client[0]["response"]))["args"] == f"m={m}"
    assert client[0]["request"]["scheme"] == "https"


def test_wget_over_gnutls(live, nginx):
    _, reader, _ = live
    m = marker()
    subprocess.run(["wget", "-q", "-O", "-", "--no-check-certificate", nginx.url(f"/json?m={m}")],
                   capture_output=True, timeout=30, check=True)
    client = by_direction(reader.transactions(m, count=2))["egress-internal"][0]
    assert client["metadata"]["process_exe"] == "/usr/bin/wget"
    assert client["request"]["headers"]["User-Agent"].startswith("Wget/")
    assert json.loads(body_of(client["response"]))["args"] == f"m={m}"
    conn = [d for t, d in reader.connection_events(client["_event"]["connectionId"])]
    assert any(c["meta"]["tlsProbeTypesDetected"] == ["gnutls"] for c in conn)


def test_plaintext_curl_to_python_http_server(live, tmp_path):
    _, reader, _ = live
    m = marker()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text(f"hello {m}\n")
    with rw.PlainHttpServer(tmp_path / "www") as server:
        curl(server.url(f"/hello.txt?m={m}"))
        txs = by_direction(reader.transactions(m, count=2))
    client, srv = txs["egress-internal"][0], txs["ingress"][0]
    assert client["request"]["scheme"] == "http"
    assert body_of(client["response"]) == f"hello {m}\n".encode()
    assert srv["metadata"]["process_exe"].startswith("/usr/bin/python3")
    conn = reader.connection_events(client["_event"]["connectionId"])
    assert conn and all(not c["meta"]["tlsProbeTypesDetected"] for _, c in conn)


def test_short_lived_process_gets_started_and_stopped_with_exit_code(live):
    _, reader, _ = live
    proc = subprocess.run(["sh", "-c", "exit 3"], timeout=10)
    pid = proc.returncode and None
    stopped = reader.find(lambda t, d: t == "process.stopped" and d["data"].get("exitCode") == 3
                          and d["data"]["binary"] in ("sh", "dash"))
    assert stopped, "no process.stopped with exitCode 3"
    pid = stopped[0][1]["data"]["pid"]
    started = reader.find(lambda t, d: t == "process.started" and d["data"]["pid"] == pid)
    assert started and started[0][1]["data"]["ppid"] > 0


def test_seed_recipes_on_real_traffic(live, nginx):
    proc, reader, tmp = live
    m = marker()
    every = recipes()

    def traffic():
        curl(nginx.url(f"/missing?m={m}"), nginx.url(f"/error?m={m}"), nginx.url(f"/json?m={m}"))

    # The stream is live: the recipe's curl connects first, then traffic flows.
    def until_seen():
        return len(reader.transactions(m, count=6, timeout=0)) >= 6

    def run(title):
        return run_recipe(every[title], tmp, settle=0, until=lambda: (traffic_once(), until_seen())[1])

    sent = []

    def traffic_once():
        if not sent:
            sent.append(1)
            traffic()

    errors = [d for d in json_docs(run("Filter for errors only")) if m in d["data"]["data"]["summary"]["request_url"]]
    assert sorted(d["data"]["data"]["summary"]["response_status"] for d in errors) == [404, 404, 500, 500]

    m = marker()
    sent.clear()
    decoded = [d for d in json_docs(run("Decode HTTP transaction bodies")) if m in d["request"]["url"]]
    assert {d["response"]["status"] for d in decoded} == {200, 404, 500}
    assert any(json.loads(body_of(d["response"])).get("args") == f"m={m}" for d in decoded
               if d["response"]["status"] == 200)


def test_capture_file_replays_what_was_served(live):
    proc, reader, tmp = live
    capture = tmp / "capture.txt"
    text = capture.read_text()
    assert "event: request.http_transaction\ndata: " in text
    from qtap_devtools import capfile

    bad = [r for r in capfile.read_events(capture) if isinstance(r, capfile.BadRecord)]
    assert not bad[:-1]  # the last record may still be in flight


def test_connection_opened_before_the_agent_is_still_captured(tmp_path):
    m = marker()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.txt").write_text("early bird\n")
    with rw.PlainHttpServer(tmp_path / "www") as server:
        client = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import http.client, sys
            c = http.client.HTTPConnection("127.0.0.1", {server.port})
            for line in sys.stdin:
                c.request("GET", line.strip())
                r = c.getresponse(); r.read()
                print(r.status, flush=True)
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            client.stdin.write("/a.txt?first\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == "200"
            port = free_port()
            with agent(["run"], port, tmp_path / "agent.log", ready_path="/readyz") as proc:
                reader = StreamReader(port)
                try:
                    client.stdin.write(f"/a.txt?m={m}\n")
                    client.stdin.flush()
                    assert client.stdout.readline().strip() == "200"
                    txs = reader.transactions(m, count=1)
                    assert txs, "the pre-existing connection's request was not captured\n" + proc.output()
                    assert body_of(txs[0]["response"]) == b"early bird\n"
                finally:
                    reader.close()
        finally:
            client.stdin.close()
            client.wait(timeout=10)
