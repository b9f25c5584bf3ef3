"""Record parsing, /proc parsing and the ELF reader, without a kernel."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from qtap_devtools.capture import records
from qtap_devtools.capture.elf import exported_symbols
from qtap_devtools.capture.procnet import _endpoint
from qtap_devtools.capture.records import (
    CgroupCreated, DataChunk, Endpoint, ProcessExec, ProcessExit, SocketAccept, TlsServerName,
)

PROBES = Path(__file__).resolve().parents[1] / "probes"
V4 = b"\0" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1])


def hdr(kind, pid=10, tid=11, fd=5, ts=123):
    return struct.pack("<IIIiQ", kind, pid, tid, fd, ts)


def test_data_record_round_trip():
    raw = hdr(records.DATA) + struct.pack("<QIBBxxQ", 4096, 5, 1, 2, 0xABC) + b"hello" + b"\0" * 10
    rec = records.parse(raw)
    assert rec == DataChunk(10, 11, 5, 123, "ingress", "gnutls", 4096, b"hello", 0xABC)
    assert rec.end == 4101


def test_accept_with_and_without_local_address():
    addr = struct.pack("<HH16s", 2, 8080, V4)
    rec = records.parse(hdr(records.ACCEPT) + addr + struct.pack("<HH16s", 0, 0, b"\0" * 16))
    assert rec == SocketAccept(10, 5, 123, Endpoint("127.0.0.1", 8080), None)


def test_ipv6_endpoints_are_compressed_and_v4_mapped_shown_as_ipv4():
    assert records.endpoint(b"\0" * 15 + b"\1", 443) == Endpoint("::1", 443)
    assert str(records.endpoint(b"\0" * 15 + b"\1", 443)) == "[::1]:443"
    assert records.endpoint(V4, 80) == Endpoint("127.0.0.1", 80)


def test_exit_without_exit_group_has_no_code():
    assert records.parse(hdr(records.EXIT) + struct.pack("<iI", -1, 0)) == ProcessExit(10, 123, None)


def test_exec_record_carries_the_cgroup_id_and_uid():
    raw = hdr(records.EXEC, fd=-1) + struct.pack("<QII16s256s", 4242, 1000, 0, b"curl", b"/usr/bin/curl")
    assert records.parse(raw) == ProcessExec(10, 123, "/usr/bin/curl", "curl", None, 4242, 1000)


def test_cgroup_record():
    raw = hdr(records.CGROUP, fd=-1) + struct.pack("<Q256s", 77, b"/docker/" + b"a" * 64)
    assert records.parse(raw) == CgroupCreated(77, "/docker/" + "a" * 64, 123)


def test_sni_record():
    raw = hdr(records.SNI, fd=-1) + struct.pack("<QII256s", 0x55, 11, 0, b"example.com")
    assert records.parse(raw) == TlsServerName(10, None, 0x55, "example.com", 123)


def test_close_record_carries_where_its_streams_ended():
    raw = hdr(records.CLOSE) + struct.pack("<4QIHH", 10, 0, 7_000_000, 300, 0b1101, 1, 0)
    rec = records.parse(raw)
    assert rec == records.SocketClose(10, 5, 123, (10, None, 7_000_000, 300), True)
    assert len(raw) == 64  # sizeof(struct close_rec)


def test_proc_net_tcp_addresses():
    assert _endpoint("0100007F:1F90") == Endpoint("127.0.0.1", 8080)
    assert _endpoint("00000000000000000000000001000000:01BB") == Endpoint("::1", 443)
    assert _endpoint("0000000000000000FFFF00000100007F:0050") == Endpoint("127.0.0.1", 80)


def test_python_sizes_match_common_h():
    text = (PROBES / "common.h").read_text()
    assert f"#define DATA_HDR_SIZE {records.DATA_HDR_SIZE}" in text
    kinds = dict(re.findall(r"REC_(\w+) = (\d+)", text))
    assert {k: int(v) for k, v in kinds.items()} == {
        "EXEC": records.EXEC, "FORK": records.FORK, "EXIT": records.EXIT, "CONNECT": records.CONNECT,
        "ACCEPT": records.ACCEPT, "ADDRESS": records.ADDRESS, "CLOSE": records.CLOSE,
        "DATA": records.DATA, "SNI": records.SNI, "CGROUP": records.CGROUP,
    }


def test_elf_reader_finds_exported_functions_only():
    import sys
    assert exported_symbols(sys.executable, ["PyObject_GetAttr", "SSL_write"]) in (set(), {"PyObject_GetAttr"})
    assert exported_symbols("/nonexistent", ["x"]) == set()
    assert exported_symbols(__file__, ["x"]) == set()
