"""One keep-alive HTTP/1.1 connection to an upstream on ``asyncio.Protocol``, and the answer read from it.

How this works. :class:`_Conn` is the protocol of one pooled connection (:mod:`proxy.http.pool`
hands them out). The request head goes out in one ``transport.write``; the response is parsed by
``httptools`` (llhttp): the head completes the future the pool awaits with a :class:`Response`, the
body is buffered per chunk and read with :meth:`Response.readany`; more than 256 KiB unread pauses
reading the socket, so a slow client slows the upstream and memory stays bounded. Interim (1xx)
responses are skipped. A ``HEAD`` response has no body whatever its headers say (its connection is
then not reused). A reused connection that the upstream closed before any byte of the answer
arrived fails with :class:`_Stale`, which the pool may retry. A body delimited by the connection's
end is complete only when the connection ended cleanly: a reset is a cut answer (asyncio reports a
TLS connection that ends without its closing alert as a clean end, so that cut is not seen). On
:meth:`Response.release` a connection whose response ended cleanly and that both sides allow to be
kept alive goes back to the pool; any other is closed.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.http.body import Secrets
from proxy.http.flow import Chunks, WriteFlow
from proxy.http.headers import response_headers
from proxy.http.origin import UpstreamFailed, _Key

if TYPE_CHECKING:
    from proxy.http.pool import UpstreamPool

__all__ = ["Response"]

_HIGH = 256 * 1024  # unread response bytes above which the socket is paused
_LOW = 64 * 1024
_MEMO = 64  # distinct upstream header blocks kept (Date changes every second)


class _Stale(Exception):
    """A reused connection was closed by the upstream before the answer began."""


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
