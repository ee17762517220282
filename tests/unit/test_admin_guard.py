"""Which `Host` and `Origin` the admin API accepts, for binds a test cannot open on loopback
(a LAN address, a name, a wildcard): DNS rebinding and cross-site POSTs refused with 403."""

from __future__ import annotations

import json

import pytest

from bastion.admin.guard import allowed_hosts, refuse
from bastion.admin.http import AdminRequest
from bastion.config.types import HostPort

LAN = HostPort("10.0.0.2", 9901)
LOOPBACK = HostPort("127.0.0.1", 9901)


def ask(bind: HostPort, method: str = "GET", **headers: str) -> int | None:
    """The status of the guard's refusal (None: let through), checking its JSON shape."""
    request = AdminRequest(method, "/status", "", {k.lower(): v for k, v in headers.items()}, b"", "10.0.0.9")
    answer = refuse(request, bind)
    if answer is None:
        return None
    body = json.loads(answer.body)
    assert set(body) == {"error", "message", "request_id"}
    assert body["request_id"] == request.request_id
    assert body["error"] in ("host_forbidden", "origin_forbidden")
    return answer.status


def test_the_names_each_kind_of_bind_answers_to() -> None:
    assert allowed_hosts(LOOPBACK) == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts(HostPort("127.0.0.2", 9901)) == {"127.0.0.2", "127.0.0.1", "localhost", "::1"}
    assert allowed_hosts(HostPort("::1", 9901)) == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts(HostPort("Admin.Internal.", 9901)) == {"admin.internal"}
    assert allowed_hosts(LAN) == {"10.0.0.2"}
    assert allowed_hosts(HostPort("0.0.0.0", 9901)) is None  # every name of the machine: not checked
    assert allowed_hosts(HostPort("::", 9901)) is None


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("10.0.0.2:9901", None),
        ("10.0.0.2", None),
        ("127.0.0.1:9901", 403),  # not loopback-bound: only its own address
        ("localhost:9901", 403),
        ("evil.example:9901", 403),
        ("10.0.0.2.evil.example", 403),
        ("10.0.0.2:x", 403),
        ("", 403),
    ],
)
def test_a_lan_bind_answers_to_its_own_address_only(host: str, status: int | None) -> None:
    assert ask(LAN, Host=host) == status


def test_a_name_bind_answers_to_that_name_and_a_wildcard_to_any() -> None:
    named = HostPort("admin.internal", 9901)
    assert ask(named, Host="ADMIN.internal:9901") is None
    assert ask(named, Host="evil.example:9901") == 403
    assert ask(HostPort("0.0.0.0", 9901), Host="evil.example") is None  # the token guards it
    assert ask(LAN) is None  # no Host at all: no browser sends that


def test_a_post_must_come_from_the_listeners_own_origin() -> None:
    assert ask(LAN, "POST", Host="10.0.0.2:9901", Origin="http://10.0.0.2:9901") is None
    assert ask(LAN, "POST", Host="10.0.0.2:9901") is None  # curl, scripts
    assert ask(LAN, "POST", Host="10.0.0.2:9901", Origin="http://evil.example") == 403
    assert ask(LAN, "POST", Host="10.0.0.2:9901", Origin="http://10.0.0.2") == 403  # port 80, not 9901
    assert ask(LAN, "POST", Host="10.0.0.2", Origin="http://10.0.0.2") is None  # both port 80
    assert ask(LAN, "POST", Host="10.0.0.2:9901", Origin="http://10.0.0.2:bad") == 403
    assert ask(LAN, "POST", Origin="http://10.0.0.2:9901") is None  # no Host: the bind's own
    assert ask(LAN, "DELETE", Host="10.0.0.2:9901", Origin="null") == 403
    assert ask(LAN, "GET", Host="10.0.0.2:9901", Origin="http://evil.example") is None
    assert ask(LOOPBACK, "POST", Host="[::1]:9901", Origin="http://[::1]:9901") is None
    assert ask(LOOPBACK, "POST", Host="[::1]:9901", Origin="http://127.0.0.1:9901") == 403
