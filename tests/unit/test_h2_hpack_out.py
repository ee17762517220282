"""The gateway's stateless HPACK encoder: what it writes, hpack's decoder reads back."""

from __future__ import annotations

import random

import hpack

from bastion.proto.hpack_out import StatelessEncoder, encode_integer


def test_every_kind_of_field_decodes_to_what_was_encoded() -> None:
    rng = random.Random(7)
    encoder, decoder = StatelessEncoder(), hpack.Decoder()
    fixed = [
        (b":status", b"200"),  # whole static entry
        (b":status", b"418"),  # static name
        (b"content-type", b"application/json"),
        (b"x-request-id", b"abc"),  # new name
        (b"set-cookie", b"a=1"),  # never indexed
        (b"x-long", b"v" * 300),  # a length over one byte
        (b"x-empty", b""),
    ]
    for _ in range(50):
        fields = list(fixed)
        rng.shuffle(fields)
        fields.append((b"x-%d" % rng.randrange(1000), bytes(rng.randrange(33, 127) for _ in range(rng.randrange(200)))))
        assert decoder.decode(encoder.encode(fields), raw=True) == fields
    assert encoder.encode([(b":status", b"200")]) == b"\x88"


def test_a_table_size_change_is_signalled_once() -> None:
    encoder, decoder = StatelessEncoder(), hpack.Decoder()
    decoder.max_allowed_table_size = 0  # what the client's SETTINGS_HEADER_TABLE_SIZE 0 means
    encoder.header_table_size = 0
    first = encoder.encode([(b":status", b"200")])
    assert first == b"\x20\x88"
    assert decoder.decode(first, raw=True) == [(b":status", b"200")]
    assert encoder.encode([(b":status", b"200")]) == b"\x88"


def test_integers_use_continuation_bytes_past_the_prefix() -> None:
    assert encode_integer(10, 5) == b"\x0a"
    assert encode_integer(1337, 5) == b"\x1f\x9a\x0a"  # RFC 7541 C.1.2
    assert encode_integer(42, 8) == b"\x2a"
