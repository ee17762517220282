"""Plugin internals without sockets: sources, address resolution, CORS matching, JWKS parsing, hashes."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Any

import argon2
import bcrypt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from pydantic import ValidationError

from bastion.config.schema import BasicCredential, Consumer, Credentials, KeyCredential
from bastion.http.model import Headers, Request, Response
from bastion.pipeline import BuildEnv, Context
from bastion.plugins import basic_auth
from bastion.plugins.basic_auth import BasicAuth, BasicAuthConfig, verify_password
from bastion.plugins.common import (
    AMBIGUOUS,
    Source,
    Sources,
    cookie,
    query_param,
    remove_cookie,
    without_query_param,
)
from bastion.plugins.consumers import ConsumerIndex, valid_hash
from bastion.plugins.cors import Cors, CorsConfig
from bastion.plugins.headers import HeadersConfig, RequestHeaders
from bastion.plugins.ip_filter import IpFilter, IpFilterConfig, NetworkSet, parse_ip, resolve_client
from bastion.plugins.jwks import Key, KeySet, parse_jwks
from bastion.plugins.jwt import Jwt, JwtConfig
from bastion.plugins.rate_limit import RateLimit, RateLimitConfig
from bastion.store.memory import LocalStore

ENV = BuildEnv(ConsumerIndex(), LocalStore())


def make_request(
    headers: list[tuple[bytes, bytes]] | None = None, query: str = "", method: str = "GET", client: str = "127.0.0.1"
) -> Request:
    return Request(method, "/p", query, Headers(list(headers or [])), client_ip=client)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- sources -------------------------------------------------------------------------------------


def test_query_params_are_decoded_and_removed_precisely() -> None:
    query = "a=1&api%5Fkey=s%20ecret&b=2&api_key=second&flag"
    assert query_param("a=1&api%5Fkey=s%20ecret&b=2", "api_key") == b"s ecret"
    assert query_param(query, "api_key") is AMBIGUOUS  # two spellings of one name: two values
    assert query_param(query, "flag") == b""
    assert query_param(query, "missing") is None
    assert query_param("", "a") is None
    assert without_query_param(query, "api_key") == "a=1&b=2&flag"
    assert without_query_param("api_key=x", "api_key") == ""


def test_cookies() -> None:
    headers = Headers([(b"cookie", b'a=1; token="abc"; b=2'), (b"cookie", b"other=zzz")])
    assert cookie(headers, b"token") == b"abc"
    assert cookie(headers, b"missing") is None
    headers.add(b"cookie", b"token=zzz")
    assert cookie(headers, b"token") is AMBIGUOUS  # set twice, here in two Cookie fields
    remove_cookie(headers, b"token")
    assert headers.items == [(b"cookie", b"a=1; b=2"), (b"cookie", b"other=zzz")]


@pytest.mark.parametrize("spec", ["header:", "body:x", "header:bad name", "query", "cookie:a;b"])
def test_bad_sources(spec: str) -> None:
    with pytest.raises(ValueError):
        Source(spec)


def test_source_reads_and_removes() -> None:
    request = make_request([(b"x-api-key", b"k1")], query="apikey=k2&x=1")
    header, query = Source("header:X-Api-Key"), Source("query:apikey")
    assert header.read(request) == b"k1"
    assert query.read(request) == b"k2"
    header.remove(request)
    query.remove(request)
    assert request.headers.items == []
    assert request.query == "x=1"


def test_a_value_given_twice_is_ambiguous() -> None:
    """Counted per header field, parameter or cookie; a comma-joined field is one value."""
    header = Source("header:X-Api-Key")
    assert header.read(make_request([(b"x-api-key", b"k1, k2")])) == b"k1, k2"
    assert header.read(make_request([(b"x-api-key", b"k1"), (b"x-other", b"o"), (b"x-api-key", b"k2")])) is AMBIGUOUS
    assert header.read(make_request([(b"x-api-key", b"k1"), (b"x-api-key", b"")])) is AMBIGUOUS
    both = Sources(["header:X-Api-Key", "query:apikey", "cookie:key"])
    assert both.read(make_request([(b"x-api-key", b"k1")], query="x=1")) == b"k1"
    assert both.read(make_request([(b"x-api-key", b"")], query="apikey=k2")) == b"k2"  # empty: no credential
    assert both.read(make_request([(b"x-api-key", b"k1")], query="apikey=k2")) is AMBIGUOUS
    assert both.read(make_request([(b"cookie", b"key=k1")], query="apikey=k1")) is AMBIGUOUS
    assert both.read(make_request(query="apikey=")) is None


def test_sources_with_an_authorization_scheme() -> None:
    bearer = Sources(["header:Authorization", "query:jwt"], scheme=b"Bearer ")
    assert bearer.read(make_request([(b"authorization", b"bearer  t1 ")])) == b"t1"
    assert bearer.read(make_request([(b"authorization", b"Basic YTpi")], query="jwt=t2")) == b"t2"
    assert bearer.read(make_request([(b"authorization", b"Bearer t1")], query="jwt=t2")) is AMBIGUOUS
    two = [(b"authorization", b"Basic YTpi"), (b"authorization", b"Bearer t1")]
    assert bearer.read(make_request(two)) is AMBIGUOUS  # two fields, whatever their schemes
    assert bearer.read(make_request([(b"authorization", b"Bearer ")])) is None
    assert Source("query:authorization", scheme=b"bearer ").scheme is None  # only the header has a scheme


def test_consumer_index_by_key() -> None:
    consumers = [Consumer(name="a", credentials=Credentials(key_auth=[KeyCredential(key="k-a")]))]
    index, problems = ConsumerIndex.build(consumers)
    assert problems == []
    assert index.by_key(b"k-a") is consumers[0]
    assert index.by_key(b"k-b") is None
    assert index.by_key(b"") is None
    assert len(index) == 1


# --- password hashes -----------------------------------------------------------------------------


def test_verify_password_formats_and_garbage() -> None:
    b_hash = bcrypt.hashpw(b"pw", bcrypt.gensalt(4))
    a_hash = argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1).hash("pw").encode()
    assert verify_password(b_hash, b"pw") and not verify_password(b_hash, b"nope")
    assert verify_password(a_hash, b"pw") and not verify_password(a_hash, b"nope")
    assert not verify_password(b"$2b$04$" + b"x" * 53, b"pw")
    assert not verify_password(b"$argon2id$v=19$m=64,t=1,p=1$broken", b"pw")
    assert not verify_password(b_hash, b"x" * 100)  # over bcrypt's 72 bytes: refused, not a 500
    assert valid_hash(b_hash.decode()) and valid_hash(a_hash.decode())
    assert not valid_hash("$2b$12$short") and not valid_hash("plain")


def test_basic_auth_pending_checks_per_address_then_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    credential = BasicCredential(username="a", password_hash=bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode())
    people = [Consumer(name="a", credentials=Credentials(basic_auth=[credential]))]
    plugin = BasicAuth(BasicAuthConfig(cache_ttl=0), BuildEnv(ConsumerIndex.build(people)[0], LocalStore()))

    def login(client: str) -> Any:
        request = make_request([(b"authorization", b"Basic " + base64.b64encode(b"a:pw"))], client=client)
        return run(plugin.on_request(Context(request, "r", None)))

    monkeypatch.setitem(basic_auth._pending_by_client, "192.0.2.1", basic_auth.MAX_PENDING_PER_CLIENT)
    busy = login("192.0.2.1")
    assert busy.status == 429 and b"from your address" in busy.body
    assert busy.headers.get("retry-after") == "1"
    assert login("192.0.2.2") is None  # another address is not held back
    monkeypatch.setattr(basic_auth, "_pending", basic_auth.MAX_PENDING)
    assert login("192.0.2.2").status == 429  # the process-wide cap still holds
    monkeypatch.setattr(basic_auth, "_pending", 0)
    assert basic_auth._pending_by_client == {"192.0.2.1": basic_auth.MAX_PENDING_PER_CLIENT}


# --- ip_filter -----------------------------------------------------------------------------------


def test_networks_v4_v6_and_mapped() -> None:
    nets = NetworkSet(["10.0.0.0/8", "2001:db8::/32", "::ffff:192.0.2.0/120", "198.51.100.7"])
    assert nets.contains(parse_ip("10.200.1.1"))  # type: ignore[arg-type]
    assert nets.contains(parse_ip("2001:db8:1::9"))  # type: ignore[arg-type]
    assert nets.contains(parse_ip("192.0.2.77"))  # type: ignore[arg-type]
    assert nets.contains(parse_ip("::ffff:10.1.1.1"))  # type: ignore[arg-type]
    assert nets.contains(parse_ip("198.51.100.7"))  # type: ignore[arg-type]
    assert not nets.contains(parse_ip("198.51.100.8"))  # type: ignore[arg-type]
    assert not nets.contains(parse_ip("2001:db9::1"))  # type: ignore[arg-type]
    assert parse_ip("not-an-ip") is None
    assert parse_ip("[::1]") == (6, 1)


def test_resolve_client_walks_from_the_right() -> None:
    trusted = NetworkSet(["10.0.0.0/8"])
    assert resolve_client("192.0.2.1", [b"203.0.113.9"], trusted) == "192.0.2.1"  # untrusted peer
    assert resolve_client("10.0.0.1", [b"203.0.113.9"], trusted) == "203.0.113.9"
    assert resolve_client("10.0.0.1", [b"1.1.1.1, 203.0.113.9, 10.0.0.2"], trusted) == "203.0.113.9"
    assert resolve_client("10.0.0.1", [b"1.1.1.1", b"203.0.113.9"], trusted) == "203.0.113.9"  # two fields
    assert resolve_client("10.0.0.1", [b"10.0.0.3, 10.0.0.2"], trusted) == "10.0.0.3"  # all trusted
    assert resolve_client("10.0.0.1", [b"203.0.113.9, garbage"], trusted) == "10.0.0.1"  # stop at garbage
    assert resolve_client("10.0.0.1", [b"2001:db8::1"], trusted) == "2001:db8::1"


def test_ip_filter_config_errors() -> None:
    with pytest.raises(ValidationError, match=re.escape("'10.0.0.300' is not an IP address or CIDR range")):
        IpFilterConfig.model_validate({"allow": ["10.0.0.300"]})


def test_ip_filter_decisions() -> None:
    plugin = IpFilter(IpFilterConfig(allow=["10.0.0.0/8"], deny=["10.6.6.0/24"]), ENV)

    def status(ip: str) -> int | None:
        reply = run(plugin.on_request(Context(make_request(client=ip), "r", None)))
        return None if reply is None else reply.status

    assert status("10.1.2.3") is None
    assert status("10.6.6.6") == 403
    assert status("192.0.2.1") == 403
    assert status("unix-socket") == 403


# --- cors ----------------------------------------------------------------------------------------


def cors(**config: Any) -> Cors:
    return Cors(CorsConfig.model_validate(config), ENV)


def test_cors_origin_matching() -> None:
    plugin = cors(origins=["https://app.example.com", "https://*.example.org:8443"])
    assert plugin.allowed(b"https://app.example.com")
    assert plugin.allowed(b"https://a.example.org:8443")
    assert plugin.allowed(b"https://a.b.example.org:8443")
    assert not plugin.allowed(b"https://example.org:8443")
    assert not plugin.allowed(b"https://a.example.org")
    assert not plugin.allowed(b"https://evil.com/.example.org:8443")
    assert not plugin.allowed(b"https://app.example.com.evil.com")
    assert not plugin.allowed(b"null")


@pytest.mark.parametrize("origin", ["app.example.com", "https://app.example.com/path", "https://*.*.x.com"])
def test_cors_bad_origins(origin: str) -> None:
    with pytest.raises(ValidationError):
        CorsConfig.model_validate({"origins": [origin]})


def test_cors_strips_upstream_allow_headers() -> None:
    plugin = cors(origins=["https://app.example.com"])
    upstream = [(b"access-control-allow-origin", b"*"), (b"access-control-allow-credentials", b"true"), (b"x", b"1")]
    for origin, expected in [(b"https://evil.test", None), (b"https://app.example.com", b"https://app.example.com")]:
        response = Response(200, Headers(list(upstream)))
        run(plugin.on_response(Context(make_request([(b"origin", origin)]), "r", None), response))
        assert response.headers.get_raw(b"access-control-allow-origin") == expected
        assert response.headers.get_raw(b"access-control-allow-credentials") is None
        assert response.headers.get_raw(b"x") == b"1"


def test_cors_echoes_requested_headers_with_star() -> None:
    plugin = cors(origins=["*"], headers=["*"], credentials=True)
    headers = [
        (b"origin", b"https://x.test"),
        (b"access-control-request-method", b"PUT"),
        (b"access-control-request-headers", b"x-a, x-b"),
    ]
    reply = run(plugin.on_request(Context(make_request(headers, method="OPTIONS"), "r", None)))
    assert reply.status == 204
    assert reply.headers.get("access-control-allow-origin") == "https://x.test"  # credentials: no "*"
    assert reply.headers.get("access-control-allow-headers") == "x-a, x-b"


# --- headers and rate_limit configs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"set": {"Content-Length": "1"}}, "Content-Length is managed by the gateway"),
        ({"remove": ["Transfer-Encoding"]}, "Transfer-Encoding is managed by the gateway"),
        ({"add": {"X-A": "one\r\nX-Injected: 1"}}, "cannot contain CR, LF or NUL"),
        ({"set": {"Bad Name": "1"}}, "not a header name"),
    ],
)
def test_header_plugin_config_errors(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HeadersConfig.model_validate(config)


def test_request_headers_order_remove_set_add() -> None:
    plugin = RequestHeaders(
        HeadersConfig.model_validate({"set": {"X-A": "new"}, "add": {"X-A": "more"}, "remove": ["X-B"]}), ENV
    )
    request = make_request([(b"x-a", b"old"), (b"x-b", b"gone"), (b"x-c", b"kept")])
    run(plugin.on_request(Context(request, "r", None)))
    assert request.headers.items == [(b"x-c", b"kept"), (b"x-a", b"new"), (b"x-a", b"more")]


def test_rate_limit_keys_and_policy() -> None:
    config = RateLimitConfig.model_validate({"limit": 10, "per": "1s", "key": "header:X-Tenant", "burst": 3})
    plugin = RateLimit(config, BuildEnv(ConsumerIndex(), LocalStore(), scope="orders"))
    assert plugin.policy == b"10;w=1;burst=3"
    with_header = Context(make_request([(b"x-tenant", b"acme")]), "orders", None)
    without = Context(make_request(client="192.0.2.9"), "orders", None)
    assert plugin.key_of(with_header) == "rl|orders|10/1/3|header:X-Tenant|h:acme"
    assert plugin.key_of(without) == "rl|orders|10/1/3|header:X-Tenant|ip:192.0.2.9"
    with pytest.raises(ValidationError, match="must be consumer, ip, route or header:NAME"):
        RateLimitConfig.model_validate({"limit": 1, "per": "1s", "key": "cookie:x"})
    with pytest.raises(ValidationError, match="per must be longer than 0"):
        RateLimitConfig.model_validate({"limit": 1, "per": 0})


def test_rate_limit_fails_open_or_closed() -> None:
    class Broken(LocalStore):
        async def rate(self, key: str, limit: int, period: float, burst: int, cost: int = 1) -> Any:
            raise ConnectionError("store down")

    for fail_open, expected in [(True, None), (False, 503)]:
        config = RateLimitConfig.model_validate({"limit": 1, "per": "1s", "fail_open": fail_open})
        plugin = RateLimit(config, BuildEnv(ConsumerIndex(), Broken()))
        reply = run(plugin.on_request(Context(make_request(), "r", None)))
        assert (reply.status if reply else None) == expected


# --- JWKS ----------------------------------------------------------------------------------------


def test_parse_jwks_keeps_usable_signature_keys() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP384R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    document = {
        "keys": [
            json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())) | {"kid": "r"},
            json.loads(ECAlgorithm.to_jwk(ec_key)) | {"kid": "e", "alg": "ES384"},  # a private JWK
            json.loads(OKPAlgorithm.to_jwk(ed_key.public_key())) | {"kid": "o"},
            json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())) | {"kid": "enc", "use": "enc"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not even a dict",
        ]
    }
    keys = {key.kid: key for key in parse_jwks(document)}
    assert set(keys) == {"r", "e", "o"}
    assert keys["r"].accepts("RS256") and keys["r"].accepts("PS512") and not keys["r"].accepts("ES256")
    assert keys["e"].accepts("ES384") and not keys["e"].accepts("ES256")
    assert isinstance(keys["e"].key, ec.EllipticCurvePublicKey)
    assert keys["o"].accepts("EdDSA") and not keys["o"].accepts("HS256")
    with pytest.raises(ValueError, match="not a JWKS document"):
        parse_jwks({"nope": []})


def test_key_set_without_uri_never_fetches() -> None:
    keys = KeySet()
    assert run(keys.lookup("kid", "RS256")) == []
    assert run(keys.refresh()) is False
    assert keys.statistics() == {"keys": 0, "fetches": 0, "failures": 0}


def test_a_kid_selects_only_among_jwks_keys() -> None:
    fixed = KeySet([Key(None, "oct", None, b"s" * 32)])
    assert len(fixed.candidates("abc", "HS256")) == 1  # a configured key, whatever the kid
    assert fixed.candidates("abc", "RS256") == []  # ... but never for another family
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    jwks = KeySet([Key("a", "RSA", None, rsa_key)], uri="http://127.0.0.1:9/jwks.json")
    assert len(jwks.candidates("a", "RS256")) == 1
    assert jwks.candidates("b", "RS256") == []
    assert len(jwks.candidates(None, "RS256")) == 1


def test_a_key_too_short_for_an_allowed_algorithm_is_logged_once_at_start(caplog: pytest.LogCaptureFixture) -> None:
    def started(config: dict[str, Any]) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="bastion.plugins.jwt"):
            run(Jwt(JwtConfig.model_validate(config), ENV).start())
        return [record.getMessage() for record in caplog.records]

    secret = "k" * 40  # enough for HS256 (32 bytes), short for HS384 (48) and HS512 (64)
    (message,) = started({"secret": secret})
    assert "HS384: The HMAC key is 40 bytes long" in message and "HS512:" in message
    assert "HS256" not in message and secret not in message
    assert started({"secret": secret, "algorithms": ["HS256"]}) == []
    assert started({"secret": "k" * 64}) == []
    weak_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    pem = weak_rsa.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    (message,) = started({"public_key": pem, "algorithms": ["RS256"]})
    assert "RS256: The RSA key is 1024 bits long" in message
