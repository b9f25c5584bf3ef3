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
        self.log: list[tuple] = []  # ("probe", slot) and ("arm", slot), in order
        self.labels: list[str] = []  # what each arm says its records are
        self.fail_at = fail_at

    def __call__(self, path: str, where: object, fn_name: str, ret: bool, slot: int) -> None:
        if where in self.fail_at:
            raise Exception("Failed to attach BPF to uprobe")
        self.calls.append((where, fn_name, ret))
        self.log.append(("probe", slot))

    def arm(self, slot: int, label: str = "openssl") -> None:
        self.log.append(("arm", slot))
        self.labels.append(label)


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


# --------------------------------------------------------------------------
# One attachment per real file, however many containers show it; and a bound


MOUNTINFO = (
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "613 530 0:41 / /var/lib/docker/overlay2/abc/merged rw,relatime - overlay overlay "
    "rw,lowerdir=/var/lib/docker/overlay2/l/AAA:/var/lib/docker/overlay2/l/BBB,"
    "upperdir=/var/lib/docker/overlay2/abc/diff,workdir=/var/lib/docker/overlay2/abc/work,nouserxattr\n"
    "700 530 0:53 / /run/x\\040y rw - overlay overlay rw,lowerdir+=/a\\:b,lowerdir+=/c\\,d,datadir+=/e,upperdir=/u\n"
    "701 530 0:54 / /proc rw - proc proc rw\n"
)


def test_overlay_layers_are_read_from_mountinfo_with_its_escapes():
    from qtap_devtools.capture.overlay import overlay_layers

    layers = overlay_layers(MOUNTINFO)
    assert layers == {
        os.makedev(0, 41): ["/var/lib/docker/overlay2/l/AAA", "/var/lib/docker/overlay2/l/BBB",
                            "/var/lib/docker/overlay2/abc/diff"],
        os.makedev(0, 53): ["/a:b", "/c,d", "/e", "/u"],
    }


def test_an_overlay_on_one_filesystem_names_the_real_file(tmp_path, monkeypatch):
    from qtap_devtools.capture import overlay

    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    text = (f"9 1 0:77 / /merged rw - overlay overlay rw,lowerdir={lower},upperdir={upper},workdir=/w\n"
            f"9 1 0:78 / /merged2 rw - overlay overlay rw,lowerdir={lower}:/nonexistent,upperdir={upper}\n")
    monkeypatch.setattr(overlay, "_cache", {})
    monkeypatch.setattr(overlay, "overlay_layers", lambda _text, real=overlay.overlay_layers: real(text))
    st = os.stat(tmp_path)

    def stat_of(ino: int, dev: int, size: int = 700_000, mtime_ns: int = 1_700_000_000_000_000_000):
        # (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime, 3 float times, 3 ns times)
        return os.stat_result((0o644, ino, dev, 1, 0, 0, size, 0, 0, 0, 0.0, 0.0, 0.0, 0, mtime_ns, 0))

    one = stat_of(1638426, os.makedev(0, 77))
    assert overlay.real_key("/proc/1/root/lib/libssl.so.3", one)[:2] == (st.st_dev, 1638426)
    gone = stat_of(1638426, os.makedev(0, 78))
    assert overlay.real_key("/lib/libssl.so.3", gone)[:2] == (os.makedev(0, 78), 1638426)  # a layer not found: as is
    plain = stat_of(5, st.st_dev)
    assert overlay.real_key("/lib/libssl.so.3", plain)[:2] == (st.st_dev, 5)  # not an overlay
    # An inode number reused by another file (a new image's, say) is another key.
    assert overlay.real_key("/lib/libssl.so.3", stat_of(5, st.st_dev, size=12)) != overlay.real_key(
        "/lib/libssl.so.3", plain)


@needs_libssl
def test_the_same_real_file_seen_twice_is_attached_once(monkeypatch):
    from qtap_devtools.capture import overlay

    # Two containers of one image: two paths, two overlay devices, one real file.
    monkeypatch.setattr(overlay, "real_key", lambda path, st: (1, 2))
    rec = Recorder()
    a = Attacher(rec, mode="entry")
    first = a.consider(LIBSSL)
    calls = len(rec.calls)
    assert a.consider("/proc/self/root" + LIBSSL) is first and len(rec.calls) == calls
    assert len(a.attachments) == 1


