"""Masking of what the server sends: result rows, COPY data, errors, notices, notifications.

How this works. A RowDescription (with the result formats the client asked for in Bind)
becomes a :class:`Plan`: per column, the strategy of the first column rule that matches its
name or ``table.column`` (tables resolved from the table OID by :class:`Catalog`), and
whether its cells are text, so the detectors may read them. A column that comes straight from a
table column carries that column's number; :class:`Catalog` resolves it to the column's own
name, so a rule matches it under an alias too (``SELECT ssn AS x FROM users``: either name
matching a rule masks it). Plans are cached by the raw
RowDescription bytes, so a result shape seen before costs one dict lookup.

DataRows arrive as runs (the framer coalesces them); :mod:`proxy.pg.runs` handles them.
Binary cells of text-like types (text, varchar, name, json: their binary form is the UTF-8
text) are masked like text cells, by column rules and detectors. Other binary cells of masked
columns become NULL: a redacted int4 cannot keep its 4 bytes. Other binary cells of unmasked
columns that may carry text (arrays, records, jsonb, xml, bytea, extension types: anything
but a fixed-width scalar) are read by the detectors too, and a hit is overwritten in place
with filler of its length, so the cell keeps its structure (:mod:`proxy.pg.binary`). Binary
int8, float8 and numeric cells (and arrays of them) are read by the detectors in their text
form, and become NULL on a hit: a card number stored as a bigint is withheld, as psql shows ``[card]``.

When the table-name lookup fails, the table is kept as :data:`UNRESOLVED` and a column whose
name matches the column part of any ``table.column`` rule is masked by that rule: an
unknown table fails closed.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from broker.config import Strategy
from proxy.mask import Masker
from proxy.pg import codec
from proxy.pg.binary import NUMBER_ARRAY_OIDS, NUMBER_OIDS, mask_binary, number_hit, scanned
from proxy.pg.messages import Buf, Field, MalformedMessage, decode_data_row, decode_fields

log = logging.getLogger(__name__)

#: text, varchar, bpchar, name, json, unknown, citext-like domains appear as these
TEXT_LIKE_OIDS = frozenset({25, 1043, 1042, 19, 114, 705})


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with each cell of one result shape."""

    names: tuple[str, ...]
    strategies: tuple[Strategy | None, ...]  # column rule per column
    text: tuple[bool, ...]  # text-format cell (detectors may read it)
    binary_text: tuple[bool, ...]  # binary cell of a text-like type
    masked: bool  # some column rule applies: every row is rewritten
    binary_scan: tuple[bool, ...] = ()  # other binary cell that may carry text: detectors, in place
    oids: tuple[int, ...] = ()  # type OID per column
    #: binary int8/float8/numeric cell (or array of them): detectors read its text form; a hit is NULL
    binary_number: tuple[bool, ...] = ()


def formats_for(n: int, result_formats: Sequence[int]) -> tuple[int, ...]:
    """Bind's result-format codes spread over ``n`` columns (none = text, one = all)."""
    if not result_formats:
        return (0,) * n
    if len(result_formats) == 1:
        return (result_formats[0],) * n
    return tuple(result_formats[:n]) + (0,) * max(0, n - len(result_formats))


#: the name :class:`Catalog` keeps for a table whose lookup failed
UNRESOLVED = "?"


def _strategy(masker: Masker, f: Field, tables: Mapping[int, str], columns: Mapping[tuple[int, int], str],
              parents: Mapping[int, tuple[str, ...]]) -> Strategy | None:
    table = tables.get(f.table_oid)
    if table != UNRESOLVED:
        real = columns.get((f.table_oid, f.attnum)) if f.attnum > 0 else None
        names = (f.name,) if real is None or real == f.name else (f.name, real)  # an alias: its own name too
        # a partition (or inheritance child) is read under its own name: its ancestors' rules apply too
        for owner in (table, *parents.get(f.table_oid, ())):
            for name in names:
                found = masker.column_strategy(name, owner)
                if found is not None:
                    return found
        return None
    # fail closed: an unknown table may be the one a ``table.column`` rule names
    found = masker.column_strategy(f.name)
    if found is not None:
        return found
    name = f.name.lower()
    for rule in masker.config.columns:
        if "." in rule.match and fnmatch.fnmatchcase(name, rule.match.rsplit(".", 1)[1].lower()):
            return rule.strategy
    return None


def make_plan(masker: Masker, fields: Sequence[Field], formats: Sequence[int], tables: Mapping[int, str],
              columns: Mapping[tuple[int, int], str] | None = None,
              parents: Mapping[int, tuple[str, ...]] | None = None) -> Plan:
    strategies = tuple(_strategy(masker, f, tables, columns or {}, parents or {}) for f in fields)
    text = tuple(fmt == 0 for fmt in formats)
    binary_text = tuple(fmt != 0 and f.type_oid in TEXT_LIKE_OIDS for f, fmt in zip(fields, formats, strict=True))
    binary_scan = tuple(fmt != 0 and f.type_oid not in TEXT_LIKE_OIDS and scanned(f.type_oid)
                        for f, fmt in zip(fields, formats, strict=True))
    binary_number = tuple(fmt != 0 and (f.type_oid in NUMBER_OIDS or f.type_oid in NUMBER_ARRAY_OIDS)
                          for f, fmt in zip(fields, formats, strict=True))
    return Plan(tuple(f.name for f in fields), strategies, text, binary_text,
                any(s is not None for s in strategies), binary_scan, tuple(f.type_oid for f in fields),
                binary_number if True in binary_number else ())


