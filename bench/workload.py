"""The traced programs: nginx (1 worker, TLS, keep-alive) and wrk, plus the CPU clock.

Three workloads, each on its own path so the agent's events say which run they
belong to:

* ``w1``: 100-byte bodies, ``wrk -t1 -c4``, saturating;
* ``w2``: 1 MiB bodies, ``wrk -t1 -c4``, saturating;
* ``rate10k``: 100-byte bodies, ``wrk -t1 -c30`` with a 2 ms ``delay()`` before
  each request: about 11k req/s offered, well under saturation, so CPU per
  request and latency compare like with like.

wrk reports through a Lua ``done()`` that prints one JSON line (requests,
bytes, errors, latency percentiles in µs); its latency clock starts when the
request is written, after the delay.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from tests.realworld import HOST, Cert, children, free_port, wait_port

SMALL_BODY = ("qtap-devtools bench " * 5)[:99] + "\n"  # 100 bytes
LARGE_SIZE = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Workload:
    name: str
    path: str
    connections: int
    delay_ms: int = 0  # per-request delay (wrk Lua delay()); 0 = back to back

    @property
    def saturating(self) -> bool:
        return self.delay_ms == 0


W1 = Workload("w1", "/w1", 4)
W2 = Workload("w2", "/w2", 4)
RATE10K = Workload("rate10k", "/rate", 30, delay_ms=2)
WORKLOADS = {w.name: w for w in (W1, W2, RATE10K)}

_DONE_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    bytes: int
    errors: int
    p50_us: int
    p99_us: int
    pid: int

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.duration_s if self.duration_s else 0.0


class BenchNginx:
    """nginx with one worker: ``/w1`` and ``/rate`` answer 100 bytes, ``/w2`` 1 MiB.

    Keep-alive never ends a connection during a run (no TLS handshakes in the
    measurement).  The access log (buffered, so it costs every setup the same
    little) records ``$request_completion`` per request: the server-side count
    of transactions the agent should report.
    """

    def __init__(self, directory: Path, cert: Cert) -> None:
        self.dir = directory
        self.cert = cert
        self.port = free_port()
        self.log = directory / "logs" / "access.log"

    def url(self, path: str) -> str:
        return f"https://{HOST}:{self.port}{path}"

    def __enter__(self) -> "BenchNginx":
        for sub in ("html", "tmp", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "html" / "w2.bin").write_bytes(bytes(i % 251 for i in range(LARGE_SIZE)))
        t = self.dir / "tmp"
        conf = textwrap.dedent(f"""\
            user root;
            worker_processes 1;
            daemon off;
            master_process on;
            pid {self.dir}/nginx.pid;
            error_log {self.dir}/logs/error.log warn;
            events {{ worker_connections 1024; }}
            http {{
              log_format bench '$request_uri $request_completion';
              access_log {self.log} bench buffer=256k flush=1s;
              client_body_temp_path {t}/body; proxy_temp_path {t}/proxy;
              fastcgi_temp_path {t}/fastcgi; uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;
              keepalive_timeout 300; keepalive_requests 100000000;
              default_type application/octet-stream;
              server {{
                listen {HOST}:{self.port} ssl;
                server_name localhost;
                ssl_certificate {self.cert.cert}; ssl_certificate_key {self.cert.key};
                root {self.dir}/html;
                location = /w1 {{ default_type text/plain; return 200 "{SMALL_BODY.strip()}\\n"; }}
                location = /rate {{ default_type text/plain; return 200 "{SMALL_BODY.strip()}\\n"; }}
                location = /w2 {{ try_files /w2.bin =404; }}
              }}
            }}
            """)
        (self.dir / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", str(self.dir / "logs/error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, proc=self.proc)
        return self

    @property
    def worker_pid(self) -> int:
        deadline = time.monotonic() + 5
        while not (kids := children(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not kids:
            raise RuntimeError("nginx started no worker")
        return kids[0]

    def log_offset(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def completed_since(self, offset: int, path: str) -> int:
        """Requests to ``path`` nginx completed since ``offset`` in its access log."""
        self.proc.send_signal(signal.SIGUSR1)  # reopen logs: flushes the buffer
        time.sleep(0.3)
        want = f"{path} OK".encode()
        with open(self.log, "rb") as f:
            f.seek(offset)
            return sum(1 for line in f if line.rstrip() == want)

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def paced(w: Workload, delay_ms: int) -> Workload:
    """``w`` slowed to a trickle (``--quick``: a few hundred requests per run)."""
    return Workload(w.name, w.path, w.connections, delay_ms=delay_ms)


def write_scripts(directory: Path, workloads: list[Workload]) -> dict[str, Path]:
    """One Lua script per workload: the JSON ``done()``, plus ``delay()`` when paced."""
    out = {}
    for w in workloads:
        script = _DONE_LUA
        if w.delay_ms:
            script = f"delay = function() return {w.delay_ms} end\n" + script
        path = directory / f"{w.name}.lua"
        path.write_text(script)
        out[w.name] = path
    return out


class Wrk:
    """One wrk run; ``pid`` is known while it runs (the agent's events name it)."""

    def __init__(self, nginx: BenchNginx, workload: Workload, script: Path, seconds: float) -> None:
        self.cmd = ["wrk", "-t1", f"-c{workload.connections}", f"-d{max(1, round(seconds))}s",
                    "-s", str(script), nginx.url(workload.path)]
        self.proc: subprocess.Popen | None = None

    def start(self) -> int:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self.proc.pid

    def wait(self) -> WrkResult:
        assert self.proc is not None
        try:
            out, err = self.proc.communicate(timeout=300)
        except BaseException:  # the bench stopped (Ctrl-C, SIGTERM) or wrk hung: no wrk left behind
            self.proc.kill()
            self.proc.wait()
            raise
        line = next((ln for ln in out.splitlines() if ln.startswith("BENCH ")), None)
        if self.proc.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({self.proc.returncode}): {err.strip() or out.strip()}")
        d = json.loads(line[6:])
        lat = d["latency_us"]
        return WrkResult(
            requests=d["requests"], duration_s=d["duration_us"] / 1e6, bytes=d["bytes"],
            errors=sum(d["errors"].values()), p50_us=lat["p50"], p99_us=lat["p99"], pid=self.proc.pid,
        )


def busy_jiffies() -> int:
    """System-wide busy time (all CPUs) from /proc/stat: everything but idle and iowait."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def jiffies_to_us(j: int) -> float:
    return j * 1e6 / CLK_TCK
