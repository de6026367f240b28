"""PostgreSQL v3 message types, and decoders from a message body to a typed value.

A *body* is what follows the 5-byte header (type byte + int32 length). Decoders take a
``bytes``/``memoryview`` body and never do I/O. Strings are decoded as UTF-8 with
``surrogateescape`` so that decode-then-encode gives back the exact bytes whatever the
connection's ``client_encoding`` (the glue should still pin ``client_encoding=UTF8`` when it
masks text). Every decoder checks lengths and raises :class:`MalformedMessage` (08P01) on a
body that is truncated or has trailing bytes.

The hot decoder is :func:`decode_data_row`: it returns zero-copy ``memoryview`` slices of the
body (``None`` for SQL NULL) when given a ``memoryview``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple

from broker.errors import PeerProtocolError

Buf = bytes | bytearray | memoryview

ENCODING: Final = "utf-8"
ERRORS: Final = "surrogateescape"

I16: Final = struct.Struct("!h")
I32: Final = struct.Struct("!i")
U32: Final = struct.Struct("!I")
I32I32: Final = struct.Struct("!ii")
FIELD: Final = struct.Struct("!IhIhih")  # table oid, attnum, type oid, typlen, typmod, format


class MalformedMessage(PeerProtocolError):
    """A message that does not follow the PostgreSQL v3 wire format (SQLSTATE 08P01)."""


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


class Backend:
    """Type bytes of messages sent by a server (the ``int`` value of the letter)."""

    AUTHENTICATION: Final = 0x52  # R
    BACKEND_KEY_DATA: Final = 0x4B  # K
    BIND_COMPLETE: Final = 0x32  # 2
    CLOSE_COMPLETE: Final = 0x33  # 3
    COMMAND_COMPLETE: Final = 0x43  # C
    COPY_DATA: Final = 0x64  # d
    COPY_DONE: Final = 0x63  # c
    COPY_IN_RESPONSE: Final = 0x47  # G
    COPY_OUT_RESPONSE: Final = 0x48  # H
    COPY_BOTH_RESPONSE: Final = 0x57  # W
    DATA_ROW: Final = 0x44  # D
    EMPTY_QUERY_RESPONSE: Final = 0x49  # I
    ERROR_RESPONSE: Final = 0x45  # E
    FUNCTION_CALL_RESPONSE: Final = 0x56  # V
    NEGOTIATE_PROTOCOL_VERSION: Final = 0x76  # v
    NO_DATA: Final = 0x6E  # n
    NOTICE_RESPONSE: Final = 0x4E  # N
    NOTIFICATION_RESPONSE: Final = 0x41  # A
    PARAMETER_DESCRIPTION: Final = 0x74  # t
    PARAMETER_STATUS: Final = 0x53  # S
    PARSE_COMPLETE: Final = 0x31  # 1
    PORTAL_SUSPENDED: Final = 0x73  # s
    READY_FOR_QUERY: Final = 0x5A  # Z
    ROW_DESCRIPTION: Final = 0x54  # T


class Auth:
    """Sub-codes of the Authentication ('R') message."""

    OK: Final = 0
    KERBEROS_V5: Final = 2
    CLEARTEXT_PASSWORD: Final = 3
    MD5_PASSWORD: Final = 5
    GSS: Final = 7
    GSS_CONTINUE: Final = 8
    SSPI: Final = 9
    SASL: Final = 10
    SASL_CONTINUE: Final = 11
    SASL_FINAL: Final = 12


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


@dataclass(frozen=True, slots=True)
class Authentication:
    """Any Authentication ('R') message: ``code`` is an :class:`Auth` value.

    ``salt`` is set for MD5, ``mechanisms`` for SASL, ``data`` for SASL continue/final and
    for codes this module does not interpret (GSS, SSPI).
    """

    code: int
    salt: bytes = b""
    mechanisms: tuple[str, ...] = ()
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    pid: int
    key: bytes  # 4 bytes in protocol 3.0, up to 256 in 3.2


@dataclass(frozen=True, slots=True)
class CommandComplete:
    tag: str
    command: str  # the tag without its counts, e.g. "INSERT", "CREATE TABLE"
    rows: int | None  # affected/returned rows when the tag carries a count


@dataclass(frozen=True, slots=True)
class CopyResponse:
    overall_format: int  # 0 text, 1 binary
    column_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Notification:
    pid: int
    channel: str
    payload: str


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    # On the wire PostgreSQL sends the whole version code (3 << 16 | minor), not just the minor.
    newest_minor: int
    unsupported_options: tuple[str, ...]


class Field(NamedTuple):
    """One column of a RowDescription."""

    name: str
    table_oid: int = 0
    attnum: int = 0
    type_oid: int = 25  # text
    typlen: int = -1
    typmod: int = -1
    format: int = 0  # 0 text, 1 binary


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


# ---- backend decoders ----------------------------------------------------------------


def decode_authentication(body: Buf) -> Authentication:
    try:
        (code,) = I32.unpack_from(body, 0)
    except struct.error:
        raise _bad("Authentication") from None
    rest = bytes(body[4:])
    if code in (Auth.OK, Auth.CLEARTEXT_PASSWORD, Auth.KERBEROS_V5, Auth.GSS, Auth.SSPI):
        _end(rest, 0, "Authentication")
        return Authentication(code)
    if code == Auth.MD5_PASSWORD:
        _end(rest, 4, "AuthenticationMD5Password")
        return Authentication(code, salt=rest)
    if code == Auth.SASL:
        if not rest.endswith(b"\0\0") and rest != b"\0":
            raise _bad("AuthenticationSASL")
        names = rest[:-2].split(b"\0") if len(rest) > 1 else []
        if not all(names):
            raise _bad("AuthenticationSASL")
        return Authentication(code, mechanisms=tuple(n.decode(ENCODING, ERRORS) for n in names))
    return Authentication(code, data=rest)


def decode_parameter_status(body: Buf) -> tuple[str, str]:
    body = as_bytes(body)
    name, pos = cstring(body, 0, "ParameterStatus")
    value, pos = cstring(body, pos, "ParameterStatus")
    _end(body, pos, "ParameterStatus")
    return name, value


def decode_backend_key_data(body: Buf) -> BackendKeyData:
    if not 8 <= len(body) <= 260:
        raise _bad("BackendKeyData")
    return BackendKeyData(I32.unpack_from(body, 0)[0], bytes(body[4:]))


def decode_ready_for_query(body: Buf) -> str:
    """Return the transaction status: "I" idle, "T" in a transaction, "E" failed transaction."""
    if len(body) != 1 or body[0] not in b"ITE":
        raise _bad("ReadyForQuery")
    return chr(body[0])


def decode_row_description(body: Buf) -> tuple[Field, ...]:
    raw = bytes(body)
    try:
        (n,) = I16.unpack_from(raw, 0)
        if n < 0:
            raise _bad("RowDescription")
        pos = 2
        fields: list[Field] = []
        unpack = FIELD.unpack_from
        for _ in range(n):
            end = raw.index(b"\0", pos)
            name = raw[pos:end].decode(ENCODING, ERRORS)
            fields.append(Field(name, *unpack(raw, end + 1)))
            pos = end + 1 + FIELD.size
    except (struct.error, ValueError):
        raise _bad("RowDescription") from None
    _end(raw, pos, "RowDescription")
    return tuple(fields)


def decode_data_row(body: Buf) -> list[Buf | None]:
    """Cells of a DataRow: slices of ``body`` (zero-copy for a memoryview), ``None`` = NULL."""
    unpack = I32.unpack_from
    limit = len(body)
    try:
        (n,) = I16.unpack_from(body, 0)
        if n < 0:
            raise _bad("DataRow")
        pos = 2
        cells: list[Buf | None] = []
        append = cells.append
        for _ in range(n):
            (size,) = unpack(body, pos)
            pos += 4
            if size < 0:
                if size != -1:
                    raise _bad("DataRow")
                append(None)
            else:
                end = pos + size
                if end > limit:
                    raise _bad("DataRow")
                append(body[pos:end])
                pos = end
    except struct.error:
        raise _bad("DataRow") from None
    if pos != limit:
        raise _bad("DataRow")
    return cells


_COUNTED = frozenset({"SELECT", "UPDATE", "DELETE", "MERGE", "FETCH", "MOVE", "COPY"})


def decode_command_complete(body: Buf) -> CommandComplete:
    tag = _one_cstring(body, "CommandComplete")
    words = tag.split(" ")
    rows: int | None = None
    if words[0] == "INSERT" and len(words) == 3 and words[2].isdigit():
        rows, command = int(words[2]), "INSERT"
    elif words[0] in _COUNTED and len(words) == 2 and words[1].isdigit():
        rows, command = int(words[1]), words[0]
    else:
        command = tag
    return CommandComplete(tag, command, rows)


def decode_fields(body: Buf, what: str = "ErrorResponse") -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields keyed by code letter (S, V, C, M, D, H, P, ...)."""
    raw = bytes(body)
    if not raw.endswith(b"\0"):
        raise _bad(what)
    out: dict[str, str] = {}
    if raw == b"\0":
        return out
    if not raw.endswith(b"\0\0"):
        raise _bad(what)
    for part in raw[:-2].split(b"\0"):
        if not part:
            raise _bad(what)
        out[chr(part[0])] = part[1:].decode(ENCODING, ERRORS)
    return out


