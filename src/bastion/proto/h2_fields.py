"""The checks RFC 9113 section 8.2 asks of a response head or trailers from an HTTP/2 target,
in one pass.

h2 does them as a chain of generators, seven per field, which cost more than decoding the
block; the upstream connection switches h2's inbound checks off and runs this instead, with
the same rules and the same outcome (the connection is a protocol error): names non-empty,
lower case, of visible ASCII and with no colon past the first byte; values without NUL, CR or
LF and not starting or ending with a space or tab; no connection-specific field, `te` only as
`trailers`; pseudo-header fields first, once each, known, `:status` present and no request
pseudo-header in a head, none at all in trailers. `cookie` fields are joined, as h2 does.

`response_parts` also takes out what the gateway needs of a head (the status, the first
content-length) and the fields that do not cross it.
"""

from __future__ import annotations

import re
from typing import Any

from bastion.http.model import HeaderList

_NAME = re.compile(rb"[\x21-\x39\x3b-\x40\x5b-\x7e]+")  # visible ASCII, no upper case, no colon
_CONNECTION = frozenset((b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"))
_GOOD_NAMES: set[bytes] = set()  # names seen valid (bounded): a set lookup instead of the regex
_GOOD_NAMES_SIZE = 2048
_WS = (0x20, 0x09)


def response_parts(raw: list[Any], trailers: bool, drop: frozenset[bytes]) -> tuple[int, HeaderList, int | None] | None:
    """(:status, the fields not in `drop`, content-length) of a head, or trailers (status 0);
    None if malformed (the rules above, or a :status that is not 3 digits)."""
    regular = False
    status = 0
    length: int | None = None
    seen_length = False
    cookies: list[bytes] | None = None
    out: HeaderList = []
    for name, value in raw:
        if value and (b"\r" in value or b"\n" in value or b"\0" in value or value[0] in _WS or value[-1] in _WS):
            return None
        if name[:1] == b":":
            if regular or trailers or name != b":status" or status or len(value) != 3 or not value.isdigit():
                return None  # out of order, in trailers, a request's, unknown, repeated or not a status
            status = int(value)
            continue
        regular = True
        if name not in _GOOD_NAMES:
            if not _NAME.fullmatch(name) or name in _CONNECTION:
                return None
            if len(_GOOD_NAMES) < _GOOD_NAMES_SIZE:
                _GOOD_NAMES.add(name)
        if name == b"te":
            if value.lower() != b"trailers":
                return None
        elif name == b"cookie":
            if cookies is None:
                cookies = []
            cookies.append(value)
            continue
        elif name == b"content-length" and not seen_length:
            seen_length = True
            try:
                length = int(value)
            except ValueError:
                length = None
        if name not in drop:
            out.append((name, value))
    if not status and not trailers:
        return None
    if cookies is not None and b"cookie" not in drop:
        out.append((b"cookie", b"; ".join(cookies)))
    return status, out, length
