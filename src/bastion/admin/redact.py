"""The running config with its secrets masked, for `GET /config`.

Masked, wherever they appear: values of keys that name a secret (`token`, `secret`,
`password`, `password_hash`, `key_sha256`, ...), a consumer credential's `key`, every value
of `tracing.headers` (a collector's API key travels there), the
password in any URL (`redis://:pw@host` becomes `redis://:***@host`), and inside a
`python` plugin's own `config`, which the gateway cannot know, every key whose name
contains secret, password, passwd, token, key, credential or private. Over-masking a custom
plugin's harmless setting is the safe mistake.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"

SECRET_KEYS = frozenset(
    (
        "token",
        "secret",
        "password",
        "passwd",
        "password_hash",
        "key_sha256",
        "client_secret",
        "private_key",
        "api_key",
        "apikey",
    )
)
_CUSTOM_SECRET = re.compile(r"secret|passw|token|key|credential|private", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://)([^/@\s]*):([^/@\s]*)@", re.IGNORECASE)


def _mask_url(text: str) -> str:
    """`scheme://user:password@host/...` -> `scheme://user:***@host/...`."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{m.group(2)}:***@", text)


def redact(value: Any, path: tuple[str, ...] = ()) -> Any:
    """A copy of plain config data (dicts, lists, scalars) with secrets masked."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        custom = "python" in path and "config" in path  # a custom plugin's own settings
        if path == ("tracing", "headers"):  # sent to the collector: often its API key
            return {str(key): REDACTED for key in value}
        for key, item in value.items():
            name = str(key)
            if item is not None and (
                name.lower() in SECRET_KEYS
                or (name == "key" and "credentials" in path)
                or (custom and _CUSTOM_SECRET.search(name) and not isinstance(item, dict | list))
            ):
                out[name] = REDACTED
            else:
                out[name] = redact(item, (*path, name))
        return out
    if isinstance(value, list):
        return [redact(item, path) for item in value]
    if isinstance(value, str):
        return _mask_url(value)
    return value
