"""Records in, events out: the pipeline without a kernel.

The records are what the probes emit for a real exchange (see
tests/test_capture_probes.py for those); here they are written by hand so
every branch of connection tracking is exercised deterministically.
"""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest

from qtap_devtools import pipeline as pipeline_mod
from qtap_devtools.capture import records as rec
from qtap_devtools.config import Config
from qtap_devtools.enrich import Enricher
from qtap_devtools.enrich.cgroup import CgroupIndex
from qtap_devtools.enrich.model import ProcessInfo
from qtap_devtools.pipeline import Pipeline, classify

CURL = ProcessInfo(pid=100, ppid=1, exe="/usr/bin/curl", binary="curl", cmdline="curl https://x", uid=0,
                   user="root", hostname="box", start_time_ns=1)
NGINX = ProcessInfo(pid=200, ppid=1, exe="/usr/sbin/nginx", binary="nginx", cmdline="nginx: worker", uid=33,
                    user="www-data", hostname="box", start_time_ns=1)

REQ = b"POST /v1/users HTTP/1.1\r\nHost: api.local\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n" \
      b'{"user": "john"}'
RESP = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"id\": 123}"


def at_start(p: Pipeline, *pids: int) -> Pipeline:
    """``pids`` as if running when the agent started: its snapshot said them.
    The TLS probes went live at the first nanosecond, before any record."""
    p.announced.update(dict.fromkeys(pids))
    p.tls_armed_mono = 1
    return p


def run(records, **cfg):
    out = []
    p = at_start(Pipeline(Config(**cfg), out.append, {100: CURL, 200: NGINX}.get, own_pid=1, own_port=10001), 100, 200)
    p.on_records(records)
    p.close_all()
    return out, p


def types(events):
    return [e.type for e in events]


def tx_json(event):
    return json.loads(base64.b64decode(event.payload()["data"]["data"]))


EP_C = rec.Endpoint("127.0.0.1", 40000)
EP_S = rec.Endpoint("127.0.0.1", 8443)


def client_tls_exchange(pid=100, fd=5):
    return [
        rec.SocketConnect(pid, fd, 1_000, EP_S),
        rec.SocketAddress(pid, fd, EP_C, EP_S, 1_100),
        rec.DataChunk(pid, pid, fd, 2_000, "egress", "openssl", 0, REQ, tls_ref=0xabc),
        rec.DataChunk(pid, pid, fd, 5_000_000, "ingress", "openssl", 0, RESP, tls_ref=0xabc),
        rec.SocketClose(pid, fd, 6_000_000),
    ]


def test_tls_client_exchange_is_one_transaction_framed_by_connection_events():
    events, p = run(client_tls_exchange())
    assert types(events) == ["connection.opened", "connection.updated", "request.http_transaction",
                             "connection.closed"]
    tx = events[2]
    summary = tx.payload()["data"]["summary"]
    assert summary["request_method"] == "POST" and summary["response_status"] == 201
    assert summary["request_scheme"] == "https" and summary["request_host"] == "api.local"
    assert summary["process_exe"] == "/usr/bin/curl" and summary["direction"] == "egress-internal"
    full = tx_json(tx)
    assert full["request"]["url"] == "https://api.local/v1/users"
    assert base64.b64decode(full["request"]["body"]) == b'{"user": "john"}'
    assert base64.b64decode(full["response"]["body"]) == b'{"id": 123}'
    assert full["metadata"]["process_id"] == "100"
    # First request byte (2 µs) to last response byte (5 ms): an integer, as
    # the seed's, with the precise figure beside it.
    assert full["duration_ms"] == 5 and isinstance(full["duration_ms"], int)
    assert full["duration_us"] == 4998
    conn = events[0].payload()["data"]
    assert conn["source"]["address"] == {"ip": "127.0.0.1", "port": 40000}
    assert conn["destination"]["address"] == {"ip": "127.0.0.1", "port": 8443}
    updated = events[1].payload()["data"]
    assert updated["l7Protocol"] == "http1" and updated["meta"]["tlsProbeTypesDetected"] == ["openssl"]
    assert updated["meta"]["tlsProbeIntrospected"] is True
    closed = events[3].payload()["data"]
    assert closed["bytesSent"] == len(REQ) and closed["bytesReceived"] == len(RESP)


def test_server_side_gets_its_own_transaction_with_ingress_direction():
    events, _ = run([
        rec.SocketAccept(200, 9, 1_000, EP_C, EP_S),
        rec.DataChunk(200, 200, 9, 2_000, "ingress", "openssl", 0, REQ),
        rec.DataChunk(200, 200, 9, 3_000, "egress", "openssl", 0, RESP),
        rec.SocketClose(200, 9, 4_000),
    ])
    tx = [e for e in events if e.type == "request.http_transaction"]
    assert len(tx) == 1
    full = tx_json(tx[0])
    assert full["direction"] == "ingress" and full["metadata"]["process_exe"] == "/usr/sbin/nginx"
    assert full["metadata"]["bytes_received"] == len(REQ) and full["metadata"]["bytes_sent"] == len(RESP)
    opened = events[0].payload()["data"]
    assert opened["source"]["address"]["port"] == 40000  # the peer initiated it
    assert opened["destination"]["exe"] == "/usr/sbin/nginx"


def test_ciphertext_on_the_socket_is_never_parsed_as_http_but_gives_sni():
    hello = bytes.fromhex("16030100") + b"\x30" + b"\x01" + b"\x00" * 47  # a handshake record header
    events, _ = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.DataChunk(100, 100, 5, 1_500, "egress", "socket", 0, hello),
        rec.DataChunk(100, 100, 5, 1_600, "ingress", "socket", 0, b"\x17\x03\x03\x00\x10" + b"\xaa" * 16),
        rec.SocketClose(100, 5, 9_000),
    ])
    assert "request.http_transaction" not in types(events)
    closed = events[-1].payload()["data"]
    assert closed["l7Protocol"] != "http1"


def test_plaintext_socket_exchange_is_http():
    events, _ = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "socket", 0, REQ),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "socket", 0, RESP),
    ])
    tx = [e for e in events if e.type == "request.http_transaction"]
    assert tx and tx_json(tx[0])["request"]["scheme"] == "http"


def test_garbage_marks_connection_other_and_raises_nothing():
    events, _ = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "socket", 0, b"\x00\x01binary\xff" * 50),
        rec.SocketClose(100, 5, 3_000),
    ])
    assert "request.http_transaction" not in types(events)
    assert events[-1].payload()["data"]["l7Protocol"] == "other"


def h2_exchange(path: str = "/v2/users", body: bytes = b'{"id": 9}') -> tuple[bytes, bytes, bytes]:
    """A real HTTP/2 exchange between the h2 library's client and server:
    (client's preface + request, server's SETTINGS, server's answer)."""
    import h2.config
    import h2.connection

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    settings = server.data_to_send()
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "api.local"),
                            (":path", path), ("user-agent", "curl/7.88.1")], end_stream=True)
    request = client.data_to_send()
    server.receive_data(request)
    server.send_headers(1, [(":status", "200"), ("content-type", "application/json")])
    server.send_data(1, body, end_stream=True)
    return request, settings, server.data_to_send()


def test_http2_requests_are_decoded_into_transactions():
    request, settings, answer = h2_exchange()
    events, p = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.SocketAddress(100, 5, EP_C, EP_S, 1_100),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "openssl", 0, request, tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "openssl", 0, settings + answer, tls_ref=0xabc),
        rec.SocketClose(100, 5, 9_000),
    ])
    [t] = [e for e in events if e.type == "request.http_transaction"]
    tx = tx_json(t)
    assert t.url == "https://api.local/v2/users" and tx["request"]["http_version"] == "HTTP/2"
    assert tx["request"]["headers"][":authority"] == "api.local"
    assert tx["response"]["status"] == 200 and t.response.body == b'{"id": 9}'
    assert events[-1].payload()["data"]["l7Protocol"] == "http2"
    assert p.counters["http2_connections"] == 1 and p.counters["http2_connections_undecodable"] == 0


