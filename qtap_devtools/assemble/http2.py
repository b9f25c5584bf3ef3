"""HTTP/2 reassembly for one connection (RFC 9113): frames in, ``HttpExchange`` values out.

Sans-IO like the HTTP/1 assembler, with the same interface, so the pipeline
swaps one for the other when a connection's client sends the preface. Each
stream is one exchange: the client's HEADERS (its pseudo-headers give the
method, path and authority), DATA and trailers, then the server's 1xx, final
HEADERS, DATA and trailers; it is emitted when both ends have closed it, or
reset it, or the connection ended.

Header blocks are HPACK-compressed against a table each end builds as it
goes (RFC 7541), so every block of a direction must be decoded, in order,
from the connection's first. A capture gap inside a DATA frame's payload cuts
only that body. A gap anywhere else (the lost bytes held a frame header, or a
header block) sends the reader looking for the next frame header (``_hunt``);
the streams it touched are marked incomplete, and the table's older entries
count as unknown from then on: a field that refers to one is left out, not
guessed (``hpack_decode``). Decoding stops for good (``failure`` says why) only
when no frame header turns up, or the frames break the protocol.

A connection joined after its preface (the agent started, or the process's TLS
library was attached, while it was open) is read as after a gap from its
start (``joined``): the pipeline hands one here when a chunk from its middle
begins with a chain of frames (:func:`joined_sender`). Streams already open
then are not shown; later ones are, with any field that refers to a table
entry made before the join left out and the exchange marked incomplete.
"""

from __future__ import annotations

import struct
from typing import Literal

from .body import decode_body
from .hpack_decode import UNKNOWN, HpackDecoder, HpackError
from .model import MAX_INFORMATIONAL, SHED_END_UNSEEN, Headers, HttpExchange, HttpRequest, HttpResponse
from .offsets import place

Direction = Literal["egress", "ingress"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20

MAX_CONTROL_FRAME = 1 << 20  # a non-DATA frame is held whole until its end; past this, decoding stops
MAX_HEADER_BLOCK = 256 * 1024  # a header block across its CONTINUATIONs, compressed
MAX_HEADER_LIST = 1 << 20  # the same decoded
# An encoder may grow its table to what the other end's SETTINGS allow (4 KiB
# unless raised; node's server announces 1 MiB, and the h2 library's encoder
# then uses it at once). Those SETTINGS can predate the preface we saw (a
# server's first write), so the decoder accepts any size up to this.
MAX_TABLE_SIZE = 1 << 20
EARLY_ANSWER_WAIT_NS = 1_000_000_000  # for the rest of a request its server no longer wanted
MAX_STREAMS = 1024  # open streams per connection (servers allow ~100-250 at once)
# Of those, pushes promised and not yet ended: a server that promises and never
# answers would otherwise fill the table, and hide the client's own streams.
MAX_PROMISED = 128
# Header lists held by a connection's open streams, as HPACK counts them (32
# bytes a field and its text): each list is bounded, a thousand of them not.
MAX_HELD_HEADERS = 4 * MAX_HEADER_LIST
# Bodies held at once across a connection's open streams, in units of the
# per-body limit: past it, bodies are cut (and marked so) until streams end.
CONNECTION_BODIES = 8
VERSION = "HTTP/2"
DEFAULT_MAX_FRAME = 1 << 14  # SETTINGS_MAX_FRAME_SIZE unless an end raises it
SETTINGS_MAX_FRAME_SIZE = 0x5
# Flags each frame type may carry (RFC 9113 §6): what a frame header found
# after a capture gap must fit.
_FLAGS = (0x09, 0x2D, 0x00, 0x00, 0x01, 0x0C, 0x01, 0x00, 0x00, 0x04)
_FIXED_LENGTH = {PRIORITY: 5, RST_STREAM: 4, PING: 8, WINDOW_UPDATE: 4}

_FRAME_HEAD = struct.Struct(">HBBBI")  # length (24 bits as 16 + 8), type, flags, stream id

# RST_STREAM / GOAWAY error codes (RFC 9113 §7), named as a user would search for them.
ERROR_CODES = (
    "NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
    "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR",
    "CONNECT_ERROR", "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED",
)

CLOSED_BEFORE_RESPONSE = "connection closed before response"
CLOSED_IN_RESPONSE = "connection closed before the response ended"
CLOSED_IN_REQUEST = "connection closed before the request ended"


def _cut_short(st: "_Stream") -> bool:
    """The stream ends here (reset, or its connection closed): a side whose
    headers came and whose END_STREAM did not has its body cut short, unless
    all of its content-length came: a client that has its response's declared
    bytes may close, or reset the stream, without reading the empty DATA
    frame that ends it (curl, behind nginx's proxy).  Whether both sides are
    whole."""
    for half in (st.request, st.response):
        if half.headers is not None and not half.done:
            declared = _content_length(half.headers)
            if declared is not None and half.wire_size == declared and not half.gapped:
                half.done = True
                half.end_ns = half.last_ns or half.start_ns
            else:
                half.truncated = True
    return st.request.done and st.response.done
UNDECODABLE = "HTTP/2 decoding stopped"


def error_name(code: int) -> str:
    return ERROR_CODES[code] if 0 <= code < len(ERROR_CODES) else f"0x{code:x}"


class _Half:
    """One end's message on a stream: head, body, trailers, and what it cost on the wire."""

    __slots__ = ("headers", "body", "wire_size", "truncated", "trailers", "done", "start_ns", "end_ns", "last_ns",
                 "bytes", "gapped")

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] | None = None
        self.body = bytearray()
        self.wire_size = 0  # DATA payload bytes, padding excluded
        self.truncated = False
        self.trailers: list[tuple[str, str]] = []
        self.done = False
        self.start_ns: int | None = None
        self.end_ns: int | None = None  # END_STREAM's (or the close's, the reset's)
        self.last_ns: int | None = None  # the latest DATA's: the end of one sent out before it ended
        self.bytes = 0  # frame bytes, 9-byte headers included
        self.gapped = False  # bytes of its frames were in a capture gap: its size on the wire is not known


