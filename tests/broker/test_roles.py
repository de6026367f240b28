"""Ephemeral database roles against a real PostgreSQL: created per grant, dropped at its end,
and dropped at start for grants that ended while hoop was down."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from broker import policy
from broker.clock import FakeClock
from broker.config import HoopConfig, parse_config
from broker.delegation import delegate
from broker.events import GrantExtended, GrantIssued, RecordingNotifier
from broker.model import Grant, Identity
from broker.roles import EphemeralRoles, load_key
from broker.scheduler import Scheduler
from broker.service import Service
from broker.store import Store
from tests.conftest import base_config
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.postgres


def ephemeral_config(pg: PgCluster, database: str) -> HoopConfig:
    data = base_config()
    data["resources"][0].update(address=f"127.0.0.1:{pg.port}", database=database, credentials="ephemeral",
                                admin_user="postgres", admin_credential={"env": "PG_ADMIN"}, roles=["app_reader"],
                                credential=None, extension={"requires_approval": False})
    return parse_config(data)


def who(config: HoopConfig, email: str) -> Identity:
    return Identity(email=email, groups=policy.groups_of(config, email))


async def roles_named(pg: PgCluster, role: str) -> list[str]:
    conn = await asyncpg.connect(pg.dsn())
    try:
        return [r["rolname"] for r in await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname = $1", role)]
    finally:
        await conn.close()


async def test_role_lives_exactly_as_long_as_the_grant(pg: PgCluster, tmp_path: Path) -> None:
    db = pg.create_database("eph")
    pg.psql("DO $$ BEGIN CREATE ROLE app_reader NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    pg.psql("CREATE TABLE invoices (id int); INSERT INTO invoices VALUES (4411); "
            "GRANT SELECT ON invoices TO app_reader; GRANT CREATE ON SCHEMA public TO app_reader", database=db)
    config = ephemeral_config(pg, db)
    clock = FakeClock()
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    await store.migrate()
    roles = EphemeralRoles(config, {"PG_ADMIN": pg.password}, load_key(tmp_path / "state"))
    service = Service(config, store, clock, RecordingNotifier(), hooks=roles)
    try:
        req = await service.request(who(config, "alice@example.com"), "prod-db", "1h", "x")
        await service.approve(req.id, who(config, "dana@example.com"))
        result = await service.approve(req.id, who(config, "sam@example.com"))
        grant = result.grant
        assert grant is not None and grant.db_role == f"hoop_{grant.id}"
        res = config.resource("prod-db")
        user, password = await roles.for_grant(res, grant)  # type: ignore[arg-type]
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user=user, password=password, database=db)
        assert await conn.fetchval("SELECT id FROM invoices") == 4411
        valid_until = await conn.fetchval("SELECT rolvaliduntil FROM pg_roles WHERE rolname = current_user")
        assert abs((valid_until - grant.expires_at).total_seconds()) < 1
        await conn.execute("CREATE TEMP TABLE scratch (x int)")
        await conn.execute("CREATE TABLE notes (x int)")  # the role owns it: kept, handed to the admin at the end
        # extension moves VALID UNTIL
        await service.extend(grant.id, who(config, "alice@example.com"), "30m")
        moved = await conn.fetchval("SELECT rolvaliduntil FROM pg_roles WHERE rolname = current_user")
        assert abs((moved - grant.expires_at - timedelta(minutes=30)).total_seconds()) < 1
        # the grant ends: backends terminated, role dropped
        clock.advance(timedelta(minutes=90))
        assert (await Scheduler(service, clock).run_due()).expired == [grant.id]
        with pytest.raises((asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.ConnectionDoesNotExistError,
                            asyncpg.exceptions.InterfaceError, ConnectionError)):
            await conn.fetchval("SELECT 1")
        assert await roles_named(pg, user) == []
        assert pg.psql("SELECT tableowner FROM pg_tables WHERE tablename = 'notes'", database=db) == "postgres"
        with pytest.raises(asyncpg.exceptions.InvalidPasswordError):
            await asyncpg.connect(host="127.0.0.1", port=pg.port, user=user, password=password, database=db)
    finally:
        await store.close()


async def test_reconcile_drops_roles_of_grants_ended_while_down(pg: PgCluster, tmp_path: Path) -> None:
    db = pg.create_database("eph")
    pg.psql("DO $$ BEGIN CREATE ROLE app_reader NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    config = ephemeral_config(pg, db)
    clock = FakeClock()
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    await store.migrate()
    key = load_key(tmp_path / "state")
    roles = EphemeralRoles(config, {"PG_ADMIN": pg.password}, key)
    try:
        service = Service(config, store, clock, RecordingNotifier(), hooks=roles)
        grants = []
        for length in ("10m", "2h"):
            req = await service.request(who(config, "alice@example.com"), "prod-db", length, "x")
            await service.approve(req.id, who(config, "dana@example.com"))
            grants.append((await service.approve(req.id, who(config, "sam@example.com"))).grant)
        # hoop "goes down"; the first grant's expiry passes; the store is marked without the hook running
        clock.advance(timedelta(minutes=30))
        plain = Service(config, store, clock, RecordingNotifier())
        await Scheduler(plain, clock).run_due()
        short, long_ = grants
        assert short is not None and long_ is not None
        assert await roles_named(pg, f"hoop_{short.id}") == [f"hoop_{short.id}"]
        # restart: reconciliation drops it, keeps the live one
        dropped = await EphemeralRoles(config, {"PG_ADMIN": pg.password}, load_key(tmp_path / "state")).reconcile(store)
        assert dropped == [f"hoop_{short.id}"]
        assert await roles_named(pg, f"hoop_{long_.id}") == [f"hoop_{long_.id}"]
        assert load_key(tmp_path / "state") == key
    finally:
        await store.close()


async def test_reconcile_leaves_alone_the_roles_that_are_not_an_ended_grant_s(pg: PgCluster, tmp_path: Path) -> None:
    """Every ``hoop_…`` role the store did not know as a live grant was dropped at start, after its objects
    were taken and its privileges revoked: a membership role an operator named ``hoop_…`` (the one ephemeral
    logins are granted), and the live roles of another hoop using the same database server."""
    db = pg.create_database("eph")
    pg.psql("DO $$ BEGIN CREATE ROLE hoop_readers NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    pg.psql("CREATE TABLE invoices (id int); GRANT SELECT ON invoices TO hoop_readers", database=db)
    data = base_config()
    data["resources"][0].update(address=f"127.0.0.1:{pg.port}", database=db, credentials="ephemeral",
                                admin_user="postgres", admin_credential={"env": "PG_ADMIN"}, roles=["hoop_readers"],
                                credential=None)
    config = parse_config(data)
    clock = FakeClock()
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    await store.migrate()
    roles = EphemeralRoles(config, {"PG_ADMIN": pg.password}, load_key(tmp_path / "state"))
    # another hoop's live grant on the same server: a role named as hoop names them, unknown to this store
    foreign = "hoop_g2345abcd"
    pg.psql(f"CREATE ROLE {foreign} LOGIN PASSWORD 'x' IN ROLE hoop_readers")
    try:
        service = Service(config, store, clock, RecordingNotifier(), hooks=roles)
        req = await service.request(who(config, "alice@example.com"), "prod-db", "10m", "x")
        await service.approve(req.id, who(config, "dana@example.com"))
        ended = (await service.approve(req.id, who(config, "sam@example.com"))).grant
        assert ended is not None
        clock.advance(timedelta(minutes=30))  # it ends while hoop is "down"
        await Scheduler(Service(config, store, clock, RecordingNotifier()), clock).run_due()
        dropped = await roles.reconcile(store)
        assert dropped == [f"hoop_{ended.id}"]
        assert await roles_named(pg, "hoop_readers") == ["hoop_readers"]
        assert await roles_named(pg, foreign) == [foreign]
        assert pg.psql("SELECT has_table_privilege('hoop_readers', 'invoices', 'SELECT')", database=db) == "t"
    finally:
        await store.close()
        pg.psql(f"DROP DATABASE {db}")  # (with the privileges granted in it)
        pg.psql(f"DROP ROLE IF EXISTS {foreign}")
        pg.psql("DROP ROLE IF EXISTS hoop_readers")


async def test_a_role_the_database_refuses_is_logged_and_the_grant_still_announced(
        pg: PgCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A database error while making or moving the role (a configured role that does not exist, a role dropped
    behind hoop's back) escaped as asyncpg's exception after the grant was stored: the approval "failed", the
    credential never reached the requester and an extension was never announced. They are now the
    upstream failures hoop logs, as when the database cannot be reached."""
    db = pg.create_database("eph")
    data = base_config()
    data["resources"][0].update(address=f"127.0.0.1:{pg.port}", database=db, credentials="ephemeral",
                                admin_user="postgres", admin_credential={"env": "PG_ADMIN"}, roles=["no_such_role"],
                                credential=None, extension={"requires_approval": False})
    config = parse_config(data)
    clock = FakeClock()
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    await store.migrate()
    notifier = RecordingNotifier()
    roles = EphemeralRoles(config, {"PG_ADMIN": pg.password}, load_key(tmp_path / "state"))
    service = Service(config, store, clock, notifier, hooks=roles)
    try:
        req = await service.request(who(config, "alice@example.com"), "prod-db", "1h", "x")
        await service.approve(req.id, who(config, "dana@example.com"))
        with caplog.at_level("ERROR"):
            grant = (await service.approve(req.id, who(config, "sam@example.com"))).grant
        assert grant is not None and grant.db_role is None
        assert [e.grant.id for e in notifier.of(GrantIssued)] == [grant.id]
        assert any(f"grant={grant.id} upstream set-up failed" in r.getMessage() and "no_such_role" in r.getMessage()
                   for r in caplog.records)
        assert all(roles.password(grant.id) not in r.getMessage() for r in caplog.records)
        caplog.clear()
        with caplog.at_level("ERROR"):  # no role to move: the extension stands and is announced all the same
            extended = await service.extend(grant.id, who(config, "alice@example.com"), "30m")
        assert [e.grant.id for e in notifier.of(GrantExtended)] == [grant.id]
        assert extended.expires_at == grant.expires_at + timedelta(minutes=30)  # type: ignore[union-attr]
        assert any(f"grant={grant.id} upstream update failed" in r.getMessage() for r in caplog.records)
        caplog.clear()
        with caplog.at_level("ERROR"):  # a delegated child too: handed out (it was a 502, the child left live)
            assert isinstance(extended, Grant)
            child, secret = await delegate(service, extended, who(config, "alice@example.com"), ["prod-db"], "10m",
                                           "migration-script")
        assert child.db_role is None and secret
        assert [e.grant.id for e in notifier.of(GrantIssued)] == [grant.id, child.id]
        assert any(f"grant={child.id} upstream set-up failed" in r.getMessage() for r in caplog.records)
    finally:
        await store.close()


