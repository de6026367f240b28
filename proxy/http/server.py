"""The HTTP proxy: ``/<resource>/<path>`` to the resource's base URL, with the credential swap.

How this works. Each request passes, in order: the method (``TRACE``, ``TRACK`` and ``CONNECT`` are
405: an upstream answering ``TRACE`` echoes the held credential), routing (an unknown resource is
404), the target (a path the upstreams resolve differently,
:func:`proxy.http.headers.ambiguous_path`, is 400: refused rather than guessed, so what the guard
judges is what the upstream serves), a header that would make the upstream act as another user,
method or URL (Kubernetes ``Impersonate-*``, ``X-HTTP-Method-Override``, ``X-Original-URL``: 403), a
WebSocket upgrade that is not a ``GET`` (405: the upstream handshake is always a ``GET``), the gate
(``Authorization: Bearer <grant secret>``; missing or bad is 401, expired, revoked or another
resource's grant is 403, each with a JSON ``{"error", "reason"}`` that never echoes the secret), the
guard (:class:`proxy.httpguard.HttpGuard` on method and path: ``block`` is a 403 JSON naming the
rule, ``review`` holds the request until an approver decides in the thread), then the relay (refused
when the grant ended while its session opened). The relay strips the client's credential, the
hop-by-hop headers and the client's identity and forwarding claims, adds the held upstream
credential and hoop's own ``X-Forwarded-For``/``-Proto``/``-Host``, and streams both bodies chunk by
chunk (constant memory; backpressure both ways: :mod:`proxy.http.front`'s flow control towards the
client, :mod:`proxy.http.pool`'s towards the upstream). A WebSocket upgrade is relayed by
:mod:`proxy.http.websocket`.

Servers. Plain requests arrive on hoop's own HTTP/1.1 server (:mod:`proxy.http.front`,
``asyncio.Protocol`` + ``httptools``); a connection that asks for an upgrade is handed to
aiohttp's server protocol, which carries WebSockets. The handler works on either through
:class:`proxy.http.call.Call`.

Masking and framing of the answer are :mod:`proxy.http.respond`'s (JSON and text bodies masked
by type, a small body of known length in one write, others streamed).

Sessions are shared per grant, resource and client address (:mod:`proxy.http.live`), so a burst of
requests costs one session row; each request is recorded as an ``"http"`` event with masked, capped
bodies (the path as the detectors read it percent-decoded). Upstream requests go through
:class:`proxy.http.pool.UpstreamPool` (keep-alive connections on ``asyncio.Protocol``, ``httptools``
parsing): it keeps no cookies (cookies of one client must never reach another) and never follows
redirects. WebSocket upgrades still use an ``aiohttp.ClientSession`` (no cookie jar either), whose
redirects are refused (:func:`proxy.http.websocket.no_redirects`). The held credential is searched
for in every answer (:class:`proxy.http.body.Secrets`) and never reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from yarl import URL

from broker.clock import Clock
from broker.config import HoopConfig, HttpResource
from broker.credentials import digest
from broker.errors import ConfigError, Denied
from broker.model import Grant
from proxy.guard import Decision
from proxy.http.body import Capture, Secrets
from proxy.http.call import AioCall, Call
from proxy.http.front import Front, aio_upgrade_server
from proxy.http.headers import (
    ambiguous_path,
    bearer_secret,
    credential_forms,
    is_websocket_upgrade,
    refused_header,
    split_target,
    upstream_headers,
)
from proxy.http.live import Hub, SessionPool
from proxy.http.pool import Fields, Origin, Response, UpstreamFailed, UpstreamPool, upstream_tls
from proxy.http.respond import recorded, respond, shown_target
from proxy.http.websocket import WsPair, cut, no_redirects, relay
from proxy.httpguard import HttpGuard
from proxy.mask import Masker

log = logging.getLogger(__name__)
#: what ``hoop serve`` (and ``hoop check``) says when the proxy serves plain http
PLAIN_HTTP = ("the HTTP proxy serves plain http, so bearer credentials cross the network in clear; set "
              "tls.http_proxy: true or put a TLS terminator in front of it")

__all__ = ["BearerGate", "HttpProxy"]

_MEMO = 16  # what is derived from repeated request heads, kept per client connection
_VERDICTS = 4096  # (method, path) guard decisions kept per resource
#: TRACE/TRACK echo the request, held credential included; CONNECT would make hoop a tunnel
_REFUSED_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})


class BearerGate(Protocol):
    """What the HTTP proxy uses of :class:`proxy.access.Gate`."""

    async def authenticate_bearer(self, secret: str, resource: str, *, key: str | None = None) -> Grant: ...


@dataclass
class _Upstream:
    resource: HttpResource
    base: str
    environ: Mapping[str, str]
    guard: HttpGuard
    masker: Masker
    origin: Origin | None  # None: the address is not an http(s) URL (each request is then a 502)

    def __post_init__(self) -> None:
        self._verdicts: dict[tuple[str, str], tuple[Decision, str]] = {}

    def verdict(self, method: str, rest: str) -> tuple[Decision, str]:
        """The guard's decision and the masked path to show, for ``method`` on ``rest``. Both are pure
        functions of the request line, so they are kept (a bounded cache: a burst of requests repeats
        the same few paths, and the guard plus masking the path cost more than the rest of routing)."""
        key = (method, rest)
        hit = self._verdicts.get(key)
        if hit is None:
            hit = (self.guard.check(method, rest), shown_target(self.masker, rest))
            if len(self._verdicts) >= _VERDICTS:
                self._verdicts.clear()
            self._verdicts[key] = hit
        return hit

    @functools.cached_property
    def credential(self) -> str | None:
        """The held upstream secret, resolved on first use (a failure is retried on the next request)."""
        res = self.resource
        return res.credential.resolve(self.environ) if res.credential is not None and res.auth != "none" else None

    @functools.cached_property
    def secrets(self) -> Secrets | None:
        """The held credential in each form it is sent in (after :attr:`credential` resolved)."""
        forms = credential_forms(self.resource, self.credential)
        return Secrets(forms) if forms else None


def _fields(call: Call, up: _Upstream, client_ip: str, credential: str | None, proto: str) -> Fields:
    """The upstream request's header fields (the credential swap, hop-by-hop headers out, forwarding
    headers in), rendered once per distinct client header block on a connection: a keep-alive client
    repeats the same headers, and building them was the largest part of the proxy's own work."""
    memo, raw = call.memo, call.raw_headers
    key = (up.resource.name, raw)
    fields: Fields | None = memo.get(key) if memo is not None and raw is not None else None
    if fields is None:
        fields = Fields(upstream_headers(call.headers, up.resource, credential, client_ip,
                                         identity_encoding=up.masker.enabled, proto=proto))
        if memo is not None and raw is not None:
            if len(memo) >= _MEMO:
                memo.clear()
            memo[key] = fields
    return fields


