"""Find TLS libraries and binaries and attach the uprobes to each once.

A uprobe lives on an inode, so one attachment covers every process (and every
container) that maps that file, including ones already running.  We attach
once per ``(st_dev, st_ino)`` and record why an attachment failed.

Candidates:
- ``libssl*.so*`` / ``libgnutls*.so*`` in the standard library directories;
- every file mapped executable by a running process whose name looks like one
  of those libraries, or that exports ``SSL_write`` / ``gnutls_record_send``
  from its dynamic symbol table (node links OpenSSL into its binary).  Files in
  containers are reached through ``/proc/<pid>/root/<path>``.
"""

from __future__ import annotations

import heapq
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from .elf import exported_symbols

log = logging.getLogger(__name__)

Library = Literal["openssl", "gnutls"]

LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib", "/lib", "/usr/local/lib")
_LIB_NAME = re.compile(r"^lib(ssl|gnutls)\.so(\.\d+)*$")


@dataclass(frozen=True)
class Uprobe:
    symbol: str
    fn_name: str
    ret: bool = False
    required: bool = False


# What each library family needs.  Entry probes on SSL_write/SSL_read stash
# the call; return probes emit the plaintext.
PROBES: dict[str, tuple[Uprobe, ...]] = {
    "openssl": (
        Uprobe("SSL_write", "ssl_write_enter", required=True),
        Uprobe("SSL_write", "ssl_return", ret=True, required=True),
        Uprobe("SSL_read", "ssl_read_enter", required=True),
        Uprobe("SSL_read", "ssl_return", ret=True, required=True),
        Uprobe("SSL_write_ex", "ssl_write_ex_enter"),
        Uprobe("SSL_write_ex", "ssl_return", ret=True),
        Uprobe("SSL_read_ex", "ssl_read_ex_enter"),
        Uprobe("SSL_read_ex", "ssl_return", ret=True),
        Uprobe("SSL_set_fd", "ssl_set_fd_enter"),
        Uprobe("SSL_free", "ssl_free_enter"),
        Uprobe("SSL_ctrl", "ssl_ctrl_enter"),
    ),
    "gnutls": (
        Uprobe("gnutls_record_send", "gnutls_send_enter", required=True),
        Uprobe("gnutls_record_send", "gnutls_return", ret=True, required=True),
        Uprobe("gnutls_record_recv", "gnutls_recv_enter", required=True),
        Uprobe("gnutls_record_recv", "gnutls_return", ret=True, required=True),
        Uprobe("gnutls_transport_set_int2", "gnutls_set_int2_enter"),
        Uprobe("gnutls_deinit", "gnutls_deinit_enter"),
        Uprobe("gnutls_server_name_set", "gnutls_server_name_set_enter"),
    ),
}
MARKER = {"openssl": "SSL_write", "gnutls": "gnutls_record_send"}


@dataclass
class Attachment:
    path: str
    dev: int
    ino: int
    library: Library
    mode: Literal["entry"] = "entry"
    symbols: list[str] = field(default_factory=list)  # attached, entry and return
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def library_of(path: str) -> Library | None:
    """Which TLS library family ``path`` provides, from its name or its exports."""
    m = _LIB_NAME.match(os.path.basename(path))
    if m:
        return "openssl" if m.group(1) == "ssl" else "gnutls"
    found = exported_symbols(path, MARKER.values())
    if MARKER["openssl"] in found:
        return "openssl"
    if MARKER["gnutls"] in found:
        return "gnutls"
    return None


def library_dir_candidates(dirs: Iterable[str] = LIB_DIRS) -> list[str]:
    out = []
    for d in dirs:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        out.extend(os.path.join(d, n) for n in sorted(names) if _LIB_NAME.match(n))
    return out


def mapped_files(pid: int) -> list[str]:
    """Executable file mappings of ``pid``, as paths openable from this namespace."""
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6 or "x" not in parts[1] or parts[4] == "0":
                    continue
                path = parts[5].strip()
                if not path.startswith("/") or path.endswith("(deleted)"):
                    continue
                out.append(f"/proc/{pid}/root{path}")
    except OSError:
        pass
    return out


def all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