def test_http2_on_the_servers_side_whose_settings_go_out_before_the_preface_comes_in():
    request, settings, answer = h2_exchange("/srv")
    events, p = run([
        rec.SocketAccept(200, 7, 1_000, EP_C, EP_S),
        rec.DataChunk(200, 200, 7, 2_000, "egress", "openssl", 0, settings, tls_ref=0xdef),
        rec.DataChunk(200, 200, 7, 3_000, "ingress", "openssl", 0, request, tls_ref=0xdef),
        rec.DataChunk(200, 200, 7, 4_000, "egress", "openssl", len(settings), answer, tls_ref=0xdef),
        rec.SocketClose(200, 7, 9_000),
    ])
    [t] = [e for e in events if e.type == "request.http_transaction"]
    assert t.url == "https://api.local/srv" and t.status == 200
    assert events[-1].payload()["data"]["l7Protocol"] == "http2"
    # Its SETTINGS, out first, did not make it "other" on the way.
    said = [e.payload()["data"]["l7Protocol"] for e in events if e.type.startswith("connection.")]
    assert "other" not in said, said
    assert p.counters["http2_connections"] == 1


def test_http2_a_capture_gap_over_frames_is_read_past_counted_and_its_streams_marked():
    request, settings, answer = h2_exchange()
    events, p = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "openssl", 0, request, tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "openssl", len(settings) + 20, answer[20:], tls_ref=0xabc),
        rec.SocketClose(100, 5, 9_000),
    ])
    [t] = [e for e in events if e.type == "request.http_transaction"]
    assert t.incomplete and t.status is None and t.error == "response headers not captured (capture gap)"
    assert p.counters["http2_gaps_read_past"] == 1 and p.counters["http2_connections_undecodable"] == 0


def h2_after_warm_up(path: str) -> tuple[int, int, bytes, bytes]:
    """An HTTP/2 connection's second exchange, as seen by an agent that missed
    the first: (client bytes before it, server bytes before it, its request,
    its answer)."""
    import h2.config
    import h2.connection

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    sent, answered = client.data_to_send(), server.data_to_send()
    client.receive_data(answered)
    server.receive_data(sent)
    client.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "api.local"),
                            (":path", "/warm")], end_stream=True)
    server.receive_data(c := client.data_to_send())
    sent += c
    server.send_headers(1, [(":status", "200")], end_stream=True)
    client.receive_data(s := server.data_to_send())
    answered += s
    sent += client.data_to_send()
    client.send_headers(3, [(":method", "GET"), (":scheme", "https"), (":authority", "api.local"),
                            (":path", path)], end_stream=True)
    request = client.data_to_send()
    server.receive_data(request)
    answered += server.data_to_send()
    server.send_headers(3, [(":status", "200"), ("content-type", "text/plain")])
    server.send_data(3, b"joined", end_stream=True)
    return len(sent), len(answered), request, server.data_to_send()


def test_http2_joined_mid_connection_on_a_connection_seen_open():
    """Its process's TLS library attached after the preface went out."""
    before_c, before_s, request, answer = h2_after_warm_up("/later")
    events, p = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.SocketAddress(100, 5, EP_C, EP_S, 1_100),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "openssl", before_c, request, tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "openssl", before_s, answer, tls_ref=0xabc),
        rec.SocketClose(100, 5, 9_000),
    ])
    [t] = [e for e in events if e.type == "request.http_transaction"]
    # :authority was indexed by the warm-up: unknown here, so the host is the IP's.
    assert (t.method, t.path, t.status, t.response.body) == ("GET", "/later", 200, b"joined")
    assert t.incomplete and t.url == "https://127.0.0.1:8443/later"
    assert events[-1].payload()["data"]["l7Protocol"] == "http2"
    assert p.counters["http2_connections"] == p.counters["http2_connections_joined"] == 1
    assert p.counters["http2_gaps_read_past"] == 0


def test_http2_joined_at_a_late_attached_librarys_first_plaintext():
    """Its TLS library attached after the connection was in use (a new binary,
    attached at its exec): the kernel counts its offsets from its first call
    seen, so its first frames come at offset 0, and they are not a preface."""
    _, _, request, answer = h2_after_warm_up("/late")
    events, p = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.SocketAddress(100, 5, EP_C, EP_S, 1_100),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "openssl", 0, request, tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "openssl", 0, answer, tls_ref=0xabc),
        rec.SocketClose(100, 5, 9_000),
    ])
    [t] = [e for e in events if e.type == "request.http_transaction"]
    assert (t.method, t.path, t.status, t.response.body) == ("GET", "/late", 200, b"joined")
    assert events[-1].payload()["data"]["l7Protocol"] == "http2"
    assert p.counters["http2_connections_joined"] == 1


def test_http2_joined_mid_connection_whose_role_the_frames_tell():
    """Open before the agent: no connect or accept seen, the server's side.
    The request's header block names its sender, so nginx is the server."""
    before_c, before_s, request, answer = h2_after_warm_up("/srv-later")
    events, p = run([
        rec.DataChunk(200, 200, 7, 2_000, "ingress", "openssl", before_c, request, tls_ref=0xdef),
        rec.DataChunk(200, 200, 7, 3_000, "egress", "openssl", before_s, answer, tls_ref=0xdef),
        rec.SocketClose(200, 7, 9_000),
    ])
    [t] = [e for e in events if e.type == "request.http_transaction"]
    assert (t.path, t.status) == ("/srv-later", 200) and t.connection.direction == "ingress"
    assert p.counters["http2_connections_joined"] == 1


def test_bytes_from_the_middle_of_a_non_http_stream_are_not_taken_for_http2():
    events, p = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "openssl", 500, bytes(range(256)) * 4, tls_ref=0xabc),
        rec.SocketClose(100, 5, 9_000),
    ])
    assert p.counters["http2_connections"] == 0
    assert events[-1].payload()["data"]["l7Protocol"] != "http2"


def test_own_port_and_own_pid_are_not_captured():
    own = rec.Endpoint("127.0.0.1", 10001)
    events, p = run([
        rec.SocketConnect(100, 5, 1_000, own),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "socket", 0, REQ),
        rec.SocketAccept(1, 7, 1_000, EP_C, own),
    ])
    assert not [e for e in events if e.type.startswith("connection") and e.connection.remote
                and e.connection.remote.port == 10001]
    assert p.counters["own_traffic_skipped"] >= 1


def test_the_agents_own_api_through_a_forwarder_is_left_out_and_its_socket_no_longer_read():
    """Through a forwarder on this machine (not its own port) the page's own
    requests and event stream came back in as traffic."""
    ours = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Qtap-Devtools: inst-1\r\n\r\n{}"
    theirs = ours.replace(b"inst-1", b"inst-2")  # another agent's: shown
    get = b"GET /devtools/api/stats HTTP/1.1\r\nHost: localhost:18002\r\n\r\n"
    out: list = []
    p = Pipeline(Config(), out.append, {100: CURL, 200: NGINX}.get, own_pid=1, own_port=10001)
    p.own_marker = "inst-1"
    stopped: list = []
    p.on_own_socket = lambda pid, fd, tls_ref: stopped.append((pid, fd, tls_ref))
    fwd = rec.Endpoint("127.0.0.1", 18002)
    p.on_records([
        rec.SocketConnect(100, 5, 1_000, fwd),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "socket", 0, get),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "socket", 0, ours),
        rec.DataChunk(100, 100, 5, 4_000, "egress", "socket", len(get), get),  # later ones too
        rec.DataChunk(100, 100, 5, 5_000, "ingress", "socket", len(ours), ours),
        rec.SocketConnect(100, 6, 1_000, fwd),
        rec.DataChunk(100, 100, 6, 2_000, "egress", "socket", 0, get),
        rec.DataChunk(100, 100, 6, 3_000, "ingress", "socket", 0, theirs),
        # Through a TLS forwarder: its TLS object is no longer read either.
        rec.SocketConnect(100, 7, 1_000, fwd),
        rec.DataChunk(100, 100, 7, 2_000, "egress", "openssl", 0, get, tls_ref=0xabc),
        rec.DataChunk(100, 100, 7, 3_000, "ingress", "openssl", 0, ours, tls_ref=0xabc),
    ])
    p.close_all()
    shown = [e for e in out if e.type == "request.http_transaction"]
    assert [e.connection.fd for e in shown] == [6]
    # Opened as its first request showed HTTP, before its answer said whose it is: closed as it was opened.
    assert [e.type for e in out if e.type.startswith("connection.") and e.connection.fd == 5] == [
        "connection.opened", "connection.updated", "connection.closed"]
    assert stopped == [(100, 5, 0), (100, 7, 0xabc)] and p.counters["own_traffic_skipped"] == 3


def test_request_without_response_at_close_is_a_transaction_with_error():
    events, _ = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "openssl", 0, REQ),
        rec.SocketClose(100, 5, 3_000),
    ])
    tx = [e for e in events if e.type == "request.http_transaction"]
    assert len(tx) == 1 and tx_json(tx[0])["error"]
    assert tx[0].payload()["data"]["summary"]["response_status"] is None