_Head = tuple[tuple[str, str] | None, str | None, str | None, str | None, str | None]


def _head(call: Call) -> _Head:
    """The route, why its path is ambiguous (None: it is not), the bearer secret and its digest (the gate's
    key), and a header the proxy refuses (:func:`refused_header`) of a request: pure functions of the target
    and the header block, so kept per connection, where a client repeats both."""
    memo, raw = call.memo, call.raw_headers
    memo_key = ("head", call.raw_path, raw) if memo is not None and raw is not None else None
    hit: _Head | None = memo.get(memo_key) if memo is not None and memo_key is not None else None
    if hit is None:
        secret = bearer_secret(call.headers.get("Authorization"))
        route = split_target(call.raw_path)
        hit = (route, ambiguous_path(route[1]) if route is not None else None, secret,
               digest(secret) if secret is not None else None, refused_header(call.headers))
        if memo is not None and memo_key is not None:
            if len(memo) >= _MEMO:
                memo.clear()
            memo[memo_key] = hit
    return hit


def _origin(res: HttpResource, base: str) -> Origin | None:
    """Where ``res`` sends its requests; for https with ``tls`` set, its own TLS context (built now, so a
    missing or bad file stops hoop at start with a :class:`ConfigError`, not at the first request)."""
    tls, server_name = None, None
    if res.tls is not None:
        t = res.tls
        tls, server_name = upstream_tls(res.name, t.ca, t.client_cert, t.client_key), t.server_name
    try:
        return Origin.parse(base, tls=tls, server_name=server_name)
    except ValueError:
        return None


