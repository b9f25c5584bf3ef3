"""Command line: ``qtap-devtools [run|replay|har|doctor]``."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from qtap_devtools import __version__
from qtap_devtools.capfile import NotACaptureFile
from qtap_devtools.config import Config, ConfigError, Listen


def tunnel(port: int) -> str:
    """How to reach an agent on ``port`` from another machine."""
    return f"ssh -L {port}:localhost:{port} host"


TUNNEL = tunnel(10001)

MAIN_EXAMPLES = """\
examples:
  sudo qtap-devtools                          # capture, serve on 127.0.0.1:10001
  curl -sN http://localhost:10001/devtools/api/events
  sudo qtap-devtools run --output traffic-capture.txt
  qtap-devtools replay traffic-capture.txt    # study a capture later, no root needed
  qtap-devtools har traffic-capture.txt -o traffic.har
  sudo qtap-devtools doctor                   # what this machine supports
"""

RUN_EXAMPLES = """\
examples:
  sudo qtap-devtools run
  sudo qtap-devtools run --listen 127.0.0.1:9000 --output traffic-capture.txt
  sudo qtap-devtools run --max-body-bytes 65536 --log-level debug
  sudo qtap-devtools run --max-capture-rate 0    # every body at any rate, whatever it costs
  sudo qtap-devtools run --cpu-priority normal   # under full load, keep up at the traced programs' expense
  # then, in another terminal:
  curl -sN http://localhost:10001/devtools/api/events | grep "request.http_transaction" -A1
  curl -sN 'http://localhost:10001/devtools/api/events?type=request.http_transaction&status=4xx'
  # from your laptop: %s, then open http://localhost:10001/devtools
""" % TUNNEL

REPLAY_EXAMPLES = """\
examples:
  qtap-devtools replay traffic-capture.txt
  qtap-devtools replay traffic-capture.txt --speed 1 --listen 127.0.0.1:10002
  curl -sN http://localhost:10002/devtools/api/events | grep "^data:" | sed 's/^data: //' | jq .
  # (for curl the stream ends after the file's last event; the page stays connected)
"""

HAR_EXAMPLES = """\
examples:
  qtap-devtools har traffic-capture.txt -o traffic.har
  qtap-devtools har traffic-capture.txt | jq '.log.entries[].request.url'
  curl -sN http://localhost:10002/devtools/api/events | qtap-devtools har - -o replayed.har
"""

DOCTOR_EXAMPLES = """\
examples:
  sudo qtap-devtools doctor
  sudo qtap-devtools doctor --agent http://127.0.0.1:10002   # drop counters of the agent serving there
  QTAP_TOKEN=… sudo -E qtap-devtools doctor                # an agent started with --token
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, not a usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# A transaction with two bodies this size is ~57 MiB of event (each body is
# base64-encoded twice): within the 64 MiB a capture file's line, a client's
# queue and the history each hold.  Larger, the agent's own capture file
# could not be replayed (capfile.MAX_LINE).
MAX_BODY_BYTES = 16 << 20


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib")
    try:
        value = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1048576, 64k, 1m)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("size must not be negative")
    return value


def _body_bytes(text: str) -> int:
    """--max-body-bytes: a size, at most MAX_BODY_BYTES."""
    value = _size(text)
    if value > MAX_BODY_BYTES:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_BODY_BYTES >> 20}m: a transaction with two such bodies is ~57 MiB of event (each "
            "body base64-encoded twice), what a capture file's line and a client's queue hold")
    return value


def _int_in(lo: int, hi: int, *, power_of_two: bool = False):
    """An argparse type: an integer from ``lo`` to ``hi`` (a power of two if asked)."""

    def parse(text: str) -> int:
        what = f"a power of two from {lo} to {hi}" if power_of_two else f"an integer from {lo} to {hi}"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}") from None
        if not lo <= value <= hi or (power_of_two and value & (value - 1)):
            raise argparse.ArgumentTypeError(f"{value}: expected {what}")
        return value

    return parse


