"""``make bench-soak``: a million transactions through the agent, its memory on the way.

nginx (W1: 100-byte bodies, TLS, keep-alive) and ``wrk -t1 -c4`` in back-to-back
chunks until the agent has put ``--transactions`` transactions on the stream (a
request counts twice: wrk's side and nginx's); one SSE client reads the whole
stream.  W1 saturates the agent, so wrk makes about three times as many
requests: the rest are counted as lost records.  After each chunk: requests so
far, transactions on the stream, the agent's VmRSS, the highest VmRSS sampled
(every 0.25 s) while traffic ran, and its drop counters.

Target: RSS below 150 MB throughout, judged on the highest sample under
traffic.  The process's lifetime peak (VmHWM) is printed apart: it is set at
start-up by bcc compiling the probes (LLVM's working memory, ~200 MB here),
before any transaction, and handed back once they are loaded.  Not part of CI
(a minute or two).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench.setups import Agent, SetupUnavailable, _status
from bench.unwind import on_stop_signals
from bench.workload import W1, BenchNginx, Wrk, write_scripts

TARGET_MB = 150

EXAMPLES = """\
examples:
  make bench-soak
  make bench-soak ARGS="--transactions 200000 --attach-mode entry"
  make bench-soak ARGS="--agent-args='--ring-mib 16'"   # the agent with other options
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transactions", type=int, default=1_000_000, help="transactions the agent delivers on the stream (default 1e6)")
    p.add_argument("--chunk-seconds", type=int, default=10, help="wrk run length between reports (default 10)")
    p.add_argument("--attach-mode", choices=["tuned", "entry"], default="tuned",
                   help="tuned = the agent's --attach-mode auto (default)")
    p.add_argument("--agent-args", metavar="'OPTION ...'", default="",
                   help="more `qtap-devtools run` options for the agent (e.g. '--queue-size 2048')")
    args = p.parse_args(argv)
    try:
        agent_args = shlex.split(args.agent_args)
    except ValueError as exc:
        p.error(f"--agent-args: {exc}")
    if os.geteuid() != 0:
        print("bench.soak: needs root (the agent attaches uprobes)", file=sys.stderr)
        return 2
    on_stop_signals("bench.soak")
    from qtap_devtools import kheaders
    from tests.realworld import make_cert

    kheaders.apply()
    samples = []
    with tempfile.TemporaryDirectory(prefix="qtap-soak-") as tmp:
        d = Path(tmp)
        cert = make_cert(d / "cert")
        scripts = write_scripts(d, [W1])
        try:
            with BenchNginx(d / "nginx", cert) as nginx, Agent(args.attach_mode, agent_args) as agent:
                done, delivered, started = 0, 0, time.monotonic()
                startup_hwm = _status(agent.proc.pid).get("VmHWM", 0)
                agent.rss_max = 0  # from here on: under traffic
                print(f"{'elapsed s':>9} {'requests':>10} {'tx on stream':>12} {'RSS MB':>7} {'max MB':>7} "
                      f"{'lost rec':>9} {'pend drop':>9} {'sse drop':>9}", flush=True)
                while delivered < args.transactions:
                    wrk = Wrk(nginx, W1, scripts["w1"], args.chunk_seconds)
                    wrk.start()
                    done += wrk.wait().requests
                    agent.reader.wait_quiet(W1.path, 1.0, timeout=30)  # what is still queued counts too
                    delivered = agent.reader.tx_total(W1.path)
                    status = _status(agent.proc.pid)
                    drops = agent.drops(agent.stats())
                    sample = {
                        "elapsed_s": round(time.monotonic() - started, 1),
                        "requests": done,
                        "on_stream": delivered,
                        "rss_mb": round(status.get("VmRSS", 0) / 1024, 1),
                        "max_rss_mb": round(agent.rss_max / 1024, 1),
                        **drops,
                    }
                    samples.append(sample)
                    print(f"{sample['elapsed_s']:>9} {done:>10,} {sample['on_stream']:>12,} {sample['rss_mb']:>7} "
                          f"{sample['max_rss_mb']:>7} {drops['lost_records']:>9,} {drops['pending_dropped_total']:>9,} "
                          f"{drops['subscriberDrops']:>9,}", flush=True)
                attach = agent.attach
        except SetupUnavailable as exc:
            print(f"bench.soak: agent unavailable: {exc}", file=sys.stderr)
            return 1
    peak = max(s["max_rss_mb"] for s in samples)
    last = samples[-1]
    verdict = "PASS" if peak < TARGET_MB else "MISS"
    print(f"\n{verdict}  highest RSS under traffic {peak} MB; {last['rss_mb']} MB after {last['on_stream']:,} "
          f"transactions on the stream ({last['requests']:,} requests; target < {TARGET_MB} MB; agent attach: {attach}"
          f"{'; agent options: ' + ' '.join(agent_args) if agent_args else ''})")
    print(f"      start-up peak (VmHWM, the probe compile, before any traffic): {startup_hwm / 1024:.1f} MB")
    print(orjson.dumps({"requests": last["requests"], "transactions": last["on_stream"], "peak_rss_mb": peak,
                        "final_rss_mb": last["rss_mb"], "startup_hwm_mb": round(startup_hwm / 1024, 1),
                        "target_mb": TARGET_MB, "pass": peak < TARGET_MB, "agent_args": agent_args, "samples": samples}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
