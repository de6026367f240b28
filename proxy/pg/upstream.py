"""Set-up phase I/O and the upstream connection: connect, TLS, authenticate, hand over.

How this works. Both sides of a proxied connection start in :class:`Reader`, a tiny
``asyncio.Protocol`` whose coroutines wait for a startup packet or a whole typed message.
Set-up (TLS, startup, SCRAM) is written as straight-line async code over it. Once both sides
are ready, the relay swaps in its own protocols with ``transport.set_protocol`` and takes any
bytes the Reader still holds, so the hot path never goes through a coroutine.

:func:`connect` logs hoop in to the resource with the held credential: trust, cleartext
password, md5 and SCRAM-SHA-256 (with tls-server-end-point channel binding over TLS), and
``sslmode`` disable / prefer / require / verify-full. Cleartext and md5 are answered only over
``verify-full`` TLS or with ``insecure_password_auth: true``, and a SCRAM exchange must end with
the server's proof. Every failure is an :class:`~broker.errors.UpstreamError` (08006) whose
message never contains the password.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

from broker.config import PostgresResource
from broker.errors import ConfigError, UpstreamError
from broker.model import Grant
from proxy.certs import file_error
from proxy.pg import codec
from proxy.pg.messages import (
    Auth,
    Backend,
    MalformedMessage,
    decode_authentication,
    decode_backend_key_data,
    decode_fields,
    decode_parameter_status,
)
from proxy.pg.scram import ScramClient, md5_password, tls_server_end_point

SETUP_MAX_MESSAGE = 64 * 1024


class Reader(asyncio.Protocol):
    """Buffers bytes during set-up; coroutines wait for whole packets."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _more(self) -> None:
        if self.closed:
            raise ConnectionResetError("peer closed the connection")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def startup(self) -> codec.StartupPacket:
        """The next untyped startup packet (raises MalformedMessage on a bad one)."""
        while True:
            got = codec.parse_startup(self.buf)
            if got is not None:
                del self.buf[: got[1]]
                return got[0]
            await self._more()

    async def message(self, max_length: int = SETUP_MAX_MESSAGE) -> tuple[int, bytes]:
        """The next typed message as ``(type, body)``."""
        while True:
            if len(self.buf) >= 5:
                msg_type, length = codec.HEADER.unpack_from(self.buf, 0)
                if length < 4 or length > max_length:
                    raise codec.MessageTooLong(f"invalid message length {length}")
                if len(self.buf) >= 1 + length:
                    body = bytes(self.buf[5 : 1 + length])
                    del self.buf[: 1 + length]
                    return msg_type, body
            await self._more()

    async def byte(self) -> int:
        while not self.buf:
            await self._more()
        b = self.buf[0]
        del self.buf[:1]
        return b

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class UpstreamCredentials(Protocol):
    """Who hoop logs in as upstream for a grant (static; ephemeral roles plug in here)."""

    async def for_grant(self, resource: PostgresResource, grant: Grant | None) -> tuple[str, str]: ...


@dataclass
class StaticCredentials:
    """The resource's configured user and its held secret, resolved at connect time."""

    environ: Mapping[str, str]

    async def for_grant(self, resource: PostgresResource, grant: Grant | None) -> tuple[str, str]:
        if resource.credential is None:
            return resource.user, ""
        try:
            return resource.user, resource.credential.resolve(self.environ)
        except ConfigError as exc:  # names the reference (env:NAME, file:PATH) and why, never a value
            raise UpstreamError(f"the upstream credential of {resource.name} is not available: {exc.message}") \
                from None
        except Exception:
            raise UpstreamError(f"the upstream credential of {resource.name} is not available") from None


@dataclass
class Upstream:
    """An authenticated upstream connection, ready for the relay."""

    transport: asyncio.Transport
    reader: Reader
    pid: int
    key: bytes
    params: dict[str, str] = field(default_factory=dict)  # ParameterStatus, in arrival order
    status: str = "I"
    address: tuple[str, int] = ("", 0)
    tls: ssl.SSLContext | None = None


