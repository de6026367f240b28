"""Flow-control pieces shared by the HTTP proxy's two protocols (client side and upstream side).

:class:`Chunks` holds body bytes that arrived and are not read yet, with one reader that may wait
for more; its ``size`` tells the protocol when to pause reading its socket. :class:`WriteFlow`
turns a transport's ``pause_writing``/``resume_writing`` into something a writer can await.
"""

from __future__ import annotations

import asyncio
import collections

__all__ = ["Chunks", "WriteFlow"]


class Chunks:
    """Unread bytes and their total ``size``; :meth:`wait` until :meth:`add` or :meth:`wake`."""

    __slots__ = ("_parts", "_waiter", "size")

    def __init__(self) -> None:
        self._parts: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.size = 0

    def __bool__(self) -> bool:
        return bool(self._parts)

    def add(self, data: bytes) -> int:
        """Keep ``data``, wake the reader; return how many bytes are now unread."""
        self._parts.append(data)
        self.size += len(data)
        self.wake()
        return self.size

    def take(self) -> bytes:
        """Everything unread, in one piece."""
        parts = self._parts
        data = parts.popleft() if len(parts) == 1 else b"".join(parts)
        parts.clear()
        self.size = 0
        return data

    def wake(self) -> None:
        """Wake the waiting reader (new bytes, the end, or an error it must look at)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class WriteFlow:
    """Mix-in for an ``asyncio.Protocol``: ``await self._writable_wait()`` while the transport's
    buffer is over its high-water mark."""

    _writable: asyncio.Future[None] | None = None

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._writable is not None:
            if not self._writable.done():
                self._writable.set_result(None)
            self._writable = None

    async def _writable_wait(self) -> None:
        """Return once the transport takes more (or was lost: the caller checks which)."""
        while self._writable is not None:
            await self._writable
