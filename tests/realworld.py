"""Real servers for tests, each a context manager that waits until its port
accepts connections and cleans up after itself.  Loopback only.

    with tls_cert(tmp) as cert, Nginx(tmp, cert) as web:
        subprocess.run(["curl", "-sk", web.url("/small")])
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
SMALL_BODY = "hello from nginx\n"
LARGE_SIZE = 2 * 1024 * 1024


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port: int, host: str = HOST, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing accepts on {host}:{port} after {timeout}s")


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def make_cert(directory: Path, names: tuple[str, ...] = ("localhost", "sni.example.test")) -> Cert:
    """A self-signed certificate for ``names`` and 127.0.0.1, made with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    san = ",".join([f"DNS:{n}" for n in names] + ["IP:127.0.0.1", "IP:::1"])
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={names[0]}", "-addext", f"subjectAltName={san}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return Cert(cert, key)


class _Server:
    scheme = "http"
    proc: subprocess.Popen
    port: int

    def url(self, path: str = "/", host: str = HOST) -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc)


class Nginx(_Server):
    """nginx, 1 worker (or ``workers``), TLS (or plain with ``tls=False``), keep-alive.

    Locations: ``/small`` fixed body, ``/json`` JSON echoing method/uri/args,
    ``/gzip`` a gzip-compressed text file, ``/large`` a 2 MiB file,
    ``/missing`` 404, ``/error`` 500, ``/peer`` JSON with the client's
    address and port as nginx saw them (``{"addr", "port", "method", "args"}``).
    ``ipv6=True`` also listens on ``[::1]`` at the same port.  ``proxy_to``: ``/devtools/``
    is a reverse proxy to that loopback port (a TLS front for the agent's page).
    """

    def __init__(self, directory: Path, cert: Cert | None, port: int | None = None, ipv6: bool = False,
                 sendfile: bool = False, http2: bool = False, workers: int = 1, proxy_to: int | None = None) -> None:
        self.proxy_to = proxy_to
        self.dir = directory / "nginx"
        self.workers = workers  # forked from one master: their SSL objects share addresses
        self.http2 = http2  # offered in ALPN (TLS only)
        self.sendfile = sendfile  # Debian's own nginx.conf has it on: files go out with sendfile(2)
        self.cert = cert
        self.port = port or free_port()
        self.scheme = "https" if cert else "http"
        self.ipv6 = ipv6

    def __enter__(self) -> "Nginx":
        root = self.dir / "html"
        for sub in ("html", "tmp", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (root / "large.bin").write_bytes(bytes(i % 251 for i in range(LARGE_SIZE)))
        (root / "text.txt").write_text("compress me please " * 2000)
        opts = (" ssl" if self.cert else "") + (" http2" if self.http2 else "")
        listen = f"listen {HOST}:{self.port}{opts};"
        if self.ipv6:
            listen += f" listen [::1]:{self.port}{opts};"
        tls = (
            f"ssl_certificate {self.cert.cert}; ssl_certificate_key {self.cert.key};"
            if self.cert else ""
        )
        t = self.dir / "tmp"
        proxy = (
            f"location /devtools/ {{ proxy_pass http://127.0.0.1:{self.proxy_to}; proxy_http_version 1.1; "
            f"proxy_buffering off; proxy_set_header Host 127.0.0.1:{self.proxy_to}; }}"
            if self.proxy_to else ""
        )
        conf = textwrap.dedent(f"""\
            user root;
            worker_processes {self.workers};
            daemon off;
            master_process on;
            pid {self.dir}/nginx.pid;
            error_log {self.dir}/logs/error.log warn;
            events {{ worker_connections 256; }}
            http {{
              access_log {self.dir}/logs/access.log;
              client_body_temp_path {t}/body; proxy_temp_path {t}/proxy;
              fastcgi_temp_path {t}/fastcgi; uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;
              keepalive_timeout 30; keepalive_requests 1000;
              sendfile {"on" if self.sendfile else "off"};
              default_type application/octet-stream;
              server {{
                {listen}
                server_name localhost;
                {tls}
                root {root};
                location = /small {{ default_type text/plain; return 200 "{SMALL_BODY.strip()}\\n"; }}
                location = /json {{
                  default_type application/json;
                  return 200 '{{"method":"$request_method","uri":"$request_uri","args":"$args"}}';
                }}
                location = /gzip {{
                  gzip on; gzip_types text/plain; gzip_min_length 1;
                  default_type text/plain; try_files /text.txt =404;
                }}
                location = /large {{ try_files /large.bin =404; }}
                location = /error {{ return 500; }}
                {proxy}
                location = /peer {{
                  default_type application/json;
                  return 200 '{{"addr":"$remote_addr","port":$remote_port,"method":"$request_method","args":"$args"}}';
                }}
              }}
            }}
            """)
        (self.dir / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", str(self.dir / "logs/error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        wait_port(self.port, proc=self.proc)
        if self.ipv6:
            wait_port(self.port, host="::1", proc=self.proc)
        return self

    @property
    def worker_pids(self) -> list[int]:
        deadline = time.monotonic() + 5
        while not (kids := children(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        return kids

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc, signal.SIGQUIT)


class OpensslServer(_Server):
    """``openssl s_server -www``: answers any GET with a status page over TLS."""

    scheme = "https"

    def __init__(self, cert: Cert, port: int | None = None) -> None:
        self.cert = cert
        self.port = port or free_port()

    def __enter__(self) -> "OpensslServer":
        self.proc = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"{HOST}:{self.port}", "-cert", str(self.cert.cert),
             "-key", str(self.cert.key), "-www", "-quiet"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, proc=self.proc)
        return self


_PY_TLS_SERVER = """
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _reply(self):
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b'{"chunks": [', b'"one", ', b'"two"', b']}'):
                self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(part), part))
                self.wfile.flush()
            self.wfile.write(b"0\\r\\n\\r\\n")
            return
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b"python-ssl says hi\\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = _reply
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""


class PythonTlsServer(_Server):
    """Python ``ssl`` HTTP/1.1 server: GET → fixed body, POST → echoes the body,
    GET /chunked → a chunked JSON response in four chunks."""

    scheme = "https"

    def __init__(self, cert: Cert, port: int | None = None) -> None:
        self.cert = cert
        self.port = port or free_port()

    def __enter__(self) -> "PythonTlsServer":
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PY_TLS_SERVER, str(self.port), str(self.cert.cert), str(self.cert.key)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, proc=self.proc)
        return self


class PlainHttpServer(_Server):
    """``python -m http.server`` serving ``directory`` over plaintext HTTP."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.dir = directory
        self.port = port or free_port()

    def __enter__(self) -> "PlainHttpServer":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", HOST, "--directory", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, proc=self.proc)
        return self


# Both ends of a TCP relay, and a loopback server handing each connection to ``handle``.
_RELAY = """
import socket, sys, threading

def pipe(a, b):
    try:
        while (data := a.recv(65536)):
            b.sendall(data)
    except OSError:
        pass
    finally:
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

def relay(c, upstream):
    threading.Thread(target=pipe, args=(upstream, c), daemon=True).start()
    pipe(c, upstream)
"""
_SERVE = """
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
while True:
    conn, _ = s.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"""

_CONNECT_PROXY = _RELAY + """
def handle(c):
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        head += c.recv(4096)
    host, port = head.split(b" ")[1].decode().rsplit(":", 1)
    if host not in ("localhost", "127.0.0.1"):  # loopback only
        c.sendall(b"HTTP/1.1 403 Forbidden\\r\\nContent-Length: 0\\r\\n\\r\\n")
        return c.close()
    upstream = socket.create_connection(("127.0.0.1", int(port)))
    c.sendall(b"HTTP/1.1 200 Connection established\\r\\n\\r\\n")
    relay(c, upstream)
""" + _SERVE


class ConnectProxy(_Server):
    """An HTTP proxy that tunnels ``CONNECT`` to loopback ports (``curl -x``)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()

    def __enter__(self) -> "ConnectProxy":
        self.proc = subprocess.Popen([sys.executable, "-c", _CONNECT_PROXY, str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self


_FORWARDER = _RELAY + """
def handle(c):
    relay(c, socket.create_connection(("127.0.0.1", int(sys.argv[2]))))
""" + _SERVE


class Forwarder(_Server):
    """A TCP forwarder from a port of its own to ``upstream`` on loopback, as
    ``ssh -L`` or socat would be."""

    def __init__(self, upstream: int, port: int | None = None) -> None:
        self.upstream = upstream
        self.port = port or free_port()

    def __enter__(self) -> "Forwarder":
        self.proc = subprocess.Popen([sys.executable, "-c", _FORWARDER, str(self.port), str(self.upstream)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self


def have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


__all__ = [
    "HOST", "SMALL_BODY", "LARGE_SIZE", "Cert", "make_cert", "free_port", "wait_port", "children",
    "Nginx", "OpensslServer", "PythonTlsServer", "PlainHttpServer", "have",
]
