"""Cursors, SQL-level prepared statements and failing batches: what hoop tracks of the server's
statement and portal namespaces, and of its skip-to-Sync, must match the server's.

- A cursor fetch (an Execute in a later round trip than its Bind: asyncpg's ``cursor()``,
  JDBC's ``fetchSize``, a SQL ``DECLARE``) is masked with the portal's current description.
- SQL ``DEALLOCATE``/``PREPARE``/``DECLARE``/``CLOSE`` share names with Parse and Bind: a
  description hoop kept from before must not be applied to what the name means now.
- A Query pipelined in an extended batch that fails is skipped by the server, and recorded so.

The end-to-end tests run real clients (asyncpg, a raw wire client) through hoop to a real
server; the scenarios at the end replay the same conversations through the relay with and
without its fast paths (see ``test_fast.py``) and compare everything.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from proxy.mask import Masker
from proxy.pg import codec, names
from proxy.pg.messages import Auth, Backend, Field, decode_authentication, decode_data_row, decode_fields
from proxy.pg.rows import make_plan, mask_row
from proxy.pg.scram import ScramClient
from proxy.pg.state import Rec
from tests.proxy.pg.harness import Hoop
from tests.proxy.pg.test_fast import _PC, RESOURCE, _answer, _fields, _inspector, _play

EMAIL = b"user1@example.com"
Msg = tuple[int, bytes]


class Wire:
    """A raw protocol client: SCRAM login, then bytes out and messages back up to ReadyForQuery."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, hoop: Hoop) -> Wire:
        reader, writer = await asyncio.open_connection("127.0.0.1", hoop.port)
        self = cls(reader, writer)
        writer.write(codec.encode_startup({"user": hoop.grant.login, "database": "prod-db"}))
        scram: ScramClient | None = None
        while True:
            t, body = await self.message()
            if t == Backend.AUTHENTICATION:
                auth = decode_authentication(body)
                if auth.code == Auth.SASL:
                    scram = ScramClient(hoop.secret, offered=auth.mechanisms)
                    writer.write(codec.encode_sasl_initial_response(scram.mechanism, scram.client_first()))
                elif auth.code == Auth.SASL_CONTINUE and scram is not None:
                    writer.write(codec.encode_sasl_response(scram.handle_server_first(auth.data)))
                elif auth.code == Auth.SASL_FINAL and scram is not None:
                    scram.handle_server_final(auth.data)
            elif t == Backend.ERROR_RESPONSE:
                raise AssertionError(decode_fields(body))
            elif t == Backend.READY_FOR_QUERY:
                return self

    async def message(self) -> Msg:
        t, length = codec.HEADER.unpack(await self.reader.readexactly(5))
        return t, await self.reader.readexactly(length - 4)

    async def send(self, data: bytes) -> list[Msg]:
        """Send ``data``; the messages back up to and including one ReadyForQuery."""
        self.writer.write(data)
        out: list[Msg] = []
        async with asyncio.timeout(10):
            while not out or out[-1][0] != Backend.READY_FOR_QUERY:
                out.append(await self.message())
        return out

    async def query(self, sql: str) -> list[Msg]:
        return await self.send(codec.encode_query(sql))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def rows(msgs: list[Msg]) -> list[bytes]:
    return [body for t, body in msgs if t == Backend.DATA_ROW]


def errors(msgs: list[Msg]) -> list[dict[str, str]]:
    return [decode_fields(body) for t, body in msgs if t == Backend.ERROR_RESPONSE]


def cells(msgs: list[Msg]) -> list[bytes]:
    """The one cell of each DataRow."""
    return [body[6:] for body in rows(msgs)]


async def statements(hoop: Hoop, sql: str) -> list[dict[str, Any]]:
    return [e for e in await hoop.events("statement") if e["sql"] == sql]


# ---- what a SQL text does to the namespaces, and failing closed --------------------------

_ALL = None


