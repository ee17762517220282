"""The `bastion` command line: run, check, routes, schema, demo, and the cluster commands
push, versions and consumers.

Commands that need the gateway's runtime (`run`, `demo`) or Redis import them lazily, so
`check`, `routes` and `schema` stay quick and work even where the runtime cannot start.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from bastion import __version__
from bastion.config.loader import LoadedConfig, load_config
from bastion.config.schema import Listener
from bastion.errors import BadRequest, ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from bastion.cluster.connect import Keys
    from bastion.net.tls import CertSet

__all__ = ["cli", "main"]

T = TypeVar("T")


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


def _built_or_exit(loaded: LoadedConfig) -> dict[str, CertSet]:
    """Check what only building finds (plugin configs, consumers, TLS files), or print every
    problem and exit 1. Returns the https listeners' certificates by bind."""
    from bastion.config.build import check_config

    try:
        return check_config(loaded)
    except ConfigError as exc:
        _problems_exit(exc, loaded.path)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Plain-text columns, each as wide as its widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return lines


def _relays_to(listener: Listener) -> str:
    """Where an L4 listener sends its connections, for the summary ('' for HTTP ones)."""
    if listener.sni_routes:
        return "-> " + ", ".join(f"{host}: {route.upstream}" for route in listener.sni_routes for host in route.hosts)
    return f"-> {listener.upstream}" if listener.upstream else ""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="bastion", message="%(prog)s %(version)s")
def cli() -> None:
    """Bastion: an API gateway and load balancer driven by one YAML file."""


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False), required=False)
@click.option(
    "--workers",
    "-w",
    default="1",
    metavar="N|auto",
    callback=_workers,
    show_default=True,
    help="Worker processes sharing the listeners (SO_REUSEPORT); 'auto' is one per CPU.",
)
@click.option("--from-redis", "from_redis", metavar="URL", help="Run the config versions pushed to this Redis.")
@click.option("--prefix", default="bastion", show_default=True, help="With --from-redis: the cluster's key prefix.")
@click.option(
    "--local-copy",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --from-redis: the last applied version is kept here, to boot from when Redis is down "
    "[default: $XDG_STATE_HOME/bastion/last-good-HASH.json, else ~/.local/state/bastion/...].",
)
def run(config: str | None, workers: int, from_redis: str | None, prefix: str, local_copy: Path | None) -> None:
    """Run the gateway in the foreground (SIGHUP reloads, SIGUSR1 reopens the access log file,
    SIGTERM drains and exits).

    The config is the file CONFIG, or with --from-redis the version pushed last to that Redis
    (followed: a newly pushed version is applied within a second)."""
    if from_redis is None:
        if config is None:
            raise click.UsageError("give a CONFIG file, or --from-redis URL")
        _built_or_exit(_load_or_exit(config))
        from bastion.workers import run_gateway

        sys.exit(run_gateway(config, workers))
    if config is not None:
        raise click.UsageError("give either a CONFIG file or --from-redis URL, not both")
    _check_url(from_redis, "--from-redis")
    _check_prefix(prefix)
    from bastion.cluster.follow import FollowSettings
    from bastion.workers import run_gateway

    sys.exit(run_gateway("", workers, FollowSettings(from_redis, prefix, local_copy)))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
def check(config: str) -> None:
    """Validate CONFIG; print a summary, or every problem with file:line and key path."""
    loaded = _load_or_exit(config)
    cfg = loaded.config
    certificates = _built_or_exit(loaded)
    click.echo(f"{config}:")
    click.echo(f"  listeners ({len(cfg.listeners)}):")
    rows = [[lst.name, lst.protocol, str(lst.bind), _relays_to(lst)] for lst in cfg.listeners]
    for row in _table(["name", "protocol", "bind", "to"], rows)[1:]:
        click.echo(f"    {row}")
    if certificates:
        click.echo("  certificates (SNI: exact names, then wildcards, then the first of each listener):")
        rows = [
            [bind, ", ".join(cert.names) or "(no name)", f"until {cert.not_after:%Y-%m-%d}"]
            for bind, certs in certificates.items()
            for cert in certs.certificates
        ]
        for row in _table(["bind", "names", "valid"], rows)[1:]:
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
    if cfg.admin is None:
        click.echo("  admin: off")
    else:
        click.echo(f"  admin: http://{cfg.admin.bind} ({'bearer token' if cfg.admin.token else 'no token'})")
    if cfg.cluster is not None:
        from bastion.cluster.connect import redact

        click.echo(f"  cluster: {redact(cfg.cluster.redis)} (prefix {cfg.cluster.prefix})")
    if cfg.tracing is not None:
        click.echo(f"  tracing: OTLP to {cfg.tracing.otlp_endpoint}, sample ratio {cfg.tracing.sample_ratio:g}")
    click.echo("config OK")


