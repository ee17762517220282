"""OpenTelemetry tracing end to end: a client, the gateway, an origin, and an OTLP/HTTP receiver.

What is checked is what a collector and an origin see: the spans' ids, kinds, parents and
attributes, and the `traceparent` / `tracestate` the origin receives.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from otlp_support import CLIENT, SERVER, STATUS_ERROR, STATUS_UNSET, OtlpReceiver, ReceivedSpan
from support import free_port, request, send_fields, simple_config

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    handle = OtlpReceiver()
    yield handle
    handle.stop()


def tracing(receiver: OtlpReceiver, **extra: Any) -> dict[str, Any]:
    return {"otlp_endpoint": receiver.endpoint, "sample_ratio": 1.0, "batch_delay": "50ms", **extra}


def by_kind(spans: list[ReceivedSpan], kind: int) -> list[ReceivedSpan]:
    return [span for span in spans if span.kind == kind]


def split(traceparent: str) -> tuple[str, str, str, str]:
    version, trace_id, parent_id, flags = traceparent.split("-")
    return version, trace_id, parent_id, flags


def test_server_and_client_spans_continue_the_clients_trace(origins, gateway, receiver):
    origin = origins()
    config = simple_config(0, [origin.port], tracing=tracing(receiver, service_name="edge"))
    config["routes"][0]["match"] = {"path": "/items/{id}"}
    gw = gateway(config)
    reply = request(
        gw.port,
        path="/items/7?secret=1",
        headers={"traceparent": TRACEPARENT, "tracestate": "vendor=abc,other=x", "User-Agent": "probe/1"},
    )
    assert reply.status == 200
    seen = reply.json()["headers"]

    spans = receiver.wait_spans(2)
    (server,) = by_kind(spans, SERVER)
    (client,) = by_kind(spans, CLIENT)
    # One trace: the client's; the SERVER span's parent is the client's span, the CLIENT span's
    # parent the SERVER span; the origin is told the CLIENT span is its parent.
    assert server.trace_id == client.trace_id == TRACE_ID
    assert server.parent_span_id == PARENT_ID
    assert client.parent_span_id == server.span_id
    version, trace_id, parent_id, flags = split(seen["traceparent"])
    assert (version, trace_id, parent_id) == ("00", TRACE_ID, client.span_id)
    assert int(flags, 16) & 1 == 1
    assert seen["tracestate"] == "vendor=abc,other=x"

    assert server.name == "GET /items/{id}"
    assert server.status == STATUS_UNSET
    assert server.attributes["http.request.method"] == "GET"
    assert server.attributes["url.path"] == "/items/7"
    assert server.attributes["url.scheme"] == "http"
    assert server.attributes["http.route"] == "/items/{id}"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["server.address"] == "127.0.0.1"
    assert server.attributes["server.port"] == gw.port
    assert server.attributes["user_agent.original"] == "probe/1"
    assert server.attributes["client.address"] == "127.0.0.1"
    assert server.attributes["bastion.route"] == "all"
    assert server.attributes["bastion.upstream"] == "app"
    assert server.attributes["bastion.request_id"] == reply.header("X-Request-Id")
    assert "error.type" not in server.attributes

    assert client.name == "GET"
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["server.port"] == origin.port
    assert client.attributes["network.peer.address"] == "127.0.0.1"
    assert client.attributes["url.full"] == f"http://127.0.0.1:{origin.port}/items/7"  # no query
    assert client.attributes["http.response.status_code"] == 200
    assert client.attributes["bastion.upstream"] == "app"
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns
    assert server.resource["service.name"] == "edge"


def test_a_request_without_traceparent_starts_a_trace(origins, gateway, receiver):
    origin = origins()
    gw = gateway(targets=[origin.port], tracing=tracing(receiver))
    seen = request(gw.port, headers={"tracestate": "vendor=abc"}).json()["headers"]
    spans = receiver.wait_spans(2)
    (server,) = by_kind(spans, SERVER)
    (client,) = by_kind(spans, CLIENT)
    assert server.parent_span_id == ""
    _, trace_id, parent_id, _ = split(seen["traceparent"])
    assert (trace_id, parent_id) == (server.trace_id, client.span_id)
    assert "tracestate" not in seen  # no valid parent: its tracestate means nothing


@pytest.mark.parametrize(
    "bad",
    [
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # upper-case hex
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",  # version 00 has nothing more
        f"00-{TRACE_ID}-{PARENT_ID}",
        "garbage",
    ],
)
def test_an_invalid_traceparent_starts_a_new_trace(origins, gateway, receiver, bad):
    origin = origins()
    gw = gateway(targets=[origin.port], tracing=tracing(receiver))
    seen = request(gw.port, headers={"traceparent": bad, "tracestate": "vendor=abc"}).json()["headers"]
    spans = receiver.wait_spans(2)
    (server,) = by_kind(spans, SERVER)
    assert server.parent_span_id == ""
    assert server.trace_id not in (TRACE_ID, "0" * 32)
    assert isinstance(seen["traceparent"], str)  # one field: the gateway's, the client's is gone
    assert split(seen["traceparent"])[1] == server.trace_id
    assert "tracestate" not in seen


def test_two_traceparent_fields_start_a_new_trace(origins, gateway, receiver):
    origin = origins()
    gw = gateway(targets=[origin.port], tracing=tracing(receiver))
    other = f"00-{'1' * 32}-{PARENT_ID}-01"
    seen = send_fields(gw.port, [("traceparent", TRACEPARENT), ("traceparent", other)]).json()["headers"]
    (server,) = by_kind(receiver.wait_spans(2), SERVER)
    assert server.trace_id not in (TRACE_ID, "1" * 32)
    assert split(seen["traceparent"])[1] == server.trace_id


def test_a_later_traceparent_version_is_read_by_its_first_fields(origins, gateway, receiver):
    origin = origins()
    gw = gateway(targets=[origin.port], tracing=tracing(receiver))
    seen = request(gw.port, headers={"traceparent": f"01-{TRACE_ID}-{PARENT_ID}-01-future"}).json()["headers"]
    (server,) = by_kind(receiver.wait_spans(2), SERVER)
    assert (server.trace_id, server.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert seen["traceparent"].startswith(f"00-{TRACE_ID}-")


def test_sample_ratio_zero_exports_nothing_but_still_propagates(origins, gateway, receiver):
    origin = origins()
    gw = gateway(targets=[origin.port], tracing=tracing(receiver, sample_ratio=0))
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    fresh = request(gw.port).json()["headers"]
    continued = request(gw.port, headers={"traceparent": unsampled}).json()["headers"]
    gw.stop()  # stopping exports whatever is queued
    assert receiver.spans == []
    version, trace_id, parent_id, flags = split(fresh["traceparent"])
    assert version == "00"
    assert int(flags, 16) & 1 == 0 and trace_id != "0" * 32 and parent_id != "0" * 16
    _, trace_id, parent_id, flags = split(continued["traceparent"])
    assert trace_id == TRACE_ID and parent_id != PARENT_ID and int(flags, 16) & 1 == 0


def test_a_sampled_parent_is_followed_whatever_the_ratio(origins, gateway, receiver):
    origin = origins()
    gw = gateway(targets=[origin.port], tracing=tracing(receiver, sample_ratio=0))
    seen = request(gw.port, headers={"traceparent": TRACEPARENT}).json()["headers"]
    spans = receiver.wait_spans(2)
    assert {span.trace_id for span in spans} == {TRACE_ID}
    assert int(split(seen["traceparent"])[3], 16) & 1 == 1


def test_parent_based_off_lets_the_ratio_decide(origins, gateway, receiver):
    origin = origins()
    gw = gateway(targets=[origin.port], tracing=tracing(receiver, sample_ratio=0, parent_based=False))
    seen = request(gw.port, headers={"traceparent": TRACEPARENT}).json()["headers"]
    gw.stop()
    assert receiver.spans == []
    _, trace_id, _, flags = split(seen["traceparent"])
    assert trace_id == TRACE_ID and int(flags, 16) & 1 == 0


def test_without_tracing_trace_context_passes_through_untouched(origins, gateway):
    origin = origins()
    gw = gateway(targets=[origin.port])
    for traceparent in (TRACEPARENT, "not-a-traceparent"):
        seen = request(gw.port, headers={"traceparent": traceparent, "tracestate": "a=1"}).json()["headers"]
        assert seen["traceparent"] == traceparent
        assert seen["tracestate"] == "a=1"
    assert "traceparent" not in request(gw.port).json()["headers"]


def test_an_upstream_failure_marks_both_spans_as_errors(origins, gateway, receiver):
    origin = origins()
    gw = gateway(targets=[origin.port], tracing=tracing(receiver))
    reply = request(gw.port, path="/reset", headers={"traceparent": TRACEPARENT})
    assert reply.status == 502
    spans = receiver.wait_spans(2)
    (server,) = by_kind(spans, SERVER)
    clients = by_kind(spans, CLIENT)
    assert server.status == STATUS_ERROR
    assert server.attributes["http.response.status_code"] == 502
    assert server.attributes["error.type"] == reply.json()["error"]
    assert clients and all(span.status == STATUS_ERROR for span in clients)
    assert all(span.parent_span_id == server.span_id for span in clients)
    assert clients[-1].attributes["error.type"] == reply.json()["error"]
    assert "http.response.status_code" not in clients[-1].attributes


def test_an_upstream_5xx_is_an_error_on_both_spans(origins, gateway, receiver):
    origin = origins()
    gw = gateway(targets=[origin.port], tracing=tracing(receiver))
    assert request(gw.port, path="/status/503").status == 503
    spans = receiver.wait_spans(2)
    (server,) = by_kind(spans, SERVER)
    (client,) = by_kind(spans, CLIENT)
    assert server.status == client.status == STATUS_ERROR
    assert server.attributes["error.type"] == client.attributes["error.type"] == "503"
    # A 4xx is the client's error, not the server's: only the CLIENT span counts it.
    assert request(gw.port, path="/status/404").status == 404
    spans = receiver.wait_spans(4)[2:]
    (server,) = by_kind(spans, SERVER)
    (client,) = by_kind(spans, CLIENT)
    assert server.status == STATUS_UNSET and "error.type" not in server.attributes
    assert client.status == STATUS_ERROR and client.attributes["error.type"] == "404"


def test_each_attempt_has_its_client_span(origins, gateway, receiver):
    origin = origins()
    dead = free_port()  # nothing listens: the connection is refused
    config = simple_config(0, [dead, origin.port], tracing=tracing(receiver))
    config["upstreams"]["app"]["retries"] = {"attempts": 1}
    config["upstreams"]["app"]["balance"] = "round_robin"
    gw = gateway(config)
    # Round robin starts somewhere; ask until one request needed a retry.
    for _ in range(4):
        seen = request(gw.port).json()["headers"]
        spans = receiver.wait_spans(2)
        receiver.exports.clear()
        clients = by_kind(spans, CLIENT)
        if len(clients) == 2:
            break
    else:
        pytest.fail("no request was retried")
    (server,) = by_kind(spans, SERVER)
    refused, answered = sorted(clients, key=lambda span: span.start_ns)
    assert refused.parent_span_id == answered.parent_span_id == server.span_id
    assert refused.attributes["server.port"] == dead
    assert refused.attributes["error.type"] == "upstream_connect_failed"
    assert refused.status == STATUS_ERROR
    assert answered.attributes["http.request.resend_count"] == 1
    assert answered.status == STATUS_UNSET
    assert split(seen["traceparent"])[2] == answered.span_id
    assert server.status == STATUS_UNSET


def test_a_try_that_fails_after_sending_is_ended_as_an_error_before_the_retry(origins, gateway, receiver):
    a, b = origins("a"), origins("b")
    config = simple_config(0, [a.port, b.port], tracing=tracing(receiver))
    config["upstreams"]["app"]["retries"] = {"attempts": 1}
    gw = gateway(config)
    reply = request(gw.port, path="/reset")  # both targets reset the connection: tried, retried, 502
    assert reply.status == 502
    spans = receiver.wait_spans(3)
    (server,) = by_kind(spans, SERVER)
    first, second = sorted(by_kind(spans, CLIENT), key=lambda span: span.start_ns)
    assert {first.attributes["server.port"], second.attributes["server.port"]} == {a.port, b.port}
    for span in (first, second):
        assert span.status == STATUS_ERROR
        assert span.attributes["error.type"] == reply.json()["error"]
    assert first.end_ns <= second.start_ns
    assert second.attributes["http.request.resend_count"] == 1
    assert server.attributes["error.type"] == reply.json()["error"]


def test_gateway_errors_and_plugin_replies_get_a_server_span(origins, gateway, receiver):
    origin = origins()
    config = simple_config(0, [origin.port], tracing=tracing(receiver))
    config["routes"][0]["match"] = {"path": "/api"}
    gw = gateway(config)
    assert request(gw.port, path="/nowhere", headers={"traceparent": TRACEPARENT}).status == 404
    (server,) = receiver.wait_spans(1)
    assert server.kind == SERVER and server.parent_span_id == PARENT_ID
    assert server.name == "GET"
    assert server.attributes["http.response.status_code"] == 404
    assert server.attributes["bastion.error"] == "no_route"
    assert server.status == STATUS_UNSET
    assert "bastion.route" not in server.attributes


def test_spans_queued_at_stop_are_exported(origins, gateway, receiver):
    origin = origins()
    gw = gateway(targets=[origin.port], tracing=tracing(receiver, batch_delay="1h"))
    request(gw.port)
    gw.stop()
    assert len(receiver.spans) == 2


def test_export_settings_reach_the_collector(origins, gateway, receiver):
    origin = origins()
    settings = tracing(
        receiver,
        otlp_endpoint=receiver.endpoint + "/v1/traces",
        headers={"X-Api-Key": "k-123"},
        compression="gzip",
        resource_attributes={"deployment.environment.name": "test"},
    )
    gw = gateway(targets=[origin.port], tracing=settings)
    request(gw.port)
    spans = receiver.wait_spans(2)
    export = receiver.exports[0]
    assert export.headers["x-api-key"] == "k-123"
    assert export.headers["content-encoding"] == "gzip"
    assert spans[0].resource["deployment.environment.name"] == "test"
    assert spans[0].resource["service.name"] == "bastion"


def test_a_reload_applies_new_tracing_settings(origins, gateway, receiver, tmp_path):
    import yaml

    origin = origins()
    gw = gateway(targets=[origin.port], tracing=tracing(receiver, service_name="before"))
    request(gw.port)
    assert {span.resource["service.name"] for span in receiver.wait_spans(2)} == {"before"}
    config = yaml.safe_load(gw.config_path.read_text())
    config["tracing"]["service_name"] = "after"
    gw.config_path.write_text(yaml.safe_dump(config))
    assert gw.reload()
    request(gw.port)
    assert {span.resource["service.name"] for span in receiver.wait_spans(4)[2:]} == {"after"}
    # Tracing removed: trace context passes through again.
    del config["tracing"]
    gw.config_path.write_text(yaml.safe_dump(config))
    assert gw.reload()
    assert request(gw.port, headers={"traceparent": TRACEPARENT}).json()["headers"]["traceparent"] == TRACEPARENT


def test_a_websocket_client_span_lasts_as_long_as_the_relay(ws_origin, gateway, receiver):
    from ws_support import ws_connect

    origin = ws_origin()
    route = {"name": "chat", "match": {"path": "/"}, "upstream": "app", "websocket": True}
    gw = gateway(targets=[origin.port], routes=[route], tracing=tracing(receiver))
    with ws_connect(gw.port, headers={"traceparent": TRACEPARENT}) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
    spans = receiver.wait_spans(2)
    (server,) = by_kind(spans, SERVER)
    (client,) = by_kind(spans, CLIENT)
    assert server.trace_id == TRACE_ID and client.parent_span_id == server.span_id
    assert server.attributes["http.response.status_code"] == client.attributes["http.response.status_code"] == 101
    assert server.status == client.status == STATUS_UNSET
    (_, headers), *_ = origin.requests
    assert headers["traceparent"].split("-")[2] == client.span_id


def test_an_attempt_refused_before_it_has_a_connection_is_an_error(origins, gateway, receiver):
    origin = origins()
    config = simple_config(0, [origin.port], tracing=tracing(receiver))
    config["upstreams"]["app"]["max_connections"] = 1
    gw = gateway(config)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(request, gw.port, "GET", "/delay/3000")
        deadline = time.monotonic() + 10
        while origin.call(lambda: origin.origin.open_connections) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        reply = request(gw.port, path="/second")  # the one connection is busy: refused at once
        assert slow.result(15).status == 200
    assert reply.status == 503 and reply.json()["error"] == "upstream_overloaded"
    spans = receiver.wait_spans(4)
    (server,) = [span for span in by_kind(spans, SERVER) if span.attributes["url.path"] == "/second"]
    (client,) = [span for span in by_kind(spans, CLIENT) if span.parent_span_id == server.span_id]
    assert client.status == server.status == STATUS_ERROR
    assert client.attributes["error.type"] == server.attributes["error.type"] == "upstream_overloaded"
    assert "http.response.status_code" not in client.attributes


def test_workers_export_their_spans_and_flush_them_on_sigterm(origins, receiver, tmp_path):
    from support import GatewayProcess, write_config

    origin = origins()
    port = free_port()
    config = simple_config(port, [origin.port], tracing=tracing(receiver, batch_delay="1h"))
    proc = GatewayProcess(write_config(tmp_path / "gw.yaml", config), port, "--workers", "2")
    try:
        for _ in range(6):
            assert request(port, headers={"Connection": "close"}).status == 200
    finally:
        code, _, err = proc.stop()
    assert code == 0, err
    spans = receiver.wait_spans(12, timeout=5)  # nothing is exported before the stop: batch_delay is 1h
    assert len(by_kind(spans, SERVER)) == len(by_kind(spans, CLIENT)) == 6
    assert all(span.resource["service.instance.id"] for span in spans)
