"""The Alembic migrations create exactly the tables the code uses (broker/store/tables.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from broker.store import Store
from broker.store import tables as t
from broker.store.migrate import current
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
        assert await current(stores[0].engine) == "0002"
    finally:
        for s in stores:
            await s.close()
