"""key_auth: an API key in a header, query parameter or cookie names the consumer.

The request must carry exactly one key across all configured sources: two (two header
fields, a repeated parameter or cookie, a header and a parameter) are refused, as the
upstream might read the one the gateway did not check. The key is looked up by its digest
in the consumers index (constant time in the key's value); it is never logged.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from bastion.http.model import Headers
from bastion.pipeline import BuildEnv, Context, Plugin, PluginConfig, Reply
from bastion.plugins import register
from bastion.plugins.common import Ambiguous, Sources, check_sources, quoted


class KeyAuthConfig(PluginConfig):
    sources: list[str] = Field(
        default_factory=lambda: ["header:X-Api-Key"],
        alias="in",
        min_length=1,
        description="Where to look, in order: header:NAME, query:NAME or cookie:NAME.",
    )
    hide_credentials: bool = Field(False, description="Remove the key before the request goes upstream.")
    realm: str = Field("bastion", description="Realm of the WWW-Authenticate challenge on a 401.")

    _sources = field_validator("sources")(check_sources)


@register
class KeyAuth(Plugin):
    name = "key_auth"
    Config = KeyAuthConfig
    stage = Plugin.AUTHENTICATION

    def __init__(self, config: KeyAuthConfig, env: BuildEnv) -> None:
        super().__init__(config, env)
        self.sources = Sources(config.sources)
        self.consumers = env.consumers
        self.hide = config.hide_credentials
        self._www = f"Key realm={quoted(config.realm)}".encode("latin-1")
        self.challenge = self._www

    async def on_request(self, ctx: Context) -> Reply | None:
        request = ctx.request
        key = self.sources.read(request)
        if key is None:
            return self._refuse("missing_credentials", f"An API key is required ({self.sources.described}).")
        if isinstance(key, Ambiguous):
            return self._refuse("ambiguous_credentials", "The request carries more than one API key; send one.")
        consumer = self.consumers.by_key(key)
        if consumer is None:
            return self._refuse("invalid_credentials", "The API key is not valid.")
        if self.hide:
            self.sources.remove(request)
        ctx.authenticate(consumer)
        return None

    def _refuse(self, word: str, message: str) -> Reply:
        return Reply.error(401, word, message, Headers([(b"www-authenticate", self._www)]))
