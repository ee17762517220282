"""The plugin phases of one request: request hooks in chain order, response hooks in reverse.

A plugin bug becomes a 500 (`plugin_failed`), a `GatewayError` it raises passes through as
the error it is, and a `Reply` from a request hook short-circuits the chain: only the
plugins that ran see the response.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bastion.errors import GatewayError
from bastion.http.model import Response
from bastion.pipeline import Context, Plugin, Reply, plugin_failed

if TYPE_CHECKING:
    from bastion.config.build import RouteRuntime

log = logging.getLogger("bastion.exchange")


async def request_phase(route: RouteRuntime, ctx: Context) -> tuple[Reply, int] | None:
    """Run the request hooks; (the reply, how many hooks ran) when a plugin answered."""
    for ran, plugin in enumerate(route.request_plugins):
        try:
            reply = await plugin.on_request(ctx)
        except GatewayError:
            raise
        except Exception as exc:
            raise plugin_failed(plugin, "request", exc, ctx.request.request_id) from exc
        if reply is not None:
            return reply, ran + 1
    return None


async def response_phase(plugins: Sequence[Plugin], ctx: Context, response: Response) -> None:
    """Run response hooks (already in reverse chain order)."""
    for plugin in plugins:
        try:
            await plugin.on_response(ctx, response)
        except GatewayError:
            raise
        except Exception as exc:
            raise plugin_failed(plugin, "response", exc, ctx.request.request_id) from exc


async def reply_response(route: RouteRuntime, ctx: Context, reply: Reply, ran: int) -> tuple[Response, bytes]:
    """A plugin answered: run the response hooks of the plugins that ran; the response to send."""
    response = Response(reply.status, reply.headers)
    ctx.response = response
    # Every plugin up to the one that replied, in chain order (with or without a request hook).
    ran_plugins = set(route.plugins[: route.plugins.index(route.request_plugins[ran - 1]) + 1])
    await response_phase([p for p in route.response_plugins if p in ran_plugins], ctx, response)
    body = reply.body
    if body.startswith(b'{"error":') and reply.status >= 400:
        body = _with_request_id(body, ctx.request.request_id)
    return response, body


def run_log_hooks(route: RouteRuntime, ctx: Context, record: dict[str, Any]) -> None:
    for plugin in route.log_plugins:
        try:
            plugin.on_log(ctx, record)
        except Exception:
            log.exception("plugin %s failed in its log hook", plugin.name)


def _with_request_id(body: bytes, request_id: str) -> bytes:
    try:
        doc: dict[str, Any] = json.loads(body)
    except ValueError:
        return body
    doc["request_id"] = request_id
    return json.dumps(doc).encode()
