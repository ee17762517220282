"""Upstreams that misbehave in timing and framing: each client gets its own response, whole,
and never a byte of another's.

The origin here is `adversary.ScriptedOrigin` (raw bytes on a timeline) and the client
`adversary.RawClient` (sees every byte, 1xx interim responses included). 1xx rules (RFC 9110
section 15.2, as decided for Bastion): 1xx responses are relayed to HTTP/1.1 clients, never to
HTTP/1.0 ones, and an upstream 100 is not relayed when the gateway already sent its own 100
Continue.
"""

from __future__ import annotations

import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from adversary import (
    BadMessage,
    Close,
    Pause,
    PeerClosed,
    RawClient,
    ReadRequest,
    Replier,
    Request,
    Reset,
    Response,
    Step,
    Write,
    byte_by_byte,
    http_response,
    trickle,
    wait_until,
)

EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _gateway(gateway: Any, origin: Any, **upstream: Any) -> Any:
    """A gateway with one target, the scripted origin, and these upstream keys."""
    return gateway(targets=[origin.port], upstreams={"app": {"targets": [{"address": origin.address}], **upstream}})


def _get(path: str, version: str = "1.1", extra: str = "") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: x\r\n{extra}\r\n".encode()


def _body(request: Request) -> bytes:
    """Every request's body names its path, so a misdelivered body is recognisable."""
    return f"body of {request.target}".encode()


def _interim_then_final(*interim: bytes, split: bool = False) -> Replier:
    """Reply with these 1xx heads, then the final head, then (in a later write) its body.

    The body's own write is what matters: the gateway took the end of a 1xx for the end of the
    response, so a body arriving after the final head was left for whoever reused the
    connection. With `split`, the heads go byte by byte."""

    def reply(request: Request) -> list[Step]:
        body = _body(request)
        final = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        steps: list[Step] = []
        for head in (*interim, final):
            steps += byte_by_byte(head) if split else [Write(head)]
            steps.append(Pause(0.05))
        return [*steps, Write(body)]

    return reply


def _two_requests(port: int, version: str = "1.1", extra: str = "") -> list[Response]:
    """Two requests in turn on one client connection (the second proves the first ended cleanly)."""
    with RawClient(port) as client:
        responses = []
        for path in ("/one", "/two"):
            client.send(_get(path, version, extra))
            responses.append(client.read_response())
        assert client.read_available(0.05) == b""
    return responses


def _assert_relayed(responses: list[Response], interim: list[int]) -> None:
    for path, response in zip(("/one", "/two"), responses, strict=True):
        assert (response.status, response.body) == (200, f"body of {path}".encode())
        assert [head.status for head in response.interim] == interim


# --- 1xx interim responses ---------------------------------------------------------------------


def test_early_hints_then_delayed_body_never_crosses_clients(scripted_origin, gateway):
    """The attacker's case: 103, then the 200 head, then its 26-byte body a second later;
    client B asks while A waits for that body, when A's connection would look free."""

    def reply(request: Request) -> list[Step]:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 26\r\n\r\n"
        body = f"body of {request.target}".ljust(26, ".").encode()
        return [Write(EARLY_HINTS), Pause(0.05), Write(head), Pause(1.0), Write(body)]

    origin = scripted_origin(reply=reply)
    gw = _gateway(gateway, origin)
    with RawClient(gw.port) as a, RawClient(gw.port) as b:
        a.send(_get("/a"))
        interim = []
        while (head := a.read_head()).status < 200:
            interim.append(head)
        b.send(_get("/b"))
        response_b = b.read_response()
        assert (response_b.status, response_b.body) == (200, b"body of /b................")
        assert b"body of /a" not in b.received
        assert (head.status, a.read_body(head).body) == (200, b"body of /a................")
    assert [h.status for h in interim] == [103]
    assert interim[0].header("link") == "</a.css>; rel=preload"


def test_102_processing_is_relayed(scripted_origin, gateway):
    origin = scripted_origin(reply=_interim_then_final(PROCESSING))
    _assert_relayed(_two_requests(_gateway(gateway, origin).port), [102])


def test_103_early_hints_relayed_with_its_headers(scripted_origin, gateway):
    origin = scripted_origin(reply=_interim_then_final(EARLY_HINTS))
    responses = _two_requests(_gateway(gateway, origin).port)
    _assert_relayed(responses, [103])
    assert all(r.interim[0].header("link") == "</a.css>; rel=preload" for r in responses)


def test_unknown_1xx_is_relayed(scripted_origin, gateway):
    origin = scripted_origin(reply=_interim_then_final(b"HTTP/1.1 199 Something New\r\nX-Hint: 1\r\n\r\n"))
    responses = _two_requests(_gateway(gateway, origin).port)
    _assert_relayed(responses, [199])
    assert responses[0].interim[0].header("x-hint") == "1"


