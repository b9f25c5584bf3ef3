"""``doctor`` on this machine: capture is possible, and it says why."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.agentproc import ROOT


@pytest.mark.kernel
def test_doctor_reports_capture_possible_here():
    r = subprocess.run([sys.executable, "-m", "qtap_devtools", "doctor"], cwd=ROOT, capture_output=True,
                       text=True, timeout=180, stdin=subprocess.DEVNULL)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "capture possible" in out
    for name in ("root", "bpf", "tracepoints", "uprobes", "kprobes", "bcc", "kernel headers", "trial probe",
                 "tls libraries", "capture probes", "docker"):
        assert f"] {name}:" in out, f"no {name} line in:\n{out}"
    assert "[ok  ] trial probe" in out
    # No kprobes here, and that must not count against capture.
    assert "[FAIL] kprobes" not in out
