"""The REST state: bounded in entries and, for transactions, in bytes."""

from __future__ import annotations

from qtap_devtools import events as ev
from qtap_devtools.events import Envelope
from qtap_devtools.store import Store


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
