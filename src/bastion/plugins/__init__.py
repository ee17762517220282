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


BUILTIN_MODULES = (
    "acl",
    "basic_auth",
    "body_limit",
    "cors",
    "headers",
    "ip_filter",
    "jwt",
    "key_auth",
    "python",
    "rate_limit",
)


def _load_builtins() -> None:
    """Import every built-in plugin module so that each registers itself."""
    for module in BUILTIN_MODULES:
        importlib.import_module(f"bastion.plugins.{module}")


_load_builtins()
