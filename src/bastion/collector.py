"""The garbage collector's settings for a serving process.

Every request allocates a few hundred container objects (h2's frames, events and stream state,
the exchange, the upstream parse); almost all are freed by reference counting. With CPython's
default threshold (a young collection every 700 allocations) the collector still ran many times a
second and walked the requests in flight, and each older collection walked the whole startup heap
(modules, the compiled config): about 9 % of an HTTP/2 request's CPU (bench, `http2 h2load`).
A serving process therefore moves what startup left into the permanent generation (it lives as
long as the process) and collects the young generation less often. Only the entry points of a
serving process call this: frozen objects are never collected, so not a test process.
"""

from __future__ import annotations

import gc

# Container allocations (minus deallocations) between two young collections; CPython's is 700.
YOUNG_THRESHOLD = 10_000
# Young collections per middle one, and middle ones per full one (CPython's: 10 and 10).
OLDER_THRESHOLD = 20


def tune_collector() -> None:
    """Freeze the startup heap and space collections out (see the module's docstring)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
