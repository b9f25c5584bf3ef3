"""``python -m bench.ab OTHER``: this checkout's agent and another's, tracing the same traffic at once.

Both agents attach (tuned mode) to the same nginx and wrk at rate10k, each with
its own SSE client reading everything, so both see the same requests in the
same minute of the machine.  Their own CPU per request then compares two builds
without the hour's skew that separates runs made one after the other (on a
shared VM the untraced cost of a request moved 4x between hours).  They compete
for the same cores, so each costs more than it would alone; the difference is
the point.  The order they start in alternates between runs.  The other
checkout needs its own ``make setup`` (its virtual environment and compiled parts).

    .venv/bin/python -m bench.ab ../other-checkout          # 4 runs of 8 s
    .venv/bin/python -m bench.ab ../other --runs 6 --seconds 10
    .venv/bin/python -m bench.ab . --runs 2                  # A/A: how far two equal agents differ
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench.machine import cpu_seconds
from bench.setups import ROOT, Agent, Run, SetupUnavailable
from bench.unwind import on_stop_signals
from bench.workload import RATE10K, BenchNginx, Workload, Wrk, busy_jiffies, paced, write_scripts

QUICK_DELAY_MS = 100  # --quick: a few hundred requests a run (the smoke test)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout (its .venv made by `make setup`)")
    parser.add_argument("--runs", type=int, default=4, help="runs, the start order alternating (default 4)")
    parser.add_argument("--seconds", type=float, default=8, help="seconds of wrk per run (default 8)")
    parser.add_argument("--quick", action="store_true", help="a paced trickle: checks the harness, measures nothing")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.seconds <= 0:
        parser.error("--runs must be at least 1 and --seconds positive")
    args.other = args.other.resolve()
    if not (args.other / ".venv" / "bin" / "python").exists() or not (args.other / "qtap_devtools").is_dir():
        parser.error(f"{args.other} is not a set-up checkout (no qtap_devtools/ or .venv/bin/python: "
                     "run `make setup` there)")
    return args


def one_run(nginx: BenchNginx, workload: Workload, script: Path, order: list[tuple[str, Path | None]],
            seconds: float, quick: bool) -> dict[str, dict]:
    with contextlib.ExitStack() as stack:
        agents = {name: stack.enter_context(Agent("tuned", checkout=checkout)) for name, checkout in order}
        offset = nginx.log_offset()
        for agent in agents.values():
            agent.begin(workload)
        before = {name: cpu_seconds(agent.pids()) for name, agent in agents.items()}
        wrk = Wrk(nginx, workload, script, seconds)
        wrk.start()
        res = wrk.wait()
        run = Run(workload, res, nginx, offset, busy_jiffies(), quick)
        out = {}
        for name, agent in agents.items():  # end() waits for its stream to settle: CPU read after
            stream = agent.end(run)
            cpu = cpu_seconds(agent.pids()) - before[name]
            out[name] = {"us_per_request": cpu * 1e6 / max(1, res.requests), "rps": res.rps,
                         "complete": min(stream["completeness_client"] or 0, stream["completeness_server"] or 0)}
        return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        print("bench.ab: needs root (uprobes, bcc); run it with sudo or as root", file=sys.stderr)
        return 2
    on_stop_signals("bench.ab")
    from qtap_devtools import kheaders
    from tests.realworld import make_cert

    kheaders.apply()
    sides = [("this", None), ("other", args.other)]
    print(f"this: {ROOT}\nother: {args.other}\nrate10k, tuned, both agents at once; own CPU µs per request",
          flush=True)
    diffs = []
    with tempfile.TemporaryDirectory(prefix="qtap-ab-") as tmp:
        d = Path(tmp)
        workload = paced(RATE10K, QUICK_DELAY_MS) if args.quick else RATE10K
        scripts = write_scripts(d, [workload])
        with BenchNginx(d / "nginx", make_cert(d / "cert")) as nginx:
            for i in range(args.runs):
                order = sides if i % 2 == 0 else sides[::-1]
                try:
                    got = one_run(nginx, workload, scripts[workload.name], order, args.seconds, args.quick)
                except SetupUnavailable as exc:
                    print(f"bench.ab: an agent could not start: {exc}", file=sys.stderr)
                    return 1
                this, other = got["this"], got["other"]
                diffs.append(this["us_per_request"] - other["us_per_request"])
                print(f"run {i + 1} ({order[0][0]} started first): this {this['us_per_request']:.1f}, "
                      f"other {other['us_per_request']:.1f}, difference {diffs[-1]:+.1f} µs/request; "
                      f"{this['rps']:,.0f} req/s; on the stream: this {this['complete']:.3f}, "
                      f"other {other['complete']:.3f}", flush=True)
    print(f"median difference (this - other): {statistics.median(diffs):+.1f} µs/request over {len(diffs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
