"""Config versions in Redis, and a gateway's local copy of the last one it applied.

A pushed config is stored as written (its `${NAME}` references unexpanded: each gateway fills
them in from its own environment, so secrets and per-host values never reach Redis), as a
numbered version:

    {P}:config:seq       INCR: the last version number handed out
    {P}:config:v:N       hash: config (the text), sha256, size, pushed_at, pushed_by, file, message
    {P}:config:history   sorted set of the version numbers kept (the newest KEEP)
    {P}:config:current   "N:SHA256", the version gateways run (the digest tells a version N
                         apart from another N pushed after Redis lost its data)
    channel {P}:config   N, published when `current` changes

A push takes a number with INCR, then one Lua script stores the version and moves `current`
forward (never back: of two concurrent pushes the later number wins) and publishes it.
Rolling back is pushing an old version's text again: it gets a new number.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.cluster.connect import Keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

KEEP = 100

# KEYS: version hash, history, current; ARGV: N, channel, "N:SHA256", then field/value pairs.
_COMMIT_LUA = """
local n = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], n, ARGV[1])
local current = tonumber(string.match(redis.call('GET', KEYS[3]) or '0', '^%d+') or '0')
if n > current then
  redis.call('SET', KEYS[3], ARGV[3])
  redis.call('PUBLISH', ARGV[2], ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class StoredVersion:
    version: int
    sha256: str
    size: int
    pushed_at: float
    pushed_by: str = ""
    file: str = ""
    message: str = ""
    config: str = ""  # the text; empty in listings

    @classmethod
    def from_hash(cls, version: int, fields: dict[bytes, bytes]) -> StoredVersion:
        def text(name: str) -> str:
            return fields.get(name.encode(), b"").decode("utf-8", "replace")

        return cls(
            version=version,
            sha256=text("sha256"),
            size=int(text("size") or 0),
            pushed_at=float(text("pushed_at") or 0),
            pushed_by=text("pushed_by"),
            file=text("file"),
            message=text("message"),
            config=text("config"),
        )


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def who() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def parse_head(value: bytes | str | None) -> tuple[int, str] | None:
    """The value of `current` -> (N, sha256)."""
    if not value:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    number, _, sha = text.partition(":")
    return int(number), sha


async def current_version(client: Redis, keys: Keys) -> int | None:
    head = parse_head(await client.get(keys.config_current))
    return head[0] if head is not None else None


async def fetch(client: Redis, keys: Keys, version: int | None = None) -> StoredVersion | None:
    """Version `version`, or the current one; None when there is none (or it was trimmed)."""
    if version is None:
        version = await current_version(client, keys)
        if version is None:
            return None
    fields: dict[bytes, bytes] = await client.hgetall(keys.config_version(version))  # type: ignore[assignment]
    if not fields:
        return None
    return StoredVersion.from_hash(version, fields)


async def push(
    client: Redis, keys: Keys, text: str, *, file: str = "", message: str = "", keep: int = KEEP
) -> tuple[StoredVersion, bool]:
    """Store `text` as a new current version. Returns (the version, False) without storing
    anything when the current version already has exactly this text."""
    sha = digest(text)
    current = await fetch(client, keys)
    if current is not None and current.sha256 == sha:
        return current, False
    number = int(await client.incr(keys.config_seq))
    stored = StoredVersion(number, sha, len(text.encode()), time.time(), who(), file, message, text)
    fields: list[Any] = []
    for name, value in asdict(stored).items():
        if name != "version":
            fields += [name, str(value) if not isinstance(value, str) else value]
    await client.eval(
        _COMMIT_LUA,
        3,
        keys.config_version(number),
        keys.config_history,
        keys.config_current,
        number,
        keys.config_channel,
        f"{number}:{sha}",
        *fields,
    )
    old: list[bytes] = await client.zrange(keys.config_history, 0, -(keep + 1))  # type: ignore[assignment]
    if old:
        await client.delete(*(keys.config_version(int(v)) for v in old))
        await client.zrem(keys.config_history, *old)
    return stored, True


async def history(client: Redis, keys: Keys) -> list[StoredVersion]:
    """Every kept version, newest first, without their texts."""
    kept: list[bytes] = await client.zrevrange(keys.config_history, 0, -1)  # type: ignore[assignment]
    numbers = [int(v) for v in kept]
    if not numbers:
        return []
    pipe = client.pipeline(transaction=False)
    names = ("sha256", "size", "pushed_at", "pushed_by", "file", "message")
    for number in numbers:
        pipe.hmget(keys.config_version(number), names)
    rows = await pipe.execute()
    out = []
    for number, values in zip(numbers, rows, strict=True):
        fields = {name.encode(): value for name, value in zip(names, values, strict=True) if value is not None}
        out.append(StoredVersion.from_hash(number, fields))
    return out


# --- the local copy (last known good) -----------------------------------------------------------


def default_local_copy(url: str, prefix: str) -> Path:
    """$XDG_STATE_HOME/bastion (or ~/.local/state/bastion)/last-good-<hash of URL and prefix>.json."""
    from bastion.cluster.connect import redact

    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    name = hashlib.sha256(f"{redact(url)}|{prefix}".encode()).hexdigest()[:16]
    return Path(base) / "bastion" / f"last-good-{name}.json"


@dataclass
class LocalCopy:
    """The config version (as stored in Redis) and the Redis consumers a gateway last ran with.

    Written after each successful apply (atomically: a temporary file renamed over the old
    one, mode 0600); read at boot when Redis cannot be reached.
    """

    path: Path

    def save(self, stored: StoredVersion, consumers: list[dict[str, Any]], consumers_rev: int | None) -> None:
        body = {
            "format": 1,
            "saved_at": time.time(),
            "version": asdict(stored),
            "consumers": consumers,
            "consumers_rev": consumers_rev,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".last-good-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(body, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def load(self) -> tuple[StoredVersion, list[dict[str, Any]], int | None] | None:
        """(version, consumers, consumers_rev), or None when there is no usable copy."""
        try:
            body = json.loads(self.path.read_text(encoding="utf-8"))
            stored = StoredVersion(**body["version"])
            consumers = list(body.get("consumers") or [])
            rev = body.get("consumers_rev")
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if digest(stored.config) != stored.sha256:
            return None  # damaged
        return stored, consumers, rev
