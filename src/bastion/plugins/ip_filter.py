"""ip_filter: allow or deny clients by address (IPv4 and IPv6 CIDR ranges).

Which address is the client's: the socket peer, unless the peer is one of
`trusted_proxies`; then X-Forwarded-For is read from the right, skipping addresses that are
themselves trusted proxies, and the first untrusted one is the client. Anything left of it
was written by the client and is ignored, so a client cannot name itself by sending
X-Forwarded-For (its own entry is the one a trusted proxy appended). The resolved address
goes to `ctx.client_ip` for later plugins (rate_limit with key ip).

Deny wins over allow; with an allow list, an address outside it is refused (403). Without
allow or deny, the plugin only resolves the client address. Decisions are cached per
address string; checks are integer mask comparisons on precomputed networks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from pydantic import Field, field_validator

from bastion.pipeline import BuildEnv, Context, Plugin, PluginConfig, Reply
from bastion.plugins import register

CACHE_SIZE = 10_000

Network = tuple[int, int, int]  # (version, network int, mask int)


def parse_network(text: str) -> Network:
    net = ipaddress.ip_network(text.strip(), strict=False)
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return net.version, int(net.network_address), int(net.netmask)


def parse_ip(text: str) -> tuple[int, int] | None:
    """(version, int) of an address; IPv4-mapped IPv6 counts as IPv4; None if not an address."""
    try:
        addr = ipaddress.ip_address(text.strip().strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.version, int(addr)


class NetworkSet:
    """A set of CIDR ranges with a membership test on parsed addresses."""

    __slots__ = ("v4", "v6")

    def __init__(self, specs: Iterable[str]) -> None:
        nets = [parse_network(s) for s in specs]
        self.v4 = tuple((n, m) for v, n, m in nets if v == 4)
        self.v6 = tuple((n, m) for v, n, m in nets if v == 6)

    def __bool__(self) -> bool:
        return bool(self.v4 or self.v6)

    def contains(self, ip: tuple[int, int]) -> bool:
        version, value = ip
        return any(value & mask == net for net, mask in (self.v4 if version == 4 else self.v6))


def _networks(value: list[str]) -> list[str]:
    for spec in value:
        try:
            parse_network(spec)
        except ValueError as exc:
            raise ValueError(f"{spec!r} is not an IP address or CIDR range ({exc})") from None
    return value


class IpFilterConfig(PluginConfig):
    allow: list[str] = Field(default_factory=list, description="CIDR ranges allowed; empty: everyone not denied.")
    deny: list[str] = Field(default_factory=list, description="CIDR ranges refused (wins over allow).")
    trusted_proxies: list[str] = Field(
        default_factory=list, description="Peers whose X-Forwarded-For is believed (e.g. your load balancer)."
    )

    @field_validator("allow", "deny", "trusted_proxies")
    @classmethod
    def _check(cls, value: list[str]) -> list[str]:
        return _networks(value)


def resolve_client(peer: str, forwarded: list[bytes], trusted: NetworkSet) -> str:
    """The client address given the socket peer and the X-Forwarded-For field values."""
    parsed = parse_ip(peer)
    if parsed is None or not trusted.contains(parsed):
        return peer
    hops = [h.strip() for value in forwarded for h in value.decode("latin-1").split(",")]
    client = peer
    for hop in reversed(hops):
        hop_ip = parse_ip(hop)
        if hop_ip is None:
            break  # garbage: the last trusted hop is as far as we can believe
        client = hop.strip("[]")
        if not trusted.contains(hop_ip):
            break
    return client


@register
class IpFilter(Plugin):
    name = "ip_filter"
    Config = IpFilterConfig
    stage = Plugin.NETWORK

    def __init__(self, config: IpFilterConfig, env: BuildEnv) -> None:
        super().__init__(config, env)
        self.allow = NetworkSet(config.allow)
        self.deny = NetworkSet(config.deny)
        self.trusted = NetworkSet(config.trusted_proxies)
        self.filtering = bool(self.allow or self.deny)
        self._decisions: dict[str, bool] = {}

    async def on_request(self, ctx: Context) -> Reply | None:
        client = ctx.client_ip
        if self.trusted:
            forwarded = [v for k, v in ctx.request.headers.items if k == b"x-forwarded-for"]
            if forwarded:
                client = ctx.client_ip = resolve_client(client, forwarded, self.trusted)
        if not self.filtering:
            return None
        allowed = self._decisions.get(client)
        if allowed is None:
            allowed = self._decide(client)
            if len(self._decisions) >= CACHE_SIZE:
                self._decisions.clear()
            self._decisions[client] = allowed
        if not allowed:
            return Reply.error(403, "ip_forbidden", "The client address is not allowed.")
        return None

    def _decide(self, client: str) -> bool:
        ip = parse_ip(client)
        if ip is None:
            return False  # not an address (a unix socket?): only allowed when nothing is filtered
        if self.deny.contains(ip):
            return False
        return not self.allow or self.allow.contains(ip)
