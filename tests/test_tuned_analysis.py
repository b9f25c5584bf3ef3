"""Cheap uprobe sites in OpenSSL wrappers: bytes in, plans out.

The fixtures are this machine's Debian libssl3 wrappers, extracted once (see
``tests/fixtures/tuned/libssl3.json``), so the offsets asserted here stay true
after a libssl upgrade; the live tests re-run the analysis on whatever is installed.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from qtap_devtools.capture import plans
from qtap_devtools.capture.tuned import (WRAPPERS, SitePlan, Unrecognised, analyze, emulated, plan_function,
                                         share_callee_returns)

FIXTURES = Path(__file__).parent / "fixtures" / "tuned"
LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
NODE = "/usr/bin/node"


class BytesImage:
    """An Image of a few code chunks; file offset = vaddr - bias."""

    def __init__(self, chunks: dict[int, bytes], bias: int = 0):
        self.chunks, self.bias = chunks, bias

    def read(self, vaddr: int, size: int) -> bytes:
        for start, data in self.chunks.items():
            if start <= vaddr < start + len(data):
                return data[vaddr - start : vaddr - start + size]
        return b""

    def file_offset(self, vaddr: int) -> int | None:
        return vaddr - self.bias if self.read(vaddr, 1) else None


def one(hexbytes: str):
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    return next(md.disasm(bytes.fromhex(hexbytes), 0x1000))


# ---------------------------------------------------------------------------
# This machine's libssl, from the fixtures


@pytest.fixture(scope="module")
def debian_plans() -> dict[str, SitePlan | Unrecognised]:
    index = json.loads((FIXTURES / "libssl3.json").read_text())
    chunks = {c["vaddr"]: (FIXTURES / c["file"]).read_bytes() for c in index["chunks"]}
    assert all(c["vaddr"] == c["file_offset"] for c in index["chunks"])  # libssl's text: vaddr == offset
    image = BytesImage(chunks)
    return {
        c["symbol"]: plan_function(c["symbol"], image, c["vaddr"], c["size"])
        for c in index["chunks"]
        if c["symbol"]
    }


@pytest.mark.parametrize(
    "symbol, start, callee",
    [("SSL_write", 0x359C0, 0x355E0), ("SSL_read", 0x35470, 0x352D0)],
)
def test_debian_ssl_read_write_probe_js_at_entry_and_jle_after_the_internal_call(debian_plans, symbol, start, callee):
    plan = debian_plans[symbol]
    assert isinstance(plan, SitePlan), plan
    # +0x16: js (num < 0 check) after sub $0x18,%rsp; args still in rdi/rsi/rdx.
    assert plan.entry_offset == start + 0x16
    assert plan.entry_rsp_delta == -0x18
    # +0x25: jle after `call internal; test %eax,%eax`; written/readbytes at (%rsp).
    assert plan.return_kind == "uprobe"
    assert plan.return_offset == start + 0x25
    assert plan.result_reg == "eax"
    assert plan.count_source == ("stack", 0)
    assert f"call {callee:#x}" in plan.reason


@pytest.mark.parametrize(
    "symbol, start, callee, first",
    [("SSL_write_ex", 0x35A50, 0x355E0, "push r14"), ("SSL_read_ex", 0x35500, 0x352D0, "push r13")],
)
def test_debian_ex_wrappers_probe_the_call_and_the_callees_return(debian_plans, symbol, start, callee, first):
    plan = debian_plans[symbol]
    assert isinstance(plan, SitePlan), plan
    # `sub $8,%rsp; call internal; xor %edx,%edx; test; cmovs %edx,%eax`: the call
    # is the only emulated instruction, and eax dies before the next one.
    assert plan.entry_offset == start + 4
    assert plan.entry_rsp_delta == -8
    assert plan.return_kind == "uretprobe"
    assert plan.return_offset == callee
    assert plan.count_source == ("arg_ptr", "rcx")
    assert "cmovs" in plan.reason and first in plan.reason


@pytest.mark.parametrize("symbol, callee", [("SSL_write", 0x355E0), ("SSL_read", 0x352D0)])
def test_debian_wrappers_share_the_callee_return_their_ex_twin_hooks(debian_plans, symbol, callee):
    own = debian_plans[symbol]
    shared = share_callee_returns(debian_plans)[symbol]
    assert isinstance(own, SitePlan) and isinstance(shared, SitePlan)
    assert own.callee_vaddr == callee
    # The _ex twin's uretprobe on the internal function sees the same stack count:
    # the jle is left unprobed, everything the entry program stashes is unchanged.
    assert (shared.return_kind, shared.return_vaddr, shared.return_offset) == ("uretprobe", callee, callee)
    assert shared.return_on_callee
    assert (shared.entry_vaddr, shared.count_source, shared.count_slot) == (own.entry_vaddr, ("stack", 0), 0)
    assert "one trap fewer" in shared.reason
    assert shared.describe() == f"js@{own.entry_vaddr:#x}/uretprobe@{callee:#x}"


def test_a_wrapper_keeps_its_own_return_site_without_a_callee_uretprobe(debian_plans):
    alone = {s: debian_plans[s] for s in ("SSL_write", "SSL_read")}
    assert share_callee_returns(alone) == alone
    # An _ex twin that hooks another function shares nothing.
    other = replace(debian_plans["SSL_read_ex"], return_vaddr=0x1234)
    assert share_callee_returns({"SSL_read": debian_plans["SSL_read"], "SSL_read_ex": other})["SSL_read"] \
        == debian_plans["SSL_read"]


def test_only_a_count_in_memory_is_shared():
    # Where the wrapper's count is eax at its return site, the callee's eax would
    # be a success flag: that plan keeps its own site.
    code = debian_like()
    own = plan_of(code)
    assert isinstance(own, SitePlan)
    result_plan = replace(own, count_source=("result", "eax"))
    twin = replace(own, symbol="SSL_write_ex", return_kind="uretprobe", return_vaddr=CALLEE,
                   count_source=("arg_ptr", "rcx"))
    assert twin.return_on_callee
    assert share_callee_returns({"SSL_write": own, "SSL_write_ex": twin})["SSL_write"].return_vaddr == CALLEE
    assert share_callee_returns({"SSL_write": result_plan, "SSL_write_ex": twin})["SSL_write"] == result_plan


def test_installed_libssl_has_a_plan_for_every_wrapper():
    if not os.path.exists(LIBSSL):
        pytest.skip(f"{LIBSSL} not installed")
    plans = analyze(LIBSSL)
    assert set(plans) == set(WRAPPERS)
    for symbol, plan in plans.items():
        assert isinstance(plan, SitePlan), plan
        with open(LIBSSL, "rb") as f:
            f.seek(plan.entry_offset)
            assert emulated(one(f.read(16).hex())), symbol
            f.seek(plan.return_offset)
            assert emulated(one(f.read(16).hex())), symbol


def test_node_analysis_does_not_raise():
    if not os.path.exists(NODE):
        pytest.skip(f"{NODE} not installed")
    plans = analyze(NODE)
    assert set(plans) == set(WRAPPERS)
    # node 20 inlines ssl_*_internal and starts each wrapper with `push %rbp`:
    # the plain symbol probe is already the cheap kind.
    for plan in plans.values():
        if isinstance(plan, SitePlan):
            assert plan.return_kind == "uretprobe" and plan.entry_rsp_delta == 0


# ---------------------------------------------------------------------------
# The kernel's rule, instruction by instruction


@pytest.mark.parametrize(
    "hexbytes, expected",
    [
        ("4883ec18", False),  # sub $0x18,%rsp: single-stepped, the whole reason for this module
        ("55", True),  # push %rbp
        ("4156", True),  # push %r14 (REX 0x41 is the one prefix push emulation takes)
        ("4855", False),  # rex.W push %rbp: length 2 but not REX 0x41
        ("90", True),  # nop
        ("6690", False),  # xchg %ax,%ax: 0x66 prefix is refused
        ("0f1f00", False),  # nopl: not in branch_setup_xol_ops on the kernels we count on
        ("782f", True),  # js rel8
        ("0f88a0000000", True),  # js rel32
        ("7e03", True),  # jle rel8
        ("eb10", True),  # jmp rel8
        ("e9a0000000", True),  # jmp rel32
        ("e8fdfbffff", True),  # call rel32
        ("ffd0", False),  # call *%rax
        ("c3", False),  # ret
        ("4889e1", False),  # mov %rsp,%rcx
    ],
)
def test_emulated_follows_the_kernel(hexbytes, expected):
    assert emulated(one(hexbytes)) is expected


# ---------------------------------------------------------------------------
# Synthetic wrappers: the conservative rules

BASE = 0x10000
CALLEE = 0x20000


def asm(*parts) -> bytes:
    """Concatenate hex strings, resolving ("jcc8"/"jmp8", opcode, label) and ("call", target)."""
    labels, pos, sized = {}, 0, []
    for p in parts:
        if isinstance(p, str) and p.startswith(":"):
            labels[p] = pos
            continue
        n = 5 if isinstance(p, tuple) and p[0] == "call" else 2 if isinstance(p, tuple) else len(bytes.fromhex(p))
        sized.append((pos, p))
        pos += n
    out = b""
    for at, p in sized:
        if isinstance(p, tuple) and p[0] == "call":
            out += b"\xe8" + struct.pack("<i", p[1] - (BASE + at + 5))
        elif isinstance(p, tuple):
            out += bytes((p[1],)) + struct.pack("<b", labels[p[2]] - (at + 2))
        else:
            out += bytes.fromhex(p)
    return out


def plan_of(code: bytes, symbol: str = "SSL_write", callee: bytes = b"\x41\x56\x55\xc3") -> SitePlan | Unrecognised:
    return plan_function(symbol, BytesImage({BASE: code, CALLEE: callee}, bias=0x1000), BASE, len(code))


SUB18 = "4883ec18"
ADD18 = "4883c418"
TEST_EDX = "85d2"
MOV_RCX_RSP = "4889e1"
LEA_RCX_RSP8 = "488d4c2408"
MOVSXD_RDX = "4863d2"
TEST_EAX = "85c0"
MOV_EAX_SLOT = "8b0424"
RET = "c3"
MOV_EAX_M1 = "b8ffffffff"


def debian_like(count_setup: str = MOV_RCX_RSP, *, before: str = "") -> bytes:
    return asm(
        SUB18, *([before] if before else []), TEST_EDX, ("jcc8", 0x78, ":err"),
        count_setup, MOVSXD_RDX, ("call", CALLEE), TEST_EAX, ("jcc8", 0x7E, ":out"), MOV_EAX_SLOT,
        ":out", ADD18, RET,
        ":err", MOV_EAX_M1, ("jmp8", 0xEB, ":out"),
    )


def test_debian_shape_is_recognised_with_offsets_from_its_bytes():
    plan = plan_of(debian_like())
    assert isinstance(plan, SitePlan), plan
    assert (plan.entry_offset, plan.entry_rsp_delta) == (BASE - 0x1000 + 6, -0x18)
    assert plan.entry_vaddr == BASE + 6
    assert (plan.return_kind, plan.return_offset, plan.count_source) == ("uprobe", BASE - 0x1000 + 21, ("stack", 0))


def test_count_slot_follows_the_lea_displacement():
    plan = plan_of(debian_like(LEA_RCX_RSP8))
    assert isinstance(plan, SitePlan), plan
    assert plan.count_source == ("stack", 8)


def test_count_slot_is_relative_to_rsp_at_the_return_site():
    # push %rbx after the lea moves rsp by -8: the slot is 8 higher from there.
    plan = plan_of(debian_like("488d0c24" + "53"))  # lea (%rsp),%rcx; push %rbx
    assert isinstance(plan, SitePlan), plan
    assert plan.count_source == ("stack", 8)


def test_rdi_overwritten_before_the_first_emulated_instruction_is_unrecognised():
    plan = plan_of(debian_like(before="488b7f08"))  # mov 0x8(%rdi),%rdi
    assert isinstance(plan, Unrecognised)
    assert plan.reason.startswith("entry:")


def test_a_site_after_a_branch_is_not_an_entry_site():
    # The js is not a site (rsi is gone), and the call after it is past a branch.
    plan = plan_of(debian_like(before="31f6"))  # xor %esi,%esi
    assert isinstance(plan, Unrecognised)


def test_function_without_a_recognisable_call_is_unrecognised():
    code = asm(SUB18, TEST_EDX, ("jcc8", 0x78, ":err"), "b801000000", ADD18, RET, ":err", MOV_EAX_M1, ADD18, RET)
    plan = plan_of(code)
    assert isinstance(plan, Unrecognised)
    assert "no direct call" in plan.reason


def test_call_with_other_arguments_is_not_the_data_call():
    # xor %esi,%esi before the call: the callee does not get buf.
    code = asm(SUB18, TEST_EDX, ("jcc8", 0x78, ":err"), "31f6", MOV_RCX_RSP, ("call", CALLEE),
               TEST_EAX, ("jcc8", 0x7E, ":err"), ":err", ADD18, RET)
    assert isinstance(plan_of(code), Unrecognised)


def test_a_branch_into_the_prefix_is_unrecognised():
    code = asm(SUB18, ":top", TEST_EDX, ("jcc8", 0x78, ":err"), MOV_RCX_RSP, ("call", CALLEE), TEST_EAX,
               ("jcc8", 0x7E, ":out"), MOV_EAX_SLOT, ":out", ADD18, RET, ":err", ("jmp8", 0xEB, ":top"))
    plan = plan_of(code)
    assert isinstance(plan, Unrecognised)
    assert "branch lands" in plan.reason


def test_eax_overwritten_before_an_emulated_instruction_falls_back_to_the_callee_return():
    code = asm(SUB18, TEST_EDX, ("jcc8", 0x78, ":err"), MOV_RCX_RSP, ("call", CALLEE), MOV_EAX_SLOT,
               ("jcc8", 0x7E, ":err"), ":err", ADD18, RET)
    plan = plan_of(code)
    assert isinstance(plan, SitePlan), plan
    assert (plan.return_kind, plan.return_vaddr, plan.count_source) == ("uretprobe", CALLEE, ("stack", 0))
    # ...unless the callee itself starts with a single-stepped instruction.
    assert isinstance(plan_of(code, callee=bytes.fromhex(SUB18) + b"\xc3"), Unrecognised)


def test_ex_wrapper_with_push_entry_and_no_call_uses_its_own_uretprobe():
    code = asm("55", "4889e5", "8b07", "5d", RET)  # push rbp; mov rsp,rbp; mov (rdi),eax; pop rbp; ret
    plan = plan_of(code, "SSL_write_ex")
    assert isinstance(plan, SitePlan), plan
    assert (plan.entry_offset, plan.entry_rsp_delta) == (BASE - 0x1000, 0)
    assert (plan.return_kind, plan.return_vaddr, plan.count_source) == ("uretprobe", BASE, ("arg_ptr", "rcx"))


def test_ex_wrapper_needs_rcx_untouched_at_entry():
    code = asm("4883ec08", "31c9", ("call", CALLEE), "4883c408", RET)  # xor %ecx,%ecx before the call
    assert isinstance(plan_of(code, "SSL_write_ex"), Unrecognised)


def test_untrackable_rsp_is_unrecognised():
    code = asm("4883e4f0", ("call", CALLEE), RET)  # and $-16,%rsp
    plan = plan_of(code)
    assert isinstance(plan, Unrecognised)
    assert "rsp" in plan.reason


@pytest.mark.parametrize(
    "code",
    [b"", b"\xff" * 64, b"\x0f\x0b" * 8, bytes(range(256)), b"\xe8", b"\x78", bytes.fromhex(SUB18)[:3]],
)
def test_garbage_bytes_are_unrecognised(code):
    plan = plan_function("SSL_write", BytesImage({BASE: code} if code else {}), BASE, len(code))
    assert isinstance(plan, Unrecognised)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x7fELF", b"\x7fELF\x02\x01" + b"\xff" * 200, b"MZ" + b"\0" * 100, os.urandom(4096)],
)
def test_odd_files_are_unrecognised(tmp_path, content):
    path = tmp_path / "lib.so"
    path.write_bytes(content)
    plans = analyze(str(path))
    assert set(plans) == set(WRAPPERS)
    assert all(isinstance(p, Unrecognised) for p in plans.values())


def test_truncated_libssl_is_unrecognised(tmp_path):
    if not os.path.exists(LIBSSL):
        pytest.skip(f"{LIBSSL} not installed")
    data = Path(LIBSSL).read_bytes()
    for cut in (64, 4096, 0x35A00, len(data) - 100):
        path = tmp_path / f"cut{cut}.so"
        path.write_bytes(data[:cut])
        plans = analyze(str(path))  # must not raise
        assert set(plans) == set(WRAPPERS)


def test_missing_file_is_unrecognised(tmp_path):
    plans = analyze(str(tmp_path / "nope.so"))
    assert all(isinstance(p, Unrecognised) and "cannot read" in p.reason for p in plans.values())


# ---------------------------------------------------------------------------
# The agent's side: the analysis in a child process (plans.py)


def test_the_child_gives_the_agent_the_plans_the_analysis_makes_here():
    if not os.path.exists(LIBSSL):
        pytest.skip(f"{LIBSSL} not installed")
    here = analyze(LIBSSL)
    assert any(isinstance(p, SitePlan) for p in here.values())
    assert plans.analyze(LIBSSL) == here
    fd = os.open(LIBSSL, os.O_RDONLY | os.O_CLOEXEC)  # how the attacher holds a file it considers
    try:
        assert plans.analyze(f"/proc/self/fd/{fd}") == here
    finally:
        os.close(fd)
    assert plans.analyze(LIBSSL, ("SSL_write",)) == analyze(LIBSSL, ("SSL_write",))  # its own return site


def test_a_child_that_fails_or_hangs_leaves_every_wrapper_to_entry_probes(monkeypatch):
    got = plans.analyze(LIBSSL, timeout=0.001)
    assert set(got) == set(WRAPPERS) and all(isinstance(p, Unrecognised) for p in got.values())
    assert "timed out" in got["SSL_write"].reason
    monkeypatch.setattr(plans.sys, "executable", "/bin/false")  # a child that dies (a capstone crash)
    got = plans.analyze(LIBSSL)
    assert all(isinstance(p, Unrecognised) and "exited 1" in p.reason for p in got.values()), got


# ---------------------------------------------------------------------------
# The agent's warm worker and its plans by file content (plans.Analyst)


def copies(tmp_path: Path) -> tuple[str, str, str]:
    """Two byte-identical copies of this machine's libssl, and one that differs
    by a byte past its end (the same code: a rebuild a layer might carry)."""
    if not os.path.exists(LIBSSL):
        pytest.skip(f"{LIBSSL} not installed")
    same, other, changed = tmp_path / "a.so", tmp_path / "b.so", tmp_path / "c.so"
    data = Path(LIBSSL).read_bytes()
    same.write_bytes(data)
    other.write_bytes(data)
    changed.write_bytes(data + b"\0")
    return str(same), str(other), str(changed)


def gone(pid: int) -> bool:
    """Exited and reaped, or at least exited (a zombie its reaper has yet to take)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def analysts():
    """``plans.Analyst(**kw)``, each closed (its worker killed) after the test."""
    made: list[plans.Analyst] = []

    def make(**kw) -> plans.Analyst:
        made.append(plans.Analyst(**kw))
        return made[-1]

    yield make
    for analyst in made:
        analyst.close()


