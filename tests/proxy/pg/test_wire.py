"""The C twins (proxy/pg/_wire.c) give exactly what the pure-Python ones give: frames, bytes, errors."""

from __future__ import annotations

import random

import pytest

from broker.config import Masking
from proxy import detectors
from proxy.detectors import py_email_hits
from proxy.mask import Masker
from proxy.pg import _wire, codec, framer, rows, runs
from proxy.pg.messages import Field, MalformedMessage

MASKER = Masker(Masking(columns=[{"match": "email", "strategy": "redact"}, {"match": "card", "strategy": "partial"},
                                 {"match": "h", "strategy": "hash"}, {"match": "bin", "strategy": "redact"}]),
                b"k" * 32)
FIELDS = tuple(Field(name, 0, 0, oid, -1, -1, 0) for name, oid in
               (("id", 23), ("email", 25), ("card", 25), ("h", 25), ("bin", 23), ("note", 25), ("raw", 17)))
PLAN = rows.make_plan(MASKER, FIELDS, (0, 0, 0, 0, 1, 0, 1), {})
CELLS = [None, b"", b"1", b"1234", b"12345", b"4111111111111111", "ÿ€-4242-ü".encode(), b"a@b.example",
         b"x" * 256, b"y" * 257, b"\0\0\0\1", b"mail bob@corp.example", b"4111 1111 1111 1111"]


