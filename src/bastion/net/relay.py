"""A two-way byte pump between two connected transports: WebSocket after 101, TCP, passthrough.

Each transport is handed a `RelaySide` protocol (`transport.set_protocol`), so bytes read on
one side are written to the other as they arrive, with nothing queued in between. The only
buffers are the transports' own write buffers, and they are bounded by backpressure: when a
side's write buffer passes its high watermark (`pause_writing`), the relay stops reading
from the other side until it drains (`resume_writing`). Memory per relay is therefore about
two write buffers, whatever the traffic.

Ending, in the order things usually happen:

- A side sends EOF: the other side gets `write_eof()` (a TCP half-close) and bytes keep
  flowing the other way. A transport that cannot half-close (TLS) ends the relay instead.
  When both sides have sent EOF, the relay ends with the reason of the one that closed
  first (`client_closed` or `upstream_closed`).
- A side is lost (closed or reset) before anything closed: the relay ends with
  `client_closed` / `upstream_closed`, or `error` if the socket failed (a reset).
- Timers: `idle_timeout` (no byte read from either side and none taken from either write
  buffer for that long; a reader that takes bytes slowly may get up to twice that) and
  `max_duration` (since `start`), each optional.
- `close(reason)` and `abort(reason)` from outside (at the end of a drain: `shutdown`).

Ending closes both transports gracefully (their buffered bytes are still written, then a
FIN); a transport still open `linger` seconds later is aborted, so a peer that stops
reading cannot keep a relay alive. The relay is over when both transports are lost:
`on_close` is called once with the final `RelayStats` and `wait_closed()` returns them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("bastion.relay")

CloseReason = Literal["client_closed", "upstream_closed", "idle_timeout", "max_duration", "error", "shutdown"]

DEFAULT_LINGER = 5.0


@dataclass(frozen=True, slots=True)
class RelayStats:
    """What the access log line of a relayed connection needs."""

    bytes_in: int  # read from the client, written to the upstream (pending bytes included)
    bytes_out: int  # read from the upstream, written to the client (pending bytes included)
    duration: float  # seconds from start() until both transports were closed
    reason: CloseReason
    error: str | None  # what failed, for reason "error"; None otherwise


class RelaySide(asyncio.Protocol):
    """The protocol of one of the two transports: every event goes to the relay."""

    __slots__ = ("relay", "name", "transport", "peer", "received", "eof", "lost", "write_paused", "read_paused")

    def __init__(self, relay: Relay, name: Literal["client", "upstream"], transport: asyncio.Transport) -> None:
        self.relay = relay
        self.name = name
        self.transport = transport
        self.peer: RelaySide = self  # set by the relay once both sides exist
        self.received = 0
        self.eof = False  # this side sent EOF: nothing more to read from it
        self.lost = False  # connection_lost was called: the transport is gone
        self.write_paused = False  # this side's write buffer is over its high watermark
        self.read_paused = False  # the relay stopped reading this side (its peer is full)

    # --- asyncio.Protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay.ending:
            return  # the relay is closing: bytes read now have nowhere to go
        self.received += len(data)
        if relay.idle_timeout:
            relay.last_activity = relay.loop.time()
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.relay.side_eof(self)
        return True  # keep the transport open for writing: the relay closes it

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.side_lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.peer.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.peer.resume()

    # --- reading, driven by the peer's write buffer -------------------------------------------

    def pause(self) -> None:
        if not self.read_paused and self.readable():
            self.read_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.read_paused:
            self.read_paused = False
            if self.readable():
                self.transport.resume_reading()

    def readable(self) -> bool:
        # Never touch reading after EOF: resuming a transport that saw EOF reads EOF again.
        return not (self.eof or self.lost or self.relay.ending)


class Relay:
    """Two transports pumped into each other until both are done; see the module docstring."""

    __slots__ = (
        "loop",
        "client",
        "upstream",
        "idle_timeout",
        "max_duration",
        "linger",
        "on_close",
        "last_activity",
        "started",
        "ending",
        "reason",
        "error",
        "stats",
        "_first_closed",
        "_buffer_sizes",
        "_idle_timer",
        "_max_timer",
        "_linger_timer",
        "_waiter",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client_transport: asyncio.Transport,
        upstream_transport: asyncio.Transport,
        *,
        idle_timeout: float | None = None,
        max_duration: float | None = None,
        on_close: Callable[[RelayStats], None] | None = None,
        linger: float = DEFAULT_LINGER,
    ) -> None:
        """Timeouts of None or 0 are off. Nothing happens before `start`."""
        self.loop = loop
        self.client = RelaySide(self, "client", client_transport)
        self.upstream = RelaySide(self, "upstream", upstream_transport)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.idle_timeout = idle_timeout or None
        self.max_duration = max_duration or None
        self.linger = linger
        self.on_close = on_close
        self.last_activity = 0.0
        self.started = 0.0
        self.ending = False
        self.reason: CloseReason | None = None
        self.error: str | None = None
        self.stats: RelayStats | None = None  # set once the relay is over
        self._first_closed: CloseReason | None = None
        self._buffer_sizes = (0, 0)  # write buffer sizes at the last idle check
        self._idle_timer: asyncio.TimerHandle | None = None
        self._max_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[RelayStats] | None = None

    # --- public API ----------------------------------------------------------------------------

    def start(
        self,
        client_pending: bytes = b"",
        upstream_pending: bytes = b"",
        *,
        client_write_paused: bool = False,
        upstream_write_paused: bool = False,
    ) -> None:
        """Take both transports over and start pumping.

        `client_pending`: bytes already read from the client that belong to the relayed
        stream (sent right behind the Upgrade request); they go to the upstream first.
        `upstream_pending`: the same from the upstream (right behind its 101 head).
        `*_write_paused`: that transport already called `pause_writing` on its previous
        protocol and has not resumed yet (it will not say so again); a write buffer over
        its high watermark counts as paused in any case. Reading is resumed on both
        transports unless the other side is paused, whatever their previous protocols did.
        """
        loop = self.loop
        now = self.started = self.last_activity = loop.time()
        client, upstream = self.client, self.upstream
        closing = client.transport.is_closing() or upstream.transport.is_closing()
        for side in (client, upstream):
            side.transport.set_protocol(side)
        if closing:
            # A transport closing already may have reported its loss to its old protocol:
            # waiting for it could wait forever. End at once; later losses find it finished.
            self._end("error", "a connection closed before the relay started", hard=True)
            self._abort_rest()
            loop.call_soon(self._finish)
            return
        client.write_paused = client_write_paused or _over_high_watermark(client.transport)
        upstream.write_paused = upstream_write_paused or _over_high_watermark(upstream.transport)
        for side in (client, upstream):
            if side.peer.write_paused:
                side.read_paused = True
                if side.transport.is_reading():
                    side.transport.pause_reading()
            elif not side.transport.is_reading():
                side.transport.resume_reading()
        if self.idle_timeout:
            self._idle_timer = loop.call_at(now + self.idle_timeout, self._on_idle)
        if self.max_duration:
            self._max_timer = loop.call_at(now + self.max_duration, self.close, "max_duration")
        if client_pending:
            client.received += len(client_pending)
            upstream.transport.write(client_pending)
        if upstream_pending:
            upstream.received += len(upstream_pending)
            client.transport.write(upstream_pending)

    def close(self, reason: CloseReason = "shutdown") -> None:
        """End the relay: both transports close after writing what they hold (a FIN), and
        are aborted if still open `linger` seconds later. A no-op once the relay is ending."""
        self._end(reason, None, hard=False)

    def abort(self, reason: CloseReason = "shutdown") -> None:
        """End the relay now: both transports are aborted, buffered bytes are dropped."""
        self._end(reason, None, hard=True)
        self._abort_rest()

    async def wait_closed(self) -> RelayStats:
        """The final statistics, once both transports are closed."""
        if self.stats is not None:
            return self.stats
        if self._waiter is None:
            self._waiter = self.loop.create_future()
        return await asyncio.shield(self._waiter)

    def statistics(self) -> dict[str, Any]:
        """A snapshot for the admin API: bytes each way so far, state, reading state."""
        end = self.loop.time() if self.stats is None else self.started + self.stats.duration
        if self.stats is not None:
            state = "closed"
        elif self.ending:
            state = "closing"
        elif self._first_closed is not None:
            state = "half_closed"
        else:
            state = "open"
        return {
            "state": state,
            "bytes_in": self.client.received,
            "bytes_out": self.upstream.received,
            "duration": max(0.0, end - self.started) if self.started else 0.0,
            "reason": self.reason,
            "client_reading": self.client.readable() and not self.client.read_paused,
            "upstream_reading": self.upstream.readable() and not self.upstream.read_paused,
        }

    # --- events from the sides -----------------------------------------------------------------

    def side_eof(self, side: RelaySide) -> None:
        side.eof = True
        if self.ending:
            return
        reason: CloseReason = "client_closed" if side is self.client else "upstream_closed"
        if self._first_closed is None:
            self._first_closed = reason
        peer = side.peer
        if peer.eof:
            self._end(self._first_closed, None, hard=False)  # both directions are done
        elif peer.transport.can_write_eof():
            peer.transport.write_eof()  # after what its buffer holds: the half-close crosses over
        else:
            self._end(reason, None, hard=False)  # it cannot half-close: end both directions

    def side_lost(self, side: RelaySide, exc: Exception | None) -> None:
        if not self.ending:
            if self._first_closed is not None:
                self._end(self._first_closed, None, hard=False)
            elif exc is not None:
                self._end("error", f"{side.name}: {exc!r}", hard=False)
            else:
                self._end("client_closed" if side is self.client else "upstream_closed", None, hard=False)
        if self.client.lost and self.upstream.lost:
            self._finish()

    # --- internals -----------------------------------------------------------------------------

    def _end(self, reason: CloseReason, error: str | None, hard: bool) -> None:
        if self.ending:
            return
        self.ending = True
        self.reason = reason
        self.error = error
        for timer in (self._idle_timer, self._max_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._max_timer = None
        if hard:
            return  # the caller aborts
        for side in (self.client, self.upstream):
            if not side.lost:
                side.transport.close()
        if not (self.client.lost and self.upstream.lost):
            self._linger_timer = self.loop.call_later(self.linger, self._abort_rest)

    def _abort_rest(self) -> None:
        self._linger_timer = None
        for side in (self.client, self.upstream):
            if not side.lost:
                side.transport.abort()

    def _on_idle(self) -> None:
        self._idle_timer = None
        if self.ending or not self.idle_timeout:
            return
        now = self.loop.time()
        # A reader taking bytes from a write buffer without emptying it to the low watermark
        # gives no event; a buffer whose size moved since the last check shows the progress.
        sizes = (self.client.transport.get_write_buffer_size(), self.upstream.transport.get_write_buffer_size())
        if sizes != self._buffer_sizes:
            self._buffer_sizes = sizes
            self.last_activity = now
        deadline = self.last_activity + self.idle_timeout
        if now >= deadline:
            self.close("idle_timeout")
        else:
            self._idle_timer = self.loop.call_at(deadline, self._on_idle)

    def _finish(self) -> None:
        if self.stats is not None:
            return
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        assert self.reason is not None
        stats = self.stats = RelayStats(
            bytes_in=self.client.received,
            bytes_out=self.upstream.received,
            duration=max(0.0, self.loop.time() - self.started),
            reason=self.reason,
            error=self.error,
        )
        if self.on_close is not None:
            try:
                self.on_close(stats)
            except Exception:
                log.exception("relay on_close callback failed")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(stats)


def _over_high_watermark(transport: asyncio.Transport) -> bool:
    try:
        _, high = transport.get_write_buffer_limits()
    except (AttributeError, NotImplementedError):
        return False
    return transport.get_write_buffer_size() > high