def test_one_warm_worker_analyses_file_after_file_and_bytes_seen_before_are_not_analysed_again(tmp_path, analysts):
    same, other, changed = copies(tmp_path)
    here = analyze(LIBSSL)
    analyst = analysts()
    assert analyst.analyze(same) == here
    fd = os.open(other, os.O_RDONLY | os.O_CLOEXEC)  # how the attacher holds a file
    try:
        assert analyst.analyze(f"/proc/self/fd/{fd}") == here  # another file, the same bytes
    finally:
        os.close(fd)
    assert (analyst.analysed, analyst.reused) == (1, 1)
    assert analyst.analyze(changed) == here  # other bytes: analysed, by the same worker
    assert analyst.analyze(same, ("SSL_write",)) == analyze(LIBSSL, ("SSL_write",))  # other wrappers asked
    assert (analyst.analysed, analyst.reused, analyst.failures, analyst.workers_started) == (3, 1, 0, 1)


def test_plans_kept_by_content_are_bounded_the_least_recently_used_going_first(tmp_path, analysts):
    same, _, changed = copies(tmp_path)
    analyst = analysts(cached_files=1)
    analyst.analyze(same)
    analyst.analyze(changed)  # takes the one place
    analyst.analyze(same)
    assert (analyst.analysed, analyst.reused) == (3, 0)
    analyst.analyze(same)
    assert (analyst.analysed, analyst.reused) == (3, 1)