def test_process_lifecycle_with_exit_code():
    events, _ = run([rec.ProcessExec(100, 1_000, "/usr/bin/curl", "curl"), rec.ProcessExit(100, 2_000, 7)])
    assert types(events) == ["process.started", "process.stopped"]
    assert events[1].payload()["exitCode"] == 7 and events[1].payload()["path"] == "/usr/bin/curl"


def test_a_killed_clients_last_transaction_keeps_its_executable():
    """A killed process's /proc no longer names its executable; its open
    connections, ended by its exit, said exe "" (3 of 5 killed curls)."""
    import dataclasses

    forgotten: set[int] = set()
    zombie = dataclasses.replace(CURL, exe="", user="")
    out: list = []
    p = Pipeline(Config(), out.append, lambda pid: zombie if pid in forgotten else CURL,
                 forget_process=forgotten.add, own_pid=1, own_port=10001)
    p.on_records([
        rec.ProcessExec(100, 500, "/usr/bin/curl", "curl"),
        *client_tls_exchange()[:3],  # the request, and no answer yet
        rec.ProcessExit(100, 9_000_000, -9),
    ])
    [tx] = [e for e in out if e.type == "request.http_transaction"]
    assert tx_json(tx)["metadata"]["process_exe"] == "/usr/bin/curl"
    [closed] = [e for e in out if e.type == "connection.closed"]
    assert closed.connection.process.exe == "/usr/bin/curl"
    assert types(out)[-1] == "process.stopped"


def test_a_tls_library_attached_mid_response_joins_at_the_next_request():
    """Node (its own OpenSSL) attached ~0.3 s after its keep-alive loop began:
    the first plaintext was the tail of a response body, and the connection
    was "other" for good, every later request lost."""
    tail = b'ms": 20}'
    out: list = []
    p = Pipeline(Config(), out.append, {100: CURL}.get, own_pid=1, own_port=10001)
    p.on_records([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.SocketAddress(100, 5, EP_C, EP_S, 1_100),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "socket", 0, b"\x16\x03\x01\x00\x05hello"),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "openssl", 0, tail, tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, 4_000, "egress", "openssl", 0, REQ, tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, 5_000, "ingress", "openssl", len(tail), RESP, tls_ref=0xabc),
    ])
    p.close_all()
    [tx] = [e for e in out if e.type == "request.http_transaction"]
    assert (tx.method, tx.path, tx.status) == ("POST", "/v1/users", 201)
    assert tx.connection.direction == "egress-internal" and tx.connection.l7_protocol == "http1"


def test_another_protocol_over_tls_is_searched_for_http_only_so_far():
    """SMTP over TLS: its greeting first, like a body's tail after a late
    attach.  Searched for HTTP JOIN_SEEK_BYTES deep, then no longer parsed
    (a chunk that begins a request would still be seen)."""
    out: list = []
    p = Pipeline(Config(), out.append, {100: CURL}.get, own_pid=1, own_port=10001)
    line = b"250-mail.example offers a few extensions to you today\r\n" * 64
    chunks, at = [], 0
    for i in range(pipeline_mod.JOIN_SEEK_BYTES // len(line) + 2):
        chunks.append(rec.DataChunk(100, 100, 5, 3_000 + i, "ingress", "openssl", at, line, tls_ref=0xabc))
        at += len(line)
    p.on_records([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.SocketAddress(100, 5, EP_C, EP_S, 1_100),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "socket", 0, b"\x16\x03\x01\x00\x05hello"),
        *chunks,
    ])
    conn = p.conns[(100, 5)]
    assert conn.assembler.protocol == "other" and conn.info.l7_protocol == "other"
    assert conn.assembler.discarded_bytes < pipeline_mod.JOIN_SEEK_BYTES + 2 * len(line)  # (not buffered on)
    p.close_all()
    assert not [e for e in out if e.type == "request.http_transaction"]


def test_an_absolute_target_urlsplit_refuses_stands_as_captured():
    req = b"GET http://[x/ HTTP/1.1\r\nHost: api.local\r\n\r\n"
    records = client_tls_exchange()
    records[2] = rec.DataChunk(100, 100, 5, 2_000, "egress", "openssl", 0, req, tls_ref=0xabc)
    events, p = run(records)
    (tx,) = [e for e in events if e.type == "request.http_transaction"]
    assert tx_json(tx)["request"]["url"] == "http://[x/"
    assert p.counters["record_errors"] == 0


def test_a_record_whose_handling_raises_is_counted_and_the_batch_goes_on():
    def process_info(pid):
        if pid == 300:
            raise RuntimeError("a bug")
        return {100: CURL}.get(pid)
    out = []
    p = Pipeline(Config(), out.append, process_info, own_pid=1, own_port=10001)
    p.on_records([rec.ProcessExec(300, 500, "/bin/x", "x"), *client_tls_exchange()])
    assert p.counters["record_errors"] == 1
    assert "request.http_transaction" in types(out)


def test_short_lived_process_gone_before_proc_read_still_gets_both_events():
    out = []
    p = Pipeline(Config(), out.append, lambda pid: None, own_pid=1)
    p.on_records([rec.ProcessExec(555, 1_000, "/bin/true", "true"), rec.ProcessExit(555, 2_000, 0)])
    assert types(out) == ["process.started", "process.stopped"]
    assert out[0].payload()["binary"] == "true"
    assert "user" not in out[0].payload()  # not known: absent, not uid -1 and ""
    assert p.counters["processes_gone_before_read"] == 1  # no user or container to name: counted
    assert out[0].payload()["cmdline"] == "/bin/true"  # the kernel read no argv: its filename


def test_a_process_gone_before_proc_read_keeps_the_command_line_the_kernel_read():
    out = []
    p = Pipeline(Config(), out.append, lambda pid: None, own_pid=1)
    args = "/usr/bin/curl -sk https://127.0.0.1:18443/json?tag=storm&i=7"
    p.on_records([rec.ProcessExec(556, 1_000, "/usr/bin/curl", "curl", None, 0, 0, args)])
    assert out[0].payload()["cmdline"] == args and out[0].payload()["path"] == "/usr/bin/curl"


def enriched_pipeline(tmp_path, **kw) -> tuple[Pipeline, Enricher, list]:
    """A pipeline whose process lookups go through a real Enricher reading ``tmp_path`` as /proc."""
    enricher = Enricher(docker=False, proc_root=str(tmp_path))
    out: list = []
    p = Pipeline(Config(), out.append, enricher.process, forget_process=enricher.forget,
                 remember_process=enricher.remember, own_pid=1, **kw)
    return p, enricher, out


def test_each_exec_of_a_process_that_execs_again_is_started_as_its_own_program(tmp_path):
    """``sh -c 'exec sleep 1'``: the reader read /proc for both exec records
    after the second exec, so both read as sleep.  The first is told as the
    kernel saw it (its argv), keeping what an exec does not change."""
    later = ProcessInfo(pid=560, ppid=1, exe="/usr/bin/sleep", binary="sleep", cmdline="/usr/bin/sleep 1",
                        uid=1000, user="app", hostname="box", start_time_ns=5, container_id="c" * 64,
                        runtime="docker")
    p, enricher, out = enriched_pipeline(tmp_path)
    p.on_records([rec.ProcessExec(560, 1_000, "/bin/sh", "sh", later, 0, 1000, "/bin/sh -c exec /usr/bin/sleep 1"),
                  rec.ProcessExec(560, 2_000, "/usr/bin/sleep", "sleep", later, 0, 1000, "/usr/bin/sleep 1")])
    first, second = (e.payload() for e in out)
    assert (first["binary"], first["path"], first["cmdline"]) == ("sh", "/bin/sh", "/bin/sh -c exec /usr/bin/sleep 1")
    assert (first["user"]["name"], first["container"]["id"]) == ("app", "c" * 12)
    assert (second["binary"], second["cmdline"]) == ("sleep", "/usr/bin/sleep 1")
    assert enricher.process(560).cmdline == "/usr/bin/sleep 1"  # its transactions: the program it runs now
    # Argv the kernel cut tells nothing: /proc's reading stands.
    p.on_records([rec.ProcessExec(561, 3_000, "/bin/sh", "sh", dataclasses.replace(later, pid=561), 0, 1000,
                                  "/bin/sh -c exec …")])
    assert out[-1].payload()["binary"] == "sleep"


