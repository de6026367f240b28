"""The Alembic migrations create exactly the tables the code uses (broker/store/tables.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import JSON, Integer, LargeBinary, String, column, insert, select, table, text

from broker import eventlines, policy
from broker.errors import Denied
from broker.model import AccessRequest, Identity, RequestStatus, StepSpec
from broker.store import Store
from broker.store import tables as t
from broker.store.migrate import current, downgrade, upgrade
from tests.support.pgcluster import PgCluster

HEAD = "0006"


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
        assert await current(stores[0].engine) == HEAD
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
        assert await current(store.engine) == HEAD
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


_CHUNKS = table("session_event_chunks", column("id", Integer), column("session_id", String),
                column("first_seq", Integer), column("last_seq", Integer), column("lines", String),
                column("packed", LargeBinary))


def _lines(sid: str, first: int, last: int, pad: int) -> str:
    at = datetime(2026, 12, 1, 5, 0, 0, 1, tzinfo=UTC)
    return "".join(eventlines.line(seq, (at + timedelta(seconds=seq)).isoformat(timespec="microseconds"), "http",
                                   eventlines.encode_data({"path": f"/v1/{sid}/{seq}", "body": "é\u2028x" * pad}))
                   for seq in range(first, last + 1))


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_0004_packs_long_chunks_reads_both_forms_and_unpacks_on_downgrade(
        dialect: str, tmp_path: Any, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> None:
    if dialect == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'packed.db'}"
    else:
        pg: PgCluster = request.getfixturevalue("pg")
        url = pg.sqlalchemy_url(pg.create_database("packed"))
    store = Store.from_url(url)
    try:
        await upgrade(store.engine, "0003")
        old_text = _lines("s_a", 1, 40, 20)  # written by a replica before 0004: text, however long
        async with store.engine.begin() as conn:
            await conn.execute(insert(table("session_event_chunks", column("session_id", String),
                                            column("first_seq", Integer), column("last_seq", Integer),
                                            column("lines", String)))
                               .values(session_id="s_a", first_seq=1, last_seq=40, lines=old_text))
        await store.migrate()
        assert await current(store.engine) == HEAD

        long_text, short_text = _lines("s_a", 41, 80, 20), _lines("s_a", 81, 81, 0)
        assert len(long_text) >= eventlines.PACK_MIN > len(short_text)
        many = [("s_b", n * 10 + 1, n * 10 + 10, _lines("s_b", n * 10 + 1, n * 10 + 10, 300)) for n in range(30)]
        assert sum(len(c[3]) for c in many) >= 256 * 1024  # (packed in a worker thread)
        async with store.tx() as tx:
            await tx.add_event_chunks([("s_a", 41, 80, long_text), ("s_a", 81, 81, short_text)])
            await tx.add_event_chunks(many)
        async with store.engine.connect() as conn:
            stored = {(r.session_id, r.first_seq): r for r in (await conn.execute(select(_CHUNKS))).all()}
        assert stored["s_a", 1].packed is None and stored["s_a", 1].lines == old_text
        assert stored["s_a", 41].lines == "" and eventlines.unpack(stored["s_a", 41].packed) == long_text
        assert len(stored["s_a", 41].packed) * 5 < len(long_text.encode())
        assert stored["s_a", 81].packed is None and stored["s_a", 81].lines == short_text
        assert all(stored["s_b", c[1]].packed is not None for c in many)

        want_a = eventlines.decode("s_a", old_text + long_text + short_text)
        want_b = eventlines.decode("s_b", "".join(c[3] for c in many))
        async with store.tx() as tx:
            assert await tx.events("s_a") == want_a and len(want_a) == 81
            assert await tx.events("s_b") == want_b and len(want_b) == 300
            assert await tx.events("s_a", limit=45) == want_a[:45]

        # a damaged packed chunk: logged and skipped, never a failure to read the rest
        async with store.engine.begin() as conn:
            await conn.execute(_CHUNKS.update().where(_CHUNKS.c.session_id == "s_b", _CHUNKS.c.first_seq == 11)
                               .values(packed=b"not zlib at all"))
        async with store.tx() as tx:
            got = await tx.events("s_b")
        assert [e.seq for e in got] == [e.seq for e in want_b if not 11 <= e.seq <= 20]
        assert "s_b" in caplog.text and "damaged" in caplog.text
        async with store.engine.begin() as conn:
            await conn.execute(_CHUNKS.update().where(_CHUNKS.c.session_id == "s_b", _CHUNKS.c.first_seq == 11)
                               .values(packed=eventlines.pack(many[1][3])))

        await downgrade(store.engine, "0003")
        old = table("session_event_chunks", column("session_id", String), column("first_seq", Integer),
                    column("lines", String))
        async with store.engine.connect() as conn:
            rows = (await conn.execute(select(old).order_by(old.c.session_id, old.c.first_seq))).all()
        assert [r.lines for r in rows if r.session_id == "s_a"] == [old_text, long_text, short_text]
        assert "".join(r.lines for r in rows if r.session_id == "s_b") == "".join(c[3] for c in many)
    finally:
        await store.close()


_OLD_APPROVALS = table("approvals", column("request_id", String), column("approver", String),
                       column("groups", JSON), column("at", t.UtcDateTime()), column("via", String))


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_0005_fills_pending_approvals_chains_from_the_audit_log(dialect: str, tmp_path: Any,
                                                                       request: pytest.FixtureRequest) -> None:
    if dialect == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'chains.db'}"
    else:
        pg: PgCluster = request.getfixturevalue("pg")
        url = pg.sqlalchemy_url(pg.create_database("chains"))
    store = Store.from_url(url)
    at = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    agent_chain = ("alice@example.com", "ci-runner")

    def req(rid: str, status: RequestStatus) -> AccessRequest:
        return AccessRequest(id=rid, resource="reports-db", requester="bob@example.com", chain=("bob@example.com",),
                             duration=timedelta(minutes=30), reason="x", status=status, created_at=at,
                             lapses_at=at + timedelta(hours=1), steps=(StepSpec("eng", 2),))

    try:
        await upgrade(store.engine, "0004")
        async with store.tx() as tx:  # as the code before 0005 left them: the chain only in the audit log
            for rid, status in (("r_pending", RequestStatus.PENDING), ("r_done", RequestStatus.APPROVED)):
                await tx.insert_request(req(rid, status))
                await tx.append_audit(at=at, actor="ci-runner", chain=agent_chain, action="request.approval",
                                      request_id=rid, detail={})
                await tx.append_audit(at=at, actor="Carol@Example.com", chain=("Carol@Example.com",),
                                      action="request.approval", request_id=rid, detail={})
        async with store.engine.begin() as conn:
            await conn.execute(insert(_OLD_APPROVALS), [
                {"request_id": rid, "approver": who, "groups": ["eng"], "at": at, "via": "api"}
                for rid in ("r_pending", "r_done") for who in ("ci-runner", "carol@example.com")])
        await store.migrate()
        assert await current(store.engine) == HEAD
        async with store.tx() as tx:
            pending, done = await tx.get_request("r_pending"), await tx.get_request("r_done")
        assert pending is not None and done is not None
        assert [a.chain for a in pending.approvals] == [agent_chain, ("Carol@Example.com",)]
        assert [a.chain for a in done.approvals] == [(), ()]  # decided: left NULL, read as the approver alone
        pending.approvals = pending.approvals[:1]
        with pytest.raises(Denied) as exc:  # alice already counts through her agent's approval
            policy.assign(pending, Identity(email="alice@example.com", groups=frozenset({"eng"})))
        assert exc.value.code == "duplicate"

        await downgrade(store.engine, "0004")
        async with store.engine.connect() as conn:
            assert len((await conn.execute(select(_OLD_APPROVALS.c.approver))).all()) == 4
    finally:
        await store.close()


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_0006_reaction_and_extension_lookups_use_an_index(dialect: str, tmp_path: Any,
                                                                 request: pytest.FixtureRequest) -> None:
    """Every Slack reaction looks up the card or review message it is on: a scan of every request
    and review ever made, before 0006."""
    if dialect == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'ix.db'}"
        explain = "EXPLAIN QUERY PLAN "
    else:
        pg: PgCluster = request.getfixturevalue("pg")
        url = pg.sqlalchemy_url(pg.create_database("ix"))
        explain = "EXPLAIN "
    store = Store.from_url(url)
    lookups = {
        "ix_requests_card": "SELECT id FROM requests WHERE card_channel = 'C1' AND card_ts = '1.2'",
        "ix_requests_extends_grant": "SELECT id FROM requests WHERE extends_grant = 'g1' AND status = 'pending'",
        "ix_reviews_message": "SELECT id FROM reviews WHERE channel = 'C1' AND ts = '1.2'",
    }
    try:
        await store.migrate()
        async with store.engine.begin() as conn:
            if dialect == "postgres":  # on a small table PostgreSQL rightly prefers a scan
                await conn.execute(text("SET LOCAL enable_seqscan = off"))
            for index, sql in lookups.items():
                plan = " ".join(str(r) for r in (await conn.execute(text(explain + sql))).all())
                assert index in plan, (index, plan)
        await downgrade(store.engine, "0005")
        assert await current(store.engine) == "0005"
        await store.migrate()
    finally:
        await store.close()
