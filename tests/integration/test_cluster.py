"""Three `bastion run` processes on one real redis-server: a shared limit and its error bound,
pushed configs, consumers revoked, Redis killed under load, booting from the local copy.

The numbers these tests measure are printed (pytest -s shows them) and are the ones
docs/cluster.md quotes.
"""

from __future__ import annotations

import bisect
import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster_support import (
    Load,
    OriginProcess,
    Sample,
    bastion,
    gateway_env,
    header_of,
    start_gateways,
    until_all,
)

from redis_support import RedisServer
from support import GatewayProcess, write_config

KEY = "k-3f9a0c1e"

# A limit of 300 per 10 s with a burst of 30: one request every 33.3 ms once the burst is spent.
LIMIT, PER, BURST = 300, 10.0, 30


def pushed_config(origin: int, tag: str, extra_routes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The config every --from-redis gateway runs: ports come from each host's environment."""
    return {
        "version": 1,
        "listeners": [{"name": "web", "bind": "127.0.0.1:${GW_PORT:-8080}"}],
        "upstreams": {"app": {"targets": [{"address": f"127.0.0.1:{origin}"}]}},
        "routes": [
            {
                "name": "limited",
                "match": {"path": "/limited"},
                "upstream": "app",
                "plugins": [{"rate_limit": {"limit": LIMIT, "per": "10s", "burst": BURST, "key": "route"}}],
            },
            {"name": "private", "match": {"path": "/private"}, "upstream": "app", "plugins": [{"key_auth": {}}]},
            *(extra_routes or []),
            {"name": "all", "match": {"path": "/"}, "upstream": "app"},
        ],
        "plugins": [{"response_headers": {"set": {"X-Config": tag}}}],
        "log": {"access": False},
    }


@dataclass
class Cluster:
    redis: RedisServer
    origin: OriginProcess
    gateways: list[GatewayProcess]
    dir: Path

    @property
    def ports(self) -> list[int]:
        return [g.port for g in self.gateways]

    def push(self, config: dict[str, Any], name: str = "gw.yaml", env: dict[str, str] | None = None) -> str:
        path = write_config(self.dir / name, config)
        code, out = bastion("push", str(path), "--redis", self.redis.url, env=env)
        assert code == 0, out
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Redis, one origin, a first pushed version, three gateways following it."""
    base = tmp_path_factory.mktemp("cluster")
    redis = RedisServer()
    origin = OriginProcess()
    gateways: list[GatewayProcess] = []
    try:
        setup = Cluster(redis, origin, gateways, base)
        setup.push(pushed_config(origin.port, "v1"))
        envs = [gateway_env(base, i) for i in range(3)]
        gateways += start_gateways(3, None, "--from-redis", redis.url, env=envs)
        yield setup
    finally:
        for gateway in gateways:
            gateway.stop()
        origin.stop()
        redis.stop()


def tag_is(tag: str) -> Any:
    return lambda port: header_of(port, "/x", "X-Config")[1] == tag


def test_a_pushed_config_reaches_every_gateway_within_a_second(cluster: Cluster) -> None:
    assert all(tag_is("v1")(port) for port in cluster.ports)
    start = time.monotonic()
    out = cluster.push(pushed_config(cluster.origin.port, "v2"))
    assert "pushed version 2" in out
    latencies = [moment - start for moment in until_all(cluster.ports, tag_is("v2"), timeout=3)]
    print(f"\npush -> applied on each of 3 gateways: {', '.join(f'{x * 1000:.0f} ms' for x in latencies)}")
    assert max(latencies) < 1.0

    # The versions are listed; rolling back is pushing an old one again.
    code, listing = bastion("versions", "--redis", cluster.redis.url)
    assert code == 0 and "* 2" in listing and "  1" in listing
    code, text = bastion("versions", "--redis", cluster.redis.url, "--show", "1")
    assert code == 0 and "${GW_PORT:-8080}" in text  # stored as written, never expanded
    (cluster.dir / "old.yaml").write_text(text)
    code, out = bastion("push", str(cluster.dir / "old.yaml"), "--redis", cluster.redis.url, "-m", "rollback")
    assert code == 0 and "pushed version 3" in out
    start = time.monotonic()
    latencies = [moment - start for moment in until_all(cluster.ports, tag_is("v1"), timeout=3)]
    assert max(latencies) < 1.0
    for gateway in cluster.gateways:
        assert "config reloaded: config version 3 from redis" in gateway.output()[1]


def test_a_version_a_gateway_cannot_build_is_refused_and_the_last_good_one_keeps_serving(cluster: Cluster) -> None:
    """Valid where it was pushed (NEEDS_VAR set there), not on the gateways (unset there)."""
    broken = pushed_config(cluster.origin.port, "${NEEDS_VAR}")
    out = cluster.push(broken, "broken.yaml", env={"NEEDS_VAR": "v9"})
    version = int(out.split("pushed version ")[1].split()[0])
    by_port = {gateway.port: gateway for gateway in cluster.gateways}
    until_all(cluster.ports, lambda p: f"config version {version} rejected" in by_port[p].output()[1], timeout=3)
    assert all(tag_is("v1")(port) for port in cluster.ports)  # the previous version serves on
    cluster.push(pushed_config(cluster.origin.port, "v4"))
    until_all(cluster.ports, tag_is("v4"), timeout=3)


def test_a_revoked_key_stops_working_on_every_gateway_within_a_second(cluster: Cluster) -> None:
    def private(port: int) -> int:
        return header_of(port, "/private", "X-Config", {"X-Api-Key": KEY})[0]

    assert {private(port) for port in cluster.ports} == {401}
    code, out = bastion("consumers", "add", "mobile", "--redis", cluster.redis.url, "--key", KEY)
    assert code == 0, out
    start = time.monotonic()
    added = max(until_all(cluster.ports, lambda p: private(p) == 200, timeout=3)) - start
    code, out = bastion("consumers", "remove", "mobile", "--redis", cluster.redis.url)
    assert code == 0, out
    start = time.monotonic()
    revoked = max(until_all(cluster.ports, lambda p: private(p) == 401, timeout=3)) - start
    print(
        f"\nconsumer added: usable on all 3 gateways after {added * 1000:.0f} ms; revoked after {revoked * 1000:.0f} ms"
    )
    assert added < 1.0 and revoked < 1.0
    assert KEY.encode() not in b"".join(cluster.redis.client().hvals("{bastion}:consumers"))  # a digest only


def admitted_by(samples: list[Sample], t: float, field: str) -> int:
    return sum(1 for s in samples if s.status == 200 and getattr(s, field) <= t)


def test_three_gateways_share_one_limit_within_1_percent_at_every_moment(cluster: Cluster) -> None:
    """Load over three gateways, far above the limit. At every 100 ms of the run, the requests
    let through stay within 1 % of what one limiter lets through (burst + rate x elapsed).

    A request is decided somewhere between being sent and its answer arriving, so the
    decisions made by a moment t lie between `surely` (answers arrived by t) and `at_most`
    (sent by t and let through). `surely` must never exceed the ideal (no tolerance at all:
    one script, one clock). The other way, a refusal proves the limiter was full when it
    decided: for every 429, what was let through by its answer (`at_most`) must be at least
    99 % of the ideal at its sending (less one request: counts are whole). Checking only at
    refusals keeps a starved load generator (sending less than the limit for a moment on a
    busy machine) from looking like a limiter that refuses too much. The gap between the two
    counts is the measurement's uncertainty, the requests in flight, and is printed."""
    rate = LIMIT / PER
    duration = 7.0
    load = Load(cluster.ports, "/limited", threads=9).start()
    time.sleep(duration)
    samples = load.stop()
    assert {s.status for s in samples} <= {200, 429}, {s.error or s.status for s in samples} - {200, 429}
    t0 = samples[0].sent
    worst_under = short = 0.0
    closest = -float("inf")
    in_flight = 0
    checked = 0
    for step in range(2, int(duration * 10)):
        t = t0 + step / 10
        ideal = BURST + rate * (t - t0)
        surely = admitted_by(samples, t, "received")
        at_most = admitted_by(samples, t, "sent")
        assert surely <= ideal + 1e-6, f"at {t - t0:.1f}s: {surely} let through, one limiter allows {ideal:.1f}"
        closest = max(closest, surely - ideal)
        in_flight = max(in_flight, at_most - surely)
        checked += 1
    admitted_sent = sorted(s.sent for s in samples if s.status == 200)
    refusals = [s for s in samples if s.status == 429]
    assert refusals, "the load never reached the limit"
    for refused in refusals:
        ideal = BURST + rate * (refused.sent - t0)
        at_most = bisect.bisect_right(admitted_sent, refused.received)
        assert at_most >= int(ideal * 0.99), (
            f"refused at {refused.sent - t0:.2f}s with {at_most} let through, one limiter: {ideal:.1f}"
        )
        worst_under = max(worst_under, (ideal - at_most) / ideal)
        short = max(short, ideal - at_most)
    total = len(samples)
    let_through = admitted_by(samples, float("inf"), "received")
    print(
        f"\n3 gateways, {total} requests in {duration:.0f}s ({total / duration:.0f}/s offered), {let_through} let "
        f"through; over {checked} moments: never above one limiter (closest {closest:+.2f} requests); at "
        f"{len(refusals)} refusals at most {worst_under * 100:.2f} % ({short:.1f} requests) below it; "
        f"up to {in_flight} admitted requests in flight"
    )


def start_file_cluster(
    tmp_path: Path, redis: RedisServer, origin: OriginProcess, count: int, **cluster_keys: Any
) -> list[GatewayProcess]:
    """`count` gateways running one config file with `cluster` (each with its own port)."""
    config = pushed_config(origin.port, "file")
    config["routes"][0]["plugins"] = [{"rate_limit": {"limit": 1_000_000, "per": "1s", "key": "route"}}]
    config["cluster"] = {"redis": redis.url, **cluster_keys}
    path = write_config(tmp_path / "gw.yaml", config)
    return start_gateways(count, path, env=[gateway_env(tmp_path, i) for i in range(count)])


@pytest.fixture
def outage_setup(tmp_path: Path) -> Iterator[tuple[RedisServer, OriginProcess]]:
    redis = RedisServer()
    origin = OriginProcess()
    yield redis, origin
    origin.stop()
    redis.stop()


def test_redis_killed_and_restarted_under_load_with_on_store_error_allow(
    tmp_path: Path, outage_setup: tuple[RedisServer, OriginProcess]
) -> None:
    """No request fails while Redis is gone (allow: they pass unlimited, without RateLimit
    headers); no request waits much longer than `timeout`; counting resumes soon after."""
    redis, origin = outage_setup
    gateways = start_file_cluster(tmp_path, redis, origin, 3, timeout="200ms", retry_interval="250ms")
    try:
        load = Load([g.port for g in gateways], "/limited", threads=6).start()
        time.sleep(1.0)
        killed = time.monotonic()
        redis.kill()
        time.sleep(1.5)
        restarted = time.monotonic()
        redis.start()
        back = time.monotonic()  # answering PING
        time.sleep(1.5)
        samples = load.stop()
    finally:
        for gateway in gateways:
            gateway.stop()
    failures = [s for s in samples if s.status != 200]
    assert not failures, failures[:5]
    during = [s for s in samples if killed + 0.3 < s.sent < restarted]
    assert during and not any(s.rate_headers for s in during)  # the store was skipped...
    slowest = max(s.received - s.sent for s in samples if s.sent > killed - 0.1)
    assert slowest < 0.6  # ...at the cost of one timeout (200 ms) at most, plus scheduling
    # Recovery: from Redis answering again until every request is counted again.
    last_uncounted = max((s.received for s in samples if s.sent > restarted and not s.rate_headers), default=back)
    recovery = max(0.0, last_uncounted - back)
    print(
        f"\noutage: {len(during)} requests while Redis was down, all let through; slowest answer "
        f"{slowest * 1000:.0f} ms; every request counted again {recovery * 1000:.0f} ms after Redis was back"
    )
    assert recovery < 0.6  # retry_interval (250 ms) + reconnecting


def test_redis_killed_with_on_store_error_deny_refuses_with_503_then_recovers(
    tmp_path: Path, outage_setup: tuple[RedisServer, OriginProcess]
) -> None:
    redis, origin = outage_setup
    (gateway,) = start_file_cluster(tmp_path, redis, origin, 1, on_store_error="deny", retry_interval="250ms")
    try:
        assert header_of(gateway.port, "/limited", "X-Config")[0] == 200
        redis.kill()
        start = time.monotonic()
        status, _ = header_of(gateway.port, "/limited", "X-Config")
        assert status == 503 and time.monotonic() - start < 1.0  # the 250 ms store timeout, once
        assert header_of(gateway.port, "/other", "X-Config")[0] == 200  # routes without a limit: untouched
        redis.start()
        until_all([gateway.port], lambda p: header_of(p, "/limited", "X-Config")[0] == 200, timeout=2)
    finally:
        gateway.stop()
    err = gateway.output()[1]
    assert "failed" in err and "on_store_error (deny)" in err and "is back after" in err


def test_a_gateway_boots_from_its_local_copy_when_redis_is_down(
    tmp_path: Path, outage_setup: tuple[RedisServer, OriginProcess]
) -> None:
    redis, origin = outage_setup
    copy = tmp_path / "last-good.json"
    write_config(tmp_path / "gw.yaml", pushed_config(origin.port, "v1"))
    assert bastion("push", str(tmp_path / "gw.yaml"), "--redis", redis.url)[0] == 0
    env = gateway_env(tmp_path, 0)
    args = ("--from-redis", redis.url, "--local-copy", str(copy))
    first = GatewayProcess(None, int(env["GW_PORT"]), *args, env=env)
    deadline = time.monotonic() + 10  # the copy is written once the pulled config is live
    while not copy.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    first.stop()
    assert copy.exists() and copy.stat().st_mode & 0o077 == 0
    redis.kill()
    second = GatewayProcess(None, int(env["GW_PORT"]), *args, env=env)
    try:
        assert header_of(second.port, "/x", "X-Config") == (200, "v1")
        assert f"starting from the local copy {copy} (version 1)" in second.output()[1]
        # Redis comes back with an empty database; a push there reaches the gateway.
        redis.start()
        write_config(tmp_path / "gw.yaml", pushed_config(origin.port, "v2"))
        assert bastion("push", str(tmp_path / "gw.yaml"), "--redis", redis.url)[0] == 0
        until_all([second.port], tag_is("v2"), timeout=3)
    finally:
        second.signal(signal.SIGTERM)
        second.stop()
    # Without Redis and without a copy, the gateway refuses to start and says why.
    redis.kill()
    code, err = run_and_fail("--from-redis", redis.url, "--local-copy", str(tmp_path / "none.json"))
    assert code == 1 and "no local copy" in err


def run_and_fail(*args: str) -> tuple[int, str]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "bastion", "run", *args], capture_output=True, text=True, timeout=20)
    return proc.returncode, proc.stderr


