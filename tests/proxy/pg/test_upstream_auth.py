"""What hoop sends a server that asks for the held password: never cleartext or md5 to a server it has not
authenticated, and no login without SCRAM's server proof.

The "server" is a small asyncio fake on a loopback port that plays an impostor between hoop and the
database (it refuses TLS, then asks for a password) and records every byte hoop sends it. The last tests
log in to a real PostgreSQL with each method it offers: trust, password and md5 (SCRAM is every other
test's)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker.config import PostgresResource
from broker.errors import UpstreamError
from proxy.pg import codec, upstream
from proxy.pg.messages import Auth
from tests.proxy.pg.harness import running_hoop, seeded_database
from tests.support.certs import Pki, make_pki
from tests.support.pgcluster import PgCluster, pg_cluster

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


# ---- a real PostgreSQL asking for trust, password and md5 --------------------------------------------------

_HBA = "\n".join(f"host all hoop_{method} 127.0.0.1/32 {method}" for method in ("trust", "password", "md5"))


@pytest.fixture(scope="module")
def methods_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PgCluster, Pki, str]]:
    """A cluster (with TLS) whose pg_hba asks the roles hoop_trust, hoop_password and hoop_md5 for their
    methods; hoop_md5's password is stored as md5, or PostgreSQL would use SCRAM in its place."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    with pg_cluster(tls=(pki.server_cert, pki.server_key), hba_extra=_HBA) as pg:
        db = seeded_database(pg)
        pw = pg.password.replace("'", "''")
        pg.psql(f"CREATE ROLE hoop_trust LOGIN; CREATE ROLE hoop_password LOGIN PASSWORD '{pw}'; "
                f"SET password_encryption = 'md5'; CREATE ROLE hoop_md5 LOGIN PASSWORD '{pw}'")
        pg.psql("GRANT SELECT ON users TO hoop_trust, hoop_password, hoop_md5", database=db)
        assert pg.psql("SELECT rolpassword LIKE 'md5%' FROM pg_authid WHERE rolname = 'hoop_md5'") == "t"
        yield pg, pki, db


@pytest.mark.postgres
@pytest.mark.parametrize(("method", "extra"), [
    ("trust", {}),
    ("password", {"insecure_password_auth": True}),
    ("md5", {"insecure_password_auth": True}),
    ("password", {"sslmode": "verify-full"}),  # a server hoop has authenticated may have the password
    ("md5", {"sslmode": "verify-full"}),
], ids=["trust", "password", "md5", "password-verify-full", "md5-verify-full"])
async def test_hoop_logs_in_with_each_method_postgresql_asks_for(methods_pg: tuple[PgCluster, Pki, str],
                                                                 tmp_path: Path, method: str,
                                                                 extra: dict[str, Any]) -> None:
    pg, pki, db = methods_pg
    if extra.get("sslmode") == "verify-full":
        extra = {**extra, "sslrootcert": str(pki.ca_cert)}
    async with running_hoop(pg, db, tmp_path, user=f"hoop_{method}", **extra) as hoop:
        conn = await asyncpg.connect(hoop.dsn())
        try:
            assert await conn.fetchval("SELECT current_user") == f"hoop_{method}"
            assert await conn.fetchval("SELECT count(*) FROM users") == 50
        finally:
            await conn.close()


@pytest.mark.postgres
@pytest.mark.parametrize("method", ["password", "md5"])
async def test_a_wrong_held_password_is_08006_without_it(methods_pg: tuple[PgCluster, Pki, str], tmp_path: Path,
                                                         method: str) -> None:
    pg, _, db = methods_pg
    async with running_hoop(pg, db, tmp_path, user=f"hoop_{method}", insecure_password_auth=True) as hoop:
        hoop.proxy.environ = {"PGPW": "wrong-held-password"}
        hoop.proxy.credentials.environ = hoop.proxy.environ  # type: ignore[attr-defined]
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(hoop.dsn())
        assert info.value.sqlstate == "08006" and "wrong-held-password" not in str(info.value)
