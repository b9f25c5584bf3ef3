"""The agent's helper threads: named where the OS shows them, and run as
equals whatever the agent's CPU priority (``priority.py``).

They do little CPU but must answer promptly: the exec watcher attaches to new
processes, the Docker and Kubernetes threads fetch the metadata an event waits
at most 50 ms for (the ring reader too, where no watchdog lifts it: priority.py).
Idle, under load they would not get a core in time.  Threads inherit the
scheduling class of the thread that starts them, so each one says so itself,
first thing (:func:`service_thread`).
"""

from __future__ import annotations

import ctypes
import os
import threading

PR_SET_NAME = 15
SERVICE_TIDS: set[int] = set()  # read by priority.CpuPriority, which leaves them be


def name_thread(name: str) -> None:
    """Name the calling thread for ``top -H``, ``ps -L`` and /proc (Python's
    thread names stay inside Python); at most 15 bytes."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):  # not Linux glibc: the name is cosmetic
        pass


def lift(tid: int = 0) -> None:
    """Run thread ``tid`` (0: this one) as an equal if it is idle."""
    try:
        if os.sched_getscheduler(tid) == os.SCHED_IDLE:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    except OSError:  # it ended, or a seccomp filter: it runs as it was
        pass


def service_thread(name: str) -> None:
    """Call first in a helper thread: names it, and runs it as an equal."""
    name_thread(name)
    SERVICE_TIDS.add(threading.get_native_id())
    lift()


class NativeSection:
    """Work a helper thread does in native libraries that the process's exit
    must not run under.

    The start-up thread compiles the probes with bcc (LLVM) and places them
    (libbcc, libelf, the kernel), and a stop may come at any moment of it.  A
    normal exit tears down what that thread is using: the C++ libraries'
    static destructors, Python's objects and bcc's ``atexit`` cleanup.  Under
    it the process crashed (SIGSEGV in libLLVM, libbcc or libc), about one
    stop in 30-50 sent while compiling or placing.  ``close()`` bars new
    entries and says whether a thread is inside: if so, the process exits
    without that teardown (``agent.exit_now``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._closed = False

    def __enter__(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the process is exiting")
            self._inside += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._inside -= 1

    def close(self) -> bool:
        """No entries from now on; True when a thread is inside one now."""
        with self._lock:
            self._closed = True
            return self._inside > 0


CAPTURE_START = NativeSection()  # compiling, loading and placing the probes (agent._start_capture)
