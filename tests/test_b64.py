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


def test_this_machine_encodes_with_ssse3():
    # CI runs on the same kind of x86-64: the property test above exercises the SIMD steps.
    assert _b64.simd()


def test_the_table_loop_alone_matches_binascii_too():
    # QTAP_B64_SCALAR turns the SSSE3 steps off at import: the path a CPU without them takes.
    code = ("import binascii, random\nfrom qtap_devtools import _b64\nassert not _b64.simd()\n"
            "rng = random.Random(7)\nfor n in [*range(64), 4096, 5001]:\n"
            "    d = rng.randbytes(n)\n    assert _b64.encode(d) == binascii.b2a_base64(d, newline=False).decode(), n\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "QTAP_B64_SCALAR": "1"})
