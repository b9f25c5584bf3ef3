"""The JSON writer in C (``_jsonw.c``) against orjson, the path it stands in for.

Where it writes, its bytes must be orjson's (with json_line's grep guard);
where it would differ it must decline (None) so that orjson decides.  And it
must write what transactions actually hold, or it would be a slower no-op.
"""

from __future__ import annotations

import base64
import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtap_devtools import events as ev
from tests import samples

_jsonw = pytest.importorskip("qtap_devtools._jsonw", reason="C part not built (test_compiled fails under CI)")

GUARDED = b"request.http_transaction"


def orjson_line(value) -> bytes:
    return orjson.dumps(value).replace(GUARDED, b"request\\u002ehttp_transaction")


class Text(str):
    pass


class Table(dict):
    pass


# Text in every plane, the controls, the escapes, lone surrogates and the guarded words.
texts = st.one_of(st.text(), st.text(st.characters(min_codepoint=0, max_codepoint=0x7f)),
                  st.sampled_from(["request.http_transaction", '"\\/\b\f\n\r\t\x00\x1f\x7f', "\u2028é€😀"]),
                  # the guarded words among dots, cut and back to back (the writer finds them by their dot)
                  st.lists(st.sampled_from(["request.http_transaction", "request", ".", "http_transaction", "..",
                                            "request.", ".http_transaction", "e"]), max_size=8).map("".join))
# Only what the writer writes: no surrogates, no exponent floats, 64-bit ints.
plain_texts = texts.filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s))
plain_floats = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: "e" not in repr(x))
plain_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
plain = st.recursive(
    st.none() | st.booleans() | plain_ints | plain_floats | plain_texts,
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.dictionaries(plain_texts, inner, max_size=4),
    max_leaves=20)
anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts | texts.map(Text),
    lambda inner: (st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4)
                   | st.dictionaries(st.integers() | texts.map(Text), inner, max_size=2)
                   | st.dictionaries(texts, inner, max_size=2).map(Table)),
    max_leaves=20)


@settings(max_examples=1000)
@given(anything)
def test_writes_what_orjson_writes_or_declines(value):
    written = _jsonw.line(value)
    try:
        expected = orjson_line(value)
    except orjson.JSONEncodeError:
        assert written is None
        return
    assert written is None or written == expected


@settings(max_examples=1000)
@given(plain)
def test_writes_everything_an_event_holds(value):
    assert _jsonw.line(value) == orjson_line(value)


# Milliseconds rounded to the microsecond take a shortcut (k / 1000 printed
# from k's digits); near it: one ulp either side, and the bound.
millis = st.integers(-(10**12), 10**12).map(lambda k: k / 1000)
near_millis = st.tuples(millis, st.sampled_from([-1, 1])).map(lambda t: math.nextafter(t[0], t[1] * math.inf))


@settings(max_examples=3000)
@given(millis | near_millis | st.sampled_from([0.0, -0.0, 1e9, -1e9, 999999999.999, 0.001, -0.001, 0.1, 1e-3 + 1e-19]))
def test_milliseconds_are_written_as_repr_writes_them(value):
    written = _jsonw.line([value])
    if "e" in repr(value):  # 5e-324, one ulp from 0.0
        assert written is None
    else:
        assert written == orjson_line([value]) == f"[{value!r}]".encode()


@pytest.mark.parametrize("value", [1e16, 1e-5, 2**64, -(2**63) - 1, "\ud800", {1: 2}, {Text("k"): 1}, Table(a=1),
                                   Text("x"), b"bytes", object()])
def test_declines_what_it_would_write_otherwise(value):
    assert _jsonw.line(value) is None


def test_every_length_with_an_escape_or_a_wide_character_at_every_place():
    # The writer copies 16 characters at a time and stops at the first that
    # needs more than a copy; a string's last run may read past its end
    # (masked off).  So: each length around those sizes, each place.
    texts = ["a" * n for n in range(40)]
    for n in range(1, 40):
        for at in range(n):
            for odd in ('"', "\\", "\n", "\x01", "\x7f", "é", "€", "😀"):
                texts.append("a" * at + odd + "b" * (n - at - 1))
    assert _jsonw.line(texts) == orjson_line(texts)
    assert _jsonw.line({t: t for t in texts}) == orjson_line({t: t for t in texts})


