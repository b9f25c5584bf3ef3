"""The REST state: bounded in entries and, for transactions, in bytes."""

from __future__ import annotations

import pytest

from qtap_devtools import events as ev
from qtap_devtools.events import Envelope
from qtap_devtools.store import Store
from tests import samples


def tx(i: int, body: int) -> Envelope:
    return Envelope.of(ev.HTTP_TRANSACTION, {"data": {"requestId": f"r{i}", "summary": {"process_pid": 1},
                                                       "data": "A" * body}}, 1_700_000_000_000_000_000)


def test_transactions_are_evicted_oldest_first_beyond_the_byte_budget():
    store = Store(transactions=1000, transaction_bytes=10 * 300_000)
    for i in range(40):
        store.on_event(tx(i, 300_000))
    kept = [e.inner["requestId"] for e in store.recent_transactions()]
    assert 0 < len(kept) <= 10 and kept[-1] == "r39"
    assert kept == [f"r{i}" for i in range(40 - len(kept), 40)]
    stats = store.stats()
    assert stats["evicted"]["transactions"] == 40 - len(kept)
    assert stats["transaction_bytes_kept"] == sum(len(e.frame) for e in store.recent_transactions())


def test_small_transactions_are_bounded_by_count():
    store = Store(transactions=5)
    for i in range(12):
        store.on_event(tx(i, 10))
    assert [e.inner["requestId"] for e in store.recent_transactions()] == [f"r{i}" for i in range(7, 12)]
    assert store.stats()["evicted"]["transactions"] == 7


def summary_tx(i: int, method: str, path: str, status, ms, direction: str = "egress-external") -> Envelope:
    summary = {"process_pid": 1, "request_host": "api.test", "request_method": method, "request_path": path,
               "response_status": status, "duration_ms": ms, "direction": direction}
    return Envelope.of(ev.HTTP_TRANSACTION, {"data": {"requestId": f"r{i}", "summary": summary}}, 0)


def test_the_endpoint_index_counts_by_route_with_statuses_errors_and_latency():
    store = Store()
    store.on_event(summary_tx(1, "GET", "/users/42", 200, 10))
    store.on_event(summary_tx(2, "GET", "/users/43?x=1", 404, 30))
    store.on_event(summary_tx(3, "GET", "/users/44", None, 5))  # no response
    store.on_event(summary_tx(4, "GET", "/users/45", "200", 2))  # a capture file's status: named as 200
    store.on_event(summary_tx(5, "POST", "/users", 201, 7))
    store.on_event(summary_tx(6, "POST", "/users", 201, 2.5))  # a capture file's: a float
    store.on_event(summary_tx(7, "POST", "/users", 201, "soon"))  # or anything: counted as 0 ms
    store.on_event(summary_tx(8, "GET", "/health", 200, 0))  # the agent's: whole ms, and precise µs
    store.on_event(Envelope.of(ev.HTTP_TRANSACTION, {"data": {"requestId": "r9", "summary": {
        "request_host": "api.test", "request_method": "GET", "request_path": "/health", "response_status": 200,
        "duration_ms": 0, "duration_us": 44}}}, 0))
    health = next(e for e in store.endpoint_list() if e["path"] == "/health")
    assert (health["count"], health["max_ms"], health["avg_ms"]) == (2, 0.044, 0.022)
    users, posts = sorted((e for e in store.endpoint_list() if e["path"] != "/health"), key=lambda e: e["method"])
    assert users == {"side": "client", "host": "api.test", "method": "GET", "path": "/users/{id}", "count": 4, "errors": 3,
                     "max_ms": 30, "statuses": {"200": 2, "404": 1, "None": 1}, "avg_ms": 11.75}
    assert posts == {"side": "client", "host": "api.test", "method": "POST", "path": "/users", "count": 3, "errors": 0,
                     "max_ms": 7, "statuses": {"201": 3}, "avg_ms": 3.167}


def test_a_transaction_made_here_is_read_from_its_values_as_its_parsed_frame_would_be():
    # The agent's own transactions come with their values and no body; a
    # capture file's come parsed.  Both must leave the same state.
    made, parsed = Store(), Store()
    conns = [samples.connection(host=h) for h in ("api.stripe.com", "")]
    conns[1].sni = conns[1].http_host = None
    conns[1].direction = "ingress"  # the server's end: its endpoints are counted apart
    for i in range(30):
        t = samples.transaction(conns[i % 2], f"r{i}", method=("GET", "POST")[i % 3 == 0], path=f"/users/{i % 4}",
                                host=("api.test", "")[i % 5 == 0])
        t.status, t.duration_ms = (200, 404, None)[i % 3], i * 0.37
        env = t.envelope()
        assert env.values is not None and env._body is None
        made.on_event(env)
        parsed.on_event(Envelope.from_wire(env.type, env.frame.split(b"\n")[1][6:]))
        assert env._body is None  # the store read the values, built no body
    assert made.endpoint_list() == parsed.endpoint_list() and len(made.endpoint_list()) > 2
    assert {e["side"] for e in made.endpoint_list()} == {"client", "server"}
    assert made.stats() == parsed.stats() and made.process_list() == parsed.process_list()
    assert [e.frame for e in made.recent_transactions()] == [e.frame for e in parsed.recent_transactions()]


