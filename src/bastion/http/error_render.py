"""How a gateway error becomes a response, one renderer per kind of client.

HTTP clients get the contract's JSON body; a gRPC renderer (grpc-status in trailers) slots
in beside it later. A protocol's `Downstream.render_error` picks its renderer.
"""

from __future__ import annotations

import json

from bastion.errors import GatewayError
from bastion.http.model import Headers, Response


def render_json(error: GatewayError, request_id: str) -> tuple[Response, bytes]:
    """`{"error", "message", "request_id"}` with the error's own headers (Allow, Retry-After...)."""
    body = json.dumps({"error": error.word, "message": error.message, "request_id": request_id}).encode()
    headers = Headers([*error.headers, (b"content-type", b"application/json")])
    return Response(error.status, headers), body
