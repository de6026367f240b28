"""HTTP guard: path normalisation, glob semantics, decisions and bypass attempts."""

from __future__ import annotations

import pytest

from broker.config import Guardrails, Rule
from proxy.httpguard import HttpGuard, Unnormalisable, compile_path_glob, normalise_path

RULES = Guardrails(
    rules=[
        Rule(name="no-ns-delete", action="block", methods=["DELETE"], paths=["/api/v1/namespaces/*"]),
        Rule(name="secrets", action="review", paths=["/api/v1/namespaces/*/secrets/**"]),
        Rule(name="writes", action="review", methods=["POST", "PUT", "PATCH"]),
    ],
)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/", "/"),
        ("/a/b/", "/a/b"),
        ("/a//b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("/a/x/../b", "/a/b"),
        ("/a/%62", "/a/b"),
        ("/a/%2e%2E/b", "/b"),
        ("/a/%20b", "/a/%20b"),
        ("/a/%3a", "/a/%3A"),
        ("/a?x=1#f", "/a"),
    ],
)
def test_normalise_path(target: str, expected: str) -> None:
    assert normalise_path(target) == expected


@pytest.mark.parametrize(
    "target",
    ["a/b", "*", "http://x/a", "/..", "/a/../..", "/a%2Fb", "/a%5cb", "/a\\b", "/a;x=1", "/a%00", "/a%zz",
     "/a%2", "/a%252e%252e", "/a\nb", "/a//../b", "/a/b//..", "/a//./../b", "/a//%2e%2e/b"],
)
def test_unnormalisable(target: str) -> None:
    with pytest.raises(Unnormalisable):
        normalise_path(target)


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/api/*", "/api/x", True),
        ("/api/*", "/api/x/y", False),
        ("/api/**", "/api/x/y", True),
        ("/api/**", "/api", True),
        ("/api/**/pods", "/api/v1/ns/pods", True),
        ("/api/v?/x", "/api/v1/x", True),
        ("/api/v?/x", "/api/v10/x", False),
        ("/API/X/", "/api/x", True),
        ("/a.b", "/aXb", False),
    ],
)
def test_path_globs(pattern: str, path: str, matches: bool) -> None:
    assert (compile_path_glob(pattern).fullmatch(path) is not None) is matches


@pytest.mark.parametrize(
    ("method", "target", "action", "rule"),
    [
        ("GET", "/api/v1/namespaces/prod", "allow", None),
        ("DELETE", "/api/v1/namespaces/prod", "block", "no-ns-delete"),
        ("delete", "/api/v1/namespaces/prod", "block", "no-ns-delete"),
        ("DELETE", "/api/v1/namespaces/prod/pods/x", "allow", None),
        ("GET", "/api/v1/namespaces/prod/secrets/db", "review", "secrets"),
        ("POST", "/api/v1/namespaces/prod/pods", "review", "writes"),
        ("GET", "/api/v1/namespaces/prod%2Fsecrets", "block", "on_unparsed"),
    ],
)
def test_decisions(method: str, target: str, action: str, rule: str | None) -> None:
    d = HttpGuard(RULES).check(method, target)
    assert (d.action, d.rule) == (action, rule), d.reason


# every spelling of DELETE /api/v1/namespaces/prod must still be refused
BYPASSES = [
    "/api/v1/namespaces/../namespaces/prod",
    "/api//v1/namespaces/prod",
    "/api/v1/namespaces/prod/",
    "/api/v1/./namespaces/prod",
    "/api/v1/namespaces/%70rod",
    "/api/v1/x/%2e%2e/namespaces/prod",
    "/api/v1/x/%2E%2E/namespaces/prod",
    "/API/V1/NAMESPACES/prod",
    "/api/v1/namespaces/prod?dryRun=All",
    "/api/v1/namespaces/prod#x",
    "/api/v1/namespaces/prod;x",
    "/api/v1/namespaces%2fprod",
    "/api/v1/namespaces\\prod",
    "/api/v1/namespaces/%252e%252e/prod",
    "/api/v1/namespaces//../prod",  # RFC 3986 / WHATWG: /api/v1/namespaces/prod
    "/api/v1/namespaces/prod//..",
    "/api/v1/namespaces/x//%2e%2e/prod",
]


@pytest.mark.parametrize("target", BYPASSES)
def test_bypass_attempts(target: str) -> None:
    assert HttpGuard(RULES).check("DELETE", target).action == "block"


def test_non_http_rules_never_match_and_default_applies() -> None:
    g = HttpGuard(Guardrails(rules=[Rule(name="sql", action="allow", statements=["select"])], default="review"))
    d = g.check("GET", "/")
    assert (d.action, d.rule) == ("review", None)
    assert d.reason == "default holds for review GET /"