def _parse_header(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition(":")
    if not sep or not name.strip():
        raise click.BadParameter(f"{value!r} is not 'Name: value'", param_hint="-H")
    return name.strip(), rest.strip()


def _explained_request(text: str, headers: Sequence[tuple[str, str]]) -> tuple[str, str, str]:
    """'GET http://host:8080/path?q' and the -H headers -> (method, routing host, normalised path),
    read the way the gateway reads the request curl sends for them. Raises BadRequest.

    As with curl, the URL's host is the `Host` header unless -H 'Host: ...' gives one; a bare
    '/path' without a Host header means no host (only routes without `hosts` fit). The host and
    the path go through the gateway's own parsing (http.paths): a trailing dot is dropped, the
    port ignored, case folded, and whatever the gateway refuses with 400 is refused here too."""
    from bastion.http.paths import parse_target, request_host

    parts = text.split(None, 1)
    if len(parts) != 2:
        raise click.BadParameter(f"{text!r} is not 'METHOD URL', e.g. 'GET http://api.example.com/v1/users'")
    method, url = parts[0].upper(), parts[1].strip()
    if not url.startswith("/") and "://" not in url:
        url = "http://" + url
    path, _, authority = parse_target(url.encode("latin-1"))
    fields = [value.encode("latin-1") for name, value in headers if name.lower() == "host"]
    if fields:
        host, _ = request_host(None, fields, http11=True)
    else:
        host = authority[0] if authority is not None else ""
    return method, host, path


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--explain",
    "request",
    metavar="'METHOD URL'",
    help="Say which route this request matches, and why (the URL as given to curl).",
)
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    metavar="'Name: value'",
    help="A request header (repeat); 'Host: ...' replaces the URL's host, as with curl.",
)
def routes(config: str, request: str | None, headers: tuple[str, ...]) -> None:
    """Print the compiled route table in match order; with --explain, trace one request."""
    from bastion.http.model import Headers
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
    pairs = [_parse_header(value) for value in headers]
    try:
        method, host, path = _explained_request(request, pairs)
    except BadRequest as exc:
        click.echo("")
        click.echo(f"=> 400 {exc.message}")
        return
    header_map = Headers()
    for name, value in pairs:
        header_map.add(name, value)
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
    """Print the config's JSON Schema, plugin settings included (point your editor's YAML support at it)."""
    from bastion.config.json_schema import config_schema

    click.echo(json.dumps(config_schema(), indent=2))


@cli.command()
def demo() -> None:
    """Start demo upstreams and a gateway in front of them; run until Ctrl-C."""
    from bastion.demo import run_demo

    sys.exit(run_demo())


# --- cluster commands -------------------------------------------------------------------------


def _check_url(url: str, option: str) -> None:
    from bastion.cluster.connect import parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _check_prefix(prefix: str) -> None:
    from bastion.cluster.connect import check_prefix

    try:
        check_prefix(prefix)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--prefix") from None


def _with_redis(url: str, prefix: str, action: Callable[[Redis, Keys], Awaitable[T]]) -> T:
    """Run `action` with a client for `url`; a Redis that cannot be reached exits 1."""
    from redis.exceptions import RedisError

    from bastion.cluster.connect import Keys, connect, redact

    keys = Keys(prefix)

    async def main() -> T:
        client = connect(url, timeout=5.0, pool_size=2)
        try:
            async with asyncio.timeout(30):
                return await action(client, keys)
        finally:
            await client.aclose()

    try:
        return asyncio.run(main())
    except (RedisError, OSError, TimeoutError) as exc:
        click.echo(f"bastion: Redis at {redact(url)}: {exc or type(exc).__name__}", err=True)
        sys.exit(1)


