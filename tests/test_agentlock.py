"""The lock by which an agent learns that another is capturing too."""

from __future__ import annotations

import os
import subprocess
import sys

from qtap_devtools.agentlock import CaptureLock


def test_the_second_claim_names_the_first_holder_and_the_lock_is_free_once_it_lets_go(tmp_path):
    path = tmp_path / "agent.lock"
    first, second = CaptureLock(path), CaptureLock(path)
    assert first.claim("http://127.0.0.1:10001") is None
    assert second.claim("http://127.0.0.1:10002") == f"pid {os.getpid()} serving http://127.0.0.1:10001"
    first.release()
    assert second.claim("http://127.0.0.1:10002") is None
    assert path.read_text() == f"pid {os.getpid()} serving http://127.0.0.1:10002\n"  # the old text gone


def test_a_holder_that_exits_without_letting_go_leaves_the_lock_free(tmp_path):
    """kill -9: the kernel drops the lock with the process."""
    path = tmp_path / "agent.lock"
    holder = subprocess.run([sys.executable, "-c", (
        "import os; from qtap_devtools.agentlock import CaptureLock\n"
        f"assert CaptureLock(__import__('pathlib').Path({str(path)!r})).claim('x') is None\n"
        "os.kill(os.getpid(), 9)\n")], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert holder.returncode == -9
    assert CaptureLock(path).claim("y") is None


def test_nowhere_to_keep_the_lock_is_no_error(tmp_path):
    assert CaptureLock(tmp_path / "missing" / "agent.lock").claim("x") is None