def test_an_idle_worker_is_let_go_at_a_sweep_and_another_started_when_a_file_comes(tmp_path, analysts):
    same, _, changed = copies(tmp_path)
    analyst = analysts(warm_seconds=3600)
    analyst.analyze(same)
    worker = analyst._worker
    analyst.tidy()
    assert analyst._worker is worker and worker.poll() is None  # not idle long enough
    analyst._warm_seconds = 0
    analyst.tidy()
    assert analyst._worker is None and worker.returncode == 0  # it exited on its own at the close, reaped
    assert isinstance(analyst.analyze(changed)["SSL_read"], SitePlan)
    assert analyst.workers_started == 2 and analyst.failures == 0


def test_a_worker_killed_from_outside_is_replaced_and_one_that_hangs_is_killed(tmp_path, analysts):
    same, _, changed = copies(tmp_path)
    analyst = analysts()
    analyst.analyze(same)
    worker = analyst._worker
    os.kill(worker.pid, 9)
    while not gone(worker.pid):
        time.sleep(0.01)
    assert isinstance(analyst.analyze(changed)["SSL_read"], SitePlan)
    assert analyst.workers_started == 2 and analyst.failures == 0
    hangs = analysts(timeout=0.2, command=[sys.executable, "-c", "import time; time.sleep(60)"])
    got = hangs.analyze(same)
    assert all(isinstance(p, Unrecognised) and "timed out" in p.reason for p in got.values()), got
    assert hangs._worker is None and hangs.failures == 1 and hangs.analysed == 0


