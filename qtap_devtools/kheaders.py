"""Find kernel headers bcc can compile against.

bcc compiles probes with clang against kernel headers.  The running kernel's own
headers (``/lib/modules/$(uname -r)/build``) are used when present.  On our
machines they are not: the kernel is newer than any Debian headers package.
Debian splits its headers into ``linux-headers-X-common`` (the source tree's
``include/`` and ``arch/``) and ``linux-headers-X-<arch>`` (generated headers and
``.config``), so neither is a tree bcc can use alone.  We merge the two into a
symlink farm in our cache directory and point bcc at it with
``BCC_KERNEL_SOURCE``.  Struct layouts in those headers do not match the running
kernel, which is why the probes never dereference kernel structs.

We never write into ``/lib/modules``.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SRC = Path("/usr/src")  # Debian's installed headers (read only)
MODULES = Path("/lib/modules")  # the running kernel's own headers (read only, never written)


@dataclass(frozen=True)
class KernelHeaders:
    path: Path | None
    how: str  # "running-kernel", "merged-distro", "missing"
    detail: str

    @property
    def ok(self) -> bool:
        return self.path is not None


def default_cache_dir() -> Path:
    """The project's cache: ``.cache`` in a source checkout, else ~/.cache."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").exists() and os.access(checkout, os.W_OK):
        return checkout / ".cache"
    return Path.home() / ".cache" / "qtap-devtools"


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def _distro_pairs() -> list[tuple[Path, Path]]:
    """(common, arch) header directory pairs, newest first."""
    pairs = []
    if not SRC.is_dir():
        return pairs
    for common in SRC.glob("linux-headers-*-common"):
        stem = common.name[: -len("-common")]
        for arch in SRC.glob(stem + "-*"):
            if arch != common and (arch / ".config").exists():
                pairs.append((common, arch))
    pairs.sort(key=lambda p: _version_key(p[1].name), reverse=True)
    return pairs


def _merge(common: Path, arch: Path, dest: Path) -> None:
    """Build a symlink farm of ``common`` overlaid by ``arch`` at ``dest``."""
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for src in (common, arch):  # arch last: its generated files win
            for root, dirs, files in os.walk(src, followlinks=False):
                rel = Path(root).relative_to(src)
                out = tmp / rel
                out.mkdir(parents=True, exist_ok=True)
                for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
                    target = out / name
                    if target.is_symlink() or target.exists():
                        target.unlink()
                    os.symlink(Path(root) / name, target)
        (tmp / ".qtap-merged-from").write_text(f"{common}\n{arch}\n")
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-built tree left behind
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def resolve(cache_dir: Path | None = None, release: str | None = None) -> KernelHeaders:
    """Pick headers for bcc; builds the merged tree on first use."""
    release = release or platform.release()
    build = MODULES / release / "build"
    if (build / "include").is_dir():
        return KernelHeaders(build, "running-kernel", f"headers of the running kernel at {build}")
    pairs = _distro_pairs()
    if not pairs:
        return KernelHeaders(
            None,
            "missing",
            f"no kernel headers for {release} and no Debian headers in {SRC}; "
            "fix: apt-get install linux-headers-amd64",
        )
    common, arch = pairs[0]
    dest = (cache_dir or default_cache_dir()) / "kernel-headers" / arch.name
    marker = dest / ".qtap-merged-from"
    try:
        if not (marker.exists() and marker.read_text() == f"{common}\n{arch}\n"):
            _merge(common, arch, dest)
    except OSError as exc:  # e.g. not root, and the cache is root's
        return KernelHeaders(
            None,
            "missing",
            f"cannot merge Debian headers {arch.name} into {dest}: {exc.strerror or exc}; "
            "fix: run as root (sudo), or as the user that owns the cache",
        )
    return KernelHeaders(
        dest,
        "merged-distro",
        f"Debian headers {arch.name} (running kernel is {release}) merged at {dest}",
    )


_logged = False


def apply(cache_dir: Path | None = None, release: str | None = None) -> KernelHeaders:
    """Resolve headers and export ``BCC_KERNEL_SOURCE`` for bcc; logs once."""
    global _logged
    headers = resolve(cache_dir, release)
    if headers.how == "merged-distro" and headers.path is not None:
        os.environ["BCC_KERNEL_SOURCE"] = str(headers.path)
    if not _logged:
        (log.info if headers.ok else log.error)("kernel headers: %s", headers.detail)
        _logged = True
    return headers
