"""Balancers, sticky sessions, retry policy and the pool's queue, without sockets.

The clock and the randomness are injected, so every distribution here is reproducible.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest

from bastion.config.schema import Upstream
from bastion.config.types import HostPort
from bastion.errors import GatewayError, Overloaded, UpstreamConnectError, UpstreamError, UpstreamTimeout
from bastion.http.model import Headers, Request
from bastion.upstream.balancers import BALANCERS, ConsistentHash, request_key
from bastion.upstream.pool import ConnectionPool, PoolLimits, WaitQueue
from bastion.upstream.runtime import RetryBudget, UpstreamRuntime
from bastion.upstream.targets import TargetState


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test on a fresh event loop (no plugin needed)."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def upstream(targets: Sequence[dict[str, Any] | int], **extra: Any) -> Upstream:
    """An Upstream over 10.0.0.1:80, 10.0.0.2:80, ...; an int is a weight."""
    specs = [{"weight": t} if isinstance(t, int) else t for t in targets]
    return Upstream.model_validate(
        {"targets": [{"address": f"10.0.0.{i + 1}:80", **spec} for i, spec in enumerate(specs)], **extra}
    )


def states(config: Upstream, name: str = "app") -> list[TargetState]:
    limits = PoolLimits(10, 10, 60.0, 1.0)
    out = []
    for target in config.targets:
        state = TargetState(f"{name}/{target.address}", target.address, ConnectionPool(target.address, limits), name)
        state.weight = target.weight
        state.backup = target.backup
        out.append(state)
    return out


def runtime(config: Upstream, clock: Clock | None = None, seed: int = 7) -> UpstreamRuntime:
    clock = clock or Clock()
    rt = UpstreamRuntime("app", config, states(config), clock=clock, rng=random.Random(seed))
    rt.activate()
    return rt


def req(
    path: str = "/", headers: dict[str, str] | None = None, ip: str = "192.0.2.1", method: str = "GET", query: str = ""
) -> Request:
    items = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request(method, path, query, Headers(items), client_ip=ip)


def shares(rt: UpstreamRuntime, picks: int, request: Request | None = None) -> dict[int, float]:
    request = request or req()
    counts = Counter(rt.targets.index(rt.pick(request)) for _ in range(picks))
    return {i: counts[i] / picks for i in range(len(rt.targets))}


# --- weights ---------------------------------------------------------------------------------


def test_round_robin_is_smooth_and_exact() -> None:
    rt = runtime(upstream([5, 1, 1]))
    order = [rt.targets.index(rt.pick(req())) for _ in range(7)]
    assert order == [0, 0, 1, 0, 2, 0, 0]  # never five in a row
    assert shares(rt, 7000) == {0: 5 / 7, 1: 1 / 7, 2: 1 / 7}


@pytest.mark.parametrize("balance", ["round_robin", "least_connections", "random"])
def test_weights_hold_within_a_few_percent_when_idle(balance: str) -> None:
    """3:1:0: a weight-0 target never gets traffic; the others share 75/25 (+-2 points)."""
    rt = runtime(upstream([3, 1, 0], balance=balance))
    got = shares(rt, 20000)
    assert abs(got[0] - 0.75) < 0.02, got
    assert abs(got[1] - 0.25) < 0.02, got
    assert got[2] == 0


def test_random_is_random_but_weighted() -> None:
    rt = runtime(upstream([1, 1, 2], balance="random"), seed=1)
    got = shares(rt, 40000)
    assert abs(got[2] - 0.5) < 0.015 and abs(got[0] - 0.25) < 0.015, got


# --- least connections and p2c ----------------------------------------------------------------


def test_least_connections_prefers_the_least_loaded_per_weight() -> None:
    rt = runtime(upstream([1, 1, 2], balance="least_connections"))
    a, b, c = rt.targets
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 4  # loads 3, 1, 2
    assert rt.pick(req()) is b
    b.in_flight = 5
    assert rt.pick(req()) is c
    assert rt.pick(req(), exclude=[c]) is a


def test_least_connections_favours_a_fast_target_under_load() -> None:
    """Simulated: requests on the slow target last 10x longer, so they pile up there."""
    rt = runtime(upstream([1, 1], balance="least_connections"))
    fast, slow = rt.targets
    served = simulate(rt, 4000, 2, lambda target: 1 if target is fast else 10)
    assert served[fast.key] > 4 * served[slow.key], served


def simulate(rt: UpstreamRuntime, ticks: int, arrivals: int, duration: Callable[[TargetState], int]) -> Counter[str]:
    """Discrete time: `arrivals` requests per tick, each holding its target for `duration` ticks."""
    busy: list[tuple[int, TargetState]] = []
    served = Counter[str]()
    for tick in range(ticks):
        for end, target in busy:
            if end == tick:
                target.in_flight -= 1
        busy = [(end, target) for end, target in busy if end > tick]
        for _ in range(arrivals):
            target = rt.pick(req())
            target.in_flight += 1
            served[target.key] += 1
            busy.append((tick + duration(target), target))
    return served


def test_p2c_ewma_shares_by_weight_under_load() -> None:
    clock = Clock()
    rt = runtime(upstream([3, 1], balance="p2c_ewma"), clock)
    heavy, light = rt.targets
    for target in rt.targets:
        target.observe_latency(0.02, clock.now)
    served = simulate(rt, 3000, 4, lambda target: 5)
    share = served[heavy.key] / (served[heavy.key] + served[light.key])
    assert 0.70 < share < 0.80, share


def test_p2c_ewma_favours_the_fast_target() -> None:
    clock = Clock()
    rt = runtime(upstream([1, 1, 1], balance="p2c_ewma"), clock)
    fast, medium, slow = rt.targets
    for _ in range(5):
        fast.observe_latency(0.010, clock.now)
        medium.observe_latency(0.050, clock.now)
        slow.observe_latency(0.200, clock.now)
    got = shares(rt, 3000)
    # Two random choices: the slowest target only wins when drawn against nothing faster (never).
    assert got[2] == 0
    assert got[0] > 0.6, got
    # Load counts too: a fast target with many requests in flight loses to an idle medium one.
    fast.in_flight = 10
    assert rt.pick(req(), exclude=[slow]) is medium


def test_peak_ewma_takes_peaks_at_once_and_decays() -> None:
    clock = Clock()
    (target,) = states(upstream([1]))
    target.observe_latency(0.010, clock.now)
    target.observe_latency(0.500, clock.now)
    assert target.ewma == 0.5  # a spike counts immediately
    clock.now += 10
    target.observe_latency(0.010, clock.now)
    assert 0.15 < target.ewma < 0.25  # pulled down by about 1 - 1/e after one decay time
    clock.now += 60
    assert target.latency(clock.now) < 0.01  # idle: decays so a recovered target is tried again


def test_a_cold_target_gets_a_chance_under_p2c() -> None:
    clock = Clock()
    rt = runtime(upstream([1, 1], balance="p2c_ewma"), clock)
    rt.targets[0].observe_latency(0.05, clock.now)
    assert rt.pick(req()) is rt.targets[1]


# --- consistent hashing -----------------------------------------------------------------------


def owners(balancer: ConsistentHash, keys: list[str]) -> dict[str, str]:
    out = {}
    for key in keys:
        target = balancer.pick(req(headers={"X-User": key}))
        assert target is not None
        out[key] = str(target.address)
    return out


KEYS = [f"user-{n}" for n in range(10000)]


def hashing(targets: list[int] | list[dict[str, Any]]) -> tuple[ConsistentHash, list[TargetState]]:
    config = upstream(targets, balance="consistent_hash", hash_on="header:X-User")
    built = states(config)
    balancer = BALANCERS["consistent_hash"](built, config)
    assert isinstance(balancer, ConsistentHash)
    return balancer, built


def test_consistent_hash_spreads_keys_evenly() -> None:
    balancer, _ = hashing([1, 1, 1, 1, 2])
    counts = Counter(owners(balancer, KEYS).values())
    for address, count in counts.items():
        expected = 2 / 6 if address == "10.0.0.5:80" else 1 / 6
        assert abs(count / len(KEYS) - expected) < 0.04, counts


def test_a_leaving_target_moves_only_its_own_keys() -> None:
    balancer, built = hashing([1, 1, 1, 1, 1])
    before = owners(balancer, KEYS)
    built[2].healthy = False  # leaves the rotation
    after = owners(balancer, KEYS)
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == "10.0.0.3:80"}
    assert 0.14 < len(moved) / len(KEYS) < 0.26
    built[2].healthy = True
    assert owners(balancer, KEYS) == before  # and they come back when it does


def test_removing_a_target_from_the_config_moves_only_its_keys() -> None:
    balancer, _ = hashing([1, 1, 1, 1, 1])
    before = owners(balancer, KEYS)
    smaller, _ = hashing([{"weight": 1} for _ in range(4)])  # 10.0.0.1 .. 10.0.0.4
    after = owners(smaller, KEYS)
    assert all(after[k] == before[k] for k in KEYS if before[k] != "10.0.0.5:80")


def test_a_joining_target_takes_about_one_nth_of_the_keys() -> None:
    four, _ = hashing([1, 1, 1, 1])
    five, _ = hashing([1, 1, 1, 1, 1])
    before, after = owners(four, KEYS), owners(five, KEYS)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "10.0.0.5:80" for k in moved)  # keys move only to the newcomer
    assert 0.14 < len(moved) / len(KEYS) < 0.26  # about 1/5


def test_hash_retries_walk_to_another_target_and_backups_wait() -> None:
    balancer, built = hashing([{"weight": 1}, {"weight": 1}, {"weight": 1, "backup": True}])
    request = req(headers={"X-User": "alice"})
    first = balancer.pick(request)
    assert first is not None and not first.backup
    second = balancer.pick(request, exclude=[first])
    assert second is not None and second is not first and not second.backup
    assert balancer.pick(request, exclude=[first, second]) is None  # primaries alive: no backup
    built[0].healthy = built[1].healthy = False
    assert balancer.pick(request) is built[2]


@pytest.mark.parametrize(
    ("hash_on", "request_", "key"),
    [
        ("ip", req(ip="203.0.113.9"), "203.0.113.9"),
        ("path", req("/a/b"), "/a/b"),
        ("header:X-User", req(headers={"x-user": "u1"}), "u1"),
        ("cookie:sid", req(headers={"Cookie": "a=1; sid=s%20x; b=2"}), "s%20x"),
        ("query:user", req(query="a=1&user=bob+smith"), "bob smith"),
        ("query:user", req(query="a=1"), None),
        ("header:X-User", req(), None),
    ],
)
def test_hash_keys(hash_on: str, request_: Request, key: str | None) -> None:
    assert request_key(request_, hash_on) == key


def test_a_request_without_the_key_hashes_on_the_client_address() -> None:
    balancer, _ = hashing([1, 1, 1, 1])
    picks = {balancer.pick(req(ip="198.51.100.7")) for _ in range(20)}
    assert len(picks) == 1


# --- health, backups, slow start ----------------------------------------------------------------


@pytest.mark.parametrize("balance", sorted(BALANCERS))
def test_backups_serve_only_while_no_primary_is_available(balance: str) -> None:
    clock = Clock()
    rt = runtime(upstream([{"weight": 1}, {"weight": 1}, {"weight": 1, "backup": True}], balance=balance), clock)
    a, b, backup = rt.targets
    assert backup not in {rt.pick(req(ip=f"192.0.2.{n}")) for n in range(50)}
    a.healthy = False
    b.ejected_until = clock.now + 10
    assert {rt.pick(req(ip=f"192.0.2.{n}")) for n in range(20)} == {backup}
    clock.now += 11  # the ejection ends: b is back, the backup idles again
    assert {rt.pick(req(ip=f"192.0.2.{n}")) for n in range(20)} == {b}
    backup.healthy = False
    b.healthy = False
    with pytest.raises(GatewayError) as info:
        rt.pick(req())
    assert info.value.status == 503 and info.value.word == "no_healthy_target"


def test_active_check_thresholds() -> None:
    (target,) = states(upstream([1]))
    target.slow_start = 30
    assert target.check_result(False, "status 503", 2, 3, 0.0) is None
    assert target.check_result(False, "status 503", 2, 3, 0.0) is None
    assert target.check_result(True, "status 200", 2, 3, 0.0) is None  # a success resets the count
    for _ in range(2):
        assert target.check_result(False, "status 503", 2, 3, 0.0) is None
    assert target.check_result(False, "status 503", 2, 3, 1.0) is False
    assert not target.available(1.0) and target.health_reason == "status 503"
    assert target.check_result(True, "status 200", 2, 3, 5.0) is None
    assert target.check_result(True, "status 200", 2, 3, 6.0) is True
    assert target.available(6.0)
    assert target.ramp(6.0) < 0.1 and target.ramp(21.0) == pytest.approx(0.5) and target.ramp(36.0) == 1.0


def test_slow_start_ramps_a_recovered_target_share() -> None:
    clock = Clock()
    rt = runtime(upstream([1, 1], slow_start="20s"), clock)
    b = rt.targets[1]
    b.start_ramp(clock.now)
    assert shares(rt, 2000)[1] < 0.06
    clock.now += 10
    assert abs(shares(rt, 3000)[1] - 1 / 3) < 0.02  # half its weight: 0.5 / 1.5
    clock.now += 10
    assert shares(rt, 2000)[1] == 0.5


def test_a_target_that_joins_a_running_gateway_slow_starts() -> None:
    clock = Clock()
    config = upstream([1, 1], slow_start="10s")
    built = states(config)
    built[1].joining = True
    rt = UpstreamRuntime("app", config, built, clock=clock)
    rt.activate()
    assert shares(rt, 1000)[1] < 0.06
    clock.now += 10
    assert shares(rt, 1000)[1] == 0.5


def test_passive_ejection_after_consecutive_failures() -> None:
    clock = Clock()
    rt = runtime(upstream([1, 1], health_check={"passive": {"max_failures": 3, "ejection": "10s"}}), clock)
    a, b = rt.targets
    error = UpstreamConnectError()
    rt.report_failure(a, error)
    rt.report_failure(a, error)
    rt.report_success(a, 0.01)  # a success in between: not consecutive
    rt.report_failure(a, error)
    rt.report_failure(a, error)
    assert a.available(clock.now)
    rt.report_failure(a, error)
    assert not a.available(clock.now)
    assert {rt.pick(req()) for _ in range(10)} == {b}
    # The last available target is never ejected: that would turn a blip into an outage.
    for _ in range(5):
        rt.report_failure(b, error)
    assert b.available(clock.now)
    clock.now += 10
    assert a.available(clock.now)


def test_client_side_errors_do_not_count_against_a_target() -> None:
    rt = runtime(upstream([1, 1], health_check={"passive": {"max_failures": 1}}))
    rt.report_failure(rt.targets[0], GatewayError("The client closed the connection."))
    assert rt.targets[0].failures == 0 and rt.targets[0].available(Clock()())


# --- retries ----------------------------------------------------------------------------------


def test_retry_rules() -> None:
    rt = runtime(upstream([1, 1, 1], retries={"attempts": 2}))
    a, b, c = rt.targets
    get, post = req(), req(method="POST")
    reset = UpstreamError("reset")
    assert rt.may_retry(get, 1, sent=True, tried=[a], error=reset)
    assert rt.may_retry(get, 2, sent=True, tried=[a, b], error=reset)
    assert not rt.may_retry(get, 3, sent=True, tried=[a, b], error=reset)  # attempts used up
    assert not rt.may_retry(post, 1, sent=True, tried=[a], error=reset)  # may have been applied
    assert rt.may_retry(post, 1, sent=False, tried=[a], error=UpstreamConnectError())  # never sent
    assert not rt.may_retry(get, 1, sent=True, tried=[a], error=UpstreamTimeout())  # slow, not down
    assert not rt.may_retry(get, 1, sent=True, tried=[a], error=GatewayError("client gone"))
    assert not rt.may_retry(get, 1, sent=True, tried=[a, b, c], error=reset)  # nowhere else to go
    assert rt.pick(get, exclude=[a, b]) is c


def test_retry_budget_is_a_share_of_live_requests() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, 0, clock)
    for _ in range(100):
        budget.request()
    assert sum(budget.try_retry() for _ in range(30)) == 20
    clock.now += 5
    for _ in range(50):
        budget.request()
    assert sum(budget.try_retry() for _ in range(30)) == 10
    clock.now += 6  # the first 100 requests and 20 retries left the window
    assert sum(budget.try_retry() for _ in range(30)) == 0
    assert budget.denied == 10 + 20 + 30


def test_retry_budget_reserve_allows_retries_at_low_traffic() -> None:
    budget = RetryBudget(0.2, 1, Clock())
    assert sum(budget.try_retry() for _ in range(20)) == 10  # 1/s over the 10 s window


def test_the_budget_stops_retries_from_multiplying_an_outage() -> None:
    rt = runtime(upstream([1, 1, 1], retries={"attempts": 3, "budget": 0.1, "min_retries_per_second": 0}))
    retries = 0
    for _ in range(1000):
        first = rt.pick(req())
        attempt = 1
        tried = [first]
        while rt.may_retry(req(), attempt, sent=True, tried=tried, error=UpstreamError()):
            tried.append(rt.pick(req(), exclude=tried))
            attempt += 1
            retries += 1
    assert retries == 100  # 10% of the traffic, not 300%


# --- sticky sessions ----------------------------------------------------------------------------


def test_sticky_cookie_pins_and_repins() -> None:
    clock = Clock()
    rt = runtime(upstream([1, 1, 1], sticky={"cookie": "aff", "ttl": "1h"}), clock)
    first = rt.pick(req())
    headers = rt.response_headers(req(), first)
    assert len(headers) == 1 and headers[0][0] == b"set-cookie"
    cookie = headers[0][1].decode()
    value = cookie.split(";")[0].split("=", 1)[1]
    assert "10.0.0" not in cookie and ":80" not in cookie  # opaque: no address inside
    assert "Max-Age=3600" in cookie and "HttpOnly" in cookie
    pinned = req(headers={"Cookie": f"other=1; aff={value}"})
    assert {rt.pick(pinned) for _ in range(20)} == {first}
    assert rt.response_headers(pinned, first) == []  # already pinned there: no new cookie
    first.healthy = False
    other = rt.pick(pinned)
    assert other is not first
    assert rt.response_headers(pinned, other)[0][1].startswith(b"aff=")  # re-pinned
    assert rt.pick(req(headers={"Cookie": "aff=forged"})) in rt.targets  # unknown value: balanced


def test_sticky_values_are_stable_for_one_secret_and_differ_across_secrets() -> None:
    config = upstream([1, 1], sticky={"secret": "s" * 32})
    one, two = runtime(config), runtime(config)
    assert one.sticky_ids == {k: v for k, v in two.sticky_ids.items()}
    other = runtime(upstream([1, 1], sticky={"secret": "t" * 32}))
    assert set(other.sticky_ids.values()).isdisjoint(one.sticky_ids.values())


# --- the pool's queue ---------------------------------------------------------------------------


class FakeConn:
    def __init__(self) -> None:
        self.closed = False
        self.served = 0
        self.idle_since = 0.0
        self.epoch = 0

    def detach(self) -> None:
        self.served += 1

    def close(self) -> None:
        self.closed = True

    def is_available(self) -> bool:
        return not self.closed


def fake_pool(max_connections: int, queue_size: int, timeout: float = 1.0) -> ConnectionPool:
    pool = ConnectionPool(HostPort("10.0.0.1", 80), PoolLimits(max_connections, 10, 60.0, 1.0))
    pool.queue = WaitQueue(queue_size, timeout)

    async def connect(reserved: bool = False) -> Any:
        if not reserved:
            pool.open += 1
        await asyncio.sleep(0)
        return FakeConn()

    pool.connect = connect  # type: ignore[method-assign]
    return pool


@run_async
async def test_a_full_pool_queues_in_order_then_refuses_fast() -> None:
    pool = fake_pool(1, 2)
    first = await pool.acquire()
    second = asyncio.ensure_future(pool.acquire())
    third = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await pool.acquire()  # queue full: a 503 now, not a pile-up
    assert pool.queue.waiting == 2
    pool.release(first, reusable=True)  # type: ignore[arg-type]
    assert await second is first  # handed over, FIFO
    assert not third.done()
    pool.release(first, reusable=False)  # type: ignore[arg-type]
    pool.connection_lost(first)  # type: ignore[arg-type]
    conn = await third  # the freed slot was reserved for it
    assert conn is not first and pool.open == 1 and pool.queue.waiting == 0


@run_async
async def test_a_waiter_leaves_the_queue_on_timeout_and_cancellation() -> None:
    pool = fake_pool(1, 5, timeout=0.05)
    held = await pool.acquire()
    with pytest.raises(Overloaded):
        await pool.acquire()
    assert not pool.waiters and pool.queue.waiting == 0 and pool.queue.timeouts == 1
    waiter = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not pool.waiters and pool.queue.waiting == 0
    pool.release(held, reusable=True)  # type: ignore[arg-type]
    assert pool.idle == [held]


@run_async
async def test_a_handed_over_connection_is_passed_on_when_the_waiter_is_cancelled() -> None:
    pool = fake_pool(1, 5)
    held = await pool.acquire()
    doomed = asyncio.ensure_future(pool.acquire())
    patient = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    pool.release(held, reusable=True)  # type: ignore[arg-type]  # goes to `doomed`...
    doomed.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert await patient is held  # nothing was lost
    assert pool.open == 1 and not pool.waiters


@run_async
async def test_a_reserved_slot_is_given_back_when_the_waiter_is_cancelled() -> None:
    pool = fake_pool(1, 5)
    held = await pool.acquire()
    doomed = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    pool.release(held, reusable=False)  # type: ignore[arg-type]
    pool.connection_lost(held)  # type: ignore[arg-type]  # the slot is reserved for `doomed`
    assert pool.open == 1
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert pool.open == 0 and not pool.waiters


def test_pick_avoids_a_full_target_while_another_has_room() -> None:
    rt = runtime(upstream([1, 1], max_connections=1))
    a, b = rt.targets
    a.pool.open = 1  # a is full, no idle connection
    assert {rt.pick(req()) for _ in range(6)} == {b}
    b.pool.open = 1
    assert {rt.pick(req()) for _ in range(6)} == {a, b}  # both full: queue on the balancer's pick