def test_a_worker_that_died_is_reaped_at_the_next_sweep_not_left_a_zombie(tmp_path, analysts, caplog):
    same, _, _ = copies(tmp_path)
    analyst = analysts(warm_seconds=3600)
    analyst.analyze(same)
    worker = analyst._worker
    os.kill(worker.pid, 9)  # the OOM killer, say
    while not gone(worker.pid):
        time.sleep(0.01)
    analyst.tidy()  # far from idle: but a dead worker is reaped (else: a zombie for up to warm_seconds)
    assert analyst._worker is None and worker.returncode == -9
    assert not os.path.exists(f"/proc/{worker.pid}")
    assert f"analysis worker (pid {worker.pid}) exited -9 between files" in caplog.text


def test_a_failed_analysis_is_not_remembered(tmp_path, analysts):
    same, _, _ = copies(tmp_path)
    analyst = analysts(command=["/bin/false"])  # a worker that dies at once (a capstone crash)
    first = analyst.analyze(same)
    assert all("exited 1" in p.reason for p in first.values()), first
    analyst._command = [sys.executable, "-m", "qtap_devtools.capture.tuned", "--serve"]  # a sound worker
    assert isinstance(analyst.analyze(same)["SSL_read"], SitePlan)
    assert (analyst.failures, analyst.analysed, analyst.reused) == (1, 1, 0)