def test_the_redis_store_adds_well_under_a_millisecond_per_request(
    tmp_path: Path, outage_setup: tuple[RedisServer, OriginProcess]
) -> None:
    """The same rate-limited route on a gateway with the in-process store and on one with the
    Redis store, requests alternating between them on keep-alive connections."""
    import http.client
    import statistics

    redis, origin = outage_setup
    (with_redis,) = start_file_cluster(tmp_path, redis, origin, 1)
    config = pushed_config(origin.port, "local")
    config["routes"][0]["plugins"] = [{"rate_limit": {"limit": 1_000_000, "per": "1s", "key": "route"}}]
    env = gateway_env(tmp_path, 1)
    local = GatewayProcess(write_config(tmp_path / "local.yaml", config), int(env["GW_PORT"]), env=env)
    try:
        times: dict[int, list[float]] = {with_redis.port: [], local.port: []}
        conns = {port: http.client.HTTPConnection("127.0.0.1", port, timeout=5) for port in times}
        for i in range(3000):
            for port, conn in conns.items():
                start = time.perf_counter()
                conn.request("GET", "/limited")
                resp = conn.getresponse()
                resp.read()
                if i >= 200:  # warm up first
                    times[port].append(time.perf_counter() - start)
                assert resp.status == 200 and resp.getheader("RateLimit-Limit")
        for conn in conns.values():
            conn.close()
    finally:
        with_redis.stop()
        local.stop()
    redis_ms = [t * 1000 for t in times[with_redis.port]]
    local_ms = [t * 1000 for t in times[local.port]]

    def pct(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100)[q - 1]

    extra50 = statistics.median(redis_ms) - statistics.median(local_ms)
    extra99 = pct(redis_ms, 99) - pct(local_ms, 99)
    print(
        f"\nlatency, local store: p50 {statistics.median(local_ms):.3f} ms, p99 {pct(local_ms, 99):.3f} ms; "
        f"redis store: p50 {statistics.median(redis_ms):.3f} ms, p99 {pct(redis_ms, 99):.3f} ms; "
        f"extra: p50 {extra50:.3f} ms, p99 {extra99:.3f} ms"
    )
    assert extra50 < 1.0


