"""The route table, compiled once per config snapshot; `match()` is the per-request hot path.

How the compiled structure works. Each route is filed once per host pattern into a
`_Table`: `_exact_hosts[host]`, `_wild_hosts[suffix]` (for `*.suffix`) or `_any_host`. A
request visits only the tables its host can reach, in precedence order: its own exact host,
then the suffixes of its host after each dot, longest first, then the any-host table.
Inside a table the request path is looked up, never scanned:

- templates (`/users/{id}`) are grouped by segment count, then by mask (which positions
  are literal). Per mask one dict maps the tuple of literal segments to the routes of that
  shape, so a mask costs one lookup however many routes share it. Masks with fewer params
  go first: all candidates have the request's segment count, so fewer params is the
  contract's "more literal segments".
- prefixes live in a dict keyed by the prefix without its trailing slash. The request path
  is cut at its segment boundaries from longest to shortest and each cut is looked up,
  skipping lengths no prefix has.
- regexes are tried one after the other, last; their count is their cost.

Every dict value is a tuple of routes already sorted by the remaining precedence rules
(more conditions first, then file order), so the first route in walk order whose method and
headers fit wins. A miss walks a second time collecting the methods of routes that fit all
but the method, which keeps 405's Allow bookkeeping off the hit path.

`explain()` and `table()` use none of this: they check every route in the same order, one by
one, with separately written checks. The tests hold `match()` and `explain()` to the same
answers, which is what keeps the fast path honest.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from operator import itemgetter

from bastion.config import schema
from bastion.config.schema import TEMPLATE_PARAM, path_problem
from bastion.errors import ConfigError, MethodNotAllowed, NotFound
from bastion.http.model import Headers

Params = dict[str, str]
Match = tuple[int, Params | None]


# (prio, route index, methods or None for any, header conditions, template params as (name, segment)).
# prio is the route's rank by (more conditions, file order); it is unique, so sorting entries
# never compares past it.
_Entry = tuple[int, int, frozenset[str] | None, tuple[tuple[bytes, bytes], ...], tuple[tuple[str, int], ...]]
_Group = tuple[_Entry, ...]
# (literal-segment key getter, key -> routes, positions of the params).
_Mask = tuple[Callable[[Sequence[str]], Hashable], dict[Hashable, _Group], tuple[int, ...]]
_Rank = tuple[int, ...]


@dataclass(frozen=True)
class RouteRow:
    """One line of `bastion routes`: a route in match order, as printable strings."""

    order: int
    name: str
    hosts: str
    path: str
    methods: str
    headers: str
    upstream: str


@dataclass
class Explanation:
    """Why a request goes where it goes: one verdict per route, in this request's match order."""

    matched: str | None
    status: int
    allow: list[str]
    lines: list[str]
    index: int | None = None
    params: Params | None = None


