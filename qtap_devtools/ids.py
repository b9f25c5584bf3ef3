"""Connection and request IDs in the shape Qtap uses (xid).

An xid is 12 bytes: a 4-byte big-endian Unix time in seconds, 3 bytes of
machine id, 2 bytes of process id and a 3-byte counter, written as 20
characters of lowercase base32hex (RFC 4648 §7) without padding.  They sort by
creation time as strings, which is what makes the seed's IDs
(``d4u4jhg7p3qk26l91icg``) readable at a glance.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import socket
import threading

_ALPHABET = "0123456789abcdefghijklmnopqrstuv"
_machine = hashlib.md5(socket.gethostname().encode()).digest()[:3]
_pid = (os.getpid() & 0xFFFF).to_bytes(2, "big")
_counter = itertools.count(int.from_bytes(os.urandom(3), "big"))
_lock = threading.Lock()


def encode(raw: bytes) -> str:
    """base32hex of 12 bytes → 20 characters (the last one carries 4 bits)."""
    # The stdlib's encoder pads 96 bits to 100 with zero bits, as xid does;
    # only its "====" padding and upper case differ.
    return base64.b32hexencode(raw)[:20].decode("ascii").lower()


def new_id(unix_seconds: float) -> str:
    with _lock:
        count = next(_counter) & 0xFFFFFF
    raw = int(unix_seconds).to_bytes(4, "big") + _machine + _pid + count.to_bytes(3, "big")
    return encode(raw)
