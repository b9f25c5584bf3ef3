"""The C head parser against the Python reference: same Head, same errors.

``_headparse`` takes the common shapes and hands the rest to ``parse_head_py``.
Generated heads mix valid lines with the near-misses that decide the split
(bare LF, lone CR, obs-fold, odd Content-Length, non-token names, bad start
lines): for every one, both must agree on every field, or raise the same
exception with the same words.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtap_devtools.assemble import http1_parse
from qtap_devtools.assemble.http1_parse import Head, parse_head_py

fast = http1_parse._headparse


def test_the_c_parser_is_built_and_in_use():
    """``make setup`` builds it; CI must not pass on the slow path by accident."""
    if fast is None:
        if os.environ.get("CI"):
            pytest.fail("qtap_devtools.assemble._headparse is not built (make setup compiles it)")
        pytest.skip("C head parser not built")
    assert http1_parse.parse_head is fast.parse_head


def outcome(fn, head: bytes, is_request: bool):
    try:
        msg = fn(head, is_request)
    except Exception as exc:  # noqa: BLE001 - the comparison is the point
        return ("raised", type(exc), str(exc))
    assert type(msg) is Head
    return ("parsed", {name: getattr(msg, name) for name in dir(msg) if not name.startswith("_")})


def same(head: bytes, is_request: bool) -> None:
    expected = outcome(parse_head_py, head, is_request)
    got = outcome(fast.parse_head, head, is_request)
    assert got == expected, head
    # bytearray (the reader's buffer) and memoryview-free bytes agree too
    assert outcome(fast.parse_head, bytearray(head), is_request) == expected
    # read in place, between what came before it and what follows (the reader's call)
    around = b"\r\nHTTP/1.1 200 OK\r\n\r\n" + head + b"\r\n\r\nGET / HTTP/1.1\r\n"
    for buf in (around, bytearray(around)):
        assert outcome(lambda h, r: fast.parse_head_at(buf, 21, 21 + len(head), r), buf, is_request) == expected


TOKENISH = st.sampled_from(["Host", "Content-Length", "content-length", "CONNECTION", "Transfer-Encoding",
                            "Upgrade", "Content-Encoding", "X-Trace", "Set-Cookie", "bad name", "", "Näme",
                            "x(y)", "Accept"])
VALUES = st.sampled_from(["5", " 12 ", "0", "007", "5, 5", "5,6", "-1", "1e3", "", "²", "9" * 18, "9" * 19,
                          "close", "keep-alive, Upgrade", "Close", "chunked", "gzip, chunked", "gzip",
                          "websocket", "a\tb", " text with spaces ", "é", "\t", "x\t", "\t x \t", "5\t",
                          "keep-alive", "CLOSE", "closer", "close\x0b", "\x0cclose", "clos\xe9"])
STARTS_REQ = st.sampled_from(["GET / HTTP/1.1", "POST /a?b=c HTTP/1.0", "GET  / HTTP/1.1", "GET / HTTP/1.2",
                              "G\x01T / HTTP/1.1", " GET / HTTP/1.1", "GET / HTTP/1.1 x", "GET /", "",
                              "PRI * HTTP/2.0", "M-SEARCH * HTTP/1.1", "GET /é HTTP/1.1"])
STARTS_RESP = st.sampled_from(["HTTP/1.1 200 OK", "HTTP/1.0 404 Not Found", "HTTP/1.1 204", "HTTP/1.1 204 ",
                               "HTTP/1.1 20 OK", "HTTP/1.1 2000 OK", "HTTP/1.1 2x0 OK", "HTTP/2 200 OK",
                               "HTTP/1.1", "HTTP/1.1 101 Switching Protocols", "HTTP/1.1 099 odd", "",
                               "HTTP/1.1 200 Ökay"])
SEPARATORS = st.sampled_from(["\r\n"] * 8 + ["\n", "\r", "\r\r\n"])


@st.composite
def heads(draw, starts):
    start = draw(starts)
    lines = [f"{draw(TOKENISH)}:{draw(VALUES)}" if draw(st.booleans()) else f"{draw(TOKENISH)}: {draw(VALUES)}"
             for _ in range(draw(st.integers(0, 6)))]
    if draw(st.integers(0, 9)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from([" folded", "\tfolded", "no colon"])))
    text = start
    for line in lines:
        text += draw(SEPARATORS) + line
    if draw(st.booleans()):
        text += "\r"  # the reader's slice keeps the last line's CR
    return text.encode("latin-1")


@settings(max_examples=600, deadline=None)
@given(heads(STARTS_REQ))
def test_requests_agree(head):
    same(head, True)


@settings(max_examples=600, deadline=None)
@given(heads(STARTS_RESP))
def test_responses_agree(head):
    same(head, False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_arbitrary_bytes_agree(head, is_request):
    same(head, is_request)


@pytest.mark.parametrize("head,is_request", [
    (b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5", True),
    (b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r", False),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\ncontent-encoding: br\r", False),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999999999\r", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 9999999999999999999\r", False),
    (b"HTTP/1.1 200 OK\r\nX: a\rb\r\n", False),
    (b"HTTP/1.1 200 OK\r\n\r\nX: after an empty line", False),
    # A head that ends in a line end holds an empty line: the C took it whole.
    (b"HTTP/1.1 200\r\n", False),
    (b"GET / HTTP/1.1\r\nContent-Length: 5\r\n", True),
    (b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r", True),
])
def test_edge_cases_agree(head, is_request):
    same(head, is_request)



LINE_ENDS = st.lists(st.sampled_from([b"\n", b"\r", b"\r\n", b"\n\n", b"\n\r\n", b"a", b"GET / HTTP/1.1"]), max_size=40)


@settings(max_examples=500, deadline=None)
@given(LINE_ENDS.map(b"".join), st.integers(0, 60), st.integers(0, 80), st.booleans())
def test_head_end_agrees(buf, start, limit, as_bytearray):
    """Where a head ends: the C scan against the two finds it replaced, any start and limit."""
    work = bytearray(buf) if as_bytearray else buf
    assert fast.head_end(work, start, limit) == http1_parse.head_end_py(work, start, limit)


def test_head_end_refuses_negative_bounds():
    with pytest.raises(ValueError):
        fast.head_end(b"a\n\n", -1, 3)
    with pytest.raises(ValueError):
        fast.head_end(b"a\n\n", 0, -1)


NAMES = st.sampled_from(["Host", "host", "HOST", "Set-Cookie", "set-cookie", "SET-COOKIE", "Cookie", "COOKIE", "Cookies",
                         "X-A", "x-a", "Accept",
                         "Näme", "näme", "K"])
PAIRS = st.lists(st.tuples(NAMES, st.sampled_from(["", "a", "b, c", "v=1; Path=/", "é"])), max_size=10)


@settings(max_examples=400, deadline=None)
@given(PAIRS, st.booleans(), st.booleans())
def test_combined_headers_agree(pairs, as_list, want_lower):
    from qtap_devtools.assemble import model

    headers = list(pairs) if as_list else tuple(pairs)
    lower_py: dict = {}
    lower_c: dict = {}
    expected = model.combined_headers_py(headers, lower_py if want_lower else None)
    got = fast.combined_headers(headers, lower_c if want_lower else None)
    assert got == expected and list(got) == list(expected)
    assert lower_c == lower_py and list(lower_c) == list(lower_py)
    assert model.combined_headers is fast.combined_headers


def test_combined_headers_agree_on_many_fields_and_on_common_names_in_any_case():
    from qtap_devtools.assemble import model

    names = ["Content-Type", "CONTENT-TYPE", "content-type", "X-Forwarded-For", "Set-Cookie", "set-cookie", "Hosts",
             "Hos", "Date", "X-Request-Id", *(f"X-{i}" for i in range(70))]
    for count in (2, 10, 64, 65, 80):  # the C combines up to 64 fields; past that, Python does
        headers = [(names[(i * 7) % len(names)], f"v{i}") for i in range(count)]
        lower_py, lower_c = {}, {}
        expected = model.combined_headers_py(headers, lower_py)
        got = fast.combined_headers(headers, lower_c)
        assert got == expected and list(got) == list(expected)
        assert lower_c == lower_py and list(lower_c) == list(lower_py)


def test_combined_headers_hands_odd_input_to_python():
    from qtap_devtools.assemble import model

    for headers in ([["Host", "a"]], [("Host", b"raw")], [(1, "x")], iter([("é", "x")]), iter([("a", 1)])):
        if not isinstance(headers, list):  # a one-shot iterator: each side gets its own
            headers = ItemsOnce(list(headers))
        try:
            expected = ("ok", model.combined_headers_py(headers.fresh() if isinstance(headers, ItemsOnce) else headers))
        except Exception as exc:  # noqa: BLE001
            expected = ("raised", type(exc))
        try:
            got = ("ok", fast.combined_headers(headers.fresh() if isinstance(headers, ItemsOnce) else headers))
        except Exception as exc:  # noqa: BLE001
            got = ("raised", type(exc))
        assert got == expected


class ItemsOnce:
    """Pairs that can be iterated once per ``fresh()``: the C drained an
    iterator, then handed the fallback what was left of it (nothing)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def fresh(self):
        return iter(list(self.items))


