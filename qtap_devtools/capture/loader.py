"""Load the probes, attach them, read the ring buffer, deliver typed records.

``Capture`` is the capture layer's one entry point::

    cap = Capture(on_records=print_batch, exclude_port=10001)
    cap.start()          # compile + load + attach; raises CaptureError (one line)
    ...
    cap.stop()

Records arrive in batches (lists) on the polling thread, in ring order.  The
callback must be quick; hand the batch to a queue if it is not.

Wake-ups: the probes write data records without waking the reader and force
a wake-up every thousand records or so (probes/common.h, WAKE_RECORDS/WAKE_BYTES);
the poller also drains the ring every ``DRAIN_MS``, so a lone small request is
delivered within about that long.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from . import procnet
from .budget import ByteBudget
from .attach import KEEP_IDLE, MAX_ATTACHMENTS, TUNED_FUNCTIONS, AttachMode, Attacher, Attachment, ExecWatcher, Where
from .links import LinkUnsupported, Links, close_all
from .plans import Analyst
from .records import (
    Batch,
    SOURCES,
    ProcessExec,
    Record,
    SocketAccept,
    SocketAddress,
    SocketClose,
    SocketConnect,
    RecordReader,
)
from .ringbuf import RingReader
from ..threads import lift, name_thread, service_thread

if TYPE_CHECKING:
    from ..enrich.model import ProcessInfo

log = logging.getLogger(__name__)

TRACEFS = Path("/sys/kernel/tracing")
PROBE_FILES = ("process.c", "cgroups.c", "sockets.c", "openssl.c", "gnutls.c")
SOCK_KNOWN = 1  # common.h
SOCK_EXCLUDED = 4  # common.h
FD_EXCLUDED = -2  # common.h: a tls_fd value
# The reader drains the ring at least this often: data records are written
# without a wake-up, so this bounds how long an idle stream's tail waits.
DRAIN_MS = 50
WAKE_RECORDS = 1024  # a data record wakes the reader once this many were written on its CPU
BATCH_RECORDS = 4096  # records handed to on_records at a time, at most
# Processes read from /proc at exec per batch, on the reader's thread (~70 µs
# each), and the time they may take.  Past either, in an exec storm, the event
# loop reads them as before: the ring must keep being read.
EXEC_READS_PER_BATCH = 64
EXEC_READ_SECONDS = 0.01
# The same for accepts with no peer address, whose socket is asked its 4-tuple.
ACCEPT_RESOLVES_PER_BATCH = 256
ACCEPT_RESOLVE_SECONDS = 0.01
# Overload shedding (probes/common.h, shed_cap): on when the ring or what is
# downstream of it is this full, off again when both are below SHED_OFF.
SHED_ON = 0.5
SHED_OFF = 0.1
SHED_HEAD_BYTES = 4096  # kept of a call that starts a message while shedding: its head
SHED_LOG_SECONDS = 60.0  # shedding can start and stop many times a second: log it this often


BTF = Path("/sys/kernel/btf/vmlinux")


class CaptureError(RuntimeError):
    """Capture cannot start; the message is one line saying what and how to fix it."""


def probes_dir() -> Path:
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "probes", here.parents[1] / "probes"):
        if (cand / "common.h").exists():
            return cand
    raise CaptureError(f"probe sources not found next to {here.parents[1]}; reinstall qtap-devtools")


def probe_source(pdir: Path) -> str:
    """All probe files as one C text, local ``#include "x.h"`` lines inlined once.

    bcc rewrites map calls and generates tracepoint argument structs only in
    the main file it is given, not in included files, so we inline them.
    """
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        out = [f'#line 1 "{pdir / name}"']
        for i, line in enumerate((pdir / name).read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith('#include "') and stripped.endswith('"'):
                out.append(expand(stripped[len('#include "'):-1]))
                out.append(f'#line {i + 1} "{pdir / name}"')
            else:
                out.append(line)
        return "\n".join(out)

    return "\n".join(expand(name) for name in PROBE_FILES) + "\n"


def ensure_tracefs() -> None:
    """bcc reads tracepoint formats from tracefs; a fresh machine has it unmounted."""
    if (TRACEFS / "events").is_dir():
        return
    res = subprocess.run(["mount", "-t", "tracefs", "none", str(TRACEFS)], capture_output=True, text=True)
    if res.returncode != 0 or not (TRACEFS / "events").is_dir():
        raise CaptureError(
            f"tracefs is not mounted at {TRACEFS} and mounting it failed ({res.stderr.strip()}); "
            f"fix: mount -t tracefs none {TRACEFS}"
        )


def _capture_fd2(fn: Callable[[], object]) -> tuple[object, str]:
    """Run ``fn`` with fd 2 redirected to a temp file: bcc prints verifier logs
    there.  Every thread's fd 2 is redirected, though: what other C code wrote
    meanwhile is written out after, unless ``fn`` failed (then the text
    explains the failure, and the error says so).  The agent's own log and
    messages do not come here: they go to a duplicate of fd 2
    (``agent.own_stderr``), so they are seen as they are said."""
    import tempfile

    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            result: object = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:  # re-raised below, after fd 2 is back
                error = exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        raw = tmp.read()
    text = raw.decode("utf-8", "replace")
    if error is not None:
        error.stderr_text = text  # type: ignore[attr-defined]
        raise error
    with contextlib.suppress(OSError):  # stderr closed: nowhere to say it
        view = memoryview(raw)
        while view:
            view = view[os.write(2, view):]
    return result, text


def _verifier_last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("processed ", "HINT:", "bpf: ", "Failed to load")):
            continue
        return ln
    return lines[-1] if lines else "no verifier output"


# Loaded by bcc to compile the probes and not run again once they are loaded
# (attaching later needs only libbcc): ~80 MiB of resident code pages.
COMPILER_LIBRARIES = re.compile(r"/lib(LLVM|clang-cpp|clang|z3)[-.][^/]*$")
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; they fault back in if ever used


def release_compiler_pages(maps: str = "/proc/self/maps") -> int:
    """Hand the compiler's code pages back to the kernel; the bytes released.

    They are file-backed and clean, so nothing is lost: a page that is needed
    again is read back from the library file.  Best effort."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        with open(maps) as f:
            lines = f.readlines()
    except (OSError, AttributeError):
        return 0
    released = 0
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or not COMPILER_LIBRARIES.search(parts[5]):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if madvise(start, end - start, MADV_PAGEOUT) == 0:
            released += end - start
    trim_heap()  # and the compiler's freed working memory (≈25 MB here)
    return released