def proc(pid: int, created: str, stopped: bool = False) -> Envelope:
    kind = ev.PROCESS_STOPPED if stopped else ev.PROCESS_STARTED
    return Envelope.of(kind, {"pid": pid, "binary": "curl", "createdAt": created}, 0)


def pid_tx(i: int, pid: int) -> Envelope:
    return Envelope.of(ev.HTTP_TRANSACTION, {"data": {"requestId": f"r{i}", "summary": {"process_pid": pid}}}, 0)


def test_a_process_counts_its_own_requests_not_those_of_an_earlier_process_with_its_pid():
    store = Store()
    store.on_event(proc(7, "2025-12-12T16:00:00.000Z"))
    for i in range(3):
        store.on_event(pid_tx(i, 7))
    store.on_event(proc(7, "2025-12-12T16:00:00.000Z"))  # announced again (a snapshot): the same process
    assert [(p["pid"], p["event_count"]) for p in store.process_list()] == [(7, 3)]
    store.on_event(proc(7, "2025-12-12T16:00:00.000Z", stopped=True))
    store.on_event(proc(7, "2025-12-12T17:00:00.000Z"))  # the pid reused
    store.on_event(pid_tx(9, 7))
    assert [(p["pid"], p["event_count"]) for p in store.process_list()] == [(7, 1)]


def test_request_counts_for_processes_never_seen_stop_are_bounded():
    store = Store(processes=4)
    for pid in range(100, 120):  # transactions of processes the store never heard of
        store.on_event(pid_tx(pid, pid))
    assert len(store.process_events) <= 5


def test_request_counts_of_live_processes_are_bounded_without_a_scan_per_request():
    # Every pid's process is known (a replayed file can make it so): the
    # counts are pruned to three quarters of the limit, not one at a time.
    store = Store(processes=100)
    for pid in range(100):
        store.on_event(proc(pid, "2025-12-12T16:00:00.000Z"))
        store.on_event(pid_tx(pid, pid))
    assert len(store.process_events) == 100
    store.on_event(pid_tx(1000, 1000))  # a pid never announced: over the limit
    assert len(store.process_events) == 75  # room for 25 more before the next scan
    assert store.stats()["evicted"]["process_request_counts"] == 25
    assert 99 in store.process_events and 0 not in store.process_events  # the oldest went


def test_event_types_counted_by_name_are_bounded():
    # A replayed capture file can name any number of event types.
    from qtap_devtools import store as store_mod

    st = Store()
    for i in range(store_mod.MAX_EVENT_TYPES + 10):
        st.on_event(Envelope.from_wire(f"custom.{i}", b'{"data": {}, "ts": "2025-12-12T16:58:10.452Z"}'))
    assert len(st.by_type) == store_mod.MAX_EVENT_TYPES + 1 and st.by_type["other"] == 10
    assert sum(st.by_type.values()) == store_mod.MAX_EVENT_TYPES + 10


def test_a_request_seen_at_both_its_ends_counts_once_on_each_side():
    """Between two local processes a request is captured twice: by the client
    (egress) and by the server (ingress).  One endpoint counting both said two
    requests, with the two ends' latencies averaged."""
    store = Store()
    for i, (direction, ms) in enumerate([("egress-internal", 9), ("ingress", 3), ("egress-internal", 11)]):
        store.on_event(summary_tx(i, "GET", "/users/1", 200, ms, direction))
    sides = {e["side"]: (e["count"], e["max_ms"]) for e in store.endpoint_list()}
    assert sides == {"client": (2, 11), "server": (1, 3)}
    assert [(e["side"], e["count"]) for e in store.endpoint_list("server")] == [("server", 1)]
    assert [(e["side"], e["count"]) for e in store.endpoint_list("client")] == [("client", 2)]


def test_endpoints_are_evicted_least_recently_used_whether_counted_in_runs_or_interleaved():
    """A run of transactions to one endpoint skips the index's lookup: the order
    it keeps, and so which endpoint goes first, must be what lookups make."""
    store = Store(endpoints=3)
    paths = ["/a", "/a", "/b", "/a", "/c", "/c", "/b", "/b", "/d"]  # least recent at the end: /a
    for i, path in enumerate(paths):
        store.on_event(summary_tx(i, "GET", path, 200, 1))
    kept = {e["path"]: e["count"] for e in store.endpoint_list()}
    assert kept == {"/c": 2, "/b": 3, "/d": 1}
    assert store.stats()["evicted"]["endpoints"] == 1
    store.on_event(summary_tx(99, "POST", "/d", 200, 1))  # same path, another method: another endpoint
    store.on_event(summary_tx(100, "GET", "/d", 200, 1))
    kept = {(e["method"], e["path"]): e["count"] for e in store.endpoint_list()}
    assert kept == {("GET", "/b"): 3, ("GET", "/d"): 2, ("POST", "/d"): 1}


