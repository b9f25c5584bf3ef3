"""Kernel headers for bcc (``qtap_devtools.kheaders``), on fake trees.

``SRC`` (Debian's /usr/src) and ``MODULES`` (/lib/modules) are pointed at
directories under tmp_path, so every rule is checked without root and without
touching the machine's headers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from qtap_devtools import kheaders

RELEASE = "6.18.44-test"


def write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def debian_headers(src: Path, version: str = "6.1.0-57", arch: str = "amd64") -> tuple[Path, Path]:
    """Debian's split: -common holds the source tree's headers, the arch
    directory the generated ones and .config; both link scripts/ elsewhere."""
    common = src / f"linux-headers-{version}-common"
    archdir = src / f"linux-headers-{version}-{arch}"
    write(common / "Makefile", "common makefile")
    write(common / "include/linux/sched.h", "struct task_struct;")
    write(common / "arch/x86/include/asm/ptrace.h", "ptrace")
    write(archdir / ".config", "CONFIG_BPF=y")
    write(archdir / "Makefile", "arch makefile")  # the arch one wins
    write(archdir / "include/generated/autoconf.h", "#define CONFIG_BPF 1")
    write(archdir / "arch/x86/include/generated/asm/unistd_64.h", "unistd")
    kbuild = src.parent / "lib" / "linux-kbuild" / "scripts"
    write(kbuild / "basic/fixdep", "fixdep")
    for d in (common, archdir):
        os.symlink("../../lib/linux-kbuild/scripts", d / "scripts")
    return common, archdir


def tree(root: Path) -> dict[str, str]:
    """Every entry under root: a file's text, a link's target, or "dir"."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_text()
    return out


@pytest.fixture
def fake(tmp_path, monkeypatch):
    src = tmp_path / "usr" / "src"
    modules = tmp_path / "lib" / "modules"
    src.mkdir(parents=True)
    modules.mkdir(parents=True)
    monkeypatch.setattr(kheaders, "SRC", src)
    monkeypatch.setattr(kheaders, "MODULES", modules)
    monkeypatch.setattr(kheaders, "_logged", False)
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)

    class Fake:
        pass

    f = Fake()
    f.src, f.modules, f.cache = src, modules, tmp_path / "cache"
    return f


def test_running_kernels_headers_are_preferred(fake):
    debian_headers(fake.src)
    build = fake.modules / RELEASE / "build"
    (build / "include").mkdir(parents=True)
    h = kheaders.resolve(fake.cache, RELEASE)
    assert (h.path, h.how, h.ok) == (build, "running-kernel", True)
    assert str(build) in h.detail
    assert not fake.cache.exists()  # nothing merged when not needed


def test_merged_tree_from_debians_common_and_arch_dirs(fake):
    common, arch = debian_headers(fake.src)
    h = kheaders.resolve(fake.cache, RELEASE)
    dest = fake.cache / "kernel-headers" / arch.name
    assert (h.path, h.how, h.ok) == (dest, "merged-distro", True)
    assert arch.name in h.detail and RELEASE in h.detail and str(dest) in h.detail
    # What bcc reads: both halves, through the merged tree.
    assert (dest / "include/linux/sched.h").read_text() == "struct task_struct;"
    assert (dest / "include/generated/autoconf.h").read_text() == "#define CONFIG_BPF 1"
    assert (dest / "arch/x86/include/asm/ptrace.h").read_text() == "ptrace"
    assert (dest / "arch/x86/include/generated/asm/unistd_64.h").read_text() == "unistd"
    assert (dest / ".config").read_text() == "CONFIG_BPF=y"
    # The arch directory's files win where both have one.
    assert (dest / "Makefile").read_text() == "arch makefile"
    assert os.readlink(dest / "Makefile") == str(arch / "Makefile")
    # A symlinked directory stays a link and still resolves.
    assert (dest / "scripts").is_symlink() and (dest / "scripts/basic/fixdep").read_text() == "fixdep"
    # A symlink farm: the distro files are linked, not copied.
    assert os.readlink(dest / "include/linux/sched.h") == str(common / "include/linux/sched.h")
    assert (dest / ".qtap-merged-from").read_text() == f"{common}\n{arch}\n"
    assert not [p for p in dest.parent.iterdir() if ".tmp" in p.name]


