"""jwt through a real gateway: valid tokens, every classic attack, JWKS fetched from loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import http.server
import json
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from bastion.demo.origin import OriginHandle
from support import GatewayProcess, GatewayThread, free_port, request, send_fields, simple_config, write_config

Start = Callable[..., GatewayThread]

SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret!"  # >= 32 bytes
ISSUER = "https://id.example.test"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "app-123", "iss": ISSUER, "aud": "orders-api", "iat": now, "exp": now + 300, **extra}


def hs256(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return pyjwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def hs256_by_hand(payload: dict[str, Any], secret: bytes, **headers: Any) -> str:
    """HS256 without PyJWT, which (rightly) refuses PEM text as an HMAC secret."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", **headers}).encode())
    signing_input = f"{head}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def origin(origins: Callable[..., OriginHandle]) -> OriginHandle:
    return origins("a")


CONSUMERS = [{"name": "mobile-app", "groups": ["mobile"], "credentials": {"jwt": [{"subject": "app-123"}]}}]


def hs_gateway(gateway: Start, origin: OriginHandle, **config: Any) -> GatewayThread:
    settings = {"secret": SECRET, "issuer": ISSUER, "audiences": ["orders-api"], **config}
    return gateway(targets=[origin.port], consumers=CONSUMERS, plugins=[{"jwt": settings}])


def refused(reply: Any, status: int = 401, word: str = "invalid_token") -> str:
    assert reply.status == status, reply.body
    body = reply.json()
    assert body["error"] == word
    assert body["request_id"]
    return str(body["message"])


# --- HS256 and the claims ------------------------------------------------------------------------


def test_valid_token_forwards_claims_and_consumer(gateway: Start, origin: OriginHandle) -> None:
    gw = hs_gateway(gateway, origin, consumer_claim="sub", forward_claims={"X-User-Id": "sub", "X-Tenant": "org.id"})
    token = hs256(claims(org={"id": 42}))
    reply = request(gw.port, headers={**bearer(token), "X-User-Id": "spoofed", "X-Tenant": "spoofed"})
    assert reply.status == 200, reply.body
    seen = reply.json()["headers"]
    assert seen["x-user-id"] == "app-123"
    assert seen["x-tenant"] == "42"
    assert seen["x-consumer"] == "mobile-app"
    # Cached on the second use: same result.
    assert request(gw.port, headers=bearer(token)).json()["headers"]["x-consumer"] == "mobile-app"


def test_forged_claim_headers_are_removed_even_when_the_claim_is_absent(gateway: Start, origin: OriginHandle) -> None:
    gw = hs_gateway(gateway, origin, forward_claims={"X-Role": "role"})
    reply = request(gw.port, headers={**bearer(hs256(claims())), "X-Role": "admin"})
    assert reply.status == 200
    assert "x-role" not in reply.json()["headers"]


def test_missing_token(gateway: Start, origin: OriginHandle) -> None:
    gw = hs_gateway(gateway, origin)
    reply = request(gw.port)
    refused(reply, word="missing_credentials")
    assert reply.header("WWW-Authenticate") == 'Bearer realm="bastion"'
    refused(request(gw.port, headers={"Authorization": "Basic abc"}), word="missing_credentials")


def test_alg_none_is_rejected(gateway: Start, origin: OriginHandle) -> None:
    gw = hs_gateway(gateway, origin)
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    token = f"{header}.{b64(json.dumps(claims()).encode())}."
    message = refused(request(gw.port, headers=bearer(token)))
    assert "algorithm" in message
    for alg in ("None", "NONE", "nOnE"):
        header = b64(json.dumps({"alg": alg}).encode())
        refused(request(gw.port, headers=bearer(f"{header}.{b64(json.dumps(claims()).encode())}.")))


def test_forged_signature(gateway: Start, origin: OriginHandle) -> None:
    gw = hs_gateway(gateway, origin)
    other = hs256(claims(), secret="another-secret-another-secret-12345")
    assert "signature" in refused(request(gw.port, headers=bearer(other)))
    # A valid token whose payload was swapped for another one.
    head, _, sig = hs256(claims()).split(".")
    tampered = f"{head}.{b64(json.dumps(claims(sub='admin')).encode())}.{sig}"
    assert "signature" in refused(request(gw.port, headers=bearer(tampered)))


