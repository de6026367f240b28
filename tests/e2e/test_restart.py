"""A real restart of `hoop serve`: a grant whose expiry passes while hoop is down is ended within
5 s of the next start, its ephemeral role dropped and its masked transcript posted to Slack.
PII seeded in the upstream never reaches Slack."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from broker.model import GrantStatus
from broker.store import Store
from tests.conftest import base_config
from tests.support.fakeslack import FakeSlack
from tests.support.pgcluster import PgCluster, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
PII = "jane.doe@example.com"
HOOP = [sys.executable, "-m", "broker.cli"]


async def run(*args: str, env: dict[str, str], cwd: Path) -> str:
    proc = await asyncio.create_subprocess_exec(*HOOP, *args, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def start_serve(env: dict[str, str], cwd: Path, http_port: int, log_name: str) -> tuple[
        asyncio.subprocess.Process, float]:
    """Start `hoop serve`; return it once ready, with the monotonic time hoop's own start-up began
    (its first line of output: the interpreter and imports are done)."""
    path = cwd / log_name
    log = open(path, "ab")  # noqa: SIM115 - closed with the process below
    proc = await asyncio.create_subprocess_exec(*HOOP, "serve", env=env, cwd=cwd, stdout=log, stderr=log)
    log.close()
    began: float | None = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.returncode is None:
        text = path.read_text()
        if began is None and "hoop: " in text:
            began = time.monotonic()
        if "hoop: ready" in text:
            assert began is not None
            return proc, began
        await asyncio.sleep(0.02)
    if proc.returncode is None:
        proc.kill()
    await proc.wait()
    raise AssertionError("hoop serve did not start:\n" + path.read_text())


async def stop_serve(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def role_exists(pg: PgCluster, role: str) -> bool:
    conn = await asyncpg.connect(pg.dsn())
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", role))
    finally:
        await conn.close()


async def test_restart_ends_overdue_grant_drops_role_posts_masked_transcript(pg: PgCluster, tmp_path: Path) -> None:
    db = pg.create_database("e2e")
    pg.psql("DO $$ BEGIN CREATE ROLE app_reader NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    pg.psql(f"CREATE TABLE customers (id int, email text); INSERT INTO customers VALUES (1, '{PII}'); "
            "GRANT SELECT ON customers TO app_reader", database=db)
    fake = await FakeSlack().start()
    data: dict[str, Any] = base_config()
    data["resources"][0].update(address=f"127.0.0.1:{pg.port}", database=db, credentials="ephemeral",
                                admin_user="postgres", admin_credential={"env": "PG_ADMIN"}, roles=["app_reader"],
                                credential=None, channel="C1")
    (tmp_path / "hoop.yaml").write_text(yaml.safe_dump(data))
    http_port, pg_port = free_port(), free_port()
    env = {**os.environ, "HOOP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'hoop.db'}",
           "PG_ADMIN": pg.password, "SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": secrets.token_hex(16),
           "SLACK_API_URL": fake.api_url, "HOOP_HTTP_PORT": str(http_port), "HOOP_PG_PORT": str(pg_port),
           "HOOP_SSH_PORT": "0", "HOOP_HTTP_PROXY_PORT": "0", "PYTHONPATH": str(Path(__file__).parents[2])}
    env.pop("SLACK_APP_TOKEN", None)
    serve: asyncio.subprocess.Process | None = None
    psql: asyncio.subprocess.Process | None = None
    try:
        grant = json.loads(await run("breakglass", "--resource", "prod-db", "--identity", "root@example.com",
                                     "--duration", "12s", "--reason", "restart test", "--json", env=env, cwd=tmp_path))
        role = f"hoop_{grant['grant']}"
        assert await role_exists(pg, role)
        serve, _ = await start_serve(env, tmp_path, http_port, "serve-1.log")
        psql = await asyncio.create_subprocess_exec(
            "psql", "-X", "-At", f"host=127.0.0.1 port={pg_port} user={grant['login']} dbname=prod-db sslmode=disable",
            env={**os.environ, "PGPASSWORD": grant["secret"]}, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert psql.stdin is not None and psql.stdout is not None
        psql.stdin.write(b"SELECT email FROM customers;\n")
        await psql.stdin.drain()
        line = await asyncio.wait_for(psql.stdout.readline(), 20)
        if not line:
            assert psql.stderr is not None
            raise AssertionError((await psql.stderr.read()).decode() + (tmp_path / "serve-1.log").read_text())
        assert line.strip() == b"[email]"  # masked on the way out
        await asyncio.sleep(0.5)  # let the recording reach the spool / store

        serve.send_signal(signal.SIGKILL)  # a crash, mid-grant, with a live session
        await serve.wait()
        serve = None
        expires = datetime.fromisoformat(grant["expires_at"])
        await asyncio.sleep(max((expires - datetime.now(expires.tzinfo)).total_seconds(), 0) + 1)
        assert await role_exists(pg, role)  # nobody was there to drop it

        fake.clear()
        serve, started = await start_serve(env, tmp_path, http_port, "serve-2.log")
        ended = dropped = posted = None
        store = Store.from_url(env["HOOP_DATABASE_URL"])
        try:
            while time.monotonic() - started < 20 and not (ended and dropped and posted):
                async with store.tx() as tx:
                    row = await tx.get_grant(grant["grant"])
                if ended is None and row is not None and row.status is GrantStatus.EXPIRED:
                    ended = time.monotonic() - started
                if dropped is None and not await role_exists(pg, role):
                    dropped = time.monotonic() - started
                if posted is None and fake.of("upload"):
                    posted = time.monotonic() - started
                await asyncio.sleep(0.05)
        finally:
            await store.close()
        # measured from hoop's first line of output (start-up included, interpreter start-up not)
        assert ended is not None and dropped is not None and posted is not None
        assert max(ended, dropped, posted) < 5, (ended, dropped, posted)
        log = (tmp_path / "serve-2.log").read_text()
        assert "reconciled 1 overdue grant(s)" in log
        transcript = b"".join(c.body for c in fake.of("upload")).decode()
        assert "SELECT email FROM customers" in transcript and "[email]" in transcript
        everything = json.dumps([c.params for c in fake.calls]) + transcript
        assert PII not in everything and grant["secret"] not in everything
    finally:
        if psql is not None and psql.returncode is None:
            psql.kill()
            await psql.wait()
        if serve is not None:
            await stop_serve(serve)
        await fake.stop()
