"""Messages a PostgreSQL server sends: their type bytes, the Authentication sub-codes, their
values and decoders. No I/O.

Each decoder takes the body of one message (what follows the 5-byte header) and raises
:class:`~proxy.pg.primitives.MalformedMessage` on a body that is truncated or has trailing
bytes. The hot one is :func:`decode_data_row`: it returns zero-copy ``memoryview`` slices of
the body (``None`` for SQL NULL) when given a ``memoryview``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

from proxy.pg.primitives import (
    ENCODING,
    ERRORS,
    I16,
    I32,
    I32I32,
    Buf,
    _bad,
    _end,
    _i16s,
    _one_cstring,
    as_bytes,
    cstring,
)

FIELD: Final = struct.Struct("!IhIhih")  # table oid, attnum, type oid, typlen, typmod, format


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
