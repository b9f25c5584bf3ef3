"""Which probes the Attacher asks for, per attach mode, without a kernel.

The attach function is a recorder; the plans come from this machine's libssl
(re-analysed live) or are made up to exercise the fallbacks."""

from __future__ import annotations

import os

import pytest

from qtap_devtools.capture.attach import Attacher, tuned_sites
from qtap_devtools.capture.tuned import SitePlan, Unrecognised

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
WRAPPERS = ("SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex")
needs_libssl = pytest.mark.skipif(not os.path.exists(LIBSSL), reason="libssl3 not installed")


class Recorder:
    def __init__(self, fail_at: set[object] = frozenset()) -> None:
        self.calls: list[tuple[object, str, bool]] = []
        self.fail_at = fail_at

    def __call__(self, path: str, where: object, fn_name: str, ret: bool) -> None:
        if where in self.fail_at:
            raise Exception("Failed to attach BPF to uprobe")
        self.calls.append((where, fn_name, ret))


@needs_libssl
def test_entry_mode_attaches_at_the_symbols():
    rec = Recorder()
    att = Attacher(rec, mode="entry").consider(LIBSSL)
    assert att.mode == "entry" and att.sites == dict.fromkeys(WRAPPERS, "entry")
    assert ("SSL_write", "ssl_write_enter", False) in rec.calls
    assert ("SSL_write", "ssl_return", True) in rec.calls
    assert not any(isinstance(w, int) for w, _, _ in rec.calls)


@needs_libssl
def test_auto_mode_attaches_every_wrapper_by_address_return_first():
    rec = Recorder()
    att = Attacher(rec, mode="auto").consider(LIBSSL)
    assert att.mode == "tuned", att.sites
    symbols_attached = {w for w, _, _ in rec.calls if isinstance(w, str)}
    assert not symbols_attached & set(WRAPPERS)  # no entry probes on the data wrappers
    assert {"SSL_set_fd", "SSL_free", "SSL_ctrl"} <= symbols_attached
    by_addr = [(w, fn, ret) for w, fn, ret in rec.calls if isinstance(w, int)]
    # SSL_write: its return (the internal function's uretprobe, which SSL_write_ex
    # needs anyway) before the entry site that stashes.
    assert by_addr[0][1:] == ("ssl_site_return", True) and by_addr[1][1] == "ssl_write_site_enter_sp0"
    # One uretprobe per internal function, shared by both its wrappers; no
    # in-wrapper return site left to trap a second time per call.
    assert sum(1 for _, fn, ret in by_addr if fn == "ssl_site_return" and ret) == 2
    assert not [w for w, fn, ret in by_addr if fn == "ssl_site_return" and not ret]
    assert len(by_addr) == 6  # 4 entry sites + 2 uretprobes
    assert att.sites["SSL_write"].startswith("tuned js@") and "/uretprobe@" in att.sites["SSL_write"]


@needs_libssl
def test_a_failed_site_falls_back_to_entry_probes_for_that_wrapper_only():
    from qtap_devtools.capture.tuned import analyze

    entry_vaddr = analyze(LIBSSL)["SSL_read"].entry_vaddr
    rec = Recorder(fail_at={entry_vaddr})
    att = Attacher(rec, mode="auto").consider(LIBSSL)
    assert att.mode == "mixed" and att.error is None
    assert att.sites["SSL_read"] == "entry" and att.sites["SSL_write"].startswith("tuned js@")
    assert ("SSL_read", "ssl_read_enter", False) in rec.calls and ("SSL_read", "ssl_return", True) in rec.calls


@needs_libssl
def test_unrecognised_wrappers_keep_entry_probes():
    plans = {s: Unrecognised(s, "made up") for s in WRAPPERS}
    att = Attacher(Recorder(), mode="auto", plans=lambda path: plans).consider(LIBSSL)
    assert att.mode == "entry" and set(att.sites.values()) == {"entry"}


def plan(**kw) -> SitePlan:
    base = dict(symbol="SSL_write", entry_offset=0x16, entry_rsp_delta=-0x18, return_offset=0x25, result_reg="eax",
                count_source=("stack", 0), reason="", return_kind="uprobe", entry_vaddr=0x1016,
                return_vaddr=0x1025, symbol_vaddr=0x1000, return_rsp_delta=-0x18, entry_insn="js", return_insn="jle")
    return SitePlan(**{**base, **kw})


def test_stack_count_slot_is_taken_relative_to_rsp_at_the_entry_site():
    ret, entry = tuned_sites(plan(entry_rsp_delta=-0x8, return_rsp_delta=-0x18, count_source=("stack", 0x18)))
    assert entry.fn_name == "ssl_write_site_enter_sp8" and entry.where == 0x1016
    assert (ret.where, ret.fn_name, ret.ret) == (0x1025, "ssl_site_return", False)
    assert isinstance(tuned_sites(plan(count_source=("stack", 0x100))), str)  # no program for that slot
    assert isinstance(tuned_sites(plan(symbol="SSL_write_ex")), str)  # size_t num: no stack-slot program


def test_uretprobe_plans_pick_the_return_program_by_where_it_sits():
    on_callee = tuned_sites(plan(symbol="SSL_read_ex", count_source=("arg_ptr", "rcx"), return_kind="uretprobe",
                                 return_vaddr=0x900))
    assert [(s.fn_name, s.ret) for s in on_callee] == [("ssl_site_return", True), ("ssl_read_ex_enter", False)]
    on_wrapper = tuned_sites(plan(count_source=("result", "eax"), return_kind="uretprobe", entry_vaddr=0x1000,
                                  return_vaddr=0x1000))
    assert [(s.fn_name, s.ret) for s in on_wrapper] == [("ssl_return", True), ("ssl_write_enter", False)]
