"""One SSE client reading the agent's whole stream, as a user's ``curl -N`` would.

It counts ``request.http_transaction`` events per (request path, process id) —
the wrk process is the client side, the nginx worker the server side — and,
for each one, how long after the transaction ended it reached this client:

    delay = arrival (CLOCK_REALTIME when the bytes were read off the socket)
            − the event's ``ts``

``ts`` is the agent's wall-clock mapping of the kernel timestamp of the
transaction's last byte (the pipeline stamps an exchange with its end), so the
delay covers the ring buffer, parsing, reassembly, enrichment, the broadcaster
and the socket: everything between the traced process finishing the exchange
and a user seeing it.  Both clocks are this machine's; ``ts`` has millisecond
resolution (truncated), so a delay is exact to within +1 ms.

Raw socket rather than ``http.client``: at 20k events/s a line-by-line reader in
Python would be the bottleneck we measure.
"""

from __future__ import annotations

import socket
import threading
import time
from array import array
from collections import Counter
from datetime import datetime, timezone

import orjson

TX_HEAD = b"event: request.http_transaction\ndata: "
DROPPED_HEAD = b"event: system.dropped\ndata: "
PATH_KEY = b'"request_path":"'
PATH_END = b'","request_url":"'
PID_KEY = b'"process_pid":'
TS_KEY = b',"ts":"'


