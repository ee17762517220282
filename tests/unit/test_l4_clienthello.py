"""The ClientHello reader and the SNI table, without sockets."""

from __future__ import annotations

import ssl

import pytest

from bastion.config.schema import SniRoute
from bastion.l4.clienthello import MAX_BYTES, BadHello, Hello, HelloReader, read_hello
from bastion.l4.sni import SniTable


def client_hello(server_name: str | None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = server_name is not None
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def resplit(hello: bytes, size: int) -> bytes:
    """The same handshake message carried in records of at most `size` bytes."""
    assert hello[0] == 22
    message = hello[5:]
    out = b""
    for start in range(0, len(message), size):
        part = message[start : start + size]
        out += hello[:3] + len(part).to_bytes(2, "big") + part
    return out


def test_the_server_name_of_a_real_hello() -> None:
    hello = client_hello("Db.Example.COM")
    found = read_hello(hello)
    assert isinstance(found, Hello) and found.sni == "db.example.com" and found.size == len(hello)


def test_no_server_name() -> None:
    found = read_hello(client_hello(None))
    assert isinstance(found, Hello) and found.sni is None


def test_every_prefix_asks_for_more_and_never_for_less_than_it_has() -> None:
    hello = client_hello("a.example.com")
    for size in range(len(hello)):
        need = read_hello(hello[:size])
        assert isinstance(need, int) and size < need <= len(hello)


def test_a_hello_spread_over_many_records() -> None:
    split = resplit(client_hello("split.example.com"), 7)
    found = read_hello(split)
    assert isinstance(found, Hello) and found.sni == "split.example.com" and found.size == len(split)
    for size in range(0, len(split), 13):
        assert isinstance(read_hello(split[:size]), int)


def test_a_reader_never_walks_the_records_it_has_taken_again() -> None:
    split = resplit(client_hello("tiny.example.com"), 1)  # one byte per record: 6 bytes each
    reader = HelloReader()
    assert reader.feed(split[:60]) == 65  # ten records taken; the next header is wanted
    scribbled = b"\x00" * 60 + split[60:]  # were they read again, this would be refused
    found = reader.feed(scribbled)
    assert isinstance(found, Hello) and found.sni == "tiny.example.com"


def test_bytes_behind_the_hello_do_not_change_it() -> None:
    hello = client_hello("a.example.com")
    found = read_hello(hello + b"\x17\x03\x03\x00\x05early")
    assert isinstance(found, Hello) and found.size == len(hello)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\r\n", "not a TLS handshake record"),
        (b"\x16\x02\x00\x00\x04\x01\x00\x00\x00", "not a TLS record version"),
        (b"\x16\x03\x01\x00\x00", "a record length out of bounds"),
        (b"\x16\x03\x01\x40\x01", "a record length out of bounds"),
        (b"\x16\x03\x01\x00\x01\x02", "the first handshake message is not a ClientHello"),
        (b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", "larger than 16384 bytes"),
        (b"\x16\x03\x01\x00\x04\x01\x00\x00\x10", "too short"),
    ],
)
def test_bad_bytes(data: bytes, why: str) -> None:
    with pytest.raises(BadHello, match=why):
        read_hello(data)


def test_a_non_handshake_record_inside_the_hello() -> None:
    split = resplit(client_hello("a.example.com"), 100)
    broken = split[:105] + b"\x15" + split[106:]
    with pytest.raises(BadHello, match="non-handshake record"):
        read_hello(broken)


