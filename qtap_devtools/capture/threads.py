"""The capture's own threads, named where the OS shows them."""

from __future__ import annotations

import ctypes

PR_SET_NAME = 15


def name_thread(name: str) -> None:
    """Name the calling thread for ``top -H``, ``ps -L`` and /proc (Python's
    thread names stay inside Python); at most 15 bytes."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):  # not Linux glibc: the name is cosmetic
        pass
