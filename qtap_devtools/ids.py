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
import os
import socket
from typing import Final

_ALPHABET: Final = "0123456789abcdefghijklmnopqrstuv"
_machine: Final = hashlib.md5(socket.gethostname().encode()).digest()[:3]
_pid: Final = (os.getpid() & 0xFFFF).to_bytes(2, "big")


def encode(raw: bytes) -> str:
    """base32hex of 12 bytes → 20 characters (the last one carries 4 bits)."""
    # The stdlib's encoder pads 96 bits to 100 with zero bits, as xid does;
    # only its "====" padding and upper case differ.
    return base64.b32hexencode(raw)[:20].decode("ascii").lower()


# new_id runs for every transaction: the stdlib's base32 is pure Python here
# (~1.5 µs).  The first 14 characters encode time, machine and pid only (70 of
# their 72 bits), so they are made once a second; the last 6 encode those 2 bits,
# the counter and the 4 padding bits, through a 10-bit → 2-character table.
_PAIRS: Final = [_ALPHABET[i >> 5] + _ALPHABET[i & 31] for i in range(1024)]


class _Second:
    """The current second's 14-character prefix and its 2 leftover bits, and the counter."""

    def __init__(self) -> None:
        self.seconds = -1
        self.prefix = ""
        self.low_bits = 0
        self.count = int.from_bytes(os.urandom(3), "big")


_second: Final = _Second()  # a native object: its fields read without a module-dict lookup


def new_id(unix_seconds: float) -> str:
    seconds = int(unix_seconds)
    second = _second
    # The pipeline makes ids on the event loop's thread; and compiled, nothing
    # between this read and write lets the GIL go, so no two ids share a count.
    count = second.count = (second.count + 1) & 0xFFFFFF
    if second.seconds != seconds:
        # Two threads may both redo this in a new second: the same values.
        prefix = seconds.to_bytes(4, "big") + _machine + _pid
        second.prefix = encode(prefix + b"\0\0\0")[:14]
        second.low_bits = prefix[-1] & 3
        second.seconds = seconds
    tail = ((second.low_bits << 24 | count) << 4)  # 30 bits
    return f"{second.prefix}{_PAIRS[tail >> 20]}{_PAIRS[(tail >> 10) & 1023]}{_PAIRS[tail & 1023]}"
