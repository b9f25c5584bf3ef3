"""``qtap-devtools doctor``: what this kernel and machine support, and why.

One line per check with the fix for what fails; the exit status is non-zero
when capture cannot work.  Kprobes and fentry are reported but not required:
the agent is built on uprobes and tracepoints only (DESIGN §3).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qtap_devtools import compiled, kheaders

TRACEFS = Path("/sys/kernel/tracing")
BTF = Path("/sys/kernel/btf/vmlinux")


def _is_dir(path: Path) -> bool:
    """``Path.is_dir`` that answers False where we may not look (not root:
    ``/sys/kernel/tracing`` is mode 700) instead of raising."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _unreadable(path: Path) -> bool:
    """True if ``path`` exists but this user may not list it."""
    try:
        path.stat()
    except OSError:
        return False
    return not os.access(path, os.R_OK | os.X_OK)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # a failure means capture cannot work

    def line(self) -> str:
        mark = "ok  " if self.ok else ("FAIL" if self.required else "warn")
        text = f"[{mark}] {self.name}: {self.detail}"
        if not self.ok and self.fix:
            text += f" — fix: {self.fix}"
        return text


def _root() -> Check:
    if os.geteuid() == 0:
        return Check("root", True, "running as root")
    caps = _cap_eff()
    needed = {"CAP_BPF": 39, "CAP_PERFMON": 38, "CAP_SYS_ADMIN": 21}
    have = [n for n, bit in needed.items() if caps >> bit & 1]
    ok = "CAP_SYS_ADMIN" in have or {"CAP_BPF", "CAP_PERFMON"} <= set(have)
    return Check("root", ok, f"uid {os.geteuid()}, capabilities {have or 'none'}",
                 "run as root: sudo qtap-devtools … (or grant CAP_BPF+CAP_PERFMON+CAP_SYS_ADMIN)")


def _cap_eff() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _bpf_syscall() -> Check:
    unpriv = Path("/proc/sys/kernel/unprivileged_bpf_disabled")
    detail = "bpf() syscall present"
    if unpriv.exists():
        detail += f" (unprivileged_bpf_disabled={unpriv.read_text().strip()})"
    jit = Path("/proc/sys/net/core/bpf_jit_enable")
    if jit.exists():
        detail += f", JIT={jit.read_text().strip()}"
    return Check("bpf", Path("/sys/fs/bpf").exists() or unpriv.exists(), detail,
                 "a kernel built with CONFIG_BPF_SYSCALL=y")


def _btf() -> Check:
    ok = _exists(BTF)
    return Check("btf", ok, f"{BTF} present" if ok else "no kernel BTF",
                 "a kernel with CONFIG_DEBUG_INFO_BTF=y (the probes keep each thread's TLS call in task "
                 "storage, which needs it)")


def _tracefs() -> Check:
    if _is_dir(TRACEFS / "events"):
        return Check("tracefs", True, f"mounted at {TRACEFS}")
    if _unreadable(TRACEFS):
        return Check("tracefs", False, f"{TRACEFS} is not readable by uid {os.geteuid()}",
                     "run doctor as root: sudo qtap-devtools doctor", required=False)
    return Check("tracefs", False, f"not mounted at {TRACEFS} (the agent mounts it at start)",
                 f"mount -t tracefs none {TRACEFS}", required=False)


def _tracepoints() -> Check:
    needed = ["syscalls/sys_enter_connect", "syscalls/sys_exit_read", "sched/sched_process_exec",
              "sock/inet_sock_set_state"]
    events = TRACEFS / "events"
    if not _is_dir(events):
        if _unreadable(TRACEFS):
            return Check("tracepoints", False, f"cannot list tracepoints: {TRACEFS} is not readable by "
                         f"uid {os.geteuid()}", "run doctor as root: sudo qtap-devtools doctor")
        return Check("tracepoints", False, "tracefs is not mounted, cannot list tracepoints",
                     f"mount -t tracefs none {TRACEFS}")
    missing = [n for n in needed if not _is_dir(events / n)]
    return Check("tracepoints", not missing,
                 "syscalls, sched and sock tracepoints available" if not missing else f"missing {missing}",
                 "a kernel with CONFIG_FTRACE_SYSCALLS=y")


