"""Detectors read binary-format cells too: arrays, records, jsonb, bytea, hstore, citext (asyncpg's
default is binary), masking each hit in place so the client still decodes the cell."""

from __future__ import annotations

import datetime
import json
import struct
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from broker.config import Masking
from proxy.mask import Masker
from proxy.pg import binary, codec, rows, runs
from proxy.pg.messages import Field
from tests.proxy.pg.harness import Hoop, seeded_database
from tests.support.pgcluster import PgCluster

EXTRA = """
CREATE EXTENSION IF NOT EXISTS citext;
CREATE EXTENSION IF NOT EXISTS hstore;
CREATE TABLE docs (id int PRIMARY KEY, doc jsonb, tags text[], blob bytea, x xml, ci citext, h hstore,
                   n int8, ts timestamptz, u uuid, amount numeric);
INSERT INTO docs VALUES (1, '{"contact": "carol@example.com", "pan": "4111 1111 1111 1111", "n": 1}',
  ARRAY['dave@example.com', 'plain', 'ssn 536-90-4399'], convert_to('mail erin@example.com now', 'UTF8'),
  '<a>frank@example.com</a>', 'grace@example.com', 'mail=>heidi@example.com, k=>v',
  4111111111111111, '2024-01-02 03:04:05+00', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 12.5);
"""
RAW = ("user1@", "user2@", "carol@", "dave@", "erin@", "frank@", "grace@", "heidi@", "4111 1111 1111 1111",
       "536-90-4399", "DE89 3704 0044 0532 0130 00", "+1 650 253 0000")
EMAIL = "[email]" + "*" * 10  # user1@example.com, masked in place: same length
CARD = "[card]" + "*" * 13  # 4111 1111 1111 1111

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pgdb(pg: PgCluster) -> str:
    db = seeded_database(pg)
    pg.psql(EXTRA, database=db)
    return db


def _clean(value: Any) -> None:
    text = repr(value)
    for raw in RAW:
        assert raw not in text, (raw, text)


async def _statements(hoop: Hoop, needle: str) -> list[dict[str, Any]]:
    return [e for e in await hoop.events("statement") if needle in e["sql"]]


async def test_arrays_records_and_jsonb_of_text_are_masked(hoop: Hoop) -> None:
    conn = await asyncpg.connect(hoop.dsn())
    try:
        emails = await conn.fetchval("SELECT array_agg(email ORDER BY id) FROM users WHERE id <= 2")
        assert emails == [EMAIL, EMAIL]
        assert await conn.fetchval("SELECT array_agg(card) FROM users WHERE id <= 1") == [CARD]
        doc = json.loads(await conn.fetchval("SELECT to_jsonb(u) FROM users u WHERE id = 1"))
        assert doc == {"id": 1, "name": "user1", "email": EMAIL, "card": CARD, "note": "n1"}
        rec = await conn.fetchval("SELECT (SELECT u FROM users u WHERE id = 1)")
        assert (rec["id"], rec["email"], rec["card"], rec["name"]) == (1, EMAIL, CARD, "user1")
        nested = await conn.fetchval("SELECT array_agg(u ORDER BY id) FROM users u WHERE id <= 2")
        assert [(r["id"], r["email"]) for r in nested] == [(1, EMAIL), (2, EMAIL)]
        anon = await conn.fetchval("SELECT ARRAY[ROW(id, email, ARRAY[card, 'x'])] FROM users WHERE id = 1")
        assert anon[0][0] == 1 and anon[0][1] == EMAIL and anon[0][2] == [CARD, "x"]
        others = await conn.fetchval("SELECT ARRAY['ssn 536-90-4399', 'DE89 3704 0044 0532 0130 00', "
                                     "'call +1 650 253 0000']")
        assert others == ["ssn [ssn]******", "[iban]" + "*" * 21, "call [phone]********"]
        _clean([emails, doc, rec, nested, anon, others])
    finally:
        await conn.close()
    recorded = await _statements(hoop, "array_agg(email ORDER BY id)")
    assert recorded and recorded[-1]["rows"] == 1
    _clean(await hoop.events("statement"))