def client_tls(resource: PostgresResource) -> ssl.SSLContext | None:
    """The client TLS context for ``sslmode`` (None for disable). An ``sslrootcert`` that cannot be loaded is
    a :class:`ConfigError` naming the resource and the file."""
    if resource.sslmode == "disable":
        return None
    if resource.sslmode == "verify-full":
        try:
            return ssl.create_default_context(cafile=str(resource.sslrootcert) if resource.sslrootcert else None)
        except (OSError, ssl.SSLError) as exc:  # missing, unreadable, no PEM certificate in it
            raise ConfigError(f"resources.{resource.name}.sslrootcert: cannot load {resource.sslrootcert}: "
                              f"{file_error(exc)}") from None
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def open_transport(resource: PostgresResource) -> tuple[asyncio.Transport, Reader, ssl.SSLContext | None]:
    """TCP connect, then negotiate TLS as ``sslmode`` asks."""
    loop = asyncio.get_running_loop()
    host, port = resource.host_port(5432)
    ctx = client_tls(resource)  # (first: a bad sslrootcert once escaped as an OSError and left the socket open)
    try:
        transport, reader = await loop.create_connection(Reader, host, port)
    except OSError as exc:
        raise UpstreamError(f"cannot reach {resource.name} ({exc.strerror or type(exc).__name__})") from None
    if ctx is None:
        return transport, reader, None
    try:
        reader.write(codec.encode_ssl_request())
        answer = await reader.byte()
        if answer == ord("S"):
            new = await loop.start_tls(transport, reader, ctx, server_hostname=host)
            assert new is not None
            reader.transport = new  # writes must now go through TLS
            return reader.transport, reader, ctx
    except (OSError, ssl.SSLError, ConnectionResetError) as exc:
        transport.close()
        raise UpstreamError(f"TLS with {resource.name} failed: {type(exc).__name__}") from None
    except asyncio.CancelledError:  # (a caller's timeout: the socket must not outlive it)
        transport.close()
        raise
    if resource.sslmode in ("require", "verify-full"):
        transport.close()
        raise UpstreamError(f"{resource.name} does not accept TLS but sslmode is {resource.sslmode}")
    return transport, reader, None


def _may_send_password(resource: PostgresResource, ctx: ssl.SSLContext | None, how: str) -> None:
    """Cleartext and md5 give the held password (or a hash to crack offline) to whoever answers, so hoop
    sends them only to a server it has authenticated (``sslmode: verify-full``), or when the resource
    says ``insecure_password_auth: true``. SCRAM never needs this: it does not reveal the password."""
    if resource.insecure_password_auth or (ctx is not None and resource.sslmode == "verify-full"):
        return
    raise UpstreamError(f"{resource.name} asked for {how} password authentication, which would expose the held "
                        f"password to anything between hoop and the database; use SCRAM (password_encryption = "
                        f"scram-sha-256), or sslmode: verify-full, or set insecure_password_auth: true on the resource")


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "[secret]") if secret else text


