"""The bench's SSE client (bench/sse.py) reads frames however the bytes are cut."""

from __future__ import annotations

import socket
import threading
import time

import orjson
import pytest

from bench.sse import SseCounter, _Dechunker


def _tx_frame(path: str, pid: int, ts: str, payload: bytes) -> bytes:
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


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_dechunking_is_the_same_whatever_the_pieces(piece):
    body = bytes(range(256)) * 1000
    wire = _chunked(body, 3000)
    d, out = _Dechunker(), b""
    for i in range(0, len(wire), piece):
        out += d.feed(wire[i:i + piece])
    assert out == body and d.done


@pytest.mark.parametrize("chunked", [True, False])
def test_the_client_counts_every_frame_big_or_small(chunked):
    frames = [_tx_frame("/big", 7, "2026-12-01T00:00:00.000Z", b"x" * 2_000_000),
              b"event: system.dropped\ndata: " + orjson.dumps({"data": {"missed": 3}}) + b"\n\n"]
    frames += [_tx_frame("/small", 8, "2026-12-01T00:00:00.001Z", b"y" * 100) for _ in range(50)]
    frames += [_tx_frame('/q"uote', 9, "2026-12-01T00:00:00.002Z", b"z")]  # escaped in the JSON
    stream = b"".join(frames)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                body = _chunked(stream, 70_000) if chunked else stream
                head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"\r\n"
                wire = head + body
                for i in range(0, len(wire), 65_000):  # cut anywhere: inside heads, sizes, frames
                    conn.sendall(wire[i:i + 65_000])

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        client = SseCounter(listener.getsockname()[1])
        server.join(10)
        client.thread.join(10)
        client.close()
    assert client.error is None
    assert client.events == 53 and client.missed == 3
    assert client.count('/q"uote', 9) == 1
    assert client.count("/big", 7) == 1 and client.count("/small", 8) == 50
    assert len(client.delays("/small")) == 50
