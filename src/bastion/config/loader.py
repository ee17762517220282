"""Config file -> validated `Config`, or every problem at once with `FILE:LINE: key.path: message`.

How it works: PyYAML composes the text into nodes (which carry line marks) and this module
walks them itself to build plain data, which lets it (a) remember the line of every key
path, (b) reject duplicate keys, which PyYAML silently accepts, and (c) expand `${NAME}` /
`${NAME:-default}` in string scalars before anything is typed. A plain (unquoted) scalar
that changed by expansion is re-resolved as YAML would, so `weight: ${W:-3}` is the int 3.
The data then goes through the pydantic models and `schema.cross_check`; their key paths
(pydantic `loc` tuples) are turned back into lines through the remembered map. JSON is read
by the same YAML parser, so JSON files get lines too.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from bastion.config.schema import Config, Loc, cross_check
from bastion.errors import ConfigError

__all__ = [
    "LoadedConfig",
    "expand_env",
    "format_loc",
    "load_config",
    "load_config_text",
    "model_problems",
    "suggest",
]

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_SIMPLE_KEY = re.compile(r"^[^.\[\]\s\"']+$")
_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_NAME_REF = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


# --- formatting ------------------------------------------------------------------------------


def format_loc(loc: Loc) -> str:
    """('upstreams', 'users', 'targets', 1, 'address') -> 'upstreams.users.targets[1].address'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _format(path: str, line: int | None, loc: Loc, message: str) -> str:
    where = f"{path}:{line}" if line is not None else path
    return f"{where}: {format_loc(loc)}: {message}" if loc else f"{where}: {message}"


