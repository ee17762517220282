"""grpc_json: REST/JSON calls through the gateway to a grpcio server, and its config errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bastion.cli import cli
from grpc_support import Compiled, GrpcOrigin, compiled, descriptor_set
from support import GatewayThread, request, write_config

Start = Callable[..., GatewayThread]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return compiled(tmp_path_factory.mktemp("proto"))


@pytest.fixture
def origin(kit: Compiled) -> Iterator[GrpcOrigin]:
    server = GrpcOrigin(kit)
    yield server
    server.stop()


def rest_config(port: int, transcoder: dict[str, Any], other_plugins: list[Any] | None = None) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": [{"name": "web", "bind": "127.0.0.1:PORT"}],
        "upstreams": {"books": {"protocol": "h2c", "targets": [{"address": f"127.0.0.1:{port}"}]}},
        "routes": [
            {
                "name": "rest",
                "match": {"path": "/"},
                "upstream": "books",
                "plugins": [*(other_plugins or []), {"grpc_json": transcoder}],
            }
        ],
        "log": {"access": False},
    }


@pytest.fixture
def gw(kit: Compiled, origin: GrpcOrigin, gateway: Start, tmp_path: Path) -> GatewayThread:
    shutil.copy(kit.descriptor, tmp_path / "api.pb")
    return gateway(rest_config(origin.port, {"descriptor": "api.pb"}))  # relative to the config file


def test_get_with_path_variables_and_query(gw: GatewayThread, origin: GrpcOrigin) -> None:
    reply = request(gw.port, "GET", "/v1/shelves/fiction/books/42?verbose=true")
    assert reply.status == 200, reply.body
    assert reply.header("content-type") == "application/json"
    assert reply.json() == {"id": "42", "title": "fiction:42", "hardcover": True}
    decoded = request(gw.port, "GET", "/v1/shelves/sci%20fi%C3%A9/books/5")  # variables are percent-decoded
    assert decoded.json()["title"] == "sci fié:5"


def test_multi_segment_variable_repeated_query_and_additional_binding(gw: GatewayThread) -> None:
    reply = request(gw.port, "GET", "/v1/shelves/poetry/books?page_size=2&tags=a&tags=b")
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["shelf"] == "shelves/poetry"
    assert [b["tags"] for b in body["books"]] == [["a", "b"], ["a", "b"]]
    # The additional binding (a JSON field name in the query) answers with response_body: books.
    other = request(gw.port, "GET", "/v1/books?pageSize=2")
    assert other.status == 200 and other.json() == [{"title": "t0"}, {"id": "1", "title": "t1"}]


def test_post_with_a_body_field(gw: GatewayThread) -> None:
    book = {"title": "Dune", "tags": ["sf"], "hardcover": True}
    reply = request(
        gw.port, "POST", "/v1/shelves/sf/books", {"content-type": "application/json"}, json.dumps(book).encode()
    )
    assert reply.status == 200, reply.body
    assert reply.json() == {"id": "7", "title": "Dune", "author": "sf", "tags": ["sf"], "hardcover": True}


def test_post_with_the_whole_body(gw: GatewayThread) -> None:
    reply = request(gw.port, "POST", "/v1/echo", body=json.dumps({"text": "héllo", "blob": "AAEC"}).encode())
    assert reply.status == 200, reply.body
    assert reply.json()["text"] == "héllo" and reply.json()["blob"] == "AAEC"


def test_grpc_statuses_become_http_statuses(gw: GatewayThread) -> None:
    missing = request(gw.port, "GET", "/v1/shelves/a/books/404")
    assert missing.status == 404
    body = missing.json()
    assert body["error"] == "not_found" and body["message"] == "no book 404 on a"
    assert body["request_id"] == missing.header("x-request-id")
    invalid = request(gw.port, "POST", "/v1/shelves/a/books", body=b"{}")
    assert invalid.status == 400 and invalid.json()["error"] == "invalid_argument"
    for code, status in ((14, 503), (4, 504), (16, 401), (7, 403), (8, 429), (12, 501)):
        reply = request(gw.port, "POST", "/v1/echo", body=json.dumps({"failCode": code, "failMessage": "m"}).encode())
        assert reply.status == status, (code, reply.body)


def test_bad_requests_are_400(gw: GatewayThread) -> None:
    assert request(gw.port, "POST", "/v1/echo", body=b"{not json").status == 400
    assert request(gw.port, "POST", "/v1/echo", body=b"[1]").status == 400
    wrong_type = request(gw.port, "POST", "/v1/echo", body=b'{"sleepMs": "soon"}')
    assert wrong_type.status == 400 and wrong_type.json()["error"] == "bad_request"
    unknown = request(gw.port, "GET", "/v1/shelves/a/books/1?colour=red")
    assert unknown.status == 400 and "colour" in unknown.json()["message"]
    assert request(gw.port, "GET", "/v1/shelves/a/books/notanumber").status == 400


def test_hostile_bodies(gw: GatewayThread) -> None:
    """Deep nesting, a huge number, a string where a message goes: 400, and the gateway lives."""
    for body in (b"[" * 200_000, b'{"text": {"a": ' * 5000 + b"1" + b"}" * 5000 + b"}", b'{"sleepMs": 1e400}'):
        reply = request(gw.port, "POST", "/v1/echo", body=body)
        assert reply.status == 400, reply.body
    deep_query = "&".join(f"{'a.' * 50}b={i}" for i in range(20))
    assert request(gw.port, "GET", f"/v1/shelves/a/books/1?{deep_query}").status == 400
    assert request(gw.port, "GET", "/v1/shelves/a/books/1").status == 200


def test_server_streaming_is_a_json_array(gw: GatewayThread) -> None:
    reply = request(gw.port, "GET", "/v1/stream?count=3&size=2")
    assert reply.status == 200, reply.body
    assert reply.json() == [{"data": "eHg="}, {"data": "eHg=", "index": 1}, {"data": "eHg=", "index": 2}]


def test_unmatched_requests_pass_through(gw: GatewayThread) -> None:
    # No rule for this path: forwarded as is, and the gRPC server does not know it.
    reply = request(gw.port, "GET", "/v2/nothing")
    assert reply.status != 200 or reply.header("grpc-status") is not None


def test_print_options_and_limits(kit: Compiled, origin: GrpcOrigin, gateway: Start, tmp_path: Path) -> None:
    options = {
        "descriptor": str(kit.descriptor),
        "services": ["bookstore.v1.Bookstore"],
        "print_options": {"preserve_proto_field_names": True, "always_print_primitive_fields": True},
        "max_request_body_size": "64B",
        "max_response_body_size": "1KB",
    }
    gw = gateway(rest_config(origin.port, options))
    reply = request(gw.port, "GET", "/v1/shelves/a/books/3")
    assert reply.json() == {"id": "3", "title": "a:3", "author": "", "tags": [], "hardcover": False}
    too_big = request(gw.port, "POST", "/v1/echo", body=json.dumps({"text": "x" * 100}).encode())
    assert too_big.status == 413
    big_answer = request(gw.port, "GET", "/v1/stream?count=5&size=400")
    assert big_answer.status == 502 and big_answer.json()["error"] == "response_too_large"
    # A stream that would go on for a long time is stopped at the limit, the upstream cancelled.
    endless = request(gw.port, "GET", "/v1/stream?count=10000000&size=400", timeout=10)
    assert endless.status == 502 and endless.json()["error"] == "response_too_large"
    assert origin.cancelled.wait(5), "the upstream stream was not cancelled"


def _problems(tmp_path: Path, transcoder: dict[str, Any]) -> str:
    """What `bastion check` says about a config with this grpc_json entry (it must refuse it)."""
    path = write_config(tmp_path / "bad.yaml", rest_config(1, transcoder))
    path.write_text(path.read_text().replace("127.0.0.1:PORT", "127.0.0.1:8080"))
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 1, result.output
    return result.output


def test_config_errors(kit: Compiled, tmp_path: Path) -> None:
    missing = _problems(tmp_path, {"descriptor": "nope.pb"})
    assert "bad.yaml:" in missing and "grpc_json.descriptor" in missing and "cannot read" in missing
    (tmp_path / "junk.pb").write_bytes(b"\xff\xff not protobuf")
    assert "not a FileDescriptorSet" in _problems(tmp_path, {"descriptor": "junk.pb"})
    unknown = _problems(tmp_path, {"descriptor": str(kit.descriptor), "services": ["bookstore.v1.Nope"]})
    assert "grpc_json.services" in unknown and "bookstore.v1.Bookstore" in unknown


BAD_RULES = """
syntax = "proto3";
package bad.v1;
import "google/api/annotations.proto";
message Req { string name = 1; }
message Res { string name = 1; }
service Bad {
  rpc Unclosed(Req) returns (Res) { option (google.api.http) = { get: "/v1/{name" }; }
  rpc NoField(Req) returns (Res) { option (google.api.http) = { get: "/v1/{missing}" }; }
  rpc BadBody(Req) returns (Res) { option (google.api.http) = { post: "/v1/x" body: "nope" }; }
}
"""


def test_bad_rules_are_config_errors(tmp_path: Path) -> None:
    path = descriptor_set(tmp_path / "bad", "bad", BAD_RULES)
    output = _problems(tmp_path, {"descriptor": str(path)})
    assert "grpc_json.descriptor" in output
    assert "bad.v1.Bad.Unclosed" in output and "unclosed variable" in output
    assert "bad.v1.Bad.NoField" in output and "no field 'missing'" in output
    assert "bad.v1.Bad.BadBody" in output and "body:" in output


def test_rest_clients_on_http2(kit: Compiled, origin: GrpcOrigin, gateway: Start) -> None:
    import httpx

    config = rest_config(origin.port, {"descriptor": str(kit.descriptor)})
    config["listeners"][0]["http2"] = "prior_knowledge"
    gw = gateway(config)
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        got = client.get(f"http://127.0.0.1:{gw.port}/v1/shelves/h2/books/9")
        posted = client.post(f"http://127.0.0.1:{gw.port}/v1/echo", json={"text": "over h2"})
        missing = client.get(f"http://127.0.0.1:{gw.port}/v1/shelves/h2/books/404")
    assert got.http_version == "HTTP/2" and got.json() == {"id": "9", "title": "h2:9"}
    assert posted.json()["text"] == "over h2"
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
