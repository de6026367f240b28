"""Masking of what the server sends: result rows, COPY data, errors, notices, notifications.

How this works. A RowDescription (with the result formats the client asked for in Bind)
becomes a :class:`Plan`: per column, the strategy of the first column rule that matches its
name or ``table.column`` (tables resolved from the table OID by :class:`Catalog`), and
whether its cells are text, so the detectors may read them. Plans are cached by the raw
RowDescription bytes, so a result shape seen before costs one dict lookup.

A DataRow is rewritten only when a cell changes (:func:`mask_row`); runs of DataRows whose
plan has no masked column are first checked as ONE slice with the masker's bytes prefilter
(:meth:`proxy.mask.Masker.might_contain`) and forwarded untouched when nothing can match.
Binary cells of text-like types (text, varchar, name, json: their binary form is the UTF-8
text) are masked like text cells, by column rules and detectors. Other binary cells of masked
columns become NULL: a redacted int4 cannot keep its 4 bytes.

When the table-name lookup fails, the table is kept as :data:`UNRESOLVED` and a column whose
name matches the column part of any ``table.column`` rule is masked by that rule: an
unknown table fails closed.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from broker.config import Strategy
from proxy.mask import Masker
from proxy.pg import codec
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


def formats_for(n: int, result_formats: Sequence[int]) -> tuple[int, ...]:
    """Bind's result-format codes spread over ``n`` columns (none = text, one = all)."""
    if not result_formats:
        return (0,) * n
    if len(result_formats) == 1:
        return (result_formats[0],) * n
    return tuple(result_formats[:n]) + (0,) * max(0, n - len(result_formats))


#: the name :class:`Catalog` keeps for a table whose lookup failed
UNRESOLVED = "?"


def _strategy(masker: Masker, f: Field, tables: dict[int, str]) -> Strategy | None:
    table = tables.get(f.table_oid)
    if table != UNRESOLVED:
        return masker.column_strategy(f.name, table)
    # fail closed: an unknown table may be the one a ``table.column`` rule names
    found = masker.column_strategy(f.name)
    if found is not None:
        return found
    name = f.name.lower()
    for rule in masker.config.columns:
        if "." in rule.match and fnmatch.fnmatchcase(name, rule.match.rsplit(".", 1)[1].lower()):
            return rule.strategy
    return None


def make_plan(masker: Masker, fields: Sequence[Field], formats: Sequence[int], tables: dict[int, str]) -> Plan:
    strategies = tuple(_strategy(masker, f, tables) for f in fields)
    text = tuple(fmt == 0 for fmt in formats)
    binary_text = tuple(fmt != 0 and f.type_oid in TEXT_LIKE_OIDS for f, fmt in zip(fields, formats, strict=True))
    return Plan(tuple(f.name for f in fields), strategies, text, binary_text,
                any(s is not None for s in strategies))


def mask_row(masker: Masker, plan: Plan, body: Buf, detect: bool) -> bytes | None:
    """The DataRow (whole message) with masked cells, or None when nothing changed."""
    cells = decode_data_row(body)
    changed = False
    strategies, text, binary_text = plan.strategies, plan.text, plan.binary_text
    width = len(strategies)
    for i, cell in enumerate(cells):
        if cell is None:
            continue
        strategy = strategies[i] if i < width else None
        is_text = text[i] if i < width else False
        if strategy is not None:
            if is_text or binary_text[i]:
                cells[i] = masker.apply_bytes(bytes(cell), strategy)
            else:
                cells[i] = None
            changed = True
        elif detect and (is_text or binary_text[i]):
            out = masker.mask_bytes(bytes(cell) if isinstance(cell, bytearray) else cell)
            if out is not None:
                cells[i] = out
                changed = True
    return codec.encode_data_row(cells) if changed else None


