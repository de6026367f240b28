"""A refused statement inside a transaction fails that transaction, as a real error would (issue #4).

Every scenario runs through hoop with real clients, and the outcome is read DIRECTLY on the
upstream: after a refusal inside ``BEGIN ...`` the server answers 25P02, ``COMMIT`` becomes
``ROLLBACK``, and ``ROLLBACK TO SAVEPOINT`` restores a savepoint made before the refusal.
Where it helps, the same script is also run directly against PostgreSQL with a statement that
really fails in place of the refused one, and both runs must agree.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path

import asyncpg
import psycopg
import pytest

from broker.events import ReviewRequested
from proxy.pg import codec
from proxy.pg.messages import Backend, decode_command_complete, decode_fields
from tests.proxy.pg.harness import OPS, Hoop
from tests.proxy.pg.test_protocol_edges import Raw, connect
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.postgres

BLOCKED = "DROP TABLE users"  # refused by the harness's "no-drop" rule
FAILING = "SELECT 1/0"  # a statement that really fails, for the direct runs


def new_table(pg: PgCluster, db: str) -> str:
    name = f"t_{secrets.token_hex(4)}"
    pg.psql(f"CREATE TABLE {name} (id int PRIMARY KEY)", database=db)
    return name


def rows(pg: PgCluster, db: str, table: str) -> list[int]:
    """The table's ids, read directly on the upstream (not through hoop)."""
    out = pg.psql(f"SELECT id FROM {table} ORDER BY id", database=db)
    return [int(x) for x in out.split()]