class _Stream:
    __slots__ = ("sid", "request", "response", "informational", "response_start_ns", "error",
                 "incomplete", "shed", "partial", "emitted", "answered_early", "header_bytes", "promised")

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.request = _Half()
        self.response = _Half()
        self.informational: list[int] = []
        self.response_start_ns: int | None = None  # the first response HEADERS, 1xx included
        self.error: str | None = None
        self.incomplete = False
        self.shed = False
        self.partial = False
        self.emitted = False
        self.answered_early = False  # reset with NO_ERROR after a whole response
        self.header_bytes = 0  # its header lists' size, counted in MAX_HELD_HEADERS
        self.promised = False  # a server's push (MAX_PROMISED)


class _Reader:
    """Frame boundaries in one direction, and the HPACK table its sender keeps."""

    __slots__ = ("client", "preface_left", "head", "ftype", "flags", "sid", "left", "data_left", "need_pad", "payload", "block", "block_sid", "block_kind",
                 "block_end_stream", "block_promised", "decoder", "hunting", "hunt", "hunted", "hunt_from", "joining")

    def __init__(self, client: bool) -> None:
        self.client = client  # the client's bytes (requests), else the server's
        self.preface_left = len(PREFACE) if client else 0
        self.head = bytearray()  # a frame header still arriving
        self.ftype = -1  # the frame being read, -1 between frames
        self.flags = 0
        self.sid = 0
        self.left = 0  # payload bytes of the frame still to come
        self.need_pad = False  # a padded DATA frame's pad-length byte is next
        self.data_left = 0  # of ``left``, the body's (the rest is padding)
        self.payload = bytearray()  # a non-DATA frame's payload, held to its end
        self.block: bytearray | None = None  # a header block awaiting its CONTINUATIONs
        self.block_sid = 0
        self.block_kind = HEADERS
        self.block_end_stream = False
        self.block_promised = 0
        self.decoder = HpackDecoder(MAX_TABLE_SIZE, MAX_HEADER_LIST)
        self.hunting = False  # after a gap: looking for the next frame header
        self.hunt = bytearray()  # the last bytes looked at (a header may straddle two calls)
        self.hunted = 0
        self.hunt_from = 0  # in hunt: positions before it cannot start a frame (each looked at once)
        self.joining = False  # joined mid-connection, no frame found yet: what came before is no gap


