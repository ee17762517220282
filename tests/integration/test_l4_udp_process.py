"""udp listeners under `bastion run` as a real process: --workers N on SO_REUSEPORT, SIGHUP, SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path

from lb_support import wait_for

from support import GatewayProcess, free_port, request, write_config
from udp_support import DnsClient, DnsServer, tcp_and_udp_port


def config(port: int, admin: int, targets: list[str]) -> dict[str, object]:
    return {
        "version": 1,
        "listeners": [{"name": "dns", "bind": f"127.0.0.1:{port}", "protocol": "udp", "upstream": "dns"}],
        "upstreams": {"dns": {"targets": [{"address": t} for t in targets]}},
        "admin": {"bind": f"127.0.0.1:{admin}"},
        "log": {"access": False},
    }


def test_two_workers_share_the_udp_port_and_each_client_keeps_its_answers(tmp_path: Path) -> None:
    a, b = DnsServer("192.0.2.1"), DnsServer("192.0.2.2")
    port, admin = tcp_and_udp_port(), free_port()
    path = write_config(tmp_path / "gw.yaml", config(port, admin, [a.address, b.address]))
    proc = GatewayProcess(path, admin, "--workers", "2")  # waits on the admin port (TCP)
    clients = [DnsClient(port) for _ in range(8)]
    try:
        wait_for(lambda: request(admin, path="/readyz").status == 200, timeout=15)
        first = [client.resolve(attempts=3) for client in clients]
        assert set(first) <= {"192.0.2.1", "192.0.2.2"} and None not in first
        assert [client.resolve() for client in clients] == first  # each client stays on its worker's session
        proc.signal(signal.SIGHUP)
        assert [client.resolve(attempts=3) for client in clients] == first  # a reload keeps the sessions
    finally:
        for client in clients:
            client.close()
        code, _, err = proc.stop()
        a.stop()
        b.stop()
    assert code == 0, err
