"""Pure helpers of the HTTP proxy: routing, the credential swap and header filtering (no I/O).

How this works. A request target ``/<resource>/<rest>`` is split into the resource name and the
rest, which is forwarded verbatim (query included) after the resource's base URL. The client's own
``Authorization`` carries the grant secret; it never goes upstream. In its place
:func:`upstream_auth` builds the held credential's header. Hop-by-hop headers (the fixed RFC 9110
list plus every name listed in ``Connection``) are dropped both ways. Headers that claim who the
client is or where it came from (``Forwarded``, ``X-Forwarded-*``, ``X-Real-IP``, ``X-Remote-User``,
...) are dropped too: upstreams trust them for identity and logs, and a client must not choose them;
hoop sets its own ``X-Forwarded-For``, ``-Proto`` and ``-Host``. :func:`refused_header` names a
header that would change what the upstream does past what the guard judged (Kubernetes
``Impersonate-*``, method and URL overrides): the proxy refuses such a request rather than drop the
header, since dropping it would run the request as another identity or method than the client asked
for. Because the rest is forwarded verbatim, :func:`ambiguous_path` names the spellings that
upstreams resolve differently (dot segments, encoded ``/ . \\``), which the proxy refuses rather
than guess what the upstream will serve.
"""

from __future__ import annotations

import base64

from multidict import CIMultiDict, CIMultiDictProxy

from broker.config import HttpResource
from proxy.http.body import Secrets

__all__ = [
    "HOP_BY_HOP",
    "ambiguous_path",
    "bearer_secret",
    "credential_forms",
    "is_websocket_upgrade",
    "readable_encodings",
    "refused_header",
    "response_headers",
    "split_target",
    "upstream_auth",
    "upstream_headers",
]

#: Headers that describe one connection, never forwarded (RFC 9110 7.6.1, plus legacy names).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade",
})
#: Headers the proxy sets itself on the upstream request.
_REQUEST_OWN = frozenset({"authorization", "host", "accept-encoding", "content-length", "expect"})
#: Headers the WebSocket client handshake generates itself.
_WS_OWN = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                     "sec-websocket-protocol", "sec-websocket-accept"})
#: Headers that claim the client's identity or origin (its own say-so): never forwarded. Upstreams and
#: the authenticating proxies in front of them trust these (Kubernetes' front proxy ``X-Remote-*``,
#: oauth2-proxy ``X-Auth-Request-*``/``X-Forwarded-User``, Grafana ``X-WEBAUTH-USER``, client address
#: headers of load balancers and CDNs).
_CLAIMS = frozenset({"forwarded", "x-real-ip", "x-client-ip", "true-client-ip", "cf-connecting-ip",
                     "x-cluster-client-ip", "fastly-client-ip", "remote-user", "x-remote-user", "x-remote-group",
                     "x-webauth-user", "x-user", "x-email"})
_CLAIM_PREFIXES = ("x-forwarded-", "x-remote-extra-", "x-auth-request-")
#: Headers that make the upstream act as another user, another method or on another URL than the one
#: the guard judged: the request is refused (:func:`refused_header`).
_OVERRIDES = frozenset({"x-http-method-override", "x-http-method", "x-method-override", "x-original-url",
                        "x-rewrite-url", "x-original-method"})
_OVERRIDE_PREFIXES = ("impersonate-",)
_REQUEST_SKIP = HOP_BY_HOP | _REQUEST_OWN | _CLAIMS
_WS_SKIP = _REQUEST_SKIP | _WS_OWN
_RESPONSE_SKIP = {(changes, decoded): HOP_BY_HOP | ({"content-length"} if changes else set())
                  | ({"content-encoding"} if decoded else set())
                  for changes in (False, True) for decoded in (False, True)}


def split_target(raw_path: str) -> tuple[str, str] | None:
    """``/prod-api/api/v1/pods?x=1`` -> ``("prod-api", "/api/v1/pods?x=1")``; None without a resource."""
    if not raw_path.startswith("/"):
        return None
    body = raw_path[1:]
    cut = len(body)
    for sep in "/?#":
        pos = body.find(sep)
        if pos != -1:
            cut = min(cut, pos)
    name, rest = body[:cut], body[cut:]
    if not name:
        return None
    if not rest.startswith("/"):
        rest = "/" + rest
    return name, rest


_AMBIGUOUS_ESCAPES = (("%2f", "/"), ("%2e", "."), ("%5c", "\\"))


def ambiguous_path(rest: str) -> str | None:
    """Why the path of a forwarded target means different things to different servers, or None.

    A ``.`` or ``..`` segment (``/a//../b`` is ``/b`` where slashes merge and ``/a/b`` under RFC 3986
    and WHATWG), a percent-encoded ``/``, ``.`` or ``\\`` (decoded by some servers, not by others) and a
    raw ``\\`` (a separator to WHATWG): the guard would judge one resource and the upstream serve another.
    """
    end = len(rest)
    for sep in "?#":
        pos = rest.find(sep, 0, end)
        if pos != -1:
            end = pos
    path = rest[:end]
    if "%" in path:
        low = path.lower()
        for escape, char in _AMBIGUOUS_ESCAPES:
            if escape in low:
                return f"a percent-encoded {char!r} ({escape.upper()}) in the path"
    if "\\" in path:
        return "a backslash in the path"
    if "." in path and any(seg in (".", "..") for seg in path.split("/")):
        return "a '.' or '..' segment in the path"
    return None


