"""key_auth, basic_auth and acl through a real gateway to a real origin (which echoes headers)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import argon2
import bcrypt
import pytest

from bastion.demo.origin import OriginHandle
from bastion.plugins import basic_auth
from support import GatewayThread, Reply, request, send_fields

FAST_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)

Start = Callable[..., GatewayThread]


def consumers() -> list[dict[str, Any]]:
    return [
        {
            "name": "alice",
            "groups": ["admins", "staff"],
            "credentials": {
                "key_auth": [{"key": "alice-key-1"}, {"key": "alice-key-2"}],
                "basic_auth": [
                    {"username": "alice", "password_hash": bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)).decode()}
                ],
            },
        },
        {
            "name": "bob",
            "groups": ["staff", "banned"],
            "credentials": {
                "key_auth": [{"key": "bob-key"}],
                "basic_auth": [{"username": "bob", "password_hash": FAST_ARGON2.hash("builder")}],
            },
        },
        {"name": "carol", "groups": ["guests"], "credentials": {"key_auth": [{"key": "carol-key"}]}},
    ]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def origin(origins: Callable[..., OriginHandle]) -> OriginHandle:
    return origins("a")


def ambiguous(reply: Reply) -> None:
    """The 401 for a request that carries more than one credential."""
    assert reply.status == 401, reply.body
    body = reply.json()
    assert body["error"] == "ambiguous_credentials"
    assert body["request_id"] == reply.header("X-Request-Id")


def seen(reply: Any) -> dict[str, Any]:
    """The headers the upstream received."""
    assert reply.status == 200, reply.body
    headers: dict[str, Any] = reply.json()["headers"]
    return headers


# --- key_auth ----------------------------------------------------------------------------------


def test_key_auth_header_sets_x_consumer(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], consumers=consumers(), plugins=[{"key_auth": {}}])
    headers = seen(request(gw.port, headers={"X-Api-Key": "alice-key-2"}))
    assert headers["x-consumer"] == "alice"
    assert headers["x-api-key"] == "alice-key-2"  # hide_credentials is off by default


def test_key_auth_missing_and_wrong_keys_are_401_json(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], consumers=consumers(), plugins=[{"key_auth": {}}])
    missing = request(gw.port)
    assert missing.status == 401
    assert missing.json()["error"] == "missing_credentials"
    assert missing.json()["request_id"] == missing.header("X-Request-Id")
    assert missing.header("WWW-Authenticate") == 'Key realm="bastion"'
    wrong = request(gw.port, headers={"X-Api-Key": "alice-key-3"})
    assert wrong.status == 401
    assert wrong.json()["error"] == "invalid_credentials"
    assert "alice-key-3" not in wrong.body.decode()
    assert origin.origin.requests == 0


def test_spoofed_x_consumer_is_stripped(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], consumers=consumers(), plugins=[{"key_auth": {}}])
    headers = seen(request(gw.port, headers={"X-Api-Key": "carol-key", "X-Consumer": "alice"}))
    assert headers["x-consumer"] == "carol"
    # Without any auth plugin, a client-sent X-Consumer still never reaches the upstream.
    plain = gateway(targets=[origin.port])
    assert "x-consumer" not in seen(request(plain.port, headers={"X-Consumer": "alice"}))


def test_key_auth_query_with_hide_credentials(gateway: Start, origin: OriginHandle) -> None:
    plugins = [{"key_auth": {"in": ["header:X-Api-Key", "query:apikey"], "hide_credentials": True}}]
    gw = gateway(targets=[origin.port], consumers=consumers(), plugins=plugins)
    reply = request(gw.port, path="/things?a=1&apikey=bob-key&b=2")
    assert reply.status == 200
    body = reply.json()
    assert body["path"] == "/things?a=1&b=2"
    assert body["headers"]["x-consumer"] == "bob"
    header = seen(request(gw.port, headers={"X-Api-Key": "alice-key-1"}))
    assert "x-api-key" not in header
    assert header["x-consumer"] == "alice"


def test_key_auth_refuses_a_key_given_twice(gateway: Start, origin: OriginHandle) -> None:
    """Two keys: the gateway would check one and the upstream might read the other."""
    plugins = [{"key_auth": {"in": ["header:X-Api-Key", "query:apikey", "cookie:key"]}}]
    gw = gateway(targets=[origin.port], consumers=consumers(), plugins=plugins)
    cases: list[tuple[list[tuple[str, str]], str]] = [
        ([("X-Api-Key", "alice-key-1"), ("X-Api-Key", "not-a-key")], "/"),  # two header fields
        ([("X-Api-Key", "alice-key-1"), ("X-Api-Key", "bob-key")], "/"),  # both valid: still ambiguous
        ([("X-Api-Key", "carol-key")], "/?apikey=bob-key"),  # a header and a query parameter
        ([], "/?apikey=bob-key&apikey=other"),  # the same parameter twice
        ([], "/?apikey=bob-key&api%6Bey=other"),  # ... also when one is percent-encoded
        ([("Cookie", "key=bob-key; key=other")], "/"),  # the same cookie twice
        ([("Cookie", "key=bob-key"), ("Cookie", "x=1; key=other")], "/"),  # ... in two Cookie fields
        ([("Cookie", "key=bob-key")], "/?apikey=bob-key"),  # the same key in two places
    ]
    for fields, path in cases:
        reply = send_fields(gw.port, fields, path)
        ambiguous(reply)
        assert reply.header("WWW-Authenticate") == 'Key realm="bastion"'
        assert "bob-key" not in reply.body.decode()
    assert origin.origin.requests == 0
    # One key, whatever else the request carries, still passes; a comma is part of one value.
    assert seen(send_fields(gw.port, [("X-Api-Key", "bob-key"), ("Cookie", "other=1")], "/?x=1"))["x-consumer"] == "bob"
    comma = send_fields(gw.port, [("X-Api-Key", "bob-key, alice-key-1")])
    assert comma.status == 401
    assert comma.json()["error"] == "invalid_credentials"


def test_key_auth_on_one_route_only(gateway: Start, origin: OriginHandle) -> None:
    routes = [
        {"name": "open", "match": {"path": "/open"}, "upstream": "app"},
        {"name": "closed", "match": {"path": "/closed"}, "upstream": "app", "plugins": [{"key_auth": {}}]},
    ]
    gw = gateway(targets=[origin.port], consumers=consumers(), routes=routes)
    assert request(gw.port, path="/open").status == 200
    assert request(gw.port, path="/closed").status == 401
    assert request(gw.port, path="/closed", headers={"X-Api-Key": "bob-key"}).status == 200


# --- basic_auth --------------------------------------------------------------------------------


def test_basic_auth_bcrypt_and_argon2(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], consumers=consumers(), plugins=[{"basic_auth": {"realm": "api"}}])
    assert seen(request(gw.port, headers={"Authorization": basic("alice", "wonderland")}))["x-consumer"] == "alice"
    assert seen(request(gw.port, headers={"Authorization": basic("bob", "builder")}))["x-consumer"] == "bob"
    # A second time comes from the verification cache: same answer.
    assert seen(request(gw.port, headers={"Authorization": basic("bob", "builder")}))["x-consumer"] == "bob"


@pytest.mark.parametrize(
    ("authorization", "word"),
    [
        (None, "missing_credentials"),
        ("Bearer abc", "missing_credentials"),
        ("Basic !!!notbase64", "invalid_credentials"),
        ("Basic " + base64.b64encode(b"no-colon").decode(), "invalid_credentials"),
        (basic("alice", "wrong"), "invalid_credentials"),
        (basic("bob", "wonderland"), "invalid_credentials"),
        (basic("mallory", "wonderland"), "invalid_credentials"),
    ],
)
def test_basic_auth_refusals(gateway: Start, origin: OriginHandle, authorization: str | None, word: str) -> None:
    gw = gateway(targets=[origin.port], consumers=consumers(), plugins=[{"basic_auth": {"realm": "api"}}])
    reply = request(gw.port, headers={"Authorization": authorization} if authorization else {})
    assert reply.status == 401
    assert reply.json()["error"] == word
    assert reply.header("WWW-Authenticate") == 'Basic realm="api", charset="UTF-8"'
    assert origin.origin.requests == 0


def test_basic_auth_hide_credentials(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], consumers=consumers(), plugins=[{"basic_auth": {"hide_credentials": True}}])
    headers = seen(request(gw.port, headers={"Authorization": basic("alice", "wonderland")}))
    assert "authorization" not in headers
    assert headers["x-consumer"] == "alice"


def test_basic_auth_refuses_two_authorization_fields(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], consumers=consumers(), plugins=[{"basic_auth": {"realm": "api"}}])
    for second in (basic("bob", "builder"), basic("alice", "wonderland"), "Bearer abc"):
        reply = send_fields(gw.port, [("Authorization", basic("alice", "wonderland")), ("Authorization", second)])
        ambiguous(reply)
        assert reply.header("WWW-Authenticate") == 'Basic realm="api", charset="UTF-8"'
    assert origin.origin.requests == 0


def test_a_wrong_password_is_not_served_from_the_cache(gateway: Start, origin: OriginHandle) -> None:
    gw = gateway(targets=[origin.port], consumers=consumers(), plugins=[{"basic_auth": {}}])
    assert request(gw.port, headers={"Authorization": basic("alice", "wonderland")}).status == 200
    assert request(gw.port, headers={"Authorization": basic("alice", "wonderland!")}).status == 401


async def from_address(port: int, source: str, authorization: str) -> tuple[int, str]:
    """One request from the loopback address `source` (127.0.0.0/8 is all ours): status, word."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        head = f"GET / HTTP/1.1\r\nHost: gw\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode())
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1])
    body = data.partition(b"\r\n\r\n")[2]
    return status, json.loads(body)["error"] if status != 200 else ""