class _Route:
    """One route, compiled: what both the fast tables and the slow explain walk need."""

    def __init__(self, index: int, route: schema.Route) -> None:
        match = route.match
        self.index = index
        self.route = route
        self.name = route.name
        self.hosts = list(dict.fromkeys(match.hosts))
        self.exact_hosts = frozenset(h for h in self.hosts if not h.startswith("*."))
        self.wild_suffixes = frozenset(h[2:] for h in self.hosts if h.startswith("*."))
        methods = set(match.methods)
        if "GET" in methods:
            methods.add("HEAD")
        self.methods: frozenset[str] | None = frozenset(methods) if methods else None
        self.headers = tuple((k.lower().encode("latin-1"), v.encode()) for k, v in match.headers.items())
        self.conditions = (1 if match.methods else 0) + len(match.headers)
        self.regex: re.Pattern[str] | None = None
        self.segments: tuple[str | None, ...] = ()  # template: literal, or None for a param
        self.param_names: tuple[str, ...] = ()
        self.prefix = ""
        if match.path_regex is not None:
            self.kind, self.path = "regex", match.path_regex
            self.label = "regex"
            self.regex = re.compile(match.path_regex)
        elif match.path_exact is not None or (match.path is not None and ("{" in match.path or "}" in match.path)):
            # An exact path is a template without params: same table, same precedence tier.
            exact = match.path_exact is not None
            self.path = match.path_exact if match.path_exact is not None else str(match.path)
            self.kind = "template"
            self.label = "exact" if exact else "template"
            segments: list[str | None] = []
            for segment in self.path[1:].split("/"):
                found = None if exact else TEMPLATE_PARAM.fullmatch(segment)
                segments.append(None if found else segment)
                if found:
                    self.param_names += (found.group(1),)
            self.segments = tuple(segments)
        else:
            self.kind, self.path = "prefix", match.path or "/"
            self.label = "prefix"
            self.prefix = self.path.rstrip("/")

    @property
    def best_host(self) -> _Rank:
        """Rule 1 as a sort key for the route's most specific host pattern."""
        if not self.hosts:
            return (2, 0)
        if self.exact_hosts:
            return (0, 0)
        return (1, -max(len(s) for s in self.wild_suffixes))

    def host_rank(self, host: str) -> _Rank | None:
        """Rule 1 as a sort key for the pattern that accepts `host`; None if none does."""
        if not self.hosts:
            return (2, 0)
        if host in self.exact_hosts:
            return (0, 0)
        fits = [len(s) for s in self.wild_suffixes if host.endswith("." + s) and len(host) > len(s) + 1]
        return (1, -max(fits)) if fits else None

    def path_rank(self) -> _Rank:
        """Rule 2 as a sort key: templates, then prefixes longest first, then regexes."""
        if self.kind == "template":
            return (0, -sum(1 for s in self.segments if s is not None), len(self.param_names))
        if self.kind == "prefix":
            return (1, -len(self.prefix))
        return (2,)

    def rank(self, host: str | None = None) -> tuple[_Rank, _Rank, int, int]:
        """The full precedence key; a host the route does not accept sorts by its own best pattern."""
        host_rank = self.host_rank(host) if host is not None else None
        return (host_rank or self.best_host, self.path_rank(), -self.conditions, self.index)

    def path_params(self, path: str) -> tuple[bool, Params | None]:
        """Slow, obvious path check for explain(): (fits, params or None when the route has none)."""
        if self.kind == "prefix":
            return path == self.prefix or path.startswith(self.prefix + "/"), None
        if self.regex is not None:
            found = self.regex.match(path)
            if found is None:
                return False, None
            if not self.regex.groupindex:
                return True, None
            return True, {k: v for k, v in found.groupdict().items() if v is not None}
        parts = path[1:].split("/")
        if len(parts) != len(self.segments):
            return False, None
        params: Params = {}
        names = iter(self.param_names)
        for part, segment in zip(parts, self.segments, strict=True):
            if segment is None:
                if not part:
                    return False, None
                params[next(names)] = part
            elif part != segment:
                return False, None
        return True, params

    def entry(self, prio: int) -> _Entry:
        params = tuple(zip(self.param_names, (i for i, s in enumerate(self.segments) if s is None), strict=True))
        return (prio, self.index, self.methods, self.headers, params)


def _pick(group: _Group, method: str, headers: Headers, allowed: set[str] | None) -> _Entry | None:
    """The first entry whose method and headers fit; with `allowed`, collect method-only misses."""
    for entry in group:
        methods = entry[2]
        if methods is None or method in methods:
            for name, value in entry[3]:
                if headers.get_raw(name) != value:
                    break
            else:
                return entry
        elif allowed is not None:
            for name, value in entry[3]:
                if headers.get_raw(name) != value:
                    break
            else:
                allowed |= methods
    return None


def _prio(entry: _Entry) -> int:
    return entry[0]


def _key_getter(positions: tuple[int, ...]) -> Callable[[Sequence[str]], Hashable]:
    """itemgetter for the literal positions; a mask with no literal has the constant key ()."""
    if positions:
        getter: Callable[[Sequence[str]], Hashable] = itemgetter(*positions)
        return getter
    return lambda _segments: ()


