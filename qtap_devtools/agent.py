"""The live agent: capture → pipeline → enrichment → broadcast → server.

Capture runs in its own thread (the ring-buffer poller) and hands batches of
records to the event loop; everything after that runs in the loop.  If capture
cannot start, the server still runs: ``/readyz`` says why and the greeting
carries the reason, so the one-line error is visible from every surface.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import platform
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Awaitable, Callable

from qtap_devtools import __version__, compiled, kheaders
from qtap_devtools.agentlock import CaptureLock
from qtap_devtools.backlog import Backlog
from qtap_devtools.broadcast import Broadcaster
from qtap_devtools.capfile import CaptureWriter
from qtap_devtools.config import Config
from qtap_devtools.enrich import Enricher
from qtap_devtools.enrich.model import ProcessInfo
from qtap_devtools.events import SystemConnected, SystemDisconnected
from qtap_devtools.filters import EventFilter
from qtap_devtools.pipeline import Pipeline
from qtap_devtools.priority import LIFT_FILL, STALL_US, WATCH_US, CpuPriority
from qtap_devtools.publisher import Publisher
from qtap_devtools.runner import STOP_REASON, serve
from qtap_devtools.server import Runtime
from qtap_devtools.store import Store
from qtap_devtools.threads import CAPTURE_START

log = logging.getLogger(__name__)

TICK_SECONDS = 0.1
TRIM_SECONDS = 30.0  # freed heap handed back to the kernel this often
GC_THRESHOLDS = (10_000, 50, 50)
SHED_LAG_SECONDS = 0.5  # records waiting this long = fully behind (see Capture's shedding)
# At the stop (the whole of which runner.py keeps to about two seconds): records
# already read get this long to become events before the clients' goodbye, and
# the --output file this long to take what is queued for it.
STOP_FINISH_SECONDS = 0.3
WRITER_CLOSE_SECONDS = 0.5


class Agent:
    def __init__(self, config: Config, token: str | None = None) -> None:
        self.config = config
        self.broadcaster = Broadcaster(client_queue_size=config.client_queue_size, history_size=config.history_size)
        self.store = Store(transactions=config.history_size)
        self.broadcaster.add_listener(self.store.on_published)
        self.writer = CaptureWriter(config.output) if config.output else None
        if self.writer is not None:
            self.broadcaster.add_listener(lambda item: self.writer.write(*item.parts()))
        self.enricher = Enricher(
            docker=config.docker, docker_url=config.docker_url, kube_api=config.kube_api, node_name=config.node_name
        )
        self.capture = None
        self.probes_loading = False  # _start_capture got as far as loading probes
        self.backlog: Backlog | None = None  # set when capture starts
        self.capture_error: str | None = None
        self.publisher = Publisher(self.broadcaster.publish, self.enricher, self._remember_process)
        self.pipeline = Pipeline(config, self.publisher.emit, self.enricher.process, forget_process=self.enricher.forget,
                                 remember_process=self.enricher.remember)
        if not config.capture_own_port:  # its own API through a forwarder is left out too (server.OwnMarker)
            self.pipeline.own_marker = self.broadcaster.instance
        self.runtime = Runtime(
            config=config,
            broadcaster=self.broadcaster,
            store=self.store,
            mode="live",
            greeting=self._greeting,
            capture_stats=self.capture_stats,
            capture_state=self.capture_state,
            not_ready="capture is starting",
            token=token,
        )
        self._tasks: list[asyncio.Task] = []
        self.priority = CpuPriority("normal")  # main() sets the process's, before any thread starts
        self.capture_lock = CaptureLock()  # held while capturing: another agent starting says so
        if self.writer is not None:
            # Each run's events in the file begin with its greeting, as a
            # stream saved with curl does: a file several runs appended to says
            # where each began, with which agent, version and host.
            self.writer.write(self._greeting(EventFilter()).frame)

    # ------------------------------------------------------------ events out

    def _remember_process(self, info: ProcessInfo) -> None:
        self.pipeline.processes[info.pid] = info

    def _greeting(self, flt: EventFilter):
        return SystemConnected(
            version=__version__,
            hostname=socket.gethostname(),
            kernel=platform.release(),
            mode="live",
            instance=self.broadcaster.instance,
            capture=self.capture_state(),
            filters=flt.describe(),
        ).envelope()

    def capture_state(self) -> dict:
        if self.capture is None:
            return {"state": "failed" if self.capture_error else "starting", "error": self.capture_error}
        atts = self.capture.attachments
        return {
            "state": "running",
            "attached": [{"path": a.path, "library": a.library, "mode": a.mode, "sites": a.sites} for a in atts if a.ok],
            "failed": [{"path": a.path, "library": a.library, "error": a.error} for a in atts if not a.ok],
            "lostRecords": self.capture.lost_records(),
            # Past it, bodies are cut and marked "shed" (None: no limit).
            "maxCaptureMiBPerSecond": self.capture.byte_budget / (1 << 20) or None,
            "cpuPriority": self.priority.mode,  # --cpu-priority
        }

    def capture_stats(self) -> dict:
        out = {**self.pipeline.counters, "pending_events": len(self.publisher),
               "pending_dropped_total": self.publisher.dropped}
        if self.capture is not None:
            out.update(self.capture.stats())
            out.update(self.backlog.stats())
        if self.writer is not None:
            out["file_events_written"] = self.writer.written
            out["file_write_errors"] = self.writer.errors  # events the --output file lacks: failed writes
            out["file_events_dropped"] = self.writer.dropped  # and events it fell too far behind to take
        out["enrich"] = self.enricher.stats()
        out.update(self.priority.stats())
        return out

    # ------------------------------------------------------------ lifecycle

    def _start_capture_guarded(self, loop: asyncio.AbstractEventLoop) -> None:
        # A stop while this runs exits without the process's teardown (threads.NativeSection).
        with CAPTURE_START:
            self._start_capture(loop)

    def _start_capture(self, loop: asyncio.AbstractEventLoop) -> None:
        from qtap_devtools.capture.loader import SHED_HEAD_BYTES, Capture, CaptureError

        if os.geteuid() != 0:
            self.capture_error = "not root: eBPF capture needs root; run: sudo qtap-devtools run"
            return
        headers = kheaders.apply(self.config.cache_dir)
        if not headers.ok:
            self.capture_error = headers.detail
            return

        other = self.capture_lock.claim(self.config.listen.url())
        if other is not None:
            log.warning("another qtap-devtools agent is capturing on this machine (%s): every TLS call now runs "
                        "both agents' probes, their cost twice in the traced programs; stop one unless you mean "
                        "to compare them", other)
        self.backlog = Backlog(loop, self.pipeline.on_records)
        self.probes_loading = True  # from here the process may hold probes, started or not
        try:
            cap = Capture(
                on_records=self.backlog.put,
                extra_binaries=tls_binaries_on_path(),
                ring_mib=self.config.ring_mib,
                max_chunk=self.config.max_chunk_bytes,
                exclude_pid=os.getpid(),
                exclude_port=0 if self.config.capture_own_port else self.config.listen.port,
                attach_mode=self.config.attach_mode,
                shed_head_bytes=SHED_HEAD_BYTES if self.config.shed else 0,
                byte_budget=self.config.max_capture_mib_per_s * (1 << 20) if self.config.shed else 0,
                # Behind by SHED_LAG_SECONDS: shedding starts at half of it.
                # Time, not bytes: a burst of large bodies the agent gets
                # through in time is no reason to cut them.
                pressure=lambda: self.backlog.lag() / SHED_LAG_SECONDS,
                # Idle while keeping up, an equal when behind (priority.py).
                on_load=self.priority.update if self.priority.mode == "auto" else None,
                read_process=self.enricher.read_now,
                # The reader idle too, lifted by a watchdog when behind.
                watch_ring=(LIFT_FILL, WATCH_US, STALL_US) if self.priority.mode == "auto" else None,
            )
            cap.start()
            self.pipeline.tls_armed_mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            if cap.watchdog is not None and cap.reader_tid is not None:
                self.priority.watch(cap.watchdog, cap.reader_tid)
            self.backlog.while_waiting = cap.check_load
        except CaptureError as exc:
            self.capture_error = str(exc)
            return
        self.capture = cap
        self.pipeline.on_own_socket = cap.exclude_socket
        if self.enricher.docker is not None:
            # A created container's own libssl attached before it starts: else
            # its first `docker run … curl` races the attach at its first process.
            self.enricher.docker.on_layers = cap.on_container_layers

    async def _ticker(self) -> None:
        from qtap_devtools.capture.loader import trim_heap

        trimmed = time.monotonic()
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.pipeline.on_tick(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
            except Exception:  # the ticker must outlive a bug: it ends long-running streams
                log.exception("pipeline tick failed")
            if time.monotonic() - trimmed >= TRIM_SECONDS:
                # After a burst, glibc would keep the freed megabytes as resident.
                trim_heap()
                trimmed = time.monotonic()

    def _snapshot_processes(self) -> None:
        """Announce what already runs, so new clients get a process snapshot."""
        for pid in self.enricher.list_pids():
            if pid == os.getpid():
                continue
            info = self.enricher.process(pid)
            # Kernel threads (kworker, rcu_…) have no binary and no command
            # line: they make no HTTP, and listed they were most of the view.
            if info is not None and (info.exe or info.cmdline):
                self.pipeline.processes[pid] = info
                self.pipeline.announce_process(info, time.time_ns())

    async def on_started(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(asyncio.create_task(self.publisher.run()))
        self.enricher.start()
        print("qtap-devtools: starting capture (compiling probes takes a few seconds)…", flush=True)
        await _in_daemon_thread(loop, "capture-start", self._start_capture_guarded, loop)
        if self.capture is None:
            # Said once, with the status lines (a log line as well said it twice
            # in a terminal); the API and page stay up, /readyz says why not ready.
            print(f"qtap-devtools: capture not running: {self.capture_error}; still serving, without capture "
                  "(/readyz says not ready)", flush=True)
            self.runtime.not_ready = self.capture_error
            return
        self._snapshot_processes()
        # Everything made so far (bcc, the web stack, the process snapshot) lives
        # as long as the agent: out of the collector's sight, a full collection
        # walks only what traffic creates.
        gc.collect()
        gc.freeze()
        # Transactions make no reference cycles (tested), so collections find
        # little and mostly walk the records and events waiting their turn:
        # collect less often (the defaults are 700, 10, 10).
        gc.set_threshold(*GC_THRESHOLDS)
        self._tasks.append(asyncio.create_task(self._ticker()))
        self.runtime.not_ready = None
        slower = compiled.running_note(os.environ)
        if slower:  # correct either way, but about half as fast: say so where it runs
            print(f"qtap-devtools: {slower}", flush=True)
        print("qtap-devtools: capture running", flush=True)

    async def on_stopping(self) -> None:
        self.priority.stopping()
        if self.capture is not None:
            self.backlog.close()  # a reader waiting for room must not hold up the stop
            # The process exits next: its probes go with it (see Capture.stop).
            self.capture.stop(detach=False)
            # What was read is processed now, before the clients' goodbye (run
            # later, its events reached the file and REST but no client).
            left = self.backlog.finish(STOP_FINISH_SECONDS)
            if left:
                print(f"qtap-devtools: {left:,} captured records were not processed before the stop "
                      f"(it allows {STOP_FINISH_SECONDS} s)", flush=True)
        self.pipeline.close_all()
        # Let the publisher flush what the close produced, briefly.
        for _ in range(20):
            if not len(self.publisher):
                break
            await asyncio.sleep(0.01)

    async def run(self) -> int:
        try:
            return await serve(self.runtime, on_started=self.on_started, on_stopping=self.on_stopping)
        finally:
            for t in self._tasks:
                t.cancel()
            self.enricher.stop()
            if self.writer is not None:
                # ... and end with its goodbye, as a stopped agent says to a client.
                self.writer.write(SystemDisconnected(reason=STOP_REASON).envelope().frame)
                unwritten = self.writer.close(timeout=WRITER_CLOSE_SECONDS)
                if unwritten:
                    print(f"qtap-devtools: {unwritten:,} events queued for {self.writer.path} were not written: "
                          f"it took them too slowly to finish within {WRITER_CLOSE_SECONDS} s of the stop", flush=True)


def _in_daemon_thread(loop: asyncio.AbstractEventLoop, name: str, fn: Callable[..., Any], *args: Any) -> Awaitable:
    """``fn(*args)`` on a daemon thread, awaitable.  Not the loop's executor:
    its threads are joined at exit, and a stop asked for while the probes
    compile must not wait for the compile to finish."""
    fut = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not fut.done():  # cancelled: the agent is stopping
            setter(value)

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            with contextlib.suppress(RuntimeError):  # the loop is gone: so is the agent
                loop.call_soon_threadsafe(settle, fut.set_exception, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, fut.set_result, result)

    threading.Thread(target=work, name=name, daemon=True).start()
    return fut


BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
MIN_STATIC_TLS_SIZE = 2 << 20  # a binary carrying its own OpenSSL is bigger than this


def tls_binaries_on_path() -> list[str]:
    """Executables that carry their own TLS library (node links OpenSSL in).

    Attaching to them at start, not when one is first run, means a process
    that makes one request and exits is not missed while its binary is being
    attached.  Only large binaries are read (~0.3 s for a typical /usr/bin)."""
    from qtap_devtools.capture.elf import exported_symbols

    dirs = dict.fromkeys([*os.environ.get("PATH", "").split(":"), *BIN_DIRS])
    seen: set[tuple[int, int]] = set()
    found = []
    for d in dirs:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen or st.st_size < MIN_STATIC_TLS_SIZE or not entry.is_file():
                continue
            seen.add((st.st_dev, st.st_ino))
            try:
                if exported_symbols(entry.path, ["SSL_write", "gnutls_record_send"]):
                    found.append(os.path.realpath(entry.path))
            except Exception:  # an unreadable or odd file is simply not a candidate
                continue
    return found


M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 4 << 20


def tune_malloc(threshold: int = MMAP_THRESHOLD) -> None:
    """glibc's malloc, set for this process before its threads start.

    Allocations above ``threshold`` get their own mappings, the rest come
    from the heap, at a fixed threshold. Measured both ways. At 256 KiB,
    every megabyte frame faulted in fresh pages (5.7 ms per 1 MiB transaction
    against 2.9 ms). glibc's default moves the threshold, and the heap-trim
    threshold with it, up to 32 and 64 MiB after large frees: the freed top
    of the heap then stays resident (the soak peaked at 155 MB against 149.8
    with 4 MiB). 4 MiB holds every frame of the default 1 MiB body limit; the
    30 s malloc_trim hands the heap's free pages back after a burst.

    The heap's free top is kept up to twice that (glibc's own rule when it
    moves the threshold itself; setting one fixes the trim threshold at
    128 KiB): an SSE write joins tens of kilobytes of frames, and with
    128 KiB every few writes gave the top of the heap back and faulted it
    in again (~140 brk calls a second at rate10k; the event loop's system
    time 11 against 6 µs a request). The periodic trim still hands it back.

    One arena for every thread: the ring reader makes the records (their
    bytes, past Python's small-object allocator, come from its thread's
    arena) and the event loop frees them, so with an arena per thread each
    kept its own high-water mark of free space (a 12 MB second heap under
    load). Python's allocations happen under the GIL, so the one lock is
    rarely contended (only bcc's compile at start allocates beside them).
    The soak's peak: 149.1-149.2 MB against 151.1-151.4.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * threshold)
        libc.mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def own_stderr() -> None:
    """Python's standard error, and the log on it, on a duplicate of fd 2.

    While bcc compiles the probes, fd 2 points at a temporary file that
    catches the compiler's messages (``loader._capture_fd2``).  What the
    agent said meanwhile went there too, and came out only after the
    compile: a stop during it was never heard of (its "SIGTERM received"
    lost with the process)."""
    old = sys.stderr
    try:
        new = open(os.dup(2), "w", buffering=1, encoding=old.encoding, errors="backslashreplace")
    except (OSError, ValueError, AttributeError):  # no fd 2: nowhere to say anything anyway
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
            handler.setStream(new)
    sys.stderr = new


def main(config: Config, token: str | None = None) -> int:
    agent: Agent | None = None
    own_stderr()
    tune_malloc()
    # Before any thread starts (bcc's compile, the ring reader, the server's):
    # they inherit it.
    priority = CpuPriority(config.cpu_priority)
    print(f"qtap-devtools: CPU priority {priority.apply()}", flush=True)

    async def go() -> int:
        nonlocal agent
        agent = Agent(config, token)
        agent.priority = priority
        return await agent.run()

    rc = 1
    try:
        rc = asyncio.run(go())
        return rc
    finally:
        # Also when stopped while capture was starting: its thread may have
        # placed probes already, and places none from here (bar_new).
        if agent is not None and (agent.capture is not None or agent.probes_loading):
            from qtap_devtools.capture.links import bar_new

            bar_new()
            detach_in_background()
        if CAPTURE_START.close():
            exit_now(rc)


def exit_now(rc: int) -> None:
    """Exit at once, without the interpreter's and the C++ libraries'
    teardown: the start-up thread is still compiling or placing the probes
    (threads.NativeSection).
    What the teardown would have done that matters is done here: a traceback
    on the way out, the log and the standard streams flushed."""
    exc = sys.exc_info()[1]
    if isinstance(exc, SystemExit):
        rc = exc.code if isinstance(exc.code, int) else 1
    elif exc is not None:
        traceback.print_exc()
    logging.shutdown()
    with contextlib.suppress(OSError, ValueError):  # stdout may be a closed pipe
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(rc)


def wait_for_exit(pid: int) -> None:
    """Until every thread of process ``pid`` (our parent) has exited.

    Our being reparented is too early a sign: it comes once no thread of the
    parent is left that is not exiting, before the last one has dropped its
    descriptors.  Probes we closed from then on were that thread's to remove,
    one by one, and its exit took 4-5 s (a stop while the probes were being
    placed, one in four)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone already (ESRCH), or a kernel without pidfds (before 5.3)
        while os.getppid() == pid:
            time.sleep(0.05)
        return
    try:
        select.select([fd], [], [])  # readable once the whole thread group has exited
    finally:
        os.close(fd)


# What the detaching child keeps (readlink of its descriptors): programs,
# maps, links and the perf events probes are attached through.
BPF_OBJECTS = ("anon_inode:bpf", "anon_inode:[perf_event]")


def detach_in_background() -> None:
    """Let the kernel remove our probes after we have exited.

    Removing a uprobe waits for RCU grace periods: the kernel takes ~6 s to
    tear down our ~20 probes when their last file descriptor closes, and the
    process is not gone until it has.  A child that inherits those descriptors
    and outlives us takes that wait, so the agent exits at once.  The child
    keeps nothing else, and has let go of it before we exit: on an exit by
    error the server's listening socket is still open, and the port must be
    free when we are gone; and a reader of our output (``--output >(gzip >
    f)``, whose pipe we also inherit as the shell's descriptor) must see its
    end then, not seconds later."""
    parent = os.getpid()
    with contextlib.suppress(OSError, ValueError):  # stdout may be a closed pipe: why we are exiting
        sys.stdout.flush()
        sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    if os.fork() != 0:
        os.close(ready_w)
        with contextlib.suppress(OSError):
            select.select([ready_r], [], [], 1.0)  # its end of the pipe closes once it has let go
        os.close(ready_r)
        return
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.close(ready_r)
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if int(name) != ready_w and not os.readlink(f"/proc/self/fd/{name}").startswith(BPF_OBJECTS):
                    os.close(int(name))
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        if devnull > 2:
            os.close(devnull)
        os.close(ready_w)
        wait_for_exit(parent)
        # Closed here, not by the exit: a probe attached through a BPF link
        # (capture/links.py) is removed when the link's last descriptor
        # closes, and from an exiting process the kernel defers that removal
        # to a worker, seconds after the process is gone.  A close made in a
        # system call removes it before the call returns.  The probes first,
        # one by one, the programs last: whoever waits for no process to hold
        # a BPF program (make bench between setups) waits for the probes too.
        for name in sorted(os.listdir("/proc/self/fd"), key=int):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{name}") in ("anon_inode:bpf_link", "anon_inode:[perf_event]"):
                    os.close(int(name))
        os.closerange(3, 1 << 20)
    finally:
        os._exit(0)
