"""The gateway as the admin API sees it: what `Gateway` (app.py) offers, as a Protocol.

The admin package reads and steers the gateway only through these members, so it does not
import app.py (which imports the admin package to serve it) and tests can hand it a stand-in.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bastion.config.build import Snapshot
    from bastion.config.schema import Listener
    from bastion.observability.metrics import Metrics
    from bastion.upstream.targets import TargetRegistry


class ClientConnection(Protocol):
    @property
    def settings(self) -> Listener: ...


class GatewayView(Protocol):
    @property
    def worker(self) -> int: ...  # this process's index among the workers
    @property
    def workers(self) -> int: ...  # how many workers the gateway runs
    @property
    def restarts(self) -> int: ...  # how often this worker's slot was refilled
    @property
    def started_at(self) -> float: ...  # this process, Unix time
    @property
    def launched_at(self) -> float: ...  # the gateway (the supervisor with workers)
    @property
    def metrics(self) -> Metrics: ...
    @property
    def registry(self) -> TargetRegistry: ...
    @property
    def connections(self) -> Iterable[ClientConnection]: ...
    @property
    def config_info(self) -> dict[str, Any]: ...
    @property
    def last_reload(self) -> dict[str, Any] | None: ...
    @property
    def running_snapshot(self) -> Snapshot | None: ...  # None until the first config is live

    def statistics(self) -> dict[str, Any]: ...
    def is_ready(self) -> bool: ...
    async def reload(self) -> bool: ...