async def test_columns_of_container_and_opaque_types_are_masked(hoop: Hoop) -> None:
    conn = await asyncpg.connect(hoop.dsn())
    try:
        await conn.set_builtin_type_codec("hstore", codec_name="pg_contrib.hstore")
        await conn.set_type_codec("citext", encoder=bytes, decoder=bytes, format="binary")
        row = await conn.fetchrow("SELECT doc, tags, blob, x, ci, h FROM docs WHERE id = 1")
        assert row is not None
        doc = json.loads(row["doc"])  # still valid JSON
        assert doc == {"contact": "[email]" + "*" * 10, "pan": CARD, "n": 1}
        assert row["tags"] == ["[email]" + "*" * 9, "plain", "ssn [ssn]******"]
        assert row["blob"] == b"mail [email]*********" + b" now"
        assert row["x"] == "<a>[email]**********</a>"
        assert row["ci"] == b"[email]" + b"*" * 10
        assert row["h"] == {"mail": "[email]" + "*" * 10, "k": "v"}
        _clean(dict(row))
    finally:
        await conn.close()
    recorded = await _statements(hoop, "SELECT doc, tags")
    assert recorded and recorded[-1]["rows"] == 1
    _clean(await hoop.events("statement"))


async def test_fixed_width_cells_pass_unchanged(hoop: Hoop) -> None:
    conn = await asyncpg.connect(hoop.dsn())
    try:
        # the email makes the run take the slow path: the other cells must come through as they were
        row = await conn.fetchrow("SELECT n, ts, u, amount, ARRAY[n, 7], id, tags[1] AS first, "
                                  "1.5::float8 AS f, true AS b FROM docs WHERE id = 1")
        assert row is not None
        assert row["n"] is None  # int8 4111111111111111 prints as a card number: withheld, as psql shows [card]
        assert row["ts"] == datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
        assert row["u"] == uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        assert row["amount"] == Decimal("12.5")
        assert row["array"] is None
        assert (row["id"], row["first"], row["f"], row["b"]) == (1, "[email]", 1.5, True)
    finally:
        await conn.close()


def _array(elem: int, values: list[bytes | None]) -> bytes:
    head = struct.pack("!iiIii", 1, int(None in values), elem, len(values), 1)
    return head + b"".join(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v for v in values)


def _record(fields: list[tuple[int, bytes | None]]) -> bytes:
    return struct.pack("!i", len(fields)) + b"".join(
        struct.pack("!Ii", oid, -1) if v is None else struct.pack("!Ii", oid, len(v)) + v for oid, v in fields)


MASKER = Masker(Masking(), b"k" * 32)


def test_in_place_masking_keeps_the_structure() -> None:
    # a length whose low byte is a digit ("0" = 48) must not be read as part of the card after it
    card = b"4111111111111111" + b" " * 32
    cell = _array(25, [card, None, b"bob@corp.example"])
    hit, new = binary.mask_binary(MASKER, cell, 1009)
    assert hit and new is not None and len(new) == len(cell)
    assert new == _array(25, [b"[card]**********" + b" " * 32, None, b"[email]*********"])
    assert binary.mask_binary(MASKER, _array(25, [b"plain"]), 1009) == (False, _array(25, [b"plain"]))
    rec = _record([(23, b"\0\0\0\1"), (1009, _array(25, [b"a@b.example"])), (3802, b'\x01{"k": "a@b.example"}')])
    hit, new = binary.mask_binary(MASKER, rec, 2249)
    assert new == _record([(23, b"\0\0\0\1"), (1009, _array(25, [b"[email]****"])),
                           (3802, b'\x01{"k": "[email]****"}')])
    partial = Masker(Masking(strategy="partial"), b"k" * 32)
    assert binary.mask_binary(partial, b"a@b.example", 17) == (True, b"*******mple")
    hashed = Masker(Masking(strategy="hash"), b"k" * 32)
    hit, new = binary.mask_binary(hashed, b"x 4111111111111111", 17)
    assert new is not None and len(new) == 18 and new.startswith(b"x h:")