def test_declines_nesting_deeper_than_events_go():
    deep: list = []
    for _ in range(100):
        deep = [deep]
    assert _jsonw.line(deep) is None
    assert ev.json_line({"deep": deep}) == orjson.dumps({"deep": deep})


# --------------------------------------------------------------------------
# A transaction's frame


SPLICE_BAIT = '"type":"http_transaction","data":""'

heads = st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40) | st.lists(st.text(max_size=10), max_size=3),
                        max_size=5)
bodies = st.binary(max_size=300) | st.sampled_from([b"", b"x" * ev._FRAME_BODY_BYTES])


@st.composite
def transactions(draw):
    conn = samples.connection(host=draw(st.sampled_from(["api.stripe.com", SPLICE_BAIT, "ünï.example"])))
    if draw(st.booleans()):
        conn.process = None
    tx = samples.transaction(conn, draw(st.text(min_size=1, max_size=30)), method=draw(st.sampled_from(["GET", "PØST"])),
                             path=draw(st.text(max_size=60)), host=draw(st.text(max_size=30)),
                             request_body=draw(bodies), response_body=draw(bodies))
    tx.request.headers = draw(heads)
    tx.response.headers = draw(heads)
    tx.response.content_encoding = draw(st.none() | st.sampled_from(["", "gzip"]))
    tx.response.body_decode_error = draw(st.none() | st.text(max_size=20))
    tx.response.trailers = draw(st.none() | heads)
    tx.timing = draw(st.dictionaries(st.sampled_from(["send_ms", "wait_ms"]), st.floats(0, 1e6) | st.integers(0, 10**6)))
    tx.duration_ms = draw(st.floats(0, 1e7))
    tx.user_agent = draw(st.none() | st.text(max_size=20))
    tx.error = draw(st.none() | st.text(max_size=20))
    for flag in ("partial", "incomplete", "upgraded", "shed"):
        setattr(tx, flag, draw(st.booleans()))
    tx.informational = tuple(draw(st.lists(st.integers(100, 199), max_size=2)))
    tx.status = draw(st.none() | st.integers(100, 599))
    if draw(st.integers(0, 5)) == 0:
        tx.response = None
    return tx


@settings(max_examples=400, deadline=None)
@given(transactions())
def test_transaction_frame_is_the_orjson_frame(tx):
    made, reference = tx.envelope(), tx._spliced()
    assert made.frame == reference.frame
    assert made.body == reference.body and made.type == reference.type and made.ts_ns == reference.ts_ns
    assert made.body == orjson.loads(made.frame.split(b"\n")[1][6:])
    assert ev.decode_transaction(made.body) == tx.transaction_json()


def test_a_usual_transaction_takes_the_one_pass_path():
    # The fast path must be taken for what the agent sees every time, or it is
    # dead weight: called directly, tx_frame must not decline.
    for conn_host in ("api.stripe.com", SPLICE_BAIT):
        tx = samples.transaction(samples.connection(host=conn_host), "r1",
                                 path="/request.http_transaction/é", response_body=b"\x00\xff" * 200)
        tx.response.content_encoding, tx.informational, tx.partial = "gzip", (100,), True
        frame = _jsonw.tx_frame(ev._TX_HEAD, *ev._TX_TEMPLATE, tx.values(), *ev._EVENT_TEMPLATE, tx.event_values(""))
        assert frame is not None
        assert frame == tx._spliced().frame
        assert b"request.http_transaction" not in frame.split(b"\n")[1]


def test_transaction_json_keeps_its_key_order():
    tx = samples.transaction(samples.connection(), "r1")
    tx.response.trailers, tx.error, tx.shed = {"x": "1"}, "boom", True
    out = tx.transaction_json()
    assert list(out) == ["metadata", "request", "response", "duration_ms", "duration_us", "direction", "started_at",
                         "timing", "error", "shed"]
    assert list(out["response"])[:3] == ["status", "reason", "http_version"]
    assert list(out["response"])[-2:] == ["body_truncated", "trailers"]
    assert out["request"]["body"] == "eyJ1c2VyIjogImpvaG4ifQ=="
    tx.response = None
    assert tx.transaction_json()["response"] is None
    assert list(tx.transaction_json())[:4] == ["metadata", "request", "response", "duration_ms"]