@pytest.mark.parametrize(("sql", "statements", "portals", "dynamic"), [
    ("SELECT 1", set(), set(), False),
    ("PREPARE s AS SELECT 1", {"s"}, set(), False),
    ('DEALLOCATE s; DEALLOCATE PREPARE "S x"', {"s", "S x"}, set(), False),
    ("DEALLOCATE ALL", _ALL, set(), False),
    ("DISCARD ALL", _ALL, _ALL, False),
    ("DISCARD PLANS", set(), set(), False),
    ("BEGIN; DECLARE c BINARY CURSOR WITH HOLD FOR SELECT 1", set(), {"c"}, False),
    ("CLOSE c", set(), {"c"}, False),
    ("CLOSE ALL", set(), _ALL, False),
    ("EXECUTE s(1)", set(), set(), True),
    ("FETCH 2 FROM c", set(), set(), True),
    ("DO $$BEGIN EXECUTE 'DEALLOCATE s'; END$$", _ALL, _ALL, False),  # nested: names unknown
])
def test_what_a_text_does_to_the_namespaces(sql: str, statements: set[str] | None, portals: set[str] | None,
                                             dynamic: bool) -> None:
    tags = [st.tag for st in _inspector().guard.analyse(sql).statements]  # type: ignore[union-attr]
    for given in (tags, None):  # with the guard's tags, and without a guard
        got = names.effect(sql, given)
        if given is None and sql.startswith("DO"):
            continue  # without the guard, a DO body is not looked into
        assert got.statements == (None if statements is None else frozenset(statements)), given
        assert got.portals == (None if portals is None else frozenset(portals)), given
        assert got.dynamic is dynamic


def test_rows_of_no_known_description_end_the_session() -> None:
    insp = _inspector()
    framer = codec.Framer(codec.SERVER_MAX_MESSAGE, coalesce_rows=True)
    rec = Rec("FETCH FROM p", [], "allow", None, "FETCH FROM p")
    insp._push_execute(None, rec)  # type: ignore[arg-type]  # a result hoop has no description of
    buf, frames = framer.feed(codec.encode_data_row([b"bob@corp.example"]) + codec.encode_command_complete("FETCH 1"))
    out, _, _ = insp.from_server(buf, frames, 0)
    assert insp.abort is not None and b"bob" not in b"".join(out)


def test_a_row_wider_than_its_plan_withholds_the_extra_cells() -> None:
    masker = Masker(RESOURCE.masking, b"k" * 32)
    plan = make_plan(masker, [Field("n", 0, 0, 25, -1, -1, 0)], (0,), {})
    row = codec.encode_data_row([b"1", b"bob@corp.example", None])
    got = mask_row(masker, plan, memoryview(row)[5:], True)
    assert got is not None and decode_data_row(got[5:]) == [b"1", None, None]


# ---- cursor fetches ---------------------------------------------------------------------


async def test_asyncpg_cursor_fetches_are_masked_and_counted(hoop: Hoop) -> None:
    notes_sql = "SELECT note FROM users ORDER BY id LIMIT 6"
    emails_sql = "SELECT email FROM users ORDER BY id LIMIT 6"
    conn = await asyncpg.connect(hoop.dsn())
    try:
        async with conn.transaction():
            notes = [r["note"] async for r in conn.cursor(notes_sql, prefetch=2)]
        assert notes == ["[masked]"] * 6  # users.note: redact, in every batch
        async with conn.transaction():
            emails = [r["email"] async for r in conn.cursor(emails_sql, prefetch=2)]
        assert emails == ["[email]"] * 6  # a detector hit in a later batch does not end the session
        assert await conn.fetchval("SELECT 41 + 1") == 42
    finally:
        await conn.close()
    for sql in (notes_sql, emails_sql):
        recs = await statements(hoop, sql)
        assert sum(r["rows"] for r in recs) == 6, recs
        assert all(r["error"] is None for r in recs)


