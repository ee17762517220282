"""python: a custom plugin class loaded in-process by `module:Class`.

The class is imported when the config is loaded, its own `Config` model validates the
`config:` mapping (errors point at the lines under `config:`), and the instance it builds
goes straight into the chain: the gateway then calls its hooks exactly like a built-in's,
with no wrapper, no serialization and no process boundary in between.

A reload (SIGHUP) builds new instances but does not re-import a module that is already
imported: restart to pick up changed code.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from pydantic import Field, ValidationError

from bastion.pipeline import BuildEnv, Plugin, PluginConfig, PluginConfigError, PluginProblems
from bastion.plugins import register

_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class PythonConfig(PluginConfig):
    module: str = Field(pattern=_TARGET.pattern, description="Where the class is: package.module:Class.")
    config: dict[str, Any] = Field(default_factory=dict, description="The plugin's own config, for its Config model.")


def load_class(target: str) -> type[Plugin]:
    """Import `package.module:Class` and check that it is a Plugin subclass."""
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name} has no attribute {attr}") from None
    if not isinstance(obj, type) or not issubclass(obj, Plugin):
        raise ValueError(f"{target} is not a subclass of bastion.pipeline.Plugin")
    return obj


@register
class PythonPlugin(Plugin):
    """Never instantiated itself: `create` returns the custom class's instance."""

    name = "python"
    Config = PythonConfig

    @classmethod
    def create(cls, raw: Any, env: BuildEnv) -> Plugin:
        spec = PythonConfig.model_validate(raw if raw is not None else {})
        try:
            target = load_class(spec.module)
        except ValueError as exc:
            raise PluginProblems([(("module",), str(exc))]) from None
        if not target.name:
            target.name = spec.module
        try:
            return target.create(spec.config, env)
        except ValidationError as exc:
            raise PluginConfigError(exc, target.Config, ("config",)) from None
        except PluginConfigError as exc:
            raise PluginConfigError(exc.error, exc.model, ("config", *exc.prefix)) from None
        except PluginProblems as exc:
            raise PluginProblems([(("config", *loc), message) for loc, message in exc.problems]) from None
        except (ValueError, TypeError) as exc:
            raise PluginProblems([(("config",), str(exc))]) from None