class _Flight:
    """One request in flight: what :meth:`abort` must cut when the grant ends."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.upstream: Response | None = None
        self.ws: WsPair | None = None
        self.cut: asyncio.Event | None = None  # made by a review, the one wait that must end with the grant
        self.reason: str | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.sent = False  # the request went to the upstream: its body may still be coming, its answer not yet

    def abort(self, reason: str) -> None:
        self.reason = reason
        if self.cut is not None:
            self.cut.set()
        if self.ws is not None:
            self.tasks.extend(cut(self.ws, reason))
            return
        if self.upstream is not None:
            self.upstream.close()
            self.call.cut()  # mid-body: cutting the connection is the only way to say "incomplete"
        elif self.sent:
            # an upload in progress, or a request awaiting its answer: the body stopped at the client's next
            # chunk, which a client that stops sending never sends, and the connection stayed open for ever
            self.call.cut()


class HttpProxy:
    """The HTTP proxy server. ``start`` binds and returns the port; ``stop`` closes everything."""

    def __init__(self, config: HoopConfig, gate: BearerGate, hub: Hub, clock: Clock, environ: Mapping[str, str],
                 *, idle: float = 30.0, connections: int = 512, hash_key: bytes | None = None,
                 keepalive: float = 75.0, tls: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.gate = gate
        self.clock = clock
        self.pool = SessionPool(hub, clock, idle=idle)
        key = hash_key or (config.masking_key.resolve(environ).encode() if config.masking_key
                           else secrets.token_bytes(32))
        self._upstreams: dict[str, _Upstream] = {}
        for res in config.resources:
            if isinstance(res, HttpResource):
                base = res.address.rstrip("/")
                self._upstreams[res.name] = _Upstream(res, base, environ, HttpGuard(res.guardrails),
                                                      Masker(res.masking, key), _origin(res, base))
        self._connections = connections
        self._client: aiohttp.ClientSession | None = None  # WebSocket upgrades only
        self._pool: UpstreamPool | None = None
        self._keepalive = keepalive  # seconds an idle client connection is kept
        self._tls = tls  # https on the proxy's own port
        self._proto = "https" if tls is not None else "http"  # X-Forwarded-Proto
        self._server: asyncio.Server | None = None
        self._aio: web.Server | None = None  # takes the connections that upgrade (WebSocket)
        self._fronts: set[Front] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); return the bound port."""
        self._pool = UpstreamPool(limit=self._connections)
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._connections, ttl_dns_cache=60),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), trace_configs=[no_redirects()])
        self._aio = aio_upgrade_server(self._handle_aio)
        loop = asyncio.get_running_loop()
        aio = self._aio
        self._server = await loop.create_server(
            lambda: Front(self._serve, aio, keepalive=self._keepalive, calls=self._fronts), host, port,
            reuse_address=True, backlog=1024, ssl=self._tls)
        bound = self._server.sockets[0].getsockname()[1]
        log.info("http proxy listening on %s:%s (%s)", host, bound, "https" if self._tls else "http")
        return int(bound)

    async def stop(self) -> None:
        """Cut every stream, close the sessions, the listener, the connections and the upstream pool."""
        await self.pool.close_all("proxy stopped")
        if self._server is not None:
            self._server.close()
            for front in list(self._fronts):
                front.close()
            await self._server.wait_closed()
            self._server = None
        if self._aio is not None:
            await self._aio.shutdown(1.0)
            self._aio = None
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # -- one request ------------------------------------------------------------------------

    async def _handle_aio(self, request: web.BaseRequest) -> web.StreamResponse:
        """A connection :class:`Front` handed to aiohttp (a WebSocket upgrade)."""
        call = AioCall(request)
        await self._serve(call)
        assert call.response is not None
        return call.response

    async def _serve(self, call: Call) -> None:
        method = call.method
        if method in _REFUSED_METHODS:
            return await call.refuse(405, "method_not_allowed", f"the proxy does not relay {method}")
        route, ambiguous, secret, key, refused = _head(call)
        up = self._upstreams.get(route[0]) if route else None
        if route is None or up is None:
            known = ", ".join(sorted(self._upstreams)) or "none"
            return await call.refuse(404, "unknown_resource", f"use /<resource>/<path>; HTTP resources here: {known}")
        name, rest = route
        if ambiguous is not None:
            return await call.refuse(400, "ambiguous_path", f"{ambiguous}: upstreams resolve it differently, so "
                                     "the proxy does not guess; send the path as the upstream should see it")
        if refused is not None:
            return await call.refuse(403, "header_refused", f"the proxy does not relay {refused}: it would make the "
                                     "upstream act as another user, method or URL than the guard judged")
        if method != "GET" and isinstance(call, AioCall) and is_websocket_upgrade(call.headers):
            return await call.refuse(405, "method_not_allowed", "a WebSocket upgrade must be a GET")
        if secret is None:
            return await call.refuse(401, "unauthenticated",
                                     "present your hoop credential as 'Authorization: Bearer <secret>'")
        try:
            grant = await self.gate.authenticate_bearer(secret, name, key=key)
        except Denied as exc:
            return await call.refuse(401 if exc.code == "bad_credentials" else 403, exc.code, exc.message)
        ended = self.pool.ended(grant)
        if ended is not None:
            return await call.refuse(403, "expired" if "expired" in ended else "revoked", ended)
        decision, shown_path = up.verdict(method, rest)
        flight = _Flight(call)  # (also the session pool's Stream: abort() cuts it)
        client_ip = call.remote or "unknown"
        entry = await self.pool.acquire(grant, name, client_ip, flight)
        session = entry.session
        record: dict[str, Any] = {"method": method, "path": shown_path, "status": 0, "req_bytes": 0,
                                  "resp_bytes": 0, "req_body": None, "resp_body": None,
                                  "decision": decision.action, "rule": decision.rule}
        stats = session.stats
        try:
            if entry.ended is not None or not self.pool.check_deadline(entry):  # (ended while it opened)
                why = entry.ended or "access expired"
                return await call.refuse(403, "expired" if "expired" in why else "revoked", why)
            stats["statements"] = stats.get("statements", 0) + 1
            if decision.blocked:
                stats["blocked"] = stats.get("blocked", 0) + 1
                record["status"] = 403
                return await call.refuse(403, "blocked", decision.reason, rule=decision.rule)
            if decision.needs_review:
                allowed = await self._review(flight, session, f"{method} {shown_path}", decision.rule or "review", up)
                if not allowed:
                    record["status"], record["decision"] = 403, "refused"
                    return await call.refuse(403, "refused", flight.reason or
                                             f"{method} {shown_path} was not approved (rule {decision.rule})",
                                             rule=decision.rule)
            try:
                credential = up.credential
            except ConfigError as exc:
                record["status"] = 502
                return await call.refuse(502, "upstream_credential", f"{up.resource.name}: {exc.message}")
            if isinstance(call, AioCall) and is_websocket_upgrade(call.headers):  # (Front hands upgrades to aiohttp)
                return await self._websocket(call, up, rest, flight, record, client_ip, credential)
            return await self._forward(call, up, rest, flight, record, client_ip, credential)
        finally:
            stats["bytes_in"] = stats.get("bytes_in", 0) + record["req_bytes"]
            stats["bytes_out"] = stats.get("bytes_out", 0) + record["resp_bytes"]
            if flight.reason is not None:
                record["cut"] = flight.reason
            session.record("http", record)
            self.pool.release(entry, flight)
            for task in flight.tasks:
                with contextlib.suppress(Exception):
                    await task

    async def _review(self, flight: _Flight, session: Any, text: str, rule: str, up: _Upstream) -> bool:
        """Hold the request for an approver; the grant ending during the wait refuses it."""
        timeout = up.resource.guardrails.review_timeout.total_seconds()
        review = asyncio.ensure_future(session.review(text, rule, timeout))
        flight.cut = asyncio.Event()
        if flight.reason is not None:
            flight.cut.set()
        ended = asyncio.ensure_future(flight.cut.wait())
        try:
            await asyncio.wait({review, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (review, ended):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        return review.done() and not review.cancelled() and bool(review.result()) and flight.reason is None

    @staticmethod
    def _url(up: _Upstream, rest: str) -> URL:
        return URL(up.base + rest, encoded=True)

    async def _websocket(self, call: AioCall, up: _Upstream, rest: str, flight: _Flight,
                         record: dict[str, Any], client_ip: str, credential: str | None) -> None:
        assert self._client is not None
        headers = upstream_headers(call.headers, up.resource, credential, client_ip,
                                   identity_encoding=False, websocket=True, proto=self._proto)
        flight.ws = WsPair()
        try:
            origin = up.origin
            result = await relay(call.request, self._client, self._url(up, rest), headers, up.masker, flight.ws,
                                 flight, secrets=up.secrets, tls=origin.tls if origin is not None else None,
                                 server_name=origin.server_name if origin is not None else None)
        except (aiohttp.ClientError, OSError) as exc:
            record["status"] = 502
            log.warning("http resource=%s websocket upstream failed: %s", up.resource.name, exc)
            return await call.refuse(502, "upstream_error", f"cannot reach the upstream of {up.resource.name} "
                                                            f"({type(exc).__name__}; hoop's log has the cause)")
        record.update(status=result.status, req_bytes=result.up_bytes, resp_bytes=result.down_bytes,
                      websocket={"messages": result.messages, "close_code": result.close_code})
        call.response = result.response

    async def _forward(self, call: Call, up: _Upstream, rest: str, flight: _Flight,
                       record: dict[str, Any], client_ip: str, credential: str | None) -> None:
        assert self._pool is not None
        masker = up.masker
        req_cap = Capture(up.resource.max_body_record) if call.body_exists else None

        async def body(cap: Capture) -> AsyncIterator[bytes]:
            async for chunk in call.body():
                if flight.reason is not None:
                    raise UpstreamFailed(flight.reason)  # stop forwarding an upload at once
                cap.feed(chunk)
                yield chunk

        data = body(req_cap) if req_cap is not None else None
        if up.origin is None:
            record["status"] = 502
            return await call.refuse(502, "upstream_error", f"the address of {up.resource.name} is not an http(s) URL")
        flight.sent = True
        try:
            resp = await self._pool.request(up.origin, call.method, rest,
                                            _fields(call, up, client_ip, credential, self._proto), data)
        except (UpstreamFailed, OSError) as exc:
            record["status"] = 502
            if flight.reason is not None:
                return await call.refuse(403, "revoked", flight.reason)
            log.warning("http resource=%s upstream failed: %s", up.resource.name, exc)
            return await call.refuse(502, "upstream_error", f"cannot reach the upstream of {up.resource.name} "
                                                            f"({type(exc).__name__}; hoop's log has the cause)")
        finally:
            if req_cap is not None and req_cap.size:
                record["req_bytes"] = req_cap.size
                record["req_body"] = recorded(masker, call.headers.get("Content-Type"), req_cap, masked=False)
        flight.upstream = resp
        if flight.reason is not None:  # the grant ended while the upstream was answering
            resp.close()
            record["status"] = 403
            return await call.refuse(403, "revoked", flight.reason)
        try:
            await respond(call, up.masker, up.resource, resp, flight, record, up.secrets)
        finally:
            resp.release()
