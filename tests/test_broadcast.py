"""Fan-out with bounded queues: a slow client never slows the producer."""

from __future__ import annotations

import asyncio

import orjson

from qtap_devtools.broadcast import Broadcaster
from qtap_devtools.events import Envelope
from qtap_devtools.filters import EventFilter


def env(i: int, type_: str = "process.started") -> Envelope:
    return Envelope.of(type_, {"pid": i}, 1_700_000_000_000_000_000)


def parse(frame: bytes) -> tuple[str, dict]:
    lines = frame.decode().split("\n")
    return lines[0][len("event: "):], orjson.loads(lines[1][len("data: "):])


def split(chunk: bytes) -> list[bytes]:
    """A yield may carry several events (queued frames go out together)."""
    return [f + b"\n\n" for f in chunk.split(b"\n\n") if f]


async def drain(sub, n):
    out = []
    while len(out) < n:
        out += [parse(f) for f in split(await asyncio.wait_for(sub.next_batch(), 1))]
    assert len(out) == n, out
    return out


def test_overflow_is_counted_and_reported_as_system_dropped():
    async def go():
        bc = Broadcaster(client_queue_size=10)
        slow = bc.subscribe(EventFilter())
        fast = bc.subscribe(EventFilter())
        fast_seen = []
        for i in range(25):
            bc.publish(env(i))
            fast_seen.append(parse(await fast.next_batch()))  # the fast one keeps up
        assert len(fast_seen) == 25 and fast.total_missed == 0
        assert slow.total_missed == 15 and bc.dropped_total == 15
        got = await drain(slow, 11)
        assert [d["data"]["pid"] for t, d in got[:10]] == list(range(10))
        assert got[10][0] == "system.dropped" and got[10][1]["data"]["missed"] == 15
        assert got[10][1]["data"]["reason"] == "client fell behind; its queue overflowed"
        bc.publish(env(99))
        assert (await drain(slow, 1))[0][1]["data"]["pid"] == 99

    asyncio.run(go())


def test_publish_never_waits_for_subscribers():
    bc = Broadcaster(client_queue_size=4)
    subs = [bc.subscribe(EventFilter()) for _ in range(100)]
    for i in range(1000):
        bc.publish(env(i))
    assert all(len(s.queue) == 4 and s.total_missed == 996 for s in subs)


def test_frames_carry_id_after_data_and_resume_from_last_event_id():
    async def go():
        bc = Broadcaster(client_queue_size=100)
        for i in range(5):
            bc.publish(env(i))
        sub = bc.subscribe(EventFilter(), resume_after=3)
        frame = await sub.next_batch()
        lines = frame.decode().split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and lines[2] == f"id: {bc.instance}-4"

    asyncio.run(go())


def test_event_ids_from_another_agent_run_resume_from_the_start():
    from qtap_devtools.broadcast import parse_event_id

    assert parse_event_id("abc-17", "abc") == 17
    assert parse_event_id("old-17", "abc") == 0  # restarted: everything it has is new
    assert parse_event_id("17", "abc") == 17
    assert parse_event_id("x-y", "abc") is None
    assert parse_event_id("-5", "abc") is None  # not "after 5"
    assert parse_event_id("abc-\u00b2", "abc") is None  # a digit to str.isdigit, not to int()


def test_close_sends_system_disconnected_and_ends_streams():
    async def go():
        bc = Broadcaster(client_queue_size=2)
        sub = bc.subscribe(EventFilter())
        for i in range(5):
            bc.publish(env(i))
        bc.close("agent shutting down")
        frames = []
        while (chunk := await sub.next_batch()) is not None:
            frames += [parse(f) for f in split(chunk)]
        assert await sub.next_batch() is None  # closed stays closed
        assert frames[-1][0] == "system.disconnected"
        assert any(t == "system.dropped" for t, _ in frames)

    asyncio.run(go())


