"""The agent's CPU priority: idle while it keeps up, an equal once behind.

Each test switches threads it starts itself (``threads=``), never the test
process's own, so a failure cannot leave the suite running at idle priority.
"""

from __future__ import annotations

import os
import threading

import pytest

from qtap_devtools import priority as pr
from qtap_devtools.priority import CpuPriority
from qtap_devtools.threads import SERVICE_TIDS, service_thread


class Worker:
    """A thread that applies a CpuPriority and then just waits."""

    def __init__(self, cpu: CpuPriority) -> None:
        self.cpu, self.said = cpu, None
        self.ready, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)
        self.tid = self.thread.native_id

    def _run(self) -> None:
        self.said = self.cpu.apply()
        self.ready.set()
        self.done.wait(30)

    def policy(self) -> int:
        return os.sched_getscheduler(self.tid)

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)


@pytest.fixture
def worker_for():
    made = []

    def make(mode: str, **kw) -> Worker:
        holder: list[Worker] = []
        cpu = CpuPriority(mode, threads=lambda: [w.tid for w in holder], **kw)
        w = Worker(cpu)
        holder.append(w)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def test_auto_starts_idle_goes_normal_when_behind_and_back_once_caught_up_and_held(worker_for):
    w = worker_for("auto")
    cpu = w.cpu
    assert w.policy() == os.SCHED_IDLE and cpu.idle
    assert "SCHED_IDLE while keeping up" in w.said
    cpu.update(pr.BEHIND / 2, now=100.0)  # a little behind: stays idle
    assert w.policy() == os.SCHED_IDLE
    cpu.update(pr.BEHIND, now=100.0)
    assert w.policy() == os.SCHED_OTHER and not cpu.idle and cpu.switches == 1
    cpu.update(0.0, now=100.0 + pr.HOLD_SECONDS / 2)  # caught up, but not for long enough
    assert w.policy() == os.SCHED_OTHER
    cpu.update(pr.CAUGHT_UP * 2, now=100.0 + pr.HOLD_SECONDS * 2)  # held long enough, not caught up
    assert w.policy() == os.SCHED_OTHER
    cpu.update(pr.CAUGHT_UP, now=100.0 + pr.HOLD_SECONDS * 2)
    assert w.policy() == os.SCHED_IDLE and cpu.idle
    assert cpu.stats() == {"cpu_priority": w.said, "cpu_priority_now": "idle", "cpu_priority_switches": 1}


def test_a_service_thread_runs_as_an_equal_and_is_left_be(worker_for):
    w = worker_for("auto")
    ready, done, tid = threading.Event(), threading.Event(), []

    def helper() -> None:  # started by an idle thread, as the agent's are
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        service_thread("qtap-test")
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(30)

    t = threading.Thread(target=helper, daemon=True)
    t.start()
    try:
        assert ready.wait(5)
        assert os.sched_getscheduler(tid[0]) == os.SCHED_OTHER and tid[0] in SERVICE_TIDS
        assert open(f"/proc/self/task/{tid[0]}/comm").read().strip() == "qtap-test"
        w.cpu._threads = lambda: [w.tid, tid[0]]
        w.cpu.update(1.0, now=0.0)
        w.cpu.update(0.0, now=10.0)
        assert w.policy() == os.SCHED_IDLE and os.sched_getscheduler(tid[0]) == os.SCHED_OTHER
    finally:
        done.set()
        t.join(5)
        SERVICE_TIDS.discard(tid[0])


@pytest.mark.parametrize("mode, policy, nice", [("idle", os.SCHED_IDLE, 0), ("low", os.SCHED_OTHER, 19),
                                                ("normal", os.SCHED_OTHER, 0)])
def test_fixed_modes_ignore_the_load(worker_for, mode, policy, nice):
    w = worker_for(mode)
    w.cpu.update(1.0, now=0.0)
    assert w.policy() == policy and os.getpriority(os.PRIO_PROCESS, w.tid) == nice
    assert w.cpu.switches == 0


def slice_ns(tid: int) -> int | None:
    for line in open(f"/proc/self/task/{tid}/sched"):
        if line.startswith("se.slice"):
            return int(line.split()[-1])
    return None  # (not shown while SCHED_IDLE)


def test_every_mode_asks_for_long_slices_which_threads_started_after_and_a_switch_to_normal_keep(worker_for):
    w = worker_for("normal")
    assert w.cpu.long_slices and slice_ns(w.tid) == pr.SLICE_NS
    assert slice_ns(threading.get_native_id()) != pr.SLICE_NS  # the test's own thread is left alone
    w = worker_for("auto")
    w.cpu.update(1.0, now=0.0)  # behind: normal
    assert w.policy() == os.SCHED_OTHER and slice_ns(w.tid) == pr.SLICE_NS

    got = []

    def starts_one() -> None:  # as the agent's main thread starts its helpers
        CpuPriority("normal", threads=lambda: []).apply()
        child = threading.Thread(target=lambda: got.append(slice_ns(threading.get_native_id())))
        child.start()
        child.join(5)

    t = threading.Thread(target=starts_one)
    t.start()
    t.join(5)
    assert got == [pr.SLICE_NS]


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="one of auto, idle, low, normal"):
        CpuPriority("fast")


@pytest.mark.parametrize("mode", ["auto", "idle"])
def test_stopping_runs_every_thread_as_an_equal_for_good(worker_for, mode):
    w = worker_for(mode)
    assert w.policy() == os.SCHED_IDLE
    w.cpu.stopping()
    assert w.policy() == os.SCHED_OTHER and not w.cpu.idle
    w.cpu.update(0.0, now=1e9)  # caught up long since: not lowered again
    assert w.policy() == os.SCHED_OTHER
