"""Several replicas on one PostgreSQL store: grant changes fan out over LISTEN/NOTIFY, one
scheduler leader holds the advisory lock, and a resync sweep catches what a notification missed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker import policy
from broker.clock import FakeClock
from broker.config import HoopConfig, parse_config
from broker.events import Broadcast, GrantEnded, GrantExtended, RecordingNotifier
from broker.fanout import CHANNEL, Replicas, asyncpg_dsn
from broker.model import Grant, GrantStatus, Identity
from broker.service import Service
from broker.store import Store
from tests.conftest import base_config
from tests.support.pgcluster import PgCluster


def config_without_extension_approval() -> HoopConfig:
    data = base_config()
    data["resources"][0]["extension"] = {"requires_approval": False}
    return parse_config(data)


def who(config: HoopConfig, email: str) -> Identity:
    return Identity(email=email, groups=policy.groups_of(config, email))


async def eventually(check: Callable[[], bool], *, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


class Replica:
    """One broker replica: its own store engine, service, bus and fan-out; ``seen`` records what
    the fan-out hands to the local enforcement targets."""

    def __init__(self, config: HoopConfig, url: str, dsn: str | None, clock: FakeClock, **kw: Any) -> None:
        self.store = Store.from_url(url)
        self.bus = Broadcast()
        self.service = Service(config, self.store, clock, self.bus)
        self.seen = RecordingNotifier()
        self.deadlines: list[datetime] = []
        self.led = 0
        self.live: list[Grant] = []
        self.replicas = Replicas(self.store, dsn, [self.seen], live=lambda: list(self.live),
                                 on_deadline=self.deadlines.append, on_leader=self._lead, **kw)
        self.bus.add(self.replicas)

    async def _lead(self) -> None:
        self.led += 1

    async def close(self) -> None:
        await self.replicas.close()
        await self.store.close()


@pytest.fixture
async def two(pg: PgCluster) -> AsyncIterator[tuple[Replica, Replica, PgCluster, str]]:
    db = pg.create_database("fanout")
    url = pg.sqlalchemy_url(db)
    dsn = asyncpg_dsn(url)
    assert dsn is not None
    clock = FakeClock()
    config = config_without_extension_approval()
    a = Replica(config, url, dsn, clock, retry_every=0.2, resync_every=3600)
    b = Replica(config, url, dsn, clock, retry_every=0.2, resync_every=3600)
    await a.store.migrate()
    await a.replicas.start()
    await b.replicas.start()
    try:
        yield a, b, pg, db
    finally:
        await a.close()
        await b.close()


async def breakglass(r: Replica, config: HoopConfig, duration: str = "1h") -> Grant:
    grant, _secret = await r.service.breakglass(who(config, "root@example.com"), "prod-db", "alice@example.com",
                                                duration, "incident 7")
    return grant


def test_asyncpg_dsn() -> None:
    assert asyncpg_dsn("postgresql+asyncpg://u:p@127.0.0.1:5/db") == "postgresql://u:p@127.0.0.1:5/db"
    assert asyncpg_dsn("postgres://h/db") == "postgresql://h/db"
    assert asyncpg_dsn("sqlite+aiosqlite:///x.db") is None
    assert asyncpg_dsn("nonsense") is None
    assert asyncpg_dsn("postgresql+asyncpg://h/db?ssl=require&prepared_statement_cache_size=0&application_name=x") \
        == "postgresql://h/db?sslmode=require&application_name=x"


@pytest.mark.postgres
async def test_revocation_on_one_replica_reaches_the_other(two: tuple[Replica, Replica, PgCluster, str]) -> None:
    a, b, _pg, _db = two
    config = a.service.config
    grant = await breakglass(a, config)
    await a.service.revoke(grant.id, who(config, "root@example.com"), "suspicious")
    await eventually(lambda: bool(b.seen.of(GrantEnded)))
    ended = b.seen.of(GrantEnded)[0]
    assert ended.grant.id == grant.id and ended.grant.status is GrantStatus.REVOKED
    await asyncio.sleep(0.2)
    assert a.seen.events == []  # a replica never re-applies its own notifications


@pytest.mark.postgres
async def test_extension_and_deadlines_reach_the_other(two: tuple[Replica, Replica, PgCluster, str]) -> None:
    a, b, _pg, _db = two
    config = a.service.config
    grant = await breakglass(a, config, "30m")
    await eventually(lambda: grant.expires_at in b.deadlines)  # the leader learns the new deadline
    extended = await a.service.extend(grant.id, who(config, "alice@example.com"), "30m")
    assert isinstance(extended, Grant)
    await eventually(lambda: bool(b.seen.of(GrantExtended)))
    assert b.seen.of(GrantExtended)[0].grant.expires_at == extended.expires_at
    req = await a.service.request(who(config, "bob@example.com"), "prod-db", "1h", "x")
    await eventually(lambda: req.lapses_at in b.deadlines)


@pytest.mark.postgres
async def test_one_leader_and_failover(two: tuple[Replica, Replica, PgCluster, str]) -> None:
    a, b, _pg, _db = two
    assert a.replicas.is_leader and a.led == 1
    assert not b.replicas.is_leader and b.led == 0
    await a.replicas.close()  # the leader dies: its connection, and the lock, go with it
    await eventually(lambda: b.replicas.is_leader)
    assert b.led == 1


@pytest.mark.postgres
async def test_malformed_notifications_are_ignored(two: tuple[Replica, Replica, PgCluster, str]) -> None:
    a, b, pg, db = two
    for junk in ("not json", "[1,2]", '{"k":"ended","g":42}', '{"k":"ended","g":"g-unknown"}',
                 '{"k":"deadline","at":"yesterday"}'):
        pg.psql(f"SELECT pg_notify('{CHANNEL}', '{junk}')", database=db)
    grant = await breakglass(a, a.service.config)
    await a.service.revoke(grant.id, who(a.service.config, "root@example.com"), "x")
    await eventually(lambda: bool(b.seen.of(GrantEnded)))
    assert [e.grant.id for e in b.seen.events] == [grant.id] and b.deadlines.count(grant.expires_at) == 1


@pytest.mark.postgres
async def test_lost_connection_reconnects_and_resyncs(two: tuple[Replica, Replica, PgCluster, str]) -> None:
    """A revocation made while a replica's listener was cut is applied when it reconnects."""
    a, b, pg, db = two
    config = a.service.config
    grant = await breakglass(a, config)
    b.live.append(grant)
    await b.replicas.close()  # b's listener is down; a's NOTIFY reaches nobody
    await a.service.revoke(grant.id, who(config, "root@example.com"), "while b was away")
    assert b.seen.events == []
    b.replicas._tasks.clear()
    await b.replicas.start()
    await eventually(lambda: bool(b.seen.of(GrantEnded)))
    assert b.seen.of(GrantEnded)[0].grant.end_reason == "while b was away"
    # and a backend killed under it is replaced, with the listener back
    pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' "
            "AND query LIKE 'LISTEN%'", database=db)
    await eventually(lambda: b.replicas.connected and a.replicas.connected, seconds=5)
    second = await breakglass(a, config)
    await a.service.revoke(second.id, who(config, "root@example.com"), "after the cut")
    await eventually(lambda: any(e.grant.id == second.id for e in b.seen.of(GrantEnded)))


