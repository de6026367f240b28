"""What both directions of the PostgreSQL v3 protocol share: the buffer type, the string
encoding, the integer layouts, the errors (:class:`MalformedMessage`, :class:`MessageTooLong`),
and the readers and writers of primitive values (NUL-terminated strings, counted int16 arrays,
counted values). No I/O.

Strings are read and written as UTF-8 with ``surrogateescape`` (see :mod:`proxy.pg.messages`).
The helpers with a leading underscore are shared with the other modules of the codec
(:mod:`proxy.pg.frontend`, :mod:`proxy.pg.backend`, :mod:`proxy.pg.startup`,
:mod:`proxy.pg.codec`) only.
"""

from __future__ import annotations

import struct
from typing import Final

from broker.errors import PeerProtocolError

Buf = bytes | bytearray | memoryview

ENCODING: Final = "utf-8"
ERRORS: Final = "surrogateescape"

I16: Final = struct.Struct("!h")
I32: Final = struct.Struct("!i")
U32: Final = struct.Struct("!I")
I32I32: Final = struct.Struct("!ii")
_i32 = I32.pack


class MalformedMessage(PeerProtocolError):
    """A message that does not follow the PostgreSQL v3 wire format (SQLSTATE 08P01)."""


class MessageTooLong(MalformedMessage):
    """A length field below the minimum or above the configured maximum (``length``, as on the
    wire, of a message of type ``msg_type``; -1 for a start-up packet)."""

    def __init__(self, message: str, *, length: int = 0, msg_type: int = -1) -> None:
        super().__init__(message)
        self.length = length
        self.msg_type = msg_type


# ---- primitive readers ---------------------------------------------------------------


def _bad(what: str) -> MalformedMessage:
    return MalformedMessage(f"malformed {what} message")


def as_bytes(body: Buf) -> bytes:
    return body if type(body) is bytes else bytes(body)


def cstring(raw: bytes, pos: int, what: str) -> tuple[str, int]:
    """Read a NUL-terminated string at ``pos``; return it and the position after the NUL."""
    end = raw.find(b"\0", pos)
    if end < 0:
        raise MalformedMessage(f"malformed {what} message: unterminated string")
    return raw[pos:end].decode(ENCODING, ERRORS), end + 1


def _i16s(body: Buf, pos: int, what: str) -> tuple[tuple[int, ...], int]:
    """Read an int16 count followed by that many int16 values."""
    try:
        (n,) = I16.unpack_from(body, pos)
        if n < 0:
            raise _bad(what)
        values = struct.unpack_from(f"!{n}h", body, pos + 2)
    except struct.error:
        raise _bad(what) from None
    return values, pos + 2 + 2 * n


def _values(body: Buf, pos: int, what: str) -> tuple[tuple[bytes | None, ...], int]:
    """Read an int16 count followed by that many (int32 length, bytes) values; -1 is NULL."""
    try:
        (n,) = I16.unpack_from(body, pos)
        pos += 2
        out: list[bytes | None] = []
        for _ in range(n):
            (size,) = I32.unpack_from(body, pos)
            pos += 4
            if size == -1:
                out.append(None)
                continue
            if size < 0 or pos + size > len(body):
                raise _bad(what)
            out.append(bytes(body[pos : pos + size]))
            pos += size
    except struct.error:
        raise _bad(what) from None
    if n < 0:
        raise _bad(what)
    return tuple(out), pos


def _end(body: Buf, pos: int, what: str) -> None:
    if pos != len(body):
        raise MalformedMessage(f"malformed {what} message: {len(body) - pos} unexpected bytes")


def _one_cstring(body: Buf, what: str) -> str:
    raw = as_bytes(body)
    s, pos = cstring(raw, 0, what)
    _end(body, pos, what)
    return s


def expect_empty(body: Buf, what: str) -> None:
    """Check a body that must be empty (Sync, Flush, Terminate, NoData, ParseComplete, ...)."""
    _end(body, 0, what)


# ---- primitive writers ---------------------------------------------------------------


def _enc(s: str) -> bytes:
    return s.encode(ENCODING, ERRORS)


def _cstr(s: str) -> bytes:
    return s.encode(ENCODING, ERRORS) + b"\0"
