"""HTTP/2 reassembly: frames written by an independent implementation (the
``h2`` library, client and server talking to each other) in, exchanges out."""

from __future__ import annotations

import gzip
import os
import random
import struct

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hypothesis import given, settings, strategies as st

from qtap_devtools.assemble.http2 import PREFACE, UNDECODABLE, Http2Assembler, joined_sender
from qtap_devtools.assemble.model import HttpExchange

AUTHORITY = "api.example.test"


def request_headers(path: str = "/", method: str = "GET", extra: tuple = ()) -> list[tuple[str, str]]:
    return [(":method", method), (":scheme", "https"), (":authority", AUTHORITY), (":path", path), *extra]


class Wire:
    """A real h2 client and server joined back to back; every byte either
    writes is also fed to the assembler, as the capture would from the
    client's process (egress: what the client wrote)."""

    def __init__(self, client_direction: str = "egress", **kw) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.c2s = client_direction
        self.s2c = "ingress" if client_direction == "egress" else "egress"
        self.asm = Http2Assembler(client_direction=client_direction,  # type: ignore[arg-type]
                                  offsets={"egress": 0, "ingress": 0}, **kw)
        self.offsets = {"egress": 0, "ingress": 0}
        self.ts = 1000
        self.out: list[HttpExchange] = []
        self.split = 0  # feed in pieces of this many bytes (0: whole writes)
        self.client.initiate_connection()
        self.flush()
        self.server.initiate_connection()
        self.flush()

    def feed(self, direction: str, data: bytes, lose: int = 0) -> None:
        self.offsets[direction] += lose
        step = self.split or len(data) or 1
        for i in range(0, max(len(data), 1), step):
            piece = data[i:i + step]
            self.ts += 1
            self.out += self.asm.on_data(direction, piece, self.ts, self.offsets[direction])  # type: ignore[arg-type]
            self.offsets[direction] += len(piece)

    def flush(self, *, lose_c2s: int = 0, lose_s2c: int = 0) -> None:
        """Deliver what each side has written to the other, until both are quiet."""
        while True:
            c, s = self.client.data_to_send(), self.server.data_to_send()
            if not c and not s:
                return
            if c:
                self.feed(self.c2s, c[lose_c2s:], lose=min(lose_c2s, len(c)))
                _acknowledge(self.server, self.server.receive_data(c))
                lose_c2s = 0
            if s:
                self.feed(self.s2c, s[lose_s2c:], lose=min(lose_s2c, len(s)))
                _acknowledge(self.client, self.client.receive_data(s))
                lose_s2c = 0

    def request(self, path: str = "/", method: str = "GET", body: bytes = b"", extra: tuple = (),
                end: bool = True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, request_headers(path, method, extra), end_stream=not body and end)
        for i in range(0, len(body), 16384):
            self.client.send_data(sid, body[i:i + 16384], end_stream=end and i + 16384 >= len(body))
        self.flush()
        return sid

    def respond(self, sid: int, status: int = 200, body: bytes = b"", headers: tuple = (),
                trailers: tuple = ()) -> None:
        self.server.send_headers(sid, [(":status", str(status)), *headers],
                                 end_stream=not body and not trailers)
        if body:
            for i in range(0, len(body), 16384):
                last = i + 16384 >= len(body)
                self.server.send_data(sid, body[i:i + 16384], end_stream=last and not trailers)
                self.flush()
        if trailers:
            self.server.send_headers(sid, list(trailers), end_stream=True)
        self.flush()

    def close(self) -> list[HttpExchange]:
        self.ts += 1
        got = self.asm.on_close(self.ts)
        self.out += got
        return got


def _acknowledge(conn: h2.connection.H2Connection, events: list) -> None:
    """Open the flow-control windows again for what was read (a real peer does)."""
    for ev in events:
        if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)


def header(msg, name: str) -> str | None:
    return dict(msg.headers).get(name)


# ---- streams


def test_a_request_and_its_response_are_one_exchange():
    w = Wire()
    sid = w.request("/users?id=7", extra=(("user-agent", "curl/7.88.1"),))
    w.respond(sid, 200, b'{"id":7}', headers=(("content-type", "application/json"),))
    [ex] = w.out
    req, resp = ex.request, ex.response
    assert (req.method, req.target, req.version) == ("GET", "/users?id=7", "HTTP/2")
    assert header(req, ":authority") == AUTHORITY and header(req, "user-agent") == "curl/7.88.1"
    assert (resp.status, resp.version, resp.body) == (200, "HTTP/2", b'{"id":7}')
    assert header(resp, "content-type") == "application/json"
    assert resp.body_wire_size == 8 and not resp.body_truncated and ex.error is None
    assert ex.start_ns <= ex.request_end_ns <= ex.response_start_ns <= ex.end_ns
    assert ex.request_bytes > 9 and ex.response_bytes > 9 + 8
    assert not ex.incomplete and w.asm.failure == ""


def test_concurrent_streams_answered_out_of_order_pair_by_stream():
    w = Wire()
    sids = [w.request(f"/item/{n}") for n in range(3)]
    for n, sid in reversed(list(enumerate(sids))):
        w.respond(sid, 200 + n, f"item {n}".encode())
    assert [(ex.request.target, ex.response.status, ex.response.body) for ex in w.out] == [
        ("/item/2", 202, b"item 2"), ("/item/1", 201, b"item 1"), ("/item/0", 200, b"item 0")]