class Http2Assembler:
    """``direction`` is from the observed process, as for HTTP/1: "egress" it wrote.

    ``client_direction`` is the direction that carries the client's bytes (the
    one the preface came in); ``offsets`` the stream offset each direction's
    bytes start from here (a server's SETTINGS may have gone out before the
    preface was seen, and were read as not HTTP/1).
    """

    protocol = "http2"
    upgraded = False

    def __init__(self, *, client_direction: Direction, offsets: dict[str, int | None],
                 max_body_bytes: int = 1 << 20, stream_limit_ns: int = 10_000_000_000,
                 joined: bool = False) -> None:
        self.max_body_bytes = max_body_bytes
        self.stream_limit_ns = stream_limit_ns
        server_direction: Direction = "ingress" if client_direction == "egress" else "egress"
        self._readers = {client_direction: _Reader(True), server_direction: _Reader(False)}
        self._next_offset: dict[str, int | None] = dict(offsets)
        self._streams: dict[int, _Stream] = {}
        self._out: list[HttpExchange] = []
        self._discarded = 0
        self._held = 0  # body bytes kept by open streams (CONNECTION_BODIES)
        self._held_headers = 0  # header list bytes kept by open streams (MAX_HELD_HEADERS)
        self._promised = 0  # open pushed streams (MAX_PROMISED)
        self._last_client_sid = 0
        # Joined mid-connection, stream ids start anywhere: any is plausible
        # until the client opens one here.
        self._sid_known = not joined
        self._max_frame = DEFAULT_MAX_FRAME
        self.resyncs = 0  # capture gaps read past by finding the next frame
        self.resyncs_counted = 0  # (by the pipeline)
        self._closed = False
        # Why decoding stopped; "" while it goes on (a str, not Optional: mypyc
        # would keep a None narrowed across the calls that set it).
        self.failure = ""
        self.streams_dropped = 0  # past MAX_STREAMS, MAX_PROMISED or MAX_HELD_HEADERS
        self.counted = False  # the failure has been counted (by the pipeline)
        if joined:
            for r in self._readers.values():
                r.preface_left = 0
                r.decoder.lost()  # the tables hold what came before: unknown
                r.hunting = True  # to the first frame header (the pipeline's chunk starts with one)
                r.joining = True

    @property
    def discarded_bytes(self) -> int:
        return self._discarded

    def position(self, direction: Direction) -> int | None:
        return self._next_offset[direction]

    # ---- the sans-IO interface

    def on_data(self, direction: Direction, data: bytes, ts_ns: int, offset: int | None = None,
                shed: bool = False) -> list[HttpExchange]:
        out = self._out = []
        if self._closed or self.failure:
            self._discarded += len(data)
            self._advance(direction, data, offset)
            return out
        data, gap, seen = place(self._next_offset, direction, data, offset)
        self._discarded += seen
        if gap:
            r = self._readers[direction]
            if r.joining:  # before its first frame: nothing read yet lost anything
                r.hunt, r.hunt_from = bytearray(), 0  # (bytes either side of a hole never chain)
            else:
                self._gap(r, gap, shed, ts_ns)
        if data and not self.failure:
            self._feed(self._readers[direction], data, ts_ns)
        elif data:
            self._discarded += len(data)
        return out

    def on_tick(self, now_ns: int) -> list[HttpExchange]:
        out = self._out = []
        if not self._closed and not self.failure:
            self._check_stream_limits(now_ns)
        return out

    def on_close(self, ts_ns: int) -> list[HttpExchange]:
        out = self._out = []
        if self._closed:
            return out
        self._closed = True
        for st in list(self._streams.values()):
            if st.request.headers is None:
                continue  # a server's push promise never started, or a stream never readable
            if _cut_short(st):
                pass  # whole by its lengths: only the frames that said so went unread
            elif st.error is None and self.failure:
                st.error = f"{UNDECODABLE}: {self.failure}"
            elif st.error is None and st.shed:
                st.error = SHED_END_UNSEEN
            elif st.error is None and st.response.done:
                st.error = CLOSED_IN_REQUEST
            elif st.error is None:
                st.error = CLOSED_BEFORE_RESPONSE if st.response.headers is None else CLOSED_IN_RESPONSE
            st.response.end_ns = st.response.end_ns or ts_ns
            self._emit(st)
        self._streams.clear()
        return out

    def _advance(self, direction: Direction, data: bytes, offset: int | None) -> None:
        end = (offset if offset is not None else (self._next_offset[direction] or 0)) + len(data)
        self._next_offset[direction] = max(end, self._next_offset[direction] or 0)

    # ---- failure and gaps

    def _fail(self, reason: str, incomplete: bool = True) -> None:
        """Decoding stops for good: every open stream goes out as it stands."""
        self.failure = reason
        for st in list(self._streams.values()):
            if st.request.headers is None:
                continue
            st.incomplete = st.incomplete or incomplete
            st.error = st.error or f"{UNDECODABLE}: {reason}"
            self._emit(st)
        self._streams.clear()

    def _gap(self, r: _Reader, lost: int, shed: bool, ts: int) -> None:
        """``lost`` bytes of ``r``'s direction were not captured.  Inside a DATA
        frame's payload only the body is cut; anywhere else the frames (or the
        HPACK table) can no longer be followed."""
        if r.ftype == DATA and not r.need_pad and lost <= r.data_left:
            st = self._streams.get(r.sid)
            if st is not None:
                half = st.request if r.client else st.response
                half.truncated = True
                half.wire_size += lost
                st.incomplete = True
                st.shed = st.shed or shed
            r.data_left -= lost
            r.left -= lost
            if r.left == 0:
                self._end_frame(r, ts)
            return
        # The frames in the hole are unknown: every stream this direction was
        # still sending may have lost bytes, a header block may be gone (so
        # the table's older entries are unknown), and reading resumes at the
        # next frame header found in what follows.
        for st in self._streams.values():
            half = st.request if r.client else st.response
            if not half.done:
                st.incomplete = True
                st.shed = st.shed or shed
                if half.headers is not None:
                    half.truncated = half.gapped = True
        r.decoder.lost()
        r.preface_left = 0
        r.ftype, r.left, r.data_left, r.need_pad = -1, 0, 0, False
        r.head.clear()
        r.payload = bytearray()
        r.block = None
        r.hunting, r.hunt, r.hunted, r.hunt_from = True, bytearray(), 0, 0
        self.resyncs += 1

    # ---- frames

    def _feed(self, r: _Reader, data: bytes, ts: int) -> None:
        pos, n = 0, len(data)
        while pos < n and not self.failure:
            if r.hunting:
                self._hunt(r, data[pos:], ts)
                return
            if r.preface_left:
                take = min(r.preface_left, n - pos)
                start = len(PREFACE) - r.preface_left
                if data[pos:pos + take] != PREFACE[start:start + take]:
                    self._fail("the client's preface is not HTTP/2's", incomplete=False)
                    break
                r.preface_left -= take
                pos += take
            elif r.ftype < 0:
                take = min(9 - len(r.head), n - pos)
                r.head += data[pos:pos + take]
                pos += take
                if len(r.head) == 9:
                    self._begin_frame(r, ts)
            elif r.ftype == DATA:
                pos = self._data(r, data, pos, ts)
            else:
                take = min(r.left, n - pos)
                r.payload += data[pos:pos + take]
                r.left -= take
                pos += take
                if r.left == 0:
                    self._end_frame(r, ts)
        if self.failure:
            self._discarded += n - pos

    def _hunt(self, r: _Reader, data: bytes, ts: int) -> None:
        """Look for the first frame header after a gap: one whose length, type,
        flags and stream fit, and whose frames chain on to the end of the bytes
        seen, exactly or through at least one more header that fits. In a
        body's bytes such a run is vanishingly unlikely; without one within a
        few frames' length, decoding stops."""
        buf = r.hunt
        buf += data
        r.hunted += len(data)
        start, r.hunt_from = self._frame_start(buf, r.client, r.hunt_from)
        if start < 0:
            # Not decided yet: keep a frame's length, where a header that
            # the next bytes may confirm could begin.
            keep = self._max_frame + 9
            if len(buf) > keep:
                cut = len(buf) - keep
                self._discarded += cut
                del buf[:cut]
                r.hunt_from = max(0, r.hunt_from - cut)
            if r.hunted > 4 * self._max_frame + 65536:
                self._fail("no frame found after a capture gap")
            return
        r.hunting = r.joining = False
        rest = bytes(buf[start:])
        self._discarded += start
        r.hunt, r.hunt_from = bytearray(), 0
        self._feed(r, rest, ts)

    def _frame_start(self, buf: bytearray, client: bool, begin: int) -> tuple[int, int]:
        """(where a frame starts, or -1; where the next call need look from).

        A position whose own header does not fit never will, however many
        bytes follow; one that fits may be confirmed by bytes yet to come.  So
        the next call starts at the first such undecided position, not at 0:
        rescanning the whole buffer on every read made a gap's recovery
        quadratic (2 MiB after a 16 MiB SETTINGS_MAX_FRAME_SIZE took 90 s)."""
        end = len(buf)
        quick = self._max_frame <= DEFAULT_MAX_FRAME
        undecided = -1
        for p in range(begin, end - 8):
            if quick and (buf[p] or buf[p + 1] > 0x40):
                continue  # a length over 16 KiB, the usual bound: most bytes stop here
            if not self._plausible(buf, p, False, client):
                continue
            q, headers = p + 9 + ((buf[p] << 16) | (buf[p + 1] << 8) | buf[p + 2]), 1
            while q + 9 <= end and self._plausible(buf, q, True, client):
                q += 9 + ((buf[q] << 16) | (buf[q + 1] << 8) | buf[q + 2])
                headers += 1
            if q == end or (q > end and headers >= 2):
                return p, 0
            if undecided < 0 and q + 9 > end:  # its chain ran into the end: more bytes may decide it
                undecided = p
        return -1, undecided if undecided >= 0 else max(begin, end - 8)

    def _plausible(self, buf: bytearray, p: int, chained: bool, client: bool) -> bool:
        if not frame_fits(buf, p, chained, self._max_frame) or (client and buf[p + 3] == PUSH_PROMISE):
            return False
        ftype = buf[p + 3]
        if ftype in (SETTINGS, PING, GOAWAY):
            return True
        sid = int.from_bytes(buf[p + 5:p + 9], "big")
        if self._sid_known and sid > self._last_client_sid + 1000:
            return False
        if ftype == WINDOW_UPDATE:
            return True
        # Streams a client opens are odd; a server's even ones are pushes it
        # promised (joined mid-connection, promised before we came: unknown).
        return bool(sid & 1) or (not client and (sid in self._streams or not self._sid_known))

    def _begin_frame(self, r: _Reader, ts: int) -> None:
        hi, lo, ftype, flags, sid = _FRAME_HEAD.unpack(r.head)
        r.head.clear()
        length = (hi << 8) | lo
        sid &= 0x7FFFFFFF
        r.ftype, r.flags, r.sid, r.left = ftype, flags, sid, length
        if r.block is not None and (ftype != CONTINUATION or sid != r.block_sid):
            self._fail("a header block was interrupted", incomplete=False)
            return
        if ftype != DATA and length > MAX_CONTROL_FRAME:
            self._fail(f"a {length}-byte control frame", incomplete=False)
            return
        if sid:
            st = self._streams.get(sid)
            if st is None and ftype == HEADERS and r.client and sid > self._last_client_sid:
                # A new stream: the client's ids only grow (RFC 9113 §5.1.1), so
                # a HEADERS on a lower one is trailers for a stream already out.
                self._last_client_sid = sid
                self._sid_known = True
                st = self._open(sid)
            if st is not None and ftype in (DATA, HEADERS, CONTINUATION):
                # The message's own frames: control frames on a stream (window
                # updates, a reset) reach each end at different points of it.
                (st.request if r.client else st.response).bytes += 9 + length
        if ftype == DATA:
            r.need_pad = bool(flags & PADDED)
            r.data_left = length
        if length == 0:
            self._end_frame(r, ts)

    def _open(self, sid: int) -> _Stream | None:
        if len(self._streams) >= MAX_STREAMS:
            self.streams_dropped += 1
            return None
        st = self._streams[sid] = _Stream(sid)
        return st

    def _data(self, r: _Reader, data: bytes, pos: int, ts: int) -> int:
        n = len(data)
        if r.need_pad:
            r.need_pad = False
            r.left -= 1
            r.data_left = r.left - data[pos]  # the pad length
            pos += 1
            if r.data_left < 0:
                self._fail("padding longer than its frame", incomplete=False)
                return n
        if r.data_left:
            take = min(r.data_left, n - pos)
            st = self._streams.get(r.sid)
            if st is not None and take:
                self._body(st, st.request if r.client else st.response, data[pos:pos + take], ts)
            r.data_left -= take
            r.left -= take
            pos += take
        if not r.data_left and r.left:
            take = min(r.left, n - pos)  # the padding
            r.left -= take
            pos += take
        if r.left == 0:
            self._end_frame(r, ts)
        return pos

    def _body(self, st: _Stream, half: _Half, chunk: bytes, ts: int) -> None:
        if half.start_ns is None:
            half.start_ns = ts
        half.last_ns = ts
        half.wire_size += len(chunk)
        room = min(self.max_body_bytes - len(half.body),
                   self.max_body_bytes * CONNECTION_BODIES - self._held)
        if room > 0:
            self._held += min(room, len(chunk))
            half.body += chunk[:room]
        if len(chunk) > room:
            half.truncated = True
            if half is st.response and st.request.headers is not None:
                # Past the body limit: out now with what it has (as HTTP/1's
                # large responses); its later frames are still read, not kept.
                st.partial = True
                self._emit(st)

    def _end_frame(self, r: _Reader, ts: int) -> None:
        ftype, flags, sid, payload = r.ftype, r.flags, r.sid, r.payload
        r.ftype = -1
        r.payload = bytearray()
        if ftype == DATA:
            if flags & END_STREAM:
                self._end_half(r, sid, ts)
        elif ftype in (HEADERS, PUSH_PROMISE):
            self._header_frame(r, ftype, flags, sid, bytes(payload), ts)
        elif ftype == CONTINUATION:
            if r.block is None:
                self._fail("a CONTINUATION without a header block", incomplete=False)
                return
            r.block += payload
            if len(r.block) > MAX_HEADER_BLOCK:
                self._fail(f"a header block over {MAX_HEADER_BLOCK} bytes", incomplete=False)
            elif flags & END_HEADERS:
                self._block_done(r, ts)
        elif ftype == SETTINGS and not flags & 0x1 and len(payload) % 6 == 0:
            for i in range(0, len(payload), 6):
                if int.from_bytes(payload[i:i + 2], "big") == SETTINGS_MAX_FRAME_SIZE:
                    # What one end accepts, the other may send: frames after a
                    # gap are looked for up to the largest either allows.
                    value = int.from_bytes(payload[i + 2:i + 6], "big")
                    self._max_frame = max(self._max_frame, min(value, 1 << 24))
        elif ftype == RST_STREAM and len(payload) == 4:
            st = self._streams.get(sid)
            if st is not None:
                code = int.from_bytes(payload, "big")
                if code == 0 and st.response.done and not r.client:
                    # How a server that answered before reading the whole
                    # request says it needs no more of it (RFC 9113 §8.1): not
                    # an error. What the client had already sent is still on
                    # its way; the exchange waits a little for it.
                    st.answered_early = True
                else:
                    # A client that had both sides whole by their lengths may reset
                    # the stream rather than read its end: not an error.
                    if not _cut_short(st) or not r.client:
                        who = "client" if r.client else "server"
                        st.error = st.error or f"stream reset by the {who} ({error_name(code)})"
                    st.response.end_ns = st.response.end_ns or ts
                    self._emit(st)

    def _header_frame(self, r: _Reader, ftype: int, flags: int, sid: int, payload: bytes, ts: int) -> None:
        pos, end = 0, len(payload)
        if flags & PADDED:
            if not payload:
                self._fail("a padded frame without its pad length", incomplete=False)
                return
            end -= payload[0]
            pos = 1
        promised = 0
        if ftype == PUSH_PROMISE:
            if end - pos < 4:
                self._fail("a PUSH_PROMISE too short", incomplete=False)
                return
            promised = int.from_bytes(payload[pos:pos + 4], "big") & 0x7FFFFFFF
            pos += 4
        elif flags & PRIORITY_FLAG:
            pos += 5
        if end < pos:
            self._fail("padding longer than its frame", incomplete=False)
            return
        r.block = bytearray(payload[pos:end])
        r.block_sid = sid
        r.block_kind = ftype
        r.block_end_stream = bool(flags & END_STREAM) and ftype == HEADERS
        r.block_promised = promised
        if flags & END_HEADERS:
            self._block_done(r, ts)

    def _block_done(self, r: _Reader, ts: int) -> None:
        block, r.block = r.block, None
        try:
            headers = r.decoder.decode(bytes(block or b""))
        except HpackError as exc:
            self._fail(f"HPACK: {exc}", incomplete=False)
            return
        decoder = r.decoder
        lost_fields = decoder.unknown
        cost = decoder.listed
        if lost_fields:
            # Fields that referred to table entries a capture gap took: left
            # out, and the exchange marked incomplete below.
            headers = [(k, v) for k, v in headers if k != UNKNOWN and v != UNKNOWN]
        if r.block_kind == PUSH_PROMISE:
            # The server promises a response to a request it makes up: the
            # request is whole as promised, its response comes on the new stream.
            # Promised ids are even and new (RFC 9113 §6.6): one naming a stream
            # already open would replace it, and lose the client's request.
            promised = r.block_promised
            if promised == 0 or promised % 2 or promised in self._streams:
                return
            if self._promised >= MAX_PROMISED or self._over_header_budget(cost):
                self.streams_dropped += 1
                return
            st = self._open(promised)
            if st is not None:
                st.promised = True
                self._promised += 1
                self._hold_headers(st, cost)
                st.incomplete = lost_fields > 0 or decoder.left_out > 0
                st.request.headers = headers
                st.request.start_ns = st.request.end_ns = ts
                st.request.done = True
            return
        st = self._streams.get(r.block_sid)
        if st is None:
            return  # a stream not tracked (over MAX_STREAMS, or a server's for a request we never saw)
        half = st.request if r.client else st.response
        if not r.client:
            if st.response_start_ns is None:
                st.response_start_ns = ts
            status = _status(headers)
            if half.headers is None and status is not None and 100 <= status < 200 and status != 101:
                if len(st.informational) < MAX_INFORMATIONAL:
                    st.informational.append(status)  # 1xx: more HEADERS follow (RFC 9113 §8.1)
                return
        if self._over_header_budget(cost):
            self.streams_dropped += 1
            self._drop(st.sid)
            return
        self._hold_headers(st, cost)
        if lost_fields or decoder.left_out:
            st.incomplete = True
        if half.headers is None:
            half.headers = headers
            if half.start_ns is None:
                half.start_ns = ts
        else:
            half.trailers = headers
        if r.block_end_stream:
            self._end_half(r, r.block_sid, ts)

    def _over_header_budget(self, cost: int) -> bool:
        """Too many header bytes held at once: the stream they are for is not shown."""
        return self._held_headers + cost > MAX_HELD_HEADERS

    def _hold_headers(self, st: _Stream, cost: int) -> None:
        st.header_bytes += cost
        self._held_headers += cost

    def _drop(self, sid: int) -> None:
        """A stream let go unseen (counted by the caller): what it held is free."""
        st = self._streams.pop(sid, None)
        if st is not None:
            self._release(st)

    def _release(self, st: _Stream) -> None:
        self._held -= len(st.request.body) + len(st.response.body)
        self._held_headers -= st.header_bytes
        if st.promised:
            self._promised -= 1

    def _end_half(self, r: _Reader, sid: int, ts: int) -> None:
        st = self._streams.get(sid)
        if st is None:
            return
        half = st.request if r.client else st.response
        half.done = True
        half.end_ns = ts
        if st.request.done and st.response.done:
            self._emit(st)
        elif st.response.done and st.request.truncated:
            # Answered, while the request's end may have been in bytes not
            # captured (shed, a full ring): it goes out shortly, as one its
            # server answered early, not at the connection's close as one the
            # close cut short.
            st.answered_early = True

    # ---- streaming responses

    def _check_stream_limits(self, now: int) -> None:
        """On the periodic tick (not per chunk: a connection may carry
        hundreds of streams): responses streaming past the time limit go out
        as they stand, and early answers stop waiting for their request."""
        for st in list(self._streams.values()):
            resp = st.response
            if st.answered_early and now - (resp.end_ns or now) >= EARLY_ANSWER_WAIT_NS:
                self._emit(st)
            elif resp.headers is not None and not resp.done and st.request.headers is not None \
                    and now - (st.response_start_ns or now) >= self.stream_limit_ns:
                st.partial = True
                self._emit(st)

    # ---- output

    def _emit(self, st: _Stream) -> None:
        if st.emitted:
            return
        st.emitted = True
        self._streams.pop(st.sid, None)
        self._release(st)
        req_half, resp_half = st.request, st.response
        if req_half.headers is None:
            return  # headers never decoded: nothing to show
        if not req_half.done:
            req_half.truncated = True  # the request never ended: its body, if any, is cut
            # ... and ends with its last byte seen, as over HTTP/1: left unknown,
            # the transaction's timing had no send_ms or wait_ms.
            if req_half.end_ns is None:
                req_half.end_ns = req_half.last_ns or req_half.start_ns
        if resp_half.done and resp_half.headers is None and st.error is None:
            st.error = "response headers not captured (capture gap)"
        # Ended short of its declared length: the peer is told by a reset
        # (PROTOCOL_ERROR) and the body is cut, not whole.  A request so: an
        # upload its client stopped sending once refused (curl, at a 413).
        _check_length(st, req_half, "request")
        if resp_half.headers is not None and _pseudo(req_half.headers, ":method") != "HEAD" \
                and _status(resp_half.headers) not in (204, 304):
            _check_length(st, resp_half, "response")
        request = _request(req_half, self.max_body_bytes)
        response = _response(resp_half, self.max_body_bytes, whole=not st.partial) \
            if resp_half.headers is not None else None
        start = req_half.start_ns or 0
        end = resp_half.end_ns or resp_half.last_ns or st.response_start_ns or req_half.end_ns or start
        self._out.append(HttpExchange(
            request=request,
            response=response,
            start_ns=start,
            request_end_ns=req_half.end_ns,
            response_start_ns=st.response_start_ns,
            end_ns=end,
            error=st.error,
            partial=st.partial,
            incomplete=st.incomplete,
            shed=st.shed,
            informational=tuple(st.informational),
            request_bytes=req_half.bytes,
            response_bytes=resp_half.bytes,
        ))


