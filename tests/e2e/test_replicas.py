"""Two real `hoop serve` replicas on one PostgreSQL store: psql's Ctrl-C that a balancer sends to
the replica not holding the session still cancels the query; `hoop revoke` in a third process
cuts a live psql session held open by the replica that did not revoke, at once (LISTEN/NOTIFY);
exactly one replica leads the scheduler, and the other takes over when the leader stops."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.model import Session, SessionStatus
from broker.store import Store
from tests.conftest import base_config
from tests.e2e.test_restart import run, start_serve, stop_serve
from tests.support.balancer import RoundRobin
from tests.support.pgcluster import PgCluster, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


async def wait_for_text(path: Path, text: str, seconds: float) -> None:
    for _ in range(int(seconds / 0.05)):
        if text in path.read_text():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path.name}:\n{path.read_text()}")


async def test_revocation_reaches_a_session_on_another_replica(pg: PgCluster, tmp_path: Path) -> None:
    upstream = pg.create_database("e2e_up")
    pg.psql("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", database=upstream)
    store_db = pg.create_database("e2e_store")
    data: dict[str, Any] = base_config()
    data["resources"][0].update(address=f"127.0.0.1:{pg.port}", database=upstream, user=pg.user,
                                credential={"env": "PGPW"}, sslmode="disable")
    data["masking_key"] = {"env": "MASKKEY"}  # replicas share it (hoop state init): cancel digests are keyed by it
    replicas: list[tuple[Path, dict[str, str], int]] = []
    for name in ("a", "b"):
        home = tmp_path / name
        home.mkdir()
        (home / "hoop.yaml").write_text(yaml.safe_dump(data))
        # every listener on a port chosen here: a port-0 listener of replica a could otherwise take the
        # ephemeral port just picked for replica b
        pg_port = free_port()
        env = {**os.environ, "HOOP_DATABASE_URL": pg.sqlalchemy_url(store_db), "PGPW": pg.password, "MASKKEY": "m" * 32,
               "HOOP_HTTP_PORT": str(free_port()), "HOOP_PG_PORT": str(pg_port),
               "HOOP_SSH_PORT": str(free_port()), "HOOP_HTTP_PROXY_PORT": str(free_port()),
               "PYTHONPATH": str(Path(__file__).parents[2])}
        for key in ("SLACK_APP_TOKEN", "SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET"):
            env.pop(key, None)
        replicas.append((home, env, pg_port))
    (home_a, env_a, port_a), (home_b, env_b, port_b) = replicas
    await run("db", "upgrade", env=env_a, cwd=home_a)
    procs: list[asyncio.subprocess.Process] = []
    psql: asyncio.subprocess.Process | None = None
    try:
        procs.append((await start_serve(env_a, home_a, int(env_a["HOOP_HTTP_PORT"]), "serve.log"))[0])
        procs.append((await start_serve(env_b, home_b, int(env_b["HOOP_HTTP_PORT"]), "serve.log"))[0])
        assert "(scheduler leader)" in (home_a / "serve.log").read_text()
        assert "follower" in (home_b / "serve.log").read_text()

        grant = json.loads(await run("breakglass", "--resource", "prod-db", "--identity", "root@example.com",
                                     "--duration", "1h", "--reason", "replicas", "--json", env=env_a, cwd=home_a))
        psql = await asyncio.create_subprocess_exec(
            "psql", "-X", "-At", f"host=127.0.0.1 port={port_b} user={grant['login']} dbname=prod-db sslmode=disable",
            env={**os.environ, "PGPASSWORD": grant["secret"]}, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert psql.stdin is not None and psql.stdout is not None and psql.stderr is not None
        psql.stdin.write(b"SELECT id FROM t;\n")
        await psql.stdin.drain()
        assert (await asyncio.wait_for(psql.stdout.readline(), 20)).strip() == b"1"

        # psql's Ctrl-C through a balancer: the session is on b, the CancelRequest lands on a
        lb = RoundRobin([port_b, port_a])
        await lb.start()
        try:
            sleeper = await asyncio.create_subprocess_exec(
                "psql", "-X", "-At", "-c", "SELECT pg_sleep(30)",
                f"host=127.0.0.1 port={lb.port} user={grant['login']} dbname=prod-db sslmode=disable",
                env={**os.environ, "PGPASSWORD": grant["secret"]}, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            await asyncio.sleep(1.5)  # let the query start upstream
            sleeper.send_signal(signal.SIGINT)
            began = time.monotonic()
            _, err = await asyncio.wait_for(sleeper.communicate(), 10)
            assert b"canceling statement due to user request" in err, err
            assert time.monotonic() - began < 3.0
            assert lb.routed == [port_b, port_a]
        finally:
            await lb.close()

        began = time.monotonic()
        await run("revoke", grant["grant"], "--as", "root@example.com", "--reason", "replica test",
                  env=env_a, cwd=home_a)
        store = Store.from_url(env_a["HOOP_DATABASE_URL"])
        closed: Session | None = None
        try:
            for _ in range(200):
                async with store.tx() as tx:
                    rows = await tx.list_sessions(status=SessionStatus.CLOSED)
                # not the Ctrl-C session above, which its client closed
                closed = next((r for r in rows if r.grant_id == grant["grant"]
                               and r.close_reason != "client closed the connection"), None)
                if closed is not None:
                    break
                await asyncio.sleep(0.05)
        finally:
            await store.close()
        cut = time.monotonic() - began
        assert closed is not None and "access revoked" in (closed.close_reason or ""), closed
        # well inside the 5 s resync sweep: the notification did it (the CLI's start-up included)
        assert cut < 4.5, cut
        psql.stdin.write(b"SELECT id FROM t;\n")
        psql.stdin.close()
        out, err = await asyncio.wait_for(psql.communicate(), 20)
        assert out == b"" and b"access revoked" in err, (out, err)

        await stop_serve(procs[0])  # the leader goes away; b takes the advisory lock
        await wait_for_text(home_b / "serve.log", "this replica is now the scheduler leader", 15)
    finally:
        if psql is not None and psql.returncode is None:
            psql.kill()
            await psql.wait()
        for proc in procs:
            await stop_serve(proc)
