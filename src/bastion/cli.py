"""The `bastion` command line: run, check, routes, schema, demo.

Commands that need the gateway's runtime (`run`, `demo`) import it lazily, so `check`,
`routes` and `schema` stay quick and work even where the runtime cannot start.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn
from urllib.parse import urlsplit

import click

from bastion import __version__
from bastion.config.loader import LoadedConfig, load_config
from bastion.config.schema import Config
from bastion.errors import BadRequest, ConfigError

__all__ = ["cli", "main"]


def _workers(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """`--workers 4` or `--workers auto` (one per CPU). A callback, not a ParamType, so it works
    the same on click versions whose ParamType is generic and those whose is not."""
    if value.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        count = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number of workers or 'auto'") from None
    if count < 1:
        raise click.BadParameter("must be at least 1")
    return count


def _problems_exit(exc: ConfigError, path: str) -> NoReturn:
    """Print every problem on stderr, then a count line, and exit 1."""
    for line in exc.problems:
        click.echo(line, err=True)
    count = len(exc.problems)
    click.echo(f"{count} {'problem' if count == 1 else 'problems'} in {path}", err=True)
    sys.exit(1)


def _load_or_exit(path: str) -> LoadedConfig:
    """Load the config, or print every problem and exit 1."""
    try:
        return load_config(path)
    except ConfigError as exc:
        _problems_exit(exc, path)


def _built_or_exit(loaded: LoadedConfig) -> None:
    """Check what only building finds (plugin configs, consumers), or print every problem and exit 1."""
    from bastion.config.build import check_config

    try:
        check_config(loaded)
    except ConfigError as exc:
        _problems_exit(exc, loaded.path)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Plain-text columns, each as wide as its widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return lines


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="bastion", message="%(prog)s %(version)s")
def cli() -> None:
    """Bastion: an API gateway and load balancer driven by one YAML file."""


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--workers",
    "-w",
    default="1",
    metavar="N|auto",
    callback=_workers,
    show_default=True,
    help="Worker processes sharing the listeners (SO_REUSEPORT); 'auto' is one per CPU.",
)
def run(config: str, workers: int) -> None:
    """Run the gateway in the foreground (SIGHUP reloads, SIGTERM drains and exits)."""
    _built_or_exit(_load_or_exit(config))
    from bastion.app import run_gateway

    sys.exit(run_gateway(config, workers))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
def check(config: str) -> None:
    """Validate CONFIG; print a summary, or every problem with file:line and key path."""
    loaded = _load_or_exit(config)
    cfg = loaded.config
    _built_or_exit(loaded)
    click.echo(f"{config}:")
    click.echo(f"  listeners ({len(cfg.listeners)}):")
    for row in _table(["name", "protocol", "bind"], [[lst.name, lst.protocol, str(lst.bind)] for lst in cfg.listeners])[
        1:
    ]:
        click.echo(f"    {row}")
    click.echo(f"  upstreams ({len(cfg.upstreams)}):")
    rows = []
    for name, upstream in cfg.upstreams.items():
        backups = sum(1 for target in upstream.targets if target.backup)
        count = len(upstream.targets)
        targets = f"{count} {'target' if count == 1 else 'targets'}" + (f" ({backups} backup)" if backups else "")
        rows.append([name, upstream.balance, targets])
    for row in _table(["name", "balance", "targets"], rows)[1:]:
        click.echo(f"    {row}")
    click.echo(f"  routes: {len(cfg.routes)}")
    click.echo(f"  global plugins: {len(cfg.plugins)}")
    click.echo(f"  consumers: {len(cfg.consumers)}")
    click.echo(f"  admin: {cfg.admin.bind}")
    if cfg.cluster is not None:
        click.echo(f"  cluster: {cfg.cluster.redis}")
    click.echo("config OK")


def _parse_header(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition(":")
    if not sep or not name.strip():
        raise click.BadParameter(f"{value!r} is not 'Name: value'", param_hint="-H")
    return name.strip(), rest.strip()


def _parse_request(text: str) -> tuple[str, str, str]:
    """'GET http://host:8080/path?q' -> ('GET', 'host', '/path'); a bare '/path' means any host."""
    parts = text.split(None, 1)
    if len(parts) != 2:
        raise click.BadParameter(f"{text!r} is not 'METHOD URL', e.g. 'GET http://api.example.com/v1/users'")
    method, url = parts[0].upper(), parts[1].strip()
    if not url.startswith("/") and "://" not in url:
        url = "http://" + url
    split = urlsplit(url)
    return method, (split.hostname or "").lower(), split.path or "/"


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--explain", "request", metavar="'METHOD URL'", help="Say which route this request matches, and why.")
@click.option("-H", "--header", "headers", multiple=True, metavar="'Name: value'", help="A request header (repeat).")
def routes(config: str, request: str | None, headers: tuple[str, ...]) -> None:
    """Print the compiled route table in match order; with --explain, trace one request."""
    from bastion.http.model import Headers
    from bastion.http.paths import normalize_path
    from bastion.http.router import Router

    loaded = _load_or_exit(config)
    router = Router(loaded.config.routes)
    rows = [[str(r.order), r.name, r.hosts, r.path, r.methods, r.headers, r.upstream] for r in router.table()]
    if not rows:
        click.echo("no routes")
    else:
        for line in _table(["#", "NAME", "HOSTS", "PATH", "METHODS", "HEADERS", "UPSTREAM"], rows):
            click.echo(line)
    if request is None:
        if headers:
            raise click.UsageError("-H only makes sense with --explain")
        return
    method, host, raw_path = _parse_request(request)
    try:
        path = normalize_path(raw_path)
    except BadRequest as exc:
        click.echo("")
        click.echo(f"=> 400 {exc.message}")
        return
    header_map = Headers()
    for value in headers:
        header_map.add(*_parse_header(value))
    click.echo("")
    click.echo(f"{method} host={host or '(none)'} path={path}")
    explanation = router.explain(method, host, path, header_map)
    for line in explanation.lines:
        click.echo(f"  {line}")
    if explanation.matched is not None:
        click.echo(f"=> route {explanation.matched}")
    elif explanation.status == 405:
        click.echo(f"=> 405 (Allow: {', '.join(explanation.allow)})")
    else:
        click.echo(f"=> {explanation.status} no route")


@cli.command()
def schema() -> None:
    """Print the config's JSON Schema (point your editor's YAML support at it)."""
    body = Config.model_json_schema()
    body.pop("title", None)
    document = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "Bastion config", **body}
    click.echo(json.dumps(document, indent=2))


@cli.command()
def demo() -> None:
    """Start demo upstreams and a gateway in front of them; run until Ctrl-C."""
    from bastion.demo import run_demo

    sys.exit(run_demo())


def main() -> None:
    """Console-script and `python -m bastion` entry point."""
    cli(prog_name="bastion")
