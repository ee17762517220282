"""The gateway side of the admin API: this process's answers, and the other workers'.

One `AdminNode` per gateway process. It owns the admin listener (opened, moved or closed to
follow `admin:` on every reload, with SO_REUSEPORT when there are workers, so every worker
accepts admin connections) and, with `--workers N`, the `Peers` link to the other workers.
Whichever worker takes an admin request answers for the whole gateway:

- reading (`reports`): its own `process_report` plus every other worker's, merged by
  `admin/report.py`;
- drain/enable: recorded in the shared `drained.json` first (for workers that start later),
  then applied here and sent to every other worker;
- reload: every worker reloads at once and says how it went.

Without workers it is the same code with no peers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from bastion.admin.api import AdminAPI, TargetNotFound
from bastion.admin.http import AdminServer
from bastion.admin.peers import Peers, load_drained, save_drained
from bastion.admin.report import merge_reports, process_report
from bastion.config.schema import Admin

if TYPE_CHECKING:
    from bastion.app import Gateway
    from bastion.upstream.targets import TargetState

log = logging.getLogger("bastion.admin")

ASK_TIMEOUT = 3.0  # a worker that takes longer to report counts as not answering
RELOAD_TIMEOUT = 60.0  # a reload may fetch JWKS, connect to Redis, ...


class AdminNode:
    def __init__(self, gateway: Gateway, peers_dir: str | None = None) -> None:
        self.gateway = gateway
        self.peers_dir = peers_dir if gateway.workers > 1 else None
        self.peers = (
            Peers(peers_dir, gateway.worker, gateway.workers, self.answer)
            if peers_dir is not None and gateway.workers > 1
            else None
        )
        self.settings: Admin | None = None
        self.api = AdminAPI(self)
        self.server = AdminServer(self.api.handle)

    # --- lifecycle -------------------------------------------------------------------------

    async def start_peers(self) -> None:
        """Listen for the other workers' questions, and take over the drains already made."""
        if self.peers is None or self.peers_dir is None:
            return
        await self.peers.start()
        for key in load_drained(self.peers_dir):
            state = self.gateway.registry.targets.get(key)
            if state is not None:
                state.admin_drained = True

    async def sync(self, settings: Admin | None, reuse_port: bool) -> None:
        """Open, move or close the admin listener to match the config. Raises OSError."""
        old = self.settings
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
        self.settings = settings

    async def close(self) -> None:
        self.server.close()
        if self.peers is not None:
            await self.peers.close()

    # --- questions from other workers ------------------------------------------------------

    async def answer(self, question: dict[str, Any]) -> dict[str, Any]:
        op = question.get("op")
        if op == "report":
            return process_report(self.gateway)
        if op == "drain":
            return {"applied": self._apply_drain(str(question["key"]), bool(question["drained"]))}
        if op == "reload":
            return await self._reload_here()
        return {"error": f"unknown question {op!r}"}

    # --- the whole gateway -----------------------------------------------------------------

    @property
    def expected(self) -> int:
        return self.gateway.workers

    async def reports(self) -> list[dict[str, Any]]:
        """Every answering worker's report, this one's first."""
        reports = [process_report(self.gateway)]
        if self.peers is not None:
            others = await self.peers.ask_others({"op": "report"}, ASK_TIMEOUT)
            reports += [r for r in others if r is not None and "worker" in r]
        return reports

    async def merged(self) -> dict[str, Any]:
        return merge_reports(await self.reports(), self.expected)

    def find_target(self, upstream: str, address: str) -> TargetState:
        snapshot = self.gateway.snapshot
        runtime = snapshot.upstreams.get(upstream)
        if runtime is None:
            known = ", ".join(sorted(snapshot.upstreams)) or "none"
            raise TargetNotFound(f"There is no upstream named {upstream!r} (upstreams: {known}).")
        for target in runtime.targets:
            if target.name == address:
                return target
        known = ", ".join(t.name for t in runtime.targets)
        raise TargetNotFound(f"Upstream {upstream!r} has no target {address!r} (targets: {known}).")

    async def set_drained(self, upstream: str, address: str, drained: bool) -> dict[str, Any]:
        """Drain (or enable) a target in every worker. Raises TargetNotFound."""
        target = self.find_target(upstream, address)
        if self.peers_dir is not None:
            await asyncio.to_thread(save_drained, self.peers_dir, target.key, drained)
        applied = 1 if self._apply_drain(target.key, drained) else 0
        if self.peers is not None:
            answers = await self.peers.ask_others({"op": "drain", "key": target.key, "drained": drained}, ASK_TIMEOUT)
            applied += sum(1 for a in answers if a is not None and a.get("applied"))
        return {
            "upstream": upstream,
            "target": address,
            "drained": drained,
            "workers": self.expected,
            "workers_applied": applied,
        }

    def _apply_drain(self, key: str, drained: bool) -> bool:
        state = self.gateway.registry.targets.get(key)
        if state is None:
            return False
        if state.admin_drained != drained:
            state.admin_drained = drained
            if not drained:
                state.start_ramp(time.monotonic())  # back in rotation: slow start, as after a recovery
            what = "DRAINED (no new requests)" if drained else "ENABLED again"
            log.warning("upstream %s target %s is %s through the admin API", state.upstream, state.name, what)
        return True

    async def reload(self) -> list[dict[str, Any] | None]:
        """Reload in every worker; each answer says applied or not, and why (None: no answer)."""
        local = asyncio.ensure_future(self._reload_here())
        others: list[dict[str, Any] | None] = []
        if self.peers is not None:
            others = await self.peers.ask_others({"op": "reload"}, RELOAD_TIMEOUT)
        return [await local, *others]

    async def _reload_here(self) -> dict[str, Any]:
        gateway = self.gateway
        applied = await gateway.reload()
        last = gateway.last_reload or {}
        problems = [] if applied else list(last.get("problems") or ["The gateway is shutting down."])
        return {
            "applied": applied,
            "problems": problems,
            "config": dict(gateway.config_info),
            "at": time.time(),
        }
