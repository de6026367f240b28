"""Two approvals racing for the last open slot produce exactly one grant (real PostgreSQL)."""

from __future__ import annotations

import asyncio

import pytest

from broker import policy
from broker.clock import FakeClock
from broker.config import parse_config
from broker.errors import HoopError
from broker.events import GrantIssued, RecordingNotifier
from broker.model import Identity
from broker.service import Service
from broker.store import Store
from tests.conftest import base_config
from tests.support.pgcluster import PgCluster


@pytest.mark.postgres
async def test_last_slot_race_grants_once(pg: PgCluster) -> None:
    data = base_config()
    data["groups"]["dba"]["members"] = [f"dba{i}@example.com" for i in range(8)]
    data["resources"][0]["approval"] = [{"from": "dba", "count": 2}]
    config = parse_config(data)
    # two independent services (two "replicas") on one database
    url = pg.sqlalchemy_url(pg.create_database("race"))
    stores = [Store.from_url(url), Store.from_url(url)]
    await stores[0].migrate()
    notifier = RecordingNotifier()
    services = [Service(config, s, FakeClock(), notifier) for s in stores]

    def who(email: str) -> Identity:
        return Identity(email=email, groups=policy.groups_of(config, email))

    try:
        for round_ in range(5):
            req = await services[0].request(who("alice@example.com"), "prod-db", "1h", f"race {round_}")
            await services[0].approve(req.id, who("dba0@example.com"))
            results = await asyncio.gather(
                *(services[i % 2].approve(req.id, who(f"dba{i}@example.com")) for i in range(1, 8)),
                return_exceptions=True)
            grants = [r for r in results if not isinstance(r, BaseException) and r.grant is not None]
            errors = [r for r in results if isinstance(r, BaseException)]
            assert all(isinstance(e, HoopError) for e in errors), errors
            assert len(grants) == 1
        assert len(notifier.of(GrantIssued)) == 5
        async with stores[0].tx() as tx:
            assert len(await tx.list_grants()) == 5
    finally:
        for s in stores:
            await s.close()
