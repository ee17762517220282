"""The gateway's counters: plain ints and lists on the request path, Prometheus at scrape time.

Each request is counted once, when it ends: the exchange's last step calls `Metrics.observe`
with itself, which adds to a few dicts keyed by label values and to a latency histogram
(a `bisect` into fixed bucket bounds). Nothing on that path builds strings, takes a lock or
calls prometheus_client: a labelled prometheus_client counter costs a `labels()` lookup
under a lock per use, several times this whole function (see docs/admin.md for numbers).

Upstream latency and retries are counted per try by `UpstreamRuntime` (only it knows when a
try started) into an `UpstreamStats` that, like this object, lives as long as the process.

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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bastion.http.exchange import Exchange

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the request and upstream latency histograms; +Inf is implied."""

UNMATCHED = "(none)"
"""The `route` label of requests no route took (404, 405, and requests refused before routing)."""

OTHER_METHOD = "OTHER"
"""The `method` label of methods outside the standard ones: clients must not mint label values."""

RECENT_ERRORS = 100
"""How many recent errors each process keeps for `GET /errors`."""

_TEXT_LIMIT = 256  # a kept path or host is cut to this many characters

_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"))
_REFUSALS = frozenset((401, 403, 429))


class Histogram:
    """Counts per bucket (not cumulative) and the sum; `counts[-1]` is the +Inf bucket."""

    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int = len(REQUEST_BUCKETS)) -> None:
        self.counts = [0] * (buckets + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(REQUEST_BUCKETS, seconds)] += 1
        self.sum += seconds

    def export(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}


class UpstreamStats:
    """Per upstream, for the life of the process: latency of each try that got a response
    head (send -> head), retries made and retries the budget refused."""

    __slots__ = ("latency", "retries", "retries_denied")

    def __init__(self) -> None:
        self.latency = Histogram()
        self.retries = 0
        self.retries_denied = 0

    def export(self) -> dict[str, Any]:
        return {"latency": self.latency.export(), "retries": self.retries, "retries_denied": self.retries_denied}


class Metrics:
    """What one process counted since it started. Owned by the Gateway (through its
    TargetRegistry, which every snapshot shares), so reloads keep every count."""

    __slots__ = (
        "requests",
        "durations",
        "target_responses",
        "refused",
        "bytes",
        "upstreams",
        "started",
        "recent_errors",
        "errors_seen",
    )

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}  # (route, method, status)
        self.durations: dict[str, Histogram] = {}  # route
        self.target_responses: dict[tuple[str, str, int], int] = {}  # (upstream, target, status)
        self.refused: dict[tuple[str, int], int] = {}  # (route, status): 401/403/429 made by the gateway
        self.bytes: dict[str, list[int]] = {}  # route -> [received, sent] body bytes
        self.upstreams: dict[str, UpstreamStats] = {}
        self.started = time.time()
        self.recent_errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        self.errors_seen = 0  # every error `recent_errors` was given, kept or since pushed out

    def upstream(self, name: str) -> UpstreamStats:
        stats = self.upstreams.get(name)
        if stats is None:
            stats = self.upstreams[name] = UpstreamStats()
        return stats

    def observe(self, exchange: Exchange) -> None:
        """Count one finished request: called once per request, at its very end."""
        route = exchange.route
        name = route.name if route is not None else UNMATCHED
        status = exchange.status
        method = exchange.request.method
        if method not in _METHODS:
            method = OTHER_METHOD
        key = (name, method, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        histogram = self.durations.get(name)
        if histogram is None:
            histogram = self.durations[name] = Histogram()
        duration = time.monotonic() - exchange.started
        histogram.observe(duration)
        sizes = self.bytes.get(name)
        if sizes is None:
            sizes = self.bytes[name] = [0, 0]
        sizes[0] += exchange.bytes_in
        sizes[1] += exchange.bytes_out
        target = exchange.target
        if target is not None:
            tkey = (target.upstream, target.name, status)
            responses = self.target_responses
            responses[tkey] = responses.get(tkey, 0) + 1
        elif status in _REFUSALS:  # no upstream was asked: a plugin (or the router) refused
            rkey = (name, status)
            self.refused[rkey] = self.refused.get(rkey, 0) + 1
        if status >= 500 or exchange._error is not None:
            self._keep_error(exchange, name, duration)

    def _keep_error(self, exchange: Exchange, route: str, duration: float) -> None:
        """Keep a 5xx, or a response an upstream failure cut short (its status is the
        upstream's); not the gateway's own 4xx answers."""
        error = exchange._error
        status = exchange.status
        if status < 500 and (error is None or error.status < 500):
            return
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
                "route": route,
                "method": request.method[:16],
                "host": (request.host or "")[:_TEXT_LIMIT],
                "path": request.path[:_TEXT_LIMIT],
                "upstream": upstream,
                "target": address,
                "request_id": request.request_id,
                "duration_ms": round(duration * 1000, 3),
            }
        )

    def export(self) -> dict[str, Any]:
        """Plain JSON data (lists and dicts), the unit that workers exchange and add up."""
        return {
            "requests": [[*key, count] for key, count in self.requests.items()],
            "durations": {name: h.export() for name, h in self.durations.items()},
            "target_responses": [[*key, count] for key, count in self.target_responses.items()],
            "refused": [[*key, count] for key, count in self.refused.items()],
            "bytes": {name: list(sizes) for name, sizes in self.bytes.items()},
            "upstreams": {name: stats.export() for name, stats in self.upstreams.items()},
        }


def _add_histogram(into: dict[str, Any] | None, other: dict[str, Any]) -> dict[str, Any]:
    if into is None:
        return {"counts": list(other["counts"]), "sum": other["sum"]}
    into["counts"] = [a + b for a, b in zip(into["counts"], other["counts"], strict=True)]
    into["sum"] += other["sum"]
    return into


def _add_rows(rows: Iterable[list[Any]], into: dict[tuple[Any, ...], int]) -> None:
    for *labels, count in rows:
        key = tuple(labels)
        into[key] = into.get(key, 0) + count


def merge_exports(exports: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Several processes' `export()`s added up: counters summed, histograms bucket by bucket."""
    requests: dict[tuple[Any, ...], int] = {}
    targets: dict[tuple[Any, ...], int] = {}
    refused: dict[tuple[Any, ...], int] = {}
    durations: dict[str, Any] = {}
    sizes: dict[str, list[int]] = {}
    upstreams: dict[str, dict[str, Any]] = {}
    for export in exports:
        _add_rows(export["requests"], requests)
        _add_rows(export["target_responses"], targets)
        _add_rows(export["refused"], refused)
        for name, histogram in export["durations"].items():
            durations[name] = _add_histogram(durations.get(name), histogram)
        for name, (received, sent) in export["bytes"].items():
            total = sizes.setdefault(name, [0, 0])
            total[0] += received
            total[1] += sent
        for name, stats in export["upstreams"].items():
            merged = upstreams.get(name)
            if merged is None:
                upstreams[name] = {**stats, "latency": _add_histogram(None, stats["latency"])}
            else:
                merged["latency"] = _add_histogram(merged["latency"], stats["latency"])
                merged["retries"] += stats["retries"]
                merged["retries_denied"] += stats["retries_denied"]
    return {
        "requests": [[*key, count] for key, count in requests.items()],
        "durations": durations,
        "target_responses": [[*key, count] for key, count in targets.items()],
        "refused": [[*key, count] for key, count in refused.items()],
        "bytes": sizes,
        "upstreams": upstreams,
    }
