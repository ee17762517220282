"""HPACK for the gateway's own header blocks: stateless, so it can be cached.

hpack's `Encoder` keeps a dynamic table: every field is searched in it, added, evicted, and
Huffman-coded, which made encoding response heads the largest cost of an HTTP/2 response. This
encoder never adds to the dynamic table (RFC 7541 allows that: the table is the encoder's to
use or not), so a field's encoding depends only on the field: a full static-table match is one
indexed byte, any other field a literal without indexing (a static name index where there is
one) and a plain, not Huffman-coded, value. Name prefixes are cached. Responses are a little
larger on the wire than with the dynamic table; the client does less work too.

h2 gives the encoder the client's SETTINGS_HEADER_TABLE_SIZE; a change is acknowledged with a
dynamic table size update at the start of the next block, as RFC 7541 section 4.2 requires
(nghttp2 refuses a block without it).
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack.table import HeaderTable

_STATIC_PAIRS: dict[tuple[bytes, bytes], bytes] = {}  # a whole static entry: one indexed byte
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):  # 61 entries
    _STATIC_NAMES.setdefault(_name, _index)
    if _value:
        _STATIC_PAIRS.setdefault((_name, _value), bytes((0x80 | _index,)))

# Fields a proxy further along must never put into its own dynamic table (RFC 7541 section 7.1.3).
_SENSITIVE = frozenset((b"set-cookie", b"authorization", b"proxy-authorization", b"cookie"))
_NAME_CACHE_SIZE = 512


def encode_integer(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    """RFC 7541 section 5.1, with `flags` in the first byte's bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _name_prefix(name: bytes) -> bytes:
    """What precedes the value of a literal field without indexing (or never indexed)."""
    flags = 0x10 if name in _SENSITIVE else 0x00
    index = _STATIC_NAMES.get(name)
    if index is not None:
        return encode_integer(index, 4, flags)
    return bytes((flags,)) + encode_integer(len(name), 7) + name


class StatelessEncoder:
    """Stands in for `hpack.Encoder` in an h2 connection (`encode`, `header_table_size`)."""

    def __init__(self) -> None:
        self._names: dict[bytes, bytes] = {}
        self._size_update: int | None = None
        self._table_size = 4096

    @property
    def header_table_size(self) -> int:
        return self._table_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._table_size = value
        self._size_update = value

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        parts: list[bytes] = []
        if self._size_update is not None:
            parts.append(encode_integer(self._size_update, 5, 0x20))
            self._size_update = None
        names = self._names
        for field in headers:
            whole = _STATIC_PAIRS.get(field)
            if whole:
                parts.append(whole)
                continue
            name, value = field
            prefix = names.get(name)
            if prefix is None:
                prefix = _name_prefix(name)
                if len(names) >= _NAME_CACHE_SIZE:
                    names.clear()
                names[name] = prefix
            size = len(value)
            parts += (prefix, bytes((size,)) if size < 127 else encode_integer(size, 7), value)
        return b"".join(parts)
