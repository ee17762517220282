#!/usr/bin/env python3
"""A minimal WebSocket echo origin for the bench (RFC 6455, no extensions, no subprotocols).

`bench/run.py` starts one per run, listening on two ports, and puts both proxies in front
of it, so the proxies share the origin as in the HTTP rows. It has to be cheap per message,
since it shares a CPU with the load client: a plain asyncio `Protocol` (uvloop when it is
installed), one `data_received` per read, every complete frame answered in one write.

- The handshake: a `GET` with `Sec-WebSocket-Key` gets `101 Switching Protocols` with the
  matching `Sec-WebSocket-Accept`; anything else gets `400` and a close.
- Data frames (text, binary, continuation) come back with the same first byte (FIN and
  opcode) and the payload unmasked; an all-zero masking key (the bench client's) costs no
  XOR. Ping gets pong; close gets close, then the TCP connection is closed.

    python bench/ws_echo.py --port 9001 --port 9002
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import signal
import sys
from typing import cast

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 16 * 1024
NO_MASK = b"\0\0\0\0"


def accept_key(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def header(head: bytes, name: bytes) -> bytes | None:
    """The value of field `name` (lower case) in a request head, or None."""
    for line in head.split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.strip().lower() == name:
            return value.strip()
    return None


def unmask(payload: bytes, key: bytes) -> bytes:
    if key == NO_MASK:
        return payload
    size = len(payload)
    stream = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(size, "little")


def frame(first: int, payload: bytes) -> bytes:
    """A server frame (never masked)."""
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return bytes((first, 126)) + size.to_bytes(2, "big") + payload
    return bytes((first, 127)) + size.to_bytes(8, "big") + payload


class Echo(asyncio.Protocol):
    """One client connection: the handshake, then every frame echoed."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        buffer = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    transport.close()
                self.buffer = buffer
                return
            head, buffer = buffer[:end], buffer[end + 4 :]
            key = header(head, b"sec-websocket-key")
            if key is None or not head.startswith(b"GET "):
                transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                transport.close()
                return
            transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
            )
            self.upgraded = True
        out: list[bytes] = []
        pos, end = 0, len(buffer)
        while end - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            size, at = second & 0x7F, pos + 2
            if size == 126:
                if end - at < 2:
                    break
                size, at = int.from_bytes(buffer[at : at + 2], "big"), at + 2
            elif size == 127:
                if end - at < 8:
                    break
                size, at = int.from_bytes(buffer[at : at + 8], "big"), at + 8
            key = NO_MASK
            if second & 0x80:
                if end - at < 4:
                    break
                key, at = buffer[at : at + 4], at + 4
            if end - at < size:
                break
            payload = unmask(buffer[at : at + size], key)
            pos = at + size
            opcode = first & 0x0F
            if opcode == 0x8:  # close: answer it, then close the connection
                out.append(frame(0x88, payload))
                transport.write(b"".join(out))
                transport.close()
                self.buffer = b""
                return
            if opcode == 0x9:
                out.append(frame(0x8A, payload))
            elif opcode != 0xA:  # a pong needs no answer
                out.append(frame(first, payload))
        self.buffer = buffer[pos:]
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    def eof_received(self) -> bool:
        return False  # the client is done: close our side too


async def serve(ports: list[int], host: str) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(Echo, host, port, backlog=4096) for port in ports]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, action="append", required=True, help="port to listen on (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, args.host))
    else:
        uvloop.run(serve(args.port, args.host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
