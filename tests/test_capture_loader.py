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
