"""PROXY protocol v1 and v2 (HAProxy's spec): parse what a front balancer sends, encode ours.

A front balancer that terminates the client's TCP connection prefixes the stream it opens
to us with one header naming the client's address. `HeaderParser` is fed bytes as they
arrive (one at a time works) and answers `None` (need more), a `ProxyHeader`, or raises
`ProxyProtocolError`; it rejects as early as it can (the first byte that cannot start
either version) and never buffers more than the bounds below. No I/O here: the listener
side lives in `net/proxy_accept.py`.

v1 is one text line, `PROXY TCP4|TCP6|UNKNOWN ...\\r\\n`, at most 107 bytes. v2 is a
12-byte signature, a version/command byte (LOCAL or PROXY), a family/transport byte, a
16-bit length and an address block followed by TLVs, which are checked for shape and
skipped. LOCAL, UNKNOWN, UNSPEC and UNIX all mean "keep the connection's real peer".
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Literal

from bastion.errors import BastionError

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's worst case, "PROXY UNKNOWN" plus two IPv6 addresses and ports
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16  # signature, version/command, family/transport, length
V2_MAX_BODY = 4096  # address block plus TLVs; real senders stay far below (HAProxy: ~ 200 B)

_ADDRESS_LEN = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX
_V2_PROXY = 0x21
_V2_LOCAL = 0x20

Address = tuple[str, int]
Transport = Literal["stream", "dgram"]


class ProxyProtocolError(BastionError):
    """The bytes are not a valid PROXY header: the connection is closed without an answer."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header. `source` is None when the real peer must be kept (LOCAL, UNKNOWN)."""

    version: int
    source: Address | None
    destination: Address | None
    transport: Transport | None
    length: int
    """Bytes the header took on the wire: what follows it is the proxied stream."""


class HeaderParser:
    """Incremental parser for one header at the start of a stream."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add bytes; the header once complete, None while more are needed.

        After a header, `rest()` holds the bytes that followed it in what was fed."""
        self._buffer += data
        return parse(self._buffer)

    def rest(self, header: ProxyHeader) -> bytes:
        """The bytes fed after the header (the start of the proxied stream)."""
        return bytes(self._buffer[header.length :])

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def parse(data: bytes | bytearray) -> ProxyHeader | None:
    """One header from the start of `data`; None when `data` is a valid but short prefix."""
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyProtocolError("not a PROXY protocol header")


