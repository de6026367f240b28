"""Protocol edges over a raw socket: NegotiateProtocolVersion for a newer minor version, and
backpressure: a client that stops reading a 100 MB result does not make the proxy buffer it."""

from __future__ import annotations

import asyncio
import logging
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from proxy.pg import codec
from proxy.pg.messages import (
    Auth,
    Backend,
    decode_authentication,
    decode_negotiate_protocol_version,
)
from proxy.pg.scram import ScramClient
from tests.proxy.pg.harness import Hoop, running_hoop, seeded_database
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.postgres


@pytest.fixture
async def hoop(pg: PgCluster, tmp_path: Path) -> AsyncIterator[Hoop]:
    async with running_hoop(pg, seeded_database(pg), tmp_path) as h:
        yield h


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def message(self) -> tuple[int, bytes]:
        header = await self.reader.readexactly(5)
        msg_type, length = codec.HEADER.unpack(header)
        return msg_type, await self.reader.readexactly(length - 4)

    async def login(self, hoop: Hoop, *, minor: int = 0, extra: dict[str, str] | None = None) -> list[int]:
        """SCRAM login; returns the types of messages seen before ReadyForQuery."""
        params = {"user": hoop.grant.login, "database": "prod-db", **(extra or {})}
        self.writer.write(codec.encode_startup(params, minor=minor))
        seen: list[int] = []
        scram: ScramClient | None = None
        for _ in range(100):
            msg_type, body = await self.message()
            seen.append(msg_type)
            if msg_type == Backend.NEGOTIATE_PROTOCOL_VERSION:
                self.negotiated = decode_negotiate_protocol_version(body)
            elif msg_type == Backend.AUTHENTICATION:
                auth = decode_authentication(body)
                if auth.code == Auth.SASL:
                    scram = ScramClient(hoop.secret, offered=auth.mechanisms)
                    self.writer.write(codec.encode_sasl_initial_response(scram.mechanism, scram.client_first()))
                elif auth.code == Auth.SASL_CONTINUE and scram is not None:
                    self.writer.write(codec.encode_sasl_response(scram.handle_server_first(auth.data)))
                elif auth.code == Auth.SASL_FINAL and scram is not None:
                    scram.handle_server_final(auth.data)
            elif msg_type == Backend.ERROR_RESPONSE:
                raise AssertionError(body)
            elif msg_type == Backend.READY_FOR_QUERY:
                return seen
        raise AssertionError("no ReadyForQuery")

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def connect(hoop: Hoop) -> Raw:
    reader, writer = await asyncio.open_connection("127.0.0.1", hoop.port, limit=1 << 20)
    return Raw(reader, writer)


async def test_newer_minor_version_is_negotiated_down(hoop: Hoop) -> None:
    raw = await connect(hoop)
    try:
        seen = await raw.login(hoop, minor=2, extra={"_pq_.fancy": "on"})
        assert seen[0] == Backend.NEGOTIATE_PROTOCOL_VERSION
        assert raw.negotiated.newest_minor == 0 and raw.negotiated.unsupported_options == ("_pq_.fancy",)
        raw.writer.write(codec.encode_query("SELECT 41 + 1"))
        types = []
        while not types or types[-1] != Backend.READY_FOR_QUERY:
            types.append((await raw.message())[0])
        assert Backend.DATA_ROW in types
    finally:
        await raw.close()


async def test_gssenc_request_is_answered_n_and_the_session_goes_on(hoop: Hoop) -> None:
    """libpq asks for GSSAPI encryption first when it has Kerberos credentials; hoop says N, and the
    client goes on with an SSLRequest or a plain start-up on the same connection."""
    raw = await connect(hoop)
    try:
        raw.writer.write(codec.encode_gssenc_request())
        assert await asyncio.wait_for(raw.reader.readexactly(1), 5) == b"N"
        await raw.login(hoop)
        raw.writer.write(codec.encode_query("SELECT 41 + 1"))
        types = []
        while not types or types[-1] != Backend.READY_FOR_QUERY:
            types.append((await raw.message())[0])
        assert Backend.DATA_ROW in types and Backend.ERROR_RESPONSE not in types
    finally:
        await raw.close()
    raw = await connect(hoop)
    try:
        raw.writer.write(codec.encode_gssenc_request() + codec.encode_ssl_request())
        assert await asyncio.wait_for(raw.reader.readexactly(2), 5) == b"NS"
    finally:
        await raw.close()


