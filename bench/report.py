"""From raw runs to medians, shares of untraced, targets and the printed tables.

Ratios are paired: each traced run is divided by the untraced run of the same
workload in the same repetition, and the median of those ratios is quoted, so
slow drift of the machine between repetitions cancels.  "Added" figures
(CPU per request, p99 latency) are paired differences the same way.
"""

from __future__ import annotations

import shlex
import statistics
from typing import Any, Callable

LABELS = {
    "untraced": "untraced",
    "floor_entry": "floor: uprobe+uretprobe, count only",
    "floor_tuned": "floor: tuned sites, count only",
    "sslsniff": "bcc sslsniff > /dev/null",
    "agent_tuned": "agent --attach-mode auto",
    "agent_entry": "agent --attach-mode entry",
}

# (headline key, what, comparison, threshold)
TARGETS = (
    ("w1_tuned", "agent tuned W1 share", ">=", 0.40),
    ("w2_tuned", "agent tuned W2 share", ">=", 0.50),
    ("rate10k_added_cpu_us", "agent tuned rate10k added CPU µs/req", "<=", 40.0),
    ("rate10k_completeness", "agent tuned rate10k completeness", ">=", 1.0),
    ("w1_entry", "agent entry W1 share", ">=", 0.15),
    ("w2_entry", "agent entry W2 share", ">=", 0.22),
    ("rate10k_p99_added_us", "agent tuned rate10k p99 added µs", "<=", 200.0),
    ("sse_delay_p99_ms", "SSE delay p99 ms (rate10k, tuned)", "<=", 250.0),
    ("saturation_drops_counted", "every missing transaction counted as a drop", "==", True),
)

HEADLINE_KEYS = (
    "w1_tuned", "w1_entry", "w1_floor_tuned", "w1_floor_entry", "w1_sslsniff", "w2_tuned", "w2_entry",
    "rate10k_added_cpu_us", "rate10k_completeness", "rate10k_p99_added_us", "sse_delay_p99_ms", "rss_mb",
    "saturation_drops_counted",
)


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _round(v: Any, nd: int = 3) -> Any:
    return round(v, nd) if isinstance(v, float) else v


def _paired(runs: list[dict], setup: str, workload: str, f: Callable[[dict, dict], float | None]) -> float | None:
    """Median over repetitions of ``f(traced run, untraced run of the same rep)``."""
    base = {r["rep"]: r for r in runs if r["setup"] == "untraced" and r["workload"] == workload and "error" not in r}
    out = []
    for r in runs:
        if r["setup"] == setup and r["workload"] == workload and "error" not in r and r["rep"] in base:
            out.append(f(r, base[r["rep"]]))
    return _median(out)


def _share(t: dict, u: dict) -> float | None:
    key = "bytes_per_s" if t["workload"] == "w2" else "rps"
    return t[key] / u[key] if u[key] else None


def summarize(runs: list[dict], setups: list[str], workloads: list[str]) -> dict:
    rows: dict[str, dict] = {}
    for s in setups:
        row: dict[str, Any] = {"label": LABELS.get(s, s)}
        errors = sorted({r["error"] for r in runs if r["setup"] == s and "error" in r})
        if errors:
            row["errors"] = errors
        for w in workloads:
            mine = [r for r in runs if r["setup"] == s and r["workload"] == w and "error" not in r]
            if not mine:
                continue
            cell: dict[str, Any] = {
                "runs": len(mine),
                "rps": _median([r["rps"] for r in mine]),
                "bytes_per_s": _median([r["bytes_per_s"] for r in mine]),
                "p50_us": _median([r["p50_us"] for r in mine]),
                "p99_us": _median([r["p99_us"] for r in mine]),
                "cpu_us_per_request": _median([r["cpu_us_per_request"] for r in mine]),
                "proc_cpu_us_per_request": _median([r["proc_cpu_us_per_request"] for r in mine]),
                "proc_added_cpu_us": _paired(runs, s, w, lambda t, u: t["proc_cpu_us_per_request"]
                                             - u["proc_cpu_us_per_request"]),
                "apps_cpu_us_per_request": _median([r["apps_cpu_us_per_request"] for r in mine]),
                "apps_added_cpu_us": _paired(runs, s, w, lambda t, u: t["apps_cpu_us_per_request"]
                                             - u["apps_cpu_us_per_request"]),
                "runs_with_foreign_tracers": sum(1 for r in mine if r["foreign_tracers"]),
                "share": _paired(runs, s, w, _share),
                "added_cpu_us": _paired(runs, s, w, lambda t, u: t["cpu_us_per_request"] - u["cpu_us_per_request"]),
                "p50_added_us": _paired(runs, s, w, lambda t, u: t["p50_us"] - u["p50_us"]),
                "p99_added_us": _paired(runs, s, w, lambda t, u: t["p99_us"] - u["p99_us"]),
            }
            if "probe_bpf_us_per_request" in mine[0]:
                cell["probe_bpf_us_per_request"] = _median([r["probe_bpf_us_per_request"] for r in mine])
                cell["probe_bpf_runs_per_request"] = _median([r["probe_bpf_runs_per_request"] for r in mine])
            if "probe_hits_per_request" in mine[0]:
                cell["probe_hits_per_request"] = _median([r["probe_hits_per_request"] for r in mine])
            if "lost_samples" in mine[0]:
                cell["lost_samples"] = sum(r["lost_samples"] for r in mine)
                cell["lost_sample_messages"] = sum(r["lost_sample_messages"] for r in mine)
            if "stream_client" in mine[0]:
                cell.update(_agent_cell(mine))
            row[w] = {k: _round(v) for k, v in cell.items()}
        rows[s] = row
    return {"setups": rows, "headline": headline(rows, runs)}