def _uprobes() -> Check:
    ok = _exists(TRACEFS / "uprobe_events") or _exists(Path("/sys/bus/event_source/devices/uprobe"))
    return Check("uprobes", ok, "uprobe PMU available" if ok else "no uprobe support",
                 "a kernel with CONFIG_UPROBE_EVENTS=y")


def _kprobes() -> Check:
    ok = _exists(Path("/sys/bus/event_source/devices/kprobe")) and _exists(TRACEFS / "kprobe_events")
    # Either way fine, so never a warning: the agent needs none (these machines have none).
    return Check("kprobes", True, "available (unused)" if ok else "absent — fine: the agent needs none",
                 required=False)


def _bcc() -> Check:
    try:
        import bcc  # noqa: F401
    except Exception as exc:
        return Check("bcc", False, f"cannot import bcc: {exc}",
                     "apt-get install python3-bpfcc bpfcc-tools libbpfcc, and use a venv with --system-site-packages")
    return Check("bcc", True, f"bcc {getattr(bcc, '__version__', '?')} from {Path(bcc.__file__).parent}")


def _compiled() -> Check:
    ok, detail = compiled.describe()
    return Check("compiled parts", ok, detail, "" if ok else "make setup (needs gcc and python3-dev)", required=False)


def _headers(cache_dir: Path | None) -> Check:
    h = kheaders.resolve(cache_dir)
    # A "missing" result already says how to fix it; do not add a second fix.
    return Check("kernel headers", h.ok, h.detail, "" if "fix:" in h.detail else "apt-get install linux-headers-amd64")


def _trial_load(cache_dir: Path | None) -> Check:
    try:
        from bcc import BPF
    except Exception:
        return Check("trial probe", False, "skipped: bcc does not import", "see the bcc line")
    if not _root().ok:
        return Check("trial probe", False, "skipped: loading a probe needs root",
                     "run as root: sudo qtap-devtools doctor")
    kheaders.apply(cache_dir)
    from qtap_devtools.capture.loader import ensure_tracefs

    try:
        ensure_tracefs()
        # What the capture probes need of the kernel: a ring buffer, and task
        # storage (5.11+, with BTF) for the TLS call in flight.
        bpf = BPF(text="""
struct task_struct;
BPF_RINGBUF_OUTPUT(trial, 1);
BPF_TASK_STORAGE(trial_slot, u32);
TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 pid = args->child_pid;
    u32 *slot = trial_slot.task_storage_get((struct task_struct *)bpf_get_current_task_btf(), 0,
                                            BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (slot)
        *slot = pid;
    trial.ringbuf_output(&pid, sizeof(pid), 0);
    return 0;
}
""")
        bpf.cleanup()
    except Exception as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return Check("trial probe", False, f"compile/load failed: {last}", "run doctor as root; check the lines above")
    return Check("trial probe", True,
                 "compiled, verified and attached a tracepoint probe with a ring buffer and task storage")


def _capture_probes() -> Check:
    """Load the real probes and attach them, as the agent would, then detach."""
    try:
        from qtap_devtools.capture.loader import Capture, CaptureError
    except Exception as exc:
        return Check("capture probes", False, f"cannot import the capture layer: {exc}", "make setup")
    cap = Capture(lambda batch: None, seed_existing=False)
    try:
        cap.start()
    except CaptureError as exc:
        text = str(exc)
        return Check("capture probes", False, text, "" if "fix:" in text else "see the lines above")
    try:
        atts = cap.attachments
    finally:
        cap.stop()
    ok = [a for a in atts if a.ok]
    bad = [a for a in atts if not a.ok]
    detail = f"all probes load; attached to {len(ok)} file(s): " + ", ".join(
        f"{a.path} ({a.library}, {a.mode})" for a in ok[:6]) + (" …" if len(ok) > 6 else "")
    if bad:
        detail += "; failed: " + "; ".join(f"{a.path}: {a.error}" for a in bad[:4])
    return Check("capture probes", bool(ok), detail, "install libssl3 / check the failures listed")


