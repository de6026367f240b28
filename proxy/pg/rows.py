"""Masking of what the server sends: result rows, COPY data, errors, notices, notifications.

How this works. A RowDescription (with the result formats the client asked for in Bind)
becomes a :class:`Plan`: per column, the strategy of the first column rule that matches its
name or ``table.column`` (tables resolved from the table OID by :class:`Catalog`), and
whether its cells are text, so the detectors may read them. Plans are cached by the raw
RowDescription bytes, so a result shape seen before costs one dict lookup.

DataRows arrive as runs (the framer coalesces them). A run whose plan has no masked column
is checked as ONE slice with the masker's bytes prefilter
(:meth:`proxy.mask.Masker.might_contain`) and forwarded untouched when nothing can match;
otherwise it is masked row by row (:func:`mask_row`, a row is rewritten only when a cell
changes). A run with a masked column is rewritten in one pass (:func:`rewrite_run`).
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
from proxy.mask import RULE_MARKER, Masker
from proxy.pg import codec
from proxy.pg.messages import Buf, Field, MalformedMessage, decode_data_row, decode_fields

try:
    from proxy.pg import _wire
except ImportError:  # not built: the pure-Python twins run
    _wire = None  # type: ignore[assignment]

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
    raw = body if type(body) is bytes else bytes(body)
    return _row_text(raw, 0, len(raw), plan.text if plan is not None else ())


def _row_text(buf: bytes, pos: int, stop: int, text: tuple[bool, ...]) -> list[str | None]:
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


def row_spans(buf: bytes, s: int, e: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each DataRow of the run ``buf[s:e]`` (a coalesced frame)."""
    out: list[tuple[int, int]] = []
    pos = s
    while pos < e:
        (length,) = _I32(buf, pos + 1)
        out.append((pos, pos + 1 + length))
        pos += 1 + length
    return out


def run_sample(buf: bytes, s: int, e: int, k: int, plan: Plan | None) -> list[list[str | None]]:
    """The first ``k`` rows of the run ``buf[s:e]`` as text, for the recording."""
    out: list[list[str | None]] = []
    text = plan.text if plan is not None else ()
    pos = s
    while pos < e and len(out) < k:
        (length,) = _I32(buf, pos + 1)
        stop = pos + 1 + length
        out.append(_row_text(buf, pos + 5, stop, text))
        pos = stop
    return out


#: per column of a masked plan: 0 unreadable, 1 readable (detectors), 2 masked text, 3 masked, becomes NULL
_SKIP, _SCAN, _APPLY, _NULLED = 0, 1, 2, 3
#: further op codes of the C twin: partial (fast for short ASCII cells), a fixed replacement cell
_C_PARTIAL, _C_FIXED = 4, 5


def rewrite_run(masker: Masker, plan: Plan, buf: bytes, s: int, e: int, detect: bool) -> bytes | None:
    """The DataRow run ``buf[s:e]`` of a result with a masked column, rewritten as ONE bytes blob.

    Runs in C (:mod:`proxy.pg._wire`) when it is built; :func:`py_rewrite_run` is its twin
    (see there for how). Returns None when the detectors' prefilter hits the readable cells
    of unmasked columns: the caller then masks row by row, exactly.
    """
    if _wire is None:
        return py_rewrite_run(masker, plan, buf, s, e, detect)
    ops, fixed, scan, _ = _c_ops(plan)
    blob, plain = _wire.rewrite_run(buf, s, e, ops, fixed, plan.strategies, masker.apply_bytes,
                                    detect and scan, MalformedMessage)
    if plain is not None and masker.might_contain(plain):
        return None
    return blob


def run_might_contain(masker: Masker, plan: Plan | None, buf: bytes, s: int, e: int) -> bool:
    """Whether the detectors might fire on the DataRow run ``buf[s:e]`` of a result with no masked column.

    Only the cells the detectors read (text, or binary text-like) are looked at, joined by NUL
    as :func:`rewrite_run` does; a run whose rows do not match ``plan`` is looked at whole.
    """
    if plan is not None and plan.strategies:
        cells = text_cells(buf, s, e, _c_ops(plan)[3])
        if cells is not None:
            return masker.might_contain(cells)
    return masker.might_contain(memoryview(buf)[s:e])


def text_cells(buf: bytes, s: int, e: int, readable: bytes) -> bytes | None:
    """The non-NULL cells of the run ``buf[s:e]`` whose ``readable`` flag is set, joined by NUL;
    None when a row has not one cell per flag or overruns its length (C when built)."""
    if _wire is not None:
        return _wire.text_cells(buf, s, e, readable)
    return py_text_cells(buf, s, e, readable)