def test_a_containers_process_gone_before_proc_read_is_named_by_its_cgroup_id(tmp_path):
    """`docker run --rm … curl`: the curl can exit before /proc is read.  Its
    cgroup's mkdir record and its exec record's cgroup id name the container,
    and the enricher's cache carries the id to its transactions."""
    cid = "ab" * 32
    p, enricher, out = enriched_pipeline(tmp_path, cgroups=CgroupIndex(root=str(tmp_path)))
    p.on_records([rec.CgroupCreated(4321, f"/docker/{cid}", 900),
                  rec.ProcessExec(558, 1_000, "/usr/bin/curl", "curl", None, 4321, 0)])
    assert (out[0].process.container_id, out[0].process.runtime) == (cid, "docker")  # the publisher names it
    assert out[0].payload()["user"] == {"id": 0, "name": None}  # the kernel's uid; its passwd was not read
    assert enricher.process(558).container_id == cid
    assert (p.counters["processes_gone_before_read"], p.counters["containers_from_cgroup_id"]) == (1, 1)


def test_a_host_process_gone_before_proc_read_stays_a_host_process(tmp_path):
    out = []
    p = Pipeline(Config(), out.append, lambda pid: None, own_pid=1, cgroups=CgroupIndex(root=str(tmp_path)))
    p.on_records([rec.CgroupCreated(77, "/user.slice/user-0.slice/session-9.scope", 900),
                  rec.ProcessExec(559, 1_000, "/bin/true", "true", None, 77, 0)])
    assert out[0].process.container_id is None
    assert p.counters["containers_from_cgroup_id"] == 0
    # In no container: the host's passwd names its user (38% of a fork storm's
    # curls had none), where a container's could not be read any more.
    assert out[0].payload()["user"] == {"id": 0, "name": "root"}


def test_a_process_gone_between_its_exe_and_its_command_line_keeps_the_kernels_argv():
    """A pipeline's `tr` exits while the reader reads /proc: its exe was read,
    its cmdline came back empty.  The argv the kernel read at exec fills in."""
    read = ProcessInfo(pid=562, ppid=1, exe="/usr/bin/tr", binary="tr", cmdline="", uid=0, user="root",
                       hostname="box", start_time_ns=5)
    out = []
    p = Pipeline(Config(), out.append, lambda pid: None, own_pid=1)
    p.on_records([rec.ProcessExec(562, 1_000, "/usr/bin/tr", "tr", read, 0, 0, "tr a b")])
    assert (out[0].payload()["path"], out[0].payload()["cmdline"]) == ("/usr/bin/tr", "tr a b")


def test_process_read_at_exec_by_the_ring_reader_is_described_after_it_is_gone(tmp_path):
    """The reader read /proc at exec (record.process); by the time the event
    loop gets the record the process has exited (an empty proc root here):
    its start still names user, command line and container, and the
    enricher's cache answers for it afterwards."""
    read = ProcessInfo(pid=557, ppid=1, exe="/usr/bin/curl", binary="curl", cmdline="curl -sk https://x/?m=1",
                       uid=1000, user="app", hostname="box", start_time_ns=5, container_id="c" * 64,
                       runtime="docker")
    p, enricher, out = enriched_pipeline(tmp_path)
    p.on_records([rec.ProcessExec(557, 1_000, "/usr/bin/curl", "curl", read)])
    started = out[0].payload()
    assert (started["cmdline"], started["user"]["name"]) == ("curl -sk https://x/?m=1", "app")
    assert started["container"]["id"] == "c" * 12
    assert p.counters["processes_gone_before_read"] == 0
    assert enricher.process(557).cmdline == "curl -sk https://x/?m=1"


def test_process_read_half_way_through_its_exit_takes_the_kernels_filename():
    """/proc answered for the pid, but its exe link was already gone."""
    half = ProcessInfo(pid=556, ppid=1, exe="", binary="sh", cmdline="", uid=0, user="root", hostname="box",
                       start_time_ns=1)
    out = []
    p = Pipeline(Config(), out.append, {556: half}.get, own_pid=1)
    p.on_records([rec.ProcessExec(556, 1_000, "/usr/bin/dash", "sh")])
    started = out[0].payload()
    assert (started["path"], started["binary"]) == ("/usr/bin/dash", "dash")


def test_the_kernels_filename_stands_in_for_the_processs_later_events_too():
    # The enricher cached the half-read process; its transactions and its
    # process.stopped named no binary, though process.started did.
    half = ProcessInfo(pid=100, ppid=1, exe="", binary="curl", cmdline="", uid=0, user="root", hostname="box",
                       start_time_ns=1)
    cache = {100: half}
    out = []
    p = Pipeline(Config(), out.append, cache.get, own_pid=1, own_port=10001,
                 remember_process=lambda info: cache.__setitem__(info.pid, info))
    p.on_records([rec.ProcessExec(100, 500, "/usr/bin/curl", "curl"), *client_tls_exchange(),
                  rec.ProcessExit(100, 7_000_000, 0)])
    tx = next(e for e in out if e.type == "request.http_transaction")
    assert tx_json(tx)["metadata"]["process_exe"] == "/usr/bin/curl"
    stopped = next(e for e in out if e.type == "process.stopped").payload()
    assert stopped["path"] == "/usr/bin/curl"


def test_direction_classification():
    assert classify("127.0.0.1") == "egress-internal"
    assert classify("10.1.2.3") == "egress-internal"
    assert classify("::1") == "egress-internal"
    assert classify("52.4.128.73") == "egress-external"


def test_loopback_address_record_before_its_connect_record_is_applied():
    # On loopback the handshake completes inside connect(): the kernel reports
    # the 4-tuple before the connect syscall returns.
    events, _ = run([
        rec.SocketAddress(100, 5, EP_C, EP_S, 900),
        rec.SocketConnect(100, 5, 1_000, EP_S, in_progress=True),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "openssl", 0, REQ),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "openssl", 0, RESP),
    ])
    opened = events[0].payload()["data"]
    assert events[0].type == "connection.opened"
    assert opened["source"]["address"] == {"ip": "127.0.0.1", "port": 40000}


def test_tls_peek_of_one_byte_then_client_hello_is_tls_not_other():
    # nginx peeks one byte (MSG_PEEK) to tell TLS from plaintext, then reads the hello.
    hello = bytes.fromhex("160301002e") + b"\x01" + b"\x00" * 45
    events, _ = run([
        rec.SocketAccept(200, 9, 1_000, EP_C, EP_S),
        rec.DataChunk(200, 200, 9, 1_100, "ingress", "socket", 0, b"\x16"),
        rec.DataChunk(200, 200, 9, 1_200, "ingress", "socket", 1, hello),
        rec.DataChunk(200, 200, 9, 2_000, "ingress", "openssl", 0, REQ),
        rec.DataChunk(200, 200, 9, 3_000, "egress", "openssl", 0, RESP),
        rec.SocketClose(200, 9, 4_000),
    ])
    assert "request.http_transaction" in types(events)
    assert events[-1].payload()["data"]["l7Protocol"] == "http1"


def node_style_stream(ssl_ptr, path, t0, sock_fd=9, port=40001):
    """A TLS library on memory buffers (node): plaintext records carry no fd,
    the ciphertext goes out on a socket of its own."""
    hello = b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00"
    req = b"GET " + path + b" HTTP/1.1\r\nHost: api.local\r\n\r\n"
    return [
        rec.SocketConnect(100, sock_fd, t0, EP_S),
        rec.SocketAddress(100, sock_fd, rec.Endpoint("127.0.0.1", port), EP_S, t0 + 10),
        rec.DataChunk(100, 100, sock_fd, t0 + 20, "egress", "socket", 0, hello),
        rec.DataChunk(100, 100, -1, t0 + 30, "egress", "openssl", 0, req, tls_ref=ssl_ptr),
        rec.DataChunk(100, 100, -1, t0 + 40, "ingress", "openssl", 0, RESP, tls_ref=ssl_ptr),
    ]


def test_fdless_tls_stream_closes_with_the_socket_it_borrowed():
    events, _ = run(node_style_stream(0xfeed, b"/first", 1_000) + [rec.SocketClose(100, 9, 9_000)],
                    capture_own_port=True)
    # One connection, not the socket and the stream riding on it: opened at
    # connect, it closes at the socket's close (not at process exit), and its
    # events say what the stream found.
    opened = [e for e in events if e.type == "connection.opened"]
    closed = [e for e in events if e.type == "connection.closed"]
    tx = [e for e in events if e.type == "request.http_transaction"]
    assert len(opened) == len(closed) == len(tx) == 1
    assert opened[0].connection is closed[0].connection is tx[0].connection
    assert closed[0].ts_ns == 9_000 + events[0].connection.opened_ns - 1_000  # the socket's close, in wall time
    assert tx[0].payload()["data"]["summary"]["request_path"] == "/first"
    conn = closed[0].payload()["data"]
    assert (conn["l7Protocol"], conn["meta"]["tlsProbeTypesDetected"], conn["destination"]["address"]["port"]) == (
        "http1", ["openssl"], 8443)
    assert tx[0].connection.remote.port == 8443 and tx[0].connection.direction == "egress-internal"