def row_text(body: Buf, plan: Plan | None) -> list[str | None]:
    """A (masked) DataRow's cells as text for the recording; binary cells are not decoded."""
    out: list[str | None] = []
    text = plan.text if plan is not None else ()
    for i, cell in enumerate(decode_data_row(body)):
        if cell is None:
            out.append(None)
        elif i < len(text) and not text[i]:
            out.append("<binary>")
        else:
            value = bytes(cell).decode("utf-8", "replace")
            out.append(value if len(value) <= 200 else value[:200] + "…")
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


def qualified_tables(masker: Masker) -> bool:
    """Whether any column rule names a table (so RowDescription table OIDs must be resolved)."""
    return masker.enabled and any("." in r.match for r in masker.config.columns)


Lookup = Callable[[Sequence[int]], Awaitable[dict[int, str]]]


class Catalog:
    """Table OID -> ``schema.table`` for one resource, cached; misses resolved in one query."""

    def __init__(self, lookup: Lookup) -> None:
        self.names: dict[int, str] = {}
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
                self.names[oid] = found.get(oid, "")


_I16 = struct.Struct("!h").unpack_from
_I32 = struct.Struct("!i").unpack_from
_ROW_HEAD = struct.Struct("!Bih").pack
_LEN = struct.Struct("!i").pack
_NULL = _LEN(-1)


def rewrite_rows(masker: Masker, plan: Plan, buf: bytes, frames: Sequence[codec.Frame], i: int, j: int,
                 detect: bool) -> tuple[bytes, list[list[bytes | None]]]:
    """DataRows ``frames[i:j]`` of a result with a masked column, rewritten as ONE bytes blob.

    Same result as :func:`mask_row` per row, fused for speed: cells are read straight from
    ``buf``, the detectors' prefilter runs once over all unmasked readable cells of the run,
    and the rows are joined once. Also returns the masked cells (for samples).
    """
    strategies = plan.strategies
    width = len(strategies)
    readable = tuple(a or b for a, b in zip(plan.text, plan.binary_text, strict=True))
    rows: list[list[bytes | None]] = []
    for k in range(i, j):
        _, s, e = frames[k]
        pos = s + 7
        try:
            (n,) = _I16(buf, s + 5)
            cells: list[bytes | None] = []
            for _ in range(n):
                (size,) = _I32(buf, pos)
                pos += 4
                if size < 0:
                    cells.append(None)
                else:
                    cells.append(buf[pos : pos + size])
                    pos += size
        except struct.error:
            raise MalformedMessage("malformed DataRow") from None
        if pos != e or n != width:
            raise MalformedMessage("malformed DataRow (cells do not match the RowDescription)")
        rows.append(cells)
    apply = masker.apply_bytes
    for c, strategy in enumerate(strategies):
        if strategy is None:
            continue
        if readable[c]:
            for cells in rows:
                cell = cells[c]
                if cell is not None:
                    cells[c] = apply(cell, strategy)
        else:
            for cells in rows:
                cells[c] = None
    plain = [c for c in range(width) if strategies[c] is None and readable[c]]
    if detect and plain and masker.might_contain(
            b"\0".join(cell for cells in rows for c in plain if (cell := cells[c]) is not None)):
        scan = masker.mask_bytes
        for cells in rows:
            for c in plain:
                cell = cells[c]
                if cell is not None:
                    found = scan(cell)
                    if found is not None:
                        cells[c] = found
    parts: list[bytes] = []
    append = parts.append
    for cells in rows:
        head = len(parts)
        append(b"")
        size = 6
        for cell in cells:
            if cell is None:
                append(_NULL)
                size += 4
            else:
                append(_LEN(len(cell)))
                append(cell)
                size += 4 + len(cell)
        parts[head] = _ROW_HEAD(0x44, size, width)
    return b"".join(parts), rows


def cells_text(cells: Sequence[bytes | None], plan: Plan) -> list[str | None]:
    """Masked cells as text for the recording, like :func:`row_text`."""
    out: list[str | None] = []
    text = plan.text
    for i, cell in enumerate(cells):
        if cell is None:
            out.append(None)
        elif not text[i]:
            out.append("<binary>")
        else:
            value = cell.decode("utf-8", "replace")
            out.append(value if len(value) <= 200 else value[:200] + "…")
    return out
