"""A tiny DNS server on loopback UDP (dnspython) and a client on a connected socket.

Each server answers every A query with its own address (`answer`), so a test tells which
target answered. It records the source of every datagram (the gateway's session sockets)
and, with `proxy_v2`, reads and strips the PROXY v2 header HAProxy-style senders put first.
"""

from __future__ import annotations

import socket
import threading

import dns.message
import dns.rdatatype
import dns.rrset

from bastion.net.proxy_protocol import ProxyHeader, ProxyProtocolError, parse


class DnsServer:
    def __init__(self, answer: str, proxy_v2: bool = False, port: int = 0) -> None:
        self.answer = answer
        self.proxy_v2 = proxy_v2
        self.sources: list[tuple[str, int]] = []
        self.headers: list[ProxyHeader] = []
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.port = int(self.sock.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, source = self.sock.recvfrom(65535)
            except OSError:
                return
            self.sources.append(source)
            if self.proxy_v2:
                try:
                    header = parse(data)
                except ProxyProtocolError:
                    continue
                if header is None:
                    continue
                self.headers.append(header)
                data = data[header.length :]
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue  # not DNS: no answer
            self.queries += 1
            response = dns.message.make_response(query)
            question = query.question[0]
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", self.answer))
            self.sock.sendto(response.to_wire(), source)

    def stop(self) -> None:
        self.sock.close()


def tcp_and_udp_port() -> int:
    """A port free for both TCP and UDP on loopback (a UDP service with an HTTP health port)."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for both TCP and UDP")


class DnsClient:
    """A client on one source address, connected to the gateway: the kernel delivers only
    datagrams that come from the gateway's listener address."""

    def __init__(self, port: int, timeout: float = 2.0, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.connect((host, port))
        self.sock.settimeout(timeout)
        self.address = self.sock.getsockname()

    def resolve(self, name: str = "db.example.test.", attempts: int = 1) -> str | None:
        """The A record the gateway's target answered; None when no answer came (each try
        waits for the socket timeout, as a stub resolver does before it sends again)."""
        query = dns.message.make_query(name, dns.rdatatype.A)
        for _ in range(attempts):
            self.sock.send(query.to_wire())
            try:
                while True:
                    data = self.sock.recv(65535)
                    response = dns.message.from_wire(data)
                    if response.id == query.id:
                        return str(response.answer[0][0])
            except (TimeoutError, ConnectionRefusedError):
                continue
        return None

    def close(self) -> None:
        self.sock.close()
