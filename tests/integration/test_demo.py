"""`bastion demo` as a user runs it: every example request it prints works as its comment says,
and the README's quick start shows requests the demo really prints."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from bastion.demo import runner
from docs_support import ROOT, blocks
from support import free_port, wait_listening

DEMO_YAML = ROOT / "src" / "bastion" / "demo" / "demo.yaml"
README_PORT = "127.0.0.1:8080"


def _command(line: str) -> str:
    """A shell line without its trailing comment (two or more spaces, then #)."""
    return re.split(r"\s{2,}#", line.strip())[0]


@dataclass
class Demo:
    out: str
    gateway: str  # 127.0.0.1:PORT
    admin_port: int

    def examples(self) -> list[str]:
        """The commands of the banner (indented lines), without their comments."""
        return [_command(line) for line in self.out.splitlines() if line.startswith("  ")]

    def token(self) -> str:
        match = re.search(r"Bearer (ey[\w-]+\.[\w-]+\.[\w-]+)", self.out)
        assert match, self.out
        return match.group(1)


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    ports = {env: str(free_port()) for env in ("BASTION_DEMO_PORT", "BASTION_DEMO_ADMIN_PORT")}
    ports.update({origin.env: str(free_port()) for origin in runner.ORIGINS})
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "bastion", "demo"], stdout=out, stderr=err, env={**os.environ, **ports}
        )
        try:
            wait_listening(int(ports["BASTION_DEMO_PORT"]), timeout=30, proc=process, errors=err)
            deadline = time.monotonic() + 10
            text = ""
            while "Ctrl-C stops everything." not in text and time.monotonic() < deadline:
                time.sleep(0.05)
                out.seek(0)
                text = out.read().decode()
            yield Demo(
                text.split("Ctrl-C stops everything.")[0],
                f"127.0.0.1:{ports['BASTION_DEMO_PORT']}",
                int(ports["BASTION_DEMO_ADMIN_PORT"]),
            )
        finally:
            process.send_signal(signal.SIGINT)  # Ctrl-C
            code = process.wait(timeout=30)
    assert code == 0
    for port in (int(p) for env, p in ports.items() if env != "BASTION_DEMO_ADMIN_PORT"):
        with pytest.raises(OSError):
            wait_listening(port, timeout=0.2)  # origins and gateway are gone


def run(command: str) -> str:
    """Run a printed example in bash, as a user pastes it (the examples are curl commands:
    .ci/run installs curl)."""
    assert shutil.which("curl"), "curl is not installed: the demo's examples are curl commands"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def echoed(output: str) -> dict[str, object]:
    body: dict[str, object] = json.loads(output)
    return body


def status_and_body(output: str) -> tuple[int, str]:
    head, _, body = output.partition("\n\n")  # text mode: CRLF read as LF
    return int(head.split()[1]), body


def test_every_printed_example_works_as_its_comment_says(demo: Demo) -> None:
    gw = f"http://{demo.gateway}"
    token = demo.token()
    expected = {
        f"curl -s {gw}/users/42",
        f"curl -s {gw}/v1/users/42",
        f"curl -s {gw}/orders/7",
        f"curl -si {gw}/nope",
        f"curl -si -X DELETE {gw}/orders/7",
        f"curl -si {gw}/account",
        f"curl -s -H 'X-Api-Key: demo-key' {gw}/account",
        f"for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' {gw}/limited; done; echo",
        f"curl -s -H 'Authorization: Bearer {token}' {gw}/me",
        f"curl -si -H 'Authorization: Bearer not.a.token' {gw}/me",
    }
    assert set(demo.examples()) == expected  # a new example needs its check below

    # Balancing: weights 2:1 over users-a and users-b.
    seen = collections.Counter(str(echoed(run(f"curl -s {gw}/users/42"))["origin"]) for _ in range(3))
    assert seen == {"users-a": 2, "users-b": 1}
    stripped = echoed(run(f"curl -s {gw}/v1/users/42"))
    assert stripped["path"] == "/users/42"
    assert echoed(run(f"curl -s {gw}/orders/7"))["origin"] == "orders"
    status, body = status_and_body(run(f"curl -si {gw}/nope"))
    assert (status, json.loads(body)["error"]) == (404, "no_route")
    out = run(f"curl -si -X DELETE {gw}/orders/7")
    assert status_and_body(out)[0] == 405
    assert re.search(r"^allow: GET, HEAD$", out, flags=re.MULTILINE | re.IGNORECASE)

    # An API key.
    out = run(f"curl -si {gw}/account")
    assert status_and_body(out)[0] == 401
    assert re.search(r"^www-authenticate: Key realm=", out, flags=re.MULTILINE | re.IGNORECASE)
    headers = echoed(run(f"curl -s -H 'X-Api-Key: demo-key' {gw}/account"))["headers"]
    assert isinstance(headers, dict) and headers["x-consumer"] == "demo-app"

    # The rate limit: five pass, the sixth is refused.
    limited = f"for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' {gw}/limited; done; echo"
    assert run(limited) == "200 200 200 200 200 429 \n"

    # The printed JWT names the demo consumer; a bad one is refused.
    headers = echoed(run(f"curl -s -H 'Authorization: Bearer {token}' {gw}/me"))["headers"]
    assert isinstance(headers, dict) and headers["x-consumer"] == "demo-app"
    status, body = status_and_body(run(f"curl -si -H 'Authorization: Bearer not.a.token' {gw}/me"))
    assert (status, json.loads(body)["error"]) == (401, "invalid_token")


def test_the_token_is_valid_for_a_day(demo: Demo) -> None:
    import jwt

    claims = jwt.decode(demo.token(), options={"verify_signature": False})
    assert claims["sub"] == "demo-app"
    assert claims["exp"] - claims["iat"] == runner.TOKEN_LIFETIME == 86400


def test_the_dashboard_url_is_the_admin_listener(demo: Demo) -> None:
    assert f"Dashboard: http://127.0.0.1:{demo.admin_port}/" in demo.out
    admin = yaml.safe_load(DEMO_YAML.read_text())["admin"]["bind"]
    assert admin == "127.0.0.1:${BASTION_DEMO_ADMIN_PORT:-9901}"


def test_the_readme_shows_what_the_demo_prints(demo: Demo) -> None:
    (quick,) = [b for b in blocks("sh") if b.path.name == "README.md" and "curl" in b.text]
    shown = [_command(line) for line in quick.text.splitlines() if line.strip()]
    printed = {example.replace(demo.token(), "TOKEN") for example in demo.examples()}
    assert len(shown) >= 7
    for command in shown:
        assert command.replace(README_PORT, demo.gateway) in printed, command


def test_the_demo_config_checks() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bastion", "check", str(DEMO_YAML)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "routes: 6" in result.stdout
