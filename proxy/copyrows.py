"""Column rules on ``COPY … TO STDOUT`` rows, which carry no column names.

How this works. The guard reads the column list of ``COPY table (a, b) TO STDOUT`` and the
statement's options (:func:`copy_format`), and works out each field's masking strategy
(:class:`CopyOut`). The PostgreSQL proxy then rewrites each CopyData row (the server sends
one row per message): :func:`mask_copy_row` splits it into fields as the server wrote them
(text format: backslash escapes; CSV: quotes), masks the fields that have a strategy, and
writes them back in the same format, leaving every other byte as it was. A row whose field
count differs from the column list cannot be attributed and is refused by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.config import Strategy

__all__ = ["CopyFormatError", "CopyOut", "copy_format", "mask_copy_row"]

_TRUE = frozenset({"true", "on", "yes", "1"})
_FALSE = frozenset({"false", "off", "no", "0"})
_UTF8 = frozenset({"utf8", "utf-8", "unicode"})
#: text-format escapes the server writes (CopyAttributeOutText), and back
_UNESCAPE = {ord("b"): 8, ord("f"): 12, ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("v"): 11}
_ESCAPE = {v: k for k, v in _UNESCAPE.items()} | {ord("\\"): ord("\\")}


class CopyFormatError(ValueError):
    """The COPY options are ones hoop cannot follow (a rule would be left behind)."""


@dataclass(frozen=True, slots=True)
class CopyOut:
    """How to mask the rows of one ``COPY … TO STDOUT``: a strategy per field (None: not masked)."""

    strategies: tuple[Strategy | None, ...]
    csv: bool = False
    delimiter: bytes = b"\t"
    null: bytes = b"\\N"
    quote: bytes = b'"'
    escape: bytes = b'"'
    header: bool = False


def _text(arg: Any, option: str) -> str:
    if isinstance(arg, dict) and "String" in arg:
        return str(arg["String"].get("sval", ""))
    raise CopyFormatError(f"COPY option {option} has a value hoop does not read")


def _boolean(arg: Any, option: str) -> bool:
    if arg is None:
        return True
    if isinstance(arg, dict) and "Boolean" in arg:
        return bool(arg["Boolean"].get("boolval", False))
    if isinstance(arg, dict) and "Integer" in arg and arg["Integer"].get("ival", 0) in (0, 1):
        return bool(arg["Integer"].get("ival", 0))
    value = _text(arg, option).lower()
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise CopyFormatError(f"COPY option {option} {value!r} is not one hoop reads")


def _one_byte(value: str, option: str) -> bytes:
    raw = value.encode()
    if len(raw) != 1:
        raise CopyFormatError(f"COPY option {option} must be one single-byte character")
    return raw


def copy_format(options: list[dict[str, Any]] | None, strategies: tuple[Strategy | None, ...]) -> CopyOut:
    """The :class:`CopyOut` of a ``COPY … TO STDOUT`` with these options (pglast's DefElems).

    Raises :class:`CopyFormatError` for binary output, another encoding, or an option hoop
    does not know: the rows could not be masked field by field."""
    seen: dict[str, Any] = {}
    for opt in options or ():
        d = opt.get("DefElem", {})
        seen[str(d.get("defname", "")).lower()] = d.get("arg")
    fmt = _text(seen.pop("format"), "FORMAT").lower() if "format" in seen else "text"
    if fmt not in ("text", "csv"):
        raise CopyFormatError(f"COPY in {fmt} format cannot be masked field by field")
    csv = fmt == "csv"
    header = _boolean(seen.pop("header"), "HEADER") if "header" in seen else False
    delimiter = _one_byte(_text(seen.pop("delimiter"), "DELIMITER"), "DELIMITER") if "delimiter" in seen else (
        b"," if csv else b"\t")
    null = _text(seen.pop("null"), "NULL").encode() if "null" in seen else (b"" if csv else b"\\N")
    quote = _one_byte(_text(seen.pop("quote"), "QUOTE"), "QUOTE") if "quote" in seen else b'"'
    escape = _one_byte(_text(seen.pop("escape"), "ESCAPE"), "ESCAPE") if "escape" in seen else quote
    if "encoding" in seen and _text(seen.pop("encoding"), "ENCODING").lower() not in _UTF8:
        raise CopyFormatError("COPY in an encoding other than UTF8 cannot be masked field by field")
    seen.pop("force_quote", None)  # changes only which values are quoted, which the reader follows
    if seen:
        raise CopyFormatError(f"COPY option {sorted(seen)[0].upper()} is not one hoop follows")
    if delimiter in (b"\\", b"\n", b"\r") or (csv and delimiter == quote):
        raise CopyFormatError("COPY delimiter hoop cannot follow")
    return CopyOut(strategies, csv, delimiter, null, quote, escape, header)


# -- text format ----------------------------------------------------------------------------


def _text_fields(row: bytes, delimiter: bytes) -> list[bytes]:
    """Split a text-format line (without its newline) at unescaped delimiters."""
    parts = row.split(delimiter)
    fields: list[bytes] = []
    for part in parts:
        if fields and _escapes_next(fields[-1]):
            fields[-1] += delimiter + part  # ``\<delimiter>``: a delimiter inside the value
        else:
            fields.append(part)
    return fields


def _escapes_next(field: bytes) -> bool:
    """Whether ``field`` ends in an odd run of backslashes (its last one escapes what follows)."""
    n = len(field) - len(field.rstrip(b"\\"))
    return n % 2 == 1


def _text_decode(field: bytes) -> bytes:
    if b"\\" not in field:
        return field
    out = bytearray()
    i, n = 0, len(field)
    while i < n:
        c = field[i]
        if c == 0x5C and i + 1 < n:
            nxt = field[i + 1]
            out.append(_UNESCAPE.get(nxt, nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return bytes(out)


def _text_encode(value: bytes, delimiter: bytes) -> bytes:
    out = bytearray()
    d = delimiter[0]
    for c in value:
        esc = _ESCAPE.get(c)
        if esc is not None:
            out += bytes((0x5C, esc))
        elif c == d:
            out += bytes((0x5C, c))
        else:
            out.append(c)
    return bytes(out)


# -- CSV ------------------------------------------------------------------------------------


def _csv_fields(row: bytes, plan: CopyOut) -> list[tuple[bytes, bool]] | None:
    """Split a CSV line (without its newline) into (raw bytes, quoted) fields; None if malformed."""
    q, esc, d = plan.quote[0], plan.escape[0], plan.delimiter[0]
    fields: list[tuple[bytes, bool]] = []
    i, n = 0, len(row)
    while True:
        start = i
        quoted = False
        while i < n and row[i] != d:
            if row[i] == q:
                quoted = True
                i += 1
                while True:
                    if i >= n:
                        return None  # an unterminated quote
                    c = row[i]
                    nxt = row[i + 1] if i + 1 < n else -1
                    if c == esc and (nxt == q or (esc != q and nxt == esc)):  # an escaped quote or escape
                        i += 2
                    elif c == q:
                        i += 1
                        break
                    else:
                        i += 1
            else:
                i += 1
        fields.append((row[start:i], quoted))
        if i >= n:
            return fields
        i += 1  # the delimiter


def _csv_decode(raw: bytes, plan: CopyOut) -> bytes:
    q, esc = plan.quote[0], plan.escape[0]
    out = bytearray()
    i, n = 0, len(raw)
    inside = False
    while i < n:
        c = raw[i]
        if inside and c == esc and i + 1 < n and raw[i + 1] in (q, esc) and (esc != q or raw[i + 1] == q):
            out.append(raw[i + 1])
            i += 2
        elif c == q:
            inside = not inside
            i += 1
        else:
            out.append(c)
            i += 1
    return bytes(out)


def _csv_encode(value: bytes, plan: CopyOut) -> bytes:
    q, esc = plan.quote[0], plan.escape[0]
    out = bytearray((q,))
    for c in value:
        if c in (q, esc):
            out.append(esc)
        out.append(c)
    out.append(q)
    return bytes(out)


# -- rows -----------------------------------------------------------------------------------


def mask_copy_row(plan: CopyOut, row: bytes, apply: Callable[[bytes, Strategy], bytes]) -> bytes | None:
    """``row`` (one CopyData payload) with each field that has a strategy masked by ``apply``.

    Returns None when the row does not have one field per column (it cannot be attributed)."""
    end = len(row) - 1 if row.endswith(b"\n") else len(row)
    line, tail = row[:end], row[end:]
    want = len(plan.strategies)
    if plan.csv:
        cells = _csv_fields(line, plan)
        if cells is None or len(cells) != want:
            return None
        out = []
        for (raw, quoted), strategy in zip(cells, plan.strategies, strict=True):
            if strategy is None or (not quoted and raw == plan.null):
                out.append(raw)
            else:
                out.append(_csv_encode(apply(_csv_decode(raw, plan), strategy), plan))
        return plan.delimiter.join(out) + tail
    fields = _text_fields(line, plan.delimiter)
    if len(fields) != want:
        return None
    masked = [raw if strategy is None or raw == plan.null
              else _text_encode(apply(_text_decode(raw), strategy), plan.delimiter)
              for raw, strategy in zip(fields, plan.strategies, strict=True)]
    return plan.delimiter.join(masked) + tail
