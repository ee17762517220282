"""Shared fixtures: origins and gateways on loopback, torn down after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adversary import ScriptedOrigin
from bastion.demo.origin import OriginHandle, start_origin_thread
from support import GatewayThread, free_port, simple_config, write_config


@pytest.fixture
def origins() -> Iterator[Callable[..., OriginHandle]]:
    """Factory: `origins("a")` starts an origin named a; all stop after the test."""
    started: list[OriginHandle] = []

    def start(name: str = "origin") -> OriginHandle:
        handle = start_origin_thread(name)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture
def scripted_origin() -> Iterator[Callable[..., ScriptedOrigin]]:
    """Factory: `scripted_origin(reply=..., connections=...)` (see adversary.ScriptedOrigin); all
    stop after the test, which fails if a reply function raised (a bug in the test itself)."""
    started: list[ScriptedOrigin] = []

    def start(*args: Any, **kwargs: Any) -> ScriptedOrigin:
        origin = ScriptedOrigin(*args, **kwargs)
        started.append(origin)
        return origin

    yield start
    for origin in started:
        origin.stop()
    errors = [error for origin in started for error in origin.errors]
    assert not errors, f"a scripted origin's reply raised: {errors!r}"


@pytest.fixture
def ws_origin() -> Iterator[Callable[..., Any]]:
    """Factory: `ws_origin()` starts a WebSocket origin (ws_support.WsOrigin); all stop after the
    test, which fails if an origin handler raised (a bug in the test itself)."""
    from ws_support import WsOrigin

    started: list[WsOrigin] = []

    def start(**kwargs: Any) -> WsOrigin:
        origin = WsOrigin(**kwargs)
        started.append(origin)
        return origin

    yield start
    for origin in started:
        origin.stop()
    errors = [error for origin in started for error in origin.errors]
    assert not errors, f"a WebSocket origin's handler raised: {errors!r}"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayThread]]:
    """Factory: `gateway(config_dict)` or `gateway(targets=[port, ...], **extra)`."""
    started: list[GatewayThread] = []

    def start(config: dict[str, Any] | None = None, targets: list[int] | None = None, **extra: Any) -> GatewayThread:
        port = free_port()
        if config is None:
            config = simple_config(port, targets or [], **extra)
        for listener in config["listeners"][:1]:
            host, _, bound = listener["bind"].rpartition(":")
            if bound in ("PORT", "0"):
                listener["bind"] = f"{host}:{port}"
        path = write_config(tmp_path / f"gw{len(started)}.yaml", config)
        handle = GatewayThread(path, port)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture(scope="session")
def redis_session() -> Iterator[Any]:
    """One redis-server for the whole run (tests that kill Redis start their own)."""
    from redis_support import RedisServer

    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_session: Any) -> Any:
    """The session's redis-server, emptied for this test (keys, scripts, command counters)."""
    client = redis_session.client()
    client.flushall()
    client.script_flush()
    client.config_resetstat()
    return redis_session