def bearer_secret(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>``; None when absent or another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def upstream_auth(resource: HttpResource, credential: str | None) -> tuple[str, str] | None:
    """The header carrying the held upstream credential, or None for ``auth: none``."""
    if resource.auth == "none" or credential is None:
        return None
    if resource.auth == "bearer":
        return "Authorization", f"Bearer {credential}"
    if resource.auth == "basic":
        raw = f"{resource.username or ''}:{credential}".encode()
        return "Authorization", "Basic " + base64.b64encode(raw).decode("ascii")
    assert resource.header is not None  # the config validator guarantees it
    return resource.header, credential


def credential_forms(resource: HttpResource, credential: str | None) -> tuple[str, ...]:
    """Every form in which :func:`upstream_auth` sends the held credential (for ``basic`` also
    ``user:password`` and its base64), so the answer can be searched for each."""
    auth = upstream_auth(resource, credential)
    if auth is None or credential is None:
        return ()
    if resource.auth == "basic":
        return credential, f"{resource.username or ''}:{credential}", auth[1].removeprefix("Basic ")
    return (credential,)


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return frozenset(tokens)


def _filtered(headers: CIMultiDictProxy[str] | CIMultiDict[str], skip: frozenset[str],
              prefixes: tuple[str, ...] = ()) -> CIMultiDict[str]:
    """``headers`` without the names in ``skip`` (lower case), those starting with one of ``prefixes``
    and those listed in ``Connection``."""
    if "Connection" in headers:
        skip = skip | _connection_tokens(headers)
    return CIMultiDict([(name, value) for name, value in headers.items()
                        if (low := name.lower()) not in skip and not low.startswith(prefixes)])


def refused_header(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> str | None:
    """The first request header that would make the upstream act as another user (Kubernetes
    ``Impersonate-*``), with another method or on another URL than the guard judged; None when none."""
    for name in headers:
        low = name.lower()
        if low in _OVERRIDES or low.startswith(_OVERRIDE_PREFIXES):
            return name
    return None


#: the content codings hoop decodes (proxy.http.body.Inflate)
_READABLE_CODINGS = frozenset({"gzip", "x-gzip", "deflate", "identity"})


def readable_encodings(accept_encoding: str) -> str:
    """A client's ``Accept-Encoding`` with only the codings hoop can decode (``br``, ``zstd`` and ``*`` out;
    ``identity`` when none is left), so an answer that passes through compressed can still be searched
    for the held credential."""
    kept = [item.strip() for item in accept_encoding.split(",")
            if item.split(";", 1)[0].strip().lower() in _READABLE_CODINGS]
    return ", ".join(kept) if kept else "identity"


def upstream_headers(incoming: CIMultiDictProxy[str] | CIMultiDict[str], resource: HttpResource, credential: str | None,
                     client_ip: str, *, identity_encoding: bool, websocket: bool = False,
                     proto: str = "http") -> CIMultiDict[str]:
    """Headers for the upstream request: hop-by-hop, identity claims and the client's credential out,
    ours in (``proto``: the scheme the client spoke to hoop, for ``X-Forwarded-Proto``).

    The client's ``Content-Length`` is kept (the body is forwarded unchanged) so the upstream
    sees the same framing. With ``identity_encoding`` the upstream is asked for an
    uncompressed body (``Accept-Encoding: identity``) so masking sees plain text; otherwise
    the client's ``Accept-Encoding`` passes through, keeping only the codings hoop can decode when it
    holds a credential (:func:`readable_encodings`: the answer is searched for it).
    """
    out = _filtered(incoming, _WS_SKIP if websocket else _REQUEST_SKIP, _CLAIM_PREFIXES)
    if not websocket:
        length = incoming.get("Content-Length")
        if length is not None and "chunked" not in incoming.get("Transfer-Encoding", "").lower():
            out["Content-Length"] = length
        if identity_encoding:
            out["Accept-Encoding"] = "identity"
        elif "Accept-Encoding" in incoming:
            offered = incoming["Accept-Encoding"]
            out["Accept-Encoding"] = readable_encodings(offered) if credential is not None else offered
    auth = upstream_auth(resource, credential)
    if auth is not None:
        out.popall(auth[0], None)
        out[auth[0]] = auth[1]
    out["X-Forwarded-For"] = client_ip  # (the client's own list is its say-so: not kept)
    out["X-Forwarded-Proto"] = proto
    if "Host" in incoming:
        out["X-Forwarded-Host"] = incoming["Host"]
    return out


def response_headers(upstream: CIMultiDictProxy[str] | CIMultiDict[str], *, body_changes: bool,
                     decoded: bool, secrets: Secrets | None = None) -> CIMultiDict[str]:
    """Headers for the client: hop-by-hop out; ``Content-Length`` out when the body may change
    (the response is then chunked); ``Content-Encoding`` out when the proxy decoded the body; each
    of ``secrets`` (the held credential) replaced by ``[credential]`` wherever an upstream echoed it."""
    out = _filtered(upstream, _RESPONSE_SKIP[body_changes, decoded])
    if secrets is not None and any(secrets.scrub_text(v) is not v for v in out.values()):
        out = CIMultiDict([(name, secrets.scrub_text(value)) for name, value in out.items()])
    return out


def is_websocket_upgrade(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> bool:
    """True for a WebSocket opening handshake (``Connection: upgrade`` + ``Upgrade: websocket``)."""
    return "upgrade" in _connection_tokens(headers) and headers.get("Upgrade", "").strip().lower() == "websocket"
