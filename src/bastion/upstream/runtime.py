"""An upstream as the exchange uses it: targets, balancer and the retry policy."""

from __future__ import annotations

from collections.abc import Sequence

from bastion.config.schema import Upstream
from bastion.errors import NoHealthyTarget
from bastion.http.model import Request
from bastion.upstream.balancers import BALANCERS, Balancer
from bastion.upstream.targets import TargetState

IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))


class UpstreamRuntime:
    __slots__ = ("name", "config", "targets", "balancer", "response_timeout", "max_attempts", "retry_statuses")

    def __init__(self, name: str, config: Upstream, targets: Sequence[TargetState]) -> None:
        self.name = name
        self.config = config
        self.targets = list(targets)
        factory = BALANCERS.get(config.balance, BALANCERS["round_robin"])
        self.balancer: Balancer = factory(self.targets, config)
        self.response_timeout = config.timeouts.response
        self.max_attempts = 1 + config.retries.attempts
        self.retry_statuses = frozenset(config.retries.on_statuses)

    def pick(self, request: Request, exclude: Sequence[TargetState] = ()) -> TargetState:
        """The target for this try. Raises NoHealthyTarget."""
        target = self.balancer.pick(request, exclude)
        if target is None:
            raise NoHealthyTarget()
        return target

    def may_retry(self, request: Request, attempt: int, sent: bool) -> bool:
        """May a failed try be tried again? `sent`: the request may have reached the upstream."""
        if attempt >= self.max_attempts:
            return False
        return not sent or request.method in IDEMPOTENT

    def report_success(self, target: TargetState, seconds: float) -> None:
        """A try got a response head after `seconds` (passive health, latency scores)."""

    def report_failure(self, target: TargetState, error: Exception) -> None:
        """A try failed: connect error, reset, timeout, or a retryable status."""
        target.failures += 1

    def response_headers(self, request: Request, target: TargetState) -> list[tuple[bytes, bytes]]:
        """Headers the upstream layer adds to the response (e.g. a sticky-session cookie)."""
        return []
