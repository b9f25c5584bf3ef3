"""The command line: its help examples are real command lines, a bad
``--output`` is refused up front, and the shipped example capture replays."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time

import orjson
import pytest

from qtap_devtools import capfile
from qtap_devtools import cli as cli_mod
from qtap_devtools.config import ConfigError
from qtap_devtools.events import Envelope
from tests.agentproc import ROOT, agent, free_port, get
from tests.stream import StreamReader, tx_of

EXAMPLE = ROOT / "examples" / "traffic-capture.txt"


def cli(*args, prefix: list[str] = (), timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "qtap_devtools", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def unprivileged() -> list[str]:
    """A command prefix that drops root (as root), or nothing (already not root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


# --------------------------------------------------------------------------
# Help examples


def example_commands(epilog: str) -> list[list[str]]:
    """The qtap-devtools command lines of an ``examples:`` epilog, as argv."""
    out = []
    for line in epilog.splitlines():
        words = shlex.split(line.split(" | ")[0], comments=True)  # the command, not what it is piped to
        if words[:1] == ["sudo"]:
            words = words[1:]
        if words[:1] == ["qtap-devtools"]:
            out.append(words[1:])
    return out


@pytest.mark.parametrize("epilog,command", [
    (cli_mod.MAIN_EXAMPLES, None), (cli_mod.RUN_EXAMPLES, "run"), (cli_mod.REPLAY_EXAMPLES, "replay"),
    (cli_mod.HAR_EXAMPLES, "har"), (cli_mod.DOCTOR_EXAMPLES, "doctor"),
])
def test_every_help_example_is_a_command_line_the_parser_accepts(epilog, command):
    commands = example_commands(epilog)
    assert commands, epilog
    parser = cli_mod.build_parser()
    for argv in commands:
        if command is not None:
            assert argv[:1] == [command], f"{command} --help shows an example of another command: {argv}"
        full = argv if argv and not argv[0].startswith("-") else ["run", *argv]  # bare = run, as main() does
        args = parser.parse_args(full)  # exits 2 (fails the test) on a flag that does not exist
        assert args.command == full[0]


@pytest.mark.parametrize("command,expected", [
    ([], ["sudo qtap-devtools run --output traffic-capture.txt", "qtap-devtools replay traffic-capture.txt",
          "sudo qtap-devtools doctor"]),
    (["run"], ["sudo qtap-devtools run --listen 127.0.0.1:9000 --output traffic-capture.txt",
               'curl -sN http://localhost:10001/devtools/api/events | grep "request.http_transaction" -A1',
               "ssh -L 10001:localhost:10001"]),
    (["replay"], ["qtap-devtools replay traffic-capture.txt --speed 1 --listen 127.0.0.1:10002"]),
    (["har"], ["qtap-devtools har traffic-capture.txt -o traffic.har"]),
    (["doctor"], ["sudo qtap-devtools doctor"]),
])
def test_help_shows_real_examples(command, expected):
    r = cli(*command, "--help")
    assert r.returncode == 0, r.stderr
    examples = r.stdout.split("examples:\n", 1)[1]
    for line in expected:
        assert line in examples, f"{line!r} not in the examples of {command}:\n{examples}"


# --------------------------------------------------------------------------
# --output


@pytest.mark.parametrize("where", ["missing-dir/capture.txt", ".", "a-file/capture.txt"])
def test_unwritable_output_is_one_line_and_exit_2(tmp_path, where):
    (tmp_path / "a-file").write_text("")
    path = tmp_path / where
    r = cli("run", "--output", str(path), "--listen", f"127.0.0.1:{free_port()}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"qtap-devtools: error: --output {path}:")
    assert "serving" not in r.stdout  # refused before anything started


def test_output_the_user_may_not_write_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    r = cli("run", "--output", str(locked / "capture.txt"), "--listen", f"127.0.0.1:{free_port()}",
            prefix=unprivileged())
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == f"qtap-devtools: error: --output {locked / 'capture.txt'}: cannot write: Permission denied"


# --------------------------------------------------------------------------
# examples/


def test_example_capture_is_clean_sse_wire_format():
    records = list(capfile.read_events(EXAMPLE))
    assert records and all(isinstance(r, Envelope) for r in records), [r for r in records if not isinstance(r, Envelope)]
    assert [r.type for r in records].count("request.http_transaction") == 3
    lines = EXAMPLE.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"event: "):
            assert lines[i + 1].startswith(b"data: {"), f"line {i + 2}: data must follow event"
    # The seed's "export to file" recipe counts it right.
    r = subprocess.run(f'grep "request.http_transaction" {shlex.quote(str(EXAMPLE))} | wc -l', shell=True,
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "3"


def test_example_capture_is_what_its_script_makes_from_this_build():
    """The example goes stale as events gain fields (it lacked
    summary.container_id and duration_us, which the README documents)."""
    made = subprocess.run([sys.executable, str(ROOT / "examples" / "make_traffic_capture.py")], capture_output=True,
                          check=True, timeout=60).stdout
    assert made == EXAMPLE.read_bytes(), ("examples/traffic-capture.txt is stale: regenerate it with "
                                          "examples/make_traffic_capture.py")


def test_example_capture_replays_with_its_transactions(tmp_path):
    port = free_port()
    with agent(["replay", str(EXAMPLE.relative_to(ROOT))], port, tmp_path / "replay.log") as proc:
        stream = StreamReader(port)
        try:
            hello = stream.find(lambda t, d: t == "system.connected")
            txs = stream.find(lambda t, d: t == "request.http_transaction", count=3)
        finally:
            stream.close()
        status, body = get(proc.url + "/devtools/api/transactions")
    capture = hello[0][1]["data"]["capture"]
    assert capture["badRecords"] == 0 and capture["events"] == 9, capture
    decoded = [tx_of(d) for _, d in txs]
    assert [(t["request"]["method"], t["request"]["url"], t["response"]["status"]) for t in decoded] == [
        ("POST", "https://api.example.com/v1/users", 200),
        ("GET", "https://api.example.com/v1/missing", 404),
        ("GET", "https://api.example.com/v1/crash", 500),
    ]
    assert status == 200 and body["total"] == 3
    assert "skipped" not in proc.output()  # no record was reported bad


def test_replay_reads_standard_input_and_a_pipe_it_holds_is_not_said_to_wait(tmp_path):
    """`zcat f.gz | replay -` took "-" for a file name; `replay <(zcat f.gz)`
    said it waited for a writer the shell had already started."""
    port = free_port()
    with open(EXAMPLE, "rb") as src, open(tmp_path / "replay.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qtap_devtools", "replay", "-", "--listen", f"127.0.0.1:{port}"],
                                cwd=ROOT, stdin=src, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(OSError):
                    status, body = get(f"http://127.0.0.1:{port}/devtools/api/transactions")
                    if status == 200:
                        break
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "replay.log").read_text()
                time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert body["total"] == 3
    r, w = os.pipe()
    os.write(w, EXAMPLE.read_bytes())
    os.close(w)
    with open(os.devnull, "wb") as out:
        done = subprocess.run([sys.executable, "-m", "qtap_devtools", "har", f"/dev/fd/{r}"], cwd=ROOT, pass_fds=(r,),
                              stdout=out, stderr=subprocess.PIPE, text=True, timeout=30)
    os.close(r)
    assert done.returncode == 0 and "waiting for a writer" not in done.stderr, done.stderr


def test_a_paced_replay_with_a_filter_sends_the_first_match_when_it_came(tmp_path):
    """--speed 1 paced only between matching events: a filter's first match,
    1.5 s into the recording, came at once."""
    import http.client

    from tests import samples

    conn = samples.connection()
    capture = samples.write_capture(tmp_path / "paced.txt", [
        samples.transaction(conn, "d4u9paced00000000000", path="/first", status=200, ts_offset_ms=36064),
        samples.transaction(conn, "d4u9paced00000000001", path="/later", status=404, ts_offset_ms=37564),
    ])
    port = free_port()
    with agent(["replay", str(capture), "--speed", "1"], port, tmp_path / "replay.log"):
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        asked = time.monotonic()
        client.request("GET", "/devtools/api/events?status=404")
        resp = client.getresponse()
        while b"request.http_transaction" not in resp.readline():
            pass
        waited = time.monotonic() - asked
        client.close()
    assert waited >= 1.2, waited  # a lower bound: the recorded 1.5 s, not a speed check


@pytest.mark.parametrize("argv,shed", [([], True), (["--no-shed"], False)])
def test_shedding_is_on_unless_no_shed(argv, shed):
    args = cli_mod.build_parser().parse_args(["run", *argv])
    assert cli_mod._config(args).shed is shed


@pytest.mark.parametrize("argv,rate", [
    ([], 32.0),
    (["--max-capture-rate", "8"], 8.0),
    (["--max-capture-rate", "0"], 0.0),  # no limit
    (["--no-shed"], 0.0),  # nothing is cut, so no limit either
])
def test_max_capture_rate(argv, rate):
    args = cli_mod.build_parser().parse_args(["run", *argv])
    assert cli_mod._config(args).max_capture_mib_per_s == rate


@pytest.mark.parametrize("argv,says", [
    (["--max-capture-rate", "-1"], "0 for no limit"),
    (["--max-capture-rate", "nan"], "0 for no limit"),
    (["--max-capture-rate", "8", "--no-shed"], "drop one of them"),
])
def test_a_max_capture_rate_that_cannot_work_is_refused(argv, says):
    args = cli_mod.build_parser().parse_args(["run", *argv])
    with pytest.raises(ConfigError, match=says):
        cli_mod._config(args)


def test_listen_on_port_0_picks_a_free_port_the_agent_knows():
    # It leaves its own port out of the capture and prints it: 0 would be wrong in both.
    args = cli_mod.build_parser().parse_args(["run", "--listen", "127.0.0.1:0"])
    listen = cli_mod._config(args).listen
    assert listen.host == "127.0.0.1" and 1024 <= listen.port <= 65535


@pytest.mark.parametrize("content", [b"garbage\x00\x01\nmore garbage\n", b"# a README\n\nsome text\n" * 20])
def test_a_file_that_is_not_a_capture_is_refused_in_one_line(tmp_path, content):
    path = tmp_path / "not-a-capture"
    path.write_bytes(content)
    r = cli("har", str(path))
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # no warning per bad record first
    assert r.stderr.startswith(f"qtap-devtools: error: {path}: not a capture file?")


def test_har_output_it_cannot_write_is_refused_before_converting(tmp_path):
    r = cli("har", str(EXAMPLE), "-o", str(tmp_path / "missing-dir" / "x.har"))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"qtap-devtools: error: --output {tmp_path / 'missing-dir' / 'x.har'}: "
                                "cannot write: No such file or directory")


