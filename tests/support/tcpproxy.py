"""A TCP relay for fault injection: it forwards bytes until told to stall, and then holds its
connections open while forwarding nothing, as a half-open connection behind a dead NAT does."""

from __future__ import annotations

import asyncio
import contextlib


class StallingProxy:
    """Relays 127.0.0.1:``port`` to ``host``:``upstream``. :meth:`stall` freezes the connections
    made so far (bytes are read and dropped, nothing is closed) and refuses new ones."""

    def __init__(self, host: str, upstream: int) -> None:
        self.host = host
        self.upstream = upstream
        self.port = 0
        self.refusing = False
        self.silent = False
        self._flowing: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stall(self, *, silent: bool = False) -> None:
        """Freeze the connections made so far; refuse new ones, or with ``silent`` accept them and say
        nothing (a host that takes the connect and never answers)."""
        self.refusing = True
        self.silent = silent
        for flowing in self._flowing:
            flowing.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.refusing:
            if not self.silent:
                writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream)
        self._writers.append(up_writer)
        flowing = asyncio.Event()
        flowing.set()
        self._flowing.append(flowing)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, flowing))
            self._tasks.add(task)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
        while True:
            data = await src.read(65536)
            if not flowing.is_set():  # stalled: swallow everything, close nothing
                await asyncio.Event().wait()
            if not data:
                with contextlib.suppress(OSError):
                    dst.close()
                return
            dst.write(data)
