"""What a TLS handshake says in the clear: SNI and the negotiated version.

Fed the first bytes a socket carried (raw, before any TLS library hook saw
plaintext), it reads the ClientHello's ``server_name`` (RFC 6066 §3) and the
ServerHello's version, including TLS 1.3's ``supported_versions`` extension
(RFC 8446 §4.2.1), since a 1.3 ServerHello still says 0x0303 in its header.
Sans-IO and defensive: anything malformed yields nothing, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSIONS = {0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2", 0x0304: "TLS 1.3"}
HANDSHAKE = 0x16
CLIENT_HELLO = 1
SERVER_HELLO = 2
EXT_SERVER_NAME = 0
EXT_SUPPORTED_VERSIONS = 43
MAX_BUFFER = 16 * 1024 + 5


def looks_like_tls(data: bytes) -> bool:
    """A TLS record header (handshake/alert/CCS/app-data, version 3.x), or a
    prefix of one: servers such as nginx peek at a single byte first."""
    return (
        len(data) >= 1
        and data[0] in (0x14, 0x15, 0x16, 0x17)
        and (len(data) < 2 or data[1] == 3)
        and (len(data) < 3 or data[2] <= 4)
    )


@dataclass(slots=True)
class HelloInfo:
    server_name: str | None = None
    version: str | None = None


class HelloReader:
    """Accumulates one direction's first handshake record and reads it."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.done = False

    def feed(self, data: bytes) -> HelloInfo | None:
        if self.done:
            return None
        if len(self.buffer) < 5 and len(data) >= 5 and data[0] == HANDSHAKE:
            # What came before was a peek at the same bytes, not more of them.
            self.buffer.clear()
        self.buffer += data[: MAX_BUFFER - len(self.buffer)]
        if len(self.buffer) < 5:
            return None
        if self.buffer[0] != HANDSHAKE:
            self.done = True
            return None
        length = int.from_bytes(self.buffer[3:5], "big")
        if len(self.buffer) < 5 + length and len(self.buffer) < MAX_BUFFER:
            return None
        self.done = True
        try:
            return parse_hello(bytes(self.buffer[5 : 5 + length]))
        except (IndexError, ValueError):
            return None


def parse_hello(body: bytes) -> HelloInfo | None:
    kind = body[0]
    if kind not in (CLIENT_HELLO, SERVER_HELLO):
        return None
    pos = 4
    legacy_version = int.from_bytes(body[pos : pos + 2], "big")
    pos += 2 + 32  # version, random
    sid_len = body[pos]
    pos += 1 + sid_len
    if kind == CLIENT_HELLO:
        cs_len = int.from_bytes(body[pos : pos + 2], "big")
        pos += 2 + cs_len
        comp_len = body[pos]
        pos += 1 + comp_len
    else:
        pos += 2 + 1  # cipher suite, compression method
    info = HelloInfo()
    if kind == SERVER_HELLO:
        info.version = VERSIONS.get(legacy_version)
    if pos + 2 > len(body):
        return info
    ext_end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    while pos + 4 <= min(ext_end, len(body)):
        ext_type = int.from_bytes(body[pos : pos + 2], "big")
        ext_len = int.from_bytes(body[pos + 2 : pos + 4], "big")
        ext = body[pos + 4 : pos + 4 + ext_len]
        pos += 4 + ext_len
        if kind == CLIENT_HELLO and ext_type == EXT_SERVER_NAME and len(ext) > 5:
            name_len = int.from_bytes(ext[3:5], "big")
            if ext[2] == 0:  # host_name
                info.server_name = ext[5 : 5 + name_len].decode("ascii", "replace")
        elif kind == SERVER_HELLO and ext_type == EXT_SUPPORTED_VERSIONS and len(ext) == 2:
            info.version = VERSIONS.get(int.from_bytes(ext, "big"), info.version)
    return info