def test_the_hpack_table_is_followed_across_requests():
    # The second request's repeated fields are sent as references into the
    # table the first one filled: decoded only if every block was followed.
    w = Wire()
    extra = (("authorization", "Bearer abc"), ("x-trace", "t-1"))
    for n in range(3):
        sid = w.request(f"/r/{n}", extra=extra)
        w.respond(sid, 200, b"ok", headers=(("x-served-by", "node-4"),))
    assert [header(ex.request, "authorization") for ex in w.out] == ["Bearer abc"] * 3
    assert [header(ex.response, "x-served-by") for ex in w.out] == ["node-4"] * 3
    assert [ex.request.target for ex in w.out] == ["/r/0", "/r/1", "/r/2"]


def test_a_posted_body_in_several_frames_with_trailers():
    w = Wire()
    body = bytes(range(256)) * 200  # 51,200 bytes: four DATA frames
    sid = w.request("/upload", "POST", body, extra=(("content-type", "application/octet-stream"),))
    w.respond(sid, 201, b"stored", trailers=(("grpc-status", "0"),))
    [ex] = w.out
    assert ex.request.method == "POST" and ex.request.body == body and ex.request.body_wire_size == len(body)
    assert ex.response.status == 201 and ex.response.trailers == (("grpc-status", "0"),)


def test_padded_frames_are_read_without_their_padding():
    w = Wire()
    sid = w.client.get_next_available_stream_id()
    w.client.send_headers(sid, request_headers("/padded", "PUT"))
    w.client.send_data(sid, b"payload", end_stream=True, pad_length=40)
    w.flush()
    w.respond(sid, 204)
    [ex] = w.out
    assert ex.request.body == b"payload" and ex.request.body_wire_size == 7


def test_a_header_block_split_into_continuation_frames():
    w = Wire()
    big = "c" * 40_000  # over the 16 KiB frame size: HEADERS + CONTINUATIONs
    sid = w.request("/big", extra=(("cookie", big),))
    w.respond(sid, 200, b"ok")
    [ex] = w.out
    assert header(ex.request, "cookie") == big


def test_informational_responses_come_before_the_final_one():
    w = Wire()
    sid = w.request("/hints")
    w.server.send_headers(sid, [(":status", "103"), ("link", "</s.css>; rel=preload")])
    w.flush()
    w.respond(sid, 200, b"page")
    [ex] = w.out
    assert ex.informational == (103,) and ex.response.status == 200 and ex.response.body == b"page"
    assert header(ex.response, "link") is None


def test_a_gzipped_response_is_decoded():
    w = Wire()
    sid = w.request("/z")
    w.respond(sid, 200, gzip.compress(b"hello " * 100), headers=(("content-encoding", "gzip"),))
    [ex] = w.out
    assert ex.response.body == b"hello " * 100 and ex.response.content_encoding == "gzip"


@pytest.mark.parametrize("who, code, says", [("client", 8, "stream reset by the client (CANCEL)"),
                                             ("server", 7, "stream reset by the server (REFUSED_STREAM)")])
def test_a_reset_stream_is_emitted_with_who_and_why(who, code, says):
    w = Wire()
    sid = w.request("/slow")
    (w.client if who == "client" else w.server).reset_stream(sid, error_code=code)
    w.flush()
    [ex] = w.out
    assert ex.response is None and ex.error == says


def test_a_body_cut_by_a_reset_is_marked_truncated_and_a_whole_one_is_not():
    w = Wire()
    sid = w.request("/cut")
    w.server.send_headers(sid, [(":status", "200"), ("content-length", "1000")])
    w.server.send_data(sid, b"x" * 100)
    w.flush()
    w.server.reset_stream(sid, error_code=2)
    w.flush()
    [ex] = w.out
    assert ex.error == "stream reset by the server (INTERNAL_ERROR)"
    assert ex.response.body == b"x" * 100 and ex.response.body_truncated
    assert not ex.request.body_truncated  # it had ended (END_STREAM on its headers)
    sid = w.request("/whole")
    w.respond(sid, 200, b"y" * 100)
    assert not w.out[-1].response.body_truncated


def test_a_server_push_is_its_own_exchange():
    w = Wire()
    sid = w.request("/index.html")
    pushed = 2
    w.server.push_stream(sid, pushed, request_headers("/style.css"))
    w.respond(pushed, 200, b"body{}", headers=(("content-type", "text/css"),))
    w.respond(sid, 200, b"<html>")
    assert [(ex.request.target, ex.response.body) for ex in w.out] == [("/style.css", b"body{}"),
                                                                      ("/index.html", b"<html>")]


def test_an_unanswered_request_goes_out_at_close():
    w = Wire()
    w.request("/never")
    assert w.out == []
    [ex] = w.close()
    assert ex.response is None and ex.error == "connection closed before response"


def test_a_large_response_goes_out_early_as_partial_at_the_body_limit():
    w = Wire(max_body_bytes=20_000)
    sid = w.request("/download")
    w.server.send_headers(sid, [(":status", "200")])
    w.server.send_data(sid, b"x" * 16_000)
    w.flush()
    assert w.out == []
    w.server.send_data(sid, b"y" * 16_000)
    w.flush()
    [ex] = w.out
    assert ex.partial and ex.response.body_truncated and len(ex.response.body) == 20_000
    # It ends at the data that went past the limit, not at its request's end
    # (a duration of 0, shorter than its own wait).
    assert ex.end_ns == w.ts and ex.end_ns > ex.response_start_ns > ex.request_end_ns
    w.server.send_data(sid, b"z", end_stream=True)
    sid2 = w.request("/next")  # the connection is still followed
    w.respond(sid2, 200, b"n")
    assert [ex.request.target for ex in w.out] == ["/download", "/next"]


