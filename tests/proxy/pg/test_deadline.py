"""The grant's end against sessions in the states a relay is least likely to check: a statement running
upstream, a COPY FROM STDIN mid-stream, a statement held for review, a client that does not read, a
LISTEN session, and a grant ended while the upstream login is still being made."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from broker.clock import FakeClock
from broker.config import PostgresResource
from broker.errors import Conflict
from broker.events import ReviewRequested
from broker.model import Grant
from proxy.pg import codec
from proxy.pg.messages import Backend, decode_authentication
from proxy.pg.scram import ScramClient
from proxy.pg.upstream import Reader
from tests.proxy.pg.harness import OPS, ROOT, Hoop, running_hoop, seeded_database
from tests.support.lateclock import ShiftedClock, SlowExtendHooks
from tests.support.pgcluster import PgCluster
from tests.support.tcpproxy import StallingProxy

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pgdb(pg: PgCluster) -> str:
    return seeded_database(pg)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def hoop(pg: PgCluster, pgdb: str, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Hoop]:
    async with running_hoop(pg, pgdb, tmp_path, clock=clock) as h:
        yield h


def _expire_in(hoop: Hoop, clock: FakeClock, seconds: float) -> None:
    """Move the fake clock so that the grant ends ``seconds`` of real time from now (the proxy's timers
    are armed in real time from what the clock says when the session opens)."""
    clock.set(hoop.grant.expires_at - timedelta(seconds=seconds))


async def _direct(hoop: Hoop) -> asyncpg.Connection:
    return await _direct_to(hoop.cluster, hoop.database)


async def _direct_to(cluster: PgCluster, database: str) -> asyncpg.Connection:
    return await asyncpg.connect(cluster.dsn(database))


async def _backends(hoop: Hoop, marker: str) -> list[str]:
    """The states of the upstream backends running a query that contains ``marker``."""
    conn = await _direct(hoop)
    try:
        rows = await conn.fetch("SELECT state FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' "
                                "AND pid <> pg_backend_pid()", marker)
    finally:
        await conn.close()
    return [r["state"] for r in rows]


@contextlib.asynccontextmanager
async def _table(hoop: Hoop, prefix: str, *, then: str = "") -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A fresh table ``(a int)`` named ``prefix_…`` (``then``, with ``{table}`` for its name, runs after its
    creation), with a direct connection to the database; dropped at the end."""
    marker = f"{prefix}_{secrets.token_hex(4)}"
    direct = await _direct(hoop)
    try:
        await direct.execute(f"CREATE TABLE {marker} (a int)" + (f"; {then.format(table=marker)}" if then else ""))
        yield direct, marker
    finally:
        await direct.execute(f"DROP TABLE IF EXISTS {marker}")
        await direct.close()


async def _until_no_backend(hoop: Hoop, marker: str, within: float = 10) -> list[str]:
    """The states of the backends running a query containing ``marker``, once there are none or ``within``
    seconds passed (bounded)."""
    end = time.monotonic() + within
    while await _backends(hoop, marker) and time.monotonic() < end:
        await asyncio.sleep(0.1)
    return await _backends(hoop, marker)


