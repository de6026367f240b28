"""Review fixes (PostgreSQL proxy, review 2, findings 2, 3 and 5).

- A parsed ``DEALLOCATE``/``PREPARE``/``CLOSE``/``DECLARE`` changes the server's namespaces when
  a portal of it is *executed*, possibly round trips later: hoop forgets the names then too,
  in the general and the fast path alike.
- Binary ``int8``, ``numeric`` and ``float8`` cells (and arrays of them) are read by the
  detectors in their text form, as psql shows them; a hit makes the cell NULL.
- After an extended-protocol error the server skips up to the client's next Sync, including
  messages sent after the error arrived; hoop's reply queue follows it.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg
import pytest

from proxy.pg import binary, codec, fast
from proxy.pg.messages import Backend
from proxy.pg.state import SKIPPED
from tests.proxy.pg.harness import Hoop
from tests.proxy.pg.test_cursors_and_prepare import Wire, cells, errors, statements
from tests.proxy.pg.test_fast import _PC, _answer, _batch, _fields, _inspector, _play
from tests.support.pgcluster import PgCluster

_BC, _NO_DATA = b"2\0\0\0\4", b"n\0\0\0\4"


# ---- finding 2: namespace effects apply when the statement runs -----------------------------


async def test_a_prepared_deallocate_and_prepare_run_later_cannot_leave_a_stale_description(hoop: Hoop) -> None:
    c = await Wire.connect(hoop)
    try:
        await c.send(codec.encode_parse("s9", "DEALLOCATE s1")
                     + codec.encode_parse("s10", "PREPARE s1 AS SELECT note FROM users WHERE id = 1")
                     + codec.encode_parse("s1", "SELECT 'x'::text AS a") + codec.encode_describe("S", "s1")
                     + codec.SYNC)
        msgs = await c.send(codec.encode_bind("", "s9") + codec.encode_execute() + codec.encode_bind("", "s10")
                            + codec.encode_execute() + codec.encode_bind("p", "s1") + codec.encode_execute("p")
                            + codec.SYNC)
        assert not errors(msgs)
        assert cells(msgs) == [b"[masked]"]
        # a later round trip binds the server's s1 again: still masked
        again = await c.send(codec.encode_bind("", "s1") + codec.encode_execute() + codec.SYNC)
        assert cells(again) == [b"[masked]"]
    finally:
        await c.close()
    assert not await statements(hoop, "SELECT 'x'::text AS a")  # hoop's stale text is not recorded


async def test_a_prepared_close_and_declare_cannot_reuse_a_portal_described_in_the_same_round(hoop: Hoop) -> None:
    c = await Wire.connect(hoop)
    try:
        await c.query("BEGIN")
        msgs = await c.send(
            codec.encode_parse("s2", "CLOSE c")
            + codec.encode_parse("s3", "DECLARE c CURSOR FOR SELECT note FROM users ORDER BY id")
            + codec.encode_parse("x", "SELECT 'x'::text AS a") + codec.encode_bind("c", "x")
            + codec.encode_describe("P", "c")
            + codec.encode_bind("", "s2") + codec.encode_execute() + codec.encode_bind("", "s3")
            + codec.encode_execute() + codec.encode_execute("c", 3) + codec.SYNC)
        assert not errors(msgs)
        assert cells(msgs) == [b"[masked]"] * 3
        assert not errors(await c.query("COMMIT"))
    finally:
        await c.close()
    for event in await hoop.events("statement"):
        for row in event.get("rows_sample", {}).get("rows", []):
            assert "n1" not in row and "n2" not in row, event  # the audit sample holds no raw note


_PARSED_SWAP = [
    ("c", codec.encode_parse("s9", "DEALLOCATE s1") + codec.encode_parse("s10", "PREPARE s1 AS SELECT email FROM users")
     + codec.encode_parse("s1", "SELECT 'x'::text AS a") + codec.encode_describe("S", "s1") + codec.SYNC),
    ("s", _PC * 3 + codec.encode_parameter_description([]) + _fields("a") + codec.encode_ready_for_query("I")),
    ("c", _batch(None, [], "s9")),  # the fast path takes these two
    ("s", _BC + _NO_DATA + _answer((), [], "DEALLOCATE")),
    ("c", _batch(None, [], "s10")),
    ("s", _BC + _NO_DATA + _answer((), [], "PREPARE")),
    ("c", codec.encode_bind("p", "s1") + codec.encode_execute("p") + codec.SYNC),
    ("s", _BC + _fields("email") + _answer((), [[b"bob@corp.example"]], "SELECT 1")),  # after hoop's Describe
]


@pytest.mark.parametrize("masking", [True, False])
async def test_replayed_parsed_deallocate_and_prepare_agree_with_and_without_the_fast_path(masking: bool) -> None:
    fast_run = await _play(_PARSED_SWAP, use_fast=True, masking=masking)
    general = await _play(_PARSED_SWAP, use_fast=False, masking=masking)
    assert fast_run == general
    assert fast_run["statements"] == ["s10", "s9"]  # s1 is the server's now, not the one hoop described
    if masking:
        assert codec.encode_describe("P", "p") in fast_run["to_server"]
        assert b"bob@corp.example" not in fast_run["to_client"]
        assert fast_run["expect"] == []


def test_the_fast_path_applies_a_parsed_statement_s_effect_when_it_runs() -> None:
    insp = _inspector()
    insp.from_client(*_frames(codec.encode_parse("d", "DEALLOCATE s1") + codec.encode_parse("s1", "SELECT 1")))
    assert sorted(insp.statements) == ["d", "s1"]
    assert fast.fast_request(insp, _batch(None, [], "d"))
    assert sorted(insp.statements) == ["d"]


def _frames(data: bytes) -> tuple[bytes, list[codec.Frame], int]:
    buf, frames = codec.Framer().feed(data)
    return buf, frames, 0


# ---- finding 3: binary numbers are read by the detectors in their text form ----------------

_NUMBERS = {
    "int8": ["0", "-1", "42", "999999999999", "4111111111111111", "-9223372036854775808", "9223372036854775807"],
    "float8": ["0", "-0", "1.5", "-2.25", "0.1", "1e-05", "0.0001", "123456789012345", "1e+15", "378282246310005",
               "4111111111111111", "0.4111111111111111", "1.7976931348623157e+308", "5e-324", "NaN", "Infinity",
               "-Infinity", "100", "1e+100", "3.141592653589793", "-0.00012"],
    "numeric": ["0", "0.00", "-1", "12.50", "4111111111111111", "-4111111111111111.0001", "0.000000000001",
                "10000", "99990000", "1e20", "123456789.123456789", "NaN", "Infinity", "-Infinity", "0.1000",
                "-0.0000001", "1000000000000000000000000000000.5"],
}


def test_binary_numbers_are_rendered_as_postgresql_prints_them(pg: PgCluster) -> None:
    for typ, values in _NUMBERS.items():
        literals = ", ".join(f"('{v}'::{typ})" for v in values)
        send = {"int8": "int8send", "float8": "float8send", "numeric": "numeric_send"}[typ]
        out = pg.psql(f"SELECT encode({send}(v), 'hex') || '|' || v::text FROM (VALUES {literals}) AS t(v)")
        for line in out.splitlines():
            hexed, text = line.split("|")
            oid = {"int8": 20, "float8": 701, "numeric": 1700}[typ]
            assert binary.number_texts(bytes.fromhex(hexed), oid) == [text], (typ, text)
    arr = pg.psql("SELECT encode(array_send(ARRAY[[1, NULL], [4111111111111111, -5]]::int8[]), 'hex')")
    assert binary.number_texts(bytes.fromhex(arr), 1016) == ["1", "4111111111111111", "-5"]
    assert binary.number_texts(b"\0" * 4, 20) is None and binary.number_texts(bytes.fromhex(arr), 1022) is None


async def test_a_card_number_stored_as_a_number_is_withheld_from_binary_clients(hoop: Hoop) -> None:
    hoop.cluster.psql(
        "CREATE TABLE pay (id int8, c int8, n numeric, f float8, a int8[], amount numeric, ratio float8);"
        "INSERT INTO pay VALUES (1, 4111111111111111, 4111111111111111.00, 378282246310005,"
        " ARRAY[7, 4111111111111111], 12.50, 0.25), (2, 7, 7, 7, ARRAY[7], 1, 1)", database=hoop.database)
    conn = await asyncpg.connect(hoop.dsn())
    try:
        rows = await conn.fetch("SELECT id, c, n, f, a, amount, ratio FROM pay ORDER BY id")
        masked_too = await conn.fetchrow("SELECT c, note FROM pay, users WHERE pay.id = 1 AND users.id = 1")
    finally:
        await conn.close()
    assert tuple(rows[0]) == (1, None, None, None, None, Decimal("12.50"), 0.25)
    assert tuple(rows[1]) == (2, 7, Decimal(7), 7.0, [7], Decimal(1), 1.0)
    assert tuple(masked_too) == (None, "[masked]")  # a result with a masked column: the same
    r = await hoop.psql("-At", "-c", "SELECT c, n, f, a FROM pay WHERE id = 1")
    assert r.stdout.strip() == "[card]|[card].00|[card]|{7,[card]}"  # what text clients get


# ---- finding 5: after an extended-protocol error the server skips to the client's next Sync ----


async def _until(c: Wire, t: int) -> list[tuple[int, bytes]]:
    out = []
    async with asyncio.timeout(10):
        while not out or out[-1][0] != t:
            out.append(await c.message())
    return out


async def test_what_the_client_sends_between_an_extended_error_and_its_sync_is_recorded_as_skipped(hoop: Hoop) -> None:
    c = await Wire.connect(hoop)
    try:
        c.writer.write(codec.encode_parse("", "SELECT * FROM nosuch") + codec.FLUSH)
        assert [e["C"] for e in errors(await _until(c, Backend.ERROR_RESPONSE))] == ["42P01"]
        skipped = await c.send(codec.encode_query("SELECT 'skipped-by-server'") + codec.encode_query("DROP TABLE big")
                               + codec.encode_parse("", "SELECT note FROM users") + codec.encode_bind("", "")
                               + codec.encode_execute() + codec.SYNC)
        assert [t for t, _ in skipped] == [Backend.READY_FOR_QUERY]  # the server ran none of them
        for word in ("one", "two", "three"):
            assert cells(await c.query(f"SELECT '{word}'")) == [word.encode()]
        assert [e["C"] for e in errors(await c.query("DROP TABLE big"))] == ["42501"]  # still refused
    finally:
        await c.close()
    [rec] = await statements(hoop, "SELECT 'skipped-by-server'")
    assert rec["error"] == SKIPPED and rec["rows"] == 0
    assert [r["error"] for r in await statements(hoop, "DROP TABLE big")] == [SKIPPED, "refused by hoop"]
    for word in ("one", "two", "three"):
        [rec] = await statements(hoop, f"SELECT '{word}'")
        assert rec["rows_sample"]["rows"] == [[word]] and rec["error"] is None
    assert hoop.cluster.psql("SELECT count(*) FROM big", database=hoop.database) == "2000"


async def test_an_extended_copy_from_stdin_keeps_the_reply_queue_in_step(hoop: Hoop) -> None:
    hoop.cluster.psql("CREATE TABLE IF NOT EXISTS t5 (id int, v text)", database=hoop.database)
    c = await Wire.connect(hoop)
    try:
        # libpq's PQsendQueryParams("COPY ... FROM STDIN"): a Sync with the batch, and one after CopyDone
        c.writer.write(codec.encode_parse("", "COPY t5 FROM STDIN") + codec.encode_bind("", "")
                       + codec.encode_describe("P", "") + codec.encode_execute() + codec.SYNC)
        await _until(c, Backend.COPY_IN_RESPONSE)
        done = await c.send(codec.frame(ord("d"), b"1\ta\n") + codec.frame(ord("c"), b"") + codec.SYNC)
        assert not errors(done)
        for word in ("one", "two", "three"):
            assert cells(await c.query(f"SELECT '{word}'")) == [word.encode()]
    finally:
        await c.close()
    [rec] = await statements(hoop, "COPY t5 FROM STDIN")
    assert rec["rows"] == 1 and rec["error"] is None
    for word in ("one", "two", "three"):
        [rec] = await statements(hoop, f"SELECT '{word}'")
        assert rec["rows_sample"]["rows"] == [[word]]


_ERROR_BEFORE_SYNC = [
    ("c", codec.encode_parse("", "SELECT nope") + codec.FLUSH),
    ("s", codec.encode_error("42703", "column does not exist")),
    ("c", codec.encode_query("SELECT 42")),
    ("c", codec.encode_query("DROP TABLE t") + codec.SYNC),
    ("s", codec.encode_ready_for_query("I")),
    ("c", codec.encode_query("SELECT 'first'")),
    ("s", _answer(("a",), [[b"first"]], "SELECT 1")),
    ("c", codec.encode_query("SELECT 'second'")),
    ("s", _answer(("a",), [[b"second"]], "SELECT 1")),
]


@pytest.mark.parametrize("masking", [True, False])
async def test_replayed_error_before_the_sync_agrees_with_and_without_the_fast_path(masking: bool) -> None:
    fast_run = await _play(_ERROR_BEFORE_SYNC, use_fast=True, masking=masking)
    general = await _play(_ERROR_BEFORE_SYNC, use_fast=False, masking=masking)
    assert fast_run == general
    assert fast_run["expect"] == []
    recs = {d["sql"]: d for kind, d in fast_run["events"] if kind == "statement"}
    assert recs["SELECT 42"]["error"] == SKIPPED and recs["DROP TABLE t"]["error"] == SKIPPED
    assert recs["SELECT 'second'"]["rows_sample"]["rows"] == [["second"]]
    assert b"SELECT 42" not in fast_run["to_server"] and b"DROP TABLE t" not in fast_run["to_server"]
