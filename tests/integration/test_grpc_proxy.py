"""Real grpcio clients and a real grpcio server with the gateway between them (h2c both ways):
the four kinds of RPC, metadata and statuses both ways, large messages, deadlines,
cancellation and backpressure."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from adversary import wait_until
from grpc_support import Compiled, GrpcOrigin, compiled
from support import GatewayThread

Start = Callable[..., GatewayThread]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return compiled(tmp_path_factory.mktemp("proto"))


@pytest.fixture
def origin(kit: Compiled) -> Iterator[GrpcOrigin]:
    server = GrpcOrigin(kit)
    yield server
    server.stop()


def grpc_config(port: int, plugins: list[Any] | None = None, **route: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": [{"name": "web", "bind": "127.0.0.1:PORT", "http2": "prior_knowledge"}],
        "upstreams": {"books": {"protocol": "h2c", "targets": [{"address": f"127.0.0.1:{port}"}]}},
        "routes": [
            {
                "name": "books",
                "match": {"path": "/bookstore.v1.Bookstore/"},
                "upstream": "books",
                "plugins": plugins or [],
                **route,
            }
        ],
        "log": {"access": False},
    }


OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@pytest.fixture
def stub(kit: Compiled, origin: GrpcOrigin, gateway: Start) -> Iterator[Any]:
    gw = gateway(grpc_config(origin.port))
    channel = grpc.insecure_channel(f"127.0.0.1:{gw.port}", options=OPTIONS)
    yield kit.pb2_grpc.BookstoreStub(channel)
    channel.close()


def test_unary_with_metadata_both_ways(kit: Compiled, origin: GrpcOrigin, stub: Any) -> None:
    response, call = stub.Echo.with_call(
        kit.pb2.EchoRequest(text="hi", blob=b"\x00\xff"), metadata=(("x-client", "c1"),), timeout=10
    )
    assert response.text == "hi" and response.blob == b"\x00\xff"
    assert response.metadata["x-client"] == "c1"
    assert "x-request-id" in response.metadata
    assert dict(call.trailing_metadata())["x-trailer"] == "t-value"
    assert call.code() == grpc.StatusCode.OK


def test_status_and_trailing_metadata_from_the_server(kit: Compiled, stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Echo(kit.pb2.EchoRequest(fail_code=5, fail_message="not here, 100% sure"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "not here, 100% sure"
    assert dict(info.value.trailing_metadata())["x-detail"] == "trailing"


def test_server_streaming(kit: Compiled, stub: Any) -> None:
    chunks = list(stub.Stream(kit.pb2.StreamRequest(count=300, size=1000), timeout=20))
    assert [c.index for c in chunks] == list(range(300))
    assert all(len(c.data) == 1000 for c in chunks)


def test_client_streaming(kit: Compiled, stub: Any) -> None:
    chunks = (kit.pb2.Chunk(data=b"y" * 10_000, index=i) for i in range(200))
    response = stub.Upload(chunks, timeout=20)
    assert response.count == 200 and response.text == str(200 * 10_000)


def test_bidi_streaming_interleaves(kit: Compiled, stub: Any) -> None:
    """Each answer arrives before the next message is sent: nothing waits for the end."""
    outgoing: list[Any] = []
    ready = threading.Event()
    done = threading.Event()

    def requests() -> Iterator[Any]:
        for i in range(20):
            ready.wait(10)
            ready.clear()
            if done.is_set():
                return
            yield kit.pb2.EchoRequest(text=f"m{i}")

    ready.set()
    call = stub.Chat(requests(), timeout=20)
    for i, answer in enumerate(call):
        outgoing.append(answer.text)
        assert answer.text == f"M{i}" and answer.count == i
        ready.set()
    done.set()
    assert len(outgoing) == 20


def test_large_messages_both_ways(kit: Compiled, stub: Any) -> None:
    blob = bytes(range(256)) * (6 * 4096)  # 6 MB
    response = stub.Echo(kit.pb2.EchoRequest(text="big", blob=blob), timeout=30)
    assert response.blob == blob


def test_client_deadline_reaches_the_upstream_as_a_cancel(kit: Compiled, origin: GrpcOrigin, stub: Any) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Echo(kit.pb2.EchoRequest(sleep_ms=5000), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 4
    remaining = origin.remaining[-1]
    assert remaining is not None and remaining < 1  # the deadline travelled with the call
    assert origin.cancelled.wait(5), "the upstream call was not cancelled"


def test_client_cancel_reaches_the_upstream(kit: Compiled, origin: GrpcOrigin, stub: Any) -> None:
    call = stub.Stream(kit.pb2.StreamRequest(count=100_000, size=1000), timeout=30)
    for _ in range(3):
        next(call)
    call.cancel()
    assert origin.cancelled.wait(10), "the upstream stream was not cancelled"
    assert origin.sent < 100_000


def test_a_slow_reader_holds_the_server_back(kit: Compiled, origin: GrpcOrigin, stub: Any) -> None:
    """A client that stops reading stops the upstream: windows and buffers are bounded."""
    size, count = 64 * 1024, 1000  # 64 MB in all
    call = stub.Stream(kit.pb2.StreamRequest(count=count, size=size), timeout=60)
    next(call)
    time.sleep(1.5)  # the client reads nothing; the server runs until the windows are full
    held = origin.sent
    assert held * size < 32 * 1024 * 1024, f"{held} messages sent to a client that reads nothing"
    received = 1 + sum(1 for _ in call)  # reading again lets the stream finish
    assert received == count
    wait_until(lambda: origin.sent == count, what="the whole stream")


def test_gateway_timeout_is_deadline_exceeded_and_cancels_the_upstream(
    kit: Compiled, origin: GrpcOrigin, gateway: Start
) -> None:
    """The upstream's response timeout, shorter than the client's deadline: the gateway ends
    the call with 4 itself, and the server sees the cancellation."""
    config = grpc_config(origin.port)
    config["upstreams"]["books"]["timeouts"] = {"response": "300ms"}
    gw = gateway(config)
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
        stub = kit.pb2_grpc.BookstoreStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Echo(kit.pb2.EchoRequest(sleep_ms=5000), timeout=30)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 4
        assert "did not answer in time" in (info.value.details() or "")
    assert origin.cancelled.wait(5), "the upstream call was not cancelled"


def test_grpc_statuses_are_counted(kit: Compiled, origin: GrpcOrigin, gateway: Start) -> None:
    from support import free_port, request

    admin = free_port()
    config = grpc_config(origin.port)
    config["admin"] = {"bind": f"127.0.0.1:{admin}"}
    gw = gateway(config)
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
        stub = kit.pb2_grpc.BookstoreStub(channel)
        stub.Echo(kit.pb2.EchoRequest(text="ok"), timeout=10)
        stub.Echo(kit.pb2.EchoRequest(text="ok"), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Echo(kit.pb2.EchoRequest(fail_code=5, fail_message="x"), timeout=10)
    metrics = request(admin, "GET", "/metrics").body.decode()
    assert 'bastion_grpc_responses_total{grpc_status="0",route="books"} 2.0' in metrics
    assert 'bastion_grpc_responses_total{grpc_status="5",route="books"} 1.0' in metrics


def test_many_concurrent_calls_keep_their_answers(kit: Compiled, stub: Any) -> None:
    """Hundreds of calls in flight on one client connection, multiplexed to the server: each
    gets its own answer."""
    calls = [
        stub.Echo.future(kit.pb2.EchoRequest(text=f"call-{i}", blob=bytes([i % 256]) * i), timeout=30)
        for i in range(300)
    ]
    for i, call in enumerate(calls):
        answer = call.result()
        assert answer.text == f"call-{i}" and answer.blob == bytes([i % 256]) * i
