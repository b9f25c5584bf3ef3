"""The event model against seed 003's examples, field by field."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtap_devtools import events as ev
from qtap_devtools import ids
from tests import samples

FIXTURES = Path(__file__).parent / "fixtures"


def seed(name: str) -> dict:
    return json.loads((FIXTURES / f"seed003_{name}.json").read_text())


def shape(value):
    """Keys and value types, recursively: what a consumer's jq path depends on."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def assert_covers(ours: dict, theirs: dict, path: str = "") -> None:
    """Every field of the seed is in ours with the same type (extra fields allowed)."""
    for key, value in theirs.items():
        where = f"{path}.{key}"
        assert key in ours, f"missing {where}"
        if isinstance(value, dict):
            assert isinstance(ours[key], dict), f"{where} is not an object"
            assert_covers(ours[key], value, where)
        elif isinstance(value, list):
            assert isinstance(ours[key], list), f"{where} is not a list"
        else:
            assert type(ours[key]) is type(value), f"{where}: {type(ours[key]).__name__} != {type(value).__name__}"


def test_process_started_matches_seed_field_by_field():
    body = ev.ProcessStarted(samples.PYTHON, ts_ns=samples.TS).envelope().body
    want = seed("process_event")
    assert_covers(body, want)
    for key in ("binary", "path", "pid", "hostname", "user", "createdAt"):
        assert body["data"][key] == want["data"][key], key
    for key in ("id", "name", "image", "labels"):
        assert body["data"]["container"][key] == want["data"]["container"][key], key
    assert body["ts"] == want["ts"]
    assert body["data"]["ppid"] == 1 and body["data"]["cmdline"] == "python3.11 app.py"


def test_process_stopped_carries_exit_code():
    body = ev.ProcessStopped(samples.PYTHON, exit_code=3).envelope().body
    assert body["data"]["exitCode"] == 3
    assert body["data"]["pid"] == samples.PYTHON.pid


def test_connection_event_matches_seed_field_by_field():
    conn = samples.connection()
    body = ev.ConnectionOpened(conn, ts_ns=samples.TS + 30_528_000_000).envelope().body
    want = seed("connection_event")
    assert_covers(body, want)
    ours, theirs = body["data"]["data"], want["data"]["data"]
    assert ours["meta"] == {**theirs["meta"], "sni": "api.stripe.com"}
    for key in ("direction", "socketProtocol", "l7Protocol", "tlsVersion", "destination"):
        assert ours[key] == theirs[key], key
    for key in ("address", "hostname", "exe", "user"):
        assert ours["source"][key] == theirs["source"][key], key
    assert ours["source"]["container"]["id"] == "1781322a598f"
    assert ours["tags"]["bin"] == ["python3.11"] and ours["tags"]["host"] == ["my-container"]
    assert body["ts"] == want["ts"]


def test_transaction_event_matches_seed_field_by_field():
    conn = samples.connection("d4u4jhg7p3qk26l91icg", "api.example.com")
    tx = samples.transaction(conn, "d4u4jhg7p3qk26l91id0")
    body = tx.envelope().body
    want = seed("transaction_event")
    assert_covers(body, want)
    ours, theirs = body["data"]["data"], want["data"]["data"]
    for key in ("connectionId", "endpointId", "requestId", "type", "contentType"):
        assert ours[key] == theirs[key], key
    for key, value in theirs["summary"].items():
        if key != "container_name":
            assert ours["summary"][key] == value, key
    assert ours["summary"]["container_name"] == "my-app"
    assert body["ts"] == want["ts"]


def test_transaction_data_is_base64_json_matching_seed():
    conn = samples.connection("d4u4jhg7p3qk26l91icg", "api.example.com")
    body = samples.transaction(conn, "r1").envelope().body
    full = json.loads(base64.b64decode(body["data"]["data"]["data"]))
    want = seed("transaction_data")
    assert_covers(full, want)
    for key, value in want["metadata"].items():
        if key not in ("container_image",):
            assert full["metadata"][key] == value, key
    for key in ("method", "url", "scheme", "path", "authority", "protocol", "user_agent", "content_type", "body"):
        assert full["request"][key] == want["request"][key], key
    assert full["response"]["status"] == 200 and full["response"]["body"] == want["response"]["body"]
    assert base64.b64decode(full["request"]["body"]) == b'{"user": "john"}'
    assert full["duration_ms"] == 81 and full["direction"] == "egress-external"


def test_sse_frame_is_event_then_one_data_line():
    frame = samples.transaction(samples.connection(), "r1").envelope().frame
    lines = frame.split(b"\n")
    assert lines[0] == b"event: request.http_transaction"
    assert lines[1].startswith(b"data: {") and lines[2:] == [b"", b""]
    orjson.loads(lines[1][6:])


@pytest.mark.parametrize("ns,text", [
    (0, "1970-01-01T00:00:00.000Z"),
    (1_765_558_690_452_999_999, "2025-12-12T16:58:10.452Z"),
])
def test_timestamps_are_rfc3339_utc_milliseconds(ns, text):
    assert ev.rfc3339(ns) == text
    assert ev.parse_rfc3339(text) == ns // 1_000_000 * 1_000_000


