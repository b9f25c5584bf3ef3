"""Where a chunk lands in its stream: new bytes, a gap before them, or bytes fed before."""

from qtap_devtools.assemble.offsets import place


def test_a_chunk_that_follows_on_is_fed_whole():
    nxt = {"egress": None}
    assert place(nxt, "egress", b"abc", 0) == (b"abc", 0, 0)
    assert place(nxt, "egress", b"de", 3) == (b"de", 0, 0)
    assert nxt["egress"] == 5


def test_a_chunk_past_the_end_says_how_much_is_missing():
    nxt = {"egress": 5}
    assert place(nxt, "egress", b"xy", 9) == (b"xy", 4, 0)
    assert nxt["egress"] == 11
    # The first chunk seen of a stream, not at its start: the bytes before it.
    fresh = {"ingress": None}
    assert place(fresh, "ingress", b"z", 7) == (b"z", 7, 0)


def test_bytes_fed_before_are_dropped_and_counted():
    nxt = {"egress": 5}
    assert place(nxt, "egress", b"cdefg", 2) == (b"fg", 0, 3)
    assert nxt["egress"] == 7
    assert place(nxt, "egress", b"abc", 0) == (b"", 0, 3)  # all seen: nothing moves
    assert nxt["egress"] == 7


def test_without_offsets_a_chunk_follows_on():
    nxt = {"egress": None}
    assert place(nxt, "egress", b"abc", None) == (b"abc", 0, 0)
    assert place(nxt, "egress", b"d", None) == (b"d", 0, 0)
    assert nxt["egress"] == 4