def test_the_server_side_view_reads_the_same():
    # Captured in the server's process: the client's bytes are what it read.
    w = Wire(client_direction="ingress")
    sid = w.request("/srv", "POST", b"in")
    w.respond(sid, 200, b"out")
    [ex] = w.out
    assert (ex.request.target, ex.request.body, ex.response.body) == ("/srv", b"in", b"out")


@pytest.mark.parametrize("split", [1, 7, 4096])
def test_any_split_of_the_bytes_gives_the_same_exchanges(split):
    def run(split: int) -> list:
        w = Wire()
        w.split = split
        for n in range(2):
            sid = w.request(f"/s/{n}", "POST", b"q" * 300)
            w.respond(sid, 200, b"r" * 20_000)
        return [(ex.request.target, ex.request.body, ex.response.status, ex.response.body) for ex in w.out]
    assert run(split) == run(0)


# ---- capture gaps


def test_a_gap_over_a_frame_header_is_read_past_at_the_next_frame():
    w = Wire()
    sid = w.request("/a")
    w.server.send_headers(sid, [(":status", "200")])
    w.flush()
    w.server.send_data(sid, b"x" * 10_000, end_stream=True)
    w.flush(lose_s2c=9 + 100)  # the DATA frame's header and 100 bytes: where its body ends is lost
    sid2 = w.request("/b")
    w.respond(sid2, 200, b"fine", headers=(("x-served-by", "n1"),))
    [b] = w.out  # found again at /b's HEADERS
    assert (b.request.target, b.response.status, b.response.body) == ("/b", 200, b"fine")
    assert header(b.response, "x-served-by") == "n1" and not b.incomplete
    [a] = w.close()  # its end was in the hole
    assert a.request.target == "/a" and a.incomplete and a.response.body_truncated
    assert w.asm.failure == "" and w.asm.resyncs == 1


def test_a_gap_within_a_body_is_bridged_and_marked():
    w = Wire()
    sid = w.request("/a")
    w.server.send_headers(sid, [(":status", "200")])
    w.server.send_data(sid, b"x" * 10_000)
    w.flush()
    # Lose 500 bytes from the middle of the next frame's payload.
    w.server.send_data(sid, b"y" * 10_000, end_stream=True)
    data = w.server.data_to_send()
    w.feed(w.s2c, data[:1_000])
    w.feed(w.s2c, data[1_500:], lose=500)
    w.client.receive_data(data)
    [ex] = w.out
    assert ex.incomplete and ex.response.body_truncated and ex.error is None
    assert ex.response.body_wire_size == 20_000 and len(ex.response.body) == 19_500
    sid2 = w.request("/b")
    w.respond(sid2, 200, b"fine")
    assert w.out[-1].response.body == b"fine" and not w.out[-1].incomplete


def test_a_header_block_lost_in_a_gap_leaves_later_requests_readable():
    w = Wire()
    sid = w.request("/open")
    gone = w.client.get_next_available_stream_id()
    w.client.send_headers(gone, request_headers("/gone"), end_stream=True)
    data = w.client.data_to_send()
    w.feed(w.c2s, b"", lose=len(data))  # the whole HEADERS frame lost
    w.server.receive_data(data)
    after = w.request("/after")
    w.respond(sid, 200, b"late")
    w.respond(gone, 200, b"unseen")
    w.respond(after, 200, b"seen")
    assert [ex.request.target for ex in w.out] == ["/open", "/after"]
    opened, later = w.out
    assert not opened.incomplete and opened.response.body == b"late"
    # :authority referred to the table entry the first request added, which
    # the gap made unknown: left out, and the exchange says it is incomplete.
    assert later.incomplete and header(later.request, ":authority") is None
    assert later.request.method == "GET" and later.response.body == b"seen"
    assert w.asm.failure == "" and w.asm.resyncs == 1


# ---- untrusted bytes


def test_a_preface_followed_by_garbage_stops_decoding_without_raising():
    asm = Http2Assembler(client_direction="egress", offsets={"egress": 0, "ingress": 0})
    out = asm.on_data("egress", PREFACE + b"\xff" * 64, 1, 0)
    assert out == [] and asm.failure
    assert asm.on_data("egress", b"more", 2, len(PREFACE) + 64) == []


def test_a_header_block_hpack_cannot_decode_stops_decoding():
    asm = Http2Assembler(client_direction="egress", offsets={"egress": 0, "ingress": 0})
    # HEADERS, END_HEADERS|END_STREAM, stream 1: an index past both tables.
    frame = b"\x00\x00\x01\x01\x05\x00\x00\x00\x01" + b"\xff"
    asm.on_data("egress", PREFACE + frame, 1, 0)
    assert asm.failure.startswith("HPACK")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=12), st.binary(max_size=200))
def test_any_bytes_after_the_preface_never_raise(chunks, server):
    asm = Http2Assembler(client_direction="egress", offsets={"egress": 0, "ingress": 0})
    off = {"egress": 0, "ingress": 0}
    for n, data in enumerate([PREFACE, *chunks]):
        asm.on_data("egress", data, n, off["egress"])
        off["egress"] += len(data)
        asm.on_data("ingress", server[: n * 16], n, 0)
    asm.on_tick(10**12)
    asm.on_close(10**12)


