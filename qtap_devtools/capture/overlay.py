"""Which file a uprobe really lands on, for files seen through overlayfs.

The kernel sets a uprobe on the real inode under an overlay, but ``stat()``
through a container's root reports the overlay's own device: two containers
of one image show one libssl as two files.  Attached once per container, every
TLS call in any of them would run the probes once per container (and each
attachment holds its file descriptors for good).

When all of an overlay's layers are on one filesystem (Docker's overlay2 and
containerd's overlayfs snapshotter, as usually set up), the kernel reports the
real inode number, so (that filesystem's device, ``st_ino``) names the real
file.  Otherwise (layers on several filesystems, inode numbers remapped) the
overlay's own identity is kept: one attachment per container, still correct.
"""

from __future__ import annotations

import os
import re
import time

_CACHE_MAX = 4096
# An overlay's device number is reused once it is unmounted (a container
# removed, another started): an answer is trusted this long, then read again.
CACHE_SECONDS = 5.0
_cache: dict[int, tuple[int | None, float]] = {}  # overlay st_dev -> (device of all its layers or None, when)
_PROC_ROOT = re.compile(r"^/proc/(\d+)/root/")
_ESCAPE = re.compile(r"\\(?:([0-7]{3})|(.))")


def real_key(path: str, st: os.stat_result) -> tuple[int, int, int, int]:
    """The file a uprobe on ``path`` is set on: (device, inode, size, mtime).

    Size and mtime too, because inode numbers are reused: a library deleted
    with its image and another one written later can share a number, and the
    second must not pass for the first (attached already, or known not TLS)."""
    backing = backing_device(st.st_dev, path)
    return (st.st_dev if backing is None else backing, st.st_ino, st.st_size, st.st_mtime_ns)


def backing_device(dev: int, path: str) -> int | None:
    """The device every layer of the overlay ``dev`` is on; None if ``dev`` is
    not an overlay, or its layers are on several devices, or they cannot be
    found."""
    hit = _cache.get(dev)
    now = time.monotonic()
    if hit is not None and now - hit[1] < CACHE_SECONDS:
        return hit[0]
    m = _PROC_ROOT.match(path)
    # The overlay is mounted in our namespace (by dockerd or containerd) or,
    # failing that, in the namespace of the process whose root we read it by.
    sources = [("/proc/self/mountinfo", "")]
    if m:
        sources.append((f"/proc/{m.group(1)}/mountinfo", f"/proc/{m.group(1)}/root"))
    found: int | None = None
    for mountinfo, prefix in sources:
        try:
            with open(mountinfo) as f:
                layers = overlay_layers(f.read()).get(dev)
        except OSError:
            continue
        if layers is not None:
            found = _one_device([prefix + d for d in layers])
            break
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[dev] = (found, now)
    return found


def overlay_layers(mountinfo: str) -> dict[int, list[str]]:
    """Overlay mounts in ``/proc/*/mountinfo`` text: device -> their layer
    directories (lower, upper, data), as that namespace names them."""
    out: dict[int, list[str]] = {}
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split(None, 2)
        if not sep or len(fields) < 3 or len(rest) < 3 or rest[0] != "overlay":
            continue
        try:
            major, minor = (int(x) for x in fields[2].split(":"))
        except ValueError:
            continue
        dirs: list[str] = []
        for option in _split(rest[2], ","):
            key, _, value = option.partition("=")
            if key in ("lowerdir", "lowerdir+", "datadir+"):
                dirs += [_unescape(d) for d in _split(value, ":") if d]
            elif key == "upperdir":
                dirs.append(_unescape(value))
        if dirs:
            out[os.makedev(major, minor)] = dirs
    return out


def _one_device(dirs: list[str]) -> int | None:
    devices = set()
    for d in dirs:
        try:
            devices.add(os.stat(d).st_dev)
        except OSError:
            return None
    return devices.pop() if len(devices) == 1 else None


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is not escaped with a backslash (overlay
    escapes the commas and colons inside a path so); escapes are kept, for
    :func:`_unescape`."""
    parts, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    """mountinfo's octal escapes (space, tab, newline, backslash) and
    overlay's backslash before a comma or colon."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)) if m.group(1) else m.group(2), text)
