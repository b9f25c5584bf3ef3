"""The bench's SSE client (bench/sse_count.c, driven by bench/sse.py) reads frames however the bytes are cut."""

from __future__ import annotations

import socket
import threading
import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from bench.sse import SseCounter


def _tx_frame(path: str, pid: int | None, ts: str, payload: bytes) -> bytes:
    import pybase64

    inner = {"connectionId": "c", "type": "http_transaction", "data": pybase64.b64encode_as_string(payload),
             "contentType": "application/json",
             "summary": {"request_path": path, "request_url": f"https://h{path}", "process_pid": pid}}
    return b"event: request.http_transaction\ndata: " + orjson.dumps({"data": {"data": inner}, "ts": ts}) + b"\n\n"


def _chunked(body: bytes, size: int) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += b"%x;ext=1\r\n" % len(part) + part + b"\r\n"
    return out + b"0\r\n\r\n"


def _serve(wire: bytes, cuts: list[int]) -> tuple[socket.socket, threading.Thread]:
    """A one-shot server sending ``wire`` in pieces of the sizes in ``cuts``
    (the last repeated), each its own send, so reads end anywhere."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.recv(65536)
            at, i = 0, 0
            while at < len(wire):
                size = cuts[min(i, len(cuts) - 1)]
                conn.sendall(wire[at:at + size])
                at, i = at + size, i + 1
                if size < 64:
                    time.sleep(0.0002)  # lets a tiny piece arrive alone (shapes delivery; nothing is timed)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    return listener, server


def _finished(client: SseCounter) -> dict:
    deadline = time.monotonic() + 30
    while not (status := client.status())["done"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return status


def _now_ts(offset_ms: int = 0) -> str:
    now = datetime.now(timezone.utc) - timedelta(milliseconds=offset_ms)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("cuts", [[65_000], [1] * 3000 + [65_000], [13, 4096]], ids=["large", "bytewise-start", "odd"])
def test_the_client_counts_every_frame_big_or_small(chunked, cuts):
    frames = [_tx_frame("/big", 7, "2026-12-01T00:00:00.250Z", b"x" * 2_000_000),
              b"event: system.dropped\ndata: " + orjson.dumps({"data": {"missed": 3, "total_missed": 40}}) + b"\n\n",
              b": ping\n\n"]
    frames += [_tx_frame("/small", 8, _now_ts(250), b"y" * 100) for _ in range(50)]
    frames += [_tx_frame('/q"uote', 9, "2026-12-01T00:00:00.002Z", b"z")]  # escaped in the JSON
    frames += [_tx_frame("/null-pid", None, "2026-12-01T00:00:00Z", b"z"),  # no fraction: whole seconds
               _tx_frame("/null-pid", None, "2026-11-30T23:59:59.5Z", b"z")]
    stream = b"".join(frames)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"\r\n"
    listener, server = _serve(head + (_chunked(stream, 70_000) if chunked else stream), cuts)
    with listener:
        sent_after = time.time()
        client = SseCounter(listener.getsockname()[1])
        try:
            server.join(30)
            if not chunked:  # a plain body ends when the server closes
                assert _finished(client)["done"]
            status = _finished(client)
            read_before = time.time()
            small = client.delays("/small")
            assert status["error"] is None
            assert status["events"] == 56 and status["missed"] == 3
            assert client.count('/q"uote', 9) == 1 and client.count("/null-pid", 0) == 2
            assert client.count("/big", 7) == 1 and client.count("/small", 8) == 50
            assert client.tx_total("/small") == 50 and client.count("/small", 7) == 0
            # each 250 ms old when sent (ts truncated to the millisecond: up to 1 ms more)
            assert len(small) == 50 and all(250 <= d < 60_000 for d in small)
            # the arrival is a moment between the server's start and end
            dec1 = datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp()
            for path, ts in [("/big", dec1 + 0.25), ("/null-pid", dec1), ("/null-pid", dec1 - 0.5)]:
                assert any((sent_after - ts) * 1000 <= d <= (read_before - ts) * 1000 for d in client.delays(path)), path
            assert client.quiet_for("/small", time.monotonic() - 3600) < 3600
        finally:
            client.close()


def test_a_frame_it_cannot_read_is_the_error_and_the_counts_so_far_stay():
    good = _tx_frame("/ok", 5, "2026-12-01T00:00:00.000Z", b"a")
    bad = b"event: request.http_transaction\ndata: {\"data\":{}}\n\n"
    listener, server = _serve(b"HTTP/1.1 200 OK\r\n\r\n" + good + bad + good, [65_000])
    with listener:
        client = SseCounter(listener.getsockname()[1])
        try:
            status = _finished(client)
            assert status["error"].startswith("a transaction frame without request_path, process_pid or ts")
            assert client.count("/ok", 5) == 1
        finally:
            client.close()


def test_a_refused_stream_or_no_server_is_an_error_at_once():
    listener, _ = _serve(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n", [65_000])
    with listener, pytest.raises(RuntimeError, match="SSE request refused: HTTP/1.1 403 Forbidden"):
        SseCounter(listener.getsockname()[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(RuntimeError, match="cannot reach 127.0.0.1"):
            SseCounter(port)
