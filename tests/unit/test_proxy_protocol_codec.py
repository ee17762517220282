"""PROXY protocol codec: v1/v2 parsing (whole, byte by byte, bad input) and encoding."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from bastion.net.proxy_protocol import (
    V1_MAX,
    V2_MAX_BODY,
    V2_SIGNATURE,
    HeaderParser,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    encode_v2_local,
    parse,
)


def feed_bytewise(data: bytes) -> tuple[ProxyHeader, bytes]:
    parser = HeaderParser()
    for index in range(len(data)):
        header = parser.feed(data[index : index + 1])
        if header is not None:
            return header, parser.rest(header)
    raise AssertionError("no header")


def test_v1_tcp4() -> None:
    header = parse(b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\nGET /")
    assert header == ProxyHeader(1, ("192.0.2.7", 51000), ("10.0.0.1", 443), "stream", 41)


def test_v1_addresses_come_out_canonical() -> None:
    header = parse(b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 ::FFFF:192.0.2.1 1 2\r\n")
    assert header is not None
    assert header.source == ("2001:db8::7", 1) and header.destination == ("::ffff:192.0.2.1", 2)


def test_v1_tcp6_and_rest() -> None:
    parser = HeaderParser()
    header = parser.feed(b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\nhello")
    assert header is not None
    assert header.source == ("2001:db8::1", 65535)
    assert header.destination == ("::1", 0)
    assert parser.rest(header) == b"hello"


def test_v1_unknown_keeps_real_peer() -> None:
    header = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
    assert header is not None and header.source is None and header.length == 35
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, None, None, None, 15)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.7 10.0.0.1 51000\r\n",  # missing port
        b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443 9\r\n",  # extra field
        b"PROXY TCP4  192.0.2.7 10.0.0.1 51000 443\r\n",  # double space
        b"PROXY TCP4 192.0.2.300 10.0.0.1 1 2\r\n",  # bad octet
        b"PROXY TCP4 192.0.2.07 10.0.0.1 1 2\r\n",  # leading zero (octal to some parsers)
        b"PROXY TCP4 192.0.2 10.0.0.1 1 2\r\n",  # three parts
        b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
        b"PROXY TCP4 ::1 10.0.0.1 1 2\r\n",  # family mismatch
        b"PROXY TCP6 10.0.0.2 ::1 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # scoped
        b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 443\r\n",  # port range
        b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 443\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 0080 443\r\n",  # leading zero
        b"PROXY TCP4 192.0.2.7 10.0.0.1 8a 443\r\n",
        b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\n",  # bare LF
        b"PROXY TCP4 192.0.2.7\r10.0.0.1 1 2\r\n",  # bare CR
        b"PROXY TCP4 1\xff.0.0.1 10.0.0.1 1 2\r\n",
        b"proxy TCP4 192.0.2.7 10.0.0.1 1 2\r\n",
        b"GET / HTTP/1.1\r\n",
    ],
)
def test_v1_bad(line: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(line)


def test_v1_too_long_rejected_at_the_bound_without_crlf() -> None:
    line = b"PROXY UNKNOWN " + b"a" * (V1_MAX - 14)
    assert len(line) == V1_MAX
    assert parse(line[:-1]) is None  # still a possible header
    with pytest.raises(ProxyProtocolError):
        parse(line)
    longest = b"PROXY UNKNOWN " + b"a" * (V1_MAX - 16) + b"\r\n"
    assert parse(longest) is not None


def test_early_rejection_on_first_wrong_byte() -> None:
    with pytest.raises(ProxyProtocolError):
        parse(b"G")
    with pytest.raises(ProxyProtocolError):
        parse(b"PROXX")
    with pytest.raises(ProxyProtocolError):
        parse(b"\r\n\r\n\x00\r\nQUIX")
    assert parse(b"") is None
    assert parse(b"PROX") is None
    assert parse(V2_SIGNATURE[:7]) is None


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


def test_v2_inet_stream_with_tlvs_skipped() -> None:
    address = bytes([203, 0, 113, 9, 10, 0, 0, 1]) + struct.pack("!HH", 40000, 8080)
    tlvs = b"\x04" + struct.pack("!H", 5) + b"\x00" * 5 + b"\x01" + struct.pack("!H", 2) + b"h2"
    data = v2(0x21, 0x11, address + tlvs) + b"GET"
    header = parse(data)
    assert header == ProxyHeader(2, ("203.0.113.9", 40000), ("10.0.0.1", 8080), "stream", len(data) - 3)


def test_v2_inet6_dgram() -> None:
    src = bytes(15) + b"\x01"
    dst = b"\x20\x01\x0d\xb8" + bytes(11) + b"\x02"
    header = parse(v2(0x21, 0x22, src + dst + struct.pack("!HH", 53, 5353)))
    assert header is not None
    assert header.source == ("::1", 53) and header.destination == ("2001:db8::2", 5353)
    assert header.transport == "dgram"


@pytest.mark.parametrize(
    ("command", "family", "body"),
    [
        (0x20, 0x11, bytes(12)),  # LOCAL: addresses ignored
        (0x21, 0x00, b""),  # UNSPEC
        (0x21, 0x31, bytes(216)),  # UNIX
        (0x21, 0x10, bytes(12)),  # INET, transport UNSPEC
    ],
)
def test_v2_keep_real_peer(command: int, family: int, body: bytes) -> None:
    header = parse(v2(command, family, body))
    assert header is not None and header.source is None and header.version == 2


@pytest.mark.parametrize(
    "data",
    [
        v2(0x11, 0x11, bytes(12)),  # version 1 in the binary form
        v2(0x22, 0x11, bytes(12)),  # command 2
        v2(0x21, 0x41, bytes(12)),  # family 4
        v2(0x21, 0x13, bytes(12)),  # transport 3
        v2(0x21, 0x11, bytes(11)),  # address block short
        v2(0x21, 0x21, bytes(12)),  # INET6 with an INET-sized block
        v2(0x21, 0x11, bytes(12) + b"\x04\x00"),  # TLV truncated
        v2(0x21, 0x11, bytes(12) + b"\x04\x00\x09abc"),  # TLV overruns
        V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_MAX_BODY + 1),  # over the bound
    ],
)
def test_v2_bad(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(data)


def test_v2_bound_rejected_before_the_body_arrives() -> None:
    parser = HeaderParser()
    with pytest.raises(ProxyProtocolError):
        parser.feed(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 65535))
    assert parse(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_MAX_BODY)) is None


def test_v2_truncated_is_not_complete() -> None:
    data = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2))
    for cut in range(len(data)):
        assert parse(data[:cut]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n",
        b"PROXY UNKNOWN\r\n",
        encode_v2(("2001:db8::7", 9), ("2001:db8::8", 10)),
        encode_v2_local(),
    ],
)
def test_byte_by_byte_equals_whole(data: bytes) -> None:
    header, rest = feed_bytewise(data + b"X")
    assert header == parse(data)
    assert rest == b""  # the header completes on its own last byte, before the X


def random_address(rng: random.Random, version: int) -> tuple[str, int]:
    if version == 4:
        ip = ".".join(str(rng.randrange(256)) for _ in range(4))
    else:
        ip = str(ipaddress.IPv6Address(rng.getrandbits(128)))
    return ip, rng.randrange(65536)


@pytest.mark.parametrize("seed", range(20))
def test_round_trips(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        version = rng.choice((4, 6))
        src, dst = random_address(rng, version), random_address(rng, version)
        datagram = rng.random() < 0.5
        for data, expected_transport in (
            (encode_v1(src, dst), "stream"),
            (encode_v2(src, dst, datagram), "dgram" if datagram else "stream"),
        ):
            tail = bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
            parser = HeaderParser()
            header = None
            stream = data + tail
            at = 0
            while header is None:
                step = rng.randrange(1, 6)
                header = parser.feed(stream[at : at + step])
                at += step
            assert header.source == src and header.destination == dst
            assert header.transport == expected_transport
            assert header.length == len(data)
            assert parser.rest(header) + stream[at:] == tail
            assert len(data) <= (V1_MAX if data[:1] == b"P" else 16 + 36)


def test_encode_mixed_families_maps_ipv4() -> None:
    header = parse(encode_v1(("192.0.2.1", 5), ("::1", 6)))
    assert header is not None and header.source == ("::ffff:192.0.2.1", 5)
    header = parse(encode_v2(("::1", 5), ("192.0.2.1", 6)))
    assert header is not None and header.destination == ("::ffff:192.0.2.1", 6)


def test_encode_strips_scope() -> None:
    assert encode_v1(("fe80::1%eth0", 1), ("fe80::2", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


def test_encode_v2_local() -> None:
    header = parse(encode_v2_local())
    assert header == ProxyHeader(2, None, None, None, 16)
