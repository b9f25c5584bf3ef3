"""``bench.chain`` (the agent's own code per transaction, without the kernel)
runs, so it cannot rot: the tests assert what it reports, not how fast."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bench import chain

ROOT = Path(__file__).resolve().parent.parent


def test_the_chain_carries_every_transaction_to_the_subscriber_and_times_it():
    proc = subprocess.run([sys.executable, "-m", "bench.chain", "--requests", "300"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = re.fullmatch(r"600 transactions: ([0-9.]+) µs of CPU each\n", proc.stdout)
    assert found and float(found.group(1)) > 0, proc.stdout


def test_a_request_count_below_one_is_refused_with_a_reason():
    proc = subprocess.run([sys.executable, "-m", "bench.chain", "--requests", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--requests must be at least 1" in proc.stderr


def test_instructions_per_transaction_are_counted_under_callgrind():
    # Small runs (Python's start-up under valgrind dominates them): the count is
    # a difference of two runs, so it must come out positive and plausible.
    per_tx = chain.instructions(50, 150)
    assert 20_000 < per_tx < 2_000_000
