"""``python -m bench.chain``: what the agent's own code costs per transaction, without the kernel.

Synthetic W1-shaped records go through everything a live agent runs for each
transaction: the pipeline and HTTP/1 reassembly, enrichment from /proc, the
event model and its SSE frame, the publisher, the REST store, the history and
one SSE subscriber.  Both ends of four keep-alive connections are "traced":
this process is the client, a sleeping child the server, so each request is two
transactions, as in ``make bench``.

The CPU time moves with the machine's hour (a shared VM: the same build
measured 43-61 µs a transaction within one hour).  Instructions do not:
``--instructions`` runs the chain under callgrind twice, once processing more
requests than the other out of the same prepared records, and prints the
difference per transaction.  Compare two builds with it in any hour.

    .venv/bin/python -m bench.chain                    # CPU µs per transaction
    .venv/bin/python -m bench.chain --instructions     # instructions per transaction (needs valgrind)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import time

from qtap_devtools.agent import GC_THRESHOLDS, Agent
from qtap_devtools.capture import records as rec
from qtap_devtools.config import Config
from qtap_devtools.filters import EventFilter

REQUEST = b"GET /w1 HTTP/1.1\r\nHost: 127.0.0.1:44321\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 20:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n"
            + b"x" * 100)
CONNECTIONS = 4
BATCH = 2000  # records per hand-off, about what the ring reader passes at this rate


def records(requests: int, client: int, server: int) -> list[rec.DataChunk]:
    """Four records a request: the client's write and read, the server's read and write."""
    out, offsets, ts = [], [[0, 0] for _ in range(CONNECTIONS)], time.monotonic_ns()
    for i in range(requests):
        c = i % CONNECTIONS
        sent, got = offsets[c]
        ts += 100_000  # 10,000 requests a second, as rate10k: times fall in many milliseconds
        out += [rec.DataChunk(client, client, 10 + c, ts, "egress", "openssl", sent, REQUEST, tls_ref=0x1000 + c),
                rec.DataChunk(server, server, 20 + c, ts + 10, "ingress", "openssl", sent, REQUEST, tls_ref=0x2000 + c),
                rec.DataChunk(server, server, 20 + c, ts + 20, "egress", "openssl", got, RESPONSE, tls_ref=0x2000 + c),
                rec.DataChunk(client, client, 10 + c, ts + 30, "ingress", "openssl", got, RESPONSE, tls_ref=0x1000 + c)]
        offsets[c] = [sent + len(REQUEST), got + len(RESPONSE)]
    return out


async def run(requests: int, prepared: int) -> dict:
    agent = Agent(Config())
    pipeline = agent.pipeline
    server = subprocess.Popen(["sleep", "3600"])
    try:
        batch = records(max(requests, prepared), os.getpid(), server.pid)[:4 * requests]
        pipeline.own_pid = -1  # this process is a traced client here
        publisher = asyncio.create_task(agent.publisher.run())
        subscriber = agent.broadcaster.subscribe(EventFilter(), [])
        received = 0

        async def read() -> None:
            nonlocal received
            while (frames := await subscriber.next_batch()) is not None:
                received += frames.count(b"event: request.http_transaction\n")

        reader = asyncio.create_task(read())
        gc.collect()
        gc.freeze()  # as the agent does once started
        gc.set_threshold(*GC_THRESHOLDS)
        start = time.process_time()
        for at in range(0, len(batch), BATCH):
            pipeline.on_records(batch[at:at + BATCH])
            # The loop's turn after each batch, as the agent's backlog gives it
            # after each slice: the subscriber takes what was published.
            await asyncio.sleep(0)
            while len(agent.publisher):
                await asyncio.sleep(0)
        tx = pipeline.counters["transactions"]
        deadline = time.monotonic() + 60  # the subscriber's last paced batches (slow under valgrind)
        while received < tx and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        cpu = time.process_time() - start
        publisher.cancel()
        reader.cancel()
        return {"requests": requests, "transactions": tx, "received": received,
                "cpu_us_per_transaction": round(cpu * 1e6 / max(1, tx), 2)}
    finally:
        server.kill()
        server.wait()


def instructions(small: int, large: int) -> float:
    """Instructions per transaction: (Ir(large) - Ir(small)) / 2(large - small), both runs
    preparing ``large`` requests' records so that only processing differs."""
    if shutil.which("valgrind") is None:
        sys.exit("bench.chain: --instructions needs valgrind (apt-get install valgrind)")
    counts = []
    for n in (small, large):
        print(f"bench.chain: {n:,} requests under callgrind (about {n // 50 + 20} s)...", file=sys.stderr, flush=True)
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m", "bench.chain",
             "--requests", str(n), "--prepare", str(large)],
            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode or found is None:
            sys.exit(f"bench.chain: callgrind run failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) / (2 * (large - small))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chain", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000, help="requests to process (default 50,000)")
    parser.add_argument("--prepare", type=int, default=0, help=argparse.SUPPRESS)  # --instructions' runs
    parser.add_argument("--instructions", action="store_true",
                        help="instructions per transaction under callgrind (1,000 and 5,000 requests)")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.instructions:
        print(f"instructions per transaction: {instructions(1000, 5000):,.0f}")
        return
    result = asyncio.run(run(args.requests, args.prepare))
    if result["received"] < result["transactions"]:
        sys.exit(f"bench.chain: the subscriber got {result['received']:,} of {result['transactions']:,} transactions")
    print(f"{result['transactions']:,} transactions: {result['cpu_us_per_transaction']} µs of CPU each")


if __name__ == "__main__":
    main()