class SseCounter:
    def __init__(self, port: int, path: str = "/devtools/api/events?snapshot=false") -> None:
        self.lock = threading.Lock()
        self.counts: Counter[tuple[str, int]] = Counter()
        self.delays_ms: dict[str, array] = {}
        self.missed = 0  # sum of system.dropped ``missed``
        self.events = 0
        self.last_tx: dict[str, float] = {}  # request path -> monotonic time of its last transaction
        self.error: str | None = None
        self._secs: dict[str, int] = {}
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        self.sock.settimeout(None)
        self.thread = threading.Thread(target=self._run, name="sse-counter", daemon=True)
        self.thread.start()

    # -- reading

    def _run(self) -> None:
        try:
            self._read()
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def _read(self) -> None:
        """Frames off the socket, each byte copied a bounded number of times:
        a W2 frame is ~2 MB, and a buffer grown by ``bytes +=`` or split from
        the start on every recv made this client the machine's third-busiest
        process."""
        sock, raw = self.sock, bytearray()
        while (i := raw.find(b"\r\n\r\n")) < 0:
            data = sock.recv(65536)
            if not data:
                return
            raw += data
        head = bytes(raw[:i])
        status = head.split(b"\r\n", 1)[0]
        if b" 200 " not in status + b" ":
            raise RuntimeError(f"SSE request refused: {status.decode(errors='replace')}")
        dechunk = _Dechunker() if b"transfer-encoding: chunked" in head.lower() else None
        rest = bytes(raw[i + 4:])
        pending, scan = bytearray(), 0
        while True:
            data = rest or sock.recv(262144)
            rest = b""
            if not data:
                return
            now_ns = time.time_ns()
            pending += dechunk.feed(data) if dechunk else data
            end = pending.rfind(b"\n\n", scan)
            if end < 0:
                scan = max(0, len(pending) - 1)
                continue
            whole = bytes(pending[:end])
            del pending[:end + 2]
            scan = 0
            self._take(whole, now_ns)
            if dechunk is not None and dechunk.done:
                return

    def _take(self, buf: bytes, now_ns: int) -> None:
        """Count the whole frames in ``buf``.

        A transaction's data line is ~2.5 KB, most of it the base64 transaction,
        and this client must cost little next to the agent it measures (parsing
        each event's JSON cost ~12 µs a request at rate10k, this ~9): so it reads only the
        summary's path and pid and the envelope's ``ts``, found back from the
        frame's end (``ts`` is the envelope's last field, the summary the inner
        object's).  A frame not laid out so raises, and the run reports it."""
        with self.lock:
            now = time.monotonic()
            for frame in buf.split(b"\n\n"):
                if not frame:
                    continue
                self.events += 1
                if frame.startswith(TX_HEAD):
                    ts_at = frame.rfind(TS_KEY)
                    path_at = frame.rfind(PATH_KEY, 0, ts_at)
                    pid_at = frame.find(PID_KEY, path_at, ts_at)
                    if ts_at < 0 or path_at < 0 or pid_at < 0:
                        raise ValueError(f"a transaction frame without request_path, process_pid or ts: {frame[:200]!r}")
                    start = path_at + len(PATH_KEY)
                    raw = frame[start:frame.index(PATH_END, start)]  # a quote in the path is escaped
                    path = (orjson.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode())
                    start = pid_at + len(PID_KEY)
                    pid_text = frame[start:start + 12].split(b",", 1)[0].split(b"}", 1)[0]
                    self.counts[(path, int(pid_text) if pid_text.isdigit() else 0)] += 1
                    self.last_tx[path] = now
                    start = ts_at + len(TS_KEY)
                    ts = frame[start:frame.index(b'"', start)].decode()
                    self.delays_ms.setdefault(path, array("d")).append((now_ns - self._ts_ns(ts)) / 1e6)
                elif frame.startswith(DROPPED_HEAD):
                    body = orjson.loads(frame[len(DROPPED_HEAD):].split(b"\n", 1)[0])
                    self.missed += int(body["data"].get("missed", 0))

    def _ts_ns(self, ts: str) -> int:
        # "2026-11-23T00:06:04.965Z": parse the seconds once, add the milliseconds.
        head = ts[:19]
        secs = self._secs.get(head)
        if secs is None:
            if len(self._secs) > 4096:
                self._secs.clear()
            secs = int(datetime.fromisoformat(head).replace(tzinfo=timezone.utc).timestamp())
            self._secs[head] = secs
        frac = ts[20:-1] if len(ts) > 20 else ""
        return secs * 1_000_000_000 + int((frac + "000000000")[:9])

    # -- what a run needs

    def count(self, path: str, pid: int) -> int:
        with self.lock:
            return self.counts[(path, pid)]

    def tx_total(self, path: str) -> int:
        with self.lock:
            return sum(n for (p, _), n in self.counts.items() if p == path)

    def delays(self, path: str) -> list[float]:
        with self.lock:
            return list(self.delays_ms.get(path, ()))

    def quiet_for(self, path: str, since: float) -> float:
        """Seconds since a transaction for ``path`` last arrived (or since ``since``)."""
        with self.lock:
            return time.monotonic() - max(since, self.last_tx.get(path, since))

    def wait_quiet(self, path: str, quiet: float, timeout: float) -> bool:
        """Wait until no transaction for ``path`` has come for ``quiet`` seconds
        (the agent has caught up); False if ``timeout`` passed first."""
        start = time.monotonic()
        while self.quiet_for(path, start) < quiet:
            if time.monotonic() - start > timeout:
                return False
            time.sleep(0.1)
        return True

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(2)


class _Dechunker:
    """HTTP/1.1 chunked transfer coding, undone incrementally."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.need = 0  # > 0: chunk bytes still to come; < 0: CRLF bytes after a chunk to skip
        self.done = False

    def feed(self, data: bytes) -> bytes:
        raw, out, pos = self.raw, [], 0
        raw += data
        while not self.done:
            if self.need > 0:
                take = min(self.need, len(raw) - pos)
                if take <= 0:
                    break
                out.append(raw[pos:pos + take])
                pos += take
                self.need -= take
                if self.need:
                    break
                self.need = -2
            if self.need < 0:
                skip = min(-self.need, len(raw) - pos)
                pos += skip
                self.need += skip
                if self.need:
                    break
            nl = raw.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(bytes(raw[pos:nl]).split(b";")[0], 16)
            pos = nl + 2
            if size == 0:
                self.done = True
            self.need = size
        del raw[:pos]
        return b"".join(out)
