"""W3C Trace Context (https://www.w3.org/TR/trace-context/): reading `traceparent` and
bounding `tracestate`, with no dependency, so it is usable and testable without OpenTelemetry.

`traceparent` is `VERSION-TRACEID-PARENTID-FLAGS` in lower-case hex. Version 00 is exactly 55
characters; a later version is read by its first 55 characters (followed by `-` when there is
more), as the spec asks, and `ff` is never valid. An all-zero trace id or parent id is invalid,
and so are several `traceparent` fields (there is no way to tell which one is meant). An invalid
`traceparent` starts a new trace, and its `tracestate` is dropped with it.

`tracestate` is passed on as the client wrote it (several fields joined with `,`), but bounded:
past 512 characters or 32 list members, whole members are dropped from the end, which is where
the spec puts the oldest ones.
"""

from __future__ import annotations

import re
from typing import NamedTuple

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"

TRACESTATE_MAX_CHARS = 512
TRACESTATE_MAX_MEMBERS = 32

_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


class TraceParent(NamedTuple):
    trace_id: int
    span_id: int
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)


def parse_traceparent(value: bytes) -> TraceParent | None:
    """The parent a `traceparent` value names, or None if it is not valid."""
    value = value.strip(b" \t")
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == b"ff":
        return None
    if version == b"00":
        if len(value) != 55:
            return None
    elif len(value) > 55 and value[55:56] != b"-":
        return None
    parent = TraceParent(int(trace_id, 16), int(span_id, 16), int(flags, 16))
    if parent.trace_id == 0 or parent.span_id == 0:
        return None
    return parent


def format_traceparent(trace_id: int, span_id: int, flags: int) -> bytes:
    """A version-00 `traceparent` value."""
    return b"00-%032x-%016x-%02x" % (trace_id, span_id, flags & 0xFF)


def bounded_tracestate(values: list[bytes]) -> bytes | None:
    """The `tracestate` to pass on, from every field the client sent: joined, and cut to the
    spec's bounds by whole members. None when nothing is left."""
    joined = b",".join(value.strip(b" \t") for value in values)
    if len(joined) <= TRACESTATE_MAX_CHARS and joined.count(b",") < TRACESTATE_MAX_MEMBERS:
        return joined or None
    kept: list[bytes] = []
    size = 0
    for member in joined.split(b","):
        member = member.strip(b" \t")
        if not member:
            continue
        extra = len(member) + (1 if kept else 0)
        if size + extra > TRACESTATE_MAX_CHARS or len(kept) == TRACESTATE_MAX_MEMBERS:
            break
        kept.append(member)
        size += extra
    return b",".join(kept) or None


def incoming_context(fields: list[tuple[bytes, bytes]]) -> tuple[TraceParent | None, bytes | None, bool]:
    """From a request's header fields: the valid parent (or None), its `tracestate` (None when
    there is no valid parent) and whether any trace-context field was present at all."""
    parents: list[bytes] = []
    states: list[bytes] = []
    for name, value in fields:
        if name == TRACEPARENT:
            parents.append(value)
        elif name == TRACESTATE:
            states.append(value)
    present = bool(parents or states)
    if len(parents) != 1:
        return None, None, present
    parent = parse_traceparent(parents[0])
    if parent is None:
        return None, None, present
    return parent, bounded_tracestate(states) if states else None, present
