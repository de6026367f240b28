"""The untyped packets that open a PostgreSQL connection: reading and writing them. No I/O.

A connection starts with one *untyped* packet from the client (int32 length, int32 code,
payload): :func:`parse_startup` reads SSLRequest, GSSENCRequest, CancelRequest or
StartupMessage from the front of a buffer. Everything after that is typed (see
:mod:`proxy.pg.framer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from proxy.pg.primitives import (
    ENCODING,
    ERRORS,
    I32,
    I32I32,
    Buf,
    MalformedMessage,
    MessageTooLong,
    _cstr,
    _i32,
    as_bytes,
)

MAX_STARTUP_LENGTH: Final = 10000

CANCEL_REQUEST_CODE: Final = 80877102
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
PROTOCOL_3_0: Final = 3 << 16
#: newest protocol minor version the codec speaks; a client asking more gets NegotiateProtocolVersion
SUPPORTED_MINOR: Final = 0


class UnsupportedProtocol(MalformedMessage):
    """A startup packet asking for a protocol major version other than 3."""

    sqlstate = "0A000"


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
