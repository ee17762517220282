"""Consumers kept in Redis, so credentials are added and revoked without a deploy.

    {P}:consumers        hash: consumer name -> the consumer as JSON (the config's consumer shape)
    {P}:consumers:rev    INCR on every change
    channel {P}:consumers  the new rev, published with every change

Gateways with `cluster` merge these with their config's consumers (a config consumer wins
a name conflict) and rebuild when the rev moves. API keys are stored as their SHA-256
digest (`key_sha256`), never as the key: Redis holds nothing that authenticates a client.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from bastion.cluster.connect import Keys
from bastion.config.schema import Consumer, KeyCredential

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("bastion.cluster")


class ConsumerConflict(ValueError):
    """The change would break the set of consumers (a name or credential already used)."""


def hashed(consumer: Consumer) -> Consumer:
    """The same consumer with every `key` replaced by its `key_sha256`."""
    creds = consumer.credentials
    keys = [
        KeyCredential(key_sha256=hashlib.sha256(c.key.encode()).hexdigest()) if c.key is not None else c
        for c in creds.key_auth
    ]
    return consumer.model_copy(update={"credentials": creds.model_copy(update={"key_auth": keys})})


def to_json(consumer: Consumer) -> str:
    return json.dumps(consumer.model_dump(mode="json", exclude_none=True), separators=(",", ":"))


def parse(raw: dict[bytes, bytes]) -> list[Consumer]:
    """Consumers from the hash; a broken entry is logged and left out."""
    out = []
    for name, value in sorted(raw.items()):
        try:
            out.append(Consumer.model_validate_json(value))
        except ValidationError as exc:
            log.warning("consumer %r in Redis is not valid, ignored: %s", name.decode(errors="replace"), exc)
    return out


async def fetch(client: Redis, keys: Keys) -> tuple[int | None, list[Consumer]]:
    """(rev, consumers) read together in one round trip."""
    pipe = client.pipeline(transaction=True)
    pipe.get(keys.consumers_rev)
    pipe.hgetall(keys.consumers)
    rev, raw = await pipe.execute()
    return (int(rev) if rev else None), parse(raw)


async def _commit(client: Redis, keys: Keys, change: Any) -> int:
    pipe = client.pipeline(transaction=True)
    change(pipe)
    pipe.incr(keys.consumers_rev)
    results = await pipe.execute()
    rev = int(results[-1])
    await client.publish(keys.consumers_channel, str(rev))
    return rev


async def add(client: Redis, keys: Keys, consumer: Consumer, replace: bool = False) -> int:
    """Store a consumer (keys as digests). Refuses a taken name (unless `replace`) and a
    credential another consumer in Redis already has. Returns the new rev."""
    from bastion.plugins.consumers import ConsumerIndex

    consumer = hashed(consumer)
    _, current = await fetch(client, keys)
    others = [c for c in current if c.name != consumer.name]
    if len(others) != len(current) and not replace:
        raise ConsumerConflict(f"consumer {consumer.name!r} already exists (--replace to overwrite it)")
    _, problems = ConsumerIndex.build([*others, consumer])
    mine = [message for loc, message in problems if loc[1] == len(others)]
    if mine:
        raise ConsumerConflict("; ".join(mine))
    return await _commit(client, keys, lambda pipe: pipe.hset(keys.consumers, consumer.name, to_json(consumer)))


async def remove(client: Redis, keys: Keys, name: str) -> int | None:
    """Delete a consumer; returns the new rev, or None when there was no such consumer."""
    if not await client.hexists(keys.consumers, name):
        return None
    return await _commit(client, keys, lambda pipe: pipe.hdel(keys.consumers, name))
