"""Runs of DataRows (one coalesced frame of the framer): count, sample, prefilter, rewrite.

How this works. A run whose plan has no masked column is checked with the masker's bytes
prefilter (:meth:`proxy.mask.Masker.might_contain`) over its readable cells only (text cells,
and binary cells that may carry text: every type but fixed-width scalars), joined by NUL
(:func:`run_might_contain`), and forwarded untouched when nothing can match; otherwise
the caller masks it row by row (:func:`proxy.pg.rows.mask_row`, a row is rewritten only when
a cell changes). A run with a masked column is rewritten in one pass (:func:`rewrite_run`).
Binary number cells (int8, float8, numeric) are read in their text form, row by row
(:func:`numbers_might_hit`); a run with a hit is masked row by row too.

The loops over rows and cells run in C (:mod:`proxy.pg._wire`, built by ``pip install -e .``)
when it is built; each has a pure-Python twin here (``py_*``) that gives the same bytes and
the same errors, which the tests check on fuzzed input.
"""

from __future__ import annotations

import struct

from proxy.mask import RULE_MARKER, Masker
from proxy.pg.binary import number_hit
from proxy.pg.messages import MalformedMessage
from proxy.pg.rows import Plan, row_text_at

try:
    from proxy.pg import _wire
except ImportError:  # not built: the pure-Python twins run
    _wire = None  # type: ignore[assignment]

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
        out.append(row_text_at(buf, pos + 5, stop, text))
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
    if detect and plan.binary_number and numbers_might_hit(masker, plan, buf, s, e):
        return None
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

    Only the cells the detectors read (text, or binary that may carry text) are looked at, joined by NUL
    as :func:`rewrite_run` does; a run whose rows do not match ``plan`` is looked at whole.
    """
    if plan is not None and plan.binary_number and numbers_might_hit(masker, plan, buf, s, e):
        return True
    if plan is not None and plan.strategies:
        cells = text_cells(buf, s, e, _c_ops(plan)[3])
        if cells is not None:
            return masker.might_contain(cells)
    return masker.might_contain(memoryview(buf)[s:e])


def numbers_might_hit(masker: Masker, plan: Plan, buf: bytes, s: int, e: int) -> bool:
    """Whether a binary int8/float8/numeric cell (or array of them) of the DataRow run ``buf[s:e]``
    reads as a detector hit (:func:`proxy.pg.binary.number_hit`); a row that does not match
    ``plan`` counts as a hit too, so the caller looks at it row by row, exactly."""
    flags, oids = plan.binary_number, plan.oids
    width = len(flags)
    try:
        for rs, re_ in row_spans(buf, s, e):
            if _I16(buf, rs + 5)[0] != width:
                return True
            p = rs + 7
            for i in range(width):
                (size,) = _I32(buf, p)
                p += 4
                if size > 0:
                    if flags[i] and number_hit(masker, buf[p : p + size], oids[i]):
                        return True
                    p += size
            if p != re_:
                return True
    except struct.error:
        return True
    return False


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
        scans = _binary_scan(plan)
        for st, t, b, x in zip(plan.strategies, plan.text, plan.binary_text, scans, strict=True):
            readable = t or b
            if st is None:
                ops.append(_SCAN if readable or x else _SKIP)
            elif not readable:
                ops.append(_NULLED)
            else:
                ops.append(_C_FIXED if st == "redact" else _C_PARTIAL if st == "partial" else _APPLY)
            fixed.append(_LEN(len(RULE)) + RULE if st == "redact" and readable else None)
        flags = bytes(1 if t or b or (x and st is None) else 0
                      for st, t, b, x in zip(plan.strategies, plan.text, plan.binary_text, scans, strict=True))
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
    ops = tuple(((_APPLY if (t or b) else _NULLED) if st is not None else (_SCAN if (t or b or x) else _SKIP), st,
                 _LEN(len(RULE)) + RULE if st == "redact" and (t or b) else None)
                for st, t, b, x in zip(strategies, plan.text, plan.binary_text, _binary_scan(plan), strict=True))
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


def _binary_scan(plan: Plan) -> tuple[bool, ...]:
    """Per column: a binary cell the detectors read over its raw bytes (:mod:`proxy.pg.binary`)."""
    return plan.binary_scan or (False,) * len(plan.strategies)


RULE = RULE_MARKER.encode()
_MAX_STARS = 256
_STARS = [b"*" * k for k in range(_MAX_STARS)]  # partial: ASCII values keep their length
_HEAD = struct.Struct("!Bi").pack