def test_a_server_that_answers_early_and_resets_with_no_error_is_not_an_error():
    # RFC 9113 §8.1: a whole response, then RST_STREAM(NO_ERROR) for the rest
    # of the request; what the client had sent still arrives and belongs to it.
    w = Wire(client_direction="ingress")  # the server's view
    sid = w.client.get_next_available_stream_id()
    w.client.send_headers(sid, request_headers("/upload", "POST"))
    w.flush()
    w.server.send_headers(sid, [(":status", "413")])
    w.server.send_data(sid, b"too big", end_stream=True)
    w.server.reset_stream(sid, error_code=0)
    w.flush()
    assert w.out == []  # waiting for what the client already sent
    data = b"\x00\x00\x04\x00\x01" + sid.to_bytes(4, "big") + b"body"  # DATA, END_STREAM
    w.feed(w.c2s, data)
    [ex] = w.out
    assert ex.error is None and ex.response.status == 413 and ex.request.body == b"body"


def test_an_upload_whose_end_was_lost_goes_out_once_answered_with_its_declared_size():
    """A 10 MB upload shed while the agent was behind: its last frames (the
    END_STREAM) are in a gap.  Answered, it goes out a moment later, cut and
    sized as declared, not at the connection's close as one the close cut
    short ("connection closed before the request ended")."""
    w = Wire()
    sid = w.client.get_next_available_stream_id()
    body = b"u" * 40_000
    w.client.send_headers(sid, request_headers("/upload", "POST", (("content-length", str(len(body))),)))
    w.flush()
    w.client.send_data(sid, body[:16_000])
    w.flush()
    w.client.send_data(sid, body[16_000:32_000])
    w.client.send_data(sid, body[32_000:], end_stream=True)
    w.flush(lose_c2s=10**9)  # every byte of those frames shed
    w.respond(sid, 200, b"got it")
    assert w.out == []
    [ex] = w.asm.on_tick(w.ts + 2_000_000_000)
    assert ex.error is None and ex.incomplete and ex.response.status == 200 and ex.response.body == b"got it"
    assert ex.request.body_truncated and ex.request.body_wire_size == 40_000 and len(ex.request.body) == 16_000


def test_a_response_that_ends_short_of_its_content_length_is_cut_and_says_so():
    w = Wire()
    sid = w.request("/rst")
    # A server that declares 100,000 bytes and ends the stream after 30,000
    # (node's stream.close): its bytes written as they went, not by a checker.
    w.server.send_headers(sid, [(":status", "200"), ("content-length", "100000")])
    w.flush()
    frame = struct.pack(">I", 30_000)[1:] + bytes([0, 1]) + struct.pack(">I", sid) + b"r" * 30_000
    w.feed(w.s2c, frame)
    [ex] = w.out
    assert ex.response.body_truncated and ex.response.body_wire_size == 30_000
    assert ex.error == "the response ended after 30000 of its 100000 bytes (content-length)"
    # HEAD and 304 carry a length and no body: whole.
    sid = w.request("/head", "HEAD")
    w.respond(sid, 200, headers=(("content-length", "100000"),))
    sid = w.request("/cached")
    w.respond(sid, 304, headers=(("content-length", "100000"),))
    assert [(x.response.status, x.response.body_truncated, x.error) for x in w.out[1:]] == [
        (200, False, None), (304, False, None)]


def test_a_response_whose_declared_length_came_is_whole_though_its_end_was_never_read():
    """curl behind nginx's proxy: the body's 61 bytes come in one DATA frame
    and the END_STREAM in an empty one after it, which curl, having its
    content-length, does not read before it closes (or, on a reused
    connection, resets the stream).  Whole, and ended when its last byte came;
    it was shown as cut by the close, lasting until it."""
    w = Wire()
    body = b"h" * 61
    sid = w.request("/api/hello")
    w.server.send_headers(sid, [(":status", "200"), ("content-length", "61")])
    w.server.send_data(sid, body)
    w.flush()
    last = w.ts
    w.ts += 3_000_000_000  # a slow sibling held the connection open 3 s more
    [ex] = w.close()
    assert ex.error is None and not ex.incomplete
    assert ex.response.body == body and not ex.response.body_truncated and ex.end_ns == last
    # Reset by the client once it had the whole body: no error either.
    w = Wire()
    sid = w.request("/api/hello")
    w.server.send_headers(sid, [(":status", "200"), ("content-length", "61")])
    w.server.send_data(sid, body)
    w.flush()
    w.client.reset_stream(sid, error_code=5)  # STREAM_CLOSED
    w.flush()
    [ex] = w.out
    assert ex.error is None and ex.response.body == body and not ex.response.body_truncated
    # A server's reset is its own to say, whole body or not.
    w = Wire()
    sid = w.request("/api/hello")
    w.server.send_headers(sid, [(":status", "200"), ("content-length", "61")])
    w.server.send_data(sid, body)
    w.server.reset_stream(sid, error_code=2)
    w.flush()
    [ex] = w.out
    assert ex.error == "stream reset by the server (INTERNAL_ERROR)" and not ex.response.body_truncated
    # Short of its length, a close still cuts it.
    w = Wire()
    sid = w.request("/api/hello")
    w.server.send_headers(sid, [(":status", "200"), ("content-length", "61")])
    w.server.send_data(sid, body[:60])
    w.flush()
    [ex] = w.close()
    assert ex.response.body_truncated and ex.error == "connection closed before the response ended"