async def connect(resource: PostgresResource, user: str, password: str, params: Mapping[str, str]) -> Upstream:
    """Log in to ``resource`` as ``user``; returns after the first ReadyForQuery."""
    transport, reader, ctx = await open_transport(resource)
    try:
        startup = {"user": user, "database": resource.database, **params}
        reader.write(codec.encode_startup(startup))
        scram: ScramClient | None = None
        up = Upstream(transport, reader, 0, b"", address=resource.host_port(5432), tls=ctx)
        while True:
            msg_type, body = await reader.message(1024 * 1024)
            if msg_type == Backend.AUTHENTICATION:
                auth = decode_authentication(body)
                if auth.code == Auth.OK:
                    if scram is not None and scram.state != "done":  # (a server that skipped SASLFinal)
                        raise UpstreamError(f"{resource.name} ended SCRAM without proving it knows the password")
                    continue
                if auth.code in (Auth.CLEARTEXT_PASSWORD, Auth.MD5_PASSWORD):
                    _may_send_password(resource, ctx, "cleartext" if auth.code == Auth.CLEARTEXT_PASSWORD else "md5")
                    reader.write(codec.encode_password(password if auth.code == Auth.CLEARTEXT_PASSWORD
                                                       else md5_password(user, password, auth.salt)))
                elif auth.code == Auth.SASL:
                    binding = None
                    ssl_object = transport.get_extra_info("ssl_object")
                    if ssl_object is not None:
                        der = ssl_object.getpeercert(binary_form=True)
                        binding = tls_server_end_point(der) if der else None
                    scram = ScramClient(password, offered=auth.mechanisms, channel_binding=binding)
                    reader.write(codec.encode_sasl_initial_response(scram.mechanism, scram.client_first()))
                elif auth.code == Auth.SASL_CONTINUE and scram is not None:
                    reader.write(codec.encode_sasl_response(scram.handle_server_first(auth.data)))
                elif auth.code == Auth.SASL_FINAL and scram is not None:
                    scram.handle_server_final(auth.data)
                else:
                    raise UpstreamError(f"{resource.name} asked for an unsupported authentication ({auth.code})")
            elif msg_type == Backend.ERROR_RESPONSE:
                fields = decode_fields(body)
                raise UpstreamError(f"{resource.name} refused the connection: {_scrub(fields.get('M', ''), password)}")
            elif msg_type == Backend.PARAMETER_STATUS:
                name, value = decode_parameter_status(body)
                up.params[name] = value
            elif msg_type == Backend.BACKEND_KEY_DATA:
                key = decode_backend_key_data(body)
                up.pid, up.key = key.pid, key.key
            elif msg_type == Backend.READY_FOR_QUERY:
                up.status = chr(body[0]) if body else "I"
                return up
            # NoticeResponse and NegotiateProtocolVersion during start-up need no answer
    except UpstreamError:
        transport.close()
        raise
    except (MalformedMessage, ConnectionResetError, OSError) as exc:
        transport.close()
        raise UpstreamError(f"{resource.name} broke off the login ({type(exc).__name__})") from None
    except Exception as exc:  # ScramError and friends: never let a secret-bearing message through
        transport.close()
        raise UpstreamError(f"login to {resource.name} failed ({type(exc).__name__})") from None


async def simple_query(up: Upstream, sql: str) -> list[tuple[str | None, ...]]:
    """Run one query on a set-up connection still in :class:`Reader` mode; text rows."""
    from proxy.pg.messages import decode_data_row

    up.reader.write(codec.encode_query(sql))
    rows: list[tuple[str | None, ...]] = []
    error: str | None = None
    while True:
        msg_type, body = await up.reader.message(64 * 1024 * 1024)
        if msg_type == Backend.DATA_ROW:
            rows.append(tuple(None if c is None else bytes(c).decode() for c in decode_data_row(body)))
        elif msg_type == Backend.ERROR_RESPONSE:
            error = decode_fields(body).get("M", "error")
        elif msg_type == Backend.READY_FOR_QUERY:
            if error is not None:
                raise UpstreamError(f"catalog query failed: {error}")
            return rows


async def cancel(resource: PostgresResource, pid: int, key: bytes, *, timeout: float = 5.0) -> None:
    """Send a CancelRequest for upstream backend ``pid`` (TLS if sslmode asks). Reaching the server is bounded
    by ``timeout`` too: a host that drops the connect, or stalls its TLS answer, would otherwise hold the end
    of a session (and hoop's stop, which waits for it) for the kernel's connect timeout, about 2 min."""
    try:
        async with asyncio.timeout(timeout):
            transport, reader, _ = await open_transport(resource)
    except TimeoutError:
        raise UpstreamError(f"cannot reach {resource.name} to cancel a statement (no answer within "
                            f"{timeout:g} s)") from None
    try:
        reader.write(codec.encode_cancel_request(pid, key))
        async with asyncio.timeout(timeout):
            while not reader.closed:
                await reader._more()
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        transport.close()
