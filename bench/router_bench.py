"""Router micro-benchmark: mean ns per match() as the route table grows from 10 to 10,000 routes.

Not a test (no assertions on time); run it by hand: `python bench/router_bench.py [--loops N]`.
The table mixes the shapes real configs have: prefixes per service, REST templates sharing a
`/v1` first segment (the case a first-segment index would scan), per-tenant exact hosts,
wildcard hosts, method and header conditions, and a fixed handful of regexes. The requests
always hit or miss routes near the end of the file, so a linear scan would show.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from bastion.config.schema import Route
from bastion.errors import GatewayError
from bastion.http.model import Headers
from bastion.http.router import Router


def build_routes(count: int) -> list[Route]:
    """`count` routes of realistic shapes plus three regexes (their number does not grow)."""
    routes = []
    for i in range(count):
        match: dict[str, object]
        kind = i % 5
        if kind == 0:
            match = {"path": f"/svc{i}/api", "methods": ["GET", "POST"]}
        elif kind == 1:
            match = {"path": f"/v1/res{i}/{{id}}", "methods": ["GET", "PUT", "DELETE"]}
        elif kind == 2:
            match = {"path": f"/v1/res{i}/{{id}}/items/{{item}}", "headers": {"X-Api-Version": "1"}}
        elif kind == 3:
            match = {"hosts": [f"tenant{i}.example.com"], "path": "/"}
        else:
            match = {"hosts": [f"*.zone{i}.example.net"], "path": f"/app{i}"}
        routes.append(Route.model_validate({"name": f"r{i}", "upstream": "u", "match": match}))
    for n, regex in enumerate([r"^/legacy/(?P<page>\w+)\.php$", r"^/static/.*\.(css|js)$", r"^/feeds/(?P<id>\d+)$"]):
        routes.append(Route.model_validate({"name": f"regex{n}", "upstream": "u", "match": {"path_regex": regex}}))
    return routes


def requests(count: int) -> dict[str, tuple[str, str, str, Headers]]:
    """Named requests aimed at the last routes of each shape (so a scan would cost the most)."""
    last = count - count % 5 - 5
    v1 = Headers([(b"x-api-version", b"1"), (b"user-agent", b"bench")])
    plain = Headers([(b"user-agent", b"bench"), (b"accept", b"*/*")])
    return {
        "hit prefix": ("GET", "api.example.com", f"/svc{last}/api/orders/42", plain),
        "hit template": ("GET", "api.example.com", f"/v1/res{last + 1}/42", plain),
        "hit template+hdr": ("GET", "api.example.com", f"/v1/res{last + 2}/42/items/7", v1),
        "hit exact host": ("GET", f"tenant{last + 3}.example.com", "/a/b/c", plain),
        "hit wildcard host": ("GET", f"eu.zone{last + 4}.example.net", f"/app{last + 4}/x", plain),
        "hit regex": ("GET", "api.example.com", "/feeds/12345", plain),
        "miss 404": ("GET", "api.example.com", "/nothing/here/at/all", plain),
        "miss 405": ("POST", "api.example.com", f"/v1/res{last + 1}/42", plain),
    }


def measure(call: Callable[[], object], loops: int) -> float:
    """Mean ns per call over the best of three runs (the machine is shared)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter_ns()
        for _ in range(loops):
            try:  # noqa: SIM105 - contextlib.suppress would add its own cost to every call
                call()
            except GatewayError:
                pass
        best = min(best, (time.perf_counter_ns() - start) / loops)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=20_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10_000])
    args = parser.parse_args()
    results: dict[int, dict[str, float]] = {}
    for size in args.sizes:
        started = time.perf_counter()
        router = Router(build_routes(size))
        compile_ms = (time.perf_counter() - started) * 1000
        results[size] = {}
        for name, (method, host, path, headers) in requests(size).items():

            def call(
                r: Router = router, m: str = method, h: str = host, p: str = path, hd: Headers = headers
            ) -> object:
                return r.match(m, h, p, hd)

            results[size][name] = measure(call, args.loops)
        print(f"compiled {size + 3} routes (incl. 3 regexes) in {compile_ms:.1f} ms")
    names = list(requests(args.sizes[0]))
    print()
    print(f"{'mean ns per match':<20}" + "".join(f"{size:>10}" for size in args.sizes))
    for name in names:
        print(f"{name:<20}" + "".join(f"{results[size][name]:>10.0f}" for size in args.sizes))


if __name__ == "__main__":
    main()