def test_an_upload_its_client_stops_once_refused_is_cut_and_says_so():
    """curl at nginx's 413 ("HTTP error before end of send, stop sending"):
    the request ends after what the window let through, short of its
    content-length.  Before, its body read as whole."""
    w = Wire()
    sid = w.client.get_next_available_stream_id()
    w.client.send_headers(sid, request_headers("/echo", "POST", (("content-length", "3000000"),)))
    sent = 0
    while (room := w.client.local_flow_control_window(sid)) > 0:
        n = min(room, 16384)
        w.client.send_data(sid, b"u" * n)
        sent += n
    w.flush()
    w.respond(sid, 413, b"too large", headers=(("content-length", "9"),))
    # An empty DATA with END_STREAM (fed as written: h2's own server would refuse it).
    w.feed(w.c2s, bytes([0, 0, 0, 0, 1]) + struct.pack(">I", sid))
    [ex] = w.out
    assert ex.response.status == 413 and not ex.response.body_truncated
    assert ex.request.body_truncated and ex.request.body_wire_size == sent == 65535
    assert ex.error == "the request ended after 65535 of its 3000000 bytes (content-length)"


def test_an_early_answer_whose_request_never_ends_goes_out_after_a_wait():
    w = Wire()
    sid = w.client.get_next_available_stream_id()
    w.client.send_headers(sid, request_headers("/upload", "POST"))
    w.flush()
    w.server.send_headers(sid, [(":status", "200")], end_stream=True)
    w.server.reset_stream(sid, error_code=0)
    w.flush()
    assert w.asm.on_tick(w.ts + 10) == []
    [ex] = w.asm.on_tick(w.ts + 2_000_000_000)
    assert ex.error is None and ex.response.status == 200


def test_a_response_still_streaming_past_the_time_limit_goes_out_on_the_tick():
    w = Wire(stream_limit_ns=5_000)
    sid = w.request("/events")
    w.server.send_headers(sid, [(":status", "200"), ("content-type", "text/event-stream")])
    w.server.send_data(sid, b"data: 1\n\n")
    w.flush()
    assert w.asm.on_tick(w.ts + 1) == []
    [ex] = w.asm.on_tick(w.ts + 10_000)
    assert ex.partial and ex.response.body == b"data: 1\n\n" and ex.error is None
    assert ex.end_ns == w.ts >= ex.response_start_ns > ex.request_end_ns  # its latest data


def test_bodies_held_across_a_connections_streams_are_bounded():
    # Eight bodies' worth at most across open streams: the ninth and tenth
    # uploads are cut (and say so), and what is freed is held again later.
    w = Wire(max_body_bytes=1000)
    sids = [w.request(f"/u/{n}", "POST", b"b" * 900, end=False) for n in range(10)]
    for sid in sids:
        w.client.end_stream(sid)
        w.respond(sid, 200, b"ok")
    bodies = [(len(ex.request.body), ex.request.body_truncated) for ex in w.out]
    assert bodies == [(900, False)] * 8 + [(800, True), (0, True)]
    sid = w.request("/after", "POST", b"a" * 900)
    w.respond(sid, 200, b"ok")
    assert w.out[-1].request.body == b"a" * 900 and not w.out[-1].request.body_truncated


def _answered_early(w: Wire, path: str, part: bytes, status: int) -> int:
    """A POST whose body has not ended, answered whole by the server: its stream id."""
    sid = w.client.get_next_available_stream_id()
    w.client.send_headers(sid, request_headers(path, "POST"))
    w.client.send_data(sid, part)
    w.flush()
    w.server.send_headers(sid, [(":status", str(status))], end_stream=True)
    return sid


def test_request_trailers_after_an_early_answer_went_out_make_no_new_exchange():
    w = Wire()
    sid = _answered_early(w, "/stream-up", b"part", 200)
    w.server.reset_stream(sid, error_code=0)
    w.flush()
    [ex] = w.asm.on_tick(w.ts + 2_000_000_000)
    assert ex.request.body == b"part"
    # The client's trailers arrive after the exchange went out.
    w.feed(w.c2s, b"\x00\x00\x01\x01\x05" + sid.to_bytes(4, "big") + b"\x88")  # HEADERS: :status 200 (static 8)
    assert w.close() == []


def test_cookie_crumbs_are_one_cookie_joined_with_semicolons():
    w = Wire()
    sid = w.request("/c", extra=(("cookie", "a=1"), ("accept", "*/*"), ("cookie", "b=2")))
    w.respond(sid, 200)
    [ex] = w.out
    assert [(k, v) for k, v in ex.request.headers if k in ("cookie", "accept")] == [("cookie", "a=1; b=2"),
                                                                                  ("accept", "*/*")]


def test_a_table_grown_to_what_a_node_server_allows_is_followed():
    # node's http2 server announces a 1 MiB table; the h2 library's encoder
    # (httpx) resizes to it at once.
    w = Wire()
    w.server.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 1 << 20})
    w.flush()
    for n in range(3):
        sid = w.request(f"/t/{n}", extra=(("x-big", "v" * 5000),))
        w.respond(sid, 200)
    assert [ex.request.target for ex in w.out] == ["/t/0", "/t/1", "/t/2"] and w.asm.failure == ""
    assert header(w.out[2].request, "x-big") == "v" * 5000


def test_an_unfinished_upload_answered_early_is_marked_cut():
    w = Wire()
    _answered_early(w, "/upload", b"first part", 201)
    w.flush()
    [ex] = w.close()
    assert ex.request.body == b"first part" and ex.request.body_truncated
    assert ex.response.status == 201 and ex.error == "connection closed before the request ended"