def _listen(text: str) -> Listen:
    try:
        listen = Listen.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    try:
        ipaddress.ip_address(listen.host)
    except ValueError:  # a name: one that names nothing is said so, not called "not loopback"
        try:
            socket.getaddrinfo(listen.host, listen.port, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            raise argparse.ArgumentTypeError(
                f"--listen {text!r}: cannot resolve {listen.host!r} ({exc.strerror or exc}); "
                f"give an address, e.g. 127.0.0.1:{listen.port or 10001}") from None
    if listen.port == 0:
        # "Any free port", chosen now: the agent leaves its own port out of the
        # capture and names it in its Host check and start-up line, so it must
        # know the number before it serves.
        listen = Listen(listen.host, _free_port(listen.host))
    return listen


def _output_path(text: str) -> Path:
    """--output: "-" is standard output, as `har -` reads standard input (it
    made a file named "-"; "./-" still names one)."""
    return Path("/dev/stdout") if text == "-" else Path(text)


def _agent_url(text: str) -> str:
    try:
        parts = urlsplit(text)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. "http://[::1": an unclosed IPv6 bracket
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r}: expected the agent's URL, e.g. http://127.0.0.1:10001")
    return text


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"--listen {host}:0: no free port: {exc.strerror or exc}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", type=_listen, default=Listen(), metavar="HOST:PORT",
                   help="where to serve (default 127.0.0.1:10001; loopback only unless --token)")
    p.add_argument("--token", help="require this token (Bearer or ?token=); needed for a non-loopback --listen")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--queue-size", type=_int_in(16, 1_000_000), default=4096, metavar="N",
                   help="events a slow SSE client may lag before it is told it missed some (16 to 1000000, "
                        "default 4096)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="qtap-devtools",
        description="See every HTTP request your processes make or serve — HTTPS included, no proxy — "
        "as a Qtap DevTools event stream and browser page.",
        epilog=MAIN_EXAMPLES,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"qtap-devtools {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="capture and serve (the default; needs root)", epilog=RUN_EXAMPLES,
                         formatter_class=fmt)
    _common(run)
    run.add_argument("--output", "-o", type=_output_path, metavar="FILE",
                     help="also append the stream to FILE (same bytes as the SSE stream; replayable); - for "
                          "standard output (the status lines then go to stderr)")
    run.add_argument("--max-body-bytes", type=_body_bytes, default=1 << 20, metavar="N",
                     help="bodies kept per message, beyond which they are marked truncated (default 1m, at most 16m)")
    run.add_argument("--ring-mib", type=_int_in(1, 1024, power_of_two=True), default=Config.ring_mib, metavar="MIB",
                     help="BPF ring buffer size, a power of two from 1 to 1024 (default %(default)s; bigger "
                          "absorbs longer bursts, and all of it stays resident)")
    run.add_argument("--attach-mode", choices=["auto", "entry"], default="auto",
                     help="auto: cheap probe sites where provable; entry: classic entry/return probes")
    run.add_argument("--cpu-priority", choices=["auto", "idle", "low", "normal"], default="auto",
                     help="auto (default): use only CPU the traced programs leave unused while keeping up, and "
                          "compete as an equal once behind; idle: always yield (under full load: fall behind, "
                          "shed and count drops rather than slow them); low: nice 19; normal: always an equal")
    run.add_argument("--no-shed", action="store_true",
                     help="when capture falls behind, lose whole records instead of cutting bodies "
                          "(default: keep every message head, cut bodies, count what was cut)")
    run.add_argument("--max-capture-rate", type=float, default=None, metavar="MIB",
                     help="MiB of plaintext a second to capture whole; past it, keep message heads and cut bodies "
                          "(marked \"shed\", counted) so the agent's CPU stays bounded. 0: no limit (default 32)")
    run.add_argument("--capture-own-port", action="store_true",
                     help="also capture connections to this agent's own port (off: each event would be captured again)")
    run.add_argument("--no-docker", action="store_true", help="do not ask Docker for container names")
    run.add_argument("--docker-url", metavar="URL", help="Docker daemon (default unix:///var/run/docker.sock)")
    run.add_argument("--kube-api", metavar="URL", help="Kubernetes API server URL (default: in-cluster or kubeconfig)")
    run.add_argument("--node-name", metavar="NAME", help="this node's name for pod lookups (default: $NODE_NAME)")

    rp = sub.add_parser("replay", help="serve a capture file on the same endpoints (no root)",
                        epilog=REPLAY_EXAMPLES, formatter_class=fmt)
    rp.add_argument("file", type=Path,
                    help="a capture file (run --output FILE, or the event stream saved by curl); - reads standard input")
    _common(rp)
    rp.add_argument("--max-gap", type=float, default=5.0, metavar="SECONDS",
                    help="with --speed, a quiet spell longer than this is shortened to it (default 5)")
    rp.add_argument("--speed", type=float, default=0.0,
                    help="1 = as recorded, 2 = twice as fast, 0 = all at once (default 0)")

    hp = sub.add_parser("har", help="convert a capture file to HAR 1.2", epilog=HAR_EXAMPLES, formatter_class=fmt)
    hp.add_argument("file", type=Path,
                    help="a capture file (run --output FILE, or the event stream saved by curl); - reads standard input")
    hp.add_argument("--output", "-o", type=Path, metavar="FILE", help="write here instead of stdout")
    hp.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])

    dp = sub.add_parser("doctor", help="check what this machine supports", epilog=DOCTOR_EXAMPLES,
                        formatter_class=fmt)
    dp.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    dp.add_argument("--agent", default="http://127.0.0.1:10001", metavar="URL", type=_agent_url,
                    help="also report the drop counters of the agent serving here (default %(default)s)")
    dp.add_argument("--token", default=os.environ.get("QTAP_TOKEN"),
                    help="the token of an agent started with --token (default: $QTAP_TOKEN)")
    return parser