def _check_length(st: _Stream, half: _Half, what: str) -> None:
    """A half that ended (END_STREAM) short of its content-length is cut."""
    if half.done and not half.truncated and half.headers is not None:
        declared = _content_length(half.headers)
        if declared is not None and half.wire_size < declared:
            half.truncated = True
            st.error = st.error or f"the {what} ended after {half.wire_size} of its {declared} bytes (content-length)"


def frame_fits(buf: bytes | bytearray, p: int, chained: bool, max_frame: int = DEFAULT_MAX_FRAME) -> bool:
    """Whether the 9 bytes at ``p`` can be a frame header (RFC 9113 §4.1, §6):
    its length, type, flags, reserved bit, and stream 0 exactly for the frames
    that belong to the connection.  ``chained``: it follows another frame, so
    it may be a CONTINUATION (never the first after a hole)."""
    length = (buf[p] << 16) | (buf[p + 1] << 8) | buf[p + 2]
    ftype, flags = buf[p + 3], buf[p + 4]
    if length > max_frame or ftype > (CONTINUATION if chained else WINDOW_UPDATE) \
            or flags & ~_FLAGS[ftype] or buf[p + 5] & 0x80:
        return False
    zero = buf[p + 5] == 0 and buf[p + 6] == 0 and buf[p + 7] == 0 and buf[p + 8] == 0
    if ftype in (SETTINGS, PING, GOAWAY):
        return zero and (length % 6 == 0 if ftype == SETTINGS else length >= 8)
    fixed = _FIXED_LENGTH.get(ftype, -1)
    if fixed >= 0 and length != fixed:
        return False
    return ftype == WINDOW_UPDATE or not zero