def test_a_request_that_never_ended_ends_at_its_last_byte_so_the_timing_has_every_phase():
    """curl's upload refused by nginx's 413 over HTTP/2, its connection then
    closed: the request never ended.  Its end had been left unknown, so the
    transaction's timing had no send_ms or wait_ms (only receive_ms) and a
    HAR's time, the sum of the phases, fell short of duration_us.  As over
    HTTP/1, it ends with its last byte seen."""
    w = Wire()
    sid = _answered_early(w, "/upload", b"first part", 413)
    last_request_byte = w.ts  # its HEADERS and DATA, written at once
    w.flush()
    [ex] = w.close()
    assert ex.request.body_truncated and ex.response.status == 413
    assert ex.request_end_ns == last_request_byte
    assert ex.start_ns <= ex.request_end_ns <= ex.response_start_ns <= ex.end_ns


def _session(n: int = 5) -> list[tuple[str, bytes]]:
    """A whole session's writes, in order: (direction, bytes)."""
    writes: list[tuple[str, bytes]] = []

    class Recorder(Wire):
        def feed(self, direction: str, data: bytes, lose: int = 0) -> None:
            writes.append((direction, data))

    w = Recorder()
    for i in range(n):
        sid = w.request(f"/s/{i}", extra=(("x-req", str(i)),))
        w.respond(sid, 200, bytes([65 + i]) * 20_000, headers=(("x-resp", str(i)),))
    return writes


@settings(max_examples=int(os.environ.get("QTAP_GAP_EXAMPLES", "150")), deadline=None)
@given(st.integers(min_value=0, max_value=200), st.integers(min_value=1, max_value=30_000))
def test_any_gap_anywhere_never_raises_and_every_request_goes_out_once(at, lost):
    """One hole anywhere in a session: decoding goes on past it; what is not
    marked incomplete is exactly what was sent, and nothing goes out twice."""
    writes = _session()
    asm = Http2Assembler(client_direction="egress", offsets={"egress": 0, "ingress": 0})
    off = {"egress": 0, "ingress": 0}
    out: list[HttpExchange] = []
    cut = at % len(writes)
    for n, (direction, data) in enumerate(writes):
        if n == cut:
            off[direction] += min(lost, len(data))
            data = data[lost:]
        out += asm.on_data(direction, data, n + 1, off[direction])  # type: ignore[arg-type]
        off[direction] += len(data)
    out += asm.on_close(10**9)
    assert asm.failure == "" or asm.failure == "no frame found after a capture gap"
    targets = [ex.request.target for ex in out]
    assert len(targets) == len(set(targets))  # none twice
    assert all(t.startswith("/s/") for t in targets)
    whole = [ex for ex in out if not ex.incomplete]
    for ex in whole:  # what is not marked incomplete is exactly what was sent
        i = int(ex.request.target.rsplit("/", 1)[1])
        assert ex.response.body == bytes([65 + i]) * 20_000 and header(ex.response, "x-resp") == str(i)


def test_the_gap_property_has_something_to_check():
    # Without a gap, the session above decodes whole (the property is not vacuous).
    asm = Http2Assembler(client_direction="egress", offsets={"egress": 0, "ingress": 0})
    off = {"egress": 0, "ingress": 0}
    out: list[HttpExchange] = []
    for n, (direction, data) in enumerate(_session()):
        out += asm.on_data(direction, data, n + 1, off[direction])  # type: ignore[arg-type]
        off[direction] += len(data)
    assert [ex.request.target for ex in out] == [f"/s/{i}" for i in range(5)]
    assert not any(ex.incomplete for ex in out)


# ---- joined mid-connection


def joined(w: Wire) -> Http2Assembler:
    """From here on the wire is read by an assembler that saw none of it
    before (the agent started, or the TLS library was attached, just now)."""
    w.out.clear()
    w.asm = Http2Assembler(client_direction=w.c2s, offsets={"egress": None, "ingress": None},  # type: ignore[arg-type]
                           joined=True)
    return w.asm


@pytest.mark.parametrize("split", [0, 7])
def test_joined_mid_connection_later_streams_come_out(split):
    w = Wire()
    for n in range(3):
        sid = w.request(f"/before/{n}", extra=(("user-agent", "ua/1"),))
        w.respond(sid, 200, b"x", headers=(("content-type", "text/plain"),))
    joined(w)
    w.split = split
    sid = w.request("/after", method="POST", body=b"payload", extra=(("user-agent", "ua/1"), ("x-new", "fresh")))
    w.respond(sid, 201, b"after body", headers=(("content-type", "text/plain"), ("x-id", "42")))
    [ex] = w.out
    req, resp = ex.request, ex.response
    # Static-table and literal fields decode; the body is whole.
    assert (req.method, req.target, req.body, resp.status, resp.body) == ("POST", "/after", b"payload", 201,
                                                                         b"after body")
    assert header(req, "x-new") == "fresh" and header(resp, "x-id") == "42"
    # Fields indexed before the join are unknown: left out, and the exchange says so.
    assert header(req, "user-agent") is None and header(req, ":authority") is None
    assert header(resp, "content-type") is None and ex.incomplete
    assert w.asm.failure == "" and w.asm.resyncs == 0
    # What was indexed after the join is known from then on.
    sid = w.request("/after", extra=(("x-new", "fresh"),))
    w.respond(sid, 200, b"")
    assert header(w.out[-1].request, "x-new") == "fresh" and w.out[-1].request.target == "/after"