def test_the_cluster_demo_shows_a_shared_limit_and_a_push_reaching_all_three() -> None:
    """`make cluster-demo` as docs/cluster.md describes it (with --once, on free ports)."""
    import os
    import subprocess
    import sys

    from support import free_port

    env = {
        **os.environ,
        "BASTION_CLUSTER_DEMO_PORTS": ",".join(str(free_port()) for _ in range(3)),
        "BASTION_CLUSTER_DEMO_REDIS_PORT": str(free_port()),
        "BASTION_DEMO_ORIGIN_PORT": str(free_port()),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bastion.demo.cluster", "--once"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    statuses = [line.split()[-1] for line in proc.stdout.splitlines() if line.strip().startswith("request ")]
    assert statuses == ["200"] * 10 + ["429"] * 5  # one limit of 10 across the three gateways
    reached = [line for line in proc.stdout.splitlines() if "serves version 2" in line]
    assert len(reached) == 3 and all("ms after the push" in line for line in reached)
    assert "* 2" in proc.stdout


def test_workers_follow_redis_each_on_their_own(tmp_path: Path, redis_server: RedisServer) -> None:
    origin = OriginProcess()
    env = gateway_env(tmp_path, 0)
    port = int(env["GW_PORT"])
    write_config(tmp_path / "gw.yaml", pushed_config(origin.port, "v1"))
    assert bastion("push", str(tmp_path / "gw.yaml"), "--redis", redis_server.url)[0] == 0
    gateway = GatewayProcess(None, port, "--from-redis", redis_server.url, "--workers", "2", env=env)
    try:
        write_config(tmp_path / "gw.yaml", pushed_config(origin.port, "v2"))
        assert bastion("push", str(tmp_path / "gw.yaml"), "--redis", redis_server.url)[0] == 0
        deadline = time.monotonic() + 10  # within 1 s each on an idle machine; bounded on a busy one
        while gateway.output()[1].count("config reloaded: config version 2") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tags = {header_of(port, "/x", "X-Config")[1] for _ in range(40)}  # new connections: both workers
        err = gateway.output()[1]
    finally:
        gateway.stop()
        origin.stop()
    assert tags == {"v2"}
    assert err.count("config reloaded: config version 2") == 2, err


def test_the_config_version_is_in_the_admin_api_and_metrics(tmp_path: Path, redis_server: RedisServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from support import free_port

    origin = OriginProcess()
    env = {**gateway_env(tmp_path, 0), "ADMIN_PORT": str(free_port())}
    admin = int(env["ADMIN_PORT"])
    config = pushed_config(origin.port, "v1")
    config["admin"] = {"bind": "127.0.0.1:${ADMIN_PORT:-9901}"}  # each host fills in its own port
    write_config(tmp_path / "gw.yaml", config)
    assert bastion("push", str(tmp_path / "gw.yaml"), "--redis", redis_server.url)[0] == 0
    gateway = GatewayProcess(None, int(env["GW_PORT"]), "--from-redis", redis_server.url, env=env)

    def version() -> tuple[Any, str]:
        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5).read())
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
        (info,) = [
            s for f in text_string_to_metric_families(metrics) if f.name == "bastion_config_info" for s in f.samples
        ]
        return status["config"]["version"], info.labels["version"]

    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if version() == (1, "1"):
                    break
            except OSError:
                pass
            time.sleep(0.05)
        assert version() == (1, "1")
        config["plugins"] = [{"response_headers": {"set": {"X-Config": "v2"}}}]
        write_config(tmp_path / "gw.yaml", config)
        assert bastion("push", str(tmp_path / "gw.yaml"), "--redis", redis_server.url)[0] == 0
        deadline = time.monotonic() + 10
        while version() != (2, "2") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert version() == (2, "2")
    finally:
        gateway.stop()
        origin.stop()