def test_endpoints_counted_in_runs_on_alternating_sides_are_kept_and_evicted_as_lookups_would():
    """Each side has its index and remembers its last endpoint: a request seen
    at both ends alternates them.  What is kept, its counts and what is let go
    must be what a lookup for every transaction makes, whatever the limit."""
    import random
    from collections import OrderedDict

    rng = random.Random(7)
    for limit in (1, 2, 3):
        for _ in range(40):
            store, model, evicted = Store(endpoints=limit), {"client": OrderedDict(), "server": OrderedDict()}, 0
            for i in range(rng.randrange(1, 30)):
                direction, path = rng.choice(("ingress", "egress-internal")), rng.choice(("/a", "/b", "/c"))
                store.on_event(summary_tx(i, "GET", path, 200, 1, direction))
                index = model["server" if direction == "ingress" else "client"]
                index[path] = index.pop(path, 0) + 1
                if len(index) > limit:
                    index.popitem(last=False)
                    evicted += 1
            got = {(e["side"], e["path"]): e["count"] for e in store.endpoint_list()}
            assert got == {(side, path): n for side, index in model.items() for path, n in index.items()}
            assert store.stats()["evicted"]["endpoints"] == evicted


def test_the_path_to_route_memo_is_bounded_and_counts_what_it_lets_go(monkeypatch):
    from qtap_devtools import store as store_mod

    store = Store()
    before = store.stats()["evicted"]["route_memo"]
    for i in range(store_mod._ROUTES_MAX + 10):  # unique paths: ids in the query string
        store.on_event(summary_tx(i, "GET", f"/search?q={i}", 200, 1))
    assert len(store_mod._ROUTES) <= store_mod._ROUTES_MAX
    assert store.stats()["evicted"]["route_memo"] - before >= 10
    assert [e["path"] for e in store.endpoint_list()] == ["/search"]


def started(pid: int, ppid: int) -> Envelope:
    return Envelope.of(ev.PROCESS_STARTED, {"pid": pid, "ppid": ppid, "binary": f"p{pid}"},
                       1_700_000_000_000_000_000)


def depth(nodes: list[dict]) -> int:
    return 1 + max((depth(n["children"]) for n in nodes), default=0) if nodes else 0


def test_a_deep_chain_and_a_loop_of_parents_give_a_finite_shallow_tree():
    """130 nested processes made /process-tree a 500 (orjson's nesting limit),
    and a loop of parents (pids reused; a crafted capture) would never end."""
    import orjson

    from qtap_devtools.store import MAX_TREE_DEPTH

    store = Store()
    for pid in range(2, 132):
        store.on_event(started(pid, pid - 1))  # 2 <- 3 <- ... <- 131; 2's parent unknown
    store.on_event(started(500, 501))
    store.on_event(started(501, 500))  # a loop
    tree = store.process_tree()
    orjson.dumps(tree)  # encodes
    assert depth(tree) == MAX_TREE_DEPTH

    def pids(nodes):
        return [p for n in nodes for p in [n["pid"], *pids(n["children"])]]

    assert sorted(pids(tree)) == [*range(2, 132), 500, 501]  # each process once, none lost


def test_the_process_tree_says_which_container_and_pod_each_process_runs_in():
    store = Store()
    store.on_event(started(10, 1))
    shim = {"pid": 11, "ppid": 10, "binary": "sleep",
            "container": {"id": "d410d64684ac", "name": "qa-long", "image": "app:1", "labels": {"a": "b"},
                          "fullId": "d410d64684ac" + "0" * 52, "runtime": "docker"},
            "pod": {"name": "web-1", "namespace": "shop", "uid": "u", "labels": {}, "containerName": "web"}}
    store.on_event(Envelope.of(ev.PROCESS_STARTED, shim, 1_700_000_000_000_000_000))
    [host] = store.process_tree()
    assert "container" not in host and "pod" not in host
    [child] = host["children"]
    assert child["container"] == {"id": "d410d64684ac", "name": "qa-long", "image": "app:1"}
    assert child["pod"] == {"name": "web-1", "namespace": "shop"} and child["children"] == []


def test_a_transaction_a_file_holds_twice_is_counted_once():
    store = Store()
    for _ in range(2):
        for i in range(3):
            store.on_event(tx(i, 10))
    assert len(store.recent_transactions()) == 3
    assert store.process_events[1] == 3


@pytest.mark.parametrize("summary", ["text", ["a"], 7, None])
def test_a_files_transaction_whose_summary_is_not_an_object_is_kept(summary):
    store = Store()
    store.on_event(Envelope.of(ev.HTTP_TRANSACTION, {"data": {"requestId": "r1", "summary": summary}}, 0))
    assert len(store.recent_transactions()) == 1
    assert [e["host"] for e in store.endpoint_list()] == ["?"]
