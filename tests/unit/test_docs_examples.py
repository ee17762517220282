"""Every config example of README.md and docs/*.md is what the product accepts (or, when
marked `<!-- invalid -->`, refuses with exactly the output shown after it).

Fragments are wrapped into a minimal config before they are checked: a list is a list of
plugin entries (put under `plugins:`); a mapping without `version` gets a listener, a route
if it has none, an upstream for every route that names a missing one, and a `key_auth` when
no authentication plugin is in it (so that `acl` fragments have one). `${NAME}` references
get a placeholder value. Valid examples must also pass the JSON Schema `bastion schema`
prints, so the schema cannot refuse what the docs show.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import trustme
import yaml
from click.testing import CliRunner

from bastion.cli import cli
from bastion.config.build import check_config
from bastion.config.json_schema import config_schema
from bastion.config.loader import load_config_text
from bastion.errors import ConfigError
from docs_support import Block, block_after, blocks, importable_examples

AUTHENTICATION = {"key_auth", "basic_auth", "jwt"}
CONFIG_BLOCKS = blocks("yaml")
VALID = [b for b in CONFIG_BLOCKS if b.marker is None]
INVALID = [b for b in CONFIG_BLOCKS if b.marker == "invalid"]


class AnyEnv(Mapping[str, str]):
    """An environment in which every variable is set (long enough for a JWT secret)."""

    def __getitem__(self, name: str) -> str:
        return f"example-{name.lower()}-0123456789abcdef0123456789abcdef"

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _entries(plugins: Any) -> list[str]:
    return [name for entry in plugins or [] if isinstance(entry, dict) for name in entry]


def as_config(block: Block) -> str:
    """The block as a complete config file's text."""
    data = yaml.safe_load(block.text)
    if isinstance(data, list):
        data = {"plugins": data}
    assert isinstance(data, dict), f"{block.where}: a config example is a mapping or a list of plugin entries"
    if "version" in data:
        return block.text
    config: dict[str, Any] = {"version": 1, "listeners": [{"name": "web", "bind": "127.0.0.1:8080"}], **data}
    routes = config.setdefault("routes", [{"name": "example", "match": {"path": "/"}, "upstream": "example"}])
    upstreams = config.setdefault("upstreams", {})
    for route in routes:
        upstreams.setdefault(route["upstream"], {"targets": [{"address": "127.0.0.1:9"}]})
    names = _entries(config.get("plugins")) + [n for r in routes for n in _entries(r.get("plugins"))]
    if not AUTHENTICATION & set(names):
        config["plugins"] = [{"key_auth": {}}, *(config.get("plugins") or [])]
    return yaml.safe_dump(config, sort_keys=False)


@pytest.fixture(scope="module")
def examples_importable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with importable_examples(tmp_path_factory.mktemp("examples")):
        yield


@pytest.fixture(scope="module")
def schema_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(config_schema())


def test_the_docs_have_examples() -> None:
    assert len(VALID) >= 20
    assert len(INVALID) >= 3
    assert {b.path.name for b in VALID} >= {"README.md", "config.md", "plugins.md", "load-balancing.md", "cluster.md"}


def write_tls_files(text: str, where: Path) -> None:
    """Files for the certificate paths an example names (`certs/api.pem`): every `.pem` the
    same certificate (also good as a CA file), every `.key` its key, so any pair matches."""
    names = set(re.findall(r"[\w./-]+\.(?:pem|key|crt)", text))
    if not names:
        return
    ca = trustme.CA()
    leaf = ca.issue_cert("api.example.com", "*.example.com")
    for name in names:
        path = where / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".key"):
            path.write_bytes(leaf.private_key_pem.bytes())
        else:
            path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))


@pytest.mark.parametrize("block", VALID, ids=lambda b: b.where)
def test_config_examples_are_valid(
    block: Block,
    examples_importable: None,
    schema_validator: jsonschema.Draft202012Validator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = as_config(block)
    write_tls_files(text, tmp_path)  # relative file names start at the working directory
    for name in set(re.findall(r"[\w./-]+\.pb\b", text)):  # grpc_json descriptor sets: an empty one
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    try:
        check_config(load_config_text(text, block.where, env=AnyEnv()))
    except ConfigError as exc:
        pytest.fail(f"{block.where} is refused:\n" + "\n".join(exc.problems) + f"\n--- checked as:\n{text}")
    schema_errors = [error.message for error in schema_validator.iter_errors(yaml.safe_load(text))]
    assert not schema_errors, f"{block.where}: the JSON Schema refuses it: {schema_errors}"


@pytest.mark.parametrize("block", INVALID, ids=lambda b: b.where)
def test_examples_marked_invalid_are_refused(block: Block, examples_importable: None) -> None:
    with pytest.raises(ConfigError):
        check_config(load_config_text(as_config(block), block.where, env={}))


def _outputs() -> list[tuple[Block, Block]]:
    pairs = []
    for block in INVALID:
        after = block_after(block)
        if after is not None and after.text.startswith("$ bastion check "):
            pairs.append((block, after))
    return pairs


def test_the_check_outputs_are_found() -> None:
    assert len(_outputs()) >= 3


@pytest.mark.parametrize(("config", "output"), _outputs(), ids=lambda b: b.where)
def test_check_output_is_what_the_docs_show(
    config: Block, output: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command, *expected = output.text.rstrip("\n").splitlines()
    name = command.removeprefix("$ bastion check ")
    for variable in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", config.text):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)
    Path(name).write_text(config.text, encoding="utf-8")
    result = CliRunner().invoke(cli, ["check", name])
    assert result.exit_code == 1
    assert result.output.splitlines() == expected
