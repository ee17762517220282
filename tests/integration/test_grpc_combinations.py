"""Cross-feature review of gRPC: grpcio over TLS both ways (h2 by ALPN from the client, an
`h2` upstream), calls that outlive a reload and a drain, gRPC-Web over HTTP/2, grpc_json
behind key_auth and rate_limit, and the gateway's own gRPC errors over HTTP/2."""

from __future__ import annotations

import base64
import json
import queue
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import h2.events
import pytest

import support
from adversary import wait_until
from grpc_support import Compiled, GrpcOrigin, _Servicer, compiled
from h2_support import RawH2
from support import GatewayProcess, GatewayThread, free_port, write_config
from tls_support import Pki

Start = Callable[..., GatewayThread]
SERVICE = "/bookstore.v1.Bookstore/"


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return compiled(tmp_path_factory.mktemp("proto"))


@pytest.fixture
def grpc_origins(kit: Compiled) -> Iterator[Callable[[], GrpcOrigin]]:
    started: list[GrpcOrigin] = []

    def start() -> GrpcOrigin:
        server = GrpcOrigin(kit)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class TlsGrpcOrigin(GrpcOrigin):
    """The Bookstore service over TLS (h2 by ALPN, as grpcio serves secure ports)."""

    def __init__(self, kit: Compiled, cert: str, key: str) -> None:
        self.kit = kit
        self.metadata: list[dict[str, str]] = []
        self.remaining: list[float | None] = []
        self.cancelled = threading.Event()
        self.sent = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        kit.pb2_grpc.add_BookstoreServicer_to_server(_Servicer(self), self.server)
        credentials = grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()


def grpc_config(upstream: dict[str, Any], listener: dict[str, Any] | None = None, **route: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": [{"name": "web", "bind": "127.0.0.1:PORT", "http2": "prior_knowledge", **(listener or {})}],
        "upstreams": {"books": upstream},
        "routes": [{"name": "books", "match": {"path": SERVICE}, "upstream": "books", **route}],
        "log": {"access": False},
    }


def h2c(port: int) -> dict[str, Any]:
    return {"protocol": "h2c", "targets": [{"address": f"127.0.0.1:{port}"}]}


def test_grpcio_over_tls_to_a_grpcio_server_over_tls(kit: Compiled, gateway: Start, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    gw_cert, gw_key = pki.issue("gw", "gw.example.com")
    up_cert, up_key = pki.issue("up", "books.internal")
    origin = TlsGrpcOrigin(kit, up_cert, up_key)
    try:
        upstream = {
            "protocol": "h2",
            "tls": {"verify": True, "ca": str(pki.ca_file), "sni": "books.internal"},
            "targets": [{"address": f"127.0.0.1:{origin.port}"}],
        }
        listener = {"protocol": "https", "tls": {"certificates": [{"cert": gw_cert, "key": gw_key}]}}
        listener_config = grpc_config(upstream, listener)
        del listener_config["listeners"][0]["http2"]
        gw = gateway(listener_config)
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_file.read_bytes())
        options = [("grpc.ssl_target_name_override", "gw.example.com")]
        with grpc.secure_channel(f"127.0.0.1:{gw.port}", credentials, options=options) as channel:
            stub = kit.pb2_grpc.BookstoreStub(channel)
            book = stub.GetBook(kit.pb2.GetBookRequest(shelf="s", book_id=7), timeout=10)
            assert book.title == "s:7"
            chunks = list(stub.Stream(kit.pb2.StreamRequest(count=50, size=1000), timeout=10))
            assert [c.index for c in chunks] == list(range(50))
    finally:
        origin.stop()


def chat(stub: Any, kit: Compiled) -> tuple[queue.Queue[Any], Iterator[Any]]:
    """A bidi call fed from a queue (None ends the client's side)."""
    outgoing: queue.Queue[Any] = queue.Queue()

    def requests() -> Iterator[Any]:
        while (item := outgoing.get(timeout=20)) is not None:
            yield item

    return outgoing, stub.Chat(requests(), timeout=30)


