"""PostgreSQL v3 wire protocol: startup parsing, framing and encoders. No I/O.

Encoders build whole messages (header included) as ``bytes``. To mask a DataRow, decode
its cells (memoryview slices of the frame), replace the few that change and pass the list
to :func:`encode_data_row`; unchanged cells are copied once, by the final join. Skip all of
this when no column of the result set needs masking: DataRows then stay in the forwarded run.

Where the code is: this module holds the encoders. :mod:`proxy.pg.startup` reads and writes
the untyped start-up packets, :mod:`proxy.pg.framer` splits a typed message stream into frames
(:class:`Framer`), and :mod:`proxy.pg.messages` decodes message bodies. The public names of
startup and framer, and :class:`MessageTooLong`, are also importable from here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from proxy.pg.backend import FIELD, Auth, Backend, Field, decode_fields
from proxy.pg.framer import (
    CLIENT_MAX_MESSAGE,
    HEADER,
    HEADER_SIZE,
    RAW,
    SERVER_MAX_MESSAGE,
    STREAM_THRESHOLD,
    Frame,
    Framer,
    py_split,
    rows_frame,
    split,
)
from proxy.pg.frontend import Frontend
from proxy.pg.primitives import I16, I32, I32I32, Buf, MessageTooLong, _cstr, _enc, _i32
from proxy.pg.startup import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP_LENGTH,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    SUPPORTED_MINOR,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupPacket,
    UnsupportedProtocol,
    encode_cancel_request,
    encode_gssenc_request,
    encode_ssl_request,
    encode_startup,
    looks_like_tls,
    parse_startup,
)

__all__ = [
    "AUTH_CLEARTEXT_PASSWORD", "AUTH_OK", "BIND_COMPLETE", "CANCEL_REQUEST_CODE", "CLIENT_MAX_MESSAGE",
    "CLOSE_COMPLETE", "COPY_DONE", "EMPTY_QUERY_RESPONSE", "FLUSH", "GSSENC_REQUEST_CODE", "HEADER", "HEADER_SIZE",
    "MAX_STARTUP_LENGTH", "NO_DATA", "PARSE_COMPLETE", "PORTAL_SUSPENDED", "PROTOCOL_3_0", "RAW",
    "SERVER_MAX_MESSAGE", "SSL_REQUEST_CODE", "STREAM_THRESHOLD", "SUPPORTED_MINOR", "SYNC", "TERMINATE",
    "CancelRequest", "Frame", "Framer", "GSSENCRequest", "MessageTooLong", "SSLRequest", "StartupMessage",
    "StartupPacket", "UnsupportedProtocol", "encode_auth", "encode_auth_md5", "encode_auth_sasl",
    "encode_auth_sasl_continue", "encode_auth_sasl_final", "encode_backend_key_data", "encode_bind",
    "encode_cancel_request", "encode_close", "encode_command_complete", "encode_copy_data", "encode_copy_fail",
    "encode_copy_response", "encode_data_row", "encode_describe", "encode_error", "encode_execute", "encode_fields",
    "encode_function_call", "encode_gssenc_request", "encode_negotiate_protocol_version", "encode_notification",
    "encode_parameter_description", "encode_parameter_status", "encode_parse", "encode_password", "encode_query",
    "encode_ready_for_query", "encode_row_description", "encode_sasl_initial_response", "encode_sasl_response",
    "encode_ssl_request", "encode_startup", "error_fields", "frame", "looks_like_tls", "parse_startup", "py_split",
    "replace_fields", "rows_frame", "split",
]

_HEADER_AUTH: Final = struct.Struct("!Bii")
_DATA_ROW_HEADER: Final = struct.Struct("!Bih")
_NULL_CELL: Final = I32.pack(-1)


def frame(msg_type: int, body: bytes = b"") -> bytes:
    """A whole message: type byte, length, body."""
    return HEADER.pack(msg_type, len(body) + 4) + body


def encode_fields(fields: Mapping[str, str], msg_type: int = Backend.ERROR_RESPONSE) -> bytes:
    """ErrorResponse (or NoticeResponse with ``msg_type=Backend.NOTICE_RESPONSE``) from fields."""
    body = b"".join(_enc(code[0]) + _cstr(value) for code, value in fields.items()) + b"\0"
    return frame(msg_type, body)


def error_fields(
    severity: str, sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None
) -> dict[str, str]:
    """Fields of a proxy-made error or notice, in the order PostgreSQL sends them."""
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    if detail is not None:
        fields["D"] = detail
    if hint is not None:
        fields["H"] = hint
    return fields


def encode_error(
    sqlstate: str,
    message: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
    notice: bool = False,
) -> bytes:
    """An ErrorResponse (or NoticeResponse when ``notice``) made by the proxy."""
    fields = error_fields(severity, sqlstate, message, detail=detail, hint=hint)
    return encode_fields(fields, Backend.NOTICE_RESPONSE if notice else Backend.ERROR_RESPONSE)


def replace_fields(msg_type: int, body: Buf, replacements: Mapping[str, str | None]) -> bytes:
    """Rebuild an ErrorResponse/NoticeResponse with some field values replaced.

    Order is kept; a ``None`` value drops the field; a code not present is appended.
    """
    fields = decode_fields(body)
    for code, value in replacements.items():
        if value is None:
            fields.pop(code, None)
        else:
            fields[code] = value
    return encode_fields(fields, msg_type)


def encode_ready_for_query(status: str = "I") -> bytes:
    return frame(Backend.READY_FOR_QUERY, _enc(status))


def encode_auth(code: int, data: bytes = b"") -> bytes:
    """Any Authentication message; see the ``encode_auth_*`` shortcuts."""
    return _HEADER_AUTH.pack(Backend.AUTHENTICATION, 8 + len(data), code) + data


AUTH_OK: Final = encode_auth(Auth.OK)
AUTH_CLEARTEXT_PASSWORD: Final = encode_auth(Auth.CLEARTEXT_PASSWORD)


def encode_auth_md5(salt: bytes) -> bytes:
    return encode_auth(Auth.MD5_PASSWORD, salt)


def encode_auth_sasl(mechanisms: Iterable[str]) -> bytes:
    return encode_auth(Auth.SASL, b"".join(_cstr(m) for m in mechanisms) + b"\0")


def encode_auth_sasl_continue(data: bytes) -> bytes:
    return encode_auth(Auth.SASL_CONTINUE, data)


def encode_auth_sasl_final(data: bytes) -> bytes:
    return encode_auth(Auth.SASL_FINAL, data)


def encode_parameter_status(name: str, value: str) -> bytes:
    return frame(Backend.PARAMETER_STATUS, _cstr(name) + _cstr(value))


def encode_backend_key_data(pid: int, key: bytes) -> bytes:
    return frame(Backend.BACKEND_KEY_DATA, _i32(pid) + key)


def encode_negotiate_protocol_version(newest_minor: int, unsupported: Sequence[str]) -> bytes:
    body = I32I32.pack(PROTOCOL_3_0 | newest_minor, len(unsupported)) + b"".join(_cstr(o) for o in unsupported)
    return frame(Backend.NEGOTIATE_PROTOCOL_VERSION, body)


def encode_command_complete(tag: str) -> bytes:
    return frame(Backend.COMMAND_COMPLETE, _cstr(tag))


def encode_row_description(fields: Sequence[Field]) -> bytes:
    pack = FIELD.pack
    parts = [I16.pack(len(fields))]
    parts += [_cstr(f.name) + pack(*f[1:]) for f in fields]
    return frame(Backend.ROW_DESCRIPTION, b"".join(parts))


def encode_data_row(cells: Sequence[Buf | None]) -> bytes:
    """A DataRow from cells (``None`` = NULL). Unchanged cells may be memoryview slices."""
    parts: list[Buf] = [b""]
    append = parts.append
    size = 6
    for cell in cells:
        if cell is None:
            append(_NULL_CELL)
            size += 4
        else:
            n = len(cell)
            append(_i32(n))
            append(cell)
            size += 4 + n
    parts[0] = _DATA_ROW_HEADER.pack(Backend.DATA_ROW, size, len(cells))
    return b"".join(parts)


def encode_copy_response(msg_type: int, overall_format: int, column_formats: Sequence[int]) -> bytes:
    """CopyInResponse / CopyOutResponse / CopyBothResponse, chosen by ``msg_type``."""
    n = len(column_formats)
    return frame(msg_type, bytes((overall_format,)) + struct.pack(f"!h{n}h", n, *column_formats))


def encode_notification(pid: int, channel: str, payload: str) -> bytes:
    return frame(Backend.NOTIFICATION_RESPONSE, _i32(pid) + _cstr(channel) + _cstr(payload))


def encode_parameter_description(oids: Sequence[int]) -> bytes:
    return frame(Backend.PARAMETER_DESCRIPTION, struct.pack(f"!h{len(oids)}I", len(oids), *oids))


EMPTY_QUERY_RESPONSE: Final = frame(Backend.EMPTY_QUERY_RESPONSE)
NO_DATA: Final = frame(Backend.NO_DATA)
PARSE_COMPLETE: Final = frame(Backend.PARSE_COMPLETE)
BIND_COMPLETE: Final = frame(Backend.BIND_COMPLETE)
CLOSE_COMPLETE: Final = frame(Backend.CLOSE_COMPLETE)
PORTAL_SUSPENDED: Final = frame(Backend.PORTAL_SUSPENDED)
SYNC: Final = frame(Frontend.SYNC)
FLUSH: Final = frame(Frontend.FLUSH)
TERMINATE: Final = frame(Frontend.TERMINATE)
COPY_DONE: Final = frame(Frontend.COPY_DONE)  # same byte and shape in both directions


def encode_query(sql: str) -> bytes:
    return frame(Frontend.QUERY, _cstr(sql))


def encode_parse(statement: str, sql: str, param_oids: Sequence[int] = ()) -> bytes:
    n = len(param_oids)
    return frame(Frontend.PARSE, _cstr(statement) + _cstr(sql) + struct.pack(f"!h{n}I", n, *param_oids))


def _values(values: Sequence[bytes | None]) -> bytes:
    parts = [I16.pack(len(values))]
    parts += [_NULL_CELL if v is None else _i32(len(v)) + v for v in values]
    return b"".join(parts)


def _i16s(values: Sequence[int]) -> bytes:
    return struct.pack(f"!h{len(values)}h", len(values), *values)


def encode_bind(
    portal: str,
    statement: str,
    params: Sequence[bytes | None] = (),
    *,
    param_formats: Sequence[int] = (),
    result_formats: Sequence[int] = (),
) -> bytes:
    body = _cstr(portal) + _cstr(statement) + _i16s(param_formats) + _values(params) + _i16s(result_formats)
    return frame(Frontend.BIND, body)


def encode_describe(kind: str, name: str = "") -> bytes:
    return frame(Frontend.DESCRIBE, _enc(kind) + _cstr(name))


def encode_close(kind: str, name: str = "") -> bytes:
    return frame(Frontend.CLOSE, _enc(kind) + _cstr(name))


def encode_execute(portal: str = "", max_rows: int = 0) -> bytes:
    return frame(Frontend.EXECUTE, _cstr(portal) + _i32(max_rows))


def encode_function_call(
    function_oid: int,
    args: Sequence[bytes | None],
    *,
    arg_formats: Sequence[int] = (),
    result_format: int = 0,
) -> bytes:
    body = struct.pack("!I", function_oid) + _i16s(arg_formats) + _values(args) + I16.pack(result_format)
    return frame(Frontend.FUNCTION_CALL, body)


def encode_copy_data(data: Buf) -> bytes:
    return HEADER.pack(Frontend.COPY_DATA, len(data) + 4) + data


def encode_copy_fail(message: str) -> bytes:
    return frame(Frontend.COPY_FAIL, _cstr(message))


def encode_password(password: str | bytes) -> bytes:
    """PasswordMessage: a cleartext password or an ``md5...`` hash (see ``scram.md5_password``)."""
    raw = password if isinstance(password, bytes) else _enc(password)
    return frame(Frontend.PASSWORD, raw + b"\0")


def encode_sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    tail = _NULL_CELL if data is None else _i32(len(data)) + data
    return frame(Frontend.PASSWORD, _cstr(mechanism) + tail)


def encode_sasl_response(data: bytes) -> bytes:
    return frame(Frontend.PASSWORD, data)