async def run_psql(psql: Path, env: dict[str, str], script: str) -> list[str]:
    """Run ``script`` in psql; the lines it prints, in order: command tags, rows, ``ERROR:  <sqlstate>``."""
    proc = await asyncio.create_subprocess_exec(
        str(psql), "-X", "-At", env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(30):
        out, _ = await proc.communicate(("\\set VERBOSITY sqlstate\n" + script).encode())
    return [re.sub(r"^psql:<stdin>:\d+: ", "", line) for line in out.decode().splitlines() if line]


async def through_hoop(hoop: Hoop, script: str) -> list[str]:
    return await run_psql(hoop.cluster.bindir / "psql", hoop.env(), script)


async def direct(pg: PgCluster, db: str, script: str) -> list[str]:
    return await run_psql(pg.bindir / "psql", {**pg.env(), "PGDATABASE": db}, script)


async def test_psql_commit_after_refusal_rolls_back(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    t = new_table(pg, pgdb)
    script = (f"BEGIN;\nINSERT INTO {t} VALUES (1);\n{BLOCKED};\nINSERT INTO {t} VALUES (2);\nSELECT 1;\n"
              "COMMIT;\nSELECT 42;\n")
    got = await through_hoop(hoop, script)
    assert got == ["BEGIN", "INSERT 0 1", "ERROR:  42501", "ERROR:  25P02", "ERROR:  25P02", "ROLLBACK", "42"]
    assert rows(pg, pgdb, t) == []
    assert len(rows(pg, pgdb, "users")) == 50  # the refused DROP never ran
    # PostgreSQL itself, with a statement that really fails in place of the refused one
    same = await direct(pg, pgdb, script.replace(BLOCKED, FAILING))
    assert same == [*got[:2], "ERROR:  22012", *got[3:]]
    assert rows(pg, pgdb, t) == []

    events = [e for e in await hoop.events("statement") if t in e["sql"] or e["sql"] in (BLOCKED + ";", "COMMIT;")]
    assert [(e["sql"].split(" (")[0], e["decision"], (e["error"] or "")[:5], e.get("command")) for e in events] == [
        (f"INSERT INTO {t} VALUES", "allow", "", None),
        (BLOCKED + ";", "block", "refus", None),
        (f"INSERT INTO {t} VALUES", "allow", "25P02", None),
        ("COMMIT;", "allow", "", "ROLLBACK"),
    ]


@pytest.mark.parametrize("end", ["ROLLBACK", "ABORT", "END", "COMMIT AND CHAIN", "ROLLBACK AND CHAIN"])
async def test_psql_ending_a_failed_transaction_matches_postgres(hoop: Hoop, pg: PgCluster, pgdb: str,
                                                                 end: str) -> None:
    t = new_table(pg, pgdb)
    script = (f"BEGIN;\nINSERT INTO {t} VALUES (1);\n{BLOCKED};\nINSERT INTO {t} VALUES (2);\n{end};\n"
              f"INSERT INTO {t} VALUES (3);\nCOMMIT;\n")
    got = await through_hoop(hoop, script)
    assert got[:4] == ["BEGIN", "INSERT 0 1", "ERROR:  42501", "ERROR:  25P02"]
    assert got[4] == "ROLLBACK"
    assert rows(pg, pgdb, t) == [3]
    same = await direct(pg, pgdb, script.replace(BLOCKED, FAILING).replace("(3)", "(4)"))
    assert same == [*got[:2], "ERROR:  22012", *got[3:]]
    assert rows(pg, pgdb, t) == [3, 4]


async def test_psql_rollback_to_savepoint_made_before_the_refusal(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    t = new_table(pg, pgdb)
    script = (f"BEGIN;\nINSERT INTO {t} VALUES (1);\nSAVEPOINT s;\nINSERT INTO {t} VALUES (2);\n{BLOCKED};\n"
              f"SAVEPOINT late;\nINSERT INTO {t} VALUES (3);\nROLLBACK TO SAVEPOINT s;\n"
              f"INSERT INTO {t} VALUES (4);\nCOMMIT;\n")
    got = await through_hoop(hoop, script)
    assert got == ["BEGIN", "INSERT 0 1", "SAVEPOINT", "INSERT 0 1", "ERROR:  42501", "ERROR:  25P02",
                   "ERROR:  25P02", "ROLLBACK", "INSERT 0 1", "COMMIT"]
    assert rows(pg, pgdb, t) == [1, 4]


async def test_psql_on_error_rollback_keeps_the_transaction(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    """psql's ON_ERROR_ROLLBACK wraps each statement in a savepoint: a refusal costs only that statement."""
    t = new_table(pg, pgdb)
    script = (f"\\set ON_ERROR_ROLLBACK on\nBEGIN;\nINSERT INTO {t} VALUES (1);\n{BLOCKED};\n"
              f"INSERT INTO {t} VALUES (2);\nCOMMIT;\n")
    got = await through_hoop(hoop, script)
    assert got == ["BEGIN", "INSERT 0 1", "ERROR:  42501", "INSERT 0 1", "COMMIT"]
    assert rows(pg, pgdb, t) == [1, 2]
    assert await direct(pg, pgdb, script.replace(BLOCKED, FAILING).replace("(1)", "(3)").replace("(2)", "(4)")) == [
        *got[:2], "ERROR:  22012", *got[3:]]


async def test_psql_refusals_in_many_shapes(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    t = new_table(pg, pgdb)
    script = (
        # a multi-statement Query (one message) inside a transaction: refused whole, the transaction fails
        f"BEGIN;\nINSERT INTO {t} VALUES (1) \\; {BLOCKED};\nSELECT 1;\nCOMMIT;\n"
        # a refusal in a transaction that had already failed
        f"BEGIN;\nINSERT INTO {t} VALUES (2);\n{FAILING};\n{BLOCKED};\nCOMMIT;\n"
        # outside a transaction block: nothing to fail, the session goes on
        f"INSERT INTO {t} VALUES (3);\n{BLOCKED};\nINSERT INTO {t} VALUES (4);\n"
        # an implicit transaction (several statements in one Query, no BEGIN) is refused whole
        f"INSERT INTO {t} VALUES (5) \\; {BLOCKED};\n"
        f"BEGIN \\; INSERT INTO {t} VALUES (6) \\; {BLOCKED};\nSELECT 7;\n"
    )
    got = await through_hoop(hoop, script)
    assert got == ["BEGIN", "ERROR:  42501", "ERROR:  25P02", "ROLLBACK",
                   "BEGIN", "INSERT 0 1", "ERROR:  22012", "ERROR:  42501", "ROLLBACK",
                   "INSERT 0 1", "ERROR:  42501", "INSERT 0 1",
                   "ERROR:  42501",
                   "ERROR:  42501", "7"]
    assert rows(pg, pgdb, t) == [3, 4]


async def test_psycopg_transaction_block(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    t = new_table(pg, pgdb)
    async with await psycopg.AsyncConnection.connect(hoop.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-drop"):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {t} VALUES (%s)", (1,))
                try:
                    await conn.execute("DROP TABLE users")
                finally:
                    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
                    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                        await conn.execute(f"INSERT INTO {t} VALUES (%s)", (2,))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert rows(pg, pgdb, t) == []
        # a savepoint (psycopg's nested transaction) made before the refusal keeps the transaction
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {t} VALUES (%s)", (3,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {t} VALUES (%s)", (4,))
                    await conn.execute("TRUNCATE users")
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            await conn.execute(f"INSERT INTO {t} VALUES (%s)", (5,))
        assert rows(pg, pgdb, t) == [3, 5]


async def test_psycopg_commit_of_a_failed_transaction(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    t = new_table(pg, pgdb)
    async with await psycopg.AsyncConnection.connect(hoop.dsn()) as conn:  # not autocommit: psycopg BEGINs
        await conn.execute(f"INSERT INTO {t} VALUES (%s)", (1,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("DROP TABLE users")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        await conn.commit()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        await conn.execute(f"INSERT INTO {t} VALUES (%s)", (2,))
        await conn.commit()
    assert rows(pg, pgdb, t) == [2]


@pytest.mark.parametrize("via", ["hoop", "direct"])
async def test_psycopg_pipeline_batch_fails_whole(hoop: Hoop, pg: PgCluster, pgdb: str, via: str) -> None:
    """In one extended-protocol batch (autocommit, no BEGIN), an error rolls back the whole batch."""
    t = new_table(pg, pgdb)
    dsn = hoop.dsn() if via == "hoop" else pg.dsn(pgdb)
    bad = BLOCKED if via == "hoop" else FAILING
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.errors.DivisionByZero)):
            async with conn.pipeline():
                await conn.execute(f"INSERT INTO {t} VALUES (%s)", (1,))
                await conn.execute(bad)
                await conn.execute(f"INSERT INTO {t} VALUES (%s)", (2,))
        await conn.execute(f"INSERT INTO {t} VALUES (%s)", (3,))
    assert rows(pg, pgdb, t) == [3]


async def test_asyncpg_transaction(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    t = new_table(pg, pgdb)
    conn = await asyncpg.connect(hoop.dsn())
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="no-drop"):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {t} VALUES ($1)", 1)
                try:
                    await conn.execute("DROP TABLE users")  # simple protocol
                finally:
                    with pytest.raises(asyncpg.InFailedSQLTransactionError):
                        await conn.execute(f"INSERT INTO {t} VALUES ($1)", 2)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {t} VALUES ($1)", 3)
                await conn.fetch("TRUNCATE users")  # extended protocol: the refused Parse
        assert not conn.is_in_transaction()
        await conn.execute(f"INSERT INTO {t} VALUES ($1)", 4)
        assert await conn.fetchval(f"SELECT count(*) FROM {t}") == 1
    finally:
        await conn.close()
    assert rows(pg, pgdb, t) == [4]


async def answers(raw: Raw, ready: int) -> list[str]:
    """What the server side says until the ``ready``-th ReadyForQuery: tags, SQLSTATEs and statuses."""
    seen: list[str] = []
    while ready:
        t, body = await raw.message()
        if t == Backend.READY_FOR_QUERY:
            seen.append("Z" + chr(body[0]))
            ready -= 1
        elif t == Backend.ERROR_RESPONSE:
            seen.append("E" + decode_fields(body)["C"])
        elif t == Backend.COMMAND_COMPLETE:
            seen.append(decode_command_complete(body).tag)
        else:
            seen.append(chr(t))
    return seen


async def test_raw_pipelined_queries_function_call_and_batches(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    t = new_table(pg, pgdb)
    raw = await connect(hoop)
    try:
        await raw.login(hoop)
        # simple queries sent all at once: hoop cannot know the status the refusal meets, the server does
        raw.writer.write(b"".join(codec.encode_query(q) for q in (
            "BEGIN", f"INSERT INTO {t} VALUES (1)", BLOCKED, f"INSERT INTO {t} VALUES (2)", "COMMIT")))
        assert await answers(raw, 5) == ["BEGIN", "ZT", "INSERT 0 1", "ZT", "E42501", "ZE", "E25P02", "ZE",
                                         "ROLLBACK", "ZI"]
        # the function-call protocol is refused alike: locally outside a transaction, failing it inside one
        call = codec.encode_function_call(1598, [])  # random()
        raw.writer.write(call + codec.encode_query("BEGIN") + call + codec.encode_query("SELECT 1")
                         + codec.encode_query("ROLLBACK"))
        assert await answers(raw, 5) == ["E42501", "ZI", "BEGIN", "ZT", "E42501", "ZE", "E25P02", "ZE",
                                         "ROLLBACK", "ZI"]
        # one extended batch (an implicit transaction): the refused Parse fails it, the INSERT before is undone
        raw.writer.write(codec.encode_parse("", f"INSERT INTO {t} VALUES (3)") + codec.encode_bind("", "", [])
                         + codec.encode_execute() + codec.encode_parse("s1", BLOCKED) + codec.encode_bind("", "s1", [])
                         + codec.encode_execute() + codec.SYNC + codec.encode_query("SELECT 1"))
        assert await answers(raw, 2) == ["1", "2", "INSERT 0 1", "E42501", "ZI", "T", "D", "SELECT 1", "ZI"]
        # the same batch alone, outside any transaction: answered by hoop alone, as before
        raw.writer.write(codec.encode_parse("s1", BLOCKED) + codec.encode_bind("", "s1", []) + codec.encode_execute()
                         + codec.SYNC)
        assert await answers(raw, 1) == ["E42501", "ZI"]
    finally:
        await raw.close()
    assert rows(pg, pgdb, t) == []


async def test_review_refused_inside_a_transaction_fails_it(hoop: Hoop, pg: PgCluster, pgdb: str) -> None:
    t = new_table(pg, pgdb)
    conn = await asyncpg.connect(hoop.dsn())
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(f"INSERT INTO {t} VALUES (1), (2)")
        task = asyncio.create_task(conn.execute(f"DELETE FROM {t} WHERE id = 1"))  # held for review
        pending: list[ReviewRequested] = []
        for _ in range(100):
            pending = [e for e in hoop.notifier.events if isinstance(e, ReviewRequested)]
            if pending:
                break
            await asyncio.sleep(0.05)
        assert pending and not task.done()
        await hoop.hub.reviews.decide(pending[-1].review.id, OPS, False)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="careful-delete"):
            await task
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.execute(f"INSERT INTO {t} VALUES (3)")
        await tx.commit()  # the server answers ROLLBACK
        assert not conn.is_in_transaction()
    finally:
        await conn.close()
    assert rows(pg, pgdb, t) == []