def trim_heap() -> None:
    """Give freed malloc memory back to the kernel (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Capture:
    def __init__(
        self,
        on_records: Callable[[list[Record]], None],
        *,
        ring_mib: int = 32,
        max_chunk: int = 16384,
        exclude_pid: int | None = None,
        exclude_port: int = 0,
        seed_existing: bool = True,
        extra_binaries: Iterable[str] = (),
        poll_timeout_ms: int = DRAIN_MS,
        attach_mode: AttachMode = "auto",
        wake_records: int = WAKE_RECORDS,
        wake_bytes: int = 256 * 1024,
        sweep_seconds: float = 10.0,
        keep_idle: int = KEEP_IDLE,
        max_sockets: int = 65536,
        shed_head_bytes: int = SHED_HEAD_BYTES,
        pressure: Callable[[], float] | None = None,
        on_load: Callable[[float], None] | None = None,
        byte_budget: float = 0,
        read_process: Callable[[int], ProcessInfo | None] | None = None,
        watch_ring: tuple[float, int, int] | None = None,
    ) -> None:
        """``attach_mode``: ``"auto"`` probes OpenSSL at the cheap sites
        ``tuned.analyze`` proves (entry probes where it cannot), ``"entry"``
        uses function-entry uprobes + uretprobes everywhere.  ``wake_records``
        / ``wake_bytes``: a data record forces a reader wake-up once this many
        records / bytes were written on its CPU since the last one.
        ``WAKE_RECORDS`` is measured at rate10k (tuned, one slow hour,
        interleaved): 1,024 took the agent's own CPU from 38-43 µs a request
        to 29-33 against 256 (woken ~70 times a second instead of ~200: fewer,
        longer bursts), with the traced p99 the same (1,367-1,727 µs against
        1,413-1,804) and the stream's delay p99 39-55 ms against 14-39; 4,096
        saved ~1.5 µs more, the DRAIN_MS timer then setting the pace.  (64 had
        woken it twice as often as 256 for a sixth more CPU.)

        Overload: when the ring's fill, or ``pressure()`` (how far behind the
        consumer is, 0..1), passes SHED_ON, the probes keep only the first
        ``shed_head_bytes`` of calls that start a message and nothing of the
        rest, until both fall below SHED_OFF.  Transactions keep flowing with
        their bodies cut, instead of whole records being lost at random.
        ``shed_head_bytes=0`` turns this off.

        ``byte_budget``: bytes a second of plaintext taken in before shedding
        the same way (``budget.py``), 0 for no limit.

        ``read_process(pid)`` is called on the reader's thread for each exec
        record and its answer set as the record's ``process``: the reader
        sees the exec within milliseconds while a core is free (and idle or
        not, before the ring holds a tenth of its size), when a short-lived
        process (a container's only curl) still has its /proc entry, and the
        event loop may be behind.

        ``watch_ring=(fill, period_us, stall_us)`` starts a watchdog (``_watchdog.c``,
        where built: :attr:`watchdog`) and lets the reader's thread run at
        the priority the agent gives it, instead of always as an equal
        (priority.py)."""
        if ring_mib <= 0 or ring_mib & (ring_mib - 1):
            raise CaptureError(f"ring_mib={ring_mib}: must be a power of two")
        if not 64 <= max_chunk <= 30000:
            raise CaptureError(f"max_chunk={max_chunk}: must be 64..30000 (a per-CPU map value)")
        if attach_mode not in ("auto", "entry"):
            raise CaptureError(f"attach_mode={attach_mode!r}: must be 'auto' or 'entry'")
        if wake_records < 1 or wake_bytes < 1:
            raise CaptureError("wake_records and wake_bytes must be positive")
        self.on_records = on_records
        self.ring_mib = ring_mib
        self.max_chunk = max_chunk
        self.exclude_pid = os.getpid() if exclude_pid is None else exclude_pid
        self.exclude_port = exclude_port
        self.seed_existing = seed_existing
        self.extra_binaries = list(extra_binaries)
        # A longer poll timeout would hold unsignalled records back for as long.
        self.poll_timeout_ms = max(1, min(poll_timeout_ms, DRAIN_MS))
        self.attach_mode = attach_mode
        self.sweep_seconds = sweep_seconds  # every process re-scanned for TLS libraries this often
        self.keep_idle = keep_idle  # unmapped library files kept attached (attach.KEEP_IDLE)
        self.max_sockets = max_sockets  # sockets the probes track at once, the least recently used let go
        self.wake_records = wake_records
        self.wake_bytes = wake_bytes
        if shed_head_bytes < 0:
            raise CaptureError("shed_head_bytes must be 0 (off) or positive")
        self.shed_head_bytes = shed_head_bytes
        self._pressure = pressure
        self._on_load = on_load  # told load() each time it is checked (priority.CpuPriority.update)
        if byte_budget < 0:
            raise CaptureError("byte_budget must be 0 (no limit) or positive")
        if byte_budget and not shed_head_bytes:
            raise CaptureError("a byte budget sheds load: it needs shed_head_bytes")
        self.byte_budget = byte_budget
        self._budget = ByteBudget(byte_budget, now=time.monotonic()) if byte_budget else None
        self.shedding = False
        self.shed_cause: str | None = None  # "behind" or "over budget", while shedding
        self.shed_episodes = 0
        self.shed_episodes_over_budget = 0
        self._shed_logged = {"behind": -SHED_LOG_SECONDS, "over budget": -SHED_LOG_SECONDS}
        self._shed_unlogged = {"behind": 0, "over budget": 0}
        self.data_bytes_read = 0
        self._reader = RecordReader()
        self._bpf = None
        self.compiler_pages_released = 0
        self._attacher: Attacher | None = None
        self._analyst: Analyst | None = None
        self._links = Links()  # the uprobes placed with a cookie (links.py)
        # "per file": a library's probes act once all are placed (probes/tls_common.h, armed)
        self.probe_arming = "per file"
        self._watcher: ExecWatcher | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._batch = Batch()
        self._others: list[Record] = []  # the batch's records that are not data
        self._records_read = 0
        self._read_process = read_process
        self._watch_ring = watch_ring
        self.watchdog = None
        self.exec_reads = 0
        self.exec_reads_deferred = 0  # left to the event loop (an exec storm)
        self.accept_addresses_asked = 0  # accepts with no peer, their socket asked at once (_address_accepts)
        self._batches = 0
        self._callback_errors = 0
        self.reader_errors = 0  # iterations of the ring reader's loop that raised
        self.compile_messages = ""  # what the compiler printed (warnings), once started
        self._ring: RingReader | None = None
        self._proc_fallbacks = 0
        # (pid, fd) whose 4-tuple we have seen / still wait for; bounded.
        self._addressed: dict[tuple[int, int], None] = {}
        self._await_address: dict[tuple[int, int], float] = {}
        self._max_tracked = 65536
        self.address_tracking_evicted = 0

    # ---- lifecycle ----

    def start(self) -> None:
        bpf = self._bpf = self._load()
        self._set_armed(0, True)  # probes attached without a cookie
        if self.seed_existing:
            # Before any TLS probe is placed: a TLS call on a socket the kernel
            # does not know yet learns no fd, and its plaintext would start a
            # connection of its own, with no addresses.  (The socket
            # tracepoints are live from the load: a socket opened from now on
            # the kernel learns itself.)
            self.seed_existing_sockets()
        self._analyst = Analyst()
        self._attacher = Attacher(self._place, exclude_pid=self.exclude_pid, mode=self.attach_mode,
                                  plans=self._analyst.analyze, tidy=self._analyst.tidy,
                                  arm_fn=self._arm, detach_fn=self._detach, keep_idle=self.keep_idle)
        self._attacher.scan_all(self.extra_binaries)
        self._watcher = ExecWatcher(self._attacher, sweep_seconds=self.sweep_seconds)
        events = bpf[b"events"]
        self._ring = RingReader(events.map_fd, int(events.max_entries))  # bytes, for a ring
        if self._watch_ring is not None:
            self.watchdog = self._ring.watch(*self._watch_ring)
        self.compiler_pages_released = release_compiler_pages()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll_loop, name="qtap-ring", daemon=True)
        self._thread.start()

    def _place(self, path: str, where: Where, fn_name: str, ret: bool, slot: int) -> None:
        """One probe, its attachment's ``slot`` as its cookie (see :meth:`_arm`)."""
        from bcc import BPF

        bpf = self._bpf
        at = {"addr": where} if isinstance(where, int) else {"sym": where.encode()}
        if self.probe_arming == "per file":
            # bcc's own resolution of a symbol or ELF address to a file offset
            module, offset = BPF._check_path_symbol(path.encode(), at.get("sym", b""), at.get("addr"), -1)
            try:
                self._links.attach(bpf.load_func(fn_name.encode(), BPF.KPROBE).fd, module, offset, ret, slot)
                return
            except LinkUnsupported as exc:
                self.probe_arming = f"none ({exc})"
                log.warning("this kernel attaches no cookie to a uprobe (%s): each TLS library's probes go live "
                            "one at a time, and a call made meanwhile can be half seen", exc)
        if ret:
            bpf.attach_uretprobe(name=path.encode(), fn_name=fn_name.encode(), **at)
        else:
            bpf.attach_uprobe(name=path.encode(), fn_name=fn_name.encode(), **at)

    def _arm(self, slot: int, label: str = "openssl") -> None:
        """Every probe of the attachment in ``slot`` is placed: its calls count
        from now, their records naming ``label`` (a SOURCES name)."""
        self._set_armed(slot, True, SOURCES.index(label) if label == "nodetls" else 1)

    def _set_armed(self, slot: int, on: bool, value: int = 1) -> None:
        # 1: armed, the source the probe's program names; more: that source (probes/tls_common.h).
        armed = self._bpf[b"armed"]
        armed[armed.Key(slot)] = armed.Leaf(value if on else 0)

    def _detach(self, slot: int) -> bool:
        """Remove the probes of the attachment in ``slot``; False if they were
        attached through bcc (no cookie), which cannot remove one file's."""
        if self.probe_arming != "per file":
            return False
        self._set_armed(slot, False)  # they act no more, and the slot may be reused
        # Closed off the attaching thread: removing a probe waits ~0.2 s, and
        # new processes' scans must not wait behind it.
        threading.Thread(target=close_all, args=(self._links.take(slot),), name="qtap-detach", daemon=True).start()
        return True

    def stop(self, detach: bool = True) -> None:
        """Stop reading; with ``detach``, also remove every probe.

        Detaching takes seconds here (≈4 s for ~100 uprobes).  A process about
        to exit can skip it: its uprobes are perf-event links (no tracefs
        entries are left behind), which the kernel removes when the process's
        file descriptors close."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            if self.watchdog is not None and thread.native_id is not None:
                lift(thread.native_id)  # an idle reader may wait long for a core under load
            thread.join(timeout=5)
        if self._analyst is not None:
            # Before the watcher's join: an analysis in flight (the attaching
            # thread waits on it up to ANALYSIS_TIMEOUT_SECONDS) fails at once,
            # and its thread is done before the probes are torn down below.
            self._analyst.close()
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._ring is not None and (thread is None or not thread.is_alive()):
            self._ring.close()  # a reader still inside it (join timed out) keeps it
        if self._bpf is not None:
            if detach:
                self._links.close()
                self._bpf.cleanup()
            else:
                atexit.unregister(self._bpf.cleanup)  # bcc registers it at load
            self._bpf = None

    def __enter__(self) -> "Capture":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- loading ----

    def _load(self):
        if os.geteuid() != 0:
            raise CaptureError("capture needs root (eBPF, uprobes); fix: run with sudo")
        try:
            from bcc import BPF
        except Exception as exc:
            raise CaptureError(
                f"bcc does not import ({exc}); fix: apt-get install python3-bpfcc and use a venv "
                "made with --system-site-packages"
            ) from None
        from .. import kheaders

        headers = kheaders.apply()
        if not headers.ok:
            raise CaptureError(headers.detail)
        ensure_tracefs()
        pdir = probes_dir()
        page = os.sysconf("SC_PAGE_SIZE")
        ring_pages = self.ring_mib * (1 << 20) // page
        cflags = [
            f"-DMAX_CHUNK={self.max_chunk}",
            f"-DRING_PAGES={ring_pages}",
            f"-DEXCLUDE_TGID={self.exclude_pid}",
            f"-DEXCLUDE_PORT={self.exclude_port}",
            f"-DWAKE_RECORDS={self.wake_records}",
            f"-DWAKE_BYTES={self.wake_bytes}",
            f"-DMAX_ARMED={MAX_ATTACHMENTS + 1}",
            f"-DMAX_SOCKETS={self.max_sockets}",
            # The probes shed on their own past SHED_ON, should the reader not
            # get a core to say so in time (probes/common.h).
            f"-DSELF_SHED_FILL={int(self.ring_mib * (1 << 20) * SHED_ON) if self.shed_head_bytes else 0}",
            f"-DSELF_SHED_HEAD={self.shed_head_bytes or 4096}",
            "-Wno-macro-redefined",
        ]
        text = probe_source(pdir)
        try:
            bpf, messages = _capture_fd2(lambda: BPF(text=text.encode(), cflags=cflags))
            self.compile_messages = str(messages)  # written out too; a test wants none
            # Uprobe programs load lazily at attach; load them now so a verifier
            # failure is reported at start, not on the first TLS library found.
            for fn in _uprobe_functions():
                _capture_fd2(lambda fn=fn: bpf.load_func(fn.encode(), BPF.KPROBE))
        except Exception as exc:
            raise CaptureError(self._explain(exc)) from None
        return bpf

    @staticmethod
    def _explain(exc: Exception) -> str:
        stderr = getattr(exc, "stderr_text", "")
        msg = str(exc)
        if "Failed to compile" in msg or "error:" in stderr and "Failed to load" not in msg:
            first = next((ln for ln in stderr.splitlines() if "error:" in ln), msg)
            return f"probe compilation failed: {first.strip()}"
        if "Failed to load BPF program" in msg:
            fn = msg.split("program", 1)[1].split(":", 1)[0].strip(" b'\"")
            why = f"probe {_probe_file(fn)}:{fn} failed to load: {_verifier_last_line(stderr)}"
        else:
            why = f"loading probes failed: {msg.splitlines()[0] if msg else type(exc).__name__}"
        if not BTF.exists():
            # The verifier's words would not say it: task storage (the call in
            # flight, per thread) is typed by the kernel's own BTF.
            why += (f"; this kernel has no BTF ({BTF}), which the probes' task storage needs "
                    "(kernel 5.11+ with CONFIG_DEBUG_INFO_BTF=y; `qtap-devtools doctor` checks it)")
        return why

    # ---- seeding and fallbacks ----

    def seed_existing_sockets(self) -> list[SocketAddress]:
        """Mark sockets that were ESTABLISHED before start as known; deliver their addresses."""
        assert self._bpf is not None, "start() first"
        table = self._bpf[b"sock_fds"]
        found = procnet.established_sockets({self.exclude_pid}, self.exclude_port)
        records = []
        for s in found:
            key = table.Key(s.pid, s.fd)
            try:
                table[key]
                continue  # connected since the load: the kernel knows it, and its connect record is on the way
            except KeyError:
                pass
            try:
                table[key] = table.Leaf(SOCK_KNOWN)
            except Exception:  # map full: those sockets stay uncaptured
                continue
            records.append(SocketAddress(s.pid, s.fd, s.local, s.remote, time.monotonic_ns(), "seed", s.accepted))
            self._addressed[(s.pid, s.fd)] = None
        if records:
            self._deliver(list(records))
        return records

    def on_container_layers(self, layers: list[str]) -> None:
        """A new container's image layers (host directories, from Docker's
        ``create``): their TLS libraries are attached on the attach thread,
        before the container's first process runs.  Never blocks."""
        watcher = self._watcher
        if watcher is not None:
            watcher.on_layers(layers)

    def exclude_socket(self, pid: int, fd: int, tls_ref: int = 0) -> None:
        """Stop reading a connection (the agent's own API through a forwarder,
        pipeline.OWN_MARKER): a plain socket's syscalls are skipped from now
        on, as the agent's own port is, and so are a TLS object's calls (a
        TLS forwarder: its plaintext is the agent's own stream again, which
        would come back as records as large as the stream).  On the event
        loop's thread; rare."""
        if self._bpf is None:
            return
        if tls_ref:
            table = self._bpf[b"tls_fd"]
            try:
                table[table.Key(pid, 0, tls_ref)] = table.Leaf(FD_EXCLUDED)
            except Exception:  # a map update refused: its traffic is still left out of the stream
                pass
        if fd < 0:
            return
        table = self._bpf[b"sock_fds"]
        key = table.Key(pid, fd)
        try:
            flags = table[key].value
        except KeyError:
            return  # gone (closed) or never known: nothing to stop
        try:
            table[key] = table.Leaf(flags | SOCK_EXCLUDED)
        except Exception:  # a map update refused: its traffic is still left out of the stream
            pass

    def _track_addresses(self, batch: list[Record]) -> None:
        for rec in batch:
            if isinstance(rec, SocketAddress):
                self._addressed[(rec.pid, rec.fd)] = None
                self._await_address.pop((rec.pid, rec.fd), None)
            elif isinstance(rec, SocketConnect):
                if (rec.pid, rec.fd) not in self._addressed:
                    self._await_address[(rec.pid, rec.fd)] = time.monotonic() + 0.2
            elif isinstance(rec, SocketAccept):
                if rec.remote is None or rec.local is None:  # the join missed: ask /proc now
                    self._await_address[(rec.pid, rec.fd)] = time.monotonic()
            elif isinstance(rec, SocketClose):
                self._addressed.pop((rec.pid, rec.fd), None)
                self._await_address.pop((rec.pid, rec.fd), None)
        for d in (self._addressed, self._await_address):
            while len(d) > self._max_tracked:
                d.pop(next(iter(d)))
                self.address_tracking_evicted += 1  # a socket whose address may then never be asked of /proc

    def _proc_fallback(self) -> list[Record]:
        if not self._await_address:
            return []
        now = time.monotonic()
        out: list[Record] = []
        for key, due in list(self._await_address.items()):
            if due > now:
                continue
            del self._await_address[key]
            found = procnet.resolve(*key)
            if found is not None:
                self._proc_fallbacks += 1
                out.append(SocketAddress(key[0], key[1], found.local, found.remote, time.monotonic_ns(), "proc"))
        return out

    # ---- reading ----

    @property
    def reader_tid(self) -> int | None:
        return self._thread.native_id if self._thread is not None else None

    def _poll_loop(self) -> None:
        if self.watchdog is None:
            service_thread("qtap-ring")
        else:  # idle when the rest is, lifted by the watchdog
            name_thread("qtap-ring")
        ring, parse = self._ring, self._reader.parse_at
        timeout = self.poll_timeout_ms
        while not self._stop.is_set():
            try:
                # epoll returns on a wake-up; records written without one (most
                # data records) are read after at most DRAIN_MS.
                ring.wait(timeout)
                # At most BATCH_RECORDS at a time: a full ring is millions of records,
                # and a consumer that is full must be able to stop us between
                # batches (the ring then fills and the kernel counts what it drops).
                while self._read(ring, parse) == BATCH_RECORDS and not self._stop.is_set():
                    self.check_load()
                    self._flush()
                self.check_load()
                self._flush(proc_fallback=True)
            except Exception:  # a bug, or bcc refusing a map update: keep reading, never go deaf
                self.reader_errors += 1
                if self.reader_errors == 1 or self.reader_errors % 100 == 0:
                    log.exception("capture reader: an iteration failed (%d so far)", self.reader_errors)
                self._stop.wait(0.1)

    def _read(self, ring: RingReader, parse: Callable) -> int:
        taken, data_bytes = ring.read_records(parse, self._batch, self._others, BATCH_RECORDS)
        self._batch.data_bytes += data_bytes
        self.data_bytes_read += data_bytes
        if self._budget is not None and data_bytes:
            self._budget.spend(data_bytes, time.monotonic())
        return taken

    def load(self) -> float:
        """How far behind we are, 0..1: the fuller of the ring and the consumer's queue."""
        ring = self._ring.pending_bytes() / self._ring.size if self._ring else 0.0
        return max(ring, self._pressure() if self._pressure else 0.0)

    def check_load(self) -> None:
        """Tell ``on_load`` the load, and start or stop shedding as it says; on
        the reader's thread."""
        if not self.shed_head_bytes and self._on_load is None:
            return
        load = self.load()
        if self._on_load is not None:
            self._on_load(load)
        if not self.shed_head_bytes:
            return
        budget, now = self._budget, time.monotonic()
        if not self.shedding:
            if load >= SHED_ON:
                self._start_shedding("behind", f"capture is behind ({100 * load:.0f}% full)")
            elif budget is not None and budget.exhausted(now):
                self._start_shedding("over budget", f"capture passed its limit of {self.byte_budget / (1 << 20):g} "
                                     "MiB/s of plaintext (--max-capture-rate)")
        elif load <= SHED_OFF:
            if budget is None or budget.recovered(now):
                self._set_shedding(False)
                log.debug("capture: keeping whole messages again")
            else:
                self.shed_cause = "over budget"  # caught up, but still paying for the bytes

    def _start_shedding(self, cause: str, why: str) -> None:
        self._set_shedding(True)
        self.shed_cause = cause
        self.shed_episodes += 1
        self.shed_episodes_over_budget += cause == "over budget"
        # Under steady overload this happens many times a second: say it once
        # a minute, with how often it happened since.
        now = time.monotonic()
        if now - self._shed_logged[cause] < SHED_LOG_SECONDS:
            self._shed_unlogged[cause] += 1
            return
        again = self._shed_unlogged[cause]
        self._shed_logged[cause], self._shed_unlogged[cause] = now, 0
        log.warning("%s: until it catches up, calls past a message head are cut (marked \"shed\", counted in "
                    "capture.shed_calls)%s", why,
                    f" (and {again} more times since this was last logged)" if again else "")

    def _set_shedding(self, on: bool) -> None:
        table = self._bpf[b"shed_cap"]
        table[table.Key(0)] = table.Leaf(self.shed_head_bytes if on else 0)
        self.shedding = on
        if not on:
            self.shed_cause = None

    def shed_counts(self) -> tuple[int, int]:
        """(calls cut, bytes not copied) since the start, from the probes."""
        return self._shed_stats()[:2]

    def _shed_stats(self) -> tuple[int, int, int]:
        """shed_counts(), and of the calls those the probes cut on their own."""
        if self._bpf is None:
            return 0, 0, 0
        table = self._bpf[b"shed_stats"]
        calls, nbytes, by_probes = (int(sum(table.getvalue(table.Key(i)))) for i in range(3))
        return calls, nbytes, by_probes

    def _flush(self, proc_fallback: bool = False) -> None:
        batch, others = self._batch, self._others
        self._batch, self._others = Batch(), []
        if batch:
            self._records_read += len(batch)
            # Only the records that are not data matter here: the rare ones.
            execs = [rec for rec in others if type(rec) is ProcessExec]
            if execs:
                if self._read_process is not None:
                    self._read_processes(execs)
                if self._watcher is not None:
                    for rec in execs:
                        self._watcher.on_exec(rec.pid)
            accepts = [rec for rec in others if type(rec) is SocketAccept and (rec.local is None or rec.remote is None)]
            if accepts:
                batch, others = self._address_accepts(batch, others, accepts)
            self._track_addresses(others)
        if proc_fallback:
            batch.extend(self._proc_fallback())
        if batch:
            self._deliver(batch)

    def _address_accepts(self, batch: Batch, others: list[Record],
                         accepts: list[SocketAccept]) -> tuple[Batch, list[Record]]:
        """An accept given no address buffer (``accept(fd, NULL, NULL)``: node,
        Go) has no 4-tuple from the kernel.  Ask the socket now, while it is
        surely still open (procnet.resolve: ~20 µs), and put its address right
        after its accept, ahead of its first bytes: its connection is then
        announced with its addresses.  (Asked at the batch's end, as before,
        a TLS stream on it went out first without them.)  Within this
        batch's bounds; the rest are asked at its end, as before."""
        found: dict[int, SocketAddress] = {}
        until = time.monotonic() + ACCEPT_RESOLVE_SECONDS
        for n, rec in enumerate(accepts):
            if n >= ACCEPT_RESOLVES_PER_BATCH or (n and time.monotonic() >= until):
                break
            got = procnet.resolve(rec.pid, rec.fd)
            if got is not None:
                self.accept_addresses_asked += 1
                found[id(rec)] = SocketAddress(rec.pid, rec.fd, got.local, got.remote, time.monotonic_ns(), "proc")
        if not found:
            return batch, others

        def woven(records: list[Record], out: list[Record]) -> list[Record]:
            for rec in records:
                out.append(rec)
                address = found.get(id(rec))
                if address is not None:
                    out.append(address)
            return out

        new = Batch()
        new.data_bytes = batch.data_bytes
        woven(batch, new)
        return new, woven(others, [])

    def _read_processes(self, execs: list[ProcessExec]) -> None:
        """Set each exec record's ``process`` from /proc, within this batch's
        bounds (EXEC_READS_PER_BATCH, EXEC_READ_SECONDS)."""
        read, until = self._read_process, time.monotonic() + EXEC_READ_SECONDS
        assert read is not None
        for n, rec in enumerate(execs):
            if n >= EXEC_READS_PER_BATCH or (n and time.monotonic() >= until):
                self.exec_reads_deferred += len(execs) - n  # the event loop reads them, as before
                return
            self.exec_reads += 1
            try:
                rec.process = read(rec.pid)
            except Exception:  # the event loop reads it instead
                log.exception("reading pid %d at exec", rec.pid)

    def _deliver(self, batch: list[Record]) -> None:
        self._batches += 1
        try:
            self.on_records(batch)
        except Exception:
            self._callback_errors += 1
            log.exception("on_records failed")

    # ---- introspection ----

    def on_exec(self, pid: int) -> None:
        """Look for TLS libraries in ``pid`` soon (also done for every ProcessExec)."""
        if self._watcher is not None:
            self._watcher.on_exec(pid)

    @property
    def attachments(self) -> list[Attachment]:
        return self._attacher.attachments if self._attacher else []

    def _lost_counts(self) -> tuple[int, int]:
        """(records lost, calls cut at the per-call limit), summed over CPUs; the
        first includes the second (probes/common.h, ``lost``)."""
        if self._bpf is None:
            return 0, 0
        table = self._bpf[b"lost"]
        return int(sum(table.getvalue(table.Key(0)))), int(sum(table.getvalue(table.Key(1))))

    def lost_records(self) -> int:
        """Records the kernel could not hand over: the ring full, or no scratch."""
        lost, cut = self._lost_counts()
        return max(0, lost - cut)  # per-CPU counts read one after the other

    def stats(self) -> dict[str, object]:
        atts = self.attachments
        shed_calls, shed_bytes, shed_by_probes = self._shed_stats()
        # Calls whose bytes past what one call may emit (64 records of 16 KiB,
        # or 16 iovecs) were left out, by design: a hole the reassembler reads
        # past.  One read, so the two agree.
        lost, cut = self._lost_counts()
        return {
            "lost_records": max(0, lost - cut),
            "calls_over_record_limit": cut,
            "records_read": self._records_read,
            "batches": self._batches,
            "parse_errors": self._ring.parse_errors if self._ring else 0,
            "callback_errors": self._callback_errors,
            "reader_errors": self.reader_errors,
            "proc_address_fallbacks": self._proc_fallbacks,
            "accept_addresses_asked": self.accept_addresses_asked,  # accepts with no peer: their socket asked at once
            "address_tracking_evicted": self.address_tracking_evicted,
            "attachments": len(atts),
            "attachments_failed": sum(1 for a in atts if a.error),
            # whose probes the kernel once refused, all placed at a later sweep
            "attachments_retried": self._attacher.retried if self._attacher else 0,
            "attachments_tuned": sum(1 for a in atts if a.mode == "tuned"),
            "attachments_over_limit": self._attacher.over_limit if self._attacher else 0,
            "probe_arming": self.probe_arming,
            "attachments_detached": self._attacher.detached if self._attacher else 0,  # no process mapped them
            "probes_linked": len(self._links),
            "roots_read": self._attacher.roots_read if self._attacher else 0,  # each container's, once
            "roots_forgotten": self._attacher.roots_forgotten if self._attacher else 0,
            "not_tls_uncached": self._attacher.not_tls_uncached if self._attacher else 0,
            "exec_scans_dropped": self._watcher.dropped if self._watcher else 0,
            # New containers' image layers, read at their create (Attacher.consider_layers)
            "layers_read": self._attacher.layers_read if self._attacher else 0,
            "layers_cached": self._attacher.layers_cached if self._attacher else 0,  # read for an earlier container
            "layers_unreadable": self._attacher.layers_unreadable if self._attacher else 0,
            "layers_over_limit": self._attacher.layers_over_limit if self._attacher else 0,
            "layer_jobs_dropped": self._watcher.layer_jobs_dropped if self._watcher else 0,
            "attached_at_create": self._attacher.attached_at_create if self._attacher else 0,
            # The tuned analysis (plans.Analyst): files analysed by its warm
            # worker, plans reused for bytes analysed before, analyses failed
            # (those files got entry probes), workers started
            "tuned_analyses": self._analyst.analysed if self._analyst else 0,
            "tuned_plans_reused": self._analyst.reused if self._analyst else 0,
            "tuned_analysis_failures": self._analyst.failures if self._analyst else 0,
            "tuned_workers_started": self._analyst.workers_started if self._analyst else 0,
            "exec_reads": self.exec_reads,  # processes read from /proc at exec, on the reader's thread
            "exec_reads_deferred": self.exec_reads_deferred,  # past EXEC_READS_PER_BATCH or EXEC_READ_SECONDS
            "data_bytes_read": self.data_bytes_read,
            "ring_bytes": self.ring_mib << 20,
            "ring_pending_bytes": self._ring.pending_bytes() if self._ring else 0,
            "byte_budget_per_second": int(self.byte_budget),
            "shedding": self.shedding,
            "shed_cause": self.shed_cause,
            "shed_episodes": self.shed_episodes,
            "shed_episodes_over_budget": self.shed_episodes_over_budget,
            "shed_calls": shed_calls,
            "shed_bytes": shed_bytes,
            # of shed_calls, cut by the probes on their own: the ring half full
            # before the reader got a core to say so (probes/common.h)
            "shed_calls_by_probes": shed_by_probes,
        }


def _uprobe_functions() -> list[str]:
    from .attach import PROBES

    return list(dict.fromkeys([*(p.fn_name for probes in PROBES.values() for p in probes), *TUNED_FUNCTIONS]))


def _probe_file(fn: str) -> str:
    """Which probes/*.c defines function ``fn`` (for error messages)."""
    try:
        pdir = probes_dir()
    except CaptureError:
        return "probes"
    needle = fn.split("__")[-1] if fn.startswith("tracepoint__") else re.sub(r"_sp\d+$", "", fn)
    for name in PROBE_FILES:
        text = (pdir / name).read_text()
        if needle in text:
            return f"probes/{name}"
    return "probes"