def py_text_cells(buf: bytes, s: int, e: int, readable: bytes) -> bytes | None:
    """The pure-Python :func:`text_cells`."""
    width = len(readable)
    cells: list[bytes] = []
    e = min(e, len(buf))
    pos = s
    while pos < e:
        if pos + 7 > e:
            return None
        stop = pos + 1 + _I32(buf, pos + 1)[0]
        if stop > e or _I16(buf, pos + 5)[0] != width:
            return None
        p = pos + 7
        for flag in readable:
            if p + 4 > stop:
                return None
            (size,) = _I32(buf, p)
            p += 4
            if size < 0:
                continue
            if p + size > stop:
                return None
            if flag:
                cells.append(buf[p : p + size])
            p += size
        if p != stop:
            return None
        pos = stop
    return b"\0".join(cells)


_OPS: dict[int, tuple[Plan, bytes, tuple[bytes | None, ...], bool, bytes]] = {}


def _c_ops(plan: Plan) -> tuple[bytes, tuple[bytes | None, ...], bool, bytes]:
    """Per column of ``plan``: the op code of ``_wire.rewrite_run``, its fixed cell, whether any
    column is scanned, and the readable flags; worked out once per plan."""
    hit = _OPS.get(id(plan))
    if hit is None or hit[0] is not plan:
        ops = bytearray()
        fixed: list[bytes | None] = []
        for st, t, b in zip(plan.strategies, plan.text, plan.binary_text, strict=True):
            readable = t or b
            if st is None:
                ops.append(_SCAN if readable else _SKIP)
            elif not readable:
                ops.append(_NULLED)
            else:
                ops.append(_C_FIXED if st == "redact" else _C_PARTIAL if st == "partial" else _APPLY)
            fixed.append(_LEN(len(RULE)) + RULE if st == "redact" and readable else None)
        flags = bytes(1 if t or b else 0 for t, b in zip(plan.text, plan.binary_text, strict=True))
        if len(_OPS) > 4096:
            _OPS.clear()
        hit = _OPS[id(plan)] = (plan, bytes(ops), tuple(fixed), _SCAN in ops, flags)
    return hit[1], hit[2], hit[3], hit[4]


def py_rewrite_run(masker: Masker, plan: Plan, buf: bytes, s: int, e: int, detect: bool) -> bytes | None:
    """The pure-Python :func:`rewrite_run`.

    One pass per row: unchanged stretches (row bodies between masked cells) are copied as
    slices, only masked cells are replaced; a row's length is re-packed only when it
    changed. The readable cells of unmasked columns are prefiltered with the detectors ONCE
    for the run; returns None when the prefilter hits (the caller masks row by row, exactly).
    """
    strategies = plan.strategies
    width = len(strategies)
    # per column: (kind, strategy, the whole replacement cell when it is a constant)
    ops = tuple(((_APPLY if (t or b) else _NULLED) if st is not None else (_SCAN if (t or b) else _SKIP), st,
                 _LEN(len(RULE)) + RULE if st == "redact" and (t or b) else None)
                for st, t, b in zip(strategies, plan.text, plan.binary_text, strict=True))
    scanning = detect and any(op[0] == _SCAN for op in ops)
    apply = masker.apply_bytes
    plain: list[bytes] = []
    keep = plain.append
    parts: list[bytes] = []
    append = parts.append
    i32, i16, stars = _I32, _I16, _STARS
    pos = s
    try:
        while pos < e:
            (length,) = i32(buf, pos + 1)
            stop = pos + 1 + length
            (n,) = i16(buf, pos + 5)
            if n != width:
                raise MalformedMessage("malformed DataRow (cells do not match the RowDescription)")
            p = pos + 7
            seg = pos + 5
            delta = 0
            head = len(parts)
            append(b"")
            for kind, st, fixed in ops:
                (size,) = i32(buf, p)
                if size < 0:
                    p += 4
                    continue
                if kind < _APPLY:
                    if kind and scanning:
                        keep(buf[p + 4 : p + 4 + size])
                    p += 4 + size
                    continue
                append(buf[seg:p])
                if fixed is not None:
                    append(fixed)
                    delta += len(fixed) - 4 - size
                elif kind == _NULLED:
                    append(_NULL)
                    delta -= size
                else:
                    cell = buf[p + 4 : p + 4 + size]
                    if st == "partial" and 4 < size <= _MAX_STARS and cell.isascii():
                        append(buf[p : p + 4])  # same length
                        append(stars[size - 4])
                        append(cell[-4:])
                    else:
                        new = apply(cell, st)  # type: ignore[arg-type]
                        append(_LEN(len(new)))
                        append(new)
                        delta += len(new) - size
                p += 4 + size
                seg = p
            if p != stop:
                raise MalformedMessage("malformed DataRow")
            append(buf[seg:stop])
            parts[head] = _HEAD(0x44, length + delta)
            pos = stop
    except struct.error:
        raise MalformedMessage("malformed DataRow") from None
    if scanning and plain and masker.might_contain(b"\0".join(plain)):
        return None
    return b"".join(parts)


RULE = RULE_MARKER.encode()
_MAX_STARS = 256
_STARS = [b"*" * k for k in range(_MAX_STARS)]  # partial: ASCII values keep their length
_HEAD = struct.Struct("!Bi").pack