def test_expired_and_leeway(gateway: Start, origin: OriginHandle) -> None:
    gw = hs_gateway(gateway, origin)
    expired = hs256(claims(exp=int(time.time()) - 10))
    assert "expired" in refused(request(gw.port, headers=bearer(expired)))
    lenient = hs_gateway(gateway, origin, leeway="1m")
    assert request(lenient.port, headers=bearer(expired)).status == 200


def test_not_yet_valid(gateway: Start, origin: OriginHandle) -> None:
    gw = hs_gateway(gateway, origin)
    future = hs256(claims(nbf=int(time.time()) + 120))
    assert "not valid yet" in refused(request(gw.port, headers=bearer(future)))


def test_wrong_issuer_and_audience(gateway: Start, origin: OriginHandle) -> None:
    gw = hs_gateway(gateway, origin)
    assert "issuer" in refused(request(gw.port, headers=bearer(hs256(claims(iss="https://evil.test")))))
    assert "audience" in refused(request(gw.port, headers=bearer(hs256(claims(aud="billing-api")))))
    assert request(gw.port, headers=bearer(hs256(claims(aud=["billing-api", "orders-api"])))).status == 200


def test_required_claims(gateway: Start, origin: OriginHandle) -> None:
    gw = hs_gateway(gateway, origin)
    no_exp = claims()
    del no_exp["exp"]
    assert "claim" in refused(request(gw.port, headers=bearer(hs256(no_exp))))


def test_scopes(gateway: Start, origin: OriginHandle) -> None:
    gw = hs_gateway(gateway, origin, required_scopes=["orders:read", "orders:list"])
    reply = request(gw.port, headers=bearer(hs256(claims(scope="orders:read profile"))))
    refused(reply, 403, "insufficient_scope")
    assert reply.header("WWW-Authenticate") == (
        'Bearer realm="bastion", error="insufficient_scope", scope="orders:read orders:list"'
    )
    assert request(gw.port, headers=bearer(hs256(claims(scope="orders:list orders:read")))).status == 200
    assert request(gw.port, headers=bearer(hs256(claims(scp=["orders:read", "orders:list"])))).status == 200
    refused(request(gw.port, headers=bearer(hs256(claims()))), 403, "insufficient_scope")


def test_unknown_consumer(gateway: Start, origin: OriginHandle) -> None:
    gw = hs_gateway(gateway, origin, consumer_claim="sub")
    refused(request(gw.port, headers=bearer(hs256(claims(sub="stranger")))), word="unknown_consumer")


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        "....",
        b64(b"not json") + "." + b64(b"{}") + ".",
        b64(json.dumps({"alg": "HS256", "kid": 7}).encode()) + "." + b64(b"{}") + ".sig",
        b64(json.dumps({"alg": "HS256"}).encode()) + "." + b64(b"[1,2]") + ".sig",
        b64(json.dumps(["alg"]).encode()) + "." + b64(b"{}") + ".sig",
        "é.é.é",
    ],
)
def test_malformed_tokens_are_401_not_500(gateway: Start, origin: OriginHandle, token: str) -> None:
    gw = hs_gateway(gateway, origin)
    reply = request(gw.port, headers={"Authorization": "Bearer " + token})
    refused(reply)


def test_token_in_query_hidden_from_upstream(gateway: Start, origin: OriginHandle) -> None:
    gw = hs_gateway(gateway, origin, **{"in": ["header:Authorization", "query:jwt"], "hide_credentials": True})
    reply = request(gw.port, path=f"/x?jwt={hs256(claims())}&keep=1")
    assert reply.status == 200
    assert reply.json()["path"] == "/x?keep=1"
    reply = request(gw.port, headers=bearer(hs256(claims())))
    assert "authorization" not in reply.json()["headers"]
    # Only the token is hidden: an Authorization of another scheme is not the token.
    reply = request(gw.port, path=f"/x?jwt={hs256(claims())}", headers={"Authorization": "Basic YTpi"})
    assert reply.json()["path"] == "/x"
    assert reply.json()["headers"]["authorization"] == "Basic YTpi"


