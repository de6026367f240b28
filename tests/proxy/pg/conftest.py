"""The PostgreSQL proxy tests' usual fixtures: a seeded upstream database per test module and
a running hoop PostgreSQL proxy in front of it (a module may override either)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.proxy.pg.harness import Hoop, running_hoop, seeded_database
from tests.support.pgcluster import PgCluster


@pytest.fixture(scope="module")
def pgdb(pg: PgCluster) -> str:
    return seeded_database(pg)


@pytest.fixture
async def hoop(pg: PgCluster, pgdb: str, tmp_path: Path) -> AsyncIterator[Hoop]:
    async with running_hoop(pg, pgdb, tmp_path) as h:
        yield h
