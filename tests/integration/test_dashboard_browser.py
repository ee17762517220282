"""The dashboard in a real browser: Debian's Chromium, driven by Playwright.

Each test opens the page on a gateway's admin listener and does what an operator would (sends
traffic, stops an origin, types the admin token), then reads what the page shows. Every wait
is bounded (Playwright's `expect` polls up to its timeout); the page refreshes every 0.25 s.

Chromium is required, not optional: without it these tests fail and say how to install it
(`.ci/run` does: `apt-get install -y chromium`). Playwright's own browser downloads are never
used (`playwright install` cannot work on these machines): the system Chromium is launched by
path, `BASTION_CHROMIUM` overrides it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect, sync_playwright

from bastion.demo.origin import OriginHandle
from support import GatewayThread, free_port, request, write_config

CHROMIUM = os.environ.get("BASTION_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP evil.test 127.0.0.1",  # a name an attacker pointed at this machine
]
TOKEN = "dashboard-token-for-tests-42"
WAIT_MS = 10_000  # the longest any expectation waits


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: the dashboard's browser tests need Debian's chromium "
            "(apt-get install -y chromium; .ci/run installs it), or BASTION_CHROMIUM=/path/to/chromium.",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        yield launched
        launched.close()


@dataclass
class Dashboard:
    """A gateway with an admin listener, its origins, and a browser page watching the page."""

    gw: GatewayThread
    admin_port: int
    origins: list[OriginHandle]
    config_path: Path
    browser: Browser
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    pages: list[Page] = field(default_factory=list)
    gateway_gone: bool = False  # set when the test stops the gateway: failed loads are expected

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}/"

    def open(self, suffix: str = "") -> Page:
        """A new tab (its own sessionStorage) on the dashboard, refreshing every 0.25 s."""
        page = self.browser.new_context().new_page()
        self.pages.append(page)
        page.on("request", self._saw_request)
        page.on("console", self._saw_console)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.goto(self.base + "?refresh=0.25" + suffix)
        return page

    def _saw_request(self, sent: Request) -> None:
        self.requests.append(sent.url)

    def _saw_console(self, message: ConsoleMessage) -> None:
        # A CSP violation or a script error shows up here. A 401 the page expects (it then asks
        # for the token) is logged by Chromium as a failed resource load: not a problem.
        if message.type != "error" or "401" in message.text:
            return
        if not (self.gateway_gone and "ERR_CONNECTION_REFUSED" in message.text):
            self.problems.append(f"console: {message.text}")

    def target_row(self, page: Page, origin: OriginHandle) -> Any:
        return page.locator(f'tr[data-target="{origin.address}"]')


@pytest.fixture
def dashboard(
    browser: Browser, origins: Callable[..., OriginHandle], tmp_path: Path
) -> Iterator[Callable[..., Dashboard]]:
    started: list[Dashboard] = []

    def start(token: str | None = None) -> Dashboard:
        a, b = origins("a"), origins("b")
        port, admin_port, closed = free_port(), free_port(), free_port()
        check = {"path": "/healthz", "interval": "250ms", "timeout": "200ms", "healthy": 1, "unhealthy": 1}
        config: dict[str, Any] = {
            "version": 1,
            "listeners": [{"name": "web", "bind": f"127.0.0.1:{port}"}],
            "upstreams": {
                "app": {"targets": [{"address": a.address}, {"address": b.address}], "health_check": {"active": check}},
                "nowhere": {"targets": [{"address": f"127.0.0.1:{closed}"}]},
            },
            "routes": [
                {"name": "api", "match": {"path": "/api"}, "upstream": "app", "strip_prefix": "/api"},
                {"name": "broken", "match": {"path": "/broken"}, "upstream": "nowhere"},
            ],
            "admin": {"bind": f"127.0.0.1:{admin_port}", **({"token": token} if token else {})},
            "log": {"access": False},
        }
        path = write_config(tmp_path / f"gw{len(started)}.yaml", config)
        board = Dashboard(GatewayThread(path, port), admin_port, [a, b], path, browser)
        started.append(board)
        return board

    yield start
    for board in started:
        for page in board.pages:
            page.context.close()
        board.gw.stop()
    for board in started:  # after teardown, so a failed test still stops its gateway
        assert not board.problems, board.problems
        strangers = [url for url in board.requests if not url.startswith(board.base)]
        assert not strangers, f"the page asked another host: {strangers}"


def test_the_dashboard_shows_health_traffic_errors_and_a_target_going_down(
    dashboard: Callable[..., Dashboard],
) -> None:
    board = dashboard()
    a, b = board.origins
    page = board.open()

    for origin in (a, b):
        expect(board.target_row(page, origin)).to_have_attribute("data-state", "up", timeout=WAIT_MS)
    expect(page.locator('dd[data-field="config"]')).to_have_text(f"file {board.config_path}", timeout=WAIT_MS)
    api = page.locator('tr[data-route="api"]')
    expect(api.locator(".requests")).to_have_text("0", timeout=WAIT_MS)
    expect(api.locator(".rps")).to_have_text("0")

    for _ in range(30):
        assert request(board.gw.port, "GET", "/api/ok").status == 200
    expect(api.locator(".requests")).to_have_text("30", timeout=WAIT_MS)
    assert float(api.locator(".rps").inner_text()) > 0  # requests/s moved
    assert float(api.locator(".p50").inner_text()) > 0
    expect(page.locator('tr[data-route=""] .requests')).to_have_text("30")  # the total row

    refused = request(board.gw.port, "GET", "/broken/x")
    assert refused.status == 502
    error_row = page.locator(f'tr[data-request-id="{refused.header("x-request-id")}"]')
    expect(error_row).to_contain_text("502", timeout=WAIT_MS)
    expect(error_row).to_contain_text(refused.json()["error"])
    expect(page.locator('tr[data-route="broken"] .e5xx')).to_have_text("1", timeout=WAIT_MS)

    b.stop()  # the active check (every 250 ms, one failure is enough) takes it out
    expect(board.target_row(page, b)).to_have_attribute("data-state", "down", timeout=WAIT_MS)
    expect(board.target_row(page, b).locator(".state")).to_have_text("down")
    expect(board.target_row(page, a)).to_have_attribute("data-state", "up")

    assert request(board.admin_port, "POST", f"/upstreams/app/targets/{a.address}/drain").status == 200
    expect(board.target_row(page, a)).to_have_attribute("data-state", "draining", timeout=WAIT_MS)
    assert request(board.admin_port, "POST", "/reload").status == 200
    expect(page.locator('dd[data-field="reloads"]')).to_have_text("1 applied, 0 rejected", timeout=WAIT_MS)

    page.get_by_role("button", name="5 min").click()
    expect(page.locator("#window-label")).to_contain_text("last 5m", timeout=WAIT_MS)
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    board.gateway_gone = True
    board.gw.stop()  # the admin API goes away: the page says so and keeps trying
    expect(page.locator("#connection")).to_have_attribute("data-state", "down", timeout=WAIT_MS)


def test_with_a_token_the_dashboard_asks_for_it_and_keeps_it_for_the_tab(
    dashboard: Callable[..., Dashboard],
) -> None:
    board = dashboard(token=TOKEN)
    a, _ = board.origins
    page = board.open()
    expect(page.locator("#token-form")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#token-problem")).to_have_text("This gateway's admin API needs a token.")
    expect(page.locator("#panels")).to_be_hidden()

    page.fill("#token-input", "not-the-token-not-the-token")
    page.get_by_role("button", name="Connect").click()
    expect(page.locator("#token-problem")).to_have_text("The gateway refused this token.", timeout=WAIT_MS)
    expect(page.locator("#token-form")).to_be_visible()

    page.fill("#token-input", TOKEN)
    page.get_by_role("button", name="Connect").click()
    expect(board.target_row(page, a)).to_have_attribute("data-state", "up", timeout=WAIT_MS)
    expect(page.locator("#token-form")).to_be_hidden()

    page.reload()  # kept in sessionStorage: the tab does not ask again
    expect(board.target_row(page, a)).to_have_attribute("data-state", "up", timeout=WAIT_MS)
    expect(page.locator("#token-form")).to_be_hidden()

    page.get_by_role("button", name="Forget token").click()
    expect(page.locator("#token-form")).to_be_visible(timeout=WAIT_MS)

    linked = board.open(f"#token={TOKEN}")  # a link with the token in the fragment
    expect(board.target_row(linked, a)).to_have_attribute("data-state", "up", timeout=WAIT_MS)
    assert "token" not in linked.url and TOKEN not in linked.url  # taken out of the address bar
    assert linked.evaluate("sessionStorage.getItem('bastion.admin.token')") == TOKEN


def test_pages_of_other_sites_can_neither_read_nor_steer_the_admin_api(
    dashboard: Callable[..., Dashboard],
) -> None:
    """DNS rebinding (evil.test resolves to 127.0.0.1, so its page is same-origin with the
    admin port in the browser's eyes) and cross-site POSTs (a script or a form on another
    site's page) get 403, and nothing changes in the gateway."""
    board = dashboard()
    a, _ = board.origins
    context = board.browser.new_context()
    evil = context.new_page()
    board.pages.append(evil)  # closed at teardown; its requests are meant to go elsewhere

    rebound = evil.goto(f"http://evil.test:{board.admin_port}/")
    assert rebound is not None and rebound.status == 403
    assert evil.evaluate("fetch('/config').then(r => r.status)") == 403  # its script cannot read it either

    evil.goto(f"http://evil.test:{a.port}/")  # any page of another site (here an origin's)
    admin = f"http://127.0.0.1:{board.admin_port}"
    drain = f"{admin}/upstreams/app/targets/{a.address}/drain"
    for url in (f"{admin}/reload", drain):  # fire and forget: the page cannot read the answer
        sent = evil.evaluate(
            "url => fetch(url, {method: 'POST', mode: 'no-cors'}).then(() => 'sent', e => String(e))", url
        )
        assert sent == "sent"
    with evil.expect_navigation() as submitted:  # a plain form, no script needed
        evil.evaluate(
            """url => { const form = document.createElement('form');
                        form.method = 'POST'; form.action = url;
                        document.body.append(form); form.submit(); }""",
            drain,
        )
    assert submitted.value is not None and submitted.value.status == 403
    assert "origin_forbidden" in evil.content()

    status = request(board.admin_port, "GET", "/status").json()
    assert status["reloads"] == {"applied": 0, "rejected": 0}
    targets = request(board.admin_port, "GET", "/upstreams").json()["upstreams"][0]["targets"]
    assert [t["drained"] for t in targets] == [False, False]
