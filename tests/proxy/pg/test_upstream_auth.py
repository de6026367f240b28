"""What hoop sends a server that asks for the held password: never cleartext or md5 to a server it has not
authenticated, and no login without SCRAM's server proof.

The "server" is a small asyncio fake on a loopback port that plays an impostor between hoop and the
database (it refuses TLS, then asks for a password) and records every byte hoop sends it."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from broker.config import PostgresResource
from broker.errors import UpstreamError
from proxy.pg import codec, upstream
from proxy.pg.messages import Auth

SECRET = "held-upstream-password-7f3a"


class Impostor:
    """Answers SSLRequest with N, reads the startup packet, then plays ``script(writer)``; keeps what hoop sent."""

    def __init__(self, script: Callable[[asyncio.StreamWriter], None]) -> None:
        self.script = script
        self.received = b""
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(8)
            if struct.unpack("!ii", head)[1] == 80877103:  # SSLRequest
                writer.write(b"N")
                head = await reader.readexactly(4)
                await reader.readexactly(struct.unpack("!i", head)[0] - 4)
            else:
                await reader.readexactly(struct.unpack("!i", head[:4])[0] - 8)
            self.script(writer)
            await writer.drain()
            async with asyncio.timeout(1.0):
                while chunk := await reader.read(4096):
                    self.received += chunk
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Impostor:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def _resource(port: int, **extra: Any) -> PostgresResource:
    return PostgresResource.model_validate({"name": "db", "kind": "postgres", "address": f"127.0.0.1:{port}",
                                            "credential": {"env": "X"}, **extra})


def _ask(code: int) -> Callable[[asyncio.StreamWriter], None]:
    def play(writer: asyncio.StreamWriter) -> None:
        writer.write(codec.encode_auth_md5(b"\1\2\3\4") if code == Auth.MD5_PASSWORD else codec.encode_auth(code))
    return play


@pytest.fixture(params=[Auth.CLEARTEXT_PASSWORD, Auth.MD5_PASSWORD], ids=["cleartext", "md5"])
async def asking(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Impostor, str]]:
    async with Impostor(_ask(request.param)) as fake:
        yield fake, "cleartext" if request.param == Auth.CLEARTEXT_PASSWORD else "md5"


@pytest.mark.parametrize("sslmode", ["disable", "prefer", "require"])
async def test_no_password_to_a_server_hoop_has_not_authenticated(asking: tuple[Impostor, str], sslmode: str) -> None:
    fake, how = asking
    if sslmode == "require":  # the impostor refuses TLS: require stops before any password question
        with pytest.raises(UpstreamError, match="does not accept TLS"):
            await upstream.connect(_resource(fake.port, sslmode=sslmode), "hoop", SECRET, {})
        return
    with pytest.raises(UpstreamError) as exc:
        await upstream.connect(_resource(fake.port, sslmode=sslmode), "hoop", SECRET, {})
    assert f"asked for {how} password authentication" in exc.value.message
    assert "insecure_password_auth" in exc.value.message and SECRET not in exc.value.message
    await asyncio.sleep(0.05)
    assert fake.received == b""  # not a byte after the startup packet: no password message


async def test_insecure_password_auth_is_an_explicit_choice(asking: tuple[Impostor, str]) -> None:
    fake, how = asking
    with pytest.raises(UpstreamError):  # the fake never says AuthenticationOk: the login itself fails
        await asyncio.wait_for(upstream.connect(_resource(fake.port, insecure_password_auth=True), "hoop",
                                                SECRET, {}), 3)
    assert fake.received[:1] == b"p"  # the password message went out, as configured
    assert (SECRET.encode() in fake.received) is (how == "cleartext")


async def test_a_login_without_scram_proof_is_refused() -> None:
    def sasl_then_ok(writer: asyncio.StreamWriter) -> None:
        writer.write(codec.encode_auth_sasl(["SCRAM-SHA-256"]) + codec.AUTH_OK + codec.encode_ready_for_query())

    async with Impostor(sasl_then_ok) as fake:
        with pytest.raises(UpstreamError, match="ended SCRAM without proving it knows the password"):
            await upstream.connect(_resource(fake.port), "hoop", SECRET, {})
