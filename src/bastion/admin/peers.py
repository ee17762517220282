"""Questions between the workers of one gateway, over unix sockets.

With `--workers N` the supervisor makes a private directory (mode 0700) and every worker
listens there on `worker-INDEX.sock`. Whichever worker accepts an admin request asks the
others (`ask_others`) and answers for all of them. A question is one JSON line, the answer
one JSON document followed by the end of the connection: no framing to get wrong, and a
worker that is down, starting or stuck is simply an answer that did not come in time.

The same directory holds `drained.json`, the targets drained through the admin API, so a
worker that replaces a dead one starts with them drained too (updated under an flock, since
two workers may take two drain requests at the same moment).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("bastion.admin")

Answer = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

QUESTION_LIMIT = 64 * 1024
DRAINED_FILE = "drained.json"


class Peers:
    def __init__(self, directory: str, index: int, count: int, answer: Answer) -> None:
        self.directory = directory
        self.index = index
        self.count = count
        self.answer = answer
        self.server: asyncio.AbstractServer | None = None

    def path(self, index: int) -> str:
        return os.path.join(self.directory, f"worker-{index}.sock")

    async def start(self) -> None:
        path = self.path(self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by the worker this one replaces
        self.server = await asyncio.start_unix_server(self._serve, path, limit=QUESTION_LIMIT)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            with contextlib.suppress(OSError):
                os.unlink(self.path(self.index))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                line = await reader.readline()
            question = json.loads(line)
            reply = await self.answer(question)
        except Exception as exc:  # a bad question must not take the worker down
            log.warning("worker %d: a question from another worker failed: %s", self.index, exc)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            writer.write(json.dumps(reply).encode())
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def ask(self, index: int, question: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """Worker `index`'s answer, or None when it cannot answer within `timeout`."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(self.path(index))
                writer.write(json.dumps(question).encode() + b"\n")
                await writer.drain()
                data = await reader.read()
            answer = json.loads(data)
            return answer if isinstance(answer, dict) else None
        except (OSError, TimeoutError, ValueError):
            return None
        finally:
            if writer is not None:
                writer.close()

    async def ask_others(self, question: dict[str, Any], timeout: float) -> list[dict[str, Any] | None]:
        """Every other worker's answer (None for those that did not answer), in index order."""
        others = [i for i in range(self.count) if i != self.index]
        return list(await asyncio.gather(*(self.ask(i, question, timeout) for i in others)))


# --- targets drained through the admin API ----------------------------------------------------


def load_drained(directory: str) -> set[str]:
    """The target keys ("upstream/address") drained when this worker starts."""
    try:
        with open(os.path.join(directory, DRAINED_FILE)) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return set()
    return {key for key in data if isinstance(key, str)} if isinstance(data, list) else set()


def save_drained(directory: str, key: str, drained: bool) -> None:
    """Add or remove one target key, read-modify-write under an exclusive lock."""
    lock_path = os.path.join(directory, DRAINED_FILE + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        keys = load_drained(directory)
        if drained:
            keys.add(key)
        else:
            keys.discard(key)
        temp = os.path.join(directory, f".{DRAINED_FILE}.{os.getpid()}")
        with open(temp, "w") as handle:
            json.dump(sorted(keys), handle)
        os.replace(temp, os.path.join(directory, DRAINED_FILE))
