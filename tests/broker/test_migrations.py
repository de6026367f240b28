"""The Alembic migrations create exactly the tables the code uses (broker/store/tables.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import JSON, Integer, String, column, insert, select, table

from broker.store import Store
from broker.store import tables as t
from broker.store.migrate import current, downgrade, upgrade
from tests.support.pgcluster import PgCluster


async def test_migrations_match_the_tables(store: Store) -> None:
    def diff(sync_conn: Any) -> list[Any]:
        ctx = MigrationContext.configure(sync_conn, opts={"compare_type": False})
        return [d for d in compare_metadata(ctx, t.metadata) if not (d[0] == "remove_table"
                                                                       and d[1].name == "alembic_version")]

    async with store.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


@pytest.mark.postgres
async def test_replicas_migrating_at_once_on_postgresql(pg: PgCluster) -> None:
    """Four replicas start together on an empty database: one migrates, the others wait, none fails."""
    url = pg.sqlalchemy_url(pg.create_database("migrate"))
    stores = [Store.from_url(url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.migrate() for s in stores))
        assert await current(stores[0].engine) == "0003"
    finally:
        for s in stores:
            await s.close()


_OLD_EVENTS = table("session_events", column("session_id", String), column("seq", Integer),
                    column("at", t.UtcDateTime()), column("kind", String), column("data", JSON))


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_0003_moves_recorded_events_into_chunks_and_back(dialect: str, tmp_path: Any,
                                                               request: pytest.FixtureRequest) -> None:
    if dialect == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    else:
        pg: PgCluster = request.getfixturevalue("pg")
        url = pg.sqlalchemy_url(pg.create_database("chunks"))
    store = Store.from_url(url)
    try:
        await upgrade(store.engine, "0002")
        at = datetime(2026, 12, 1, 3, 0, 0, 123456, tzinfo=UTC)
        rows = [{"session_id": sid, "seq": seq, "at": at + timedelta(seconds=seq), "kind": "statement",
                 "data": {"sql": f"SELECT {seq}", "note": "é \u2028"}}
                for sid in ("s_a", "s_b") for seq in range(1, 6)]
        rows.append({"session_id": "s_c", "seq": 1, "at": at, "kind": "open", "data": {"login": "x"}})
        async with store.engine.begin() as conn:
            await conn.execute(insert(_OLD_EVENTS), rows)
        await store.migrate()
        assert await current(store.engine) == "0003"
        for sid in ("s_a", "s_b", "s_c"):
            async with store.tx() as tx:
                got = await tx.events(sid)
                assert await tx.max_event_seq(sid) == len(got)
            want = [r for r in rows if r["session_id"] == sid]
            assert [(e.seq, e.at, e.kind, e.data) for e in got] == [(r["seq"], r["at"], r["kind"], r["data"])
                                                                     for r in want]
        async with store.engine.connect() as conn:
            assert len((await conn.execute(select(t.session_event_chunks.c.id))).all()) == 3
            assert (await conn.execute(select(_OLD_EVENTS.c.seq))).all() == []  # moved, table kept

        # a rolling upgrade: a replica still on the old code stores more of s_c's events as rows
        late = [{"session_id": "s_c", "seq": seq, "at": at, "kind": "statement", "data": {"sql": f"late {seq}"}}
                for seq in (2, 3)]
        async with store.engine.begin() as conn:
            await conn.execute(insert(_OLD_EVENTS), late)
        async with store.tx() as tx:
            assert [e.seq for e in await tx.events("s_c")] == [1, 2, 3]
            assert [e.data for e in await tx.events("s_c", limit=2)] == [{"login": "x"}, {"sql": "late 2"}]
            assert await tx.max_event_seq("s_c") == 3
        async with store.engine.begin() as conn:
            await conn.execute(_OLD_EVENTS.delete().where(_OLD_EVENTS.c.session_id == "s_c",
                                                          _OLD_EVENTS.c.seq > 1))

        await downgrade(store.engine, "0002")
        async with store.engine.connect() as conn:
            back = (await conn.execute(select(_OLD_EVENTS).order_by(_OLD_EVENTS.c.session_id,
                                                                    _OLD_EVENTS.c.seq))).all()
        assert [dict(r._mapping) for r in back] == rows
    finally:
        await store.close()
