"""What tuned analysis says about a library file, and asking a child process for it.

The analysis (``tuned.py``) disassembles a TLS library with capstone: C code
reading machine code from files a container controls, and ~5 MB of the
agent's memory for good once imported (its Python constants for seventeen
architectures), for a few milliseconds' work per file.  So the agent runs it
in a short-lived child (``python -m qtap_devtools.capture.tuned FILE``) and
reads the plans back as JSON: a file that crashes or hangs capstone costs
that child, and the file gets entry probes.  The types live here, free of
capstone, for the agent and the child both.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

WRAPPERS = ("SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex")
# Python's start-up and capstone's import are most of it (~0.3 s here).
ANALYSIS_TIMEOUT_SECONDS = 30.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
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


def analyze(path: str, symbols: tuple[str, ...] = WRAPPERS, timeout: float = ANALYSIS_TIMEOUT_SECONDS) -> dict[str, Plan]:
    """``tuned.analyze(path)``, run in a child process; every wrapper
    ``Unrecognised`` (so: entry probes) if the child fails.  ``path`` may be
    ``/proc/self/fd/N``: the child is given that descriptor."""
    held = _HELD.fullmatch(path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "qtap_devtools.capture.tuned", path, *symbols],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=env,
            pass_fds=(int(held.group(1)),) if held else (),
        )
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise ValueError(f"exited {proc.returncode}: {tail[0][:200]}")
        return plans_from_json(proc.stdout, symbols)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        why = "timed out" if isinstance(exc, subprocess.TimeoutExpired) else str(exc)
        return {s: Unrecognised(s, f"analysis failed ({why})") for s in symbols}
