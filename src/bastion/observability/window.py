"""Recent traffic per route: requests/s, status classes and latency percentiles over the last
minutes, from a ring of cumulative samples.

The counters in `Metrics` only ever go up. Every 10 seconds, on wall-clock boundaries (so the
samples of several workers line up), `TrafficWindow.sample` copies each route's cumulative
counts (requests by status class, the latency histogram) into a ring that keeps 5 minutes.
A question about the last W seconds subtracts the newest sample at least W old from the live
counters. So the request path pays nothing, and a full answer is there the moment someone
asks, however recently the dashboard was opened.

With `--workers N` each worker keeps its own ring and answers `report()` with plain JSON
data; `merge_reports` adds them up and `summarize` turns the sum into rates and percentiles.
Percentiles are estimated from the histogram buckets the way Prometheus' `histogram_quantile`
does (linear within the bucket), so they agree with what a Prometheus query would show.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from bastion.observability.metrics import REQUEST_BUCKETS

if TYPE_CHECKING:
    from bastion.observability.metrics import Metrics

INTERVAL = 10.0
"""Seconds between two samples: the resolution of the series."""

KEEP = 300.0
"""How far back the ring reaches (the longest window that can be asked for)."""

CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")
"""Status classes counted per route; `other` is a request that ended with no status."""

QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))

# Per route: requests by status class (indexed like CLASSES) and latency histogram bucket counts.
Counts = tuple[list[int], list[int]]


def cumulative(metrics: Metrics) -> dict[str, Counts]:
    """Each route's counts since the process started (a copy)."""
    out: dict[str, Counts] = {}
    for route, stats in metrics.routes.items():
        classes = [0] * len(CLASSES)
        for counts in stats.responses.values():
            for status, count in counts.items():
                kind = status // 100
                classes[kind if 0 < kind < len(CLASSES) else 0] += count
        out[route] = (classes, list(stats.latency.counts))
    return out


def _minus(now: list[int], then: list[int]) -> list[int]:
    if not then:
        return list(now)
    return [a - b for a, b in zip(now, then, strict=True)]


