"""The relay while statements are held, and the cost of one row with masking on (PG review 11, 12).

11: after an approval, the chunks that came in while the statement was held are replayed; when
one of them is held in turn, reading from the client must stay paused. A socket transport
delivers nothing once paused, so this runs over fake transports that hand the relay a chunk
after the pause (as a transport with its own buffer may).

12: with masking on, a DataRow is held whole before it is inspected; ``max_row_bytes`` caps that,
and the session ends with SQLSTATE 54000 rather than hoop holding the row.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from broker.clock import FakeClock
from proxy.guard import Decision
from proxy.mask import Masker
from proxy.pg import codec
from proxy.pg.inspect import Inspector, Stmt
from proxy.pg.relay import Relay
from proxy.sqlguard import SqlGuard
from tests.proxy.pg.harness import running_hoop
from tests.proxy.pg.test_fast import RESOURCE, _Session, _Transport, _Up
from tests.support.pgcluster import PgCluster


class _Reading(_Transport):
    def __init__(self) -> None:
        super().__init__()
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_second_hold_during_the_replay_keeps_reading_paused() -> None:
    session, client, up = _Session(), _Reading(), _Up()
    up.transport = _Reading()
    decisions: list[asyncio.Future[bool]] = []

    async def review(stmt: Stmt, decision: Decision) -> bool:
        fut = asyncio.get_running_loop().create_future()
        decisions.append(fut)
        return await fut

    insp = Inspector(RESOURCE, SqlGuard(RESOURCE.guardrails), Masker(RESOURCE.masking, b"k" * 32), None, session,
                     client.write, review)
    relay = Relay(client, up, insp, session, FakeClock(), conn="t", stream_rows=False,  # type: ignore[arg-type]
                  on_closed=lambda r: None)
    relay.start(b"", b"")
    try:
        relay.from_client(codec.encode_query("DELETE FROM a"))
        await _settle()
        assert len(decisions) == 1 and not client.reading
        relay.from_client(codec.encode_query("DELETE FROM b"))  # arrives after the pause: kept
        decisions[0].set_result(True)
        await _settle()
        assert b"DELETE FROM a" in b"".join(up.transport.sent)
        assert len(decisions) == 2  # the replayed chunk is held in turn
        assert not client.reading and relay._paused["client"]
        relay.from_client(codec.encode_query("SELECT 1"))  # still kept, behind the held statement
        decisions[1].set_result(True)
        await _settle()
        sent = b"".join(up.transport.sent)
        assert sent.index(b"DELETE FROM b") < sent.index(b"SELECT 1")
        assert client.reading and not relay._paused["client"]
    finally:
        relay.end("test over")
        await _settle()


pg_only = pytest.mark.postgres


@pg_only
async def test_a_row_over_max_row_bytes_ends_the_session(pg: PgCluster, pgdb: str, tmp_path: Path) -> None:
    async with running_hoop(pg, pgdb, tmp_path, max_row_bytes=1 << 20) as hoop:
        conn = await asyncpg.connect(hoop.dsn())
        try:
            assert len(await conn.fetchval("SELECT repeat('x', 900000)")) == 900000  # under the cap
        finally:
            await conn.close()
        out = await hoop.psql("-v", "VERBOSITY=verbose", "-c", "SELECT repeat('x', 2000000)")
        assert out.returncode != 0 and "FATAL:  54000" in out.stderr and "max_row_bytes" in out.stderr, out
        closes = await hoop.events("close")
        assert any("max_row_bytes" in c["reason"] for c in closes)


@pg_only
async def test_max_row_bytes_does_not_apply_without_masking(pg: PgCluster, pgdb: str, tmp_path: Path) -> None:
    async with running_hoop(pg, pgdb, tmp_path, max_row_bytes=1 << 20, masking={"enabled": False}) as hoop:
        conn = await asyncpg.connect(hoop.dsn())
        try:
            assert len(await conn.fetchval("SELECT repeat('x', 2000000)")) == 2000000  # streamed, not held
        finally:
            await conn.close()
