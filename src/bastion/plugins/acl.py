"""acl: allow or deny consumers by group, after authentication.

Deny wins: a consumer in any `deny_groups` group is refused even if another of its groups is
allowed. With `allow_groups`, a consumer must be in at least one of them. A request that no
authentication plugin identified is answered 401 (not authenticated), not 403, with the
WWW-Authenticate challenges of the route's authentication plugins (a 401 must say how to
authenticate). The config is refused when the route has no authentication plugin at all:
such an acl could only ever say 401.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field, model_validator

from bastion.http.model import Headers
from bastion.pipeline import BuildEnv, Context, Plugin, PluginConfig, Reply
from bastion.plugins import register


class AclConfig(PluginConfig):
    allow_groups: list[str] = Field(default_factory=list, description="Consumers in one of these groups pass.")
    deny_groups: list[str] = Field(default_factory=list, description="Consumers in one of these groups are refused.")

    @model_validator(mode="after")
    def _at_least_one_list(self) -> AclConfig:
        if not self.allow_groups and not self.deny_groups:
            raise ValueError("give allow_groups, deny_groups or both")
        return self


@register
class Acl(Plugin):
    name = "acl"
    Config = AclConfig
    stage = Plugin.AUTHORIZATION

    def __init__(self, config: AclConfig, env: BuildEnv) -> None:
        super().__init__(config, env)
        self.allow = frozenset(config.allow_groups)
        self.deny = frozenset(config.deny_groups)
        # Decisions per consumer name, computed once: groups are fixed for a snapshot.
        self._decisions: dict[str, bool] = {}
        # Route name -> the challenges of its authentication plugins (a global acl serves many).
        self._challenges: dict[str, tuple[bytes, ...]] = {}

    def prepare_route(self, route: str, chain: Sequence[Plugin]) -> None:
        found = (p.challenge for p in chain if p.stage == Plugin.AUTHENTICATION and p.challenge is not None)
        self._challenges[route] = tuple(dict.fromkeys(found))

    def check_chain(self, chain: Sequence[Plugin]) -> str | None:
        if not any(p.stage == Plugin.AUTHENTICATION for p in chain):
            return "acl needs an authentication plugin (key_auth, basic_auth or jwt) before it"
        return None

    async def on_request(self, ctx: Context) -> Reply | None:
        consumer = ctx.consumer
        if consumer is None:
            challenges = self._challenges.get(ctx.route_name, ())
            headers = Headers([(b"www-authenticate", challenge) for challenge in challenges])
            return Reply.error(401, "unauthenticated", "The request is not authenticated.", headers)
        allowed = self._decisions.get(consumer.name)
        if allowed is None:
            groups = frozenset(consumer.groups)
            allowed = not (groups & self.deny) and (not self.allow or bool(groups & self.allow))
            self._decisions[consumer.name] = allowed
        if not allowed:
            return Reply.error(403, "forbidden", "The consumer is not allowed to use this route.")
        return None