def _agent_cell(mine: list[dict]) -> dict:
    def completeness(r: dict) -> float | None:
        sides = [c for c in (r["completeness_client"], r["completeness_server"]) if c is not None]
        return min(sides) if sides else None

    drops: dict[str, int] = {}
    for r in mine:
        for k, v in r["drops"].items():
            drops[k] = drops.get(k, 0) + v
    return {
        "attach": mine[0]["attach"],
        "completeness": _median([completeness(r) for r in mine]),
        "completeness_worst": min((c for c in map(completeness, mine) if c is not None), default=None),
        "completeness_client": _median([r["completeness_client"] for r in mine]),
        "completeness_server": _median([r["completeness_server"] for r in mine]),
        "missing": sum(r["missing"] for r in mine),
        "drops": drops,
        "shed_calls": sum(r.get("shed_calls", 0) for r in mine),
        "drops_counted": all(r["drops_counted"] for r in mine),
        "settled": all(r["settled"] for r in mine),
        "sse_delay_p50_ms": _median([r["sse_delay_p50_ms"] for r in mine]),
        "sse_delay_p99_ms": _median([r["sse_delay_p99_ms"] for r in mine]),
        "rss_mb": max(r["rss_mb"] for r in mine),
        "own_cpu_us_per_request": _median([r.get("own_cpu_us_per_request") for r in mine]),
        "harness_cpu_us_per_request": _median([r.get("harness_cpu_us_per_request") for r in mine]),
        "hwm_mb": max(r["hwm_mb"] for r in mine),
    }