def _docker() -> Check:
    sock = Path("/var/run/docker.sock")
    if not sock.exists():
        return Check("docker", False, "no /var/run/docker.sock: container names will be missing",
                     "start Docker (systemctl start docker) if you run containers", required=False)
    try:
        import docker

        docker.DockerClient(base_url="unix://var/run/docker.sock", timeout=2).ping()
    except Exception as exc:
        return Check("docker", False, f"socket present but daemon does not answer: {exc}",
                     "systemctl start docker", required=False)
    return Check("docker", True, "daemon answers on /var/run/docker.sock")


def _tls_libraries() -> Check:
    try:
        from qtap_devtools.capture import attach
    except Exception as exc:  # capture layer missing its dependencies
        return Check("tls libraries", False, f"cannot inspect: {exc}", required=False)
    found = {}
    for path in attach.library_dir_candidates():
        lib = attach.library_of(path)
        if lib:
            found.setdefault(os.path.realpath(path), lib)
    if not found:
        return Check("tls libraries", False, "no libssl/libgnutls found", "apt-get install libssl3", required=False)
    lines = ", ".join(f"{path} ({lib})" for path, lib in list(found.items())[:8])
    more = f" and {len(found) - 8} more" if len(found) > 8 else ""
    return Check("tls libraries", True, f"{len(found)} in library directories: {lines}{more} "
                 "(plus libraries and binaries mapped by running processes, found at start)", required=False)


# Every place an event can be lost on its way to a client, as /devtools/api/stats
# names it, and what to do about it (None: a fixed limit, nothing to tune).
DROP_COUNTERS = (
    ("capture", "lost_records", "records the kernel could not fit in the ring buffer",
     "a bigger --ring-mib"),
    ("capture", "calls_over_record_limit", "read/write calls over 1 MiB (or 16 iovecs) whose bytes past that were "
                                           "not copied", None),
    ("capture", "pending_dropped_total", "events dropped before publishing",
     "check that Docker answers promptly (--no-docker to do without container names)"),
    ("capture", "shed_calls", "calls whose body was cut while capture was behind or over --max-capture-rate (heads kept)",
     "a higher --max-capture-rate, if whole bodies matter more than the agent's CPU"),
    ("capture", "shed_calls_by_probes", "of those, cut by the probes on their own (the ring half full before the "
                                        "agent's reader got a core)",
     "--cpu-priority normal or a bigger --ring-mib, if the traced programs can spare it"),
    ("broadcast", "subscriberDrops", "events slow clients missed (each told by system.dropped)",
     "fewer or faster clients, or a bigger --queue-size"),
    ("capture", "file_write_errors", "events the --output file lacks (writes failed: disk full?)",
     "free space where --output writes, or another --output"),
    ("capture", "file_events_dropped", "events the --output file lacks (it fell 64 MiB behind: slow disk or pipe?)",
     "a faster disk for --output, or a reader of its pipe that keeps up"),
)