async def test_single_process_resync_sees_a_revocation_made_by_another_process(tmp_path: Path) -> None:
    """SQLite, no LISTEN/NOTIFY: ``hoop revoke`` in another process changes the store; the serving
    process's sweep ends the live session's grant."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'hoop.db'}"
    config = config_without_extension_approval()
    clock = FakeClock()
    serving = Replica(config, url, None, clock, resync_every=0.05)
    other = Service(config, serving.store, clock, RecordingNotifier())  # "hoop revoke" elsewhere
    await serving.store.migrate()
    try:
        grant = await breakglass(serving, config)
        serving.live.append(grant)
        assert serving.replicas.is_leader
        await serving.replicas.start()
        await asyncio.sleep(0.2)
        assert serving.seen.events == []  # nothing changed: nothing delivered
        extended = await other.extend(grant.id, who(config, "alice@example.com"), "10m")
        assert isinstance(extended, Grant)
        await eventually(lambda: bool(serving.seen.of(GrantExtended)))
        serving.live[0] = extended
        await other.revoke(grant.id, who(config, "root@example.com"), "from the CLI")
        await eventually(lambda: bool(serving.seen.of(GrantEnded)))
        assert serving.seen.of(GrantEnded)[0].grant.status is GrantStatus.REVOKED
    finally:
        await serving.close()


async def test_only_the_leader_scheduler_acts(tmp_path: Path) -> None:
    from datetime import timedelta

    from broker.scheduler import Scheduler

    url = f"sqlite+aiosqlite:///{tmp_path / 'hoop.db'}"
    config = config_without_extension_approval()
    clock = FakeClock()
    r = Replica(config, url, None, clock)
    await r.store.migrate()
    leading = False
    sched = Scheduler(r.service, clock, leader=lambda: leading)
    try:
        grant = await breakglass(r, config, "10m")
        clock.advance(timedelta(minutes=11))
        assert (await sched.start()).expired == []  # a follower reconciles nothing
        await sched.kick()
        async with r.store.tx() as tx:
            assert (await tx.get_grant(grant.id)).status is GrantStatus.ACTIVE  # type: ignore[union-attr]
        leading = True
        await sched.kick()
        async with r.store.tx() as tx:
            assert (await tx.get_grant(grant.id)).status is GrantStatus.EXPIRED  # type: ignore[union-attr]
    finally:
        sched.shutdown()
        await r.close()


@pytest.mark.postgres
async def test_concurrent_notifications_all_leave_and_keep_the_connection(
        two: tuple[Replica, Replica, PgCluster, str]) -> None:
    """Grant changes published at once from several tasks share the one LISTEN connection: each
    NOTIFY waits its turn, none is refused, and the healthy connection (with the lead) is kept."""
    a, b, _pg, _db = two
    config = a.service.config
    grants = [await breakglass(a, config) for _ in range(5)]
    for g in grants:
        await a.service.revoke(g.id, who(config, "root@example.com"), "x")
    await eventually(lambda: len(b.seen.of(GrantEnded)) == 5)
    b.seen.events.clear()
    conn = a.replicas._conn
    ended = [GrantEnded(grant=g, request=None) for g in grants]
    await asyncio.gather(*(a.replicas.publish(e) for e in ended), *(b.replicas.publish(e) for e in ended))
    await eventually(lambda: len(b.seen.of(GrantEnded)) == 5)
    assert sorted(e.grant.id for e in b.seen.of(GrantEnded)) == sorted(g.id for g in grants)
    await asyncio.sleep(0.5)  # b's lock check runs every 0.2 s alongside its own NOTIFYs
    assert a.replicas._conn is conn and a.replicas.is_leader and a.led == 1
    assert b.replicas.connected and not b.replicas.is_leader


@pytest.mark.postgres
async def test_cancel_digests_reach_the_other_replica_only(two: tuple[Replica, Replica, PgCluster, str]) -> None:
    a, b, pg, db = two
    got_a: list[bytes] = []
    got_b: list[tuple[bytes, str]] = []
    a.replicas.on_cancel = lambda d, _f: got_a.append(d)
    b.replicas.on_cancel = lambda d, f: got_b.append((d, f))
    digest = bytes(range(32))
    assert await a.replicas.ask_cancel(digest, "k1")
    await eventually(lambda: got_b == [(digest, "k1")])
    # malformed cancel notifications (made by hand on the store) are ignored
    conn = await asyncpg.connect(asyncpg_dsn(pg.sqlalchemy_url(db)))
    try:
        for payload in ('{"k": "cancel"}', '{"k": "cancel", "d": "zz"}', '{"k": "cancel", "d": 5}',
                        '{"k": "cancel", "d": "' + "g" * 64 + '"}', '{"k": "cancel", "d": "' + "ab" * 16 + '"}'):
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
    finally:
        await conn.close()
    assert await b.replicas.ask_cancel(b"\x01" * 32)
    await eventually(lambda: got_a == [b"\x01" * 32])
    assert got_b == [(digest, "k1")]  # nothing more, and a replica never hears its own
