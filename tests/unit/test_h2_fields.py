"""h2_fields.response_parts against h2's own inbound checks: the same verdict on each block."""

from __future__ import annotations

from typing import Any

import pytest
from h2.exceptions import ProtocolError
from h2.utilities import HeaderValidationFlags, normalize_inbound_headers, validate_headers

from bastion.http.header_policy import DROP_RESPONSE
from bastion.proto.h2_fields import response_parts

S = (b":status", b"200")
BLOCKS: list[tuple[str, list[tuple[bytes, bytes]], bool]] = [
    ("plain head", [S, (b"content-type", b"text/plain"), (b"x-a", b"")], False),
    ("no status", [(b"x-a", b"1")], False),
    ("status twice", [S, S], False),
    ("status after a field", [(b"x-a", b"1"), S], False),
    ("request pseudo-header", [S, (b":path", b"/")], False),
    ("unknown pseudo-header", [S, (b":bogus", b"1")], False),
    ("upper-case name", [S, (b"X-A", b"1")], False),
    ("space in name", [S, (b"x a", b"1")], False),
    ("colon in name", [S, (b"x:a", b"1")], False),
    ("empty name", [S, (b"", b"1")], False),
    ("byte 0x7f in name", [S, (b"x\x7fa", b"1")], False),
    ("high byte in name", [S, (b"x\xe9", b"1")], False),
    ("cr lf in value", [S, (b"x-a", b"1\r\nx-injected: yes")], False),
    ("lf in value", [S, (b"x-a", b"1\nx")], False),
    ("cr in value", [S, (b"x-a", b"1\rx")], False),
    ("nul in value", [S, (b"x-a", b"1\x00")], False),
    ("leading space", [S, (b"x-a", b" 1")], False),
    ("trailing tab", [S, (b"x-a", b"1\t")], False),
    ("inner space", [S, (b"x-a", b"1 2")], False),
    ("high bytes in value", [S, (b"x-a", b"\xe9t\xe9")], False),
    ("connection field", [S, (b"connection", b"close")], False),
    ("keep-alive field", [S, (b"keep-alive", b"5")], False),
    ("transfer-encoding field", [S, (b"transfer-encoding", b"chunked")], False),
    ("upgrade field", [S, (b"upgrade", b"h2c")], False),
    ("te trailers", [S, (b"te", b"Trailers")], False),
    ("te gzip", [S, (b"te", b"gzip")], False),
    ("cookies joined", [S, (b"cookie", b"a=1"), (b"x-a", b"1"), (b"cookie", b"b=2")], False),
    ("trailers", [(b"grpc-status", b"0"), (b"grpc-message", b"ok")], True),
    ("status in trailers", [S, (b"grpc-status", b"0")], True),
    ("bad trailer value", [(b"grpc-message", b"a\r\nb")], True),
    ("empty trailers", [], True),
]


def _h2_verdict(block: list[tuple[bytes, bytes]], trailers: bool) -> Any:
    flags = HeaderValidationFlags(
        is_client=True, is_trailer=trailers, is_response_header=not trailers, is_push_promise=False
    )
    try:
        return [tuple(f) for f in validate_headers(normalize_inbound_headers(block, flags), flags)]
    except ProtocolError:
        return None


@pytest.mark.parametrize(("what", "block", "trailers"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_the_same_verdict_as_h2(what: str, block: list[tuple[bytes, bytes]], trailers: bool) -> None:
    expected = _h2_verdict(block, trailers)
    if expected is not None:  # what h2 returns, less the :status the parts take out
        expected = [f for f in expected if f[0][:1] != b":"]
    for _ in range(2):  # the second time with the name cache warm
        got = response_parts(block, trailers, frozenset())
        assert (got if got is None else got[1]) == expected, what


def test_a_connection_field_is_refused_even_after_other_names_were_cached() -> None:
    for _ in range(3):
        assert response_parts([S, (b"connection", b"close")], False, frozenset()) is None


@pytest.mark.parametrize(("what", "block", "trailers"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_the_parts_agree_with_h2_and_leave_out_the_dropped_fields(
    what: str, block: list[tuple[bytes, bytes]], trailers: bool
) -> None:
    expected = _h2_verdict(block, trailers)
    got = response_parts(block, trailers, DROP_RESPONSE)
    if expected is None:
        assert got is None, what
        return
    assert got is not None, what
    status, fields, _ = got
    assert status == (0 if trailers else 200)
    assert fields == [f for f in expected if f[0][:1] != b":" and f[0] not in DROP_RESPONSE]


def test_the_status_and_the_first_content_length_are_taken_out() -> None:
    block = [(b":status", b"404"), (b"content-length", b"12"), (b"content-length", b"13"), (b"x-a", b"1")]
    assert response_parts(block, False, DROP_RESPONSE) == (404, [(b"x-a", b"1")], 12)  # the length is framing
    assert response_parts([S, (b"content-length", b"x")], False, DROP_RESPONSE) == (200, [], None)
    assert response_parts([S, (b"x-request-id", b"r")], False, frozenset()) == (200, [(b"x-request-id", b"r")], None)


@pytest.mark.parametrize("status", [b"20", b"2000", b"abc", b"2 0", b""])
def test_a_status_that_is_not_three_digits_is_malformed(status: bytes) -> None:
    assert response_parts([(b":status", status)], False, DROP_RESPONSE) is None