class _Table:
    """The routes reachable through one host pattern, indexed by path (see the module header)."""

    __slots__ = ("templates", "prefixes", "prefix_lengths", "prefix_longest", "prefix_shortest", "regexes")

    def __init__(self, routes: list[_Route], prio: dict[int, int]) -> None:
        routes = sorted(routes, key=lambda r: prio[r.index])
        by_mask: dict[tuple[int, tuple[int, ...]], dict[Hashable, list[_Entry]]] = {}
        prefixes: dict[str, list[_Entry]] = {}
        regexes: list[tuple[re.Pattern[str], _Group]] = []
        for route in routes:
            if route.kind == "template":
                literal = tuple(i for i, s in enumerate(route.segments) if s is not None)
                key = _key_getter(literal)([s or "" for s in route.segments])
                shape = by_mask.setdefault((len(route.segments), literal), {})
                shape.setdefault(key, []).append(route.entry(prio[route.index]))
            elif route.regex is not None:
                regexes.append((route.regex, (route.entry(prio[route.index]),)))
            else:
                prefixes.setdefault(route.prefix, []).append(route.entry(prio[route.index]))
        # segment count -> levels (same param count, fewest first) -> masks
        levels: dict[int, dict[int, list[_Mask]]] = {}
        for (count, literal), index in by_mask.items():
            params = tuple(i for i in range(count) if i not in literal)
            mask: _Mask = (_key_getter(literal), {k: tuple(v) for k, v in index.items()}, params)
            levels.setdefault(count, {}).setdefault(len(params), []).append(mask)
        self.templates = {
            count: tuple(tuple(masks) for _, masks in sorted(by_params.items())) for count, by_params in levels.items()
        }
        self.prefixes = {k: tuple(v) for k, v in prefixes.items()}
        self.prefix_lengths = frozenset(len(k) for k in prefixes)
        self.prefix_longest = max(self.prefix_lengths, default=0)
        self.prefix_shortest = min(self.prefix_lengths, default=0)
        self.regexes = tuple(regexes)

    def search(self, method: str, path: str, headers: Headers, allowed: set[str] | None) -> Match | None:
        if self.templates:
            levels = self.templates.get(path.count("/"))
            if levels is not None:
                segments = path[1:].split("/")
                for level in levels:
                    group: _Group | None = None
                    for getter, index, holes in level:
                        found = index.get(getter(segments))
                        if found is None:
                            continue
                        for position in holes:
                            if not segments[position]:
                                break
                        else:
                            # Two shapes with as many params both fit: rare, merge by prio.
                            group = found if group is None else tuple(sorted(group + found, key=_prio))
                    if group is not None:
                        entry = _pick(group, method, headers, allowed)
                        if entry is not None:
                            params: Params = {}
                            for name, i in entry[4]:  # a plain loop: cheaper than a comprehension here
                                params[name] = segments[i]
                            return entry[1], params
        if self.prefixes:
            lengths = self.prefix_lengths
            end = len(path)
            if end > self.prefix_longest:  # jump to the longest cut any prefix could match
                end = path.rfind("/", 0, self.prefix_longest + 1)
            while end >= self.prefix_shortest:
                if end in lengths:
                    group = self.prefixes.get(path[:end])
                    if group is not None:
                        entry = _pick(group, method, headers, allowed)
                        if entry is not None:
                            return entry[1], None
                end = path.rfind("/", 0, end)
        for regex, group in self.regexes:
            found_re = regex.match(path)
            if found_re is not None:
                entry = _pick(group, method, headers, allowed)
                if entry is not None:
                    if not regex.groupindex:
                        return entry[1], None
                    groups = found_re.groupdict()
                    if None in groups.values():  # an optional group that did not take part
                        groups = {k: v for k, v in groups.items() if v is not None}
                    return entry[1], groups
        return None


