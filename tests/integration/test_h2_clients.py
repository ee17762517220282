"""HTTP/2 from clients as a user sees it: httpx (http2=True) against the gateway over TLS (ALPN
h2) and over cleartext with prior knowledge, in front of HTTP/1.1 origins."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.events as h2_events
import httpx
import pytest

from adversary import Pause, ReadRequest, Request, Step, Write, http_response
from bastion.demo.origin import OriginHandle
from bastion.pipeline import Context, Plugin, PluginConfig, Reply
from h2_support import PREFACE, RawH2
from support import GatewayThread, free_port
from tls_support import Pki


def tls_config(pki: Pki, targets: list[str], **listener: Any) -> dict[str, Any]:
    cert, key = pki.issue("gw", "127.0.0.1", "localhost")
    return {
        "version": 1,
        "listeners": [
            {
                "name": "web-tls",
                "bind": "127.0.0.1:PORT",
                "protocol": "https",
                "tls": {"certificates": [{"cert": cert, "key": key}]},
                **listener,
            }
        ],
        "upstreams": {"app": {"targets": [{"address": t} for t in targets]}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
        "log": {"access": False},
    }


def h2c_config(targets: list[str], **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "version": 1,
        "listeners": [{"name": "web", "bind": "127.0.0.1:PORT", "http2": "prior_knowledge"}],
        "upstreams": {"app": {"targets": [{"address": t} for t in targets]}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
        "log": {"access": False},
    }
    config.update(extra)
    return config


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def origin(origins: Callable[..., OriginHandle]) -> OriginHandle:
    return origins("a")


def h2_client(gw: GatewayThread, pki: Pki | None = None, **options: Any) -> httpx.Client:
    if pki is None:
        return httpx.Client(http1=False, http2=True, base_url=f"http://127.0.0.1:{gw.port}", timeout=20, **options)
    return httpx.Client(
        http2=True, verify=pki.client_context(), base_url=f"https://127.0.0.1:{gw.port}", timeout=20, **options
    )


# --- the basics, both ways in -----------------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["tls-alpn", "prior-knowledge"])
def test_get_and_post_over_http2_reach_an_http1_origin(gateway, origin, pki, tls):
    gw = gateway(tls_config(pki, [origin.address]) if tls else h2c_config([origin.address]))
    with h2_client(gw, pki if tls else None) as client:
        reply = client.get("/v1/items?x=1&y", headers={"x-test": "yes", "cookie": "a=1"})
        assert reply.http_version == "HTTP/2"
        assert reply.status_code == 200
        seen = reply.json()
        assert seen["path"] == "/v1/items?x=1&y"
        assert seen["method"] == "GET"
        assert seen["headers"]["x-test"] == "yes"
        assert seen["headers"]["host"] == f"127.0.0.1:{gw.port}"
        assert seen["headers"]["x-forwarded-proto"] == ("https" if tls else "http")
        assert reply.headers["x-request-id"]
        posted = client.post("/upload", content=b"z" * 300_000)
        assert posted.status_code == 200
        assert posted.json()["body_bytes"] == 300_000
        assert posted.json()["method"] == "POST"


def test_http1_is_still_served_on_the_tls_listener(gateway, origin, pki):
    gw = gateway(tls_config(pki, [origin.address]))
    with httpx.Client(http2=False, verify=pki.client_context(), base_url=f"https://127.0.0.1:{gw.port}") as client:
        reply = client.get("/one")
    assert (reply.http_version, reply.status_code) == ("HTTP/1.1", 200)


def test_http2_false_keeps_a_tls_listener_on_http1(gateway, origin, pki):
    gw = gateway(tls_config(pki, [origin.address], http2=False))
    with h2_client(gw, pki) as client:
        reply = client.get("/one")
    assert (reply.http_version, reply.status_code) == ("HTTP/1.1", 200)


def test_a_plain_listener_without_prior_knowledge_does_not_speak_http2(gateway, origin):
    config = h2c_config([origin.address])
    del config["listeners"][0]["http2"]
    gw = gateway(config)
    with RawH2(gw.port) as client:
        client.request("/")
        client.wait_closed()
        assert not client.events  # an HTTP/1.1 400, which is no HTTP/2 frame
    with httpx.Client(base_url=f"http://127.0.0.1:{gw.port}") as plain:
        assert plain.get("/").status_code == 200


def test_a_preface_split_over_many_reads_is_still_http2(gateway, origin):
    gw = gateway(h2c_config([origin.address]))
    client = RawH2.__new__(RawH2)
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    for i in range(0, len(PREFACE), 5):
        sock.sendall(PREFACE[i : i + 5])
        time.sleep(0.02)
    sock.close()
    # The same bytes with the rest of the connection: a full h2 exchange after a byte-wise preface.
    client = RawH2(gw.port)
    stream = client.request("/split")
    status, _, body = client.response(stream)
    assert status == 200 and json.loads(body)["path"] == "/split"
    client.close()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        for byte in PREFACE[:10]:
            sock.sendall(bytes([byte]))
        sock.sendall(b"GARBAGE\r\n\r\n")  # not the preface after all: HTTP/1.1, which refuses it
        assert sock.recv(100).startswith(b"HTTP/1.1 400")


# --- many streams, big bodies, backpressure ----------------------------------------------------


def test_200_concurrent_streams_on_one_connection(gateway, origin):
    gw = gateway(h2c_config([origin.address]))

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(http1=False, http2=True, base_url=f"http://127.0.0.1:{gw.port}", timeout=30) as c:
            return await asyncio.gather(*(c.get(f"/delay/50?n={i}") for i in range(200)))

    replies = asyncio.run(run())
    assert [r.status_code for r in replies] == [200] * 200
    assert sorted(r.json()["path"] for r in replies) == sorted(f"/delay/50?n={i}" for i in range(200))
    connections = {r.extensions.get("network_stream") for r in replies}
    assert len(connections) == 1


def test_large_bodies_both_ways_while_one_stream_waits_on_a_slow_upstream(gateway, origin, scripted_origin):
    size = 6 * 1024 * 1024
    # httpcore stops sending on every stream while one waits for a response and another for
    # its window, so the upload gets windows it never waits on. A stalled upload is
    # test_a_stalled_upstream_closes_only_its_own_streams_window below.
    slow = scripted_origin(connections=[[ReadRequest(), Pause(3.0), Write(http_response(200, b"late"))]])
    config = h2c_config([origin.address])
    config["upstreams"]["slow"] = {"targets": [{"address": slow.address}]}
    config["routes"].insert(0, {"name": "slow", "match": {"path": "/slow"}, "upstream": "slow"})
    config["listeners"][0]["limits"] = {"h2_initial_window_size": "8MB", "h2_connection_window": "16MB"}
    gw = gateway(config)
    done: dict[str, float] = {}

    async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(http1=False, http2=True, base_url=f"http://127.0.0.1:{gw.port}", timeout=30) as c:

            async def timed(name: str, coro: Any) -> httpx.Response:
                reply = await coro
                done[name] = time.monotonic()
                return reply

            stalled = asyncio.ensure_future(timed("slow", c.get("/slow")))
            await asyncio.sleep(0.3)
            down = await timed("down", c.get(f"/bytes/{size}"))
            up = await timed("up", c.post("/up", content=b"u" * size))
            return await stalled, down, up

    stalled, down, up = asyncio.run(run())
    assert (down.status_code, len(down.content)) == (200, size)
    assert (up.status_code, up.json()["body_bytes"]) == (200, size)
    assert (stalled.status_code, stalled.content) == (200, b"late")
    assert done["down"] < done["slow"] and done["up"] < done["slow"]  # neighbours did not wait


def test_trailers_from_an_origin_reach_an_http2_client(gateway, scripted_origin):
    def reply(request: Request) -> list[Step]:
        return [
            Write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"),
            Write(b"5\r\nhello\r\n"),
            Write(b"0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n"),
        ]

    origin = scripted_origin(reply=reply)
    gw = gateway(h2c_config([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.request("/svc/Method", "POST", [(b"te", b"trailers"), (b"content-type", b"application/grpc")])
        status, headers, body = client.response(stream)
        (trailers,) = client.of(h2_events.TrailersReceived, stream)
    assert (status, body) == (200, b"hello")
    assert dict(trailers.headers) == {b"grpc-status": b"0", b"grpc-message": b"ok"}
    assert b"transfer-encoding" not in headers and b"trailer" not in headers
    (seen,) = origin.requests
    assert seen.header("te") == "trailers"  # gRPC origins need it


def test_request_trailers_reach_the_origin(gateway, scripted_origin):
    origin = scripted_origin(reply=[Write(http_response(200, b"ok"))])
    gw = gateway(h2c_config([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.request("/t", "POST", end=False)
        client.conn.send_data(stream, b"abc")
        client.conn.send_headers(stream, [(b"x-checksum", b"1234")], end_stream=True)
        client.flush()
        status, _, body = client.response(stream)
    assert (status, body) == (200, b"ok")
    (seen,) = origin.requests
    assert seen.body == b"abc" and seen.trailers == [("x-checksum", "1234")]


# --- plugins and logs, per stream ---------------------------------------------------------------


def test_key_auth_and_rate_limit_apply_per_stream(gateway, origin, tmp_path):
    log_file = tmp_path / "access.log"
    config = h2c_config(
        [origin.address],
        plugins=[{"key_auth": {}}, {"rate_limit": {"limit": 3, "per": "1h", "key": "consumer"}}],
        consumers=[{"name": "alice", "credentials": {"key_auth": [{"key": "alice-key"}]}}],
        log={"access": True, "access_file": str(log_file)},
    )
    gw = gateway(config)
    with h2_client(gw) as client:
        assert client.get("/x").status_code == 401
        statuses = [client.get("/x", headers={"x-api-key": "alice-key"}).status_code for _ in range(4)]
        anonymous = client.get("/x")
    assert statuses == [200, 200, 200, 429]
    assert anonymous.status_code == 401 and anonymous.json()["error"]
    deadline = time.monotonic() + 5
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(lines) < 6:
        time.sleep(0.05)
        lines = [json.loads(line) for line in log_file.read_text().splitlines() if line]
    assert [line["status"] for line in lines] == [401, 200, 200, 200, 429, 401]
    assert {line["consumer"] for line in lines[1:5]} == {"alice"}
    assert {line["protocol"] for line in lines} == {"HTTP/2"}


def test_drain_sends_goaway_and_lets_the_open_stream_finish(gateway, scripted_origin):
    origin = scripted_origin(reply=[Pause(0.5), Write(http_response(200, b"done"))])
    gw = gateway(h2c_config([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.request("/slow")
        client.until(lambda: origin.requests)
        stopping = asyncio.run_coroutine_threadsafe(gw.gateway.shutdown(5.0), gw.loop)
        client.until(client.goaway)
        assert client.goaway().error_code == 0 and client.goaway().last_stream_id == stream
        status, _, body = client.response(stream)
        assert (status, body) == (200, b"done")
        client.wait_closed()
        stopping.result(10)


def test_a_retired_listener_sends_goaway(gateway, origin, tmp_path):
    gw = gateway(h2c_config([origin.address]))
    with RawH2(gw.port) as client:
        status, _, _ = client.response(client.request("/a"))
        assert status == 200
        config = h2c_config([origin.address])
        config["listeners"][0]["bind"] = f"127.0.0.1:{free_port()}"
        config["listeners"][0]["name"] = "other"
        gw.config_path.write_text(json.dumps(config))
        assert gw.reload()
        client.until(client.goaway)
        client.wait_closed()


def test_an_idle_connection_gets_goaway_after_the_keepalive_timeout(gateway, origin):
    config = h2c_config([origin.address])
    config["listeners"][0]["timeouts"] = {"keepalive": "300ms"}
    gw = gateway(config)
    with RawH2(gw.port) as client:
        assert client.response(client.request("/a"))[0] == 200
        client.until(client.goaway, timeout=5)
        client.wait_closed()


def test_a_stalled_upstream_closes_only_its_own_streams_window(gateway, origin, scripted_origin):
    """The window of a stream whose upstream does not read stays closed (what the client may send
    is bounded), while another stream on the same connection uploads and completes."""
    slow = scripted_origin(connections=[[Pause(6.0)]])
    config = h2c_config([origin.address])
    config["upstreams"]["slow"] = {"targets": [{"address": slow.address}]}
    config["routes"].insert(0, {"name": "slow", "match": {"path": "/slow"}, "upstream": "slow"})
    gw = gateway(config)
    with RawH2(gw.port, timeout=10) as client:
        client.conn.increment_flow_control_window(2**30)  # irrelevant to the client's sending
        stalled = client.request("/slow", "POST", end=False)
        chunk = b"s" * 16384
        sent = 0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            window = min(client.conn.local_flow_control_window(stalled), 1 << 20)
            while window >= len(chunk):
                client.conn.send_data(stalled, chunk)
                sent += len(chunk)
                window -= len(chunk)
            client.flush()
            client.read(0.05)
        other = client.request("/up", "POST", end=False)
        body = b"u" * (2 * 1024 * 1024)
        offset = 0
        while offset < len(body):
            window = client.conn.local_flow_control_window(other)
            if window <= 0:
                client.read(0.05)
                continue
            piece = body[offset : offset + min(window, 16384)]
            client.conn.send_data(other, piece)
            offset += len(piece)
            client.flush()
        client.conn.end_stream(other)
        client.flush()
        status, _, reply = client.response(other)
        assert status == 200 and json.loads(reply)["body_bytes"] == len(body)
        # Kernel buffers and one window at most: far less than 3 s of loopback speed.
        assert sent < 24 * 1024 * 1024, sent
        assert not client.of(h2_events.StreamEnded, stalled)


# --- streaming: nothing waits for a whole body (gRPC streams) -------------------------------


def test_response_chunks_are_relayed_as_they_come(gateway, scripted_origin):
    origin = scripted_origin(
        reply=[
            Write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"),
            Pause(5.0),
            Write(b"6\r\nsecond\r\n0\r\n\r\n"),
        ]
    )
    gw = gateway(h2c_config([origin.address]))
    with RawH2(gw.port, timeout=10) as client:
        stream = client.request("/stream")
        client.until(lambda: client.of(h2_events.DataReceived, stream))
        assert b"".join(e.data for e in client.of(h2_events.DataReceived, stream)) == b"first"
        assert not client.of(h2_events.StreamEnded, stream)  # the origin has not sent the rest yet
        assert client.response(stream)[2] == b"firstsecond"


def test_request_chunks_reach_the_origin_before_the_body_ends(gateway):
    """A tiny origin that answers as soon as the first piece of the body arrives: the client
    gets that answer while its own request is still open."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    seen = bytearray()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            while b"first" not in seen:
                data = conn.recv(65536)
                if not data:
                    return
                seen.extend(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ngot")
            with contextlib.suppress(OSError):
                while conn.recv(65536):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        gw = gateway(h2c_config([f"127.0.0.1:{listener.getsockname()[1]}"]))
        with RawH2(gw.port, timeout=10) as client:
            stream = client.request("/upload", "POST", extra=[(b"te", b"trailers")], end=False)
            client.conn.send_data(stream, b"first")
            client.flush()
            status, _, body = client.response(stream)
            assert (status, body) == (200, b"got")
        assert b"transfer-encoding: chunked" in bytes(seen).lower()
    finally:
        listener.close()


def test_an_interim_response_reaches_the_client_before_the_final_one(gateway, scripted_origin):
    origin = scripted_origin(
        reply=[Write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + http_response(200, b"ok"))]
    )
    gw = gateway(h2c_config([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.request("/hints")
        status, _, body = client.response(stream)
        (hint,) = client.of(h2_events.InformationalResponseReceived, stream)
    assert dict(hint.headers)[b":status"] == b"103" and (status, body) == (200, b"ok")


def test_a_client_that_does_not_read_its_socket_holds_bounded_memory_then_is_cut(gateway, origin):
    config = h2c_config([origin.address])
    config["listeners"][0]["timeouts"] = {"send": "1s"}
    gw = gateway(config)
    with RawH2(gw.port, settings={4: 2**31 - 1}) as client:  # windows wide open, then no reading at all
        client.conn.increment_flow_control_window(2**30)
        streams = [client.request(f"/bytes/{20 * 1024 * 1024}") for _ in range(4)]
        client.flush()
        time.sleep(0.5)
        held = gw.call(_h2_statistics(gw))
        assert held, "no HTTP/2 connection"
        # Each stream holds at most its 64 KB plus one upstream read; the socket buffer 64 KB
        # plus one flush (what the kernel took is not counted here).
        assert held[0]["buffered_bytes"] <= 4 * (64 + 256) * 1024
        assert held[0]["unsent_bytes"] <= 512 * 1024
        deadline = time.monotonic() + 8
        while gw.call(_h2_statistics(gw)) and time.monotonic() < deadline:  # still not reading
            time.sleep(0.1)
        assert not gw.call(_h2_statistics(gw)), "the send timeout did not cut the connection"
        assert len(streams) == 4


class Hold(Plugin):
    """Keeps a request in the plugin phase (no upstream yet) for half a second."""

    name = "hold"
    Config = PluginConfig

    async def on_request(self, ctx: Context) -> Reply | None:
        await asyncio.sleep(0.5)
        return None


def test_a_stream_without_its_upstream_yet_when_the_client_stops_reading_is_held_too(gateway, origin):
    """The connection fills up while another stream has no upstream connection yet (still in
    its plugins): that stream's upstream must be held from its first byte, not left to pour
    its response into the stream's buffer."""
    config = h2c_config([origin.address])
    hold = {"name": "held", "match": {"path": "/held/"}, "upstream": "app", "strip_prefix": "/held"}
    hold["plugins"] = [{"python": {"module": f"{__name__}:Hold"}}]
    config["routes"].insert(0, hold)
    gw = gateway(config)
    big = 20 * 1024 * 1024
    with RawH2(gw.port, settings={4: 2**31 - 1}) as client:
        client.conn.increment_flow_control_window(2**30)
        client.request(f"/held/bytes/{big}")  # in its plugin for 0.5 s: no upstream yet
        client.request(f"/bytes/{big}")  # fills the socket: the client is paused for every stream
        client.flush()
        time.sleep(1.2)  # the held stream has its upstream now, and its response is under way
        held = gw.call(_h2_statistics(gw))
        assert held[0]["buffered_bytes"] <= 2 * (64 + 256) * 1024


async def _h2_statistics(gw: GatewayThread) -> list[dict[str, Any]]:
    return [conn.statistics() for conn in gw.gateway.connections if hasattr(conn, "streams")]


def test_a_response_head_larger_than_a_frame_is_split_into_continuation_frames(gateway, scripted_origin):
    big = "v" * 40_000
    origin = scripted_origin(reply=[Write(http_response(200, b"ok", ("X-Big", big)))])
    gw = gateway(h2c_config([origin.address]))
    with RawH2(gw.port) as client:
        status, headers, body = client.response(client.request("/big"))
    assert (status, body, headers[b"x-big"]) == (200, b"ok", big.encode())


def test_http1_keeps_working_on_a_prior_knowledge_listener(gateway, origin):
    gw = gateway(h2c_config([origin.address]))
    with httpx.Client(base_url=f"http://127.0.0.1:{gw.port}", timeout=10) as client:
        first = client.get("/one")
        posted = client.post("/two", content=b"b" * 500_000)  # many reads after the hand-over
        third = client.get("/three")
    assert [r.http_version for r in (first, posted, third)] == ["HTTP/1.1"] * 3
    assert [r.status_code for r in (first, posted, third)] == [200] * 3
    assert posted.json()["body_bytes"] == 500_000


def test_max_requests_per_connection_ends_an_http2_connection_gracefully(gateway, origin):
    config = h2c_config([origin.address])
    config["listeners"][0]["limits"] = {"max_requests_per_connection": 2}
    gw = gateway(config)
    with RawH2(gw.port) as client:
        assert client.response(client.request("/1"))[0] == 200
        second = client.request("/2")
        assert client.response(second)[0] == 200
        goaway = client.until(client.goaway)
        assert (goaway.error_code, goaway.last_stream_id) == (0, second)
        client.wait_closed()


def test_a_grpc_client_call_passes_through_to_an_origin_that_answers_with_trailers(gateway, scripted_origin):
    """A real gRPC client (grpcio, cleartext HTTP/2 with prior knowledge) through the gateway to
    an HTTP/1.1 origin that frames a gRPC answer: te: trailers goes up, grpc-status comes back
    in trailers, the length-prefixed messages pass untouched."""
    grpc = pytest.importorskip("grpc")
    answer = b"\x00\x00\x00\x00\x05world"

    def reply(request: Request) -> list[Step]:
        chunk = b"%x\r\n%s\r\n" % (len(answer), answer)
        return [
            Write(b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk),
            Write(b"0\r\ngrpc-status: 0\r\ngrpc-message: \r\n\r\n"),
        ]

    origin = scripted_origin(reply=reply)
    gw = gateway(h2c_config([origin.address]))
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
        call = channel.unary_unary("/demo.Greeter/Hello", request_serializer=None, response_deserializer=None)
        assert call(b"hello", timeout=10) == b"world"
    (seen,) = origin.requests
    assert seen.method == "POST" and seen.target == "/demo.Greeter/Hello"
    assert seen.header("te") == "trailers" and seen.header("content-type") == "application/grpc"
    assert seen.body == b"\x00\x00\x00\x00\x05hello"
