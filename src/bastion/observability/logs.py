"""Access log: one JSON line per request on stdout, written in batches.

Lines are collected during a loop iteration and written with one `write` call on the next,
so logging costs an append per request rather than a system call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import warnings
from typing import Any, TextIO


class AccessLog:
    def __init__(self, fd: int | None = None) -> None:
        self.fd = sys.stdout.fileno() if fd is None else fd
        self._lines: list[str] = []
        self._scheduled = False

    def write(self, record: dict[str, Any]) -> None:
        self._lines.append(json.dumps(record, separators=(",", ":")))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._lines:
            data = ("\n".join(self._lines) + "\n").encode()
            self._lines.clear()
            try:
                os.write(self.fd, data)
            except BlockingIOError:
                sys.stdout.write(data.decode())
            except OSError:
                pass


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
