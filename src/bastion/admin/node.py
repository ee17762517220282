"""The gateway side of the admin API: this process's answers, and the other workers'.

One `AdminNode` per gateway process (inside its `AdminListener`, listener.py). With
`--workers N` it holds the `Peers` link to the other workers, and whichever worker takes an
admin request answers for the whole gateway:

- reading (`reports`): its own `process_report` plus every other worker's, merged by
  `admin/report.py`;
- drain/enable: recorded in the shared `drained.json` first (for workers that start later),
  then applied here and sent to every other worker;
- reload: every worker reloads at once and says how it went.

It also runs the sampler of the recent-traffic window (`observability/window.py`) behind
`GET /stats`: one task that wakes every 10 s while an admin listener is configured.

Without workers it is the same code with no peers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from bastion.admin.peers import Peers, load_drained, save_drained
from bastion.admin.report import merge_reports, process_report
from bastion.observability import window as traffic
from bastion.observability.metrics import RECENT_ERRORS

if TYPE_CHECKING:
    from bastion.admin.view import GatewayView
    from bastion.upstream.targets import TargetState

log = logging.getLogger("bastion.admin")

ASK_TIMEOUT = 3.0  # a worker that takes longer to report counts as not answering
RELOAD_TIMEOUT = 60.0  # a reload may fetch JWKS, connect to Redis, ...


class TargetNotFound(Exception):
    """The request names an upstream or target the running config does not have."""


class AdminNode:
    def __init__(self, gateway: GatewayView, peers_dir: str | None = None) -> None:
        self.gateway = gateway
        self.peers_dir = peers_dir if gateway.workers > 1 else None
        self.peers = (
            Peers(peers_dir, gateway.worker, gateway.workers, self.answer)
            if peers_dir is not None and gateway.workers > 1
            else None
        )
        self.window = traffic.TrafficWindow(gateway.metrics, gateway.started_at, traffic.INTERVAL, traffic.KEEP)
        self._sampler: asyncio.Task[None] | None = None

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

    def start_sampler(self) -> None:
        """Sample the recent-traffic window every interval from now on (idempotent): called
        when the admin listener opens, so a gateway without one pays nothing."""
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    async def _sample_forever(self) -> None:
        window = self.window
        while True:
            at = window.next_sample_at(time.time())
            await asyncio.sleep(max(0.0, at - time.time()))
            window.sample(at)

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
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
        if op == "window":
            return self.window.report(time.time(), float(question["seconds"]))
        if op == "errors":
            return self._errors_here()
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

    async def _ask_all(self, question: dict[str, Any], here: dict[str, Any]) -> list[dict[str, Any]]:
        """This worker's answer (`here`) and every other worker's that came in time."""
        answers = [here]
        if self.peers is not None:
            others = await self.peers.ask_others(question, ASK_TIMEOUT)
            answers += [a for a in others if a is not None and "error" not in a]
        return answers

    async def traffic(self, seconds: float) -> dict[str, Any]:
        """`GET /stats`: the last `seconds` of traffic of the whole gateway."""
        here = self.window.report(time.time(), seconds)
        reports = await self._ask_all({"op": "window", "seconds": seconds}, here)
        return traffic.summarize(traffic.merge_reports(reports), self.window.interval)

    def _errors_here(self) -> dict[str, Any]:
        metrics = self.gateway.metrics
        return {"errors": list(metrics.recent_errors), "seen": metrics.errors_seen}

    async def recent_errors(self) -> dict[str, Any]:
        """`GET /errors`: the newest errors of every worker, newest first."""
        answers = await self._ask_all({"op": "errors"}, self._errors_here())
        errors = sorted((e for a in answers for e in a["errors"]), key=lambda e: e["at"], reverse=True)
        return {
            "errors": errors[:RECENT_ERRORS],
            "kept": RECENT_ERRORS,
            "seen": sum(a["seen"] for a in answers),
        }

    def find_target(self, upstream: str, address: str) -> TargetState:
        snapshot = self.gateway.running_snapshot
        runtime = snapshot.upstreams.get(upstream) if snapshot is not None else None
        if runtime is None:
            known = ", ".join(sorted(snapshot.upstreams)) if snapshot is not None else "none"
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
