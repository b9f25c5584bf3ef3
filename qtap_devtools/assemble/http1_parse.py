"""HTTP/1.x framing: one direction's bytes → message heads and bodies (RFC 9112).

``MessageReader`` is fed one direction of a connection and reports to an owner
(the stitcher in ``http1.py``) through four calls: a head was parsed, the body
passed the size limit, a message ended, something was malformed or cut. It
knows nothing about pairing; the owner tells a response reader which request
method it answers (HEAD and CONNECT change the framing, RFC 9112 §6.3).

Parsing is hand-written on ``bytes.find``/``split``: measured against h11 on the
keep-alive benchmark (``python -m qtap_devtools.assemble.bench_http1``) this is
several times faster, and a passive observer must be more lenient than a server
(it records what was sent, it does not get to refuse it).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from typing import TYPE_CHECKING, Callable, Final

from qtap_devtools.mypyc_attrs import mypyc_attr

if TYPE_CHECKING:
    from .http1 import ConnectionAssembler

# Module constants are Final throughout the compiled modules: mypyc then
# inlines them (or keeps them in C statics) instead of a dictionary lookup of
# the module's globals at every use, several per message here.
MAX_HEAD: Final = 64 * 1024  # header section, start line included
_memoryview: Final = memoryview  # a builtin is looked up at every use from compiled code; a Final is not
# Reads whose timestamps a held buffer keeps apart. Past it (a head, or what
# follows an unanswered Upgrade, trickled in tiny reads: 1 MB a byte at a
# time held ~120 MB of them) reads share the last one's time, on the side
# the stitcher allows (see ``feed``).
MAX_SEGMENTS: Final = 1024
_NO_LATER: Final = 1 << 63  # sorts after every timestamp: (pos, _NO_LATER) follows each segment starting at pos
MAX_LINE: Final = 8 * 1024  # chunk-size line; a partial line kept while resynchronising
# A message the connection's close cut (its bytes were never sent).
CLOSED_IN_REQUEST: Final = "connection closed before the request completed"
CLOSED_IN_RESPONSE: Final = "connection closed before the response completed"
MAX_CONTENT_LENGTH_DIGITS: Final = 18  # < 2**63: anything longer is not a length, it is an attack

TOKEN: Final = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
HEXDIGITS: Final = b"0123456789abcdefABCDEF"
DIGITS: Final = b"0123456789"
VERSIONS: Final = {b"HTTP/1.1": "HTTP/1.1", b"HTTP/1.0": "HTTP/1.0"}
# Most requests start with one of these: plausible at once, without a token scan.
COMMON_METHODS: Final = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"PATCH ", b"OPTIONS ")

# Where a message may start after a gap or a mid-stream join: a whole start line at
# a line start. Methods are restricted to upper case here (not in normal parsing) so
# that body text is less likely to look like a request line.
_REQUEST_LINE = rb"[A-Z][A-Z0-9_\-]{0,19} [^\s]+ HTTP/1\.[01]"
_STATUS_LINE = rb"HTTP/1\.[01] [1-5][0-9][0-9](?:[ \t][^\r\n]*)?"
START_LINE_AT: Final = {
    "request": re.compile(_REQUEST_LINE + rb"\r?\n"),
    "response": re.compile(_STATUS_LINE + rb"\r?\n"),
    None: re.compile(rb"(?:(" + _STATUS_LINE + rb")|" + _REQUEST_LINE + rb")\r?\n"),
}
# Every start line, request or status, contains this: seeking looks for it with
# bytes.find (memchr speed) and tries the pattern only at the line holding it.
# A regex search from every position was the agent's hottest loop when a capture
# gap left it seeking through megabytes of body.
START_MARK: Final = b"HTTP/1."

# Reader states.
HEAD: Final = 0
LENGTH: Final = 1
CHUNK_SIZE: Final = 2
CHUNK_DATA: Final = 3
CHUNK_END: Final = 4
TRAILERS: Final = 5
CLOSE: Final = 6
SEEK: Final = 7
PAUSED: Final = 8
DEAD: Final = 9

# Body framings.
NO_BODY: Final = 0
BY_LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3
TUNNEL: Final = 4


class MalformedMessage(Exception):
    """The bytes break HTTP/1 framing; the reader resynchronises after it."""


class NotHttp1(MalformedMessage):
    """The bytes do not even start like HTTP/1 (TLS records, HTTP/2 preface, binary)."""


@mypyc_attr(acyclic=True)  # strs and lists of them: in no cycle (mypyc_attrs)
class Head:
    """A parsed start line and header section, plus what framing needs from it."""

    __slots__ = (
        "is_request", "method", "target", "version", "status", "reason", "headers",
        "content_length", "transfer_encoding", "chunked", "close", "upgrade", "content_encoding",
    )

    def __init__(self, is_request: bool) -> None:
        self.is_request = is_request
        self.method = ""
        self.target = ""
        self.version = ""
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.transfer_encoding: str | None = None
        self.chunked = False
        self.close = False
        self.upgrade = False
        self.content_encoding: str | None = None


def new_head(is_request: bool, method: str, target: str, version: str, status: int, reason: str,
             headers: list[tuple[str, str]], content_length: int | None, close: bool) -> Head:
    """A Head as ``_headparse`` reads one: made by one call from C, not set field by field."""
    head = Head(is_request)
    head.method = method
    head.target = target
    head.version = version
    head.status = status
    head.reason = reason
    head.headers = headers
    head.content_length = content_length
    head.close = close
    return head


def split_head(head: bytes) -> list[bytes]:
    """Lines of a header section; CRLF is the rule, bare LF is tolerated (RFC 9112 §2.2)."""
    if head.endswith(b"\r"):
        head = head[:-1]
    if head.count(b"\n") == head.count(b"\r\n"):
        return head.split(b"\r\n")
    return [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]


def parse_head_py(head: bytes | bytearray, is_request: bool) -> Head:
    """The reference parser: every shape of head, every error worded."""
    lines = split_head(head if type(head) is bytes else bytes(head))
    msg = Head(is_request)
    line = lines[0]
    if is_request:
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[0] or parts[0].translate(None, TOKEN):
            raise NotHttp1(f"bad request line {bytes(line[:60])!r}")
        version = VERSIONS.get(parts[2])
        if version is None or not parts[1]:
            # Includes the HTTP/2 preface "PRI * HTTP/2.0" (RFC 9113 §3.4).
            raise NotHttp1(f"bad request line {bytes(line[:60])!r}")
        msg.method = parts[0].decode("ascii")
        msg.target = parts[1].decode("latin-1")
        msg.version = version
    else:
        vers, _, rest = line.partition(b" ")
        version = VERSIONS.get(vers)
        if version is None:
            raise NotHttp1(f"bad status line {bytes(line[:60])!r}")
        code = rest[:3]
        if len(code) != 3 or code.translate(None, DIGITS) or rest[3:4] not in (b"", b" "):
            raise NotHttp1(f"bad status line {bytes(line[:60])!r}")
        msg.version = version
        msg.status = int(code)
        msg.reason = rest[4:].decode("latin-1")
    headers = msg.headers
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            # obs-fold (RFC 9112 §5.2): replaced with a space, as a user agent
            # reads a response and as a server may read a request (or refuse
            # it, with a 400 the transaction then shows).  Which the server
            # did cannot be told here: rejected, a request it answered was
            # lost and the exchange after it marked a capture gap.
            if not headers:
                raise MalformedMessage("obsolete line folding in header section")
            key, text = headers[-1]
            more = line.strip(b" \t").decode("latin-1")
            headers[-1] = (key, f"{text} {more}" if text and more else text or more)
            continue
        name, sep, value = line.partition(b":")
        if not is_request:
            # Space before the colon: a server must reject it in a request; in
            # a response a proxy removes it (§5.1), and clients read the field.
            name = name.rstrip(b" \t")
        if not sep or not name or name.translate(None, TOKEN):
            raise MalformedMessage(f"bad header line {bytes(line[:60])!r}")
        headers.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    for key, text in headers:  # after folding: a framing header's value is whole
        lkey = key.lower()
        if lkey in _FRAMING_HEADERS:
            _framing_header(msg, lkey, text)
    return msg


_FRAMING_HEADERS: Final = frozenset(("content-length", "transfer-encoding", "connection", "upgrade", "content-encoding"))


def _framing_header(msg: Head, lkey: str, value: str) -> None:
    if lkey == "content-length":
        # RFC 9110 §8.6: a list of identical values may be taken as that value.
        # A comma is rare: only then build the set (this runs for nearly every message).
        values = {v.strip() for v in value.split(",")} if "," in value else {value}
        if msg.content_length is not None:
            values.add(str(msg.content_length))
        if len(values) != 1:
            raise MalformedMessage(f"conflicting Content-Length {value[:40]!r}")
        text = values.pop()
        if not text or not text.isascii() or not text.isdigit() or len(text) > MAX_CONTENT_LENGTH_DIGITS:
            raise MalformedMessage(f"bad Content-Length {value[:40]!r}")
        if msg.content_length is None or int(text) == msg.content_length:
            msg.content_length = int(text)
    elif lkey == "transfer-encoding":
        msg.transfer_encoding = f"{msg.transfer_encoding}, {value}" if msg.transfer_encoding else value
        codings = [c.strip().lower() for c in msg.transfer_encoding.split(",") if c.strip()]
        msg.chunked = bool(codings) and codings[-1] == "chunked"
    elif lkey == "connection":
        if "," in value:
            closing = "close" in {t.strip().lower() for t in value.split(",")}
        else:
            closing = value.strip().lower() == "close"
        msg.close = msg.close or closing
    elif lkey == "upgrade":
        msg.upgrade = True
    else:
        msg.content_encoding = f"{msg.content_encoding}, {value}" if msg.content_encoding else value


def plausible_start_py(work: bytes | bytearray, pos: int, end: int, is_request: bool) -> bool:
    """Whether a message could start at ``work[pos]``: non-HTTP is refused at
    once (a TLS record has no newline to wait for)."""
    if not is_request:
        if work.startswith(b"HTTP/", pos):
            return True
        return b"HTTP/".startswith(work[pos : pos + 5])
    if work.startswith(COMMON_METHODS, pos):  # the usual case: one call, no copy
        return True
    space = work.find(b" ", pos, pos + 24)
    token = work[pos : space if space >= 0 else min(end, pos + 24)]
    if space < 0 and len(token) >= 24:
        return False
    return not token.translate(None, TOKEN)


def head_end_py(buf: bytes | bytearray, start: int, limit: int) -> int:
    """Where the head in ``buf[start:limit]`` ends: the index of the LF that
    starts its blank line (LF LF, or LF CR LF), or -1 while there is none."""
    lf = buf.find(b"\n\r\n", start, limit)
    lf2 = buf.find(b"\n\n", start, lf + 2 if lf >= 0 else limit)
    return lf2 if lf2 >= 0 and (lf < 0 or lf2 <= lf) else lf


# The common case in C (``_headparse.c``): same Head, same errors (it hands
# anything unusual to parse_head_py).  Built by ``make setup``; without it the
# Python parser does everything, slower.
try:
    from qtap_devtools.assemble import _headparse  # type: ignore[attr-defined]
except ImportError:
    _headparse = None
else:
    _headparse.configure(new_head, _framing_header, parse_head_py, MAX_HEAD)
# Typed as what they return: chosen from an untyped module, they would be Any,
# and compiled code would treat every result generically (a head's end offset
# added and compared through the number protocol).
parse_head: Final[Callable[[bytes | bytearray, bool], Head]] = (
    parse_head_py if _headparse is None else _headparse.parse_head)


def parse_head_at_py(buf: bytes | bytearray, start: int, stop: int, is_request: bool) -> Head:
    """``parse_head(buf[start:stop], is_request)``: the C one reads the buffer in place."""
    return parse_head_py(buf[start:stop], is_request)


parse_head_at: Final[Callable[[bytes | bytearray, int, int, bool], Head]] = (
    parse_head_at_py if _headparse is None else _headparse.parse_head_at)


def read_head_py(buf: bytes | bytearray, pos: int, end: int, scan: int, is_request: bool) -> tuple[Head, int] | None:
    """The reader's usual step at once: the head starting at ``buf[pos]`` and
    where what follows it starts, when nothing about it is unusual (a blank
    line before it, implausible, not all here, too long, malformed: None, and
    the reader goes step by step).  ``scan``: where to search for its end
    (searched before up to there).  The C one declines more (what its fast
    parser does not take) and is the same where it answers."""
    if pos >= end or buf[pos] in (10, 13) or not plausible_start_py(buf[:end], pos, end, is_request):
        return None
    stop = head_end_py(buf, scan, min(end, pos + MAX_HEAD))
    if stop < 0:
        return None
    try:
        head = parse_head_py(buf[pos:stop], is_request)
    except MalformedMessage:
        return None
    return head, stop + (2 if buf[stop + 1] == 10 else 3)


read_head: Final[Callable[[bytes | bytearray, int, int, int, bool], tuple[Head, int] | None]] = (
    read_head_py if _headparse is None else _headparse.read_head)
head_end: Final[Callable[[bytes | bytearray, int, int], int]] = (
    head_end_py if _headparse is None else _headparse.head_end)
plausible_start: Final[Callable[[bytes | bytearray, int, int, bool], bool]] = (
    plausible_start_py if _headparse is None else _headparse.plausible_start)


def request_framing(head: Head) -> int:
    """RFC 9112 §6.3 for requests: chunked, Content-Length, or no body."""
    if head.transfer_encoding is not None:
        if not head.chunked:
            raise MalformedMessage("request Transfer-Encoding does not end in chunked")
        return CHUNKED
    if head.content_length:
        return BY_LENGTH
    return NO_BODY


def response_framing(head: Head, request_method: str | None) -> int:
    """RFC 9112 §6.3 for responses; the request method matters for HEAD and CONNECT."""
    status = head.status
    if status == 101:
        return TUNNEL
    if request_method == "CONNECT" and 200 <= status < 300:
        return TUNNEL
    if request_method == "HEAD" or status < 200 or status == 204 or status == 304:
        return NO_BODY
    if head.transfer_encoding is not None:
        return CHUNKED if head.chunked else UNTIL_CLOSE  # §6.3 item 4: read until close
    if head.content_length is not None:
        return BY_LENGTH if head.content_length else NO_BODY
    return UNTIL_CLOSE


class Message:
    """One message as it is being read; turned into model objects when emitted."""

    __slots__ = (
        "head", "start_ns", "end_ns", "wire_bytes", "body", "body_wire_size", "keep_body",
        "truncated", "over_limit", "incomplete", "trailers", "framing", "request_method", "exchange",
    )

    def __init__(self, head: Head, start_ns: int, wire_bytes: int) -> None:
        self.head = head
        self.start_ns = start_ns
        self.end_ns = start_ns
        self.wire_bytes = wire_bytes
        self.body = bytearray()
        self.body_wire_size = 0
        self.keep_body = True
        self.truncated = False
        self.over_limit = False
        self.incomplete = False
        self.trailers: list[tuple[str, str]] = []
        self.framing = NO_BODY
        self.request_method: str | None = None
        self.exchange: object = None  # the stitcher's record for it


def _find_start_line(pattern: re.Pattern, work: bytes | bytearray, pos: int, end: int) -> re.Match | None:
    """The first whole start line beginning at a line start at or after ``pos``
    (itself a line start)."""
    mark = work.find(START_MARK, pos, end)
    while mark >= 0:
        line = work.rfind(b"\n", pos, mark) + 1 or pos
        found = pattern.match(work, line, end)
        if found is not None:
            return found
        nl = work.find(b"\n", mark, end)
        if nl < 0:
            return None
        mark = work.find(START_MARK, nl + 1, end)
    return None


class MessageReader:
    """One direction's framing state machine.

    ``kind`` is "request", "response", or None while a connection of unknown role
    has not shown a start line yet. A reader that joined mid-stream starts in SEEK,
    discarding bytes until a start line at a line start.
    """

    def __init__(self, owner: ConnectionAssembler, kind: str | None, max_body_bytes: int, *, joined: bool) -> None:
        # The owner is told: on_head, on_end, on_cut, on_malformed, on_kind.  Typed
        # as the one class it is, not a Protocol, so that mypyc calls these
        # directly instead of looking each up by name (1 % of the instructions).
        self.owner = owner
        self.kind = kind
        self.max_body = max_body_bytes
        self.state = SEEK if joined else HEAD
        self.buf = bytearray()
        self.segments: list[tuple[int, int]] = []  # (buffer index, capture timestamp)
        self._scanned = 0  # a head still arriving: how much of it has been searched for its end
        self.last_ns = 0
        self.msg: Message | None = None
        self.remaining = 0
        self.discarded = 0
        self.at_stream_start = not joined  # nothing parsed yet and byte 0 was seen
        self.line_start = True  # in SEEK: the buffer begins at a line start

    # ---- feeding

    def feed(self, data: bytes, ts: int) -> None:
        if self.state == DEAD:
            self.discarded += len(data)
            return
        self.last_ns = ts
        if self.buf:
            segs = self.segments
            if len(segs) < MAX_SEGMENTS:
                segs.append((len(self.buf), ts))
            elif self.kind == "response":
                segs[-1] = (segs[-1][0], ts)  # the last segment's bytes look later: a response never earlier
            # else the new bytes take the last segment's time: a request never looks later
            self.buf += data
            self._consume(self.buf, ts)
        else:
            self.segments = [(0, ts)]
            self._consume(data, ts)

    def _consume(self, work: bytes | bytearray, ts: int) -> None:
        pos = self._run(work, 0, ts)
        end = len(work)
        if pos >= end or self.state == DEAD:
            if work is self.buf:  # else the buffer is empty already, and the next feed sets the segments
                self.buf = bytearray()
                self.segments = []
        else:
            if work is self.buf:
                del self.buf[:pos]
            else:
                self.buf = bytearray(work[pos:])
            if pos:  # nothing read (a head still arriving): the segments stand as they are
                segs = self.segments
                kept = [(max(start - pos, 0), t) for i, (start, t) in enumerate(segs)
                        if i + 1 == len(segs) or segs[i + 1][0] > pos]
                self.segments = kept
        # What is left in HEAD state is one head still arriving, searched to its
        # end for the blank line: the next bytes are searched from there on.
        # (Fed a byte at a time, a head is otherwise searched, and its segments
        # walked, once per byte: quadratic in its size.)
        self._scanned = len(self.buf) if self.state == HEAD else 0
        if self.state == PAUSED and len(self.buf) > self.max_body + MAX_HEAD:
            # Whatever follows an unanswered Upgrade request is too much to hold: give up.
            self.discarded += len(self.buf)
            self.buf = bytearray()
            self._scanned = 0
            self.segments = []
            self.state = DEAD

    def ts_at(self, pos: int) -> int:
        """Timestamp of the capture that carried byte ``pos`` of the data being read.

        Exact, not approximate: the stitcher's gap recovery relies on a request
        never looking later, nor a response earlier, than it really was.
        """
        segs = self.segments
        i = bisect_right(segs, (pos, _NO_LATER)) - 1  # the last segment starting at or before pos
        return segs[i][1] if i >= 0 else self.last_ns

    @property
    def buffered_since(self) -> int | None:
        """Timestamp of the first byte waiting in the buffer, if any."""
        return self.segments[0][1] if self.buf and self.segments else None

    def _run(self, work: bytes | bytearray, pos: int, ts: int) -> int:
        end = len(work)
        view: memoryview | None = None  # made for a body: most requests have none
        try:
            while pos < end:
                state = self.state
                if state == HEAD:
                    segs = self.segments  # one segment: the usual case, no search
                    nxt = self._head(work, pos, end, segs[0][1] if len(segs) == 1 else self.ts_at(pos), ts)
                    if nxt < 0:
                        break
                    pos = nxt
                elif state == LENGTH or state == CHUNK_DATA:
                    take = min(self.remaining, end - pos)
                    if view is None:
                        view = _memoryview(work)
                    self._body(view[pos : pos + take])
                    pos += take
                    self.remaining -= take
                    if not self.remaining:
                        if state == LENGTH:
                            self._finish(ts)
                        else:
                            self.state = CHUNK_END
                elif state == CLOSE:
                    if view is None:
                        view = _memoryview(work)
                    self._body(view[pos:end])
                    pos = end
                elif state == CHUNK_SIZE:
                    nxt = self._chunk_size(work, pos, end)
                    if nxt < 0:
                        break
                    pos = nxt
                elif state == CHUNK_END:
                    # CRLF after chunk data; a bare LF is tolerated like everywhere else.
                    byte = work[pos]
                    if byte == 13 and pos + 1 >= end:
                        break
                    if byte == 10:
                        used = 1
                    elif byte == 13 and work[pos + 1] == 10:
                        used = 2
                    else:
                        self._bad_body("missing CRLF after chunk data")
                        continue
                    pos += used
                    msg = self.msg
                    assert msg is not None  # narrowed: a native field, not a generic attribute
                    msg.wire_bytes += used
                    self.state = CHUNK_SIZE
                elif state == TRAILERS:
                    nxt = self._trailer(work, pos, end, ts)
                    if nxt < 0:
                        break
                    pos = nxt
                elif state == SEEK:
                    nxt = self._seek(work, pos, end)
                    if nxt < 0:
                        return -nxt - 1  # nothing found: keep from there
                    pos = nxt
                elif state == PAUSED:
                    break
                else:  # DEAD
                    self.discarded += end - pos
                    return end
        finally:
            # A view of the stream's own buffer must be gone before _consume
            # resizes it; one of a record's bytes (most) goes with this frame.
            if view is not None and work is self.buf:
                view.release()
        return pos

    def _head(self, work: bytes | bytearray, pos: int, end: int, start_ns: int, ts: int) -> int:
        scan = pos
        if pos == 0 and work is self.buf and self._scanned > 2:
            scan = self._scanned - 2  # searched before, and since then only bytes were added
        is_request = self.kind == "request"
        found = read_head(work, pos, end, scan, is_request)
        if found is not None:
            return self._started(found[0], pos, found[1], start_ns, ts)
        # Step by step: blank lines first, then every way a head can be unusual.
        # RFC 9112 §2.2: empty lines before a request line are ignored.
        start = pos
        while pos < end:
            byte: int = work[pos]  # typed: one generic read, compared natively
            if byte != 13 and byte != 10:
                break
            pos += 1
            self.discarded += 1
        if pos >= end:
            return end
        if not plausible_start(work, pos, end, is_request):
            self._malformed("not an HTTP/1 message start", True)
            return end if self.state == DEAD else pos
        if scan < pos:  # past blank lines
            scan = pos
        stop = head_end(work, scan, pos + MAX_HEAD)
        if stop < 0:
            if end - pos >= MAX_HEAD:
                # Binary that happened to start with a token is "not HTTP", not an error.
                looks_http = START_LINE_AT[self.kind].match(work, pos) is not None  # type: ignore[index]
                self._malformed(f"header section exceeds {MAX_HEAD} bytes", not looks_http)
                return end if self.state == DEAD else pos
            # The rest of the head is still to come.  Blank lines skipped now
            # are consumed (the next call finds none and waits): left in the
            # buffer, they were counted again at every feed until the head ended.
            return -1 if pos == start else pos
        after: int = work[stop + 1]
        nxt = stop + (2 if after == 10 else 3)  # past LF LF, or LF CR LF
        try:
            head = parse_head_at(work, pos, stop, is_request)
        except MalformedMessage as exc:
            self._malformed(str(exc), isinstance(exc, NotHttp1))
            if self.state == DEAD:
                return end
            self.discarded += nxt - pos
            self.line_start = True
            return nxt
        return self._started(head, pos, nxt, start_ns, ts)

    def _started(self, head: Head, pos: int, nxt: int, start_ns: int, ts: int) -> int:
        """A message whose head is ``work[pos:nxt]`` begins: the owner is told,
        and its body framing chosen."""
        self.at_stream_start = False
        msg = Message(head, start_ns, nxt - pos)
        msg.end_ns = ts
        self.msg = msg
        self.owner.on_head(self, msg)
        if self.msg is not msg:  # the owner stopped this reader (upgrade, other)
            return nxt
        try:
            framing = request_framing(head) if head.is_request else response_framing(head, msg.request_method)
        except MalformedMessage as exc:
            self.msg = None
            self.owner.on_cut(self, msg, f"malformed request: {exc}", True)
            self._resync()
            return nxt
        msg.framing = framing
        if framing == NO_BODY or framing == TUNNEL:
            self._finish(ts)
        elif framing == BY_LENGTH:
            self.remaining = head.content_length  # type: ignore[assignment]
            self.state = LENGTH
        elif framing == CHUNKED:
            self.state = CHUNK_SIZE
        else:
            self.state = CLOSE
        return nxt

    def _body(self, chunk: memoryview) -> None:
        msg = self.msg
        # Narrowed from Message | None: mypyc reads and writes a union's
        # attributes generically (~170 instructions each), a Message's natively.
        assert msg is not None
        size = len(chunk)
        msg.body_wire_size += size
        msg.wire_bytes += size
        msg.end_ns = self.last_ns
        if not msg.keep_body:
            self.discarded += size
            return
        room = self.max_body - len(msg.body)
        if size <= room:
            msg.body += chunk
            return
        # Past the limit: keep the prefix, follow framing for the rest without storing it.
        msg.body += chunk[:room]
        msg.truncated = msg.over_limit = True
        msg.keep_body = False
        self.discarded += size - room

    def _chunk_size(self, work: bytes | bytearray, pos: int, end: int) -> int:
        lf = work.find(b"\n", pos, pos + MAX_LINE)
        if lf < 0:
            if end - pos >= MAX_LINE:
                self._bad_body("chunk-size line too long")
                return pos
            return -1
        line = work[pos:lf]
        size_text = line.split(b";", 1)[0].strip(b" \t\r")  # chunk extensions ignored (§7.1.1)
        if not size_text or len(size_text) > 16 or size_text.translate(None, HEXDIGITS):
            self._bad_body(f"bad chunk size {bytes(line[:40])!r}")
            return pos
        msg = self.msg
        assert msg is not None
        msg.wire_bytes += lf + 1 - pos
        size = int(size_text, 16)
        if size:
            self.remaining = size
            self.state = CHUNK_DATA
        else:
            self.state = TRAILERS
            self.remaining = 0  # counts trailer-section bytes against MAX_HEAD
        return lf + 1

    def _trailer(self, work: bytes | bytearray, pos: int, end: int, ts: int) -> int:
        lf = work.find(b"\n", pos, pos + MAX_HEAD)
        if lf < 0:
            if end - pos >= MAX_HEAD:
                self._bad_body("trailer section too long")
                return pos
            return -1
        msg = self.msg
        assert msg is not None
        msg.wire_bytes += lf + 1 - pos
        line = bytes(work[pos:lf])
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._finish(ts)
            return lf + 1
        self.remaining += lf + 1 - pos
        if self.remaining > MAX_HEAD:
            self._bad_body("trailer section too long")
            return lf + 1
        name, sep, value = line.partition(b":")
        if sep and name and not name.translate(None, TOKEN):
            msg.trailers.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
        return lf + 1

    def _seek(self, work: bytes | bytearray, pos: int, end: int) -> int:
        """Find the next start line: its position, or ``-(where to keep from) - 1``."""
        if not self.line_start:
            lf = work.find(b"\n", pos)
            if lf < 0:
                self.discarded += end - pos
                return -end - 1
            self.discarded += lf + 1 - pos
            pos = lf + 1
            self.line_start = True
        found = _find_start_line(START_LINE_AT[self.kind], work, pos, end)
        if found is None:
            # Keep the last partial line: it may become a start line with more data.
            last = work.rfind(b"\n", pos)
            keep = pos if last < 0 else last + 1
            if end - keep > MAX_LINE:
                keep = end
                self.line_start = False
            self.discarded += keep - pos
            return -keep - 1
        start = found.start()
        self.discarded += start - pos
        if self.kind is None:
            self.owner.on_kind(self, "response" if found.group(1) else "request")
        self.state = HEAD
        return start

    # ---- endings

    def _finish(self, ts: int) -> None:
        msg = self.msg
        assert msg is not None
        self.msg = None
        msg.end_ns = ts
        head = msg.head
        if head.is_request and (head.upgrade or head.method == "CONNECT"):
            # What follows may not be HTTP: wait for the response to say (RFC 9110 §7.8).
            self.state = PAUSED
        else:
            self.state = HEAD
        self.owner.on_end(self, msg)

    def _bad_body(self, reason: str) -> None:
        msg = self.msg
        self.msg = None
        self._resync()
        what = "request" if self.kind == "request" else "response"
        self.owner.on_cut(self, msg, f"malformed {what} body: {reason}", True)  # type: ignore[arg-type]

    def _malformed(self, reason: str, not_http: bool) -> None:
        """A bad head at a message boundary. The caller decides where seeking resumes;
        by default the offending line is skipped so the same start is not found again."""
        first = self.at_stream_start
        self._resync()
        self.line_start = False
        self.owner.on_malformed(self, reason, not_http and first)

    def _resync(self) -> None:
        if self.state != DEAD:
            self.state = SEEK
            self.line_start = True
        self.remaining = 0

    # ---- control from the owner

    def resume(self) -> None:
        """The response to an Upgrade/CONNECT request declined it: parse what waited."""
        if self.state != PAUSED:
            return
        self.state = HEAD
        if self.buf:
            self._consume(self.buf, self.last_ns)

    def keep_reading(self) -> None:
        """From ``on_end``: the Upgrade/CONNECT request just ended was declined
        already (answered before its body ended): go on reading HTTP."""
        if self.state == PAUSED:
            self.state = HEAD

    def stop(self) -> None:
        """No more HTTP on this direction (upgraded, or not HTTP at all)."""
        self.discarded += len(self.buf)
        self.buf = bytearray()
        self._scanned = 0
        self.segments = []
        self.msg = None
        self.state = DEAD

    def skip_rest(self) -> None:
        """The current message was emitted early: follow its framing, keep nothing more."""
        if self.msg is not None:
            self.msg.keep_body = False

    def gap(self, lost: int, ts: int) -> Message | bool:
        """``lost`` bytes never arrived before the next data.

        Returns True when framing survives it (the hole lies inside a body of known
        length, or in a read-until-close body), False when the reader must
        resynchronise with no message cut, or the cut message.
        """
        state = self.state
        if state == DEAD:
            self.discarded += lost
            return True
        if state == SEEK:
            self.buf.clear()
            self._scanned = 0
            self.line_start = True  # the next data may well begin a message
            return True
        msg = self.msg
        if msg is not None and state == CHUNK_DATA and lost == self.remaining + 2 and not self.buf:
            # The hole ends with the chunk's data and its CRLF: one call wrote
            # the chunk whole, past what a call's records carry (a node server's
            # res.write of 2 MiB).  The next bytes are a chunk-size line.
            msg.incomplete = True
            msg.truncated = True
            msg.keep_body = False
            msg.body_wire_size += self.remaining
            msg.wire_bytes += lost
            self.remaining = 0
            self.state = CHUNK_SIZE
            return True
        if msg is not None and (
            state == CLOSE or ((state == LENGTH or state == CHUNK_DATA) and lost <= self.remaining and not self.buf)
        ):
            msg.incomplete = True
            msg.truncated = True
            msg.keep_body = False  # what follows the hole is not contiguous with what we kept
            msg.body_wire_size += lost  # moved, if not captured: the message's real sizes
            msg.wire_bytes += lost
            if state != CLOSE:
                self.remaining -= lost
                if not self.remaining:
                    if state == LENGTH:
                        self._finish(ts)
                    else:
                        self.state = CHUNK_END
            return True
        self.msg = None
        self.at_stream_start = False
        self.discarded += len(self.buf)
        self.buf.clear()
        self._scanned = 0
        self.state = SEEK
        self.line_start = True
        if msg is not None:
            msg.incomplete = True
            msg.truncated = True
            return msg
        return False

    def close(self, ts: int) -> None:
        msg = self.msg
        self.msg = None
        self.discarded += len(self.buf)
        self.buf.clear()
        self._scanned = 0
        state = self.state
        self.state = DEAD
        if msg is None:
            return
        if state == CLOSE:
            msg.end_ns = self.last_ns
            self.owner.on_end(self, msg)
        else:
            # Cut by the close: its bytes were never sent, not lost to the
            # capture, so not ``incomplete`` (a gap); cut, with its error.
            if state != TRAILERS:  # cut inside its body: say so, as a cut compressed body does
                msg.truncated = True
            self.owner.on_cut(self, msg, CLOSED_IN_REQUEST if self.kind == "request" else CLOSED_IN_RESPONSE, False)
