"""The agent's CPU priority: the traced programs first, while we keep up.

Measured on this 2-core machine with nginx and wrk (``make bench``'s W1 with
entry probes, 5 s runs, two each):

- At normal priority the agent's ~0.5 core decides where the traced programs
  run: a woken nginx or wrk is placed on the core the other one is using and
  waits behind it (wakeup-to-run latencies of 256-511 µs, measured with the
  sched tracepoints).  8,200-8,300 req/s.
- As SCHED_IDLE (``idle``) the agent's core counts as free, so a woken program
  takes it at once: 11,400-12,600 req/s, nothing lost, but the stream ran
  3.7 s behind, and where the traced programs leave less CPU (rate10k with
  entry probes) 3% of the transactions were lost.
- ``auto`` (the default) runs idle while the agent keeps up and as an equal
  (SCHED_OTHER) from when it is ``BEHIND`` until it has caught up
  (``CAUGHT_UP``), at least ``HOLD_SECONDS`` at a time so that a load near the
  line does not switch it hundreds of times a second: 9,400-9,950 req/s,
  nothing lost, the stream at most ~0.26 s behind (p99).

Whatever the mode, the agent's threads ask the kernel for long time slices
(``SLICE_NS``; EEVDF, Linux 6.12 on).  Their CPU share is the same, but a
traced program woken while one of them runs, with the default (shorter) slice,
is due first and takes the core at once instead of waiting out the agent's
slice.  The agent's work is throughput, not latency; theirs is latency.
Measured with ``make bench``'s tuned agent in five interleaved pairs (slow
hours): the traced p99 at rate10k +2,383 µs (median) with the kernel's slice,
+1,496 with 20 ms; waits of nginx and wrk over 4 ms in W1/W2 376 against 196;
shares, added CPU and SSE delay the same or better.  (A *shorter* slice, tried
before, does the opposite: it makes the agent due first.)

The load is the capture's (:meth:`Capture.load`): the fuller of the ring
buffer and the hand-off queue, where 1.0 is 0.5 s behind; bodies start being
shed at 0.5.  The ring reader measures it, so it must get a core when the
traced programs take every one; yet at normal priority its wake-ups (every 64
records) are what delays them most.  Counted with the ``sched_switch``
tracepoint over 8 s of rate10k: the reader preempted nginx or wrk 480-610
times, for 80-175 ms of waiting; idle, 76 times, 7-10 ms.  So in ``auto`` it
runs idle too, watched by a thread that needs no GIL (``capture/_watchdog.c``,
normal priority, a look every ``WATCH_US``): once ``LIFT_FILL`` of the ring is
unread, or records have waited ``STALL_US`` with none read, it lifts the reader
to normal, which then measures the load and decides for the rest as before;
caught up, the reader is lowered and watched again.  So run, in eight rate10k
runs: the reader 102-184 preemptions (11-29 ms), the watchdog's own wake-ups
132-219 (4-53 ms).  The event loop's thread, idle, still preempts them 146-209
times (187-298 ms): EEVDF picks an eligible idle thread at a tick while they
are runnable (100 times with ``idle``, never lifted); a 0.1 ms slice for idle
threads made it worse.  Without the watchdog built, the reader runs as an equal.  The other helper
threads (the exec watcher, the Docker and Kubernetes lookups) always do: they
use little CPU and must answer promptly (``threads.service_thread``).

Tried and left out: a budget on ``auto``'s lifts (an equal at most a quarter
of the last ~5 s, then idle again though behind).  Under W1's saturation it
did yield, yet the traced programs ran no faster (0.35-0.36 of untraced
against 0.32-0.38, two interleaved pairs): idle or not, the agent then takes
the cores' gaps to keep up, and W1's share is set by the CPU each request
costs all told, not by who goes first.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
import time

from qtap_devtools.threads import SERVICE_TIDS

log = logging.getLogger(__name__)

MODES = ("auto", "idle", "low", "normal")
BEHIND = 0.4  # Capture.load(): 0.2 s behind; shedding starts at 0.5 (loader.SHED_ON)
CAUGHT_UP = 0.05
HOLD_SECONDS = 0.25
LIFT_FILL = 0.1  # of the ring unread: the watchdog lifts the reader (> CAUGHT_UP, where it is lowered)
# The watchdog's period.  Its wake-ups delay the traced programs too: at 5 ms,
# 262 preemptions of nginx or wrk in a rate10k run (32 ms of waiting), more
# than the idle reader's 117 (24 ms).  At W2's rate (~600 MB/s) the 32 MiB ring
# fills 7.5 MB more in a period and its slack: lifted before shedding's half.
WATCH_US = 10_000
# Records unread this long, none read, lift too: a trickle of traffic on a CPU
# that other programs fill never reaches LIFT_FILL.  Longer than the reader ever
# waits for a core at rate10k: 100 ms lifted it 1-3 times a run, and then the
# traced p99, its CPU and the stream's delay were all worse than with none.
STALL_US = 500_000
SLICE_NS = 20_000_000  # the kernel takes 0.1-100 ms; its default here is 1.4
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}  # no wrapper in Python or glibc


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


def long_slice() -> bool:
    """Ask for ``SLICE_NS`` time slices for this thread and the threads it
    starts (they inherit it, and a change of policy keeps it).  False where the
    call is missing; a kernel before 6.12 takes it and ignores it."""
    number = _SCHED_SETATTR.get(os.uname().machine)
    if number is None:
        return False
    # struct sched_attr (include/uapi/linux/sched/types.h), 56 bytes: size, policy,
    # flags, nice, priority, then runtime, which sets a fair thread's slice.
    attr = struct.pack("IIQiIQQQII", 56, os.SCHED_OTHER, 0, os.getpriority(os.PRIO_PROCESS, 0), 0, SLICE_NS,
                       0, 0, 0, 0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(number, 0, ctypes.create_string_buffer(attr, len(attr)), 0) == 0
    except (OSError, AttributeError):
        return False


def _set(idle: bool, tids: list[int]) -> None:
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except OSError:  # the thread ended meanwhile
            pass


class CpuPriority:
    """Set at start (:meth:`apply`, before other threads: they inherit it),
    then told the capture's load (:meth:`update`, any thread)."""

    def __init__(self, mode: str, threads=_threads) -> None:
        if mode not in MODES:
            raise ValueError(f"CPU priority {mode!r}: one of {', '.join(MODES)}")
        self.mode = mode
        self.idle = False  # SCHED_IDLE now
        self.switches = 0  # times "auto" went from idle to normal
        self.watchdog = None  # capture/_watchdog.c's, once watch() is called
        self._reader: list[int] = []  # the ring reader's thread, which the watchdog lifts
        self.long_slices = False  # SLICE_NS taken (apply)
        self._stopping = False
        self._since = 0.0
        self._threads = threads  # this process's thread ids (a test passes its own)
        self._lock = threading.Lock()

    def apply(self) -> str:
        """Set this thread's priority for the mode; a line for the log."""
        self.long_slices = long_slice()
        try:
            if self.mode in ("auto", "idle"):
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
                self.idle = True
            elif self.mode == "low":
                os.setpriority(os.PRIO_PROCESS, 0, 19)  # this thread: Linux nice is per thread, inherited
        except OSError as exc:  # e.g. a seccomp filter: run as we are (the stats say "normal")
            log.warning("could not set CPU priority %s: %s", self.mode, exc)
            self.mode = "normal"
        return self.describe()

    def describe(self) -> str:
        return {
            "auto": "auto (SCHED_IDLE while keeping up, normal when behind)",
            "idle": "idle (SCHED_IDLE)",
            "low": "low (nice 19)",
            "normal": "normal",
        }[self.mode]

    def watch(self, watchdog, reader_tid: int) -> None:
        """Let ``watchdog`` lift the ring reader's thread, idle from now on
        while the rest is (``auto`` only)."""
        if self.mode != "auto":
            return
        with self._lock:
            self.watchdog, self._reader = watchdog, [reader_tid]
            if self.idle:
                _set(True, self._reader)
                watchdog.arm(self._reader)

    def stopping(self) -> None:
        """The agent is stopping: every thread an equal from now on.  Idle, on
        a CPU other programs fill, the stop took 28 s instead of under 2 (and
        the child that removes the probes, forked from an idle thread, would
        be idle too)."""
        with self._lock:
            if self.mode in ("auto", "idle"):
                _set(False, self._threads())
                if self.watchdog is not None:
                    self.watchdog.arm(())
                self.idle = False
            self._stopping = True

    def update(self, load: float, now: float | None = None) -> None:
        if self.mode != "auto" or self._stopping:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            if self.idle and load >= BEHIND:
                self._switch(False, now)
                self.switches += 1
                log.debug("falling behind (load %.2f): running at normal CPU priority", load)
            elif load <= CAUGHT_UP:
                if not self.idle and now - self._since >= HOLD_SECONDS:
                    self._switch(True, now)
                elif self.idle and self.watchdog is not None and not self.watchdog.armed:
                    _set(True, self._reader)  # lifted to look, and all is well: back to idle
                    self.watchdog.arm(self._reader)

    def _switch(self, idle: bool, now: float) -> None:
        _set(idle, [t for t in self._threads() if t not in SERVICE_TIDS])
        if self.watchdog is not None:
            self.watchdog.arm(self._reader if idle else ())  # nothing to lift while normal
        self.idle = idle
        self._since = now

    def stats(self) -> dict:
        out = {"cpu_priority": self.describe(), "cpu_priority_now": "idle" if self.idle else "normal",
               "cpu_priority_switches": self.switches}
        if self.watchdog is not None:
            out["cpu_priority_reader_lifts"] = self.watchdog.lifts
        return out
