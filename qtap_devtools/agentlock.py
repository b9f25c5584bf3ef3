"""Agents capturing at once: each holds a lock, so the next can say so.

Two agents on one machine both work, but every TLS call then runs both
agents' probes (146 BPF programs instead of 73, all of them in the traced
programs' time), and neither said so.  An agent that captures holds an
exclusive ``flock`` on ``LOCK_PATH`` with its pid and address written in it; one
that finds the lock held warns, naming the other from what the file says.  The
kernel lets go of the lock when its holder exits, however it ends.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_PATH = Path("/run/qtap-devtools.lock")


class CaptureLock:
    def __init__(self, path: Path = LOCK_PATH) -> None:
        self.path = path
        self._fd: int | None = None

    def claim(self, address: str) -> str | None:
        """Hold the lock (None), or say who holds it: "pid 4242 serving http://…"."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return None  # nowhere to keep it (not root, no /run): nothing to compare with
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held (EWOULDBLOCK), or a filesystem without flock
            other = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            return other or "another agent"  # the holder may not have written it yet
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} serving {address}\n".encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file lets go of the lock
            self._fd = None
