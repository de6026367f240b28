"""Upstream TLS: the proxy reaches a PostgreSQL that refuses plain TCP, with sslmode require and
verify-full, and refuses an upstream whose certificate it cannot verify (08006, no secret)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.proxy.pg.harness import running_hoop, seeded_database
from tests.support.certs import Pki, make_pki
from tests.support.pgcluster import PgCluster, pg_cluster

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PgCluster, Pki, str]]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    with pg_cluster(tls=(pki.server_cert, pki.server_key), hba_extra="hostnossl all all 0.0.0.0/0 reject") as pg:
        yield pg, pki, seeded_database(pg)


async def test_plain_tcp_is_refused_by_this_upstream(tls_pg: tuple[PgCluster, Pki, str], tmp_path: Path) -> None:
    pg, _, db = tls_pg
    async with running_hoop(pg, db, tmp_path, sslmode="disable") as hoop:
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(hoop.dsn())
        assert info.value.sqlstate == "08006" and hoop.secret not in str(info.value) \
            and pg.password not in str(info.value)


@pytest.mark.parametrize("mode", ["require", "verify-full"])
async def test_upstream_tls(tls_pg: tuple[PgCluster, Pki, str], tmp_path: Path, mode: str) -> None:
    pg, pki, db = tls_pg
    async with running_hoop(pg, db, tmp_path, sslmode=mode, sslrootcert=str(pki.ca_cert)) as hoop:
        conn = await asyncpg.connect(hoop.dsn())
        try:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
            assert await conn.fetchval("SELECT count(*) FROM users") == 50
        finally:
            await conn.close()


async def test_verify_full_refuses_an_unknown_ca(tls_pg: tuple[PgCluster, Pki, str], tmp_path: Path) -> None:
    pg, _, db = tls_pg
    other = make_pki(tmp_path / "other", ca_name="someone else")
    async with running_hoop(pg, db, tmp_path, sslmode="verify-full", sslrootcert=str(other.ca_cert)) as hoop:
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(hoop.dsn())
        message = str(info.value)
        assert info.value.sqlstate == "08006" and hoop.secret not in message and pg.password not in message
