"""Who gets in, who is thrown out: client auth, TLS, cancel, deadline, revocation, reviews."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import ssl
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.clock import FakeClock
from broker.events import ReviewRequested
from proxy.pg.messages import Auth
from tests.proxy.pg.harness import OPS, ROOT, Hoop, running_hoop, seeded_database
from tests.support.certs import make_pki
from tests.support.pgcluster import PgCluster
from tests.support.pgwire import auth_asked, start_tls

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pgdb(pg: PgCluster) -> str:
    return seeded_database(pg)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def hoop(pg: PgCluster, pgdb: str, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Hoop]:
    async with running_hoop(pg, pgdb, tmp_path, clock=clock) as h:
        yield h


async def _refusal(dsn: str) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as info:
        conn = await asyncpg.connect(dsn)
        await conn.close()
    return info.value


async def test_wrong_unknown_other_resource_expired_revoked(hoop: Hoop, clock: FakeClock) -> None:
    wrong = await _refusal(hoop.dsn(secret="hoop_wrong"))
    assert wrong.sqlstate == "28P01" and "password authentication failed" in str(wrong)
    unknown = await _refusal(hoop.dsn(login="nobody.abcde"))
    assert unknown.sqlstate == "28P01" and str(unknown).replace("nobody.abcde", "X") == \
        str(wrong).replace(hoop.grant.login, "X")
    other = await _refusal(hoop.dsn(database="other-db"))
    assert other.sqlstate == "28000" and "other-db" in str(other)
    clock.advance(timedelta(hours=2))
    expired = await _refusal(hoop.dsn())
    assert expired.sqlstate == "28000" and "expired" in str(expired)
    clock.advance(timedelta(hours=-2))
    await hoop.service.revoke(hoop.grant.id, ROOT, "done")
    revoked = await _refusal(hoop.dsn())
    assert revoked.sqlstate == "28000" and "revoked" in str(revoked)
    for err in (wrong, unknown, other, expired, revoked):
        assert hoop.secret not in str(err) and hoop.cluster.password not in str(err)


async def test_psql_over_tls_with_scram_channel_binding(hoop: Hoop) -> None:
    env_out = await hoop.psql("-c", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert env_out.returncode == 0  # plain works too
    proc = await asyncio.create_subprocess_exec(
        str(hoop.cluster.bindir / "psql"), "-X", "-At", "-c", "SELECT 7",
        env={**hoop.env(), "PGSSLMODE": "require", "PGCHANNELBINDING": "require"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert out.decode().strip() == "7"


async def _served_certificate(port: int) -> bytes:
    """The DER certificate hoop presents after an SSLRequest."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await start_tls(reader, writer)
        tls = writer.get_extra_info("ssl_object")
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return bytes(der)
    finally:
        writer.close()


