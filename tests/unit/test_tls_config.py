"""TLS keys in the config: what is refused, with which line and key path, and what the
files a config names must hold (checked when building, as `bastion check` does)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bastion.config.build import check_config
from bastion.config.loader import LoadedConfig, load_config, load_config_text
from bastion.errors import ConfigError
from tls_support import Pki

HTTPS = """\
version: 1
listeners:
  - name: web-tls
    bind: "127.0.0.1:8443"
    protocol: https
    tls:
      certificates:
        - { cert: api.pem, key: api.key }
upstreams:
  app:
    targets: [{ address: "127.0.0.1:9001" }]
routes:
  - { name: all, match: { path: / }, upstream: app }
"""


def load_problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(text), "gw.yaml", env={})
    return info.value.problems


def build_problems(directory: Path, text: str) -> list[str]:
    path = directory / "gw.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        check_config(load_config(path, env={}))
    return [problem.replace(f"{path}:", "gw.yaml:") for problem in info.value.problems]


def loaded(directory: Path, text: str) -> LoadedConfig:
    path = directory / "gw.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, env={})


# --- shapes the models refuse ------------------------------------------------------------------


def test_https_needs_tls_and_tls_needs_https() -> None:
    text = HTTPS.replace("    tls:\n      certificates:\n        - { cert: api.pem, key: api.key }\n", "")
    assert load_problems(text) == [
        "gw.yaml:3: listeners[0]: an https listener needs tls: { certificates: [{ cert: ..., key: ... }] }"
    ]
    assert load_problems(HTTPS.replace("protocol: https", "protocol: http")) == [
        "gw.yaml:3: listeners[0]: tls is for https and tcp listeners (this one is http)"
    ]


def test_redirect_https_is_for_http_listeners_and_a_port() -> None:
    assert load_problems(HTTPS.replace("    protocol: https\n", "    protocol: https\n    redirect_https: 443\n")) == [
        "gw.yaml:3: listeners[0]: redirect_https is for http listeners"
    ]
    plain = 'version: 1\nlisteners:\n  - { name: web, bind: "127.0.0.1:80", redirect_https: 70000 }\n'
    assert load_problems(plain) == [
        "gw.yaml:3: listeners[0].redirect_https: Input should be less than or equal to 65535 (got 70000)"
    ]


def test_http2_on_a_plain_listener_is_refused_and_accepted_on_https(tmp_path: Path) -> None:
    plain = 'version: 1\nlisteners:\n  - { name: web, bind: "127.0.0.1:80", http2: true }\n'
    assert "cleartext HTTP/2 is http2: prior_knowledge" in load_problems(plain)[0]
    prior = 'version: 1\nlisteners:\n  - { name: web, bind: "127.0.0.1:80", http2: prior_knowledge }\n'
    assert load_config_text(prior, "gw.yaml").config.listeners[0].http2 == "prior_knowledge"
    Pki(tmp_path).issue("api", "api.example.com")
    config = loaded(tmp_path, HTTPS.replace("    protocol: https\n", "    protocol: https\n    http2: true\n"))
    assert config.config.listeners[0].http2 is True
    check_config(config)
    pk = HTTPS.replace("    protocol: https\n", "    protocol: https\n    http2: prior_knowledge\n")
    assert "prior_knowledge is for http listeners" in load_problems(pk)[0]


def test_min_version_takes_1_2_and_1_3_quoted_or_not() -> None:
    assert (
        load_config_text(
            HTTPS.replace("        - { cert", "      min_version: 1.3\n        - { cert").replace(
                "      certificates:\n      min_version: 1.3\n", "      min_version: 1.3\n      certificates:\n"
            ),
            "gw.yaml",
            env={},
        )
        .config.listeners[0]
        .tls.min_version
        == "1.3"
    )  # type: ignore[union-attr]
    text = HTTPS.replace("      certificates:", '      min_version: "1.1"\n      certificates:')
    assert load_problems(text) == [
        "gw.yaml:7: listeners[0].tls.min_version: Input should be '1.2' or '1.3' (got '1.1')"
    ]


def test_upstream_tls_shapes() -> None:
    def with_tls(block: str) -> str:
        target = '    targets: [{ address: "127.0.0.1:9001" }]\n'
        return HTTPS.replace(target, f"{target}    tls: {block}\n")

    assert load_problems(with_tls('{ sni: "not a name" }')) == [
        "gw.yaml:12: upstreams.app.tls.sni: not a host name: 'not a name'"
    ]
    assert load_problems(with_tls("{ cert: c.pem }")) == [
        "gw.yaml:12: upstreams.app.tls: give both cert and key, or neither"
    ]


def test_mtls_credentials_take_one_well_formed_form() -> None:
    consumers = """\
