"""udp listeners over real sockets: DNS queries resolved through the gateway, sessions per
client address, balancing and affinity, idle expiry, the session limit, dead targets, reloads,
PROXY v2 on datagrams."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lb_support import wait_for

from bastion.demo.origin import start_origin_thread
from bastion.l4.udp import UdpListener
from support import GatewayThread, free_port, request, write_config
from udp_support import DnsClient, DnsServer, tcp_and_udp_port

Start = Callable[..., GatewayThread]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def udp_config(port: int, targets: list[str], udp: dict[str, Any] | None = None, **upstream: Any) -> dict[str, Any]:
    listener: dict[str, Any] = {"name": "dns", "bind": f"127.0.0.1:{port}", "protocol": "udp", "upstream": "dns"}
    if udp is not None:
        listener["udp"] = udp
    return {
        "version": 1,
        "listeners": [listener],
        "upstreams": {"dns": {"targets": [{"address": t} for t in targets], **upstream}},
        "log": {"access": False},
    }


@pytest.fixture
def servers() -> Iterator[Callable[..., DnsServer]]:
    started: list[DnsServer] = []

    def start(answer: str, **options: Any) -> DnsServer:
        server = DnsServer(answer, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def clients() -> Iterator[Callable[[int], DnsClient]]:
    made: list[DnsClient] = []

    def make(port: int) -> DnsClient:
        client = DnsClient(port)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    started: list[GatewayThread] = []

    def run(config: dict[str, Any]) -> GatewayThread:
        port = int(config["listeners"][0]["bind"].rpartition(":")[2])
        handle = _UdpGateway(write_config(tmp_path / f"gw{len(started)}.yaml", config), port)
        started.append(handle)
        return handle

    yield run
    for handle in started:
        handle.stop()


class _UdpGateway(GatewayThread):
    """GatewayThread waits for nothing on UDP: the listener is bound once start() returns."""

    def udp(self) -> UdpListener:
        return self.gateway.udp[f"127.0.0.1:{self.port}"]


def test_a_dns_query_resolves_through_the_listener(start: Start, servers: Any, clients: Any) -> None:
    server = servers("192.0.2.1")
    gw = start(udp_config(free_udp_port(), [server.address]))
    client = clients(gw.port)
    # The client's socket is connected to the listener: an answer from any other address
    # would never reach it, so this also shows replies leave from the listener's address.
    assert client.resolve() == "192.0.2.1"
    assert client.resolve("other.example.test.") == "192.0.2.1"
    stats = gw.udp().stats
    assert stats.datagrams == [2, 2]
    assert stats.sessions == 1 and stats.sessions_active == 1
    assert len(set(server.sources)) == 1  # one session: one socket toward the target


def test_clients_are_balanced_and_each_keeps_its_target(start: Start, servers: Any, clients: Any) -> None:
    a, b = servers("192.0.2.1"), servers("192.0.2.2")
    gw = start(udp_config(free_udp_port(), [a.address, b.address]))
    first, second = clients(gw.port), clients(gw.port)
    answers = [first.resolve(), second.resolve()]
    assert sorted(answers) == ["192.0.2.1", "192.0.2.2"]  # round robin over two sessions
    for _ in range(3):
        assert [first.resolve(), second.resolve()] == answers  # affinity per client address
    assert gw.udp().stats.sessions == 2


def test_consistent_hash_on_ip_keeps_a_host_on_one_target(start: Start, servers: Any, clients: Any) -> None:
    a, b = servers("192.0.2.1"), servers("192.0.2.2")
    gw = start(udp_config(free_udp_port(), [a.address, b.address], balance="consistent_hash"))
    answers = {clients(gw.port).resolve() for _ in range(4)}  # four source ports, one host
    assert len(answers) == 1


def test_an_idle_session_expires_and_the_next_datagram_picks_again(start: Start, servers: Any, clients: Any) -> None:
    a, b = servers("192.0.2.1"), servers("192.0.2.2")
    gw = start(udp_config(free_udp_port(), [a.address, b.address], udp={"session_idle": "200ms"}))
    client = clients(gw.port)
    first = client.resolve()
    wait_for(lambda: gw.udp().stats.sessions_active == 0)
    second = client.resolve()
    assert {first, second} == {"192.0.2.1", "192.0.2.2"}  # a new session: round robin moved on
    assert gw.udp().stats.sessions == 2


def test_at_the_session_limit_the_least_recent_client_is_evicted(start: Start, servers: Any, clients: Any) -> None:
    server = servers("192.0.2.1")
    gw = start(udp_config(free_udp_port(), [server.address], udp={"max_sessions": 2}))
    first, second, third = clients(gw.port), clients(gw.port), clients(gw.port)
    assert first.resolve() and second.resolve()
    assert first.resolve()  # first is now the most recent: second is the least recent
    assert third.resolve() == "192.0.2.1"  # a new client is never refused
    udp = gw.udp()
    assert udp.stats.evicted == 1 and udp.stats.sessions_active == 2
    assert set(udp.sessions) == {first.address, third.address}


def test_a_dead_target_moves_its_sessions_to_a_live_one(start: Start, servers: Any, clients: Any) -> None:
    live = servers("192.0.2.1")
    dead = f"127.0.0.1:{free_udp_port()}"  # nothing listens: ICMP port unreachable
    gw = start(udp_config(free_udp_port(), [dead, live.address]))
    for _ in range(4):
        client = clients(gw.port)
        client.sock.settimeout(0.5)
        assert client.resolve(attempts=4) == "192.0.2.1"
    dead_target = gw.gateway.registry.targets[f"dns/{dead}"]
    assert dead_target.failures >= 1
    assert all(session.target.name == live.address for session in gw.udp().sessions.values())


def test_datagrams_over_max_datagram_are_dropped(start: Start, servers: Any, clients: Any) -> None:
    server = servers("192.0.2.1")
    gw = start(udp_config(free_udp_port(), [server.address], udp={"max_datagram": "512"}))
    client = clients(gw.port)
    client.sock.send(b"x" * 513)
    assert client.resolve() == "192.0.2.1"
    assert gw.udp().stats.dropped == {"too_big": 1}
    assert server.queries == 1 and len(server.sources) == 1


def test_a_reload_keeps_the_session_on_its_target(start: Start, servers: Any, clients: Any) -> None:
    a, b = servers("192.0.2.1"), servers("192.0.2.2")
    config = udp_config(free_udp_port(), [a.address])
    gw = start(config)
    client = clients(gw.port)
    assert client.resolve() == "192.0.2.1"
    config["upstreams"]["dns"]["targets"] = [{"address": b.address}, {"address": a.address}]
    config["listeners"][0]["udp"] = {"session_idle": "10s"}
    write_config(gw.config_path, config)
    assert gw.reload()
    for _ in range(3):
        assert client.resolve() == "192.0.2.1"
    assert gw.udp().stats.sessions == 1
    assert gw.udp().idle == 10.0


def test_a_reload_that_removes_the_target_moves_the_session(start: Start, servers: Any, clients: Any) -> None:
    a, b = servers("192.0.2.1"), servers("192.0.2.2")
    config = udp_config(free_udp_port(), [a.address])
    gw = start(config)
    client = clients(gw.port)
    assert client.resolve() == "192.0.2.1"
    config["upstreams"]["dns"]["targets"] = [{"address": b.address}]
    write_config(gw.config_path, config)
    assert gw.reload()
    wait_for(lambda: all(s.target.name == b.address for s in gw.udp().sessions.values()))
    assert client.resolve() == "192.0.2.2"
    assert gw.udp().stats.sessions == 1  # the same session, on its new target


def test_active_http_checks_take_a_target_out(start: Start, servers: Any, clients: Any) -> None:
    """UDP services are checked over HTTP on the same host:port (TCP), e.g. a DNS server's
    sidecar; a target marked down loses its sessions to the others."""
    a, b = servers("192.0.2.1", port=tcp_and_udp_port()), servers("192.0.2.2", port=tcp_and_udp_port())
    health_a = start_origin_thread("a", port=a.port)
    health_b = start_origin_thread("b", port=b.port)
    try:
        check = {"active": {"type": "http", "path": "/healthz", "interval": "100ms", "healthy": 1, "unhealthy": 1}}
        gw = start(udp_config(free_udp_port(), [a.address, b.address], health_check=check))
        client = clients(gw.port)
        first = client.resolve()
        down = health_a if first == "192.0.2.1" else health_b
        down.origin.healthy = False
        wait_for(lambda: client.resolve() != first, timeout=10)
    finally:
        health_a.stop()
        health_b.stop()


def test_send_proxy_protocol_v2_prefixes_each_datagram(start: Start, servers: Any, clients: Any) -> None:
    server = servers("192.0.2.1", proxy_v2=True)
    gw = start(udp_config(free_udp_port(), [server.address], send_proxy_protocol="v2"))
    client = clients(gw.port)
    assert client.resolve() == "192.0.2.1"
    assert client.resolve() == "192.0.2.1"
    assert len(server.headers) == 2
    for header in server.headers:
        assert header.source == (client.address[0], client.address[1])
        assert header.destination == ("127.0.0.1", gw.port)
        assert header.transport == "dgram"


def test_no_available_target_drops_and_counts(start: Start, clients: Any) -> None:
    config = udp_config(free_udp_port(), ["127.0.0.1:9"])
    config["upstreams"]["dns"]["targets"][0]["weight"] = 0
    gw = start(config)
    client = clients(gw.port)
    client.sock.settimeout(0.2)
    assert client.resolve() is None
    wait_for(lambda: gw.udp().stats.dropped.get("no_target") == 1)
    assert gw.udp().stats.sessions == 0


def test_metrics_are_exposed(start: Start, servers: Any, clients: Any) -> None:
    server = servers("192.0.2.1")
    cfg = udp_config(free_udp_port(), [server.address])
    admin = free_port()
    cfg["admin"] = {"bind": f"127.0.0.1:{admin}"}
    gw = start(cfg)
    assert clients(gw.port).resolve() == "192.0.2.1"
    text = request(admin, path="/metrics").body.decode()
    assert 'bastion_udp_datagrams_total{direction="upstream",listener="dns"} 1.0' in text
    assert 'bastion_udp_datagrams_total{direction="downstream",listener="dns"} 1.0' in text
    assert 'bastion_udp_sessions_active{listener="dns"} 1.0' in text


def test_shutdown_closes_the_sessions(start: Start, servers: Any, clients: Any) -> None:
    server = servers("192.0.2.1")
    gw = start(udp_config(free_udp_port(), [server.address]))
    assert clients(gw.port).resolve() == "192.0.2.1"
    udp = gw.udp()
    gw.stop()
    assert udp.stats.sessions_active == 0 and not udp.sessions
    target = gw.gateway.registry.targets[f"dns/{server.address}"]
    assert target.in_flight == 0


def test_a_flood_of_new_clients_stays_within_the_limit_and_leaks_nothing(
    start: Start, servers: Any, clients: Any
) -> None:
    server = servers("192.0.2.1")
    gw = start(udp_config(free_udp_port(), [server.address], udp={"max_sessions": 5, "session_idle": "300ms"}))
    flood = [clients(gw.port) for _ in range(20)]
    for client in flood:
        client.sock.send(b"not dns")  # the server ignores it: no reply comes back
    udp = gw.udp()
    wait_for(lambda: udp.stats.sessions == 20)
    assert udp.stats.sessions_active == 5 and udp.stats.evicted == 15 and len(udp.sessions) == 5
    target = gw.gateway.registry.targets[f"dns/{server.address}"]
    assert target.in_flight == 5  # one place per live session, none left by the evicted ones
    assert flood[-1].resolve() == "192.0.2.1"
    wait_for(lambda: udp.stats.sessions_active == 0)  # all idle: expired
    assert target.in_flight == 0 and not udp.sessions


def test_the_gateway_is_ready_once_the_udp_socket_is_bound(start: Start, servers: Any) -> None:
    server = servers("192.0.2.1")
    gw = start(udp_config(free_udp_port(), [server.address]))
    assert gw.gateway.is_ready()


def test_a_reload_that_turns_the_listener_to_http_closes_the_udp_socket(
    start: Start, servers: Any, clients: Any
) -> None:
    server = servers("192.0.2.1")
    config = udp_config(tcp_and_udp_port(), [server.address])
    gw = start(config)
    client = clients(gw.port)
    assert client.resolve() == "192.0.2.1"
    udp = gw.udp()
    config["listeners"][0] = {"name": "dns", "bind": f"127.0.0.1:{gw.port}"}
    config["routes"] = [{"name": "all", "match": {"path": "/"}, "upstream": "dns"}]
    write_config(gw.config_path, config)
    assert gw.reload()
    assert not gw.gateway.udp and udp.stats.sessions_active == 0
    client.sock.settimeout(0.3)
    assert client.resolve() is None
    assert gw.gateway.is_ready()


def test_a_udp_upstream_refuses_tcp_checks_and_proxy_v1(tmp_path: Path) -> None:
    from bastion.config.loader import load_config
    from bastion.errors import ConfigError

    config = udp_config(1053, ["127.0.0.1:53"], health_check={"active": {"type": "tcp"}}, send_proxy_protocol="v1")
    path = write_config(tmp_path / "gw.yaml", config)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    text = "\n".join(caught.value.problems)
    assert "upstreams.dns.health_check.active.type: a tcp check cannot probe a udp service" in text
    assert "upstreams.dns.send_proxy_protocol: udp upstreams take v2 only" in text


def test_an_ipv6_listener_relays_to_an_ipv4_target_with_proxy_v2(start: Start, servers: Any) -> None:
    server = servers("192.0.2.1", proxy_v2=True)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
        probe.bind(("::1", 0))
        port = int(probe.getsockname()[1])
    config = udp_config(port, [server.address], send_proxy_protocol="v2")
    config["listeners"][0]["bind"] = f"[::1]:{port}"
    gw = start(config)
    client = DnsClient(port, host="::1")
    try:
        assert client.resolve() == "192.0.2.1"
    finally:
        client.close()
    [header] = server.headers
    assert header.source == ("::1", client.address[1]) and header.destination == ("::1", port)
    assert gw.gateway.udp[f"[::1]:{port}"].stats.sessions == 1


def test_passive_health_ejects_a_refusing_target_for_new_sessions(start: Start, servers: Any, clients: Any) -> None:
    live = servers("192.0.2.1")
    dead = f"127.0.0.1:{free_udp_port()}"
    passive = {"passive": {"max_failures": 1, "ejection": "30s"}}
    gw = start(udp_config(free_udp_port(), [dead, live.address], health_check=passive))
    dead_target = gw.gateway.registry.targets[f"dns/{dead}"]
    for _ in range(4):  # round robin: one of the first two sessions meets the dead target
        client = clients(gw.port)
        client.sock.settimeout(0.5)
        assert client.resolve(attempts=4) == "192.0.2.1"
    assert dead_target.failures == 1 and dead_target.ejections == 1  # one refusal, then never picked


def test_only_the_target_can_answer_a_session(start: Start, servers: Any, clients: Any) -> None:
    """A datagram sent to a session's socket from anywhere but its target never reaches the
    client: the socket is connected, the kernel drops it."""
    server = servers("192.0.2.1")
    gw = start(udp_config(free_udp_port(), [server.address]))
    client = clients(gw.port)
    assert client.resolve() == "192.0.2.1"
    [session_socket] = set(server.sources)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as intruder:
        intruder.bind(("127.0.0.1", 0))
        for _ in range(5):
            intruder.sendto(b"forged answer", session_socket)
    client.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        client.sock.recv(65535)
    assert gw.udp().stats.datagrams[1] == 1


def test_an_oversized_answer_from_the_target_is_dropped(start: Start, clients: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target:
        target.bind(("127.0.0.1", 0))
        target.settimeout(5)
        gw = start(udp_config(free_udp_port(), [f"127.0.0.1:{target.getsockname()[1]}"], udp={"max_datagram": 512}))
        client = clients(gw.port)
        client.sock.send(b"question")
        _, session = target.recvfrom(65535)
        target.sendto(b"y" * 2000, session)  # an amplified answer: over max_datagram
        target.sendto(b"small", session)
        assert client.sock.recv(65535) == b"small"
    assert gw.udp().stats.dropped == {"too_big": 1}


def test_each_session_ends_with_an_access_log_line(start: Start, servers: Any, clients: Any, tmp_path: Path) -> None:
    server = servers("192.0.2.1")
    config = udp_config(free_udp_port(), [server.address], udp={"session_idle": "200ms", "max_sessions": 1})
    config["log"] = {"access_file": str(tmp_path / "access.log")}
    gw = start(config)
    first, second = clients(gw.port), clients(gw.port)
    assert first.resolve() and first.resolve()
    assert second.resolve()  # evicts the first session

    def lines() -> list[dict[str, Any]]:
        path = tmp_path / "access.log"
        text = path.read_text() if path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    wait_for(lambda: len(lines()) == 2)  # the second one went idle
    evicted, idle = lines()
    assert evicted["close_reason"] == "evicted" and idle["close_reason"] == "idle_timeout"
    assert (evicted["client"], evicted["client_port"]) == first.address
    assert evicted["protocol"] == "udp" and evicted["listener"] == "dns" and evicted["upstream"] == "dns"
    assert evicted["target"] == server.address
    assert (evicted["datagrams_in"], evicted["datagrams_out"]) == (2, 2)
    assert evicted["bytes_in"] > 0 and evicted["bytes_out"] > evicted["bytes_in"] / 2
    assert idle["datagrams_in"] == 1 and idle["duration_ms"] >= 200
