"""bastion push / versions / consumers against a real redis-server, and run's option checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cluster_support import bastion

from redis_support import RedisServer

CONFIG = """\
version: 1
listeners: [{ name: web, bind: "127.0.0.1:${PORT:-8080}" }]
"""


def write(tmp_path: Path, text: str, name: str = "gw.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_push_stores_the_text_as_written_and_numbers_versions(tmp_path: Path, redis_server: RedisServer) -> None:
    path = write(tmp_path, CONFIG)
    code, out = bastion("push", path, "--redis", redis_server.url, "-m", "first")
    assert code == 0 and "pushed version 1" in out
    code, out = bastion("push", path, "--redis", redis_server.url)
    assert code == 0 and "unchanged: version 1" in out  # same text: no new version
    write(tmp_path, CONFIG + "log: { access: false }\n")
    assert "pushed version 2" in bastion("push", path, "--redis", redis_server.url)[1]
    client = redis_server.client()
    stored = client.hgetall("{bastion}:config:v:1")
    assert stored[b"config"].decode() == CONFIG
    assert stored[b"sha256"].decode() == hashlib.sha256(CONFIG.encode()).hexdigest()
    assert stored[b"message"] == b"first" and stored[b"file"] == b"gw.yaml"
    assert client.get("{bastion}:config:current").decode().startswith("2:")
    code, out = bastion("versions", "--redis", redis_server.url)
    lines = out.splitlines()
    assert code == 0 and lines[1].startswith("* 2") and lines[2].startswith("  1") and "first" in lines[2]
    assert bastion("versions", "--redis", redis_server.url, "--show", "1") == (0, CONFIG)
    code, out = bastion("versions", "--redis", redis_server.url, "--show", "7")
    assert code == 1 and "no version 7" in out


def test_push_refuses_an_invalid_config_and_stores_nothing(tmp_path: Path, redis_server: RedisServer) -> None:
    path = write(tmp_path, CONFIG + "listners: []\n")
    code, out = bastion("push", path, "--redis", redis_server.url)
    assert code == 1 and "unknown key" in out
    bad_plugin = CONFIG + "plugins: [{ rate_limit: { limit: 0, per: 1s } }]\n"
    code, out = bastion("push", write(tmp_path, bad_plugin), "--redis", redis_server.url)
    assert code == 1 and "plugins[0].rate_limit.limit" in out
    assert redis_server.client().keys("*") == []


def test_push_takes_redis_and_prefix_from_the_config_or_asks(tmp_path: Path, redis_server: RedisServer) -> None:
    code, out = bastion("push", write(tmp_path, CONFIG))
    assert code == 2 and "--redis URL" in out
    with_cluster = CONFIG + f'cluster: {{ redis: "{redis_server.url}", prefix: staging }}\n'
    code, out = bastion("push", write(tmp_path, with_cluster))
    assert code == 0 and "prefix staging" in out
    assert redis_server.client().exists("{staging}:config:v:1")
    code, out = bastion("versions", "--redis", redis_server.url)
    assert "no versions" in out  # another prefix
    assert "* 1" in bastion("versions", "--redis", redis_server.url, "--prefix", "staging")[1]


def test_an_unreachable_redis_is_one_clear_line(tmp_path: Path) -> None:
    code, out = bastion("versions", "--redis", "redis://:pw@127.0.0.1:1/0")
    assert code == 1 and out.startswith("bastion: Redis at redis://:***@127.0.0.1:1/0:") and "pw" not in out


def test_consumers_add_list_remove(redis_server: RedisServer) -> None:
    url = redis_server.url
    code, out = bastion("consumers", "add", "app", "--redis", url, "--key", "k1", "--group", "mobile", "--jwt", "s1")
    assert code == 0 and "rev 1" in out
    stored = json.loads(redis_server.client().hget("{bastion}:consumers", "app") or b"")
    assert stored["credentials"]["key_auth"] == [{"key_sha256": hashlib.sha256(b"k1").hexdigest()}]
    assert stored["groups"] == ["mobile"]
    code, out = bastion("consumers", "add", "app", "--redis", url, "--key", "k2")
    assert code == 1 and "already exists" in out
    code, out = bastion("consumers", "add", "other", "--redis", url, "--key", "-", stdin="k1\n")
    assert code == 1 and "key already used by consumer 'app'" in out
    code, out = bastion("consumers", "add", "other", "--redis", url, "--basic-auth", "bob:plain")
    assert code == 1 and "not a bcrypt" in out
    code, out = bastion("consumers", "add", "app", "--redis", url, "--key-sha256", "00" * 32, "--replace")
    assert code == 0
    code, out = bastion("consumers", "list", "--redis", url)
    assert code == 0 and out.splitlines()[1].split() == ["app", "-", "1", "0", "0", "0"]
    code, out = bastion("consumers", "add", "svc", "--redis", url, "--cert-sha256", "AB:" * 31 + "AB")
    assert code == 0
    stored = json.loads(redis_server.client().hget("{bastion}:consumers", "svc") or b"")
    assert stored["credentials"]["mtls_auth"] == [{"fingerprint_sha256": "ab" * 32}]
    code, out = bastion("consumers", "add", "svc2", "--redis", url, "--cert-subject", "cn=svc")
    assert code == 1 and "not an RFC 4514 subject" in out
    assert bastion("consumers", "remove", "svc", "--redis", url)[0] == 0
    assert bastion("consumers", "remove", "app", "--redis", url)[0] == 0
    code, out = bastion("consumers", "remove", "app", "--redis", url)
    assert code == 1 and "no consumer 'app'" in out
    assert "no consumers" in bastion("consumers", "list", "--redis", url)[1]
    assert redis_server.client().get("{bastion}:consumers:rev") == b"5"


def test_run_wants_a_file_or_a_redis_not_both(tmp_path: Path) -> None:
    assert bastion("run")[0] == 2
    code, out = bastion("run", write(tmp_path, CONFIG), "--from-redis", "redis://127.0.0.1:1/0")
    assert code == 2 and "not both" in out
    code, out = bastion("run", "--from-redis", "http://x")
    assert code == 2 and "not a Redis URL" in out


def test_check_never_shows_the_redis_password(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG + 'cluster: { redis: "redis://:hunter2@10.0.0.5:6379/0" }\n')
    code, out = bastion("check", path)
    assert code == 0 and "cluster: redis://:***@10.0.0.5:6379/0 (prefix bastion)" in out and "hunter2" not in out
