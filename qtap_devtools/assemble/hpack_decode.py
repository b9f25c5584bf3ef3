"""HPACK decoding (RFC 7541), the header compression of HTTP/2.

Our own because it is on every HTTP/2 transaction's path twice and is compiled
with it by mypyc: the ``hpack`` package's decoder, pure Python and logging each
field, took ~26 µs a block, most of an HTTP/2 transaction's cost; this one takes
a few. Its tables are the package's (the RFC's Huffman code and static table,
not typed out twice), and the tests check this decoder against its encoder.

Names and values come back as text decoded as Latin-1, byte for byte, as the
HTTP/1 parser gives them.
"""

from __future__ import annotations

from collections import deque

from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

# A malformed block is refused whole; these bound what a hostile one can make us hold.
MAX_STRING = 1 << 20
# Fields kept of one block. Each costs ~64 bytes of Python (a tuple and a list
# slot) however few bytes encode it: one-byte references to a table entry, at
# the 32 bytes a field counts against the list size, held 70 times their
# block's size. Real lists have tens of fields (a browser's cookies split into
# crumbs, a few hundred); the rest are decoded, for the table, and not kept.
MAX_FIELDS = 4096


class HpackError(ValueError):
    """The block is not valid HPACK, or refers to a table state we do not have."""


UNKNOWN = "\x00unknown"  # a name or value lost with the table entries a capture gap took

STATIC: list[tuple[str, str]] = [(bytes(n).decode("latin-1"), bytes(v).decode("latin-1"))
                                 for n, v in HeaderTable.STATIC_TABLE]
STATIC_LEN = len(STATIC)  # 61

# ---- Huffman: a nibble at a time through the code's tree.
#
# Each of the tree's internal nodes (the decoder's states) has 16 transitions,
# one per nibble: the next state, and the symbol completed on the way if any
# (a code is at least 5 bits, so a nibble completes at most one). A string
# ends in a state reached from a symbol's end by at most 7 one-bits (padding
# with the EOS code's prefix, RFC 7541 §5.2).
_FAIL = 1  # the nibble walks into EOS or off the tree
_EMIT = 2


def _huffman_tables() -> tuple[list[int], list[bool]]:
    children: list[list[int]] = [[-1, -1]]  # internal node -> [child on 0, on 1]; a leaf is -(symbol + 2)
    for sym in range(257):
        code, length = REQUEST_CODES[sym], REQUEST_CODES_LENGTH[sym]
        node = 0
        for i in range(length - 1, -1, -1):
            bit = (code >> i) & 1
            if i == 0:
                children[node][bit] = -(sym + 2)
            else:
                if children[node][bit] == -1:
                    children[node][bit] = len(children)
                    children.append([-1, -1])
                node = children[node][bit]
    # Padding: states reached from the root by 1..7 one-bits, and the root.
    accept = [False] * len(children)
    node = 0
    accept[0] = True
    for _ in range(7):
        node = children[node][1]
        accept[node] = True
    trans = [0] * (len(children) * 16)
    for state in range(len(children)):
        for nibble in range(16):
            node, emitted, failed = state, -1, False
            for i in range(3, -1, -1):
                nxt = children[node][(nibble >> i) & 1]
                if nxt < -1:
                    sym = -nxt - 2
                    if sym == 256 or emitted >= 0:
                        failed = True
                        break
                    emitted, node = sym, 0
                else:
                    node = nxt
            trans[state * 16 + nibble] = _FAIL if failed else \
                (node << 10) | ((emitted & 0xFF) << 2) | (_EMIT if emitted >= 0 else 0)
    return trans, accept


_TRANS, _ACCEPT = _huffman_tables()


def huffman_decode(data: bytes) -> bytes:
    out = bytearray()
    trans = _TRANS
    state = 0
    for byte in data:
        t = trans[(state << 4) | (byte >> 4)]
        if t & _FAIL:
            raise HpackError("bad Huffman code")
        if t & _EMIT:
            out.append((t >> 2) & 0xFF)
        t = trans[((t >> 10) << 4) | (byte & 0xF)]
        if t & _FAIL:
            raise HpackError("bad Huffman code")
        if t & _EMIT:
            out.append((t >> 2) & 0xFF)
        state = t >> 10
    if not _ACCEPT[state]:
        raise HpackError("bad Huffman padding")
    return bytes(out)


