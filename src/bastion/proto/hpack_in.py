"""HPACK decoding of request heads, leaner than hpack's `Decoder` on the per-request path.

Same rules and the same errors as hpack's decoder (whose dynamic table and Huffman decoder it
uses, so h2 handles its failures as before): indexed fields, literals with, without and never
indexing, table size updates only at the start of a block and never above the size the
gateway allowed, and the decoded header list bounded by `max_header_list_size` as it grows
(an HPACK bomb stops there). What it leaves out is per-field overhead: hpack builds a
`HeaderTuple` object and a debug log record per field; this returns plain `(name, value)`
byte tuples. Integers are bounded (at most 4 continuation bytes), so no field can make it
compute a huge number.
"""

from __future__ import annotations

from hpack.exceptions import HPACKDecodingError, InvalidTableSizeError, OversizedHeaderListError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

_MAX_CONTINUATION = 4  # 7 bits each: values up to 2**28 + prefix
# Clients send the same short Huffman-coded values again and again (a path, a user agent, an
# authority) when they do not index them: their decoding is kept, per process, bounded.
_HUFFMAN_CACHE: dict[bytes, bytes] = {}
_HUFFMAN_CACHE_SIZE = 1024
_HUFFMAN_CACHED_LENGTH = 64


def _integer(data: bytes, i: int, mask: int) -> tuple[int, int]:
    """RFC 7541 section 5.1: the integer whose prefix is the low bits `mask` of data[i]."""
    value = data[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while True:
        byte = data[i]
        i += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 7 * _MAX_CONTINUATION:
            raise HPACKDecodingError("HPACK integer too long")


def _string(data: bytes, i: int) -> tuple[bytes, int]:
    huffman = data[i] & 0x80
    length, i = _integer(data, i, 0x7F)
    end = i + length
    if end > len(data):
        raise HPACKDecodingError("Truncated header block")
    text = data[i:end]
    if not huffman:
        return text, end
    plain = _HUFFMAN_CACHE.get(text)
    if plain is None:
        plain = decode_huffman(text)
        if length <= _HUFFMAN_CACHED_LENGTH:
            if len(_HUFFMAN_CACHE) >= _HUFFMAN_CACHE_SIZE:
                _HUFFMAN_CACHE.clear()
            _HUFFMAN_CACHE[text] = plain
    return plain, end


class FastDecoder:
    """Stands in for `hpack.Decoder` in an h2 connection (`decode`, `max_header_list_size`,
    `max_allowed_table_size`, `header_table_size`)."""

    def __init__(self, max_header_list_size: int = 65536) -> None:
        self.header_table = HeaderTable()
        self.max_header_list_size = max_header_list_size
        self.max_allowed_table_size = self.header_table.maxsize

    @property
    def header_table_size(self) -> int:
        return self.header_table.maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self.header_table.maxsize = value

    def decode(self, data: bytes | memoryview, raw: bool = True) -> list[tuple[bytes, bytes]]:
        """The header list of one complete block (raw bytes only: h2 asks for raw)."""
        if not isinstance(data, bytes):
            data = bytes(data)
        table = self.header_table
        get = table.get_by_index
        limit = self.max_header_list_size
        headers: list[tuple[bytes, bytes]] = []
        size = 0
        i = 0
        end = len(data)
        try:
            while i < end:
                first = data[i]
                if first & 0x80:  # indexed field
                    index, i = _integer(data, i, 0x7F)
                    name, value = get(index)
                elif first & 0x40:  # literal, added to the table
                    if first & 0x3F:
                        index, i = _integer(data, i, 0x3F)
                        name = get(index)[0]
                    else:
                        name, i = _string(data, i + 1)
                    value, i = _string(data, i)
                    table.add(name, value)
                elif first & 0x20:  # dynamic table size update
                    if headers:
                        raise HPACKDecodingError("Table size update not at the start of the block")
                    new_size, i = _integer(data, i, 0x1F)
                    if new_size > self.max_allowed_table_size:
                        raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                    table.maxsize = new_size
                    continue
                else:  # literal without indexing, or never indexed
                    if first & 0x0F:
                        index, i = _integer(data, i, 0x0F)
                        name = get(index)[0]
                    else:
                        name, i = _string(data, i + 1)
                    value, i = _string(data, i)
                headers.append((name, value))
                size += len(name) + len(value) + 32
                if size > limit:
                    raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
        except IndexError as exc:
            raise HPACKDecodingError("Truncated header block") from exc
        if table.maxsize > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        return headers
