"""Pick a target of an L4 upstream and connect to it, failing over before any byte moves.

Each available target is tried at most once per client connection, in the order the
upstream's balancer picks them (so `consistent_hash` on `ip` keeps a client on its target,
`least_connections` sees the open relays). A target at the upstream's `max_connections`
(open L4 connections counted in `in_flight`) is skipped while another has room. A refused
or timed-out connect counts as a failure for passive health, and the next target is tried;
nothing has been relayed yet, so failing over is always safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bastion.errors import GatewayError, NoHealthyTarget, Overloaded, UpstreamConnectError, UpstreamConnectTimeout
from bastion.http.model import Headers, Request
from bastion.upstream.runtime import UpstreamRuntime
from bastion.upstream.targets import TargetState

_ANY = Request("", "", "", Headers())  # balancers other than consistent_hash read nothing of it


def pick_key(client_ip: str, upstream: UpstreamRuntime) -> Request:
    """What the balancer reads for an L4 connection: only the client address (hash_on ip)."""
    if upstream.config.balance != "consistent_hash":
        return _ANY
    return Request("", "", "", Headers(), client_ip=client_ip)


async def connect_target(
    loop: asyncio.AbstractEventLoop,
    upstream: UpstreamRuntime,
    client_ip: str,
    factory: Callable[[], asyncio.Protocol],
) -> tuple[TargetState, asyncio.Transport, asyncio.Protocol]:
    """The target connected to, its transport and protocol; its `in_flight` is taken (the
    caller gives it back when the connection ends).

    Raises NoHealthyTarget (none available), Overloaded (all at their connection cap), or
    the last target's UpstreamConnectError / UpstreamConnectTimeout."""
    key = pick_key(client_ip, upstream)
    cap = upstream.config.max_connections
    timeout = upstream.config.timeouts.connect
    tried: list[TargetState] = []
    last: GatewayError | None = None
    while True:
        full = [t for t in upstream.targets if t.in_flight >= cap and t not in tried]
        try:
            target = upstream.pick(key, [*tried, *full] if full else tried)
        except NoHealthyTarget:
            if last is not None:
                raise last from None
            if full:
                raise Overloaded() from None
            raise
        tried.append(target)
        target.in_flight += 1
        target.requests += 1
        started = loop.time()
        # A timer that cancels this task: no extra task (wait_for) nor context frames (timeout).
        expired: list[bool] = []
        timer = loop.call_later(timeout, _expire, asyncio.current_task(), expired)
        try:
            address = target.address
            try:
                transport, protocol = await loop.create_connection(factory, address.host, address.port)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not expired or task is None or task.uncancel() > 0:
                    raise  # cancelled from outside (the client left, shutdown)
                raise TimeoutError from None
            finally:
                timer.cancel()
        except (OSError, TimeoutError) as exc:
            target.in_flight -= 1
            if isinstance(exc, TimeoutError):
                last = UpstreamConnectTimeout(f"{target.name}: connect timed out after {timeout:g}s")
            else:
                last = UpstreamConnectError(f"{target.name}: {exc.strerror or exc}")
            upstream.report_failure(target, last)
            continue
        except BaseException:
            target.in_flight -= 1
            raise
        upstream.report_success(target, loop.time() - started)
        return target, transport, protocol


def _expire(task: asyncio.Task[object] | None, expired: list[bool]) -> None:
    if task is not None and not task.done():
        expired.append(True)
        task.cancel()
