"""Plugins, looked up by name in `PLUGINS`. Each module registers its class on import."""

from __future__ import annotations

from bastion.pipeline import Plugin

PLUGINS: dict[str, type[Plugin]] = {}


def register(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: make a plugin available under `cls.name`."""
    PLUGINS[cls.name] = cls
    return cls