class Attacher:
    """Attaches uprobes to each TLS library file once; thread-safe.

    ``attach_fn(path, symbol, fn_name, ret)`` does the kernel work (bcc's
    ``attach_uprobe``/``attach_uretprobe``); injected so this logic is testable.
    """

    def __init__(self, attach_fn: Callable[[str, str, str, bool], None], exclude_pid: int = 0) -> None:
        self._attach_fn = attach_fn
        self._exclude_pid = exclude_pid
        self._lock = threading.Lock()
        self._by_inode: dict[tuple[int, int], Attachment] = {}
        # Files already judged not to be TLS libraries: (dev, ino) -> None
        self._not_tls: set[tuple[int, int]] = set()
        self._not_tls_max = 65536

    @property
    def attachments(self) -> list[Attachment]:
        with self._lock:
            return list(self._by_inode.values())

    def consider(self, path: str) -> Attachment | None:
        """Attach to ``path`` if it is a TLS library not attached yet."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (st.st_dev, st.st_ino)
        with self._lock:
            if key in self._by_inode or key in self._not_tls:
                return self._by_inode.get(key)
            lib = library_of(path)
            if lib is None:
                if len(self._not_tls) < self._not_tls_max:
                    self._not_tls.add(key)
                return None
            att = self._attach(path, key, lib)
            self._by_inode[key] = att
            return att

    def _attach(self, path: str, key: tuple[int, int], lib: Library) -> Attachment:
        att = Attachment(path=path, dev=key[0], ino=key[1], library=lib)
        present = exported_symbols(path, {p.symbol for p in PROBES[lib]})
        errors = []
        for probe in PROBES[lib]:
            if probe.symbol not in present:
                if probe.required:
                    errors.append(f"{probe.symbol} not exported")
                continue
            try:
                self._attach_fn(path, probe.symbol, probe.fn_name, probe.ret)
            except Exception as exc:  # bcc raises bare Exception
                errors.append(f"{probe.symbol}{' return' if probe.ret else ''}: {exc}")
                continue
            name = probe.symbol + (":return" if probe.ret else "")
            att.symbols.append(name)
        if errors:
            att.error = "; ".join(errors)
            log.warning("attach %s (%s): %s", path, lib, att.error)
        else:
            log.info("attached %s (%s): %d probes", path, lib, len(att.symbols))
        return att

    def scan_pid(self, pid: int) -> list[Attachment]:
        if pid == self._exclude_pid:
            return []
        out = []
        for path in dict.fromkeys(mapped_files(pid)):
            att = self.consider(path)
            if att is not None:
                out.append(att)
        return out

    def scan_all(self, extra_paths: Iterable[str] = ()) -> list[Attachment]:
        for path in [*library_dir_candidates(), *extra_paths]:
            self.consider(path)
        for pid in all_pids():
            self.scan_pid(pid)
        return self.attachments


class ExecWatcher:
    """Re-scans a process after exec, off the ring reader's thread.

    At exec time only the binary and the dynamic loader are mapped; shared
    libraries appear a few milliseconds later, so each pid is scanned at exec
    and again after short delays.
    """

    DELAYS = (0.0, 0.05, 0.3, 1.0)

    def __init__(self, attacher: Attacher, max_pending: int = 4096) -> None:
        self._attacher = attacher
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, int]] = []  # (due, pid, step)
        self._max_pending = max_pending
        self.dropped = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="qtap-attach", daemon=True)
        self._thread.start()

    def on_exec(self, pid: int) -> None:
        with self._cond:
            if len(self._queue) >= self._max_pending:
                self.dropped += 1
                return
            heapq.heappush(self._queue, (time.monotonic(), pid, 0))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (not self._queue or self._queue[0][0] > time.monotonic()):
                    timeout = None if not self._queue else max(0.0, self._queue[0][0] - time.monotonic())
                    self._cond.wait(timeout)
                if self._stop:
                    return
                due, pid, step = heapq.heappop(self._queue)
                if step + 1 < len(self.DELAYS):
                    heapq.heappush(self._queue, (due + self.DELAYS[step + 1], pid, step + 1))
            if not os.path.exists(f"/proc/{pid}"):
                with self._cond:
                    self._queue = [q for q in self._queue if q[1] != pid]
                    heapq.heapify(self._queue)
                continue
            try:
                self._attacher.scan_pid(pid)
            except Exception:  # never let one odd process stop the watcher
                log.exception("scanning pid %d", pid)