def test_a_streaming_call_outlives_a_reload_and_new_calls_use_the_new_upstream(
    kit: Compiled, grpc_origins: Callable[[], GrpcOrigin], gateway: Start
) -> None:
    first, second = grpc_origins(), grpc_origins()
    gw = gateway(grpc_config(h2c(first.port)))
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
        stub = kit.pb2_grpc.BookstoreStub(channel)
        outgoing, answers = chat(stub, kit)
        outgoing.put(kit.pb2.EchoRequest(text="before"))
        assert next(answers).text == "BEFORE"
        config = grpc_config(h2c(second.port))
        config["listeners"][0]["bind"] = f"127.0.0.1:{gw.port}"
        write_config(gw.config_path, config)
        assert gw.reload()
        outgoing.put(kit.pb2.EchoRequest(text="after"))
        assert next(answers).text == "AFTER"
        outgoing.put(None)
        assert list(answers) == []
        assert len(first.metadata) == 1
        # A new call (same client connection) goes by the new config.
        assert stub.GetBook(kit.pb2.GetBookRequest(shelf="s", book_id=1), timeout=10).id == 1
    assert len(second.metadata) == 1


def test_sigterm_lets_an_open_stream_finish_and_refuses_new_connections(
    kit: Compiled, grpc_origins: Callable[[], GrpcOrigin], tmp_path: Path
) -> None:
    origin = grpc_origins()
    port = free_port()
    config = grpc_config(h2c(origin.port))
    config["listeners"][0]["bind"] = f"127.0.0.1:{port}"
    config["drain_timeout"] = "20s"
    proc = GatewayProcess(write_config(tmp_path / "gw.yaml", config), port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kit.pb2_grpc.BookstoreStub(channel)
            outgoing, answers = chat(stub, kit)
            outgoing.put(kit.pb2.EchoRequest(text="one"))
            assert next(answers).text == "ONE"
            proc.signal(signal.SIGTERM)
            wait_until(lambda: refused(port), timeout=10, what="the listener closed")
            outgoing.put(kit.pb2.EchoRequest(text="two"))
            assert next(answers).text == "TWO"
            outgoing.put(None)
            assert list(answers) == []
        code, _, err = proc.stop(timeout=20)
        assert code == 0, err
    finally:
        proc.stop()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_no_route_and_a_dead_upstream_over_http2_are_grpc_statuses(
    kit: Compiled, gateway: Start, grpc_origins: Callable[[], GrpcOrigin]
) -> None:
    dead = free_port()
    config = grpc_config(h2c(dead))
    gw = gateway(config)
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
        stub = kit.pb2_grpc.BookstoreStub(channel)
        with pytest.raises(grpc.RpcError) as down:
            stub.GetBook(kit.pb2.GetBookRequest(shelf="s", book_id=1), timeout=10)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        other = channel.unary_unary("/other.v1.Other/Call", request_serializer=bytes, response_deserializer=bytes)
        with pytest.raises(grpc.RpcError) as missing:
            other(b"", timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_grpc_route_to_an_http1_upstream(kit: Compiled, gateway: Start, origins: Any) -> None:
    """An HTTP/1.1 origin cannot answer gRPC: the client gets a gRPC status, never a hang."""
    plain = origins("plain")
    gw = gateway(grpc_config({"targets": [{"address": plain.address}]}))
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
        stub = kit.pb2_grpc.BookstoreStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.GetBook(kit.pb2.GetBookRequest(shelf="s", book_id=1), timeout=10)
    assert failed.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED


def web_frame(message: Any) -> bytes:
    payload = message.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
def test_grpc_web_over_http2(kit: Compiled, gateway: Start, grpc_origins: Callable[[], GrpcOrigin], text: bool) -> None:
    origin = grpc_origins()
    gw = gateway(grpc_config(h2c(origin.port), grpc_web=True))
    body = web_frame(kit.pb2.GetBookRequest(shelf="web", book_id=3))
    kind = b"application/grpc-web-text" if text else b"application/grpc-web+proto"
    if text:
        body = base64.b64encode(body)
    with RawH2(gw.port) as client:
        stream = client.request(
            SERVICE + "GetBook",
            "POST",
            extra=[(b"content-type", kind), (b"x-grpc-web", b"1"), (b"origin", b"https://app.example")],
            end=False,
        )
        client.conn.send_data(stream, body, end_stream=True)
        client.flush()
        status, headers, answer = client.response(stream)
        assert not client.of(h2.events.TrailersReceived, stream)
    assert status == 200
    assert headers[b"content-type"].startswith(b"application/grpc-web")
    if text:  # each chunk is encoded (and padded) on its own: decode quantum by quantum
        answer = b"".join(base64.b64decode(answer[i : i + 4]) for i in range(0, len(answer), 4))
    size = int.from_bytes(answer[1:5], "big")
    book = kit.pb2.Book.FromString(answer[5 : 5 + size])
    assert book.title == "web:3"
    trailer = answer[5 + size :]
    assert trailer[0] == 0x80 and b"grpc-status:0" in trailer.replace(b" ", b"")


def test_grpc_json_behind_key_auth_and_rate_limit(
    kit: Compiled, gateway: Start, grpc_origins: Callable[[], GrpcOrigin]
) -> None:
    origin = grpc_origins()
    config = grpc_config(h2c(origin.port))
    config["routes"] = [
        {
            "name": "rest",
            "match": {"path": "/v1/"},
            "upstream": "books",
            "plugins": [
                {"key_auth": {}},
                {"rate_limit": {"limit": 2, "per": "1m", "key": "consumer"}},
                {"grpc_json": {"descriptor": str(kit.descriptor)}},
            ],
        }
    ]
    config["consumers"] = [{"name": "app", "credentials": {"key_auth": [{"key": "k" * 24}]}}]
    gw = gateway(config)
    assert support.request(gw.port, path="/v1/shelves/a/books/5").status == 401
    key = {"x-api-key": "k" * 24}
    ok = support.request(gw.port, path="/v1/shelves/a/books/5", headers=key)
    assert ok.status == 200 and ok.json()["title"] == "a:5"
    assert ok.header("content-type").startswith("application/json")  # type: ignore[union-attr]
    assert origin.metadata[-1].get("x-consumer") == "app"
    assert support.request(gw.port, path="/v1/shelves/a/books/404", headers=key).status == 404
    limited = support.request(gw.port, path="/v1/shelves/a/books/5", headers=key)
    assert limited.status == 429 and limited.json()["error"]
    json.dumps(limited.json())


def test_grpc_web_text_split_mid_quantum_over_http2_and_a_preflight(
    kit: Compiled, gateway: Start, grpc_origins: Callable[[], GrpcOrigin]
) -> None:
    origin = grpc_origins()
    gw = gateway(grpc_config(h2c(origin.port), grpc_web=True))
    body = base64.b64encode(web_frame(kit.pb2.GetBookRequest(shelf="split", book_id=4)))
    with RawH2(gw.port) as client:
        preflight = client.request(
            SERVICE + "GetBook",
            "OPTIONS",
            extra=[(b"origin", b"https://app.example"), (b"access-control-request-method", b"POST")],
        )
        status, headers, _ = client.response(preflight)
        assert status == 204 and headers[b"access-control-allow-origin"] == b"*"
        stream = client.request(
            SERVICE + "GetBook", "POST", extra=[(b"content-type", b"application/grpc-web-text")], end=False
        )
        for at in range(0, len(body), 3):  # 3 bytes a frame: never a whole base64 quantum
            client.conn.send_data(stream, body[at : at + 3])
            client.flush()
        client.conn.end_stream(stream)
        client.flush()
        status, _, answer = client.response(stream)
    assert status == 200
    answer = b"".join(base64.b64decode(answer[i : i + 4]) for i in range(0, len(answer), 4))
    size = int.from_bytes(answer[1:5], "big")
    assert kit.pb2.Book.FromString(answer[5 : 5 + size]).title == "split:4"


def test_grpc_status_values_from_an_upstream_cannot_grow_the_metric_labels(
    gateway: Start, scripted_origin: Any
) -> None:
    """An upstream's grpc-status is a label of bastion_grpc_responses_total: a value that is not
    a status number (quotes, letters) must not become a label of its own, or a broken or
    hostile upstream makes the metric grow with every new value."""
    counter = iter(range(1000))

    def reply(request: Any) -> list[Any]:
        from adversary import Write

        value = 'ab"\\xyz'[next(counter) % 6 :][:2]
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n"
        return [Write(head + b"0\r\ngrpc-status: " + value.encode() + b"\r\n\r\n")]

    origin = scripted_origin(reply=reply)
    admin = free_port()
    config = grpc_config({"targets": [{"address": origin.address}]})
    config["admin"] = {"bind": f"127.0.0.1:{admin}"}
    gw = gateway(config)
    for _ in range(12):
        support.request(
            gw.port, "POST", SERVICE + "Call", headers={"content-type": "application/grpc", "te": "trailers"}, body=b""
        )
    from prometheus_client.parser import text_string_to_metric_families

    text = support.request(admin, path="/metrics").body.decode()
    labels = {
        sample.labels["grpc_status"]
        for family in text_string_to_metric_families(text)
        if family.name == "bastion_grpc_responses"
        for sample in family.samples
    }
    assert labels <= {str(code) for code in range(17)}, labels


@pytest.mark.parametrize("kind", [b"application/grpc", b"application/grpc-web+proto"])
def test_gateway_refusals_of_grpc_over_http2_are_trailers_only(
    kit: Compiled, gateway: Start, grpc_origins: Callable[[], GrpcOrigin], kind: bytes
) -> None:
    origin = grpc_origins()
    plugins = [{"key_auth": {}}, {"rate_limit": {"limit": 1, "per": "1m", "key": "consumer"}}]
    config = grpc_config(h2c(origin.port), grpc_web=True, plugins=plugins)
    config["consumers"] = [{"name": "app", "credentials": {"key_auth": [{"key": "k" * 24}]}}]
    gw = gateway(config)
    body = web_frame(kit.pb2.GetBookRequest(shelf="s", book_id=1))
    key = [(b"x-api-key", b"k" * 24)]
    with RawH2(gw.port) as client:
        answers = []
        for extra in ([], key, key):
            stream = client.request(SERVICE + "GetBook", "POST", extra=[(b"content-type", kind), *extra], end=False)
            client.conn.send_data(stream, body, end_stream=True)
            client.flush()
            answers.append(client.response(stream))
    (s1, h1, b1), (s2, _, _), (s3, h3, b3) = answers
    assert (s1, h1[b"grpc-status"], b1) == (200, b"16", b"")
    assert h1[b"content-type"].startswith(kind.split(b"+")[0])
    assert s2 == 200
    assert (s3, h3[b"grpc-status"], b3) == (200, b"8", b"")
    assert len(origin.metadata) == 1


def test_sighup_keeps_an_open_stream_and_sends_new_calls_by_the_new_config(
    kit: Compiled, grpc_origins: Callable[[], GrpcOrigin], tmp_path: Path
) -> None:
    first, second = grpc_origins(), grpc_origins()
    port = free_port()
    config = grpc_config(h2c(first.port))
    config["listeners"][0]["bind"] = f"127.0.0.1:{port}"
    path = write_config(tmp_path / "gw.yaml", config)
    proc = GatewayProcess(path, port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kit.pb2_grpc.BookstoreStub(channel)
            outgoing, answers = chat(stub, kit)
            outgoing.put(kit.pb2.EchoRequest(text="one"))
            assert next(answers).text == "ONE"
            config["upstreams"]["books"] = h2c(second.port)
            write_config(path, config)
            proc.signal(signal.SIGHUP)
            wait_until(lambda: "config reloaded" in proc.output()[1], timeout=10, what="the reload")
            outgoing.put(kit.pb2.EchoRequest(text="two"))
            assert next(answers).text == "TWO"
            outgoing.put(None)
            assert list(answers) == []
            assert stub.GetBook(kit.pb2.GetBookRequest(shelf="s", book_id=2), timeout=10).id == 2
        assert len(first.metadata) == 1 and len(second.metadata) == 1
    finally:
        code, _, err = proc.stop()
    assert code == 0, err
