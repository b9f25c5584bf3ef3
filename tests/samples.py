"""Typed sample events shaped like seed 003's examples, and a capture file of them.

Built with the real event model, so the fixture and the product cannot drift.
"""

from __future__ import annotations

from pathlib import Path

from qtap_devtools.enrich.model import ContainerInfo, ProcessInfo
from qtap_devtools.events import (
    Address,
    Connection,
    ConnectionClosed,
    ConnectionOpened,
    ConnectionUpdated,
    HttpMessage,
    HttpTransaction,
    ProcessStarted,
    ProcessStopped,
    parse_rfc3339,
)

TS = parse_rfc3339("2025-12-12T16:58:10.452Z")
CREATED = parse_rfc3339("2025-12-12T16:42:58.300Z")

CONTAINER = ContainerInfo(
    id="1781322a598f" + "0" * 52,
    runtime="docker",
    name="my-app",
    image="python:3.11-slim",
    labels={"app": "frontend", "env": "production"},
    hostname="my-container",
)

PYTHON = ProcessInfo(
    pid=60895,
    ppid=1,
    exe="/usr/local/bin/python3.11",
    binary="python3.11",
    cmdline="python3.11 app.py",
    uid=0,
    user="root",
    hostname="my-container",
    start_time_ns=CREATED,
    container_id=CONTAINER.id,
    container=CONTAINER,
)


def connection(cid: str = "d4u4dho7p3qk26l914bg", host: str = "api.stripe.com") -> Connection:
    return Connection(
        connection_id=cid,
        pid=PYTHON.pid,
        fd=7,
        opened_ns=TS + 1000 * 1_000_000,
        direction="egress-external",
        local=Address("172.18.0.7", 34438),
        remote=Address("52.4.128.73", 443),
        process=PYTHON,
        sni=host,
        l7_protocol="http1",
        tls_version="TLS 1.3",
        tls_libraries=["openssl"],
        tls_introspected=True,
        is_tls=True,
    )


def transaction(
    conn: Connection,
    request_id: str,
    method: str = "POST",
    path: str = "/v1/users",
    status: int = 200,
    host: str = "api.example.com",
    request_body: bytes = b'{"user": "john"}',
    response_body: bytes = b'{"id": 123}',
    ts_offset_ms: int = 36064,
) -> HttpTransaction:
    return HttpTransaction(
        request_id=request_id,
        connection=conn,
        method=method,
        scheme="https",
        authority=host,
        path=path,
        http_version="HTTP/1.1",
        request=HttpMessage(
            headers={"Authorization": "Bearer token123", "Content-Type": "application/json",
                     "User-Agent": "python-requests/2.31.0"},
            body=request_body,
            body_size=len(request_body),
            content_type="application/json",
        ),
        status=status,
        reason={200: "OK", 404: "Not Found", 500: "Internal Server Error"}.get(status, ""),
        response=HttpMessage(
            headers={"Content-Type": "application/json"},
            body=response_body,
            body_size=len(response_body),
            content_type="application/json",
        ),
        start_ns=TS + (ts_offset_ms - 81) * 1_000_000,
        duration_ms=81,
        bytes_sent=517,
        bytes_received=324,
        ts_ns=TS + ts_offset_ms * 1_000_000,
    )


def session_events():
    """A small, plausible session: a process, its connections, 3 transactions."""
    stripe = connection()
    example = connection("d4u4jhg7p3qk26l91icg", "api.example.com")
    return [
        ProcessStarted(PYTHON, ts_ns=TS),
        ConnectionOpened(stripe, ts_ns=TS + 500_000_000),
        ConnectionUpdated(stripe, ts_ns=TS + 600_000_000),
        ConnectionOpened(example, ts_ns=TS + 700_000_000),
        transaction(example, "d4u4jhg7p3qk26l91id0"),
        transaction(example, "d4u4jhg7p3qk26l91id1", method="GET", path="/v1/missing", status=404,
                    request_body=b"", response_body=b'{"error": "not found"}', ts_offset_ms=37000),
        transaction(example, "d4u4jhg7p3qk26l91id2", method="GET", path="/v1/crash", status=500,
                    request_body=b"", response_body=b"oops", ts_offset_ms=38000),
        ConnectionClosed(stripe, ts_ns=TS + 39_000_000_000),
        ProcessStopped(PYTHON, exit_code=0, ts_ns=TS + 40_000_000_000),
    ]


def write_capture(path: Path, events=None) -> Path:
    with open(path, "wb") as fh:
        for event in events or session_events():
            fh.write(event.envelope().frame)
    return path