def test_joined_a_stream_already_open_is_not_shown_and_breaks_nothing():
    w = Wire()
    early = w.request("/slow")
    joined(w)
    later = w.request("/quick")
    w.respond(early, 200, b"slow answer")
    w.respond(later, 200, b"quick answer")
    assert [(ex.request.target, ex.response.body) for ex in w.out] == [("/quick", b"quick answer")]
    assert w.asm.failure == ""
    assert w.close() == []


def test_joined_a_real_gap_after_the_join_is_still_one():
    w = Wire()
    w.respond(w.request("/warm"), 200, b"x")
    joined(w)
    w.respond(w.request("/a"), 200, b"a")
    sid = w.request("/b")
    w.server.send_headers(sid, [(":status", "200")], end_stream=False)
    w.flush(lose_s2c=5)  # the response's HEADERS frame header is lost
    w.server.send_data(sid, b"b", end_stream=True)
    w.flush()
    assert w.asm.resyncs == 1
    assert [ex.request.target for ex in w.out] == ["/a", "/b"] and w.out[1].incomplete


def _writes(w: Wire, fn) -> tuple[bytes, bytes]:
    """What the client and the server write for ``fn()``, not delivered."""
    fn()
    return w.client.data_to_send(), w.server.data_to_send()


def test_joined_sender_tells_a_request_from_a_response_and_refuses_the_rest():
    w = Wire()
    w.respond(w.request("/warm", extra=(("user-agent", "ua"),)), 200, b"x")
    sid = w.client.get_next_available_stream_id()
    c, _ = _writes(w, lambda: w.client.send_headers(sid, request_headers("/next"), end_stream=True))
    assert joined_sender(c) == "client"
    w.server.receive_data(c)
    _, s = _writes(w, lambda: (w.server.send_headers(sid, [(":status", "404")]),
                               w.server.send_data(sid, b"nope", end_stream=True)))
    assert joined_sender(s) == "server"
    assert joined_sender(s[9 + int.from_bytes(s[:3], "big"):]) == ""  # DATA alone: no telling
    noise = random.Random(7).randbytes(4096)
    for other in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n", noise, b"\x00" * 64,
                  c + b"\x00\x00", b""):
        assert joined_sender(other) == "", other[:20]


# ---------------------------------------------------------------------------
# Crafted traffic (found by fuzzing): bounded, and nothing lost


def raw_frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">HBBBI", len(payload) >> 8, len(payload) & 255, ftype, flags, sid) + payload


RAW_GET = b"\x82\x84\x87\x01\x0bexample.com"  # :method GET, :path /, :scheme https, :authority example.com


def test_a_push_promise_naming_an_open_stream_does_not_replace_it():
    a = Http2Assembler(client_direction="egress", offsets={"egress": 0, "ingress": 0})
    out = a.on_data("egress", PREFACE + raw_frame(4, 0, 0) + raw_frame(1, 4, 1, b"\x83\x84\x87\x01\x0bexample.com")
                    + raw_frame(0, 0, 1, b"x" * 1000), 1, 0)
    out += a.on_data("ingress", raw_frame(4, 0, 0) + raw_frame(5, 4, 1, b"\0\0\0\1" + RAW_GET), 2, 0)
    out += a.on_close(3)
    assert [(e.request.method, e.request.body) for e in out] == [("POST", b"x" * 1000)]


def test_a_flood_of_informational_responses_keeps_only_the_first():
    from qtap_devtools.assemble.model import MAX_INFORMATIONAL

    a = Http2Assembler(client_direction="egress", offsets={"egress": 0, "ingress": 0})
    a.on_data("egress", PREFACE + raw_frame(4, 0, 0) + raw_frame(1, 5, 1, RAW_GET), 1, 0)
    early = raw_frame(1, 4, 1, b"\x48\x03100") + raw_frame(1, 4, 1, b"\xbe") * 5000  # 100 Continue, then 5,000 more
    [ex] = a.on_data("ingress", raw_frame(4, 0, 0) + early + raw_frame(1, 5, 1, b"\x88"), 2, 0)
    assert ex.response.status == 200 and ex.informational == (100,) * MAX_INFORMATIONAL


@pytest.mark.parametrize("read", [1, 7, 4096])
def test_after_a_gap_the_next_frame_is_found_whatever_the_read_size(read):
    """The hunt looks at each position once: it rescanned its whole buffer on
    every read (quadratic: 140 kB after a gap in 16-byte reads took 3.8 s)."""
    a = Http2Assembler(client_direction="egress", offsets={"egress": 0, "ingress": 0})
    a.on_data("egress", PREFACE + raw_frame(4, 0, 0), 1, 0)
    a.on_data("ingress", raw_frame(4, 0, 0), 2, 0)
    sent = len(PREFACE) + 9
    noise = bytes(random.Random(7).getrandbits(8) & 0x3F | 0x40 for _ in range(20_000))  # no frame header fits in it
    after = noise + raw_frame(1, 5, 3, RAW_GET)
    out = []
    for p in range(0, len(after), read):  # a gap of 1,000 bytes, then the rest in reads of `read` bytes
        out += a.on_data("egress", after[p:p + read], 3, sent + 1000 + p)
    out += a.on_data("ingress", raw_frame(1, 5, 3, b"\x88"), 4, 9)
    assert [(e.request.target, e.response.status) for e in out] == [("/", 200)] and a.failure == ""


