"""Binary-format cells: which types can carry text, and masking detector hits in them in place.

How this works. A client that asks for binary results (asyncpg always does) gets arrays,
records, jsonb, xml, bytea, citext, hstore and so on in their binary send format, which
carries any text inside verbatim. Such a cell cannot be rewritten like a text cell: a
replacement of another length would break the lengths of the array, record or other value
around it, and the client could no longer decode it. So :func:`mask_binary` overwrites each
detector hit with filler of the *same* length (the detectors match ASCII spans), and the cell
keeps its size and its structure.

To find where the text is, the cell is walked (:func:`leaves`): arrays and records describe
themselves (element and field type OIDs, a length before each value), so they are taken
apart down to their leaves; a leaf of a known text type is scanned as is, a leaf of a
fixed-width type is skipped, and any other leaf is scanned as opaque bytes. In an opaque leaf
a hit across a NUL byte, or with a byte that is not text (a NUL, another control byte, a byte
of 0x80 or more) among the 4 bytes before it or right after it, may cover a length inside a
structure hoop does not know (``00 00 01 41`` is the length 321 and "A"), unless those 4
bytes are a length whose value holds the whole hit; and a hit in a structure's own bytes (or
across two leaves) cannot be masked in place: in both cases the whole cell becomes NULL,
which every client decodes. Fail closed: after masking, the whole cell is scanned once more,
and any hit left makes it NULL too.

Cells of fixed-width types (:data:`FIXED_OIDS`, and arrays of them) hold no text and are not
scanned at all, except int8, float8 and numeric: their text form is scanned (:func:`number_hit`).
"""

from __future__ import annotations

import math
import struct
from decimal import Decimal

from broker.config import Detector
from proxy.mask import REDACT_MARKERS, Masker

#: fixed-width scalars whose binary form cannot carry text: bool, "char", int8, int2, int4,
#: oid, tid, xid, cid, point, lseg, box, line, circle, float4, float8, money, cidr, macaddr8,
#: macaddr, inet, date, time, timestamp, timestamptz, interval, timetz, numeric, uuid, pg_lsn, xid8
FIXED_OIDS = frozenset({16, 18, 20, 21, 23, 26, 27, 28, 29, 600, 601, 603, 628, 718, 700, 701, 790, 650, 774,
                        829, 869, 1082, 1083, 1114, 1184, 1186, 1266, 1700, 2950, 3220, 5069})
#: arrays of those (their elements are fixed-width or NULL)
FIXED_ARRAY_OIDS = frozenset({1000, 1002, 1016, 1005, 1007, 1028, 1010, 1011, 1012, 1017, 1018, 1020, 629, 719,
                              1021, 1022, 791, 651, 775, 1040, 1041, 1182, 1183, 1115, 1185, 1187, 1270, 1231,
                              2951, 3221, 271})
#: types whose binary form is their bytes or text as is (jsonb and jsonpath after a version
#: byte): text, varchar, bpchar, name, json, unknown, bytea, xml, jsonb, jsonpath, cstring
RAW_OIDS = frozenset({25, 1043, 1042, 19, 114, 705, 17, 142, 3802, 4072, 2275})

_I32 = struct.Struct("!i").unpack_from
_U32 = struct.Struct("!I").unpack_from
_MAX_DEPTH = 16  # nesting hoop takes apart; deeper values are opaque (and so fail closed on a hit)
_MAX_DIMS = 6  # PostgreSQL's MAXDIM

#: a leaf: ``(start, end, raw)``; raw leaves have no inner structure a hit could cover
Leaf = tuple[int, int, bool]


def scanned(type_oid: int) -> bool:
    """Whether a binary cell of ``type_oid`` may carry text (so the detectors read it)."""
    return type_oid not in FIXED_OIDS and type_oid not in FIXED_ARRAY_OIDS


def leaves(buf: bytes, s: int, e: int, type_oid: int, out: list[Leaf], depth: int = 0) -> None:
    """Append the leaves of the binary value ``buf[s:e]`` of ``type_oid`` that may hold text."""
    if type_oid in FIXED_OIDS or type_oid in FIXED_ARRAY_OIDS:
        return
    if type_oid in RAW_OIDS:
        out.append((s, e, True))
        return
    if depth < _MAX_DEPTH:
        found = _array(buf, s, e)
        if found is not None:
            elem, values = found
            for vs, ve in values:
                leaves(buf, vs, ve, elem, out, depth + 1)
            return
        fields = _record(buf, s, e)
        if fields is not None:
            for oid, vs, ve in fields:
                leaves(buf, vs, ve, oid, out, depth + 1)
            return
    out.append((s, e, False))


