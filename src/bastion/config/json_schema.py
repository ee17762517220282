"""The config's JSON Schema (`bastion schema`), plugin settings included.

The models in config/schema.py give most of it. Plugin entries are open mappings there
(`{NAME: {...}}`, checked against the registry when the snapshot is built), so here every
plugin's own `Config` model is added under `$defs` and each entry becomes a choice of
`{NAME: settings}` objects: editors then complete and check plugin settings like the rest.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from bastion.config.schema import PLUGIN_ENTRY_MARKER, Config
from bastion.pipeline import Plugin
from bastion.plugins import plugin_class, plugin_names

__all__ = ["config_schema"]

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_ENTRY_REF = "#/$defs/PluginEntry"


def _plugins() -> list[type[Plugin]]:
    """Every plugin a config may name (built-in modules imported), in name order."""
    found = []
    for name in plugin_names():
        cls = plugin_class(name)
        if cls is not None:
            found.append(cls)
    return found


def _summary(cls: type[Plugin]) -> str:
    """First line of a built-in's module docstring ('acl: allow or deny consumers ...'), or of
    a custom plugin's class docstring."""
    builtin = cls.__module__.startswith("bastion.plugins.")
    doc = getattr(sys.modules.get(cls.__module__), "__doc__", None) if builtin else cls.__doc__
    return (doc or cls.name).strip().splitlines()[0]


def _entry(name: str, cls: type[Plugin], ref: str) -> dict[str, Any]:
    settings: dict[str, Any] = {"$ref": ref}
    if not any(field.is_required() for field in cls.Config.model_fields.values()):
        settings = {"anyOf": [{"$ref": ref}, {"type": "null"}]}  # `key_auth:` alone takes the defaults
    return {
        "type": "object",
        "description": _summary(cls),
        "properties": {name: settings},
        "required": [name],
        "additionalProperties": False,
    }


def _replace_marker(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get(PLUGIN_ENTRY_MARKER):
            return {"$ref": _ENTRY_REF}
        return {key: _replace_marker(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_replace_marker(item) for item in node]
    return node


def config_schema() -> dict[str, Any]:
    """The JSON Schema document of a config file (draft 2020-12)."""
    plugins = _plugins()
    models: list[type[BaseModel]] = [Config, *dict.fromkeys(cls.Config for cls in plugins)]
    refs, body = models_json_schema([(model, "validation") for model in models], ref_template="#/$defs/{model}")
    defs: dict[str, Any] = _replace_marker(body["$defs"])
    root_name = refs[(Config, "validation")]["$ref"].rsplit("/", 1)[1]
    root = defs.pop(root_name)
    root.pop("title", None)
    entries = [_entry(cls.name, cls, refs[(cls.Config, "validation")]["$ref"]) for cls in plugins]
    defs["PluginEntry"] = {
        "description": "A plugin entry: { NAME: { ...its settings } }, one plugin per entry.",
        "oneOf": entries,
    }
    return {"$schema": DRAFT, "title": "Bastion config", **root, "$defs": defs}
