"""The algorithms end to end: real origins, a real gateway, shares counted from responses."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from lb_support import Load, SlowOrigin, lb_config, origin_of, tally

from bastion.demo.origin import OriginHandle
from support import GatewayThread, write_config


@pytest.fixture
def slow_origin() -> Iterator[Callable[[str, float], SlowOrigin]]:
    started: list[SlowOrigin] = []

    def start(name: str, delay: float) -> SlowOrigin:
        server = SlowOrigin(name, delay)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_round_robin_weights_are_exact(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    a, b = origins("a"), origins("b")
    gw = gateway(lb_config([{"address": a.address, "weight": 3}, {"address": b.address}]))
    assert tally(gw.port, 400) == {"a": 300, "b": 100}


def test_random_weights_hold_within_a_few_percent(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    a, b = origins("a"), origins("b")
    gw = gateway(lb_config([{"address": a.address, "weight": 3}, {"address": b.address}], balance="random"))
    seen = tally(gw.port, 1200)
    assert abs(seen["a"] / 1200 - 0.75) < 0.05, seen


@pytest.mark.parametrize("balance", ["least_connections", "p2c_ewma"])
def test_load_aware_balancers_favour_the_fast_target(
    balance: str,
    origins: Callable[..., OriginHandle],
    gateway: Callable[..., GatewayThread],
    slow_origin: Callable[[str, float], SlowOrigin],
) -> None:
    fast = origins("fast")
    slow = slow_origin("slow", 0.05)
    gw = gateway(lb_config([{"address": fast.address}, {"address": slow.address}], balance=balance))
    with Load(gw.port, clients=6) as load:
        load.wait_requests(600)
    assert not load.failures
    share = load.seen["fast"] / (load.seen["fast"] + load.seen["slow"])
    print(f"{balance}: fast target share {share:.1%} of {load.count} requests")
    assert share > 0.8, load.seen


def test_consistent_hash_keeps_keys_and_moves_only_a_leaving_targets(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    handles = [origins(name) for name in "abc"]
    config = lb_config([{"address": h.address} for h in handles], balance="consistent_hash", hash_on="header:X-User")
    gw = gateway(config)
    users = [f"user-{n}" for n in range(60)]

    def owners() -> dict[str, str]:
        return {u: origin_of(gw.port, "/", {"X-User": u})[1] for u in users}

    before = owners()
    assert owners() == before  # stable
    assert set(before.values()) == {"a", "b", "c"}
    # c leaves the config: only c's users move.
    config["upstreams"]["app"]["targets"] = [{"address": h.address} for h in handles[:2]]
    config["listeners"][0]["bind"] = f"127.0.0.1:{gw.port}"
    write_config(gw.config_path, config)
    assert gw.reload()
    after = owners()
    assert all(after[u] == before[u] for u in users if before[u] != "c")
    assert set(after.values()) == {"a", "b"}


def test_hashing_on_a_cookie_and_on_the_path(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    handles = [origins(name) for name in "abcd"]
    targets = [{"address": h.address} for h in handles]
    by_cookie = gateway(lb_config(targets, balance="consistent_hash", hash_on="cookie:sid"))
    seen = Counter(origin_of(by_cookie.port, "/", {"Cookie": f"sid=s{n % 3}"})[1] for n in range(30))
    assert len(seen) <= 3 and sum(seen.values()) == 30
    for n in range(3):
        assert len({origin_of(by_cookie.port, "/x", {"Cookie": f"sid=s{n}"})[1] for _ in range(5)}) == 1
    by_path = gateway(lb_config(targets, balance="consistent_hash", hash_on="path"))
    for path in ("/a", "/b/c", "/d"):
        assert len({origin_of(by_path.port, path)[1] for _ in range(5)}) == 1
