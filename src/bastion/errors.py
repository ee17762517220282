"""One exception tree. Each gateway error knows its HTTP status and machine word.

Third-party errors (OSError, httptools, asyncio timeouts) are translated into these at the
boundary where they happen, so the exchange maps any failure to a response in one place.
"""

from __future__ import annotations


class BastionError(Exception):
    """Base of every error Bastion raises on purpose."""


class ConfigError(BastionError):
    """The config cannot be used. `problems` holds every `location: message` line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class GatewayError(BastionError):
    """An error that becomes a JSON response the gateway makes itself."""

    status = 500
    word = "internal_error"
    message = "The gateway failed to handle the request."
    where: tuple[str, str] | None = None
    """(upstream, target) of the try that failed, set by the upstream layer: for the admin
    API's recent errors, never sent to the client."""

    def __init__(self, message: str | None = None, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message or self.message)
        if message:
            self.message = message
        self.headers = headers or []


class BadRequest(GatewayError):
    status, word, message = 400, "bad_request", "The request is malformed."


class NotFound(GatewayError):
    status, word, message = 404, "no_route", "No route matches the request."


class MethodNotAllowed(GatewayError):
    status, word, message = 405, "method_not_allowed", "The path does not accept this method."


class PayloadTooLarge(GatewayError):
    status, word, message = 413, "body_too_large", "The request body is over the limit."


class ExpectationFailed(GatewayError):
    status, word, message = 417, "expectation_failed", "The only expectation supported is 100-continue."


class ClientClosed(GatewayError):
    """The client went away before its answer: nothing is sent; logged as 499, as nginx does."""

    status, word, message = 499, "client_closed", "The client closed the connection."


class TransferCodingNotImplemented(GatewayError):
    status, word, message = 501, "not_implemented", "The request's transfer coding is not supported (only chunked)."


class URITooLong(GatewayError):
    status, word, message = 414, "uri_too_long", "The request URI is over the limit."


class HeadersTooLarge(GatewayError):
    status, word, message = 431, "headers_too_large", "The request headers are over the limit."


class UpstreamError(GatewayError):
    """The upstream refused, reset, or answered something that is not HTTP."""

    status, word, message = 502, "bad_gateway", "The upstream refused, reset, or sent a malformed response."


class UpstreamConnectError(UpstreamError):
    """No connection could be made. Nothing reached the upstream, so any request may retry."""

    word = "upstream_connect_failed"
    message = "The upstream refused the connection."


class NoHealthyTarget(GatewayError):
    status, word, message = 503, "no_healthy_target", "No healthy target is available."


class Overloaded(GatewayError):
    status, word, message = 503, "upstream_overloaded", "The upstream is at its connection limit."


class UpstreamTimeout(GatewayError):
    status, word, message = 504, "upstream_timeout", "The upstream did not answer in time."


class UpstreamConnectTimeout(UpstreamTimeout):
    """Connecting timed out: nothing reached the upstream."""

    word = "upstream_connect_timeout"
