"""The per-connection stitcher: two framing readers in, ``HttpExchange`` values out.

Pairing rule. HTTP/1 answers requests in order (RFC 9112 §9.3.2), so with both
directions intact the n-th final response answers the n-th request. A capture gap
that framing cannot bridge loses an unknown number of messages, and from then on
an index-based pairing could be off by one without any sign of it. We only pair
what can be proved:

* a request-direction gap: the requests already seen still get the next responses
  in order (the response stream is intact); later requests and responses are
  emitted unpaired, for good — nothing in HTTP/1 says how many requests were lost;
* a response-direction gap: the requests stay queued. A response starting at time
  t answers a queued request that started at or before t, and at least
  ``min_lost`` final responses precede it (a response cut by the gap was paired
  before it; each response since emitted unpaired adds one). If exactly one
  queued position fits both, pairing resumes there — e.g. a download cut by a
  gap, then the next non-pipelined exchange; otherwise the response is emitted
  unpaired and counted. This relies on both directions being fed in
  timestamp order, as the capture ring buffer delivers them.

Every exchange a gap touched, paired or not, is marked ``incomplete``.
"""

from __future__ import annotations

from typing import Final, Literal

from .body import decode_body
from .http1_parse import CHUNKED, CLOSED_IN_REQUEST, CLOSED_IN_RESPONSE, DEAD, HEAD, PAUSED, Message, MessageReader
from .model import MAX_INFORMATIONAL, SHED_END_UNSEEN, HttpExchange, HttpRequest, HttpResponse
from .offsets import place

Role = Literal["client", "server", "unknown"]
Direction = Literal["egress", "ingress"]

MAX_PENDING: Final = 64  # requests awaiting a response; a pipelining flood beyond is not paired

NO_RESPONSE_GAP: Final = "response not captured (capture gap)"
NO_REQUEST_GAP: Final = "request not captured (capture gap)"
NO_REQUEST: Final = "response without a request"
CLOSED_BEFORE_RESPONSE: Final = "connection closed before response"


class _Exchange:
    """An exchange being put together; frozen into ``HttpExchange`` when emitted."""

    __slots__ = (
        "request", "response", "informational", "response_start_ns", "interim_bytes",
        "request_done", "response_done", "incomplete", "error", "unpaired", "emitted",
        "partial", "upgraded", "end_ns", "shed",
    )

    def __init__(self, request: Message | None = None) -> None:
        self.request = request
        self.response: Message | None = None
        self.informational: list[int] = []
        self.response_start_ns: int | None = None
        self.interim_bytes = 0
        self.request_done = request is None
        self.response_done = False
        self.incomplete = False
        self.error: str | None = None
        self.unpaired = False
        self.emitted = False
        self.partial = False
        self.upgraded = False
        self.end_ns: int | None = None
        self.shed = False  # the probes left some of its bytes out on purpose (overload)


