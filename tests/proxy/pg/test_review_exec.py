"""Reviews decide one execution (README Limits, "Reviews of prepared statements"): a cached
prepared statement, a second Bind, SQL PREPARE/EXECUTE are each reviewed again; a cursor fetch
of an allowed portal is not; a refused execution refuses only itself. Real clients, real cluster."""

from __future__ import annotations

import asyncio
import decimal
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from broker.events import ReviewRequested
from tests.proxy.pg.harness import OPS, Hoop, running_hoop
from tests.proxy.pg.test_txn_block import new_table, rows
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.postgres


class Reviewer:
    """Decides the hub's reviews as they come, in order, and keeps their texts."""

    def __init__(self, hoop: Hoop) -> None:
        self.hoop = hoop
        self.seen = 0
        self.texts: list[str] = []

    async def decide(self, allow: bool) -> str:
        for _ in range(200):
            found = [e for e in self.hoop.notifier.events if isinstance(e, ReviewRequested)]
            if len(found) > self.seen:
                review = found[self.seen].review
                self.seen += 1
                self.texts.append(review.text)
                await self.hoop.hub.reviews.decide(review.id, OPS, allow)
                return review.text
            await asyncio.sleep(0.05)
        raise AssertionError("no review was asked for")

    def count(self) -> int:
        return len([e for e in self.hoop.notifier.events if isinstance(e, ReviewRequested)])


async def reviewed(reviewer: Reviewer, call: Any, allow: bool = True) -> tuple[Any, str]:
    task = asyncio.ensure_future(call)
    text = await reviewer.decide(allow)
    return await task, text