def test_a_token_given_twice_is_refused(gateway: Start, origin: OriginHandle) -> None:
    """Two tokens: the gateway would verify one and the upstream might read the other."""
    gw = hs_gateway(gateway, origin, **{"in": ["header:Authorization", "query:jwt", "cookie:jwt"]})
    good, forged = hs256(claims()), hs256(claims(sub="admin"), secret="another-secret-another-secret-12345")
    cases: list[tuple[list[tuple[str, str]], str]] = [
        ([("Authorization", f"Bearer {good}"), ("Authorization", f"Bearer {forged}")], "/"),
        ([("Authorization", f"Bearer {good}"), ("Authorization", f"Bearer {good}")], "/"),
        ([("Authorization", f"Bearer {good}"), ("Authorization", "Basic YTpi")], "/"),  # two fields, any scheme
        ([("Authorization", f"Bearer {good}")], f"/?jwt={forged}"),
        ([], f"/?jwt={good}&jwt={forged}"),
        ([("Cookie", f"jwt={good}; jwt={forged}")], "/"),
        ([("Cookie", f"jwt={good}")], f"/?jwt={good}"),
    ]
    for fields, path in cases:
        reply = send_fields(gw.port, fields, path)
        assert refused(reply, word="ambiguous_credentials")
        assert reply.header("WWW-Authenticate") == 'Bearer realm="bastion", error="invalid_request"'
    assert origin.origin.requests == 0
    # A Basic Authorization is not a bearer token: the token in the query is the only one.
    assert send_fields(gw.port, [("Authorization", "Basic YTpi")], f"/?jwt={good}").status == 200


def test_a_configured_key_ignores_the_kid(gateway: Start, origin: OriginHandle, rsa_key: rsa.RSAPrivateKey) -> None:
    """With one configured secret or public key there is nothing for a kid to choose."""
    gw = hs_gateway(gateway, origin)
    assert request(gw.port, headers=bearer(hs256(claims(), kid="abc"))).status == 200
    other = hs256(claims(), secret="another-secret-another-secret-12345", kid="abc")
    assert "signature" in refused(request(gw.port, headers=bearer(other)))
    pem = gateway(targets=[origin.port], plugins=[{"jwt": {"public_key": public_pem(rsa_key)}}])
    token = pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "2024-rotation"})
    assert request(pem.port, headers=bearer(token)).status == 200


def test_jwt_consumer_then_acl(gateway: Start, origin: OriginHandle) -> None:
    plugins = [
        {"acl": {"allow_groups": ["mobile"]}},
        {"jwt": {"secret": SECRET, "consumer_claim": "sub"}},
    ]
    consumers = [*CONSUMERS, {"name": "web", "groups": ["web"], "credentials": {"jwt": [{"subject": "web-1"}]}}]
    gw = gateway(targets=[origin.port], consumers=consumers, plugins=plugins)
    assert request(gw.port, headers=bearer(hs256(claims()))).status == 200
    refused(request(gw.port, headers=bearer(hs256(claims(sub="web-1")))), 403, "forbidden")


def test_acl_401_carries_the_routes_challenges(gateway: Start, origin: OriginHandle) -> None:
    """jwt without consumer_claim accepts a token but names no consumer: acl's 401 then says
    how to authenticate, as every 401 must (RFC 9110 15.5.2), with its route's challenges."""
    routes = [
        {"name": "one", "match": {"path": "/one"}, "upstream": "app"},
        {
            "name": "two",
            "match": {"path": "/two"},
            "upstream": "app",
            "plugins": [{"jwt": {"secret": SECRET, "realm": "b"}}],
        },
    ]
    plugins = [{"jwt": {"secret": SECRET, "realm": "a"}}, {"acl": {"allow_groups": ["x"]}}]
    gw = gateway(targets=[origin.port], plugins=plugins, routes=routes)
    token = bearer(hs256(claims()))
    one = request(gw.port, path="/one", headers=token)
    refused(one, 401, "unauthenticated")
    assert one.header_all("WWW-Authenticate") == ['Bearer realm="a"']
    two = request(gw.port, path="/two", headers=token)
    refused(two, 401, "unauthenticated")
    assert two.header_all("WWW-Authenticate") == ['Bearer realm="a"', 'Bearer realm="b"']
    assert origin.origin.requests == 0


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: \S")