async def _closed(hoop: Hoop, within: float = 10) -> str:
    """The close reason of the harness's session, once recorded (bounded wait)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        closes = await hoop.events("close")
        if closes:
            return str(closes[-1]["reason"])
        await asyncio.sleep(0.05)
    raise AssertionError("the session was not closed")


async def test_a_statement_running_at_the_deadline_is_cancelled_upstream(hoop: Hoop, clock: FakeClock) -> None:
    """The client is gone at the deadline, but PostgreSQL notices a closed socket only when it next reads or
    writes: a write that was still running committed after the grant ended."""
    async with _table(hoop, "probe") as (direct, marker):
        _expire_in(hoop, clock, 1.5)
        conn = await asyncpg.connect(hoop.dsn())
        try:
            with pytest.raises((asyncpg.PostgresError, asyncpg.exceptions.ConnectionDoesNotExistError)):
                await conn.execute(f"INSERT INTO {marker} SELECT 1 FROM pg_sleep(20)")
        finally:
            conn.terminate()
        assert await _closed(hoop) == "access expired"
        # (without the cancel: 20 s more)
        assert await _until_no_backend(hoop, f"INSERT INTO {marker}", within=5) == []
        assert await direct.fetchval(f"SELECT count(*) FROM {marker}") == 0
        statements = await hoop.events("statement")
        assert [s["error"] for s in statements if marker in s["sql"]] == ["session ended by hoop: access expired"]


async def test_copy_from_stdin_mid_stream_is_ended_and_nothing_is_copied(hoop: Hoop, clock: FakeClock) -> None:
    async with _table(hoop, "copy") as (direct, marker):
        _expire_in(hoop, clock, 1.5)
        proc = await asyncio.create_subprocess_exec(
            str(hoop.cluster.bindir / "psql"), "-X", "-At", "-c", f"COPY {marker} FROM STDIN", env=hoop.env(),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdin is not None and proc.stderr is not None
        try:
            proc.stdin.write(b"".join(b"%d\n" % i for i in range(1000)))  # rows, no end: the COPY stays open
            await proc.stdin.drain()
            assert await _closed(hoop) == "access expired"
            # psql notices only when it writes again; what it sends now, and its end of data, go nowhere
            proc.stdin.write(b"".join(b"%d\n" % i for i in range(1000)) + b"\\.\n")
            proc.stdin.close()
            async with asyncio.timeout(10):
                err = await proc.stderr.read()
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert b"access expired" in err and proc.returncode != 0
        assert await _closed(hoop) == "access expired"
        assert await _until_no_backend(hoop, f"COPY {marker}", within=10) == []
        assert await direct.fetchval(f"SELECT count(*) FROM {marker}") == 0


async def test_a_statement_held_for_review_at_the_deadline_never_runs(hoop: Hoop, clock: FakeClock) -> None:
    async with _table(hoop, "held", then="INSERT INTO {table} VALUES (1), (2)") as (direct, marker):
        _expire_in(hoop, clock, 1.5)
        conn = await asyncpg.connect(hoop.dsn())
        try:
            task = asyncio.create_task(conn.execute(f"DELETE FROM {marker}"))
            for _ in range(100):
                pending = [e.review for e in hoop.notifier.events if isinstance(e, ReviewRequested)]
                if pending:
                    break
                await asyncio.sleep(0.05)
            assert pending and not task.done()
            with pytest.raises((asyncpg.PostgresError, asyncpg.exceptions.ConnectionDoesNotExistError)) as info:
                await asyncio.wait_for(task, 10)
            assert "expired" in str(info.value) or isinstance(info.value,
                                                              asyncpg.exceptions.ConnectionDoesNotExistError)
        finally:
            conn.terminate()
        assert await _closed(hoop) == "access expired"
        review = await hoop.hub.reviews.get(pending[0].id)
        assert review is not None and review.status == "timed_out"
        with pytest.raises(Conflict, match=r"already timed_out"):  # a late Allow changes nothing
            await hoop.hub.reviews.decide(pending[0].id, OPS, True)
        assert await direct.fetchval(f"SELECT count(*) FROM {marker}") == 2


async def test_a_listen_session_is_ended_and_hears_nothing_after(hoop: Hoop, clock: FakeClock) -> None:
    _expire_in(hoop, clock, 1.0)
    conn = await asyncpg.connect(hoop.dsn())
    heard: list[str] = []
    try:
        await conn.add_listener("hoop_probe", lambda *args: heard.append(args[-1]))
        assert await _closed(hoop) == "access expired"
        direct = await _direct(hoop)
        try:
            await direct.execute("NOTIFY hoop_probe, 'after'")
        finally:
            await direct.close()
        await asyncio.sleep(0.3)
        assert conn.is_closed() and heard == []
        assert await _backends(hoop, "LISTEN") == []
    finally:
        conn.terminate()


async def test_a_late_allow_of_a_review_after_the_grant_ended_is_refused(hoop: Hoop, clock: FakeClock) -> None:
    """The grant's end and an approver's Allow arrive together: the Allow must not count."""
    async with _table(hoop, "late", then="INSERT INTO {table} VALUES (1)") as (direct, marker):
        # the review's own deadline (5 minutes) lies past the grant's end; the proxy's timers, armed in real
        # time, fire in a minute, so nothing but the decision itself can see that the grant has ended
        _expire_in(hoop, clock, 60)
        conn = await asyncpg.connect(hoop.dsn())
        task = asyncio.create_task(conn.execute(f"DELETE FROM {marker}"))
        try:
            for _ in range(100):
                pending = [e.review for e in hoop.notifier.events if isinstance(e, ReviewRequested)]
                if pending:
                    break
                await asyncio.sleep(0.05)
            assert pending and not task.done()
            clock.set(hoop.grant.expires_at + timedelta(milliseconds=1))
            with pytest.raises(Conflict, match="ended"):
                await hoop.hub.reviews.decide(pending[0].id, OPS, True)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # refused as for a review that timed out
                await asyncio.wait_for(task, 10)
            assert await direct.fetchval(f"SELECT count(*) FROM {marker}") == 1
            review = await hoop.hub.reviews.get(pending[0].id)
            assert review is not None and review.status == "timed_out"
        finally:
            conn.terminate()
            with contextlib.suppress(Exception):
                await task


async def test_a_client_gone_mid_statement_leaves_nothing_running_upstream(hoop: Hoop) -> None:
    """psql killed while its statement runs: hoop records the session closed, and the statement must not
    run on (and commit) under a session, or a grant, that is over."""
    async with _table(hoop, "gone") as (direct, marker):
        proc = await asyncio.create_subprocess_exec(
            str(hoop.cluster.bindir / "psql"), "-X", "-At", "-c", f"INSERT INTO {marker} SELECT 1 FROM pg_sleep(20)",
            env=hoop.env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            end = time.monotonic() + 10
            while not await _backends(hoop, f"INSERT INTO {marker}") and time.monotonic() < end:
                await asyncio.sleep(0.05)
            assert await _backends(hoop, f"INSERT INTO {marker}") == ["active"]
        finally:
            proc.kill()
            await proc.wait()
        assert await _closed(hoop) == "client closed the connection"
        assert await _until_no_backend(hoop, f"INSERT INTO {marker}", within=5) == []
        assert await direct.fetchval(f"SELECT count(*) FROM {marker}") == 0


class _RevokeWhileConnecting:
    """The real credentials, with the grant revoked while hoop is about to log in upstream (after the
    client's authentication, before the relay starts)."""

    def __init__(self, hoop: Hoop) -> None:
        self.hoop = hoop
        self.inner = hoop.proxy.credentials

    async def for_grant(self, resource: PostgresResource, grant: Grant | None) -> tuple[str, str]:
        if grant is not None:
            await self.hoop.service.revoke(grant.id, ROOT, "incident over")
        return await self.inner.for_grant(resource, grant)


async def _pipelined_login(hoop: Hoop, then: bytes) -> Reader:
    """Log in with SCRAM as a client that sends ``then`` with its last SCRAM message, without waiting for
    ReadyForQuery (as a pipelining client may); returns the connection."""
    loop = asyncio.get_running_loop()
    _, reader = await loop.create_connection(Reader, "127.0.0.1", hoop.port)
    reader.write(codec.encode_startup({"user": hoop.grant.login, "database": "prod-db"}))
    auth = decode_authentication((await reader.message())[1])
    scram = ScramClient(hoop.secret, offered=auth.mechanisms)
    reader.write(codec.encode_sasl_initial_response(scram.mechanism, scram.client_first()))
    auth = decode_authentication((await reader.message())[1])
    reader.write(codec.encode_sasl_response(scram.handle_server_first(auth.data)) + then)
    return reader


async def test_a_statement_pipelined_behind_the_login_does_not_run_when_the_grant_ends_meanwhile(
        hoop: Hoop) -> None:
    async with _table(hoop, "early") as (direct, marker):
        hoop.proxy.credentials = _RevokeWhileConnecting(hoop)
        reader = await _pipelined_login(hoop, codec.encode_query(f"INSERT INTO {marker} VALUES (1)"))
        try:
            fatal = b""
            async with asyncio.timeout(10):
                while True:
                    msg_type, body = await reader.message(1 << 20)
                    if msg_type == Backend.ERROR_RESPONSE:
                        fatal = body
                        break
                    assert msg_type != Backend.COMMAND_COMPLETE, "the statement ran"
        finally:
            assert reader.transport is not None
            reader.transport.close()
        assert b"revoked" in fatal
        assert await _closed(hoop) == "access revoked: incident over"
        await asyncio.sleep(0.3)
        assert await direct.fetchval(f"SELECT count(*) FROM {marker}") == 0
        statements = await hoop.events("statement")
        assert [s for s in statements if marker in s["sql"]] == []


async def test_a_client_that_stopped_reading_is_cut_after_the_grace(hoop: Hoop) -> None:
    """A client that asked for a large result and stopped reading: at the grant's end hoop queues the
    FATAL behind the rows it holds, and a close would wait for the client forever. After the grace the
    connection is reset, so the queued rows and the FATAL never arrive and nothing stays open."""
    hoop.proxy.close_grace = 0.5
    reader = await _pipelined_login(hoop, b"")
    transport = reader.transport
    assert transport is not None
    try:
        async with asyncio.timeout(10):
            while (await reader.message(1 << 20))[0] != Backend.READY_FOR_QUERY:
                pass
        transport.pause_reading()
        reader.write(codec.encode_query("SELECT repeat('x', 10000) FROM generate_series(1, 3000)"))
        await asyncio.sleep(1.0)  # the answer fills the socket buffers, and hoop's own
        await hoop.service.revoke(hoop.grant.id, ROOT, "incident over")
        assert await _closed(hoop) == "access revoked: incident over"
        await asyncio.sleep(1.5)  # past the grace
        transport.resume_reading()
        async with asyncio.timeout(20):
            while not reader.closed:
                await asyncio.sleep(0.05)
                del reader.buf[:-4096]  # keep only the tail: the FATAL, when it came, is at the very end
        assert b"access revoked" not in bytes(reader.buf)
    finally:
        transport.close()


@pytest.mark.parametrize("announced", ["before", "after"], ids=["announced-before", "announced-after"])
async def test_a_grant_extended_shortly_before_its_end_keeps_its_session_until_the_new_end(
        pg: PgCluster, pgdb: str, tmp_path: Path, announced: str) -> None:
    """``announced-after``: the extension is stored before the old end but announced only after it (its side
    effects took that long, or on another replica its notification came late). The relay's own timer must
    not end the session at the old end: the session reads the grant from the store first."""
    clock, hooks = ShiftedClock(), SlowExtendHooks()
    async with running_hoop(pg, pgdb, tmp_path, clock=clock, hooks=hooks) as hoop:
        clock.offset = hoop.grant.expires_at - clock.now() - timedelta(seconds=2)  # the grant ends in 2 s
        conn = await asyncpg.connect(hoop.dsn())
        try:
            old_end = time.monotonic() + (hoop.grant.expires_at - clock.now()).total_seconds()
            await asyncio.sleep(old_end - time.monotonic() - 0.5)
            hooks.delay = 1.5 if announced == "after" else 0.0
            extended = await hoop.service.extend(hoop.grant.id, ROOT, "4s")
            assert isinstance(extended, Grant) and extended.expires_at == hoop.grant.expires_at + timedelta(seconds=4)
            await asyncio.sleep(max(old_end + 1.5 - time.monotonic(), 0))
            assert await conn.fetchval("SELECT 1") == 1, "the session ended at the grant's old end"
            assert await _closed(hoop, within=6) == "access expired"
            ended = time.monotonic()
            with pytest.raises((asyncpg.PostgresError, ConnectionError, asyncpg.InterfaceError)):
                await conn.fetchval("SELECT 1")
        finally:
            await conn.close(timeout=2)
    assert old_end + 4 - 0.1 < ended < old_end + 4 + 1.5, "the session did not end at the grant's new end"


async def test_hoop_stops_in_bounded_time_when_the_database_takes_a_cancel_and_never_answers(
        pg: PgCluster, pgdb: str, tmp_path: Path) -> None:
    """A statement running when hoop stops is cancelled upstream; a database host that accepts the cancel's
    connection and never answers held that cancel (two attempts, each stage bounded: about 20 s) past
    ``stop``, which returned with the relay still waiting on it. The cancel is now given up."""
    stalling = StallingProxy(pg.host, pg.port)
    await stalling.start()
    marker = f"stopping_{secrets.token_hex(4)}"
    try:
        async with running_hoop(pg, pgdb, tmp_path, address=f"127.0.0.1:{stalling.port}") as hoop:
            conn = await asyncpg.connect(hoop.dsn())
            query = asyncio.ensure_future(conn.execute(f"SELECT pg_sleep(30) /* {marker} */"))
            try:
                end = time.monotonic() + 10
                while await _backends(hoop, marker) != ["active"] and time.monotonic() < end:
                    await asyncio.sleep(0.05)
                assert await _backends(hoop, marker) == ["active"]
                relays = list(hoop.proxy._relays)
                stalling.stall(silent=True)  # the session's connection freezes; a cancel's is taken, unanswered
                started = time.monotonic()
                await hoop.proxy.stop()
                assert time.monotonic() - started < 8
                assert relays and all(relay.done.done() for relay in relays)
            finally:
                query.cancel()
                conn.terminate()
    finally:
        direct = await _direct_to(pg, pgdb)
        try:
            await direct.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()", marker)
        finally:
            await direct.close()
        await stalling.close()