def test_a_password_flood_from_one_client_does_not_lock_out_another(gateway: Start, origin: OriginHandle) -> None:
    """One address floods wrong passwords against a slow hash; it hits its own share of the
    pending checks (429) long before the process-wide cap, so another address still logs in."""
    slow = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(9)).decode()  # ~30 ms a check, 2 threads
    people = [{"name": "alice", "credentials": {"basic_auth": [{"username": "alice", "password_hash": slow}]}}]
    gw = gateway(targets=[origin.port], consumers=people, plugins=[{"basic_auth": {"cache_ttl": 0}}])
    flood_size = basic_auth.MAX_PENDING + 44

    async def scenario() -> tuple[list[tuple[int, str]], tuple[int, str]]:
        flood = [
            asyncio.ensure_future(from_address(gw.port, "127.0.0.2", basic("alice", f"guess-{i}")))
            for i in range(flood_size)
        ]
        # The first 429 means the flooder's checks are as many as the gateway lets wait.
        waiting = set(flood)
        while True:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if any(task.result()[0] == 429 for task in done):
                break
            assert waiting, "the flood never reached a limit"
        login = await from_address(gw.port, "127.0.0.3", basic("alice", "wonderland"))
        return list(await asyncio.gather(*flood)), login

    flood, login = asyncio.run(scenario())
    assert login == (200, "")
    assert {word for _, word in flood} == {"invalid_credentials", "too_many_attempts"}
    # Every check is over: nothing is left counted against either address.
    assert basic_auth._pending == 0
    assert basic_auth._pending_by_client == {}


