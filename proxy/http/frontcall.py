"""One request on hoop's HTTP/1.1 server (:mod:`proxy.http.front`): its head, its body as it
arrives, and the answer written back (no socket of its own: it writes through its connection).

How this works. :class:`FrontCall` implements :class:`proxy.http.call.Call`. ``send`` writes a
whole answer with its ``Content-Length`` in one write; ``start``/``write``/``end`` stream one with
``Content-Length`` framing when the headers carry it, chunked framing otherwise, and a
connection-delimited body for an HTTP/1.0 client (cut short, that one ends with a reset, not a
close: a close is its normal end). ``100 Continue`` is sent only when the handler
starts reading the body, so a refused request never makes the client upload. An answer that
begins before the request body was read whole says ``Connection: close`` (the rest of that body
cannot be skipped safely). :func:`response_head` renders a status line and headers, dropping a
header that holds a line break.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.http.call import Headers, Refusing
from proxy.http.flow import Chunks

log = logging.getLogger(__name__)

__all__ = ["Connection", "FrontCall", "response_head"]

_HIGH = 256 * 1024  # unread request body above which the connection pauses reading
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class Connection(Protocol):
    """What a call uses of its connection (:class:`proxy.http.front.Front`)."""

    remote: str | None
    lost: bool
    memo: dict[Any, Any]

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    def body_consumed(self) -> None: ...

    def reset(self) -> None: ...


class _Date:
    """The ``Date`` header value, formatted at most once a second."""

    value = ""
    second = -1

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.value = email.utils.formatdate(second, usegmt=True)
        return cls.value


def _fields(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> str:
    """``Name: value`` lines of ``headers``; a header with a line break in it is dropped, never sent."""
    fields = [f"{name}: {value}\r\n" for name, value in headers.items()]
    block = "".join(fields)
    if block.count("\n") != len(fields) or block.count("\r") != len(fields):  # a line break inside a field
        fields = [f for f in fields if f.count("\n") == 1 and f.count("\r") == 1]
        log.warning("http: dropped %d response header(s) with a line break", len(headers) - len(fields))
        block = "".join(fields)
    return block


#: rendered fields of read-only header objects, which the pool shares per repeated upstream block
_BLOCKS: dict[int, tuple[object, str]] = {}


def response_head(status: int, reason: str | None, headers: CIMultiDict[str] | CIMultiDictProxy[str],
                  extra: str) -> bytes:
    """The status line and headers, ready to write (no I/O). ``extra`` holds framing headers
    (already ``\r\n``-terminated). A header with a line break in it is dropped, never sent. The fields of
    a read-only header object seen before (the pool shares one per repeated upstream block) are
    rendered once."""
    reason = reason or _REASONS.get(status, "Unknown")
    if "\n" in reason or "\r" in reason:
        reason = _REASONS.get(status, "Unknown")
    if isinstance(headers, CIMultiDictProxy):  # read-only: its fields cannot change once rendered
        hit = _BLOCKS.get(id(headers))
        if hit is not None and hit[0] is headers:
            block = hit[1]
        else:
            block = _fields(headers)
            if len(_BLOCKS) >= 64:
                _BLOCKS.clear()
            _BLOCKS[id(headers)] = (headers, block)  # (the object pinned: its id cannot be reused meanwhile)
    else:
        block = _fields(headers)
    date = "" if "Date" in headers else f"Date: {_Date.now()}\r\n"
    return f"HTTP/1.1 {status} {reason}\r\n{date}{block}{extra}\r\n".encode("latin-1", "replace")


class FrontCall(Refusing):
    """One request on a :class:`Front` connection: its head, its body as it arrives, and the
    answer being written."""

    __slots__ = ("_chunks", "_continue", "_front", "body_done", "by_close", "chunked", "done", "headers", "keep_alive",
                 "memo", "method", "raw_headers", "raw_path", "remote", "started", "version")

    def __init__(self, front: Connection, method: str, raw_path: str, headers: CIMultiDictProxy[str],
                 version: str, keep_alive: bool, raw_headers: tuple[tuple[bytes, bytes], ...]) -> None:
        self._front = front
        self.raw_headers: tuple[tuple[bytes, bytes], ...] | None = raw_headers
        self.memo: dict[Any, Any] | None = front.memo
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.remote = front.remote
        self._chunks = Chunks()
        self._continue = headers.get("Expect", "").lower() == "100-continue"
        self.body_done = False
        self.started = False  # the status line went out
        self.chunked = False
        self.by_close = False  # the body's end is the connection's end (HTTP/1.0, no length)
        self.done = False  # the answer is complete

    # -- the request body --------------------------------------------------------------------

    @property
    def body_exists(self) -> bool:
        return self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers

    async def body(self) -> AsyncIterator[bytes]:
        """The request body, chunk by chunk as it arrives (``100 Continue`` is sent first when
        the client asked for it, so a refused request never makes the client upload)."""
        front = self._front
        if self._continue and not self.started:
            self._continue = False
            front.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            while not self._chunks:
                if self.body_done:
                    return
                if front.lost:
                    raise ConnectionResetError("the client went away")
                await self._chunks.wait()
            data = self._chunks.take()
            front.body_consumed()
            yield data

    def _feed(self, data: bytes) -> bool:
        """Body bytes from the parser; True when the buffer is over the high-water mark."""
        return self._chunks.add(data) > _HIGH

    def _end_body(self) -> None:
        self.body_done = True
        self._wake()

    def _wake(self) -> None:
        self._chunks.wake()

    # -- the answer ----------------------------------------------------------------------------

    async def send(self, status: int, reason: str | None, headers: Headers, body: bytes) -> None:
        """The whole answer in one write, with its ``Content-Length``."""
        if status in (204, 304):
            head, body = self._head(status, reason, headers, ""), b""
        else:
            head = self._head(status, reason, headers, f"Content-Length: {len(body)}\r\n")
        self._front.write(head if self.method == "HEAD" or not body else head + body)
        await self._front.drain()
        self.done = True

    async def start(self, status: int, reason: str | None, headers: Headers) -> None:
        """Begin a streamed answer: ``Content-Length`` framing when ``headers`` has it, chunked
        framing otherwise (connection-delimited for an HTTP/1.0 client)."""
        framing = ""
        if self.method != "HEAD" and status not in (204, 304) and "Content-Length" not in headers:
            if self.version == "1.1":
                self.chunked = True
                framing = "Transfer-Encoding: chunked\r\n"
            else:
                self.keep_alive = False
                self.by_close = True
        self._front.write(self._head(status, reason, headers, framing))
        await self._front.drain()

    async def write(self, data: bytes) -> None:
        if not data or self.method == "HEAD":
            return
        self._front.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        await self._front.drain()

    async def end(self) -> None:
        if self.chunked:
            self._front.write(b"0\r\n\r\n")
        await self._front.drain()
        self.done = True

    def cut(self) -> None:
        """Close the connection now: an answer cut short must never look complete. A body whose end is the
        connection's end would look complete after a close, so that connection is reset instead."""
        self.keep_alive = False
        if self.by_close:
            self._front.reset()
        else:
            self._front.close()

    def _head(self, status: int, reason: str | None, headers: Headers, framing: str) -> bytes:
        if self.started:
            raise RuntimeError("the answer has already started")
        self.started = True
        if not self.keep_alive or not self.body_done:
            # an unread request body cannot be skipped safely: this connection ends with the answer
            self.keep_alive = False
            framing += "Connection: close\r\n"
        elif self.version == "1.0":
            framing += "Connection: keep-alive\r\n"
        return response_head(status, reason, headers, framing)