def test_several_1xx_in_a_row_are_relayed_in_order(scripted_origin, gateway):
    second_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </b.js>; rel=preload\r\n\r\n"
    unknown = b"HTTP/1.1 150 X\r\n\r\n"
    origin = scripted_origin(reply=_interim_then_final(PROCESSING, EARLY_HINTS, second_hints, unknown))
    responses = _two_requests(_gateway(gateway, origin).port)
    _assert_relayed(responses, [102, 103, 103, 150])
    assert [h.header("link") for h in responses[1].interim[1:3]] == ["</a.css>; rel=preload", "</b.js>; rel=preload"]


def test_1xx_and_final_head_split_byte_by_byte(scripted_origin, gateway):
    origin = scripted_origin(reply=_interim_then_final(EARLY_HINTS, split=True))
    _assert_relayed(_two_requests(_gateway(gateway, origin).port), [103])


def test_1xx_is_not_relayed_to_an_http10_client(scripted_origin, gateway):
    """HTTP/1.0 has no 1xx: a 1.0 client would take the 103 for the response."""
    origin = scripted_origin(reply=_interim_then_final(EARLY_HINTS, PROCESSING))
    _assert_relayed(_two_requests(_gateway(gateway, origin).port, "1.0", "Connection: keep-alive\r\n"), [])


def test_unsolicited_100_continue_is_relayed_once(scripted_origin, gateway):
    """The gateway did not ask for it (it never forwards Expect), so as a proxy it forwards it."""
    origin = scripted_origin(reply=_interim_then_final(CONTINUE))
    _assert_relayed(_two_requests(_gateway(gateway, origin).port), [100])


def test_upstream_100_not_relayed_after_the_gateways_own(scripted_origin, gateway):
    """The client's Expect was answered by the gateway; a second 100 from the origin is dropped."""
    origin = scripted_origin(reply=_interim_then_final(CONTINUE))
    gw = _gateway(gateway, origin)
    with RawClient(gw.port) as client:
        client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        assert client.read_head().status == 100
        client.send(b"hello")
        response = client.read_response()
    assert (response.status, response.body) == (200, b"body of /up")
    assert response.interim == []
    assert origin.requests[0].body == b"hello"


# --- slow and excess bytes -----------------------------------------------------------------------