def _running_agent(url: str, token: str | None = None) -> Check:
    """The drop counters of an agent already serving at ``url``, if one is."""
    import urllib.error
    import urllib.request

    import orjson

    req = urllib.request.Request(url.rstrip("/") + "/devtools/api/stats",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            stats = orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:  # it answers, but not with its stats
        if exc.code == 401:
            why = "its token was wrong" if token else "it was started with --token"
            return Check("running agent", False, f"the agent at {url} refused the request ({why})",
                         "pass its token: --token TOKEN or QTAP_TOKEN=TOKEN", required=False)
        return Check("running agent", False, f"the agent at {url} answered HTTP {exc.code}", required=False)
    except (OSError, ValueError) as exc:  # URLError is an OSError; a page that is not JSON, a ValueError
        return _no_agent(url, exc)
    counts = [(int((stats.get(section) or {}).get(key) or 0), what, fix) for section, key, what, fix in DROP_COUNTERS]
    lost = [f"{n:,} {what}" for n, what, _ in counts if n]
    fixes = "; ".join(dict.fromkeys(fix for n, _, fix in counts if n and fix))
    detail = f"{stats.get('mode', '?')} agent at {url}, up {stats.get('uptime_seconds', '?')} s; "
    capture = stats.get("capture") or {}
    if capture.get("cpu_priority"):
        lifts = capture.get("cpu_priority_reader_lifts")
        detail += (f"CPU priority {capture['cpu_priority']}, now {capture.get('cpu_priority_now', '?')}"
                   + (f", the ring reader lifted {lifts:,} times by its watchdog" if isinstance(lifts, int) and lifts
                      else "") + "; ")
    failed = capture.get("tuned_analysis_failures")
    if isinstance(failed, int) and failed:  # a worker that crashed or hung on a file: entry probes there
        detail += (f"{failed:,} TLS library analyses failed (those files have entry probes, ~18 µs more a call; "
                   "the agent's log names them); ")
    arming = capture.get("probe_arming")
    if arming and arming != "per file":  # an older kernel: a call made while probes are placed can be half seen
        detail += f"probe arming {arming}; "
    enrich = capture.get("enrich") if isinstance(capture.get("enrich"), dict) else {}
    for name, what in (("kubernetes", "pod names come only from kubelet container labels"),
                       ("docker", "container names are missing")):
        state = (enrich.get(name) or {}).get("state") if isinstance(enrich.get(name), dict) else None
        if isinstance(state, str) and state.startswith("unavailable"):
            detail += f"{name} {state} ({what}); "
    if not lost:
        return Check("running agent", True, detail + "nothing dropped", required=False)
    return Check("running agent", False, detail + "; ".join(lost), fixes, required=False)


def _no_agent(url: str, exc: BaseException) -> Check:
    """No agent's stats at ``url``: nothing listening is fine (none runs);
    anything else answering, or a front whose certificate is not trusted, is
    said as it is, not as "none answers"."""
    import ssl
    import urllib.error

    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ConnectionRefusedError):
        return Check("running agent", True, f"none answers at {url}", required=False)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return Check("running agent", False, f"cannot check the agent at {url}: its TLS certificate is not trusted "
                     f"({reason.verify_message or reason})",
                     "ask the agent itself, on its own address (e.g. --agent http://127.0.0.1:10001), or trust the "
                     "front's CA (SSL_CERT_FILE=ca.pem)", required=False)
    if isinstance(reason, (TimeoutError, OSError)):
        return Check("running agent", False, f"cannot reach {url}: {getattr(reason, 'strerror', None) or reason}",
                     required=False)
    return Check("running agent", False, f"what answers at {url} is not a qtap-devtools agent ({exc})",
                 required=False)


def run(cache_dir: Path | None = None, print_fn: Callable[[str], None] = print,
        agent_url: str = "http://127.0.0.1:10001", token: str | None = None) -> int:
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("root", _root), ("bpf", _bpf_syscall), ("btf", _btf), ("tracefs", _tracefs),
        ("tracepoints", _tracepoints), ("uprobes", _uprobes), ("kprobes", _kprobes), ("bcc", _bcc),
        ("compiled parts", _compiled),
        ("kernel headers", lambda: _headers(cache_dir)), ("trial probe", lambda: _trial_load(cache_dir)),
        ("tls libraries", _tls_libraries), ("capture probes", _capture_probes), ("docker", _docker),
        ("running agent", lambda: _running_agent(agent_url, token)),
    ]
    print_fn(f"qtap-devtools doctor — kernel {platform.release()} on {platform.machine()}")
    failed = []
    for name, make in checks:
        try:
            check = make()
        except Exception as exc:  # a check must never crash the report
            check = Check(name, False, f"check crashed: {exc!r}")
        print_fn(check.line())
        if not check.ok and check.required:
            failed.append(check.name)
    if failed:
        print_fn(f"capture cannot work here: fix {', '.join(failed)} (see above)")
        return 1
    print_fn("capture possible: uprobes on TLS libraries and syscall/sched tracepoints")
    return 0
