"""multistream-select framing used by the pipelined stream open (pure, no network)."""

import pytest

from darkbloom.errors import MalformedMessage
from darkbloom.p2p import multistream


def test_encode_matches_the_spec_framing():
    assert multistream.encode("/multistream/1.0.0") == b"\x13/multistream/1.0.0\n"
    long = "/p" * 100
    framed = multistream.encode(long)
    assert framed[:2] == bytes([(len(long) + 1) & 0x7F | 0x80, (len(long) + 1) >> 7])


def test_take_stops_at_the_limit_and_keeps_stream_data_untouched():
    data = b"\x00\x01raw stream bytes"
    buf = multistream.encode(multistream.HELLO) + multistream.encode("/x/1") + data
    got, rest = multistream.take(buf, 2)
    assert got == [multistream.HELLO, "/x/1"]
    assert rest == data


def test_take_waits_for_incomplete_messages():
    whole = multistream.encode(multistream.HELLO) + multistream.encode("/x/1")
    for cut in range(len(whole)):
        got, rest = multistream.take(whole[:cut], 2)
        more, tail = multistream.take(rest + whole[cut:], 2 - len(got))
        assert got + more == [multistream.HELLO, "/x/1"]
        assert tail == b""


@pytest.mark.parametrize("bad", [b"\x05hello", b"\x00", b"\xff\xff\xff\x01x", b"\x03\xff\xfe\n"])
def test_take_rejects_malformed_messages(bad):
    with pytest.raises(MalformedMessage):
        multistream.take(bad, 1)
