"""The collector settings of a serving process (bastion/collector.py), checked in a child
process: frozen objects are never collected, so the test process itself stays untouched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import bastion.app
import bastion.observability.logs
import bastion.workers

PROBE = """
import gc
from bastion.collector import YOUNG_THRESHOLD, tune_collector
before = gc.get_freeze_count()
tune_collector()
print(gc.get_threshold()[0] == YOUNG_THRESHOLD, gc.get_freeze_count() > before)
"""


def test_tune_collector_freezes_the_startup_heap_and_spaces_young_collections() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["True", "True"]


def test_bastion_run_tunes_the_collector_before_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    config = tmp_path / "bastion.yaml"
    config.write_text(
        "version: 1\nlisteners:\n  - name: web\n    bind: 127.0.0.1:18999\n"
        "upstreams:\n  app:\n    targets:\n      - address: 127.0.0.1:9\n"
        "routes:\n  - name: all\n    upstream: app\n"
    )  # serve is replaced: nothing binds the port

    async def serve(*args: object, **kwargs: object) -> int:
        calls.append("serve")
        return 0

    monkeypatch.setattr(bastion.workers, "tune_collector", lambda: calls.append("tune"))
    monkeypatch.setattr(bastion.app, "serve", serve)
    monkeypatch.setattr(bastion.app, "raise_open_files_limit", lambda: None)
    monkeypatch.setattr(bastion.observability.logs, "setup_logging", lambda level: None)
    assert bastion.workers.run_gateway(str(config)) == 0
    assert calls == ["tune", "serve"]
