"""The admin listener of one gateway process: the socket, the API and the node behind it.

`Gateway` (app.py) owns one. `sync` follows the config's `admin:` section on every start and
reload: open, move (the old socket stops accepting; a request being answered on it, such as
the `POST /reload` that moved it, still gets its answer) or close. With workers the socket
is bound with SO_REUSEPORT, so every worker accepts admin connections.
"""

from __future__ import annotations

import logging

from bastion.admin.api import AdminAPI
from bastion.admin.http import AdminServer
from bastion.admin.node import AdminNode
from bastion.admin.view import GatewayView
from bastion.config.schema import Admin

log = logging.getLogger("bastion.admin")


class AdminListener:
    def __init__(self, gateway: GatewayView, peers_dir: str | None = None) -> None:
        self.node = AdminNode(gateway, peers_dir)
        self.api = AdminAPI(self.node)
        self.server = AdminServer(self.api.handle)

    async def start_peers(self) -> None:
        """(Workers) answer the other workers, and take over the drains made before this one started."""
        await self.node.start_peers()

    async def sync(self, settings: Admin | None, reuse_port: bool) -> None:
        """Open, move or close the admin listener to match the config. Raises OSError."""
        old = self.api.settings
        if settings is None:
            if old is not None:
                self.server.retire()
                log.info("admin listener %s closed", old.bind)
        elif old is None or old.bind != settings.bind:
            fresh = AdminServer(self.api.handle)
            await fresh.listen(settings.bind.host, settings.bind.port, reuse_port)
            self.server.retire()
            self.server = fresh
            auth = "bearer token required" if settings.token else "no token: loopback only"
            log.info("admin API on http://%s (%s)", settings.bind, auth)
        self.api.settings = settings
        if settings is not None:
            self.node.start_sampler()

    async def close(self) -> None:
        self.server.close()
        await self.node.close()
