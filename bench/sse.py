"""One SSE client reading the agent's whole stream, as a user's ``curl -N`` would.

The reading and counting is ``sse_count.c`` (what it counts, and how a delay is
measured, is said there), built once per source into the temporary directory
and run as a child: it runs beside what the bench measures, and in Python it
cost ~4 µs an event, an eighth of the system-wide figure at rate10k.  This
module asks it for its counts over a pipe.
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import orjson

SOURCE = Path(__file__).with_name("sse_count.c")


def build() -> Path:
    """The client's binary, compiled if this source has not been yet."""
    src = SOURCE.read_bytes()
    binary = Path(tempfile.gettempdir()) / f"qtap-bench-sse-count-{hashlib.sha256(src).hexdigest()[:16]}"
    if not binary.exists():
        part = binary.with_name(f"{binary.name}.{os.getpid()}")
        done = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(part), str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"cannot compile {SOURCE}: {done.stderr.strip()[-500:]}")
        os.replace(part, binary)  # whole, even if another bench builds it at once
    return binary


class SseCounter:
    def __init__(self, port: int, path: str = "/devtools/api/events?snapshot=false", timeout: float = 10) -> None:
        self.proc = subprocess.Popen([str(build()), str(port), path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self.lock = threading.Lock()
        first = self._line(timeout)
        if first.get("connected") is not True:
            self.close()
            raise RuntimeError(f"SSE client: {first.get('error') or first}")

    def _line(self, timeout: float = 30) -> dict:
        out = self.proc.stdout
        if not select.select([out], [], [], timeout)[0]:
            raise RuntimeError(f"SSE client: no answer in {timeout:g} s")
        line = out.readline()
        if not line:
            err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.poll() is not None else ""
            raise RuntimeError(f"SSE client exited ({self.proc.poll()}): {err}")
        return orjson.loads(line)

    def _ask(self, command: bytes) -> dict:
        with self.lock:
            self.proc.stdin.write(command + b"\n")
            self.proc.stdin.flush()
            return self._line()

    def status(self) -> dict:
        return self._ask(b"s")

    # -- what a run needs

    @property
    def events(self) -> int:
        return self.status()["events"]

    @property
    def missed(self) -> int:
        """The sum of system.dropped's ``missed``."""
        return self.status()["missed"]

    @property
    def error(self) -> str | None:
        return self.status()["error"]

    def count(self, path: str, pid: int) -> int:
        return sum(n for p, q, n in self.status()["counts"] if p == path and q == pid)

    def tx_total(self, path: str) -> int:
        return sum(n for p, _, n in self.status()["counts"] if p == path)

    def delays(self, path: str) -> list[float]:
        return next((ms for p, ms in self._ask(b"d")["delays"] if p == path), [])

    def quiet_for(self, path: str, since: float) -> float:
        """Seconds since a transaction for ``path`` last arrived (or since ``since``)."""
        last = next((t for p, t in self.status()["last"] if p == path), since)
        return time.monotonic() - max(since, last)

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
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()  # its cue to exit
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()
