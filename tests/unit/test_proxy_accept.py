"""ProxyReader without sockets: a fake transport records what the reader does to it."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from bastion.net.proxy_accept import ProxyReader, Trusted, feed, log_refusal
from bastion.net.proxy_protocol import encode_v1, encode_v2_local
from bastion.observability.metrics import ProxyProtocolStats


def sync(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh loop (the reader's timer needs a running one)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: Any) -> None:
        super().__init__()
        self.peer = peer
        self.protocol: asyncio.BaseProtocol | None = None
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


class Recorder(asyncio.Protocol):
    proxied_peer: tuple[str, int] | None = None

    def __init__(self) -> None:
        self.made: asyncio.BaseTransport | None = None
        self.data = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = transport

    def data_received(self, data: bytes) -> None:
        self.data += data


class BufferedRecorder(asyncio.BufferedProtocol):
    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.data = b""

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.data += bytes(self.buffer[:nbytes])


def reader(made: list[Recorder], trusted: tuple[str, ...] = ("10.0.0.0/8",)) -> tuple[ProxyReader, ProxyProtocolStats]:
    stats = ProxyProtocolStats()

    def make_next() -> Recorder:
        made.append(Recorder())
        return made[-1]

    return ProxyReader("web", Trusted(trusted), 1.0, make_next, stats), stats


@sync
async def test_a_header_in_pieces_hands_over_with_the_proxied_peer_and_the_rest() -> None:
    made: list[Recorder] = []
    proxy, stats = reader(made)
    transport = FakeTransport(("10.1.2.3", 5000))
    proxy.connection_made(transport)
    data = encode_v1(("192.0.2.9", 1234), ("10.0.0.1", 80)) + b"GET / HTTP/1.1\r\n"
    for index in range(0, len(data), 7):
        current = transport.protocol or proxy  # what a real transport would call
        current.data_received(data[index : index + 7])  # type: ignore[attr-defined]
    [protocol] = made
    assert protocol.proxied_peer == ("192.0.2.9", 1234)
    assert protocol.made is transport and transport.protocol is protocol
    assert protocol.data == b"GET / HTTP/1.1\r\n"
    assert stats.accepted == 1 and proxy.timer is None


@sync
async def test_local_keeps_the_socket_peer() -> None:
    made: list[Recorder] = []
    proxy, _ = reader(made)
    proxy.connection_made(FakeTransport(("10.1.2.3", 5000)))
    proxy.data_received(encode_v2_local())
    assert made[0].proxied_peer is None


@pytest.mark.parametrize("peer", [("192.0.2.1", 1), ("::ffff:192.0.2.1", 1, 0, 0), "garbage"])
@sync
async def test_untrusted_or_unknown_peers_are_aborted_unread(peer: Any) -> None:
    made: list[Recorder] = []
    proxy, stats = reader(made)
    transport = FakeTransport(peer)
    proxy.connection_made(transport)
    assert transport.aborted and not made and proxy.timer is None
    assert stats.untrusted == (0 if peer == "garbage" else 1)


@sync
async def test_ipv4_mapped_peers_match_ipv4_ranges() -> None:
    made: list[Recorder] = []
    proxy, _ = reader(made)
    transport = FakeTransport(("::ffff:10.9.9.9", 1, 0, 0))
    proxy.connection_made(transport)
    assert not transport.aborted
    proxy.connection_lost(None)


@sync
async def test_invalid_header_aborts_and_counts() -> None:
    made: list[Recorder] = []
    proxy, stats = reader(made)
    transport = FakeTransport(("10.1.2.3", 5000))
    proxy.connection_made(transport)
    proxy.data_received(b"GET / HTTP/1.1\r\n")
    assert transport.aborted and stats.invalid == 1 and not made
    proxy.data_received(b"more")  # after the refusal: ignored
    assert stats.invalid == 1


@sync
async def test_no_header_in_time_aborts() -> None:
    made: list[Recorder] = []
    stats = ProxyProtocolStats()
    proxy = ProxyReader("web", Trusted(["10.0.0.0/8"]), 0.01, lambda: Recorder(), stats)
    transport = FakeTransport(("10.1.2.3", 5000))
    proxy.connection_made(transport)
    proxy.data_received(b"PROXY TCP4 ")
    await asyncio.sleep(0.05)
    assert transport.aborted and stats.timeout == 1 and not made


def test_feed_fills_a_buffered_protocol_through_a_small_buffer() -> None:
    protocol = BufferedRecorder(3)
    feed(protocol, b"0123456789")
    assert protocol.data == b"0123456789"


def test_refusals_are_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    stats = ProxyProtocolStats()
    with caplog.at_level(logging.INFO, logger="bastion.proxy_protocol"):
        for _ in range(100):
            stats.untrusted += 1
            log_refusal(stats, "web", "not trusted", ("192.0.2.1", 1))
    assert len(caplog.records) == 1