def test_a_node_server_connection_whose_address_comes_after_its_first_request_says_it_then():
    """node accepts with no address buffer: the kernel gives no 4-tuple, /proc
    is asked, and its answer can come after the TLS stream on the socket went
    out (opened without addresses).  A connection.updated then carries them;
    before, they showed only at its close, and its transactions had none."""
    hello = b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00"
    get = b"GET /n HTTP/1.1\r\nHost: api.local\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    out: list = []
    seen: list = []  # each as the stream had it when it went out (the agent makes its JSON at emit)

    def emit(e) -> None:
        out.append(e)
        seen.append((e.type, e.payload()["data"]))

    p = at_start(Pipeline(Config(), emit, {200: NGINX}.get, own_pid=1, own_port=10001), 200)
    p.on_records([
        rec.SocketAccept(200, 9, 1_000, None, None),
        rec.DataChunk(200, 200, 9, 2_000, "ingress", "socket", 0, hello),
        rec.DataChunk(200, 200, -1, 3_000, "ingress", "openssl", 0, get, tls_ref=0xbee),
        rec.DataChunk(200, 200, -1, 4_000, "egress", "openssl", 0, ok, tls_ref=0xbee),
        rec.SocketAddress(200, 9, EP_S, EP_C, 5_000, "proc"),
        rec.DataChunk(200, 200, -1, 6_000, "ingress", "openssl", len(get), get, tls_ref=0xbee),
        rec.DataChunk(200, 200, -1, 7_000, "egress", "openssl", len(ok), ok, tls_ref=0xbee),
    ])
    conns = [d for t, d in seen if t.startswith("connection.")]
    txs = [tx_json(e) for e in out if e.type == "request.http_transaction"]
    assert conns[0]["source"].get("address") is None  # opened before its addresses were known
    later = [d for t, d in seen if t == "connection.updated" and d["source"].get("address")]
    assert later and later[0]["source"]["address"] == {"ip": "127.0.0.1", "port": 40000}
    assert later[0]["meta"]["connectionId"] == conns[0]["meta"]["connectionId"]
    assert txs[-1]["metadata"]["remote_address"] == {"ip": "127.0.0.1", "port": 40000}
    assert txs[-1]["metadata"]["connection_id"] == conns[0]["meta"]["connectionId"]


def test_a_reused_ssl_address_starts_a_new_stream_not_a_replay():
    """After SSL_free the kernel forgets the stream's offsets; malloc may hand
    the same SSL* to the next session, whose bytes start at offset 0 again."""
    first = node_style_stream(0xfeed, b"/first", 1_000)
    second = node_style_stream(0xfeed, b"/second", 50_000, sock_fd=10, port=40002)
    events, _ = run(first + second)
    paths = [e.payload()["data"]["summary"]["request_path"] for e in events if e.type == "request.http_transaction"]
    assert paths == ["/first", "/second"]


def test_socket_seeded_on_a_listening_port_is_the_server_side():
    """A connection accepted before the agent started: /proc shows its local
    port listening, so the process is its server and the direction ingress
    from the first event on."""
    seeded = rec.SocketAddress(200, 7, EP_S, EP_C, 1_000, "seed", accepted=True)
    events, _ = run([
        seeded,
        # The kernel counts offsets from the first byte it sees on the socket.
        rec.DataChunk(200, 200, 7, 2_000, "ingress", "socket", 0, b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n"),
        rec.DataChunk(200, 200, 7, 3_000, "egress", "socket", 0, b"HTTP/1.1 204 No Content\r\n\r\n"),
    ])
    assert events[0].type == "connection.opened" and events[0].connection.direction == "ingress"
    tx = [e for e in events if e.type == "request.http_transaction"]
    assert len(tx) == 1 and tx[0].connection.direction == "ingress"
    assert tx[0].payload()["data"]["summary"]["response_status"] == 204


def _seeded_client_whose_fd_comes_late(gap_ns: int) -> list:
    """A keep-alive client connection open before the agent: its socket is
    seeded from /proc, and its TLS stream's first call learns no fd (no syscall
    on a socket the kernel knew), its next does; the kernel carried the
    stream's offsets over to the fd (probes/sockets.c)."""
    get1 = b"GET /one HTTP/1.1\r\nHost: api.local\r\n\r\n"
    get2 = b"GET /two HTTP/1.1\r\nHost: api.local\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    t = 1_000 + gap_ns
    return [
        rec.SocketAddress(100, 5, EP_C, EP_S, 1_000, "seed"),
        rec.DataChunk(100, 100, -1, 2_000, "egress", "openssl", 0, get1, tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, t + 3_000, "ingress", "openssl", 0, ok, tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, t + 4_000, "egress", "openssl", len(get1), get2, tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, t + 5_000, "ingress", "openssl", len(ok), ok, tls_ref=0xabc),
        rec.SocketClose(100, 5, t + 6_000),
    ]


def test_a_tls_stream_whose_fd_comes_late_goes_on_as_its_sockets_connection():
    events, p = run(_seeded_client_whose_fd_comes_late(0))
    tx = [e for e in events if e.type == "request.http_transaction"]
    assert [e.payload()["data"]["summary"]["request_path"] for e in tx] == ["/one", "/two"]
    # One connection, with the socket's addresses, for both; not one with none and another.
    opened = [e for e in events if e.type == "connection.opened"]
    closed = [e for e in events if e.type == "connection.closed"]
    assert len(opened) == len(closed) == 1
    assert all(e.connection is opened[0].connection for e in tx + closed)
    assert tx[0].connection.remote.port == 8443 and tx[0].connection.local.port == 40000
    assert tx[0].connection.direction == "egress-internal"
    assert closed[0].payload()["data"]["meta"]["tlsProbeTypesDetected"] == ["openssl"]
    assert p.counters["tls_fd_found_late"] == 1 and p.counters["tls_connections_unread"] == 0


def test_a_tls_stream_announced_alone_before_its_fd_came_takes_the_sockets_addresses():
    """Its fd came after its grace: it had been announced alone, without
    addresses.  It is updated with them and carries on; the socket's own
    connection (no transactions of its own) ends there."""
    records = _seeded_client_whose_fd_comes_late(2 * pipeline_mod.OPEN_GRACE_NS)
    out = []
    p = Pipeline(Config(), out.append, {100: CURL}.get, own_pid=1, own_port=10001)
    p.on_records(records[:2])
    p.on_tick(2_000 + pipeline_mod.OPEN_GRACE_NS + 1)
    p.on_records(records[2:])
    p.close_all()
    tx = [e for e in out if e.type == "request.http_transaction"]
    assert [e.payload()["data"]["summary"]["request_path"] for e in tx] == ["/one", "/two"]
    stream = tx[0].connection
    assert tx[1].connection is stream and stream.remote.port == 8443 and stream.direction == "egress-internal"
    updated = [e for e in out if e.type == "connection.updated" and e.connection is stream]
    assert updated and updated[-1].payload()["data"]["destination"]["address"]["port"] == 8443
    closed = [e.connection for e in out if e.type == "connection.closed"]
    assert len(closed) == 2 and stream in closed
    socket_only = next(c for c in closed if c is not stream)
    assert socket_only.transactions == 0 and socket_only.local.port == 40000
    assert p.counters["tls_connections_unread"] == 0


def test_plaintext_host_names_the_endpoint_on_the_http1_update():
    req = b"GET /x HTTP/1.1\r\nHost: plain.example.test:8080\r\nAccept: */*\r\n\r\n"
    events, _ = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.SocketAddress(100, 5, EP_C, EP_S, 1_100),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "socket", 0, req),
    ])
    updated = [e.payload()["data"] for e in events if e.type == "connection.updated"]
    assert updated and updated[0]["l7Protocol"] == "http1"
    assert updated[0]["meta"]["endpointId"] == "plain.example.test"


def test_a_connect_that_never_completed_is_no_connection():
    """Refused: the connect record came, no 4-tuple (no ESTABLISHED), no bytes, then close."""
    events, p = run([rec.SocketConnect(100, 5, 1_000, EP_S), rec.SocketClose(100, 5, 2_000)])
    assert events == [] and p.counters["connects_not_established"] == 1