async def test_the_configured_certificate_is_served(pg: PgCluster, pgdb: str, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key)}
    async with running_hoop(pg, pgdb, tmp_path, config_extra={"tls": tls}) as h:
        proc = await asyncio.create_subprocess_exec(
            str(h.cluster.bindir / "psql"), "-X", "-At", "-c", "SELECT 7",
            env={**h.env(), "PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(pki.ca_cert)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err  # verified against the test CA, for the name 127.0.0.1
        assert out.decode().strip() == "7"
        served = await _served_certificate(h.port)
    assert served == x509.load_pem_x509_certificate(pki.server_cert.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    assert not (tmp_path / "state" / "pg-tls.crt").exists()  # nothing generated


async def test_without_a_configured_pair_a_generated_one_is_kept_and_its_fingerprint_logged(
        pg: PgCluster, pgdb: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="proxy.pg.tls"):
        async with running_hoop(pg, pgdb, tmp_path) as h:
            first = await _served_certificate(h.port)
        async with running_hoop(pg, pgdb, tmp_path) as h:  # a restart serves the same pair
            assert await _served_certificate(h.port) == first
    digest = hashlib.sha256(first).hexdigest()
    fingerprint = "SHA256:" + ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
    assert f"PostgreSQL proxy TLS certificate fingerprint {fingerprint}" in caplog.text
    assert caplog.text.count("generated a self-signed certificate") == 1


async def _auth_asked(h: Hoop, *, tls: bool) -> int:
    """The authentication method hoop asks a client for, on plain TCP or inside TLS."""
    return await auth_asked(h.port, h.grant.login, tls=tls)


async def test_cleartext_only_inside_tls(pg: PgCluster, pgdb: str, tmp_path: Path) -> None:
    async with running_hoop(pg, pgdb, tmp_path) as h:
        assert await _auth_asked(h, tls=True) == Auth.SASL  # SCRAM by default, also inside TLS
        h.proxy.allow_cleartext = True
        assert await _auth_asked(h, tls=True) == Auth.CLEARTEXT_PASSWORD
        assert await _auth_asked(h, tls=False) == Auth.SASL  # never a cleartext password on plain TCP
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = await asyncpg.connect(h.dsn().replace("?sslmode=disable", ""), ssl=ctx)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        conn = await asyncpg.connect(h.dsn())  # no TLS: SCRAM, the secret never crosses the wire
        assert await conn.fetchval("SELECT 2") == 2
        await conn.close()


async def test_upstream_failure_is_08006_without_the_secret(pg: PgCluster, pgdb: str, tmp_path: Path) -> None:
    async with running_hoop(pg, pgdb, tmp_path) as h:
        h.proxy.environ = {"PGPW": "not-the-password"}
        h.proxy.credentials.environ = h.proxy.environ  # type: ignore[attr-defined]
        err = await _refusal(h.dsn())
        assert err.sqlstate == "08006" and "not-the-password" not in str(err)


async def test_ctrl_c_cancels_upstream(hoop: Hoop) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(hoop.cluster.bindir / "psql"), "-X", "-At", "-c", "SELECT pg_sleep(30)", env=hoop.env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(1.0)  # let the query start upstream
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(10):
        _, err = await proc.communicate()
    assert "canceling statement due to user request" in err.decode()


async def test_session_cut_at_deadline(hoop: Hoop, clock: FakeClock) -> None:
    clock.set(hoop.grant.expires_at - timedelta(seconds=1.5))
    conn = await asyncpg.connect(hoop.dsn())
    try:
        assert await conn.fetchval("SELECT 1") == 1
        with pytest.raises((asyncpg.PostgresError, asyncpg.exceptions.ConnectionDoesNotExistError, OSError)) as info:
            await conn.fetchval("SELECT pg_sleep(5)")
    finally:
        await conn.close()
    assert "expired" in str(info.value) or isinstance(info.value, asyncpg.exceptions.ConnectionDoesNotExistError)
    await asyncio.sleep(0.1)
    closes = await hoop.events("close")
    assert closes and closes[-1]["reason"] == "access expired"


async def test_revocation_closes_live_session(hoop: Hoop) -> None:
    conn = await asyncpg.connect(hoop.dsn())
    try:
        task = asyncio.create_task(conn.fetchval("SELECT pg_sleep(5)"))
        await asyncio.sleep(0.3)
        await hoop.service.revoke(hoop.grant.id, ROOT, "incident over")
        with pytest.raises((asyncpg.PostgresError, asyncpg.exceptions.ConnectionDoesNotExistError)) as info:
            await task
        assert "revoked" in str(info.value) or isinstance(info.value, asyncpg.exceptions.ConnectionDoesNotExistError)
    finally:
        await conn.close()


async def test_review_holds_then_runs_or_refuses(hoop: Hoop) -> None:
    conn = await asyncpg.connect(hoop.dsn())
    try:
        await conn.execute("CREATE TEMP TABLE r (a int); INSERT INTO r VALUES (1), (2)")
        for allow, expected in ((True, "DELETE 1"), (False, None)):
            task = asyncio.create_task(conn.execute("DELETE FROM r WHERE a = 1" if allow else "DELETE FROM r"))
            for _ in range(100):
                pending = [e for e in hoop.notifier.events if isinstance(e, ReviewRequested)
                           and e.review.status == "pending" and not getattr(e, "_seen", False)]
                if pending:
                    break
                await asyncio.sleep(0.05)
            assert pending and not task.done(), (await hoop.events(), task)
            object.__setattr__(pending[-1], "_seen", True)
            await hoop.hub.reviews.decide(pending[-1].review.id, OPS, allow)
            if expected:
                assert await task == expected
            else:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await task
        assert await conn.fetchval("SELECT count(*) FROM r") == 1
    finally:
        await conn.close()
