"""How a probe load failure is put into words, without a kernel: bcc's exception in, one line out."""

from __future__ import annotations

from qtap_devtools.capture import loader
from qtap_devtools.capture.loader import Capture


class BccError(Exception):
    """What bcc raises, with the verifier's log the loader captured from fd 2."""

    def __init__(self, msg: str, stderr_text: str = "") -> None:
        super().__init__(msg)
        self.stderr_text = stderr_text


VERIFIER = BccError("Failed to load BPF program b'ssl_write_enter': Invalid argument",
                    "0: (85) call bpf_get_current_task_btf#158\nunknown func bpf_get_current_task_btf#158\n")


def test_a_verifier_refusal_names_the_probe_file_function_and_last_line(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "BTF", tmp_path)  # present: no BTF hint
    why = Capture._explain(VERIFIER)
    assert why == ("probe probes/openssl.c:ssl_write_enter failed to load: "
                   "unknown func bpf_get_current_task_btf#158")


def test_without_kernel_btf_the_error_says_the_probes_need_it(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "BTF", tmp_path / "vmlinux")  # absent
    why = Capture._explain(VERIFIER)
    assert why.startswith("probe probes/openssl.c:ssl_write_enter failed to load: unknown func")
    assert why.endswith(f"; this kernel has no BTF ({tmp_path / 'vmlinux'}), which the probes' task storage needs "
                        "(kernel 5.11+ with CONFIG_DEBUG_INFO_BTF=y; `qtap-devtools doctor` checks it)")
    other = Capture._explain(BccError("could not open bpf map: tls_calls, error: Invalid argument"))
    assert other.startswith("loading probes failed: could not open bpf map: tls_calls")
    assert "no BTF" in other


def test_a_compile_error_is_not_blamed_on_btf(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "BTF", tmp_path / "vmlinux")
    err = BccError("Failed to compile BPF module <text>", "/virtual/main.c:12:5: error: use of undeclared identifier 'x'\n")
    assert Capture._explain(err) == "probe compilation failed: /virtual/main.c:12:5: error: use of undeclared identifier 'x'"


def test_execs_are_read_on_the_readers_thread_within_their_bounds(monkeypatch):
    from qtap_devtools.capture.records import ProcessExec

    got, asked = [], []

    def read_process(pid):
        asked.append(pid)
        if pid == 3:
            raise RuntimeError("a bug")  # logged; the event loop reads it instead
        return f"process {pid}"

    cap = Capture(got.append, read_process=read_process)
    execs = [ProcessExec(pid, pid, "/bin/x", "x") for pid in range(1, 101)]
    cap._batch.extend(execs)
    cap._others.extend(execs)
    cap._flush()
    n = loader.EXEC_READS_PER_BATCH
    assert got == [execs] and asked == list(range(1, n + 1))
    assert [e.process for e in execs[:4]] == ["process 1", "process 2", None, "process 4"]
    assert all(e.process is None for e in execs[n:])
    assert (cap.exec_reads, cap.exec_reads_deferred) == (n, 100 - n)

    # An exec storm's slow reads stop at the time bound.
    monkeypatch.setattr(loader, "EXEC_READ_SECONDS", 0.0)
    more = [ProcessExec(pid, pid, "/bin/x", "x") for pid in range(200, 210)]
    cap._batch.extend(more)
    cap._others.extend(more)
    cap._flush()
    assert [e.process is not None for e in more] == [True] + [False] * 9


def test_the_ring_reader_outlives_an_iteration_that_raises():
    import threading

    cap = Capture(lambda batch: None)
    calls = []

    class Ring:
        size = 1 << 20

        def wait(self, timeout):
            calls.append(timeout)
            if len(calls) == 1:
                raise RuntimeError("a bug")
            cap._stop.set()

        def read_records(self, parse, out, others, n):
            return 0, 0

        def pending_bytes(self):
            return 0

    cap._ring = Ring()
    t = threading.Thread(target=cap._poll_loop)
    t.start()
    t.join(10)
    assert not t.is_alive() and len(calls) == 2 and cap.reader_errors == 1


def test_what_other_threads_write_while_the_probes_compile_is_not_lost(capfd):
    """The compiler's output is caught by redirecting fd 2 for a few seconds,
    which is every thread's: a warning another thread logged meanwhile (the
    Kubernetes API unreachable) went with it.  It is written out after; what
    a failed load printed is kept for its explanation, as before."""
    import os
    import threading

    def compile_while_another_thread_logs() -> str:
        t = threading.Thread(target=lambda: os.write(2, b"kubernetes: connection refused\n"))
        t.start()
        t.join()
        os.write(2, b"")
        return "loaded"

    result, text = loader._capture_fd2(compile_while_another_thread_logs)
    assert result == "loaded" and text == "kubernetes: connection refused\n"
    assert capfd.readouterr().err == "kubernetes: connection refused\n"

    def failing() -> None:
        os.write(2, b"error: use of undeclared identifier 'x'\n")
        raise BccError("Failed to compile BPF module <text>")

    try:
        loader._capture_fd2(failing)
    except BccError as exc:
        assert exc.stderr_text == "error: use of undeclared identifier 'x'\n"
    else:
        raise AssertionError("the failure was swallowed")
    assert capfd.readouterr().err == ""
