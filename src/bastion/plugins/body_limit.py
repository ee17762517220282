"""body_limit: refuse request bodies over `max` with 413.

A declared Content-Length over the limit is refused at once, before any byte of the body
is read or anything reaches the upstream. A chunked body has no declared size, so the limit
is handed to the proxy (`ctx.max_body`), which counts bytes while streaming and answers 413
(or cuts the connection, if the response already started) the moment the count passes it.
Several limits on one route: the smallest wins.
"""

from __future__ import annotations

from pydantic import Field

from bastion.config.types import Size
from bastion.pipeline import BuildEnv, Context, Plugin, PluginConfig, Reply
from bastion.plugins import register


class BodyLimitConfig(PluginConfig):
    max: Size = Field(description="Largest request body accepted, e.g. 1MB.")


@register
class BodyLimit(Plugin):
    name = "body_limit"
    Config = BodyLimitConfig
    stage = Plugin.NETWORK

    def __init__(self, config: BodyLimitConfig, env: BuildEnv) -> None:
        super().__init__(config, env)
        self.max = config.max
        self.message = f"The request body is over the limit of {config.max} bytes."

    async def on_request(self, ctx: Context) -> Reply | None:
        length = ctx.request.content_length
        if length is not None and length > self.max:
            return Reply.error(413, "body_too_large", self.message)
        if ctx.max_body is None or ctx.max_body > self.max:
            ctx.max_body = self.max
        return None
