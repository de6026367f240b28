"""The HTTP proxy's upstream side: a pool of keep-alive HTTP/1.1 connections on ``asyncio.Protocol``.

How this works. :class:`UpstreamPool` keeps idle connections per origin (scheme, host, port, and for
https how the upstream is checked: :class:`~proxy.http.origin.Origin`) and hands one to each
request; a connection whose response ended cleanly and that both sides allow to be kept alive goes
back to the pool on :meth:`Response.release`, any other is closed. The request head is built in one
piece (:func:`~proxy.http.origin.request_head`) and sent with one ``transport.write``; a request
body is pumped by a task (``Content-Length`` framing when the client gave one, else chunked), with
``pause_writing``/``resume_writing`` backpressure. Each connection parses its answer itself
(:mod:`proxy.http.upstream`): the head completes :meth:`UpstreamPool.request`, the body is read with
:meth:`Response.readany`. A reused connection that the upstream had closed before any byte of the
answer arrived is retried once on a new connection, when the request had no body and its method is
idempotent (RFC 9110 9.2.2: the upstream may have acted on a ``POST`` before it closed). Idle
connections count against the pool's ``limit``; when every slot is taken, a new connection first
closes the longest-idle one of any origin (so one busy origin's leftovers never starve the others),
and a request that still finds no slot within the connect timeout fails. Every failure (connect, no
free slot, malformed answer, connection lost mid-answer) is an :class:`UpstreamFailed`.

This replaces one ``aiohttp.ClientSession`` request per proxied request, which cost more CPU
than the rest of the proxy (see bench/http_proxy.py).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.http.origin import Fields, Origin, UpstreamFailed, _Key, request_head, upstream_tls
from proxy.http.upstream import Response, _Conn, _Stale

__all__ = ["Fields", "Origin", "Response", "UpstreamFailed", "UpstreamPool", "request_head", "upstream_tls"]

#: methods whose request may be sent again (RFC 9110 9.2.2); TRACE and CONNECT the proxy refuses
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class UpstreamPool:
    """Keep-alive connections to the upstreams, up to ``limit`` at once (idle ones included)."""

    def __init__(self, *, limit: int = 512, idle: float = 30.0, connect_timeout: float = 10.0) -> None:
        self._idle: dict[_Key, list[_Conn]] = {}
        self._all: set[_Conn] = set()
        self._slots = asyncio.Semaphore(limit)
        self._idle_for = idle
        self._connect_timeout = connect_timeout
        self._tls: ssl.SSLContext | None = None
        self.memo: dict[Any, CIMultiDictProxy[str]] = {}  # client headers per repeated upstream header block
        self.heads: dict[tuple[tuple[bytes, bytes], ...], CIMultiDictProxy[str]] = {}  # decoded header blocks

    async def request(self, origin: Origin, method: str, target: str, headers: CIMultiDict[str] | Fields,
                      body: AsyncIterator[bytes] | None = None) -> Response:
        """Send a request and return once the answer's head arrived; the caller must
        :meth:`Response.release` (or :meth:`Response.close`) it."""
        fields = headers if isinstance(headers, Fields) else Fields(headers)
        chunked = body is not None and not fields.has_length
        head = request_head(method, origin.prefix + target, origin.host_header, fields, chunked=chunked)
        for attempt in (0, 1):
            conn, reused = self._reuse(origin)
            if conn is None:
                conn = await self._connect(origin)
            assert conn.transport is not None
            conn.head_only = method == "HEAD"
            fut = conn.response = conn.loop.create_future()
            conn.transport.write(head)
            if body is not None:
                conn.pump = asyncio.ensure_future(self._pump(conn, body, chunked))
            try:
                resp: Response = await fut
                return resp
            except _Stale:
                if reused and body is None and attempt == 0 and method in _IDEMPOTENT:
                    continue
                if not reused and origin.scheme == "https":  # (the TLS alert itself does not reach asyncio)
                    raise UpstreamFailed("the upstream closed a new TLS connection before answering (as a "
                                         "server that refuses hoop's client certificate, or wants one, does)") from None
                raise UpstreamFailed("the upstream closed the connection") from None
            except BaseException:
                conn.abort(UpstreamFailed("cancelled"))
                raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for conn in list(self._all):
            conn.abort(UpstreamFailed("pool closed"))
        self._idle.clear()

    @staticmethod
    async def _pump(conn: _Conn, body: AsyncIterator[bytes], chunked: bool) -> None:
        try:
            async for chunk in body:
                if conn.closed or conn.transport is None:
                    raise UpstreamFailed("the upstream closed the connection")
                if chunk:
                    conn.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    await conn.drain()
            if chunked and conn.transport is not None and not conn.closed:
                conn.transport.write(b"0\r\n\r\n")
            conn.sent = True
        except Exception as exc:  # the client's upload broke or was cut: so does the exchange
            conn.abort(exc if isinstance(exc, UpstreamFailed) else UpstreamFailed(f"request body: {exc!r}"))

    def _reuse(self, origin: Origin) -> tuple[_Conn | None, bool]:
        idle = self._idle.get(origin.key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self._idle_for:
                conn.abort(UpstreamFailed("idle"))
                continue
            return conn, True
        return None, False

    async def _connect(self, origin: Origin) -> _Conn:
        if self._slots.locked():
            self._evict_idle()
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamFailed(f"no upstream connection free for {origin.host}:{origin.port} within "
                                 f"{self._connect_timeout:g} s (all {len(self._all)} in use)") from None
        key = origin.key
        tls = None
        if origin.scheme == "https":
            if origin.tls is not None:
                tls = origin.tls
            else:
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                tls = self._tls
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(lambda: _Conn(self, key), origin.host, origin.port, ssl=tls,
                                                       server_hostname=(origin.server_name or origin.host) if tls
                                                       else None)
        except ssl.SSLCertVerificationError as exc:
            self._slots.release()
            raise UpstreamFailed(f"the certificate of {origin.host}:{origin.port} was refused: "
                                 f"{exc.verify_message or 'verification failed'}") from exc
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self._slots.release()
            raise UpstreamFailed(f"cannot connect to {origin.host}:{origin.port}: {type(exc).__name__}") from exc
        except BaseException:
            self._slots.release()
            raise
        self._all.add(conn)
        return conn

    def _evict_idle(self) -> None:
        """Close the longest-idle connection of any origin, freeing its slot now (no-op when none is idle)."""
        oldest: list[_Conn] | None = None
        for idle in self._idle.values():
            while idle and idle[0].closed:  # closed by the upstream: its slot is already free
                idle.pop(0)
            if idle and (oldest is None or idle[0].idle_since < oldest[0].idle_since):
                oldest = idle
        if oldest is not None:
            conn = oldest.pop(0)
            conn.abort(UpstreamFailed("evicted"))
            self._forget(conn)

    def _park(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)

    def _forget(self, conn: _Conn) -> None:
        if conn in self._all:
            self._all.discard(conn)
            self._slots.release()