consumers:
  - name: a
    credentials:
      mtls_auth:
        - { fingerprint_sha256: "zz" }
        - { subject: "cn=app, o=Example" }
        - { }
"""
    problems = load_problems(HTTPS + consumers)
    assert problems[0] == (
        "gw.yaml:18: consumers[0].credentials.mtls_auth[0].fingerprint_sha256: "
        "not a SHA-256 fingerprint (64 hex digits, colons allowed)"
    )
    assert problems[1].startswith("gw.yaml:19: consumers[0].credentials.mtls_auth[1].subject: not an RFC 4514 subject")
    assert problems[2] == "gw.yaml:20: consumers[0].credentials.mtls_auth[2]: give one of fingerprint_sha256 or subject"


def test_mtls_auth_needs_a_listener_that_asks_for_client_certificates() -> None:
    text = HTTPS.replace("upstream: app }", "upstream: app, plugins: [{ mtls_auth: {} }] }")
    assert load_problems(text) == ["gw.yaml:2: listeners: mtls_auth is used but no https listener sets tls.client_ca"]


# --- files, checked when building -----------------------------------------------------------


def test_relative_files_start_at_the_config_directory(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pki.issue("api", "api.example.com", "*.example.com")
    certs = check_config(loaded(tmp_path, HTTPS))
    assert [cert.names for cert in certs["127.0.0.1:8443"].certificates] == [["api.example.com", "*.example.com"]]
    assert certs["127.0.0.1:8443"].certificates[0].cert_path == str(tmp_path / "api.pem")


def test_missing_and_malformed_files_are_problems_at_their_keys(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pki.issue("good", "good.example.com")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    text = HTTPS.replace(
        "        - { cert: api.pem, key: api.key }\n",
        "        - { cert: api.pem, key: api.key }\n"
        "        - { cert: junk.pem, key: good.key }\n"
        "        - { cert: good.pem, key: junk.pem }\n"
        "      client_ca: nowhere/ca.pem\n",
    ).replace(
        '    targets: [{ address: "127.0.0.1:9001" }]\n',
        '    targets: [{ address: "127.0.0.1:9001" }]\n    tls: { ca: junk.pem }\n',
    )
    problems = build_problems(tmp_path, text)
    assert problems == [
        f"gw.yaml:8: listeners[0].tls.certificates[0].cert: cannot read {tmp_path}/api.pem: No such file or directory",
        f"gw.yaml:9: listeners[0].tls.certificates[1].cert: {tmp_path}/junk.pem holds no PEM certificate",
        f"gw.yaml:10: listeners[0].tls.certificates[2].key: {tmp_path}/junk.pem holds no PEM private key",
        f"gw.yaml:11: listeners[0].tls.client_ca: cannot read {tmp_path}/nowhere/ca.pem: No such file or directory",
        f"gw.yaml:15: upstreams.app.tls.ca: {tmp_path}/junk.pem holds no PEM certificate",
    ]


def test_an_encrypted_key_is_a_problem(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    pki = Pki(tmp_path)
    _, key = pki.issue("api", "api.example.com")
    private = serialization.load_pem_private_key(Path(key).read_bytes(), None)
    Path(key).write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert build_problems(tmp_path, HTTPS) == [
        f"gw.yaml:8: listeners[0].tls.certificates[0].key: {key} is encrypted (give the key without a passphrase)"
    ]


def test_a_certificate_fingerprint_used_by_two_consumers_is_a_problem(tmp_path: Path) -> None:
    Pki(tmp_path).issue("api", "api.example.com")
    digest = "ab" * 32
    colons = ":".join(digest[i : i + 2] for i in range(0, 64, 2))
    consumers = f"""\
consumers:
  - {{ name: a, credentials: {{ mtls_auth: [{{ fingerprint_sha256: "{digest.upper()}" }}] }} }}
  - {{ name: b, credentials: {{ mtls_auth: [{{ fingerprint_sha256: "{colons}" }}] }} }}
"""
    assert build_problems(tmp_path, HTTPS + consumers) == [
        "gw.yaml:16: consumers[1].credentials.mtls_auth[0].fingerprint_sha256: already used by consumer 'a'"
    ]