def test_the_byte_bound_holds_for_tiny_records() -> None:
    message = b"\x01\x00\x3f\xff" + bytes(MAX_BYTES)
    data = b"".join(b"\x16\x03\x01\x00\x01" + bytes([byte]) for byte in message[: MAX_BYTES // 5])
    with pytest.raises(BadHello, match="no complete hello"):
        read_hello(data + b"\x16\x03\x01\x00\x01\x00" * 10)


def test_the_byte_bound_holds_inside_a_partial_record() -> None:
    data = b"\x16\x03\x01\x00\x04\x01\x00\x3f\xff"
    while len(data) <= MAX_BYTES - 15:
        data += b"\x16\x03\x01\x00\x01\x00"
    data += b"\x16\x03\x01\x00\x10" + bytes(10)  # a record still arriving, past the bound
    assert len(data) > MAX_BYTES
    with pytest.raises(BadHello, match="no complete hello"):
        read_hello(data)


def body_with_name(name: bytes, extra: bytes = b"") -> bytes:
    entry = b"\x00" + len(name).to_bytes(2, "big") + name
    names = len(entry).to_bytes(2, "big") + entry + extra
    extension = b"\x00\x00" + len(names).to_bytes(2, "big") + names
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    return body + len(extension).to_bytes(2, "big") + extension


def record(body: bytes) -> bytes:
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (body_with_name(b"bad name"), "not a host name"),
        (body_with_name(b"a" * 60 + (b"." + b"b" * 60) * 4), "not a host name"),  # over 253 bytes
        (body_with_name(b"a..b"), "not a host name"),
        (body_with_name(b"caf\xc3\xa9.example"), "not a host name"),  # not ASCII (IDNs come as xn--)
        (body_with_name(b"a.b", extra=b"x"), "bytes after the server name list"),
        (body_with_name(b"a.b")[:-2], "runs past the end"),
        (b"\x03\x03" + bytes(32) + b"\x21" + bytes(33) + bytes(8), "session id longer"),
        (b"\x03\x03" + bytes(32) + b"\x00\x00\x01\x13\x01\x00", "bad cipher suites"),
        (b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x00\x00\x00", "no compression methods"),
    ],
)
def test_malformed_inside(body: bytes, why: str) -> None:
    with pytest.raises(BadHello, match=why):
        read_hello(record(body))


def test_an_extension_twice_is_refused() -> None:
    body = body_with_name(b"a.b")
    extensions = body[41:]  # behind version, random, session id, suites, compression
    size = int.from_bytes(extensions[:2], "big")
    doubled = body[:41] + (2 * size).to_bytes(2, "big") + extensions[2:] * 2
    with pytest.raises(BadHello, match="appears twice"):
        read_hello(record(doubled))


def test_a_name_of_another_type_is_skipped_and_a_trailing_dot_dropped() -> None:
    other = b"\x01\x00\x03xyz"
    found = read_hello(record(body_with_name(b"Host.Example.", extra=b"")))
    assert isinstance(found, Hello) and found.sni == "host.example"
    entry = other + b"\x00\x00\x03a.b"
    names = len(entry).to_bytes(2, "big") + entry
    extension = b"\x00\x00" + len(names).to_bytes(2, "big") + names
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    found = read_hello(record(body + len(extension).to_bytes(2, "big") + extension))
    assert isinstance(found, Hello) and found.sni == "a.b"


def test_a_hello_without_extensions_has_no_name() -> None:
    found = read_hello(record(b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"))
    assert isinstance(found, Hello) and found.sni is None


def test_sni_table_precedence() -> None:
    table = SniTable(
        [
            SniRoute(hosts=["*.example.com"], upstream="wide"),
            SniRoute(hosts=["*.api.example.com", "db.example.com"], upstream="narrow"),
            SniRoute(hosts=["*"], upstream="any"),
        ]
    )
    assert table.upstream_for("db.example.com") == "narrow"  # exact
    assert table.upstream_for("v1.api.example.com") == "narrow"  # longest suffix
    assert table.upstream_for("x.y.example.com") == "wide"  # any depth
    assert table.upstream_for("example.com") == "any"  # a wildcard needs a label in front
    assert table.upstream_for(None) == "any"
    assert SniTable([SniRoute(hosts=["a.b"], upstream="x")]).upstream_for("c.d") is None
