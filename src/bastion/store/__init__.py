"""Shared state behind one async interface: rate-limit counters today, more later.

`base.Store` is the interface; `memory` holds the single-machine stores (a process-local
dict and a table in shared memory that every worker process maps). A Redis store for
clusters implements the same methods with atomic Lua scripts.
"""