# What the first field of a header block says of its sender: the static
# table's pseudo-headers (RFC 7541 Appendix A) are 1-7 for a request's
# (:authority, :method, :path, :scheme) and 8-14 for a response's :status.
# Pseudo-headers come first (RFC 9113 §8.3), so a request's first field names
# one of the former, a response's the latter, in every encoder we know.
_REQUEST_FIELDS = range(1, 8)
_RESPONSE_FIELDS = range(8, 15)


def joined_sender(data: bytes) -> str:
    """For bytes from the middle of a connection: "client" or "server" when
    they begin with HTTP/2 frames (chained to their end, or through three
    headers) and hold a header block whose first field says who sent it;
    "" otherwise (not HTTP/2 as far as these bytes show, or no telling)."""
    n, p, frames, sender = len(data), 0, 0, ""
    while p + 9 <= n:
        if not frame_fits(data, p, frames > 0):
            return ""
        length = (data[p] << 16) | (data[p + 1] << 8) | data[p + 2]
        if data[p + 3] == HEADERS and not sender:
            sender = _block_sender(data, p + 9, min(n, p + 9 + length), data[p + 4])
        p += 9 + length
        frames += 1
    return sender if frames and (p == n or frames >= 3) else ""


def _block_sender(data: bytes, pos: int, end: int, flags: int) -> str:
    if flags & PADDED:
        pos += 1
    if flags & PRIORITY_FLAG:
        pos += 5
    while pos < end and data[pos] & 0xE0 == 0x20:  # table size updates come first
        pos += 1
        if data[pos - 1] & 0x1F == 0x1F:  # a multi-byte size
            while pos < end and data[pos] & 0x80:
                pos += 1
            pos += 1
    if pos >= end:
        return ""
    b = data[pos]
    # Indexed (1xxxxxxx), or a literal naming a static entry: with indexing
    # (01xxxxxx), without (0000xxxx) or never indexed (0001xxxx).
    index = b & 0x7F if b & 0x80 else b & 0x3F if b & 0x40 else b & 0x0F
    if index in _REQUEST_FIELDS:
        return "client"
    if index in _RESPONSE_FIELDS:
        return "server"
    return ""


