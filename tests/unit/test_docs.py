"""docs/config.md names every config key, so the reference cannot fall behind the schema.

The walk starts at `Config` and follows every field annotation (lists, dicts, optionals,
Annotated) to the pydantic models it reaches. Models defined under `bastion.plugins` are
skipped: plugin settings are documented in docs/plugins.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel

from bastion.config.schema import Config

CONFIG_DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models an annotation mentions: `X`, `X | None`, `list[X]`, `dict[str, X]`, ..."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in get_args(annotation):
        yield from _models_in(arg)


def _documented_models() -> list[type[BaseModel]]:
    seen: dict[type[BaseModel], None] = {}
    pending: list[type[BaseModel]] = [Config]
    while pending:
        model = pending.pop(0)
        if model in seen or model.__module__.startswith("bastion.plugins"):
            continue
        seen[model] = None
        for field in model.model_fields.values():
            pending.extend(_models_in(field.annotation))
    return list(seen)


def _keys() -> list[tuple[str, str]]:
    """(model name, key as written in a config file) for every field of every reachable model."""
    return [
        (model.__name__, field.alias or name)
        for model in _documented_models()
        for name, field in model.model_fields.items()
    ]


def _doc_text() -> str:
    return CONFIG_DOC.read_text(encoding="utf-8")


def test_the_walk_reaches_the_nested_models() -> None:
    names = {model.__name__ for model in _documented_models()}
    assert {"Config", "Listener", "ListenerLimits", "Upstream", "Target", "ActiveHealthCheck", "RouteMatch"} <= names


@pytest.mark.parametrize(("model", "key"), _keys(), ids=lambda value: str(value))
def test_every_config_key_is_in_the_reference(model: str, key: str) -> None:
    assert f"`{key}`" in _doc_text(), f"docs/config.md does not mention `{key}` (a field of {model})"


def test_every_section_of_the_config_has_a_heading() -> None:
    headings = re.findall(r"^#+\s+`?([a-z_]+)`?", _doc_text(), flags=re.MULTILINE)
    missing = [name for name in Config.model_fields if name not in headings]
    assert not missing, f"docs/config.md has no heading for {missing}"
