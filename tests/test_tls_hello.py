"""SNI and version from real handshake bytes (Python's ssl over memory BIOs)."""

from __future__ import annotations

import ssl
import subprocess

import pytest

from qtap_devtools.assemble.tls_hello import HelloReader, looks_like_tls


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("cert")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", d / "key.pem", "-out", d / "cert.pem"], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def handshake(cert, version: ssl.TLSVersion, sni: str | None):
    """Client→server and server→client bytes of a real in-memory handshake."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(*cert)
    sctx.minimum_version = sctx.maximum_version = version
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
    cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
    client = cctx.wrap_bio(cin, cout, server_hostname=sni)
    server = sctx.wrap_bio(sin, sout, server_side=True)
    c2s, s2c = b"", b""
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        out = cout.read()
        c2s += out
        sin.write(out)
        out = sout.read()
        s2c += out
        cin.write(out)
    return c2s, s2c


@pytest.mark.parametrize("version,name", [(ssl.TLSVersion.TLSv1_3, "TLS 1.3"), (ssl.TLSVersion.TLSv1_2, "TLS 1.2")])
def test_client_hello_sni_and_server_hello_version(cert, version, name):
    c2s, s2c = handshake(cert, version, "api.example.com")
    assert looks_like_tls(c2s) and looks_like_tls(s2c)
    hello = HelloReader()
    # Fed in small pieces, as syscalls may deliver it.
    results = [hello.feed(c2s[i:i + 7]) for i in range(0, len(c2s), 7)]
    info = next(r for r in results if r is not None)
    assert info.server_name == "api.example.com"
    server = HelloReader().feed(s2c)
    assert server.version == name


def test_no_sni_and_garbage_yield_nothing_without_raising(cert):
    c2s, _ = handshake(cert, ssl.TLSVersion.TLSv1_3, None)
    assert HelloReader().feed(c2s).server_name is None
    assert not looks_like_tls(b"GET / HTTP/1.1\r\n")
    for junk in (b"\x16\x03\x01\x00\x05\x01\xff\xff\xff\xff", b"\x16\x03\x03" + b"\xff" * 40, b"\x16"):
        HelloReader().feed(junk)