def _array(buf: bytes, s: int, e: int) -> tuple[int, list[tuple[int, int]]] | None:
    """The element OID and the non-NULL element spans when ``buf[s:e]`` is exactly a binary array."""
    if e - s < 12:
        return None
    (ndim,) = _I32(buf, s)
    (flags,) = _I32(buf, s + 4)
    (elem,) = _U32(buf, s + 8)
    if not 0 <= ndim <= _MAX_DIMS or flags not in (0, 1) or e - s < 12 + 8 * ndim:
        return None
    count = 1 if ndim else 0
    for d in range(ndim):
        (size,) = _I32(buf, s + 12 + 8 * d)
        if size < 0:
            return None
        count *= size
    values = _values(buf, s + 12 + 8 * ndim, e, count, False)
    return None if values is None else (elem, [(vs, ve) for _, vs, ve in values])


def _record(buf: bytes, s: int, e: int) -> list[tuple[int, int, int]] | None:
    """``(type OID, start, end)`` of the non-NULL fields when ``buf[s:e]`` is exactly a binary record."""
    if e - s < 4:
        return None
    (n,) = _I32(buf, s)
    if n < 0 or n > (e - s - 4) // 8:
        return None
    return _values(buf, s + 4, e, n, True)


def _values(buf: bytes, p: int, e: int, n: int, with_oid: bool) -> list[tuple[int, int, int]] | None:
    """``n`` length-prefixed values (each after its type OID when ``with_oid``) filling ``buf[p:e]`` exactly."""
    if n > (e - p) // (8 if with_oid else 4):
        return None
    out: list[tuple[int, int, int]] = []
    for _ in range(n):
        oid = 0
        if with_oid:
            if p + 4 > e:
                return None
            (oid,) = _U32(buf, p)
            p += 4
        if p + 4 > e:
            return None
        (size,) = _I32(buf, p)
        p += 4
        if size < -1 or p + max(size, 0) > e:
            return None
        if size > 0:
            out.append((oid, p, p + size))
            p += size
    return out if p == e else None


def filler(masker: Masker, span: bytes, detector: Detector) -> bytes:
    """ASCII of ``len(span)`` bytes in place of a detector hit, after the resource's strategy:
    ``[email]***`` (or all ``*`` when shorter than the marker), ``partial`` as for text,
    ``hash`` cut or padded with ``*``."""
    n = len(span)
    if masker.strategy == "redact":
        marker = REDACT_MARKERS[detector]
        new: bytes = marker if len(marker) <= n else b""
    else:
        new = masker.apply_bytes(span, masker.strategy)
        if not new.isascii():
            new = b""
    return new[:n] + b"*" * (n - len(new))


# the bytes printable ASCII text is made of (tab, line ends and space to "~")
_TEXT_BYTES = bytes([9, 10, 13, *range(0x20, 0x7F)])


def _near_structure(part: bytes, hs: int, he: int) -> bool:
    """True when a hit ``part[hs:he]`` of an opaque leaf may have taken in bytes of a binary field.

    A big-endian int32 below 2**24 (or an int16) whose low bytes are local-part or token
    characters joins the hit, and then a byte that is no text (a NUL, another control byte, or
    a high byte such as tsvector's weight bits) is among the 4 bytes before it; a field after
    the hit whose high bytes joined it leaves such a byte right after the hit. Either way, what
    the hit covers cannot be told apart from text, so the cell fails closed, unless the 4 bytes
    before the hit are a length whose value holds the whole hit (a value that starts with the
    hit, as in an hstore pair): then no byte of a field is in it.
    """
    near = part[max(0, hs - 4) : hs] + part[he : he + 1]
    if not near.translate(None, _TEXT_BYTES):
        return False
    if hs >= 4:
        (n,) = _I32(part, hs - 4)
        if he <= hs + n <= len(part):
            return False
    return True


def mask_binary(masker: Masker, cell: bytes, type_oid: int) -> tuple[bool, bytes | None]:
    """Mask detector hits in the binary cell ``cell`` of ``type_oid`` (0: unknown).

    ``(False, cell)`` when nothing matched; ``(True, new)`` with ``new`` the same length as
    ``cell``, or None when the cell must become NULL (see the module docstring).
    """
    if not masker.might_contain(cell):
        return False, cell
    found: list[Leaf] = []
    leaves(cell, 0, len(cell), type_oid, found)
    out: bytearray | None = None
    for s, e, raw in found:
        part = cell[s:e]
        for hs, he, detector in masker.scan(part):
            if not raw and (b"\0" in part[hs:he] or _near_structure(part, hs, he)):
                return True, None  # the hit may cover a length of a structure hoop does not know
            if out is None:
                out = bytearray(cell)
            out[s + hs : s + he] = filler(masker, part[hs:he], detector)
    new = cell if out is None else bytes(out)
    if masker.might_contain(new) and masker.scan(new):
        return True, None  # a hit across leaves or in a structure's bytes: not maskable in place
    return (False, cell) if out is None else (True, new)


