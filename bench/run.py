"""``make bench``: the agent's cost and carrying capacity next to the floor and sslsniff.

Every repetition runs each setup in turn — untraced, the count-only floor in
both attach modes, bcc's sslsniff, the agent in both attach modes — started
afresh for each of the three workloads (W1 100-byte bodies, W2 1 MiB bodies,
rate10k paced at ~11k req/s).  Output: tables on stdout, ``bench/results.json``, and as
the last line of stdout one JSON object with the headline figures.  Progress
goes to stderr.  Nothing here asserts a timing: a MISS is a finding.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench import report
from bench.machine import BPF_STATS, BpfRunStats, ProcessCpu, bpf_run_time, cpu_seconds
from bench.setups import SETUP_ORDER, Run, Setup, SetupUnavailable, all_setups
from bench.unwind import on_stop_signals
from bench.workload import (RATE10K, W1, W2, BenchNginx, Workload, Wrk, busy_jiffies, jiffies_to_us, paced,
                            write_scripts)
from qtap_devtools.capture.links import tracers

RESULTS = Path(__file__).with_name("results.json")

EXAMPLES = """\
examples:
  make bench                                   # the full run (~8 min on 2 cores)
  make bench ARGS="--reps 5 --seconds 8"
  make bench ARGS="--only agent_tuned"         # untraced always runs: shares need it
  make bench ARGS="--only floor_tuned,agent_tuned --probe-stats"   # the probes' own BPF run time
  make bench ARGS="--only agent_tuned --agent-args='--ring-mib 16'"  # the agent with other options
  .venv/bin/python -m bench.run --quick        # a few hundred requests per run (smoke test)
  .venv/bin/python -m bench.run | tail -1 | jq .