def test_pyjwt_warnings_are_log_records(tmp_path: Path, origin: OriginHandle) -> None:
    """A 35-byte secret is below what HS512 wants (RFC 7518 3.2): said once when the config is
    built, and PyJWT's own per-token warning comes out through logging, not raw on stderr."""
    port = free_port()
    settings = {"secret": SECRET, "algorithms": ["HS256", "HS512"]}
    path = write_config(tmp_path / "gw.yaml", simple_config(port, [origin.port], plugins=[{"jwt": settings}]))
    gw = GatewayProcess(path, port)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the same warning, in this process, when signing
            token = pyjwt.encode(claims(), SECRET, algorithm="HS512")
        assert request(port, headers=bearer(token)).status == 200
    finally:
        _, _, err = gw.stop()
    lines = err.splitlines()
    assert all(LOG_LINE.match(line) for line in lines), err  # every line of stderr is a log record
    built = [line for line in lines if " WARNING bastion.plugins.jwt: " in line]
    assert len(built) == 1, err
    assert "HS512" in built[0] and "35 bytes" in built[0] and SECRET not in built[0]
    per_token = " WARNING py.warnings: InsecureKeyLengthWarning: The HMAC key is 35 bytes long"
    assert any(per_token in line for line in lines), err


# --- public keys: key confusion --------------------------------------------------------------------


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_rs256_with_a_public_key(gateway: Start, origin: OriginHandle, rsa_key: rsa.RSAPrivateKey) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"jwt": {"public_key": public_pem(rsa_key)}}])
    assert request(gw.port, headers=bearer(pyjwt.encode(claims(), rsa_key, algorithm="RS256"))).status == 200
    assert request(gw.port, headers=bearer(pyjwt.encode(claims(), rsa_key, algorithm="PS384"))).status == 200


def test_hs256_signed_with_the_public_key_is_rejected(
    gateway: Start, origin: OriginHandle, rsa_key: rsa.RSAPrivateKey
) -> None:
    """The classic: the attacker signs HS256 using the (public) RSA PEM as the HMAC secret."""
    pem = public_pem(rsa_key)
    gw = gateway(targets=[origin.port], plugins=[{"jwt": {"public_key": pem}}])
    token = hs256_by_hand(claims(), pem.encode())
    assert "algorithm" in refused(request(gw.port, headers=bearer(token)))
    # Even listing HS256 next to a public key is refused at load time.
    with pytest.raises(Exception, match="key confusion"):
        gateway(targets=[origin.port], plugins=[{"jwt": {"public_key": pem, "algorithms": ["RS256", "HS256"]}}])


def test_algorithm_allow_list(gateway: Start, origin: OriginHandle, rsa_key: rsa.RSAPrivateKey) -> None:
    gw = gateway(targets=[origin.port], plugins=[{"jwt": {"public_key": public_pem(rsa_key), "algorithms": ["RS256"]}}])
    assert request(gw.port, headers=bearer(pyjwt.encode(claims(), rsa_key, algorithm="RS256"))).status == 200
    refused(request(gw.port, headers=bearer(pyjwt.encode(claims(), rsa_key, algorithm="RS512"))))


# --- JWKS --------------------------------------------------------------------------------------------