@given(st.lists(st.integers(-(10**18), 4 * 10**18), min_size=1, max_size=20))
def test_timestamps_match_datetime_in_any_order_of_milliseconds_and_seconds(times):
    """The caches (the last two milliseconds' texts, the last second's prefix)
    never give one time's text for another, however the calls interleave."""
    import datetime as dt
    for ns in times + times[::-1]:
        ms = ns // 1_000_000
        want = (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(milliseconds=ms))
        assert ev.rfc3339(ns) == want.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def test_ids_are_20_char_base32hex_unique_and_time_ordered():
    made = [ids.new_id(1_700_000_000 + i // 10) for i in range(1000)]
    assert len(set(made)) == 1000
    assert all(len(i) == 20 and set(i) <= set("0123456789abcdefghijklmnopqrstuv") for i in made)
    assert made == sorted(made)


def test_ids_decode_like_xid():
    raw = bytes(range(12))
    text = ids.encode(raw)
    # base32hex (RFC 4648 §7) of the same bytes, lowercased, padding dropped.
    assert text == base64.b32hexencode(raw).decode().lower().rstrip("=")


def test_new_id_is_the_xid_of_its_bytes():
    # new_id caches the time/machine/pid characters per second and builds the
    # rest from a table: it must equal encoding the 12 bytes it stands for.
    for when in (0, 1_700_000_000, 4_294_967_295, 1_764_590_000.9):
        made = ids.new_id(when)
        raw = ids.base64.b32hexdecode(made.upper() + "====")
        assert raw[:4] == int(when).to_bytes(4, "big") and raw[4:7] == ids._machine and raw[7:9] == ids._pid
        assert ids.encode(raw) == made


def test_new_ids_made_in_one_second_are_distinct():
    made = [ids.new_id(1_764_590_000.5) for _ in range(2000)]
    assert len(set(made)) == len(made)


def test_captured_text_naming_the_transaction_event_cannot_fool_the_recipes_grep():
    # The recipe's own grep is a process on the stream, its cmdline naming the event type.
    grep = ev.ProcessStarted(dataclasses.replace(samples.PYTHON, cmdline="grep request.http_transaction -A1"))
    frame = grep.envelope().frame
    data_line = frame.split(b"\n")[1]
    assert b"request.http_transaction" not in data_line
    assert orjson.loads(data_line[6:])["data"]["cmdline"] == "grep request.http_transaction -A1"


SPLICE_BAIT = '"type":"http_transaction","data":""'


@pytest.mark.parametrize("body", [b"", b'{"id": 123}', bytes(range(256)) * 400], ids=["empty", "small", "over-simd-size"])
def test_transaction_frame_is_what_the_generic_envelope_makes(body):
    # HttpTransaction.envelope splices the base64 into JSON serialized without
    # it; captured text that spells the splice point, or the event type, in
    # every field a user controls must not move it.
    conn = samples.connection(host=SPLICE_BAIT)
    tx = samples.transaction(conn, "r1", path="/" + SPLICE_BAIT + "request.http_transaction",
                             host=SPLICE_BAIT, response_body=body)
    tx.request.headers = {SPLICE_BAIT: SPLICE_BAIT, "x": "request.http_transaction"}
    generic = ev.Envelope.of(tx.type, tx.payload(), tx.ts_ns)
    spliced = tx.envelope()
    assert spliced.frame == generic.frame
    assert spliced.body == generic.body and spliced.type == generic.type and spliced.ts_ns == generic.ts_ns
    decoded = ev.decode_transaction(orjson.loads(spliced.frame.split(b"\n")[1][6:]))
    assert base64.b64decode(decoded["response"]["body"]) == body
    assert decoded["request"]["headers"][SPLICE_BAIT] == SPLICE_BAIT


# --------------------------------------------------------------------------
# Every event type the seed shows, field by field: each leaf of the seed's
# example must be in ours, at the same path, with the same value.  Ours may
# carry more fields (additions), never different ones.

CONN_TS = samples.TS + 30_528_000_000  # the seed's connection example: 16:58:40.980Z


def seed_connection() -> ev.Connection:
    """The process of the seed's connection example (it names another
    container than its process example does)."""
    payment = dataclasses.replace(samples.CONTAINER, id="ac55e22af23b" + "1" * 52, name="payment-service", labels={})
    conn = samples.connection()
    conn.process = dataclasses.replace(samples.PYTHON, container_id=payment.id, container=payment)
    return conn


def closed(conn: ev.Connection) -> ev.Connection:
    conn.closed_ns = CONN_TS
    return conn


def seed_transaction() -> ev.HttpTransaction:
    return samples.transaction(samples.connection("d4u4jhg7p3qk26l91icg", "api.example.com"), "d4u4jhg7p3qk26l91id0")


SEED_CASES = {
    "process.started": (lambda: ev.ProcessStarted(samples.PYTHON, ts_ns=samples.TS), "process_event"),
    "process.stopped": (lambda: ev.ProcessStopped(samples.PYTHON, exit_code=0, ts_ns=samples.TS), "process_event"),
    "connection.opened": (lambda: ev.ConnectionOpened(seed_connection(), ts_ns=CONN_TS), "connection_event"),
    "connection.updated": (lambda: ev.ConnectionUpdated(seed_connection(), ts_ns=CONN_TS), "connection_event"),
    "connection.closed": (lambda: ev.ConnectionClosed(closed(seed_connection()), ts_ns=CONN_TS), "connection_event"),
    "request.http_transaction": (seed_transaction, "transaction_event"),
}

# The seed's transaction example shows an elided placeholder for the base64
# transaction ("eyJtZXRh…ns...}"); the decoded form is compared on its own below.
NOT_COMPARABLE = {("request.http_transaction", "data.data.data")}


def leaves(value, path: str = ""):
    """(dotted path, value) of every non-object value; lists count as values."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}" if path else key)
    else:
        yield path, value


def at(doc, path: str):
    for key in path.split("."):
        assert isinstance(doc, dict) and key in doc, f"missing {path} (at {key})"
        doc = doc[key]
    return doc


@pytest.mark.parametrize("event_type", list(SEED_CASES))
def test_every_event_type_matches_the_seeds_example_field_by_field(event_type):
    make, example = SEED_CASES[event_type]
    env = make().envelope()
    assert env.type == event_type and env.frame.startswith(f"event: {event_type}\ndata: ".encode())
    body = orjson.loads(env.frame.split(b"\n")[1][len(b"data: "):])  # what a client parses
    want = seed(example)
    compared = 0
    for path, value in leaves(want):
        if (event_type, path) in NOT_COMPARABLE:
            continue
        assert at(body, path) == value, f"{event_type}: {path} is {at(body, path)!r}, the seed has {value!r}"
        compared += 1
    assert compared >= 10  # the examples' leaves were really walked


def test_transaction_data_decodes_to_the_seeds_example_field_by_field():
    body = seed_transaction().envelope().body
    full = json.loads(base64.b64decode(body["data"]["data"]["data"]))
    for path, value in leaves(seed("transaction_data")):
        assert at(full, path) == value, f"{path} is {at(full, path)!r}, the seed has {value!r}"


def test_process_stopped_differs_from_started_only_by_type_and_exit_code():
    started = ev.ProcessStarted(samples.PYTHON, ts_ns=samples.TS).envelope()
    stopped = ev.ProcessStopped(samples.PYTHON, exit_code=0, ts_ns=samples.TS).envelope()
    assert stopped.body["data"] == {**started.body["data"], "exitCode": 0}


def test_connection_closed_adds_when_and_how_long():
    conn = seed_connection()
    conn.closed_ns = conn.opened_ns + 2_345_000_000
    data = ev.ConnectionClosed(conn, ts_ns=CONN_TS).envelope().body["data"]["data"]
    assert data["closedAt"] == ev.rfc3339(conn.closed_ns) and data["durationMs"] == 2345


def test_system_connected_names_agent_host_kernel_capture_and_filters():
    # The seed lists system.connected without an example; these are our fields.
    env = ev.SystemConnected(version="1.2.3", hostname="box", kernel="6.18.44", mode="live",
                             capture={"state": "failed", "error": "not root"}, filters={"status": ["4xx"]},
                             instance="abc", ts_ns=samples.TS).envelope()
    assert env.type == "system.connected"
    assert env.body == {"data": {"agent": "qtap-devtools", "instance": "abc", "version": "1.2.3", "hostname": "box",
                                 "kernel": "6.18.44", "mode": "live",
                                 "capture": {"state": "failed", "error": "not root"},
                                 "filters": {"status": ["4xx"]}},
                        "ts": "2025-12-12T16:58:10.452Z"}


@settings(max_examples=2000, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.0 ** 52 + 1,
                                                                          -(2.0 ** 53), 4503599627370495.5]))
def test_round_even_is_round(x):
    assert ev.round_even(x) == round(x)


@pytest.mark.parametrize("x", [float("nan"), float("inf"), float("-inf")])
def test_round_even_refuses_what_round_refuses(x):
    with pytest.raises(Exception) as builtin:
        round(x)
    with pytest.raises(builtin.type):
        ev.round_even(x)


def test_a_target_with_raw_bytes_past_ascii_is_percent_encoded_in_the_url_as_a_browser_would():
    # GET /café?q=ü sent as raw UTF-8; heads are read as Latin-1, a character a byte.
    raw = "/café/ü?q=✓".encode()
    tx = samples.transaction(samples.connection(), "d4u4jhg7p3qk26l91ie0", method="GET", path=raw.decode("latin-1"))
    assert tx.url == "https://api.example.com/caf%C3%A9/%C3%BC?q=%E2%9C%93"
    assert json.loads(base64.b64decode(tx.envelope().inner["data"]))["request"]["url"] == tx.url
    assert samples.transaction(samples.connection(), "d4u4jhg7p3qk26l91ie1", path="/plain?a=b").url == \
        "https://api.example.com/plain?a=b"
    assert ev.percent_encoded("/x\u20ac") == "/x%E2%82%AC"  # past Latin-1 (an HTTP/2 peer's own text)
