"""Sticky sessions end to end: the cookie is set once, pins, hides the address, re-pins."""

from __future__ import annotations

import http.client
from collections.abc import Callable

from lb_support import lb_config, set_health, wait_for

from bastion.demo.origin import OriginHandle
from support import GatewayThread

CHECKS = {"path": "/healthz", "interval": "50ms", "timeout": "200ms", "healthy": 1, "unhealthy": 1}


def get(port: int, cookie: str | None = None) -> tuple[str, str | None]:
    """(X-Origin, Set-Cookie) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Cookie": cookie} if cookie else {})
        resp = conn.getresponse()
        resp.read()
        return resp.getheader("X-Origin") or "", resp.getheader("Set-Cookie")
    finally:
        conn.close()


def test_sticky_cookie_pins_a_client_and_repins_when_its_target_fails(
    origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    handles = {name: origins(name) for name in "abc"}
    gw = gateway(
        lb_config(
            [{"address": h.address} for h in handles.values()],
            sticky={"cookie": "srv", "ttl": "10m"},
            health_check={"active": CHECKS},
        )
    )
    first, set_cookie = get(gw.port)
    assert set_cookie is not None and set_cookie.startswith("srv=")
    assert "Max-Age=600" in set_cookie and "HttpOnly" in set_cookie
    value = set_cookie.split(";")[0]
    for handle in handles.values():  # opaque: neither host nor port shows
        assert str(handle.port) not in value
    assert "127.0.0.1" not in value
    # Pinned: every request with the cookie goes to the same target, and no new cookie is set.
    for _ in range(12):
        assert get(gw.port, value) == (first, None)
    # Without the cookie, requests are balanced as usual.
    assert len({get(gw.port)[0] for _ in range(6)}) == 3
    # The pinned target fails its checks: the client moves and gets a new pin.
    set_health(handles[first], 503)
    wait_for(lambda: get(gw.port, value)[0] != first)
    moved, new_cookie = get(gw.port, value)
    assert new_cookie is not None and new_cookie.split(";")[0] != value
    new_value = new_cookie.split(";")[0]
    for _ in range(6):
        assert get(gw.port, new_value) == (moved, None)
    # The old target recovers: clients pinned to the new one stay there.
    set_health(handles[first], 200)
    wait_for(lambda: all(t.healthy for t in gw.gateway.snapshot.upstreams["app"].targets))
    for _ in range(4):
        assert get(gw.port, new_value) == (moved, None)
