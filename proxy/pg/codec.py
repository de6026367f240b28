"""PostgreSQL v3 wire protocol: startup parsing, framing and encoders. No I/O.

How this works. A connection starts with one *untyped* packet from the client (int32
length, int32 code, payload): :func:`parse_startup` reads SSLRequest, GSSENCRequest,
CancelRequest or StartupMessage from the front of a buffer. Everything after that is
*typed*: a type byte, an int32 length that counts itself, then the body.

:class:`Framer` splits a byte stream into typed messages. ``feed(chunk)`` returns the buffer
it worked on and a list of frames ``(type, start, end)``: the message occupies
``buf[start:end]`` and its body is ``buf[start + 5:end]``. Frames are contiguous, so the glue
forwards a run of messages it does not need to look at as ONE slice ``buf[a:b]``, and
decodes (with :mod:`proxy.pg.messages`) only the few it cares about. An incomplete message is
kept as a tail and completed by later chunks; chunks are joined only when enough bytes for
the pending message are held, so a large DataRow costs O(size), not O(size²).

With ``coalesce_rows`` (the server side of the relay), a run of consecutive DataRows is ONE
frame ``(rows_frame(n), start, end)``: its type is ``-1 - n`` (so ``<= -2``), and the
lengths of the run were walked in one tight loop without a tuple per row.

Messages whose type is in ``Framer.stream_types`` (e.g. CopyData, or DataRow when no column
needs masking) need not be buffered whole: once such a message is known to be incomplete
and no whole frame came out of the same ``feed``, its bytes are passed on as frames of type
:data:`RAW`, which the glue forwards verbatim.

Encoders build whole messages (header included) as ``bytes``. To mask a DataRow, decode
its cells (memoryview slices of the frame), replace the few that change and pass the list
to :func:`encode_data_row`; unchanged cells are copied once, by the final join. Skip all of
this when no column of the result set needs masking: DataRows then stay in the forwarded run.

Size: this module and :mod:`proxy.pg.messages` are over the usual ~400 lines because the
protocol has ~45 message kinds; each function is small, and splitting further by direction
would scatter the round-trip pairs the tests pin together.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from proxy.pg.messages import (
    ENCODING,
    ERRORS,
    FIELD,
    I16,
    I32,
    I32I32,
    Auth,
    Backend,
    Buf,
    Field,
    Frontend,
    MalformedMessage,
    as_bytes,
    decode_fields,
)

try:
    from proxy.pg import _wire
except ImportError:  # not built: the pure-Python twins run
    _wire = None  # type: ignore[assignment]

HEADER: Final = struct.Struct("!Bi")
HEADER_SIZE: Final = 5
_HEADER_AUTH: Final = struct.Struct("!Bii")
_DATA_ROW_HEADER: Final = struct.Struct("!Bih")
_NULL_CELL: Final = I32.pack(-1)
_i32 = I32.pack

#: frame type of pass-through bytes of a streamed message (see :class:`Framer`)
RAW: Final = -1

MAX_STARTUP_LENGTH: Final = 10000
CLIENT_MAX_MESSAGE: Final = 64 * 1024 * 1024
SERVER_MAX_MESSAGE: Final = 1024 * 1024 * 1024
STREAM_THRESHOLD: Final = 64 * 1024

CANCEL_REQUEST_CODE: Final = 80877102
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
PROTOCOL_3_0: Final = 3 << 16
#: newest protocol minor version the codec speaks; a client asking more gets NegotiateProtocolVersion
SUPPORTED_MINOR: Final = 0

Frame = tuple[int, int, int]


class MessageTooLong(MalformedMessage):
    """A length field below the minimum or above the configured maximum (``length``, as on the
    wire, of a message of type ``msg_type``; -1 for a start-up packet)."""

    def __init__(self, message: str, *, length: int = 0, msg_type: int = -1) -> None:
        super().__init__(message)
        self.length = length
        self.msg_type = msg_type


class UnsupportedProtocol(MalformedMessage):
    """A startup packet asking for a protocol major version other than 3."""

    sqlstate = "0A000"


def _enc(s: str) -> bytes:
    return s.encode(ENCODING, ERRORS)


def _cstr(s: str) -> bytes:
    return s.encode(ENCODING, ERRORS) + b"\0"


# ---- startup phase -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    key: bytes  # 4 bytes in protocol 3.0, up to 256 in 3.2


@dataclass(frozen=True, slots=True)
class StartupMessage:
    major: int
    minor: int
    params: dict[str, str] = field(default_factory=dict)

    @property
    def user(self) -> str | None:
        return self.params.get("user")

    @property
    def protocol_options(self) -> tuple[str, ...]:
        """``_pq_.*`` parameters: options the glue must list in NegotiateProtocolVersion."""
        return tuple(k for k in self.params if k.startswith("_pq_."))

    @property
    def needs_negotiation(self) -> bool:
        return self.minor > SUPPORTED_MINOR or bool(self.protocol_options)


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def looks_like_tls(buf: Buf) -> bool:
    """True when a connection opens with a TLS handshake record (PostgreSQL 17 direct SSL)."""
    return len(buf) > 0 and buf[0] == 0x16


def parse_startup(buf: Buf, max_length: int = MAX_STARTUP_LENGTH) -> tuple[StartupPacket, int] | None:
    """Read one untyped startup packet from the front of ``buf``.

    Returns ``(packet, bytes consumed)``, or ``None`` when more bytes are needed. Raises
    :class:`MessageTooLong` for a length outside 8..max_length, :class:`UnsupportedProtocol`
    for a major version other than 3 and :class:`MalformedMessage` for anything else wrong.
    """
    if len(buf) < 4:
        return None
    (length,) = I32.unpack_from(buf, 0)
    if length < 8 or length > max_length:
        raise MessageTooLong(f"invalid length of startup packet: {length}")
    if len(buf) < length:
        return None
    raw = as_bytes(buf[:length])
    (code,) = I32.unpack_from(raw, 4)
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if length != 8:
            raise MalformedMessage("malformed SSLRequest/GSSENCRequest: length must be 8")
        return (SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()), length
    if code == CANCEL_REQUEST_CODE:
        if not 16 <= length <= 12 + 256:
            raise MalformedMessage(f"malformed CancelRequest: length {length}")
        return CancelRequest(I32.unpack_from(raw, 8)[0], raw[12:]), length
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise UnsupportedProtocol(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.{SUPPORTED_MINOR}"
        )
    if raw[-1] != 0:
        raise MalformedMessage("malformed StartupMessage: missing terminator")
    parts = raw[8:-1].split(b"\0")
    if len(parts) % 2 != 1 or parts[-1] != b"":
        raise MalformedMessage("malformed StartupMessage: parameter without a value")
    params: dict[str, str] = {}
    for i in range(0, len(parts) - 1, 2):
        if not parts[i]:
            raise MalformedMessage("malformed StartupMessage: empty parameter name")
        params[parts[i].decode(ENCODING, ERRORS)] = parts[i + 1].decode(ENCODING, ERRORS)
    return StartupMessage(major, minor, params), length


def encode_startup(params: Mapping[str, str], minor: int = 0) -> bytes:
    body = b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return I32I32.pack(len(body) + 8, PROTOCOL_3_0 | minor) + body


def encode_ssl_request() -> bytes:
    return I32I32.pack(8, SSL_REQUEST_CODE)


def encode_gssenc_request() -> bytes:
    return I32I32.pack(8, GSSENC_REQUEST_CODE)


def encode_cancel_request(pid: int, key: bytes) -> bytes:
    return I32I32.pack(12 + len(key), CANCEL_REQUEST_CODE) + _i32(pid) + key


# ---- framing -------------------------------------------------------------------------


def rows_frame(count: int) -> int:
    """The frame type of a run of ``count`` DataRows (see :class:`Framer` ``coalesce_rows``)."""
    return -1 - count


def split(buf: Buf, pos: int, max_length: int, out: list[Frame], coalesce_rows: bool = False) -> tuple[int, int]:
    """Append the complete messages of ``buf[pos:]`` to ``out`` as ``(type, start, end)``.

    Returns ``(consumed, need)``: the offset of the first byte not consumed, and how many
    bytes the message starting there occupies once whole (5 while its header is incomplete).
    With ``coalesce_rows``, consecutive DataRows become ONE frame of type ``rows_frame(n)``.
    Runs in C (:mod:`proxy.pg._wire`) when it is built; :func:`py_split` is its twin.
    """
    if _wire is None:
        return py_split(buf, pos, max_length, out, coalesce_rows)
    consumed, need, bad = _wire.split(buf, pos, max_length, out, coalesce_rows)
    if bad >= 0:
        raise MessageTooLong(f"invalid message length {need} for type {chr(bad)!r}", length=need, msg_type=bad)
    return consumed, need


def py_split(buf: Buf, pos: int, max_length: int, out: list[Frame], coalesce_rows: bool = False) -> tuple[int, int]:
    """The pure-Python :func:`split`."""
    end = len(buf)
    unpack = HEADER.unpack_from
    length_at = I32.unpack_from
    append = out.append
    while end - pos >= HEADER_SIZE:
        msg_type, length = unpack(buf, pos)
        if length < 4 or length > max_length:
            raise MessageTooLong(f"invalid message length {length} for type {chr(msg_type)!r}", length=length,
                                 msg_type=msg_type)
        stop = pos + 1 + length
        if stop > end:
            return pos, 1 + length
        if msg_type == 0x44 and coalesce_rows:  # DataRow: walk the run's lengths, one frame
            start = pos
            count = 1
            pos = stop
            while end - pos >= HEADER_SIZE and buf[pos] == 0x44:
                (length,) = length_at(buf, pos + 1)
                if length < 4 or length > max_length:
                    raise MessageTooLong(f"invalid message length {length} for type 'D'", length=length, msg_type=0x44)
                stop = pos + 1 + length
                if stop > end:
                    break
                count += 1
                pos = stop
            append((-1 - count, start, pos))
            continue
        append((msg_type, pos, stop))
        pos = stop
    return pos, HEADER_SIZE


class Framer:
    """Incremental splitter of a typed message stream; see the module docstring.

    ``max_length`` (counting the length field, as on the wire) and ``stream_types`` are plain
    attributes: the glue may change them between feeds (e.g. 64 KiB during authentication).
    """

    __slots__ = ("_held", "_need", "_skip", "_tail", "coalesce_rows", "max_length", "stream_threshold", "stream_types")

    def __init__(
        self,
        max_length: int = CLIENT_MAX_MESSAGE,
        *,
        stream_types: frozenset[int] = frozenset(),
        stream_threshold: int = STREAM_THRESHOLD,
        coalesce_rows: bool = False,
    ) -> None:
        self.max_length = max_length
        self.coalesce_rows = coalesce_rows
        self.stream_types = stream_types
        self.stream_threshold = stream_threshold
        self._tail: list[bytes] = []
        self._held = 0
        self._need = HEADER_SIZE
        self._skip = 0  # bytes of a streamed message still to pass through

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a message."""
        return self._held

    @property
    def idle(self) -> bool:
        """No message is half-way: the next chunk starts at a message boundary."""
        return not self._held and not self._skip

    def feed(self, data: bytes) -> tuple[bytes, list[Frame]]:
        """Split ``data`` (after any held tail); frames index into the returned buffer."""
        frames: list[Frame] = []
        pos = 0
        if self._skip:
            pos = min(self._skip, len(data))
            self._skip -= pos
            if pos:
                frames.append((RAW, 0, pos))
            buf = data
        elif self._tail:
            self._tail.append(data)
            self._held += len(data)
            if self._held < self._need:
                return self._stream_tail()
            buf = b"".join(self._tail)
            self._tail, self._held = [], 0
        else:
            buf = data
        consumed, need = split(buf, pos, self.max_length, frames, self.coalesce_rows)
        rest = len(buf) - consumed
        if rest:
            # Stream only when no whole message came out of this feed: the glue may change
            # stream_types after acting on those messages (a RowDescription, say).
            if (not frames or frames[-1][0] == RAW) and self._streamable(buf[consumed], rest, need):
                self._skip = need - rest
                frames.append((RAW, consumed, len(buf)))
            else:
                self._tail, self._held, self._need = [buf[consumed:]], rest, need
        return buf, frames

    def _streamable(self, msg_type: int, held: int, need: int) -> bool:
        return held >= HEADER_SIZE and need >= self.stream_threshold and msg_type in self.stream_types

    def _stream_tail(self) -> tuple[bytes, list[Frame]]:
        """Pass the held part of an incomplete streamable message through as RAW."""
        if not self._streamable(self._tail[0][0], self._held, self._need):
            return b"", []
        buf = b"".join(self._tail)
        self._skip = self._need - self._held
        self._tail, self._held, self._need = [], 0, HEADER_SIZE
        return buf, [(RAW, 0, len(buf))]


# ---- encoders ------------------------------------------------------------------------


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