def test_a_body_cut_while_the_capture_was_shedding_says_so_in_the_transaction():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 40000\r\n\r\n"
    get = b"GET /big HTTP/1.1\r\nHost: api.local\r\n\r\n"
    events, _ = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.SocketAddress(100, 5, EP_C, EP_S, 1_100),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "openssl", 0, get, tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "openssl", 0, head + b"x" * 4000, tls_ref=0xabc,
                      shedding=True),
        # The body's other 36,000 bytes were never copied; the next response is whole.
        rec.DataChunk(100, 100, 5, 4_000, "egress", "openssl", len(get), get, tls_ref=0xabc, shedding=True),
        rec.DataChunk(100, 100, 5, 5_000, "ingress", "openssl", len(head) + 40000,
                      b"HTTP/1.1 204 No Content\r\n\r\n", tls_ref=0xabc, shedding=True),
    ])
    cut, whole = [tx_json(e) for e in events if e.type == "request.http_transaction"]
    assert cut["shed"] is True and cut["incomplete"] is True and cut["response"]["status"] == 200
    assert cut["response"]["body_truncated"] is True and cut["response"]["body_size"] == 40000
    assert "shed" not in whole and whole["response"]["status"] == 204


BIG_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 8000000\r\n\r\n"
BIG_GET = b"GET /big HTTP/1.1\r\nHost: api.local\r\n\r\n"


def big_download(close: rec.SocketClose, source="openssl", shedding=False):
    """An 8 MB response of which only the head and 16,000 bytes have records."""
    ref = 0xabc if source != "socket" else 0
    return [
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.SocketAddress(100, 5, EP_C, EP_S, 1_100),
        rec.DataChunk(100, 100, 5, 2_000, "egress", source, 0, BIG_GET, tls_ref=ref),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", source, 0, BIG_HEAD + b"x" * 16000, tls_ref=ref,
                      shedding=shedding),
        close,
    ]


@pytest.mark.parametrize("source", ["openssl", "socket"])
@pytest.mark.parametrize("shedding_at_close", [True, False])
def test_a_tail_shed_before_the_close_completes_the_response_from_where_the_streams_ended(
        source, shedding_at_close):
    # The last records of a download were cut whole (no record at all): the
    # close says where the streams ended, so the hole is the body's tail.
    ends = (len(BIG_GET), len(BIG_HEAD) + 8_000_000)
    ends = (None, None, *ends) if source != "socket" else (*ends, None, None)
    events, p = run(big_download(rec.SocketClose(100, 5, 9_000, ends, shedding_at_close), source,
                                 shedding=not shedding_at_close))
    (tx,) = [tx_json(e) for e in events if e.type == "request.http_transaction"]
    assert tx["shed"] is True and "error" not in tx and tx["response"]["status"] == 200
    assert tx["response"]["body_size"] == 8_000_000 and tx["response"]["body_truncated"] is True
    (closed,) = [e.payload()["data"] for e in events if e.type == "connection.closed"]
    assert closed["bytesReceived"] == len(BIG_HEAD) + 8_000_000


def test_a_close_with_nothing_after_the_last_record_still_says_the_response_was_cut():
    ends = (None, None, len(BIG_GET), len(BIG_HEAD) + 16000)  # the peer really stopped there
    events, _ = run(big_download(rec.SocketClose(100, 5, 9_000, ends)))
    (tx,) = [tx_json(e) for e in events if e.type == "request.http_transaction"]
    assert "closed" in tx["error"] and tx["response"]["body_truncated"] is True
    assert "incomplete" not in tx and tx["response"]["body_size"] == 16000  # never sent: no capture gap


def test_the_side_tables_are_bounded_and_count_what_they_let_go():
    import dataclasses

    from qtap_devtools.pipeline import MAX_CONNECTIONS

    _, p = run([])
    for pid in range(1000, 1000 + MAX_CONNECTIONS + 5):
        p._remember(dataclasses.replace(CURL, pid=pid))
    assert len(p.processes) == MAX_CONNECTIONS
    assert p.counters["state_evicted"] == 5


def req(n: int) -> bytes:
    return f"GET /item/{n} HTTP/1.1\r\nHost: api.local\r\n\r\n".encode()


def resp(n: int) -> bytes:
    body = f"item {n}".encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def pairs(events) -> list[tuple[str | None, str | None]]:
    """(request path, response body) of each transaction, in order."""
    out = []
    for e in events:
        if e.type == "request.http_transaction":
            full = tx_json(e)
            req_ = full.get("request") or {}
            body = (full.get("response") or {}).get("body")
            out.append((req_.get("url", "").rsplit("/", 1)[-1] or None,
                        base64.b64decode(body).decode().split()[-1] if body else None))
    return out


def test_a_tls_stream_whose_first_plaintext_is_a_response_pairs_from_its_next_request():
    # The socket's connect was seen, but its TLS library was attached (its
    # probes armed) after the first request went out: the first plaintext is
    # that request's response.  It is counted, and the next exchanges pair.
    events, p = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.SocketAddress(100, 5, EP_C, EP_S, 1_100),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "openssl", 0, resp(1), tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, 4_000, "egress", "openssl", 0, req(2), tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, 5_000, "ingress", "openssl", len(resp(1)), resp(2), tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, 6_000, "egress", "openssl", len(req(2)), req(3), tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, 7_000, "ingress", "openssl", len(resp(1) + resp(2)), resp(3), tls_ref=0xabc),
        rec.SocketClose(100, 5, 8_000),
    ])
    assert pairs(events) == [("2", "2"), ("3", "3")]
    assert p.counters["unpaired_close"] == 1  # the response without its request


def test_a_stream_joined_mid_response_pairs_again_from_its_next_request():
    # Open before the agent (no connect seen): the first bytes are the tail of a
    # response; the next call that starts with a request is where pairing begins.
    tail = b"the end of a body the agent joined half-way\n"
    events, _ = run([
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "socket", 0, tail),
        rec.DataChunk(100, 100, 5, 4_000, "egress", "socket", 0, req(2)),
        rec.DataChunk(100, 100, 5, 5_000, "ingress", "socket", len(tail), resp(2)),
        rec.DataChunk(100, 100, 5, 6_000, "egress", "socket", len(req(2)), req(3)),
        rec.DataChunk(100, 100, 5, 7_000, "ingress", "socket", len(tail + resp(2)), resp(3)),
        rec.SocketClose(100, 5, 8_000),
    ])
    assert pairs(events) == [("2", "2"), ("3", "3")]


def test_an_end_record_ends_a_response_whose_tail_was_not_captured_at_once():
    # One 2 MB write: the probes emit at most 64 records of a call (1 MiB) and
    # then a record with no bytes where the call ended (probes/common.h,
    # emit_end).  The response ends there, cut, with its real size; before,
    # the hole showed only at the connection's next record, and the last
    # response of a keep-alive connection was called incomplete at its close.
    size = 2_000_000
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    kept = head + b"x" * ((1 << 20) - len(head))
    out: list = []
    p = Pipeline(Config(), out.append, {100: CURL}.get, own_pid=1, own_port=10001)
    p.on_records([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.SocketAddress(100, 5, EP_C, EP_S, 1_100),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "socket", 0, req(1)),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "socket", 0, kept),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "socket", len(head) + size, b""),
    ])
    done = [e for e in out if e.type == "request.http_transaction"]  # the connection is still open
    assert len(done) == 1
    full = tx_json(done[0])
    assert full["response"]["status"] == 200 and full["response"]["body_truncated"] is True
    assert full["response"]["body_size"] == size and not full.get("error")
    p.close_all()
    closed = [e for e in out if e.type == "connection.closed"][0].payload()["data"]
    assert closed["bytesReceived"] == len(head) + size


def test_an_end_record_of_a_stream_never_seen_opens_no_connection():
    events, _ = run([rec.DataChunk(100, 100, 7, 3_000, "egress", "socket", 4096, b"")])
    assert events == []


def test_a_chunked_bodys_trailer_fields_are_in_the_transaction():
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
               b"5\r\nhello\r\n0\r\nX-Checksum: 5d41402a\r\nX-Checksum: again\r\n\r\n")
    events, _ = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "socket", 0, req(1)),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "socket", 0, chunked),
        rec.SocketClose(100, 5, 4_000),
    ])
    full = tx_json(next(e for e in events if e.type == "request.http_transaction"))
    assert full["response"]["trailers"] == {"X-Checksum": "5d41402a, again"}  # combined as headers are
    assert base64.b64decode(full["response"]["body"]) == b"hello"
    assert "trailers" not in full["request"]  # none: no key


