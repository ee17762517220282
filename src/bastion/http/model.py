"""Request and response heads as the router, the plugins and the proxy see them.

Header names are stored lower-cased as bytes and values as bytes, in arrival order, as a
plain list of pairs: that is what the parser produces and what the serializer writes, so
the common path never converts. The `str` helpers are for plugins and tests.
"""

from __future__ import annotations

from typing import Any

HeaderList = list[tuple[bytes, bytes]]


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


class Headers:
    """An ordered multi-map of header fields; names lower-case bytes."""

    __slots__ = ("items",)

    def __init__(self, items: HeaderList | None = None) -> None:
        self.items: HeaderList = items if items is not None else []

    def get(self, name: str | bytes) -> str | None:
        """The first value of `name`, decoded, or None."""
        key = _b(name).lower()
        for k, v in self.items:
            if k == key:
                return v.decode("latin-1")
        return None

    def get_raw(self, key: bytes) -> bytes | None:
        """The first value of an already lower-cased name, as bytes (hot path)."""
        for k, v in self.items:
            if k == key:
                return v
        return None

    def get_all(self, name: str | bytes) -> list[str]:
        key = _b(name).lower()
        return [v.decode("latin-1") for k, v in self.items if k == key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str | bytes):
            return False
        key = _b(name).lower()
        return any(k == key for k, _ in self.items)

    def set(self, name: str | bytes, value: str | bytes) -> None:
        """Replace every value of `name` with one value."""
        key = _b(name).lower()
        self.items = [(k, v) for k, v in self.items if k != key]
        self.items.append((key, _b(value)))

    def add(self, name: str | bytes, value: str | bytes) -> None:
        self.items.append((_b(name).lower(), _b(value)))

    def remove(self, name: str | bytes) -> None:
        key = _b(name).lower()
        if any(k == key for k, _ in self.items):
            self.items = [(k, v) for k, v in self.items if k != key]

    def __iter__(self) -> Any:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"Headers({self.items!r})"


class Request:
    """One client request head, after framing checks and path normalisation, whatever the
    protocol: no HTTP/1.1 framing here (the protocol that parsed it keeps that).

    `path` is the normalised, percent-decoded-where-safe path used both for routing and for
    forwarding; `query` is the raw query string without '?'. `host` is lower-case, no port,
    and the authority as forwarded is the `host` header field. `has_body` says a body follows;
    `content_length` is its declared length (None: unknown, streamed). `version` is the
    client's protocol version ("1.1", "1.0", "2"), for logs and plugins; `upgrade` the protocol
    a client asks to switch to (an HTTP/1.1 Upgrade, later HTTP/2's extended CONNECT).
    """

    __slots__ = (
        "method",
        "path",
        "query",
        "headers",
        "version",
        "host",
        "client_ip",
        "client_port",
        "request_id",
        "scheme",
        "content_length",
        "has_body",
        "upgrade",
        "client_cert",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: Headers,
        version: str = "1.1",
        host: str = "",
        client_ip: str = "",
        client_port: int = 0,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.version = version
        self.host = host
        self.client_ip = client_ip
        self.client_port = client_port
        self.request_id = ""
        self.scheme = "http"
        self.content_length: int | None = None
        self.has_body = False
        self.upgrade: str | None = None  # the protocol asked for ("websocket"), if any
        self.client_cert: bytes | None = None  # the verified client certificate (DER), mTLS only


class Response:
    """A response head on its way to the client (from the upstream or from a plugin)."""

    __slots__ = ("status", "reason", "headers")

    def __init__(self, status: int, headers: Headers, reason: bytes = b"") -> None:
        self.status = status
        self.headers = headers
        self.reason = reason