async def test_jdbc_style_fetch_size_is_masked_in_every_round_trip(hoop: Hoop) -> None:
    sql = "SELECT note, email FROM users ORDER BY id"
    c = await Wire.connect(hoop)
    try:
        await c.query("BEGIN")
        first = await c.send(codec.encode_parse("", sql) + codec.encode_bind("C_1", "")
                             + codec.encode_describe("P", "C_1") + codec.encode_execute("C_1", 2) + codec.SYNC)
        later = [await c.send(codec.encode_execute("C_1", 2) + codec.SYNC) for _ in range(3)]
        await c.query("COMMIT")
    finally:
        await c.close()
    for msgs in (first, *later):
        assert not errors(msgs)
        got = rows(msgs)
        assert len(got) == 2
        for row in got:
            assert b"[masked]" in row and b"[email]" in row and b"@example.com" not in row, row
        assert Backend.PORTAL_SUSPENDED in [t for t, _ in msgs]
        # hoop's own Describe of the portal is answered to hoop only
        assert [t for t, _ in msgs].count(Backend.ROW_DESCRIPTION) == (1 if msgs is first else 0)
    recs = await statements(hoop, sql)
    assert [r["rows"] for r in recs] == [2, 2, 2, 2]
    assert recs[-1]["rows_sample"]["rows"] == [["[masked]", "[email]"]] * 2


# ---- the namespaces shared with SQL -----------------------------------------------------


async def test_sql_prepare_cannot_reuse_a_stale_description(hoop: Hoop) -> None:
    c = await Wire.connect(hoop)
    try:
        await c.send(codec.encode_parse("s", "SELECT 1::int4 AS x") + codec.encode_describe("S", "s") + codec.SYNC)
        assert not errors(await c.query("DEALLOCATE s; PREPARE s AS SELECT email FROM users WHERE id = 1"))
        binary = await c.send(codec.encode_bind("", "s", result_formats=[1]) + codec.encode_execute() + codec.SYNC)
        assert cells(binary) == [b"[email]"]  # binary text: the detectors read it
        await c.send(codec.encode_parse("t", "SELECT 'x'::text AS x") + codec.encode_describe("S", "t") + codec.SYNC)
        await c.query("DEALLOCATE ALL")
        await c.query("PREPARE t AS SELECT note FROM users WHERE id = 1")
        text = await c.send(codec.encode_bind("", "t") + codec.encode_execute() + codec.SYNC)
        assert cells(text) == [b"[masked]"]  # the users.note rule applies
        still = await c.send(codec.encode_bind("", "t") + codec.encode_execute() + codec.SYNC)
        assert cells(still) == [b"[masked]"]
    finally:
        await c.close()
    assert not await statements(hoop, "SELECT 1::int4 AS x")  # never executed: the stale text is not recorded
    assert [r["rows"] for r in await statements(hoop, "EXECUTE s")] == [1]
    assert [r["rows"] for r in await statements(hoop, "EXECUTE t")] == [1, 1]


async def test_declared_cursors_executed_by_protocol_are_masked(hoop: Hoop) -> None:
    c = await Wire.connect(hoop)
    try:
        # a portal "p" bound by the protocol (int4, binary) in an implicit transaction, gone at its Sync
        await c.send(codec.encode_parse("", "SELECT 1::int4 AS x") + codec.encode_bind("p", "", result_formats=[1])
                     + codec.encode_describe("P", "p") + codec.encode_execute("p") + codec.SYNC)
        await c.query("BEGIN; DECLARE p BINARY CURSOR FOR SELECT email FROM users WHERE id <= 2")
        fetched = await c.send(codec.encode_execute("p") + codec.SYNC)
        assert cells(fetched) == [b"[email]", b"[email]"]
        await c.query("DECLARE q CURSOR FOR SELECT note FROM users WHERE id <= 3 ORDER BY id")
        assert cells(await c.send(codec.encode_execute("q", 2) + codec.SYNC)) == [b"[masked]"] * 2
        assert cells(await c.send(codec.encode_execute("q", 2) + codec.SYNC)) == [b"[masked]"]
        # inside one transaction: a bound portal closed and declared again by SQL under its name
        await c.send(codec.encode_parse("", "SELECT 1::int4 AS x") + codec.encode_bind("r", "", result_formats=[1])
                     + codec.encode_describe("P", "r") + codec.SYNC)
        await c.query("CLOSE r; DECLARE r BINARY CURSOR FOR SELECT email FROM users WHERE id = 1")
        assert cells(await c.send(codec.encode_execute("r") + codec.SYNC)) == [b"[email]"]
        assert not errors(await c.query("COMMIT"))
    finally:
        await c.close()
    assert [r["rows"] for r in await statements(hoop, "FETCH FROM q")] == [2, 1]