def test_newest_headers_are_chosen_by_version_not_by_name(fake):
    debian_headers(fake.src, "6.1.0-9")
    debian_headers(fake.src, "6.1.0-57")
    debian_headers(fake.src, "6.1.0-10")
    write(fake.src / "linux-headers-6.1.0-99-common" / "Makefile")  # no arch half: unusable
    h = kheaders.resolve(fake.cache, RELEASE)
    assert h.path.name == "linux-headers-6.1.0-57-amd64"


def test_merge_is_idempotent_thanks_to_its_marker(fake, monkeypatch):
    common, arch = debian_headers(fake.src)
    first = kheaders.resolve(fake.cache, RELEASE)
    before = tree(first.path)
    merges = []
    real_merge = kheaders._merge
    monkeypatch.setattr(kheaders, "_merge", lambda *a: (merges.append(a), real_merge(*a)))
    second = kheaders.resolve(fake.cache, RELEASE)
    assert second == first and merges == [] and tree(second.path) == before

    # A marker naming other headers (an upgrade) rebuilds the tree.
    (first.path / ".qtap-merged-from").write_text("/elsewhere\n")
    third = kheaders.resolve(fake.cache, RELEASE)
    assert merges == [(common, arch, first.path)] and third == first
    assert tree(third.path) == before


def test_no_headers_at_all_says_how_to_fix(fake):
    h = kheaders.resolve(fake.cache, RELEASE)
    assert (h.path, h.how, h.ok) == (None, "missing", False)
    assert RELEASE in h.detail and "fix: apt-get install linux-headers-amd64" in h.detail


def test_an_unusable_cache_is_a_reason_not_a_crash(fake, tmp_path):
    debian_headers(fake.src)
    blocker = write(tmp_path / "not-a-dir")  # the cache would have to be under a file
    h = kheaders.resolve(blocker / "cache", RELEASE)
    assert (h.path, h.how, h.ok) == (None, "missing", False)
    assert "cannot merge" in h.detail and "fix:" in h.detail


def test_never_writes_under_lib_modules(fake):
    debian_headers(fake.src)
    (fake.modules / RELEASE).mkdir()  # a modules dir without headers (no build/)
    (fake.modules / "6.1.0-57-amd64" / "build").mkdir(parents=True)  # another kernel's, not ours
    before = tree(fake.modules)
    src_before = tree(fake.src)
    h = kheaders.apply(fake.cache, RELEASE)
    assert h.how == "merged-distro" and fake.cache in h.path.parents
    assert tree(fake.modules) == before
    assert tree(fake.src) == src_before  # nor into the distro's headers


def test_apply_points_bcc_at_the_merged_tree(fake):
    debian_headers(fake.src)
    h = kheaders.apply(fake.cache, RELEASE)
    assert os.environ["BCC_KERNEL_SOURCE"] == str(h.path)
    assert (Path(os.environ["BCC_KERNEL_SOURCE"]) / "include/generated/autoconf.h").exists()


def test_apply_leaves_bcc_alone_with_the_running_kernels_headers(fake):
    (fake.modules / RELEASE / "build" / "include").mkdir(parents=True)
    h = kheaders.apply(fake.cache, RELEASE)
    assert h.how == "running-kernel" and "BCC_KERNEL_SOURCE" not in os.environ  # bcc finds them itself


def test_chosen_headers_are_logged_once(fake, caplog):
    debian_headers(fake.src)
    caplog.set_level(logging.INFO, logger="qtap_devtools.kheaders")
    for _ in range(3):
        h = kheaders.apply(fake.cache, RELEASE)
    records = [r for r in caplog.records if r.name == "qtap_devtools.kheaders"]
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.INFO, f"kernel headers: {h.detail}")]


def test_missing_headers_are_logged_once_as_an_error(fake, caplog):
    caplog.set_level(logging.INFO, logger="qtap_devtools.kheaders")
    kheaders.apply(fake.cache, RELEASE)
    kheaders.apply(fake.cache, RELEASE)
    records = [r for r in caplog.records if r.name == "qtap_devtools.kheaders"]
    assert len(records) == 1 and records[0].levelno == logging.ERROR
    assert "apt-get install linux-headers-amd64" in records[0].getMessage()
