"""The gateway's counters: plain ints and dicts on the request path, Prometheus at scrape time.

Each request is counted once, when it ends: the exchange's last step calls `Metrics.observe`
with itself. The counts live where the request already points: its route's `RouteStats`
(reached through `RouteRuntime.stats`, no lookup by name) and its target's `responses`
dict on the `TargetState`. `observe` is a clock read, a `bisect` into fixed bucket bounds
and two dict increments, about 4,500 machine instructions (under 0.5 us); nothing on that
path builds strings, takes a lock or calls prometheus_client, whose labelled counters and
histogram would cost ten times as much. docs/admin.md has the measurements.

`RouteStats` and `UpstreamStats` belong to the `Metrics` object, keyed by name, and live as
long as the process: a reload hands the same records to the new snapshot's routes and
upstreams, so no count is lost. Upstream latency and retries are counted per try by
`UpstreamRuntime` (only it knows when a try started).

`export()` turns the counters into plain JSON data; with `--workers N` each worker exports
its own and `merge_exports` adds them up. The Prometheus names and the text format are in
`observability/exposition.py`.

The same call keeps the last `RECENT_ERRORS` server-side errors (5xx answers, and responses
cut short by an upstream failure) for the admin API's `GET /errors`: one comparison per
request, the rest only when there is an error. 4xx answers are counted but not kept, so a
scanner's stream of 404s cannot push out the 502 an operator is looking for.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bastion.errors import GatewayError

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the request and upstream latency histograms; +Inf is implied."""

UNMATCHED = "(none)"
"""The `route` label of requests no route took (404, 405)."""

OTHER_METHOD = "OTHER"
"""The `method` label of methods outside the standard ones: clients must not mint label values."""

RECENT_ERRORS = 100
"""How many recent errors each process keeps for `GET /errors`."""

_TEXT_LIMIT = 256  # a kept path or host is cut to this many characters

_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"))
_REFUSALS = frozenset((401, 403, 429))
_monotonic = time.monotonic


# The grpc-status values counted as themselves; anything else would be a label an upstream
# could mint at will.
_GRPC_CODES = frozenset(str(code).encode() for code in range(17))


class Histogram:
    """Counts per bucket (not cumulative) and the sum; `counts[-1]` is the +Inf bucket."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(REQUEST_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(REQUEST_BUCKETS, seconds)] += 1
        self.sum += seconds

    def export(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}


class RouteStats:
    """One route's requests: answers by method and status, latency, refusals."""

    __slots__ = ("responses", "latency", "refused", "grpc")

    def __init__(self) -> None:
        # method -> status -> count: nested dicts, because a (method, status) tuple key costs
        # more (allocation and tuple hashing) than a second lookup.
        self.responses: dict[str, dict[int, int]] = {}
        self.latency = Histogram()
        self.refused: dict[int, int] = {}  # 401/403/429 the gateway made itself (no upstream asked)
        self.grpc: dict[bytes, int] = {}  # grpc-status value -> gRPC calls that ended with it

    def by_method(self, method: str) -> dict[int, int]:
        """The status counts of `method`; any method outside the standard ones is counted as OTHER."""
        if method not in _METHODS:
            method = OTHER_METHOD
        counts = self.responses.get(method)
        if counts is None:
            counts = self.responses[method] = {}
        return counts

    def export(self) -> dict[str, Any]:
        return {
            "responses": [
                [method, status, count] for method, counts in self.responses.items() for status, count in counts.items()
            ],
            "latency": self.latency.export(),
            "refused": [[status, count] for status, count in self.refused.items()],
            "grpc": [[code.decode("latin-1"), count] for code, count in self.grpc.items()],
        }


class UpstreamStats:
    """One upstream's tries: latency of each try that got a response head (send -> head),
    retries made and retries the budget refused."""

    __slots__ = ("latency", "retries", "retries_denied")

    def __init__(self) -> None:
        self.latency = Histogram()
        self.retries = 0
        self.retries_denied = 0

    def export(self) -> dict[str, Any]:
        return {"latency": self.latency.export(), "retries": self.retries, "retries_denied": self.retries_denied}


