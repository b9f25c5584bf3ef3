"""The tuned sites read the real plaintext: plain uprobes at the planned offsets,
driven by curl and Python's ssl against ``openssl s_server -www`` on loopback.

curl calls SSL_write/SSL_read (the in-wrapper js/jle sites); Python's ssl calls
SSL_write_ex/SSL_read_ex (the call site + a uretprobe on the internal function).
Each client's captured request must be one whole request, and its captured
response must end with exactly the bytes the client printed, with every count
read at a return site equal to the bytes it covers."""

from __future__ import annotations

import ctypes
import socket
import struct
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from qtap_devtools.capture.tuned import SitePlan, analyze

pytestmark = pytest.mark.kernel

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
SITES_C = Path(__file__).parent / "fixtures" / "tuned" / "sites.c"
_HDR = struct.Struct("<IIiIQII")

PY_CLIENT = r"""
import ssl, sys, urllib.request
ctx = ssl._create_unverified_context()
body = urllib.request.urlopen(sys.argv[1] + "/?from=python", context=ctx).read()
sys.stdout.buffer.write(body)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s_server(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-days", "1", "-keyout", key, "-out", cert], check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(["openssl", "s_server", "-www", "-accept", f"127.0.0.1:{port}", "-naccept", "10",
                             "-cert", cert, "-key", key], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield proc, f"https://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def attach(bpf, plans: dict[str, SitePlan]) -> None:
    """Attach by ELF virtual address: bcc 0.26 maps ``addr=`` through PT_LOAD to a file offset."""
    enter = {"SSL_write": "write_enter", "SSL_read": "read_enter",
             "SSL_write_ex": "write_ex_enter", "SSL_read_ex": "read_ex_enter"}
    for symbol, plan in plans.items():
        bpf.attach_uprobe(name=LIBSSL.encode(), addr=plan.entry_vaddr, fn_name=enter[symbol].encode())
        if plan.return_kind == "uprobe":
            bpf.attach_uprobe(name=LIBSSL.encode(), addr=plan.return_vaddr, fn_name=b"site_ret")
        else:
            bpf.attach_uretprobe(name=LIBSSL.encode(), addr=plan.return_vaddr, fn_name=b"ex_callee_ret")


def test_tuned_sites_read_the_plaintext_curl_and_python_exchange(s_server):
    from bcc import BPF

    from qtap_devtools import kheaders

    plans = analyze(LIBSSL, share=False)  # every wrapper's own sites, the in-wrapper jle included
    assert all(isinstance(p, SitePlan) for p in plans.values()), plans
    slots = {p.count_source[1] for p in plans.values() if p.count_source[0] == "stack"}
    assert len(slots) == 1, slots
    kheaders.apply()
    bpf = BPF(src_file=str(SITES_C).encode(), cflags=[f"-DSLOT={slots.pop()}"])
    events: list[tuple[int, int, int, int, int, bytes]] = []

    def on_event(_ctx, data, size):
        raw = ctypes.string_at(data, size)
        pid, direction, ret, length, count, ex, _ = _HDR.unpack_from(raw)
        events.append((pid, direction, ret, count, ex, raw[_HDR.size : _HDR.size + length]))

    bpf[b"events"].open_ring_buffer(on_event)
    try:
        attach(bpf, plans)
        server, url = s_server
        curl = subprocess.run(["curl", "-sk", "--http1.1", url + "/?from=curl"], capture_output=True, check=True,
                              timeout=20)
        py = subprocess.run([sys.executable, "-c", PY_CLIENT, url], capture_output=True, check=True, timeout=20)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            bpf.ring_buffer_poll(100)
    finally:
        bpf.cleanup()

    streams: dict[tuple[int, int], bytes] = defaultdict(bytes)
    by_path: dict[tuple[int, int], set[int]] = defaultdict(set)
    pids: set[int] = set()
    for pid, direction, ret, count, ex, data in events:
        if ret <= 0:
            continue
        pids.add(pid)
        assert count == len(data), (pid, direction, count, len(data))  # the count slot is the byte count
        streams[(pid, direction)] += data
        by_path[(pid, direction)].add(ex)
    # s_server -www talks through BIO_f_ssl, which in OpenSSL 3 calls
    # ssl_{read,write}_internal directly: no wrapper runs, so nothing is stashed
    # and the callee uretprobe ignores it.  Only the clients are seen.
    assert server.pid not in pids

    egress, ingress = 0, 1
    curl_pid = next(p for p in pids if streams[(p, egress)].startswith(b"GET /?from=curl HTTP/1.1\r\n"))
    py_pid = next(p for p in pids if streams[(p, egress)].startswith(b"GET /?from=python HTTP/1.1\r\n"))
    # curl uses SSL_write/SSL_read (in-wrapper sites); Python the _ex pair (callee uretprobe).
    assert by_path[(curl_pid, egress)] == {0} and by_path[(curl_pid, ingress)] == {0}
    assert by_path[(py_pid, egress)] == {1} and by_path[(py_pid, ingress)] == {1}
    for pid, printed in ((curl_pid, curl.stdout), (py_pid, py.stdout)):
        assert streams[(pid, egress)].endswith(b"\r\n\r\n")  # one whole request, nothing else
        response = streams[(pid, ingress)]
        assert response.startswith(b"HTTP/1.0 200 ok\r\n")
        assert printed and response.endswith(b"\r\n\r\n" + printed)  # byte for byte what the client printed
