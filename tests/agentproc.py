"""Start the real CLI (``python -m qtap_devtools``) as a subprocess for tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, headers: dict | None = None, timeout: float = 5):
    """(status, parsed JSON or text) — errors are answers too."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body, ctype = resp.status, resp.read(), resp.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        status, body, ctype = exc.code, exc.read(), exc.headers.get("content-type", "")
    return status, json.loads(body) if "json" in ctype else body.decode()


def threads_of(pid: int) -> str:
    """What each thread of ``pid`` is doing, for a failure's message: its
    name, state, scheduling policy and where in the kernel it waits."""
    lines = []
    with contextlib.suppress(OSError):
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            base = f"/proc/{pid}/task/{tid}"
            with contextlib.suppress(OSError):
                stat = open(f"{base}/stat").read()
                comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
                policy = {0: "normal", 3: "batch", 5: "idle"}.get(int(rest[38]), rest[38])
                stack: list[str] = []
                with contextlib.suppress(OSError):  # root only, and not for every process
                    stack = open(f"{base}/stack").read().split("\n")[:4]
                lines.append(f"{tid} {comm} state={rest[0]} {policy} wchan={open(f'{base}/wchan').read()} "
                             + " < ".join(ln.split()[-1] for ln in stack if ln))
    return "\n".join(lines) or f"process {pid} gone"


class AgentProcess:
    def __init__(self, args: list[str], port: int, log: Path, pass_fds: tuple[int, ...] = ()) -> None:
        self.args, self.port, self.log_path, self.pass_fds = args, port, log, pass_fds
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str = "/healthz", timeout: float = 120) -> "AgentProcess":
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qtap_devtools", *self.args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=self.pass_fds,
        )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError):
                status, _ = get(self.url + ready_path, timeout=2)
                if status == 200:
                    return self
            time.sleep(0.1)
        # Not left running: its probes would fire in every later test and benchmark.
        self.stop(signal.SIGKILL, timeout=10)
        raise TimeoutError(f"agent not ready at {ready_path} in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.log.close()


@contextlib.contextmanager
def agent(args: list[str], port: int, log: Path, ready_path: str = "/healthz", timeout: float = 120):
    proc = AgentProcess([*args, "--listen", f"127.0.0.1:{port}"], port, log).start(ready_path, timeout)
    try:
        yield proc
    finally:
        proc.stop()