class Router:
    """Routes compiled for matching; build one per config snapshot, then share it read-only."""

    def __init__(self, routes: Sequence[schema.Route]) -> None:
        problems = []
        for index, config in enumerate(routes):
            if config.match.path is not None:
                problem = path_problem(config.match.path)
                if problem:
                    problems.append(f"routes[{index}].match.path: {problem}")
        if problems:
            raise ConfigError(problems)
        self.routes = tuple(routes)
        self._compiled = [_Route(i, r) for i, r in enumerate(routes)]
        by_conditions = sorted(self._compiled, key=lambda r: (-r.conditions, r.index))
        prio = {r.index: n for n, r in enumerate(by_conditions)}
        exact: dict[str, list[_Route]] = {}
        wild: dict[str, list[_Route]] = {}
        anyhost: list[_Route] = []
        for route in self._compiled:
            for host in route.exact_hosts:
                exact.setdefault(host, []).append(route)
            for suffix in route.wild_suffixes:
                wild.setdefault(suffix, []).append(route)
            if not route.hosts:
                anyhost.append(route)
        self._exact_hosts = {h: _Table(rs, prio) for h, rs in exact.items()}
        self._wild_hosts = {s: _Table(rs, prio) for s, rs in wild.items()}
        self._wild_lengths = frozenset(len(s) for s in wild)
        self._any_host = _Table(anyhost, prio) if anyhost else None

    def match(self, method: str, host: str, path: str, headers: Headers) -> Match:
        """(route index, params) for a request; raises NotFound or MethodNotAllowed with Allow."""
        found = self._walk(method, host, path, headers, None)
        if found is not None:
            return found
        allowed: set[str] = set()
        self._walk(method, host, path, headers, allowed)
        if allowed:
            raise MethodNotAllowed(headers=[(b"allow", ", ".join(sorted(allowed)).encode())])
        raise NotFound()

    def _walk(self, method: str, host: str, path: str, headers: Headers, allowed: set[str] | None) -> Match | None:
        table = self._exact_hosts.get(host)
        if table is not None:
            found = table.search(method, path, headers, allowed)
            if found is not None:
                return found
        if self._wild_hosts:
            lengths = self._wild_lengths
            size = len(host)
            dot = host.find(".", 1)  # "*.x" needs a non-empty label before the dot
            while dot != -1:
                if size - dot - 1 in lengths:
                    table = self._wild_hosts.get(host[dot + 1 :])
                    if table is not None:
                        found = table.search(method, path, headers, allowed)
                        if found is not None:
                            return found
                dot = host.find(".", dot + 1)
        if self._any_host is not None:
            return self._any_host.search(method, path, headers, allowed)
        return None

    def table(self) -> list[RouteRow]:
        """Every route in match order (a route with several hosts sorts by its most specific one)."""
        rows = []
        for order, route in enumerate(sorted(self._compiled, key=lambda r: r.rank()), start=1):
            match = route.route.match
            rows.append(
                RouteRow(
                    order=order,
                    name=route.name,
                    hosts=", ".join(route.hosts) or "*",
                    path=f"{route.label} {route.path}",
                    methods=", ".join(match.methods) or "*",
                    headers=", ".join(f"{k}: {v}" for k, v in match.headers.items()) or "*",
                    upstream=route.route.upstream,
                )
            )
        return rows

    def explain(self, method: str, host: str, path: str, headers: Headers) -> Explanation:
        """Check every route in this request's match order and say why each did or did not win."""
        ordered = sorted(self._compiled, key=lambda r: r.rank(host))
        lines: list[str] = []
        allowed: set[str] = set()
        winner: tuple[int, _Route, Params | None] | None = None
        for position, route in enumerate(ordered, start=1):
            verdict, params = self._verdict(route, host, path, headers)
            if verdict is None and route.methods is not None and method not in route.methods:
                verdict = f"method {method} not in [{', '.join(route.route.match.methods)}]"
                allowed |= route.methods
            if verdict is None:
                if winner is None:
                    winner = (position, route, params)
                    verdict = "MATCH"
                else:
                    verdict = f"matches, but route {winner[0]} comes first"
            lines.append(f"{position} {route.name}: {verdict}")
        if winner is not None:
            _, won, params = winner
            return Explanation(won.name, 200, [], lines, won.index, params)
        return Explanation(None, 405 if allowed else 404, sorted(allowed), lines)

    @staticmethod
    def _verdict(route: _Route, host: str, path: str, headers: Headers) -> tuple[str | None, Params | None]:
        """(why host, path or headers do not fit `route`, or None; its params when they do)."""
        if route.host_rank(host) is None:
            return f"host {host or '(none)'} does not match [{', '.join(route.hosts)}]", None
        fits, params = route.path_params(path)
        if not fits:
            if route.kind == "prefix":
                return f"path {path} does not start with {route.path} at a segment boundary", None
            return f"path {path} does not fit {route.label} {route.path}", None
        for name, want in route.headers:
            got = headers.get_raw(name)
            if got != want:
                shown = "missing" if got is None else f"{got.decode('latin-1')!r}"
                return f"header {name.decode()} is {shown}, want {want.decode()!r}", None
        return None, params

    def statistics(self) -> dict[str, int]:
        """Shape of the compiled table, for admin and metrics."""
        kinds = [r.kind for r in self._compiled]
        return {
            "routes": len(kinds),
            "exact_hosts": len(self._exact_hosts),
            "wildcard_hosts": len(self._wild_hosts),
            "templates": kinds.count("template"),
            "prefixes": kinds.count("prefix"),
            "regexes": kinds.count("regex"),
        }
