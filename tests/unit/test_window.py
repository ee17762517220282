"""The recent-traffic window behind `GET /stats`, with the clock driven by hand: which samples a
window subtracts, rates, status classes, percentiles from histogram buckets, the 10-second
series, the ring's reach, and how two workers' reports add up."""

from __future__ import annotations

import pytest

from bastion.observability.metrics import REQUEST_BUCKETS, Metrics
from bastion.observability.window import TrafficWindow, merge_reports, quantile, summarize

START = 1000.0


def count(metrics: Metrics, route: str, status: int, n: int, seconds: float = 0.003) -> None:
    """What `Metrics.observe` adds for `n` requests of `route` answered with `status`."""
    stats = metrics.route(route)
    counts = stats.by_method("GET")
    counts[status] = counts.get(status, 0) + n
    for _ in range(n):
        stats.latency.observe(seconds)


def fresh() -> tuple[Metrics, TrafficWindow]:
    metrics = Metrics()
    return metrics, TrafficWindow(metrics, START)


def test_quantiles_interpolate_within_the_bucket_like_histogram_quantile() -> None:
    counts = [0] * (len(REQUEST_BUCKETS) + 1)
    assert quantile(0.5, counts) is None
    counts[3] = 10  # ten requests in (5ms, 10ms]
    assert quantile(0.5, counts) == pytest.approx(0.0075)
    assert quantile(0.99, counts) == pytest.approx(0.00995)
    counts[0] = 10  # and ten in (0, 1ms]: the median is the top of the first bucket
    assert quantile(0.5, counts) == pytest.approx(0.001)
    assert quantile(0.25, counts) == pytest.approx(0.0005)
    counts[-1] = 1000  # most beyond the last bound: the largest finite bound, as Prometheus says
    assert quantile(0.99, counts) == REQUEST_BUCKETS[-1]


def test_samples_are_taken_on_wall_clock_boundaries() -> None:
    _, window = fresh()
    assert window.next_sample_at(1234.5) == 1240.0
    assert window.next_sample_at(1240.0) == 1250.0
    window.sample(1250.0)
    assert window.next_sample_at(1249.998) == 1260.0  # woken early: still the next boundary


def test_a_window_subtracts_the_newest_sample_at_least_that_old() -> None:
    metrics, window = fresh()
    count(metrics, "api", 200, 20)
    window.sample(1010.0)
    count(metrics, "api", 200, 10)
    count(metrics, "api", 502, 2, seconds=0.2)
    window.sample(1020.0)
    count(metrics, "web", 404, 5)  # after the last sample: still counted (the live counters)

    minute = window.report(1025.0, 60.0)  # younger than the window: from the start
    assert (minute["from"], minute["to"]) == (START, 1025.0)
    api = minute["routes"]["api"]
    assert api["classes"] == [0, 0, 30, 0, 0, 2]
    assert sum(api["histogram"]) == 32
    assert api["rate"] == pytest.approx(32 / 25)
    assert api["series"] == [[1000.0, 10.0, 20, 0], [1010.0, 10.0, 12, 2]]
    assert minute["routes"]["web"]["classes"] == [0, 0, 0, 0, 5, 0]
    assert minute["routes"]["web"]["series"] == [[1000.0, 10.0, 0, 0], [1010.0, 10.0, 0, 0]]

    recent = window.report(1025.0, 10.0)  # from the sample at 1010, the newest at least 10 s old
    assert recent["from"] == 1010.0
    assert recent["routes"]["api"]["classes"] == [0, 0, 10, 0, 0, 2]
    assert recent["routes"]["api"]["rate"] == pytest.approx(12 / 15)
    assert recent["routes"]["api"]["series"] == [[1010.0, 10.0, 12, 2]]


def test_routes_without_requests_in_the_window_are_left_out() -> None:
    metrics, window = fresh()
    count(metrics, "old", 200, 3)
    for at in range(1010, 1100, 10):
        window.sample(float(at))
    assert "old" in window.report(1095.0, 300.0)["routes"]
    assert window.report(1095.0, 60.0)["routes"] == {}


def test_the_ring_reaches_back_five_minutes_and_no_further() -> None:
    metrics, window = fresh()
    for at in range(1010, 1410, 10):
        count(metrics, "api", 200, 1)
        window.sample(float(at))
    report = window.report(1400.0, 300.0)
    assert report["from"] == 1100.0
    assert report["routes"]["api"]["classes"][2] == 30
    assert len(report["routes"]["api"]["series"]) == 30
    assert len(window.samples) == window.samples.maxlen


def test_workers_add_up_counts_rates_and_series_by_interval() -> None:
    first, one = fresh()
    second, two = fresh()
    count(first, "api", 200, 8, seconds=0.003)
    count(second, "api", 200, 2, seconds=0.3)
    count(second, "admin", 503, 1)
    one.sample(1010.0)
    two.sample(1010.0)
    merged = merge_reports([one.report(1020.0, 60.0), two.report(1020.0, 60.0)])
    api = merged["routes"]["api"]
    assert api["classes"] == [0, 0, 10, 0, 0, 0]
    assert api["rate"] == pytest.approx(10 / 20)
    assert api["series"] == [[1000.0, 10.0, 10, 0]]

    stats = summarize(merged)
    assert [row["route"] for row in stats["routes"]] == ["api", "admin"]  # busiest first
    row = stats["routes"][0]
    assert row["requests"] == 10 and row["requests_per_second"] == 0.5
    assert row["status"] == {"other": 0, "1xx": 0, "2xx": 10, "3xx": 0, "4xx": 0, "5xx": 0}
    assert 2.5 <= row["latency_ms"]["p50"] <= 5  # eight of ten in (2.5ms, 5ms]
    assert 250 <= row["latency_ms"]["p99"] <= 500
    assert row["series"] == [{"at": 1000.0, "seconds": 10.0, "requests": 10, "errors": 0}]
    total = stats["total"]
    assert total["requests"] == 11 and total["status"]["5xx"] == 1
    assert total["requests_per_second"] == pytest.approx(11 / 20)
    assert (stats["window_seconds"], stats["covered_seconds"]) == (60.0, 20.0)


def test_an_empty_gateway_summarizes_to_zeros() -> None:
    _, window = fresh()
    stats = summarize(merge_reports([window.report(1003.0, 60.0)]))
    assert stats["routes"] == []
    assert stats["total"]["requests"] == 0
    assert stats["total"]["latency_ms"] == {"p50": None, "p90": None, "p99": None}
