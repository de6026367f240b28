"""The HTTP proxy's upstream side: keep-alive HTTP/1.1 connections on ``asyncio.Protocol``.

How this works. :class:`UpstreamPool` keeps idle connections per origin (scheme, host, port) and
hands one to each request; a connection whose response ended cleanly and that both sides allow to be
kept alive goes back to the pool on :meth:`Response.release`, any other is closed. The request head
is built in one piece and sent with one ``transport.write``; a request body is pumped by a task
(``Content-Length`` framing when the client gave one, else chunked), with
``pause_writing``/``resume_writing`` backpressure. The response is parsed by ``httptools`` (llhttp):
the head completes :meth:`UpstreamPool.request`, the body is buffered per chunk and read with
:meth:`Response.readany`; more than 256 KiB unread pauses reading the socket, so a slow client slows
the upstream and memory stays bounded. Interim (1xx) responses are skipped. A ``HEAD`` response has
no body whatever its headers say (its connection is then not reused). A reused connection that the
upstream had closed before any byte of the answer arrived is retried once on a new connection, when
the request had no body and its method is idempotent (RFC 9110 9.2.2: the upstream may have acted on
a ``POST`` before it closed). A body delimited by the connection's end is complete only when the
connection ended cleanly: a reset is a cut answer (asyncio reports a TLS connection that ends
without its closing alert as a clean end, so that cut is not seen). Idle connections count against
the pool's ``limit``; when every slot is taken, a new connection first closes the longest-idle one
of any origin (so one busy origin's leftovers never starve the others), and a request that still
finds no slot within the connect timeout fails. Every failure (connect, no free slot, malformed
answer, connection lost mid-answer) is an :class:`UpstreamFailed`.

This replaces one ``aiohttp.ClientSession`` request per proxied request, which cost more CPU
than the rest of the proxy (see bench/http_proxy.py).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from broker.errors import ConfigError, UpstreamError
from proxy.certs import file_error
from proxy.http.body import Secrets
from proxy.http.flow import Chunks, WriteFlow
from proxy.http.headers import response_headers

__all__ = ["Fields", "Origin", "Response", "UpstreamFailed", "UpstreamPool", "upstream_tls"]

_HIGH = 256 * 1024  # unread response bytes above which the socket is paused
_LOW = 64 * 1024
_MEMO = 64  # distinct upstream header blocks kept (Date changes every second)
#: methods whose request may be sent again (RFC 9110 9.2.2); TRACE and CONNECT the proxy refuses
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class UpstreamFailed(UpstreamError):
    """The upstream could not be reached, closed early or answered with malformed HTTP."""


class _Stale(Exception):
    """A reused connection was closed by the upstream before the answer began."""


_Key = tuple[str, str, int, str | None, int]  # scheme, host, port, TLS server name, TLS context


@dataclass(frozen=True)
class Origin:
    """Where a resource's requests go: ``http(s)://host[:port][/prefix]``, parsed once, and for https the
    TLS context that checks the upstream (None: the system's CAs) and the name its certificate must hold
    (None: ``host``)."""

    scheme: str
    host: str
    port: int
    prefix: str
    host_header: str
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    server_name: str | None = None

    @classmethod
    def parse(cls, base: str, *, tls: ssl.SSLContext | None = None, server_name: str | None = None) -> Origin:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        return cls(parts.scheme, host, port, parts.path.rstrip("/"),
                   shown if port == default else f"{shown}:{port}", tls, server_name)

    @functools.cached_property
    def key(self) -> _Key:
        """What pooled connections are shared by: the same place, checked the same way."""
        return self.scheme, self.host, self.port, self.server_name, id(self.tls) if self.tls is not None else 0


def upstream_tls(resource: str, ca: Path | None, client_cert: Path | None, client_key: Path | None) -> ssl.SSLContext:
    """The client TLS context for an https upstream: certificates checked against ``ca`` (else the
    system's CAs), hostnames checked, and ``client_cert``/``client_key`` presented when given. Raises
    :class:`ConfigError` naming the resource and the file (never a key's content)."""
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"resources.{resource}.tls.ca: cannot load {ca}: {file_error(exc)}") from None
    if client_cert is not None and client_key is not None:
        try:
            context.load_cert_chain(str(client_cert), str(client_key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"resources.{resource}.tls: cannot load client_cert {client_cert} with client_key "
                              f"{client_key}: {file_error(exc)}") from None
    context.set_alpn_protocols(["http/1.1"])
    return context


class Fields:
    """Request header fields rendered and checked once: ``Name: value`` lines without the request line
    and ``Host``. A client repeats its headers on a keep-alive connection, so the proxy keeps these per
    connection and renders them again only when they change. Refuses a line break inside a field."""

    __slots__ = ("block", "has_length")

    def __init__(self, headers: CIMultiDict[str]) -> None:
        lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
        block = "".join(lines)
        # each line holds exactly one CR LF, its end: any other is a line break inside a field (two C scans)
        if block.count("\n") != len(lines) or block.count("\r") != len(lines):
            bad = next((n for n, v in headers.items() if "\n" in n + v or "\r" in n + v), "?")
            raise UpstreamFailed(f"header {bad!r} contains a line break")
        self.block = block
        self.has_length = "Content-Length" in headers


def request_head(method: str, target: str, host: str, headers: CIMultiDict[str] | Fields, *, chunked: bool) -> bytes:
    """The request line and headers, ready to write (no I/O). Refuses CR/LF inside a field."""
    if "\n" in target or "\r" in target or " " in target or "\n" in host or "\r" in host:
        raise UpstreamFailed("request target contains whitespace")
    block = (headers if isinstance(headers, Fields) else Fields(headers)).block
    framing = "Transfer-Encoding: chunked\r\n" if chunked else ""
    return f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{block}{framing}\r\n".encode("utf-8", "surrogateescape")


class Response:
    """The upstream's answer: status and headers at once, the body by :meth:`readany`."""

    __slots__ = ("_conn", "_raw", "content_length", "headers", "reason", "status")

    def __init__(self, conn: _Conn, status: int, reason: str, headers: CIMultiDictProxy[str],
                 raw: tuple[tuple[bytes, bytes], ...]) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers  # read-only: shared by the answers that repeat the same header block
        self._raw = raw
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None

    async def readany(self) -> bytes:
        """The body bytes that have arrived (waiting for some); ``b""`` at its end.
        Raises :class:`UpstreamFailed` when the connection broke before the end."""
        return await self._conn.readany()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self._conn.readany():
            parts.append(chunk)
        return b"".join(parts)

    def client_headers(self, *, body_changes: bool, decoded: bool,
                       secrets: Secrets | None = None) -> CIMultiDictProxy[str]:
        """The headers to send the client (:func:`proxy.http.headers.response_headers`), read-only. An
        upstream repeats its header block, so the result is kept per pool for a repeated block (and the
        resource's ``secrets``: the held credential they must not show)."""
        memo = self._conn.pool.memo
        key = (self._raw, body_changes, decoded, secrets)
        out: CIMultiDictProxy[str] | None = memo.get(key)
        if out is None:
            out = CIMultiDictProxy(response_headers(self.headers, body_changes=body_changes, decoded=decoded,
                                                    secrets=secrets))
            if len(memo) >= _MEMO:
                memo.clear()
            memo[key] = out
        return out

    def close(self) -> None:
        """Stop now: the connection is closed, a pending read fails."""
        self._conn.abort(UpstreamFailed("closed"))

    def release(self) -> None:
        """The exchange is over: keep the connection when it ended cleanly, else close it."""
        self._conn.finish()


class _Conn(WriteFlow, asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: _Key) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()  # (each get_running_loop() call costs a getpid syscall)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.head_only = False
        self.response: asyncio.Future[Response] | None = None
        self.started = False  # a byte of the answer arrived
        self.done = False  # the body ended
        self.error: Exception | None = None
        self.pump: asyncio.Task[None] | None = None
        self.sent = False  # the request body was sent whole
        self._status = 0
        self._reason = ""
        self._raw: list[tuple[bytes, bytes]] = []
        self._until_close = False
        self.keep_alive = False
        self._chunks = Chunks()
        self._paused = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.started = True
        if self.response is None or self.done:
            self.abort(UpstreamFailed("unexpected data from the upstream"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.abort(UpstreamFailed("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self.abort(UpstreamFailed(f"malformed response: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what the end means

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None and not self.done:
            if self.response.done() and self._until_close and self.error is None and exc is None:
                self.done = True  # a body delimited by the connection's end
                self._chunks.wake()
            elif not self.started and not self.response.done():
                self.abort(_Stale())
            else:
                self.abort(UpstreamFailed("the upstream closed the connection mid-answer"))
        self._wake_writer()
        self.pool._forget(self)

    # -- httptools callbacks ---------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self._reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            return  # interim; its end resets the head state
        self._status = status
        self.keep_alive = bool(self.parser.should_keep_alive())  # (llhttp forgets it at the message's end)
        raw = tuple(self._raw)
        headers = self.pool.heads.get(raw)
        if headers is None:  # decoded once per distinct header block (an upstream repeats its own)
            headers = CIMultiDictProxy(CIMultiDict(
                [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in raw]))
            if len(self.pool.heads) >= _MEMO:
                self.pool.heads.clear()
            self.pool.heads[raw] = headers
        te = headers.get("Transfer-Encoding", "").lower()
        self._until_close = "Content-Length" not in headers and "chunked" not in te
        fut = self.response
        if fut is not None and not fut.done():
            fut.set_result(Response(self, status, self._reason, headers, raw))
        if self.head_only or status in (204, 304):
            self.done = True  # no body, whatever the headers announce
            self._chunks.wake()

    def on_body(self, body: bytes) -> None:
        if self._chunks.add(body) > _HIGH and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._status == 0:  # the end of an interim response
            self._reason = ""
            self._raw = []
            return
        self.done = True
        self._chunks.wake()

    # -- the exchange ----------------------------------------------------------------------

    def abort(self, exc: Exception) -> None:
        if self.error is None and not self.done:
            self.error = exc
        fut = self.response
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()
        self._chunks.wake()
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    async def readany(self) -> bytes:
        while not self._chunks:
            if self.error is not None:
                raise self.error if isinstance(self.error, UpstreamFailed) else UpstreamFailed(str(self.error))
            if self.done:
                return b""
            await self._chunks.wait()
        data = self._chunks.take()
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    def finish(self) -> None:
        reusable = (self.done and self.error is None and not self.closed and not self.head_only
                    and (self.pump is None or self.sent)
                    and self.keep_alive)
        if not reusable:
            self.abort(UpstreamFailed("released"))
            self.pool._forget(self)
            return
        self._reset()
        self.pool._park(self)

    async def drain(self) -> None:
        await self._writable_wait()
        if self.closed:
            raise UpstreamFailed("the upstream closed the connection")


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