class HpackDecoder:
    """One direction's decoder: its dynamic table follows the sender's encoder.

    ``max_allowed_table_size``: the largest table a size update may ask for
    (what the receiving end's SETTINGS allow; we accept up to this).
    """

    def __init__(self, max_allowed_table_size: int = 4096, max_header_list_size: int = 1 << 20) -> None:
        self.max_allowed_table_size = max_allowed_table_size
        self.max_header_list_size = max_header_list_size
        self.table_size = 4096  # SETTINGS_HEADER_TABLE_SIZE's initial value
        # Oldest first; a deque: evicting from a list's front moved the whole table
        # (a 1 MiB table of small entries decoded at ~2.7 µs a byte).
        self._entries: deque[tuple[str, str]] = deque()
        self._used = 0
        # After a capture gap the table's older entries are unknown: only those
        # added since are (the newest come first in the index, so theirs stay
        # right). A reference past them decodes as UNKNOWN, not as an error.
        self.partial = False
        self.unknown = 0  # fields of the last block decoded as UNKNOWN
        self.listed = 0  # the last block's header list size (RFC 7541 §4.1: 32 bytes a field and its text)
        self.left_out = 0  # fields of the last block past MAX_FIELDS, not kept

    def lost(self) -> None:
        """Blocks of this direction may have been lost (a capture gap)."""
        self._entries = deque()
        self._used = 0
        self.partial = True

    def _get(self, index: int) -> tuple[str, str]:
        if 0 < index <= STATIC_LEN:
            return STATIC[index - 1]
        pos = len(self._entries) - 1 - (index - STATIC_LEN - 1)
        if index > 0 and pos < 0 and self.partial:
            self.unknown += 1
            return UNKNOWN, UNKNOWN
        if index <= 0 or pos < 0:
            raise HpackError(f"index {index} is in neither table")
        return self._entries[pos]

    def _add(self, name: str, value: str) -> None:
        size = len(name) + len(value) + 32
        self._evict_to(self.table_size - size)
        if size <= self.table_size:
            self._entries.append((name, value))
            self._used += size

    def _evict_to(self, limit: int) -> None:
        """Oldest entries out until the table uses at most ``limit`` (§4.4)."""
        entries = self._entries
        while entries and self._used > limit:
            old_name, old_value = entries.popleft()
            self._used -= len(old_name) + len(old_value) + 32

    def _resize(self, size: int) -> None:
        if size > self.max_allowed_table_size:
            raise HpackError(f"table size {size} over the {self.max_allowed_table_size} allowed")
        self.table_size = size
        self._evict_to(size)

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        pos, end = 0, len(block)
        listed = 0
        self.unknown = 0
        self.left_out = 0
        while pos < end:
            first = block[pos]
            if first & 0x80:  # indexed field (§6.1)
                index, pos = _integer(block, pos, 7)
                name, value = self._get(index)
            elif first & 0x40:  # literal, added to the table (§6.2.1)
                name, value, pos = self._literal(block, pos, 6)
                if name == UNKNOWN:
                    self.lost()  # an entry of unknown size: evictions can no longer be followed
                else:
                    self._add(name, value)
            elif first & 0x20:  # table size update (§6.3)
                size, pos = _integer(block, pos, 5)
                self._resize(size)
                continue
            else:  # literal not added, or never to be (§6.2.2, §6.2.3)
                name, value, pos = self._literal(block, pos, 4)
            listed += len(name) + len(value) + 32
            if listed > self.max_header_list_size:
                raise HpackError(f"header list over {self.max_header_list_size} bytes")
            if len(out) < MAX_FIELDS:
                out.append((name, value))
            else:
                self.left_out += 1
        self.listed = listed
        return out

    def _literal(self, block: bytes, pos: int, prefix: int) -> tuple[str, str, int]:
        index, pos = _integer(block, pos, prefix)
        if index:
            name = self._get(index)[0]
        else:
            name, pos = _string(block, pos)
        value, pos = _string(block, pos)
        return name, value, pos


def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """An integer with an N-bit prefix (§5.1) at ``pos``: (value, next position)."""
    mask = (1 << prefix) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    end = len(block)
    while True:
        if pos >= end:
            raise HpackError("an integer runs past the block")
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
        if shift > 28:
            raise HpackError("an integer too large")


def _string(block: bytes, pos: int) -> tuple[str, int]:
    if pos >= len(block):
        raise HpackError("a string is missing")
    huffman = block[pos] & 0x80
    length, pos = _integer(block, pos, 7)
    if length > MAX_STRING or pos + length > len(block):
        raise HpackError("a string runs past the block")
    raw = block[pos:pos + length]
    if huffman:
        raw = huffman_decode(raw)
    return raw.decode("latin-1"), pos + length
