"""Cheap uprobe sites inside OpenSSL's SSL_read/SSL_write wrappers.

A uprobe costs ~0.5 µs when the kernel can *emulate* the probed instruction and
~11.6 µs when it must single-step it out of line (measured here, DESIGN §7).
Debian's OpenSSL 3 wrappers start with ``sub $0x18,%rsp``, which is single-stepped,
so the obvious probe at the symbol is the slow kind.  A few instructions later
the arguments are still in their registers and the kernel meets an instruction it
emulates (a ``js``, a ``call``); after the call to ``ssl_{read,write}_internal`` a
``jle`` sees the result in ``eax`` and the byte count in a stack slot.

``analyze(path)`` finds those sites from the decoded instructions' register
writes (capstone ``regs_access()``), never from a table of offsets, and returns
one typed plan per wrapper, or ``Unrecognised`` with the reason (the caller then
falls back to an entry uprobe plus a uretprobe).  Bad ELF input is a value, never
an exception.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
from dataclasses import replace
from typing import Literal, Protocol

from capstone import CS_AC_WRITE, CS_ARCH_X86, CS_GRP_CALL, CS_GRP_INT, CS_GRP_IRET, CS_GRP_JUMP
from capstone import CS_GRP_RET, CS_MODE_64, Cs, CsError, CsInsn
from capstone import x86 as X

from .plans import WRAPPERS, CountSource, Plan, SitePlan, Unrecognised, plans_json, request_symbols

# A wrapper is a few dozen bytes; node's inlined ones are ~0x200.  Anything far
# larger is not the shape we recognise, and bounds the work on hostile input.
MAX_FUNCTION_BYTES = 16 * 1024
MAX_INSNS = 4096

class Image(Protocol):
    """Bytes of a loaded image by virtual address, and where they live in the file."""

    def read(self, vaddr: int, size: int) -> bytes: ...

    def file_offset(self, vaddr: int) -> int | None: ...


# ---------------------------------------------------------------------------
# The kernel's rule


_LEGACY_PREFIXES = frozenset((0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67))
_JCC8 = range(0x70, 0x80)
_JCC32 = range(0x80, 0x90)


def emulated(insn: CsInsn) -> bool:
    """True when an x86-64 uprobe on ``insn`` is emulated instead of single-stepped.

    Mirrors arch/x86/kernel/uprobes.c, ``arch_uprobe_analyze_insn()``:
      * ``branch_setup_xol_ops()``: ``jmp rel8`` (eb), ``jmp rel32`` (e9),
        ``call rel32`` (e8), ``jcc rel8`` (70-7f), ``jcc rel32`` (0f 80-8f) and
        ``nop`` (90) are emulated by ``branch_emulate_op()``; any of them with a
        0x66 prefix is refused outright (-ENOTSUPP: the probe does not attach).
      * ``push_setup_xol_ops()``: ``push reg`` (50-57), one byte, or two bytes
        when the prefix is exactly REX 0x41 (push r8-r15).
    Everything else (``sub $imm,%rsp``, ``mov``, ``ret``, ``nopl``…) goes through
    ``default_xol_ops``: single-stepped, ~20x the cost here.  Newer kernels also
    emulate ``0f 1f`` nops (``insn_is_nop()``); we do not count on it, so a
    ``nopl`` is conservatively "not emulated".
    """
    b = bytes(insn.bytes)
    i = 0
    legacy = []
    while i < len(b) and b[i] in _LEGACY_PREFIXES:
        legacy.append(b[i])
        i += 1
    rex = None
    if i < len(b) and 0x40 <= b[i] <= 0x4F:
        rex = b[i]
        i += 1
    if i >= len(b):
        return False
    op = b[i]
    if 0x50 <= op <= 0x57:
        return b == bytes((op,)) or b == bytes((0x41, op))
    if 0x66 in legacy:
        return False
    if op in (0xEB, 0xE9, 0xE8) or op in _JCC8:
        return True
    if op == 0x0F:
        return i + 1 < len(b) and b[i + 1] in _JCC32
    # The kernel takes any "prefix* + 90" as nop; with REX.B it is xchg, so be stricter.
    return op == 0x90 and rex is None


# ---------------------------------------------------------------------------
# Register bookkeeping

_FAMILY = {}
for _full, _names in {
    "rax": ("rax", "eax", "ax", "al", "ah"),
    "rbx": ("rbx", "ebx", "bx", "bl", "bh"),
    "rcx": ("rcx", "ecx", "cx", "cl", "ch"),
    "rdx": ("rdx", "edx", "dx", "dl", "dh"),
    "rsi": ("rsi", "esi", "si", "sil"),
    "rdi": ("rdi", "edi", "di", "dil"),
    "rbp": ("rbp", "ebp", "bp", "bpl"),
    "rsp": ("rsp", "esp", "sp", "spl"),
}.items():
    for _n in _names:
        _FAMILY[_n] = _full
for _k in range(8, 16):
    for _suffix in ("", "d", "w", "b"):
        _FAMILY[f"r{_k}{_suffix}"] = f"r{_k}"

# System V: a call may clobber these (and returns in rax).
_CALLER_SAVED = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")


def _family(insn: CsInsn, reg: int) -> str | None:
    return _FAMILY.get(insn.reg_name(reg))


def _written(insn: CsInsn) -> set[str]:
    _, writes = insn.regs_access()
    return {f for f in (_family(insn, r) for r in writes) if f}


def _writes_memory(insn: CsInsn) -> bool:
    return any(op.type == X.X86_OP_MEM and op.access & CS_AC_WRITE for op in insn.operands)


def _is_branch(insn: CsInsn) -> bool:
    return any(insn.group(g) for g in (CS_GRP_JUMP, CS_GRP_CALL, CS_GRP_RET, CS_GRP_INT, CS_GRP_IRET))


def _direct_target(insn: CsInsn) -> int | None:
    if (insn.group(CS_GRP_JUMP) or insn.group(CS_GRP_CALL)) and len(insn.operands) == 1:
        op = insn.operands[0]
        if op.type == X.X86_OP_IMM:
            return op.imm
    return None


def _rsp_change(insn: CsInsn) -> int | None:
    """How ``insn`` moves rsp, when that is a constant we can follow; else None."""
    ops = insn.operands
    if insn.id == X.X86_INS_PUSH:
        return -8
    if insn.id == X.X86_INS_POP:
        return None if ops and ops[0].type == X.X86_OP_REG and _family(insn, ops[0].reg) == "rsp" else 8
    if insn.id in (X.X86_INS_SUB, X.X86_INS_ADD) and len(ops) == 2 and ops[1].type == X.X86_OP_IMM:
        if ops[0].type == X.X86_OP_REG and insn.reg_name(ops[0].reg) == "rsp":
            return -ops[1].imm if insn.id == X.X86_INS_SUB else ops[1].imm
    return None


# Values tracked along the straight-line path: an original argument, or rsp+k
# with k relative to rsp at the function's first instruction.
_Tag = str | tuple[str, int]


def _propagate(insn: CsInsn, tags: dict[str, _Tag], rsp: int) -> None:
    """Update register tags for ``insn`` (rsp moves are the caller's business)."""
    ops = insn.operands
    new: _Tag | None = None
    dest = None
    if len(ops) == 2 and ops[0].type == X.X86_OP_REG:
        dest = _family(insn, ops[0].reg)
        src = ops[1]
        if insn.id == X.X86_INS_MOV and src.type == X.X86_OP_REG and ops[0].size == 8:
            s = _family(insn, src.reg)
            new = ("sp", rsp) if s == "rsp" else tags.get(s or "")
        elif insn.id == X.X86_INS_MOVSXD and src.type == X.X86_OP_REG:
            # int num -> size_t, exactly what the C wrapper does with its argument
            new = tags.get(_family(insn, src.reg) or "")
        elif insn.id == X.X86_INS_LEA and src.type == X.X86_OP_MEM:
            m = src.mem
            if m.index == 0 and m.segment == 0 and _family(insn, m.base) == "rsp":
                new = ("sp", rsp + m.disp)
    for f in _written(insn):
        tags.pop(f, None)
    if dest is not None and new is not None:
        tags[dest] = new


# ---------------------------------------------------------------------------
# The analysis


def _decode(code: bytes, vaddr: int) -> list[CsInsn] | str:
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    insns: list[CsInsn] = []
    end = vaddr
    try:
        for insn in md.disasm(code, vaddr):
            insns.append(insn)
            end = insn.address + insn.size
            if len(insns) >= MAX_INSNS:
                return f"more than {MAX_INSNS} instructions"
    except CsError as exc:
        return f"capstone: {exc}"
    if end != vaddr + len(code):
        return f"undecodable bytes at +{end - vaddr:#x}, so jumps into the prefix cannot be ruled out"
    return insns


def plan_function(symbol: str, image: Image, vaddr: int, size: int) -> Plan:
    """Plan for one wrapper whose code is ``size`` bytes at ``vaddr`` in ``image``."""
    if size <= 0 or size > MAX_FUNCTION_BYTES:
        return Unrecognised(symbol, f"symbol size {size} is not a wrapper's")
    code = image.read(vaddr, size)
    if len(code) != size:
        return Unrecognised(symbol, "symbol bytes are not all in the file")
    insns = _decode(code, vaddr)
    if isinstance(insns, str):
        return Unrecognised(symbol, insns)

    is_ex = symbol.endswith("_ex")
    args = ("rdi", "rsi", "rdx", "rcx") if is_ex else ("rdi", "rsi", "rdx")
    targets = {t for t in map(_direct_target, insns) if t is not None and vaddr <= t < vaddr + size}

    def off(addr: int) -> str:
        return f"+{addr - vaddr:#x}"

    # Walk the fall-through path.  No branch may land anywhere on it (checked per
    # instruction), so every execution reaching a site came the same way.
    tags: dict[str, _Tag] = {"rdi": "ssl", "rsi": "buf", "rdx": "num"}
    if is_ex:
        tags["rcx"] = "count_ptr"
    touched: set[str] = set()
    rsp = 0
    entry: tuple[CsInsn, int] | None = None
    entry_why = "no emulated instruction before the arguments are overwritten or the first branch"
    call: CsInsn | None = None
    call_rsp = 0
    count: CountSource | None = None
    passed_branch = False  # the entry site must be in the straight-line prefix
    path_why = "no direct call receives the original buf/num"
    for insn in insns:
        if insn.address in targets:
            path_why = f"a branch lands at {off(insn.address)}, on the path to the internal call"
            if entry is None:
                return Unrecognised(symbol, f"entry: {path_why}")
            break
        if entry is None and emulated(insn) and not touched.intersection(args) and not passed_branch:
            entry = (insn, rsp)
        if insn.group(CS_GRP_CALL):
            target = _direct_target(insn)
            if target is not None and tags.get("rsi") == "buf" and tags.get("rdx") == "num":
                call, call_rsp = insn, rsp
                rcx = tags.get("rcx")
                if rcx == "count_ptr":
                    count = ("arg_ptr", "rcx")
                elif isinstance(rcx, tuple):
                    count = ("stack", rcx[1] - rsp)  # rsp at the return equals rsp before the call
                break
            if target is None:
                break  # indirect call: unknown callee, stop following
            for f in _CALLER_SAVED:
                tags.pop(f, None)
            touched.update(_CALLER_SAVED)
            passed_branch = True
            continue
        if _is_branch(insn):
            if not insn.group(CS_GRP_JUMP) or insn.id == X.X86_INS_JMP:
                break  # jmp, ret: the fall-through path ends before any data call
            passed_branch = True  # jcc: follow the fall-through
        delta = _rsp_change(insn)
        written = _written(insn)
        if "rsp" in written:
            if delta is None:
                entry_why = path_why = f"rsp changes untrackably at {off(insn.address)}"
                break
            rsp += delta
        _propagate(insn, tags, rsp)
        touched |= written - {"rsp"}

    if entry is None:
        return Unrecognised(symbol, f"entry: {entry_why}")
    entry_insn, entry_rsp = entry
    entry_off = image.file_offset(entry_insn.address)
    if entry_off is None:
        return Unrecognised(symbol, "entry site is not in an executable PT_LOAD")
    entry_text = (
        f"entry {entry_insn.mnemonic} {entry_insn.op_str} at {off(entry_insn.address)}: "
        f"{','.join(args)} untouched, rsp{entry_rsp:+#x}"
    )

    def plan(return_vaddr: int, kind: Literal["uprobe", "uretprobe"], source: CountSource, why: str,
             return_insn: str = "", return_rsp: int = 0, callee: int = 0) -> Plan:
        ret_off = image.file_offset(return_vaddr)
        if ret_off is None:
            return Unrecognised(symbol, "return site is not in an executable PT_LOAD")
        return SitePlan(
            symbol=symbol,
            entry_offset=entry_off,
            entry_rsp_delta=entry_rsp,
            return_offset=ret_off,
            result_reg="eax",
            count_source=source,
            reason=f"{entry_text}; {why}",
            return_kind=kind,
            entry_vaddr=entry_insn.address,
            return_vaddr=return_vaddr,
            symbol_vaddr=vaddr,
            return_rsp_delta=return_rsp,
            entry_insn=entry_insn.mnemonic,
            return_insn=return_insn,
            callee_vaddr=callee,
        )

    def wrapper_uretprobe(why: str) -> Plan:
        # The wrapper's own first instruction is emulated: entry uprobe + uretprobe
        # at the symbol are already the cheap kind.
        if not emulated(insns[0]):
            return Unrecognised(symbol, f"{entry_text}; return: {why}")
        source: CountSource = ("arg_ptr", "rcx") if is_ex else ("result", "eax")
        return plan(vaddr, "uretprobe", source, f"return: {why}; the symbol starts with an emulated "
                    f"{insns[0].mnemonic}, so a uretprobe there is cheap", insns[0].mnemonic, 0)

    if call is None:
        return wrapper_uretprobe(path_why)
    callee = _direct_target(call)
    assert callee is not None
    if count is None:
        return wrapper_uretprobe(f"the call at {off(call.address)} gets no count pointer in rcx")
    call_text = f"call {callee:#x} at {off(call.address)} gets buf,num" + (
        f", rcx=sp{count[1]:+#x}" if count[0] == "stack" else ", rcx=the caller's pointer"
    )

    # Return site: the first emulated instruction after the call, reached only
    # by the call's return, before eax, rsp or memory change.
    after = [i for i in insns if i.address >= call.address + call.size]
    why = "nothing after the call"
    for insn in after:
        if insn.address in targets:
            why = f"a branch lands at {off(insn.address)} before an emulated instruction"
            break
        if emulated(insn):
            return plan(insn.address, "uprobe", count,
                        f"{call_text}; return {insn.mnemonic} at {off(insn.address)}: eax is the result, "
                        f"rsp{call_rsp:+#x} as at the call", insn.mnemonic, call_rsp, callee)
        if "rax" in _written(insn):
            why = f"eax is overwritten by {insn.mnemonic} at {off(insn.address)} before any emulated instruction"
            break
        if "rsp" in _written(insn) or _writes_memory(insn) or _is_branch(insn):
            why = f"{insn.mnemonic} at {off(insn.address)} comes before any emulated instruction"
            break
    # No site in the wrapper: hook the return of the internal function itself if
    # its first instruction is emulated (it returns into us, count where it was).
    head = _decode_one(image, callee)
    if head is not None and emulated(head) and image.file_offset(callee) is not None:
        return plan(callee, "uretprobe", count,
                    f"{call_text}; {why}; so uretprobe on the callee, whose first instruction "
                    f"({head.mnemonic} {head.op_str}) is emulated", head.mnemonic, call_rsp, callee)
    return wrapper_uretprobe(why)


def _decode_one(image: Image, vaddr: int) -> CsInsn | None:
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    try:
        return next(md.disasm(image.read(vaddr, 16), vaddr), None)
    except CsError:
        return None


# ---------------------------------------------------------------------------
# Just enough ELF: PT_LOAD for vaddr -> file offset, .dynsym for the wrappers.

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_PT_LOAD, _PF_X, _SHT_DYNSYM, _STT_FUNC, _EM_X86_64 = 1, 1, 11, 2, 62
_MAX_TABLE = 64 << 20  # a dynsym/dynstr larger than this is not a real one


class ElfImage:
    """The executable PT_LOAD segments of one ELF file, read on demand."""

    def __init__(self, path: str, segments: list[tuple[int, int, int]]):
        self.path = path
        self.segments = segments  # (vaddr, file offset, file size), executable only

    def file_offset(self, vaddr: int) -> int | None:
        for seg_vaddr, seg_off, filesz in self.segments:
            if seg_vaddr <= vaddr < seg_vaddr + filesz:
                return vaddr - seg_vaddr + seg_off
        return None

    def read(self, vaddr: int, size: int) -> bytes:
        start = self.file_offset(vaddr)
        if start is None:
            return b""
        for seg_vaddr, seg_off, filesz in self.segments:
            if seg_vaddr <= vaddr < seg_vaddr + filesz:
                size = min(size, seg_vaddr + filesz - vaddr)
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                return f.read(size)
        except OSError:
            return b""


def read_elf(path: str, wanted: tuple[str, ...] = WRAPPERS) -> tuple[ElfImage, dict[str, tuple[int, int]]] | str:
    """``(image, {symbol: (vaddr, size)})`` for the defined functions in ``wanted``, or why not."""
    try:
        with open(path, "rb") as f:
            ehdr = f.read(_EHDR.size)
            if len(ehdr) < _EHDR.size or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
                return "not a 64-bit little-endian ELF"
            (_, _, machine, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _) = _EHDR.unpack(ehdr)
            if machine != _EM_X86_64:
                return f"not x86-64 (e_machine {machine})"
            if phentsize != _PHDR.size or not 0 < phnum <= 256 or shentsize != _SHDR.size or not 0 < shnum <= 65535:
                return "malformed program or section header table"
            f.seek(phoff)
            raw = f.read(phentsize * phnum)
            segments = []
            for k in range(len(raw) // phentsize):
                p_type, p_flags, p_offset, p_vaddr, _, p_filesz, _, _ = _PHDR.unpack_from(raw, k * phentsize)
                if p_type == _PT_LOAD and p_flags & _PF_X:
                    segments.append((p_vaddr, p_offset, p_filesz))
            f.seek(shoff)
            raw = f.read(shentsize * shnum)
            sections = [_SHDR.unpack_from(raw, k * shentsize) for k in range(len(raw) // shentsize)]
            found: dict[str, tuple[int, int]] = {}
            names = {w.encode(): w for w in wanted}
            for _, sh_type, _, _, off, size, link, _, _, entsize in sections:
                if sh_type != _SHT_DYNSYM or link >= len(sections) or entsize != _SYM.size:
                    continue
                stroff, strsize = sections[link][4], sections[link][5]
                if size > _MAX_TABLE or strsize > _MAX_TABLE:
                    return "dynamic symbol table too large"
                f.seek(stroff)
                strtab = f.read(strsize)
                f.seek(off)
                symtab = f.read(size)
                for k in range(len(symtab) // _SYM.size):
                    name_off, info, _, shndx, value, sym_size = _SYM.unpack_from(symtab, k * _SYM.size)
                    if shndx == 0 or (info & 0xF) != _STT_FUNC or name_off >= len(strtab):
                        continue
                    name = strtab[name_off : strtab.find(b"\0", name_off)]
                    if name in names:
                        found[names[name]] = (value, sym_size)
    except (OSError, struct.error, ValueError) as exc:
        return f"cannot read ELF: {exc}"
    return ElfImage(path, segments), found


def share_callee_returns(plans: dict[str, Plan]) -> dict[str, Plan]:
    """Let an in-wrapper return site give way to a callee uretprobe that is there anyway.

    When one wrapper's plan (an ``_ex``) hooks the return of the internal
    function, that uretprobe also fires whenever the other wrapper calls the
    same function, and it already completes that wrapper's call: its count is
    in memory (the stack slot), which is all the return program needs.  The
    wrapper's own return site after the call would then be a second trap per
    call that finds nothing to do (measured at rate10k: ~4 µs of added CPU per
    request, both ends traced).  So such a wrapper takes the callee uretprobe
    as its return.  Attaching it again is a no-op (``Attacher`` shares it), and
    a wrapper attached alone still gets the uretprobe it relies on.
    """
    callee_returns = {p.return_vaddr: p for p in plans.values() if isinstance(p, SitePlan) and p.return_on_callee}
    out = dict(plans)
    for symbol, p in plans.items():
        if not isinstance(p, SitePlan) or p.return_kind != "uprobe" or p.count_source[0] != "stack":
            continue
        host = callee_returns.get(p.callee_vaddr)
        if host is None:
            continue
        out[symbol] = replace(
            p, return_kind="uretprobe", return_vaddr=host.return_vaddr, return_offset=host.return_offset,
            return_insn="", reason=f"{p.reason}; {host.symbol} already hooks the return of {p.callee_vaddr:#x}, "
            f"which sees the same count, so the {p.return_insn} after the call is not probed (one trap fewer per call)",
        )
    return out


def analyze(path: str, symbols: tuple[str, ...] = WRAPPERS, share: bool = True) -> dict[str, Plan]:
    """One plan per wrapper in ``symbols``; ``Unrecognised`` says why when there is none.

    ``share=False`` keeps every wrapper's own return site (see ``share_callee_returns``).
    """
    elf = read_elf(path, symbols)
    if isinstance(elf, str):
        return {s: Unrecognised(s, elf) for s in symbols}
    image, found = elf
    plans: dict[str, Plan] = {}
    for s in symbols:
        if s not in found:
            plans[s] = Unrecognised(s, "not exported as a function")
            continue
        vaddr, size = found[s]
        try:
            plans[s] = plan_function(s, image, vaddr, size)
        except (CsError, ValueError, IndexError) as exc:  # odd bytes capstone half-decodes
            plans[s] = Unrecognised(s, f"analysis failed: {exc}")
    return share_callee_returns(plans) if share else plans


def serve(fd: int) -> int:
    """``--serve FD``: the agent's warm worker (``plans.Analyst``).  Each
    message on the SEQPACKET socket FD carries one file's descriptor and the
    wrappers wanted; the answer is that file's plans, as ``main`` prints them.
    It ends when the agent closes its end (or exits)."""
    # A terminal's Ctrl-C reaches the whole process group; stopping is the
    # agent's to decide, and it closes this socket when it does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        except OSError:
            return 0
        if not msg and not fds:
            return 0  # the agent is gone
        try:
            symbols = request_symbols(msg)
            if len(fds) != 1:
                raise ValueError(f"{len(fds)} descriptors with the request, not 1")
            plans = analyze(f"/proc/self/fd/{fds[0]}", symbols)
        finally:
            for held in fds:
                os.close(held)
        sock.sendall(plans_json(plans))


def main(argv: list[str]) -> int:
    """``python -m qtap_devtools.capture.tuned FILE [SYMBOL ...]``: the plans as JSON on stdout;
    ``--serve FD``: the agent's warm worker (``serve``)."""
    if len(argv) == 2 and argv[0] == "--serve" and argv[1].isdigit():
        return serve(int(argv[1]))
    if not argv or argv[0].startswith("-"):
        print("usage: python -m qtap_devtools.capture.tuned FILE [SYMBOL ...]", file=sys.stderr)
        return 2
    plans = analyze(argv[0], tuple(argv[1:]) or WRAPPERS)
    sys.stdout.buffer.write(plans_json(plans) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