# ---- a Query in a failing extended batch ------------------------------------------------


async def test_a_query_pipelined_in_a_failing_batch_is_recorded_as_skipped(hoop: Hoop) -> None:
    c = await Wire.connect(hoop)
    try:
        failed = await c.send(codec.encode_parse("", "SELECT * FROM no_such_table") + codec.encode_bind("", "")
                              + codec.encode_execute() + codec.encode_query("SELECT 42 AS skipped")
                              + codec.encode_query("DROP TABLE users") + codec.SYNC)
        assert [e["C"] for e in errors(failed)] == ["42P01"]  # both Queries skipped, as by the server
        for word in ("first", "second", "third"):
            assert cells(await c.query(f"SELECT '{word}'")) == [word.encode()]
    finally:
        await c.close()
    [skipped] = await statements(hoop, "SELECT 42 AS skipped")
    assert skipped["rows"] == 0 and skipped["error"].startswith("skipped")
    for word in ("first", "second", "third"):
        [rec] = await statements(hoop, f"SELECT '{word}'")
        assert rec["rows_sample"]["rows"] == [[word]] and rec["error"] is None
    assert hoop.cluster.psql("SELECT count(*) FROM users", database=hoop.database) == "50"


# ---- the same conversations with and without the fast paths ------------------------------

_BC, _NO_ROWS = b"2\0\0\0\4", b"s\0\0\0\4"


def _suspended(names: tuple[str, ...], data: list[list[bytes | None]], *, described: bool) -> bytes:
    head = _fields(*names) if described else b""
    return (head + b"".join(codec.encode_data_row(r) for r in data) + _NO_ROWS + codec.encode_ready_for_query("T"))


SCENARIOS: dict[str, list[tuple[str, bytes]]] = {
    "a cursor fetched over three round trips": [
        ("c", codec.encode_query("BEGIN")),
        ("s", _answer((), [], "BEGIN", "T")),
        ("c", codec.encode_parse("", "SELECT email FROM users") + codec.encode_bind("C_1", "")
         + codec.encode_describe("P", "C_1") + codec.encode_execute("C_1", 1) + codec.SYNC),
        ("s", _PC + _BC + _suspended(("email",), [[b"a@corp.example"]], described=True)),
        ("c", codec.encode_execute("C_1", 1) + codec.SYNC),
        ("s", _suspended(("email",), [[b"b@corp.example"]], described=True)),  # hoop's Describe, then the rows
        ("c", codec.encode_execute("C_1", 1) + codec.SYNC),
        ("s", _suspended(("email",), [[b"c@corp.example"]], described=True)),
        ("c", codec.encode_query("COMMIT")),
        ("s", _answer((), [], "COMMIT")),
    ],
    "SQL DEALLOCATE and PREPARE of a described statement": [
        ("c", codec.encode_parse("s", "SELECT 1 AS x") + codec.encode_describe("S", "s") + codec.SYNC),
        ("s", _PC + codec.encode_parameter_description([]) + _fields("x") + codec.encode_ready_for_query("I")),
        ("c", codec.encode_query("DEALLOCATE s; PREPARE s AS SELECT email FROM users")),
        ("s", codec.encode_command_complete("DEALLOCATE") + codec.encode_command_complete("PREPARE")
         + codec.encode_ready_for_query("I")),
        ("c", codec.encode_bind("", "s") + codec.encode_execute() + codec.SYNC),
        ("s", _BC + _answer(("email",), [[b"bob@corp.example"]], "SELECT 1")),  # after hoop's Describe
        ("c", codec.encode_bind("", "s") + codec.encode_describe("P", "") + codec.encode_execute() + codec.SYNC),
        ("s", _BC + _answer(("email",), [[b"bob@corp.example"]], "SELECT 1")),
    ],
    "a declared cursor executed by the protocol": [
        ("c", codec.encode_query("BEGIN; DECLARE c CURSOR FOR SELECT note FROM users")),
        ("s", codec.encode_command_complete("BEGIN") + codec.encode_command_complete("DECLARE CURSOR")
         + codec.encode_ready_for_query("T")),
        ("c", codec.encode_execute("c") + codec.SYNC),
        ("s", _answer(("note",), [[b"write to bob@corp.example"]], "SELECT 1", "T")),
        ("c", codec.encode_query("CLOSE ALL")),
        ("s", _answer((), [], "CLOSE CURSOR ALL", "T")),
    ],
    "Queries pipelined in a failing batch, one of them refused": [
        ("c", codec.encode_parse("", "SELECT nope") + codec.encode_bind("", "") + codec.encode_execute()
         + codec.encode_query("SELECT 42") + codec.encode_query("DROP TABLE t") + codec.SYNC),
        ("s", codec.encode_error("42703", "column does not exist") + codec.encode_ready_for_query("I")),
        ("c", codec.encode_query("SELECT 'first'")),
        ("s", _answer(("a",), [[b"first"]], "SELECT 1")),
        ("c", codec.encode_query("SELECT 'second'")),
        ("s", _answer(("a",), [[b"second"]], "SELECT 1")),
    ],
}