class _Routed(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def stats(self) -> RouteStats: ...


class _Request(Protocol):
    @property
    def method(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def request_id(self) -> str: ...


class _Answered(Protocol):
    @property
    def upstream(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def responses(self) -> dict[int, int]: ...


class FinishedRequest(Protocol):
    """What `observe` reads of an exchange (a Protocol: observability imports nothing above it)."""

    @property
    def route(self) -> _Routed | None: ...  # RouteRuntime
    @property
    def request(self) -> _Request: ...
    @property
    def target(self) -> _Answered | None: ...  # TargetState of the last try
    @property
    def status(self) -> int: ...
    @property
    def started(self) -> float: ...  # time.monotonic() when the request head arrived
    @property
    def _error(self) -> GatewayError | None: ...  # what the gateway answered with, or what cut the response


class ProxyProtocolStats:
    """One listener's connections by what became of their PROXY header."""

    __slots__ = ("accepted", "untrusted", "invalid", "timeout", "logged_at")

    RESULTS = ("accepted", "untrusted", "invalid", "timeout")

    def __init__(self) -> None:
        self.accepted = 0  # a valid header, handed to the listener's protocol
        self.untrusted = 0  # a peer outside proxy_protocol.trusted, closed unread
        self.invalid = 0  # a malformed header, closed
        self.timeout = 0  # no complete header in time, closed
        self.logged_at = 0.0  # last refusal logged (refusals are logged rate-limited)

    def rows(self, listener: str) -> list[list[Any]]:
        return [[listener, result, getattr(self, result)] for result in self.RESULTS]


class UdpStats:
    """One udp listener's traffic; `sessions_active` is a gauge, the rest count up."""

    __slots__ = ("datagrams", "bytes", "sessions", "sessions_active", "evicted", "dropped")

    def __init__(self) -> None:
        self.datagrams = [0, 0]  # [client to target, target to client]
        self.bytes = [0, 0]
        self.sessions = 0
        self.sessions_active = 0
        self.evicted = 0  # sessions ended at max_sessions to make room for a new client
        self.dropped: dict[str, int] = {}  # reason -> datagrams dropped

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def export(self) -> dict[str, Any]:
        return {
            "datagrams": list(self.datagrams),
            "bytes": list(self.bytes),
            "sessions": self.sessions,
            "sessions_active": self.sessions_active,
            "evicted": self.evicted,
            "dropped": [[reason, count] for reason, count in self.dropped.items()],
        }


class Metrics:
    """What one process counted since it started. Owned by the Gateway (through its
    TargetRegistry, which every snapshot shares), so reloads keep every count."""

    __slots__ = (
        "routes",
        "upstreams",
        "unmatched",
        "recent_errors",
        "errors_seen",
        "tls_handshakes",
        "rejected",
        "proxy_protocol",
        "udp",
        "l4_connections",
        "l4_bytes",
    )

    def __init__(self) -> None:
        self.routes: dict[str, RouteStats] = {}
        self.upstreams: dict[str, UpstreamStats] = {}
        self.unmatched = self.route(UNMATCHED)
        self.recent_errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        self.errors_seen = 0  # every error `recent_errors` was given, kept or since pushed out
        self.tls_handshakes: dict[tuple[str, str], int] = {}  # (listener, completed|failed) -> count
        self.rejected: dict[tuple[str, int], int] = {}  # (listener, status) -> requests refused unparsed
        self.proxy_protocol: dict[str, ProxyProtocolStats] = {}  # by listener
        self.udp: dict[str, UdpStats] = {}  # by listener
        self.l4_connections: dict[tuple[str, str], int] = {}  # (listener, close reason) -> L4 connections ended
        self.l4_bytes: dict[tuple[str, str], int] = {}  # (listener, in|out) -> bytes relayed by ended ones

    def proxy_stats(self, listener: str) -> ProxyProtocolStats:
        stats = self.proxy_protocol.get(listener)
        if stats is None:
            stats = self.proxy_protocol[listener] = ProxyProtocolStats()
        return stats

    def udp_stats(self, listener: str) -> UdpStats:
        stats = self.udp.get(listener)
        if stats is None:
            stats = self.udp[listener] = UdpStats()
        return stats

    def reject(self, listener: str, status: int) -> None:
        """Count a request the protocol refused before it became one to route (400, 414, 431...)."""
        key = (listener, status)
        self.rejected[key] = self.rejected.get(key, 0) + 1

    def l4_closed(self, listener: str, reason: str, bytes_in: int, bytes_out: int) -> None:
        """Count one ended L4 connection (tcp, tls_passthrough) and the bytes it relayed."""
        key = (listener, reason)
        self.l4_connections[key] = self.l4_connections.get(key, 0) + 1
        if bytes_in:
            key = (listener, "in")
            self.l4_bytes[key] = self.l4_bytes.get(key, 0) + bytes_in
        if bytes_out:
            key = (listener, "out")
            self.l4_bytes[key] = self.l4_bytes.get(key, 0) + bytes_out

    def tls_handshake(self, listener: str, completed: bool) -> None:
        """Count one TLS handshake on an https listener, completed or failed (per connection)."""
        key = (listener, "completed" if completed else "failed")
        self.tls_handshakes[key] = self.tls_handshakes.get(key, 0) + 1

    def route(self, name: str) -> RouteStats:
        stats = self.routes.get(name)
        if stats is None:
            stats = self.routes[name] = RouteStats()
        return stats

    def upstream(self, name: str) -> UpstreamStats:
        stats = self.upstreams.get(name)
        if stats is None:
            stats = self.upstreams[name] = UpstreamStats()
        return stats

    def observe(self, exchange: FinishedRequest) -> None:
        """Count one finished request: called once per request, at its very end."""
        route = exchange.route
        stats = route.stats if route is not None else self.unmatched
        status = exchange.status
        counts = stats.responses.get(exchange.request.method)
        if counts is None:  # first time, or a method outside the standard ones
            counts = stats.by_method(exchange.request.method)
        counts[status] = counts.get(status, 0) + 1
        seconds = _monotonic() - exchange.started
        latency = stats.latency
        latency.counts[bisect_left(REQUEST_BUCKETS, seconds)] += 1
        latency.sum += seconds
        target = exchange.target
        if target is not None:
            codes = target.responses
            codes[status] = codes.get(status, 0) + 1
        elif status in _REFUSALS:  # no upstream was asked: a plugin refused
            stats.refused[status] = stats.refused.get(status, 0) + 1
        grpc: bytes | None = getattr(exchange, "grpc_status", None)  # fakes in tests may lack it
        if grpc is not None:
            if grpc not in _GRPC_CODES:
                grpc = b"2"  # not a status (an upstream's bytes): UNKNOWN, as its client reads it
            stats.grpc[grpc] = stats.grpc.get(grpc, 0) + 1
        if status >= 500 or exchange._error is not None:
            self._keep_error(exchange, seconds)

    def _keep_error(self, exchange: FinishedRequest, seconds: float) -> None:
        """Keep a 5xx, or a response an upstream failure cut short (its status is the
        upstream's); not the gateway's own 4xx answers."""
        error = exchange._error
        status = exchange.status
        if status < 500 and (error is None or error.status < 500):
            return
        route = exchange.route
        target = exchange.target
        request = exchange.request
        upstream, address = (target.upstream, target.name) if target is not None else (None, None)
        if target is None and error is not None and error.where is not None:
            upstream, address = error.where  # a try that failed before a connection was had
        if error is not None:
            source = "gateway"
        elif target is not None:
            source = "upstream"
        else:
            source = "plugin"
        self.errors_seen += 1
        self.recent_errors.append(
            {
                "at": time.time(),
                "status": status,
                "error": error.word if error is not None else None,
                "message": error.message if error is not None else None,
                "source": source,
                "route": route.name if route is not None else UNMATCHED,
                "method": request.method[:16],
                "host": (request.host or "")[:_TEXT_LIMIT],
                "path": request.path[:_TEXT_LIMIT],
                "upstream": upstream,
                "target": address,
                "request_id": request.request_id,
                "duration_ms": round(seconds * 1000, 3),
            }
        )

    def export(self) -> dict[str, Any]:
        """Plain JSON data (lists and dicts), the unit that workers exchange and add up.
        Routes that never saw a request are left out."""
        return {
            "routes": {name: stats.export() for name, stats in self.routes.items() if stats.responses},
            "upstreams": {name: stats.export() for name, stats in self.upstreams.items()},
            "tls_handshakes": [[listener, result, count] for (listener, result), count in self.tls_handshakes.items()],
            "rejected": [[listener, str(status), count] for (listener, status), count in self.rejected.items()],
            "proxy_protocol": [row for name, stats in self.proxy_protocol.items() for row in stats.rows(name)],
            "udp": {name: stats.export() for name, stats in self.udp.items()},
            "l4_connections": [[listener, result, count] for (listener, result), count in self.l4_connections.items()],
            "l4_bytes": [[listener, direction, count] for (listener, direction), count in self.l4_bytes.items()],
        }


def add_histograms(into: dict[str, Any] | None, other: dict[str, Any]) -> dict[str, Any]:
    """Two exported histograms added bucket by bucket (`into` None: a copy of `other`)."""
    if into is None:
        return {"counts": list(other["counts"]), "sum": other["sum"]}
    into["counts"] = [a + b for a, b in zip(into["counts"], other["counts"], strict=True)]
    into["sum"] += other["sum"]
    return into


def add_rows(into: list[list[Any]], rows: Iterable[list[Any]]) -> list[list[Any]]:
    """Rows of [label..., count] added up by their labels."""
    totals = {tuple(row[:-1]): row[-1] for row in into}
    for *labels, count in rows:
        key = tuple(labels)
        totals[key] = totals.get(key, 0) + count
    return [[*key, count] for key, count in totals.items()]


def merge_exports(exports: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Several processes' `export()`s added up: counters summed, histograms bucket by bucket."""
    routes: dict[str, dict[str, Any]] = {}
    upstreams: dict[str, dict[str, Any]] = {}
    handshakes: list[list[Any]] = []
    rejected: list[list[Any]] = []
    proxy: list[list[Any]] = []
    udp: dict[str, dict[str, Any]] = {}
    l4_connections: list[list[Any]] = []
    l4_bytes: list[list[Any]] = []
    for export in exports:
        proxy = add_rows(proxy, export.get("proxy_protocol", ()))
        for name, stats in export.get("udp", {}).items():
            udp[name] = add_udp(udp.get(name), stats)
        handshakes = add_rows(handshakes, export.get("tls_handshakes", ()))
        rejected = add_rows(rejected, export.get("rejected", ()))
        l4_connections = add_rows(l4_connections, export.get("l4_connections", ()))
        l4_bytes = add_rows(l4_bytes, export.get("l4_bytes", ()))
        for name, route in export["routes"].items():
            merged = routes.setdefault(name, {"responses": [], "latency": None, "refused": [], "grpc": []})
            merged["responses"] = add_rows(merged["responses"], route["responses"])
            merged["refused"] = add_rows(merged["refused"], route["refused"])
            merged["grpc"] = add_rows(merged["grpc"], route.get("grpc", ()))
            merged["latency"] = add_histograms(merged["latency"], route["latency"])
        for name, stats in export["upstreams"].items():
            merged = upstreams.setdefault(name, {"latency": None, "retries": 0, "retries_denied": 0})
            merged["latency"] = add_histograms(merged["latency"], stats["latency"])
            merged["retries"] += stats["retries"]
            merged["retries_denied"] += stats["retries_denied"]
    return {
        "routes": routes,
        "upstreams": upstreams,
        "tls_handshakes": handshakes,
        "rejected": rejected,
        "proxy_protocol": proxy,
        "udp": udp,
        "l4_connections": l4_connections,
        "l4_bytes": l4_bytes,
    }


def add_udp(into: dict[str, Any] | None, other: dict[str, Any]) -> dict[str, Any]:
    """Two exported UdpStats added up (`into` None: a copy of `other`)."""
    if into is None:
        return {**other, "datagrams": list(other["datagrams"]), "bytes": list(other["bytes"])}
    for key in ("datagrams", "bytes"):
        into[key] = [a + b for a, b in zip(into[key], other[key], strict=True)]
    into["sessions"] += other["sessions"]
    into["sessions_active"] += other["sessions_active"]
    into["evicted"] += other["evicted"]
    into["dropped"] = add_rows(into["dropped"], other["dropped"])
    return into
