"""HTTP/2 clients that misbehave, each with raw frames: the gateway bounds what they cost and
ends what they abuse, and the connection's honest streams are not punished for a bad one."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import h2.events
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

from adversary import Pause, ReadRequest, Write, http_response
from bastion.demo.origin import OriginHandle
from h2_support import FrameClient, RawH2
from support import GatewayThread


def h2c(
    targets: list[str], limits: dict[str, Any] | None = None, timeouts: dict[str, Any] | None = None
) -> dict[str, Any]:
    listener: dict[str, Any] = {"name": "web", "bind": "127.0.0.1:PORT", "http2": "prior_knowledge"}
    if limits:
        listener["limits"] = limits
    if timeouts:
        listener["timeouts"] = timeouts
    return {
        "version": 1,
        "listeners": [listener],
        "upstreams": {"app": {"targets": [{"address": t} for t in targets]}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
        "log": {"access": False},
    }


@pytest.fixture
def origin(origins: Callable[..., OriginHandle]) -> OriginHandle:
    return origins("a")


GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"example.com")]


def statistics(gw: GatewayThread) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        return [conn.statistics() for conn in gw.gateway.connections if hasattr(conn, "streams")]

    return list(gw.call(collect()))


# --- rapid reset (CVE-2023-44487) ----------------------------------------------------------------


def test_rapid_reset_ends_the_connection_and_the_upstream_sees_no_flood(gateway, scripted_origin):
    origin = scripted_origin(reply=[Write(http_response(200, b"ok"))])
    gw = gateway(h2c([origin.address], limits={"h2_max_resets": 20}))
    with FrameClient(gw.port) as client:
        frames = []
        for i in range(200):
            stream_id = 2 * i + 1
            frames += [
                HeadersFrame(stream_id, data=client.block(GET), flags=["END_HEADERS", "END_STREAM"]),
                RstStreamFrame(stream_id, error_code=ErrorCodes.CANCEL),
            ]
        client.send(*frames)
        goaway = client.until(client.goaway)
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        client.wait_closed()
    time.sleep(0.3)
    # Cancelled in the read that opened them: never started (one may straddle two reads).
    assert len(origin.requests) <= 2


def test_streams_reset_in_the_read_that_opened_them_never_reach_the_upstream(gateway, scripted_origin):
    origin = scripted_origin(reply=[Write(http_response(200, b"ok"))])
    gw = gateway(h2c([origin.address], limits={"h2_max_resets": 1000}))
    cancelled = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/cancelled"), GET[3]]
    with FrameClient(gw.port) as raw:
        burst = []
        for i in range(50):
            stream_id = 2 * i + 1
            burst += [
                HeadersFrame(stream_id, data=raw.block(cancelled), flags=["END_HEADERS", "END_STREAM"]),
                RstStreamFrame(stream_id, error_code=ErrorCodes.CANCEL),
            ]
        raw.send(*burst)
        raw.headers(101, [*GET[:2], (b":path", b"/last"), GET[3]])
        raw.until(lambda: raw.of(HeadersFrame, 101))
        assert raw.goaway() is None
    assert [r.target for r in origin.requests if r.target != "/cancelled"] == ["/last"]
    assert len([r for r in origin.requests if r.target == "/cancelled"]) <= 2  # one may straddle two reads


def test_a_reset_stream_cancels_the_work_already_started(gateway, scripted_origin, tmp_path):
    origin = scripted_origin(reply=[Pause(5.0), Write(http_response(200, b"late"))])
    config = h2c([origin.address])
    log_file = tmp_path / "access.log"
    config["log"] = {"access": True, "access_file": str(log_file)}
    gw = gateway(config)
    with RawH2(gw.port) as client:
        stream = client.request("/slow")
        client.until(lambda: origin.requests)
        client.conn.reset_stream(stream, ErrorCodes.CANCEL)
        client.flush()
        # The exchange ends now (499, its upstream connection cut), not when the origin answers.
        deadline = time.monotonic() + 3
        lines: list[dict[str, Any]] = []
        while not lines and time.monotonic() < deadline:
            time.sleep(0.05)
            lines = [json.loads(line) for line in log_file.read_text().splitlines() if line]
        assert [(line["path"], line["status"]) for line in lines] == [("/slow", 499)]
        pools = gw.call(_pool_sizes(gw))
        assert pools == [0]
        # The connection itself goes on.
        other = client.request("/after")
        assert client.response(other, timeout=8)[0] in (200, 502)


async def _pool_sizes(gw: GatewayThread) -> list[int]:
    return [state.pool.statistics()["open"] for state in gw.gateway.registry.targets.values()]


# --- header blocks: CONTINUATION flood, HPACK bomb ------------------------------------------------


def test_a_continuation_flood_is_a_connection_error_before_it_grows(gateway, origin):
    gw = gateway(h2c([origin.address], limits={"max_header_bytes": "8KB"}))
    with FrameClient(gw.port) as client:
        client.send(HeadersFrame(1, data=client.block(GET)))  # no END_HEADERS: a block starts
        filler = b"\x00" * 1024
        sent = 0
        for _ in range(200):  # 200 KB of a block that never ends
            try:
                client.send(ContinuationFrame(1, data=filler))
            except OSError:
                break
            sent += 1
        goaway = client.until(client.goaway)
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        client.wait_closed()
    assert sent < 200 or goaway is not None


def test_too_many_continuation_frames_end_the_connection(gateway, origin):
    gw = gateway(h2c([origin.address]))
    with FrameClient(gw.port) as client:
        block = client.block(GET)
        client.send(HeadersFrame(1, data=block[:1]))
        client.send(*(ContinuationFrame(1, data=b"") for _ in range(100)))  # empty: only h2's count stops them
        goaway = client.until(client.goaway)
        assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
        client.wait_closed()


def test_an_hpack_bomb_is_stopped_at_the_header_list_limit(gateway, origin):
    gw = gateway(h2c([origin.address], limits={"max_header_bytes": "16KB"}))
    with FrameClient(gw.port) as client:
        big = (b"x-big", b"a" * 3000)
        block = client.block([*GET, big, *([big] * 12)])  # 39 KB decoded from about 3 KB (h2's own cap: 64 KB)
        assert len(block) < 4096
        client.send(HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]))
        goaway = client.until(client.goaway)
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        client.wait_closed()


# --- control frame floods -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_a_control_frame_flood_ends_the_connection(gateway, origin, kind):
    gw = gateway(h2c([origin.address], limits={"h2_max_control_frames": 50}))
    with FrameClient(gw.port) as client:
        frame = PingFrame(0, opaque_data=b"12345678") if kind == "ping" else SettingsFrame(0, settings={4: 65535})
        client.send(*([frame] * 60))
        goaway = client.until(client.goaway)
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        client.wait_closed()


def test_a_client_that_never_reads_its_ping_acks_is_cut(gateway, origin):
    gw = gateway(h2c([origin.address]))
    with FrameClient(gw.port) as client:
        client.sock.settimeout(5)
        ping = PingFrame(0, opaque_data=b"12345678").serialize()
        try:
            for _ in range(50):
                client.sock.sendall(ping * 2000)  # never reads an ack
        except OSError:
            pass  # cut by the gateway: what this test wants
        client.wait_closed()
        assert client.goaway() is None or client.goaway().error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_the_control_budget_refills_for_a_client_that_pings_now_and_then(gateway, origin):
    gw = gateway(h2c([origin.address], limits={"h2_max_control_frames": 10}))
    with RawH2(gw.port) as client:
        for i in range(12):
            client.conn.ping(b"%08d" % i)
            client.flush()
            time.sleep(0.12)  # 10 per 10 s: one every second would be fine, a burst of 12 not
            if i % 4 == 3:
                time.sleep(1.0)
        client.until(lambda: len(client.of(h2.events.PingAckReceived)) == 12)
        assert client.goaway() is None


# --- windows and half-open streams ---------------------------------------------------------------


def test_a_client_that_never_opens_its_window_is_reset_by_the_send_timeout(gateway, origin):
    gw = gateway(h2c([origin.address], timeouts={"send": "600ms"}))
    with RawH2(gw.port, settings={4: 0}, auto_ack=False) as client:  # INITIAL_WINDOW_SIZE 0
        stream = client.request(f"/bytes/{8 * 1024 * 1024}")
        client.until(lambda: client.of(h2.events.ResponseReceived, stream))
        time.sleep(0.3)
        held = statistics(gw)
        assert held and held[0]["buffered_bytes"] <= 64 * 1024 + 256 * 1024  # the upstream paused
        (reset,) = client.until(lambda: client.of(h2.events.StreamReset, stream), timeout=5)
        assert reset.error_code == ErrorCodes.CANCEL
        assert statistics(gw)[0]["streams"] == 0


def test_a_half_open_stream_ends_by_the_body_timeout(gateway, origin):
    gw = gateway(h2c([origin.address], timeouts={"body": "400ms"}))
    with RawH2(gw.port) as client:
        stream = client.request("/upload", "POST", end=False)
        client.conn.send_data(stream, b"part of a body")
        client.flush()
        status, _, body = client.response(stream, timeout=5)
        assert status == 400 and b"too slowly" in body
        # The stream's body is refused, the connection is not.
        assert client.response(client.request("/next"))[0] == 200


# --- RFC 9113 section 8 rules -----------------------------------------------------------------------

MALFORMED = {
    "no-path": [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.com")],
    "no-method": [(b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a.com")],
    "two-methods": [*GET, (b":method", b"POST")],
    "unknown-pseudo": [*GET, (b":foo", b"bar")],
    "pseudo-after-regular": [(b":method", b"GET"), (b"x-a", b"1"), (b":scheme", b"http"), (b":path", b"/")],
    "uppercase-name": [*GET, (b"X-Upper", b"1")],
    "connection": [*GET, (b"connection", b"keep-alive")],
    "keep-alive": [*GET, (b"keep-alive", b"5")],
    "transfer-encoding": [*GET, (b"transfer-encoding", b"chunked")],
    "upgrade": [*GET, (b"upgrade", b"websocket")],
    "te-gzip": [*GET, (b"te", b"gzip")],
    "extended-connect": [(b":method", b"CONNECT"), (b":protocol", b"websocket"), *GET[1:]],
    "newline-in-value": [*GET, (b"x-a", b"a\r\nx-b: 1")],
    "nul-in-value": [*GET, (b"x-a", b"a\x00b")],
    "space-around-value": [*GET, (b"x-a", b" padded")],
    "space-in-name": [*GET, (b"x a", b"1")],
    "path-not-origin-form": [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"a/b"), (b":authority", b"a")],
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_request_resets_only_its_stream(gateway, scripted_origin, name):
    origin = scripted_origin(reply=[Write(http_response(200, b"ok"))])
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream, MALFORMED[name], end_stream=True)
        client.flush()
        (reset,) = client.until(lambda: client.of(h2.events.StreamReset, stream))
        assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
        assert client.response(client.request("/fine"))[0] == 200
    assert [r.target for r in origin.requests] == ["/fine"]


def test_connect_is_refused_with_501(gateway, origin):
    gw = gateway(h2c([origin.address]))
    with RawH2(gw.port) as client:
        stream = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream, [(b":method", b"CONNECT"), (b":authority", b"db:5432")], end_stream=True)
        client.flush()
        status, _, body = client.response(stream)
    assert status == 501 and json.loads(body)["error"] == "not_implemented"


def test_bad_hosts_and_limits_answer_like_http1(gateway, origin):
    gw = gateway(h2c([origin.address], limits={"max_uri_bytes": "256", "max_headers": 5}))
    with RawH2(gw.port) as client:
        bad_host = client.request("/", authority=b"user@evil.com")
        long_path = client.request("/" + "a" * 300)
        many = client.request("/", extra=[(b"x-%d" % i, b"1") for i in range(6)])
        double_host = client.request("/", extra=[(b"host", b"a.com"), (b"host", b"b.com")])
        assert client.response(bad_host)[0] == 400
        assert client.response(long_path)[0] == 414
        assert client.response(many)[0] == 431
        assert client.response(double_host)[0] == 400


def test_a_content_length_the_data_does_not_match_is_refused(gateway, scripted_origin):
    origin = scripted_origin(reply=[ReadRequest(), Write(http_response(200, b"ok"))])
    gw = gateway(h2c([origin.address]))
    with FrameClient(gw.port) as client:
        client.headers(1, [(b":method", b"POST"), *GET[1:], (b"content-length", b"10")], end_stream=False)
        client.send(DataFrame(1, data=b"12345", flags=["END_STREAM"]))
        goaway = client.until(client.goaway)
        assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
        client.wait_closed()
    time.sleep(0.3)
    assert not [r for r in origin.requests if r.body == b"12345"]  # never a complete request upstream


def test_a_stream_over_the_concurrency_limit_is_refused_alone(gateway, scripted_origin):
    origin = scripted_origin(reply=[Pause(1.0), Write(http_response(200, b"ok"))])
    gw = gateway(h2c([origin.address], limits={"h2_max_concurrent_streams": 5}))
    with FrameClient(gw.port) as client:
        client.until(lambda: client.of(SettingsFrame))
        for stream_id in (1, 3, 5, 7, 9):
            client.headers(stream_id, GET)
        client.until(lambda: len(origin.requests) == 5)
        client.headers(11, GET)  # the sixth at once
        (refused,) = client.until(lambda: client.of(RstStreamFrame, 11))
        assert refused.error_code == ErrorCodes.REFUSED_STREAM
        client.until(lambda: len([f for f in client.of(DataFrame) if "END_STREAM" in f.flags]) == 5)
        client.headers(13, GET)  # room again
        client.until(lambda: [f for f in client.of(DataFrame, 13) if "END_STREAM" in f.flags])
        assert client.goaway() is None
    assert len(origin.requests) == 6


def test_opening_streams_over_the_limit_again_and_again_spends_the_reset_budget(gateway, scripted_origin):
    origin = scripted_origin(reply=[Pause(3.0), Write(http_response(200, b"ok"))])
    gw = gateway(h2c([origin.address], limits={"h2_max_concurrent_streams": 2, "h2_max_resets": 10}))
    with FrameClient(gw.port) as client:
        client.send(
            *(HeadersFrame(2 * i + 1, data=client.block(GET), flags=["END_HEADERS", "END_STREAM"]) for i in range(40))
        )
        goaway = client.until(client.goaway)
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_data_after_the_end_of_a_request_does_not_break_the_connection(gateway, scripted_origin):
    origin = scripted_origin(reply=[Pause(0.3), Write(http_response(200, b"ok"))])
    gw = gateway(h2c([origin.address]))
    with FrameClient(gw.port) as client:
        client.headers(1, GET)  # ended
        client.send(DataFrame(1, data=b"late", flags=["END_STREAM"]))  # a stream error (STREAM_CLOSED)
        client.until(lambda: client.of(RstStreamFrame, 1) or client.of(DataFrame, 1))
        client.headers(3, GET)
        client.until(lambda: [f for f in client.of(DataFrame, 3) if "END_STREAM" in f.flags], timeout=8)
        assert client.goaway() is None
    time.sleep(0.5)
    statistics_after = statistics(gw)
    assert all(entry["streams"] == 0 for entry in statistics_after)
