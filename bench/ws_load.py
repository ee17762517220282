#!/usr/bin/env python3
"""WebSocket ping-pong load: N connections, each sending one small message and waiting for
its echo before sending the next, for a fixed time. Prints one JSON line:

    {"messages": M, "seconds": S, "rate": M/S, "p50": ms, "p99": ms, "connections": N,
     "opened": N, "errors": E, "error_kinds": {...}}

`bench/run.py` runs it against `bench/ws_echo.py` directly and through each proxy. It must
not be what limits the rate, so it is written like the origin: an asyncio `Protocol` per
connection (uvloop when installed), no coroutine per message. Every connection first
completes the handshake (101 and the right `Sec-WebSocket-Accept`); the clock starts when
all are open, and only echoes received before it stops count. Each echo must be exactly
the frame sent back unmasked, or it counts as an error and the connection is dropped.
Messages are binary frames masked with an all-zero key (legal, and it keeps the bytes as
they are, so no side pays for XOR). At the end every connection sends a close frame and
waits (bounded) for the origin's.

    python bench/ws_load.py --port 9001 --connections 64 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import sys
import time
from collections import Counter
from typing import cast

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLOSE = b"\x88\x82\0\0\0\0\x03\xe8"  # close 1000, masked with the zero key


class Run:
    """What all connections share: the message, whether to keep sending, the counts."""

    def __init__(self, size: int) -> None:
        payload = os.urandom(size)
        if size >= 126:
            raise ValueError("messages of 126 bytes or more are not needed here")
        self.message = bytes((0x82, 0x80 | size)) + b"\0\0\0\0" + payload
        self.echo = bytes((0x82, size)) + payload
        self.running = False
        self.messages = 0
        self.rtts: list[float] = []
        self.errors: Counter[str] = Counter()

    def error(self, kind: str) -> None:
        self.errors[kind] += 1


class Client(asyncio.Protocol):
    """One WebSocket connection doing ping-pong while `run.running`."""

    def __init__(self, run: Run, host: str, path: str) -> None:
        self.run = run
        key = base64.b64encode(os.urandom(16))
        self.accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.request = (
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
            ).encode()
            + key
            + b"\r\n\r\n"
        )
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False
        self.closing = False
        self.sent = 0.0
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[bool] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.write(self.request)

    def fail(self, kind: str) -> None:
        self.run.error(kind)
        if not self.ready.done():
            self.ready.set_result(False)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # the last echo and the close frame: nothing more to check
        buffer = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            head = buffer[:end]
            status = head.split(b"\r\n", 1)[0]
            if not status.startswith(b"HTTP/1.1 101"):
                return self.fail(f"handshake answered {status.decode(errors='replace')[:60]}")
            if self.accept not in head:
                return self.fail("handshake: wrong Sec-WebSocket-Accept")
            self.upgraded = True
            self.buffer = b""
            self.ready.set_result(True)
            buffer = buffer[end + 4 :]
            if not buffer:
                return
        run = self.run
        if buffer == run.echo:
            self.buffer = b""
            now = time.perf_counter()
            if run.running:
                run.messages += 1
                run.rtts.append(now - self.sent)
                self.send(now)
        elif len(buffer) < len(run.echo) and run.echo.startswith(buffer):
            self.buffer = buffer
        else:
            self.fail("echo differs from the message")

    def send(self, now: float) -> None:
        assert self.transport is not None
        self.sent = now
        self.transport.write(self.run.message)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.closing = True
            self.transport.write(CLOSE)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing and self.upgraded:
            self.run.error("closed during the run")
        if not self.ready.done():
            self.ready.set_result(False)
            self.run.error(f"closed before the handshake ({exc})" if exc else "closed before the handshake")
        if not self.closed.done():
            self.closed.set_result(None)


async def open_client(run: Run, host: str, port: int, path: str, timeout: float) -> Client | None:
    loop = asyncio.get_running_loop()
    try:
        _, client = await asyncio.wait_for(
            loop.create_connection(lambda: Client(run, f"{host}:{port}", path), host, port), timeout
        )
        if await asyncio.wait_for(client.ready, timeout):
            return client
    except (OSError, TimeoutError) as exc:
        run.error(f"connect: {type(exc).__name__} {exc}"[:80])
    return None


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def load(args: argparse.Namespace) -> dict[str, object]:
    run = Run(args.size)
    opened = await asyncio.gather(
        *(open_client(run, args.host, args.port, args.path, args.timeout) for _ in range(args.connections))
    )
    clients = [client for client in opened if client is not None]
    started = time.perf_counter()
    if clients:
        run.running = True
        for client in clients:
            client.send(started)
        await asyncio.sleep(args.duration)
        run.running = False
    seconds = time.perf_counter() - started
    for client in clients:
        client.close()
    if clients:
        _, late = await asyncio.wait([client.closed for client in clients], timeout=3.0)
        for client in clients:
            if not client.closed.done() and client.transport is not None:
                client.transport.abort()
        if late:
            run.error("no close from the other side within 3 s")
    return {
        "messages": run.messages,
        "seconds": round(seconds, 3),
        "rate": run.messages / seconds if clients else 0.0,
        "p50": percentile(run.rtts, 0.50) * 1000,
        "p99": percentile(run.rtts, 0.99) * 1000,
        "connections": args.connections,
        "opened": len(clients),
        "errors": sum(run.errors.values()),
        "error_kinds": dict(run.errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--path", default="/ws")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load once all are open")
    parser.add_argument("--size", type=int, default=32, help="payload bytes per message (< 126)")
    parser.add_argument("--timeout", type=float, default=10.0, help="bound on opening each connection")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(load(args))
    else:
        result = uvloop.run(load(args))
    print(json.dumps(result), flush=True)
    return 0 if result["opened"] else 1


if __name__ == "__main__":
    sys.exit(main())
