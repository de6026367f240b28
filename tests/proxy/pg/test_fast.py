"""The relay's fast paths (proxy/pg/fast.py) change nothing but the cost.

Each scenario is a conversation of client chunks and server chunks, played through two relays
over fake transports: one with the fast paths, one without (``Relay(fast=False)``). Both must
forward the same bytes both ways, record the same statements and end in the same protocol
state. The C recogniser of a whole answer and the C literal shape of the guard are fuzzed
against their pure-Python twins.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest

from broker.clock import FakeClock
from broker.config import parse_config
from proxy.guard import Decision
from proxy.mask import Masker
from proxy.pg import _wire, codec, fast
from proxy.pg.inspect import Inspector, Stmt
from proxy.pg.messages import Field
from proxy.pg.relay import Relay
from proxy.sqlguard import SqlGuard, py_shape, shape
from tests.conftest import base_config

RESOURCE = parse_config(base_config(resources=[{
    "name": "prod-db", "kind": "postgres", "address": "127.0.0.1:1", "credential": {"env": "PGPW"},
    "request": {"groups": ["eng"], "max_duration": "4h"},
    "guardrails": {"rules": [{"name": "no-drop", "action": "block", "statements": ["drop"]},
                             {"name": "careful", "action": "review", "statements": ["delete_without_where"]}]},
    "masking": {"columns": [{"match": "email", "strategy": "redact"}]},
}])).resources[0]


class _Transport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def set_protocol(self, protocol: object) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class _Session:
    deadline = datetime(2100, 1, 1, tzinfo=UTC)

    def __init__(self) -> None:
        self.stats = {"statements": 0, "rows": 0, "blocked": 0, "reviewed": 0, "bytes_in": 0, "bytes_out": 0}
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, {k: v for k, v in data.items() if k != "ms"}))

    async def close(self, reason: str) -> None:
        pass


class _Up:
    def __init__(self) -> None:
        self.transport = _Transport()


async def _never(stmt: Stmt, decision: Decision) -> bool:
    raise AssertionError("no scenario here holds a statement")


async def _play(chunks: list[tuple[str, bytes]], *, use_fast: bool, masking: bool = True) -> dict[str, Any]:
    session, client, up = _Session(), _Transport(), _Up()
    masker = Masker(RESOURCE.masking if masking else RESOURCE.masking.model_copy(update={"enabled": False}),
                    b"k" * 32)
    insp = Inspector(RESOURCE, SqlGuard(RESOURCE.guardrails), masker, None, session, client.write, _never)
    relay = Relay(client, up, insp, session, FakeClock(), conn="t", stream_rows=not masker.enabled,  # type: ignore[arg-type]
                  on_closed=lambda r: None, fast=use_fast)
    relay.start(b"", b"")
    for side, data in chunks:
        (relay.from_client if side == "c" else relay.from_server)(data)
        assert relay.end_reason is None
    if relay._timer is not None:
        relay._timer.cancel()
    return {"to_server": b"".join(up.transport.sent), "to_client": b"".join(client.sent), "events": session.events,
            "stats": session.stats, "status": insp.status, "expect": list(insp.expect),
            "statements": sorted(insp.statements), "portals": sorted(insp.portals),
            "columns": {k: (v.fields.columns if v.fields else None) for k, v in insp.statements.items()}}


def _fields(*names: str) -> bytes:
    return codec.encode_row_description([Field(n, 0, 0, 25, -1, -1, 0) for n in names])


def _answer(names: tuple[str, ...], rows: list[list[bytes | None]], tag: str, status: str = "I") -> bytes:
    head = _fields(*names) if names else b""
    return (head + b"".join(codec.encode_data_row(r) for r in rows) + codec.encode_command_complete(tag)
            + codec.encode_ready_for_query(status))


def _batch(sql: str | None, params: list[bytes | None], statement: str = "", portal: str = "") -> bytes:
    parse = codec.encode_parse(statement, sql) if sql is not None else b""
    return (parse + codec.encode_bind(portal, statement, params) + codec.encode_describe("P", portal)
            + codec.encode_execute(portal) + codec.SYNC)


_PC, _BC = b"1\0\0\0\4", b"2\0\0\0\4"
SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"

SCENARIOS: dict[str, list[tuple[str, bytes]]] = {
    "simple selects": [
        ("c", codec.encode_query("SELECT abalance FROM t WHERE aid = 1")),
        ("s", _answer(("abalance",), [[b"0"]], "SELECT 1")),
        ("c", codec.encode_query("SELECT abalance FROM t WHERE aid = 2")),
        ("s", _answer(("abalance",), [[b"7"], [None]], "SELECT 2")),
    ],
    "a masked column is rewritten by the general path": [
        ("c", codec.encode_query("SELECT email FROM users")),
        ("s", _answer(("email",), [[b"bob@corp.example"]], "SELECT 1")),
    ],
    "a detector hit in an unmasked column": [
        ("c", codec.encode_query("SELECT note FROM users")),
        ("s", _answer(("note",), [[b"write to bob@corp.example"]], "SELECT 1")),
    ],
    "writes, transactions and a rollback": [
        ("c", codec.encode_query("BEGIN")),
        ("s", _answer((), [], "BEGIN", "T")),
        ("c", codec.encode_query("UPDATE t SET a = 1 WHERE id = 2")),
        ("s", _answer((), [], "UPDATE 3", "T")),
        ("c", codec.encode_query("COMMIT")),
        ("s", _answer((), [], "ROLLBACK")),
    ],
    "a blocked statement, alone and inside a transaction": [
        ("c", codec.encode_query("DROP TABLE t")),
        ("c", codec.encode_query("BEGIN")),
        ("s", _answer((), [], "BEGIN", "T")),
        ("c", codec.encode_query("DROP TABLE t")),
        ("s", codec.encode_error("42601", "syntax error") + codec.encode_ready_for_query("E")),
    ],
    "extended: unnamed statements": [
        ("c", _batch(SELECT, [b"1"])),
        ("s", _PC + _BC + _answer(("abalance",), [[b"0"]], "SELECT 1")),
        ("c", _batch(SELECT, [b"2"])),
        ("s", _PC + _BC + _answer(("abalance",), [[b"5"]], "SELECT 1")),
    ],
    "extended: a prepared statement bound again": [
        ("c", codec.encode_parse("s1", SELECT) + codec.encode_describe("S", "s1") + codec.SYNC),
        ("s", _PC + codec.encode_parameter_description([23]) + _fields("abalance")
         + codec.encode_ready_for_query("I")),
        ("c", _batch(None, [b"1"], "s1")),
        ("s", _BC + _answer(("abalance",), [[b"0"]], "SELECT 1")),
        ("c", _batch(None, [b"2"], "s1", "p1")),
        ("s", _BC + _answer(("abalance",), [[b"3"]], "SELECT 1")),
    ],
    "extended: a masked column": [
        ("c", _batch("SELECT email FROM users WHERE id = $1", [b"1"])),
        ("s", _PC + _BC + _answer(("email",), [[b"bob@corp.example"]], "SELECT 1")),
    ],
    "extended: a blocked Parse": [
        ("c", _batch("DROP TABLE t", [])),
        ("c", _batch(SELECT, [b"1"])),
        ("s", _PC + _BC + _answer(("abalance",), [[b"0"]], "SELECT 1")),
    ],
    "an answer split over two reads": [
        ("c", codec.encode_query("SELECT abalance FROM t WHERE aid = 1")),
        ("s", _answer(("abalance",), [[b"0"]], "SELECT 1")[:9]),
        ("s", _answer(("abalance",), [[b"0"]], "SELECT 1")[9:]),
    ],
    "two statements in one read, and a notice in an answer": [
        ("c", codec.encode_query("SELECT 1") + codec.encode_query("SELECT 2")),
        ("s", _answer(("a",), [[b"1"]], "SELECT 1") + _answer(("a",), [[b"2"]], "SELECT 1")),
        ("c", codec.encode_query("SELECT 3")),
        ("s", _fields("a") + codec.encode_fields({"S": "NOTICE", "C": "00000", "M": "hi"}, 0x4E)
         + codec.encode_data_row([b"3"]) + codec.encode_command_complete("SELECT 1") + codec.encode_ready_for_query()),
    ],
    "an error answer": [
        ("c", codec.encode_query("SELECT nope")),
        ("s", codec.encode_error("42703", "column does not exist") + codec.encode_ready_for_query("I")),
        ("c", _batch("SELECT nope", [])),
        ("s", _PC + codec.encode_error("42703", "column does not exist") + codec.encode_ready_for_query("I")),
    ],
}


@pytest.mark.parametrize("masking", [True, False])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_fast_and_general_paths_agree(name: str, masking: bool) -> None:
    fast_run = await _play(SCENARIOS[name], use_fast=True, masking=masking)
    general = await _play(SCENARIOS[name], use_fast=False, masking=masking)
    assert fast_run == general
    assert fast_run["events"], "every scenario records something"


async def test_every_statement_is_recorded_with_its_rows_and_columns() -> None:
    got = await _play(SCENARIOS["extended: a prepared statement bound again"], use_fast=True)
    statements = [data for kind, data in got["events"] if kind == "statement"]
    assert [s["rows"] for s in statements] == [1, 1]  # a Parse alone runs nothing: Executes are recorded
    assert statements[-1]["rows_sample"] == {"columns": ["abalance"], "rows": [["3"]]}
    assert got["expect"] == [] and got["status"] == "I"


async def test_a_masked_answer_never_leaves_unmasked() -> None:
    got = await _play(SCENARIOS["extended: a masked column"], use_fast=True)
    assert b"bob@corp.example" not in got["to_client"]


def _inspector() -> Inspector:
    masker = Masker(RESOURCE.masking, b"k" * 32)
    return Inspector(RESOURCE, SqlGuard(RESOURCE.guardrails), masker, None, _Session(), lambda d: None, _never)


def test_the_common_round_trips_take_the_fast_path() -> None:
    insp = _inspector()
    assert fast.fast_request(insp, codec.encode_query("SELECT abalance FROM t WHERE aid = 1"))
    assert fast.fast_reply(insp, _answer(("abalance",), [[b"0"]], "SELECT 1"))
    assert fast.fast_request(insp, _batch(SELECT, [b"1"]))
    assert fast.fast_reply(insp, _PC + _BC + _answer(("abalance",), [[b"0"]], "SELECT 1"))
    assert not insp.expect
    assert [d["rows"] for _, d in insp.session.events] == [1, 1]


def test_what_the_fast_path_leaves_alone_is_left_untouched() -> None:
    insp = _inspector()
    for chunk in (codec.encode_query("DROP TABLE t"), codec.encode_query("DELETE FROM t"),
                  _batch("DROP TABLE t", []), codec.encode_query("SELECT 1") + codec.encode_query("SELECT 2"),
                  codec.encode_query("SELECT 1")[:-1], codec.SYNC):
        assert not fast.fast_request(insp, chunk)
    assert not insp.expect and not insp.statements and not insp.portals and not insp.session.events
    assert not fast.fast_reply(insp, _answer(("a",), [[b"1"]], "SELECT 1"))  # nothing was asked
    assert fast.fast_request(insp, codec.encode_query("SELECT email FROM users"))
    assert not fast.fast_reply(insp, _answer(("email",), [[b"bob@corp.example"]], "SELECT 1"))  # to mask
    assert len(insp.expect) == 1 and insp.rec is None and not insp.session.events


def test_the_recogniser_takes_exactly_one_whole_answer() -> None:
    one = _answer(("a",), [[b"1"], [b"2"]], "SELECT 2", "T")
    got = fast.reply_stretch(_PC + _BC + one)
    assert got is not None
    pre, ts, te, ds, de, rows, cs, ce, status = got
    wire = _PC + _BC + one
    assert (pre, rows, status) == (3, 2, ord("T"))
    assert (wire[ts], wire[ds], wire[cs], te, de, ce) == (ord("T"), ord("D"), ord("C"), ds, cs, len(wire) - 6)
    assert fast.reply_stretch(_answer((), [], "BEGIN")) is not None
    for not_one in (one + one, one[:-1], b"", one + b"Z", codec.encode_data_row([b"1"]) + one,
                    codec.encode_command_complete("SELECT 0"), b"1\0\0\0\5x" + one):
        assert fast.reply_stretch(not_one) is None


def _stretches(rnd: random.Random) -> bytes:
    parts = []
    if rnd.random() < 0.5:
        parts.append(_PC)
    if rnd.random() < 0.6:
        parts.append(_BC)
    names = tuple("abc"[: rnd.randint(0, 3)])
    rows = [[rnd.choice([None, b"", b"x", b"42"]) for _ in names] for _ in range(rnd.randint(0, 4))] if names else []
    parts.append(_answer(names, rows, rnd.choice(["SELECT 1", "BEGIN", "UPDATE 2", ""]), rnd.choice("ITE")))
    return b"".join(parts)


def test_reply_stretch_matches_python_on_valid_cut_and_mangled_bytes() -> None:
    assert fast._wire is _wire
    rnd = random.Random(11)
    for _ in range(3000):
        wire = _stretches(rnd)
        cases = [wire, wire[: rnd.randrange(len(wire) + 1)], wire + _stretches(rnd)]
        data = bytearray(wire)
        for _ in range(rnd.randint(1, 3)):
            data[rnd.randrange(len(data))] = rnd.choice((0, 0xFF, 0x44, 0x5A, 0x43, rnd.randrange(256)))
        cases.append(bytes(data))
        for case in cases:
            for limit in (codec.SERVER_MAX_MESSAGE, 8):
                assert _wire.reply_stretch(case, limit) == fast.py_reply_stretch(case, limit), case


_ALPHABET = ["a", "Z", "_", "0", "1", "9", ".", "$", "$1", "e", "E", "+", "-", "'", '"', " ", "(", ",", ";", "/",
             "*", "\\", "&", "\n", "x1", "1e5", "12.5", "1.", ".5", "é", "٣", "SELECT ", "--", "/*"]


def test_shape_matches_python_on_fuzzed_text() -> None:
    rnd = random.Random(5)
    for _ in range(60000):
        text = "".join(rnd.choice(_ALPHABET) for _ in range(rnd.randint(0, 12)))
        assert shape(text) == py_shape(text), text
    assert shape("SELECT a FROM t WHERE id = 42 AND s = 'x' AND f = 1.5e3") == \
        "SELECT a FROM t WHERE id = ? AND s = ? AND f = ?"
    assert shape('SELECT "t1"."c2" FROM t1 WHERE x1 = 3') == 'SELECT "t1"."c2" FROM t1 WHERE x1 = ?'
    assert shape("SELECT 1 -- c") is None and shape("SELECT $$x$$") is None


def _batches(rnd: random.Random) -> bytes:
    params = [rnd.choice([None, b"", b"1", b"\0\xff", "é".encode()]) for _ in range(rnd.randint(0, 3))]
    portal, statement = rnd.choice(["", "p1", "ü"]), rnd.choice(["", "s1"])
    formats = [rnd.choice([0, 1]) for _ in range(rnd.randint(0, 2))]
    parse = codec.encode_parse(statement, "SELECT $1") if rnd.random() < 0.6 else b""
    return (parse + codec.encode_bind(portal, statement, params, param_formats=[rnd.choice([0, 1]) for _ in params],
                                      result_formats=formats)
            + codec.encode_describe(rnd.choice("PS"), portal) + codec.encode_execute(portal, rnd.choice([0, 5]))
            + codec.SYNC)


def test_batch_matches_python_on_valid_cut_and_mangled_bytes() -> None:
    rnd = random.Random(3)
    for _ in range(3000):
        wire = _batches(rnd)
        cases = [wire, wire[: rnd.randrange(len(wire) + 1)], wire + codec.SYNC]
        data = bytearray(wire)
        for _ in range(rnd.randint(1, 3)):
            data[rnd.randrange(len(data))] = rnd.choice((0, 0xFF, 0x42, 0x53, 0x7F, rnd.randrange(256)))
        cases.append(bytes(data))
        for case in cases:
            for limit in (codec.CLIENT_MAX_MESSAGE, 12):
                assert _wire.batch(case, limit) == fast.py_batch(case, limit), case
    assert fast.batch(_batch(SELECT, [b"1"], "s", "p")) == (
        (codec.encode_parse("s", SELECT)[5:], b"Pp\0", b"p\0\0\0\0\0"), "p", "s", ())
