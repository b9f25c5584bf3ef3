"""What tuned analysis says about a library file, and asking a child process for it.

The analysis (``tuned.py``) disassembles a TLS library with capstone: C code
reading machine code from files a container controls, and ~5 MB of the
agent's memory for good once imported (its Python constants for seventeen
architectures), for a few milliseconds' work per file.  So the agent asks a
child process (``python -m qtap_devtools.capture.tuned --serve FD``) and reads
the plans back as JSON: a file that crashes or hangs capstone costs that
child, and the file gets entry probes.  The types live here, free of
capstone, for the agent and the child both.

The child is kept warm (``Analyst``): Python's start and capstone's import are
~100 ms of an analysis's ~110 here, and up to 400 ms while Docker starts a
container, which is when a new container's libssl is attached, against the
~130 ms from Docker's ``create`` to its first process.  And a file whose bytes
were analysed before (one libssl build in many images) is not analysed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

WRAPPERS = ("SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex")
# A file's analysis takes a warm worker ~4 ms here; this bounds a hostile one.
ANALYSIS_TIMEOUT_SECONDS = 30.0
# A worker with no file to analyse for this long is let go (~30 MB resident,
# half of it shared code): the agent's start and the containers started in the
# minutes after are served warm, an idle agent holds no worker.
WARM_SECONDS = 300.0
# Plans remembered by file content, the most recently used; a file larger than
# MAX_HASHED_BYTES (node's binary, ~100 MB) is analysed each time instead.
CACHED_FILES = 64
MAX_HASHED_BYTES = 32 << 20
MAX_REPLY_BYTES = 1 << 20
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
log = logging.getLogger(__name__)
_HELD = re.compile(r"/proc/self/fd/(\d+)")

CountSource = tuple[Literal["stack"], int] | tuple[Literal["arg_ptr"], str] | tuple[Literal["result"], str]


@dataclass(frozen=True)
class SitePlan:
    """Where to probe one wrapper cheaply, and what the BPF side reads there.

    Offsets are file offsets (what the kernel's uprobe API takes); the ``*_vaddr``
    twins are ELF virtual addresses (what bcc 0.26's ``attach_uprobe(addr=)``
    takes: it converts a virtual address to a file offset through PT_LOAD).

    At the entry site the arguments are in rdi, rsi, rdx (and rcx for ``_ex``)
    exactly as at the call; rsp is ``entry_rsp_delta`` below its value at the call.

    ``return_kind`` says how the return is observed:
      * ``"uprobe"``: a plain uprobe at ``return_offset``, inside the wrapper,
        right after the internal call; ``result_reg`` holds the internal
        function's result (>0 is success) and rsp is as at the entry site.
      * ``"uretprobe"``: a uretprobe attached at ``return_offset``, the start of a
        function (the wrapper, or the internal function it calls) whose first
        instruction the kernel emulates, so installing the return hook is cheap.
        When that is the internal function, it also returns into other callers
        (the other wrapper, *_early_data): act only when the entry site stashed.

    ``count_source`` says where the byte count is at the return:
      * ``("stack", off)``: a size_t at ``sp + off`` (valid when result > 0);
      * ``("arg_ptr", "rcx")``: a size_t at the pointer that was rcx at the entry
        site (stash it there per thread);
      * ``("result", "eax")``: the return value itself is the count.
    """

    symbol: str
    entry_offset: int
    entry_rsp_delta: int
    return_offset: int
    result_reg: str
    count_source: CountSource
    reason: str
    return_kind: Literal["uprobe", "uretprobe"] = "uprobe"
    entry_vaddr: int = 0
    return_vaddr: int = 0
    symbol_vaddr: int = 0  # the wrapper's start: a uretprobe there is on the wrapper itself
    return_rsp_delta: int = 0  # rsp at the call (and so at the return), relative to the symbol's start
    entry_insn: str = ""  # mnemonics at the two sites, for humans: "js", "jle", "call", "push"
    return_insn: str = ""
    callee_vaddr: int = 0  # the internal function the wrapper hands buf/num to (0: none found)

    @property
    def return_on_callee(self) -> bool:
        """The return is a uretprobe on the internal function, not on the wrapper."""
        return self.return_kind == "uretprobe" and self.return_vaddr != self.symbol_vaddr

    @property
    def count_slot(self) -> int | None:
        """For a ``("stack", off)`` count: its offset from rsp *at the entry site*."""
        if self.count_source[0] != "stack":
            return None
        return self.return_rsp_delta - self.entry_rsp_delta + self.count_source[1]

    def describe(self) -> str:
        """``"js@0x359d6/jle@0x359e5"``, or ``"call@0x35a54/uretprobe@0x355e0"``."""
        ret = self.return_insn if self.return_kind == "uprobe" else "uretprobe"
        return f"{self.entry_insn}@{self.entry_vaddr:#x}/{ret}@{self.return_vaddr:#x}"


@dataclass(frozen=True)
class Unrecognised:
    symbol: str
    reason: str


Plan = SitePlan | Unrecognised



def plans_json(plans: dict[str, Plan]) -> bytes:
    """``{symbol: {"plan": "site", field: value, …} | {"plan": "unrecognised", "reason": …}}``."""
    out: dict[str, dict[str, Any]] = {}
    for symbol, plan in plans.items():
        if isinstance(plan, SitePlan):
            out[symbol] = {"plan": "site", **dataclasses.asdict(plan)}
        else:
            out[symbol] = {"plan": "unrecognised", "symbol": plan.symbol, "reason": plan.reason}
    return orjson.dumps(out)


_SITE_FIELDS = {f.name for f in dataclasses.fields(SitePlan)}


def plans_from_json(text: bytes, symbols: tuple[str, ...]) -> dict[str, Plan]:
    """The plans ``plans_json`` wrote; ValueError if the text is not that."""
    doc = orjson.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    plans: dict[str, Plan] = {}
    for symbol in symbols:
        item = doc.get(symbol)
        if not isinstance(item, dict):
            raise ValueError(f"no plan for {symbol}")
        fields = {k: v for k, v in item.items() if k != "plan"}
        if item.get("plan") == "unrecognised":
            plans[symbol] = Unrecognised(symbol, str(fields.get("reason", "")))
        elif item.get("plan") == "site" and set(fields) == _SITE_FIELDS and fields["symbol"] == symbol:
            source = fields["count_source"]
            if not (isinstance(source, list) and len(source) == 2):
                raise ValueError(f"{symbol}: bad count_source {source!r}")
            plans[symbol] = SitePlan(**{**fields, "count_source": tuple(source)})
        else:
            raise ValueError(f"{symbol}: not a plan")
    return plans


def request_symbols(msg: bytes) -> tuple[str, ...]:
    """The wrappers a worker is asked for (a JSON list of names); ValueError if not that."""
    symbols = orjson.loads(msg)
    if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
        raise ValueError("the request is not a list of symbol names")
    return tuple(symbols)


def failed(symbols: tuple[str, ...], why: str) -> dict[str, Plan]:
    return {s: Unrecognised(s, f"analysis failed ({why})") for s in symbols}


def content_key(path: str, symbols: tuple[str, ...]) -> bytes | None:
    """What a file's plans depend on: its bytes and the wrappers asked for
    (None: too large to hash for less than an analysis costs, or unreadable)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_HASHED_BYTES:
                return None
            digest = hashlib.file_digest(f, "sha256")
    except OSError:
        return None
    digest.update(",".join(symbols).encode())
    return digest.digest()


class Analyst:
    """The tuned analysis for the agent: one warm worker process, asked one
    file at a time, and plans remembered by file content.  Thread-safe;
    ``tidy`` (the attacher's sweep) lets an idle worker go, ``close`` at stop.

    Counters: ``analysed`` (files a worker analysed), ``reused`` (plans
    given again for bytes analysed before), ``failures`` (a worker that died,
    hung or answered nonsense: that file gets entry probes), ``workers_started``.
    """

    def __init__(self, timeout: float = ANALYSIS_TIMEOUT_SECONDS, warm_seconds: float = WARM_SECONDS,
                 cached_files: int = CACHED_FILES, command: list[str] | None = None) -> None:
        self._timeout = timeout
        self._warm_seconds = warm_seconds
        self._cached_files = cached_files
        self._command = command or [sys.executable, "-m", "qtap_devtools.capture.tuned", "--serve"]
        self._lock = threading.Lock()
        self._worker: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._last_used = 0.0
        self._cache: dict[bytes, dict[str, Plan]] = {}  # oldest use first
        self._closed = False  # the agent is stopping: no worker is started any more
        self.analysed = 0
        self.reused = 0
        self.failures = 0
        self.workers_started = 0

    def analyze(self, path: str, symbols: tuple[str, ...] = WRAPPERS) -> dict[str, Plan]:
        """``tuned.analyze(path)``, by the worker; every wrapper ``Unrecognised``
        (so: entry probes) if it fails.  ``path`` may be ``/proc/self/fd/N``:
        the worker is given that descriptor."""
        key = content_key(path, symbols)
        with self._lock:
            if self._closed:
                return failed(symbols, "the agent is stopping")
            if key is not None and key in self._cache:
                self.reused += 1
                plans = self._cache[key] = self._cache.pop(key)
                return plans
            try:
                plans = self._ask(path, symbols)
            except (OSError, ValueError) as exc:
                self.failures += 1
                self._let_go(kill=True)
                return failed(symbols, "the agent is stopping" if self._closed else str(exc))
            self.analysed += 1
            if key is not None and self._cached_files:
                if len(self._cache) >= self._cached_files:
                    del self._cache[next(iter(self._cache))]
                self._cache[key] = plans
            return plans

    def _ask(self, path: str, symbols: tuple[str, ...]) -> dict[str, Plan]:
        held = _HELD.fullmatch(path)
        fd = int(held.group(1)) if held else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sock = self._warm()
            try:
                socket.send_fds(sock, [orjson.dumps(list(symbols))], [fd])
                if not select.select([sock], [], [], self._timeout)[0]:
                    raise ValueError("timed out")
                reply = sock.recv(MAX_REPLY_BYTES)
            except (BrokenPipeError, ConnectionResetError):
                reply = b""  # it died with the request unread: why is its exit's to say
        finally:
            if not held:
                os.close(fd)
        if not reply:
            raise ValueError(self._let_go() or "the worker closed its socket")
        self._last_used = time.monotonic()
        return plans_from_json(reply, symbols)

    def _warm(self) -> socket.socket:
        if self._sock is not None and self._worker is not None and self._worker.poll() is None:
            return self._sock
        self._reap_dead()
        self._let_go()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
        try:
            self._worker = subprocess.Popen([*self._command, str(theirs.fileno())], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                            pass_fds=(theirs.fileno(),))
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self.workers_started += 1
        return ours

    def _let_go(self, kill: bool = False) -> str:
        """Close the worker's socket, so it exits, and reap it (``kill``: at
        once, it may be busy with a file); how it ended, "" if there was none."""
        sock, worker, self._sock, self._worker = self._sock, self._worker, None, None
        if sock is not None:
            sock.close()
        if worker is None:
            return ""
        if kill:
            worker.kill()
        try:
            worker.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        assert worker.stderr is not None
        with worker.stderr:
            tail = worker.stderr.read(65536).decode(errors="replace").strip().splitlines()[-1:]
        return f"exited {worker.returncode}" + (f": {tail[0][:200]}" if tail else "")

    def tidy(self) -> None:
        """Let a worker idle for ``warm_seconds`` go, and reap one that died
        meanwhile (killed from outside, the OOM killer): else it stays a
        zombie until the next file or the idle timeout."""
        with self._lock:
            self._reap_dead()
            if self._worker is not None and time.monotonic() - self._last_used >= self._warm_seconds:
                self._let_go()

    def _reap_dead(self) -> None:
        """Reap a worker that died between files (killed from outside, the OOM
        killer), saying so: else it stays a zombie until the next file."""
        if self._worker is not None and self._worker.poll() is not None:
            log.warning("the TLS library analysis worker (pid %d) %s between files; the next file starts another",
                        self._worker.pid, self._let_go())

    def close(self) -> None:
        """At the agent's stop, which must not wait: killed (it holds nothing),
        first without the lock, which an analysis in flight holds (it fails at once).
        No worker is started after it (an attaching thread may still be at work)."""
        self._closed = True
        worker = self._worker
        if worker is not None:
            worker.kill()
        with self._lock:
            self._let_go(kill=True)


def analyze(path: str, symbols: tuple[str, ...] = WRAPPERS, timeout: float = ANALYSIS_TIMEOUT_SECONDS) -> dict[str, Plan]:
    """One file's plans from a worker started for it alone (tools and tests;
    the agent keeps an ``Analyst``)."""
    analyst = Analyst(timeout=timeout, cached_files=0)
    try:
        return analyst.analyze(path, symbols)
    finally:
        analyst.close()