# ---- numbers read as text ------------------------------------------------------------------
#
# A number holds no text, but the text form psql shows of it can be a detector hit: the
# ``card`` detector matches a run of 13 to 19 digits, and int8, float8 (13 to 15 digits
# before the point, or a long fraction) and numeric print such runs. So with the detectors on
# these binary cells are rendered as PostgreSQL prints them and scanned; a hit makes the cell
# NULL (a number cannot be masked in place). The other fixed-width types cannot print a hit:
# int2 and int4 print at most 10 digits, float4 at most 9 significant digits and a few zeros,
# money groups its digits by three, and no number prints the separators, letters or "@" the
# other detectors need (an SSN or phone number needs ``-``, ``.``, `` ``, ``(`` or ``+``).

#: int8, float8, numeric
NUMBER_OIDS = frozenset({20, 701, 1700})
#: arrays of those -> their element type
NUMBER_ARRAY_OIDS = {1016: 20, 1022: 701, 1231: 1700}

_F8 = struct.Struct("!d").unpack_from
_NUMERIC_HEAD = struct.Struct("!hhHh").unpack_from
_NUMERIC_SIGNS = {0x0000: "", 0x4000: "-"}
_NUMERIC_SPECIAL = {0xC000: "NaN", 0xD000: "Infinity", 0xF000: "-Infinity"}


def number_texts(cell: bytes, type_oid: int) -> list[str] | None:
    """The text forms, as PostgreSQL prints them, of the binary int8, float8 or numeric value
    ``cell`` (of an array of them: of each non-NULL element); None when it is malformed."""
    elem = NUMBER_ARRAY_OIDS.get(type_oid)
    if elem is None:
        one = _number_text(cell, type_oid)
        return None if one is None else [one]
    found = _array(cell, 0, len(cell))
    if found is None or found[0] != elem:
        return None
    out: list[str] = []
    for vs, ve in found[1]:
        text = _number_text(cell[vs:ve], elem)
        if text is None:
            return None
        out.append(text)
    return out


def number_hit(masker: Masker, cell: bytes, type_oid: int) -> bool:
    """Whether the binary number ``cell`` (see :func:`number_texts`) must become NULL: its text
    form holds a detector hit, or it cannot be read (fail closed)."""
    if type_oid == 20 and len(cell) == 8 and -10**12 < int.from_bytes(cell, "big", signed=True) < 10**12:
        return False  # 12 digits at most: no detector matches (the common case, decided cheaply)
    texts = number_texts(cell, type_oid)
    if texts is None:
        return True
    data = "\0".join(texts).encode("ascii")
    return masker.might_contain(data) and bool(masker.scan(data))


def _number_text(cell: bytes, type_oid: int) -> str | None:
    if type_oid == 20:
        return str(int.from_bytes(cell, "big", signed=True)) if len(cell) == 8 else None
    if type_oid == 701:
        return float8_text(_F8(cell)[0]) if len(cell) == 8 else None
    if type_oid == 1700:
        return numeric_text(cell)
    return None


def float8_text(x: float) -> str:
    """``x`` as PostgreSQL (12 and later, ``extra_float_digits`` > 0) prints a float8: the
    shortest exact digits, in fixed notation for decimal exponents -4 to 14, else ``1.5e+15``."""
    if math.isnan(x):
        return "NaN"
    if x in (math.inf, -math.inf):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "-0" if math.copysign(1.0, x) < 0 else "0"
    t = Decimal(repr(x)).as_tuple()
    raw = "".join(map(str, t.digits))
    digits = raw.rstrip("0")
    exp = len(raw) + int(t.exponent) - 1  # of the first digit
    sign = "-" if t.sign else ""
    if -4 <= exp < 15:
        if exp < 0:
            return f"{sign}0.{'0' * (-exp - 1)}{digits}"
        whole, frac = digits[: exp + 1].ljust(exp + 1, "0"), digits[exp + 1 :]
        return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{mantissa}e{'+' if exp >= 0 else '-'}{abs(exp):02d}"


def numeric_text(cell: bytes) -> str | None:
    """The binary numeric ``cell`` as PostgreSQL prints it (``-12.50``); None when malformed."""
    if len(cell) < 8:
        return None
    ndigits, weight, sign, dscale = _NUMERIC_HEAD(cell)
    if sign in _NUMERIC_SPECIAL:
        return _NUMERIC_SPECIAL[sign] if len(cell) == 8 else None
    if sign not in _NUMERIC_SIGNS or ndigits < 0 or dscale < 0 or len(cell) != 8 + 2 * ndigits:
        return None
    groups = struct.unpack_from(f"!{ndigits}h", cell, 8)
    if any(not 0 <= g <= 9999 for g in groups):
        return None

    def group(k: int) -> str:
        return f"{groups[k]:04d}" if 0 <= k < ndigits else "0000"

    whole = str(int("".join(group(k) for k in range(weight + 1)))) if weight >= 0 else "0"
    if dscale == 0:
        return _NUMERIC_SIGNS[sign] + whole
    frac = "".join(group(k) for k in range(weight + 1, weight + 1 + (dscale + 3) // 4))[:dscale]
    return f"{_NUMERIC_SIGNS[sign]}{whole}.{frac}"
