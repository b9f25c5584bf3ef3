"""A capture file replayed by the real CLI, read by real curl, through the
seed's recipes run verbatim."""

from __future__ import annotations

import base64
import json

import pytest

from tests import samples
from tests.agentproc import agent, get
from tests.recipes import json_docs, recipes, run_recipe

RECIPES = recipes()


@pytest.fixture(scope="module")
def replay_10001(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay")
    capture = samples.write_capture(tmp / "capture.txt")
    with agent(["replay", str(capture)], 10001, tmp / "agent.log") as proc:
        yield proc, tmp


def test_the_seed_has_the_four_recipes():
    assert len(RECIPES) == 4


def test_recipe_filter_for_errors_only(replay_10001):
    _, tmp = replay_10001
    docs = json_docs(run_recipe(RECIPES["Filter for errors only"], tmp))
    assert sorted(d["data"]["data"]["summary"]["response_status"] for d in docs) == [404, 500]


def test_recipe_watch_connections_to_a_host(replay_10001):
    _, tmp = replay_10001
    docs = json_docs(run_recipe(RECIPES["Watch connections to a specific host"], tmp))
    assert docs, "no connection events for api.stripe.com"
    assert {d["data"]["data"]["meta"]["connectionId"] for d in docs} == {"d4u4dho7p3qk26l914bg"}
    assert all(d["data"]["data"]["meta"]["endpointId"] == "api.stripe.com" for d in docs)


def test_recipe_decode_transaction_bodies(replay_10001):
    _, tmp = replay_10001
    docs = json_docs(run_recipe(RECIPES["Decode HTTP transaction bodies"], tmp))
    assert [d["request"]["path"] for d in docs] == ["/v1/users", "/v1/missing", "/v1/crash"]
    assert base64.b64decode(docs[0]["request"]["body"]) == b'{"user": "john"}'
    assert json.loads(base64.b64decode(docs[0]["response"]["body"])) == {"id": 123}


def test_recipe_export_to_file_then_replay_it(replay_10001, tmp_path):
    out = run_recipe(RECIPES["Export to file for later analysis"], tmp_path)
    assert out.strip() == "3"
    # The exported file is itself a capture file: replay it and get the same transactions.
    saved = tmp_path / "traffic-capture.txt"
    with agent(["replay", str(saved)], 10011, tmp_path / "agent2.log") as proc:
        status, body = get(proc.url + "/devtools/api/transactions")
        assert status == 200
        assert [t["summary"]["response_status"] for t in body["transactions"]] == [500, 404, 200]


def test_replay_serves_rest_and_is_ready_at_once(replay_10001):
    proc, _ = replay_10001
    assert get(proc.url + "/readyz")[0] == 200
    status, body = get(proc.url + "/devtools/api/transactions/d4u4jhg7p3qk26l91id0")
    assert status == 200 and body["transaction"]["request"]["url"] == "https://api.example.com/v1/users"
    status, body = get(proc.url + "/devtools/api/har")
    assert status == 200 and body["log"]["version"] == "1.2" and len(body["log"]["entries"]) == 3
    status, body = get(proc.url + "/devtools/api/stats")
    assert body["mode"] == "replay" and body["events"]["by_type"]["request.http_transaction"] == 3
