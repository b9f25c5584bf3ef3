"""The ring watchdog (capture/_watchdog.c): a thread without the GIL that lifts
idle threads once the ring is behind, and the CpuPriority that arms it.

The ring's two positions are played by anonymous shared pages written here, as
the kernel and the reader write the real ones; the threads lifted are real
threads of this process, set idle by the test and checked with
``sched_getscheduler``.  (test_agent_lifecycle checks the agent's own threads.)
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time

import pytest

from qtap_devtools import priority as pr
from qtap_devtools.capture import _watchdog  # a C part, built by make setup (test_compiled: every one is)
from qtap_devtools.priority import CpuPriority
from tests.test_priority import Worker

PERIOD_US = 1000
THRESHOLD = 1 << 20
NEVER_STALLS = 60_000_000  # µs: the longest it takes


class Ring:
    """The producer and consumer pages of a ring, and a watchdog on them."""

    def __init__(self, stall_us: int = NEVER_STALLS) -> None:
        self.data, self.consumer = mmap.mmap(-1, mmap.PAGESIZE), mmap.mmap(-1, mmap.PAGESIZE)
        self.dog = _watchdog.Watchdog(self.data, self.consumer, THRESHOLD, PERIOD_US, stall_us)

    def unread(self, n: int, consumer: int = 4096) -> None:
        struct.pack_into("<Q", self.consumer, 0, consumer)
        struct.pack_into("<Q", self.data, 0, consumer + n)

    def looks(self, n: int = 3) -> None:
        """Wait until the watchdog has looked at the ring ``n`` more times."""
        until, deadline = self.dog.checks + n, time.monotonic() + 10
        while self.dog.checks < until:
            assert time.monotonic() < deadline, "the watchdog stopped looking"
            time.sleep(PERIOD_US / 1e6)

    def close(self) -> None:
        self.dog.close()
        self.data.close()
        self.consumer.close()


class Idle(Worker):
    """A thread of this process that waits, SCHED_IDLE."""

    def __init__(self) -> None:
        super().__init__(CpuPriority("idle", threads=lambda: []))
        assert self.policy() == os.SCHED_IDLE

    def lower(self) -> None:
        os.sched_setscheduler(self.tid, os.SCHED_IDLE, os.sched_param(0))


@pytest.fixture
def ring():
    r = Ring()
    yield r
    r.close()


@pytest.fixture
def idle():
    made: list[Idle] = []

    def make() -> Idle:
        made.append(Idle())
        return made[-1]

    yield make
    for t in made:
        t.close()


def test_lifts_the_threads_it_is_armed_with_once_the_ring_is_behind_and_only_once(ring, idle):
    a, b, bystander = idle(), idle(), idle()
    ring.dog.arm([a.tid, b.tid])
    ring.unread(THRESHOLD - 8)  # not yet
    ring.looks()
    assert ring.dog.armed and ring.dog.lifts == 0 and a.policy() == os.SCHED_IDLE
    ring.unread(THRESHOLD)
    wait_lifted(ring)
    assert (a.policy(), b.policy(), bystander.policy()) == (os.SCHED_OTHER, os.SCHED_OTHER, os.SCHED_IDLE)
    assert ring.dog.lifts == 1
    a.lower()  # disarmed: still behind, but left be until armed again
    ring.looks()
    assert a.policy() == os.SCHED_IDLE and ring.dog.lifts == 1


def test_on_a_quiet_ring_it_looks_less_often_and_still_lifts_once_records_come(ring, idle):
    """An agent on a machine with no TLS traffic: the watchdog's look every
    period was most of its 80-130 wake-ups a second.  After a spell with
    nothing written it goes quiet (looks a tenth as often), and the first
    records written end that, and a ring behind still lifts."""
    a = idle()
    ring.dog.arm([a.tid])
    ring.unread(0)
    deadline = time.monotonic() + 10
    while not ring.dog.quiet:
        assert time.monotonic() < deadline, "a ring nothing was written to never made it quiet"
        time.sleep(0.01)
    assert ring.dog.armed and ring.dog.lifts == 0
    ring.unread(THRESHOLD)  # a burst: the producer moved past the threshold
    wait_lifted(ring)
    assert a.policy() == os.SCHED_OTHER and not ring.dog.quiet


def test_records_left_unread_for_the_stall_time_lift_but_a_reader_that_keeps_reading_is_left_be(idle):
    ring = Ring(stall_us=200_000)
    try:
        a = idle()
        ring.dog.arm([a.tid])
        # 0.6 s of a few bytes always waiting, the reader taking some every ~1 ms.
        end, consumer = time.monotonic() + 0.6, 4096
        while time.monotonic() < end:
            consumer += 8
            ring.unread(64, consumer)
            read_at = time.monotonic()  # the last read: what the stall time runs from
            time.sleep(0.001)
        assert ring.dog.armed and a.policy() == os.SCHED_IDLE
        # Now it reads nothing: lifted once the records have waited 0.2 s.
        wait_lifted(ring)
        assert time.monotonic() - read_at >= 0.2 - PERIOD_US / 1e6
        assert a.policy() == os.SCHED_OTHER and ring.dog.lifts == 1
    finally:
        ring.close()


def test_arm_with_no_threads_disarms_and_a_consumer_ahead_is_not_behind(ring, idle):
    a = idle()
    ring.dog.arm([a.tid])
    ring.dog.arm([])
    ring.unread(THRESHOLD * 4)
    ring.looks()
    assert not ring.dog.armed and a.policy() == os.SCHED_IDLE
    ring.dog.arm([a.tid])
    struct.pack_into("<Q", ring.consumer, 0, 1 << 40)  # a torn read, or a consumer page written by another
    ring.looks()
    assert ring.dog.armed and a.policy() == os.SCHED_IDLE


def test_its_thread_is_named_and_runs_as_an_equal_when_started_by_an_idle_thread(idle):
    made: list = []

    def start() -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        made.append(Ring())

    t = threading.Thread(target=start)
    t.start()
    t.join(5)
    ring = made[0]
    try:
        ring.looks(1)
        dogs = [int(tid) for tid in os.listdir("/proc/self/task")
                if open(f"/proc/self/task/{tid}/comm").read().strip() == "qtap-watchdog"]
        assert len(dogs) == 1 and os.sched_getscheduler(dogs[0]) == os.SCHED_OTHER
    finally:
        ring.close()
    assert not any(open(f"/proc/self/task/{tid}/comm").read().strip() == "qtap-watchdog"
                   for tid in os.listdir("/proc/self/task"))


def test_it_holds_the_pages_until_closed():
    ring = Ring()
    with pytest.raises(BufferError):
        ring.data.close()  # the watchdog still reads it
    ring.dog.close()
    ring.dog.close()  # twice is fine
    ring.data.close()
    ring.consumer.close()
    assert ring.dog.checks >= 0 and not ring.dog.armed


@pytest.mark.parametrize("args, error", [
    ((0, 1000, 1000), "threshold must be positive"),
    ((1, 50, 1000), "period 100 µs to 1 s"),
    ((1, 2_000_000, 2_000_000), "period 100 µs to 1 s"),
    ((1, 1000, 999), "stall time from the period to 60 s"),
    ((1, 1000, 61_000_000), "stall time from the period to 60 s"),
])
def test_bad_settings_are_refused(args, error):
    page = mmap.mmap(-1, mmap.PAGESIZE)
    with pytest.raises(ValueError, match=error):
        _watchdog.Watchdog(page, page, *args)
    page.close()  # nothing held


def test_bad_thread_lists_are_refused(ring):
    with pytest.raises(ValueError, match="at most 256"):
        ring.dog.arm(list(range(1, 258)))
    with pytest.raises(ValueError, match="positive"):
        ring.dog.arm([0])
    with pytest.raises(TypeError):
        ring.dog.arm(["1"])
    with pytest.raises(TypeError):
        ring.dog.arm(5)
    assert not ring.dog.armed


def wait_lifted(ring: Ring) -> None:
    deadline = time.monotonic() + 10
    while ring.dog.armed:
        assert time.monotonic() < deadline, "never lifted"
        time.sleep(0.001)


def test_auto_lets_the_watchdog_lift_the_reader_and_lowers_it_again_once_caught_up(ring, idle):
    loop, reader = idle(), idle()
    cpu = CpuPriority("auto", threads=lambda: [loop.tid, reader.tid])
    cpu.idle = True  # as apply() leaves it; the reader starts as an equal, watch() lowers it
    os.sched_setscheduler(reader.tid, os.SCHED_OTHER, os.sched_param(0))
    cpu.watch(ring.dog, reader.tid)
    assert reader.policy() == os.SCHED_IDLE and ring.dog.armed
    ring.unread(THRESHOLD)
    wait_lifted(ring)
    assert (reader.policy(), loop.policy()) == (os.SCHED_OTHER, os.SCHED_IDLE)  # only the reader
    cpu.update(pr.BEHIND / 2, now=10.0)  # lifted, reading, not yet caught up: it stays lifted
    assert reader.policy() == os.SCHED_OTHER and not ring.dog.armed and cpu.idle
    ring.unread(0)
    cpu.update(pr.CAUGHT_UP, now=10.1)  # caught up: idle and watched again
    assert reader.policy() == os.SCHED_IDLE and ring.dog.armed
    assert cpu.stats()["cpu_priority_reader_lifts"] == 1 and cpu.switches == 0

    cpu.update(pr.BEHIND, now=11.0)  # behind: everything normal, nothing to watch for
    assert (reader.policy(), loop.policy()) == (os.SCHED_OTHER, os.SCHED_OTHER) and not ring.dog.armed
    assert cpu.switches == 1
    cpu.update(0.0, now=11.0 + pr.HOLD_SECONDS)  # caught up and held: all idle, the reader watched
    assert (reader.policy(), loop.policy()) == (os.SCHED_IDLE, os.SCHED_IDLE) and ring.dog.armed


@pytest.mark.parametrize("mode", ["idle", "low", "normal"])
def test_only_auto_hands_the_reader_to_the_watchdog(ring, idle, mode):
    reader = idle()
    cpu = CpuPriority(mode, threads=lambda: [reader.tid])
    cpu.watch(ring.dog, reader.tid)
    assert not ring.dog.armed and cpu.watchdog is None and "cpu_priority_reader_lifts" not in cpu.stats()


def test_stopping_disarms_the_watchdog(ring, idle):
    loop, reader = idle(), idle()
    cpu = CpuPriority("auto", threads=lambda: [loop.tid, reader.tid])
    cpu.idle = True
    cpu.watch(ring.dog, reader.tid)
    assert ring.dog.armed
    cpu.stopping()
    assert not ring.dog.armed and (loop.policy(), reader.policy()) == (os.SCHED_OTHER, os.SCHED_OTHER)
