"""Messages a PostgreSQL client sends: their type bytes, values and decoders. No I/O.

Each decoder takes the body of one message (what follows the 5-byte header) and raises
:class:`~proxy.pg.primitives.MalformedMessage` on a body that is truncated or has trailing
bytes. ``'p'`` has several readings (PasswordMessage, SASLInitialResponse, SASLResponse): the
glue picks the decoder by the state of the login.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from proxy.pg.primitives import (
    I16,
    I32,
    U32,
    Buf,
    _bad,
    _end,
    _i16s,
    _one_cstring,
    _values,
    as_bytes,
    cstring,
)


class Frontend:
    """Type bytes of messages sent by a client (the ``int`` value of the letter)."""

    BIND: Final = 0x42  # B
    CLOSE: Final = 0x43  # C
    COPY_DATA: Final = 0x64  # d
    COPY_DONE: Final = 0x63  # c
    COPY_FAIL: Final = 0x66  # f
    DESCRIBE: Final = 0x44  # D
    EXECUTE: Final = 0x45  # E
    FLUSH: Final = 0x48  # H
    FUNCTION_CALL: Final = 0x46  # F
    PASSWORD: Final = 0x70  # p: PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse
    PARSE: Final = 0x50  # P
    QUERY: Final = 0x51  # Q
    SYNC: Final = 0x53  # S
    TERMINATE: Final = 0x58  # X


# ---- message values ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    sql: str


@dataclass(frozen=True, slots=True)
class Parse:
    statement: str
    sql: str
    param_oids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Describe:
    kind: str  # "S" statement or "P" portal
    name: str


@dataclass(frozen=True, slots=True)
class Close:
    kind: str  # "S" statement or "P" portal
    name: str


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int  # 0 = no limit


@dataclass(frozen=True, slots=True)
class FunctionCall:
    function_oid: int
    arg_formats: tuple[int, ...]
    args: tuple[bytes | None, ...]
    result_format: int


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    mechanism: str
    data: bytes | None  # None when the client sent length -1


# ---- frontend decoders ---------------------------------------------------------------


def decode_query(body: Buf) -> Query:
    return Query(_one_cstring(body, "Query"))


def decode_parse(body: Buf) -> Parse:
    body = as_bytes(body)
    name, pos = cstring(body, 0, "Parse")
    sql, pos = cstring(body, pos, "Parse")
    try:
        (n,) = I16.unpack_from(body, pos)
        oids = struct.unpack_from(f"!{max(n, 0)}I", body, pos + 2)
    except struct.error:
        raise _bad("Parse") from None
    if n < 0:
        raise _bad("Parse")
    _end(body, pos + 2 + 4 * n, "Parse")
    return Parse(name, sql, oids)


def decode_bind(body: Buf) -> Bind:
    body = as_bytes(body)
    portal, pos = cstring(body, 0, "Bind")
    statement, pos = cstring(body, pos, "Bind")
    formats, pos = _i16s(body, pos, "Bind")
    params, pos = _values(body, pos, "Bind")
    result_formats, pos = _i16s(body, pos, "Bind")
    _end(body, pos, "Bind")
    return Bind(portal, statement, formats, params, result_formats)


def decode_bind_head(body: Buf) -> tuple[str, str, tuple[int, ...]]:
    """Bind's portal, statement and result formats, checked exactly as :func:`decode_bind`
    checks the whole message but without copying the parameter values (the relay's hot path)."""
    body = as_bytes(body)
    portal, pos = cstring(body, 0, "Bind")
    statement, pos = cstring(body, pos, "Bind")
    _, pos = _i16s(body, pos, "Bind")
    limit = len(body)
    unpack = I32.unpack_from
    try:
        (n,) = I16.unpack_from(body, pos)
        pos += 2
        for _ in range(n):
            (size,) = unpack(body, pos)
            pos += 4
            if size == -1:
                continue
            if size < 0 or pos + size > limit:
                raise _bad("Bind")
            pos += size
    except struct.error:
        raise _bad("Bind") from None
    if n < 0:
        raise _bad("Bind")
    result_formats, pos = _i16s(body, pos, "Bind")
    _end(body, pos, "Bind")
    return portal, statement, result_formats


def _kind_name(body: Buf, what: str) -> tuple[str, str]:
    if len(body) < 2 or body[0] not in b"SP":
        raise _bad(what)
    return chr(body[0]), _one_cstring(body[1:], what)


def decode_describe(body: Buf) -> Describe:
    return Describe(*_kind_name(body, "Describe"))


def decode_close(body: Buf) -> Close:
    return Close(*_kind_name(body, "Close"))


def decode_execute(body: Buf) -> Execute:
    body = as_bytes(body)
    portal, pos = cstring(body, 0, "Execute")
    _end(body, pos + 4, "Execute")
    return Execute(portal, I32.unpack_from(body, pos)[0])


def decode_copy_fail(body: Buf) -> str:
    return _one_cstring(body, "CopyFail")


def decode_function_call(body: Buf) -> FunctionCall:
    try:
        (oid,) = U32.unpack_from(body, 0)
        formats, pos = _i16s(body, 4, "FunctionCall")
        args, pos = _values(body, pos, "FunctionCall")
        (result_format,) = I16.unpack_from(body, pos)
    except struct.error:
        raise _bad("FunctionCall") from None
    _end(body, pos + 2, "FunctionCall")
    return FunctionCall(oid, formats, args, result_format)


def decode_password(body: Buf) -> str:
    """'p' read as a PasswordMessage (cleartext password or ``md5...`` hash)."""
    return _one_cstring(body, "PasswordMessage")


def decode_sasl_initial_response(body: Buf) -> SASLInitialResponse:
    """'p' read as a SASLInitialResponse (the first 'p' after AuthenticationSASL)."""
    body = as_bytes(body)
    mechanism, pos = cstring(body, 0, "SASLInitialResponse")
    try:
        (size,) = I32.unpack_from(body, pos)
    except struct.error:
        raise _bad("SASLInitialResponse") from None
    pos += 4
    if size == -1:
        _end(body, pos, "SASLInitialResponse")
        return SASLInitialResponse(mechanism, None)
    if size < 0:
        raise _bad("SASLInitialResponse")
    _end(body, pos + size, "SASLInitialResponse")
    return SASLInitialResponse(mechanism, bytes(body[pos:]))


def decode_sasl_response(body: Buf) -> bytes:
    """'p' read as a SASLResponse: the body is the mechanism's data."""
    return bytes(body)
