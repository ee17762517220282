"""The access-log record of one exchange: the fields docs/config.md documents, nothing else."""

from __future__ import annotations

import time
from typing import Any

from bastion.http.model import Request

_PROTOCOLS = {"1.1": "HTTP/1.1", "2": "HTTP/2", "1.0": "HTTP/1.0"}


def access_record(
    request: Request,
    route: str | None,
    upstream: str | None,
    target: str | None,
    consumer: str | None,
    status: int,
    bytes_in: int,
    bytes_out: int,
    started: float,
) -> dict[str, Any]:
    """One JSON-ready dict; `started` is the exchange's `time.monotonic()` at its start."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "request_id": request.request_id,
        "client": request.client_ip,
        "method": request.method,
        "protocol": _PROTOCOLS.get(request.version, request.version),
        "host": request.host,
        "path": request.path,
        "route": route,
        "upstream": upstream,
        "target": target,
        "consumer": consumer,
        "status": status,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
    }
