"""The COPY row reader/writer on its own: options, escapes, quotes, and rows it must refuse."""

from __future__ import annotations

import pytest

from broker.config import Strategy
from proxy.copyrows import CopyFormatError, CopyOut, copy_format, mask_copy_row


def _opt(name: str, arg: object = None) -> dict[str, object]:
    return {"DefElem": {"defname": name, **({"arg": arg} if arg is not None else {})}}


def _s(v: str) -> dict[str, object]:
    return {"String": {"sval": v}}


def _mark(value: bytes, strategy: Strategy) -> bytes:
    return b"<" + strategy.encode() + b":" + value + b">"


def test_defaults_and_options() -> None:
    assert copy_format(None, (None, "redact")) == CopyOut((None, "redact"))
    csv = copy_format([_opt("format", _s("csv")), _opt("header"), _opt("delimiter", _s(";")),
                       _opt("null", _s("x")), _opt("force_quote", {"A_Star": {}}), _opt("encoding", _s("UTF-8"))],
                      ("hash",))
    assert (csv.csv, csv.header, csv.delimiter, csv.null, csv.quote, csv.escape) == (True, True, b";", b"x", b'"', b'"')
    assert copy_format([_opt("header", {"Integer": {}})], ("hash",)).header is False


@pytest.mark.parametrize(("options", "why"), [
    ([_opt("format", _s("binary"))], "binary"),
    ([_opt("encoding", _s("LATIN1"))], "encoding"),
    ([_opt("delimiter", _s("ab"))], "single-byte"),
    ([_opt("delimiter", _s("é"))], "single-byte"),
    ([_opt("header", _s("match"))], "HEADER"),
    ([_opt("freeze")], "FREEZE"),
    ([_opt("format", _s("csv")), _opt("delimiter", _s('"'))], "delimiter"),
    ([_opt("delimiter", _s("\\"))], "delimiter"),
])
def test_options_hoop_cannot_follow(options: list[dict[str, object]], why: str) -> None:
    with pytest.raises(CopyFormatError, match=why):
        copy_format(options, ("redact",))


def test_text_rows() -> None:
    plan = CopyOut((None, "redact", None))
    assert mask_copy_row(plan, b"1\tsecret\tx\n", _mark) == b"1\t<redact:secret>\tx\n"
    # escapes are read, and the masked value is written escaped again
    assert mask_copy_row(plan, b"1\ta\\tb\\\\c\\nd\tx\n", _mark) == b"1\t<redact:a\\tb\\\\c\\nd>\tx\n"
    assert mask_copy_row(plan, b"1\t\\N\tx\n", _mark) == b"1\t\\N\tx\n"  # NULL stays NULL
    comma = CopyOut((None, "partial"), delimiter=b",")
    assert mask_copy_row(comma, b"1,a\\,b\\\\\n", _mark) == b"1,<partial:a\\,b\\\\>\n"
    assert mask_copy_row(plan, b"1\tsecret\n", _mark) is None  # one field short
    assert mask_copy_row(plan, b"1\ts\tx\ty\n", _mark) is None  # one too many


def test_csv_rows() -> None:
    plan = CopyOut((None, "hash"), csv=True, delimiter=b",", null=b"")
    assert mask_copy_row(plan, b'1,"a,""b""\nc"\n', _mark) == b'1,"<hash:a,""b""\nc>"\n'
    assert mask_copy_row(plan, b"1,\n", _mark) == b"1,\n"  # unquoted empty: NULL
    assert mask_copy_row(plan, b'1,""\n', _mark) == b'1,"<hash:>"\n'  # quoted empty: a value
    assert mask_copy_row(plan, b"1,plain\n", _mark) == b'1,"<hash:plain>"\n'
    assert mask_copy_row(plan, b'1,"open\n', _mark) is None  # an unterminated quote
    escaped = CopyOut((None, "redact"), csv=True, delimiter=b";", null=b"", quote=b"'", escape=b"|")
    assert mask_copy_row(escaped, b"1;'it|'s ||'\n", _mark) == b"1;'<redact:it|'s ||>'\n"
