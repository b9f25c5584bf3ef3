"""The exit guard around bcc's compile (threads.NativeSection, agent.exit_now).

The crash it prevents (SIGSEGV in libLLVM when the process's exit ran under
a thread still compiling) came about once in 50 stops and is covered live by
test_agent_lifecycle's stop-while-compiling test; these pin the mechanism."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from qtap_devtools.threads import NativeSection


def test_closing_with_no_thread_inside_says_so_and_bars_later_entries():
    section = NativeSection()
    with section:
        pass
    assert section.close() is False
    with pytest.raises(RuntimeError, match="exiting"):
        with section:
            pass


def test_closing_while_a_thread_is_inside_says_so():
    section = NativeSection()
    entered, release = threading.Event(), threading.Event()

    def work() -> None:
        with section:
            entered.set()
            release.wait()

    t = threading.Thread(target=work)
    t.start()
    entered.wait()
    try:
        assert section.close() is True
    finally:
        release.set()
        t.join()


def test_an_entry_that_raises_still_leaves_the_section():
    section = NativeSection()
    with pytest.raises(ValueError):
        with section:
            raise ValueError("compile failed")
    assert section.close() is False


EXIT_SCRIPT = textwrap.dedent("""
    import atexit, logging, sys, threading
    from qtap_devtools import agent
    from qtap_devtools.threads import BCC_COMPILE

    logging.basicConfig(stream=sys.stderr, format="%(message)s")
    atexit.register(lambda: print("teardown ran", flush=True))
    inside = threading.Event()

    def compile_forever():
        with BCC_COMPILE:
            inside.set()
            threading.Event().wait()

    threading.Thread(target=compile_forever, daemon=True).start()
    inside.wait()
    print("said before the exit")  # buffered: a pipe, no flush
    logging.getLogger("x").warning("logged before the exit")
    assert BCC_COMPILE.close()
    try:
        {body}
    finally:
        agent.exit_now({rc})
""")


def run_exit(body: str, rc: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", EXIT_SCRIPT.format(body=body, rc=rc)],
                          capture_output=True, text=True, timeout=60)


def test_exit_now_flushes_what_was_said_and_skips_the_teardown():
    done = run_exit("pass", 3)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "said before the exit\n"  # flushed; no atexit handler ran
    assert "logged before the exit" in done.stderr


def test_exit_now_shows_the_exception_it_exits_on():
    done = run_exit("raise KeyError('boom')", 1)
    assert done.returncode == 1
    assert "KeyError: 'boom'" in done.stderr
    assert "teardown ran" not in done.stdout


def test_exit_now_keeps_a_system_exit_status():
    done = run_exit("raise SystemExit(5)", 1)
    assert done.returncode == 5, done.stderr
    assert "Traceback" not in done.stderr