def _status(headers: list[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name == ":status":
            return int(value) if value.isascii() and value.isdigit() and len(value) == 3 else None
    return None


def _pseudo(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
        if not key.startswith(":"):
            break  # pseudo-headers come first (RFC 9113 §8.3)
    return None


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name == "content-length":
            return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None
    return None


def _wire_size(half: _Half) -> int:
    """The body's size on the wire: what was seen, or, with frames lost in
    a capture gap, what its content-length declared if more."""
    declared = _content_length(half.headers or []) if half.gapped else None
    return declared if declared is not None and declared > half.wire_size else half.wire_size


def _content_encoding(headers: Headers) -> str | None:
    values = [v for k, v in headers if k == "content-encoding"]
    return ", ".join(values) if values else None


def _cookies_joined(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """HTTP/2 may send a cookie as separate fields, one per pair ("crumbs");
    they are one ``cookie`` joined with "; " (RFC 9113 §8.2.3), not with the
    ", " other repeated fields take."""
    crumbs = [v for k, v in headers if k == "cookie"]
    if len(crumbs) < 2:
        return headers
    out: list[tuple[str, str]] = []
    for k, v in headers:
        if k != "cookie":
            out.append((k, v))
        elif crumbs:
            out.append(("cookie", "; ".join(crumbs)))
            crumbs = []
    return out


def _request(half: _Half, limit: int) -> HttpRequest:
    headers = tuple(_cookies_joined(half.headers or []))
    method = _pseudo(list(headers), ":method") or ""
    # CONNECT names its far end in :authority and has no :path (RFC 9113 §8.5).
    target = _pseudo(list(headers), ":path") or (_pseudo(list(headers), ":authority") or "" if method == "CONNECT" else "")
    coding = _content_encoding(headers)
    body, cut, error = decode_body(bytes(half.body), coding, limit, complete=not half.truncated)
    return HttpRequest(
        method=method, target=target, version=VERSION, headers=headers, body=body,
        body_wire_size=_wire_size(half), content_encoding=coding, body_truncated=half.truncated or cut,
        body_decode_error=error, trailers=tuple(half.trailers),
    )


def _response(half: _Half, limit: int, whole: bool = True) -> HttpResponse:
    headers = tuple(half.headers or ())
    status = _status(list(headers))
    coding = _content_encoding(headers)
    body, cut, error = decode_body(bytes(half.body), coding, limit, complete=whole and not half.truncated)
    return HttpResponse(
        status=status if status is not None else 0, reason="", version=VERSION, headers=headers, body=body,
        body_wire_size=_wire_size(half), content_encoding=coding, body_truncated=half.truncated or cut,
        body_decode_error=error, trailers=tuple(half.trailers),
    )