def test_a_template_and_its_values_must_agree():
    tx = samples.transaction(samples.connection(), "r1")
    inner, outer = (*ev._TX_TEMPLATE, tx.values()), (*ev._EVENT_TEMPLATE, tx.event_values(""))
    with pytest.raises(ValueError, match="given only"):
        _jsonw.tx_frame(ev._TX_HEAD, *inner[:2], tx.values()[:-1], *outer)
    with pytest.raises(ValueError, match="too many"):
        _jsonw.tx_frame(ev._TX_HEAD, *inner, *outer[:2], [*outer[2], 1])
    with pytest.raises(TypeError):
        _jsonw.tx_frame(ev._TX_HEAD, inner[0], inner[1][:-1], inner[2], *outer)
    with pytest.raises(TypeError):
        _jsonw.tx_frame(ev._TX_HEAD, *inner, *outer[:2])
    # The event's template has its one splice slot; the transaction's none.
    no_splice = ev._compile(ev._parse(("a", "b")))
    with pytest.raises(ValueError, match="no splice slot"):
        _jsonw.tx_frame(ev._TX_HEAD, *inner, *no_splice, [1, 2])
    with pytest.raises(ValueError, match="second one"):
        _jsonw.tx_frame(ev._TX_HEAD, *inner, *ev._compile(ev._parse(("a:splice", "b:splice"))), [1, 2])
    with pytest.raises(ValueError, match="none is expected"):
        _jsonw.tx_frame(ev._TX_HEAD, *ev._compile(ev._parse(("a:splice",))), [1], *outer)


def test_an_optional_slot_cannot_open_an_object():
    with pytest.raises(AssertionError):
        ev._compile(ev._parse(("a.b?", "a.c")))


def test_the_template_writes_what_the_dicts_make():
    splice_at = ev._compile(ev._parse(("x", "inner:splice", "y")))
    for layout in (("a", "b.c", "b.d?", "b.e.f", "g", "h?"), ev._tx_layout(True), ev._tx_layout(False)):
        slots = ev._parse(layout)
        values = [i if kind != ev.BASE64 else bytes([i]) for i, (_, _, _, kind) in enumerate(slots)]
        for skip in (False, True):
            given_values = [None if skip and optional else v for v, (_, _, optional, _) in zip(values, slots)]
            frame = _jsonw.tx_frame(b"", *ev._compile(slots), given_values, *splice_at, [1, None, 2])
            event = orjson.loads(frame[:-2])
            assert event["x"] == 1 and event["y"] == 2 and list(event) == ["x", "inner", "y"]
            assert event["inner"] == ev.b64(orjson.dumps(ev._unflatten(slots, given_values)))


def test_every_short_copy_length_is_written_whole():
    """Copies of up to 32 bytes are made inline, by loads that may overlap
    (_jsonw.c, copy): a key of every length puts its template text (``,"k…":``)
    at every length around those steps, and so do the digits of numbers."""
    keys = ["k" * n for n in range(1, 41)]
    values = [10 ** (n % 19 + 1) - 1 if n % 2 else -(10 ** (n % 19)) for n in range(1, 41)]
    values[:3] = ["", "é", [0, 1, -7, 2**64 - 1]]
    slots = ev._parse(tuple(keys))
    frame = _jsonw.tx_frame(b"head\n", *ev._compile(slots), values,
                            *ev._compile(ev._parse(("x", "inner:splice"))), [2**63, None])
    assert frame.startswith(b"head\n") and frame.endswith(b"\n\n")
    event = orjson.loads(frame[5:-2])
    assert event["x"] == 2**63
    assert orjson.loads(base64.b64decode(event["inner"])) == dict(zip(keys, values))


def test_an_events_body_is_built_from_its_values_as_its_frame_says():
    tx = samples.transaction(samples.connection(host=SPLICE_BAIT), "r1", path="/" + SPLICE_BAIT)
    env = tx.envelope()
    assert env.values is not None and env._body is None  # nothing built until asked
    assert env.body == orjson.loads(env.frame.split(b"\n")[1][6:])
    assert env.body is env.body  # built once
    env.release()
    assert env.values is None and env.body == orjson.loads(env.frame.split(b"\n")[1][6:])
