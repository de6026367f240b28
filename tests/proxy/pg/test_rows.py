"""The fused DataRow-run rewrite gives exactly the bytes of masking row by row."""

from __future__ import annotations

from broker.config import Masking
from proxy.mask import Masker
from proxy.pg import codec
from proxy.pg.messages import Field
from proxy.pg.rows import make_plan, mask_row
from proxy.pg.runs import rewrite_run, row_spans


def test_rewrite_run_matches_row_by_row() -> None:
    masker = Masker(Masking(columns=[{"match": "email", "strategy": "redact"}, {"match": "card", "strategy": "partial"},
                                     {"match": "h", "strategy": "hash"}, {"match": "bin", "strategy": "redact"}]),
                    b"k" * 32)
    fields = tuple(Field(name, 0, 0, oid, -1, -1, 0) for name, oid in
                   (("id", 23), ("email", 25), ("card", 25), ("h", 25), ("bin", 23), ("note", 25)))
    plan = make_plan(masker, fields, (0, 0, 0, 0, 1, 0), {})
    rows = [[b"1", b"a@b.example", b"4111111111111111", b"x", b"\0\0\0\1", b"plain"],
            [b"2", None, b"12", b"y", None, None],
            [None, b"", "ÿ€-4242-ü".encode(), b"", b"\0\0\0\2", b"note"]]
    wire = b"".join(codec.encode_data_row(r) for r in rows)
    expected = b"".join(mask_row(masker, plan, memoryview(wire)[s + 5 : e], True) or wire[s:e]
                        for s, e in row_spans(wire, 0, len(wire)))
    assert rewrite_run(masker, plan, wire, 0, len(wire), True) == expected
    assert b"a@b.example" not in expected and b"4111111111111111" not in expected
    # something detectable in an unmasked column: the caller must go row by row
    leak = codec.encode_data_row([b"3", None, None, None, None, b"mail bob@corp.example"])
    assert rewrite_run(masker, plan, leak, 0, len(leak), True) is None
