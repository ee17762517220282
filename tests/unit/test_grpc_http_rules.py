"""grpc_json's path templates (google.api.http), compiled without a descriptor set."""

from __future__ import annotations

import pytest

from bastion.plugins.grpc_http_rules import RuleError, compile_template


def match(template: str, path: str) -> dict[str, str] | None:
    compiled = compile_template(template)
    found = compiled.regex.fullmatch(path)
    if found is None:
        return None
    return dict(zip(compiled.variables, found.groups(), strict=True))


def test_variables_and_wildcards() -> None:
    assert match("/v1/shelves/{shelf}/books/{book_id}", "/v1/shelves/a/books/7") == {"shelf": "a", "book_id": "7"}
    assert match("/v1/shelves/{shelf}/books/{book_id}", "/v1/shelves/a/b/books/7") is None
    assert match("/v1/{name=shelves/*}/books", "/v1/shelves/fiction/books") == {"name": "shelves/fiction"}
    assert match("/v1/{name=shelves/*}/books", "/v1/racks/fiction/books") is None
    assert match("/v1/{name=files/**}", "/v1/files/a/b/c.txt") == {"name": "files/a/b/c.txt"}
    assert match("/v1/*/items", "/v1/x/items") == {}
    assert match("/v1/{a.b}", "/v1/q") == {"a.b": "q"}


def test_custom_verbs() -> None:
    assert match("/v1/shelves/{shelf}:clear", "/v1/shelves/s1:clear") == {"shelf": "s1"}
    assert match("/v1/shelves/{shelf}:clear", "/v1/shelves/s1") is None
    assert match("/v1/shelves:batchGet", "/v1/shelves:batchGet") == {}


def test_literals_rank_before_variables() -> None:
    literal = compile_template("/v1/shelves/special")
    variable = compile_template("/v1/shelves/{id}")
    many = compile_template("/v1/{rest=**}")
    assert sorted([many.ranks, variable.ranks, literal.ranks]) == [literal.ranks, variable.ranks, many.ranks]


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("v1/x", "does not start with /"),
        ("/v1/{name", "unclosed"),
        ("/v1/{a={b}}", "nested"),
        ("/v1//x", "empty segment"),
        ("/v1/{1bad}", "bad variable name"),
        ("/v1/{a}/{a}", "bound twice"),
        ("/v1/**/x", r"\*\* must be the last"),
        ("/v1/a b", "bad segment"),
        ("/v1/x}", "unbalanced"),
    ],
)
def test_bad_templates(template: str, problem: str) -> None:
    with pytest.raises(RuleError, match=problem):
        compile_template(template)