"""

# --quick paces every workload so a one-second run is a few hundred requests.
QUICK_DELAY_MS = {"w1": 10, "w2": 50, "rate10k": 100}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="repetitions, each running every setup (default 3)")
    p.add_argument("--seconds", type=float, default=5, help="seconds per wrk run (default 5)")
    p.add_argument("--quick", action="store_true", help="1 rep, 1 s paced runs: checks the harness, measures nothing")
    p.add_argument("--only", metavar="SETUP,...", help=f"setups to run, from: {','.join(SETUP_ORDER)}")
    p.add_argument("--output", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    p.add_argument("--probe-stats", action="store_true",
                   help="turn on kernel.bpf_stats_enabled and report the BPF run time of each setup's probes "
                        "per request (costs ~1 µs/request, so the CPU columns include it)")
    p.add_argument("--agent-args", metavar="'OPTION ...'", default="",
                   help="more `qtap-devtools run` options for both agent setups (e.g. '--ring-mib 16')")
    args = p.parse_args(argv)
    try:
        args.agent_args = shlex.split(args.agent_args)
    except ValueError as exc:
        p.error(f"--agent-args: {exc}")
    if args.quick:
        args.reps, args.seconds = 1, 1
    args.setups = list(SETUP_ORDER)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in SETUP_ORDER]
        if unknown:
            p.error(f"unknown setup(s) {', '.join(unknown)}; choose from {', '.join(SETUP_ORDER)}")
        args.setups = [s for s in SETUP_ORDER if s == "untraced" or s in wanted]
    if args.reps < 1 or args.seconds < 1:
        p.error("--reps and --seconds must be at least 1")
    return args


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(setup: Setup, nginx: BenchNginx, w: Workload, script: Path, seconds: float, quick: bool,
            probe_stats: bool = False) -> dict:
    offset = nginx.log_offset()
    servers = [nginx.proc.pid, nginx.worker_pid]
    foreign = tracers({os.getpid(), *servers, *setup.pids()})
    if foreign:
        progress(f"warning: other BPF users on this machine during {w.name}: {', '.join(foreign)} "
                 "(their probes may fire in nginx and wrk too)")
    setup.begin(w)
    holders = [*setup.pids(), os.getpid()]  # the floor's programs are this process's
    bpf0 = bpf_run_time(holders) if probe_stats else (0, 0)
    wrk = Wrk(nginx, w, script, seconds)
    procs = ProcessCpu([*servers, *setup.pids(), *setup.client_pids()])
    apps = ProcessCpu(servers, harness=False)  # nginx, and wrk once reaped
    own0 = cpu_seconds(setup.pids())
    harness0 = time.process_time() + cpu_seconds(setup.client_pids())  # with the agent's SSE client
    j0 = busy_jiffies()
    wrk.start()
    res = wrk.wait()
    j1 = busy_jiffies()
    bpf1 = bpf_run_time(holders) if probe_stats else (0, 0)
    extra = setup.end(Run(w, res, nginx, offset, j1, quick))
    if probe_stats:
        extra["probe_bpf_us_per_request"] = (bpf1[0] - bpf0[0]) / 1e3 / max(1, res.requests)
        extra["probe_bpf_runs_per_request"] = (bpf1[1] - bpf0[1]) / max(1, res.requests)
    proc_s = procs.seconds()
    apps_s = apps.seconds()
    own_s = cpu_seconds(setup.pids()) - own0
    harness_s = time.process_time() + cpu_seconds(setup.client_pids()) - harness0
    # The agent may finish a run's events after wrk stops: its CPU counts up to
    # the last transaction it delivered.
    busy_end = extra.pop("busy_end", j1)
    return {
        "workload": w.name,
        "requests": res.requests,
        "errors": res.errors,
        "duration_s": res.duration_s,
        "rps": res.rps,
        "bytes_per_s": res.bytes_per_s,
        "p50_us": res.p50_us,
        "p99_us": res.p99_us,
        "cpu_us_per_request": jiffies_to_us(busy_end - j0) / max(1, res.requests),
        "proc_cpu_us_per_request": proc_s * 1e6 / max(1, res.requests),
        # nginx and wrk alone: the traced programs, where a setup's probes
        # cost (their traps, their programs, the syscall tracepoints).
        "apps_cpu_us_per_request": apps_s * 1e6 / max(1, res.requests),
        # The setup's own process alone (the agent: capture, reassembly, JSON,
        # SSE), without the probes' cost inside nginx and wrk or this harness's
        # SSE client reading every event.
        "own_cpu_us_per_request": own_s * 1e6 / max(1, res.requests) if setup.pids() else None,
        # This harness (for the agent: its SSE client reading every event), part of
        # the system-wide figure though it is no part of the agent.
        "harness_cpu_us_per_request": harness_s * 1e6 / max(1, res.requests),
        "foreign_tracers": foreign,
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    on_stop_signals("bench")
    if os.geteuid() != 0:
        print("bench: needs root (uprobes, bcc); run it with sudo or as root", file=sys.stderr)
        return 2
    from qtap_devtools import kheaders

    kheaders.apply()  # bcc, for the floor and sslsniff, needs the same headers the agent uses
    if args.probe_stats and not BPF_STATS.exists():
        print(f"bench: --probe-stats needs {BPF_STATS} (a kernel with BPF run-time statistics)", file=sys.stderr)
        return 2
    workloads = [W1, W2, RATE10K]
    if args.quick:
        workloads = [paced(w, QUICK_DELAY_MS[w.name]) for w in workloads]
    factories = all_setups(args.agent_args)
    runs: list[dict] = []
    started = time.monotonic()
    stats = BpfRunStats() if args.probe_stats else contextlib.nullcontext()
    with stats, tempfile.TemporaryDirectory(prefix="qtap-bench-") as tmp:
        from tests.realworld import make_cert

        d = Path(tmp)
        cert = make_cert(d / "cert")
        scripts = write_scripts(d, workloads)
        with BenchNginx(d / "nginx", cert) as nginx:
            for rep in range(1, args.reps + 1):
                for name in args.setups:
                    # A fresh setup per workload: a saturated agent's backlog and
                    # memory from W2 must not leak into the next measurement.
                    for w in workloads:
                        where = f"rep {rep}/{args.reps}: {name}: {w.name}"
                        progress(f"{where}: starting the setup, then {args.seconds:g}s of wrk")
                        try:
                            with factories[name]() as setup:
                                rec = measure(setup, nginx, w, scripts[w.name], args.seconds, args.quick,
                                              args.probe_stats)
                        except SetupUnavailable as exc:
                            progress(f"{where}: unavailable: {exc}")
                            runs.append({"rep": rep, "setup": name, "workload": w.name, "error": str(exc)})
                            continue
                        except Exception as exc:  # one failed measurement must not lose the rest
                            progress(f"{where}: failed: {exc!r}")
                            runs.append({"rep": rep, "setup": name, "workload": w.name, "error": repr(exc)})
                            continue
                        runs.append({"rep": rep, "setup": name, **rec})
                        progress(f"{where}: {rec['rps']:,.0f} req/s"
                                 + (f", on the stream {rec['stream_client']}/{rec['expected_client']} client, "
                                    f"{rec['stream_server']}/{rec['expected_server']} server"
                                    if "stream_client" in rec else ""))
    summary = report.summarize(runs, args.setups, [w.name for w in workloads])
    head = summary["headline"]
    doc = {
        "config": {"reps": args.reps, "seconds": args.seconds, "quick": args.quick, "setups": args.setups,
                   "probe_stats": args.probe_stats, "agent_args": args.agent_args,
                   "cpus": os.cpu_count(), "kernel": os.uname().release,
                   "elapsed_s": round(time.monotonic() - started, 1)},
        "headline": head,
        "targets": [{"verdict": v, "what": what, "value": val, "target": t}
                    for v, what, val, t in report.verdicts(head)],
        "setups": summary["setups"],
        "runs": runs,
    }
    args.output.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    progress(f"done in {time.monotonic() - started:.0f}s; wrote {args.output}")
    print(report.tables(summary, args.reps, args.seconds, args.agent_args))
    print(report.targets_text(head))
    print(orjson.dumps(head).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