def test_filtered_subscriber_only_gets_matches():
    async def go():
        bc = Broadcaster()
        sub = bc.subscribe(EventFilter.from_query({"type": "connection"}))
        bc.publish(env(1))
        bc.publish(Envelope.of("connection.opened", {"data": {"meta": {}}}, 0))
        t, _ = parse(await sub.next_batch())
        assert t == "connection.opened"

    asyncio.run(go())


def big(i: int, size: int) -> Envelope:
    return Envelope.of("process.started", {"pid": i, "pad": "x" * size}, 1_700_000_000_000_000_000)


def test_a_client_queue_is_bounded_in_bytes_too():
    """1 MiB transactions: the count limit alone would let one slow client
    hold gigabytes; the byte limit drops (and counts) the excess."""
    async def go():
        bc = Broadcaster(client_queue_size=1000, client_queue_bytes=5 * 100_000)
        slow = bc.subscribe(EventFilter())
        for i in range(20):
            bc.publish(big(i, 100_000))
        assert len(slow.queue) == 4 and slow.total_missed == 16
        got = await drain(slow, 5)
        assert [d["data"]["pid"] for _, d in got[:4]] == [0, 1, 2, 3]
        assert got[4][0] == "system.dropped" and got[4][1]["data"]["missed"] == 16
    asyncio.run(go())


def test_all_clients_together_are_bounded_in_bytes_each_to_its_share():
    """Clients that stop reading at different moments each hold different
    frames: together they keep at most all_clients_bytes."""
    async def go():
        bc = Broadcaster(client_queue_size=1000, client_queue_bytes=1_000_000, all_clients_bytes=1_000_000)
        stuck = []
        for n in range(4):  # one more stops reading every 10 events
            stuck.append(bc.subscribe(EventFilter()))
            for i in range(10):
                bc.publish(big(10 * n + i, 100_000))
        assert bc.stats()["clientQueueBytes"] == 250_000 and bc.stats()["allClientsQueueBytes"] == 1_000_000
        # Each keeps at most its share, the oldest dropped first as the share shrank.
        assert all(s.queued_bytes <= 250_000 for s in stuck), [s.queued_bytes for s in stuck]
        assert all(s.total_missed for s in stuck) and bc.stats()["subscriberDrops"] == sum(s.total_missed for s in stuck)
        # One goes: the others' share grows back, and the stream after a drop says so.
        bc.unsubscribe(stuck.pop())
        assert bc.stats()["clientQueueBytes"] == 333_333
        bc.publish(env(99))
        got = await drain(stuck[0], len(stuck[0].queue))
        # Every event it was offered (all 41) is either in its stream or counted
        # in a system.dropped there, in order.
        pids = [d["data"]["pid"] for t, d in got if t == "process.started"]
        missed = [d["data"]["missed"] for t, d in got if t == "system.dropped"]
        assert len(pids) + sum(missed) == 41 and sum(missed) == stuck[0].total_missed
        assert pids == sorted(pids) and pids[-1] == 99 and got[0][0] == "system.dropped"
    asyncio.run(go())


def test_an_event_published_after_a_clients_goodbye_is_counted_as_missed():
    async def go():
        bc = Broadcaster()
        sub = bc.subscribe(EventFilter())
        bc.close("agent shutting down")
        bc.publish(env(1))  # e.g. the stop's last records, processed too late
        assert sub.total_missed == 1 and bc.stats()["subscriberDrops"] == 1
        frames = []
        while (chunk := await sub.next_batch()) is not None:
            frames += [parse(f) for f in split(chunk)]
        assert [t for t, _ in frames] == ["system.disconnected"]
    asyncio.run(go())


def test_history_is_bounded_in_bytes_and_counts_evictions():
    bc = Broadcaster(history_size=1000, history_bytes=10 * 50_000)
    for i in range(30):
        bc.publish(big(i, 50_000))
    assert len(bc.history) < 10 and bc.history_evicted == 30 - len(bc.history)
    assert bc.history[-1].envelope.body["data"]["pid"] == 29
    assert bc.stats()["historyBytes"] <= 10 * 50_000


