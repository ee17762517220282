"""Access log: one JSON line per request, on standard output or in a file, never blocking.

`AccessLog` belongs to a snapshot and holds its `log` settings; the lines go to the process's
`LineSink` for the destination (observability/sink.py), shared by every snapshot that names
it, which buffers them within a bound and writes without ever waiting on the reader. A record
is encoded with orjson, one `dumps` per request; lines are written once per loop iteration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import warnings
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from bastion.observability.sink import SINKS, LineSink, Sinks

if TYPE_CHECKING:
    from bastion.config.schema import Log

DEFAULT_BUFFER = 4 * 1024 * 1024
DEFAULT_STALL = 10.0

_dumps = orjson.dumps
_NEWLINE = orjson.OPT_APPEND_NEWLINE


def encode(record: dict[str, Any]) -> bytes:
    """One line: compact JSON and a newline."""
    try:
        return _dumps(record, option=_NEWLINE)
    except TypeError:
        # orjson refuses what json takes (a lone surrogate, an int over 64 bits): rare, keep the line.
        return (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()


class AccessLog:
    """One snapshot's access log. `open()` (from `Snapshot.start`) takes the sink for the
    configured destination; `close()` lets it go. Writing before `open()` opens it."""

    def __init__(self, settings: Log | None = None, sinks: Sinks = SINKS) -> None:
        self.file = settings.access_file if settings is not None else None
        self.limit = settings.access_buffer if settings is not None else DEFAULT_BUFFER
        self.stall = settings.access_stall_timeout if settings is not None else DEFAULT_STALL
        self._sinks = sinks
        self._sink: LineSink | None = None
        self._closed = False

    def open(self) -> None:
        """Take the sink (opening the file if no other snapshot has). Raises OSError."""
        if self._sink is None:
            self._sink = self._sinks.acquire(self.file, self.limit, self.stall)

    def write(self, record: dict[str, Any]) -> None:
        sink = self._sink
        if sink is None:
            if self._closed:
                return
            self.open()
            sink = self._sink
            assert sink is not None
        if sink.accepting:
            sink.add(encode(record))
        else:
            sink.drop(1)  # stalled or gone: not worth encoding

    def flush(self) -> None:
        if self._sink is not None:
            self._sink.flush()

    async def close(self) -> None:
        """Let the sink go; the last snapshot using it writes what is pending and closes it.

        A request that ends later still hands its line to the sink: written if another
        snapshot keeps the sink open, else counted as dropped."""
        if self._closed:
            return
        self._closed = True
        if self._sink is not None:
            await self._sinks.release(self._sink)

    def statistics(self) -> dict[str, Any]:
        """The sink's numbers: lines, dropped_lines, pending_bytes, ... (see LineSink)."""
        return self._sink.statistics() if self._sink is not None else {}


def reopen_access_logs() -> list[str]:
    """SIGUSR1: open every access log file of this event loop again (after a rotation)."""
    return SINKS.reopen(asyncio.get_running_loop())


def setup_logging(level: str) -> None:
    """Structured-enough process logs on stderr (the access log owns stdout).

    Python warnings (PyJWT's InsecureKeyLengthWarning, deprecations of libraries) become log
    records too, in the same format, instead of raw text from `warnings.showwarning`.
    """
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    warnings.showwarning = log_warning


def log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """`warnings.showwarning` as one log line on `py.warnings` (the logger that
    logging.captureWarnings uses), without the source line the default prints below it."""
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)