@needs_libssl
def test_attachments_are_bounded_and_what_is_left_out_is_counted(monkeypatch):
    from qtap_devtools.capture import attach, overlay

    keys = iter(range(1000))
    monkeypatch.setattr(overlay, "real_key", lambda path, st: (9, next(keys)))  # each a new file
    monkeypatch.setattr(attach, "MAX_ATTACHMENTS", 3)
    a = Attacher(Recorder(), mode="entry")
    got = [a.consider(LIBSSL) for _ in range(5)]
    assert sum(x is not None for x in got) == 3 and a.over_limit == 2 and len(a.attachments) == 3


def test_a_new_containers_library_directories_are_read_at_its_first_process(tmp_path, monkeypatch):
    from qtap_devtools.capture import attach

    seen = []
    a = Attacher(Recorder(), mode="entry")
    monkeypatch.setattr(a, "consider", lambda path: seen.append(path))
    monkeypatch.setattr(attach, "mapped_files", lambda pid: [])
    a.scan_pid(os.getpid())
    first = list(seen)
    a.scan_pid(os.getpid())  # the same root again: not read twice
    assert first and seen == first
    assert all(p.startswith(f"/proc/{os.getpid()}/root/") and "lib" in os.path.basename(p) for p in first)


@needs_libssl
def test_reading_the_attachments_never_waits_for_an_attach_in_progress():
    # The event loop reads them for every new SSE client and /stats; an
    # attach (ELF reads, analysis, bcc) takes hundreds of milliseconds.
    import threading

    started, release = threading.Event(), threading.Event()

    def slow_attach(*args):
        started.set()
        release.wait(10)

    a = Attacher(slow_attach, mode="entry")
    t = threading.Thread(target=a.consider, args=(LIBSSL,), daemon=True)
    t.start()
    try:
        assert started.wait(10)
        reader = threading.Thread(target=lambda: a.attachments, daemon=True)
        reader.start()
        reader.join(2)
        assert not reader.is_alive(), "attachments waited for the attach"
    finally:
        release.set()
        t.join(10)
    assert len(a.attachments) == 1


@needs_libssl
@pytest.mark.parametrize("mode", ["auto", "entry"])
def test_a_files_probes_are_armed_together_after_the_last_is_placed(monkeypatch, mode):
    """probes/tls_common.h: a site stashes nothing until armed[its cookie]. Each
    file gets its own slot, every probe of it carries that slot, and the arm
    comes after its last probe, a failed one included."""
    from qtap_devtools.capture import overlay

    keys = iter(range(1000))
    monkeypatch.setattr(overlay, "real_key", lambda path, st: (9, next(keys)))  # each a new file
    rec = Recorder(fail_at={"SSL_ctrl"})
    a = Attacher(rec, mode=mode, arm_fn=rec.arm)
    first, second = a.consider(LIBSSL), a.consider(LIBSSL)
    assert first is not second and first.error and "SSL_ctrl" in first.error
    probes = len(rec.log) // 2 - 1
    assert rec.log == [*[("probe", 1)] * probes, ("arm", 1), *[("probe", 2)] * probes, ("arm", 2)]


@needs_libssl
def test_probes_the_kernel_refused_are_placed_at_a_later_sweep_returns_first():
    """Another program's uprobe on SSL_write (bcc's tools register theirs so
    that the kernel refuses ours) blocks its two probes until it stops.  The
    sweep tries them again, the return before the entry (the file is armed:
    an entry alone would stash a call no return empties)."""
    rec = Recorder(fail_at={"SSL_write"})
    a = Attacher(rec, mode="entry", arm_fn=rec.arm)
    att = a.consider(LIBSSL)
    assert not att.ok and att.error == "SSL_write and SSL_write return: Failed to attach BPF to uprobe"
    assert "SSL_write" not in att.sites and att.sites["SSL_read"] == "entry"
    a.sweep([])
    assert not att.ok and a.retried == 0  # still refused: nothing placed, nothing counted
    rec.fail_at = set()
    before = len(rec.calls)
    a.sweep([])
    assert att.ok and att.error is None and a.retried == 1
    assert rec.calls[before:] == [("SSL_write", "ssl_return", True), ("SSL_write", "ssl_write_enter", False)]
    assert att.sites["SSL_write"] == "entry" and att.mode == "entry"
    a.sweep([])
    assert rec.calls[before + 2:] == [] and a.retried == 1  # placed once