def test_resuming_past_the_kept_history_is_told_what_it_missed():
    async def go():
        bc = Broadcaster(history_size=5)
        for i in range(20):
            bc.publish(env(i))
        # The client last saw seq 3; seqs 4..15 are gone from the history.
        sub = bc.subscribe(EventFilter(), resume_after=3)
        got = await drain(sub, 6)
        assert got[0][0] == "system.dropped" and got[0][1]["data"]["missed"] == 12
        assert "evicted" in got[0][1]["data"]["reason"]  # not "its queue overflowed": it did not
        assert [d["data"]["pid"] for _, d in got[1:]] == [15, 16, 17, 18, 19]
    asyncio.run(go())


def test_the_whole_history_is_sent_whatever_the_queue_count_bound_and_live_events_after_it():
    """The page opens with after=0: 10,000 events of history through a queue
    bound of 4,096 lost the newest 5,924, reported as the client falling
    behind before it had read anything."""
    async def go():
        bc = Broadcaster(client_queue_size=100, history_size=1000)
        for i in range(1000):
            bc.publish(env(i))
        sub = bc.subscribe(EventFilter(), resume_after=0)
        for i in range(1000, 1050):  # live ones while the history is still queued: within the bound
            bc.publish(env(i))
        got = await drain(sub, 1050)
        assert [d["data"]["pid"] for _, d in got] == list(range(1050))
        assert sub.total_missed == 0 and bc.dropped_total == 0
        # Once it is read, the bound is on live events again.
        for i in range(1050, 1200):
            bc.publish(env(i))
        assert sub.total_missed == 50 and bc.dropped_total == 50
    asyncio.run(go())


def test_history_past_a_clients_memory_share_sends_its_newest_part_and_says_so():
    async def go():
        bc = Broadcaster(history_size=1000, client_queue_bytes=10 * 50_000)
        for i in range(30):
            bc.publish(big(i, 50_000))
        sub = bc.subscribe(EventFilter(), resume_after=0)
        got = [parse(f) for f in split(await asyncio.wait_for(sub.next_batch(), 1))]
        kind, first = got[0]
        assert kind == "system.dropped" and "share of memory" in first["data"]["reason"]
        cut = first["data"]["missed"]
        assert 20 <= cut < 30 and bc.dropped_total == cut  # counted where an operator sees drops
        while len(got) < 1 + 30 - cut:
            got += [parse(f) for f in split(await asyncio.wait_for(sub.next_batch(), 1))]
        assert [d["data"]["pid"] for _, d in got[1:]] == list(range(cut, 30))
    asyncio.run(go())


def test_listeners_get_the_frame_the_stream_sends():
    """--output writes what curl -sN would: the numbered frame, id line included."""
    bc = Broadcaster()
    written = []
    bc.add_listener(lambda item: written.append(item.frame))
    sub = bc.subscribe(EventFilter())
    bc.publish(env(1))
    assert written == [sub.queue[0].frame] and b"\nid: " in written[0]


def test_queued_events_go_out_together_as_whole_frames():
    async def go():
        bc = Broadcaster()
        sub = bc.subscribe(EventFilter())
        for i in range(50):
            bc.publish(env(i))
        chunk = await sub.next_batch()
        return chunk

    chunk = asyncio.run(go())
    events = [parse(f) for f in split(chunk)]
    assert [d["data"]["pid"] for _, d in events] == list(range(50))  # one write, every frame whole


