"""Shared fixtures: a real PostgreSQL cluster per test session, stores over SQLite and PostgreSQL,
a fake clock, and a recording notifier."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.clock import FakeClock
from broker.config import HoopConfig, parse_config
from broker.events import RecordingNotifier
from broker.service import Service
from broker.store import Store
from tests.support.pgcluster import PgCluster, pg_cluster


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    with pg_cluster() as cluster:
        yield cluster


def base_config(**overrides: Any) -> dict[str, Any]:
    """A small, valid config as a dict; tests change what they need."""
    data: dict[str, Any] = {
        "admins": "admins",
        "groups": {
            "admins": {"members": ["root@example.com"]},
            "eng": {"members": ["alice@example.com", "bob@example.com", "carol@example.com"]},
            "dba": {"members": ["dana@example.com", "erin@example.com"]},
            "security": {"members": ["sam@example.com", "erin@example.com"]},
        },
        "resources": [{
            "name": "prod-db", "kind": "postgres", "address": "127.0.0.1:5432", "credential": {"env": "PGPW"},
            "channel": "C1", "request": {"groups": ["eng"], "max_duration": "4h", "default_duration": "30m"},
            "approval": [{"from": "dba", "count": 1}, {"from": "security", "count": 1}],
            "pending_ttl": "1h",
        }],
    }
    data.update(overrides)
    return data


@pytest.fixture
def config() -> HoopConfig:
    return parse_config(base_config())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def notifier() -> RecordingNotifier:
    return RecordingNotifier()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'hoop.db'}")
    else:
        cluster: PgCluster = request.getfixturevalue("pg")
        s = Store.from_url(cluster.sqlalchemy_url(cluster.create_database("store")))
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def service(config: HoopConfig, store: Store, clock: FakeClock, notifier: RecordingNotifier) -> Service:
    return Service(config, store, clock, notifier)
