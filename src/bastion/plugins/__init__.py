"""Plugins, looked up by name in `PLUGINS`. Each module registers its class on import."""

from __future__ import annotations

import importlib
from typing import TypeVar

from bastion.pipeline import Plugin

PLUGINS: dict[str, type[Plugin]] = {}

P = TypeVar("P", bound=type[Plugin])


def register(cls: P) -> P:
    """Class decorator: make a plugin available under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    PLUGINS[cls.name] = cls
    return cls


# Built-in plugin name -> the module that registers it. Modules are imported on first use, so
# a gateway pays (in memory and start-up time) only for the plugins its config names: the
# jwt and basic_auth modules bring in PyJWT, cryptography, bcrypt and argon2.
BUILTINS = {
    "acl": "acl",
    "basic_auth": "basic_auth",
    "body_limit": "body_limit",
    "cors": "cors",
    "grpc_json": "grpc_json",
    "request_headers": "headers",
    "response_headers": "headers",
    "ip_filter": "ip_filter",
    "jwt": "jwt",
    "key_auth": "key_auth",
    "mtls_auth": "mtls_auth",
    "python": "python",
    "rate_limit": "rate_limit",
}


def plugin_class(name: str) -> type[Plugin] | None:
    """The plugin registered as `name`, importing its built-in module if needed."""
    cls = PLUGINS.get(name)
    if cls is None and name in BUILTINS:
        importlib.import_module(f"bastion.plugins.{BUILTINS[name]}")
        cls = PLUGINS.get(name)
    return cls


def plugin_names() -> list[str]:
    """Every plugin name a config may use (built-in or registered), sorted."""
    return sorted(set(BUILTINS) | set(PLUGINS))
