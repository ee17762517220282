"""Typed config scalars: durations, sizes and addresses are parsed once, here.

`Duration` becomes float seconds, `Size` int bytes, `Address` a (host, port) pair.
The JSON Schema keeps them as strings with a pattern so editors can check them too.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, NamedTuple

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|K|M|G)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024**2, "MB": 1024**2, "G": 1024**3, "GB": 1024**3}


def parse_duration(value: Any) -> float:
    """'250ms' -> 0.25. A bare 0 is accepted (it needs no unit); other numbers are not."""
    if isinstance(value, bool):
        raise ValueError("a duration is a string with a unit, like 250ms, 2s, 5m or 1h")
    if isinstance(value, int | float) and value == 0:
        return 0.0
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError(f"not a duration: {value!r} (use a unit: 250ms, 2s, 5m, 1h)")


def parse_size(value: Any) -> int:
    """'8MB' -> 8388608 (KB = 1024 bytes). A plain integer is a count of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string like 512KB or 8MB")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])
    raise ValueError(f"not a size: {value!r} (use 512KB, 8MB, 1GB or a number of bytes)")


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: Any) -> HostPort:
    """'127.0.0.1:8080', 'example.com:80' or '[::1]:8080' -> HostPort."""
    if isinstance(value, HostPort):
        return value
    if not isinstance(value, str):
        raise ValueError("not host:port")
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError("not host:port (write IPv6 addresses as [::1]:8080)")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("not host:port")
    return HostPort(host, int(port))


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(lambda v: f"{v * 1000:g}ms", return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _DURATION.pattern, "examples": ["250ms", "2s"]},
                {"const": 0},  # a bare 0 needs no unit
            ]
        }
    ),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _SIZE.pattern, "examples": ["512KB", "8MB"]},
                {"type": "integer", "minimum": 0},
            ]
        }
    ),
]
Address = Annotated[
    HostPort,
    BeforeValidator(parse_address),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["127.0.0.1:8080", "[::1]:8080"]}),
]
