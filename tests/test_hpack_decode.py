"""Our HPACK decoder against the ``hpack`` package's encoder and decoder:
the same header lists out of the same blocks, table and all."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings, strategies as st

from qtap_devtools.assemble.hpack_decode import HpackDecoder, HpackError, huffman_decode

NAMES = st.sampled_from([":method", ":path", ":authority", ":status", "content-type", "cookie", "user-agent",
                         "accept", "x-trace", "set-cookie", "authorization", "etag"]) | \
    st.text("abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=20)
VALUES = st.binary(max_size=300).map(lambda b: b.decode("latin-1"))


def latin1(pairs) -> list[tuple[str, str]]:
    return [(bytes(n).decode("latin-1"), bytes(v).decode("latin-1")) for n, v in pairs]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(st.tuples(NAMES, VALUES, st.booleans()), max_size=12), st.booleans(),
                          st.sampled_from([None, 0, 256, 4096, 2000])), min_size=1, max_size=8))
def test_blocks_decode_as_the_reference_decoder_does(blocks):
    encoder, reference, ours = hpack.Encoder(), hpack.Decoder(), HpackDecoder()
    for fields, huffman, resize in blocks:
        if resize is not None:
            encoder.header_table_size = resize  # a table size update leads the next block
        headers = [hpack.NeverIndexedHeaderTuple(n.encode("latin-1"), v.encode("latin-1")) if never
                   else (n.encode("latin-1"), v.encode("latin-1")) for n, v, never in fields]
        block = encoder.encode(headers, huffman=huffman)
        assert ours.decode(block) == latin1(reference.decode(block, raw=True))


@given(st.binary(max_size=200))
def test_any_text_survives_huffman(raw):
    assert huffman_decode(hpack.huffman.HuffmanEncoder(
        hpack.huffman_constants.REQUEST_CODES, hpack.huffman_constants.REQUEST_CODES_LENGTH).encode(raw)) == raw


@pytest.mark.parametrize("block, why", [
    (b"\x80", "index 0"),
    (b"\xff\x80", "an index past both tables"),
    (b"\x41\x85abc", "a string runs past the block"),
    (b"\x3f\xe1\xff\x03", "a size update over the allowed"),
    (b"\x40\x82\xff\xff\x01a", "Huffman: EOS"),
    (b"\x40\x81\x00\x01a", "Huffman padding of zeros"),
    (b"\xff\xff\xff\xff\xff\xff", "an integer runs past the block"),
])
def test_malformed_blocks_are_refused(block, why):
    with pytest.raises(HpackError):
        HpackDecoder().decode(block)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=100))
def test_any_bytes_decode_or_are_refused(block):
    try:
        HpackDecoder().decode(block)
    except HpackError:
        pass


def test_rfc_7541_c_4_requests_with_huffman():
    # RFC 7541 Appendix C.4: three requests on one connection, Huffman-coded.
    d = HpackDecoder()
    assert d.decode(bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff")) == [
        (":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]
    assert d.decode(bytes.fromhex("828684be5886a8eb10649cbf")) == [
        (":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com"),
        ("cache-control", "no-cache")]
    assert d.decode(bytes.fromhex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf")) == [
        (":method", "GET"), (":scheme", "https"), (":path", "/index.html"), (":authority", "www.example.com"),
        ("custom-key", "custom-value")]