class ConnectionAssembler:
    """Sans-IO HTTP/1.x reassembly for one TCP connection.

    ``direction`` is from the observed process: "egress" it wrote, "ingress" it
    read. Every method returns the exchanges completed by that call.
    """

    def __init__(
        self,
        *,
        role: Role,
        max_body_bytes: int = 1 << 20,
        stream_limit_ns: int = 10_000_000_000,
    ) -> None:
        if role not in ("client", "server", "unknown"):
            raise ValueError(f"role must be client, server or unknown, not {role!r}")
        self.role = role
        self.protocol: Literal["unknown", "http1", "other"] = "unknown"
        self.upgraded = False
        self.max_body_bytes = max_body_bytes
        self.stream_limit_ns = stream_limit_ns
        self._out: list[HttpExchange] = []
        self._next_offset: dict[str, int | None] = {"egress": None, "ingress": None}
        self._overlap_discarded = 0
        # Requests awaiting their final response, oldest first: a list (at
        # most MAX_PENDING; nearly always one), whose append and pop(0) are
        # native calls where a deque's are method lookups.
        self._pending: list[_Exchange] = []
        self._req_synced = True
        self._resp_synced = True
        self._min_lost = 0  # responses known to precede the next one, since the last sync point
        self._orphans = 0  # responses owed to requests dropped from a full queue
        self._last_request: Message | None = None
        self._closed = False
        if role == "unknown":
            # Joined mid-connection: no counts are known on either side, so nothing is
            # paired (the first start line seen decides which direction is which).
            self._dead = True
            egress = MessageReader(self, None, max_body_bytes, joined=True)
            ingress = MessageReader(self, None, max_body_bytes, joined=True)
            self._requests: MessageReader | None = None
            self._responses: MessageReader | None = None
        else:
            self._dead = False
            request_kind, response_kind = ("request", "response") if role == "client" else ("response", "request")
            egress = MessageReader(self, request_kind, max_body_bytes, joined=False)
            ingress = MessageReader(self, response_kind, max_body_bytes, joined=False)
            self._requests, self._responses = (egress, ingress) if role == "client" else (ingress, egress)
        self._readers = {"egress": egress, "ingress": ingress}

    @property
    def discarded_bytes(self) -> int:
        """Bytes seen but not kept: past body limits, skipped while resynchronising,
        after an upgrade, duplicates, or not HTTP at all."""
        return self._overlap_discarded + sum(r.discarded for r in self._readers.values())

    def position(self, direction: Direction) -> int | None:
        """The stream offset the next byte in ``direction`` should have; None before any."""
        return self._next_offset[direction]

    # ---- the sans-IO interface

    def on_data(self, direction: Direction, data: bytes, ts_ns: int, offset: int | None = None,
                shed: bool = False) -> list[HttpExchange]:
        """``shed``: the capture was leaving bytes out on purpose when ``data`` was
        taken, so a gap before it is (at least partly) that, not a loss."""
        reader = self._readers[direction]
        out = self._out = []
        if self._closed:
            self._overlap_discarded += len(data)
            return out
        next_offset = self._next_offset
        expected = next_offset[direction]
        if offset is not None and expected is not None and offset == expected:
            next_offset[direction] = offset + len(data)  # in order, as nearly every chunk is
        else:
            data, gap, seen = place(next_offset, direction, data, offset)
            self._overlap_discarded += seen
            if gap:
                self._gap(reader, gap, ts_ns, shed)
        if data:
            reader.feed(data, ts_ns)
            self._check_stream_limits(ts_ns)
        return out

    def on_tick(self, now_ns: int) -> list[HttpExchange]:
        out = self._out = []
        if not self._closed:
            self._check_stream_limits(now_ns)
        return out

    def on_close(self, ts_ns: int) -> list[HttpExchange]:
        out = self._out = []
        if self._closed:
            return out
        self._closed = True
        for reader in (self._requests, self._responses) if self._requests else self._readers.values():
            reader.close(ts_ns)  # type: ignore[union-attr]
        pending, self._pending = self._pending, []
        for ex in pending:
            if not ex.emitted:
                ex.request_done = True
                ex.end_ns = ts_ns
                if not self._resp_synced:
                    ex.incomplete = True
                ex.error = ex.error or (CLOSED_BEFORE_RESPONSE if self._resp_synced else NO_RESPONSE_GAP)
                self._emit(ex)
        self._dead = True
        # Readers and assembler point at each other; a closed one is fed no
        # more, so the cycle is cut here and a connection is freed on the spot.
        for reader in self._readers.values():
            reader.owner = None  # type: ignore[assignment]
        return out

    # ---- capture gaps

    def _gap(self, reader: MessageReader, lost: int, ts: int, shed: bool = False) -> None:
        msg = reader.msg
        if shed and msg is not None and msg.exchange is not None:
            msg.exchange.shed = True  # type: ignore[attr-defined]  # before reader.gap: the hole may end the message
        result = reader.gap(lost, ts)
        if result is True or reader.kind is None:
            return
        if isinstance(result, Message):
            self._cut(reader, result, None)
        if reader is self._requests:
            self._request_stream_lost()
        else:
            self._response_stream_lost()

    def _request_stream_lost(self) -> None:
        if self._dead:
            return
        self._req_synced = False
        if not self._resp_synced or self._orphans:
            self._stop_pairing()

    def _response_stream_lost(self) -> None:
        # Even when the hole starts at a message boundary we cannot count a lost final
        # response: the hole may hold only 1xx ones (100 Continue, 103 Early Hints).
        if self._dead:
            return
        if not self._req_synced or self._orphans:
            self._stop_pairing()
            return
        if self._resp_synced:
            self._resp_synced = False
            self._min_lost = 0
        self._trim_pending()

    def _stop_pairing(self) -> None:
        self._dead = True
        pending, self._pending = self._pending, []
        for ex in pending:
            self._give_up(ex, NO_RESPONSE_GAP)

    def _give_up(self, ex: _Exchange, error: str) -> None:
        ex.unpaired = True
        ex.incomplete = True
        ex.error = ex.error or error
        if ex.request_done:
            self._emit(ex)

    def _trim_pending(self) -> None:
        while len(self._pending) > MAX_PENDING:
            if self._resp_synced:
                self._give_up(self._pending.pop(0), "response not awaited: too many pipelined requests")
                self._orphans += 1
            elif self._min_lost:
                # The first response since the sync point has happened: move the point past it.
                self._give_up(self._pending.pop(0), NO_RESPONSE_GAP)
                self._min_lost -= 1
            else:
                self._stop_pairing()
                return

    # ---- pairing

    def _pair(self, msg: Message, interim: bool) -> _Exchange | None:
        if self._dead:
            return None
        if not self._resp_synced:
            return self._repair(msg, interim)
        if self._orphans:
            if not interim:
                self._orphans -= 1
            return None
        if not self._pending:
            if self._req_synced and not interim:
                # Unsolicited, or fed out of order: either way the counts no longer line up.
                self._stop_pairing()
            return None
        return self._pending[0] if interim else self._pending.pop(0)

    def _repair(self, msg: Message, interim: bool) -> _Exchange | None:
        """After a response-direction gap: pair again only if one position fits."""
        start = msg.start_ns
        candidates = 0
        for ex in self._pending:
            if ex.request is None or ex.request.start_ns > start:  # type: ignore[union-attr]
                break
            candidates += 1
        requests = self._requests
        waiting = requests.buffered_since if requests is not None and requests.state == HEAD else None
        unparsed = waiting is not None and waiting <= start
        if candidates and not unparsed and self._min_lost == candidates - 1:
            for _ in range(self._min_lost):
                self._give_up(self._pending.pop(0), NO_RESPONSE_GAP)
            self._resp_synced = True
            self._min_lost = 0
            ex = self._pending[0] if interim else self._pending.pop(0)
            ex.incomplete = True  # paired across a gap: correct, but say so
            return ex
        if not interim:
            self._min_lost += 1
            self._trim_pending()
        return None

    # ---- reader callbacks

    def on_kind(self, reader: MessageReader, kind: str) -> None:
        reader.kind = kind
        other = self._readers["ingress" if reader is self._readers["egress"] else "egress"]
        if other.kind is None:
            other.kind = "response" if kind == "request" else "request"
        self._requests, self._responses = (reader, other) if kind == "request" else (other, reader)

    def on_head(self, reader: MessageReader, msg: Message) -> None:
        self.protocol = "http1"
        if reader is self._requests:
            ex = _Exchange(msg)
            msg.exchange = ex
            self._last_request = msg
            if self._dead or not self._req_synced:
                ex.unpaired = True
                ex.incomplete = True
                ex.error = NO_RESPONSE_GAP
            else:
                self._pending.append(ex)
                self._trim_pending()
            return
        status = msg.head.status
        interim = status < 200 and status != 101
        was_synced = self._req_synced and self._resp_synced and not self._dead
        paired = self._pair(msg, interim)
        if interim:
            # 1xx (RFC 9110 §15.2): recorded on the request it precedes; no body.
            msg.exchange = None
            if paired is not None:
                if len(paired.informational) < MAX_INFORMATIONAL:
                    paired.informational.append(status)
                paired.interim_bytes += msg.wire_bytes
                if paired.response_start_ns is None:
                    paired.response_start_ns = msg.start_ns
            else:
                reader.discarded += msg.wire_bytes
            return
        if paired is None:
            paired = _Exchange(None)
            paired.unpaired = True
            paired.incomplete = not was_synced
            paired.error = NO_REQUEST if was_synced else NO_REQUEST_GAP
        paired.response = msg
        msg.exchange = paired
        if paired.response_start_ns is None:
            paired.response_start_ns = msg.start_ns
        request = paired.request
        if request is not None:
            msg.request_method = request.head.method
        tunnel = _tunnel(msg)
        requests = self._requests
        if not tunnel and requests is not None and requests.state == PAUSED:
            if request is None or request is self._last_request:
                requests.resume()  # the Upgrade/CONNECT was declined: what waited is HTTP

    def on_end(self, reader: MessageReader, msg: Message) -> None:
        ex: _Exchange | None = msg.exchange  # type: ignore[assignment]
        if ex is None:
            return
        if reader is self._requests:
            ex.request_done = True
            response = ex.response
            if reader.state == PAUSED and response is not None and not _tunnel(response):
                # The Upgrade/CONNECT was declined before its body ended (the
                # server answered first): what follows it is HTTP.
                reader.keep_reading()
            if not ex.emitted and (ex.unpaired or ex.response_done):
                self._emit(ex)
            return
        if ex.emitted:
            return  # emitted early as partial; its tail was skipped
        ex.response_done = True
        if _tunnel(msg):
            # The connection now carries another protocol (RFC 9110 §7.8, §9.3.6).
            ex.upgraded = True
            self.upgraded = True
            ex.request_done = True
            for r in self._readers.values():
                r.stop()
            self._emit(ex)
            return
        if ex.request_done:
            self._emit(ex)

    def on_cut(self, reader: MessageReader, msg: Message, error: str | None, desync: bool) -> None:
        self._cut(reader, msg, error)
        if desync:
            if reader is self._requests:
                self._request_stream_lost()
            else:
                self._response_stream_lost()

    def _cut(self, reader: MessageReader, msg: Message, error: str | None) -> None:
        ex: _Exchange | None = msg.exchange  # type: ignore[assignment]
        if ex is None or ex.emitted:
            return
        if msg.incomplete:
            ex.incomplete = True
        if ex.shed and (error == CLOSED_IN_RESPONSE or error == CLOSED_IN_REQUEST):  # its end shed, not a failure seen
            ex.incomplete = True
            error = SHED_END_UNSEEN
        if error and not ex.error:
            ex.error = error
        if reader is self._requests:
            ex.request_done = True
            response = ex.response
            if reader.state == PAUSED and response is not None and not _tunnel(response):
                # The Upgrade/CONNECT was declined before its body ended (the
                # server answered first): what follows it is HTTP.
                reader.keep_reading()
            if ex.unpaired or ex.response_done:
                self._emit(ex)
        else:
            ex.response_done = True
            ex.request_done = True
            self._emit(ex)

    def not_http(self) -> None:
        """Not HTTP at all (its start says so, or the owner looked long enough):
        no more is read."""
        self.protocol = "other"
        for r in self._readers.values():
            r.stop()
        self._dead = True

    def on_malformed(self, reader: MessageReader, reason: str, not_http: bool) -> None:
        if not_http and self.protocol == "unknown":
            self.not_http()
            return
        self.protocol = "http1"
        if reader is self._requests:
            # A request was there, even if unreadable: it holds its place in the order.
            ex = _Exchange(None)
            ex.error = f"malformed request: {reason}"
            if self._dead or not self._req_synced:
                ex.unpaired = True
                self._emit(ex)
            else:
                self._pending.append(ex)
            self._request_stream_lost()
            return
        error = f"malformed response: {reason}"
        if self._resp_synced and not self._dead and not self._orphans and self._pending:
            ex = self._pending.pop(0)
            ex.error = error
            ex.response_done = True
            if ex.request_done:
                self._emit(ex)
            self._response_stream_lost()
            return
        ex = _Exchange(None)
        ex.error = error
        ex.unpaired = True
        ex.incomplete = not self._resp_synced
        ex.end_ns = reader.last_ns
        self._emit(ex)
        self._response_stream_lost()

    # ---- streaming responses

    def _check_stream_limits(self, now: int) -> None:
        reader = self._responses
        if reader is None or reader.state == DEAD:
            return
        msg = reader.msg
        if msg is None:
            return
        ex: _Exchange | None = msg.exchange  # type: ignore[assignment]
        if ex is None or ex.emitted:
            return
        if msg.over_limit or now - msg.start_ns >= self.stream_limit_ns:
            # Emit what we have; the rest of this message is followed but not kept.
            ex.partial = True
            reader.skip_rest()
            self._emit(ex)

    # ---- output

    def _emit(self, ex: _Exchange) -> None:
        ex.emitted = True
        req, resp = ex.request, ex.response
        # Each message points at its exchange (to know it was emitted); the
        # exchange lets go of them, or every transaction would be a reference
        # cycle left for the garbage collector (~13 % of the agent's CPU).
        ex.request = ex.response = None
        limit = self.max_body_bytes
        request = _request(req, limit) if req is not None else None
        response = _response(resp, limit, whole=not ex.partial) if resp is not None else None
        incomplete = ex.incomplete or (req is not None and req.incomplete) or (resp is not None and resp.incomplete)
        if req is not None:
            start = req.start_ns
        elif ex.response_start_ns is not None:
            start = ex.response_start_ns
        else:
            start = ex.end_ns or 0
        response_start = ex.response_start_ns
        if ex.informational and resp is not None and req is not None and response_start is not None \
                and req.end_ns and response_start < req.end_ns:
            # A 1xx before the request's body ended (100 Continue): the wait
            # that counts is for the answer to the whole request.
            response_start = resp.start_ns
        if resp is not None:
            end = resp.end_ns
        elif ex.end_ns is not None:
            end = ex.end_ns
        else:
            end = req.end_ns if req is not None else start
        self._out.append(
            HttpExchange(
                request=request,
                response=response,
                start_ns=start,
                request_end_ns=req.end_ns if req is not None else None,
                response_start_ns=response_start,
                end_ns=end,
                error=ex.error,
                partial=ex.partial,
                incomplete=incomplete,
                upgraded=ex.upgraded,
                shed=ex.shed,
                informational=tuple(ex.informational),
                request_bytes=req.wire_bytes if req is not None else 0,
                response_bytes=ex.interim_bytes + (resp.wire_bytes if resp is not None else 0),
            )
        )