def decode_copy_response(body: Buf) -> CopyResponse:
    """CopyInResponse, CopyOutResponse and CopyBothResponse share this body."""
    if len(body) < 3:
        raise _bad("CopyResponse")
    formats, pos = _i16s(body, 1, "CopyResponse")
    _end(body, pos, "CopyResponse")
    return CopyResponse(body[0], formats)


def decode_notification(body: Buf) -> Notification:
    body = as_bytes(body)
    try:
        (pid,) = I32.unpack_from(body, 0)
    except struct.error:
        raise _bad("NotificationResponse") from None
    channel, pos = cstring(body, 4, "NotificationResponse")
    payload, pos = cstring(body, pos, "NotificationResponse")
    _end(body, pos, "NotificationResponse")
    return Notification(pid, channel, payload)


def decode_parameter_description(body: Buf) -> tuple[int, ...]:
    try:
        (n,) = I16.unpack_from(body, 0)
        if n < 0:
            raise _bad("ParameterDescription")
        oids = struct.unpack_from(f"!{n}I", body, 2)
    except struct.error:
        raise _bad("ParameterDescription") from None
    _end(body, 2 + 4 * n, "ParameterDescription")
    return oids


def decode_negotiate_protocol_version(body: Buf) -> NegotiateProtocolVersion:
    body = as_bytes(body)
    try:
        version, n = I32I32.unpack_from(body, 0)
    except struct.error:
        raise _bad("NegotiateProtocolVersion") from None
    if n < 0:
        raise _bad("NegotiateProtocolVersion")
    pos, names = 8, []
    for _ in range(n):
        name, pos = cstring(body, pos, "NegotiateProtocolVersion")
        names.append(name)
    _end(body, pos, "NegotiateProtocolVersion")
    if version >> 16 != 3:
        raise _bad("NegotiateProtocolVersion")
    return NegotiateProtocolVersion(version & 0xFFFF, tuple(names))