def _outcome(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return "ok", fn(*args)
    except MalformedMessage as exc:
        return "error", type(exc).__name__, str(exc)


def _rows(rnd: random.Random, n: int, width: int = len(FIELDS)) -> bytes:
    return b"".join(codec.encode_data_row([rnd.choice(CELLS) for _ in range(width)]) for _ in range(n))


def _mangle(rnd: random.Random, wire: bytes) -> bytes:
    data = bytearray(wire)
    for _ in range(rnd.randint(1, 3)):
        if not data:
            break
        k = rnd.randrange(len(data))
        data[k] = rnd.choice((0, 0xFF, 0x44, 0x7F, rnd.randrange(256)))
    return bytes(data)


def test_the_c_twins_are_built() -> None:
    assert framer._wire is _wire and runs._wire is _wire and detectors._email_hits is _wire.email_hits


def _split_both(buf: bytes, pos: int, max_length: int, coalesce: bool) -> None:
    out_c: list[codec.Frame] = []
    out_py: list[codec.Frame] = []
    got_c = _outcome(codec.split, buf, pos, max_length, out_c, coalesce)
    got_py = _outcome(codec.py_split, buf, pos, max_length, out_py, coalesce)
    assert got_c == got_py
    assert out_c == out_py


@pytest.mark.parametrize("coalesce", [False, True])
def test_split_matches_python_at_every_cut_and_on_mangled_bytes(coalesce: bool) -> None:
    rnd = random.Random(7)
    wire = (codec.encode_row_description(FIELDS) + _rows(rnd, 5) + codec.encode_command_complete("SELECT 5")
            + _rows(rnd, 1) + codec.encode_ready_for_query("I"))
    for cut in range(len(wire) + 1):
        _split_both(wire[:cut], 0, codec.SERVER_MAX_MESSAGE, coalesce)
        _split_both(wire, cut, 64, coalesce)  # small limit: errors on the long ones
    for _ in range(3000):
        _split_both(_mangle(rnd, wire), rnd.randrange(8), codec.SERVER_MAX_MESSAGE, coalesce)


def test_split_error_names_the_type() -> None:
    with pytest.raises(codec.MessageTooLong, match="invalid message length 3 for type 'D'"):
        codec.split(codec.encode_data_row([b"1"]) + b"D\0\0\0\3", 0, 100, [], True)


def test_rewrite_run_matches_python_and_row_by_row() -> None:
    rnd = random.Random(11)
    for _ in range(300):
        wire = _rows(rnd, rnd.randint(1, 6))
        for detect in (False, True):
            c = runs.rewrite_run(MASKER, PLAN, wire, 0, len(wire), detect)
            assert c == runs.py_rewrite_run(MASKER, PLAN, wire, 0, len(wire), detect)
            if c is not None:
                by_row = b"".join(rows.mask_row(MASKER, PLAN, memoryview(wire)[s + 5 : e], detect) or wire[s:e]
                                  for s, e in runs.row_spans(wire, 0, len(wire)))
                assert c == by_row
    wire = codec.encode_data_row([b"1", b"a@b.example", b"4111111111111111", b"h", None, b"n", None]) * 3
    masked = runs.rewrite_run(MASKER, PLAN, wire, 0, len(wire), True)
    assert masked is not None and b"a@b.example" not in masked and b"************1111" in masked


def test_rewrite_run_matches_python_on_malformed_rows() -> None:
    rnd = random.Random(13)
    errors = 0
    for _ in range(3000):
        wire = _rows(rnd, 3)
        bad = _mangle(rnd, wire)
        end = rnd.choice((len(bad), len(bad) - rnd.randrange(1, 9), len(bad) + 3))
        for detect in (False, True):
            got_c = _outcome(runs.rewrite_run, MASKER, PLAN, bad, 0, end, detect)
            got_py = _outcome(runs.py_rewrite_run, MASKER, PLAN, bad, 0, end, detect)
            assert got_c == got_py
            errors += got_c[0] == "error"
    assert errors > 100  # the mangling does reach the error paths
    short = codec.encode_data_row([b"1"])
    with pytest.raises(MalformedMessage, match="cells do not match"):
        runs.rewrite_run(MASKER, PLAN, short, 0, len(short), True)


def test_text_cells_matches_python() -> None:
    rnd = random.Random(17)
    readable = runs._c_ops(PLAN)[3]
    assert readable == bytes([1, 1, 1, 1, 0, 1, 1])  # a binary bytea may carry text: read too
    nones = 0
    for _ in range(3000):
        wire = _rows(rnd, rnd.randint(0, 4))
        if rnd.random() < 0.5:
            wire = _mangle(rnd, wire)
        s = rnd.choice((0, 0, 1))
        e = rnd.choice((len(wire), len(wire) - 1, len(wire) + 5))
        got = runs.text_cells(wire, s, e, readable)
        assert got == runs.py_text_cells(wire, s, e, readable)
        nones += got is None
    assert nones > 100
    wire = codec.encode_data_row([b"7", None, b"c", b"h", b"\0\0\0\1", b"n", b"\1"]) * 2
    assert runs.text_cells(wire, 0, len(wire), readable) == b"7\0c\0h\0n\0\1\x007\0c\0h\0n\0\1"


def test_run_might_contain_reads_only_readable_cells() -> None:
    fields = (Field("id", 0, 0, 23, 4, -1, 0), Field("note", 0, 0, 25, -1, -1, 0), Field("n", 0, 0, 20, 8, -1, 1),
              Field("blob", 0, 0, 17, -1, -1, 1))
    plan = rows.make_plan(MASKER, fields, (0, 0, 1, 1), {})
    clean = codec.encode_data_row([b"1", b"note 1", b"@@@@@@@@", None]) * 3  # '@' only in a binary int8 cell
    assert not runs.run_might_contain(MASKER, plan, clean, 0, len(clean))
    blob = codec.encode_data_row([b"1", b"note 1", None, b"@@@@"])  # a binary bytea may carry text
    assert runs.run_might_contain(MASKER, plan, blob, 0, len(blob))
    dirty = clean + codec.encode_data_row([b"2", b"mail bob@corp.example", None, None])
    assert runs.run_might_contain(MASKER, plan, dirty, 0, len(dirty))
    odd = codec.encode_data_row([b"1", b"x"])  # not the plan's width: looked at whole
    assert runs.run_might_contain(MASKER, plan, odd + b"@", 0, len(odd) + 1)


def test_bind_head_checks_exactly_what_decode_bind_checks() -> None:
    from proxy.pg import messages

    rnd = random.Random(19)
    bad = 0
    for _ in range(5000):
        wire = codec.encode_bind("p", "s", [b"x" * rnd.randint(0, 5), None], param_formats=[0], result_formats=[1, 0])
        body = bytearray(wire[5:])
        for _ in range(rnd.randint(0, 2)):
            body[rnd.randrange(len(body))] = rnd.randrange(256)
        data = bytes(body)[: len(body) - rnd.choice((0, 0, 1, 3))]
        full = _outcome(messages.decode_bind, data)
        head = _outcome(messages.decode_bind_head, data)
        if full[0] == "error":
            bad += 1
            assert head == full
        else:
            b = full[1]
            assert head == ("ok", (b.portal, b.statement, b.result_formats))
    assert bad > 500


_EMAIL_PARTS = [b"@", b".", b"-", b"a", b"Zq", b"com", b"museum", b"x1", b"9", b"_", b"%", b"+", b" ", b'"',
                b"\xc3\xa9", b"user", b"example", b"..", b"\n", b"@@", b"b" * 70, b"c" * 64, b"d-" * 40]


def _email_text(rnd: random.Random) -> bytes:
    """Email-like pieces (local parts and labels of every interesting length, long domains, odd
    endings) and noise, glued with nothing, a space or a local-part character."""
    parts = []
    for _ in range(rnd.randrange(1, 6)):
        if rnd.random() < 0.7:
            local = b"".join(rnd.choice((b"a", b"B", b"7", b".", b"_", b"%", b"+", b"-", b"\xc3\xa9"))
                             for _ in range(rnd.choice((0, 1, 3, 10, 63, 64, 65, 70))))
            labels = [b"".join(rnd.choice((b"a", b"Q", b"z", b"1", b"-"))
                               for _ in range(rnd.choice((0, 1, 2, 5, 63, 64)))) for _ in range(rnd.randrange(1, 5))]
            domain = b".".join(labels) * (rnd.randrange(2, 40) if rnd.random() < 0.1 else 1)
            parts.append(local + b"@" + domain + rnd.choice((b"", b".", b"..", b"1", b'"', b" ", b"@")))
        else:
            parts.append(b"".join(rnd.choice(_EMAIL_PARTS) for _ in range(rnd.randrange(1, 10))))
    return rnd.choice((b"", b" ", b"x")).join(parts)


@pytest.mark.parametrize("text", [
    b"", b"@", b"a@b", b"a@b.c", b"a@b.co", b"a@b.co1", b"a@b.c.d", b"x@host.com.", b'x@host.com."', b"a@-.xy",
    b"bob@example.com and x.y+z@a-b.c.museum1 or q@a.b", b"a@b.cd@e.fg", b"a" * 64 + b"@x.io", b"a" * 65 + b"@x.io",
    b" " + b"a" * 64 + b"@x.io", b"x@" + b"a" * 300 + b".io", b"x@" + b"a." * 200 + b"io", b"x@a." + b"q" * 80,
    b"x@ab" + b".c" * 130 + b".de", "é@ü.de ü@é.de a@b.dé".encode(),
    b"q=" + b"%2F" * 30 + b"alice@example.com", b"a@b.co" + b"x" * 70 + b"@c.de", b"a" * 200 + b"@x.io",
])
def test_email_hits_match_python_on_edge_cases(text: bytes) -> None:
    got: list[tuple[int, int, str]] = []
    want: list[tuple[int, int, str]] = []
    _wire.email_hits(text, got, "email")
    py_email_hits(text, want, "email")  # type: ignore[arg-type]
    assert got == want


def test_email_hits_match_python_on_random_texts() -> None:
    rnd = random.Random(23)
    found = refused = 0
    for _ in range(20_000):
        text = _email_text(rnd)
        got: list[tuple[int, int, str]] = []
        want: list[tuple[int, int, str]] = []
        _wire.email_hits(text, got, "email")
        py_email_hits(text, want, "email")  # type: ignore[arg-type]
        assert got == want, text
        found += len(want)
        refused += b"@" in text and not want
    assert found > 2_000 and refused > 2_000  # many emails, and many texts with an "@" but no email
