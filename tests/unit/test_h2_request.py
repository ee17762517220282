"""build_request: the request of a stream's head, the same with its caches warm or cold."""

from __future__ import annotations

import pytest

from bastion.config.build import build_snapshot
from bastion.config.loader import load_config_text
from bastion.errors import BadRequest
from bastion.proto import h2_request
from bastion.proto.h2_request import Client, Malformed, build_request
from bastion.upstream.targets import TargetRegistry

CONFIG = """
version: 1
listeners: [{name: web, bind: "127.0.0.1:1", http2: prior_knowledge}]
upstreams: {app: {targets: [{address: "127.0.0.1:1"}]}}
routes: [{name: all, match: {path: /}, upstream: app}]
"""
SNAPSHOT = build_snapshot(load_config_text(CONFIG), TargetRegistry())
LISTENER = SNAPSHOT.config.listeners[0]
CLIENT = Client("127.0.0.1", 5000, "http", None)


def _head(path: bytes) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":scheme", b"http"), (b":path", path), (b":authority", b"a.example")]


@pytest.mark.parametrize(
    ("path", "route_path", "query"),
    [(b"/a//b/./c?x=1&y", "/a/b/c", "x=1&y"), (b"/%7Euser/", "/~user/", ""), (b"/plain", "/plain", "")],
)
def test_the_same_path_and_query_from_a_warm_cache(path: bytes, route_path: str, query: str) -> None:
    h2_request._TARGETS.clear()
    for _ in range(2):
        request = build_request(_head(path), SNAPSHOT.request_drop, LISTENER, CLIENT)
        assert (request.path, request.query) == (route_path, query)
    assert path in h2_request._TARGETS


def test_a_refused_path_is_refused_every_time_and_never_kept() -> None:
    h2_request._TARGETS.clear()
    for _ in range(2):
        with pytest.raises(BadRequest):
            build_request(_head(b"/a\\b"), SNAPSHOT.request_drop, LISTENER, CLIENT)
    assert not h2_request._TARGETS


def test_the_target_cache_stays_bounded() -> None:
    h2_request._TARGETS.clear()
    for index in range(h2_request._TARGETS_SIZE + 10):
        build_request(_head(b"/p%d" % index), SNAPSHOT.request_drop, LISTENER, CLIENT)
    assert len(h2_request._TARGETS) <= h2_request._TARGETS_SIZE
    long_path = b"/" + b"x" * (h2_request._TARGET_CACHED_LENGTH + 1)
    build_request(_head(long_path), SNAPSHOT.request_drop, LISTENER, CLIENT)
    assert long_path not in h2_request._TARGETS


def test_an_empty_authority_is_a_malformed_request() -> None:
    head = [*_head(b"/")[:3], (b":authority", b"")]
    with pytest.raises(Malformed):
        build_request(head, SNAPSHOT.request_drop, LISTENER, CLIENT)
