#!/usr/bin/env python3
"""Hold N idle keep-alive HTTP/1.1 connections open to one port, for a memory measurement.

Run by `bench/run.py` as a separate process (so the gateway's RSS counts only the gateway).
Each connection sends one complete GET and reads its whole response (Content-Length body),
so it is a real keep-alive connection waiting for its next request, not a half-open socket.
Connections are opened in batches (`--batch`) so the listen backlog never overflows, and
everything is bounded by `--timeout`.

It talks to its parent with JSON lines:

    stdout  {"event": "opened", "opened": N, "failed": F, "seconds": S, "errors": {...}}
    stdin   "check"   -> stdout {"event": "checked", "open": N, "dropped": D}
    stdin   "close" or end of input -> closes every connection (RST, no TIME_WAIT) and exits

Plain non-blocking sockets and `selectors`: no event loop is needed to park sockets.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import resource
import selectors
import socket
import struct
import sys
import time
from collections import Counter

MAX_RESPONSE = 64 * 1024


class Client:
    """One connection: connect, send the request, read one response, then sit idle."""

    __slots__ = ("sock", "received", "error")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = b""
        self.error = ""

    def advance(self, writable: bool, request: bytes) -> str:
        """One readiness event -> "sent", "waiting", "done" or "failed" (with `error`)."""
        if writable:
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.error = f"connect: {errno.errorcode.get(code, code)}"
                return "failed"
            try:
                self.sock.send(request)  # small: always fits in an empty send buffer
            except OSError as exc:
                self.error = f"send: {exc.strerror}"
                return "failed"
            return "sent"
        try:
            data = self.sock.recv(65536)
        except OSError as exc:
            self.error = f"recv: {exc.strerror}"
            return "failed"
        if not data:
            self.error = "closed before the response"
            return "failed"
        self.received += data
        if self.response_complete():
            self.received = b""
            return "done"
        return "failed" if self.error else "waiting"

    def response_complete(self) -> bool:
        """True once a whole keep-alive 200 response is in; sets `error` when it cannot be one."""
        head_end = self.received.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self.received) > MAX_RESPONSE:
                self.error = "response head too large"
            return False
        lines = self.received[:head_end].decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "200":
            self.error = f"status {status[1] if len(status) > 1 else '?'}"
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get("connection") == "close":
            self.error = "server closes the connection"
            return False
        if "content-length" not in headers:
            self.error = "no content-length"
            return False
        return len(self.received) - head_end - 4 >= int(headers["content-length"])


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            sys.exit(f"idle_clients: need {needed} open files, hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def open_batch(port: int, request: bytes, count: int, deadline: float, errors: Counter[str]) -> list[Client]:
    """Open `count` connections and complete one request on each; returns those that made it."""
    selector = selectors.DefaultSelector()
    pending: dict[int, Client] = {}
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            errors[f"connect: {errno.errorcode.get(code, code)}"] += 1
            sock.close()
            continue
        client = Client(sock)
        pending[sock.fileno()] = client
        selector.register(sock, selectors.EVENT_WRITE, client)
    done: list[Client] = []
    try:
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                errors["timeout"] += len(pending)
                for client in pending.values():
                    client.sock.close()
                break
            for key, events in selector.select(min(remaining, 1.0)):
                client = key.data
                state = client.advance(bool(events & selectors.EVENT_WRITE), request)
                if state == "sent":
                    selector.modify(client.sock, selectors.EVENT_READ, client)
                elif state != "waiting":
                    selector.unregister(client.sock)
                    del pending[client.sock.fileno()]
                    if state == "done":
                        done.append(client)
                    else:
                        errors[client.error] += 1
                        client.sock.close()
    finally:
        selector.close()
    return done


def count_open(clients: list[Client]) -> int:
    """Connections the server still holds: an idle socket that turns readable was closed (or
    got unexpected bytes), either way it no longer counts."""
    selector = selectors.DefaultSelector()
    try:
        for client in clients:
            selector.register(client.sock, selectors.EVENT_READ)
        readable = len(selector.select(0))
    finally:
        selector.close()
    return len(clients) - readable


def close_all(clients: list[Client]) -> None:
    linger = struct.pack("ii", 1, 0)  # close with RST: 10k sockets in TIME_WAIT help nobody
    for client in clients:
        with contextlib.suppress(OSError):
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        client.sock.close()


def say(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500, help="connections opened at once (default 500)")
    parser.add_argument("--path", default="/plain")
    parser.add_argument("--header", action="append", default=[], help="extra request header 'Name: value'")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up opening after this many seconds")
    args = parser.parse_args(argv)

    raise_fd_limit(args.connections + 100)
    head = [f"GET {args.path} HTTP/1.1", f"Host: 127.0.0.1:{args.port}", *args.header]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")

    started = time.monotonic()
    deadline = started + args.timeout
    clients: list[Client] = []
    errors: Counter[str] = Counter()
    while len(clients) < args.connections and time.monotonic() < deadline:
        batch = min(args.batch, args.connections - len(clients))
        clients += open_batch(args.port, request, batch, deadline, errors)
        if sum(errors.values()) > args.connections // 10:
            break  # something is wrong; no point in hammering on
    say(
        {
            "event": "opened",
            "opened": len(clients),
            "failed": sum(errors.values()),
            "seconds": round(time.monotonic() - started, 3),
            "errors": dict(errors.most_common(5)),
        }
    )
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "check":
                still = count_open(clients)
                say({"event": "checked", "open": still, "dropped": len(clients) - still})
            elif command == "close":
                break
    finally:
        close_all(clients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
