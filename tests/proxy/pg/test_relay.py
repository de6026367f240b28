"""The proxy with real clients: psql, asyncpg, psycopg 3 against a scram upstream."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.proxy.pg.harness import Hoop, running_hoop
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.postgres


async def test_psql_select_masks_and_records(hoop: Hoop) -> None:
    out = await hoop.psql("-c", "SELECT id, email, card, note FROM users WHERE id = 7")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "7|[email]|***************1111|[masked]"
    events = await hoop.events("statement")
    done = [e for e in events if e["sql"].startswith("SELECT id, email") and e["rows"] == 1]
    assert len(done) == 1 and await hoop.events("rows") == []  # one event per statement
    assert done[0]["rows_sample"] == {"columns": ["id", "email", "card", "note"],
                                      "rows": [["7", "[email]", "***************1111", "[masked]"]]}
    assert "user7@example.com" not in str(events)


async def test_recorded_statements_are_masked_by_the_detectors(hoop: Hoop) -> None:
    """The statement's text is recorded with detectors applied to its literals: a simple query, a blocked
    one, and an extended-protocol one."""
    out = await hoop.psql("-c", "SELECT 'mail ann@corp.example' AS a, '4111 1111 1111 1111' AS b")
    assert out.returncode == 0 and out.stdout.strip() == "mail [email]|[card]", out.stderr
    out = await hoop.psql("-c", "DROP TABLE users -- asked by ann@corp.example")
    assert out.returncode != 0 and "no-drop" in out.stderr
    conn = await asyncpg.connect(hoop.dsn())
    try:
        assert await conn.fetchval("SELECT length($1) FROM users WHERE email <> 'bo@corp.example' LIMIT 1",
                                   "x") == 1
    finally:
        await conn.close()
    statements = await hoop.events("statement")
    recorded = {e["sql"]: e["decision"] for e in statements}
    assert recorded["SELECT 'mail [email]' AS a, '[card]' AS b"] == "allow"
    assert recorded["DROP TABLE users -- asked by [email]"] == "block"
    assert recorded["SELECT length($1) FROM users WHERE email <> '[email]' LIMIT 1"] == "allow"
    assert "corp.example" not in str(statements) and "4111" not in str(statements)


async def test_the_session_is_recorded_with_who_from_where_and_why_it_closed(hoop: Hoop) -> None:
    conn = await asyncpg.connect(hoop.dsn())
    host, port = conn._transport.get_extra_info("sockname")[:2]
    local = f"{host}:{port}"  # the client's address, as hoop sees it
    await conn.close()
    await hoop.hub.flush()
    async with hoop.store.tx() as tx:
        (session,) = await tx.list_sessions()
        events = await tx.events(session.id)
    chain = ("root@example.com", "alice@example.com")  # a break-glass grant: the admin who issued it, then alice
    assert (session.login, session.chain, session.client_addr) == (hoop.grant.login, chain, local)
    assert session.close_reason == "client closed the connection"
    opened, closed = events[0], events[-1]
    assert (opened.kind, opened.data["chain"], opened.data["client"], opened.data["login"]) == \
        ("open", list(chain), local, hoop.grant.login)
    assert (closed.kind, closed.data["reason"]) == ("close", "client closed the connection")


async def test_asyncpg_prepared_and_binary(hoop: Hoop) -> None:
    conn = await asyncpg.connect(hoop.dsn())
    try:
        stmt = await conn.prepare("SELECT id, email, note, card FROM users WHERE id = $1")
        for i in (3, 4, 3):
            row = await stmt.fetchrow(i)
            assert row is not None
            assert (row["id"], row["email"], row["note"]) == (i, "[email]", "[masked]")
            assert row["card"].endswith("1111") and row["card"].startswith("*")
        assert await conn.fetchval("SELECT count(*) FROM users") == 50
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="no-drop"):
            await conn.execute("DROP TABLE users")
        assert await conn.fetchval("SELECT 1") == 1  # the session carries on
    finally:
        await conn.close()


async def test_binary_cells_of_a_masked_column_that_is_not_text_are_withheld(pg: PgCluster, pgdb: str,
                                                                            tmp_path: Path) -> None:
    """A redacted int4 cannot keep its 4 bytes: asked for in binary, the cells of a masked non-text column
    come back whole as NULL (one row, and a run of rows); in text they read as the mask."""
    masking = {"columns": [{"match": "users.id", "strategy": "redact"}]}
    async with running_hoop(pg, pgdb, tmp_path, masking=masking) as h:
        conn = await asyncpg.connect(h.dsn())
        try:
            row = await conn.fetchrow("SELECT id, name FROM users WHERE name = 'user3'")
            assert row is not None and (row["id"], row["name"]) == (None, "user3")
            rows = await conn.fetch("SELECT id, name FROM users ORDER BY name")
            assert len(rows) == 50 and {r["id"] for r in rows} == {None}
            # an email to detect sends the rows through the exact, row-by-row path
            rows = await conn.fetch("SELECT id, email FROM users ORDER BY name LIMIT 3")
            assert [(r["id"], r["email"]) for r in rows] == [(None, "[email]")] * 3
        finally:
            await conn.close()
        async with await psycopg.AsyncConnection.connect(h.dsn(), autocommit=True) as pconn:
            cur = pconn.cursor(binary=True)
            await cur.execute("SELECT id, name FROM users WHERE name = %s", ("user4",))
            assert await cur.fetchone() == (None, "user4")
        out = await h.psql("-c", "SELECT id, name FROM users WHERE name = 'user5'")
        assert out.returncode == 0 and out.stdout.strip() == "[masked]|user5", out.stderr


async def test_psycopg_extended_binary(hoop: Hoop) -> None:
    async with await psycopg.AsyncConnection.connect(hoop.dsn(), autocommit=True) as conn:
        cur = conn.cursor(binary=True)
        await cur.execute("SELECT id, email, note FROM users WHERE id = %s", (5,))
        assert await cur.fetchone() == (5, "[email]", "[masked]")
        await cur.execute("SELECT id FROM users WHERE id < %s ORDER BY id", (4,))
        assert [r[0] for r in await cur.fetchall()] == [1, 2, 3]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-drop"):
            await cur.execute("TRUNCATE users")
        await cur.execute("SELECT %s::text", ("ok",))
        assert await cur.fetchone() == ("ok",)
        # pipeline mode: several statements in one batch, one refused
        async with conn.pipeline():
            c1 = await conn.execute("SELECT 1")
            c2 = await conn.execute("SELECT email FROM users WHERE id = 1")
        assert await c1.fetchone() == (1,)
        assert await c2.fetchone() == ("[email]",)


async def test_guard_blocks_in_multi_statement_and_cte(hoop: Hoop) -> None:
    for sql in ("SELECT 1; DROP TABLE users", "/* hi */ dRoP TABLE \"users\"",
                "WITH x AS (SELECT 1) SELECT pg_read_file('/etc/passwd')",
                "DO $$ BEGIN EXECUTE 'DROP TABLE users'; END $$"):
        out = await hoop.psql("-c", sql)
        assert out.returncode != 0 and "refused" in out.stderr, (sql, out.stderr)
    assert (await hoop.psql("-c", "SELECT count(*) FROM users")).stdout.strip() == "50"


async def test_psql_interactive_stdin_and_copy(hoop: Hoop, tmp_path: Path) -> None:
    script = "\\set ON_ERROR_STOP 0\nSELECT 40 + 2;\nCREATE TEMP TABLE t (a text);\n" \
             f"\\copy t FROM '{tmp_path / 'in.csv'}' CSV\nSELECT count(*) FROM t;\n" \
             f"\\copy (SELECT email FROM users WHERE id <= 2 ORDER BY id) TO '{tmp_path / 'out.csv'}' CSV\n"
    (tmp_path / "in.csv").write_text("".join(f"row{i}\n" for i in range(1000)))
    out = await hoop.psql(stdin=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["42", "CREATE", "TABLE", "1000"] or "1000" in out.stdout
    assert (tmp_path / "out.csv").read_text().split() == ["[email]", "[email]"]


async def test_notice_and_error_fields_are_masked(hoop: Hoop) -> None:
    conn = await asyncpg.connect(hoop.dsn())
    notices: list[str] = []
    conn.add_log_listener(lambda _c, msg: notices.append(msg.message))
    try:
        await conn.execute("DO $$ BEGIN RAISE NOTICE 'mail bob@example.org now'; END $$")
        with pytest.raises(asyncpg.UniqueViolationError) as info:
            await conn.execute("CREATE TEMP TABLE u (e text UNIQUE); INSERT INTO u VALUES ('x@y.example');"
                               "INSERT INTO u VALUES ('x@y.example')")
        assert "x@y.example" not in str(info.value.detail)
        await conn.execute("LISTEN ch")
        got: list[str] = []
        await conn.add_listener("ch", lambda *a: got.append(a[3]))
        await conn.execute("NOTIFY ch, 'to carol@example.net'")
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()
    assert notices and "bob@example.org" not in notices[0] and "[email]" in notices[0]
    assert got == ["to [email]"]


async def test_read_only_refuses_switching_back_to_writes(pg: PgCluster, pgdb: str, tmp_path: Path) -> None:
    async with running_hoop(pg, pgdb, tmp_path, guardrails={"read_only": True}) as h:
        for sql in ("SET default_transaction_read_only = off", "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
                    "BEGIN READ WRITE", "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
                    "SET transaction_read_only TO false",
                    "SELECT set_config('default_transaction_read_only', 'off', false)",
                    "INSERT INTO users (id) VALUES (999)"):
            out = await h.psql("-c", sql)
            assert out.returncode != 0 and "refused" in out.stderr, (sql, out.stderr)
        out = await h.psql("-c", "BEGIN READ ONLY", "-c", "SELECT count(*) FROM users", "-c", "COMMIT")
        assert out.returncode == 0 and "50" in out.stdout, out.stderr


async def test_failed_table_lookup_masks_qualified_columns() -> None:
    from broker.config import Masking
    from proxy.mask import Masker
    from proxy.pg.messages import Field
    from proxy.pg.rows import Catalog, make_plan

    async def broken(oids: object) -> dict[int, str]:
        raise OSError("database unreachable")

    masker = Masker(Masking(columns=[{"match": "users.note", "strategy": "redact"}]), b"k" * 32)  # type: ignore[list-item]
    catalog = Catalog(broken)
    fields = (Field("note", table_oid=4242), Field("id", table_oid=4242))
    await catalog.resolve(catalog.missing(fields))
    plan = make_plan(masker, fields, (0, 0), catalog.names)
    assert plan.strategies == ("redact", None) and plan.masked
    # a table that resolved to another name is not masked by the users.note rule
    plan = make_plan(masker, fields, (0, 0), {4242: "public.orders"})
    assert plan.strategies == (None, None)