def _parse_v1(data: bytes | bytearray) -> ProxyHeader | None:
    head = bytes(data[: len(V1_PREFIX)])
    if not V1_PREFIX.startswith(head):
        raise ProxyProtocolError("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX] or b"\r" in data[: min(len(data), V1_MAX) - 1]:
            raise ProxyProtocolError("PROXY v1 line too long or not ended by CRLF")
        return None
    line = bytes(data[len(V1_PREFIX) : end])
    length = end + 2
    fields = line.split(b" ")
    if fields[0] == b"UNKNOWN":
        return ProxyHeader(1, None, None, None, length)
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("PROXY v1 line is not 'TCP4|TCP6 src dst sport dport'")
    version = 4 if fields[0] == b"TCP4" else 6
    source_ip = _v1_address(fields[1], version)
    destination_ip = _v1_address(fields[2], version)
    source_port, destination_port = _v1_port(fields[3]), _v1_port(fields[4])
    return ProxyHeader(1, (source_ip, source_port), (destination_ip, destination_port), "stream", length)


def _v1_address(raw: bytes, version: int) -> str:
    """The address in its canonical text form. inet_pton (glibc) is strict: four decimal
    octets without leading zeros, or an IPv6 address without a scope; and 10x faster than
    the ipaddress module, which matters once per connection."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, raw.decode("ascii")))
    except (UnicodeDecodeError, OSError, ValueError):
        raise ProxyProtocolError(f"PROXY v1 address is not IPv{version}") from None


def _v1_port(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 5 or (len(raw) > 1 and raw[0] == 0x30):
        raise ProxyProtocolError("PROXY v1 port is not a decimal 0..65535")
    port = int(raw)
    if port > 65535:
        raise ProxyProtocolError("PROXY v1 port is not a decimal 0..65535")
    return port


def _parse_v2(data: bytes | bytearray) -> ProxyHeader | None:
    head = bytes(data[: len(V2_SIGNATURE)])
    if not V2_SIGNATURE.startswith(head):
        raise ProxyProtocolError("bad PROXY v2 signature")
    if len(data) > 12 and data[12] not in (_V2_PROXY, _V2_LOCAL):
        raise ProxyProtocolError("PROXY v2 version/command is not 2/LOCAL|PROXY")
    if len(data) > 13 and (data[13] >> 4 > 3 or data[13] & 0xF > 2):
        raise ProxyProtocolError("PROXY v2 family/transport unknown")
    if len(data) < V2_HEADER:
        return None
    command, family, transport = data[12], data[13] >> 4, data[13] & 0xF
    (body,) = struct.unpack_from("!H", data, 14)
    if body > V2_MAX_BODY:
        raise ProxyProtocolError("PROXY v2 header over its size bound")
    address_len = _ADDRESS_LEN.get(family, 0)
    if body < address_len:
        raise ProxyProtocolError("PROXY v2 address block shorter than its family")
    length = V2_HEADER + body
    if len(data) < length:
        return None
    _check_tlvs(data, V2_HEADER + address_len, length)
    if command == _V2_LOCAL or family not in (1, 2) or transport == 0:
        return ProxyHeader(2, None, None, None, length)
    kind: Transport = "stream" if transport == 1 else "dgram"
    if family == 1:
        src_ip, dst_ip, src_port, dst_port = struct.unpack_from("!4s4sHH", data, V2_HEADER)
        inet = socket.AF_INET
    else:
        src_ip, dst_ip, src_port, dst_port = struct.unpack_from("!16s16sHH", data, V2_HEADER)
        inet = socket.AF_INET6
    source = (socket.inet_ntop(inet, src_ip), src_port)
    return ProxyHeader(2, source, (socket.inet_ntop(inet, dst_ip), dst_port), kind, length)


def _check_tlvs(data: bytes | bytearray, start: int, end: int) -> None:
    """TLVs are skipped, but each must fit: a malformed list means a broken sender."""
    at = start
    while at < end:
        if end - at < 3:
            raise ProxyProtocolError("PROXY v2 TLV truncated")
        (size,) = struct.unpack_from("!H", data, at + 1)
        at += 3 + size
        if at > end:
            raise ProxyProtocolError("PROXY v2 TLV overruns the header")


def _ip_pair(
    source: Address, destination: Address
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Both addresses in one family: an IPv4 one next to an IPv6 one is written IPv4-mapped."""
    src = ipaddress.ip_address(source[0].split("%", 1)[0])
    dst = ipaddress.ip_address(destination[0].split("%", 1)[0])
    if src.version != dst.version:
        if src.version == 4:
            src = ipaddress.IPv6Address(f"::ffff:{src}")
        else:
            dst = ipaddress.IPv6Address(f"::ffff:{dst}")
    return src, dst


def encode_v1(source: Address, destination: Address) -> bytes:
    """The v1 line saying a TCP connection came from `source` to `destination`."""
    src, dst = _ip_pair(source, destination)
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {int(source[1])} {int(destination[1])}\r\n".encode("ascii")


def encode_v2(source: Address, destination: Address, datagram: bool = False) -> bytes:
    """The v2 header (PROXY command, no TLVs) for a stream or, with `datagram`, a UDP flow."""
    src, dst = _ip_pair(source, destination)
    transport = 0x2 if datagram else 0x1
    if src.version == 4:
        body = struct.pack("!4s4sHH", src.packed, dst.packed, source[1], destination[1])
        family = 0x10
    else:
        body = struct.pack("!16s16sHH", src.packed, dst.packed, source[1], destination[1])
        family = 0x20
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family | transport, len(body)) + body


def encode_v2_local() -> bytes:
    """A v2 LOCAL header: the gateway speaking for itself (health checks)."""
    return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, 0, 0)
