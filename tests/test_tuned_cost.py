"""What the tuned sites save: ns per SSL_write(_ex) call with count-only probes.

A C loop writes 64 bytes through libssl.so.3 to an in-memory peer (no socket),
under three setups measured in the same run, interleaved, median of rounds:
untraced; uprobe + uretprobe at the symbol (what the agent attaches today);
the tuned.py plan's sites.  Run with ``-s`` to see the table.
"""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

import pytest

from qtap_devtools.capture.tuned import SitePlan, analyze

pytestmark = pytest.mark.kernel

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
FIXTURES = Path(__file__).parent / "fixtures" / "tuned"
ROUNDS, SECONDS = 3, 1.5


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    d = tmp_path_factory.mktemp("loop")
    subprocess.run(["gcc", "-O2", "-o", d / "loop", FIXTURES / "ssl_write_loop.c", "-lssl", "-lcrypto"], check=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-days", "1", "-keyout", d / "key.pem", "-out", d / "cert.pem"], check=True, capture_output=True)
    return [str(d / "loop"), str(d / "cert.pem"), str(d / "key.pem")]


def run(loop, mode: str, setup: str, plan: SitePlan) -> tuple[float, int]:
    """(ns per call, probe hits) for one timed run under ``setup``."""
    from bcc import BPF

    bpf = None
    if setup != "untraced":
        bpf = BPF(src_file=str(FIXTURES / "sites.c").encode())
        lib, fn = LIBSSL.encode(), b"count_hit"
        if setup == "symbol":
            bpf.attach_uprobe(name=lib, sym=plan.symbol.encode(), fn_name=fn)
            bpf.attach_uretprobe(name=lib, sym=plan.symbol.encode(), fn_name=fn)
        else:
            bpf.attach_uprobe(name=lib, addr=plan.entry_vaddr, fn_name=fn)
            if plan.return_kind == "uprobe":
                bpf.attach_uprobe(name=lib, addr=plan.return_vaddr, fn_name=fn)
            else:
                bpf.attach_uretprobe(name=lib, addr=plan.return_vaddr, fn_name=fn)
    try:
        out = subprocess.run([*loop, mode, str(SECONDS)], capture_output=True, check=True, text=True, timeout=60)
        hits = 0 if bpf is None else sum(v.value for v in bpf["hits"].values())
    finally:
        if bpf is not None:
            bpf.cleanup()
    return float(out.stdout), hits


@pytest.mark.parametrize("mode, symbol", [("write", "SSL_write"), ("write_ex", "SSL_write_ex")])
def test_tuned_sites_cost_less_than_the_symbol_probes(loop, mode, symbol):
    from qtap_devtools import kheaders

    kheaders.apply()
    plan = analyze(LIBSSL)[symbol]
    assert isinstance(plan, SitePlan), plan
    setups = ("untraced", "symbol", "tuned")
    ns: dict[str, list[float]] = {s: [] for s in setups}
    for _ in range(ROUNDS):
        for setup in setups:
            per_call, hits = run(loop, mode, setup, plan)
            if setup != "untraced":
                assert hits > 0, setup
            ns[setup].append(per_call)
    med = {s: statistics.median(v) for s, v in ns.items()}
    base = med["untraced"]
    print(f"\n{symbol}: ns/call (write+drain), median of {ROUNDS}x{SECONDS}s")
    for s in setups:
        print(f"  {s:9s} {med[s]:8.0f} ns  x{med[s] / base:5.2f} of untraced  "
              f"probe cost {med[s] - base:7.0f} ns  samples {[round(x) for x in ns[s]]}")
    saved = (med["symbol"] - base) / max(med["tuned"] - base, 1.0)
    print(f"  probe cost symbol/tuned: {saved:.1f}x")
    assert med["tuned"] < med["symbol"]