def _request(msg: Message, limit: int) -> HttpRequest:
    head = msg.head
    raw = msg.body  # most requests have none: b"" without a generic call of bytes()
    body, cut, error = decode_body(bytes(raw) if raw else b"", head.content_encoding, limit, complete=not msg.truncated)
    return HttpRequest(
        method=head.method,
        target=head.target,
        version=head.version,
        headers=tuple(head.headers),
        body=body,
        body_wire_size=msg.body_wire_size,
        content_encoding=head.content_encoding,
        body_truncated=msg.truncated or cut,
        body_decode_error=error,
        chunked=msg.framing == CHUNKED,
        trailers=tuple(msg.trailers),
    )


def _response(msg: Message, limit: int, whole: bool = True) -> HttpResponse:
    """``whole``: not emitted early as partial (a body still arriving is not cut short)."""
    head = msg.head
    raw = msg.body
    body, cut, error = decode_body(bytes(raw) if raw else b"", head.content_encoding, limit,
                                   complete=whole and not msg.truncated)
    return HttpResponse(
        status=head.status,
        reason=head.reason,
        version=head.version,
        headers=tuple(head.headers),
        body=body,
        body_wire_size=msg.body_wire_size,
        content_encoding=head.content_encoding,
        body_truncated=msg.truncated or cut,
        body_decode_error=error,
        chunked=msg.framing == CHUNKED,
        trailers=tuple(msg.trailers),
    )


def _tunnel(response: Message) -> bool:
    """Whether ``response`` turns its connection into another protocol."""
    status = response.head.status
    return status == 101 or (response.request_method == "CONNECT" and 200 <= status < 300)