@needs_libssl
def test_a_symbol_the_file_lacks_is_not_tried_again():
    """A required symbol missing is the file's, for good: no sweep asks again."""
    rec = Recorder()
    a = Attacher(rec, mode="entry")
    att = a.consider(LIBSSL)
    att.unexported.append("SSL_made_up")
    before = len(rec.calls)
    a.sweep([])
    assert att.error == "SSL_made_up not exported" and rec.calls[before:] == []


@needs_libssl
def test_a_file_no_process_maps_for_two_sweeps_is_detached_and_its_slot_reused(monkeypatch):
    """The bound is on files in use: a container's libssl is let go once its
    containers are gone (past the idle files kept, none here); the host's
    library directories stay attached."""
    from qtap_devtools.capture import overlay

    keys = iter(range(1000))
    monkeypatch.setattr(overlay, "real_key", lambda path, st: (9, next(keys)))  # each a new file
    rec = Recorder()
    detached: list[int] = []
    a = Attacher(rec, mode="entry", arm_fn=rec.arm, detach_fn=lambda slot: detached.append(slot) or True,
                 keep_idle=0)
    host, image = a.consider(LIBSSL, pinned=True), a.consider(LIBSSL)
    mapped = {1: [image]}  # pid -> what its maps name
    monkeypatch.setattr(a, "_scan", lambda pid: (mapped.get(pid, []), None))
    a.sweep([1])
    a.sweep([1])
    assert not detached  # mapped
    mapped.clear()  # its container is gone
    a.sweep([1])
    assert not detached  # one sweep: a process may just be loading it again
    a.sweep([1])
    assert detached == [image.slot] and a.detached == 1
    assert a.attachments == [host]  # the host's, mapped by nobody, stays
    again = a.consider(LIBSSL)
    assert again is not image and again.slot == image.slot  # attached again, in the slot let go


@needs_libssl
def test_probes_that_cannot_be_detached_stay_attached(monkeypatch):
    from qtap_devtools.capture import overlay

    monkeypatch.setattr(overlay, "real_key", lambda path, st: (9, 1))
    a = Attacher(Recorder(), mode="entry", detach_fn=lambda slot: False, keep_idle=0)  # through bcc: no cookie
    att = a.consider(LIBSSL)
    monkeypatch.setattr(a, "_scan", lambda pid: ([], None))
    for _ in range(5):
        a.sweep([1])
    assert a.attachments == [att] and a.detached == 0


@needs_libssl
def test_a_file_in_a_live_containers_library_directories_stays_attached_unmapped(monkeypatch):
    """A container whose process has not loaded its libssl (a `sleep`) keeps
    it attached, so a later `docker exec … curl` is seen from its first call."""
    from qtap_devtools.capture import overlay

    monkeypatch.setattr(overlay, "real_key", lambda path, st: (9, 1))
    a = Attacher(Recorder(), mode="entry", detach_fn=lambda slot: True, keep_idle=0)
    att = a.consider(LIBSSL)
    root = (1, 2, "container root")
    att.roots.add(root)  # as _scan records it when it reads a new root's library directories
    alive = {1: root}
    monkeypatch.setattr(a, "_scan", lambda pid: ([], alive.get(pid)))
    for _ in range(4):
        a.sweep([1])
    assert a.attachments == [att]
    alive.clear()  # the container is gone
    a.sweep([1])
    a.sweep([1])
    assert a.attachments == [] and a.detached == 1


@needs_libssl
def test_the_most_recently_used_idle_files_stay_attached_and_a_new_file_takes_the_oldest_ones_room(monkeypatch):
    """A cron job's vendored libssl, used a minute apart: kept attached while
    unmapped (its next run is seen from its first call), within KEEP_IDLE; a
    new file past MAX_ATTACHMENTS detaches the least recently used idle one
    rather than going uncaptured."""
    from qtap_devtools.capture import attach, overlay

    keys = iter(range(1000))
    monkeypatch.setattr(overlay, "real_key", lambda path, st: (9, next(keys)))
    detached: list[int] = []
    a = Attacher(Recorder(), mode="entry", detach_fn=lambda slot: detached.append(slot) or True, keep_idle=1)
    old, recent = a.consider(LIBSSL), a.consider(LIBSSL)
    mapped = {1: [old, recent]}
    monkeypatch.setattr(a, "_scan", lambda pid: (mapped.get(pid, []), None))
    a.sweep([1])
    mapped[1] = [recent]  # the old one's process ended first
    a.sweep([1])
    mapped.clear()
    for _ in range(4):
        a.sweep([1])
    assert detached == [old.slot] and a.attachments == [recent]  # one idle file kept: the last used

    monkeypatch.setattr(attach, "MAX_ATTACHMENTS", 1)
    new = a.consider(LIBSSL)
    assert new is not None and detached == [old.slot, recent.slot] and a.attachments == [new]
    assert a.over_limit == 0