def _redis_option(required: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--redis",
        "redis_url",
        metavar="URL",
        envvar="BASTION_REDIS",
        required=required,
        help="The cluster's Redis (also $BASTION_REDIS).",
    )


_prefix_option = click.option("--prefix", help="The cluster's key prefix [default: bastion].")


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp)) if timestamp else "-"


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_redis_option(required=False)
@_prefix_option
@click.option("--message", "-m", default="", help="A note stored with the version (why it was pushed).")
def push(config: str, redis_url: str | None, prefix: str | None, message: str) -> None:
    """Validate CONFIG and store it in Redis as the new version every --from-redis gateway runs.

    The text is stored as written: ${NAME} references are filled in by each gateway from its
    own environment (they are checked here with this shell's). The Redis is --redis, else
    the config's own cluster.redis; the prefix is --prefix, else cluster.prefix. Rolling back
    is pushing an old version again (bastion versions --show N)."""
    loaded = _load_or_exit(config)
    _built_or_exit(loaded)
    cluster = loaded.config.cluster
    url = redis_url or (cluster.redis if cluster is not None else None)
    if url is None:
        raise click.UsageError("the config has no cluster.redis: say where to push with --redis URL")
    _check_url(url, "--redis")
    prefix = prefix or (cluster.prefix if cluster is not None else "bastion")
    _check_prefix(prefix)
    from bastion.cluster import versions
    from bastion.cluster.connect import redact

    stored, new = _with_redis(
        url,
        prefix,
        lambda client, keys: versions.push(
            client, keys, loaded.source_text, file=os.path.basename(config), message=message
        ),
    )
    where = f"{redact(url)} (prefix {prefix})"
    if new:
        click.echo(f"pushed version {stored.version} (sha256 {stored.sha256[:12]}, {stored.size} bytes) to {where}")
    else:
        click.echo(f"unchanged: version {stored.version} on {where} is already this config")


@cli.command()
@_redis_option()
@_prefix_option
@click.option("--show", type=int, metavar="N", help="Print the text of version N (to save it and push it again).")
def versions(redis_url: str, prefix: str | None, show: int | None) -> None:
    """List the config versions pushed to Redis, newest first (* marks the one gateways run)."""
    _check_url(redis_url, "--redis")
    prefix = prefix or "bastion"
    _check_prefix(prefix)
    from bastion.cluster import versions as stored_versions

    if show is not None:
        stored = _with_redis(redis_url, prefix, lambda client, keys: stored_versions.fetch(client, keys, show))
        if stored is None:
            click.echo(f"bastion: no version {show} (bastion versions lists those kept)", err=True)
            sys.exit(1)
        click.echo(stored.config, nl=not stored.config.endswith("\n"))
        return

    async def listing(client: Redis, keys: Keys) -> tuple[int | None, list[stored_versions.StoredVersion]]:
        return await stored_versions.current_version(client, keys), await stored_versions.history(client, keys)

    current, rows = _with_redis(redis_url, prefix, listing)
    if not rows:
        click.echo("no versions (push one with: bastion push CONFIG --redis URL)")
        return
    table = [
        [
            ("* " if row.version == current else "  ") + str(row.version),
            _when(row.pushed_at),
            row.pushed_by,
            row.sha256[:12],
            str(row.size),
            row.file,
            row.message,
        ]
        for row in rows
    ]
    for line in _table(["  VERSION", "PUSHED (UTC)", "BY", "SHA256", "BYTES", "FILE", "MESSAGE"], table):
        click.echo(line)


@cli.group()
def consumers() -> None:
    """Consumers kept in the cluster's Redis: added or revoked on every gateway within a second."""


