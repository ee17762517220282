"""The byte relay driven through fake transports and a fake clock: no sockets, no sleeping.

A `FakeTransport` behaves like an asyncio socket transport where it matters here: a write
buffer with watermarks that calls `pause_writing` / `resume_writing` on its protocol, a
kernel-like inbox that holds bytes while reading is paused, EOF, close-after-flush, abort.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from bastion.net.relay import Relay, RelaySide, RelayStats


class FakeHandle:
    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """time(), call_at/call_later/call_soon and a manual clock: `advance(seconds)`."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[tuple[float, int, FakeHandle]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> FakeHandle:
        handle = FakeHandle(when, callback, args)
        heapq.heappush(self._timers, (when, next(self._seq), handle))
        return handle

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> FakeHandle:
        return self.call_at(self.now + delay, callback, *args)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> FakeHandle:
        return self.call_at(self.now, callback, *args)

    def run_ready(self) -> None:
        self.advance(0)

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self._timers and self._timers[0][0] <= end:
            when, _, handle = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not handle.cancelled:
                handle.callback(*handle.args)
        self.now = end

    def pending_timers(self) -> int:
        return sum(not h.cancelled for _, _, h in self._timers)


class FakeTransport(asyncio.Transport):
    def __init__(self, loop: FakeLoop, high: int = 100, low: int = 25, can_eof: bool = True) -> None:
        super().__init__()
        self.loop = loop
        self.high = high
        self.low = low
        self.can_eof = can_eof
        self.protocol: asyncio.BaseProtocol | None = None
        self.buffer = bytearray()  # written, not yet taken by the peer ("the network")
        self.delivered = bytearray()  # taken by the peer
        self.inbox: list[bytes] = []  # arrived while reading was paused
        self.reading = True
        self.write_paused = False
        self.eof_written = False
        self.closing = False
        self.aborted = False
        self.lost = False
        self.reads_after_eof = 0
        self._saw_eof = False

    # --- the transport API the relay uses ---------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def write(self, data: Any) -> None:
        assert not self.closing and not self.eof_written, "write after close or EOF"
        self.buffer += data
        if len(self.buffer) > self.high and not self.write_paused:
            self.write_paused = True
            self._proto().pause_writing()

    def can_write_eof(self) -> bool:
        return self.can_eof

    def write_eof(self) -> None:
        assert self.can_eof
        self.eof_written = True

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True
        if self._saw_eof:
            self.reads_after_eof += 1
        while self.inbox and self.reading and not self.closing:
            self._proto().data_received(self.inbox.pop(0))

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self.low, self.high)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if not self.buffer:
            self.loop.call_soon(self._lose, None)

    def abort(self) -> None:
        self.aborted = True
        self.buffer.clear()
        if not self.lost:
            self.closing = True
            self.loop.call_soon(self._lose, None)

    # --- the other end of the wire ----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes arrive from the network."""
        if self.reading:
            self._proto().data_received(data)
        else:
            self.inbox.append(data)

    def feed_eof(self) -> None:
        self._saw_eof = True
        keep_open = self._proto().eof_received()
        if not keep_open:
            self.close()

    def drain(self, n: int | None = None) -> bytes:
        """The peer reads `n` bytes (all when None) of what was written."""
        n = len(self.buffer) if n is None else n
        taken = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.delivered += taken
        if self.write_paused and len(self.buffer) <= self.low:
            self.write_paused = False
            self._proto().resume_writing()
        if self.closing and not self.buffer and not self.lost:
            self.loop.call_soon(self._lose, None)
        return taken

    def reset(self) -> None:
        """The peer resets the connection."""
        self.closing = True
        self._lose(ConnectionResetError("reset by peer"))

    def _lose(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self._proto().connection_lost(exc)

    def _proto(self) -> Any:
        assert self.protocol is not None
        return self.protocol


class Old(asyncio.Protocol):
    """The protocol a transport had before the relay took it over (h1, upstream conn)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def data_received(self, data: bytes) -> None:
        self.events.append("data")

    def pause_writing(self) -> None:
        self.events.append("pause_writing")


Setup = tuple[FakeLoop, FakeTransport, FakeTransport, Relay, list[RelayStats]]


def make(idle: float | None = None, max_duration: float | None = None, linger: float = 5.0, **transport: Any) -> Setup:
    loop = FakeLoop()
    client = FakeTransport(loop, **transport)
    upstream = FakeTransport(loop, **transport)
    client.set_protocol(Old())
    upstream.set_protocol(Old())
    closed: list[RelayStats] = []
    relay = Relay(
        loop,  # type: ignore[arg-type]
        client,
        upstream,
        idle_timeout=idle,
        max_duration=max_duration,
        on_close=closed.append,
        linger=linger,
    )
    return loop, client, upstream, relay, closed


# --- pumping ------------------------------------------------------------------------------------


def test_bytes_cross_both_ways_and_are_counted() -> None:
    _loop, client, upstream, relay, _ = make(high=10_000)
    relay.start()
    assert isinstance(client.protocol, RelaySide) and isinstance(upstream.protocol, RelaySide)
    client.feed(b"hello ")
    client.feed(b"upstream")
    upstream.feed(b"hi client")
    assert upstream.drain() == b"hello upstream"
    assert client.drain() == b"hi client"
    stats = relay.statistics()
    assert (stats["bytes_in"], stats["bytes_out"], stats["state"]) == (14, 9, "open")


def test_pending_bytes_go_first_and_count() -> None:
    _loop, client, upstream, relay, _ = make(high=10_000)
    relay.start(client_pending=b"early-from-client", upstream_pending=b"early-from-upstream")
    client.feed(b"+later")
    assert upstream.drain() == b"early-from-client+later"
    assert client.drain() == b"early-from-upstream"
    assert relay.statistics()["bytes_in"] == len(b"early-from-client+later")
    assert relay.statistics()["bytes_out"] == len(b"early-from-upstream")


# --- backpressure -------------------------------------------------------------------------------


@pytest.mark.parametrize("full", ["upstream", "client"])
def test_a_full_side_pauses_reading_on_the_other_until_it_drains(full: str) -> None:
    _loop, client, upstream, relay, _ = make(high=100, low=25)
    relay.start()
    writer, reader = (client, upstream) if full == "upstream" else (upstream, client)
    writer.feed(b"x" * 60)
    assert writer.reading
    writer.feed(b"x" * 60)  # 120 bytes wait in the reader's buffer: over 100
    assert not writer.reading, "the side feeding a full buffer must stop being read"
    writer.feed(b"y" * 500)  # the kernel holds it; the relay does not read it
    assert len(reader.buffer) == 120
    reader.drain(50)  # 70 left: above the low watermark, still paused
    assert not writer.reading
    reader.drain(50)  # 20 left: resume; the held bytes flow (and pause again)
    assert reader.delivered + reader.buffer == b"x" * 120 + b"y" * 500
    assert not writer.reading  # 520 bytes buffered again: paused again
    reader.drain()
    assert writer.reading
    assert relay.statistics()["client_reading" if full == "upstream" else "upstream_reading"]


def test_backpressure_each_way_is_independent() -> None:
    _loop, client, upstream, relay, _ = make(high=100, low=25)
    relay.start()
    client.feed(b"c" * 200)  # the upstream is full: stop reading the client
    assert not client.reading and upstream.reading
    upstream.feed(b"u" * 200)  # the client is full too: stop reading the upstream
    assert not client.reading and not upstream.reading
    client.drain()  # the client read its bytes: the upstream may be read again
    assert upstream.reading and not client.reading
    upstream.drain()
    assert client.reading


def test_start_respects_a_pause_the_old_protocol_was_told_about() -> None:
    _loop, client, upstream, relay, _ = make(high=100, low=25)
    client.write_paused = True  # the client transport told h1 to pause, and has not resumed
    relay.start(client_write_paused=True)
    assert not upstream.reading, "the client cannot take more: the upstream must not be read"
    assert client.reading
    client.drain()  # the transport resumes: now the relay hears it
    assert upstream.reading


def test_start_treats_a_buffer_over_its_watermark_as_paused() -> None:
    _loop, client, upstream, relay, _ = make(high=100, low=25)
    upstream.buffer += b"z" * 150
    upstream.write_paused = True
    relay.start()  # not told, but 150 > 100
    assert not client.reading
    upstream.drain()
    assert client.reading


def test_start_resumes_reading_that_the_old_protocol_had_paused() -> None:
    _loop, client, upstream, relay, _ = make(high=100)
    client.pause_reading()  # h1 had paused the client (a slow upstream during the handshake)
    upstream.pause_reading()
    relay.start()
    assert client.reading and upstream.reading


def test_pending_bytes_over_the_watermark_pause_the_other_side() -> None:
    _loop, client, upstream, relay, _ = make(high=100, low=25)
    relay.start(upstream_pending=b"p" * 300)
    assert not upstream.reading
    assert isinstance(client.protocol, RelaySide) and client.protocol.write_paused
    client.drain()
    assert upstream.reading


# --- half-close and ends -------------------------------------------------------------------------


def test_eof_half_closes_the_other_side_and_the_other_direction_keeps_flowing() -> None:
    loop, client, upstream, relay, closed = make(high=10_000)
    relay.start()
    client.feed(b"last words")
    client.feed_eof()
    assert upstream.eof_written, "the client's EOF must reach the upstream as a half-close"
    assert not client.closing and not upstream.closing
    assert relay.statistics()["state"] == "half_closed"
    upstream.feed(b"still answering")
    assert client.drain() == b"still answering"
    upstream.feed_eof()
    loop.run_ready()
    assert client.closing and upstream.closing
    upstream.drain()
    loop.run_ready()
    assert len(closed) == 1
    assert closed[0].reason == "client_closed"
    assert (closed[0].bytes_in, closed[0].bytes_out) == (10, 15)


def test_no_read_is_resumed_on_a_side_after_its_eof() -> None:
    _loop, client, upstream, relay, _ = make(high=100, low=25)
    relay.start()
    upstream.feed(b"u" * 200)  # the client is full: the upstream is paused
    assert not upstream.reading
    upstream.feed_eof()
    client.drain()  # resume_writing on the client: must not resume the upstream's reading
    assert upstream.reads_after_eof == 0


def test_upstream_eof_first_gives_upstream_closed() -> None:
    loop, client, upstream, relay, closed = make()
    relay.start()
    upstream.feed_eof()
    assert client.eof_written
    client.feed_eof()
    loop.run_ready()
    assert [s.reason for s in closed] == ["upstream_closed"]


def test_eof_toward_a_side_that_cannot_half_close_ends_the_relay() -> None:
    loop, client, upstream, relay, closed = make(can_eof=False)
    relay.start()
    upstream.feed(b"bye")
    upstream.feed_eof()
    assert client.closing and upstream.closing
    client.drain()  # the last bytes are still written before the close
    loop.run_ready()
    assert client.delivered == b"bye"
    assert [s.reason for s in closed] == ["upstream_closed"]


def test_a_lost_side_closes_the_other() -> None:
    loop, client, upstream, relay, closed = make()
    relay.start()
    upstream.closing = True
    upstream._lose(None)  # closed without an EOF first
    assert client.closing
    loop.run_ready()
    assert [s.reason for s in closed] == ["upstream_closed"]


def test_a_reset_is_an_error() -> None:
    loop, client, upstream, relay, closed = make()
    relay.start()
    client.reset()
    assert upstream.closing
    loop.run_ready()
    assert closed[0].reason == "error"
    assert closed[0].error is not None and "client" in closed[0].error and "reset" in closed[0].error


def test_a_reset_after_a_clean_close_keeps_the_clean_reason() -> None:
    loop, client, upstream, relay, closed = make()
    relay.start()
    upstream.feed_eof()
    client.reset()
    loop.run_ready()
    assert closed[0].reason == "upstream_closed"


def test_bytes_read_while_closing_are_dropped() -> None:
    _loop, client, upstream, relay, _closed = make(high=10_000)
    relay.start()
    upstream.buffer += b"unsent"  # keeps the upstream open while it flushes
    relay.close("shutdown")
    upstream.closing = False  # pretend a read raced the close
    client.feed(b"too late")
    assert upstream.buffer == b"unsent"
    assert relay.statistics()["bytes_in"] == 0


# --- timers and close -----------------------------------------------------------------------------


def test_idle_timeout_closes_a_silent_relay() -> None:
    loop, client, upstream, relay, closed = make(idle=10.0)
    relay.start()
    loop.advance(9.9)
    assert not client.closing
    loop.advance(0.2)
    assert client.closing and upstream.closing
    loop.run_ready()
    assert [s.reason for s in closed] == ["idle_timeout"]
    assert closed[0].duration == pytest.approx(10.0)


@pytest.mark.parametrize("direction", ["client", "upstream"])
def test_bytes_either_way_push_the_idle_timeout_back(direction: str) -> None:
    loop, client, upstream, relay, closed = make(idle=10.0, high=10_000)
    relay.start()
    sender = client if direction == "client" else upstream
    receiver = upstream if direction == "client" else client
    for _ in range(5):
        loop.advance(8)
        sender.feed(b"ping")
        receiver.drain()
    assert not client.closing
    loop.advance(10.1)
    assert client.closing
    loop.run_ready()
    assert closed[0].reason == "idle_timeout"


def test_a_reader_draining_its_buffer_is_not_idle() -> None:
    loop, client, upstream, relay, closed = make(idle=10.0, high=100, low=25)
    relay.start()
    upstream.feed(b"u" * 1000)  # the client is full; nothing more is read
    for _ in range(9):
        loop.advance(9)
        client.drain(100)  # the client reads slowly, never down to the low watermark
    assert upstream.protocol is not None and not upstream.reading
    assert not client.closing, "a slowly reading client made progress"
    loop.advance(20)  # it stops reading: closed within twice the idle timeout
    assert client.closing
    loop.advance(5)
    assert [s.reason for s in closed] == ["idle_timeout"]


def test_max_duration_closes_a_busy_relay() -> None:
    loop, client, upstream, relay, closed = make(idle=10.0, max_duration=30.0, high=10_000)
    relay.start()
    for _ in range(29):
        loop.advance(1)
        client.feed(b".")
        upstream.drain()
    assert not client.closing
    loop.advance(1.01)
    assert client.closing
    upstream.drain()
    loop.run_ready()
    assert [s.reason for s in closed] == ["max_duration"]


def test_zero_timeouts_are_off() -> None:
    loop, client, _upstream, relay, _closed = make(idle=0, max_duration=0)
    relay.start()
    assert loop.pending_timers() == 0
    loop.advance(10**6)
    assert not client.closing


def test_close_flushes_then_aborts_after_linger() -> None:
    loop, client, upstream, relay, closed = make(linger=5.0, high=10_000)
    relay.start()
    upstream.feed(b"queued for a client that never reads")
    relay.close("shutdown")
    assert client.closing and not client.aborted
    loop.run_ready()
    assert upstream.lost and not client.lost  # the client still holds unsent bytes
    assert not closed
    loop.advance(5.0)
    assert client.aborted
    loop.run_ready()
    assert [s.reason for s in closed] == ["shutdown"]
    assert closed[0].bytes_out == len(b"queued for a client that never reads")


def test_abort_drops_everything_now() -> None:
    loop, client, upstream, relay, closed = make(high=10_000)
    relay.start()
    upstream.feed(b"never delivered")
    relay.abort()
    assert client.aborted and upstream.aborted
    loop.run_ready()
    assert [s.reason for s in closed] == ["shutdown"]


def test_the_first_reason_wins_and_on_close_fires_once() -> None:
    loop, client, upstream, relay, closed = make(idle=1.0, max_duration=2.0)
    relay.start()
    relay.close("shutdown")
    relay.close("max_duration")
    client.feed_eof()
    loop.advance(10)
    client._lose(None)
    upstream._lose(None)
    assert [s.reason for s in closed] == ["shutdown"]
    assert loop.pending_timers() == 0


def test_on_close_errors_are_contained() -> None:
    loop = FakeLoop()
    client, upstream = FakeTransport(loop), FakeTransport(loop)

    def broken(stats: RelayStats) -> None:
        raise RuntimeError("log sink failed")

    relay = Relay(loop, client, upstream, on_close=broken)  # type: ignore[arg-type]
    relay.start()
    relay.close("shutdown")
    loop.run_ready()
    assert relay.stats is not None and relay.stats.reason == "shutdown"


def test_a_transport_closing_before_start_ends_at_once() -> None:
    loop, client, upstream, relay, closed = make()
    client.closing = True
    relay.start()
    assert upstream.aborted
    loop.run_ready()
    assert [s.reason for s in closed] == ["error"]


def test_statistics_while_running_and_after() -> None:
    loop, _client, _upstream, relay, _closed = make(high=10_000)
    relay.start()
    loop.advance(3)
    stats = relay.statistics()
    assert stats["state"] == "open" and stats["duration"] == pytest.approx(3)
    assert stats["client_reading"] and stats["upstream_reading"] and stats["reason"] is None
    relay.close("shutdown")
    assert relay.statistics()["state"] == "closing"
    loop.run_ready()
    loop.advance(100)
    stats = relay.statistics()
    assert stats["state"] == "closed" and stats["reason"] == "shutdown"
    assert stats["duration"] == pytest.approx(3)


def test_wait_closed_returns_the_stats() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        client, upstream = FakeTransport(FakeLoop()), FakeTransport(FakeLoop())
        relay = Relay(loop, client, upstream)
        relay.start()
        waiter = asyncio.ensure_future(relay.wait_closed())
        await asyncio.sleep(0)
        client.feed_eof()
        upstream.feed_eof()
        client.loop.run_ready()
        upstream.loop.run_ready()
        stats = await asyncio.wait_for(waiter, 5)
        assert stats.reason == "client_closed"
        assert await relay.wait_closed() is stats

    asyncio.run(main())
