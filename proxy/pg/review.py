"""What a review of one execution shows: the statement and the values bound to it.

The text goes to Slack and into the recording, so every value is masked by the resource's
masker here, before it leaves. Text-format values are decoded (the session's
``client_encoding`` is pinned to UTF-8); binary ones are decoded when the statement's parameter
types are known (from Parse, or the server's ParameterDescription, which drivers such as asyncpg
ask for) and the type is a common scalar (booleans, integers, floats, numeric, text, json, uuid,
dates and timestamps); any other is shown as a placeholder with its type and size. A value is masked over its first
:data:`SCAN` characters, then clipped to :data:`SHOW`: a detector match cut by the first clip
lies past the second, so no piece of a masked value is shown.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta

from proxy.mask import Masker

__all__ = ["SCAN", "SHOW", "parameters"]

SCAN = 4096
SHOW = 200
MAX_SHOWN = 20  # parameters listed; the rest are counted


_EPOCH = datetime(2000, 1, 1)
_INFINITY = {0x7FFFFFFFFFFFFFFF: "infinity", -0x8000000000000000: "-infinity"}


def _numeric(v: bytes) -> str:
    ndigits, weight, sign, dscale = struct.unpack_from("!hhHh", v)
    if sign == 0xC000:
        return "NaN"
    if sign in (0xD000, 0xF000):
        return "Infinity" if sign == 0xD000 else "-Infinity"
    digits = struct.unpack_from(f"!{ndigits}H", v, 8)
    whole = "".join(f"{d:04d}" for d in digits[: weight + 1]) if weight >= 0 else "0"
    whole = (whole + "0000" * max(0, weight + 1 - ndigits)).lstrip("0") or "0"
    frac_digits = digits[weight + 1:] if weight >= 0 else (0,) * (-weight - 1) + digits
    frac = "".join(f"{d:04d}" for d in frac_digits)[:dscale].ljust(dscale, "0")
    return ("-" if sign == 0x4000 else "") + whole + ("." + frac if dscale > 0 else "")


def _timestamp(v: bytes) -> str:
    (us,) = struct.unpack("!q", v)
    return _INFINITY.get(us) or (_EPOCH + timedelta(microseconds=us)).isoformat(sep=" ")


def _date(v: bytes) -> str:
    (days,) = struct.unpack("!i", v)
    return {0x7FFFFFFF: "infinity", -0x80000000: "-infinity"}.get(days) or str(date(2000, 1, 1) + timedelta(days))


def _text(v: bytes) -> str:
    return v.decode("utf-8", "replace")


def _jsonb(v: bytes) -> str:
    if v[:1] != b"\x01":  # format version 1, then the text
        raise ValueError("unknown jsonb version")
    return _text(v[1:])


#: binary decoders of common scalar types, by type OID (each raises on a value of the wrong size)
_BINARY: dict[int, Callable[[bytes], str]] = {
    16: lambda v: {b"\x01": "true", b"\x00": "false"}[v],
    21: lambda v: str(struct.unpack("!h", v)[0]),
    23: lambda v: str(struct.unpack("!i", v)[0]),
    20: lambda v: str(struct.unpack("!q", v)[0]),
    26: lambda v: str(struct.unpack("!I", v)[0]),
    700: lambda v: repr(struct.unpack("!f", v)[0]),
    701: lambda v: repr(struct.unpack("!d", v)[0]),
    1700: _numeric,
    25: _text, 1043: _text, 1042: _text, 19: _text, 114: _text, 705: _text,
    3802: _jsonb,
    2950: lambda v: str(uuid.UUID(bytes=v)),
    1082: _date,
    1114: _timestamp,
    1184: lambda v: _timestamp(v) + ("" if struct.unpack("!q", v)[0] in _INFINITY else "+00"),
}


def _binary(type_oid: int, value: bytes) -> str | None:
    """A binary value as text, when its type is one of :data:`_BINARY` and it decodes; else None."""
    decode = _BINARY.get(type_oid)
    if decode is None or len(value) > SCAN * 4:
        return None
    try:
        return decode(value)
    except (struct.error, KeyError, ValueError, OverflowError):
        return None


def _value(masker: Masker | None, fmt: int, value: bytes | None, type_oid: int = 0) -> str:
    if value is None:
        return "NULL"
    if fmt != 0:
        decoded = _binary(type_oid, value)
        if decoded is None:
            return f"[binary, {len(value)} bytes]" if not type_oid else \
                f"[binary, type {type_oid}, {len(value)} bytes]"
        value = decoded.encode()
    text = value[: SCAN * 4].decode("utf-8", "replace")[:SCAN]
    if masker is not None:
        text = masker.mask_text(text)
    shown = text[:SHOW]
    # a control character (a newline) must not start a line of its own in the review
    quoted = "'" + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown).replace("'", "''") + "'"
    if len(shown) < len(text) or len(value) > SCAN * 4:
        quoted += f"… ({len(value)} bytes)"
    return quoted


def parameters(masker: Masker | None, formats: Sequence[int], values: Sequence[bytes | None],
               types: Sequence[int] = ()) -> str:
    """The review's line of bound parameters (``""`` when there are none), masked and clipped; ``types``:
    the statement's parameter type OIDs, as far as known (binary values of known types are decoded)."""
    if not values:
        return ""
    shown = []
    for n, value in enumerate(values[:MAX_SHOWN], 1):
        fmt = formats[0] if len(formats) == 1 else formats[n - 1] if len(formats) >= n else 0
        type_oid = types[n - 1] if len(types) >= n else 0
        shown.append(f"${n} = {_value(masker, fmt, value, type_oid)}")
    more = f", … and {len(values) - MAX_SHOWN} more" if len(values) > MAX_SHOWN else ""
    return "\n-- parameters: " + ", ".join(shown) + more