def mask_row(masker: Masker, plan: Plan, body: Buf, detect: bool) -> bytes | None:
    """The DataRow (whole message) with masked cells, or None when nothing changed."""
    cells = decode_data_row(body)
    changed = False
    strategies, text, binary_text = plan.strategies, plan.text, plan.binary_text
    width = len(strategies)
    binary_scan = plan.binary_scan or (False,) * width
    binary_number = plan.binary_number or (False,) * width
    for i, cell in enumerate(cells):
        if cell is None:
            continue
        if i >= width:  # beyond the plan: nothing is known of the cell, so it is withheld (fail closed)
            cells[i] = None
            changed = True
            continue
        strategy = strategies[i]
        readable = text[i] or binary_text[i]
        if strategy is not None:
            if readable:
                cells[i] = masker.apply_bytes(bytes(cell), strategy)
            else:
                cells[i] = None
            changed = True
        elif detect and readable:
            out = masker.mask_bytes(bytes(cell) if isinstance(cell, bytearray) else cell)
            if out is not None:
                cells[i] = out
                changed = True
        elif detect and binary_scan[i]:
            hit, new = mask_binary(masker, bytes(cell), plan.oids[i])
            if hit:
                cells[i] = new
                changed = True
        elif detect and binary_number[i] and number_hit(masker, bytes(cell), plan.oids[i]):
            cells[i] = None
            changed = True
    return codec.encode_data_row(cells) if changed else None


def row_text(body: Buf, plan: Plan | None) -> list[str | None]:
    """A (masked) DataRow's cells as text for the recording; binary cells are not decoded."""
    raw = body if type(body) is bytes else bytes(body)
    return row_text_at(raw, 0, len(raw), plan.text if plan is not None else ())


def row_text_at(buf: bytes, pos: int, stop: int, text: tuple[bool, ...]) -> list[str | None]:
    """The cells of the DataRow body ``buf[pos:stop]`` as text (see :func:`row_text`)."""
    out: list[str | None] = []
    append = out.append
    width = len(text)
    try:
        (n,) = _I16(buf, pos)
        if n < 0:
            raise MalformedMessage("malformed DataRow message")
        pos += 2
        for i in range(n):
            (size,) = _I32(buf, pos)
            pos += 4
            if size < 0:
                if size != -1:
                    raise MalformedMessage("malformed DataRow message")
                append(None)
                continue
            end = pos + size
            if end > stop:
                raise MalformedMessage("malformed DataRow message")
            if i < width and not text[i]:
                append("<binary>")
            elif size <= 200:
                append(buf[pos:end].decode("utf-8", "replace"))
            else:
                value = buf[pos:end].decode("utf-8", "replace")
                append(value if len(value) <= 200 else value[:200] + "…")
            pos = end
    except struct.error:
        raise MalformedMessage("malformed DataRow message") from None
    if pos != stop:
        raise MalformedMessage("malformed DataRow message")
    return out


def mask_message_fields(masker: Masker, msg_type: int, body: memoryview | bytes) -> bytes | None:
    """An ErrorResponse/NoticeResponse with detector hits masked in every field, or None."""
    if not masker.might_contain(body):
        return None
    fields = decode_fields(body)
    masked = {code: masker.mask_text(value) for code, value in fields.items()}
    if masked == fields:
        return None
    return codec.encode_fields(masked, msg_type)


def mask_payload(masker: Masker, msg_type: int, body: memoryview | bytes, prefix: int) -> bytes | None:
    """CopyData or NotificationResponse: detectors over the body after ``prefix`` bytes."""
    if not masker.might_contain(body):
        return None
    out = masker.mask_bytes(bytes(body[prefix:]))
    if out is None:
        return None
    return codec.frame(msg_type, bytes(body[:prefix]) + out)


def needs_catalog(masker: Masker) -> bool:
    """Whether any column rule exists (so RowDescription table OIDs and column numbers must be resolved:
    a ``table.column`` rule needs the table, and every rule the column's own name under an alias)."""
    return masker.enabled and bool(masker.config.columns)


class Table(NamedTuple):
    """What the catalog knows of one table OID."""

    name: str  # ``schema.table``
    columns: dict[int, str]  # column number -> column name
    parents: tuple[str, ...] = ()  # ``schema.table`` of each ancestor: partitioned parents, inheritance


#: table OIDs -> what is known of each one found
Lookup = Callable[[Sequence[int]], Awaitable[dict[int, Table]]]


class Catalog:
    """Table OID -> ``schema.table`` (and its ancestors' names), and (table OID, column number) -> column
    name, for one resource, cached; misses resolved in one lookup."""

    def __init__(self, lookup: Lookup) -> None:
        self.names: dict[int, str] = {}
        self.columns: dict[tuple[int, int], str] = {}
        self.parents: dict[int, tuple[str, ...]] = {}
        self._lookup = lookup
        self._lock = asyncio.Lock()

    def missing(self, fields: Sequence[Field]) -> list[int]:
        return sorted({f.table_oid for f in fields if f.table_oid and f.table_oid not in self.names})

    async def resolve(self, oids: Sequence[int]) -> None:
        async with self._lock:
            todo = [o for o in oids if o not in self.names]
            if not todo:
                return
            try:
                found = await self._lookup(todo)
            except Exception as exc:  # fail closed: see UNRESOLVED
                log.warning("table name lookup failed: %s", type(exc).__name__)
                for oid in todo:
                    self.names[oid] = UNRESOLVED
                return
            for oid in todo:
                table = found.get(oid, Table("", {}))
                self.names[oid] = table.name
                if table.parents:
                    self.parents[oid] = table.parents
                for attnum, attname in table.columns.items():
                    self.columns[oid, attnum] = attname


_I16 = struct.Struct("!h").unpack_from
_I32 = struct.Struct("!i").unpack_from
