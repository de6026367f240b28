"""A raw PostgreSQL client's first steps, for tests that look at what hoop's proxy says before a login:
the TLS upgrade after an SSLRequest, and the authentication method asked for."""

from __future__ import annotations

import asyncio
import ssl

from proxy.pg import codec
from proxy.pg.backend import decode_authentication
from proxy.pg.messages import Backend


async def start_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """SSLRequest, then TLS without checking the proxy's (self-signed) certificate."""
    writer.write(codec.encode_ssl_request())
    assert await reader.readexactly(1) == b"S"
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    await writer.start_tls(ctx)


async def auth_asked(port: int, login: str, *, tls: bool, database: str = "prod-db") -> int:
    """The authentication method (``Authentication*`` code) the proxy on ``port`` asks ``login`` for."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if tls:
            await start_tls(reader, writer)
        writer.write(codec.encode_startup({"user": login, "database": database}))
        msg_type, length = codec.HEADER.unpack(await reader.readexactly(5))
        assert msg_type == Backend.AUTHENTICATION
        return decode_authentication(await reader.readexactly(length - 4)).code
    finally:
        writer.close()
