"""The HTTP surface of a real agent process (replay mode: no root needed)."""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time

import orjson
import pytest

from tests import samples
from tests.agentproc import ROOT, AgentProcess, agent, free_port, get


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    capture = samples.write_capture(tmp / "capture.txt")
    with agent(["replay", str(capture)], free_port(), tmp / "agent.log") as proc:
        yield proc


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:10001", "192.168.1.10", "localhost.evil.com"])
def test_foreign_host_header_is_refused(server, host):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.putrequest("GET", "/devtools/api/stats", skip_host=True)
    conn.putheader("Host", host)
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 403
    assert orjson.loads(resp.read())["error"]["code"] == "FORBIDDEN_HOST"


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


@pytest.mark.parametrize("query", ["status=abc", "pid=x", "type=bogus", "limit=-1", "limit=99999999",
                                   "q=" + "x" * 300])
def test_bad_query_parameters_get_400_with_reason(server, query):
    status, body = get(server.url + "/devtools/api/transactions?" + query)
    assert status == 400 and body["error"]["code"] == "INVALID_REQUEST"
    assert query.split("=")[0] in body["error"]["message"]


def test_bad_filter_on_the_stream_is_a_400_not_a_stream(server):
    status, body = get(server.url + "/devtools/api/events?status=99x")
    assert status == 400 and "status" in body["error"]["message"]


def test_server_side_filter_on_transactions(server):
    status, body = get(server.url + "/devtools/api/transactions?status=4xx,5xx")
    assert [t["summary"]["response_status"] for t in body["transactions"]] == [500, 404]
    status, body = get(server.url + "/devtools/api/transactions?method=POST")
    assert [t["summary"]["request_method"] for t in body["transactions"]] == ["POST"]


def test_rest_processes_connections_endpoints_and_index(server):
    assert get(server.url + "/devtools/api/processes")[1]["processes"] == []  # it stopped in the capture
    conns = get(server.url + "/devtools/api/connections")[1]["connections"]
    assert {c["state"] for c in conns} == {"open", "closed"}
    endpoints = get(server.url + "/devtools/api/endpoints")[1]["endpoints"]
    assert {(e["method"], e["path"]) for e in endpoints} == {("POST", "/v1/users"), ("GET", "/v1/missing"),
                                                             ("GET", "/v1/crash")}
    index = get(server.url + "/devtools/api")[1]
    assert any(i["path"] == "/devtools/api/events" for i in index["items"])
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
                                  ["run", "--max-body-bytes", "lots"], ["frobnicate"]])
def test_bad_flags_are_one_line_and_exit_2(args):
    r = cli(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_or_unreadable_capture_is_one_line_exit_2(tmp_path):
    for path in (tmp_path / "missing.txt", tmp_path):
        r = cli("replay", str(path))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("har", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "no such file" in r.stderr


@pytest.mark.parametrize("command", [[], ["run"], ["replay"], ["har"], ["doctor"]])
def test_help_shows_real_examples(command):
    r = cli(*command, "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "qtap-devtools" in r.stdout


def test_har_command_converts_a_capture(tmp_path):
    capture = samples.write_capture(tmp_path / "c.txt")
    r = cli("har", str(capture), "-o", str(tmp_path / "out.har"))
    assert r.returncode == 0, r.stderr
    doc = orjson.loads((tmp_path / "out.har").read_bytes())
    assert doc["log"]["version"] == "1.2"
    assert [e["response"]["status"] for e in doc["log"]["entries"]] == [200, 404, 500]
    assert doc["log"]["entries"][0]["request"]["postData"]["text"] == '{"user": "john"}'


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_says_goodbye_to_every_client_and_exits_promptly(tmp_path, sig):
    capture = samples.write_capture(tmp_path / "c.txt")
    port = free_port()
    proc = AgentProcess(["replay", str(capture), "--listen", f"127.0.0.1:{port}"], port, tmp_path / "a.log").start()
    streams = []
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/devtools/api/events")
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
