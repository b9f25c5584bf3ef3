"""Where a captured chunk lands in its direction's byte stream.

Both assemblers (HTTP/1 and HTTP/2) are fed chunks stamped with their offset
in the stream.  A chunk can repeat bytes already fed (a re-read range) or
start past the end of what was fed (bytes the capture lost or left out).
Compiled with the assemblers (``compiled.MYPYC_MODULES``): it runs per chunk.
"""

from __future__ import annotations


def place(next_offset: dict[str, int | None], direction: str, data: bytes,
          offset: int | None) -> tuple[bytes, int, int]:
    """``data`` placed after what ``next_offset[direction]`` says was fed:
    (its bytes not fed before, the gap before them, bytes dropped as fed
    before); ``next_offset`` moves past the new bytes.

    ``offset`` None (a source without offsets): the chunk follows on."""
    expected = next_offset[direction]
    if offset is None:
        next_offset[direction] = (expected or 0) + len(data)
        return data, 0, 0
    gap = seen = 0
    if expected is not None and offset < expected:
        seen = expected - offset
        if seen >= len(data):
            return b"", 0, len(data)
        data = data[seen:]
        offset = expected
    elif offset > (expected or 0):
        gap = offset - (expected or 0)
    next_offset[direction] = offset + len(data)
    return data, gap, seen
