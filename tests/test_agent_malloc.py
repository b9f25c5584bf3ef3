"""glibc's malloc as the agent sets it (agent.tune_malloc): one arena for all its threads, and the
heap's free top kept between the periodic trims."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Threads that allocate (through ctypes, so without the GIL, at once) and
# then glibc's own account of its heaps (malloc_info: one <heap> per arena).
CODE = r"""
import ctypes, sys, threading
from qtap_devtools import agent
if sys.argv[1] == "tuned":
    agent.tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.fdopen.restype = ctypes.c_void_p
kept = []
def work():
    kept.extend(libc.malloc(100_000) for _ in range(50))
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
out = ctypes.c_void_p(libc.fdopen(1, b"w"))
libc.malloc_info(0, out)
libc.fflush(out)
"""


def heaps(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", CODE, mode], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.count("<heap nr=")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_the_agents_threads_share_one_malloc_arena():
    assert heaps("default") > 1  # each thread's first malloc made an arena of its own
    assert heaps("tuned") == 1


# Heap blocks freed from the top of the heap: how far the heap's end moved back.
TRIM = r"""
import ctypes, sys
from qtap_devtools import agent
if sys.argv[1] == "tuned":
    agent.tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 << 10) for _ in range(32)]  # 2 MiB, each block under the mmap threshold
top = libc.sbrk(0)
for b in reversed(blocks):
    libc.free(b)
print(top - libc.sbrk(0))
"""


def trimmed(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", TRIM, mode], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_freeing_the_top_of_the_heap_keeps_its_pages_for_the_next_burst():
    assert trimmed("default") >= 1 << 20  # glibc gave the freed top back at once
    assert trimmed("tuned") == 0