def test_what_cannot_be_masked_in_place_becomes_null() -> None:
    # opaque bytes of an unknown type, a NUL just before the hit: its "x" may be the low byte of a length
    assert binary.mask_binary(MASKER, b"\0\0\0xa@b.example", 99999) == (True, None)
    # a length just before the hit whose value holds the whole hit: masked in place
    assert binary.mask_binary(MASKER, b"\0\0\0\x0ba@b.example", 99999) == (True, b"\0\0\0\x0b[email]****")
    # ...otherwise a byte that is not text among the 4 before it: 0x0b may be the high byte of the length 0x0b61
    assert binary.mask_binary(MASKER, b"\0\0\0\x0ab@b.example", 99999) == (True, None)
    # text around the hit: masked in place
    assert binary.mask_binary(MASKER, b"\0\0\0\x0fsee a@b.example.", 99999) == (
        True, b"\0\0\0\x0fsee [email]****.")
    # raw bytea has no structure: the same bytes are masked in place
    assert binary.mask_binary(MASKER, b"\0\0\0xa@b.example", 17) == (True, b"\0\0\0[email]*****")
    # an email spread over a structure's own bytes (an int8 field) is caught by the last scan
    assert binary.mask_binary(MASKER, _record([(20, b"x@ab.com")]), 2249) == (True, None)
    # fixed-width types are not read at all
    assert not binary.scanned(23) and not binary.scanned(1007) and binary.scanned(1009) and binary.scanned(17)


def test_binary_hit_does_not_eat_a_length_byte() -> None:
    """An hstore-shaped cell: the value length 0x141 is 00 00 01 41, and 0x41 ("A"... here "l") joins the email."""
    val = b"lice@example.com " + b"x" * (0x141 - 17)
    cell = struct.pack("!i", 1) + struct.pack("!i", 3) + b"key" + struct.pack("!i", 0x141) + val
    assert cell[14:15] == b"A"
    hit, new = binary.mask_binary(MASKER, cell, 99999)
    assert hit and new is None
    # a tsvector-like uint16 with weight bits (0xC0) before a low byte that is a letter
    hit, new = binary.mask_binary(MASKER, b"word\0\0\x01\xc0bob@corp.example", 99999)
    assert hit and new is None
    # and a field after the hit whose high bytes joined it
    hit, new = binary.mask_binary(MASKER, b"see bob@corp.example\x01\x02", 99999)
    assert hit and new is None


def test_plans_read_binary_cells_that_may_carry_text() -> None:
    fields = (Field("id", 0, 0, 23, 4, -1, 1), Field("tags", 0, 0, 1009, -1, -1, 1),
              Field("doc", 0, 0, 3802, -1, -1, 1))
    plan = rows.make_plan(MASKER, fields, (1, 1, 1), {})
    assert plan.binary_scan == (False, True, True) and not plan.masked
    wire = codec.encode_data_row([b"\0\0\0\1", _array(25, [b"a@b.example"]), None])
    assert runs.run_might_contain(MASKER, plan, wire, 0, len(wire))  # the fast paths fall back
    new = rows.mask_row(MASKER, plan, memoryview(wire)[5:], True)
    assert new == codec.encode_data_row([b"\0\0\0\1", _array(25, [b"[email]****"]), None])
    clean = codec.encode_data_row([b"\0\0\0@", _array(25, [b"plain"]), None])  # "@" only in an int4
    assert not runs.run_might_contain(MASKER, plan, clean, 0, len(clean))
    # a row wider than its plan: nothing is known of the extra cell, so it is withheld, never left raw
    wide = codec.encode_data_row([b"\0\0\0\1", None, None, b"a@b.example"])
    assert rows.mask_row(MASKER, plan, memoryview(wide)[5:], True) == codec.encode_data_row(
        [b"\0\0\0\1", None, None, None])
