"""The Alembic migrations create exactly the tables the code uses (broker/store/tables.py)."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from broker.store import Store
from broker.store import tables as t


async def test_migrations_match_the_tables(store: Store) -> None:
    def diff(sync_conn: Any) -> list[Any]:
        ctx = MigrationContext.configure(sync_conn, opts={"compare_type": False})
        return [d for d in compare_metadata(ctx, t.metadata) if not (d[0] == "remove_table"
                                                                       and d[1].name == "alembic_version")]

    async with store.engine.connect() as conn:
        assert await conn.run_sync(diff) == []
