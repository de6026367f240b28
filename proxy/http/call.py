"""One proxied HTTP request as the handler sees it, whichever server carries it.

How this works. The HTTP proxy's handler (:mod:`proxy.http.server`) reads a request and writes
its answer through :class:`Call`. Plain requests arrive on hoop's own HTTP/1.1 server
(:class:`proxy.http.front.FrontCall`); WebSocket upgrades are handed to aiohttp's server, whose
request is wrapped in :class:`AioCall` (it keeps the ``web.BaseRequest`` for the WebSocket
handshake). Either way the handler answers with ``send`` (a whole body, one write),
``refuse`` (a JSON refusal) or ``start``/``write``/``end`` (a streamed body), and ``cut``
closes the connection when an answer cannot be completed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["AioCall", "Call", "Headers", "Refusing", "json_body"]

#: response headers as the handler passes them (the pool's shared ones are read-only)
Headers = CIMultiDict[str] | CIMultiDictProxy[str]


def json_body(error: str, reason: str, **extra: object) -> bytes:
    """The JSON refusal body: ``{"error": ..., "reason": ..., **extra}``."""
    return orjson.dumps({"error": error, "reason": reason, **extra}, default=str)


class Call(Protocol):
    """What the proxy's handler uses of a request and its answer."""

    method: str
    raw_path: str
    remote: str | None
    #: the request's header lines as received (None: not kept), and a small per-connection memo that
    #: the handler may use for what depends only on them (None: no memo)
    raw_headers: tuple[tuple[bytes, bytes], ...] | None
    memo: dict[Any, Any] | None

    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]: ...

    @property
    def body_exists(self) -> bool: ...

    def body(self) -> AsyncIterator[bytes]: ...

    async def send(self, status: int, reason: str | None, headers: Headers, body: bytes) -> None: ...

    async def refuse(self, status: int, error: str, reason: str, **extra: object) -> None: ...

    async def start(self, status: int, reason: str | None, headers: Headers) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def end(self) -> None: ...

    def cut(self) -> None: ...


class Refusing:
    """``refuse`` for a call that has ``send``: the JSON refusal every proxy answer uses."""

    __slots__ = ()

    async def send(self, status: int, reason: str | None, headers: Headers, body: bytes) -> None:
        raise NotImplementedError

    async def refuse(self, status: int, error: str, reason: str, **extra: object) -> None:
        headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json; charset=utf-8"})
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="hoop"'
        await self.send(status, None, headers, json_body(error, reason, **extra))


class AioCall(Refusing):
    """A :class:`Call` over an aiohttp request; :attr:`response` is what aiohttp's handler returns."""

    def __init__(self, request: web.BaseRequest) -> None:
        self.request = request
        self.method = request.method
        self.raw_path = request.raw_path
        self.remote = request.remote
        self.response: web.StreamResponse | None = None
        self.raw_headers: tuple[tuple[bytes, bytes], ...] | None = None
        self.memo: dict[Any, Any] | None = None

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.request.headers

    @property
    def body_exists(self) -> bool:
        return self.request.body_exists

    async def body(self) -> AsyncIterator[bytes]:
        async for chunk in self.request.content.iter_any():
            yield chunk

    async def send(self, status: int, reason: str | None, headers: Headers, body: bytes) -> None:
        self.response = web.Response(status=status, reason=reason, body=body, headers=headers)

    async def start(self, status: int, reason: str | None, headers: Headers) -> None:
        out = web.StreamResponse(status=status, reason=reason, headers=headers)
        await out.prepare(self.request)
        self.response = out

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        if data:
            await self.response.write(data)

    async def end(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def cut(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.close()