def test_the_worker_leaves_ctrl_c_to_the_agent_and_exits_with_it(tmp_path, analysts):
    same, _, changed = copies(tmp_path)
    analyst = analysts()
    analyst.analyze(same)
    os.kill(analyst._worker.pid, 2)  # a terminal's Ctrl-C reaches the agent's whole process group
    assert isinstance(analyst.analyze(changed)["SSL_read"], SitePlan)
    assert analyst.workers_started == 1 and analyst.failures == 0
    # An agent that dies without closing it (kill -9): the worker sees its
    # socket's end and exits.
    script = ("import os, sys; from qtap_devtools.capture import plans; a = plans.Analyst(); "
              f"a.analyze({same!r}); print(a._worker.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout)
    deadline = time.monotonic() + 30
    while not gone(pid):
        assert time.monotonic() < deadline, f"the worker {pid} outlived its agent"
        time.sleep(0.05)


@pytest.mark.parametrize("text", [b"", b"[]", b'{"SSL_write": 1}', b'{"SSL_write": {"plan": "site", "symbol": "SSL_write"}}',
                                  b'{"SSL_write": {"plan": "other"}}'])
def test_plans_read_back_from_a_child_are_checked(text):
    with pytest.raises(ValueError):
        plans.plans_from_json(text, ("SSL_write",))


def test_plans_survive_the_trip_through_json(debian_plans):
    assert plans.plans_from_json(plans.plans_json(debian_plans), tuple(debian_plans)) == debian_plans


def test_the_agent_does_not_load_capstone():
    code = "import sys, qtap_devtools.agent, qtap_devtools.cli; print(sorted(m for m in sys.modules if 'capstone' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


def test_closing_does_not_wait_for_an_analysis_in_flight(tmp_path):
    """The agent's stop closes the analyst while its attach thread may be
    waiting on a worker that hangs on a hostile file: that analysis fails at once."""
    import threading

    same, _, _ = copies(tmp_path)
    hangs = plans.Analyst(timeout=600, command=[sys.executable, "-c", "import time; time.sleep(600)"])
    got: list = []
    asking = threading.Thread(target=lambda: got.append(hangs.analyze(same)))
    asking.start()
    while hangs._worker is None:
        time.sleep(0.01)
    hangs.close()
    asking.join(timeout=60)
    assert not asking.is_alive(), "the analysis in flight still waits on its killed worker"
    assert all(isinstance(p, Unrecognised) for p in got[0].values()) and hangs.failures == 1


def test_no_worker_is_started_once_closed(tmp_path):
    """An attaching thread still at work after the agent's stop closed the
    analyst gets entry probes, and no new worker (it would outlive the stop)."""
    same, _, _ = copies(tmp_path)
    analyst = plans.Analyst()
    analyst.close()
    got = analyst.analyze(same)
    assert all(isinstance(p, Unrecognised) and "stopping" in p.reason for p in got.values()), got
    assert analyst._worker is None and analyst.workers_started == 0
