"""What the docs show a client receiving is what a real gateway sends: the JSON error
examples, the RateLimit headers example and basic_auth's table of refusals."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from typing import Any

import bcrypt
import jwt as pyjwt
import pytest
import yaml

from bastion.demo.origin import OriginHandle
from docs_support import Block, blocks
from support import GatewayThread, raw_exchange, request, split_responses

Start = Callable[..., GatewayThread]
REQUEST_ID = re.compile(r"^[0-9a-f]{22}$")  # 12 random hex digits, then a 10-digit counter


@pytest.fixture
def origin(origins: Callable[..., OriginHandle]) -> OriginHandle:
    return origins("a")


def doc_block(name: str, lang: str, starts: str) -> Block:
    found = [b for b in blocks(lang) if b.path.name == name and b.text.startswith(starts)]
    assert len(found) == 1, f"{name}: no single {lang} block starting with {starts!r}"
    return found[0]


def assert_like_the_docs(reply: Any, shown: dict[str, str]) -> None:
    body = reply.json()
    assert (body["error"], body["message"]) == (shown["error"], shown["message"])
    assert set(body) == set(shown)
    assert REQUEST_ID.match(shown["request_id"]), "the docs' request id has the gateway's shape"
    assert REQUEST_ID.match(body["request_id"])
    assert reply.header("X-Request-Id") == body["request_id"]
    assert reply.header("Content-Type") == "application/json"


def test_the_no_route_example(gateway: Start, origin: OriginHandle) -> None:
    shown = json.loads(doc_block("config.md", "json", '{"error": "no_route"').text)
    routes = [{"name": "users", "match": {"path": "/users"}, "upstream": "app"}]
    gw = gateway(targets=[origin.port], routes=routes)
    reply = request(gw.port, path="/nope")
    assert reply.status == 404
    assert_like_the_docs(reply, shown)


def test_the_expired_token_example(gateway: Start, origin: OriginHandle) -> None:
    shown = json.loads(doc_block("plugins.md", "json", '{"error": "invalid_token"').text)
    secret = "s3cret-s3cret-s3cret-s3cret-s3cret!"
    gw = gateway(targets=[origin.port], plugins=[{"jwt": {"secret": secret}}])
    token = pyjwt.encode({"sub": "x", "exp": int(time.time()) - 60}, secret, algorithm="HS256")
    reply = request(gw.port, headers={"Authorization": f"Bearer {token}"})
    assert reply.status == 401
    assert_like_the_docs(reply, shown)


def test_the_rate_limit_headers_example(gateway: Start, origin: OriginHandle) -> None:
    entries = yaml.safe_load(doc_block("plugins.md", "yaml", "- rate_limit:").text)
    shown = {}
    for line in doc_block("plugins.md", "text", "RateLimit-Limit:").text.splitlines():
        name, _, rest = line.partition(":")
        shown[name] = rest.strip().split("  ")[0]
    gw = gateway(targets=[origin.port], plugins=entries)
    count = int(shown["RateLimit-Limit"]) - int(shown["RateLimit-Remaining"])
    assert count == 7  # "a client's seventh request", as the text says
    replies = [request(gw.port) for _ in range(count)]
    last = replies[-1]
    assert last.status == 200
    for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Policy"):
        assert last.header(name) == shown[name], name
    # Whole seconds until the entry is full again: 7 x 6 s, less the moments the requests took.
    assert (
        int(shown["RateLimit-Reset"]) - 2 <= int(last.header("RateLimit-Reset") or 0) <= int(shown["RateLimit-Reset"])
    )


def _basic_auth_refusals() -> list[tuple[str, str, str]]:
    """(request, `401 word`, message) rows of the table in plugins.md's basic_auth section."""
    text = next(b.path for b in blocks() if b.path.name == "plugins.md").read_text(encoding="utf-8")
    section = text[text.index("## basic_auth") : text.index("## jwt")]
    rows = re.findall(r"^\| (.+?) \| `(401 \w+)` \| (.+?) \|$", section, flags=re.MULTILINE)
    return [(what, status, message) for what, status, message in rows]


def _twice(port: int) -> tuple[int, dict[str, str], Any]:
    """A request with two Authorization fields (http.client cannot send that)."""
    field = b"Authorization: Basic YTpi\r\n"
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + field + field + b"Connection: close\r\n\r\n"
    ((status, headers, body),) = split_responses(raw_exchange(port, head))
    return status, headers, json.loads(body)


def test_the_basic_auth_refusals_table(gateway: Start, origin: OriginHandle) -> None:
    password_hash = bcrypt.hashpw(b"right", bcrypt.gensalt(4)).decode()
    consumers = [{"name": "app", "credentials": {"basic_auth": [{"username": "app", "password_hash": password_hash}]}}]
    gw = gateway(targets=[origin.port], consumers=consumers, plugins=[{"basic_auth": {}}])

    def basic(credentials: bytes) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}

    sent = {
        "no `Authorization`, or another scheme": [{}, {"Authorization": "Bearer abc"}],
        "not base64, or no `:` between user and password": [
            {"Authorization": "Basic !!!"},
            basic(b"no-colon"),
        ],
        "unknown user, or wrong password": [basic(b"nobody:right"), basic(b"app:wrong")],
    }
    rows = _basic_auth_refusals()
    assert [row[0] for row in rows] == [
        "no `Authorization`, or another scheme",
        "two `Authorization` fields",
        "not base64, or no `:` between user and password",
        "unknown user, or wrong password",
    ]
    for what, status, message in rows:
        for headers in sent.get(what, []):
            reply = request(gw.port, headers=headers)
            assert f"{reply.status} {reply.json()['error']}" == status, what
            assert reply.json()["message"] == message, what
            assert reply.header("WWW-Authenticate") == 'Basic realm="bastion", charset="UTF-8"'
        if what == "two `Authorization` fields":
            status_code, headers_got, body = _twice(gw.port)
            assert (f"{status_code} {body['error']}", body["message"]) == (status, message)
            assert headers_got["www-authenticate"] == 'Basic realm="bastion", charset="UTF-8"'
    assert request(gw.port, headers=basic(b"app:right")).status == 200
