"""The pure helpers: routing, bearer parsing, the credential swap and hop-by-hop filtering."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from broker.config import HttpResource
from proxy.http.body import body_kind
from proxy.http.headers import bearer_secret, is_websocket_upgrade, response_headers, split_target, upstream_headers


@pytest.mark.parametrize(("raw", "expected"), [
    ("/k8s/api/v1/pods?watch=1", ("k8s", "/api/v1/pods?watch=1")),
    ("/k8s", ("k8s", "/")),
    ("/k8s?x=1", ("k8s", "/?x=1")),
    ("/k8s/", ("k8s", "/")),
    ("/k8s/../other/x", ("k8s", "/../other/x")),  # the guard sees the '..' (unparsed: blocked)
    ("/", None),
    ("//x", None),
    ("*", None),
])
def test_split_target(raw: str, expected: tuple[str, str] | None) -> None:
    assert split_target(raw) == expected


@pytest.mark.parametrize(("header", "expected"), [
    ("Bearer hoop_abc", "hoop_abc"), ("bearer  hoop_abc ", "hoop_abc"), ("Basic eDp5", None), ("Bearer", None),
    ("Bearer a b", None), (None, None), ("", None),
])
def test_bearer_secret(header: str | None, expected: str | None) -> None:
    assert bearer_secret(header) == expected


def _h(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_upstream_headers_swap_and_filter() -> None:
    res = HttpResource(name="api", kind="http", address="http://up", auth="header", header="X-Key",
                       credential={"env": "T"})  # type: ignore[arg-type]
    out = upstream_headers(_h(("Authorization", "Bearer hoop_secret"), ("Connection", "close, X-Private"),
                              ("X-Private", "1"), ("Keep-Alive", "5"), ("TE", "trailers"), ("X-Key", "client-forged"),
                              ("Accept-Encoding", "gzip"), ("Content-Length", "3"), ("Host", "proxy:18080"),
                              ("Cookie", "a=b")), res, "held", "10.0.0.7", identity_encoding=True)
    assert dict(out) == {"X-Key": "held", "Cookie": "a=b", "Content-Length": "3", "Accept-Encoding": "identity",
                         "X-Forwarded-For": "10.0.0.7", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "proxy:18080"}


def test_response_headers_and_upgrade() -> None:
    up = _h(("Content-Length", "10"), ("Content-Encoding", "gzip"), ("Transfer-Encoding", "chunked"),
            ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"))
    assert list(response_headers(up, body_changes=True, decoded=True).items()) == [("Set-Cookie", "a=1"),
                                                                                  ("Set-Cookie", "b=2")]
    assert "Content-Length" in response_headers(up, body_changes=False, decoded=False)
    assert is_websocket_upgrade(_h(("Connection", "keep-alive, Upgrade"), ("Upgrade", "WebSocket")))
    assert not is_websocket_upgrade(_h(("Upgrade", "websocket")))


@pytest.mark.parametrize(("ctype", "kind"), [
    ("application/json; charset=utf-8", "json"), ("application/merge-patch+json", "json"), ("text/plain", "text"),
    ("application/xml", "text"), ("application/octet-stream", None), ("application/vnd.kubernetes.protobuf", None),
    (None, None),
])
def test_body_kind(ctype: str | None, kind: str | None) -> None:
    assert body_kind(ctype) == kind