async def test_a_role_that_cannot_be_dropped_does_not_stop_reconciliation_of_the_others(
        pg: PgCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A role owning a table in another database cannot be dropped (hoop cleans up in the resource's database
    only): its error ended the walk, so the other ended grants' roles stayed, and ``hoop serve`` stopped."""
    db, other = pg.create_database("eph"), pg.create_database("other")
    pg.psql("DO $$ BEGIN CREATE ROLE app_reader NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    config = ephemeral_config(pg, db)
    clock = FakeClock()
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    await store.migrate()
    roles = EphemeralRoles(config, {"PG_ADMIN": pg.password}, load_key(tmp_path / "state"))
    try:
        service = Service(config, store, clock, RecordingNotifier(), hooks=roles)
        grants = []
        for _ in range(2):
            req = await service.request(who(config, "alice@example.com"), "prod-db", "10m", "x")
            await service.approve(req.id, who(config, "dana@example.com"))
            grant = (await service.approve(req.id, who(config, "sam@example.com"))).grant
            assert grant is not None
            grants.append(f"hoop_{grant.id}")
        stuck, droppable = sorted(grants)  # (the walk goes in name order)
        pg.psql(f"CREATE TABLE kept (x int); ALTER TABLE kept OWNER TO {stuck}", database=other)
        clock.advance(timedelta(minutes=30))
        await Scheduler(Service(config, store, clock, RecordingNotifier()), clock).run_due()  # ended while "down"
        with caplog.at_level("ERROR", logger="broker.roles"):
            assert await roles.reconcile(store) == [droppable]
        assert await roles_named(pg, droppable) == []
        assert await roles_named(pg, stuck) == [stuck]
        assert any(f"dropping role {stuck} failed" in r.getMessage() for r in caplog.records)
    finally:
        await store.close()
        pg.psql(f"DROP DATABASE {other}")
        pg.psql(f"DROP ROLE IF EXISTS {stuck}")
