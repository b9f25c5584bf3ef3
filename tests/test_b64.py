"""The small-input base64 encoder in C (``_b64.c``) against binascii, and
``events.b64``'s hand-over to pybase64 for large inputs."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtap_devtools import events

_b64 = pytest.importorskip("qtap_devtools._b64", reason="C part not built (test_compiled fails under CI)")


@settings(max_examples=500)
@given(st.binary(max_size=5000))
def test_the_c_encoder_matches_binascii(data):
    assert _b64.encode(data) == events.b64_py(data)


@pytest.mark.parametrize("n", range(0, 13))
def test_every_padding_case(n):
    data = bytes(range(250, 250 - n, -1))
    assert _b64.encode(data) == base64.b64encode(data).decode()


def test_any_bytes_like_object_and_nothing_else():
    assert _b64.encode(bytearray(b"ab")) == "YWI="
    assert _b64.encode(memoryview(b"xabc")[1:]) == "YWJj"
    with pytest.raises(TypeError):
        _b64.encode("text")


@pytest.mark.parametrize("n", [events.B64_SIMD_BYTES - 1, events.B64_SIMD_BYTES, 1 << 20])
def test_b64_is_the_same_on_both_sides_of_the_simd_threshold(n):
    data = bytes(i * 7 % 256 for i in range(n))
    assert events.b64(data) == base64.b64encode(data).decode()


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def test_it_uses_the_widest_steps_this_cpu_has():
    # CI runs on the same kind of x86-64: the tests above exercise those steps.
    flags = _cpu_flags()
    widest = ("avx512vbmi" if {"avx512f", "avx512bw", "avx512vbmi"} <= flags
              else "ssse3" if "ssse3" in flags else "")
    assert _b64.simd() == widest


# Every length to 300 crosses each path's step boundaries (64 bytes a step
# for AVX-512, 16 for SSSE3) and its hand-over to the next.
_EVERY_LENGTH = ("import binascii, random\nfrom qtap_devtools import _b64\nassert _b64.simd() == {level!r}, _b64.simd()\n"
                 "rng = random.Random(7)\nfor n in [*range(300), 4096, 5001, 1 << 20]:\n"
                 "    d = rng.randbytes(n)\n"
                 "    assert _b64.encode(d) == binascii.b2a_base64(d, newline=False).decode(), n\n")


@pytest.mark.parametrize("cap", [None, "ssse3", "none"])
def test_each_path_matches_binascii_at_every_length(cap):
    # QTAP_B64_SIMD caps the steps at import: the paths CPUs without the wider ones take.
    level = {"ssse3": "ssse3", "none": ""}.get(cap, _b64.simd())
    if level == "ssse3" and "ssse3" not in _cpu_flags():
        pytest.fail("this CPU has no SSSE3: the path cannot run here")
    env = {k: v for k, v in os.environ.items() if k != "QTAP_B64_SIMD"}
    if cap:
        env["QTAP_B64_SIMD"] = cap
    subprocess.run([sys.executable, "-c", _EVERY_LENGTH.format(level=level)], check=True, env=env)