def test_final_response_in_tiny_writes(scripted_origin, gateway):
    def reply(request: Request) -> list[Step]:
        body = _body(request)
        message = (
            b"HTTP/1.1 200 OK\r\nX-Slow: yes\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x;note=slow\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n" % (len(body), body)
        )
        return trickle(message, random.Random(request.target), pieces=len(message) // 2, pauses=(0.001, 0.003))

    origin = scripted_origin(reply=reply)
    responses = _two_requests(_gateway(gateway, origin).port)
    _assert_relayed(responses, [])
    assert responses[0].header("x-slow") == "yes"


def test_status_line_split_across_writes_keeps_its_reason(scripted_origin, gateway):
    """httptools reports a reason phrase in pieces when it arrives in pieces."""
    origin = scripted_origin(reply=lambda request: byte_by_byte(http_response(200, _body(request), reason="All Good")))
    responses = _two_requests(_gateway(gateway, origin).port)
    _assert_relayed(responses, [])
    assert [r.reason for r in responses] == ["All Good", "All Good"]


STRAY = http_response(200, b"STRAY bytes of nobody")


@pytest.mark.parametrize("gap", [None, 0.05], ids=["same-write", "while-idle"])
def test_extra_response_after_a_complete_one_is_never_delivered(scripted_origin, gateway, gap):
    """A second response to one request (same write, or a moment later while the connection
    is idle): the client gets the first only, the connection is not reused, nobody sees the rest."""
    extra: list[Step] = [Write(http_response(200, b"first") + STRAY)]
    if gap is not None:
        extra = [Write(http_response(200, b"first")), Pause(gap), Write(STRAY)]
    own: Replier = lambda request: [Write(http_response(200, _body(request)))]  # noqa: E731
    origin = scripted_origin(reply=own, connections=[[ReadRequest(), *extra]])
    gw = _gateway(gateway, origin)
    with RawClient(gw.port) as a, RawClient(gw.port) as b:
        a.send(_get("/first"))
        first = a.read_response()
        assert (first.status, first.body) == (200, b"first")
        time.sleep(0.2)  # the extra bytes have arrived at the gateway
        b.send(_get("/second"))
        assert b.read_response().body == b"body of /second"
        a.send(_get("/third"))
        assert a.read_response().body == b"body of /third"
        leftover = a.read_available(0.05) + b.read_available(0.05)
    assert b"STRAY" not in a.received + b.received + leftover
    assert [r.target for r in origin.requests if r.connection == 0] == ["/first"]
    assert origin.connections == 2


# --- property test: random upstream replies, many clients -----------------------------------------

SEED = 1103  # fixed: a failure replays; change it locally to explore other sequences
_TOKEN = re.compile(rb"tok-[0-9a-f]{8}")
_INTERIM = {100: CONTINUE, 102: PROCESSING, 103: EARLY_HINTS, 199: b"HTTP/1.1 199 Whatever\r\nX-Hint: 1\r\n\r\n"}
_PAUSES = (0, 0, 0.001, 0.005, 0.02)
# kind -> weight; the first five are well-formed replies, the rest are broken
_KINDS = {
    "length": 4, "chunked": 4, "close_delimited": 2, "connection_close": 2, "no_content": 1,
    "truncated": 1, "truncated_chunked": 1, "garbage": 1, "bad_status": 1, "bad_chunk": 1, "extra": 2, "reset": 1,
}  # fmt: skip
_VALID = ("length", "chunked", "close_delimited", "connection_close", "no_content")


@dataclass
class Case:
    """One request's scripted reply and what a client may accept for it."""

    token: str
    kind: str
    steps: list[Step]
    status: int  # of the final response as the origin framed it
    body: bytes  # what a complete final response must carry, exactly
    interim: list[int]

    @property
    def valid(self) -> bool:
        return self.kind in _VALID


def _chunks(rng: random.Random, body: bytes) -> bytes:
    out = b""
    while body:
        size = rng.randint(1, len(body))
        ext = rng.choice([b"", b";x=1", b';name="q v"'])
        out += b"%x%s\r\n%s\r\n" % (size, ext, body[:size])
        body = body[size:]
    return out


def _case(rng: random.Random, token: str) -> Case:
    kind = rng.choices(list(_KINDS), weights=list(_KINDS.values()))[0]
    body = (token.encode() + b"|") * rng.randint(1, 30)
    interim = rng.sample(list(_INTERIM), rng.choice([0, 0, 0, 1, 2]))
    prefix = b"".join(_INTERIM[s] for s in interim)
    status = 200
    end: list[Step] = []
    chunked_head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    if kind == "length":
        message = http_response(200, body)
    elif kind == "chunked":
        trailer = rng.choice([b"", b"X-Sum: 1\r\n"])
        message = chunked_head + _chunks(rng, body) + b"0\r\n" + trailer + b"\r\n"
    elif kind == "close_delimited":
        message, end = b"HTTP/1.1 200 OK\r\nX-Kind: close\r\n\r\n" + body, [Close()]
    elif kind == "connection_close":
        message, end = http_response(200, body, ("Connection", "close")), [Close()]
    elif kind == "no_content":
        status, body, message = 204, b"", http_response(204)
    elif kind == "truncated":
        message, end = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(body) + 9) + body, [Close()]
    elif kind == "truncated_chunked":
        message = chunked_head + _chunks(rng, body)
        message, end = message[: rng.randint(len(chunked_head), len(message) - 1)], [rng.choice([Close(), Reset()])]
    elif kind == "garbage":
        message, end = b"\x00" + bytes(rng.choices(b"xyz \r\n:\xff", k=rng.randint(1, 40))), [Close()]
    elif kind == "bad_status":
        message = b"HTTP/1.1 2x0 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    elif kind == "bad_chunk":
        message = chunked_head + b"zz\r\n" + body + b"\r\n0\r\n\r\n"
    elif kind == "reset":
        message = http_response(200, body)
        message, end = message[: rng.randint(1, len(message) - 1)], [Reset()]
    else:
        # extra: bytes of nobody after the response, in the same write as its last bytes (sent
        # later, they could not be told from an answer to the connection's next request)
        message = http_response(200, body)
        tail = rng.randint(1, 10)
        stray = rng.choice([STRAY, b"STRAY junk\r\n\r\n"])
        steps = trickle(prefix + message[:-tail], rng, rng.randint(1, 6), _PAUSES)
        return Case(token, kind, [*steps, Write(message[-tail:] + stray)], status, body, interim)
    steps = trickle(prefix + message, rng, rng.randint(1, 6), _PAUSES)
    return Case(token, kind, [*steps, *end], status, body, interim)


def _where(case: Case, received: bytes) -> str:
    return f"seed {SEED}, {case.kind} case {case.token} (1xx {case.interim}); its client received {received[:600]!r}"


def _check(case: Case, received: bytes, response: Response | None) -> None:
    """Own bytes only; then the exact response, or (for a broken reply) an error or a cut."""
    where = _where(case, received)
    foreign = {t.decode() for t in _TOKEN.findall(received)} - {case.token}
    assert not foreign, f"bytes of {sorted(foreign)} reached the client of {where}"
    assert b"STRAY" not in received, f"bytes after a complete response reached a client: {where}"
    if response is None:
        assert not case.valid, f"connection cut: {where}"
        return
    assert {h.status for h in response.interim} <= set(case.interim), f"unexpected 1xx: {where}"
    if (response.status, response.body) == (case.status, case.body):
        return
    assert not case.valid, f"wrong response: {where}"
    assert response.status in (502, 504), f"wrong response: {where}"
    assert response.header("content-type") == "application/json" and b'"error"' in response.body, where


