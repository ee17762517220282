"""The gateway's HPACK decoder against hpack's own, on what real encoders produce, and on
blocks built to hurt."""

from __future__ import annotations

import random

import hpack
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKDecodingError, InvalidTableSizeError, OversizedHeaderListError

from bastion.proto.hpack_in import FastDecoder


def _fields(rng: random.Random) -> list[HeaderTuple]:
    fields = [HeaderTuple(b":method", b"GET"), HeaderTuple(b":path", b"/p/%d" % rng.randrange(50))]
    for _ in range(rng.randrange(8)):
        name = b"x-h%d" % rng.randrange(20)
        value = bytes(rng.randrange(32, 127) for _ in range(rng.randrange(0, 300)))
        kind = NeverIndexedHeaderTuple if rng.random() < 0.2 else HeaderTuple
        fields.append(kind(name, value))
    return fields


@pytest.mark.parametrize("huffman", [True, False])
def test_decodes_what_hpack_encodes_like_hpack_does(huffman: bool) -> None:
    rng = random.Random(11)
    encoder, reference, fast = hpack.Encoder(), hpack.Decoder(), FastDecoder()
    for round_ in range(300):
        if round_ % 97 == 50:
            encoder.header_table_size = rng.choice((0, 256, 4096))  # a size update in the next block
        block = encoder.encode(_fields(rng), huffman=huffman)
        assert fast.decode(block) == [tuple(f) for f in reference.decode(block, raw=True)]
    assert fast.header_table.dynamic_entries == reference.header_table.dynamic_entries


def test_the_header_list_limit_stops_a_bomb() -> None:
    encoder = hpack.Encoder()
    big = (b"x-big", b"a" * 3000)
    block = encoder.encode([big] * 40)  # one literal, then 39 one-byte references
    assert len(block) < 3200
    with pytest.raises(OversizedHeaderListError):
        FastDecoder(max_header_list_size=16384).decode(block)


@pytest.mark.parametrize(
    "block",
    [
        b"\x82\x3f\xe1\x1f",  # a size update after a field
        b"\xff\x80\x80\x80\x80\x80\x01",  # an integer with too many continuation bytes
        b"\xbf",  # an index past both tables
        b"\x00\x05ab",  # a truncated name
        b"\xff",  # a truncated integer
    ],
)
def test_broken_blocks_raise_hpack_errors(block: bytes) -> None:
    with pytest.raises(HPACKDecodingError):
        FastDecoder().decode(block)


def test_a_table_size_over_the_allowed_one_is_refused() -> None:
    decoder = FastDecoder()
    decoder.max_allowed_table_size = 100
    with pytest.raises(InvalidTableSizeError):
        decoder.decode(b"\x3f\xe1\x1f")  # size update to 4096