# Table-driven dispatch for the glue's slow path; 'p' has three readings, so it maps to the
# raw bytes and the glue picks decode_password / decode_sasl_initial_response / ... by state.
FRONTEND_DECODERS: Final[dict[int, Callable[[Buf], object]]] = {
    Frontend.QUERY: decode_query,
    Frontend.PARSE: decode_parse,
    Frontend.BIND: decode_bind,
    Frontend.DESCRIBE: decode_describe,
    Frontend.CLOSE: decode_close,
    Frontend.EXECUTE: decode_execute,
    Frontend.COPY_DATA: bytes,
    Frontend.COPY_FAIL: decode_copy_fail,
    Frontend.FUNCTION_CALL: decode_function_call,
    Frontend.PASSWORD: bytes,
}

BACKEND_DECODERS: Final[dict[int, Callable[[Buf], object]]] = {
    Backend.AUTHENTICATION: decode_authentication,
    Backend.PARAMETER_STATUS: decode_parameter_status,
    Backend.BACKEND_KEY_DATA: decode_backend_key_data,
    Backend.READY_FOR_QUERY: decode_ready_for_query,
    Backend.ROW_DESCRIPTION: decode_row_description,
    Backend.DATA_ROW: decode_data_row,
    Backend.COMMAND_COMPLETE: decode_command_complete,
    Backend.ERROR_RESPONSE: decode_fields,
    Backend.NOTICE_RESPONSE: lambda b: decode_fields(b, "NoticeResponse"),
    Backend.COPY_IN_RESPONSE: decode_copy_response,
    Backend.COPY_OUT_RESPONSE: decode_copy_response,
    Backend.COPY_BOTH_RESPONSE: decode_copy_response,
    Backend.COPY_DATA: bytes,
    Backend.NOTIFICATION_RESPONSE: decode_notification,
    Backend.PARAMETER_DESCRIPTION: decode_parameter_description,
    Backend.NEGOTIATE_PROTOCOL_VERSION: decode_negotiate_protocol_version,
}

#: messages whose body must be empty, keyed by type, with a name for error messages
EMPTY_FRONTEND: Final = {
    Frontend.SYNC: "Sync",
    Frontend.FLUSH: "Flush",
    Frontend.TERMINATE: "Terminate",
    Frontend.COPY_DONE: "CopyDone",
}
EMPTY_BACKEND: Final = {
    Backend.NO_DATA: "NoData",
    Backend.PORTAL_SUSPENDED: "PortalSuspended",
    Backend.EMPTY_QUERY_RESPONSE: "EmptyQueryResponse",
    Backend.PARSE_COMPLETE: "ParseComplete",
    Backend.BIND_COMPLETE: "BindComplete",
    Backend.CLOSE_COMPLETE: "CloseComplete",
    Backend.COPY_DONE: "CopyDone",
}