def test_a_turn_of_a_saturated_loop_goes_out_in_one_write_and_a_larger_queue_in_several():
    """A slice of the record backlog makes ~1 MiB of frames per turn of the
    event loop; a client got 256 KiB a write and lost the rest to its queue
    (W1) after the agent had done all the work for them.  Now a write takes
    up to SEND_BATCH_BYTES, and a queue beyond that is split into whole frames."""
    from qtap_devtools.broadcast import SEND_BATCH_BYTES

    async def go():
        bc = Broadcaster(client_queue_size=10_000, client_queue_bytes=64 << 20)
        sub = bc.subscribe(EventFilter())
        n = (SEND_BATCH_BYTES + (2 << 20)) // 10_000  # ~6 MiB of 10 kB events
        for i in range(n):
            bc.publish(big(i, 10_000))
        first = await sub.next_batch()
        assert SEND_BATCH_BYTES - 20_000 < len(first) <= SEND_BATCH_BYTES + 20_000
        assert len(first) > 1 << 20  # more than a loop turn adds
        second = await sub.next_batch()
        pids = [d["data"]["pid"] for _, d in (parse(f) for f in split(first) + split(second))]
        assert pids == list(range(n)) and sub.total_missed == 0
    asyncio.run(go())


def test_a_busy_stream_is_written_in_paced_batches_and_a_quiet_one_at_once():
    async def go():
        bc = Broadcaster()
        sub = bc.subscribe(EventFilter())
        sub.pace = 0.05
        loop = asyncio.get_running_loop()
        bc.publish(env(0))
        # Quiet until now: the batch is taken at once, before a publish the
        # loop runs next can join it.
        loop.call_soon(bc.publish, env(1))
        first = await sub.next_batch()
        # Just written: the next batch waits out the pace, and what is
        # published meanwhile goes with it.
        loop.call_later(0.01, bc.publish, env(2))
        second = await sub.next_batch()
        return first, second

    first, second = asyncio.run(go())
    assert [parse(f)[1]["data"]["pid"] for f in split(first)] == [0]
    assert [parse(f)[1]["data"]["pid"] for f in split(second)] == [1, 2]


def test_a_published_transaction_keeps_only_its_frame_and_reads_back_the_same():
    data = {"data": {"requestId": "r1", "summary": {"request_host": "x", "request_url": "https://x/request.http_transaction"},
                     "data": "eyJhIjoxfQ=="}}
    tx = Envelope.of("request.http_transaction", data, 1_700_000_000_000_000_000)
    before = tx.body
    seen = []
    bc = Broadcaster()
    bc.add_listener(lambda item: seen.append(item.envelope.inner.get("requestId")))
    matching = bc.subscribe(EventFilter.from_query({"host": "x"}))
    bc.publish(tx)
    # Listeners and filters read the parsed body while it is published...
    assert seen == ["r1"] and len(matching.queue) == 1
    # ...then only the frame is held (history, queues, store); a later read
    # parses it again, escaped dot and all.
    assert tx._body is None
    assert tx.body == before and tx.inner["summary"]["request_url"] == "https://x/request.http_transaction"
    # A reader about to look several times (REST: filter, then render) parses once.
    held = tx.parsed()
    assert held._body == before and held.frame is tx.frame and tx._body is None
    # Other events keep their body: the store holds their dicts anyway.
    proc = env(2)
    bc.publish(proc)
    assert proc._body is not None


def test_container_filter_matches_a_name_or_an_id_on_every_event_type():
    from tests import samples

    cid = samples.CONTAINER.id
    events = [e.envelope() for e in samples.session_events()]
    # The full id too (a transaction's summary has only the short one), as docker takes ids: any prefix.
    for query in (samples.CONTAINER.name, "y-ap", cid[:12], cid[:8].upper(), cid, cid[:20]):
        f = EventFilter.from_query({"container": query})
        matched = {e.type for e in events if f.matches(e)}
        assert {"request.http_transaction", "connection.opened", "process.started"} <= matched, (query, matched)
    # Not across the name and the id ("app 1781"), nor the middle of an id, nor another container's.
    for query in ("not-that-one", "app 1781", cid[2:12]):
        assert not any(EventFilter.from_query({"container": query}).matches(e) for e in events), query