def test_unanswered_push_promises_are_capped_and_the_clients_streams_still_open():
    """A server promising pushes it never answers filled the stream table
    (1,024) and the client's next request was not shown."""
    from qtap_devtools.assemble.http2 import MAX_PROMISED

    a = Http2Assembler(client_direction="egress", offsets={"egress": 0, "ingress": 0})
    sent = PREFACE + raw_frame(4, 0, 0) + raw_frame(1, 5, 1, RAW_GET)
    out = a.on_data("egress", sent, 1, 0)
    pushes = b"".join(raw_frame(5, 4, 1, struct.pack(">I", 2 * i) + RAW_GET) for i in range(1, 1101))
    got = raw_frame(4, 0, 0) + pushes
    out += a.on_data("ingress", got, 2, 0)
    out += a.on_data("egress", raw_frame(1, 5, 3, RAW_GET), 3, len(sent))
    out += a.on_data("ingress", raw_frame(1, 5, 3, b"\x88") + raw_frame(1, 5, 1, b"\x88"), 4, len(got))
    assert [e.response.status for e in out] == [200, 200] and a.streams_dropped == 1100 - MAX_PROMISED
    closed = a.on_close(5)
    assert len(closed) == MAX_PROMISED and all(e.response is None for e in closed)


def _big_header_block(encoder, fields: int) -> bytes:
    # The first field adds a 4 KB value to the table; the rest refer to it in one byte each.
    return encoder.encode(request_headers() + [("x-big", "v" * 4000)] * fields, huffman=False)


def test_a_header_list_keeps_at_most_max_fields():
    """One-byte references to a table entry each became a tuple: ~70x the block's size."""
    import hpack

    from qtap_devtools.assemble.hpack_decode import MAX_FIELDS

    block = hpack.Encoder().encode(request_headers() + [("x", "")] * 20_000, huffman=False)
    frames = raw_frame(1, 1, 1, block[:16000])
    for i in range(16000, len(block), 16000):
        frames += raw_frame(9, 4 if i + 16000 >= len(block) else 0, 1, block[i:i + 16000])
    a = Http2Assembler(client_direction="egress", offsets={"egress": 0, "ingress": 0})
    a.on_data("egress", PREFACE + raw_frame(4, 0, 0) + frames, 1, 0)
    [ex] = a.on_data("ingress", raw_frame(4, 0, 0) + raw_frame(1, 5, 1, b"\x88"), 2, 0)
    assert len(ex.request.headers) == MAX_FIELDS and ex.incomplete and ex.request.method == "GET"


def test_header_lists_held_by_a_connections_open_streams_are_bounded():
    import hpack

    from qtap_devtools.assemble.http2 import MAX_HEADER_LIST, MAX_HELD_HEADERS

    encoder = hpack.Encoder()
    a = Http2Assembler(client_direction="egress", offsets={"egress": 0, "ingress": 0})
    sent = PREFACE + raw_frame(4, 0, 0)
    a.on_data("egress", sent, 1, 0)
    fit = MAX_HELD_HEADERS // (MAX_HEADER_LIST - 40_000)  # requests of nearly 1 MiB each that fit at once
    for sid in range(1, 2 * fit + 3, 2):  # one more than fits: left out, counted
        frame = raw_frame(1, 5, sid, _big_header_block(encoder, 250))
        a.on_data("egress", frame, 2, len(sent))
        sent += frame
    assert a.streams_dropped == 1 and a._held_headers <= MAX_HELD_HEADERS
    got = raw_frame(4, 0, 0) + raw_frame(1, 5, 1, b"\x88")
    [ex] = a.on_data("ingress", got, 3, 0)  # the first goes out, and its room is free again
    assert ex.request.target == "/" and len(ex.request.headers) == 254
    frame = raw_frame(1, 5, 2 * fit + 3, _big_header_block(encoder, 250))
    a.on_data("egress", frame, 4, len(sent))
    [ex] = a.on_data("ingress", raw_frame(1, 5, 2 * fit + 3, b"\x88"), 5, len(got))
    assert ex.response.status == 200 and a.streams_dropped == 1


def test_a_response_whose_end_was_shed_says_so_at_the_close_not_that_it_failed():
    """While shedding, a body-only call keeps nothing: a download's last DATA
    frames, END_STREAM among them, may never be captured, and the close is all
    that is seen.  It read "connection closed before the response ended", a
    failure, for streams the client had received whole."""
    from qtap_devtools.assemble.model import SHED_END_UNSEEN

    w = Wire()
    sid = w.request("/big")
    w.server.send_headers(sid, [(":status", "200")])  # no content-length: only END_STREAM ends it
    w.server.send_data(sid, b"d" * 16_000)
    w.flush()
    w.server.send_data(sid, b"e" * 16_000, end_stream=True)
    lost = len(w.server.data_to_send())
    w.asm.on_data(w.s2c, b"", w.ts + 1, w.offsets[w.s2c] + lost, shed=True)  # the close's record: where it ended
    [ex] = w.asm.on_close(w.ts + 2)
    assert ex.error == SHED_END_UNSEEN and ex.shed and ex.incomplete and ex.response.body_truncated
    assert ex.response.status == 200 and ex.response.body == b"d" * 16_000


def test_a_response_the_close_cut_without_shedding_still_says_the_connection_closed():
    w = Wire()
    sid = w.request("/big")
    w.server.send_headers(sid, [(":status", "200")])
    w.server.send_data(sid, b"d" * 16_000)
    w.flush()
    [ex] = w.asm.on_close(w.ts + 1)
    assert ex.error == "connection closed before the response ended" and not ex.shed