@consumers.command("add")
@click.argument("name")
@_redis_option()
@_prefix_option
@click.option("--group", "groups", multiple=True, help="A group (repeat).")
@click.option("--key", "keys", multiple=True, help="An API key for key_auth (repeat); '-' reads one from stdin.")
@click.option("--key-sha256", "digests", multiple=True, help="An API key given as its SHA-256 digest (hex).")
@click.option("--basic-auth", "basic", multiple=True, metavar="USER:HASH", help="A basic_auth user and its hash.")
@click.option("--jwt", "subjects", multiple=True, metavar="SUBJECT", help="A JWT subject (repeat).")
@click.option(
    "--cert-sha256", "certs", multiple=True, help="A client certificate's SHA-256 fingerprint, for mtls_auth."
)
@click.option("--cert-subject", "cert_subjects", multiple=True, help="A client certificate subject (CN=app,O=Example).")
@click.option("--replace", is_flag=True, help="Replace a consumer of that name instead of refusing.")
def consumers_add(
    name: str,
    redis_url: str,
    prefix: str | None,
    groups: tuple[str, ...],
    keys: tuple[str, ...],
    digests: tuple[str, ...],
    basic: tuple[str, ...],
    subjects: tuple[str, ...],
    certs: tuple[str, ...],
    cert_subjects: tuple[str, ...],
    replace: bool,
) -> None:
    """Add consumer NAME with its credentials. Keys are stored as their SHA-256 digests."""
    from pydantic import ValidationError

    from bastion.cluster import consumers as consumer_store
    from bastion.config.loader import format_loc
    from bastion.config.schema import Consumer

    _check_url(redis_url, "--redis")
    prefix = prefix or "bastion"
    _check_prefix(prefix)
    key_list = [sys.stdin.readline().strip() if key == "-" else key for key in keys]
    users = []
    for item in basic:
        user, sep, password_hash = item.partition(":")
        if not sep:
            raise click.BadParameter(f"{item!r} is not USER:HASH", param_hint="--basic-auth")
        users.append({"username": user, "password_hash": password_hash})
    raw = {
        "name": name,
        "groups": list(groups),
        "credentials": {
            "key_auth": [{"key": k} for k in key_list] + [{"key_sha256": d.lower()} for d in digests],
            "basic_auth": users,
            "jwt": [{"subject": subject} for subject in subjects],
            "mtls_auth": [{"fingerprint_sha256": c} for c in certs] + [{"subject": c} for c in cert_subjects],
        },
    }
    try:
        consumer = Consumer.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = format_loc(tuple(error["loc"]))
            click.echo(f"bastion: {loc}: {str(error['msg']).removeprefix('Value error, ')}", err=True)
        sys.exit(1)
    try:
        rev = _with_redis(redis_url, prefix, lambda client, k: consumer_store.add(client, k, consumer, replace))
    except consumer_store.ConsumerConflict as exc:
        click.echo(f"bastion: {exc}", err=True)
        sys.exit(1)
    click.echo(f"consumer {name} {'stored' if replace else 'added'} (consumers rev {rev})")


@consumers.command("remove")
@click.argument("name")
@_redis_option()
@_prefix_option
def consumers_remove(name: str, redis_url: str, prefix: str | None) -> None:
    """Remove consumer NAME: its credentials stop working on every gateway within a second."""
    from bastion.cluster import consumers as consumer_store

    _check_url(redis_url, "--redis")
    rev = _with_redis(redis_url, prefix or "bastion", lambda client, keys: consumer_store.remove(client, keys, name))
    if rev is None:
        click.echo(f"bastion: no consumer {name!r} in Redis", err=True)
        sys.exit(1)
    click.echo(f"consumer {name} removed (consumers rev {rev})")


@consumers.command("list")
@_redis_option()
@_prefix_option
def consumers_list(redis_url: str, prefix: str | None) -> None:
    """List the consumers kept in Redis (credentials counted, never shown)."""
    from bastion.cluster import consumers as consumer_store

    _check_url(redis_url, "--redis")
    rev, found = _with_redis(redis_url, prefix or "bastion", consumer_store.fetch)
    if not found:
        click.echo("no consumers in Redis")
        return
    rows = [
        [
            c.name,
            ",".join(c.groups) or "-",
            str(len(c.credentials.key_auth)),
            str(len(c.credentials.basic_auth)),
            str(len(c.credentials.jwt)),
            str(len(c.credentials.mtls_auth)),
        ]
        for c in found
    ]
    for line in _table(["NAME", "GROUPS", "KEYS", "BASIC", "JWT", "CERTS"], rows):
        click.echo(line)
    click.echo(f"(consumers rev {rev})")


def main() -> None:
    """Console-script and `python -m bastion` entry point."""
    cli(prog_name="bastion")
