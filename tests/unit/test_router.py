"""The router: precedence, every kind of condition, 404 vs 405, explain() agreeing with match()."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bastion.config.schema import Route, path_problem
from bastion.errors import ConfigError, MethodNotAllowed, NotFound
from bastion.http.model import Headers
from bastion.http.router import Router


def route(name: str, upstream: str = "u", **match: Any) -> Route:
    return Route(name=name, upstream=upstream, match=match)


def headers(**values: str) -> Headers:
    return Headers([(k.replace("_", "-").lower().encode(), v.encode()) for k, v in values.items()])


def winner(router: Router, method: str, host: str, path: str, hdrs: Headers | None = None) -> str:
    index, _ = router.match(method, host, path, hdrs or Headers())
    return router.routes[index].name


def outcome(router: Router, method: str, host: str, path: str, hdrs: Headers) -> tuple[Any, ...]:
    """match() reduced to (status, index, params, allow), the shape explain() is compared with."""
    try:
        index, params = router.match(method, host, path, hdrs)
    except MethodNotAllowed as exc:
        assert exc.status == 405
        [(name, value)] = exc.headers
        assert name == b"allow"
        return (405, None, None, value.decode().split(", "))
    except NotFound as exc:
        assert exc.status == 404
        return (404, None, None, [])
    return (200, index, params, [])


def explained(router: Router, method: str, host: str, path: str, hdrs: Headers) -> tuple[Any, ...]:
    result = router.explain(method, host, path, hdrs)
    assert len(result.lines) == len(router.routes)
    assert sum(line.endswith(": MATCH") for line in result.lines) == (result.status == 200)
    if result.index is not None:
        assert result.matched == router.routes[result.index].name
    return (result.status, result.index, result.params, result.allow)


# --- paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "hit"),
    [
        ("/v1/users", True),
        ("/v1/users/", True),
        ("/v1/users/7", True),
        ("/v1/users/7/posts", True),
        ("/v1/usersX", False),
        ("/v1/user", False),
        ("/v1", False),
        ("/", False),
    ],
)
def test_prefix_matches_at_a_segment_boundary(path: str, hit: bool) -> None:
    router = Router([route("users", path="/v1/users")])
    if hit:
        assert router.match("GET", "h", path, Headers()) == (0, None)
    else:
        with pytest.raises(NotFound):
            router.match("GET", "h", path, Headers())


def test_prefix_with_trailing_slash_is_the_same_boundary() -> None:
    router = Router([route("users", path="/v1/users/")])
    for path in ("/v1/users", "/v1/users/", "/v1/users/7"):
        assert winner(router, "GET", "h", path) == "users"
    with pytest.raises(NotFound):
        router.match("GET", "h", "/v1/usersX", Headers())


@pytest.mark.parametrize("path", ["/", "/a", "/a/b/c", "//", "/x/"])
def test_root_prefix_and_no_path_match_everything(path: str) -> None:
    assert winner(Router([route("root", path="/")]), "GET", "h", path) == "root"
    assert winner(Router([route("none")]), "GET", "h", path) == "none"


def test_longer_prefix_before_shorter_whatever_the_file_order() -> None:
    router = Router([route("root", path="/"), route("v1", path="/v1"), route("users", path="/v1/users")])
    assert winner(router, "GET", "h", "/v1/users/7") == "users"
    assert winner(router, "GET", "h", "/v1/orders") == "v1"
    assert winner(router, "GET", "h", "/v2") == "root"


def test_template_exposes_params_and_has_an_exact_shape() -> None:
    router = Router([route("post", path="/users/{uid}/posts/{pid}")])
    assert router.match("GET", "h", "/users/7/posts/abc", Headers()) == (0, {"uid": "7", "pid": "abc"})
    for path in (
        "/users/7/posts",
        "/users/7/posts/abc/x",
        "/users/7/posts/abc/",
        "/users//posts/abc",
        "/users/7/post/a",
    ):
        with pytest.raises(NotFound):
            router.match("GET", "h", path, Headers())


def test_template_param_is_one_non_empty_segment() -> None:
    router = Router([route("one", path="/users/{id}")])
    assert router.match("GET", "h", "/users/7", Headers()) == (0, {"id": "7"})
    for path in ("/users/", "/users", "/users/7/8"):
        with pytest.raises(NotFound):
            router.match("GET", "h", path, Headers())


def test_template_of_only_params() -> None:
    router = Router([route("any2", path="/{a}/{b}")])
    assert router.match("GET", "h", "/x/y", Headers()) == (0, {"a": "x", "b": "y"})
    with pytest.raises(NotFound):
        router.match("GET", "h", "/x", Headers())


def test_templates_before_prefixes_even_longer_ones_earlier_in_the_file() -> None:
    router = Router([route("prefix", path="/v1/users/7"), route("template", path="/v1/{res}/{id}")])
    assert winner(router, "GET", "h", "/v1/users/7") == "template"
    assert winner(router, "GET", "h", "/v1/users/7/x") == "prefix"


def test_more_literal_segments_first() -> None:
    router = Router([route("by-id", path="/users/{id}"), route("me", path="/users/me"), route("p", path="/")])
    assert winner(router, "GET", "h", "/users/me") == "by-id"  # /users/me has no braces: it is a prefix
    router = Router([route("two", path="/{a}/{b}/x"), route("one", path="/users/{id}/x")])
    assert winner(router, "GET", "h", "/users/7/x") == "one"
    assert winner(router, "GET", "h", "/teams/7/x") == "two"


def test_two_template_shapes_with_as_many_params_fall_back_to_conditions_then_file_order() -> None:
    routes = [route("a", path="/users/{id}/posts"), route("b", path="/{tenant}/users/posts")]
    assert winner(Router(routes), "GET", "h", "/users/users/posts") == "a"
    assert winner(Router(routes[::-1]), "GET", "h", "/users/users/posts") == "b"
    routes.append(route("c", path="/users/{x}/{y}", methods=["GET"]))
    routes.append(route("d", path="/{x}/users/posts", methods=["GET"]))
    assert winner(Router(routes), "GET", "h", "/users/users/posts") == "d"
    assert winner(Router(routes), "POST", "h", "/users/users/posts") == "a"


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/users/{id", "must be exactly {name}"),
        ("/users/x{id}", "must be exactly {name}"),
        ("/users/{1d}", "must be exactly {name}"),
        ("/{id}/{id}", "appears twice"),
    ],
)
def test_bad_templates_are_config_errors(path: str, problem: str) -> None:
    assert problem in (path_problem(path) or "")
    with pytest.raises(ConfigError) as caught:
        Router([route("ok", path="/"), route("bad", path=path)])
    assert caught.value.problems[0].startswith("routes[1].match.path: ")
    assert path_problem("/users/{id}/x") is None


def test_regex_uses_re_match_and_named_groups_become_params() -> None:
    router = Router(
        [
            route("anchored", path_regex=r"^/files/(?P<name>[a-z]+)(\.(?P<ext>json|xml))?$"),
            route("start-only", path_regex=r"/legacy"),
            route("plain", path_regex=r"^/(a|b)$"),
        ]
    )
    assert router.match("GET", "h", "/files/x.json", Headers()) == (0, {"name": "x", "ext": "json"})
    assert router.match("GET", "h", "/files/x", Headers()) == (0, {"name": "x"})  # unmatched group left out
    assert router.match("GET", "h", "/legacy/anything", Headers()) == (1, None)
    assert router.match("GET", "h", "/b", Headers()) == (2, None)
    for path in ("/files/X", "/x/legacy", "/ab"):
        with pytest.raises(NotFound):
            router.match("GET", "h", path, Headers())


def test_regex_comes_last() -> None:
    router = Router([route("regex", path_regex=r"^/v1/users/\d+$"), route("root", path="/")])
    assert winner(router, "GET", "h", "/v1/users/7") == "root"
    router = Router(
        [route("regex", path_regex=r"^/v1/users/\d+$"), route("tpl", path="/v1/users/{id}", methods=["PUT"])]
    )
    assert winner(router, "GET", "h", "/v1/users/7") == "regex"
    assert winner(router, "PUT", "h", "/v1/users/7") == "tpl"


def test_regexes_among_themselves_follow_conditions_then_file_order() -> None:
    router = Router(
        [
            route("r1", path_regex="^/x"),
            route("r2", path_regex="^/x", headers={"X-A": "1"}),
            route("r3", path_regex="^/x"),
        ]
    )
    assert winner(router, "GET", "h", "/x", headers(x_a="1")) == "r2"
    assert winner(router, "GET", "h", "/x") == "r1"


# --- hosts -----------------------------------------------------------------------------------


def test_exact_host_before_wildcard_before_any_host() -> None:
    router = Router(
        [
            route("any", path="/"),
            route("wild", hosts=["*.example.com"], path="/"),
            route("exact", hosts=["api.example.com"], path="/"),
        ]
    )
    assert winner(router, "GET", "api.example.com", "/x") == "exact"
    assert winner(router, "GET", "www.example.com", "/x") == "wild"
    assert winner(router, "GET", "example.org", "/x") == "any"


def test_host_outranks_path_specificity() -> None:
    router = Router([route("any-long", path="/v1/users/{id}"), route("host-root", hosts=["api.example.com"])])
    assert winner(router, "GET", "api.example.com", "/v1/users/7") == "host-root"
    assert winner(router, "GET", "other", "/v1/users/7") == "any-long"


@pytest.mark.parametrize(
    ("host", "hit"),
    [
        ("a.example.com", True),
        ("a.b.example.com", True),
        ("example.com", False),
        ("aexample.com", False),
        (".example.com", False),
    ],
)
def test_wildcard_host_needs_at_least_one_label(host: str, hit: bool) -> None:
    router = Router([route("wild", hosts=["*.example.com"])])
    if hit:
        assert winner(router, "GET", host, "/") == "wild"
    else:
        with pytest.raises(NotFound):
            router.match("GET", host, "/", Headers())


def test_longer_wildcard_suffix_first() -> None:
    router = Router([route("short", hosts=["*.example.com"]), route("long", hosts=["*.eu.example.com"])])
    assert winner(router, "GET", "a.eu.example.com", "/") == "long"
    assert winner(router, "GET", "a.us.example.com", "/") == "short"
    assert winner(router, "GET", "eu.example.com", "/") == "short"


def test_a_route_with_several_hosts_ranks_by_the_pattern_that_fits() -> None:
    router = Router(
        [
            route("both", hosts=["api.example.com", "*.example.com"], path="/"),
            route("www", hosts=["www.example.com"], path="/"),
            route("wild-long", hosts=["*.example.com"], path="/v1"),
        ]
    )
    assert winner(router, "GET", "api.example.com", "/v1/x") == "both"
    assert winner(router, "GET", "www.example.com", "/v1/x") == "www"
    assert winner(router, "GET", "other.example.com", "/v1/x") == "wild-long"
    assert winner(router, "GET", "other.example.com", "/v2") == "both"


def test_host_miss_is_404_even_when_the_path_fits_elsewhere() -> None:
    router = Router([route("api", hosts=["api.example.com"], path="/v1", methods=["GET"])])
    with pytest.raises(NotFound):
        router.match("POST", "web.example.com", "/v1", Headers())


# --- headers and conditions -----------------------------------------------------------------


def test_headers_must_all_be_present_with_equal_values() -> None:
    router = Router([route("v1", headers={"X-Api-Version": "1", "X-Tenant": "acme"})])
    assert winner(router, "GET", "h", "/", headers(x_api_version="1", x_tenant="acme")) == "v1"
    for hdrs in (headers(x_api_version="1"), headers(x_api_version="2", x_tenant="acme"), headers(x_tenant="ACME")):
        with pytest.raises(NotFound):
            router.match("GET", "h", "/", hdrs)
    with pytest.raises(NotFound):
        router.match("GET", "h", "/", Headers([(b"x-api-version", b"1 "), (b"x-tenant", b"acme")]))


def test_header_name_is_case_insensitive_in_config() -> None:
    router = Router([route("v1", headers={"X-API-VERSION": "1"})])
    assert winner(router, "GET", "h", "/", headers(x_api_version="1")) == "v1"


def test_first_header_value_counts() -> None:
    router = Router([route("v1", headers={"X-V": "1"})])
    assert winner(router, "GET", "h", "/", Headers([(b"x-v", b"1"), (b"x-v", b"2")])) == "v1"
    with pytest.raises(NotFound):
        router.match("GET", "h", "/", Headers([(b"x-v", b"2"), (b"x-v", b"1")]))


def test_more_conditions_before_fewer() -> None:
    router = Router(
        [
            route("plain", path="/v1"),
            route("get", path="/v1", methods=["GET"]),
            route("get-v2", path="/v1", methods=["GET"], headers={"X-V": "2"}),
            route("v2-tenant", path="/v1", headers={"X-V": "2", "X-T": "a"}),
        ]
    )
    assert winner(router, "GET", "h", "/v1", headers(x_v="2", x_t="a")) == "get-v2"  # file order breaks the tie
    assert winner(router, "POST", "h", "/v1", headers(x_v="2", x_t="a")) == "v2-tenant"
    assert winner(router, "GET", "h", "/v1", headers(x_v="2")) == "get-v2"
    assert winner(router, "GET", "h", "/v1") == "get"
    assert winner(router, "POST", "h", "/v1") == "plain"


def test_file_order_breaks_remaining_ties() -> None:
    routes = [route("first", path="/v1"), route("second", path="/v1")]
    assert winner(Router(routes), "GET", "h", "/v1") == "first"
    assert winner(Router(routes[::-1]), "GET", "h", "/v1") == "second"


def test_conditions_do_not_outrank_the_path() -> None:
    router = Router([route("short", path="/v1", methods=["GET"], headers={"X-V": "1"}), route("long", path="/v1/a")])
    assert winner(router, "GET", "h", "/v1/a", headers(x_v="1")) == "long"


# --- methods, 404 and 405 -------------------------------------------------------------------


def test_head_is_accepted_where_get_is() -> None:
    router = Router([route("get", path="/a", methods=["GET"]), route("head", path="/b", methods=["HEAD"])])
    assert winner(router, "HEAD", "h", "/a") == "get"
    assert winner(router, "HEAD", "h", "/b") == "head"
    with pytest.raises(MethodNotAllowed) as caught:
        router.match("GET", "h", "/b", Headers())
    assert caught.value.headers == [(b"allow", b"HEAD")]


def test_no_methods_means_any_method() -> None:
    router = Router([route("any", path="/a")])
    for method in ("GET", "PURGE", "DELETE"):
        assert winner(router, method, "h", "/a") == "any"


def test_405_lists_the_union_of_methods_sorted() -> None:
    router = Router(
        [
            route("read", path="/v1/users/{id}", methods=["GET"]),
            route("write", path="/v1/users", methods=["POST", "PUT"]),
            route("other-version", path="/v1", methods=["DELETE"], headers={"X-V": "2"}),
        ]
    )
    with pytest.raises(MethodNotAllowed) as caught:
        router.match("DELETE", "h", "/v1/users/7", Headers())
    assert caught.value.status == 405
    assert caught.value.headers == [(b"allow", b"GET, HEAD, POST, PUT")]
    with pytest.raises(MethodNotAllowed) as caught:
        router.match("PATCH", "h", "/v1/users/7", headers(x_v="2"))
    assert caught.value.headers == [(b"allow", b"DELETE, GET, HEAD, POST, PUT")]
    with pytest.raises(NotFound):
        router.match("GET", "h", "/v2", Headers())


def test_a_full_match_further_down_beats_a_method_miss() -> None:
    router = Router([route("read", path="/users/{id}", methods=["GET"]), route("fallback", path="/")])
    assert winner(router, "DELETE", "h", "/users/7") == "fallback"


def test_405_only_counts_routes_whose_headers_fit() -> None:
    router = Router([route("v2", path="/a", methods=["GET"], headers={"X-V": "2"})])
    with pytest.raises(NotFound):
        router.match("POST", "h", "/a", headers(x_v="1"))
    with pytest.raises(MethodNotAllowed):
        router.match("POST", "h", "/a", headers(x_v="2"))


def test_405_collects_across_host_tables() -> None:
    router = Router(
        [
            route("exact", hosts=["a.example.com"], path="/", methods=["GET"]),
            route("wild", hosts=["*.example.com"], path="/", methods=["PUT"]),
            route("any", path="/x", methods=["POST"]),
        ]
    )
    with pytest.raises(MethodNotAllowed) as caught:
        router.match("DELETE", "a.example.com", "/x", Headers())
    assert caught.value.headers == [(b"allow", b"GET, HEAD, POST, PUT")]


def test_empty_router_is_404() -> None:
    with pytest.raises(NotFound):
        Router([]).match("GET", "h", "/", Headers())


# --- table and explain -----------------------------------------------------------------------


def test_table_rows_in_match_order() -> None:
    router = Router(
        [
            route("regex", path_regex="^/x$"),
            route("root", path="/"),
            route("users", path="/v1/users", methods=["GET", "POST"], headers={"X-Api-Version": "1"}, upstream="us"),
            route("user", path="/v1/users/{id}"),
            route("wild", hosts=["*.example.com"]),
            route("exact", hosts=["api.example.com", "*.example.com"], path="/a"),
        ]
    )
    rows = router.table()
    assert [r.name for r in rows] == ["exact", "wild", "user", "users", "root", "regex"]
    assert [r.order for r in rows] == [1, 2, 3, 4, 5, 6]
    exact, wild, user, users, root, regex = rows
    assert (exact.hosts, exact.path) == ("api.example.com, *.example.com", "prefix /a")
    assert (wild.hosts, wild.path, wild.methods, wild.headers) == ("*.example.com", "prefix /", "*", "*")
    assert user.path == "template /v1/users/{id}"
    assert (users.methods, users.headers, users.upstream) == ("GET, POST", "X-Api-Version: 1", "us")
    assert (root.hosts, regex.path) == ("*", "regex ^/x$")


def test_explain_says_why_each_route_lost() -> None:
    router = Router(
        [
            route("users-v1", hosts=["api.example.com"], path="/v1/users", headers={"X-Api-Version": "1"}),
            route("other", hosts=["*.foo.com"]),
            route("x", path="/v2"),
            route("y", path="/v1/users/{id}", methods=["GET", "POST"]),
            route("z", path="/v1", headers={"X-Api-Version": "1"}),
            route("w", path="/"),
            route("r", path_regex="^/nope"),
            route("missing", path="/v1", headers={"X-Tenant": "a"}),
        ]
    )
    result = router.explain("DELETE", "api.example.com", "/v1/users/7", headers(x_api_version="1"))
    assert result.matched == "users-v1"
    assert (result.status, result.allow, result.index, result.params) == (200, [], 0, None)
    assert result.lines == [
        "1 users-v1: MATCH",
        "2 other: host api.example.com does not match [*.foo.com]",
        "3 y: method DELETE not in [GET, POST]",
        "4 z: matches, but route 1 comes first",
        "5 missing: header x-tenant is missing, want 'a'",
        "6 x: path /v1/users/7 does not start with /v2 at a segment boundary",
        "7 w: matches, but route 1 comes first",
        "8 r: path /v1/users/7 does not fit regex ^/nope",
    ]
    result = router.explain("GET", "h", "/v1/users/7", headers(x_api_version="2"))
    assert (result.matched, result.params) == ("y", {"id": "7"})
    assert "header x-api-version is '2', want '1'" in result.lines[3]
    result = router.explain("GET", "h", "/v1/users", Headers())
    assert "path /v1/users does not fit template /v1/users/{id}" in result.lines[2]


def test_explain_405_and_404() -> None:
    router = Router([route("y", path="/v1/users/{id}", methods=["GET", "POST"])])
    result = router.explain("DELETE", "h", "/v1/users/7", Headers())
    assert (result.matched, result.status, result.allow) == (None, 405, ["GET", "HEAD", "POST"])
    result = router.explain("DELETE", "h", "/nope", Headers())
    assert (result.matched, result.status, result.allow, result.index) == (None, 404, [], None)
    result = Router([route("h", hosts=["a.b"])]).explain("GET", "", "/", Headers())
    assert result.lines == ["1 h: host (none) does not match [a.b]"]


def _rich_routes() -> list[Route]:
    return [
        route("users-v1", hosts=["api.example.com", "*.example.com"], path="/v1/users", headers={"X-Api-Version": "1"}),
        route("api-any", hosts=["api.example.com"], methods=["GET"]),
        route("eu", hosts=["*.eu.example.com"], path="/v1"),
        route("wild", hosts=["*.example.com"], path="/v1/users/{id}", methods=["PUT"]),
        route("user", path="/v1/users/{id}", methods=["GET", "DELETE"]),
        route("user-posts", path="/v1/users/{id}/posts/{pid}"),
        route("tenant-users", path="/{tenant}/users/{id}", methods=["POST"]),
        route("orders", path="/v1/orders", methods=["POST"]),
        route("orders-v2", path="/v1/orders", headers={"X-Api-Version": "2"}),
        route("v1", path="/v1/", methods=["GET"]),
        route("files", path_regex=r"^/files/(?P<name>[^/]+)$", methods=["GET"]),
        route("legacy", path_regex=r"/legacy"),
        route("root-get", path="/", methods=["GET", "OPTIONS"]),
    ]


_ROUTER = Router(_rich_routes())
_REQUESTS = [
    (method, host, path, hdrs)
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH")
    for host in ("api.example.com", "a.eu.example.com", "www.example.com", "example.com", "other.org")
    for path in (
        "/",
        "/v1",
        "/v1/",
        "/v1/users",
        "/v1/usersX",
        "/v1/users/7",
        "/v1/users/7/",
        "/v1/users/7/posts/9",
        "/acme/users/7",
        "/v1/orders",
        "/files/a.txt",
        "/files/a/b",
        "/legacy/x",
        "/nothing",
    )
    for hdrs in ({}, {"x_api_version": "1"}, {"x_api_version": "2"})
]


@pytest.mark.parametrize(("method", "host", "path", "hdrs"), _REQUESTS)
def test_explain_agrees_with_match(method: str, host: str, path: str, hdrs: dict[str, str]) -> None:
    router = _ROUTER
    assert explained(router, method, host, path, headers(**hdrs)) == outcome(
        router, method, host, path, headers(**hdrs)
    )


def test_explain_agrees_with_match_on_random_configs() -> None:
    """Random route sets and requests: the fast tables and the slow walk must never disagree."""
    rng = random.Random(20261128)
    hosts = ["a.example.com", "*.example.com", "*.a.example.com", "example.com", "x.org"]
    paths = [
        "/",
        "/v1",
        "/v1/users",
        "/v1/users/",
        "/v1/users/{id}",
        "/v1/{res}/{id}",
        "/{t}/users/{id}",
        "/v1/users/{id}/posts",
        "/{x}",
        "/{a}/{b}",
    ]
    regexes = [r"^/v1/(?P<res>[a-z]+)$", "/v2", r"^/v1/users/(?P<id>\d+)(/(?P<tail>posts))?$"]
    methods = ["GET", "POST", "DELETE", "HEAD"]
    req_hosts = [".example.com", "a.example.com", "b.example.com", "x.a.example.com", "example.com", "x.org", "y.net"]
    req_paths = ["/", "/v1", "/v1/users", "/v1/users/", "/v1/users/7", "/v1/users/7/posts", "/v1/orders/9"]
    req_paths += ["/v2/x", "/v1/usersX", "/a/users/3", "/x", "//", "/v1//7", "/v1/abc"]
    checked = 0
    for _ in range(150):
        routes = []
        for n in range(rng.randint(1, 12)):
            match: dict[str, Any] = {"hosts": rng.sample(hosts, rng.choice([0, 0, 1, 2]))}
            if rng.random() < 0.2:
                match["path_regex"] = rng.choice(regexes)
            elif rng.random() < 0.9:
                match["path"] = rng.choice(paths)
            match["methods"] = rng.sample(methods, rng.choice([0, 0, 1, 2]))
            if rng.random() < 0.3:
                match["headers"] = {"X-V": rng.choice("12")}
            routes.append(route(f"r{n}", **match))
        router = Router(routes)
        for _ in range(40):
            args = (
                rng.choice([*methods, "PUT"]),
                rng.choice(req_hosts),
                rng.choice(req_paths),
                headers(x_v=rng.choice("12")) if rng.random() < 0.5 else Headers(),
            )
            assert explained(router, *args) == outcome(router, *args), (routes, args)
            checked += 1
    assert checked == 6000


# --- the compiled structure does not scan ----------------------------------------------------


class CountingHeaders(Headers):
    """Every route below has a header condition, so each candidate examined reads one header."""

    __slots__ = ("reads",)

    def __init__(self, items: list[tuple[bytes, bytes]]) -> None:
        super().__init__(items)
        self.reads = 0

    def get_raw(self, key: bytes) -> bytes | None:
        self.reads += 1
        return super().get_raw(key)


def _many_routes(count: int) -> list[Route]:
    routes = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            routes.append(route(f"prefix{i}", path=f"/svc{i}/v1", headers={"X-Env": "prod"}))
        elif kind == 1:
            routes.append(route(f"tpl{i}", path=f"/api/res{i}/{{id}}", methods=["GET"], headers={"X-Env": "prod"}))
        elif kind == 2:
            routes.append(route(f"host{i}", hosts=[f"t{i}.example.com"], headers={"X-Env": "prod"}))
        else:
            routes.append(route(f"wild{i}", hosts=[f"*.z{i}.example.net"], path="/app", headers={"X-Env": "prod"}))
    return routes


@pytest.mark.parametrize("count", [10, 10_000])
def test_matching_examines_a_bounded_number_of_candidates(count: int) -> None:
    router = Router(_many_routes(count))
    last = count - count % 4
    cases = [
        ("GET", "h", f"/svc{last - 4}/v1/x/y", f"prefix{last - 4}"),
        ("GET", "h", f"/api/res{last - 3}/42", f"tpl{last - 3}"),
        ("GET", f"t{last - 2}.example.com", "/anything", f"host{last - 2}"),
        ("GET", f"a.b.z{last - 1}.example.net", "/app/x", f"wild{last - 1}"),
    ]
    for method, host, path, name in cases:
        hdrs = CountingHeaders([(b"x-env", b"prod")])
        assert winner(router, method, host, path, hdrs) == name
        assert hdrs.reads == 1
    for method, host, path, reads in [
        ("GET", "h", "/svc999999/v1", 0),
        ("GET", "h", "/api/res1/2/3", 0),
        ("GET", "nobody.example.com", "/a/b/c/d/e", 0),
        ("DELETE", "h", "/api/res1/42", 1),  # the 405 pass checks the one template route's header
    ]:
        hdrs = CountingHeaders([(b"x-env", b"prod")])
        with pytest.raises(NotFound if method == "GET" else MethodNotAllowed):
            router.match(method, host, path, hdrs)
        assert hdrs.reads == reads


def test_statistics_describe_the_compiled_shape() -> None:
    assert Router([*_many_routes(8), route("r", path_regex="^/x")]).statistics() == {
        "routes": 9,
        "exact_hosts": 2,
        "wildcard_hosts": 2,
        "templates": 2,
        "prefixes": 6,
        "regexes": 1,
    }


def test_exact_path_matches_only_itself_and_outranks_prefixes() -> None:
    router = Router([route("api", path="/health"), route("probe", path_exact="/health")])
    assert winner(router, "GET", "h", "/health") == "probe"
    assert winner(router, "GET", "h", "/health/deep") == "api"
    assert winner(router, "GET", "h", "/health/") == "api"
    row = next(r for r in router.table() if r.name == "probe")
    assert row.path == "exact /health"


def test_exact_path_braces_are_literal() -> None:
    router = Router([route("lit", path_exact="/a/{b}")])
    assert winner(router, "GET", "h", "/a/{b}") == "lit"
    with pytest.raises(NotFound):
        router.match("GET", "h", "/a/x", Headers())
