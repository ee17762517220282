"""max_connections and the queue: waiting in order up to a bound, then a fast 503."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from lb_support import lb_config

from bastion.demo.origin import OriginHandle
from support import GatewayThread, Reply, request


def timed(port: int, path: str) -> tuple[Reply, float]:
    started = time.monotonic()
    reply = request(port, "GET", path)
    return reply, time.monotonic() - started


def test_over_max_connections_without_a_queue_is_a_fast_503(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    a = origins("a")
    gw = gateway(lb_config([{"address": a.address}], max_connections=1))
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(timed, gw.port, "/delay/400")
        time.sleep(0.1)
        reply, took = timed(gw.port, "/x")
        assert reply.status == 503 and reply.json()["error"] == "upstream_overloaded"
        assert took < 0.2  # refused at once, not after the slow request
        assert slow.result()[0].status == 200


def test_the_queue_holds_requests_in_order_until_a_slot_frees(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    a = origins("a")
    gw = gateway(lb_config([{"address": a.address}], max_connections=1, queue={"size": 3, "timeout": "2s"}))
    with ThreadPoolExecutor(4) as pool:
        futures = []
        for _ in range(4):
            futures.append(pool.submit(timed, gw.port, "/delay/100"))
            time.sleep(0.02)
        results = [f.result() for f in futures]
    assert [r.status for r, _ in results] == [200] * 4
    took = [t for _, t in results]
    assert took == sorted(took) and took[-1] > 0.3  # one after another (started 20 ms apart)
    assert a.call(lambda: a.origin.connections) == 1


def test_a_full_queue_or_a_long_wait_is_a_503(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    a = origins("a")
    gw = gateway(lb_config([{"address": a.address}], max_connections=1, queue={"size": 1, "timeout": "150ms"}))
    with ThreadPoolExecutor(3) as pool:
        slow = pool.submit(timed, gw.port, "/delay/600")
        time.sleep(0.1)
        waiting = pool.submit(timed, gw.port, "/x")
        time.sleep(0.05)
        full, full_took = timed(gw.port, "/x")  # the queue's one place is taken
        assert full.status == 503 and full_took < 0.1
        timed_out, waited = waiting.result()
        assert timed_out.status == 503 and 0.12 < waited < 0.5
        assert slow.result()[0].status == 200
    assert request(gw.port, "GET", "/x").status == 200  # nothing was leaked: the slot is free