class JwksServer:
    """A JWKS endpoint on loopback whose document (and health) the test controls."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.hits = 0
        self.failing = False
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                if owner.failing:
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, jwk: dict[str, Any], kid: str, alg: str | None = None) -> None:
        entry = {**jwk, "kid": kid, "use": "sig"}
        if alg:
            entry["alg"] = alg
        self.keys.append(entry)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_jwks_every_asymmetric_family(
    gateway: Start, origin: OriginHandle, jwks: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    jwks.add(json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())), "rsa-1")
    jwks.add(json.loads(ECAlgorithm.to_jwk(ec_key.public_key())), "ec-1", "ES256")
    jwks.add(json.loads(OKPAlgorithm.to_jwk(ed_key.public_key())), "ed-1")
    config = {"jwks_uri": jwks.url, "issuer": ISSUER, "audiences": ["orders-api"]}
    gw = gateway(targets=[origin.port], plugins=[{"jwt": config}])
    for key, alg, kid in [
        (rsa_key, "RS256", "rsa-1"),
        (rsa_key, "PS256", "rsa-1"),
        (ec_key, "ES256", "ec-1"),
        (ed_key, "EdDSA", "ed-1"),
    ]:
        token = pyjwt.encode(claims(), key, algorithm=alg, headers={"kid": kid})
        assert request(gw.port, headers=bearer(token)).status == 200, alg
    # A key pinned to ES256 does not verify ES384, and a kid of another family does not help.
    wrong_family = pyjwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "rsa-1"})
    refused(request(gw.port, headers=bearer(wrong_family)))
    # HS256 signed with the RSA JWK's bytes: HS* is not even allowed with a JWKS.
    forged = hs256_by_hand(claims(), public_pem(rsa_key).encode(), kid="rsa-1")
    assert "algorithm" in refused(request(gw.port, headers=bearer(forged)))


def test_jwks_unknown_kid_refresh_is_rate_limited_and_stale_keys_survive(
    gateway: Start, origin: OriginHandle, jwks: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks.add(json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())), "old")
    config = {"jwks_uri": jwks.url, "jwks_min_refresh": "300ms", "jwks_refresh": "1h"}
    gw = gateway(targets=[origin.port], plugins=[{"jwt": config}])
    wait_for(lambda: jwks.hits >= 1)
    old_token = pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "old"})
    assert request(gw.port, headers=bearer(old_token)).status == 200

    # A new key appears at the provider; a token naming it makes the gateway fetch again.
    time.sleep(0.35)
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks.keys = [json.loads(RSAAlgorithm.to_jwk(new_key.public_key())) | {"kid": "new"}, *jwks.keys]
    hits = jwks.hits
    new_token = pyjwt.encode(claims(), new_key, algorithm="RS256", headers={"kid": "new"})
    assert request(gw.port, headers=bearer(new_token)).status == 200
    assert jwks.hits == hits + 1

    # Made-up kids right after: refused without hammering the provider.
    for i in range(5):
        fake = pyjwt.encode(claims(), new_key, algorithm="RS256", headers={"kid": f"made-up-{i}"})
        assert "key is not known" in refused(request(gw.port, headers=bearer(fake)))
    assert jwks.hits == hits + 1

    # The provider goes down: the fetch fails, the keys already known keep working.
    jwks.failing = True
    time.sleep(0.35)
    fake = pyjwt.encode(claims(), new_key, algorithm="RS256", headers={"kid": "made-up-again"})
    refused(request(gw.port, headers=bearer(fake)))
    assert jwks.hits == hits + 2
    assert request(gw.port, headers=bearer(old_token)).status == 200
    assert request(gw.port, headers=bearer(new_token)).status == 200


def test_jwks_endpoint_down_at_start(gateway: Start, origin: OriginHandle, jwks: JwksServer) -> None:
    jwks.failing = True
    gw = gateway(targets=[origin.port], plugins=[{"jwt": {"jwks_uri": jwks.url, "jwks_min_refresh": "100ms"}}])
    key = ec.generate_private_key(ec.SECP256R1())
    token = pyjwt.encode(claims(), key, algorithm="ES256", headers={"kid": "k"})
    refused(request(gw.port, headers=bearer(token)))
    jwks.failing = False
    jwks.add(json.loads(ECAlgorithm.to_jwk(key.public_key())), "k")
    time.sleep(0.15)
    assert request(gw.port, headers=bearer(token)).status == 200
