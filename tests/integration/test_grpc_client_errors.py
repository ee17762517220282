"""A real grpcio client over HTTP/2 (h2c) sees the gateway's own errors as gRPC statuses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from grpc_support import Compiled, compiled
from support import GatewayThread, free_port

Start = Callable[..., GatewayThread]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return compiled(tmp_path_factory.mktemp("proto"))


def gateway_config(targets: list[int], plugins: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": [{"name": "web", "bind": "127.0.0.1:PORT", "http2": "prior_knowledge"}],
        "upstreams": {"books": {"targets": [{"address": f"127.0.0.1:{t}"} for t in targets]}},
        "routes": [
            {
                "name": "books",
                "match": {"path": "/bookstore.v1.Bookstore/"},
                "upstream": "books",
                "plugins": plugins or [],
            }
        ],
        "log": {"access": False},
        **extra,
    }


@pytest.fixture
def channel_to() -> Iterator[Callable[[int], grpc.Channel]]:
    channels: list[grpc.Channel] = []

    def open_channel(port: int) -> grpc.Channel:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        channel.close()


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_no_route_is_unimplemented(kit: Compiled, gateway: Start, channel_to: Callable[[int], grpc.Channel]) -> None:
    gw = gateway(gateway_config([free_port()]))
    channel = channel_to(gw.port)
    # A method of another service: no route matches.
    other = channel.unary_unary("/other.v1.Svc/Call", request_serializer=None, response_deserializer=None)
    error = rpc_error(lambda: other(b"", timeout=5))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "No route" in error.details()
    assert dict(error.initial_metadata() or ()).get("x-request-id") or dict(error.trailing_metadata()).get(
        "x-request-id"
    )


def test_refused_upstream_is_unavailable(
    kit: Compiled, gateway: Start, channel_to: Callable[[int], grpc.Channel]
) -> None:
    gw = gateway(gateway_config([free_port()]))
    stub = kit.pb2_grpc.BookstoreStub(channel_to(gw.port))
    error = rpc_error(lambda: stub.GetBook(kit.pb2.GetBookRequest(shelf="a", book_id=1), timeout=5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_key_auth_acl_and_rate_limit(kit: Compiled, gateway: Start, channel_to: Callable[[int], grpc.Channel]) -> None:
    consumers = [
        {"name": "alice", "groups": ["staff"], "credentials": {"key_auth": [{"key": "alice-key"}]}},
        {"name": "bob", "groups": ["guests"], "credentials": {"key_auth": [{"key": "bob-key"}]}},
    ]
    plugins = [
        {"key_auth": {}},
        {"acl": {"allow_groups": ["staff"]}},
        {"rate_limit": {"limit": 1, "per": "1m", "key": "consumer"}},
    ]
    gw = gateway(gateway_config([free_port()], plugins, consumers=consumers))
    stub = kit.pb2_grpc.BookstoreStub(channel_to(gw.port))
    request = kit.pb2.GetBookRequest(shelf="a", book_id=1)
    assert rpc_error(lambda: stub.GetBook(request, timeout=5)).code() == grpc.StatusCode.UNAUTHENTICATED
    bob = (("x-api-key", "bob-key"),)
    assert rpc_error(lambda: stub.GetBook(request, timeout=5, metadata=bob)).code() == grpc.StatusCode.PERMISSION_DENIED
    alice = (("x-api-key", "alice-key"),)
    # alice passes auth and acl; her first call reaches the (missing) upstream, her second is limited
    assert rpc_error(lambda: stub.GetBook(request, timeout=5, metadata=alice)).code() == grpc.StatusCode.UNAVAILABLE
    limited = rpc_error(lambda: stub.GetBook(request, timeout=5, metadata=alice))
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(limited.trailing_metadata()).get("retry-after")