def test_a_response_sent_before_the_request_ended_lasts_until_the_request_ends():
    # A server refusing an upload answers before reading its body; the
    # exchange ends with the request's last byte, not with the response.
    head = b"POST /upload HTTP/1.1\r\nHost: api.local\r\nContent-Length: 10\r\n\r\n"
    refused = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n"
    events, _ = run([
        rec.SocketAccept(200, 9, 1_000, EP_C, EP_S),
        rec.DataChunk(200, 200, 9, 2_000, "ingress", "socket", 0, head),
        rec.DataChunk(200, 200, 9, 3_000, "egress", "socket", 0, refused),
        rec.DataChunk(200, 200, 9, 9_000, "ingress", "socket", len(head), b"0123456789"),
        rec.SocketClose(200, 9, 10_000),
    ])
    full = tx_json(next(e for e in events if e.type == "request.http_transaction"))
    assert full["duration_us"] == 7 and full["timing"]["send_ms"] == 0.007


def test_the_timing_phases_add_up_to_the_duration_when_the_request_ends_after_the_response():
    """A request whose end came after its response's (an upload answered
    early and read on; its end shed and placed at the close): sending ran to
    that end, receiving is what came after both.  The phases had overlapped,
    so HAR's `time` (their sum) was longer than the exchange."""
    head = b"POST /upload HTTP/1.1\r\nHost: api.local\r\nContent-Length: 10\r\n\r\n"
    events, _ = run([
        rec.SocketAccept(200, 9, 1_000, EP_C, EP_S),
        rec.DataChunk(200, 200, 9, 2_000, "ingress", "socket", 0, head),
        rec.DataChunk(200, 200, 9, 3_000, "egress", "socket", 0, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"),
        rec.DataChunk(200, 200, 9, 6_000, "egress", "socket", 38, b"done"),
        rec.DataChunk(200, 200, 9, 9_000, "ingress", "socket", len(head), b"0123456789"),
        rec.SocketClose(200, 9, 10_000),
    ])
    full = tx_json(next(e for e in events if e.type == "request.http_transaction"))
    assert full["duration_us"] == 7
    assert full["timing"] == {"send_ms": 0.007, "wait_ms": 0.0, "receive_ms": 0.0}


def test_a_request_never_answered_waited_until_the_close():
    """A client that gives up on a server that never answers (curl
    --max-time 1): the second it waited is the transaction's wait, so the
    phases add up to its duration.  Its timing was {"send_ms": 0.0} in a
    1000 ms exchange, and HAR's `time`, their sum, said 0 ms for a hang."""
    events, _ = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "openssl", 0, req(1), tls_ref=0xabc),
        rec.SocketClose(100, 5, 1_000_002_000),
    ])
    full = tx_json(next(e for e in events if e.type == "request.http_transaction"))
    assert full["error"] == "connection closed before response" and full["response"] is None
    assert full["duration_us"] == 1_000_000
    assert full["timing"] == {"send_ms": 0.0, "wait_ms": 1000.0}


def test_fdless_tls_streams_of_one_process_find_their_sockets_by_the_thread_that_moves_them():
    # asyncio or node with a pool: several TLS sockets, several SSL objects on
    # memory buffers.  The thread writes plaintext into one, then its
    # ciphertext to that one's socket; it reads ciphertext from a socket, then
    # the plaintext out of that one's SSL.  (Each transaction was labelled
    # egress-external with no addresses.)
    hello = b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00"
    app = b"\x17\x03\x03\x00\x20" + b"\xaa" * 32
    a, b = 0xa000, 0xb000
    records = []
    for fd, port in ((5, 41005), (6, 41006)):
        records += [rec.SocketConnect(100, fd, 1_000 + fd, EP_S),
                    rec.SocketAddress(100, fd, rec.Endpoint("127.0.0.1", port), EP_S, 1_010 + fd),
                    rec.DataChunk(100, 100, fd, 1_020 + fd, "egress", "socket", 0, hello)]
    records += [
        rec.DataChunk(100, 100, -1, 2_000, "egress", "openssl", 0, req(1), tls_ref=a),
        rec.DataChunk(100, 100, 6, 2_010, "egress", "socket", len(hello), app),  # a's ciphertext: fd 6
        rec.DataChunk(100, 100, -1, 2_100, "egress", "openssl", 0, req(2), tls_ref=b),
        rec.DataChunk(100, 100, 5, 2_110, "egress", "socket", len(hello), app),  # b's: fd 5
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "socket", 0, app),
        rec.DataChunk(100, 100, -1, 3_010, "ingress", "openssl", 0, resp(2), tls_ref=b),
        rec.DataChunk(100, 100, 6, 3_100, "ingress", "socket", 0, app),
        rec.DataChunk(100, 100, -1, 3_110, "ingress", "openssl", 0, resp(1), tls_ref=a),
    ]
    events, p = run(records)
    txs = {tx_json(e)["request"]["url"].rsplit("/", 1)[1]: tx_json(e) for e in events
           if e.type == "request.http_transaction"}
    assert txs["1"]["metadata"]["local_address"]["port"] == 41006
    assert txs["2"]["metadata"]["local_address"]["port"] == 41005
    assert {tx["direction"] for tx in txs.values()} == {"egress-internal"}
    updated = [e.payload()["data"] for e in events if e.type == "connection.updated"]
    assert any(u["source"]["address"] == {"ip": "127.0.0.1", "port": 41006} for u in updated)


def test_an_fdless_tls_streams_first_read_names_the_socket_its_thread_read():
    hello = b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00"
    app = b"\x17\x03\x03\x00\x20" + b"\xaa" * 32
    records = []
    for fd, port in ((5, 41005), (6, 41006)):
        records += [rec.SocketAccept(100, fd, 1_000 + fd, rec.Endpoint("127.0.0.1", port), EP_S),
                    rec.DataChunk(100, 100, fd, 1_020 + fd, "ingress", "socket", 0, hello)]
    records += [
        rec.DataChunk(100, 100, 6, 2_000, "ingress", "socket", len(hello), app),
        rec.DataChunk(100, 100, -1, 2_010, "ingress", "openssl", 0, req(7), tls_ref=0xc000),  # a server's
        rec.DataChunk(100, 100, -1, 2_100, "egress", "openssl", 0, resp(7), tls_ref=0xc000),
    ]
    events, _ = run(records)
    tx = tx_json(next(e for e in events if e.type == "request.http_transaction"))
    assert tx["direction"] == "ingress" and tx["metadata"]["remote_address"]["port"] == 41006


def test_https_through_an_http_proxy_is_the_connect_then_the_tunnelled_exchange():
    """curl -x http://proxy https://api.local/...: CONNECT in plaintext on the
    socket, then the TLS handshake through the tunnel, then the library's
    plaintext on the same fd, from its own offset 0."""
    connect = b"CONNECT api.local:443 HTTP/1.1\r\nHost: api.local:443\r\nUser-Agent: curl/7.88.1\r\n\r\n"
    established = b"HTTP/1.1 200 Connection established\r\n\r\n"
    hello = bytes.fromhex("16030100") + b"\x30" + b"\x01" + b"\x00" * 47
    events, _ = run([
        rec.SocketConnect(100, 5, 1_000, EP_S),
        rec.DataChunk(100, 100, 5, 2_000, "egress", "socket", 0, connect),
        rec.DataChunk(100, 100, 5, 3_000, "ingress", "socket", 0, established),
        rec.DataChunk(100, 100, 5, 4_000, "egress", "socket", len(connect), hello),
        rec.DataChunk(100, 100, 5, 5_000, "egress", "openssl", 0, REQ, tls_ref=0xabc),
        rec.DataChunk(100, 100, 5, 5_100, "egress", "socket", len(connect) + len(hello), b"\x17\x03\x03\x00\x10" + b"\xaa" * 16),
        rec.DataChunk(100, 100, 5, 6_000, "ingress", "openssl", 0, RESP, tls_ref=0xabc),
        rec.SocketClose(100, 5, 9_000),
    ])
    tx = [tx_json(e) for e in events if e.type == "request.http_transaction"]
    assert [(t["request"]["method"], t["request"]["url"], t["response"]["status"]) for t in tx] == [
        ("CONNECT", "http://api.local:443", 200),
        ("POST", "https://api.local/v1/users", 201),
    ]
    assert tx[1]["request"]["body"] == base64.b64encode(b'{"user": "john"}').decode()


