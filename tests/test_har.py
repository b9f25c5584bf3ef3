"""HAR 1.2 from transactions: what the spec asks of each field, on the
transactions the agent makes (the event model, not hand-written JSON)."""

from __future__ import annotations

import base64
import dataclasses

import orjson

from qtap_devtools import har
from qtap_devtools.events import Address, Envelope, HttpMessage
from tests import samples


def one(tx) -> dict:
    (entry,) = har.from_envelopes([tx.envelope()])["log"]["entries"]
    return entry


def test_time_is_the_sum_of_the_timings():
    tx = samples.transaction(samples.connection(), "r1")
    tx.timing = {"send_ms": 0.012, "wait_ms": 41.25, "receive_ms": 0.041}
    tx.duration_ms = 41.303
    e = one(tx)
    assert e["timings"] == {"send": 0.012, "wait": 41.25, "receive": 0.041}
    assert e["time"] == round(sum(e["timings"].values()), 3) == 41.303


def test_cookies_form_parameters_and_the_servers_own_version():
    tx = samples.transaction(samples.connection(), "r2", request_body=b"user=john&tags=a+b&empty=")
    tx.request = HttpMessage(headers={"Cookie": "session=abc; theme=dark",
                                      "Content-Type": "application/x-www-form-urlencoded"},
                             body=tx.request.body, body_size=len(tx.request.body),
                             content_type="application/x-www-form-urlencoded")
    tx.response = HttpMessage(headers={"Set-Cookie": ["id=7; Path=/; HttpOnly; Secure", "lang=en; Domain=x.test",
                                                      "t=1; Expires=Wed, 21 Oct 2026 07:28:00 GMT",
                                                      "u=2; expires=not a date"]},
                              body=b"ok", body_size=2, content_type="text/plain")
    tx.response_version = "HTTP/1.0"  # a Python http.server answering an HTTP/1.1 request
    e = one(tx)
    assert e["request"]["cookies"] == [{"name": "session", "value": "abc"}, {"name": "theme", "value": "dark"}]
    # HAR 1.2: expires in ISO 8601 (an unreadable date is left out, not passed on as one).
    assert e["response"]["cookies"] == [{"name": "id", "value": "7", "path": "/", "httpOnly": True, "secure": True},
                                        {"name": "lang", "value": "en", "domain": "x.test"},
                                        {"name": "t", "value": "1", "expires": "2026-10-21T07:28:00Z"},
                                        {"name": "u", "value": "2"}]
    assert e["request"]["postData"]["params"] == [{"name": "user", "value": "john"}, {"name": "tags", "value": "a b"},
                                                  {"name": "empty", "value": ""}]
    assert (e["request"]["httpVersion"], e["response"]["httpVersion"]) == ("HTTP/1.1", "HTTP/1.0")


def test_a_cut_body_and_a_partial_transaction_say_so():
    tx = samples.transaction(samples.connection(), "r3")
    tx.response = HttpMessage(headers={}, body=b"x" * 100, body_size=5000, content_type="text/plain",
                              body_truncated=True)
    tx.partial = True
    e = one(tx)
    assert e["response"]["content"]["size"] == 100 and e["response"]["bodySize"] == 5000
    assert "cut" in e["response"]["content"]["comment"]
    assert e["comment"] == "partial"


def test_the_server_address_is_the_local_one_on_the_servers_side():
    conn = dataclasses.replace(samples.connection(), direction="ingress",
                               local=Address("10.0.0.5", 443), remote=Address("192.0.2.77", 50000))
    assert one(samples.transaction(conn, "r4"))["serverIPAddress"] == "10.0.0.5"
    assert one(samples.transaction(samples.connection(), "r5"))["serverIPAddress"] == "52.4.128.73"


def test_options_star_has_the_origin_as_its_url():
    tx = samples.transaction(samples.connection(), "r6", method="OPTIONS", path="*")
    assert one(tx)["request"]["url"] == "https://api.example.com"
    assert tx.transaction_json()["request"]["path"] == "*"