def _client(port: int, cases: list[Case], stop: threading.Event) -> None:
    """Send each case's request in turn on a keep-alive connection (a new one after a close)."""
    client = RawClient(port, timeout=4)
    try:
        for case in cases:
            if stop.is_set():
                return
            if client.closed:
                client.close()
                client = RawClient(port, timeout=4)
            start = len(client.received)
            client.send(_get(f"/t/{case.token}", extra="User-Agent: fuzz\r\n"))
            try:
                response: Response | None = client.read_response()
            except PeerClosed:
                response = None
            except (TimeoutError, BadMessage) as exc:
                raise AssertionError(f"{exc}: {_where(case, bytes(client.received[start:]))}") from None
            if response is not None and (response.header("connection") or "").lower() == "close":
                client.read_available(1)  # sees the close
            _check(case, bytes(client.received[start:]), response)
        if not client.closed:  # (after a cut, the unread rest of its own response stays buffered)
            tail = client.read_available(0.05)
            assert not tail, f"bytes after the last response: {tail[:300]!r}"
    except BaseException:
        stop.set()  # the other clients give up too: one clear failure, soon
        raise
    finally:
        client.close()


@pytest.mark.timeout(20)
def test_random_upstream_replies_never_cross_clients(scripted_origin, gateway):
    """Random well-formed and broken replies, split at random with tiny pauses, through a pooling
    gateway to one client in sequence and then four at once: each client gets exactly its own
    response (its body carries the request's token), a 502/504, or a cut; never another's bytes."""
    rng = random.Random(SEED)
    cases: dict[str, Case] = {}

    def new_case() -> Case:
        token = f"tok-{rng.getrandbits(32):08x}"
        cases[token] = case = _case(rng, token)
        return case

    sequential = [new_case() for _ in range(60)]
    overlapping = [[new_case() for _ in range(40)] for _ in range(4)]
    assert {case.kind for case in cases.values()} == set(_KINDS)  # the seed covers every kind
    origin = scripted_origin(reply=lambda request: cases[request.target.rsplit("/", 1)[-1]].steps)
    gw = _gateway(gateway, origin, retries={"attempts": 0}, timeouts={"response": "2s"})
    stop = threading.Event()
    _client(gw.port, sequential, stop)
    with ThreadPoolExecutor(len(overlapping)) as pool:
        for future in [pool.submit(_client, gw.port, batch, stop) for batch in overlapping]:
            future.result()


# --- holes in the rest of the suite ----------------------------------------------------------------


def test_stale_pooled_connection_closed_by_the_origin_is_retried(scripted_origin, gateway):
    """The origin closes its kept-alive connection instead of answering the next request (its idle
    timeout firing as the request arrives). An origin closing while idle is not enough: the
    gateway sees that FIN and drops the connection before reuse. With one target and retries
    off, only the stale-connection replay in Exchange._forward turns this into a 200."""
    ok = http_response(200, b"fresh")
    origin = scripted_origin(reply=[Write(ok)], connections=[[ReadRequest(), Write(ok), ReadRequest(), Close()]])
    gw = _gateway(gateway, origin, retries={"attempts": 0})
    with RawClient(gw.port) as client:
        for path in ("/first", "/second"):
            client.send(_get(path))
            response = client.read_response()
            assert (response.status, response.body) == (200, b"fresh"), path
    assert [(r.target, r.connection) for r in origin.requests] == [("/first", 0), ("/second", 0), ("/second", 1)]


def test_chunked_body_ending_after_the_upstream_attached_gets_its_terminator(scripted_origin, gateway):
    """The upstream connection is attached before the chunked body ends, so the last-chunk
    `0\\r\\n\\r\\n` is written by Exchange.end_body; without it the origin waits forever."""
    origin = scripted_origin(reply=lambda request: [Write(http_response(200, request.body))])
    gw = _gateway(gateway, origin, timeouts={"response": "1s"})
    with RawClient(gw.port) as client:
        client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        wait_until(lambda: origin.raw and b"\r\n\r\n" in origin.raw[0], what="the request head at the origin")
        client.send(b"5\r\nhello\r\n6\r\n world\r\n", piece=4, pause=0.02)
        time.sleep(0.05)
        client.send(b"0\r\n\r\n")
        response = client.read_response()
    assert (response.status, response.body) == (200, b"hello world")
    assert origin.requests[0].body == b"hello world"
    assert origin.raw[0].endswith(b"0\r\n\r\n")