def test_a_tls_connection_whose_plaintext_never_came_is_counted_and_its_program_named_once(caplog):
    """Chromium (BoringSSL), Go, NSS: the agent sees the handshake on the socket
    and no plaintext.  Silent before: the connection looked like any other."""
    hello = bytes.fromhex("16030100") + b"\x30" + b"\x01" + b"\x00" * 47
    records = []
    for fd in (5, 6):
        records += [rec.SocketConnect(100, fd, 1_000, EP_S),
                    rec.DataChunk(100, 100, fd, 1_500, "egress", "socket", 0, hello),
                    rec.SocketClose(100, fd, 9_000)]
    with caplog.at_level("INFO", logger="qtap_devtools.pipeline"):
        _, p = run(records + client_tls_exchange(fd=7))
    assert p.counters["tls_connections_unread"] == 2
    assert [r.getMessage().split(":")[0] for r in caplog.records if "no plaintext" in r.getMessage()] == ["/usr/bin/curl"]


def test_a_tls_connection_opened_before_the_probes_went_live_is_not_blamed_on_its_library(caplog):
    """curl and nginx mid-request as the agent starts: their handshakes were
    on the socket, their TLS calls came before the probes.  They were named in
    the log as programs whose TLS library the agent cannot read."""
    hello = bytes.fromhex("16030100") + b"\x30" + b"\x01" + b"\x00" * 47
    out = []
    p = at_start(Pipeline(Config(), out.append, {100: CURL, 200: NGINX}.get, own_pid=1, own_port=10001), 100, 200)
    p.tls_armed_mono = 5_000
    with caplog.at_level("INFO", logger="qtap_devtools.pipeline"):
        p.on_records([rec.SocketConnect(100, 5, 1_000, EP_S),
                      rec.DataChunk(100, 100, 5, 1_500, "egress", "socket", 0, hello),
                      rec.SocketClose(100, 5, 9_000),
                      rec.SocketConnect(100, 6, 6_000, EP_S),  # after: its silence is news
                      rec.DataChunk(100, 100, 6, 6_500, "egress", "socket", 0, hello),
                      rec.SocketClose(100, 6, 9_000)])
        p.close_all()
    assert p.counters["tls_connections_unread"] == 1
    assert len([r for r in caplog.records if "no plaintext" in r.getMessage()]) == 1


def test_a_socket_lent_before_its_addresses_came_is_still_one_connection():
    """The stream found its socket before the socket's addresses arrived (and
    before the grace that announces a connection without them): the socket
    must not be announced on its own later, as a second connection."""
    hello = bytes.fromhex("16030100") + b"\x30" + b"\x01" + b"\x00" * 47
    records = [
        rec.SocketConnect(100, 9, 1_000, EP_S),
        rec.DataChunk(100, 100, 9, 1_100, "egress", "socket", 0, hello),
        rec.DataChunk(100, 100, -1, 1_200, "egress", "openssl", 0, REQ, tls_ref=0xbeef),
        rec.DataChunk(100, 100, 9, 1_300, "egress", "socket", len(hello), b"\x17\x03\x03\x00\x10" + b"\xaa" * 16),
        rec.DataChunk(100, 100, -1, 1_400, "ingress", "openssl", 0, RESP, tls_ref=0xbeef),
    ]
    out = []
    p = Pipeline(Config(), out.append, {100: CURL}.get, own_pid=1, own_port=10001)
    p.on_records(records)
    p.on_tick(10_000_000_000)  # long past the grace
    p.on_records([rec.SocketClose(100, 9, 10_000_000_100)])
    opened = [e for e in out if e.type == "connection.opened"]
    closed = [e for e in out if e.type == "connection.closed"]
    assert len(opened) == len(closed) == 1 and opened[0].connection is closed[0].connection
    assert [e.type for e in out].count("request.http_transaction") == 1


def test_a_killed_process_read_again_keeps_the_executable_it_had():
    # Killed and not yet reaped, /proc/PID still answers but no longer names
    # the executable: the connection still says whose it was.
    answers = {100: CURL}
    out = []
    p = Pipeline(Config(), out.append, answers.get, own_pid=1, own_port=10001)
    records = client_tls_exchange()
    p.on_records(records[:3])
    answers[100] = ProcessInfo(pid=100, ppid=1, exe="", binary="", cmdline="", uid=0, user="root",
                               hostname="box", start_time_ns=1)
    p.on_records(records[3:])
    p.close_all()
    closed = [e for e in out if e.type == "connection.closed"]
    assert closed and closed[0].payload()["data"]["source"]["exe"] == "/usr/bin/curl"
    [t] = [e for e in out if e.type == "request.http_transaction"]
    assert t.payload()["data"]["summary"]["process_exe"] == "/usr/bin/curl"


@pytest.mark.parametrize("ns,ms", [(0, 0.0), (-5_000, 0.0), (499, 0.0), (500, 0.001), (7_000, 0.007),
                                   (4_500, 0.005), (41_250_400, 41.25), (1_999_999_999, 2000.0)])
def test_durations_are_milliseconds_to_the_microsecond_rounded_half_up(ns, ms):
    assert pipeline_mod._ms(ns) == ms


def keepalive_exchanges(n, pid=100, fd=5):
    """``n`` request/response pairs on one TLS connection."""
    out, sent, got = [rec.SocketConnect(pid, fd, 1_000, EP_S), rec.SocketAddress(pid, fd, EP_C, EP_S, 1_100)], 0, 0
    for i in range(n):
        out += [rec.DataChunk(pid, pid, fd, 2_000 + i * 10_000, "egress", "openssl", sent, REQ, tls_ref=0xabc),
                rec.DataChunk(pid, pid, fd, 7_000 + i * 10_000, "ingress", "openssl", got, RESP, tls_ref=0xabc)]
        sent, got = sent + len(REQ), got + len(RESP)
    return out


def test_a_batch_asks_the_enricher_about_a_process_once_and_the_next_batch_again():
    asked = []

    def process_info(pid):
        asked.append(pid)
        return {100: CURL}.get(pid)
    out = []
    p = Pipeline(Config(), out.append, process_info, own_pid=1, own_port=10001)
    p.on_records(keepalive_exchanges(5))
    assert types(out).count("request.http_transaction") == 5 and asked == [100]
    p.on_records(keepalive_exchanges(1, fd=6))
    assert asked == [100, 100]


def test_an_exec_in_the_middle_of_a_batch_names_the_new_program_in_the_transactions_after_it():
    current = {100: CURL}
    python = ProcessInfo(pid=100, ppid=1, exe="/usr/bin/python3", binary="python3", cmdline="python3", uid=0,
                         user="root", hostname="box", start_time_ns=1)
    out = []
    # The exec switches what /proc says as the pipeline reaches its record (it
    # tells the enricher to forget the pid then).
    # Rendered as emitted, as the publisher does (the connection object lives on).
    p = Pipeline(Config(), lambda e: out.append(e.envelope()), lambda pid: current.get(pid), own_pid=1,
                 own_port=10001, forget_process=lambda pid: current.update({100: python}))
    exchanges = keepalive_exchanges(2)
    p.on_records([*exchanges[:4], rec.ProcessExec(100, 9_000, "/usr/bin/python3", "python3"), *exchanges[4:]])
    exes = [e.inner["summary"]["process_exe"] for e in out if e.type == "request.http_transaction"]
    assert exes == ["/usr/bin/curl", "/usr/bin/python3"]


def test_a_forked_child_is_announced_with_its_first_connection_once():
    """A pre-forking server's worker or a multiprocessing child never execs:
    before, it had no process.started and showed only at its exit."""
    child = dataclasses.replace(CURL, pid=101, ppid=100)
    out: list = []
    p = at_start(Pipeline(Config(), out.append, {100: CURL, 101: child}.get, own_pid=1, own_port=10001), 100)
    p.on_records([
        rec.ProcessFork(100, 101, 500),
        rec.SocketConnect(101, 5, 600, EP_S), rec.SocketClose(101, 5, 700),  # refused: says nothing yet
        *client_tls_exchange(pid=101),
        *client_tls_exchange(pid=101, fd=6),
        rec.ProcessExit(101, 9_000_000, 0),
    ])
    said = [t for t in types(out) if t != "connection.updated"]
    assert said == ["process.started", "connection.opened", "request.http_transaction", "connection.closed",
                    "connection.opened", "request.http_transaction", "connection.closed", "process.stopped"]
    assert out[0].payload()["pid"] == 101 and out[0].payload()["ppid"] == 100
    assert out[0].ts_ns == out[1].ts_ns  # when it was first seen on the network
    # The pid used again by another fork: announced again.
    before = len(out)
    p.on_records([rec.ProcessFork(100, 101, 10_000_000), *client_tls_exchange(pid=101)])
    assert types(out)[before:before + 2] == ["process.started", "connection.opened"]