def test_har_refuses_to_write_over_the_capture_it_converts(tmp_path):
    capture = tmp_path / "same.txt"
    capture.write_bytes(EXAMPLE.read_bytes())
    r = cli("har", str(capture), "-o", str(capture))
    assert r.returncode == 2 and "is the capture file being converted" in r.stderr
    assert capture.read_bytes() == EXAMPLE.read_bytes()


def test_a_failed_har_conversion_leaves_no_output_file_behind(tmp_path):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"garbage\n" * 10)
    r = cli("har", str(garbage), "-o", str(tmp_path / "new.har"))
    assert r.returncode == 1 and not (tmp_path / "new.har").exists()
    assert os.listdir(tmp_path) == ["garbage"]  # no temporary file either


def test_har_reads_standard_input_and_an_empty_file_says_so_in_one_plain_line(tmp_path):
    data = EXAMPLE.read_bytes()
    r = subprocess.run([sys.executable, "-m", "qtap_devtools", "har", "-"], cwd=ROOT, input=data,
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    from_file = cli("har", str(EXAMPLE))
    assert r.stdout.decode() == from_file.stdout and from_file.stdout.count('"request"') >= 1
    (tmp_path / "empty.txt").write_text("")
    r = cli("har", str(tmp_path / "empty.txt"))
    assert r.returncode == 0 and r.stderr.startswith("qtap-devtools: ") and "no events" in r.stderr, r.stderr


def test_har_of_one_transaction_says_one_entry(tmp_path):
    one = tmp_path / "one.txt"
    frames = EXAMPLE.read_bytes().split(b"\n\n")
    one.write_bytes(next(f for f in frames if f.startswith(b"event: request.http_transaction")) + b"\n\n")
    r = cli("har", str(one), "-o", str(tmp_path / "one.har"))
    assert r.returncode == 0 and r.stderr.strip() == f"1 entry written to {tmp_path / 'one.har'}"


@pytest.mark.parametrize("url", ["garbage", "127.0.0.1:10001", "ftp://x", "http://[::1"])
def test_doctor_refuses_an_agent_address_that_is_not_a_url(url):
    r = cli("doctor", "--agent", url)
    assert r.returncode == 2 and "expected the agent's URL" in r.stderr


def test_an_empty_token_is_refused_and_a_refused_address_names_its_own_tunnel():
    r = cli("replay", str(EXAMPLE), "--listen", "127.0.0.1:0", "--token", "")
    assert r.returncode == 2 and "--token: must not be empty" in r.stderr
    r = cli("replay", str(EXAMPLE), "--listen", "0.0.0.0:11051")
    assert r.returncode == 2 and "ssh -L 11051:localhost:11051 host" in r.stderr, r.stderr
    # A name that resolves to nothing is said so, not refused as "not loopback".
    r = cli("replay", str(EXAMPLE), "--listen", "nonexistent.invalid:11051")
    assert r.returncode == 2 and "cannot resolve 'nonexistent.invalid'" in r.stderr, r.stderr
    assert "e.g. 127.0.0.1:11051" in r.stderr


def test_replay_max_gap_is_checked_and_passed_on():
    args = cli_mod.build_parser().parse_args(["replay", str(EXAMPLE), "--speed", "1", "--max-gap", "2.5"])
    assert cli_mod._config(args).replay_max_gap == 2.5
    r = cli("replay", str(EXAMPLE), "--max-gap", "0")
    assert r.returncode == 2 and "--max-gap must be more than 0" in r.stderr
    r = cli("replay", str(EXAMPLE), "--max-gap", "nan")
    assert r.returncode == 2 and "--max-gap must be more than 0" in r.stderr
    for speed in ("nan", "inf", "-1"):
        r = cli("replay", str(EXAMPLE), "--speed", speed)
        assert r.returncode == 2 and "--speed must be 0 (all at once) or a finite factor" in r.stderr, speed
    r = cli("replay", str(EXAMPLE), "--max-gap", "inf")
    assert r.returncode == 2 and "--max-gap must be more than 0 and finite" in r.stderr


def test_output_to_a_fifo_is_not_opened_before_the_agent_and_says_it_waits_for_a_reader(tmp_path, capsys):
    """Opened and closed to check it, a FIFO's reader (`cat fifo`) saw its end
    before the agent wrote a byte; with no reader, the open hung without a word."""
    import threading

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    done = threading.Event()
    t = threading.Thread(target=lambda: (cli_mod._writable(fifo), done.set()), daemon=True)
    t.start()
    assert done.wait(5), "checking --output opened the FIFO and waited for a reader"
    assert "is a FIFO: waiting for a reader to open it" in capsys.readouterr().out


def test_har_of_a_fifo_says_it_waits_for_a_writer_then_converts_what_it_is_sent(tmp_path):
    """Before, `har` (or `replay`) of a FIFO nobody writes to waited without a word."""
    fifo, out = tmp_path / "in.fifo", tmp_path / "out.har"
    os.mkfifo(fifo)
    p = subprocess.Popen([sys.executable, "-m", "qtap_devtools", "har", str(fifo), "-o", str(out)], cwd=ROOT,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = p.stderr.readline()
        assert said == f"qtap-devtools: {fifo} is a FIFO: waiting for a writer to open it (Ctrl-C to stop)\n"
        fifo.write_bytes(EXAMPLE.read_bytes())
        assert p.wait(30) == 0, p.stderr.read()
    finally:
        p.kill()
        p.communicate()
    assert orjson.loads(out.read_bytes())["log"]["entries"]


def test_a_client_reading_nothing_at_the_stop_is_cut_and_said_not_waited_for(tmp_path):
    """Ctrl-C while a client has stopped reading (a paused `curl | less`):
    its stream's writes never finish.  The agent stops all the same, within
    its drain time, and says which streams ended without their goodbye."""
    import signal
    import socket
    import time

    from tests import samples

    conn = samples.connection("d4u4jhg7p3qk26l91icg", "api.example.com")
    # ~40 MB of stream: more than the two sockets' buffers hold.
    big = [samples.transaction(conn, f"d4u4jhg7p3qk26l91k{i:02d}", response_body=os.urandom(1 << 20))
           for i in range(24)]
    capture = samples.write_capture(tmp_path / "big.txt", [samples.session_events()[0], *big])
    port = free_port()
    with agent(["replay", str(capture)], port, tmp_path / "a.log") as proc:
        with socket.create_connection(("127.0.0.1", port)) as reader:
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            reader.sendall(b"GET /devtools/api/events HTTP/1.1\r\nHost: localhost\r\n"
                           b"Accept: text/event-stream\r\n\r\n")
            time.sleep(1.5)  # the stream fills the buffers; nothing is read
            assert proc.stop(signal.SIGINT, timeout=15) == 0  # hung, it raises
    assert "1 client(s) had not read their stream to its end within 0.8 s" in proc.output(), proc.output()


def test_output_dash_is_standard_output_as_har_dash_is_standard_input(tmp_path, monkeypatch):
    """`run --output -` made a file named "-" in the working directory."""
    monkeypatch.chdir(tmp_path)
    args = cli_mod.build_parser().parse_args(["run", "--output", "-"])
    assert str(cli_mod._config(args).output) == "/dev/stdout"  # and the status lines go to stderr (main)
    args = cli_mod.build_parser().parse_args(["run", "--output", "./-"])  # a file named "-", asked for so
    assert str(cli_mod._config(args).output) == "-"