FRAMING_HEADS = [
    (b"POST / HTTP/1.1\r\nTRANSFER-ENCODING: chunked", True),
    (b"GET / HTTP/1.1\r\nCONNECTION: close", True),
    (b"HTTP/1.1 200 OK\r\nCONTENT-ENCODING: gzip", False),
    (b"HTTP/1.1 101 Switching\r\nUPGRADE: websocket\r\nCONNECTION: UPGRADE", False),
    (b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH: 12", False),
]


def test_framing_names_match_in_ascii_whatever_the_locale(tmp_path):
    """In a Turkish locale "I" is not "i" to strncasecmp: TRANSFER-ENCODING was
    no framing header to the C there, and a chunked body went unread.  The
    agent runs with the locale it is started with."""
    locale_dir = tmp_path / "locale"
    locale_dir.mkdir()
    made = subprocess.run(["localedef", "-i", "tr_TR", "-f", "UTF-8", str(locale_dir / "tr_TR.UTF-8")],
                          capture_output=True, text=True)
    assert (locale_dir / "tr_TR.UTF-8").exists(), made.stderr  # the `locales` package (make setup) has its source
    code = """
import json, locale, sys
assert locale.setlocale(locale.LC_CTYPE).startswith("tr_TR"), locale.setlocale(locale.LC_CTYPE)
from qtap_devtools.assemble import http1_parse as hp
heads = json.loads(sys.argv[1])
def fields(h):
    return [h.transfer_encoding, h.chunked, h.close, h.content_encoding, h.upgrade, h.content_length]
print(json.dumps([[fields(hp._headparse.parse_head(h.encode("latin-1"), r)), fields(hp.parse_head_py(h.encode("latin-1"), r))]
                  for h, r in heads]))
"""
    heads = json.dumps([[h.decode("latin-1"), r] for h, r in FRAMING_HEADS])
    out = subprocess.run([sys.executable, "-c", code, heads], capture_output=True, text=True,
                         env={**os.environ, "LOCPATH": str(locale_dir), "LC_ALL": "tr_TR.UTF-8"},
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    for (head, _), (c, py) in zip(FRAMING_HEADS, json.loads(out.stdout)):
        assert c == py, head
    assert json.loads(out.stdout)[0][0][1] is True  # chunked, seen by both


STARTS = st.lists(st.sampled_from([b"GET ", b"HTTP/", b"HTTP", b"H", b"M-SEARCH", b" ", b"\x16\x03\x01", b"a" * 23,
                                   b"a" * 24, b"PRI", b"\r\n", b"(", b"\xe9"]), max_size=6).map(b"".join)


@settings(max_examples=800, deadline=None)
@given(STARTS, st.integers(0, 40), st.integers(0, 50), st.booleans(), st.booleans())
def test_plausible_start_agrees(buf, pos, end, is_request, as_bytearray):
    """Whether a message could start here: the C check against the Python it
    replaced, any position and end, in or past the buffer."""
    work = bytearray(buf) if as_bytearray else buf
    assert fast.plausible_start(work, pos, end, is_request) is http1_parse.plausible_start_py(work, pos, end, is_request)


def test_plausible_start_refuses_negative_bounds():
    with pytest.raises(ValueError):
        fast.plausible_start(b"GET ", -1, 4, True)


def test_common_header_names_as_sent_or_lower_case_are_made_once():
    """Their str (and its hash) is reused; any other spelling is its own, and equal."""
    one = fast.parse_head(b"GET / HTTP/1.1\r\nHost: a\r\ncontent-type: b\r\nHOST: c\r\nX-Mine: d", True)
    two = fast.parse_head(b"GET / HTTP/1.1\r\nHost: e\r\ncontent-type: f\r\nHOST: g\r\nX-Mine: h", True)
    (h1, _), (c1, _), (u1, _), (x1, _) = one.headers
    (h2, _), (c2, _), (u2, _), (x2, _) = two.headers
    assert h1 is h2 and c1 is c2
    assert (u1, x1) == (u2, x2) == ("HOST", "X-Mine") and u1 is not u2


def test_a_head_read_in_place_is_bounded_by_its_buffer():
    for start, stop in ((-1, 3), (3, 2), (0, 99)):
        with pytest.raises(ValueError, match=r"parse_head_at: \[.*\] is not within a buffer of 20 bytes"):
            fast.parse_head_at(b"GET / HTTP/1.1\r\nA: b", start, stop, True)
    assert http1_parse.parse_head_at is fast.parse_head_at
    assert outcome(lambda h, r: http1_parse.parse_head_at_py(b"xx" + h + b"yy", 2, 2 + len(h), r),
                   b"GET / HTTP/1.1\r\nA: b", True) == outcome(parse_head_py, b"GET / HTTP/1.1\r\nA: b", True)


def read_outcome(fn, buf, pos, end, scan, is_request):
    found = fn(buf, pos, end, scan, is_request)
    if found is None:
        return None
    head, nxt = found
    return outcome(lambda h, r: head, b"", is_request), nxt


@st.composite
def streams(draw, starts):
    """A head among what comes before and after it in a reader's buffer, cut anywhere."""
    before = draw(st.sampled_from([b"", b"\r\n", b"\n", b"x", b"GET / HTTP/1.1\r\n\r\n"]))
    head = draw(heads(starts))
    ending = draw(st.sampled_from([b"\r\n\r\n", b"\n\n", b"\n\r\n", b"\r\n", b""]))
    buf = before + head + ending + draw(st.sampled_from([b"", b"body", b"GET / HTTP/1.1\r\n\r\n"]))
    pos = draw(st.sampled_from([0, len(before), min(len(buf), len(before) + 1)]))
    end = draw(st.integers(pos, len(buf)))
    scan = draw(st.integers(pos, max(pos, end)))
    return buf, pos, end, scan


@settings(max_examples=800, deadline=None)
@given(st.one_of(streams(STARTS_REQ).map(lambda s: (*s, True)), streams(STARTS_RESP).map(lambda s: (*s, False))),
       st.booleans())
def test_read_head_answers_as_the_python_or_declines(case, as_bytearray):
    """The reader's one-call step: where the C answers, it is the Python's
    answer (the same Head, the same next offset), or it declines (the reader
    then goes step by step, through the parsers tested above)."""
    buf, pos, end, scan, is_request = case
    work = bytearray(buf) if as_bytearray else buf
    got = read_outcome(fast.read_head, work, pos, end, scan, is_request)
    expected = read_outcome(http1_parse.read_head_py, buf, pos, end, scan, is_request)
    assert got is None or got == expected, (buf, pos, end, scan)


@pytest.mark.parametrize("buf,pos,end,scan,is_request,expected", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody", 0, 31, 0, True, 27),
    (b"xxHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\n", 2, 39, 2, False, 39),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0, 27, 20, True, 27),  # searched before up to 20
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0, 26, 0, True, None),  # not all here
    (b"\r\nGET / HTTP/1.1\r\n\r\n", 0, 20, 0, True, None),  # a blank line first: step by step
    (b"\x16\x03\x01\x02\x00\r\n\r\n", 0, 9, 0, True, None),  # not HTTP
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 0, 58, 0, False, None),  # malformed
])
def test_read_head_takes_the_common_case_and_declines_the_rest(buf, pos, end, scan, is_request, expected):
    for fn in (fast.read_head, http1_parse.read_head_py):
        found = fn(buf, pos, end, scan, is_request)
        assert (found[1] if found else None) == expected, fn
    assert http1_parse.read_head is fast.read_head


def test_read_head_refuses_bad_bounds():
    for pos, end, scan in ((-1, 4, 0), (2, 4, 1), (0, -1, 0)):
        with pytest.raises(ValueError):
            fast.read_head(b"GET / HTTP/1.1\r\n\r\n", pos, end, scan, True)


def test_a_head_over_the_limit_is_left_to_the_reader():
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * http1_parse.MAX_HEAD + b"\r\n\r\n"
    assert fast.read_head(big, 0, len(big), 0, True) is None
    assert http1_parse.read_head_py(big, 0, len(big), 0, True) is None
