"""Find TLS libraries and binaries and attach the uprobes to each once.

A uprobe lives on an inode, so one attachment covers every process (and every
container) that maps that file, including ones already running.  We attach
once per ``(st_dev, st_ino)`` and record why an attachment failed.

Attach modes (``Capture(attach_mode=...)``):
- ``"entry"``: a uprobe at each function's symbol plus a uretprobe, everywhere.
- ``"auto"``: for OpenSSL files, ``tuned.analyze()`` (run in a warm child
  process: ``plans.Analyst``) finds sites inside the
  SSL_read/SSL_write wrappers whose instructions the kernel emulates (about
  +1 µs a call instead of +18.5 µs here); a wrapper it cannot prove falls back
  to ``"entry"`` on its own.  ``Attachment.sites`` says what each wrapper got.

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
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from . import overlay, plans as tuned_plans
from .. import rootfs
from .elf import exported_symbols
from ..threads import service_thread
from .plans import SitePlan

log = logging.getLogger(__name__)

Library = Literal["openssl", "gnutls"]
AttachMode = Literal["auto", "entry"]
# Where a probe goes: a symbol name, or an ELF virtual address (bcc 0.26's
# attach_uprobe(addr=) maps it through PT_LOAD to the file offset).
Where = str | int

# Distinct TLS library files attached at once, at most (a file is attached
# once however many containers map it; see overlay.py).
MAX_ATTACHMENTS = 100  # ~8 probes each, under bcc's own quota of 1,000 open probes
# A file no process has mapped for this many sweeps in a row is idle
# (Attacher.sweep), unless it is pinned or in a live container's root.
UNMAPPED_SWEEPS = 2
# Idle files kept attached, the most recently used: the next run of a cron job
# or a script whose libssl is not in the host's directories (a vendored copy, a
# node under ~/.nvm) is seen from its first call.  Past this, and when a new
# file needs the room, the least recently used idle file is detached.
KEEP_IDLE = 32
LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib", "/lib", "/usr/local/lib")
# Image layers read for one new container at most (Docker's own limit on an
# image is 127 layers; a longer list is the daemon's answer gone wrong).
MAX_LAYERS_PER_CONTAINER = 128
# Layer directories remembered as read: twenty containers of one image read
# its layers once.  Past this the oldest is forgotten (read again if seen again:
# a few listdirs, no new attachment, since its files are known by inode).
LAYER_CACHE = 1024
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
# The data wrappers: their sites are what Attachment.sites reports.
DATA_SYMBOLS = {
    "openssl": ("SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex"),
    "gnutls": ("gnutls_record_send", "gnutls_record_recv"),
}
# Stack slots (bytes above rsp at the entry site) probes/openssl.c has an
# ssl_{write,read}_site_enter_sp<N> program for.
SITE_SLOTS = (0, 8, 16, 24, 32, 40, 48, 56)
TUNED_FUNCTIONS = (
    *(f"ssl_{d}_site_enter_sp{n}" for n in SITE_SLOTS for d in ("write", "read")),
    "ssl_site_return",
)


@dataclass(frozen=True)
class Site:
    """One probe of a tuned plan."""

    where: Where
    fn_name: str
    ret: bool


def tuned_sites(plan: SitePlan) -> tuple[Site, Site] | str:
    """(return, entry) probes that carry out ``plan`` with probes/openssl.c, or why not.

    The return probe comes first: attached alone it is harmless (it acts only
    on a stash its entry made), whereas an entry alone would leave a stash and
    a "TLS call active" mark behind on every call.
    """
    write = plan.symbol.startswith("SSL_write")
    ex = plan.symbol.endswith("_ex")
    kind, _ = plan.count_source
    if kind == "stack":
        slot = plan.count_slot
        if ex:
            return "a stack count for an _ex wrapper (size_t num) has no entry program"
        if slot not in SITE_SLOTS:
            return f"count slot sp{slot:+#x} at the entry site has no program (have {SITE_SLOTS})"
        entry = Site(plan.entry_vaddr, f"ssl_{'write' if write else 'read'}_site_enter_sp{slot}", False)
    elif kind == "arg_ptr" and ex:
        entry = Site(plan.entry_vaddr, f"ssl_{'write' if write else 'read'}_ex_enter", False)
    elif kind == "result" and not ex and plan.return_kind == "uretprobe" and not plan.return_on_callee:
        entry = Site(plan.entry_vaddr, f"ssl_{'write' if write else 'read'}_enter", False)
    else:
        return f"count source {plan.count_source} with a {plan.return_kind} return has no program"
    if plan.return_kind == "uprobe":
        ret = Site(plan.return_vaddr, "ssl_site_return", False)
    elif plan.return_on_callee:
        ret = Site(plan.return_vaddr, "ssl_site_return", True)
    else:
        ret = Site(plan.return_vaddr, "ssl_return", True)
    return ret, entry


@dataclass
class Attachment:
    path: str
    dev: int
    ino: int
    library: Library
    # "tuned": every data wrapper at its proven sites; "entry": none; "mixed": some.
    mode: Literal["tuned", "entry", "mixed"] = "entry"
    symbols: list[str] = field(default_factory=list)  # attached, entry and return
    # data wrapper -> "entry" or "tuned <entry insn>@<vaddr>/<return>@<vaddr>",
    # e.g. {"SSL_write": "tuned js@0x359d6/jle@0x359e5", "SSL_read_ex": "entry"}
    sites: dict[str, str] = field(default_factory=dict)
    unexported: list[str] = field(default_factory=list)  # required symbols the file lacks: for good
    # Probes the kernel refused, with why: tried again at every sweep (another
    # program's probe on the same instruction can block one until it stops).
    refused: dict[Site, str] = field(default_factory=dict)
    slot: int = 0  # its probes' attach cookie (probes/tls_common.h, armed)
    # In the host's library directories or named on the command line: kept
    # attached with no process mapping it, so a new one is seen from its first call.
    pinned: bool = False
    # The container roots whose library directories hold it (Attacher._root):
    # it stays attached while one of them has a process, mapped or not, so a
    # `docker exec … curl` is seen from its first call.
    roots: set[tuple] = field(default_factory=set)
    last_used: int = 0  # the sweep that last found it mapped (or its attach)

    @property
    def error(self) -> str | None:
        parts = [f"{sym} not exported" for sym in self.unexported]
        refused: dict[str, list[str]] = {}  # why -> the probes refused so (an entry and its return, often)
        for site, why in self.refused.items():
            refused.setdefault(why, []).append(f"{site.where}{' return' if site.ret else ''}")
        parts += [f"{' and '.join(probes)}: {why}" for why, probes in refused.items()]
        return "; ".join(parts) or None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str:
        """What its records call it: ``nodetls`` for the OpenSSL inside a node
        binary (Qtap's name, in ``tlsProbeTypesDetected``), else its library."""
        name = os.path.basename(self.path)
        if self.library == "openssl" and not _LIB_NAME.match(name) and name.startswith("node"):
            return "nodetls"
        return self.library


def library_of(path: str, held: str | None = None) -> Library | None:
    """Which TLS library family ``path`` provides, from its name or its
    exports (read from ``held``, the same file open, if given)."""
    m = _LIB_NAME.match(os.path.basename(path))
    if m:
        return "openssl" if m.group(1) == "ssl" else "gnutls"
    found = exported_symbols(held or path, MARKER.values())
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


def layer_candidates(layer: str, dirs: Iterable[str] = LIB_DIRS) -> list[str] | None:
    """TLS library files in the library directories ``dirs`` of one image
    layer (a directory on the host: overlay2's ``<id>/diff``); None if the
    layer itself cannot be read.

    Only real directories and regular files count: a symlink in a layer
    points into the container's merged root, not into this layer, so followed
    here an absolute one would lead to the host's file of that name (and a
    merged-/usr image's ``/lib`` is read as ``/usr/lib``, in ``dirs`` too).
    A whiteout (a character device) is no file either."""
    try:
        if not stat.S_ISDIR(os.lstat(layer).st_mode):
            return None
    except OSError:
        return None
    out = []
    for d in dirs:
        path = layer.rstrip("/")
        try:
            for part in d.strip("/").split("/"):
                path = os.path.join(path, part)
                if not stat.S_ISDIR(os.lstat(path).st_mode):  # lstat: a symlink is not a directory
                    raise NotADirectoryError(path)
            names = sorted(os.listdir(path))
        except OSError:
            continue  # most layers lack most of these directories
        for name in names:
            if not _LIB_NAME.match(name):
                continue
            full = os.path.join(path, name)
            try:
                if stat.S_ISREG(os.lstat(full).st_mode):
                    out.append(full)
            except OSError:
                continue
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

    ``attach_fn(path, where, fn_name, ret, slot)`` does the kernel work (a
    uprobe or uretprobe; ``where`` is a symbol or an ELF virtual address),
    ``arm_fn(slot, label)`` lets the probes of the file in ``slot`` act once
    every one of them is placed, their records naming ``label``
    (probes/tls_common.h, ``armed``), and
    ``detach_fn(slot)`` removes them (False: it cannot); injected so this
    logic is testable.  Slots run from 1; a detached file's slot is reused.
    ``plans(path)`` is the tuned analysis (``plans.Analyst.analyze``) and
    ``tidy()`` runs at every sweep (``plans.Analyst.tidy``).
    """

    def __init__(
        self,
        attach_fn: Callable[[str, Where, str, bool, int], None],
        exclude_pid: int = 0,
        mode: AttachMode = "auto",
        plans: Callable[[str], dict[str, tuned_plans.Plan]] = tuned_plans.analyze,
        arm_fn: Callable[[int, str], None] = lambda slot, label: None,
        detach_fn: Callable[[int], bool] = lambda slot: False,
        keep_idle: int = KEEP_IDLE,
        tidy: Callable[[], None] = lambda: None,
    ) -> None:
        if mode not in ("auto", "entry"):
            raise ValueError(f"attach mode {mode!r}: must be 'auto' or 'entry'")
        self._attach_fn = attach_fn
        self._arm_fn = arm_fn
        self._detach_fn = detach_fn
        self._free_slots: list[int] = []
        self._unmapped: dict[tuple[int, ...], int] = {}  # key -> sweeps in a row no process mapped it
        self._keep_idle = keep_idle
        self._sweeps = 0
        self.detached = 0
        self._exclude_pid = exclude_pid
        self._mode = mode
        self._plans = plans
        self._tidy = tidy
        # Held by the attaching threads across the slow work (ELF reads, the
        # tuned analysis, bcc's attaches), which it also serialises.  Readers
        # (the event loop, for every new SSE client and /stats) take
        # ``attachments``, a tuple replaced whole, and never wait on it.
        self._lock = threading.Lock()
        self._by_inode: dict[tuple[int, ...], Attachment] = {}
        self._published: tuple[Attachment, ...] = ()
        # Files already judged not to be TLS libraries: (dev, ino) -> None
        self._not_tls: set[tuple[int, ...]] = set()
        self._not_tls_max = 65536
        self.over_limit = 0  # TLS libraries not attached: MAX_ATTACHMENTS reached
        self._roots: set[tuple] = set()  # container roots whose library directories were read
        self.roots_read = 0
        self.roots_forgotten = 0  # container roots let go (the bound), read again if seen again
        self.not_tls_uncached = 0  # files judged not TLS past the bound of what is remembered
        self.retried = 0  # files whose refused probes were all placed at a later sweep
        # Image layers read at a container's create (consider_layers): layer
        # directory -> None, oldest first; bounded by LAYER_CACHE.
        self._layers: dict[tuple[str, int, int], None] = {}
        self.layers_read = 0
        self.layers_cached = 0  # layers not read again: read for an earlier container
        self.layers_unreadable = 0  # not a directory we can read (another mount namespace, removed meanwhile)
        self.layers_over_limit = 0  # past MAX_LAYERS_PER_CONTAINER, not read
        self.attached_at_create = 0  # files first attached from a layer, before any process mapped them

    @property
    def attachments(self) -> list[Attachment]:
        return list(self._published)

    def consider(self, path: str, pinned: bool = False) -> Attachment | None:
        """Attach to ``path`` if it is a TLS library not attached yet."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISREG(st.st_mode):
            # The file the probe lands on: one libssl seen in many containers
            # of one image is one attachment (overlay.py).
            key = overlay.real_key(path, st)
            with self._lock:
                if key in self._by_inode or key in self._not_tls:  # nearly every call: a file seen before
                    return self._by_inode.get(key)
        elif not stat.S_ISLNK(st.st_mode):  # a FIFO would block the open below (rootfs.py)
            return None
        # (A symlink is followed by the open, inside its container's root: an
        # absolute one would lead stat to the host's file of that name.)
        # New: read and attached through an open descriptor, because a path
        # under a short-lived process's /proc/PID/root is gone the moment it
        # exits, which for `docker run image curl …` is while its libssl is attached.
        try:
            fd = rootfs.open_regular(path)  # a container's file: inside its root, never blocking
        except OSError:
            return None
        try:
            return self._consider_new(path, f"/proc/self/fd/{fd}", overlay.real_key(path, os.fstat(fd)), pinned)
        finally:
            os.close(fd)

    def _consider_new(self, path: str, held: str, key: tuple[int, ...], pinned: bool) -> Attachment | None:
        with self._lock:
            if key in self._by_inode or key in self._not_tls:
                return self._by_inode.get(key)
            lib = library_of(path, held)
            if lib is None:
                if len(self._not_tls) < self._not_tls_max:
                    self._not_tls.add(key)
                else:
                    self.not_tls_uncached += 1  # judged again when seen again: a read, no attachment
                return None
            if len(self._by_inode) >= MAX_ATTACHMENTS and not self._make_room():
                self.over_limit += 1
                if self.over_limit == 1:
                    log.warning("%d TLS library files attached, the most kept: %s and any more are not captured "
                                "(counted in attachments_over_limit)", MAX_ATTACHMENTS, path)
                return None
            # Slots in use and free are 1..n: with none free, n + 1 is new.
            slot = self._free_slots.pop() if self._free_slots else len(self._by_inode) + 1
            att = self._attach(path, held, key, lib, slot)
            att.pinned = pinned
            att.last_used = self._sweeps
            self._arm_fn(slot, att.label)  # after its last probe: a call is seen on both sides or not at all
            self._by_inode[key] = att
            self._published = tuple(self._by_inode.values())
            return att

    def _attach(self, path: str, held: str, key: tuple[int, ...], lib: Library, slot: int) -> Attachment:
        """Attach ``lib``'s probes to the file open at ``held`` (``path``, as shown)."""
        att = Attachment(path=path, dev=key[0], ino=key[1], library=lib, slot=slot)
        present = exported_symbols(held, {p.symbol for p in PROBES[lib]})
        tuned_ok = self._attach_tuned(path, held, att, present, slot) \
            if lib == "openssl" and self._mode == "auto" else set()
        for probe in PROBES[lib]:
            if probe.symbol in tuned_ok:
                continue
            if probe.symbol not in present:
                if probe.required:
                    att.unexported.append(probe.symbol)
                continue
            self._place_entry(held, att, Site(probe.symbol, probe.fn_name, probe.ret))
        self._set_mode(att)
        if att.ok:
            log.info("attached to %s (%s, %s probes)", path, lib, att.mode)
            log.debug("%s: %s", path, ", ".join(f"{s} {att.sites[s]}" for s in DATA_SYMBOLS[lib] if s in att.sites))
        else:
            log.warning("could not attach to %s (%s): %s", path, lib, att.error)
        return att

    def _place_entry(self, held: str, att: Attachment, site: Site) -> None:
        """One probe at a symbol; a refusal is kept in ``att.refused``.  Its
        dicts are replaced, not changed: after a retry, other threads may be
        reading them (``system.connected``, ``/stats``)."""
        try:
            self._attach_fn(held, site.where, site.fn_name, site.ret, att.slot)
        except Exception as exc:  # bcc raises bare Exception
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            att.refused = {**att.refused, site: why}
            return
        att.refused = {s: why for s, why in att.refused.items() if s != site}
        att.symbols.append(f"{site.where}{':return' if site.ret else ''}")
        if site.where in DATA_SYMBOLS[att.library] and site.where not in att.sites:
            att.sites = {**att.sites, str(site.where): "entry"}

    @staticmethod
    def _set_mode(att: Attachment) -> None:
        data = [s for s in DATA_SYMBOLS[att.library] if s in att.sites]
        n_tuned = sum(1 for s in data if att.sites[s].startswith("tuned"))
        att.mode = "tuned" if data and n_tuned == len(data) else "mixed" if n_tuned else "entry"

    def _retry_refused(self, key: tuple[int, ...], att: Attachment) -> None:
        """Place the probes the kernel refused before (under the lock), if
        ``att.path`` still opens the file ``key`` names.  Return probes go
        first: the file's slot is armed already, and an entry probe alone
        would leave a half-seen call behind."""
        try:
            fd = rootfs.open_regular(att.path)
        except OSError:
            return  # its process is gone: tried again while the file stays attached
        try:
            if overlay.real_key(att.path, os.fstat(fd)) != key:
                return
            for site in sorted(att.refused, key=lambda s: not s.ret):
                self._place_entry(f"/proc/self/fd/{fd}", att, site)
        finally:
            os.close(fd)
        self._set_mode(att)
        if not att.refused:
            self.retried += 1
            if att.ok:
                log.info("attached to %s (%s, %s probes), once refused probes were placed", att.path, att.library,
                         att.mode)

    def _attach_tuned(self, path: str, held: str, att: Attachment, present: set[str], slot: int) -> set[str]:
        """Attach the proven sites of each OpenSSL data wrapper; the wrappers done."""
        wrappers = [s for s in DATA_SYMBOLS["openssl"] if s in present]
        if not wrappers:
            return set()
        try:
            plans = self._plans(held)
        except Exception as exc:  # the analysis is total; this is a bug, keep capturing
            log.exception("tuned analysis of %s", path)
            plans = {s: tuned_plans.Unrecognised(s, f"analysis raised {exc!r}") for s in wrappers}
        done: set[str] = set()
        shared: set[Site] = set()  # a callee uretprobe serves every wrapper that calls it
        for symbol in wrappers:
            plan = plans.get(symbol)
            sites = tuned_sites(plan) if isinstance(plan, SitePlan) else None
            if not isinstance(sites, tuple):
                why = plan.reason if isinstance(plan, tuned_plans.Unrecognised) else sites or "no plan"
                log.info("%s %s: entry probes (%s)", path, symbol, why)
                continue
            try:
                for site in sites:
                    if site in shared:
                        continue
                    self._attach_fn(held, site.where, site.fn_name, site.ret, slot)
                    shared.add(site)
            except Exception as exc:  # entry probes instead; a lone return site is inert
                log.warning("%s %s: tuned site failed (%s); entry probes instead", path, symbol, exc)
                continue
            done.add(symbol)
            att.symbols += [f"{symbol}@{plan.entry_vaddr:#x}", f"{symbol}@{plan.return_vaddr:#x}"
                            + (":return" if plan.return_kind == "uretprobe" else "")]
            att.sites[symbol] = f"tuned {plan.describe()}"
        return done

    def consider_layers(self, layers: Iterable[str]) -> int:
        """Attach the TLS libraries in the library directories of a new
        container's image layers (host paths, topmost first), before its first
        process runs; the number of files newly attached.

        Such a file is attached through its layer path, and is the same file
        (overlay.real_key) when the container's process maps it through its
        root: that process's scans find it attached, and its root holds it
        then.  Until then it is neither pinned nor held by a root: a container
        created and never started, or whose program never loads it, leaves it
        idle after UNMAPPED_SWEEPS sweeps, as for any file no process maps."""
        new, started = 0, time.monotonic()
        for i, layer in enumerate(layers):
            if i >= MAX_LAYERS_PER_CONTAINER:
                self.layers_over_limit += 1
                continue
            try:
                st = os.stat(layer)
            except OSError:
                self.layers_unreadable += 1
                continue
            # With its inode: a layer directory removed with its image and
            # another made at the same path later is a new layer.
            key = (layer, st.st_dev, st.st_ino)
            if key in self._layers:
                self._layers[key] = self._layers.pop(key)  # the most recently used last
                self.layers_cached += 1
                continue
            found = layer_candidates(layer)
            if found is None:
                self.layers_unreadable += 1
                continue
            # OpenSSL's first: the more common, and its attach (the tuned
            # analysis) the slower, so the one that most needs the head start.
            for path in sorted(found, key=lambda p: not os.path.basename(p).startswith("libssl")):
                known = {id(a) for a in self._published}
                att = self.consider(path)
                if att is not None and id(att) not in known:
                    new += 1
                    self.attached_at_create += 1
            if len(self._layers) >= LAYER_CACHE:
                del self._layers[next(iter(self._layers))]
            self._layers[key] = None
            self.layers_read += 1  # after its files are attached: what a test can wait for
        if new:
            log.info("a new container's image layers: %d files attached in %.0f ms", new,
                     (time.monotonic() - started) * 1e3)
        return new

    def scan_pid(self, pid: int) -> list[Attachment]:
        return self._scan(pid)[0]

    def _scan(self, pid: int) -> tuple[list[Attachment], tuple | None]:
        """``pid``'s TLS libraries, attached, and its root's key."""
        if pid == self._exclude_pid:
            return [], None
        out = []
        root, new_root = self._root(pid)
        if new_root:
            # At exec only the binary and the loader are mapped: a short-lived
            # first process (``docker run … curl``) would be gone before its
            # libssl showed in its maps.  So a root's library directories are
            # read the first time one of its processes is seen.
            for path in library_dir_candidates(f"/proc/{pid}/root{d}" for d in LIB_DIRS):
                att = self.consider(path)
                if att is not None:
                    out.append(att)
                    with self._lock:
                        att.roots.add(root)
        for path in mapped_files(pid):
            att = self.consider(path)
            if att is not None:
                out.append(att)
        if new_root:
            self.roots_read += 1  # after its files are attached: what a test can wait for
        return out, root

    def _root(self, pid: int) -> tuple[tuple | None, bool]:
        """The key of ``pid``'s root (None if unreadable), and whether it is
        the first time it is seen."""
        try:
            st = os.stat(f"/proc/{pid}/root")
            # With the root mount's line: a removed container's overlay device
            # and upper directory inode are both reused by the next one, but
            # its mount line names its own layers.
            with open(f"/proc/{pid}/mountinfo") as f:
                line = f.readline()
        except OSError:
            return None, False
        key = (st.st_dev, st.st_ino, line)
        with self._lock:
            if key in self._roots:
                return key, False
            if len(self._roots) >= self._not_tls_max:
                self.roots_forgotten += len(self._roots)
                self._roots.clear()  # bounded; a root read again costs a listdir, no attachment
            self._roots.add(key)
        return key, True

    def scan_all(self, extra_paths: Iterable[str] = ()) -> list[Attachment]:
        for path in [*library_dir_candidates(), *extra_paths]:
            self.consider(path, pinned=True)
        for pid in all_pids():
            self.scan_pid(pid)
        return self.attachments

    def sweep(self, pids: Iterable[int]) -> None:
        """Scan every process in ``pids`` (all of them): a library loaded long
        after exec is attached.  A file that for UNMAPPED_SWEEPS sweeps in a
        row no process has mapped and no live container holds (its containers
        gone) is idle; the KEEP_IDLE most recently used idle files stay
        attached, older ones are detached, so that MAX_ATTACHMENTS bounds the
        files in use, not every file ever seen.  A process that maps a
        detached file again has it attached again (its first calls may be
        missed, as for any file new to the agent)."""
        mapped: set[int] = set()
        live_roots: set[tuple] = set()
        for pid in pids:
            try:
                atts, root = self._scan(pid)
            except Exception:  # a process that went away mid-read, an odd file
                log.debug("sweep: scanning pid %d failed", pid, exc_info=True)
                continue
            mapped.update(id(a) for a in atts)
            if root is not None:
                live_roots.add(root)
        with self._lock:
            self._sweeps += 1
            for key, att in self._by_inode.items():
                if att.refused:
                    self._retry_refused(key, att)
            for key, att in self._by_inode.items():
                att.roots &= live_roots
                if att.pinned or id(att) in mapped or att.roots:
                    self._unmapped.pop(key, None)
                    att.last_used = self._sweeps
                else:
                    self._unmapped[key] = self._unmapped.get(key, 0) + 1
            idle = self._idle(UNMAPPED_SWEEPS)
            for key in idle[:max(0, len(idle) - self._keep_idle)]:
                self._let_go(key, f"no process has mapped it for {self._unmapped[key]} sweeps")
            self._published = tuple(self._by_inode.values())
        self._tidy()

    def _idle(self, sweeps: int) -> list[tuple[int, ...]]:
        """Files unmapped for at least ``sweeps`` sweeps, least recently used first."""
        keys = [key for key, n in self._unmapped.items() if n >= sweeps]
        return sorted(keys, key=lambda key: self._by_inode[key].last_used)

    def _make_room(self) -> bool:
        """Detach the least recently used file no process maps now, for a new one."""
        return any(self._let_go(key, "a new file needed its room") for key in self._idle(1))

    def _let_go(self, key: tuple[int, ...], why: str) -> bool:
        att = self._by_inode[key]
        if not self._detach_fn(att.slot):
            return False  # probes attached without a cookie stay
        del self._by_inode[key], self._unmapped[key]
        self._free_slots.append(att.slot)
        self.detached += 1
        self._published = tuple(self._by_inode.values())
        log.info("detached %s: %s", att.path, why)
        return True


class ExecWatcher:
    """Re-scans a process after exec, off the ring reader's thread.

    At exec time only the binary and the dynamic loader are mapped; shared
    libraries appear a few milliseconds later, so each pid is scanned at exec
    and again after short delays.  A library loaded later still (dlopen of a
    container's own libssl, a wheel's bundled copy) is found by a sweep of
    every process every ``sweep_seconds``.
    """

    DELAYS = (0.0, 0.05, 0.3, 1.0)

    def __init__(self, attacher: Attacher, max_pending: int = 4096, sweep_seconds: float = 10.0,
                 max_layer_jobs: int = 64) -> None:
        self._attacher = attacher
        self._sweep_seconds = sweep_seconds
        self._next_sweep = time.monotonic() + sweep_seconds
        self.sweeps = 0
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, int]] = []  # (due, pid, step)
        self._max_pending = max_pending
        self.dropped = 0
        # New containers' image layers (on_layers), read before any pending
        # scan: their first process is about to start.
        self._layer_jobs: deque[tuple[str, ...]] = deque()
        self._max_layer_jobs = max_layer_jobs
        self.layer_jobs_dropped = 0  # that container's libraries are found at its first process, as before
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

    def on_layers(self, layers: Iterable[str]) -> None:
        """A container was created with these image layers (host directories):
        attach their TLS libraries on this watcher's thread, the one that
        places probes.  Called from Docker's event thread; never blocks."""
        with self._cond:
            if len(self._layer_jobs) >= self._max_layer_jobs:
                self.layer_jobs_dropped += 1
                return
            self._layer_jobs.append(tuple(layers))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _sweep(self) -> None:
        self.sweeps += 1
        self._attacher.sweep(all_pids())
        self._next_sweep = time.monotonic() + self._sweep_seconds

    def _run(self) -> None:
        service_thread("qtap-attach")
        while True:
            with self._cond:
                while not self._stop and not self._layer_jobs \
                        and (not self._queue or self._queue[0][0] > time.monotonic()):
                    now = time.monotonic()
                    if now >= self._next_sweep:
                        break
                    due = self._queue[0][0] if self._queue else self._next_sweep
                    self._cond.wait(max(0.0, min(due, self._next_sweep) - now))
                if self._stop:
                    return
                layers = self._layer_jobs.popleft() if self._layer_jobs else None
                sweep = layers is None and (not self._queue or self._queue[0][0] > time.monotonic())
                if layers is None and not sweep:
                    due, pid, step = heapq.heappop(self._queue)
                    if step + 1 < len(self.DELAYS):
                        heapq.heappush(self._queue, (due + self.DELAYS[step + 1], pid, step + 1))
            if layers is not None:
                try:
                    self._attacher.consider_layers(layers)
                except Exception:  # an odd layer must not stop the watcher; its first process is scanned
                    log.exception("reading image layers %s", layers[:3])
                continue
            if sweep:
                self._sweep()
                continue
            if not os.path.exists(f"/proc/{pid}"):
                with self._cond:
                    self._queue = [q for q in self._queue if q[1] != pid]
                    heapq.heapify(self._queue)
                continue
            try:
                self._attacher.scan_pid(pid)
            except Exception:  # never let one odd process stop the watcher
                log.exception("scanning pid %d", pid)