def test_entries_are_in_start_order_and_a_repeated_transaction_is_one_entry():
    conn = samples.connection()
    late, early = samples.transaction(conn, "late", ts_offset_ms=40_000), samples.transaction(conn, "early")
    envs = [late.envelope(), early.envelope(), late.envelope()]  # a capture file that holds one twice
    assert [e["startedDateTime"] for e in har.from_envelopes(envs)["log"]["entries"]] == [
        early.transaction_json()["started_at"], late.transaction_json()["started_at"]]


def test_a_field_of_the_wrong_type_leaves_its_entry_out_instead_of_making_an_invalid_har():
    good = samples.transaction(samples.connection(), "good").envelope()
    bad = []
    for change in ({"started_at": 5}, {"response": {"status": "two hundred"}}, {"request": {"body_size": "big"}}):
        tx = {**samples.transaction(samples.connection(), "x").transaction_json(), **change}
        body = {"data": {"data": {"requestId": f"bad{len(bad)}", "data": base64.b64encode(orjson.dumps(tx)).decode()}},
                "ts": "2025-12-12T16:58:10.452Z"}
        bad.append(Envelope.from_wire("request.http_transaction", orjson.dumps(body)))
    doc = har.from_envelopes([good, *bad])
    assert len(doc["log"]["entries"]) == 1 and doc["log"]["comment"].startswith("3 transactions left out")


def test_a_missing_timing_is_not_a_reason_to_leave_an_entry_out():
    tx = {**samples.transaction(samples.connection(), "x").transaction_json(), "timing": {"wait_ms": None}}
    e = har.entry("2025-12-12T16:58:10.452Z", tx)
    assert e["time"] == 81 and e["timings"]["wait"] == 81


def test_the_pages_export_makes_the_same_entries(tmp_path):
    """ui/export.js mirrors this module: run it (node) on the same
    transactions, the tricky ones included, and compare field by field."""
    import json
    import subprocess
    from pathlib import Path

    form = samples.transaction(samples.connection(), "f1", request_body=b"user=john&tags=a+b")
    form.request = HttpMessage(headers={"Cookie": "a=1; b=2", "Content-Type": "application/x-www-form-urlencoded"},
                               body=form.request.body, body_size=18,
                               content_type="application/x-www-form-urlencoded")
    form.response = HttpMessage(headers={"Set-Cookie": ["id=7; Path=/; HttpOnly"], "Location": "/next"},
                                body=b"\x00\xff", body_size=2000, content_type="application/octet-stream",
                                body_truncated=True)
    form.response_version, form.partial = "HTTP/1.0", True
    form.timing = {"send_ms": 0.5, "wait_ms": 2.25}
    server = samples.transaction(dataclasses.replace(samples.connection(), direction="ingress"), "s1",
                                 request_body=b"\x01\x02")
    txs = [form, server, samples.transaction(samples.connection(), "o1", method="OPTIONS", path="*")]
    rows = [{"id": t.request_id, "ts": "2025-12-12T16:58:10.452Z", "tx": t.transaction_json()} for t in txs]
    script = ("import('%s').then((m) => process.stdout.write(JSON.stringify("
              "m.harDocument(JSON.parse(process.argv[1])))))" % (Path(har.__file__).parent / "ui" / "export.js"))
    out = subprocess.run(["node", "-e", script, json.dumps(rows)], capture_output=True, text=True, timeout=30, check=True)
    mine = json.loads(out.stdout)["log"]["entries"]
    theirs = har.from_envelopes([t.envelope() for t in txs])["log"]["entries"]  # /devtools/api/har's, the CLI's
    # Whole entries, nothing set aside: a key only one of them has is a difference
    # (the page's _requestId was, while this test popped it).
    assert len(mine) == len(theirs) == len(txs)
    for page_entry, entry in zip(mine, theirs):
        assert page_entry == entry, (page_entry, entry)
    assert {e["_requestId"] for e in theirs} == {t.request_id for t in txs}
