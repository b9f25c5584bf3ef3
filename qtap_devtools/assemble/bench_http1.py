"""Micro-benchmark of the HTTP/1 reassembler: ``python -m qtap_devtools.assemble.bench_http1``.

Prints exchanges/s for small keep-alive exchanges and MB/s for one large body,
each with h11 (if installed) measured in the same run as the baseline: h11 is
fed the same bytes on two connection objects (it parses, it does not pair).
"""

from __future__ import annotations

import argparse
import time

from .http1 import ConnectionAssembler

REQUEST = b"GET /api/items/42?q=x HTTP/1.1\r\nHost: example.test\r\nUser-Agent: bench/1.0\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\nServer: bench\r\n\r\n" + b"x" * 100
)
CHUNK = 16 * 1024  # a typical SSL_read size


def small_exchanges(n: int) -> float:
    asm = ConnectionAssembler(role="client")
    got = 0
    start = time.perf_counter()
    ts = 0
    for _ in range(n):
        ts += 2
        asm.on_data("egress", REQUEST, ts)
        got += len(asm.on_data("ingress", RESPONSE, ts + 1))
    elapsed = time.perf_counter() - start
    assert got == n
    return n / elapsed


def large_body(size: int, max_body: int, count: int = 1) -> float:
    """MB/s for ``count`` keep-alive responses of ``size`` bytes each, read in 16 KiB reads."""
    asm = ConnectionAssembler(role="client", max_body_bytes=max_body)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    block = b"b" * CHUNK
    ts = 0
    got = 0
    start = time.perf_counter()
    for _ in range(count):
        ts += 1
        asm.on_data("egress", REQUEST, ts)
        asm.on_data("ingress", head, ts)
        left = size
        while left:
            take = min(left, CHUNK)
            ts += 1
            got += len(asm.on_data("ingress", block[:take], ts))
            left -= take
    elapsed = time.perf_counter() - start
    assert got == count
    return size * count / elapsed / 1e6


def h11_small(n: int) -> float | None:
    try:
        import h11
    except ImportError:
        return None
    server = h11.Connection(h11.SERVER)
    client = h11.Connection(h11.CLIENT)
    start = time.perf_counter()
    for _ in range(n):
        server.receive_data(REQUEST)
        while not isinstance(server.next_event(), (h11.NEED_DATA, h11.EndOfMessage)):
            pass
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        client.receive_data(RESPONSE)
        while not isinstance(client.next_event(), (h11.NEED_DATA, h11.EndOfMessage)):
            pass
        client.start_next_cycle()
        server.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
        server.send(h11.EndOfMessage())
        server.start_next_cycle()
    return n / (time.perf_counter() - start)


def h11_large(size: int) -> float | None:
    try:
        import h11
    except ImportError:
        return None
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    block = b"b" * CHUNK
    start = time.perf_counter()
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    left = size
    while left:
        take = min(left, CHUNK)
        client.receive_data(block[:take])
        left -= take
        while not isinstance(client.next_event(), (h11.NEED_DATA, h11.EndOfMessage)):
            pass
    return size / (time.perf_counter() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  python -m qtap_devtools.assemble.bench_http1 --exchanges 50000")
    parser.add_argument("--exchanges", type=int, default=20000)
    parser.add_argument("--body-mib", type=int, default=64)
    args = parser.parse_args()
    size = args.body_mib << 20

    ours = small_exchanges(args.exchanges)
    base = h11_small(args.exchanges)
    print(f"small keep-alive exchanges: {ours:,.0f} exchanges/s", end="")
    print(f"  (h11 parse only: {base:,.0f}/s, ratio {ours / base:.2f}x)" if base else "")

    kept = large_body(1 << 20, max_body=1 << 20, count=args.body_mib)
    skipped = large_body(size, max_body=1 << 20)
    base_mb = h11_large(size)
    print(f"1 MiB bodies (kept, default limit) in {CHUNK // 1024} KiB reads: {kept:,.0f} MB/s", end="")
    print(f"  (h11, which keeps nothing: {base_mb:,.0f} MB/s, ratio {kept / base_mb:.2f}x)" if base_mb else "")
    print(f"one {args.body_mib} MiB body past the 1 MiB limit (followed, not kept): {skipped:,.0f} MB/s")


if __name__ == "__main__":
    main()
