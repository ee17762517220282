"""Cluster URLs and the `cluster` section: parsing, errors, redaction, and no redis import without it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from bastion.cluster.connect import Keys, parse_url, redact
from bastion.config.loader import load_config_text
from bastion.errors import ConfigError

BASE = """
version: 1
listeners: [{ name: web, bind: "127.0.0.1:8080" }]
"""


def test_plain_urls_go_to_redis_py_as_they_are() -> None:
    url = parse_url("rediss://user:s%40cret@cache.internal:6380/2?ssl_cert_reqs=none")
    assert (url.kind, url.tls, url.nodes, url.db) == ("plain", True, (("cache.internal", 6380),), 2)
    assert (url.username, url.password) == ("user", "s@cret")
    assert parse_url("unix:///run/redis.sock?db=1").kind == "plain"


def test_sentinel_and_cluster_urls_list_their_seed_nodes() -> None:
    url = parse_url("redis+sentinel://:pw@10.0.0.1,10.0.0.2:26380/mymaster/3?sentinel_password=x")
    assert url.kind == "sentinel"
    assert url.nodes == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (url.service, url.db, url.password, url.options) == ("mymaster", 3, "pw", {"sentinel_password": "x"})
    url = parse_url("rediss+cluster://[::1]:7000,[::1]:7001")
    assert (url.kind, url.tls, url.nodes) == ("cluster", True, (("::1", 7000), ("::1", 7001)))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://x", "not a Redis URL"),
        ("redis://", "names no host"),
        ("redis://h:99999", "bad port"),
        ("redis://h/abc", "database number"),
        ("redis+sentinel://h:26379", "service name"),
        ("redis+cluster://h:7000/0", "no path"),
        ("redis+cluster://h:7000?foo=1", "unknown URL option 'foo'"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_url(url)


def test_passwords_are_redacted() -> None:
    assert redact("redis://:secret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("redis://user:secret@h/0") == "redis://user:***@h/0"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"


def test_config_and_consumer_keys_share_one_cluster_slot_rate_keys_do_not() -> None:
    keys = Keys("prod")
    tagged = [keys.config_seq, keys.config_current, keys.config_history, keys.config_version(3), keys.consumers]
    assert all(key.startswith("{prod}:") for key in tagged)
    assert keys.rate == "prod:rl:"
    with pytest.raises(ValueError):
        Keys("bad prefix")


def test_the_cluster_section_defaults_and_errors() -> None:
    loaded = load_config_text(BASE + 'cluster: { redis: "redis://127.0.0.1:6379/0" }\n')
    cluster = loaded.config.cluster
    assert cluster is not None
    assert (cluster.on_store_error, cluster.timeout, cluster.retry_interval, cluster.pool_size, cluster.prefix) == (
        "allow",
        0.25,
        1.0,
        8,
        "bastion",
    )
    with pytest.raises(ConfigError) as info:
        load_config_text(BASE + 'cluster: { redis: "redis://:hunter2@h/x", on_store_error: maybe }\n', "c.yaml")
    text = "\n".join(info.value.problems)
    assert "c.yaml:4: cluster.redis: the path of a redis:// URL is a database number" in text
    assert "cluster.on_store_error" in text
    assert "hunter2" not in text  # a URL may hold a password: never echoed


def test_a_gateway_without_cluster_never_imports_redis(tmp_path: object) -> None:
    code = textwrap.dedent(
        """
        import sys, asyncio
        from bastion.config.loader import load_config_text
        from bastion.config.build import build_snapshot
        from bastion.upstream.targets import TargetRegistry
        import bastion.app, bastion.cli
        text = '''
        version: 1
        listeners: [{ name: web, bind: "127.0.0.1:8080" }]
        upstreams: { a: { targets: [{ address: "127.0.0.1:9" }] } }
        routes: [{ name: r, upstream: a, plugins: [{ rate_limit: { limit: 1, per: 1s } }] }]
        '''
        snapshot = build_snapshot(load_config_text(text), TargetRegistry())
        asyncio.run(snapshot.plugins[0].on_request.__self__.store.rate("k", 1, 1.0, 1))
        print(sorted(m for m in sys.modules if m == "redis" or m.startswith("redis.")))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
