"""What guards the agent's exit while capture is still starting
(threads.NativeSection, agent.exit_now, links.bar_new).

The crashes they prevent (SIGSEGV in libLLVM, libbcc or libc when the
process's exit ran under the start-up thread) came about once in 30-50 stops
and are covered live by test_agent_lifecycle's stop-while-compiling and
stop-while-placing tests; these pin the mechanisms."""

from __future__ import annotations

import errno
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
    from qtap_devtools.threads import CAPTURE_START

    logging.basicConfig(stream=sys.stderr, format="%(message)s")
    atexit.register(lambda: print("teardown ran", flush=True))
    inside = threading.Event()

    def compile_forever():
        with CAPTURE_START:
            inside.set()
            threading.Event().wait()

    threading.Thread(target=compile_forever, daemon=True).start()
    inside.wait()
    print("said before the exit")  # buffered: a pipe, no flush
    logging.getLogger("x").warning("logged before the exit")
    assert CAPTURE_START.close()
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


def test_once_barred_no_probe_is_placed():
    # A child process: the bar is for the rest of the process's life.
    script = textwrap.dedent("""
        from qtap_devtools.capture import links
        links.bar_new()
        try:
            links.Links().attach(-1, b"/bin/true", 0, False, 0)
        except OSError as exc:
            print(exc.errno, exc.strerror)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    # ESHUTDOWN, before any system call: unbarred, prog fd -1 fails otherwise (EBADF/EINVAL).
    assert done.stdout.split(" ", 1) == [str(errno.ESHUTDOWN), "the agent is stopping: no more probes are placed\n"], done


def test_the_bar_waits_for_a_placement_only_so_long():
    script = textwrap.dedent("""
        import threading
        from qtap_devtools.capture import links
        links.BAR_WAIT_SECONDS = 0.2
        stuck = threading.Event()
        def placing_forever():
            with links._placing:
                stuck.set()
                threading.Event().wait()
        threading.Thread(target=placing_forever, daemon=True).start()
        stuck.wait()
        links.bar_new()  # a bar that waited for the stuck placement would hang: the timeout below
        print(links._barred)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True"], done
