"""Read the server name from a TLS ClientHello without decrypting anything.

Fed the bytes a client sent so far, `read_hello` answers one of: not enough bytes yet
(an int: how many bytes it needs in all before it can say more), the hello's server name
(a `Hello`, whose `sni` is None when the client sent no server_name extension), or
`BadHello` when the bytes are not a ClientHello the gateway accepts. Only the plaintext
record layer and the ClientHello fields in front of the extensions are walked; nothing is
decrypted and nothing is changed, the caller relays the very bytes it was fed.

The handshake message may span several records (a post-quantum key share makes it larger
than one) and each record may arrive over several reads. `HelloReader` keeps the records
it has taken between calls, and the caller feeds it again only once the bytes it asked for
are in, so each record is walked once, and the whole is bounded by `MAX_BYTES`.
"""

from __future__ import annotations

import re

MAX_HELLO = 16 * 1024
"""Largest ClientHello handshake message accepted (its 4-byte header excluded)."""

MAX_BYTES = MAX_HELLO + 4 * 1024
"""Largest number of bytes read before the hello must be complete (record headers included)."""

MAX_RECORD = 16 * 1024  # TLSPlaintext.length limit (RFC 8446 section 5.1)
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0
_NAME = re.compile(rb"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


class BadHello(Exception):
    """The bytes are not a ClientHello the gateway routes (the message says why)."""


class Hello:
    """A complete ClientHello: its server name (lower case, no trailing dot) or None."""

    __slots__ = ("sni", "size")

    def __init__(self, sni: str | None, size: int) -> None:
        self.sni = sni
        self.size = size  # bytes of records that carried the hello (more may follow in the buffer)

    def __repr__(self) -> str:
        return f"Hello(sni={self.sni!r}, size={self.size})"


def read_hello(data: bytes | bytearray) -> Hello | int:
    """The hello in `data` (what the client sent so far), or until it is complete the total
    number of bytes needed before calling again helps.

    Raises BadHello for anything else: not TLS, a record over the limits, a handshake
    message other than ClientHello, a hello larger than MAX_HELLO or malformed inside."""
    return HelloReader().feed(data)


class HelloReader:
    """`read_hello` for a stream that grows: each `feed` (with everything received so far)
    starts at the first record it has not taken yet, so a hello sent as thousands of tiny
    records costs time in proportion to its size, not to its square."""

    __slots__ = ("offset", "message")

    def __init__(self) -> None:
        self.offset = 0  # bytes of complete records taken
        self.message = bytearray()  # their fragments: the handshake message so far

    def feed(self, data: bytes | bytearray) -> Hello | int:
        """See `read_hello`; `data` must start with the bytes fed before."""
        message = self.message
        offset = self.offset
        while True:
            if len(data) - offset < 5:
                if len(data) > MAX_BYTES:
                    raise BadHello(f"no complete hello in the first {MAX_BYTES} bytes")
                return offset + 5
            kind, major = data[offset], data[offset + 1]
            length = int.from_bytes(data[offset + 3 : offset + 5], "big")
            if kind != _HANDSHAKE:
                raise BadHello(
                    "not a TLS handshake record" if offset == 0 else "a non-handshake record inside the hello"
                )
            if major != 3:
                raise BadHello("not a TLS record version")
            if length == 0 or length > MAX_RECORD:
                raise BadHello("a record length out of bounds")
            end = offset + 5 + length
            if len(data) < end:
                if len(data) > MAX_BYTES:
                    raise BadHello(f"no complete hello in the first {MAX_BYTES} bytes")
                # Check what the partial fragment already shows, so a bad header fails early.
                _check_header(bytes(message[:4]) + bytes(data[offset + 5 : offset + 9]))
                return end
            message += data[offset + 5 : end]
            offset = self.offset = end
            need = _check_header(message)
            if need is not None and len(message) >= need + 4:
                return Hello(server_name(bytes(message[4 : need + 4])), offset)


def _check_header(message: bytes | bytearray) -> int | None:
    """The handshake message's body length once its header is in; BadHello if it is not a
    ClientHello or is too large."""
    if not message:
        return None
    if message[0] != _CLIENT_HELLO:
        raise BadHello("the first handshake message is not a ClientHello")
    if len(message) < 4:
        return None
    size = int.from_bytes(message[1:4], "big")
    if size > MAX_HELLO:
        raise BadHello(f"the hello is larger than {MAX_HELLO} bytes")
    if size < 38:
        raise BadHello("the hello is too short")
    return size


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise BadHello("a field runs past the end of the hello")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.number(length_size))

    def left(self) -> int:
        return len(self.data) - self.pos


def server_name(body: bytes) -> str | None:
    """The host_name from a ClientHello body's server_name extension, or None without one."""
    reader = _Reader(body)
    reader.take(2 + 32)  # legacy_version, random
    if len(reader.vector(1)) > 32:
        raise BadHello("a session id longer than 32 bytes")
    suites = reader.vector(2)
    if not suites or len(suites) % 2:
        raise BadHello("bad cipher suites")
    if not reader.vector(1):
        raise BadHello("no compression methods")
    if reader.left() == 0:
        return None  # no extensions at all (old clients): no SNI
    extensions = _Reader(reader.vector(2))
    if reader.left():
        raise BadHello("bytes after the extensions")
    found: str | None = None
    seen: set[int] = set()
    while extensions.left():
        kind = extensions.number(2)
        payload = extensions.vector(2)
        if kind in seen:
            raise BadHello("an extension appears twice")
        seen.add(kind)
        if kind == _SERVER_NAME:
            found = _host_name(payload)
    return found


def _host_name(payload: bytes) -> str | None:
    names = _Reader(_Reader(payload).vector(2))
    if len(payload) != names.left() + 2:
        raise BadHello("bytes after the server name list")
    while names.left():
        kind = names.number(1)
        name = names.vector(2)
        if kind != _HOST_NAME:
            continue
        name = name.lower().rstrip(b".")
        if len(name) > 253 or not _NAME.match(name):
            raise BadHello("the server name is not a host name")
        return name.decode("ascii")
    return None