async def test_slow_client_applies_backpressure(hoop: Hoop) -> None:
    raw = await connect(hoop)
    try:
        await raw.login(hoop)
        tracemalloc.start()
        try:
            total = 100 * 1024 * 1024
            raw.writer.write(codec.encode_query(f"SELECT repeat('x', 1024) FROM generate_series(1, {total // 1024})"))
            await asyncio.sleep(2.0)  # the client reads nothing: the proxy must stop reading upstream
            _, peak_while_stalled = tracemalloc.get_traced_memory()
            received = 0
            for _ in range(10_000_000):
                msg_type, body = await raw.message()
                received += len(body)
                if msg_type == Backend.READY_FOR_QUERY:
                    break
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert received > total
        assert peak_while_stalled < 16 * 1024 * 1024, peak_while_stalled
        assert peak < 32 * 1024 * 1024, peak
    finally:
        await raw.close()


async def test_slow_server_pauses_reading_from_the_client(hoop: Hoop) -> None:
    """The other direction: a client streaming COPY data at a database that does not read it (its COPY
    waits for a lock) is not read by hoop either, so hoop does not buffer the stream."""
    direct = await asyncpg.connect(hoop.cluster.dsn(hoop.database))
    raw = await connect(hoop)
    try:
        await direct.execute("CREATE TABLE sink (t text)")
        locker = direct.transaction()
        await locker.start()
        await direct.execute("LOCK TABLE sink IN ACCESS EXCLUSIVE MODE")
        await raw.login(hoop)
        line = codec.encode_copy_data(b"y" * 1023 + b"\n")
        chunk = line * 1024  # 1 MiB of COPY data
        raw.writer.write(codec.encode_query("COPY sink FROM STDIN"))
        tracemalloc.start()
        try:
            sent = 0
            for sent in range(1, 257):
                raw.writer.write(chunk)
                try:
                    await asyncio.wait_for(raw.writer.drain(), 2.0)
                except TimeoutError:
                    break  # hoop stopped reading: the kernel's buffers are full
            else:
                raise AssertionError("256 MiB went in while the database read nothing")
            _, peak_while_stalled = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert sent < 64, sent
        assert peak_while_stalled < 24 * 1024 * 1024, peak_while_stalled
        await locker.rollback()  # the COPY gets its lock and reads again
        await asyncio.wait_for(raw.writer.drain(), 30)
        raw.writer.write(codec.COPY_DONE)
        types = []
        while not types or types[-1] != Backend.READY_FOR_QUERY:
            types.append((await asyncio.wait_for(raw.message(), 30))[0])
        assert Backend.ERROR_RESPONSE not in types and Backend.COMMAND_COMPLETE in types
        assert await direct.fetchval("SELECT count(*) FROM sink") == sent * 1024
    finally:
        await raw.close()
        await direct.close()


async def test_terminate_then_the_servers_close_is_the_clients_doing(hoop: Hoop,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A client sends Terminate and keeps its socket open: the database closes first, yet the
    session ended because the client said goodbye (CI once saw "the database closed the connection")."""
    caplog.set_level(logging.INFO, logger="proxy.pg.relay")
    raw = await connect(hoop)
    try:
        await raw.login(hoop)
        raw.writer.write(codec.TERMINATE)
        await raw.writer.drain()
        assert await asyncio.wait_for(raw.reader.read(), 10) == b""  # hoop closes once the server has
    finally:
        await raw.close()
    await hoop.hub.flush()
    async with hoop.store.tx() as tx:
        sessions = await tx.list_sessions()
    assert [s.close_reason for s in sessions] == ["client closed the connection"]
    # hoop serve's log says when and why a session ended, as it says when one opened
    assert "session closed: 'client closed the connection' (0 statements" in caplog.text