def headline(rows: dict, runs: list[dict]) -> dict:
    def get(setup: str, workload: str, key: str) -> Any:
        return rows.get(setup, {}).get(workload, {}).get(key)

    agent_runs = [r for r in runs if r["setup"].startswith("agent_") and "error" not in r]
    hwm = [r["hwm_mb"] for r in agent_runs if r.get("hwm_mb")]
    out = {
        "w1_tuned": get("agent_tuned", "w1", "share"),
        "w1_entry": get("agent_entry", "w1", "share"),
        "w1_floor_tuned": get("floor_tuned", "w1", "share"),
        "w1_floor_entry": get("floor_entry", "w1", "share"),
        "w1_sslsniff": get("sslsniff", "w1", "share"),
        "w2_tuned": get("agent_tuned", "w2", "share"),
        "w2_entry": get("agent_entry", "w2", "share"),
        "rate10k_added_cpu_us": get("agent_tuned", "rate10k", "added_cpu_us"),
        "rate10k_completeness": get("agent_tuned", "rate10k", "completeness"),
        "rate10k_p99_added_us": get("agent_tuned", "rate10k", "p99_added_us"),
        "sse_delay_p99_ms": get("agent_tuned", "rate10k", "sse_delay_p99_ms"),
        "rss_mb": max(hwm) if hwm else None,
        "saturation_drops_counted": all(r["drops_counted"] for r in agent_runs) if agent_runs else None,
        # Beyond the required keys: the same figures for the other rows.
        "w2_floor_tuned": get("floor_tuned", "w2", "share"),
        "w2_floor_entry": get("floor_entry", "w2", "share"),
        "w2_sslsniff": get("sslsniff", "w2", "share"),
        "rate10k_added_cpu_us_procs": get("agent_tuned", "rate10k", "proc_added_cpu_us"),
        "rate10k_apps_added_cpu_us": get("agent_tuned", "rate10k", "apps_added_cpu_us"),
        "rate10k_agent_cpu_us": get("agent_tuned", "rate10k", "own_cpu_us_per_request"),
        "rate10k_sse_client_cpu_us": get("agent_tuned", "rate10k", "harness_cpu_us_per_request"),
        "rate10k_entry_agent_cpu_us": get("agent_entry", "rate10k", "own_cpu_us_per_request"),
        "rate10k_entry_added_cpu_us": get("agent_entry", "rate10k", "added_cpu_us"),
        "rate10k_entry_added_cpu_us_procs": get("agent_entry", "rate10k", "proc_added_cpu_us"),
        "rate10k_entry_completeness": get("agent_entry", "rate10k", "completeness"),
        "rate10k_entry_p99_added_us": get("agent_entry", "rate10k", "p99_added_us"),
        "sse_delay_p99_ms_entry": get("agent_entry", "rate10k", "sse_delay_p99_ms"),
        "untraced_w1_rps": get("untraced", "w1", "rps"),
        "untraced_w2_bytes_per_s": get("untraced", "w2", "bytes_per_s"),
        "agent_tuned_attach": get("agent_tuned", "w1", "attach"),
        "runs_with_foreign_tracers": sum(1 for r in runs if r.get("foreign_tracers")),
    }
    return {k: _round(v) for k, v in out.items()}


def verdicts(head: dict) -> list[tuple[str, str, Any, str]]:
    """(PASS|MISS|n/a, what, value, target) per target."""
    out = []
    for key, what, op, limit in TARGETS:
        v = head.get(key)
        if v is None:
            verdict = "n/a"
        elif op == ">=":
            verdict = "PASS" if v >= limit else "MISS"
        elif op == "<=":
            verdict = "PASS" if v <= limit else "MISS"
        else:
            verdict = "PASS" if v == limit else "MISS"
        out.append((verdict, what, v, f"{op} {limit}"))
    return out


# ---------------------------------------------------------------------------
# Text


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return fmt.format(v)


