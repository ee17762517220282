"""The admin listener of a real gateway on loopback: every endpoint as an operator uses it.

Metrics are read back with prometheus_client's parser and compared with exactly the requests
the test sent; drains are checked by where requests land (the origins' X-Origin header).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from lb_support import origin_of, wait_for
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

import bastion
from bastion.admin.api import ENDPOINTS
from bastion.demo.origin import OriginHandle
from bastion.observability import window
from support import GatewayThread, Reply, free_port, raw_exchange, request, write_config

TOKEN = "admin-token-for-tests-0123"
GET_PATHS = [
    "/metrics",
    "/healthz",
    "/readyz",
    "/status",
    "/routes",
    "/upstreams",
    "/stats",
    "/errors",
    "/config",
    "/openapi.json",
]
DASHBOARD_FILES = ["/", "/dashboard/dashboard.js", "/dashboard/dashboard.css"]


def config(port: int, admin_port: int, targets: list[str], **extra: Any) -> dict[str, Any]:
    """Routes: `api` (GET /api), `private` (key_auth), `limited` (2 per minute per IP)."""
    cfg: dict[str, Any] = {
        "version": 1,
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{port}"}],
        "upstreams": {"app": {"targets": [{"address": t} for t in targets]}},
        "routes": [
            {"name": "api", "match": {"path": "/api", "methods": ["GET"]}, "upstream": "app"},
            {"name": "private", "match": {"path": "/private"}, "upstream": "app", "plugins": [{"key_auth": {}}]},
            {
                "name": "limited",
                "match": {"path": "/limited"},
                "upstream": "app",
                "plugins": [{"rate_limit": {"limit": 2, "per": "1m", "key": "ip"}}],
            },
        ],
        "consumers": [{"name": "alice", "credentials": {"key_auth": [{"key": "alice-key-0001"}]}}],
        "admin": {"bind": f"127.0.0.1:{admin_port}"},
        "log": {"access": False},
    }
    cfg.update(extra)
    return cfg


class Admin:
    """A gateway with its admin listener, and a client for that listener."""

    def __init__(self, gw: GatewayThread, port: int, token: str | None = None) -> None:
        self.gw = gw
        self.port = port
        self.token = token

    def call(self, method: str, path: str, headers: dict[str, str] | None = None) -> Reply:
        sent = dict(headers or {})
        if self.token is not None:
            sent.setdefault("Authorization", f"Bearer {self.token}")
        return request(self.port, method, path, headers=sent)

    def get(self, path: str) -> Any:
        reply = self.call("GET", path)
        assert reply.status == 200, (path, reply.status, reply.body)
        return reply.json()

    def post(self, path: str) -> Reply:
        return self.call("POST", path)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        reply = self.call("GET", "/metrics")
        assert reply.status == 200
        assert reply.header("content-type") == "text/plain; version=0.0.4; charset=utf-8"
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(reply.body.decode())
            for s in family.samples
        }


@pytest.fixture
def admin_gateway(
    tmp_path: Path, origins: Callable[..., OriginHandle]
) -> Callable[..., tuple[Admin, list[OriginHandle], Path]]:
    started: list[GatewayThread] = []

    def start(count: int = 1, token: str | None = None, **extra: Any) -> tuple[Admin, list[OriginHandle], Path]:
        backends = [origins(name) for name in "ab"[:count]]
        port, admin_port = free_port(), free_port()
        cfg = config(port, admin_port, [b.address for b in backends], **extra)
        if token is not None:
            cfg["admin"]["token"] = token
        path = write_config(tmp_path / "gw.yaml", cfg)
        gw = GatewayThread(path, port)
        started.append(gw)
        return Admin(gw, admin_port, token), backends, path

    yield start
    for gw in started:
        gw.stop()


def total(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    return sum(
        value
        for (sample, sample_labels), value in metrics.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


# --- reading ---------------------------------------------------------------------------------------


def test_health_readiness_status_and_routes(admin_gateway: Callable[..., Any]) -> None:
    admin, _, path = admin_gateway()
    assert admin.get("/healthz") == {"status": "ok"}
    assert admin.get("/readyz") == {"ready": True, "workers_expected": 1, "workers_ready": 1}
    status = admin.get("/status")
    assert status["version"] == bastion.__version__
    assert status["config"]["source"] == f"file {path}"
    assert len(status["config"]["sha256"]) == 64
    assert status["ready"] is True and status["uptime_seconds"] >= 0
    assert [(w["index"], w["answered"], w["restarts"]) for w in status["workers"]] == [(0, True, 0)]
    assert status["reloads"] == {"applied": 0, "rejected": 0}
    routes = admin.get("/routes")["routes"]
    assert [r["name"] for r in routes] == ["private", "limited", "api"]  # match order: the shorter prefix last
    assert routes[2] == {
        "order": 3,
        "name": "api",
        "hosts": [],
        "path": "/api",
        "path_kind": "prefix",
        "methods": ["GET"],
        "headers": {},
        "upstream": "app",
        "strip_prefix": None,
        "plugins": [],
    }
    assert routes[0]["plugins"] == ["key_auth"]


def test_readiness_turns_503_while_the_gateway_drains(admin_gateway: Callable[..., Any]) -> None:
    admin, _, _ = admin_gateway(routes=[{"name": "slow", "match": {"path": "/delay"}, "upstream": "app"}])
    statuses: list[int] = []
    slow = threading.Thread(target=lambda: statuses.append(request(admin.gw.port, "GET", "/delay/1500").status))
    slow.start()
    wait_for(lambda: total(admin.metrics(), "bastion_upstream_target_in_flight") == 1)
    stopping = asyncio.run_coroutine_threadsafe(admin.gw.gateway.shutdown(10), admin.gw.loop)
    wait_for(lambda: admin.call("GET", "/readyz").status == 503)  # still answering, not ready
    assert admin.call("GET", "/readyz").json()["ready"] is False
    assert admin.call("GET", "/healthz").status == 200
    stopping.result(10)
    slow.join(10)
    assert statuses == [200]
    assert _refused(admin.port)  # the admin listener closes last


def test_upstreams_show_every_target_with_its_live_state(admin_gateway: Callable[..., Any]) -> None:
    admin, (a, b), _ = admin_gateway(count=2)
    for _ in range(4):
        assert origin_of(admin.gw.port, "/api")[0] == 200
    (upstream,) = admin.get("/upstreams")["upstreams"]
    assert upstream["name"] == "app" and upstream["balance"] == "round_robin"
    targets = {t["address"]: t for t in upstream["targets"]}
    assert set(targets) == {a.address, b.address}
    for target in targets.values():
        assert (target["up"], target["healthy"], target["drained"], target["ejected"]) == (True, True, False, False)
        assert target["requests"] == 2 and target["in_flight"] == 0 and target["ejections"] == 0
        assert target["latency_ewma_ms"] > 0
        assert target["pool"]["opened_total"] >= 1


def test_metrics_count_exactly_the_requests_sent(admin_gateway: Callable[..., Any]) -> None:
    admin, _, _ = admin_gateway()
    port = admin.gw.port
    before = admin.metrics()
    assert total(before, "bastion_http_requests_total") == 0
    sent: Counter[tuple[str, str, int]] = Counter()

    def send(method: str, path: str, expect: int, route: str, headers: dict[str, str] | None = None) -> None:
        assert request(port, method, path, headers=headers).status == expect
        sent[(route, method, expect)] += 1

    for _ in range(5):
        send("GET", "/api/x", 200, "api")
    send("POST", "/api/x", 405, "(none)")
    send("GET", "/nowhere", 404, "(none)")
    send("GET", "/private", 401, "private")
    send("GET", "/private", 401, "private")
    send("GET", "/private", 200, "private", {"X-Api-Key": "alice-key-0001"})
    for expect in (200, 200, 429, 429):
        send("GET", "/limited", expect, "limited")

    after = admin.metrics()
    for (route, method, code), count in sent.items():
        labels = {"route": route, "method": method, "code": str(code)}
        assert total(after, "bastion_http_requests_total", **labels) == count, labels
    assert total(after, "bastion_http_requests_total") == sum(sent.values())
    assert total(after, "bastion_http_request_duration_seconds_count", route="api") == 5
    assert total(after, "bastion_http_request_duration_seconds_bucket", route="api", le="+Inf") == 5
    assert total(after, "bastion_rate_limited_total", route="limited") == 2
    assert total(after, "bastion_auth_refused_total", route="private", code="401") == 2
    upstream_answers = 5 + 1 + 2  # requests that reached the origin
    assert total(after, "bastion_upstream_target_responses_total", upstream="app") == upstream_answers
    assert total(after, "bastion_upstream_request_duration_seconds_count", upstream="app") == upstream_answers
    assert total(after, "bastion_upstream_target_requests_total", upstream="app") == upstream_answers
    assert total(after, "bastion_upstream_target_up", upstream="app") == 1
    assert total(after, "bastion_config_reloads_total", result="applied") == 0
    assert ("bastion_connections_active", (("listener", "web"),)) in after
    assert total(after, "bastion_config_info") == 1

    for _ in range(3):  # and they move by exactly what is sent next
        send("GET", "/api", 200, "api")
    again = admin.metrics()
    assert total(again, "bastion_http_requests_total") - total(after, "bastion_http_requests_total") == 3


def test_open_client_connections_are_gauged_per_listener(admin_gateway: Callable[..., Any]) -> None:
    admin, _, _ = admin_gateway()
    held = [socket.create_connection(("127.0.0.1", admin.gw.port)) for _ in range(3)]
    try:
        wait_for(lambda: total(admin.metrics(), "bastion_connections_active", listener="web") == 3)
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: total(admin.metrics(), "bastion_connections_active", listener="web") == 0)


def test_config_shows_the_running_config_with_secrets_masked(
    admin_gateway: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = free_port()  # Redis "unreachable": the gateway starts anyway, with a warning
    admin, _, _ = admin_gateway(
        token=TOKEN,
        plugins=[{"jwt": {"secret": "jwt-secret-jwt-secret-jwt-secret-42", "algorithms": ["HS256"]}}],
        consumers=[
            {
                "name": "alice",
                "credentials": {
                    "key_auth": [{"key": "alice-key-0001"}],
                    "basic_auth": [{"username": "alice", "password_hash": "$2b$12$" + "x" * 53}],
                    "jwt": [{"subject": "alice"}],
                },
            }
        ],
        cluster={"redis": f"redis://default:redis-password-7@127.0.0.1:{closed}/0", "timeout": "100ms"},
    )
    reply = admin.call("GET", "/config")
    assert reply.status == 200
    text = reply.body.decode()
    for secret in (TOKEN, "jwt-secret-jwt-secret", "alice-key-0001", "$2b$12$", "redis-password-7"):
        assert secret not in text
    shown = json.loads(text)
    assert shown["admin"]["token"] == "<redacted>"
    assert shown["cluster"]["redis"] == f"redis://default:***@127.0.0.1:{closed}/0"
    assert shown["plugins"][0]["jwt"]["secret"] == "<redacted>"
    credentials = shown["consumers"][0]["credentials"]
    assert credentials["key_auth"][0]["key"] == "<redacted>"
    assert credentials["basic_auth"][0] == {"username": "alice", "password_hash": "<redacted>"}
    assert shown["routes"][0]["name"] == "api"  # the rest is there, defaults filled in
    assert shown["upstreams"]["app"]["timeouts"]["connect"] == "5000ms"


def test_openapi_document_is_valid_and_describes_every_endpoint(admin_gateway: Callable[..., Any]) -> None:
    admin, _, _ = admin_gateway()
    doc = admin.get("/openapi.json")
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    for verb, pattern, _ in ENDPOINTS:
        assert verb.lower() in doc["paths"]["/" + "/".join(pattern)]


def test_dashboard_files_have_fixed_types_and_a_policy_that_keeps_the_page_on_this_listener(
    admin_gateway: Callable[..., Any],
) -> None:
    admin, _, _ = admin_gateway()
    for path, kind in [
        ("/", "text/html; charset=utf-8"),
        ("/dashboard/index.html", "text/html; charset=utf-8"),
        ("/dashboard/dashboard.js", "text/javascript; charset=utf-8"),
        ("/dashboard/dashboard.css", "text/css; charset=utf-8"),
    ]:
        reply = admin.call("GET", path)
        assert reply.status == 200, path
        assert reply.header("content-type") == kind, path
        policy = reply.header("content-security-policy") or ""
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert reply.header("x-content-type-options") == "nosniff"
    page = admin.call("GET", "/").body
    assert b'src="dashboard/dashboard.js"' in page and b'href="dashboard/dashboard.css"' in page
    assert admin.call("GET", "/dashboard/..%2Fapi.py").status == 404
    assert admin.call("GET", "/dashboard/nothing-here.js").status == 404
    assert admin.call("GET", "/dashboard/__init__.py").status == 404  # only the dashboard's own kinds


def test_dashboard_files_name_no_other_host() -> None:
    """No CDN, no web font, no analytics: the only absolute URL is the SVG namespace name."""
    folder = Path(bastion.__file__).parent / "admin" / "dashboard"
    files = sorted(folder.iterdir())
    assert {f.name for f in files} == {"index.html", "dashboard.css", "dashboard.js"}
    for file in files:
        text = file.read_text()
        urls = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text)
        assert set(urls) <= {"http://www.w3.org/2000/svg"}, (file.name, urls)
        assert "@import" not in text and "integrity=" not in text


def test_stats_show_the_recent_traffic_per_route(admin_gateway: Callable[..., Any]) -> None:
    admin, _, _ = admin_gateway()
    port = admin.gw.port
    for _ in range(5):
        assert request(port, "GET", "/api/x").status == 200
    for _ in range(2):
        assert request(port, "GET", "/private").status == 401
    assert request(port, "GET", "/nowhere").status == 404
    stats = admin.get("/stats")
    assert stats["window_seconds"] == 60 and stats["interval_seconds"] == 10
    assert 0 < stats["covered_seconds"] <= 60
    rows = {row["route"]: row for row in stats["routes"]}
    assert set(rows) == {"api", "private", "(none)"}
    api = rows["api"]
    assert api["requests"] == 5 and api["status"]["2xx"] == 5
    assert api["requests_per_second"] > 0
    assert 0 < api["latency_ms"]["p50"] <= api["latency_ms"]["p99"] < 10_000
    assert rows["private"]["status"]["4xx"] == 2 and rows["(none)"]["status"]["4xx"] == 1
    assert stats["total"]["requests"] == 8
    assert stats["routes"][0]["route"] == "api"  # busiest first
    assert admin.get("/stats?window=5m")["window_seconds"] == 300
    for bad in ("2s", "10m", "soon", ""):
        reply = admin.call("GET", f"/stats?window={bad}")
        assert reply.status == 400, bad
        assert reply.json()["error"] == "bad_request" and "10s to 5m" in reply.json()["message"]


def test_stats_are_sampled_every_interval_into_a_series(
    admin_gateway: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(window, "INTERVAL", 0.25)  # not 10 s: the sampler is seen at work quickly
    admin, _, _ = admin_gateway()
    for _ in range(3):
        assert request(admin.gw.port, "GET", "/api").status == 200

    def series() -> list[dict[str, Any]]:
        rows = admin.get("/stats?window=10s")["routes"]
        return list(rows[0]["series"]) if rows else []

    wait_for(lambda: len(series()) >= 3 and sum(point["requests"] for point in series()) == 3)
    points = series()
    # Each point covers one interval (a sample may run a few ms late: never a second interval).
    assert all(0 < point["seconds"] < 0.5 for point in points), points
    assert [point["at"] for point in points] == sorted({point["at"] for point in points})
    assert admin.get("/stats")["interval_seconds"] == 0.25


def test_errors_list_recent_server_errors_newest_first(admin_gateway: Callable[..., Any]) -> None:
    closed = free_port()
    admin, (a,), _ = admin_gateway()
    cfg_path = admin.gw.config_path
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["upstreams"]["nowhere"] = {"targets": [{"address": f"127.0.0.1:{closed}"}]}
    cfg["routes"].append({"name": "broken", "match": {"path": "/broken"}, "upstream": "nowhere"})
    cfg["routes"].append({"name": "statuses", "match": {"path": "/status"}, "upstream": "app"})
    write_config(cfg_path, cfg)
    assert admin.post("/reload").status == 200
    port = admin.gw.port
    assert admin.get("/errors") == {"errors": [], "kept": 100, "seen": 0}
    assert request(port, "GET", "/nowhere").status == 404  # 4xx: counted, not listed
    assert request(port, "GET", "/private").status == 401
    refused = request(port, "GET", "/broken/x?apikey=secret-in-query")
    assert refused.status == 502
    upstream_500 = request(port, "GET", "/status/500")
    assert upstream_500.status == 500
    listed = admin.get("/errors")
    assert listed["seen"] == 2
    newest, oldest = listed["errors"]
    assert newest["request_id"] == upstream_500.header("x-request-id")
    assert (newest["status"], newest["source"], newest["error"]) == (500, "upstream", None)
    assert (newest["route"], newest["target"]) == ("statuses", a.address)
    assert oldest["request_id"] == refused.header("x-request-id")
    assert (oldest["status"], oldest["source"]) == (502, "gateway")
    assert oldest["error"] == refused.json()["error"]
    assert (oldest["route"], oldest["upstream"], oldest["target"]) == ("broken", "nowhere", f"127.0.0.1:{closed}")
    assert (oldest["method"], oldest["path"]) == ("GET", "/broken/x")  # the query is not kept
    assert "secret-in-query" not in json.dumps(listed)


def test_unknown_paths_and_wrong_methods_get_json_errors(admin_gateway: Callable[..., Any]) -> None:
    admin, _, _ = admin_gateway()
    missing = admin.call("GET", "/nope")
    assert missing.status == 404
    body = missing.json()
    assert body["error"] == "not_found" and body["request_id"] == missing.header("x-request-id")
    wrong = admin.call("GET", "/reload")
    assert wrong.status == 405 and wrong.header("allow") == "POST"
    assert wrong.json()["error"] == "method_not_allowed"
    also_wrong = admin.call("DELETE", "/status")
    assert also_wrong.status == 405 and also_wrong.header("allow") == "GET, HEAD"
    head = admin.call("HEAD", "/status")
    assert head.status == 200 and head.body == b"" and int(head.header("content-length") or 0) > 0
    garbage = raw_exchange(admin.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 ")
    huge = raw_exchange(admin.port, b"GET /status HTTP/1.1\r\nX-Big: " + b"x" * 20000 + b"\r\n\r\n")
    assert huge.startswith(b"HTTP/1.1 431 ") and b'"headers_too_large"' in huge


def test_keep_alive_and_pipelined_admin_requests_are_answered_in_order(admin_gateway: Callable[..., Any]) -> None:
    admin, _, _ = admin_gateway()
    data = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\nGET /nope HTTP/1.1\r\nHost: localhost\r\n"
    data += b"Connection: close\r\n\r\n"
    answer = raw_exchange(admin.port, data)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.index(b"HTTP/1.1 404 ") > answer.index(b'"status": "ok"')


# --- pages in a browser -----------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, TOKEN])
def test_a_page_that_rebinds_its_name_to_the_admin_address_is_refused(
    admin_gateway: Callable[..., Any], token: str | None
) -> None:
    """DNS rebinding: evil.example resolves to 127.0.0.1, and the browser sends its name."""
    admin, _, _ = admin_gateway(token=token)
    port = admin.port
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "localhost.evil", "[::1"):
        for method, path in (("GET", "/config"), ("GET", "/"), ("POST", "/reload")):
            reply = admin.call(method, path, headers={"Host": host})
            assert reply.status == 403, (host, path)
            body = reply.json()
            assert body["error"] == "host_forbidden" and "DNS rebinding" in body["message"]
            assert body["request_id"] == reply.header("x-request-id")
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST.", "127.0.0.1"):
        assert admin.call("GET", "/config", headers={"Host": host}).status == 200, host
    assert admin.get("/status")["reloads"] == {"applied": 0, "rejected": 0}


def test_a_post_from_another_site_is_refused(admin_gateway: Callable[..., Any]) -> None:
    """CSRF: any page can make the browser POST here; the browser says where the page is from."""
    admin, (a,), _ = admin_gateway()
    port = admin.port
    drain = f"/upstreams/app/targets/{a.address}/drain"
    for origin in (
        "http://evil.example",
        f"http://evil.example:{port}",
        "null",
        f"https://127.0.0.1:{port}",
        f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}",
        f"http://localhost:{port}",  # the request's Host is 127.0.0.1: another origin
    ):
        for path in ("/reload", drain):
            reply = admin.call("POST", path, headers={"Origin": origin})
            assert reply.status == 403, (origin, path)
            assert reply.json()["error"] == "origin_forbidden"
    assert admin.get("/status")["reloads"] == {"applied": 0, "rejected": 0}
    assert admin.get("/upstreams")["upstreams"][0]["targets"][0]["drained"] is False
    # Reading with a foreign Origin is not refused (the browser keeps the answer from the page).
    assert admin.call("GET", "/status", headers={"Origin": "http://evil.example"}).status == 200

    assert admin.call("POST", "/reload", headers={"Origin": f"http://127.0.0.1:{port}"}).status == 200  # its own
    assert admin.post(drain).status == 200  # curl and scripts send no Origin
    assert admin.get("/status")["reloads"]["applied"] == 1


# --- the token ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*GET_PATHS, "/no-such-path"])
def test_with_a_token_every_endpoint_answers_401_without_it(admin_gateway: Callable[..., Any], path: str) -> None:
    admin, _, _ = admin_gateway(token=TOKEN)
    for headers in ({}, {"Authorization": "Bearer not-the-token-at-all"}, {"Authorization": f"Basic {TOKEN}"}):
        reply = request(admin.port, "GET", path, headers=headers)
        assert reply.status == 401, (path, headers)
        assert reply.header("www-authenticate") == 'Bearer realm="bastion admin"'
        assert reply.json()["error"] == "unauthorized"
    if path != "/no-such-path":
        assert admin.call("GET", path).status == 200


def test_with_a_token_the_dashboard_files_load_without_it_and_hold_no_data(
    admin_gateway: Callable[..., Any],
) -> None:
    """A browser opening the page cannot send a bearer token: the static files are public,
    and the page then asks for the token. Nothing in them comes from the running gateway."""
    admin, (a,), path = admin_gateway(token=TOKEN)
    for file in DASHBOARD_FILES:
        reply = request(admin.port, "GET", file)
        assert reply.status == 200, file
        for secret in (TOKEN, a.address, str(path), "private", "alice"):
            assert secret.encode() not in reply.body, (file, secret)
    assert request(admin.port, "POST", "/").status == 401  # only GET and HEAD of those files
    assert request(admin.port, "GET", "/dashboard/nothing.js").status == 404


def test_with_a_token_steering_needs_it_too(admin_gateway: Callable[..., Any]) -> None:
    admin, (a,), _ = admin_gateway(token=TOKEN)
    for path in ("/reload", f"/upstreams/app/targets/{a.address}/drain"):
        assert request(admin.port, "POST", path).status == 401
    assert admin.get("/status")["reloads"] == {"applied": 0, "rejected": 0}
    assert admin.get("/upstreams")["upstreams"][0]["targets"][0]["drained"] is False


# --- steering ---------------------------------------------------------------------------------------


def landed(port: int, count: int = 12) -> Counter[str]:
    return Counter(origin_of(port, "/api")[1] for _ in range(count))


def test_a_drained_target_gets_no_new_requests_until_enabled(admin_gateway: Callable[..., Any]) -> None:
    admin, (a, _), _ = admin_gateway(count=2)
    assert set(landed(admin.gw.port)) == {"a", "b"}
    assert total(admin.metrics(), "bastion_upstream_target_up", target=a.address) == 1
    reply = admin.post(f"/upstreams/app/targets/{a.address}/drain")
    assert reply.status == 200
    assert reply.json() == {"upstream": "app", "target": a.address, "drained": True, "workers": 1, "workers_applied": 1}
    assert landed(admin.gw.port) == Counter({"b": 12})
    target = next(t for t in admin.get("/upstreams")["upstreams"][0]["targets"] if t["address"] == a.address)
    assert (target["drained"], target["up"], target["healthy"]) == (True, False, True)
    metrics = admin.metrics()
    assert total(metrics, "bastion_upstream_target_up", target=a.address) == 0
    assert total(metrics, "bastion_upstream_target_drained", target=a.address) == 1

    assert admin.post("/reload").status == 200  # a drain lasts across reloads
    assert landed(admin.gw.port) == Counter({"b": 12})

    assert admin.post(f"/upstreams/app/targets/{a.address}/enable").json()["drained"] is False
    assert set(landed(admin.gw.port)) == {"a", "b"}


def test_draining_every_target_answers_503(admin_gateway: Callable[..., Any]) -> None:
    admin, (a,), _ = admin_gateway()
    assert admin.post(f"/upstreams/app/targets/{a.address}/drain").status == 200
    assert request(admin.gw.port, "GET", "/api").status == 503


def test_drain_of_an_unknown_upstream_or_target_is_404(admin_gateway: Callable[..., Any]) -> None:
    admin, (a,), _ = admin_gateway()
    reply = admin.post(f"/upstreams/nope/targets/{a.address}/drain")
    assert reply.status == 404 and "no upstream named 'nope'" in reply.json()["message"]
    reply = admin.post("/upstreams/app/targets/127.0.0.1:1/enable")
    assert reply.status == 404 and a.address in reply.json()["message"]
    encoded = a.address.replace(":", "%3A")  # a percent-encoded address is the same address
    assert admin.post(f"/upstreams/app/targets/{encoded}/drain").json()["drained"] is True


def test_reload_applies_a_good_config_and_refuses_a_bad_one(admin_gateway: Callable[..., Any]) -> None:
    admin, _, path = admin_gateway()
    cfg = yaml.safe_load(path.read_text())
    cfg["routes"].append({"name": "extra", "match": {"path": "/extra"}, "upstream": "app"})
    write_config(path, cfg)
    reply = admin.post("/reload")
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["result"] == "applied" and body["workers"] == 1
    assert body["config"]["source"] == f"file {path}" and len(body["config"]["sha256"]) == 64
    assert "extra" in [r["name"] for r in admin.get("/routes")["routes"]]
    assert request(admin.gw.port, "GET", "/extra").status == 200

    cfg["routes"][0]["upstreem"] = "app"
    write_config(path, cfg)
    reply = admin.post("/reload")
    assert reply.status == 422
    refused = reply.json()
    assert refused["error"] == "config_rejected" and refused["request_id"] == reply.header("x-request-id")
    assert any(p.startswith(f"{path}:") and "routes[0].upstreem" in p for p in refused["problems"]), refused
    assert request(admin.gw.port, "GET", "/extra").status == 200  # the running config stays

    status = admin.get("/status")
    assert status["reloads"] == {"applied": 1, "rejected": 1}
    assert status["last_reload"]["result"] == "rejected"
    metrics = admin.metrics()
    assert total(metrics, "bastion_config_reloads_total", result="applied") == 1
    assert total(metrics, "bastion_config_reloads_total", result="rejected") == 1


def test_the_admin_listener_follows_reloads(admin_gateway: Callable[..., Any]) -> None:
    admin, _, path = admin_gateway()
    cfg = yaml.safe_load(path.read_text())
    moved = free_port()
    cfg["admin"] = {"bind": f"127.0.0.1:{moved}", "token": TOKEN}
    write_config(path, cfg)
    assert admin.post("/reload").status == 200
    wait_for(lambda: _refused(admin.port))
    reply = request(moved, "GET", "/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.status == 200 and reply.json()["reloads"]["applied"] == 1
    assert request(moved, "GET", "/status").status == 401

    del cfg["admin"]
    write_config(path, cfg)
    assert admin.gw.reload()
    wait_for(lambda: _refused(moved))


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    time.sleep(0.05)
    return False


def test_the_demo_refuses_to_start_when_its_admin_port_is_taken(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bastion.demo.runner import ADMIN_ENV, GATEWAY_ENV, ORIGINS, run_demo

    for env in (GATEWAY_ENV, *(o.env for o in ORIGINS)):
        monkeypatch.setenv(env, str(free_port()))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv(ADMIN_ENV, str(port))
        assert run_demo() == 1
    err = capsys.readouterr().err
    assert f"port {port} already in use" in err and ADMIN_ENV in err


def test_https_certificates_expiry_is_a_gauge(
    tmp_path: Path, origins: Callable[..., OriginHandle], gateway: Callable[..., GatewayThread]
) -> None:
    from tls_support import Pki

    pki = Pki(tmp_path)
    valid_until = datetime.datetime(2031, 5, 1, 12, 0, tzinfo=datetime.UTC)
    cert, key = pki.issue("api", "api.example.com", not_after=valid_until)
    port, admin_port = free_port(), free_port()
    gateway(
        {
            "version": 1,
            "listeners": [
                {
                    "name": "web-tls",
                    "bind": f"127.0.0.1:{port}",
                    "protocol": "https",
                    "tls": {"certificates": [{"cert": cert, "key": key}]},
                }
            ],
            "upstreams": {"app": {"targets": [{"address": origins("a").address}]}},
            "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "app"}],
            "admin": {"bind": f"127.0.0.1:{admin_port}"},
            "log": {"access": False},
        }
    )
    metrics = Admin(None, admin_port).metrics()
    labels = (("bind", f"127.0.0.1:{port}"), ("cert", cert))
    assert metrics[("bastion_tls_certificate_not_after_seconds", labels)] == valid_until.timestamp()


def test_requests_refused_before_routing_are_counted(admin_gateway: Callable[..., Any]) -> None:
    admin, _, _ = admin_gateway()
    port = admin.gw.port
    raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    raw_exchange(port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a,b\r\n\r\n")
    metrics = admin.metrics()
    assert total(metrics, "bastion_http_rejected_total", code="400") == 2
    assert total(metrics, "bastion_http_rejected_total", code="414") == 1
    assert total(metrics, "bastion_http_requests_total") == 0  # none became a request to route
