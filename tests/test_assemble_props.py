"""Properties of the HTTP/1 reassembler under arbitrary segmentation and capture loss."""

from __future__ import annotations

import gzip

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtap_devtools.assemble import ConnectionAssembler, HttpExchange

KINDS = ("length", "chunked", "gzip", "continue", "post")


def build(kind: str, i: int) -> tuple[bytes, bytes, bytes, bytes]:
    """(request head, request body, 1xx response, final response); the response echoes the target."""
    target = f"/item/{i}/{kind}"
    echo = f"echo:{target};".encode() * 3
    head = f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    body = b""
    interim = b""
    if kind in ("continue", "post"):
        body = f"payload {i}".encode() * 4
        expect = "Expect: 100-continue\r\n" if kind == "continue" else ""
        head = f"POST {target} HTTP/1.1\r\n{expect}Content-Length: {len(body)}\r\n\r\n".encode()
        if kind == "continue":
            interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    if kind == "chunked":
        mid = len(echo) // 2
        wire = b"%x;ext=1\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n" % (mid, echo[:mid], len(echo) - mid, echo[mid:])
        resp = f"HTTP/1.1 200 OK\r\nX-Echo: {target}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + wire
    elif kind == "gzip":
        z = gzip.compress(echo, mtime=0)
        resp = f"HTTP/1.1 200 OK\r\nX-Echo: {target}\r\nContent-Encoding: gzip\r\nContent-Length: {len(z)}\r\n\r\n".encode() + z
    else:
        resp = f"HTTP/1.1 200 OK\r\nX-Echo: {target}\r\nContent-Length: {len(echo)}\r\n\r\n".encode() + echo
    return head, body, interim, resp


@st.composite
def schedules(draw):
    """A valid causal interleaving of both directions, cut at arbitrary byte boundaries.

    A response may start only after its request head was sent, and the body of an
    ``Expect: 100-continue`` request only after the 100 arrived. Requests may run
    ahead of responses (pipelining).
    """
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=5))
    req = bytearray()
    resp = bytearray()
    resp_needs: list[tuple[int, int]] = []  # (response stream pos, request bytes that must precede it)
    req_needs: list[tuple[int, int]] = []  # (request stream pos, response bytes that must precede it)
    for i, kind in enumerate(kinds):
        head, body, interim, final = build(kind, i)
        req += head
        resp_needs.append((len(resp), len(req)))
        if interim:
            resp += interim
            req_needs.append((len(req), len(resp)))
        req += body
        resp += final
    events: list[tuple[str, bytes]] = []
    pos = {"egress": 0, "ingress": 0}
    streams = {"egress": bytes(req), "ingress": bytes(resp)}

    def limit(direction: str) -> int:
        other = pos["ingress" if direction == "egress" else "egress"]
        needs = req_needs if direction == "egress" else resp_needs
        cap = len(streams[direction])
        for at, required in needs:
            if other < required and at >= pos[direction]:
                cap = min(cap, at)
        return cap

    while pos["egress"] < len(req) or pos["ingress"] < len(resp):
        room = {d: limit(d) - pos[d] for d in pos}
        ready = [d for d in ("egress", "ingress") if room[d] > 0]
        direction = draw(st.sampled_from(ready))
        size = draw(st.integers(1, min(room[direction], 300)))
        events.append((direction, streams[direction][pos[direction] : pos[direction] + size]))
        pos[direction] += size
    return kinds, events


def replay(events, drop: int | None = None) -> list[HttpExchange]:
    asm = ConnectionAssembler(role="client")
    offsets = {"egress": 0, "ingress": 0}
    out: list[HttpExchange] = []
    for ts, (direction, data) in enumerate(events, start=1):
        if ts - 1 != drop:
            out += asm.on_data(direction, data, ts * 10, offsets[direction])
        offsets[direction] += len(data)
    out += asm.on_close(len(events) * 10 + 10)
    return out


def semantic(ex: HttpExchange):
    """Everything but timing, which depends on how the bytes were cut."""
    return (ex.request, ex.response, ex.error, ex.partial, ex.incomplete, ex.upgraded,
            ex.informational, ex.request_bytes, ex.response_bytes)


def whole(kinds) -> list[HttpExchange]:
    events = []
    for i, kind in enumerate(kinds):
        head, body, interim, final = build(kind, i)
        events += [("egress", head)]
        if interim:
            events += [("ingress", interim)]
        if body:
            events += [("egress", body)]
        events += [("ingress", final)]
    return replay(events)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(schedules())
def test_any_segmentation_and_interleaving_yields_the_same_exchanges(schedule):
    kinds, events = schedule
    expected = whole(kinds)
    assert len(expected) == len(kinds)
    assert all(ex.error is None and ex.response.header("X-Echo") == ex.request.target for ex in expected)
    assert [semantic(x) for x in replay(events)] == [semantic(x) for x in expected]


@SETTINGS
@given(schedules(), st.data())
def test_dropping_a_chunk_never_pairs_a_request_with_the_wrong_response(schedule, data):
    kinds, events = schedule
    drop = data.draw(st.integers(0, len(events) - 1))
    got = replay(events, drop)
    for ex in got:
        if ex.request is not None and ex.response is not None:
            assert ex.response.header("X-Echo") == ex.request.target
            body = ex.response.body
            if body and not ex.response.body_truncated and not ex.incomplete:
                assert f"echo:{ex.request.target};".encode() in body
    # Everything that survived intact is still reported exactly once per request target.
    targets = [ex.request.target for ex in got if ex.request is not None]
    assert len(targets) == len(set(targets))