def _line_of(lines: Mapping[Loc, int], loc: Loc) -> int | None:
    """The line of `loc`, or of its closest ancestor present in the file (e.g. a missing key's parent)."""
    for end in range(len(loc), -1, -1):
        line = lines.get(loc[:end])
        if line is not None:
            return line
    return None


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config plus what is needed to point at its source lines later.

    The snapshot builder reports plugin-config errors with `where`, so they read exactly
    like the loader's own.
    """

    config: Config
    path: str
    source_text: str
    lines: Mapping[Loc, int] = field(default_factory=dict, repr=False, compare=False)
    # Key paths whose values came from the environment: never echoed in a message (secrets).
    from_env: frozenset[Loc] = field(default=frozenset(), repr=False, compare=False)

    def line_of(self, loc: Loc) -> int | None:
        """Line (1-based) of a key path, falling back to the nearest ancestor in the file."""
        return _line_of(self.lines, loc)

    def where(self, loc: Loc, message: str) -> str:
        """One problem line: `FILE:LINE: key.path: message`."""
        return _format(self.path, self.line_of(loc), loc, message)

    def from_environment(self, loc: Loc) -> bool:
        """Did the value at `loc` (or a value above it) come from `${NAME}`? Then never echo it."""
        return _under(loc, self.from_env)


# --- environment ------------------------------------------------------------------------------


def expand_env(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """Expand `${NAME}`, `${NAME:-default}` and `$${` (a literal `${`); return (text, problems).

    As in the shell, `:-` also applies when the variable is set but empty.
    """
    problems: list[str] = []

    def replace(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole == "$${":
            return "${"
        body = match.group(1)
        if body is None:
            problems.append("unclosed ${ (write $${ for a literal ${)")
            return whole
        ref = _NAME_REF.fullmatch(body)
        if ref is None:
            problems.append(f"bad variable reference {whole} (use ${{NAME}} or ${{NAME:-default}})")
            return whole
        name, default = ref.group(1), ref.group(2)
        value = env.get(name)
        if value:
            return value
        if default is not None:
            return default
        if value is None:
            problems.append(f"environment variable {name} is not set (give a default with ${{{name}:-...}})")
            return whole
        return value

    return _REF.sub(replace, text), problems


# --- nodes -> data ----------------------------------------------------------------------------


class _Reader:
    """Builds plain data from YAML nodes, remembering lines, duplicate keys and env problems."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.lines: dict[Loc, int] = {}
        self.problems: list[tuple[int | None, Loc, str]] = []
        self.broken: set[Loc] = set()  # values already reported; the model's errors there are noise
        self.from_env: set[Loc] = set()  # values that came from the environment: never echo them
        self._constructor = yaml.constructor.SafeConstructor()
        self._resolver = yaml.resolver.Resolver()
        self._open: set[int] = set()

    def problem(self, node: yaml.Node, loc: Loc, message: str) -> None:
        self.problems.append((node.start_mark.line + 1, loc, message))

    def build(self, node: yaml.Node, loc: Loc, line: int) -> Any:
        self.lines.setdefault(loc, line)
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, loc)
        if id(node) in self._open:
            self.problem(node, loc, "an alias refers to the node that contains it")
            self.broken.add(loc)
            return None
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, (*loc, i), item.start_mark.line + 1) for i, item in enumerate(node.value)]
            assert isinstance(node, yaml.MappingNode)
            return self._mapping(node, loc)
        finally:
            self._open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, loc, "a key must be a plain value, not a list or mapping")
                continue
            # Keys stay as written: `404:` or `on:` are the strings "404" and "on", not an int or
            # a bool (every key in the schema is a string; pydantic converts where a model wants ints).
            key: str = key_node.value
            if key in first_line:
                self.problems.append((key_line, (*loc, key), f"duplicate key (first at line {first_line[key]})"))
                continue
            first_line[key] = key_line
            out[key] = self.build(value_node, (*loc, key), key_line)
        # `<<: *defaults` merges keys the mapping does not set itself.
        for merge in merges:
            sources = merge.value if isinstance(merge, yaml.SequenceNode) else [merge]
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    self.problem(source, loc, "<< merges only mappings")
                    continue
                for key, value in self._mapping(source, loc).items():
                    out.setdefault(key, value)
        return out

    def _scalar(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        if node.tag != _STR_TAG or "${" not in node.value:
            return self._construct(node, loc)
        text, problems = expand_env(node.value, self.env)
        for message in problems:
            self.problem(node, loc, message)
        if problems:
            self.broken.add(loc)
            return text
        self.from_env.add(loc)
        if node.style or text == "" or text == node.value:
            return text  # quoted stays a string; an empty expansion stays "" rather than null
        tag = self._resolver.resolve(yaml.ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
        return self._construct(yaml.ScalarNode(tag, text, node.start_mark, node.end_mark), loc)

    def _construct(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        try:
            return self._constructor.construct_object(node)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            self.problem(node, loc, problem)
            self.broken.add(loc)
            return node.value


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """A parser error as (line, message)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or exc.context or "not valid YAML"
        if exc.problem and exc.context:
            context = exc.context
            if exc.context_mark is not None and mark is not None and exc.context_mark.line != mark.line:
                context += f" at line {exc.context_mark.line + 1}"
            message = f"{message} ({context})"
        in_flow = "flow" in (exc.context or "") or "flow" in (exc.problem or "")
        if in_flow and mark is not None and "${" in "".join(text.splitlines()[max(0, mark.line - 1) : mark.line + 1]):
            message += " (quote values that use ${...} inside { } or [ ])"
        return (mark.line + 1 if mark is not None else None), f"YAML syntax error: {message}"
    if isinstance(exc, yaml.reader.ReaderError):
        line = text[: exc.position].count("\n") + 1 if isinstance(exc.position, int) else None
        return line, f"YAML syntax error: {exc.reason}"
    return None, f"YAML syntax error: {exc}"


# --- model errors -----------------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and `X | None` down to the one type that carries fields."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union or origin is types.UnionType:
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _field_named(model: type[BaseModel], key: str) -> Any:
    """The annotation of the field written `key` in a file (its alias, or its name)."""
    for name, info in model.model_fields.items():
        if key == (info.alias or name):
            return info.annotation
    return None


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The model class that validates the mapping at `loc` under `root`, if the path leads to one."""
    annotation: Any = root
    for part in loc:
        annotation = _unwrap(annotation)
        origin = get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(part, str):
                return None
            annotation = _field_named(annotation, part)
            if annotation is None:
                return None
        elif origin is list and isinstance(part, int):
            annotation = get_args(annotation)[0]
        elif origin is dict and isinstance(part, str):
            annotation = get_args(annotation)[1]
        else:
            return None
    annotation = _unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def suggest(what: str, given: str, known: list[str]) -> str:
    """`unknown key (did you mean 'timeouts'?)`, or the list of what is known there."""
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    if close:
        return f"unknown {what} (did you mean {close[0]!r}?)"
    return f"unknown {what} (expected one of: {', '.join(known)})"


def _unknown_key(root: type[BaseModel], loc: Loc) -> str:
    model = _model_at(root, loc[:-1])
    if model is None:
        return "unknown key"
    return suggest("key", str(loc[-1]), [info.alias or name for name, info in model.model_fields.items()])


def _shown(value: Any) -> str | None:
    """A short rendering of a bad scalar input, or None when it is not worth echoing."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return None


def _message(root: type[BaseModel], error: ErrorDetails, loc: Loc, secret: bool) -> str:
    kind = error["type"]
    if kind == "missing":
        return "missing required key"
    if kind == "extra_forbidden":
        return _unknown_key(root, loc)
    message = error["msg"]
    if kind in ("value_error", "assertion_error"):
        return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    shown = None if secret else _shown(error.get("input"))
    if shown is None:
        return message
    if kind == "string_type" and isinstance(error.get("input"), int | float | bool):
        return f"{message} (got {shown}; quote it to make it a string)"
    return f"{message} (got {shown})"


def model_problems(
    exc: ValidationError, root: type[BaseModel], secret: Callable[[Loc], bool] = lambda loc: False
) -> list[tuple[Loc, str]]:
    """A model's validation errors as (key path below `root`, message), worded as the loader's own:
    `missing required key`, `unknown key (did you mean 'limit'?)`, the bad value when `secret`
    does not say it came from the environment. Plugin configs are reported through this too."""
    problems = []
    for error in exc.errors(include_url=False):
        loc: Loc = tuple(error["loc"])
        message = _message(root, error, loc, secret(loc))
        if loc and loc[-1] == "[key]":
            loc, message = loc[:-1], f"bad key: {message}"
        problems.append((loc, message))
    return problems


def _under(loc: Loc, roots: set[Loc] | frozenset[Loc]) -> bool:
    return any(loc[: len(root)] == root for root in roots)


# --- entry points -----------------------------------------------------------------------------


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read, expand, validate and cross-check a config file. Raises ConfigError with every problem."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read the file: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([f"{name}:{line}: the file is not UTF-8 text"]) from None
    return load_config_text(text, name, env)


def load_config_text(text: str, filename: str = "<string>", env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Like `load_config` for text in hand; `filename` only labels the problem lines."""
    source = text
    if filename.lower().endswith(".json"):
        # JSON allows tab indentation; YAML's pure-Python parser does not. Valid JSON has no raw
        # tab inside strings, so the swap changes nothing else (and keeps columns).
        source = text.replace("\t", " ")
    try:
        root = yaml.compose(source, Loader=_Loader)
    except yaml.YAMLError as exc:
        line, message = _yaml_problem(exc, source)
        raise ConfigError([_format(filename, line, (), message)]) from None
    if root is None:
        raise ConfigError([f"{filename}:1: the file is empty (a config needs at least version: 1 and listeners)"])
    if not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        line = root.start_mark.line + 1
        message = f"the top level must be a mapping of keys (version, listeners, ...), not {kind}"
        raise ConfigError([f"{filename}:{line}: {message}"])

    reader = _Reader(os.environ if env is None else env)
    data = reader.build(root, (), root.start_mark.line + 1)
    problems = list(reader.problems)
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for loc, message in model_problems(exc, Config, lambda loc: _under(loc, reader.from_env)):
            if not _under(loc, reader.broken):
                problems.append((_line_of(reader.lines, loc), loc, message))
    if config is not None:
        for loc, message in cross_check(config):
            problems.append((_line_of(reader.lines, loc), loc, message))
    if problems:
        ordered = sorted(enumerate(problems), key=lambda item: (item[1][0] or 0, item[0]))
        lines = [_format(filename, line, loc, message) for _, (line, loc, message) in ordered]
        raise ConfigError(list(dict.fromkeys(lines)))
    assert config is not None
    return LoadedConfig(
        config=config, path=filename, source_text=text, lines=reader.lines, from_env=frozenset(reader.from_env)
    )