async def test_asyncpg_same_statement_twice_is_reviewed_twice(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    t = new_table(pg, pgdb)
    pg.psql(f"INSERT INTO {t} SELECT generate_series(1, 5)", database=pgdb)
    reviewer = Reviewer(hoop)
    conn = await asyncpg.connect(hoop.dsn())
    try:
        sql = f"DELETE FROM {t} WHERE id > $1"
        got, text = await reviewed(reviewer, conn.execute(sql, 4))  # asyncpg prepares and caches it
        assert got == "DELETE 1" and text.startswith(sql) and "$1 = '4'" in text  # binary int4, typed by the server
        got, _ = await reviewed(reviewer, conn.execute(sql, 3))  # the cached statement: Bind/Execute only
        assert got == "DELETE 1"
        assert reviewer.count() == 2
        stmt = await conn.prepare(sql)
        for n in (2, 1):
            got, _ = await reviewed(reviewer, stmt.fetch(n))
        assert reviewer.count() == 4
        assert await conn.fetchval("SELECT 1") == 1  # plain statements are not reviewed
        assert reviewer.count() == 4
    finally:
        await conn.close()
    assert rows(pg, pgdb, t) == [1]


async def test_second_bind_is_reviewed_with_its_masked_parameters(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    t = new_table(pg, pgdb)
    pg.psql(f"INSERT INTO {t} SELECT generate_series(1, 3)", database=pgdb)
    reviewer = Reviewer(hoop)
    # psycopg sends text-format parameters; prepare=True makes it a named, reused statement
    conn = await psycopg.AsyncConnection.connect(hoop.dsn(), autocommit=True)
    try:
        sql = f"DELETE FROM {t} WHERE id = %t AND %t <> 'x'"  # %t: text format
        for n, note in ((1, "bob@example.com"), (2, "line1\nline2 " + "y" * 500)):
            cur, text = await reviewed(reviewer, conn.execute(sql, [n, note], prepare=True))
            assert cur.rowcount == 1
            assert text.startswith(f"DELETE FROM {t} WHERE id = $1 AND $2 <> 'x'"), text
            assert f"$1 = '{n}'" in text
        first, second = reviewer.texts
        assert "bob@example.com" not in first and "[email]" in first  # masked before it is posted
        assert "\\x0a" in second and "\nline2" not in second and "… (" in second and "y" * 201 not in second
        recorded = [e.get("text", "") for e in await hoop.events("review")]
        assert not any("bob@example.com" in r for r in recorded)
    finally:
        await conn.close()
    assert rows(pg, pgdb, t) == [3]


async def test_cursor_fetches_of_an_allowed_portal_are_not_reviewed_again(hoop: Hoop, pg: PgCluster,
                                                                         pgdb: str) -> None:
    t = new_table(pg, pgdb)
    pg.psql(f"INSERT INTO {t} SELECT generate_series(1, 10)", database=pgdb)
    reviewer = Reviewer(hoop)
    conn = await asyncpg.connect(hoop.dsn())
    try:
        async with conn.transaction():
            cur = await conn.cursor(f"DELETE FROM {t} WHERE id > $1 RETURNING id", 0)  # Bind only: runs nothing
            assert reviewer.count() == 0
            first, _ = await reviewed(reviewer, cur.fetch(3))  # the first Execute (with max_rows) is reviewed
            more = await cur.fetch(3)  # later Executes of the same portal
            rest = await cur.fetch(10)
        assert sorted(r["id"] for r in [*first, *more, *rest]) == list(range(1, 11))
        assert reviewer.count() == 1
    finally:
        await conn.close()
    assert rows(pg, pgdb, t) == []


async def test_sql_prepare_is_reviewed_at_each_execute(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    t = new_table(pg, pgdb)
    pg.psql(f"INSERT INTO {t} SELECT generate_series(1, 5)", database=pgdb)
    reviewer = Reviewer(hoop)
    conn = await asyncpg.connect(hoop.dsn())
    try:
        await conn.execute(f"PREPARE d(int) AS DELETE FROM {t} WHERE id >= $1")
        assert reviewer.count() == 0  # PREPARE runs nothing: not held
        got, text = await reviewed(reviewer, conn.execute("EXECUTE d(5)"))
        assert got == "DELETE 1" and text.startswith("EXECUTE d(5)")
        assert f"d may run: PREPARE d(int) AS DELETE FROM {t}" in text
        got, _ = await reviewed(reviewer, conn.execute("EXECUTE d(4)"))  # the same again: asked again
        assert got == "DELETE 1"
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="careful-delete"):
            await reviewed(reviewer, conn.execute("EXECUTE d(3)"), allow=False)
        assert rows(pg, pgdb, t) == [1, 2, 3]
        # through the extended protocol too, and bound by name
        got, _ = await reviewed(reviewer, conn.fetch("EXPLAIN ANALYZE EXECUTE d(1)"))
        assert rows(pg, pgdb, t) == []
        await conn.execute("DEALLOCATE d")
        await conn.execute("PREPARE d(int) AS SELECT $1")
        assert await conn.fetchval("EXECUTE d(3)") == 3
        assert reviewer.count() == 4
    finally:
        await conn.close()


async def test_refused_second_execution_refuses_only_itself(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    t = new_table(pg, pgdb)
    pg.psql(f"INSERT INTO {t} SELECT generate_series(1, 3)", database=pgdb)
    reviewer = Reviewer(hoop)
    conn = await asyncpg.connect(hoop.dsn())
    try:
        sql = f"DELETE FROM {t} WHERE id = $1"
        assert (await reviewed(reviewer, conn.execute(sql, 1)))[0] == "DELETE 1"
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="careful-delete"):
            await reviewed(reviewer, conn.execute(sql, 2), allow=False)
        assert await conn.fetchval("SELECT count(*) FROM " + t) == 2  # the session goes on
        assert (await reviewed(reviewer, conn.execute(sql, 3)))[0] == "DELETE 1"  # asked again, not blocked
        tx = conn.transaction()  # inside a transaction the refusal aborts it, like any refusal
        await tx.start()
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reviewed(reviewer, conn.execute(sql, 2), allow=False)
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.execute("SELECT 1")
        await tx.rollback()
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    assert rows(pg, pgdb, t) == [2]
    statements = await hoop.events("statement")
    assert any(s["decision"] == "block" and s["rule"] == "careful-delete" for s in statements)
    assert any(s["decision"] == "review" and s["rule"] == "careful-delete" for s in statements)


async def test_binary_parameters_of_common_types_are_shown_masked(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    """asyncpg binds every value in binary; the review shows them decoded by the types the server described,
    masked like text, and a placeholder with the type for the rest."""
    t = new_table(pg, pgdb)
    pg.psql(f"INSERT INTO {t} VALUES (1)", database=pgdb)
    reviewer = Reviewer(hoop)
    conn = await asyncpg.connect(hoop.dsn())
    try:
        sql = (f"DELETE FROM {t} WHERE id = $1 AND $2::text IS NOT NULL AND $3::bigint > 0 AND $4::numeric < 0 "
               "AND $5::uuid IS NOT NULL AND $6::timestamptz IS NOT NULL AND $7::bool AND $8::bytea IS NOT NULL "
               "AND $9::date IS NOT NULL AND $10::float8 > 0")
        ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
        got, text = await reviewed(reviewer, conn.execute(
            sql, 1, "mail alice@example.com", 4111111111111111, decimal.Decimal("-12.50"), ident,
            datetime(2026, 12, 1, 8, 0, tzinfo=UTC), True, b"\x00\x01", date(2026, 12, 1), 2.5))
    finally:
        await conn.close()
    assert got == "DELETE 1"
    params = text.split("-- parameters: ", 1)[1]
    assert "alice@example.com" not in params and "4111111111111111" not in params
    for shown in ("$1 = '1'", "$4 = '-12.50'", f"$5 = '{ident}'", "$6 = '2026-12-01 08:00:00+00'", "$7 = 'true'",
                  "$8 = [binary, type 17, 2 bytes]", "$9 = '2026-12-01'", "$10 = '2.5'"):
        assert shown in params, (shown, params)
    assert "$2 = 'mail [email" in params and "$3 = '[card" in params


def test_binary_decoders_refuse_what_they_cannot_read() -> None:
    from proxy.pg.review import parameters

    shown = parameters(None, [1], [b"\x00\x00\x00", b"\x00\x02\x00\x00\x00\x00\x00\x02\x00\x01\x13\x88",
                                    b"\x02{}"], [23, 1700, 3802])
    assert shown == ("\n-- parameters: $1 = [binary, type 23, 3 bytes], $2 = '1.50', "
                     "$3 = [binary, type 3802, 3 bytes]")


async def test_a_review_records_who_refused_and_a_timeout_as_a_timeout(pg: PgCluster, pgdb: str,
                                                                        tmp_path: Path) -> None:
    """A review that nobody decided was recorded as "refused", so the transcript said an approver had
    refused a statement nobody had looked at, and psql was told "review refused"."""
    from broker.recap import session_transcript

    guardrails = {"review_timeout": "1s",
                  "rules": [{"name": "careful-delete", "action": "review", "statements": ["delete"]}]}
    async with running_hoop(pg, pgdb, tmp_path, guardrails=guardrails) as hoop:
        t = new_table(pg, pgdb)
        pg.psql(f"INSERT INTO {t} SELECT generate_series(1, 3)", database=pgdb)
        reviewer = Reviewer(hoop)
        refused, _ = await reviewed(reviewer, hoop.psql("-c", f"DELETE FROM {t} WHERE id = 1"), allow=False)
        timed_out = await hoop.psql("-c", f"DELETE FROM {t} WHERE id = 2")  # nobody decides
        for out in (refused, timed_out):
            assert out.returncode == 1 and "not approved: refused, or no approver decided" in out.stderr, out.stderr
        decided = [e for e in await hoop.events("review") if "decision" in e]
        assert sorted((e["decision"], e.get("by") or "") for e in decided) == [("refused", OPS.email),
                                                                               ("timed_out", "")]
        async with hoop.store.tx() as tx:
            sessions = await tx.list_sessions()
        text = "".join([(await session_transcript(hoop.service, s.id))[1].text for s in sessions])
        by_kind = {e["decision"]: e["review"] for e in decided}
        assert f"review {by_kind['refused']}: refused by {OPS.email}" in text
        assert f"review {by_kind['timed_out']}: timed out: no approver decided in time" in text
    assert rows(pg, pgdb, t) == [1, 2, 3]
