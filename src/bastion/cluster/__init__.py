"""Several gateways on one Redis: connections, config versions, consumers, following changes.

Nothing here is imported by a gateway without `cluster.redis` or `--from-redis`: the modules
that need redis-py import it themselves, so a plain gateway never loads it.

    connect.py    Redis URLs (plain, TLS, Sentinel, Cluster) -> redis-py clients; key names
    versions.py   pushed config versions: push, list, fetch; the local last-known-good copy
    consumers.py  consumers kept in Redis: add, remove, list, fetch
    follow.py     a gateway's watcher: pub/sub plus polling, reloads when something changed
"""