@pytest.mark.parametrize("masking", [True, False])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_fast_and_general_paths_agree(name: str, masking: bool) -> None:
    fast_run = await _play(SCENARIOS[name], use_fast=True, masking=masking)
    general = await _play(SCENARIOS[name], use_fast=False, masking=masking)
    assert fast_run == general
    assert fast_run["expect"] == []


async def test_replayed_cursor_fetches_are_masked_and_recorded() -> None:
    got = await _play(SCENARIOS["a cursor fetched over three round trips"], use_fast=True)
    assert b"corp.example" not in got["to_client"]
    # two of hoop's own Describes, one in each later round trip; the client sees none of their answers
    assert got["to_server"].count(codec.encode_describe("P", "C_1")) == 3
    assert got["to_client"].count(_fields("email")) == 1
    recs = [d for kind, d in got["events"] if kind == "statement" and d["sql"] == "SELECT email FROM users"]
    assert [r["rows"] for r in recs] == [1, 1, 1]
    assert got["portals"] == []  # COMMIT closed the cursor


async def test_replayed_stale_statement_is_described_again() -> None:
    got = await _play(SCENARIOS["SQL DEALLOCATE and PREPARE of a described statement"], use_fast=True)
    assert b"bob@corp.example" not in got["to_client"]
    assert got["statements"] == []  # hoop forgot its "s": the server's is another statement
    recs = [d for kind, d in got["events"] if kind == "statement" and d["sql"] == "EXECUTE s"]
    assert [r["rows"] for r in recs] == [1, 1]


async def test_replayed_failing_batch_keeps_the_queue_in_step() -> None:
    got = await _play(SCENARIOS["Queries pipelined in a failing batch, one of them refused"], use_fast=True)
    recs = {d["sql"]: d for kind, d in got["events"] if kind == "statement"}
    assert recs["SELECT 42"]["error"].startswith("skipped") and recs["SELECT 42"]["rows"] == 0
    assert recs["SELECT 'first'"]["rows_sample"]["rows"] == [["first"]]
    assert recs["SELECT 'second'"]["rows_sample"]["rows"] == [["second"]]
    assert got["to_client"].count(b"Z\0\0\0\5") == 3
    assert b"42501" not in got["to_client"]  # the refused Query was skipped: no answer, as from the server
