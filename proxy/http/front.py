"""The HTTP proxy's client side: an HTTP/1.1 server on ``asyncio.Protocol`` and ``httptools``.

How this works. :class:`Front` is the listening side's protocol, one per client connection.
``httptools`` (llhttp) parses the requests; each request becomes a :class:`FrontCall`, the
object the proxy's handler reads the request from and writes its answer to (the
:class:`proxy.http.call.Call` interface, which :class:`proxy.http.call.AioCall` also
implements over aiohttp). Requests on one connection are answered in order: a pipelined
request waits (parsed, its body buffered) until the previous answer is complete, and more than
``_QUEUE`` waiting requests pause reading the socket. An answer is written in one
``transport.write`` when it is whole (``send``), or streamed (``start``/``write``/``end``) with
``Content-Length`` framing when the length is known and chunked framing otherwise (an
HTTP/1.0 client gets a connection-delimited body instead). Flow control holds both ways: more
than 256 KiB of unread request body pause reading the socket, and ``write`` waits while
the transport's buffer is above its high-water mark (``pause_writing``).

A WebSocket upgrade (and any other ``Upgrade``, and ``CONNECT``) is handed to aiohttp's server
protocol on the same connection: the transport's protocol is switched and the request's bytes,
rebuilt from what the parser saw, are replayed to it. The proxy's handler then runs on an
``AioCall``, and aiohttp's WebSocket implementation carries the connection from there.

Refusals are HTTP-level: a malformed request gets ``400``, a request line or header block over
64 KiB gets ``431`` (or ``414`` for the target), each with a JSON body, and the connection is
closed. A connection that is idle (no request in flight) for ``keepalive`` seconds is closed;
that timer also bounds how long a request's head may take to arrive. A client that goes away
cancels its handler (as aiohttp's ``handler_cancellation``), so an abandoned request stops
using the upstream at once. This replaced aiohttp's server for plain requests, whose request
and response objects cost more CPU than the rest of the proxy's handling (bench/http_proxy.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.http.call import json_body
from proxy.http.flow import WriteFlow
from proxy.http.frontcall import FrontCall, response_head

log = logging.getLogger(__name__)

__all__ = ["Front", "aio_upgrade_server"]

_QUEUE = 8  # pipelined requests parsed ahead before reading the socket pauses
_MAX_HEAD = 64 * 1024  # request line plus headers
_MEMO = 16  # entries of a connection's memo (decoded header blocks, and the handler's own) before it is cleared

Handler = Callable[["FrontCall"], Awaitable[None]]


class Front(WriteFlow, asyncio.Protocol):
    """One client connection of the HTTP proxy."""

    def __init__(self, handler: Handler, upgrade: Callable[[], asyncio.Protocol], *, keepalive: float,
                 calls: set[Front]) -> None:
        self._handler = handler
        self._upgrade_protocol = upgrade
        self._keepalive = keepalive
        self._conns = calls
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.lost = False
        self.memo: dict[Any, Any] = {}  # what the handler derives from repeated request headers
        self._queue: collections.deque[FrontCall] = collections.deque()
        self._current: FrontCall | None = None  # the call whose body the parser is reading
        self._task: asyncio.Task[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._paused_reading = False
        self._upgrading: bytes | None = None
        self._loop = asyncio.get_running_loop()
        self._busy = False  # a request head arrived and its answer is not finished
        self._last = self._loop.time()  # when the connection last became idle
        self._reset_head()

    def _reset_head(self) -> None:
        self._url = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._head_size = 0

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) and peer else None
        self._conns.add(self)
        self._arm_idle(self._keepalive)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._begin_upgrade(data[offset:])
        except httptools.HttpParserCallbackError:
            pass  # our callback already answered (431/414) and closed
        except httptools.HttpParserError as exc:
            self._fail(400, "bad_request", f"malformed HTTP request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._conns.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        for call in (self._current, *self._queue):
            if call is not None:
                call._wake()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: stop using the upstream for it
        self._wake_writer()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_head()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > _MAX_HEAD:
            self._too_large(414, "uri_too_long", "the request target is over 64 KiB")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > _MAX_HEAD:
            self._too_large(431, "headers_too_large", "the request headers are over 64 KiB")

    def _too_large(self, status: int, error: str, reason: str) -> None:
        self._fail(status, error, reason)
        raise RuntimeError(error)  # stops the parser (HttpParserCallbackError)

    def on_headers_complete(self) -> None:
        self._busy = True
        if self.parser.should_upgrade():
            return  # handed to aiohttp once the parser stops at the upgrade (data_received)
        raw = tuple(self._raw)
        memo = self.memo
        headers: CIMultiDictProxy[str] | None = memo.get(raw)
        if headers is None:  # decoded once per distinct header block (a keep-alive client repeats its own)
            headers = CIMultiDictProxy(CIMultiDict(
                [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in raw]))
            if len(memo) >= _MEMO:
                memo.clear()
            memo[raw] = headers
        call = FrontCall(self, self.parser.get_method().decode("ascii", "replace"),
                         self._url.decode("utf-8", "surrogateescape"), headers, self.parser.get_http_version(),
                         bool(self.parser.should_keep_alive()), raw)
        self._current = call
        self._queue.append(call)
        if self._task is None:
            self._next()
        elif len(self._queue) > _QUEUE:
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        call = self._current
        if call is not None and call._feed(body):
            self._pause_reading()

    def on_message_complete(self) -> None:
        call = self._current
        if call is not None:
            call._end_body()
            self._current = None

    # -- running the calls -----------------------------------------------------------------

    def _next(self) -> None:
        """Start the handler of the oldest waiting call, if any and none is running."""
        if not self._queue or self.lost:
            self._task = None
            if self._upgrading is not None:
                self._switch()
            else:
                self._busy = False
                self._last = self._loop.time()
            return
        self._task = self._loop.create_task(self._run(self._queue[0]))

    async def _run(self, call: FrontCall) -> None:
        try:
            await self._handler(call)
            if not call.done and not call.started and not self.lost:
                await call.refuse(500, "internal_error", "the proxy produced no answer")
            elif not call.done and not self.lost:
                call.cut()  # a streamed answer the handler did not end: never looks complete
        except asyncio.CancelledError:
            if not self.lost:
                raise
            return
        except Exception:
            log.exception("http: request %s %s failed", call.method, call.raw_path[:200])
            if not call.started and not self.lost:
                with contextlib.suppress(Exception):
                    await call.refuse(500, "internal_error", "the proxy failed on this request")
            else:
                call.cut()
        finally:
            if self._queue and self._queue[0] is call:
                self._queue.popleft()
        if not call.keep_alive or self.lost:
            self.close()
            return
        if self._paused_reading and len(self._queue) <= _QUEUE:
            self._resume_reading()
        self._next()

    def body_consumed(self) -> None:
        if self._paused_reading and len(self._queue) <= _QUEUE:
            self._resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    async def drain(self) -> None:
        await self._writable_wait()
        if self.lost:
            raise ConnectionResetError("the client went away")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        """End the connection with a TCP reset (what is still buffered is dropped): the client sees an error,
        not the end of a body delimited by the connection's end."""
        if self.transport is None or self.lost:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None and not self.lost:
            self._paused_reading = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused_reading and self.transport is not None and not self.lost:
            self._paused_reading = False
            self.transport.resume_reading()

    def _arm_idle(self, delay: float) -> None:
        self._idle = self._loop.call_later(delay, self._idle_check)

    def _idle_check(self) -> None:
        """The keep-alive timer (one per period, not per request): close a connection that had no
        request in flight, nor a complete request head, for ``keepalive`` seconds."""
        self._idle = None
        if self.lost:
            return
        if self._busy:
            self._arm_idle(self._keepalive)
            return
        left = self._last + self._keepalive - self._loop.time()
        if left > 0:
            self._arm_idle(left)
        else:
            self.close()

    def _fail(self, status: int, error: str, reason: str) -> None:
        """A protocol-level refusal: answer (when no answer is under way) and close."""
        if self.transport is None or self.lost:
            return
        if self._task is None:
            headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json; charset=utf-8"})
            body = json_body(error, reason)
            self.transport.write(response_head(status, None, headers,
                                               f"Content-Length: {len(body)}\r\nConnection: close\r\n") + body)
        self.transport.close()

    # -- upgrades --------------------------------------------------------------------------

    def _begin_upgrade(self, rest: bytes) -> None:
        """The parser stopped at an upgrade request: rebuild its bytes and hand the connection
        to aiohttp when the calls before it are answered."""
        method = self.parser.get_method()
        lines = [method + b" " + self._url + b" HTTP/" + self.parser.get_http_version().encode() + b"\r\n"]
        lines.extend(name + b": " + value + b"\r\n" for name, value in self._raw)
        self._upgrading = b"".join(lines) + b"\r\n" + rest
        self._pause_reading()
        if self._task is None:
            self._switch()

    def _switch(self) -> None:
        assert self.transport is not None and self._upgrading is not None
        data, self._upgrading = self._upgrading, None
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._conns.discard(self)
        protocol = self._upgrade_protocol()
        transport = self.transport
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()
        protocol.data_received(data)


def aio_upgrade_server(handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]) -> web.Server:
    """aiohttp's server, for the connections :class:`Front` hands over (WebSocket upgrades)."""
    return web.Server(handler, handler_cancellation=True, access_log=None)
