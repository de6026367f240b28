"""Races between replicas on a real PostgreSQL: two approvals for the last open slot produce
exactly one grant; a revoke and a delegation below it do not deadlock."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import text

from broker import policy
from broker.clock import FakeClock
from broker.config import parse_config
from broker.delegation import delegate
from broker.errors import HoopError
from broker.events import GrantIssued, RecordingNotifier
from broker.model import Grant, GrantStatus, Identity
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


async def _lock_waiters(store: Store) -> int:
    async with store.tx() as tx:
        return int((await tx.conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"))).scalar_one())


async def _until_waiting(store: Store, n: int) -> None:
    async with asyncio.timeout(10):
        while await _lock_waiters(store) < n:
            await asyncio.sleep(0.02)


@pytest.mark.postgres
@pytest.mark.parametrize("second", ["delegate", "expire"])
async def test_revoking_a_parent_does_not_deadlock_with_work_on_its_child(pg: PgCluster, second: str) -> None:
    """A revoke of R ends R's child C. A delegation from C, or C's own expiry, locks C and then
    appends audit. The revoke used to append audit (taking the audit lock) before it locked C,
    so the two deadlocked and one failed with a database error. Here a third transaction holds
    the audit lock while both queue for it, the revoke first: the order that closed the cycle."""
    config = parse_config(base_config())
    store = Store.from_url(pg.sqlalchemy_url(pg.create_database(f"deadlock_{second}")))
    await store.migrate()
    clock = FakeClock()
    service = Service(config, store, clock, RecordingNotifier())
    root = Identity(email="root@example.com", groups=policy.groups_of(config, "root@example.com"))
    try:
        r, _ = await service.breakglass(root, "prod-db", "root@example.com", "1h", "outage")
        c, _ = await delegate(service, r, root, ["prod-db"], "10m", "agent")
        if second == "expire":
            clock.advance(timedelta(minutes=20))  # C is due to expire, R is not
        async with store.tx() as blocker:
            await blocker.append_audit(at=clock.now(), actor="test", chain=("test",), action="test.hold")
            revoking = asyncio.create_task(service.revoke(r.id, root, "contained"))
            await _until_waiting(store, 1)
            if second == "delegate":
                other = asyncio.create_task(delegate(service, c, root, ["prod-db"], None, "deeper"))
            else:
                other = asyncio.create_task(service.expire(c.id))
            await _until_waiting(store, 2)
        async with asyncio.timeout(30):
            revoked, result = await asyncio.gather(revoking, other, return_exceptions=True)
        assert isinstance(revoked, Grant) and revoked.status is GrantStatus.REVOKED, revoked
        # the revoke went first, so the delegation is refused and the expiry finds C ended
        assert isinstance(result, HoopError), result
        async with store.tx() as tx:
            child = await tx.get_grant(c.id)
        assert child is not None and child.status is GrantStatus.REVOKED
    finally:
        await store.close()
