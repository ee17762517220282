"""`bastion demo`: three origins as subprocesses, the gateway in the foreground.

The origins run as `python -m bastion.demo.origin` in their own process group, so a Ctrl-C
in the terminal reaches only the gateway; when the gateway returns we stop the origins
ourselves. The gateway gets the main thread (and its signal handlers) via `run_gateway`.

The banner's example requests are built from demo.yaml as loaded (ports, the API key, the
JWT secret), so they work whatever the environment changed; the JWT is minted here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from bastion.errors import ConfigError

_START_TIMEOUT = 10.0


class _DemoError(Exception):
    """A demo origin could not start; the message says which."""


@dataclass(frozen=True)
class _DemoOrigin:
    name: str
    env: str
    default_port: int

    @property
    def port(self) -> int:
        return int(os.environ[self.env])


ORIGINS = (
    _DemoOrigin("users-a", "BASTION_DEMO_USERS_A_PORT", 9101),
    _DemoOrigin("users-b", "BASTION_DEMO_USERS_B_PORT", 9102),
    _DemoOrigin("orders", "BASTION_DEMO_ORDERS_PORT", 9103),
)
GATEWAY_ENV, GATEWAY_DEFAULT = "BASTION_DEMO_PORT", 8080
ADMIN_ENV, ADMIN_DEFAULT = "BASTION_DEMO_ADMIN_PORT", 9901


def _pin_ports() -> None:
    """Fix every demo port in the environment, so demo.yaml and the origins agree."""
    pinned = [(o.env, o.default_port) for o in ORIGINS] + [(GATEWAY_ENV, GATEWAY_DEFAULT), (ADMIN_ENV, ADMIN_DEFAULT)]
    for env, default in pinned:
        value = os.environ.setdefault(env, str(default))
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise ValueError(f"{env}={value!r} is not a port number")


def port_free(port: int) -> bool:
    """Whether a demo can bind 127.0.0.1:PORT now (checked before starting anything)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_listening(port: int, process: subprocess.Popen[bytes], deadline: float) -> bool:
    """Whether `process` listens on 127.0.0.1:PORT before `deadline` (False: it exited or did not)."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def _start_origins() -> list[subprocess.Popen[bytes]]:
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for origin in ORIGINS:
            command = [sys.executable, "-m", "bastion.demo.origin", "--port", str(origin.port), "--name", origin.name]
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, process_group=0))
        deadline = time.monotonic() + _START_TIMEOUT
        for origin, process in zip(ORIGINS, processes, strict=True):
            if not wait_listening(origin.port, process, deadline):
                raise _DemoError(f"demo origin {origin.name} did not start on 127.0.0.1:{origin.port}")
    except BaseException:
        _stop(processes)
        raise
    return processes


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


TOKEN_LIFETIME = 86400  # the printed JWT stays valid for a day of trying things out


@dataclass(frozen=True)
class Credentials:
    """What the demo's examples authenticate with, read from the loaded demo.yaml."""

    api_key: str
    jwt_secret: str
    subject: str


def _plugin(config: Any, route: str, name: str) -> dict[str, Any]:
    for entry in next(r for r in config.routes if r.name == route).plugins:
        if name in entry:
            return dict(entry[name] or {})
    raise LookupError(f"demo.yaml: route {route} has no {name} plugin")


def demo_credentials(config_path: str) -> Credentials:
    """The consumer's API key and JWT subject, and the JWT route's secret, from demo.yaml."""
    from bastion.config.loader import load_config

    config = load_config(config_path).config
    consumer = config.consumers[0]
    key = consumer.credentials.key_auth[0].key
    assert key is not None, "demo.yaml: the demo consumer's key is given in clear"
    return Credentials(key, str(_plugin(config, "me", "jwt")["secret"]), consumer.credentials.jwt[0].subject)


def demo_token(credentials: Credentials, now: float | None = None) -> str:
    """A ready HS256 token for the demo consumer, valid for TOKEN_LIFETIME seconds."""
    import jwt

    issued = int(time.time() if now is None else now)
    claims = {"sub": credentials.subject, "iat": issued, "exp": issued + TOKEN_LIFETIME}
    return jwt.encode(claims, credentials.jwt_secret, algorithm="HS256")


def _banner(config: str) -> str:
    gw = f"http://127.0.0.1:{os.environ[GATEWAY_ENV]}"
    admin = f"http://127.0.0.1:{os.environ[ADMIN_ENV]}"
    origins = ", ".join(f"{o.name} :{o.port}" for o in ORIGINS)
    creds = demo_credentials(config)
    token = demo_token(creds)
    limited = f"for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' {gw}/limited; done; echo"
    lines = [
        f"Bastion demo: gateway on {gw}, origins {origins}",
        f"config: {config}",
        "",
        "Load balancing and routing:",
        f"  curl -s {gw}/users/42                 # round robin, weights 2:1: users-a, users-b, users-a, ...",
        f"  curl -s {gw}/v1/users/42              # strip_prefix: the origin sees /users/42",
        f"  curl -s {gw}/orders/7                 # template route /orders/{{id}}",
        f"  curl -si {gw}/nope                    # 404: no route matches",
        f"  curl -si -X DELETE {gw}/orders/7      # 405: GET only (see the Allow header)",
        "",
        "An API key (key_auth):",
        f"  curl -si {gw}/account                 # 401: no key (see WWW-Authenticate)",
        f"  curl -s -H 'X-Api-Key: {creds.api_key}' {gw}/account   # 200: the origin sees X-Consumer: demo-app",
        "",
        "A rate limit of 5 requests per minute per client (rate_limit):",
        f"  {limited}   # 200 200 200 200 200 429",
        "",
        f"A JWT (HS256, the consumer from its sub claim; this token is valid for {TOKEN_LIFETIME // 3600} hours):",
        f"  curl -s -H 'Authorization: Bearer {token}' {gw}/me   # 200: X-Consumer: demo-app",
        f"  curl -si -H 'Authorization: Bearer not.a.token' {gw}/me   # 401 invalid_token",
        "",
        f"Dashboard: {admin}/  (admin API and Prometheus metrics on the same listener)",
        "",
        "The origins echo what reached them as JSON. Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def run_demo() -> int:
    """Run the demo until Ctrl-C; return the process exit code."""
    try:
        _pin_ports()
    except ValueError as exc:
        print(f"bastion demo: {exc}", file=sys.stderr)
        return 1
    ports = [int(os.environ[GATEWAY_ENV]), int(os.environ[ADMIN_ENV])] + [o.port for o in ORIGINS]
    busy = [p for p in ports if not port_free(p)]
    if busy:
        names = ", ".join(str(p) for p in busy)
        print(
            f"bastion demo: port {names} already in use on 127.0.0.1; "
            f"pick others with {GATEWAY_ENV}, {ADMIN_ENV}, {', '.join(o.env for o in ORIGINS)}",
            file=sys.stderr,
        )
        return 1

    from bastion.workers import run_gateway

    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes = _start_origins()
        with resources.as_file(resources.files("bastion.demo") / "demo.yaml") as config:
            print(_banner(str(config)), flush=True)
            return run_gateway(str(config))
    except KeyboardInterrupt:  # Ctrl-C before the gateway installed its own handlers
        return 0
    except _DemoError as exc:
        print(f"bastion demo: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # a BASTION_DEMO_* variable the config cannot take
        for problem in exc.problems:
            print(f"bastion demo: {problem}", file=sys.stderr)
        return 1
    finally:
        _stop(processes)
