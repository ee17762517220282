"""request_headers / response_headers: remove, set (replace) and add header fields.

Applied in that order: `remove` drops every field of a name, `set` replaces every field of a
name with one value, `add` appends a field. Names and values are checked and encoded once
when the config is loaded; per request this is one pass over the header list. Names the
gateway owns for framing and identity (Content-Length, Transfer-Encoding, Connection, Host,
X-Consumer, ...) cannot be touched.

response_headers changes what the upstream answered and also every reply a plugin makes
(401, 403, 429, ...): it is placed first in the chain, so its response hook runs last.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from bastion.http.model import Headers, Response
from bastion.pipeline import BuildEnv, Context, Plugin, PluginConfig, Reply
from bastion.plugins import register
from bastion.plugins.common import PROTECTED_HEADERS, header_name, header_value


class HeadersConfig(PluginConfig):
    set: dict[str, str] = Field(default_factory=dict, description="Replace every field of the name with this one.")
    add: dict[str, str | list[str]] = Field(default_factory=dict, description="Append fields (a list adds several).")
    remove: list[str] = Field(default_factory=list, description="Drop every field of these names.")

    @field_validator("set", "add")
    @classmethod
    def _pairs(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for name, values in value.items():
            _check_name(name)
            for item in values if isinstance(values, list) else [values]:
                header_value(item)
        return value

    @field_validator("remove")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_name(name)
        return value


def _check_name(name: str) -> bytes:
    key = header_name(name)
    if key in PROTECTED_HEADERS:
        raise ValueError(f"{name} is managed by the gateway and cannot be changed")
    return key


class _HeaderEdit(Plugin):
    Config = HeadersConfig
    stage = Plugin.TRANSFORM

    def __init__(self, config: HeadersConfig, env: BuildEnv) -> None:
        super().__init__(config, env)
        self.drop = frozenset(_check_name(n) for n in [*config.remove, *config.set])
        appended: list[tuple[bytes, bytes]] = [(_check_name(n), header_value(v)) for n, v in config.set.items()]
        for name, values in config.add.items():
            for value in values if isinstance(values, list) else [values]:
                appended.append((_check_name(name), header_value(value)))
        self.appended = tuple(appended)

    def apply(self, headers: Headers) -> None:
        drop = self.drop
        if drop:
            headers.items = [item for item in headers.items if item[0] not in drop]
        headers.items.extend(self.appended)


@register
class RequestHeaders(_HeaderEdit):
    name = "request_headers"

    async def on_request(self, ctx: Context) -> Reply | None:
        self.apply(ctx.request.headers)
        return None


@register
class ResponseHeaders(_HeaderEdit):
    name = "response_headers"
    # First in the chain (it has no request hook, so this costs nothing): its response hook
    # then runs last, after every other plugin's, and also on replies any plugin makes.
    stage = 0

    async def on_response(self, ctx: Context, response: Response) -> None:
        self.apply(response.headers)
