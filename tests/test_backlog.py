"""The hand-off from the ring reader to the event loop: bounded, fair."""

from __future__ import annotations

import asyncio
import threading

from qtap_devtools.backlog import Backlog


def test_a_full_backlog_makes_the_reader_wait_and_loses_nothing():
    async def go():
        loop = asyncio.get_running_loop()
        got: list[int] = []
        gate = asyncio.Event()
        backlog = Backlog(loop, got.extend, max_records=10, slice_records=4)
        done = threading.Event()

        def reader():
            for i in range(0, 50, 5):
                backlog.put(list(range(i, i + 5)))
            done.set()

        # Hold the loop's consumer back: the reader must stop at the limit.
        original = backlog._drain
        backlog._drain = lambda: loop.create_task(wait_then(original))

        async def wait_then(fn):
            await gate.wait()
            fn()

        t = threading.Thread(target=reader)
        t.start()
        while backlog.reader_waits == 0:
            await asyncio.sleep(0.01)
        assert backlog.stats()["backlog_records"] == 10 and not done.is_set()
        backlog._drain = original
        gate.set()
        while not done.is_set() or backlog.stats()["backlog_records"]:
            await asyncio.sleep(0.01)
        t.join()
        return got

    assert asyncio.run(go()) == list(range(50))


def test_the_loop_takes_slices_and_serves_others_between_them():
    async def go():
        loop = asyncio.get_running_loop()
        order: list[str] = []
        backlog = Backlog(loop, lambda part: order.append(f"slice{len(part)}"), slice_records=100)
        backlog.put(list(range(350)))

        async def other():
            order.append("other")

        loop.create_task(other())
        for _ in range(20):
            await asyncio.sleep(0)
        return order

    order = asyncio.run(go())
    assert sorted(order) == ["other", "slice100", "slice100", "slice100", "slice50"]
    assert order[-1] != "other"  # another task ran before the backlog was done


def test_close_releases_a_waiting_reader():
    async def go():
        backlog = Backlog(asyncio.get_running_loop(), lambda part: None, max_records=1)
        backlog._drain = lambda: None  # never drained
        backlog.put([1])
        t = threading.Thread(target=backlog.put, args=([2],))
        t.start()
        while backlog.reader_waits == 0:
            await asyncio.sleep(0.01)
        backlog.close()
        t.join(10)
        return t.is_alive()

    assert asyncio.run(go()) is False


def test_at_the_stop_what_is_queued_is_consumed_and_nothing_after_it():
    """The stop: close, then finish what is queued (its events must reach the
    clients before their goodbye); a batch put after the close, and a drain
    the loop had scheduled, consume nothing more, and the drop is counted."""
    async def go():
        loop = asyncio.get_running_loop()
        got: list[int] = []
        backlog = Backlog(loop, got.extend, slice_records=2)
        backlog.put([1, 2, 3])  # a drain is now scheduled on the loop
        backlog.close()
        backlog.put([4, 5])  # the reader's last batch, after the close
        assert backlog.finish(1.0) == 0
        at_finish = list(got)
        for _ in range(5):
            await asyncio.sleep(0)  # the scheduled drain runs: nothing left for it
        return at_finish, got, backlog.stats()

    at_finish, got, stats = asyncio.run(go())
    assert at_finish == got == [1, 2, 3]
    assert stats["backlog_discarded_at_stop"] == 2 and stats["backlog_records"] == 0


def test_at_the_stop_what_there_is_no_time_for_is_counted():
    async def go():
        backlog = Backlog(asyncio.get_running_loop(), lambda part: None)
        backlog._drain = lambda: None
        backlog.put([1, 2, 3])
        backlog.put([4])
        backlog.close()
        return backlog.finish(0.0), backlog.stats()

    left, stats = asyncio.run(go())
    assert left == 4 and stats["backlog_discarded_at_stop"] == 4 and stats["backlog_records"] == 0


class Chunk:
    def __init__(self, n: int) -> None:
        self.data = b"x" * n


def test_the_limit_is_in_bytes_too():
    async def go():
        backlog = Backlog(asyncio.get_running_loop(), lambda part: None, max_records=1000, max_bytes=64 * 1024)
        backlog._drain = lambda: None  # never drained
        backlog.put([Chunk(16384) for _ in range(4)])  # 64 KiB: full
        t = threading.Thread(target=backlog.put, args=([Chunk(16384)],))
        t.start()
        while backlog.reader_waits == 0:
            await asyncio.sleep(0.01)
        stats = backlog.stats()
        backlog.close()
        t.join(10)
        return stats

    stats = asyncio.run(go())
    assert stats["backlog_records"] == 4 and stats["backlog_bytes"] == 65536


def test_slices_are_bounded_in_bytes():
    async def go():
        loop = asyncio.get_running_loop()
        parts: list[int] = []
        backlog = Backlog(loop, lambda part: parts.append(len(part)), slice_records=1000, slice_bytes=64 * 1024)
        backlog.put([Chunk(16384) for _ in range(10)])
        for _ in range(20):
            await asyncio.sleep(0)
        return parts

    assert asyncio.run(go()) == [4, 4, 2]


def test_lag_is_how_long_the_oldest_waiting_batch_has_waited():
    """The gauge shedding reads: time behind, not bytes (a burst of big bodies
    the loop gets through at once is no reason to shed)."""
    async def go():
        loop = asyncio.get_running_loop()
        got: list[int] = []
        backlog = Backlog(loop, got.extend, slice_records=2)
        assert backlog.lag() == 0.0
        # Queued from "the reader" while the loop is busy: nothing drains yet.
        backlog.put([1, 2, 3])
        backlog.put([4])
        await_start = loop.time()
        while loop.time() - await_start < 0.05:
            pass  # the loop is busy: no callback runs
        assert backlog.lag() >= 0.05
        while backlog.stats()["backlog_records"]:
            await asyncio.sleep(0.01)
        assert backlog.lag() == 0.0 and got == [1, 2, 3, 4]

    asyncio.run(go())


def test_a_batch_cut_into_slices_releases_its_bytes_exactly_once():
    class Rec:
        def __init__(self, n: int) -> None:
            self.data = b"x" * n

    async def go():
        loop = asyncio.get_running_loop()
        got: list = []
        backlog = Backlog(loop, got.extend, slice_records=100, slice_bytes=1 << 20)
        small = [Rec(10) for _ in range(350)]  # cut by count
        large = [Rec(100_000) for _ in range(25)]  # cut by bytes
        backlog.put(small)
        backlog.put(large)
        assert backlog.stats()["backlog_bytes"] == 350 * 10 + 25 * 100_000
        seen = []
        while backlog.stats()["backlog_records"]:
            seen.append(backlog.stats()["backlog_bytes"])
            await asyncio.sleep(0)
        assert all(b >= 0 for b in seen)
        return got, backlog.stats()

    got, stats = asyncio.run(go())
    assert len(got) == 375 and stats["backlog_bytes"] == 0 and stats["backlog_records"] == 0


def test_a_batch_for_a_closed_loop_is_let_go_without_an_error():
    """Ctrl-C while the probes were still being placed: the loop was closed
    and the ring reader's next batch raised from call_soon_threadsafe, which
    the reader logged as an error with its traceback."""
    loop = asyncio.new_event_loop()
    backlog = Backlog(loop, lambda part: None)
    loop.close()
    backlog.put([1, 2])  # raises nothing
    backlog.put([3])  # and nothing is queued for a loop that will never run
    assert len(backlog._batches) == 1