def _capture_rate(args: argparse.Namespace) -> float:
    rate = args.max_capture_rate
    if rate is None:
        return 0.0 if args.no_shed else Config.max_capture_mib_per_s
    if rate != rate or rate < 0 or rate == float("inf"):
        raise ConfigError(f"--max-capture-rate {rate:g}: must be a number of MiB a second, 0 for no limit")
    if rate and args.no_shed:
        raise ConfigError("--max-capture-rate works by cutting bodies, which --no-shed turns off: drop one of them")
    return rate


def _config(args: argparse.Namespace) -> Config:
    if args.token is not None and not args.token.strip():
        raise ConfigError("--token: must not be empty (an empty token would let anyone in)")
    if not args.listen.is_loopback and not args.token:
        raise ConfigError(
            f"refusing to listen on {args.listen.host}: the stream carries every captured header, body and "
            f"token, so it stays on loopback. From another machine use an SSH tunnel: {tunnel(args.listen.port)} "
            "(or pass --token to require a token)"
        )
    extra = {}
    if args.command == "run":
        extra = dict(
            output=args.output,
            max_body_bytes=args.max_body_bytes,
            ring_mib=args.ring_mib,
            attach_mode=args.attach_mode,
            cpu_priority=args.cpu_priority,
            shed=not args.no_shed,
            max_capture_mib_per_s=_capture_rate(args),
            capture_own_port=args.capture_own_port,
            docker=not args.no_docker,
            docker_url=args.docker_url,
            kube_api=args.kube_api,
            node_name=args.node_name or os.environ.get("NODE_NAME"),
        )
    elif args.command == "replay":
        if not 0 <= args.speed < math.inf:  # (not <: nan is neither)
            raise ConfigError("--speed must be 0 (all at once) or a finite factor, e.g. 1 or 10")
        if not 0 < args.max_gap < math.inf:
            raise ConfigError("--max-gap must be more than 0 and finite")
        extra = dict(replay_speed=args.speed, replay_max_gap=args.max_gap)
    return Config(listen=args.listen, log_level=args.log_level, client_queue_size=args.queue_size, **extra)