# --- acl ---------------------------------------------------------------------------------------


def test_acl_allow_and_deny_groups(gateway: Start, origin: OriginHandle) -> None:
    plugins = [{"acl": {"allow_groups": ["staff"], "deny_groups": ["banned"]}}, {"key_auth": {}}]
    gw = gateway(targets=[origin.port], consumers=consumers(), plugins=plugins)
    # key_auth is listed after acl but authentication always runs first.
    assert request(gw.port, headers={"X-Api-Key": "alice-key-1"}).status == 200
    bob = request(gw.port, headers={"X-Api-Key": "bob-key"})
    assert bob.status == 403
    assert bob.json()["error"] == "forbidden"
    assert request(gw.port, headers={"X-Api-Key": "carol-key"}).status == 403
    assert request(gw.port).status == 401


def test_acl_route_level_on_top_of_global_auth(gateway: Start, origin: OriginHandle) -> None:
    routes = [
        {
            "name": "admin",
            "match": {"path": "/admin"},
            "upstream": "app",
            "plugins": [{"acl": {"allow_groups": ["admins"]}}],
        },
        {"name": "rest", "match": {"path": "/"}, "upstream": "app"},
    ]
    gw = gateway(targets=[origin.port], consumers=consumers(), plugins=[{"key_auth": {}}], routes=routes)
    assert request(gw.port, path="/admin", headers={"X-Api-Key": "alice-key-1"}).status == 200
    assert request(gw.port, path="/admin", headers={"X-Api-Key": "carol-key"}).status == 403
    assert request(gw.port, path="/other", headers={"X-Api-Key": "carol-key"}).status == 200