@needs_libssl
def test_node_s_own_openssl_is_armed_as_nodetls_and_a_system_library_as_itself(tmp_path):
    """Qtap's contract lists nodetls among tlsProbeTypesDetected: node's
    statically linked OpenSSL gets the same probes, its records that name."""
    import shutil

    node = shutil.which("node")
    assert node, "node is not installed (make setup installs it)"
    rec = Recorder()
    a = Attacher(rec, mode="entry", arm_fn=rec.arm)
    assert a.consider(LIBSSL).label == "openssl"
    assert a.consider(os.path.realpath(node)).label == "nodetls"
    assert rec.labels == ["openssl", "nodetls"]


# ------------------------------------------- a new container's image layers, read at its create


def _layer(root, files=("usr/lib/x86_64-linux-gnu/libssl.so.3",), content: bytes | None = None):
    """An image layer as overlay2 keeps one on the host: a directory of the
    files that layer adds.  The files are copies of this machine's libssl
    (or ``content``)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel in files:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            import shutil
            shutil.copyfile(LIBSSL, dest)
        else:
            dest.write_bytes(content)
    return str(root)


def test_a_layers_tls_libraries_are_its_regular_files_in_the_library_directories(tmp_path):
    from qtap_devtools.capture.attach import layer_candidates

    layer = tmp_path / "diff"
    _layer(layer, ["usr/lib/x86_64-linux-gnu/libssl.so.3", "usr/lib/x86_64-linux-gnu/libgnutls.so.30",
                   "usr/lib/x86_64-linux-gnu/libcrypto.so.3", "usr/local/lib/libssl.so.1.1",
                   "opt/app/lib/libssl.so.3"], content=b"x")
    os.symlink("libssl.so.3", layer / "usr/lib/x86_64-linux-gnu/libssl.so")  # the file it names is listed
    os.symlink("usr/lib", layer / "lib")  # merged /usr: read as /usr/lib, not twice
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "libssl.so.3").write_bytes(b"the host's")
    os.symlink(tmp_path / "host", layer / "usr/lib/x86_64-linux-gnu/../../local/lib/ssl-escape")
    os.mkdir(layer / "usr/lib/x86_64-linux-gnu/libgnutls.so.31")  # a directory of a library's name
    found = layer_candidates(str(layer))
    assert found == [f"{layer}/usr/lib/x86_64-linux-gnu/libgnutls.so.30", f"{layer}/usr/lib/x86_64-linux-gnu/libssl.so.3",
                     f"{layer}/usr/local/lib/libssl.so.1.1"]

    # A library directory that is a symlink (absolute: into the host) is not followed.
    other = tmp_path / "other"
    (other / "usr").mkdir(parents=True)
    os.symlink(tmp_path / "host", other / "usr" / "lib")
    assert layer_candidates(str(other)) == []
    assert layer_candidates(str(tmp_path / "missing")) is None  # the layer itself unreadable
    assert layer_candidates(str(tmp_path / "host" / "libssl.so.3")) is None  # not a directory


@needs_libssl
def test_a_containers_layers_are_read_once_for_all_containers_of_its_image(tmp_path, monkeypatch):
    from qtap_devtools.capture import attach

    monkeypatch.setattr(attach, "LAYER_CACHE", 2)
    a = Attacher(Recorder(), mode="entry")
    base, app = _layer(tmp_path / "base"), _layer(tmp_path / "app", ["lib/x86_64-linux-gnu/libgnutls.so.30"],
                                                  content=b"not an ELF")
    assert a.consider_layers([app, base]) == 2  # both attached (the second with its symbols missing)
    assert a.attached_at_create == 2 and a.layers_read == 2 and len(a.attachments) == 2
    assert {os.path.basename(x.path) for x in a.attachments} == {"libssl.so.3", "libgnutls.so.30"}
    assert not any(x.pinned or x.roots for x in a.attachments)  # idle like any unmapped file (see the next test)
    for _ in range(20):  # twenty containers of that image
        assert a.consider_layers([app, base]) == 0
    assert a.layers_read == 2 and a.layers_cached == 40
    # Bounded: a third layer makes room by forgetting the least recently used one.
    third = _layer(tmp_path / "third", [], content=b"")
    a.consider_layers([third])  # app, the least recently used, forgotten
    assert a.layers_read == 3
    a.consider_layers([app])  # read again, its file known (no new attachment); base forgotten
    a.consider_layers([third])  # still remembered
    assert a.layers_read == 4 and a.attached_at_create == 2 and a.layers_cached == 41
    # Failures are counted and skipped: a layer another mount namespace holds, too many layers.
    a.consider_layers([str(tmp_path / "gone"), base])
    assert a.layers_unreadable == 1
    monkeypatch.setattr(attach, "MAX_LAYERS_PER_CONTAINER", 1)
    a.consider_layers([base, third])
    assert a.layers_over_limit == 1


@needs_libssl
def test_a_file_attached_at_create_that_no_process_maps_goes_idle_like_any_other(tmp_path, monkeypatch):
    """Neither pinned nor held by a root: a container created and never
    started does not keep its libssl attached (past the idle files kept)."""
    a = Attacher(Recorder(), mode="entry", detach_fn=lambda slot: True, keep_idle=0)
    a.consider_layers([_layer(tmp_path / "base")])
    monkeypatch.setattr(a, "_scan", lambda pid: ([], None))
    a.sweep([1])
    assert len(a.attachments) == 1  # one sweep: its container may be starting
    a.sweep([1])
    assert a.attachments == [] and a.detached == 1


@needs_libssl
def test_a_file_attached_through_its_layer_is_the_same_file_through_the_containers_overlay(tmp_path):
    """The uprobe sits on the real inode: overlay.real_key must name a layer's
    file (a host path) and the same file seen through an overlay mount of
    that layer (as the container's process maps it) alike, or the
    container's first process would attach it a second time."""
    import subprocess

    from qtap_devtools.capture import overlay

    if os.geteuid() != 0:
        pytest.skip("mounting an overlay needs root")
    lower = _layer(tmp_path / "lower")
    for d in ("upper", "work", "merged"):
        (tmp_path / d).mkdir()
    merged = tmp_path / "merged"
    mount = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={lower},upperdir={tmp_path}/upper,workdir={tmp_path}/work", str(merged)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount an overlay here: {mount.stderr.strip()}")
    try:
        rel = "usr/lib/x86_64-linux-gnu/libssl.so.3"
        in_layer, in_container = f"{lower}/{rel}", f"{merged}/{rel}"
        assert os.stat(in_layer).st_dev != os.stat(in_container).st_dev  # two devices: the overlay's own
        assert overlay.real_key(in_layer, os.stat(in_layer)) == overlay.real_key(in_container, os.stat(in_container))
        a = Attacher(Recorder(), mode="entry")
        assert a.consider_layers([lower]) == 1
        assert a.consider(in_container) is a.attachments[0] and len(a.attachments) == 1
    finally:
        subprocess.run(["umount", str(merged)], check=False)


def test_layer_jobs_wait_on_the_attach_thread_bounded():
    """Docker's thread only queues a container's layers; the attach thread
    reads them (the only thread that places probes).  Past the bound they
    are dropped and counted: that container's libraries are found at its
    first process, as without this."""
    import threading

    from qtap_devtools.capture.attach import ExecWatcher

    release, began = threading.Event(), threading.Event()
    done: list[tuple[str, ...]] = []
    threads: set[str] = set()

    class Stub:
        def consider_layers(self, layers):
            threads.add(threading.current_thread().name)
            began.set()
            release.wait(5)
            done.append(tuple(layers))

        def sweep(self, pids):
            pass

    w = ExecWatcher(Stub(), sweep_seconds=3600, max_layer_jobs=2)
    try:
        w.on_layers(["/a"])
        assert began.wait(5)  # taken: the queue is empty again
        for name in ("/b", "/c", "/d"):
            w.on_layers([name])
        assert w.layer_jobs_dropped == 1
        release.set()
        deadline = __import__("time").monotonic() + 5
        while len(done) < 3 and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.01)
        assert done == [("/a",), ("/b",), ("/c",)] and threads == {"qtap-attach"}
    finally:
        release.set()
        w.stop()