def _readable(path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a capture file")
    if path.is_char_device() or path.is_block_device():  # /dev/zero: a line that never ends
        raise ConfigError(f"{path}: is a device, expected a capture file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{path}: not readable")
    # A pipe we hold open already (stdin, `<(zcat f.gz)`'s /dev/fd/63) has its
    # writer: only a named FIFO waits for one.
    if path.is_fifo() and not str(path).startswith(("/dev/stdin", "/dev/fd/", "/proc/self/fd/")):
        print(f"qtap-devtools: {path} is a FIFO: waiting for a writer to open it (Ctrl-C to stop)",
              file=sys.stderr, flush=True)


def _writable(path: Path) -> None:
    """``--output`` must be appendable now, not fail once capture has started."""
    try:
        if path.is_dir():
            raise ConfigError(f"--output {path}: is a directory, expected a file")
        if path.is_fifo():
            # Opened (and closed) here, its reader would see the end of it.
            # The agent opens it once, and that waits for a reader, as tee would.
            if not os.access(path, os.W_OK):
                raise ConfigError(f"--output {path}: cannot write: Permission denied")
            print(f"qtap-devtools: --output {path} is a FIFO: waiting for a reader to open it (Ctrl-C to stop)",
                  flush=True)
            return
        with open(path, "ab"):  # creates it, as the agent would; appends nothing
            pass
    except OSError as exc:  # includes a parent directory we may not search
        raise ConfigError(f"--output {path}: cannot write: {exc.strerror or exc}") from None


def _is_stdout(path: Path) -> bool:
    """Whether ``path`` is the file or pipe standard output writes to."""
    try:
        st, out = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no stdout, or a stand-in without a descriptor
        return False
    return (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino)


def _har_output(path: Path, source: Path) -> None:
    """``har --output`` must be writable, and not the capture it converts;
    checked without creating it (a failed conversion leaves nothing behind)."""
    label = f"--output {path}"
    if path.is_dir():
        raise ConfigError(f"{label}: is a directory, expected a file")
    try:
        same = path.exists() and os.path.samefile(path, source)
    except OSError:
        same = False
    if same:
        raise ConfigError(f"{label}: is the capture file being converted; choose another name")
    if not path.parent.is_dir():
        raise ConfigError(f"{label}: cannot write: No such file or directory")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise ConfigError(f"{label}: cannot write: Permission denied")


def _write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: a regular file through a temporary file
    renamed over it, so a failure (a full disk) leaves nothing half-written;
    anything else (/dev/stdout, a pipe) directly."""
    try:
        if path.exists() and not path.is_file():
            path.write_bytes(data)
            return
        if path.exists():
            mode = path.stat().st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            os.fchmod(fd, mode)  # as open() would have made it, not mkstemp's 0600
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:  # the disk filled meanwhile
        raise ConfigError(f"--output {path}: cannot write: {exc.strerror or exc}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        # A long-running agent's log has times; a one-shot conversion's
        # messages read like the rest of its output.
        format=("qtap-devtools: %(message)s" if args.command == "har"
                else "%(asctime)s %(levelname)s %(name)s: %(message)s"),
        stream=sys.stderr,
    )
    if logging.getLogger().level > logging.DEBUG:
        # The Docker and Kubernetes clients' HTTP library warns at each retry
        # of each attempt (three lines a second while the API is down); the
        # agent says once that it is unavailable, and when it is back.
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    try:
        if args.command == "doctor":
            from qtap_devtools import doctor

            return doctor.run(agent_url=args.agent, token=args.token)
        if args.command == "har":
            return _har(args)
        config = _config(args)
        if args.command == "replay":
            if str(args.file) == "-":  # read whole at start, as a file is: `zcat f.gz | qtap-devtools replay -`
                args.file = Path("/dev/stdin")
            _readable(args.file)
            from qtap_devtools import replay, runner

            rt = replay.build_runtime(config, args.file)
            rt.token = args.token
            return asyncio.run(runner.serve(rt))
        if config.output is not None:
            if _is_stdout(config.output):
                # `--output /dev/stdout > cap.txt` (or `| gzip`): stdout is the
                # capture.  The status lines, written there through another
                # open of the file at its own offset, wrote over the capture's
                # first bytes (its greeting; a line at the stop, its first
                # events); in a pipe they were lines of junk among the frames.
                sys.stdout = sys.stderr
            _writable(config.output)
        from qtap_devtools import agent

        return agent.main(config, token=args.token)
    except ConfigError as exc:
        print(f"qtap-devtools: error: {exc}", file=sys.stderr)
        return 2
    except NotACaptureFile as exc:
        print(f"qtap-devtools: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"qtap-devtools: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _har(args: argparse.Namespace) -> int:
    from qtap_devtools import har, replay

    if str(args.file) == "-":  # a pipe: `zcat old.txt.gz | qtap-devtools har -`
        args.file = Path("/dev/stdin")
    _readable(args.file)
    if args.output:
        _har_output(args.output, args.file)  # before the conversion, not after it
    said: list[str] = []
    events, bad, left_out = replay.load(args.file, notes=said)
    if left_out:
        said.append(f"only the first {len(events)} events of {args.file} (the replay limits); {left_out} more left out")
    doc = har.from_envelopes(events, "; ".join(said) or None)
    data = orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
    if args.output:
        _write_whole(args.output, data)
    notes = [f"{bad} bad record{'s' if bad > 1 else ''} skipped"] if bad else []
    if "comment" in doc["log"]:
        notes.append(doc["log"]["comment"])
    if args.output or notes:
        n = len(doc["log"]["entries"])
        print(f"{n} {'entry' if n == 1 else 'entries'}" + (f" written to {args.output}" if args.output else "")
              + "".join(f"; {n}" for n in notes), file=sys.stderr)
    if not args.output:
        sys.stdout.buffer.write(data)
    return 0
