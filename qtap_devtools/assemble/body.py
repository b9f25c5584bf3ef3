"""Content-Encoding decoding (RFC 9110 §8.4) with a cap on the decoded size.

A compressed body is attacker-sized: a few KiB of gzip can expand to GiB, so every
decoder here stops producing output at ``limit`` bytes instead of decoding and
cutting afterwards.
"""

from __future__ import annotations

import zlib

import brotli

SUPPORTED = ("gzip", "x-gzip", "deflate", "br")
# Codings undone, at most: real senders apply one, rarely two; each layer is a
# full decode of up to ``limit`` bytes, so a header listing thousands would
# cost seconds per message.
MAX_CODINGS = 4


def decode_body(raw: bytes, content_encoding: str | None, limit: int,
                complete: bool = True) -> tuple[bytes, bool, str | None]:
    """Return ``(body, truncated, error)``.

    On an unsupported coding or a decoding error the raw bytes come back with the
    error, so a caller always has something to show.  A compressed stream that
    stops before its end gives what it decoded, marked truncated, and, when the
    message itself was whole (``complete``: not cut by the capture), an error
    saying the body is incomplete: the sender cut it, and nothing else would say so.
    """
    if not content_encoding:
        return raw, False, None
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings or not raw:
        return raw, False, None
    if len(codings) > MAX_CODINGS:
        return raw, False, f"{len(codings)} content-encodings applied; at most {MAX_CODINGS} are decoded"
    for coding in codings:
        if coding not in SUPPORTED:
            return raw, False, f"unsupported content-encoding: {coding}"
    data = raw
    truncated = False
    # Codings are listed in the order they were applied (RFC 9110 §8.4): undo from the last.
    for coding in reversed(codings):
        try:
            if coding == "br":
                data, cut, early = _brotli(data, limit)
            elif coding == "deflate":
                data, cut, early = _deflate(data, limit)
            else:
                data, cut, early = _zlib(data, 16 + zlib.MAX_WBITS, limit)
        except (zlib.error, brotli.error) as exc:
            return raw, False, f"{coding} decoding failed: {exc}"
        truncated = truncated or cut or early
        if early:
            return data, True, f"{coding} stream ends early: the body is incomplete" if complete else None
    return data, truncated, None


# gzip members decoded per body, at most (real bodies have one; 52,000 empty ones
# in a 1 MiB body took 1.35 s).  Past it the body is cut, as at the size limit.
MAX_GZIP_MEMBERS = 64


def _zlib(data: bytes, wbits: int, limit: int) -> tuple[bytes, bool, bool]:
    """(decoded, cut at ``limit``, the stream ended before its end)."""
    out = bytearray()
    members = 0
    while data:
        members += 1
        if members > MAX_GZIP_MEMBERS:
            return bytes(out), True, False  # each member copies the rest: thousands made decoding quadratic
        decoder = zlib.decompressobj(wbits)
        out += decoder.decompress(data, limit + 1 - len(out))
        if len(out) > limit or decoder.unconsumed_tail:
            return bytes(out[:limit]), True, False
        if not decoder.eof:
            return bytes(out), False, True
        data = decoder.unused_data  # gzip allows several members back to back (RFC 1952 §2.2)
        if wbits < 16 or not data.startswith(b"\x1f\x8b"):
            break  # what follows the last member is padding (zeros, as gzip itself accepts)
    return bytes(out), False, False


def _deflate(data: bytes, limit: int) -> tuple[bytes, bool, bool]:
    # "deflate" means the zlib format (RFC 9110 §8.4.1.2), but servers have long sent
    # raw deflate; try the standard first, then raw.
    try:
        return _zlib(data, zlib.MAX_WBITS, limit)
    except zlib.error:
        return _zlib(data, -zlib.MAX_WBITS, limit)


def _brotli(data: bytes, limit: int) -> tuple[bytes, bool, bool]:
    decoder = brotli.Decompressor()
    out = bytearray(decoder.process(data, output_buffer_limit=limit + 1))
    while len(out) <= limit and not decoder.is_finished() and not decoder.can_accept_more_data():
        out += decoder.process(b"", output_buffer_limit=limit + 1 - len(out))
    if len(out) > limit:
        return bytes(out[:limit]), True, False
    return bytes(out), False, not decoder.is_finished()
