"""Which upstream a TLS passthrough listener sends a server name to.

Built once per listener settings from its `sni_routes`: exact names first, then `*.suffix`
wildcards (any depth, the longest matching suffix wins), then `*`, which also takes
hellos without a server name. Matching is a few dict lookups, no scan.
"""

from __future__ import annotations

from bastion.config.schema import SniRoute


class SniTable:
    __slots__ = ("exact", "wild", "any")

    def __init__(self, routes: list[SniRoute]) -> None:
        self.exact: dict[str, str] = {}
        self.wild: dict[str, str] = {}  # suffix (without "*.") -> upstream
        self.any: str | None = None
        for route in routes:
            for host in route.hosts:
                if host == "*":
                    self.any = self.any or route.upstream
                elif host.startswith("*."):
                    self.wild.setdefault(host[2:], route.upstream)
                else:
                    self.exact.setdefault(host, route.upstream)

    def upstream_for(self, sni: str | None) -> str | None:
        """The upstream name for this server name (None: no SNI), or None when no route takes it."""
        if sni is None:
            return self.any
        found = self.exact.get(sni)
        if found is not None:
            return found
        if self.wild:
            dot = sni.find(".", 1)  # "*.x" needs a non-empty label before the suffix
            while dot != -1:
                found = self.wild.get(sni[dot + 1 :])
                if found is not None:
                    return found
                dot = sni.find(".", dot + 1)
        return self.any
