"""Copying a ``table.column``-masked value into a relation hoop cannot attribute is refused.

Through the real proxy with real clients against the throwaway cluster: the harness masks
``users.note`` by a table rule. A temp table, ``SELECT INTO`` or ``INSERT ... SELECT`` built
from that column would come back unmasked (the rule follows the table OID), so hoop refuses it
with 42501 and the session goes on; the same statements without the column run.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from proxy.launder import MASKED_COLUMNS_RULE
from tests.proxy.pg.harness import Hoop, running_hoop
from tests.proxy.pg.test_txn_block import through_hoop
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.postgres


async def test_psql_temp_table_from_a_masked_column_is_refused(hoop: Hoop) -> None:
    got = await through_hoop(hoop, "\n".join([
        "CREATE TEMP TABLE t AS SELECT note FROM users;",
        "SELECT ssn INTO TEMP t FROM (SELECT note AS ssn FROM users) s;",
        "SELECT count(*) FROM pg_class WHERE relname = 't' AND relpersistence = 't';",
        "SELECT note FROM users WHERE id = 1;",
        "CREATE TEMP TABLE t AS SELECT id, name FROM users WHERE id <= 2;",
        "SELECT name FROM t ORDER BY id;",
        "BEGIN;",
        "CREATE TEMP TABLE u AS SELECT * FROM users;",
        "ROLLBACK;",
        "SELECT 42;",
    ]))
    assert got == ["ERROR:  42501", "ERROR:  42501", "0", "[masked]", "SELECT 2", "user1", "user2",
                   "BEGIN", "ERROR:  42501", "ROLLBACK", "42"]
    blocked = [e for e in await hoop.events("statement") if e["decision"] == "block"]
    assert [e["rule"] for e in blocked] == [MASKED_COLUMNS_RULE] * 3
    assert blocked[0]["sql"] == "CREATE TEMP TABLE t AS SELECT note FROM users;"


async def test_asyncpg_refusal_names_the_column(hoop: Hoop) -> None:
    conn = await asyncpg.connect(hoop.dsn())
    try:
        await conn.execute("CREATE TEMP TABLE log (v text)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as err:
            await conn.execute("INSERT INTO log SELECT n.note FROM users n WHERE id = $1", 1)
        assert MASKED_COLUMNS_RULE in str(err.value)
        assert 'users.note, masked by the column rule "users.note"' in (err.value.detail or "")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE log SET v = (SELECT note FROM users WHERE id = 1)")
        # ordinary writes, and writes from unmasked columns, still run
        await conn.execute("INSERT INTO log SELECT name FROM users WHERE id = $1", 1)
        await conn.execute("UPDATE users SET name = name WHERE id = $1", 1)
        await conn.execute("UPDATE users SET note = upper(note) WHERE id = 0")  # stays in its masked column
        assert await conn.fetchval("SELECT v FROM log") == "user1"
        assert await conn.fetchval("SELECT note FROM users WHERE id = 2") == "[masked]"
    finally:
        await conn.close()


async def test_a_column_alias_keeps_its_rule(hoop: Hoop) -> None:
    """A rule matched the output column's name, so an alias (``note AS x``) read the column unmasked. The
    column's own name, resolved from its table OID and column number, is matched too: a ``table.column``
    rule (``users.note``) and a name rule (``card``) both follow it, through a subquery as well."""
    got = await through_hoop(hoop, "\n".join([
        "SELECT note AS x FROM users WHERE id = 1;",
        "SELECT x FROM (SELECT note AS x FROM users) s WHERE x IS NOT NULL LIMIT 1;",
        'SELECT u.note AS "NOTE" FROM users u WHERE id = 2;',
        "SELECT card AS c FROM users WHERE id = 3;",
        "SELECT name AS note FROM users WHERE id = 4;",  # another column named like a masked one: still masked
        "SELECT name AS n FROM users WHERE id = 5;",  # no rule: passes
    ]))
    assert got[:3] == ["[masked]", "[masked]", "[masked]"]
    assert got[3] != "4111 1111 1111 1111" and got[3].endswith("1111")  # partial
    assert got[4:] == ["[masked]", "user5"]
    conn = await asyncpg.connect(hoop.dsn())  # binary results, the extended protocol
    try:
        assert await conn.fetchval("SELECT note AS x FROM users WHERE id = $1", 6) == "[masked]"
    finally:
        await conn.close()


async def test_partitions_and_inheritance_children_keep_their_ancestors_rules(pg: PgCluster, tmp_path: Path) -> None:
    """A partition (or an inheritance child) is read under its own name; a ``table.column`` rule on the
    partitioned table (or the parent) applies to it too, at any depth."""
    db = pg.create_database("parts")
    pg.psql("""
        CREATE TABLE events (id int, who text, note text) PARTITION BY RANGE (id);
        CREATE TABLE events_low PARTITION OF events FOR VALUES FROM (0) TO (100) PARTITION BY RANGE (id);
        CREATE TABLE events_low_a PARTITION OF events_low FOR VALUES FROM (0) TO (50);
        INSERT INTO events VALUES (1, 'w1', 'secret-1');
        CREATE TABLE people (id int, note text);
        CREATE TABLE people_old () INHERITS (people);
        INSERT INTO people_old VALUES (2, 'secret-2');
    """, database=db)
    masking = {"columns": [{"match": "events.note", "strategy": "redact"},
                           {"match": "public.people.note", "strategy": "redact"}]}
    async with running_hoop(pg, db, tmp_path, masking=masking) as h:
        got = await through_hoop(h, "\n".join([
            "SELECT note FROM events_low_a;",
            "SELECT note AS n FROM events_low;",
            "SELECT note FROM people_old;",
            "SELECT who FROM events_low_a;",
        ]))
    assert got == ["[masked]", "[masked]", "[masked]", "w1"]
