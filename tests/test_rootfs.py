"""Files a container controls, read through /proc/PID/root: a real process
chrooted into a directory this test fills (as root, like the agent)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from qtap_devtools import rootfs
from qtap_devtools.capture.attach import Attacher
from qtap_devtools.capture.elf import _EHDR, exported_symbols
from qtap_devtools.enrich import procfs

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


@pytest.fixture
def container(tmp_path: Path):
    """(pid, root dir) of a process chrooted into ``root``."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("inside\n")
    pid = os.fork()
    if pid == 0:  # the child only sleeps: nothing else runs after a fork
        try:
            os.chroot(root)
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{pid}/root") != str(root) and time.monotonic() < deadline:
            time.sleep(0.01)  # until chrooted: its root link reads "/" before, its new root after
        yield pid, root
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def returns_promptly(fn, *args):
    """``fn(*args)``, failing (not hanging) if it blocks."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), f"{fn.__name__}{args} blocked"
    return out[0]


def test_a_containers_file_is_read_inside_its_root(container):
    pid, root = container
    assert rootfs.read_regular(f"/proc/{pid}/root/etc/hostname", 100) == b"inside\n"


def test_an_absolute_symlink_resolves_inside_the_containers_root(container, tmp_path):
    pid, root = container
    host_file = tmp_path / "host-secret"
    host_file.write_text("host\n")
    (root / "etc" / "alias").symlink_to("/etc/hostname")  # the container's own
    (root / "etc" / "escape").symlink_to(host_file)  # a host path, not there inside
    assert rootfs.read_regular(f"/proc/{pid}/root/etc/alias", 100) == b"inside\n"
    assert rootfs.read_regular(f"/proc/{pid}/root/etc/escape", 100) is None
    assert rootfs.read_regular(f"/proc/{pid}/root/../../{host_file}", 100) is None


def test_a_fifo_is_refused_at_once_not_waited_on(container):
    pid, root = container
    os.mkfifo(root / "etc" / "passwd")
    assert returns_promptly(rootfs.read_regular, f"/proc/{pid}/root/etc/passwd", 100) is None
    # A process of that container is still named, from the host's passwd.
    assert returns_promptly(procfs._user_name, f"/proc/{pid}", 0) == "root"


def test_a_fifo_named_like_libssl_is_not_attached_and_does_not_block(container):
    pid, root = container
    libdir = root / "usr" / "lib" / "x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    os.mkfifo(libdir / "libssl.so.3")
    a = Attacher(lambda *args: None, mode="entry")
    assert returns_promptly(a.consider, f"/proc/{pid}/root/usr/lib/x86_64-linux-gnu/libssl.so.3") is None
    assert a.attachments == []


@pytest.mark.skipif(not os.path.exists(LIBSSL), reason="libssl3 not installed")
def test_elf_offsets_past_the_files_end_are_no_symbols(tmp_path):
    data = bytearray(Path(LIBSSL).read_bytes())
    fields = list(_EHDR.unpack_from(data))
    for shoff in (2**64 - 1, len(data) + 1):
        fields[6] = shoff  # e_shoff: where the section headers are
        _EHDR.pack_into(data, 0, *fields)
        bad = tmp_path / "libssl.so.3"
        bad.write_bytes(data)
        assert exported_symbols(str(bad), ["SSL_write"]) == set()
    assert exported_symbols(LIBSSL, ["SSL_write"]) == {"SSL_write"}


@pytest.mark.skipif(not os.path.exists(LIBSSL), reason="libssl3 not installed")
def test_a_containers_libssl_behind_an_absolute_symlink_is_its_own_file(container):
    import shutil

    pid, root = container
    libdir = root / "usr" / "lib" / "x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    shutil.copy(LIBSSL, libdir / "libssl.so.3.0.own")  # no such file on the host
    (libdir / "libssl.so.3").symlink_to("/usr/lib/x86_64-linux-gnu/libssl.so.3.0.own")
    a = Attacher(lambda *args: None, mode="entry")
    att = a.consider(f"/proc/{pid}/root/usr/lib/x86_64-linux-gnu/libssl.so.3")
    own = os.stat(libdir / "libssl.so.3.0.own")
    assert att is not None and (att.dev, att.ino) == (own.st_dev, own.st_ino)