def tables(summary: dict, reps: int, seconds: float, agent_args: list[str] | None = None) -> str:
    rows = summary["setups"]
    lines = [f"qtap-devtools bench: nginx 1 worker TLS keep-alive, wrk -t1, loopback; "
             f"median of {reps} rep(s) x {seconds:g}s; shares are of untraced in the same rep"
             + (f"; the agent run with {shlex.join(agent_args)}" if agent_args else ""), ""]
    head = (f"{'setup':<38} {'W1 req/s':>9} {'share':>6} {'W2 MB/s':>8} {'share':>6} "
            f"{'r10k req/s':>10} {'CPU µs/req':>10} {'added':>6} {'procs':>6} {'added':>6} {'apps':>6} {'added':>6} "
            f"{'p50 µs':>7} {'p99 µs':>7} {'+p99':>6}")
    lines += [head, "-" * len(head)]
    for s, row in rows.items():
        w1, w2, r = row.get("w1", {}), row.get("w2", {}), row.get("rate10k", {})
        if not (w1 or w2 or r):
            lines.append(f"{row['label']:<38} unavailable: {'; '.join(row.get('errors', ['not run']))}")
            continue
        base = s == "untraced"
        lines.append(
            f"{row['label']:<38} {_f(w1.get('rps'), '{:,.0f}'):>9} {_f(w1.get('share')):>6} "
            f"{_f((w2.get('bytes_per_s') or 0) / 1e6 if w2 else None, '{:,.0f}'):>8} {_f(w2.get('share')):>6} "
            f"{_f(r.get('rps'), '{:,.0f}'):>10} {_f(r.get('cpu_us_per_request'), '{:.1f}'):>10} "
            f"{'' if base else _f(r.get('added_cpu_us'), '{:+.1f}'):>6} "
            f"{_f(r.get('proc_cpu_us_per_request'), '{:.1f}'):>6} "
            f"{'' if base else _f(r.get('proc_added_cpu_us'), '{:+.1f}'):>6} "
            f"{_f(r.get('apps_cpu_us_per_request'), '{:.1f}'):>6} "
            f"{'' if base else _f(r.get('apps_added_cpu_us'), '{:+.1f}'):>6} "
            f"{_f(r.get('p50_us'), '{:.0f}'):>7} {_f(r.get('p99_us'), '{:.0f}'):>7} "
            f"{'' if base else _f(r.get('p99_added_us'), '{:+.0f}'):>6}"
        )
    extra = ["  CPU µs/req: system-wide busy time (/proc/stat) over the run per request; procs: the same summed "
             "over nginx, wrk, the setup's process and this harness only (with its SSE client, a C child reading every event); "
             "apps: nginx and wrk alone, the traced programs, where the probes cost; "
             "own µs/req (agent table): the agent's process alone; client: this harness's SSE client reading the stream"]
    if summary["headline"].get("runs_with_foreign_tracers"):
        extra.append(f"  warning: {summary['headline']['runs_with_foreign_tracers']} run(s) had other BPF users on "
                     "the machine (see runs[].foreign_tracers in results.json); their probes fire here too")
    for s in ("floor_entry", "floor_tuned"):
        if rows.get(s, {}).get("w1"):
            extra.append(f"  {LABELS[s]}: probe hits per request "
                         + ", ".join(f"{w} {_f(rows[s][w].get('probe_hits_per_request'), '{:.1f}')}"
                                     for w in ("w1", "w2", "rate10k") if rows[s].get(w)))
    for s, row in rows.items():
        cells = [(w, row[w]) for w in ("w1", "w2", "rate10k") if "probe_bpf_us_per_request" in row.get(w, {})]
        if any(c["probe_bpf_runs_per_request"] for _, c in cells):
            extra.append(f"  {row['label']}: BPF run time per request (--probe-stats; µs in programs/runs) "
                         + ", ".join(f"{w} {c['probe_bpf_us_per_request']:.2f}/{c['probe_bpf_runs_per_request']:.1f}"
                                     for w, c in cells))
    if rows.get("sslsniff", {}).get("w1"):
        extra.append("  sslsniff: lost samples (messages) "
                     + ", ".join(f"{w} {rows['sslsniff'][w]['lost_samples']:,} ({rows['sslsniff'][w]['lost_sample_messages']})"
                                 for w in ("w1", "w2", "rate10k") if rows["sslsniff"].get(w)))
    if extra:
        lines += [""] + extra
    agent_rows = [(s, row) for s, row in rows.items() if s.startswith("agent_") and any(k in row for k in ("w1", "w2", "rate10k"))]
    if agent_rows:
        lines += ["", f"{'agent':<27} {'attach':<22} {'run':<8} {'complete c/s':>13} {'missing':>8} "
                      f"{'lost rec':>9} {'pend drop':>9} {'sse drop':>9} {'cut body':>9} {'counted':>7} {'SSE ms p50/p99':>15} {'RSS/HWM MB':>11} {'own µs/req':>10} {'client':>6}"]
        lines.append("-" * len(lines[-1]))
        for s, row in agent_rows:
            for w in ("w1", "w2", "rate10k"):
                c = row.get(w)
                if not c:
                    continue
                d = c["drops"]
                lines.append(
                    f"{row['label']:<27} {c['attach'][:22]:<22} {w:<8} "
                    f"{_f(c['completeness_client'], '{:.4f}')}/{_f(c['completeness_server'], '{:.4f}'):>6} "
                    f"{c['missing']:>8,} {d.get('lost_records', 0):>9,} {d.get('pending_dropped_total', 0):>9,} "
                    f"{d.get('subscriberDrops', 0):>9,} {c.get('shed_calls', 0):>9,} {_f(c['drops_counted']):>7} "
                    f"{_f(c['sse_delay_p50_ms'], '{:.1f}')}/{_f(c['sse_delay_p99_ms'], '{:.1f}'):>7} "
                    f"{c['rss_mb']:>5.0f}/{c['hwm_mb']:<5.0f} {_f(c.get('own_cpu_us_per_request'), '{:.1f}'):>10} "
                    f"{_f(c.get('harness_cpu_us_per_request'), '{:.1f}'):>6}"
                )
    return "\n".join(lines)


def targets_text(head: dict) -> str:
    lines = ["", "targets:"]
    for verdict, what, value, target in verdicts(head):
        lines.append(f"  {verdict:<4}  {what:<46} {_f(value, '{:.3f}') if not isinstance(value, bool) else _f(value):>9}  (target {target})")
    return "\n".join(lines)
