"""A round-robin TCP load balancer: each new connection goes to the next backend port in turn,
as a Kubernetes Service may send a client's CancelRequest to another replica than its session."""

from __future__ import annotations

import asyncio
import contextlib


class RoundRobin:
    """Listens on 127.0.0.1:``port``; connection n goes to ``ports[n % len(ports)]``;
    ``routed`` lists the backend port of each connection so far."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.port = 0
        self.routed: list[int] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        port = self.ports[len(self.routed) % len(self.ports)]
        self.routed.append(port)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        self._writers.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        with contextlib.suppress(OSError):
            dst.close()