class TrafficWindow:
    """One process's ring of samples. The clock is passed in: tests drive it by hand."""

    def __init__(self, metrics: Metrics, started: float, interval: float = INTERVAL, keep: float = KEEP) -> None:
        self.metrics = metrics
        self.interval = interval
        self.keep = keep
        # (time, counts); the first is the process start (Unix time), when every count was zero.
        self.samples: deque[tuple[float, dict[str, Counts]]] = deque([(started, {})], maxlen=int(keep // interval) + 2)

    def next_sample_at(self, now: float) -> float:
        """The next wall-clock boundary (a multiple of the interval) after `now` and after the
        last sample: a timer that fires a little early must not sample one boundary twice."""
        return (max(now, self.samples[-1][0]) // self.interval + 1) * self.interval

    def sample(self, at: float) -> None:
        """Record the counts as of `at` (called by the admin node's sampler task)."""
        self.samples.append((at, cumulative(self.metrics)))

    def report(self, now: float, seconds: float) -> dict[str, Any]:
        """The last `seconds` (at most `keep`) as plain JSON data, for `merge_reports`.

        Per route: requests by status class, the latency histogram, the request rate and a
        series of the complete sample intervals (`[start, seconds, requests, 5xx]`)."""
        since = now - seconds
        samples = list(self.samples)
        first = 0
        for index, (at, _) in enumerate(samples):
            if at <= since:
                first = index  # the newest sample at least `seconds` old
        kept = samples[first:]
        base_at, base = kept[0]
        current = cumulative(self.metrics)
        elapsed = max(now - base_at, 1e-9)
        routes: dict[str, Any] = {}
        for route, (classes, histogram) in current.items():
            then_classes, then_histogram = base.get(route, ([], []))
            delta = _minus(classes, then_classes)
            requests = sum(delta)
            series = []
            for (start, before), (end, after) in pairwise(kept):
                b_classes = before.get(route, ([], []))[0]
                a_classes = after.get(route, ([], []))[0]
                step = _minus(a_classes, b_classes) if a_classes else [0] * len(CLASSES)
                bucket = start // self.interval * self.interval
                series.append([bucket, round(end - start, 3), sum(step), step[5]])
            if not requests and not any(row[2] for row in series):
                continue
            routes[route] = {
                "classes": delta,
                "histogram": _minus(histogram, then_histogram),
                "rate": requests / elapsed,
                "series": series,
            }
        return {"from": base_at, "to": now, "seconds": seconds, "routes": routes}


def merge_reports(reports: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Several workers' `report()`s as one: counts and rates added, series by interval start."""
    merged: dict[str, Any] = {"from": None, "to": None, "seconds": 0.0, "routes": {}}
    routes: dict[str, Any] = merged["routes"]
    for report in reports:
        start = report["from"] if merged["from"] is None else min(merged["from"], report["from"])
        end = report["to"] if merged["to"] is None else max(merged["to"], report["to"])
        merged.update({"from": start, "to": end, "seconds": report["seconds"]})
        for route, data in report["routes"].items():
            into = routes.get(route)
            if into is None:
                routes[route] = {**data, "series": {row[0]: list(row[1:]) for row in data["series"]}}
                continue
            into["classes"] = [a + b for a, b in zip(into["classes"], data["classes"], strict=True)]
            into["histogram"] = _add(into["histogram"], data["histogram"])
            into["rate"] += data["rate"]
            for bucket, seconds, requests, errors in data["series"]:
                row = into["series"].setdefault(bucket, [0.0, 0, 0])
                row[0] = max(row[0], seconds)
                row[1] += requests
                row[2] += errors
    for data in routes.values():
        series = data["series"]
        if isinstance(series, dict):
            data["series"] = [[bucket, *series[bucket]] for bucket in sorted(series)]
    return merged


def _add(a: list[int], b: list[int]) -> list[int]:
    if not a or not b:
        return list(a or b)
    return [x + y for x, y in zip(a, b, strict=True)]


def quantile(q: float, counts: list[int], bounds: tuple[float, ...] = REQUEST_BUCKETS) -> float | None:
    """The q-quantile (0 < q < 1) of a histogram of per-bucket counts, or None when empty.

    Linear within the bucket that holds it, as Prometheus' histogram_quantile; in the +Inf
    bucket, the largest finite bound."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(bounds):
                return bounds[-1]
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


def _summary(classes: list[int], histogram: list[int], rate: float) -> dict[str, Any]:
    latency = {name: quantile(q, histogram) for name, q in QUANTILES}
    return {
        "requests": sum(classes),
        "requests_per_second": round(rate, 3),
        "status": dict(zip(CLASSES, classes, strict=True)),
        "latency_ms": {name: None if value is None else round(value * 1000, 3) for name, value in latency.items()},
    }


def summarize(merged: dict[str, Any], interval: float = INTERVAL) -> dict[str, Any]:
    """`GET /stats`: per route and in total, requests, requests/s, status classes, p50/p90/p99
    (milliseconds) and the series of complete intervals, busiest route first."""
    rows = []
    classes = [0] * len(CLASSES)
    histogram: list[int] = []
    rate = 0.0
    for route, data in merged["routes"].items():
        row = {"route": route, **_summary(data["classes"], data["histogram"], data["rate"])}
        row["series"] = [
            {"at": at, "seconds": seconds, "requests": requests, "errors": errors}
            for at, seconds, requests, errors in data["series"]
        ]
        rows.append(row)
        classes = [a + b for a, b in zip(classes, data["classes"], strict=True)]
        histogram = _add(histogram, data["histogram"])
        rate += data["rate"]
    rows.sort(key=lambda row: (-row["requests"], row["route"]))
    start, end = merged["from"], merged["to"]
    return {
        "window_seconds": merged["seconds"],
        "interval_seconds": interval,
        "from": start,
        "to": end,
        "covered_seconds": round(end - start, 3) if start is not None and end is not None else 0.0,
        "total": _summary(classes, histogram, rate),
        "routes": rows,
    }
