"""PostgreSQL v3 message types, and decoders from a message body to a typed value.

A *body* is what follows the 5-byte header (type byte + int32 length). Decoders take a
``bytes``/``memoryview`` body and never do I/O. Strings are decoded as UTF-8 with
``surrogateescape`` so that decode-then-encode gives back the exact bytes whatever the
connection's ``client_encoding`` (the glue should still pin ``client_encoding=UTF8`` when it
masks text). Every decoder checks lengths and raises :class:`MalformedMessage` (08P01) on a
body that is truncated or has trailing bytes.

The hot decoder is :func:`decode_data_row`: it returns zero-copy ``memoryview`` slices of the
body (``None`` for SQL NULL) when given a ``memoryview``.

Where the code is: :mod:`proxy.pg.frontend` holds the messages a client sends (type bytes,
values, decoders), :mod:`proxy.pg.backend` those a server sends, and :mod:`proxy.pg.primitives`
what both share (``Buf``, the integer layouts, :class:`MalformedMessage`, the string readers).
This module holds the dispatch tables; every public name of the three is importable from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from proxy.pg.backend import (
    FIELD,
    Auth,
    Authentication,
    Backend,
    BackendKeyData,
    CommandComplete,
    CopyResponse,
    Field,
    NegotiateProtocolVersion,
    Notification,
    decode_authentication,
    decode_backend_key_data,
    decode_command_complete,
    decode_copy_response,
    decode_data_row,
    decode_fields,
    decode_negotiate_protocol_version,
    decode_notification,
    decode_parameter_description,
    decode_parameter_status,
    decode_ready_for_query,
    decode_row_description,
)
from proxy.pg.frontend import (
    Bind,
    Close,
    Describe,
    Execute,
    Frontend,
    FunctionCall,
    Parse,
    Query,
    SASLInitialResponse,
    decode_bind,
    decode_bind_head,
    decode_close,
    decode_copy_fail,
    decode_describe,
    decode_execute,
    decode_function_call,
    decode_parse,
    decode_password,
    decode_query,
    decode_sasl_initial_response,
    decode_sasl_response,
)
from proxy.pg.primitives import (
    ENCODING,
    ERRORS,
    I16,
    I32,
    I32I32,
    U32,
    Buf,
    MalformedMessage,
    as_bytes,
    cstring,
    expect_empty,
)

__all__ = [
    "BACKEND_DECODERS", "EMPTY_BACKEND", "EMPTY_FRONTEND", "ENCODING", "ERRORS", "FIELD", "FRONTEND_DECODERS", "I16",
    "I32", "I32I32", "U32", "Auth", "Authentication", "Backend", "BackendKeyData", "Bind", "Buf", "Close",
    "CommandComplete", "CopyResponse", "Describe", "Execute", "Field", "Frontend", "FunctionCall", "MalformedMessage",
    "NegotiateProtocolVersion", "Notification", "Parse", "Query", "SASLInitialResponse", "as_bytes", "cstring",
    "decode_authentication", "decode_backend_key_data", "decode_bind", "decode_bind_head", "decode_close",
    "decode_command_complete", "decode_copy_fail", "decode_copy_response", "decode_data_row", "decode_describe",
    "decode_execute", "decode_fields", "decode_function_call", "decode_negotiate_protocol_version",
    "decode_notification", "decode_parameter_description", "decode_parameter_status", "decode_parse",
    "decode_password", "decode_query", "decode_ready_for_query", "decode_row_description",
    "decode_sasl_initial_response", "decode_sasl_response", "expect_empty",
]


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
